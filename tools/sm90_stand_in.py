"""A stand-in for Triton's active CUDA driver on a machine without a GPU: it reports an H100
(sm_90) so that launches compile for it with Triton's bundled ptxas, while no kernel runs.  Used
by tools/host_cost.py, tools/kernel_registers.py and the sm_90 compile tests of
python_tests/test_triton.py."""
import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction


class Sm90WithoutGpu:
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


def install():
    """Make the stand-in Triton's active driver (before any launch)."""
    driver.set_active(Sm90WithoutGpu())


def compile_launches(record):
    """Install the stand-in and make every Triton launch compile only, calling
    ``record(jit_function, compiled_kernel)`` for each; the triton backend then takes CPU tensors
    (they stand in for CUDA ones: nothing runs).  Returns the original ``JITFunction.run``, for
    a caller that restores the real launch path."""
    install()
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        record(self, kernel)
        return kernel

    JITFunction.run = compile_only
    from ekd_kernels import triton_ekd

    triton_ekd.unavailable_reason = lambda device: None
    return run


def jit_functions(module):
    """The @triton.jit functions of a module (the package's kernels, their helpers)."""
    return [value for value in vars(module).values() if isinstance(value, JITFunction)]


def stub_launchers(functions, make_launcher):
    """Mark every compiled kernel of `functions` loaded and give it the launcher
    ``make_launcher(compiled)``, so that the real launch path (JITFunction.run or the launch
    cache) runs down to a launcher that launches nothing.  Kernels stubbed before are left."""
    for compiled in compiled_kernels(functions):
        if compiled.module != 1:
            compiled.module, compiled.function, compiled._run = 1, 0, make_launcher(compiled)


def compiled_kernels(functions):
    """Every compiled kernel of the @triton.jit `functions`, on every device."""
    return [compiled for function in functions for cache in function.device_caches.values()
            for compiled in cache[0].values()]
