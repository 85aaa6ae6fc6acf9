"""Host time of one Triton-backend forward+backward without a GPU: what the Python around the
kernels costs, which bounds a call at small B where the arithmetic takes microseconds.

The kernels are compiled for an H100 (sm_90, Triton's bundled ptxas; a CUDA build of torch) with
a stand-in driver, as test_every_launch_compiles_for_sm90 does, then every call goes through the
real launch path (EKDLoss, the custom ops, autograd, the argument checks, the launch cache of
_triton/launch.py or Triton's JITFunction.run: binding, specialisation, cache lookup) down to the
compiled kernel's launcher, which is replaced by a counter.  So it leaves out only the C launcher and cuLaunchKernel (a few us a launch) and
torch's CUDA-side costs (the caching allocator; past SMALL_SORT_MAX labels, torch.sort's
launches).  Printed: ms per call with the launch cache and without it (every launch through
JITFunction.run; alternating, one run), and with the kernels replaced at `kernel[grid]` (no
launch path at all): the differences are the per-launch Python of each way.  CPU tensors stand in for CUDA ones.
Then, kernels still replaced, where the rest goes: the module's forward with and without
autograd, the forward custom op called directly, its implementation (_forward_impl) alone, the
backward op and its implementation; and the module's forward+backward through the eager path (a
plain autograd.Function, what eager calls take) against the same through the registered op and
the autograd torch.library wraps around it (what torch.compile traces), in one run;
_forward_impl with its scratch carved by one split_with_sizes against a slice and a view a
buffer (as before).  Last, the same pair for the csrc backend's Python side, on meta tensors (the ops' fake kernels stand in for
the compiled ones, so only the wrappers and autograd are timed).

    python tools/host_cost.py            # B = 64, D = 512
    python tools/host_cost.py 1024

On a GPU, `--cuda` times the same call with real launches on CUDA tensors (no stand-in): an
eager forward+backward with the launch cache and without it, then with every compiled kernel's
launcher replaced by a no-op (Triton's C launcher and cuLaunchKernel left out, the rest kept:
torch's CUDA allocations, device guards, autograd), and with the kernels replaced at
`kernel[grid]`; then the same breakdown.  The differences are the GPU host's cost of a launch's
C launcher and driver calls, of its Python, and of the rest; the stand-in's figures on the same
host (the first form, run there) say how much slower that host runs this project's Python than
the machine the stand-in figures came from.

    python tools/host_cost.py 64 --cuda  # on a GPU
"""
import argparse
import os
import pathlib
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # native (compiled) kernels, not the interpreter

import torch  # noqa: E402
import triton  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "bench"))

import sm90_stand_in  # noqa: E402  (tools/, this script's folder)
from common import at_least  # noqa: E402  (bench/)

def _no_sync():
    pass


#: What ends a round of calls: nothing on the stand-in; torch.cuda.synchronize with --cuda (a
#: round's calls are then timed to their last kernel's end: the host's time when it, not the
#: device, bounds the loop).
finish = _no_sync


def per_call_ms(step, repeats, rounds=7):
    """The best of `rounds` rounds of `repeats` calls: on a shared 2-core machine one round's mean
    strays by 10-20% from run to run, the best round by about 1%."""
    for _ in range(5):
        step()
    finish()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        finish()
        best = min(best, (time.perf_counter() - start) / repeats)
    return best * 1e3


def cache_on_and_off(cache, step, repeats):
    """{True: ms a call with the launch cache, False: without}, alternating three times, each
    one's best: one run, one ratio."""
    timed = {True: float("inf"), False: float("inf")}
    for _ in range(3):
        for enabled in timed:
            cache.enabled = enabled
            timed[enabled] = min(timed[enabled], per_call_ms(step, repeats, rounds=3))
    cache.enabled = True
    return timed


def main(batch: int, repeats: int = 300):
    # compile every variant the first call launches (CPU tensors stand in for CUDA ones), then
    # restore the real launch path
    run = sm90_stand_in.compile_launches(lambda function, kernel: None)
    from ekd_kernels import EKDLoss, triton_ekd

    kernels = triton_ekd._kernels()
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(batch, 512, generator=generator), torch.randn(batch, 512, generator=generator)
    labels = torch.arange(batch) // 4
    crit = EKDLoss(backend="triton")

    def step():
        crit(student.clone().requires_grad_(True), teacher, labels).backward()

    step()
    JITFunction.run = run
    launches = [0]

    def launcher(*args, **kwargs):
        launches[0] += 1

    jitted = sm90_stand_in.jit_functions(kernels)
    sm90_stand_in.stub_launchers(jitted, lambda compiled: launcher)
    cache = triton_ekd.launches
    cache.clear()  # (the compile-only calls above launched nothing: no kernel passed its check)
    step()
    per_call = launches[0]  # the launches of one call
    timed = cache_on_and_off(cache, step, repeats)
    unchecked = cache.disabled_kernels()

    replace_kernels(kernels, jitted)
    without = per_call_ms(step, repeats)
    print(f"B = {batch}, a forward+backward ({per_call:.0f} launches): {timed[True]:.3f} ms with the launch cache, "
          f"{timed[False]:.3f} ms through JITFunction.run at every launch, {without:.3f} ms with the kernels "
          f"replaced at kernel[grid]: {(timed[True] - without) / per_call * 1e3:.1f} against "
          f"{(timed[False] - without) / per_call * 1e3:.1f} us of Python a launch")
    if unchecked:
        print(f"  kernels that failed the launch cache's check (JITFunction.run each launch): {unchecked}")
    breakdown(crit, student, teacher, labels, repeats)
    csrc_paths(batch, repeats)


class NoLaunch:
    """A kernel whose `kernel[grid](...)` does nothing."""

    def __init__(self, name):
        self.__name__ = name  # (triton_ekd._launch looks the kernel's LAUNCH_OPTIONS up by it)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def replace_kernels(kernels, jitted):
    """Replace the kernels module's @triton.jit functions by NoLaunch (no launch path at all)."""
    for fn in jitted:
        setattr(kernels, fn.__name__, NoLaunch(fn.__name__))


@triton.jit
def _empty_kernel(p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13, p14, p15, p16, p17, p18, p19, n):
    """A launch that does nothing, with 20 pointer arguments (launch_costs)."""
    pass


def launch_costs(device, repeats=2000):
    """What the GPU host pays per launch and per pointer argument, and per CUDA allocation: an
    empty kernel with 20 distinct tensors against the same 20 arguments as plain integers
    (addresses: Triton's launcher then neither calls data_ptr() nor cuPointerGetAttribute),
    launched through the launch cache (its key reads each tensor's dtype and address too) and
    by the compiled kernel's launcher alone; and torch.empty of a few elements."""
    from triton import knobs
    from triton.runtime import driver

    from ekd_kernels._triton import launch

    tensors = [torch.empty(16, device=device) for _ in range(20)]
    addresses = [t.data_ptr() for t in tensors]
    times = {}
    for name, args in (("tensors", (*tensors, 1)), ("integers", (*addresses, 1))):
        cached = lambda args=args: launch.launches.launch(_empty_kernel, (1,), args, {})  # noqa: E731
        times[name, "cache"] = per_call_ms(cached, repeats) * 1e3
        index = driver.active.get_current_device()
        key = launch._key(_empty_kernel, index, knobs.runtime, args, {})
        compiled = launch.launches.entries(_empty_kernel).get(key)
        if compiled is None:  # (no entry: the dry run's compile-only launches)
            times[name, "launcher"] = float("nan")
            continue
        launcher_args = launch._launcher_args(compiled, (1,), driver.active.get_current_stream(index), args, ())
        times[name, "launcher"] = per_call_ms(lambda: compiled.run(*launcher_args), repeats) * 1e3
    allocate = per_call_ms(lambda: torch.empty(16, device=device), repeats) * 1e3
    for way, label in (("cache", "through the launch cache"), ("launcher", "by its launcher alone")):
        tensor, integer = times["tensors", way], times["integers", way]
        print(f"  an empty launch {label}: {tensor:.1f} us with 20 tensor arguments, {integer:.1f} us with their "
              f"addresses as integers ({(tensor - integer) / 20 * 1e3:.0f} ns a tensor argument)")
    print(f"  torch.empty: {allocate:.1f} us")


def cuda_main(batch: int, repeats: int = 100, device: str = "cuda"):
    """--cuda: the same call on a GPU, real launches (the module docstring).  (`device` "cpu"
    after stand-in stubs: a dry run of this function's steps without a GPU.)"""
    global finish
    from ekd_kernels import EKDLoss, triton_ekd

    device = torch.device(device)
    finish = torch.cuda.synchronize if device.type == "cuda" else _no_sync
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(batch, 512, generator=generator).to(device)
    teacher = torch.randn(batch, 512, generator=generator).to(device)
    labels = (torch.arange(batch) // 4).to(device)
    crit = EKDLoss(backend="triton").to(device)

    def step():
        crit(student.clone().requires_grad_(True), teacher, labels).backward()

    for _ in range(3):  # compile, then the launch cache's two checked launches a key
        step()
    kernels = triton_ekd._kernels()
    jitted = sm90_stand_in.jit_functions(kernels)
    compiled = [kernel for kernel in sm90_stand_in.compiled_kernels(jitted)
                if getattr(kernel, "_run", None) is not None]
    timed = cache_on_and_off(triton_ekd.launches, step, repeats)
    real = {kernel: kernel._run for kernel in compiled}
    launches = [0]

    def no_op(*args):
        launches[0] += 1

    for kernel in compiled:
        kernel._run = no_op
    step()
    per_call = launches[0]  # the launches of one call
    no_launcher = per_call_ms(step, repeats)
    for kernel, run in real.items():
        kernel._run = run
    replace_kernels(kernels, jitted)
    without = per_call_ms(step, repeats)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "dry run"
    print(f"{name}, B = {batch}, a forward+backward ({per_call} launches), real launches: "
          f"{timed[True]:.3f} ms with the launch cache, {timed[False]:.3f} ms without; launchers replaced by a "
          f"no-op: {no_launcher:.3f} ms; kernels replaced at kernel[grid]: {without:.3f} ms.  A launch: "
          f"{(timed[True] - no_launcher) / per_call * 1e3:.1f} us of C launcher and driver (if the host bounds the "
          f"loop), {(no_launcher - without) / per_call * 1e3:.1f} us of Python with the cache")
    breakdown(crit, student, teacher, labels, repeats)  # (kernels replaced at kernel[grid], as the stand-in's)
    launch_costs(device)


def breakdown(crit, student, teacher, labels, repeats):
    from ekd_kernels import triton_ekd

    config = crit.config
    thresholds = (crit.student_thresholds, crit.teacher_thresholds)
    options = (list(config.fprs), config.temperature, config.num_hard_negatives, config.momentum,
               config.positive_weight, config.negative_weight, config.critical_only, config.rank_loss,
               config.compute_critical_ratio, True)
    leaf = student.clone().requires_grad_(True)
    outputs = triton_ekd._forward_impl(student, teacher, labels, *thresholds, None, config, True)
    saved = [tensor for part in triton_ekd._SAVED_OUTPUTS for tensor in outputs[part]]
    backward_args = (torch.ones((), device=student.device), *saved, config.temperature, config.critical_only,
                     config.rank_loss)

    def forward_no_grad():
        with torch.no_grad():
            crit(leaf, teacher, labels)

    pieces = {
        "module forward, autograd recording": lambda: crit(leaf, teacher, labels),
        "module forward under no_grad": forward_no_grad,
        "forward custom op": lambda: torch.ops.ekd_kernels.triton_ekd_forward(student, teacher, labels, *thresholds,
                                                                              None, *options),
        "_forward_impl": lambda: triton_ekd._forward_impl(student, teacher, labels, *thresholds, None, config, True),
        "backward custom op": lambda: torch.ops.ekd_kernels.triton_ekd_backward(*backward_args),
        "_backward_impl": lambda: triton_ekd._backward_impl(*backward_args),
    }
    for name, piece in pieces.items():
        leaf.grad = None
        print(f"  {name}: {per_call_ms(piece, 4 * repeats) * 1e3:.0f} us")
    print("  module forward+backward, eager path against the registered op (alternating, best of 5):")
    print_paths(triton_ekd, lambda: crit(leaf, teacher, labels).backward(), repeats)
    carve_by_slices(triton_ekd, lambda: triton_ekd._forward_impl(student, teacher, labels, *thresholds, None, config,
                                                                 True), repeats)


def carve_by_slices(triton_ekd, forward, repeats):
    """_forward_impl with the scratch carved by one split_with_sizes (triton_ekd._carve) against a
    slice and a view per buffer (as before 2026-11-27), alternating, each one's best."""
    import math

    def by_slices(dtype, device, **shapes):
        sizes = {name: math.prod(shape) for name, shape in shapes.items()}
        buffer = torch.empty(sum(sizes.values()), dtype=dtype, device=device)
        views, offset = {}, 0
        for name, shape in shapes.items():
            views[name] = buffer[offset:offset + sizes[name]].view(shape)
            offset += sizes[name]
        return buffer, views

    carve = triton_ekd._carve
    best = {carve: float("inf"), by_slices: float("inf")}
    for _ in range(5):
        for way in best:
            triton_ekd._carve = way
            best[way] = min(best[way], per_call_ms(forward, repeats))
    triton_ekd._carve = carve
    print(f"  _forward_impl, its scratch by split_with_sizes {best[carve] * 1e3:.0f} us against a slice and a view a "
          f"buffer {best[by_slices] * 1e3:.0f} us (alternating, best of 5)")


def print_paths(backend_module, step, repeats):
    """The eager path's time against the registered op's (eager_call forced False), alternating
    the two five times and keeping each one's best: one run, one ratio."""
    eager_call = backend_module.eager_call
    best = {"eager": float("inf"), "op": float("inf")}
    for _ in range(5):
        for path in best:
            backend_module.eager_call = eager_call if path == "eager" else (lambda *tensors: False)
            best[path] = min(best[path], per_call_ms(step, repeats))
    backend_module.eager_call = eager_call
    print(f"    eager path {best['eager'] * 1e3:.0f} us, registered op {best['op'] * 1e3:.0f} us "
          f"({best['op'] / best['eager']:.2f}x)")


def csrc_paths(batch, repeats):
    from ekd_kernels import EKDConfig, csrc_ops

    if csrc_ops.unavailable_reason(torch.device("cpu")) is not None:
        print("  csrc: not built")
        return
    student, teacher = torch.ones(batch, 512, device="meta"), torch.ones(batch, 512, device="meta")
    labels, thresholds = torch.zeros(batch, dtype=torch.int64, device="meta"), torch.zeros(6, device="meta")
    leaf, config = student.clone().requires_grad_(True), EKDConfig()
    print("  csrc backend, forward+backward on meta tensors (fake kernels), eager path against the registered op:")
    print_paths(csrc_ops, lambda: csrc_ops.ekd_forward(leaf, teacher, labels, thresholds, thresholds,
                                                       config).loss.backward(), repeats)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("batch", type=at_least(2), nargs="?", default=64)
    parser.add_argument("--cuda", action="store_true", help="on a GPU: real launches on CUDA tensors")
    parser.add_argument("--repeats", type=at_least(1), default=None, help="calls a round (default 300; 100 with --cuda)")
    args = parser.parse_args()
    if args.cuda:
        cuda_main(args.batch, args.repeats or 100)
    else:
        main(args.batch, args.repeats or 300)
