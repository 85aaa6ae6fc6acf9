"""Throughput of the all-pairs verification evaluator (ekd_kernels.metrics.verify_all_pairs).

    python bench/bench_metrics.py                          # sizes for the device it runs on
    python bench/bench_metrics.py --sizes 20000 --threads 1
    python bench/bench_metrics.py --device cuda --sizes 20000 50000 100000

For each number of embeddings B (D = 512, 10 images per identity, clustered random
embeddings): the wall time of one all-pairs evaluation at FPR 1e-2 / 1e-3 / 1e-4 (two tiled
passes over the B(B-1)/2 pairs, exact thresholds), its pairs per second, and for B up to
--sort-limit the time of the naive alternative (B x B Gram matrix, then a full sort of the
negative pairs) whose thresholds must agree.  Rows go to
bench/results/metrics_<cpu_Nthreads | cuda>_<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys
import time

import torch

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common import at_least, environment, output_file  # noqa: E402
from ekd_kernels.metrics import tpr_at_fpr, verify_all_pairs  # noqa: E402

FPRS = (1e-2, 1e-3, 1e-4)


def make_embeddings(batch: int, dim: int, per_identity: int, device: torch.device, seed: int):
    g = torch.Generator(device="cpu").manual_seed(seed)
    identities = max(2, batch // per_identity)
    labels = torch.arange(batch) % identities
    centres = torch.randn(identities, dim, generator=g)
    embeddings = centres[labels] + 1.5 * torch.randn(batch, dim, generator=g)
    return embeddings.to(device), labels.to(device)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def naive(embeddings, labels):
    """Materialise the Gram matrix and sort all negatives: what the evaluator avoids."""
    e = torch.nn.functional.normalize(embeddings.float(), dim=1)
    rows, cols = torch.triu_indices(len(e), len(e), 1, device=e.device)
    scores = (e @ e.t())[rows, cols]
    positive = labels[rows] == labels[cols]
    return tpr_at_fpr(scores[positive], scores[~positive], FPRS)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", type=at_least(2), nargs="+", default=None)
    p.add_argument("--dim", type=at_least(1), default=512)
    p.add_argument("--per-identity", type=at_least(2), default=10)
    p.add_argument("--threads", type=at_least(1), default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--sort-limit", type=at_least(0), default=None,
                   help="largest B for the naive sort baseline (default 10000 on CPU, 30000 on CUDA; 0: none)")
    p.add_argument("--out", default=None, help="JSON file or folder (default bench/results/metrics_<device>_<date>.json)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sizes = args.sizes or ([20000, 50000, 100000] if device.type == "cuda" else [2000, 5000, 10000, 20000])
    sort_limit = args.sort_limit if args.sort_limit is not None else (30000 if device.type == "cuda" else 10000)

    rows = []
    for batch in sizes:
        embeddings, labels = make_embeddings(batch, args.dim, args.per_identity, device, seed=batch)
        if not rows:  # warm-up (allocator, kernels) on a small problem
            verify_all_pairs(*make_embeddings(512, args.dim, args.per_identity, device, seed=0), FPRS)
        synchronize(device)
        start = time.perf_counter()
        result = verify_all_pairs(embeddings, labels, FPRS)
        synchronize(device)
        seconds = time.perf_counter() - start
        pairs = batch * (batch - 1) // 2
        row = {"embeddings": batch, "pairs": pairs, "seconds": seconds, "pairs_per_second": pairs / seconds,
               "thresholds": result.thresholds, "tprs": result.tprs}
        if batch <= sort_limit:
            synchronize(device)
            start = time.perf_counter()
            reference = naive(embeddings, labels)
            synchronize(device)
            row["naive_sort_seconds"] = time.perf_counter() - start
            row["max_threshold_difference"] = max(abs(a - b) for a, b in zip(result.thresholds,
                                                                              reference.thresholds))
        rows.append(row)
        extra = (f"  naive sort {row['naive_sort_seconds']:.2f} s (thresholds differ by at most "
                 f"{row['max_threshold_difference']:.1e})" if "naive_sort_seconds" in row else "")
        print(f"B = {batch:>6}: {pairs:.2e} pairs in {seconds:.2f} s = {pairs / seconds / 1e6:.1f} M pairs/s{extra}",
              flush=True)

    record = {
        # (device, versions, commit and settings as every benchmark's rows: common.environment)
        **environment(device), "benchmark": "verify_all_pairs", "date": datetime.date.today().isoformat(),
        "dim": args.dim, "images_per_identity": args.per_identity, "fprs": FPRS, "rows": rows,
    }
    where = f"cpu_{torch.get_num_threads()}threads" if device.type == "cpu" else device.type
    out = output_file(args.out, REPO / "bench" / "results" / f"metrics_{where}_{record['date']}.json")
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")
    return record


if __name__ == "__main__":
    main()
