"""Host time of one Triton-backend forward+backward without a GPU: what the Python around the
kernels costs, which bounds a call at small B where the arithmetic takes microseconds.

The kernels are compiled for an H100 (sm_90, Triton's bundled ptxas; a CUDA build of torch) with
a stand-in driver, as test_every_launch_compiles_for_sm90 does, then every call goes through the
real launch path (EKDLoss, the custom ops, autograd, the argument checks, Triton's JITFunction.run:
binding, specialisation, cache lookup) down to the compiled kernel's launcher, which is replaced
by a counter.  So it leaves out only the C launcher and cuLaunchKernel (a few us a launch) and
torch's CUDA-side costs (the caching allocator, the label sort's launches).  Printed: ms per call
with the launch path, and with the kernels replaced at `kernel[grid]` (no Triton launch path at
all): their difference is Triton's per-launch Python.  CPU tensors stand in for CUDA ones.
Then, kernels still replaced, where the rest goes: the module's forward with and without
autograd, the forward custom op called directly, its implementation (_forward_impl) alone, the
backward op and its implementation; and the op pair's forward+backward through the autograd that
torch.library registers for it, against a plain torch.autograd.Function calling the same two ops
(what replacing that registration would save).

    python tools/host_cost.py            # B = 64, D = 512
    python tools/host_cost.py 1024
"""
import os
import pathlib
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # native (compiled) kernels, not the interpreter

import torch  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import sm90_stand_in  # noqa: E402  (tools/, this script's folder)

def per_call_ms(step, repeats):
    for _ in range(5):
        step()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats * 1e3


def main(batch: int, repeats: int = 300):
    sm90_stand_in.install()
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        return run(self, *args, grid=grid, warmup=True, **kwargs)

    from ekd_kernels import EKDLoss, triton_ekd

    triton_ekd.unavailable_reason = lambda device: None  # CPU tensors stand in for CUDA ones
    kernels = triton_ekd._kernels()
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(batch, 512, generator=generator), torch.randn(batch, 512, generator=generator)
    labels = torch.arange(batch) // 4
    crit = EKDLoss(backend="triton")

    def step():
        crit(student.clone().requires_grad_(True), teacher, labels).backward()

    JITFunction.run = compile_only  # compile every variant this call launches
    step()
    JITFunction.run = run
    launches = [0]

    def launcher(*args, **kwargs):
        launches[0] += 1

    jitted = [getattr(kernels, name) for name in dir(kernels) if isinstance(getattr(kernels, name), JITFunction)]
    for fn in jitted:
        for cache in fn.device_caches.values():
            for compiled in cache[0].values():
                compiled.module, compiled.function, compiled._run = 1, 0, launcher  # handles "loaded"
    with_launch_path = per_call_ms(step, repeats)
    per_call = launches[0] / (repeats + 5)

    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    for fn in jitted:
        setattr(kernels, fn.__name__, NoLaunch())
    without = per_call_ms(step, repeats)
    print(f"B = {batch}: {with_launch_path:.3f} ms a forward+backward through Triton's launch path "
          f"({per_call:.0f} launches), {without:.3f} ms with the kernels replaced at kernel[grid]: "
          f"{(with_launch_path - without) / per_call * 1e3:.0f} us of Python a launch")
    breakdown(crit, student, teacher, labels, repeats)


def breakdown(crit, student, teacher, labels, repeats):
    from ekd_kernels import triton_ekd

    config = crit.config
    thresholds = (crit.student_thresholds, crit.teacher_thresholds)
    options = (list(config.fprs), config.temperature, config.num_hard_negatives, config.momentum,
               config.positive_weight, config.negative_weight, config.critical_only, config.rank_loss,
               config.compute_critical_ratio, True)
    leaf = student.clone().requires_grad_(True)
    outputs = triton_ekd._forward_impl(student, teacher, labels, *thresholds, None, config, True)
    saved = [outputs[i] for i in (15, 16, 17, 7, 8, 9, 10, 11, 12, 13, 14)]
    backward_args = (torch.ones(()), *saved, config.temperature, config.critical_only, config.rank_loss)

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
    forward_op, backward_op = torch.ops.ekd_kernels.triton_ekd_forward, torch.ops.ekd_kernels.triton_ekd_backward

    class PlainFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, student):
            outputs = forward_op(student, teacher, labels, *thresholds, None, *options)
            ctx.set_materialize_grads(False)
            ctx.save_for_backward(*outputs[15:18], *outputs[7:15])
            ctx.mark_non_differentiable(*outputs[1:])
            return outputs

        @staticmethod
        def backward(ctx, grad_loss, *unused):
            return backward_op(grad_loss, *ctx.saved_tensors, config.temperature, config.critical_only,
                               config.rank_loss)

    def through_registered_autograd():
        forward_op(leaf, teacher, labels, *thresholds, None, *options)[0].backward()

    def through_plain_function():
        PlainFunction.apply(leaf)[0].backward()

    pieces["op pair forward+backward, torch.library's autograd"] = through_registered_autograd
    pieces["op pair forward+backward, a plain autograd.Function"] = through_plain_function
    for name, piece in pieces.items():
        leaf.grad = None
        print(f"  {name}: {per_call_ms(piece, 4 * repeats) * 1e3:.0f} us")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 64)
