"""Simulated multi-rank EKD on CPU: per-rank time of the sharded loss vs the redundant one.

    python bench/bench_distributed.py --world 2 --batch 2048 --dim 512

W gloo processes on this machine, each holding B / W rows (one more on the first B mod W).
"redundant" is what the authors do (gather_batch, then every rank computes the whole loss on the
global batch); "sharded" is EKDLoss(process_group=...). Forward+backward per step, median over
repeats (the paths take turns, --rounds times), per rank; the peak memory of one step per rank
(growth of the process's peak RSS, VmHWM, over the step: bench/common.py's PeakMemory); and the
bytes each rank sends per step, an estimate from the collectives' tensor sizes (module docstring
of ekd_kernels.distributed). On a 2-core machine the W processes share the cores: run with
W <= cores, threads per process = cores // W.
``--paths sharded`` measures only the sharded path (the redundant ones hold B x B matrices,
which large batches cannot afford).
"""

import argparse
import datetime
import json
import os
import pathlib
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from common import at_least, environment, output_file  # noqa: E402

PATHS = ("redundant", "redundant-reference", "sharded")


def communicated_bytes(batch, student_dim, teacher_dim, num_thresholds, world, path):
    """Bytes this rank contributes per step to the collectives (send side), by path."""
    gather = batch * (student_dim + teacher_dim) * 4 + 8 * batch + 8 * world  # sizes, rows, labels
    backward = batch * student_dim * 4                                       # reduce-scatter of the gradient
    if path.startswith("redundant"):
        return gather + backward
    histograms = 2 * 65536 * 8 + 2 * (2 * num_thresholds + 1) * 256 * 8
    scalars = 8 * 8 + 8 * world
    return gather + backward + histograms + scalars


def shard_rows(batch, world, rank):
    """Rows of rank `rank` when `batch` rows are split over `world` ranks: B // W each, and one more
    on the first B mod W ranks (every row of the global batch is held by some rank)."""
    return batch // world + (rank < batch % world)


def worker(rank, world, port, args, out):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    from common import PeakMemory
    from ekd_kernels import EKDLoss
    from ekd_kernels.distributed import gather_batch

    local = shard_rows(args.batch, world, rank)
    g = torch.Generator().manual_seed(rank)
    student = torch.randn(local, args.dim, generator=g)
    teacher = student + 0.5 * torch.randn(local, args.dim, generator=g)
    labels = torch.randint(0, max(1, args.batch // 4), (local,), generator=g)

    def make_step(path):
        backend = "reference" if path == "redundant-reference" else "auto"
        # without process_group: one process (None would mean the default group, as in torch.distributed)
        crit = EKDLoss(**({"process_group": dist.group.WORLD} if path == "sharded" else {}), backend=backend)

        def step():
            s = student.clone().requires_grad_(True)
            if path == "sharded":
                loss = crit(s, teacher, labels)
            else:
                loss = crit(*gather_batch(s, teacher, labels)[:3])
            loss.backward()
        return step

    steps = {path: make_step(path) for path in args.paths}
    for step in steps.values():  # warm-up
        step()
    # The paths take turns, --rounds times, each round timing a block of its repeats (as
    # bench_loss.py's methods do): the sharded path's speedup is a ratio over the same minutes.
    # (Not common.time_in_turns: every timed step here starts at a barrier, outside its time.)
    times = {path: [] for path in args.paths}
    rounds = min(args.rounds, args.repeats)
    block = -(-args.repeats // rounds)
    for _ in range(rounds):
        for path, step in steps.items():
            for _ in range(block):
                dist.barrier()
                t0 = time.perf_counter()
                step()
                times[path].append(time.perf_counter() - t0)
    results = {}
    for path, step in steps.items():
        dist.barrier()
        with PeakMemory(torch.device("cpu")) as peak:
            step()
        results[path] = {"median_s": statistics.median(times[path]), "min_s": min(times[path]),
                         "repeats": len(times[path]), "rounds": rounds, "rows": local,
                         "peak_rss_growth_bytes": peak.bytes,
                         "bytes_sent": communicated_bytes(args.batch, args.dim, args.dim, 6, world, path)}
    out[rank] = results
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=at_least(1), default=2)
    parser.add_argument("--batch", type=at_least(2), default=2048)
    parser.add_argument("--dim", type=at_least(1), default=512)
    parser.add_argument("--repeats", type=at_least(1), default=5, help="timed steps per path")
    parser.add_argument("--rounds", type=at_least(1), default=3, help="turns the paths take (blocks of the repeats)")
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.batch < args.world:
        parser.error(f"--batch {args.batch} gives a rank no rows: at least --world ({args.world})")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(worker, args=(args.world, port, args, out), nprocs=args.world)
    rows = dict(out)
    print(f"W={args.world} gloo processes, global B={args.batch}, D={args.dim}, forward+backward per step")
    print("  redundant: gather_batch + EKDLoss() (auto backend: the compiled op where built); "
          "redundant-reference: the same with the reference backend, the engine the sharded path uses")
    for rank in sorted(rows):
        r = rows[rank]
        line = "   ".join(f"{k} {v['median_s'] * 1e3:8.1f} ms (peak +{v['peak_rss_growth_bytes'] / 2**20:.0f} MiB)"
                          for k, v in r.items())
        if "sharded" in r:
            for other in ("redundant", "redundant-reference"):
                if other in r:
                    line += f";  sharded speedup vs {other} {r[other]['median_s'] / r['sharded']['median_s']:.2f}x"
        line += ";  bytes sent per step: " + ", ".join(f"{k} {v['bytes_sent'] / 2**20:.2f} MiB" for k, v in r.items())
        print(f"  rank {rank}: {line}")
    result = {**environment(torch.device("cpu")),  # (device, versions, commit: as every benchmark's rows)
              "benchmark": "distributed", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "torch": torch.__version__, "world": args.world, "batch": args.batch, "dim": args.dim,
              "peak_memory": "peak_rss_growth_bytes: growth of the process's VmHWM over one step",
              "cpu_count": os.cpu_count(), "per_rank": {str(k): v for k, v in rows.items()}}
    path = output_file(args.out, REPO / "bench" / "results" / (
        f"distributed_cpu_w{args.world}_{datetime.date.today().isoformat()}.json"))
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
