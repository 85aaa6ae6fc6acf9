"""What every benchmark script shares: environment description, timing, peak memory, progress, rows.

Rows are appended as JSON lines to ``bench/results/<benchmark>_<cpu|cuda>.jsonl``; every row says
on what (device name, versions, commit, date) it was measured, so files can be merged and plotted
(bench/plot.py) without guessing.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from typing import Optional

import torch

REPO = pathlib.Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"

# ----------------------------------------------------------------------------- environment


def at_least(minimum, kind=int, strictly: bool = False):
    """An argparse type: a `kind` (int or float) of at least `minimum` (above it with `strictly`).
    Why: a zero or negative count or budget ran and measured nothing (exit 0, no rows), or died in
    a traceback after the progress output; argparse now refuses it with exit status 2."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if not (value > minimum if strictly else value >= minimum):
            raise argparse.ArgumentTypeError(f"must be {'above' if strictly else 'at least'} {minimum}, got {text}")
        return value

    parse.__name__ = kind.__name__  # (argparse names the type in its "invalid ... value" message)
    return parse


def output_file(out: Optional[str], default: pathlib.Path) -> pathlib.Path:
    """Where a benchmark writes its one JSON file: `out` (a file, or a folder that takes the
    default file name), else `default`; the folder is made.  (A folder given as --out raised
    IsADirectoryError after the whole run, losing its results.)"""
    path = pathlib.Path(out) if out else default
    if path.is_dir():
        path = path / default.name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or 'cpu'} ({os.cpu_count()} cores)"


def git_commit(uncommitted: Optional[dict]) -> str:
    """The short commit, "-dirty" when tracked files differ from it or untracked ones are there
    (``uncommitted_changes()``)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        return (head.stdout.strip() or "unknown") + ("-dirty" if uncommitted else "")
    except OSError:
        return "unknown"


def uncommitted_changes() -> Optional[dict]:
    """For a "-dirty" commit: the files changed against HEAD, and a SHA-256 of `git diff HEAD` and
    of the untracked files (a new module the measured code imports is as much a change as an
    edited one; the benchmarks' own outputs under bench/results/ are not), so that a row names
    the code it measured (keep the diff and the files to reproduce it); None when clean."""
    try:
        diff = subprocess.run(["git", "diff", "HEAD"], cwd=REPO, capture_output=True).stdout
        files = subprocess.run(["git", "diff", "HEAD", "--name-only"], cwd=REPO, capture_output=True,
                               text=True).stdout.split()
        others = subprocess.run(["git", "ls-files", "--others", "--exclude-standard", "-z"], cwd=REPO,
                                capture_output=True, text=True).stdout.split("\0")
    except OSError:
        return None
    untracked = sorted(name for name in others if name and not name.startswith("bench/results/"))
    if not diff and not untracked:
        return None
    digest = hashlib.sha256(diff)
    for name in untracked:
        digest.update(b"\0" + name.encode() + b"\0")
        try:
            digest.update((REPO / name).read_bytes())
        except OSError:  # gone since git listed it, or unreadable: its name still counts
            pass
    return {"files": files + untracked, "diff_sha256": digest.hexdigest()}


#: Environment variables that switch kernels or threads, recorded with every row.
_SETTINGS_PREFIXES = ("EKD_", "OMP_", "MKL_", "TRITON_", "CUDA_VISIBLE_DEVICES", "TORCH_CUDA_ARCH_LIST")


def _version(module: str):
    try:
        return __import__(module).__version__
    except Exception:
        return None


def environment(device: torch.device) -> dict:
    """The fields every row carries."""
    import ekd_kernels

    capability = ".".join(map(str, torch.cuda.get_device_capability(device))) if device.type == "cuda" else None
    uncommitted = uncommitted_changes()
    return {
        "device": device_name(device), "device_type": device.type, "torch": torch.__version__,
        "triton": _version("triton"), "cuda": torch.version.cuda, "python": platform.python_version(),
        "ekd_kernels": ekd_kernels.__version__, "commit": git_commit(uncommitted), "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        # (what else decides the figures: the code beyond the commit, the switches, the command)
        "uncommitted": uncommitted, "capability": capability,
        "matmul_precision": torch.get_float32_matmul_precision(),
        "settings": {k: v for k, v in sorted(os.environ.items()) if k.startswith(_SETTINGS_PREFIXES)},
        "argv": [pathlib.Path(sys.argv[0]).name] + sys.argv[1:],
    }


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 8 << 30


# ----------------------------------------------------------------------------- memory


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
    """Peak extra memory of a block: the CUDA allocator's peak, or the growth of the CPU
    process's peak RSS (VmHWM, reset through /proc/self/clear_refs before the block)."""

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


@contextlib.contextmanager
def environment_variables(values: dict):
    """Environment variables set for a block and restored after it, also when it raises (what the
    csrc CUDA op reads at every call: bench_loss's ekd/csrc+tc, gpu_exercise's csrc variants)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device: torch.device, repeats: int, warm_up: bool = True):
    """Seconds of `repeats` calls (after one warm-up call unless `warm_up` is False): CUDA events,
    or a monotonic clock."""
    if warm_up:
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


def time_in_turns(prepared: dict, device: torch.device, rounds: int, inputs=()):
    """{name: (forward+backward times, forward times, rounds taken)}, and {name: why} of the
    methods that raised (its stop reason, not the exception: its traceback would hold the
    method's tensors), for `prepared` = {name: (forward_backward, forward, repeats, ...)}, each
    called with `inputs`: the methods take turns, `rounds` times, each round timing a block of its
    repeats, so that no method owes its figure (nor a ratio its sign) to when it ran on a machine
    whose load drifts (one method after another once timed the floor at 32 ms on a loaded CPU,
    700x its own forward).  Every method has been warmed up: no block has a warm-up call."""
    times = {name: ([], []) for name in prepared}
    turns = {name: min(rounds, entry[2]) for name, entry in prepared.items()}
    failed = {}
    for r in range(max(turns.values(), default=0)):
        for name, (forward_backward, forward, reps, *_) in prepared.items():
            if name in failed or r >= turns[name]:
                continue
            block = -(-reps // turns[name])  # ceil: every method times at least its repeats
            try:
                times[name][0].extend(time_calls(lambda: forward_backward(*inputs), device, block, warm_up=False))
                times[name][1].extend(time_calls(lambda: forward(*inputs), device, block, warm_up=False))
            except Exception as exc:  # the method stops; the others go on
                failed[name] = describe(exc)
    return {name: (*times[name], turns[name]) for name in prepared if name not in failed}, failed


def host_issue_times(fn, device: torch.device, repeats: int):
    """Seconds until `fn` returns, before the device finishes (synchronised between calls), after
    one warm-up call.  Close to time_calls': the host's issuing bounds the call, and every host
    microsecond shows in it; far below: the device's work bounds it and host time is hidden."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        sync(device)
    return times


def describe(exc: BaseException) -> str:
    """An exception in a line, for a row's or a skip's reason: its type and the first 120
    characters of its message's first line."""
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]}"


def summary(times) -> dict:
    """Median and the 20th/80th percentiles (the spread) of repeated timings, in seconds."""
    ordered = sorted(times)

    def percentile(p):
        position = p * (len(ordered) - 1)
        low = int(position)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

    return {"median_s": statistics.median(ordered), "p20_s": percentile(0.2), "p80_s": percentile(0.8),
            "repeats": len(ordered)}


# ----------------------------------------------------------------------------- progress and output


class Progress:
    """A one-line progress bar on stderr (no dependency): done/total, the current item, elapsed."""

    def __init__(self, total: int, label: str):
        self.total, self.label, self.done, self.start = max(total, 1), label, 0, time.monotonic()

    def step(self, what: str):
        self.done += 1
        elapsed = time.monotonic() - self.start
        if not sys.stderr.isatty():  # a log file: one plain line per step
            sys.stderr.write(f"{self.label} {self.done}/{self.total} {elapsed:6.0f} s  {what}\n")
            return
        width = 24
        filled = int(width * self.done / self.total)
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                         f"{elapsed:6.0f} s  {what[:48]:48s}")
        if self.done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def append_rows(rows, benchmark: str, device: torch.device, out=None) -> pathlib.Path:
    """Append rows as JSON lines to `out` (a file or folder) or bench/results/<benchmark>_<cpu|cuda>.jsonl:
    one file per kind of device, whatever its model (each row names it), so that `make bench` on a
    GPU and the GPU lease's runs (tools/gpu_proof.sh) add to the file the README cites."""
    path = pathlib.Path(out) if out else RESULTS
    if path.suffix != ".jsonl":
        path = path / f"{benchmark}_{device.type}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path
