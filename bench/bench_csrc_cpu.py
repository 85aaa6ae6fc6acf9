"""CPU timing of the csrc backend against the reference and against two fp32 Grams (torch.mm).

Forward + backward of the default EKD at D = 512; median of repeats.  Prints one row per B.
Usage: python bench/bench_csrc_cpu.py [B ...]
"""

import argparse
import statistics
import time

import torch

from common import at_least  # (bench/, this script's folder)
from ekd_kernels import EKDConfig
from ekd_kernels.csrc_ops import ekd_forward
from ekd_kernels.reference import ekd_reference

DIM = 512


def median_seconds(fns, repeats):
    """Median time of each callable, run round-robin so that a load change on this shared
    machine hits all of them alike."""
    times = [[] for _ in fns]
    for fn in fns:
        fn()  # warm-up
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def forward_backward(impl, student, teacher, labels, config):
    def run():
        s = student.detach().requires_grad_(True)
        zeros = torch.zeros(config.num_thresholds)
        result = impl(s, teacher, labels, zeros, zeros.clone(), config)
        result.loss.backward()
    return run


def two_grams(student, teacher):
    def run():
        s = torch.nn.functional.normalize(student, dim=1)
        t = torch.nn.functional.normalize(teacher, dim=1)
        torch.mm(s, s.t())
        torch.mm(t, t.t())
    return run


def main(batches):
    torch.manual_seed(0)
    config = EKDConfig()
    print(f"threads={torch.get_num_threads()} torch={torch.__version__} D={DIM}")
    print("B, reference_ms, csrc_ms, two_grams_ms, speedup_vs_reference, csrc_over_two_grams")
    for batch in batches:
        student = torch.randn(batch, DIM)
        teacher = torch.randn(batch, DIM)
        labels = torch.randint(0, max(1, batch // 4), (batch,))  # (about 4 images an identity)
        repeats = 9 if batch <= 2048 else 5
        ref, csrc, grams = median_seconds([forward_backward(ekd_reference, student, teacher, labels, config),
                                           forward_backward(ekd_forward, student, teacher, labels, config),
                                           two_grams(student, teacher)], repeats)
        print(f"{batch}, {ref * 1e3:.1f}, {csrc * 1e3:.1f}, {grams * 1e3:.1f}, {ref / csrc:.1f}x, {csrc / grams:.2f}x",
              flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("batches", type=at_least(2), nargs="*", default=[1024, 4096], metavar="B")
    main(parser.parse_args().batches)
