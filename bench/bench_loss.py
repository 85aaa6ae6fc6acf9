"""Per-batch time of the EKD loss (every available backend) against RKD, the reference and the floor.

    python bench/bench_loss.py                       # the default for the device it finds
    python bench/bench_loss.py --quick               # CI-sized
    python bench/bench_loss.py --sizes 256 1024 --methods ekd/csrc floor --dtypes float32

For each batch size B (D = 512) and dtype: forward+backward and forward-only time of each method
(median and 20th/80th percentiles of the repeats after warm-up calls: two forward+backward, one
when the first takes the whole budget, and one forward; one seeded random input set per B and
dtype, the same for every repeat and method; the methods take turns, --rounds times,
each turn a block of their repeats, so that a ratio does not depend on the order on a machine
whose load drifts; the +compile methods are timed after the others, each alone), and
the peak memory of one forward+backward (CUDA: max_memory_allocated; CPU: growth of the process's
peak RSS, VmHWM, reset before each measurement). "floor" is the two Gram matrices S @ S.T and
T @ T.T by torch.mm (fp32 at "highest" precision): what any exact EKD must at least compute.
On CUDA "floor/tf32" is the same at "high" precision (one TF32 pass on the tensor cores), for
context: the Triton backend's fp32 dots are tf32x3 (three TF32 passes), between the two.
Ratios are taken within this run. A method stops at the first B where one call would exceed the
time budget (extrapolated from the previous size) or the memory it needs would not fit; the
output says where and why. Backends that cannot run are listed with their reason.

On CUDA, "ekd/triton+graph" and "ekd/csrc+graph" are those backends captured in CUDA graphs (one
forward+backward, one forward, captured at a method's first call after two warm-up calls) and
replayed after copying each call's inputs into the graphs' static tensors: the loss inside a
training step captured whole, where no Python runs and nothing is launched but the graph, i.e.
the device's time (the input copies and the graph's launch included). Their peak memory includes
the graphs' private pools and the static input copies. "ekd/triton+compile" and
"ekd/csrc+compile" time the same loss under `torch.compile(mode="reduce-overhead")` (inductor's
CUDA graphs: the README's one-line way to them), input copies and the graph tree's bookkeeping
included; their peak memory is that of the first call, which compiles. "ekd/csrc+tc" and
"ekd/csrc+mma" are the csrc CUDA op with its fp32 tiles on tensor cores, through wmma and through
mma.sync (EKD_CUDA_TENSOR_CORES=1 and 2, set around each call; off by default until measured).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from common import (REPO, PeakMemory, Progress, append_rows, available_memory_bytes, describe, environment,
                    environment_variables, summary, sync, time_in_turns)

sys.path.insert(0, str(REPO))

from ekd_kernels import EKDLoss, RKDLoss  # noqa: E402
from ekd_kernels.backends import BACKEND_NAMES, resolve_backend  # noqa: E402

# ----------------------------------------------------------------------------- methods


def make_inputs(batch, dim, dtype, device, seed):
    """Fresh random embeddings (never zeros), a teacher that broadly agrees, and labels made of a
    general part and a balanced part of 4 images per identity, as EKD training batches are."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    student = torch.randn(batch, dim, generator=g)
    teacher = student + 0.5 * torch.randn(batch, dim, generator=g)
    labels = torch.cat([torch.randint(0, 10**6, (batch // 2,), generator=g),
                        10**6 + torch.arange(batch - batch // 2) // 4])
    return student.to(device=device, dtype=dtype), teacher.to(device=device, dtype=dtype), labels.to(device)


def loss_calls(loss_fn):
    """(forward_backward, forward) of `loss_fn(student, teacher, labels)`: the gradient taken
    on a fresh leaf of the student, the forward alone under no_grad."""
    def forward_backward(student, teacher, labels):
        loss_fn(student.detach().requires_grad_(True), teacher, labels).backward()

    def forward(student, teacher, labels):
        with torch.no_grad():
            loss_fn(student, teacher, labels)

    return forward_backward, forward


def ekd_method(backend, device):
    return loss_calls(EKDLoss(backend=backend).to(device))


def with_environ(loss_fn, environ):
    """`loss_fn` with the environment variables `environ` set around each call (what the csrc CUDA
    op reads at every call), restored after it, also when it raises."""
    def call(*args):
        with environment_variables(environ):
            return loss_fn(*args)

    return call


def ekd_graph_method(backend, device, crit=None):
    """EKD captured in CUDA graphs and replayed (module docstring); `crit`: the module to capture
    (default: a fresh EKDLoss of `backend`)."""
    crit = crit if crit is not None else EKDLoss(backend=backend).to(device)
    graphs = {}

    def run_once(with_grad, student, teacher, labels):
        if with_grad:
            crit(student, teacher, labels).backward()
        else:
            with torch.no_grad():
                crit(student, teacher, labels)

    def capture(with_grad, student, teacher, labels):
        static = (student.detach().clone().requires_grad_(with_grad), teacher.clone(), labels.clone())
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up off the capture (compiles, allocates the one-time constants)
            for _ in range(2):
                run_once(with_grad, *static)
        torch.cuda.current_stream(device).wait_stream(side)
        static[0].grad = None  # else every replay would add to the warm-up's gradient
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run_once(with_grad, *static)
        return graph, static

    def replay(with_grad, student, teacher, labels):
        if with_grad not in graphs:
            graphs[with_grad] = capture(with_grad, student, teacher, labels)
        graph, (static_student, static_teacher, static_labels) = graphs[with_grad]
        with torch.no_grad():
            static_student.copy_(student)
            static_teacher.copy_(teacher)
            static_labels.copy_(labels)
        graph.replay()

    return (lambda *inputs: replay(True, *inputs)), (lambda *inputs: replay(False, *inputs))


def ekd_compile_method(backend, device, crit=None, warm_up=3):
    """EKD inside `torch.compile(mode="reduce-overhead", fullgraph=True)`, the README's one line to
    CUDA graphs: inductor records the call in its CUDA graphs and replays them (module docstring).
    The first call of each shape and grad mode runs `warm_up` times (compile, inductor's warm-up
    run, the recording), so that no timed call compiles or records whatever the driver's warm-up
    calls; on CUDA a graph that inductor skipped raises (the row would not be what it says).
    Dynamo's caches are reset first: every factory call compiles the same code, whose cache
    would pass dynamo's recompile limit after a few sizes and dtypes (with fullgraph, an error).
    `crit`: the module (default: a fresh EKDLoss of `backend`)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters["inductor"].clear()
    crit = crit if crit is not None else EKDLoss(backend=backend).to(device)
    compiled = torch.compile(lambda s, t, y: crit(s, t, y), mode="reduce-overhead", fullgraph=True, dynamic=False)
    calls, seen = loss_calls(compiled), set()

    def call(grad, student, teacher, labels):
        key = (grad, student.shape, student.dtype)
        for _ in range(1 if key in seen else warm_up):
            calls[0 if grad else 1](student, teacher, labels)
        if key not in seen and device.type == "cuda" and counters["inductor"]["cudagraph_skips"]:
            raise RuntimeError(f"inductor skipped its CUDA graphs: {dict(counters['inductor'])}")
        seen.add(key)

    return (lambda *inputs: call(True, *inputs)), (lambda *inputs: call(False, *inputs))


def rkd_method(loss_fn):
    return loss_calls(lambda student, teacher, labels: loss_fn(student, teacher))


def floor_method(precision="highest"):
    """The two Grams at the fp32 matmul `precision` (the script runs at "highest")."""
    def grams(student, teacher, labels):
        default = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(precision)
        try:
            torch.mm(student, student.t())
            torch.mm(teacher, teacher.t())
        finally:
            torch.set_float32_matmul_precision(default)

    return grams, grams


def fast_rkd():
    """The O(B^2)-memory RKD (issue 8) when it is part of this build, else None and the reason."""
    try:
        from ekd_kernels.rkd_fast import fast_rkd_loss as rkd_loss_fast
    except Exception as exc:  # not built yet, or the extension is missing
        return None, f"fast RKD unavailable ({type(exc).__name__}: {exc})"
    return rkd_loss_fast, None


def all_methods(device):
    """{name: factory} of every method this device can run, and {name: reason} of the others."""
    methods, skipped = {}, {}
    for name in BACKEND_NAMES:
        try:
            resolve_backend(name, device)
            methods[f"ekd/{name}"] = lambda n=name: ekd_method(n, device)
        except RuntimeError as exc:
            skipped[f"ekd/{name}"] = str(exc)

    def derived(name, base, factory):
        """A method made from the backend `base`: listed as skipped, with its reason, when that
        backend cannot run (a --methods list naming it then measures the others: a CUDA build
        that failed once stopped the lease's benchmarks before any row)."""
        if f"ekd/{base}" in methods:
            methods[name] = factory
        else:
            skipped[name] = skipped[f"ekd/{base}"]

    if device.type == "cuda":  # the fast backends run no host synchronisation: capturable
        for name in ("triton", "csrc"):
            derived(f"ekd/{name}+graph", name, lambda n=name: ekd_graph_method(n, device))
        for name, setting in (("tc", "1"), ("mma", "2")):
            derived(f"ekd/csrc+{name}", "csrc", lambda v=setting: loss_calls(
                with_environ(EKDLoss(backend="csrc").to(device), {"EKD_CUDA_TENSOR_CORES": v})))
    methods["rkd/reference"] = lambda: rkd_method(RKDLoss())
    fast, why = fast_rkd()
    if fast is not None:
        methods["rkd/fast"] = lambda: rkd_method(fast)
    else:
        skipped["rkd/fast"] = why
    methods["floor"] = floor_method
    if device.type == "cuda":  # context for fp32: one TF32 pass (Triton's fp32 dots take three)
        methods["floor/tf32"] = lambda: floor_method("high")
        # last at each B and dtype: their first calls compile (inductor), and a run cut short
        # there keeps the other methods' rows of that B and dtype
        for name in ("triton", "csrc"):
            derived(f"ekd/{name}+compile", name, lambda n=name: ekd_compile_method(n, device))
    return methods, skipped


def estimated_bytes(method, batch, dim):
    """Roughly what a method holds at once (fp32), to skip sizes that cannot fit."""
    if method == "rkd/reference":
        return 6 * batch * batch * dim * 4       # B x B x D differences, normalised, and gradients
    if method == "ekd/reference":
        return 40 * batch * batch * 4            # Grams, pair lists, sorts, masks, gradients
    return 4 * batch * dim * 4 + 3 * batch * batch * 4


def growth_exponent(method):
    """How a method's time grows with B: RKD's angle term is a B x B x B x D product."""
    return 3 if method.startswith("rkd") else 2


# ----------------------------------------------------------------------------- driver


def runs_alone(name):
    """Whether a method is timed alone rather than in turns with the others: the +compile methods
    reset Dynamo's caches when they are made (ekd_compile_method) and record into inductor's
    per-process CUDA graph trees, so two of them alive at once would recompile inside the timing."""
    return name.endswith("+compile")


def why_not_run(name, batch, dim, memory, last_time, budget_s):
    """Why `name` does not run at `batch` (None: it runs): the memory it needs, or the time one
    call would take, extrapolated from the previous size before paying for this one."""
    need = estimated_bytes(name, batch, dim)
    if need > 0.6 * memory:
        return f"stopped at B={batch}: needs about {need / 2**30:.1f} GiB, {memory / 2**30:.1f} GiB free"
    if name in last_time:
        prev_batch, prev_time = last_time[name]
        predicted = prev_time * (batch / prev_batch) ** growth_exponent(name)
        if predicted > budget_s:
            return (f"stopped at B={batch}: one forward+backward would take about {predicted:.0f} s "
                    f"(budget {budget_s} s; {prev_time:.2f} s at B={prev_batch})")
    return None


def prepare(factory, inputs, device, repeats, budget_s):
    """A method made and warmed up: (forward_backward, forward, repeats, peak bytes of its first
    forward+backward).  Raises what the method raises (out of memory, a dtype refused...)."""
    forward_backward, forward = factory()
    t0 = time.perf_counter()
    with PeakMemory(device) as peak:
        forward_backward(*inputs)
    first = time.perf_counter() - t0
    # The forward's own first call (a graph method captures its forward graph there, a compile
    # method compiles it): never timed, whatever the budget.
    forward(*inputs)
    # The first call may be mostly compiling (Triton: seconds, more on a cold cache): unless it
    # alone took the whole budget, the repeat count comes from a second, warm call (a compile over
    # budget / 4 used to leave the median of 2 calls).
    if first <= budget_s:
        t0 = time.perf_counter()
        forward_backward(*inputs)
        sync(device)
        first = time.perf_counter() - t0
    reps = repeats if first * 2 * repeats <= budget_s else max(2, int(budget_s / (2 * first)))
    return forward_backward, forward, reps, peak.bytes


def run(methods, sizes, dim, dtypes, device, repeats, budget_s, env, on_row=None, rounds=3):
    """The measured rows and why methods stopped; `on_row(row)` as each row is measured (a run cut
    short by a time limit keeps what it measured).  At each B and dtype the methods are made and
    warmed up one after another, then timed in turns (`time_in_turns`); the +compile methods
    after them, each alone (`runs_alone`)."""
    rows, stopped = [], {}
    memory = available_memory_bytes(device)
    progress = Progress(len(sizes) * len(dtypes) * len(methods), "bench loss")
    for dtype in dtypes:
        last_time = {}
        for batch in sizes:
            inputs = make_inputs(batch, dim, dtype, device, seed=batch)
            together = [name for name in methods if not runs_alone(name)]
            groups = [together] + [[name] for name in methods if runs_alone(name)]
            for group in groups:
                prepared = {}
                for name in group:
                    progress.step(f"{name} B={batch} {str(dtype).replace('torch.', '')}")
                    key = (name, dtype)
                    if key in stopped:
                        continue
                    why = why_not_run(name, batch, dim, memory, last_time, budget_s)
                    if why is not None:
                        stopped[key] = why
                        continue
                    try:
                        prepared[name] = prepare(methods[name], inputs, device, repeats, budget_s)
                    except Exception as exc:  # out of memory, a backend refusing the dtype, a compile
                        stopped[key] = f"stopped at B={batch}: {describe(exc)}"  # failing: that method stops
                timed, failed = time_in_turns(prepared, device, rounds, inputs)
                for name, why in failed.items():
                    stopped[(name, dtype)] = f"stopped at B={batch}: {why}"
                for name, (fb_times, fw_times, turns) in timed.items():
                    fb, fw = summary(fb_times), summary(fw_times)
                    rows.append({**env, "benchmark": "loss", "method": name.split("/")[0],
                                 "backend": name.split("/")[1] if "/" in name else None, "name": name,
                                 "batch": batch, "dim": dim, "dtype": str(dtype).replace("torch.", ""),
                                 "forward_backward": fb, "forward": fw, "rounds": turns,
                                 "peak_memory_bytes": prepared[name][3]})
                    if on_row is not None:
                        on_row(rows[-1])
                    last_time[name] = (batch, fb["median_s"])
                prepared = timed = None  # free this group's graphs and caches before the next
            inputs = None  # free this size before making the next
    return rows, stopped


def ratios(rows):
    """Per (dtype, B): each EKD backend's forward+backward time over the reference, RKDs and floor."""
    by = {(r["dtype"], r["batch"], r["name"]): r["forward_backward"]["median_s"] for r in rows}
    out = []
    for (dtype, batch, name), t in sorted(by.items()):
        if not name.startswith("ekd/"):
            continue
        entry = {"dtype": dtype, "batch": batch, "name": name}
        for other in ("ekd/reference", "rkd/reference", "rkd/fast", "floor", "floor/tf32"):
            if (dtype, batch, other) in by and other != name:
                entry[f"vs_{other}"] = t / by[(dtype, batch, other)]
        out.append(entry)
    return out


def print_report(rows, ratio_rows, skipped, stopped, device_label):
    for dtype in sorted({r["dtype"] for r in rows}):
        sub = [r for r in rows if r["dtype"] == dtype]
        names = sorted({r["name"] for r in sub}, key=lambda m: (not m.startswith("ekd"), m))
        by = {(r["batch"], r["name"]): r for r in sub}
        print(f"\nforward+backward per batch, median ms ({dtype}, {device_label})")
        print("| B | " + " | ".join(names) + " |")
        print("|---" * (len(names) + 1) + "|")
        for b in sorted({r["batch"] for r in sub}):
            cells = [f"{by[(b, m)]['forward_backward']['median_s'] * 1e3:.2f}" if (b, m) in by else "-" for m in names]
            print(f"| {b} | " + " | ".join(cells) + " |")
    print("\nratios (EKD backend time / other method's time, same run; < 1: EKD is faster)")
    for r in ratio_rows:
        parts = [f"{k[3:]}={v:.3f}" for k, v in r.items() if k.startswith("vs_")]
        print(f"  {r['dtype']:8s} B={r['batch']:6d} {r['name']:14s} " + "  ".join(parts))
    for name, why in skipped.items():
        print(f"  skipped {name}: {why}")
    for (name, dtype), why in stopped.items():
        print(f"  {name} ({str(dtype).replace('torch.', '')}): {why}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="CI-sized: two small batches, two repeats")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="batch sizes B")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="subset of: ekd/reference ekd/triton ekd/csrc rkd/reference rkd/fast floor "
                             "(CUDA: ekd/triton+graph ekd/csrc+graph ekd/triton+compile ekd/csrc+compile "
                             "ekd/csrc+tc ekd/csrc+mma floor/tf32)")
    parser.add_argument("--dtypes", nargs="+", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--budget-s", type=float, default=None, help="most seconds one call may take")
    parser.add_argument("--rounds", type=int, default=3,
                        help="turns the methods take at each B and dtype, their repeats split between them "
                             "(a method's figure does not depend on its place in the order)")
    parser.add_argument("--out", default=None, help="a .jsonl file or a folder (default bench/results/)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.set_float32_matmul_precision("highest")  # the floor and the reference at full fp32 accuracy
    if args.quick:
        sizes, repeats, budget_s = [64, 128], 2, 5.0
    else:
        sizes = [2**k for k in range(7, 16)] if cuda else [128, 256, 512, 1024, 2048, 4096]
        repeats, budget_s = (20, 30.0) if cuda else (5, 12.0)
    sizes = args.sizes or sizes
    repeats = args.repeats or repeats
    budget_s = args.budget_s or budget_s
    dtypes = [getattr(torch, d) for d in (args.dtypes or (["float32", "bfloat16"] if cuda else ["float32"]))]
    methods, skipped = all_methods(device)
    if args.methods:
        unknown = set(args.methods) - set(methods) - set(skipped)
        if unknown:
            parser.error(f"unknown methods {sorted(unknown)}; known: {sorted(set(methods) | set(skipped))}")
        methods = {k: v for k, v in methods.items() if k in args.methods}
        skipped = {k: v for k, v in skipped.items() if k in args.methods}

    env = environment(device)
    print(f"ekd_kernels @ {env['commit']}, torch {env['torch']}, {env['device']}, D={args.dim}, "
          f"B={sizes}, {[str(d).replace('torch.', '') for d in dtypes]}", flush=True)
    def measured(row):
        # Each row is appended (and printed) as soon as it is measured, i.e. when the methods of its
        # B and dtype have taken their turns (a +compile method: when it is done): a run cut short
        # by a time limit (a GPU lease) keeps every B and dtype it finished.
        append_rows([row], "loss", device, args.out)
        peak = row["peak_memory_bytes"]
        print(f"  measured {row['name']} B={row['batch']} {row['dtype']}: "
              f"{row['forward_backward']['median_s'] * 1e3:.3f} ms forward+backward, "
              f"{row['forward']['median_s'] * 1e3:.3f} ms forward"
              + (f", peak {peak / 2**20:.0f} MiB" if peak is not None else ""), flush=True)

    rows, stopped = run(methods, sizes, args.dim, dtypes, device, repeats, budget_s, env, on_row=measured,
                        rounds=max(1, args.rounds))
    ratio_rows = ratios(rows)
    print_report(rows, ratio_rows, skipped, stopped, env["device"])
    notes = [{**env, "benchmark": "loss", "note": "skipped", "name": k, "why": v} for k, v in skipped.items()]
    notes += [{**env, "benchmark": "loss", "note": "stopped", "name": k, "dtype": str(d).replace("torch.", ""),
               "why": v} for (k, d), v in stopped.items()]
    path = append_rows(notes, "loss", device, args.out)
    print(f"\nappended {len(rows)} rows to {path}")
    return rows


if __name__ == "__main__":
    main()
