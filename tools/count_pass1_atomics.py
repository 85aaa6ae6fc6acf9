"""What the Triton pass 1 adds on the loss benchmark's batch (bench/bench_loss.py make_inputs,
D = 512), counted on the CPU with exact keys (fp64-normalised rows, fp32 Gram, as the kernels'
similarities up to their last bits): the negatives L, the head that pass 1 counts first (up to
the cutoff placed by the same 64-row sample as probe_histogram_kernel, at the default sample
fraction), whether the deepest target (the largest FPR) lies in it, and how the atomics crowd
into 128-byte lines of the int32 histogram (32 bins a line), all pairs against the head only.

    python tools/count_pass1_atomics.py 4096     # B (the B x B Gram must fit in memory)
"""
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "bench"))

from bench_loss import make_inputs  # noqa: E402
from ekd_kernels import EKDConfig, triton_ekd  # noqa: E402


def descending_keys(similarity):
    bits = similarity.view(torch.int32).long() & 0xFFFFFFFF
    return torch.where(bits >> 31 == 1, bits, bits ^ 0x7FFFFFFF)


def lines_for_half(hist):
    per_line = hist.view(-1, 32).sum(1).sort(descending=True).values
    return int((per_line.cumsum(0) < per_line.sum() / 2).sum()) + 1, int(per_line[0])


def main(batch: int):
    config = EKDConfig()
    student, teacher, labels = make_inputs(batch, 512, torch.float32, torch.device("cpu"), seed=0)
    order = torch.sort(labels, stable=True).indices
    labels = labels[order]
    fraction = triton_ekd.CUTOFF_SAFETY * max(config.fprs)
    print(f"B = {batch}, sample fraction {fraction:g} (CUTOFF_SAFETY x the largest FPR)")
    for name, x in (("student", student), ("teacher", teacher)):
        x = torch.nn.functional.normalize(x[order].double(), dim=1).float()
        keys = descending_keys(x @ x.t())
        negative = (labels[:, None] != labels[None, :]) & torch.ones(batch, batch, dtype=torch.bool).triu(1)
        bins = (keys >> 16)[negative]
        num_negative = bins.numel()
        rows = torch.arange(triton_ekd.TILE) * max(1, batch // triton_ekd.TILE)
        sample = (keys[rows] >> 16)[labels[rows][:, None] != labels[None, :]]
        cutoff = int(sample.sort().values[int(sample.numel() * fraction)])
        head = bins <= cutoff
        deepest = int(bins.sort().values[int(num_negative * max(config.fprs))])
        all_lines, all_hottest = lines_for_half(torch.bincount(bins, minlength=65536))
        head_lines, head_hottest = lines_for_half(torch.bincount(bins[head], minlength=65536))
        print(f"{name}: L = {num_negative}, head {int(head.sum())} ({float(head.float().mean()):.3f} of L) up to "
              f"bucket {cutoff}; deepest target's bucket {deepest} (in the head: {deepest <= cutoff})")
        print(f"  hottest line: {all_hottest} atomics ({all_hottest / num_negative:.3f} of L), {head_hottest} with "
              f"the head only; lines taking half the atomics: {all_lines} (all), {head_lines} (head only)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 4096)
