"""Per-batch time of the EKD loss (every available backend) against RKD and the floor.

    make bench                                  # sizes chosen for the device it runs on
    python bench/bench_loss.py --batches 128 256 --dtype float32 --repeats 7

For each batch size B (D = 512): forward+backward and forward-only time of each method, the
median and the spread (interquartile range) of the repeats after a warm-up call, fresh random
inputs, and the peak memory of one forward+backward (CUDA: max_memory_allocated; CPU: growth of
the process's peak RSS, VmHWM, reset before each measurement).  "floor" is the two Gram matrices
S @ S.T and T @ T.T by torch.mm (fp32 at "highest" precision): the least any exact EKD must do.
Ratios are computed within this run.  A method stops at the first B where one call would exceed
the time budget or the memory it needs would not fit; the JSON says where and why.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

import torch

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import ekd_kernels  # noqa: E402
from ekd_kernels import EKDLoss, RKDLoss  # noqa: E402
from ekd_kernels.backends import BACKEND_NAMES, resolve_backend  # noqa: E402

# ----------------------------------------------------------------------------- environment


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"{platform.processor() or 'cpu'} ({os.cpu_count()} cores)"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except OSError:
        return "unknown"


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 8 << 30


# ----------------------------------------------------------------------------- memory probes


def _vm_kib(field: str) -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _release_free_heap():
    """Hand the allocator's cached free pages back to the OS, so that the next block's peak RSS
    growth is its own allocations rather than 0 (reused pages do not grow the RSS)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak extra memory of a block: CUDA allocator peak, or growth of the CPU process's peak RSS."""

    def __init__(self, device: torch.device):
        self.device = device
        self.bytes = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            _release_free_heap()
            try:  # writing 5 to clear_refs resets VmHWM (Linux >= 4.0)
                pathlib.Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass
            self.base = _vm_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.bytes = max(0, _vm_kib("VmHWM") * 1024 - self.base)


# ----------------------------------------------------------------------------- timing


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device, repeats: int):
    """Times of `repeats` calls after one warm-up call (seconds): CUDA events, or a monotonic clock."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def summary(times):
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {"median_s": statistics.median(times), "iqr_s": q[2] - q[0], "min_s": min(times), "repeats": len(times)}


# ----------------------------------------------------------------------------- methods


def make_inputs(batch, dim, dtype, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    student = torch.randn(batch, dim, generator=g).to(device=device, dtype=dtype)
    teacher = (student.float().cpu() + 0.5 * torch.randn(batch, dim, generator=g)).to(device=device, dtype=dtype)
    # a general part and a balanced part of 4 images per identity, as EKD training batches are built
    labels = torch.cat([torch.randint(0, 10**6, (batch // 2,), generator=g),
                        10**6 + torch.arange(batch - batch // 2) // 4]).to(device)
    return student, teacher, labels


def ekd_step(backend, device):
    crit = EKDLoss(backend=backend).to(device)

    def forward_backward(student, teacher, labels):
        student = student.detach().requires_grad_(True)
        crit(student, teacher, labels).backward()

    def forward(student, teacher, labels):
        with torch.no_grad():
            crit(student, teacher, labels)

    return forward_backward, forward


def rkd_step(device):
    crit = RKDLoss()

    def forward_backward(student, teacher, labels):
        student = student.detach().requires_grad_(True)
        crit(student, teacher).backward()

    def forward(student, teacher, labels):
        with torch.no_grad():
            crit(student, teacher)

    return forward_backward, forward


def floor_step(device):
    def grams(student, teacher, labels):
        torch.mm(student, student.t())
        torch.mm(teacher, teacher.t())

    return grams, grams


def estimated_bytes(method, batch, dim):
    """What a method holds at once, roughly, to skip sizes that cannot fit (fp32)."""
    if method == "rkd":
        return 6 * batch * batch * dim * 4  # B x B x D differences, normalised, and their grads
    if method == "ekd/reference":
        return 40 * batch * batch * 4        # Grams, pair lists, sorts, masks, grads
    return 4 * batch * dim * 4 + 2 * batch * batch * 4


def growth_exponent(method):
    """How a method's time grows with B: RKD's angle term is a B x B x B x D product."""
    return 3 if method == "rkd" else 2


def methods_for(device):
    """(name, factory) of every method to time, and the backends skipped with their reason."""
    out, skipped = [], {}
    for name in BACKEND_NAMES:
        try:
            resolve_backend(name, device)
        except RuntimeError as exc:
            skipped[f"ekd/{name}"] = str(exc)
            continue
        out.append((f"ekd/{name}", lambda n=name: ekd_step(n, device)))
    out.append(("rkd", lambda: rkd_step(device)))
    out.append(("floor", lambda: floor_step(device)))
    return out, skipped


# ----------------------------------------------------------------------------- driver


def run(batches, dim, dtype, device, repeats, budget_s):
    methods, skipped = methods_for(device)
    stopped, last_time = {}, {}
    rows = []
    memory = available_memory_bytes(device)
    for batch in batches:
        inputs = make_inputs(batch, dim, dtype, device, seed=batch)
        for name, factory in methods:
            if name in stopped:
                continue
            need = estimated_bytes(name, batch, dim)
            if need > 0.6 * memory:
                stopped[name] = f"stopped at B={batch}: needs about {need / 2**30:.1f} GiB, {memory / 2**30:.1f} GiB free"
                continue
            if name in last_time:  # extrapolate from the previous size before paying for this one
                prev_batch, prev_time = last_time[name]
                predicted = prev_time * (batch / prev_batch) ** growth_exponent(name)
                if predicted > budget_s:
                    stopped[name] = (f"stopped at B={batch}: one forward+backward would take about {predicted:.0f} s "
                                     f"(budget {budget_s} s; {prev_time:.2f} s at B={prev_batch})")
                    continue
            forward_backward, forward = factory()
            t0 = time.perf_counter()
            with PeakMemory(device) as peak:
                forward_backward(*inputs)
            first = time.perf_counter() - t0
            if first * (repeats + 1) * 2 > budget_s:
                reps = max(2, int(budget_s / (2 * max(first, 1e-9))) - 1)
            else:
                reps = repeats
            if first > budget_s:
                stopped[name] = f"stopped at B={batch}: one forward+backward took {first:.1f} s (budget {budget_s} s)"
                continue
            row = {"method": name, "batch": batch, "dim": dim, "dtype": str(dtype).replace("torch.", ""),
                   "forward_backward": summary(time_calls(lambda: forward_backward(*inputs), device, reps)),
                   "forward": summary(time_calls(lambda: forward(*inputs), device, reps)),
                   "peak_memory_bytes": peak.bytes}
            rows.append(row)
            last_time[name] = (batch, row["forward_backward"]["median_s"])
            print(f"  B={batch:6d} {name:14s} fwd+bwd {row['forward_backward']['median_s'] * 1e3:10.2f} ms"
                  f"  fwd {row['forward']['median_s'] * 1e3:10.2f} ms  peak {peak.bytes / 2**20:8.1f} MiB",
                  flush=True)
        del inputs
    return rows, skipped, stopped


def ratios(rows):
    """Per B: each EKD backend's forward+backward time over the reference, RKD and the floor."""
    by = {(r["batch"], r["method"]): r["forward_backward"]["median_s"] for r in rows}
    out = []
    for (batch, method), t in sorted(by.items()):
        if not method.startswith("ekd/"):
            continue
        entry = {"batch": batch, "method": method}
        for other, key in (("ekd/reference", "vs_reference"), ("rkd", "vs_rkd"), ("floor", "vs_floor")):
            if (batch, other) in by and other != method:
                entry[key] = t / by[(batch, other)]
        out.append(entry)
    return out


def print_table(rows, ratio_rows, skipped, stopped, device_label):
    methods = sorted({r["method"] for r in rows}, key=lambda m: (not m.startswith("ekd"), m))
    batches = sorted({r["batch"] for r in rows})
    by = {(r["batch"], r["method"]): r for r in rows}
    print(f"\nforward+backward per batch (median, ms) on {device_label}")
    print("| B | " + " | ".join(methods) + " |")
    print("|---" * (len(methods) + 1) + "|")
    for b in batches:
        cells = [f"{by[(b, m)]['forward_backward']['median_s'] * 1e3:.2f}" if (b, m) in by else "-" for m in methods]
        print(f"| {b} | " + " | ".join(cells) + " |")
    print("\nratios (EKD backend time / other, same run; < 1 means EKD is faster)")
    for r in ratio_rows:
        parts = [f"{k}={v:.3f}" for k, v in r.items() if k.startswith("vs_")]
        print(f"  B={r['batch']:6d} {r['method']:14s} " + "  ".join(parts))
    for name, why in {**skipped, **stopped}.items():
        print(f"  {name}: {why}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=int, nargs="*", default=None)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--budget-s", type=float, default=None, help="time allowed for one method at one B")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/loss_<device>_<date>.json)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.set_float32_matmul_precision("highest")  # the floor and the reference at full fp32 accuracy
    batches = args.batches or ([2**k for k in range(7, 16)] if cuda else [128, 256, 512, 1024, 2048])
    repeats = args.repeats or (20 if cuda else 5)
    budget_s = args.budget_s or (30.0 if cuda else 20.0)
    dtype = getattr(torch, args.dtype)
    label = device_name(device)
    print(f"ekd_kernels {ekd_kernels.__version__} @ {git_commit()}, torch {torch.__version__}, {label}, "
          f"D={args.dim}, {args.dtype}", flush=True)

    rows, skipped, stopped = run(batches, args.dim, dtype, device, repeats, budget_s)
    ratio_rows = ratios(rows)
    print_table(rows, ratio_rows, skipped, stopped, label)

    result = {
        "benchmark": "loss", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": label, "device_type": device.type, "torch": torch.__version__,
        "triton": _version("triton"), "ekd_kernels": ekd_kernels.__version__, "commit": git_commit(),
        "python": platform.python_version(), "threads": torch.get_num_threads(), "dim": args.dim,
        "dtype": args.dtype, "rows": rows, "ratios": ratio_rows, "skipped": skipped, "stopped": stopped,
    }
    out = pathlib.Path(args.out) if args.out else REPO / "bench" / "results" / (
        f"loss_{device.type}_{args.dtype}_{datetime.date.today().isoformat()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out}")


def _version(module):
    try:
        return __import__(module).__version__
    except Exception:
        return None


if __name__ == "__main__":
    main()
