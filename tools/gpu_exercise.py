"""Exercise every GPU-facing path, for compute-sanitizer and for the large-B consistency check.

    python tools/gpu_exercise.py sanitize --sizes 33 4096
        every CUDA op and Triton kernel forward and backward (all backends, variants, fp32/bf16),
        plus the fast-RKD and evaluator CUDA paths; run it under
        compute-sanitizer --tool memcheck|racecheck|initcheck|synccheck.
    python tools/gpu_exercise.py consistency --sizes 1024 8192 32768 --out result.json
        every fast backend against the reference (the reference only up to --reference-max B),
        fp32 and bf16, three consecutive calls: loss, gradient, thresholds and statistics within
        the golden tolerances, and bitwise determinism across two runs. Exit status 1 on a miss.

Issue 9's checklist; needs CUDA (``--device cpu`` runs the same code on CPU tensors for a dry run).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from ekd_kernels import EKDLoss  # noqa: E402
from ekd_kernels.backends import available_backends  # noqa: E402

LOSS_RTOL, GRAD_REL_NORM, THRESHOLD_ATOL = 1e-5, 1e-4, 1e-6  # ../shared/golden/README.md
VARIANTS = [dict(), dict(critical_only=True, compute_critical_ratio=True), dict(rank_loss="eq7"),
            dict(rank_loss="eq8", num_hard_negatives=100), dict(negative_selection="random")]
COUNTS = ("num_positive_pairs", "num_negative_pairs", "num_selected_negatives", "num_critical_selected")


def batch_of(size, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(size, 512, generator=g)
    teacher = student + 0.5 * torch.randn(size, 512, generator=g)
    labels = torch.cat([torch.randint(0, 10**6, (size // 2,), generator=g), 10**6 + torch.arange(size - size // 2) // 4])
    return student.to(device, dtype), teacher.to(device, dtype), labels.to(device)


def call(crit, student, teacher, labels, seed):
    x = student.detach().clone().requires_grad_(True)
    loss = crit(x, teacher, labels, generator=torch.Generator().manual_seed(seed))
    loss.backward()
    return loss.detach(), x.grad, crit.last_stats


def sanitize(sizes, device):
    fast = [b for b in available_backends(device) if b != "reference"]
    print(f"backends: {fast}", flush=True)
    for size in sizes:
        for dtype in (torch.float32, torch.bfloat16):
            student, teacher, labels = batch_of(size, dtype, device, seed=size)
            for backend in fast:
                for options in VARIANTS:
                    crit = EKDLoss(backend=backend, **options).to(device)
                    for step in range(2):
                        call(crit, student, teacher, labels, step)
                    print(f"ok B={size} {dtype} {backend} {options}", flush=True)
    from ekd_kernels.metrics import verify_all_pairs
    from ekd_kernels.rkd_fast import fast_rkd_loss
    student, teacher, labels = batch_of(min(sizes), torch.float32, device, seed=0)
    fast_rkd_loss(student.requires_grad_(True), teacher).backward()
    verify_all_pairs(student.detach(), labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    print("sanitize run complete", flush=True)


def compare(got, want):
    """Misses between two (loss, grad, stats) triples at the golden tolerances."""
    misses = []
    (loss, grad, stats), (ref_loss, ref_grad, ref_stats) = got, want
    if not abs(loss.item() - ref_loss.item()) <= LOSS_RTOL * abs(ref_loss.item()) + 1e-12:
        misses.append(f"loss {loss.item()} vs {ref_loss.item()}")
    err = ((grad.double() - ref_grad.double()).norm() / ref_grad.double().norm().clamp_min(1e-30)).item()
    if not err < GRAD_REL_NORM:
        misses.append(f"gradient relative error {err:.3g}")
    for name in ("student_thresholds", "teacher_thresholds", "batch_student_thresholds", "batch_teacher_thresholds"):
        diff = (getattr(stats, name).double() - getattr(ref_stats, name).double()).abs().max().item()
        if not diff <= THRESHOLD_ATOL:
            misses.append(f"{name} differ by {diff:.3g}")
    for name in COUNTS:
        if getattr(stats, name).item() != getattr(ref_stats, name).item():
            misses.append(f"{name} {getattr(stats, name).item()} vs {getattr(ref_stats, name).item()}")
    return misses


def consistency(sizes, device, reference_max, out):
    fast = [b for b in available_backends(device) if b != "reference"]
    report, failed = [], False
    for size in sizes:
        for dtype in (torch.float32, torch.bfloat16):
            batches = [batch_of(size, dtype, device, seed=size + s) for s in range(3)]
            judge = "reference" if size <= reference_max else fast[0]
            crits = {b: EKDLoss(backend=b).to(device) for b in dict.fromkeys([judge] + fast)}
            for step, inputs in enumerate(batches):
                want = call(crits[judge], *inputs, step)
                for backend in fast:
                    if backend == judge:
                        continue
                    misses = compare(call(crits[backend], *inputs, step), want)
                    failed |= bool(misses)
                    report.append({"B": size, "dtype": str(dtype), "backend": backend, "judge": judge, "step": step,
                                   "misses": misses})
                    print(f"B={size} {dtype} {backend} vs {judge} step {step}: {misses or 'ok'}", flush=True)
            for backend in fast:  # bitwise determinism: two fresh modules, same inputs
                runs = [call(EKDLoss(backend=backend).to(device), *batches[0], 0) for _ in range(2)]
                same = torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
                failed |= not same
                report.append({"B": size, "dtype": str(dtype), "backend": backend, "deterministic": same})
                print(f"B={size} {dtype} {backend} deterministic: {same}", flush=True)
    if out:
        pathlib.Path(out).write_text(json.dumps({"device": torch.cuda.get_device_name() if device.type == "cuda"
                                                 else "cpu", "torch": torch.__version__, "report": report}, indent=1))
    return 1 if failed else 0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["sanitize", "consistency"])
    parser.add_argument("--sizes", type=int, nargs="+", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--reference-max", type=int, default=8192, help="largest B the reference judges")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.what == "sanitize":
        sanitize(args.sizes, device)
        return 0
    return consistency(args.sizes, device, args.reference_max, args.out)


if __name__ == "__main__":
    sys.exit(main())
