"""Per-batch time of every distillation loss of the package: EKD, RKD (reference and fast), PWR,
unified KD and the EKD paper's comparison set.

    python bench/bench_losses.py                       # B = 64 ... 1024, D = 512, fp32, CPU
    python bench/bench_losses.py --quick               # CI-sized
    python bench/bench_losses.py --sizes 64 128 --methods rkd/fast rkd/reference

For each B: forward+backward and forward-only time (median and spread of the repeats after a
warm-up call, fresh random inputs per B; the methods take turns, as in bench_loss.py), and the
peak extra memory of one forward+backward (the timing and memory helpers of bench/common.py).
A method stops at the first B where one call would exceed the time budget (extrapolated from
the previous B with the method's growth in B) or its memory would not fit; a note row says
where and why.  KD ("hinton_kd") distils logits:
it gets B x 1000 logits instead of embeddings.  PWR runs its default variant, which takes the
O(B^2 log^2 B) sorted algorithm.  "rkd/fast-torch" is the fast RKD's PyTorch path (anchor
tiles), the one it takes off the CPU.  The unified KD loss runs with a 4096-entry bank
that the warm-up call has started to fill.  Rows (with the versions and device of bench/common.py)
are appended to bench/results/losses_cpu.jsonl, with notes for the stopped methods and the
fast-RKD speedup over the reference per B.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import torch

from common import (REPO, PeakMemory, Progress, append_rows, at_least, available_memory_bytes, environment, summary,
                    time_in_turns)

sys.path.insert(0, str(REPO))

from ekd_kernels import EKDLoss, RKDLoss  # noqa: E402
from ekd_kernels import losses  # noqa: E402
from ekd_kernels.rkd_fast import FastRKDLoss  # noqa: E402

CPU = torch.device("cpu")
NUM_CLASSES = 1000  # logits width for hinton_kd

# name -> (factory of a callable (student, teacher, labels) -> loss, growth exponent in B, bytes(B, D))
METHODS = {
    "ekd": (lambda dim: EKDLoss(), 2, lambda b, d: 40 * b * b * 4),
    "rkd/reference": (lambda dim: (lambda s, t, y, f=RKDLoss(): f(s, t)), 3, lambda b, d: 6 * b * b * d * 4),
    "rkd/fast": (lambda dim: (lambda s, t, y, f=FastRKDLoss(): f(s, t)), 3, lambda b, d: 24 * b * b * 4),
    "rkd/fast-torch": (lambda dim: (lambda s, t, y, f=FastRKDLoss(backend="torch"): f(s, t)), 3,
                       lambda b, d: 24 * b * b * 8 + 12 * (1 << 22) * 4),
    "pwr": (lambda dim: (lambda s, t, y, f=losses.PWRLoss(): f(s, t)), 2, lambda b, d: 40 * b * b * 8),
    "unified": (lambda dim: losses.UnifiedKDLoss(dim, bank_size=4096), 2, lambda b, d: 8 * b * 4096 * 4),
    "sp": (lambda dim: (lambda s, t, y, f=losses.SimilarityPreservingLoss(): f(s, t)), 2, lambda b, d: 8 * b * b * 4),
    "cc": (lambda dim: (lambda s, t, y, f=losses.CorrelationCongruenceLoss(): f(s, t)), 2,
           lambda b, d: 16 * b * b * 4),
    "darkrank": (lambda dim: (lambda s, t, y, f=losses.HardDarkRankLoss(): f(s, t)), 2, lambda b, d: 16 * b * b * 4),
    "fitnet": (lambda dim: (lambda s, t, y, f=losses.FitNetLoss(): f(s, t)), 1, lambda b, d: 4 * b * d * 4),
    "hinton_kd": (lambda dim: (lambda s, t, y, f=losses.HintonKDLoss(): f(s, t)), 1,
                  lambda b, d: 8 * b * NUM_CLASSES * 4),
    "cosine": (lambda dim: (lambda s, t, y, f=losses.CosineDistillLoss(): f(s, t)), 1, lambda b, d: 4 * b * d * 4),
}


def make_inputs(method, batch, dim, seed):
    g = torch.Generator().manual_seed(seed)
    width = NUM_CLASSES if method == "hinton_kd" else dim
    student = torch.randn(batch, width, generator=g)
    teacher = student + 0.5 * torch.randn(batch, width, generator=g)
    labels = torch.cat([torch.randint(0, 10**6, (batch // 2,), generator=g),
                        10**6 + torch.arange(batch - batch // 2) // 4])
    return student, teacher, labels


def prepare(name, batch, dim, budget, repeats):
    """(forward+backward, forward, repeats, peak extra bytes) of one method at one B, after its
    warm-up call (the one whose peak memory is measured), or the reason it stops there."""
    loss_fn = METHODS[name][0](dim)
    student, teacher, labels = make_inputs(name, batch, dim, seed=batch)

    def forward_backward():
        s = student.detach().requires_grad_(True)
        loss_fn(s, teacher, labels).backward()

    def forward():
        with torch.no_grad():
            loss_fn(student, teacher, labels)

    t0 = time.perf_counter()
    with PeakMemory(CPU) as peak:
        forward_backward()
    first = time.perf_counter() - t0
    if first > budget:
        return f"stopped at B={batch}: one forward+backward took {first:.1f} s (budget {budget} s)"
    # (the repeats fit the budget: two calls per repeat, forward+backward and forward, and the warm-up)
    reps = repeats if first * (2 * repeats + 2) <= budget else max(2, int(budget / (2 * first)))
    return forward_backward, forward, reps, peak.bytes


def run(names, sizes, dim, repeats, budget_s, rkd_budget_s, env, rounds=3):
    """The rows and why methods stopped.  At each B the methods are made and warmed up one after
    another, then timed in turns (common.time_in_turns, as bench_loss.py does): the fast RKD's
    speedup over the reference is a ratio of two figures taken over the same minutes."""
    rows, stopped, last = [], {}, {}
    memory = available_memory_bytes(CPU)
    progress = Progress(len(sizes) * len(names), "bench losses")
    for batch in sizes:
        prepared = {}
        for name in names:
            progress.step(f"{name} B={batch}")
            if name in stopped:
                continue
            _, growth, need_bytes = METHODS[name]
            budget = rkd_budget_s if name.startswith("rkd/") else budget_s
            need = need_bytes(batch, dim)
            if need > 0.6 * memory:
                stopped[name] = (f"stopped at B={batch}: needs about {need / 2**30:.1f} GiB, "
                                 f"{memory / 2**30:.1f} GiB free")
                continue
            if name in last:
                prev_batch, prev_time = last[name]
                predicted = prev_time * (batch / prev_batch) ** growth
                if predicted > budget:
                    stopped[name] = (f"stopped at B={batch}: one forward+backward would take about {predicted:.0f} s "
                                     f"(budget {budget} s; {prev_time:.2f} s at B={prev_batch}, growth B^{growth})")
                    continue
            outcome = prepare(name, batch, dim, budget, repeats)
            if isinstance(outcome, str):
                stopped[name] = outcome
            else:
                prepared[name] = outcome
        timed, failed = time_in_turns(prepared, CPU, rounds)
        for name, why in failed.items():
            stopped[name] = f"stopped at B={batch}: {why}"
        for name, (fb_times, fw_times, turns) in timed.items():
            fb, fw = summary(fb_times), summary(fw_times)
            rows.append({**env, "benchmark": "losses", "method": name.split("/")[0], "name": name, "batch": batch,
                         "dim": NUM_CLASSES if name == "hinton_kd" else dim, "dtype": "float32",
                         "forward_backward": fb, "forward": fw, "rounds": turns,
                         "peak_memory_bytes": prepared[name][3]})
            last[name] = (batch, fb["median_s"])
        prepared = timed = None  # free this size's modules and inputs before the next
    return rows, stopped


def rkd_speedups(rows):
    by = {(r["batch"], r["name"]): r["forward_backward"]["median_s"] for r in rows}
    return [{"batch": b, "fast_s": by[(b, "rkd/fast")], "reference_s": by[(b, "rkd/reference")],
             "speedup": by[(b, "rkd/reference")] / by[(b, "rkd/fast")]}
            for b in sorted({r["batch"] for r in rows})
            if (b, "rkd/fast") in by and (b, "rkd/reference") in by]


def print_table(rows, stopped, names, device_label):
    batches = sorted({r["batch"] for r in rows})
    by = {(r["batch"], r["name"]): r for r in rows}
    dims = sorted({r["dim"] for r in rows if r.get("name") != "hinton_kd"}) or ["-"]
    print(f"\nforward+backward per batch, median ms (float32, D = {', '.join(map(str, dims))}; hinton_kd: 1000 "
          f"logits; {device_label})")
    print("| loss | " + " | ".join(f"B = {b}" for b in batches) + " |")
    print("|---" * (len(batches) + 1) + "|")
    for name in names:
        cells = [f"{by[(b, name)]['forward_backward']['median_s'] * 1e3:.2f}" if (b, name) in by else "-"
                 for b in batches]
        print(f"| {name} | " + " | ".join(cells) + " |")
    for name, why in stopped.items():
        print(f"  {name}: {why}")


def _load_average():
    """1-minute load average at the end of the run: the CPU machine is shared, say how busy it was."""
    try:
        return float(pathlib.Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI-sized: B = 64 and 128, two repeats")
    parser.add_argument("--sizes", type=at_least(2), nargs="+", default=None, help="batch sizes B (default 64 ... 1024)")
    parser.add_argument("--methods", nargs="+", default=None, choices=list(METHODS), help="subset of the losses")
    parser.add_argument("--dim", type=at_least(1), default=512)
    parser.add_argument("--repeats", type=at_least(1), default=None)
    parser.add_argument("--budget-s", type=at_least(0.0, float, strictly=True), default=None,
                        help="most seconds one call may take")
    parser.add_argument("--rkd-budget-s", type=at_least(0.0, float, strictly=True), default=None,
                        help="the same for RKD (default 120 s: the reference's B = 512 time is the baseline of "
                             "the fast RKD's speedup)")
    parser.add_argument("--threads", type=at_least(1), default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", default=None, help="a .jsonl file or a folder (default bench/results/)")
    args = parser.parse_args(argv)

    torch.set_float32_matmul_precision("highest")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        sizes, repeats, budget_s, rkd_budget_s = [64, 128], 2, 5.0, 5.0
    else:
        sizes, repeats, budget_s, rkd_budget_s = [64, 128, 256, 512, 1024], 5, 30.0, 120.0
    sizes = args.sizes or sizes
    repeats = args.repeats or repeats
    budget_s = args.budget_s or budget_s
    rkd_budget_s = args.rkd_budget_s or rkd_budget_s
    names = args.methods or list(METHODS)

    env = environment(CPU)
    print(f"ekd_kernels @ {env['commit']}, torch {env['torch']}, {env['device']}, {env['threads']} threads, "
          f"D={args.dim}, B={sizes}, float32", flush=True)
    rows, stopped = run(names, sizes, args.dim, repeats, budget_s, rkd_budget_s, env)
    print_table(rows, stopped, names, env["device"])
    speedups = rkd_speedups(rows)
    for entry in speedups:
        print(f"  fast RKD at B={entry['batch']}: {entry['speedup']:.1f}x faster than the reference "
              f"({entry['fast_s'] * 1e3:.1f} ms vs {entry['reference_s'] * 1e3:.1f} ms)")
    load = _load_average()
    print(f"  1-minute load average at the end: {load} (shared machine: absolute times are noisy)")
    notes = [{**env, "benchmark": "losses", "note": "stopped", "name": k, "why": v} for k, v in stopped.items()]
    notes += [{**env, "benchmark": "losses", "note": "rkd_fast_speedup", "load_average": load, **entry}
              for entry in speedups]
    path = append_rows(rows + notes, "losses", CPU, args.out)
    print(f"\nappended {len(rows)} rows to {path}")
    return rows


if __name__ == "__main__":
    main()
