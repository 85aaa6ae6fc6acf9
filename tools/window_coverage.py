"""Whether pass 1's windows (triton_ekd.PASS1_WINDOWS) would hold every target on the
benchmark's batch, computed on the host from an fp32 Gram (no kernel runs; a pair on a bucket's
edge may fall on the other side of it than in the kernels): per model, which targets' exact
buckets lie in the windows the probe's sample places (kernels.window_select_kernel), how many
negatives' keys the windows hold against the buffer's capacity, and the top-N candidates
against theirs.  Needs B x B floats twice (2 GiB at B = 16384).

    python tools/window_coverage.py 8192            # the lease's A/B size
    python tools/window_coverage.py 4096 --z 4      # narrower windows
    python tools/window_coverage.py 8192 --hub 1.0  # rows that differ (synthetic, see hub_batch)
    python tools/window_coverage.py 0 --embeddings batch.pt   # a saved batch of a real run:
        # torch.save({"student": S, "teacher": T, "labels": y}, "batch.pt")
"""
import argparse
import math
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from ekd_kernels import EKDConfig, triton_ekd  # noqa: E402
from gpu_exercise import batch_of  # noqa: E402  (tools/)


def descending_keys(x):
    bits = x.view(torch.int32).long() & 0xFFFFFFFF
    return torch.where(bits >> 31 == 1, bits, bits ^ 0x7FFFFFFF)


def bucket_of(cumulative, rank):
    """The bucket holding descending rank `rank` (kernels._histogram_rank)."""
    return min(int((cumulative <= rank).sum()), 65535)


def hub_batch(batch, strength, dim=512, identities=2000, seed=0):
    """Rows whose similarities differ from row to row, as a trained model's do (some identities
    near many others): 2000 class centres plus noise plus a shared direction, weighted per row by
    `strength` x a normal draw.  The benchmark's batch (gpu_exercise.batch_of) has alike rows."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, identities, (batch,), generator=g)
    centres = torch.randn(identities, dim, generator=g)
    direction = torch.nn.functional.normalize(torch.randn(dim, generator=g), dim=0)
    shared = strength * dim ** 0.5 * torch.randn(batch, 1, generator=g) * direction
    student = centres[labels] + 0.8 * torch.randn(batch, dim, generator=g) + shared
    teacher = centres[labels] + 0.5 * torch.randn(batch, dim, generator=g) + shared
    return student, teacher, labels


def main(batch, z, relative, slack, embeddings=None, hub=None, config=EKDConfig()):
    if hub is not None:
        student, teacher, labels = hub_batch(batch, hub)
    elif embeddings:
        saved = torch.load(embeddings, map_location="cpu")
        student, teacher, labels = (saved[name].float() if name != "labels" else saved[name]
                                    for name in ("student", "teacher", "labels"))
        batch = student.shape[0]
    else:
        student, teacher, labels = batch_of(batch, torch.float32, torch.device("cpu"), seed=batch)
    order = torch.sort(labels, stable=True).indices
    labels = labels[order]
    negative = torch.ones(batch, batch, dtype=torch.bool).triu(1) & (labels[:, None] != labels[None, :])
    tile = triton_ekd.TILE
    rows = torch.arange(tile) * max(1, batch // tile)  # probe_histogram_kernel's sample rows
    rows = rows[rows < batch]
    in_sample = labels[rows][:, None] != labels[None, :]
    num_pairs = batch * (batch - 1) // 2
    capacity = triton_ekd._window_capacity(num_pairs)
    candidate_capacity = triton_ekd.WINDOW_CANDIDATE_FACTOR * triton_ekd._candidate_capacity(
        min(config.num_hard_negatives, num_pairs))
    for model, x in (("student", student), ("teacher", teacher)):
        x = torch.nn.functional.normalize(x[order], dim=1)
        keys = descending_keys(x @ x.t())
        negatives = keys[negative]
        histogram = torch.bincount(negatives >> 16, minlength=65536)
        cumulative = histogram.cumsum(0)
        sample = keys[rows][in_sample]
        sample_cumulative = torch.bincount(sample >> 16, minlength=65536).cumsum(0)
        fractions = list(config.fprs)
        ranks = [min(math.floor(negatives.numel() * f), negatives.numel() - 1) for f in config.fprs]
        if model == "student":  # the top-N target
            fractions.append(config.num_hard_negatives / num_pairs)
            ranks.append(min(config.num_hard_negatives, negatives.numel()) - 1)
        inside, hits = torch.zeros(65536, dtype=torch.bool), []
        for target, (fraction, rank) in enumerate(zip(fractions, ranks)):
            r = sample.numel() * fraction
            margin = z * math.sqrt(r + 1) + relative * r + slack
            first, last = int(r - margin), int(r + margin)
            top_n = target == len(config.fprs)
            lo = 0 if first < 0 or top_n else bucket_of(sample_cumulative, first)
            hi = 65535 if last >= sample.numel() else bucket_of(sample_cumulative, last)
            hits.append(lo <= bucket_of(cumulative, rank) <= hi)
            inside[lo:hi + 1] = True
            if top_n:
                candidates = int(histogram[:hi + 1].sum())
        held = int(histogram[inside].sum())
        line = (f"B={batch} {model}: every target in its window: {all(hits)} {hits}; window keys {held} "
                f"({held / negatives.numel():.2%} of L = {negatives.numel()}, capacity {capacity})")
        if model == "student":
            line += f"; top-N candidates {candidates} (capacity {candidate_capacity})"
        print(line, flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("batch", type=int, help="B of the benchmark's batch (ignored with --embeddings)")
    parser.add_argument("--embeddings", help="a torch.save'd dict of student, teacher (B x D) and labels (B)")
    parser.add_argument("--hub", type=float, help="a synthetic batch of rows that differ this much (hub_batch)")
    parser.add_argument("--z", type=float, default=triton_ekd.WINDOW_Z)
    parser.add_argument("--relative", type=float, default=triton_ekd.WINDOW_RELATIVE)
    parser.add_argument("--slack", type=float, default=triton_ekd.WINDOW_SLACK)
    args = parser.parse_args()
    main(args.batch, args.z, args.relative, args.slack, args.embeddings, args.hub)
