"""Verification metrics with EKD's own threshold semantics: TPR at fixed FPRs.

Definition (the same order statistic as the EKD thresholds, SPEC.md step 3).  Given L negative
and P positive pair scores and a false-positive rate f:

    index      m = floor(L * f), with f read as the exact fraction behind the float
                 (``ekd_kernels.config.fpr_fraction``: 1e-4 is 1/10000, so m = L // 10000)
    threshold  t = the element at 0-based index m of the negative scores sorted descending
    TPR        = (number of positive scores strictly greater than t) / P

At most m negatives are strictly above t (exactly m when t is not tied), so the realised FPR,
#(negatives > t) / L, never exceeds f.  With L < 1/f the index is 0 and t is the largest
negative.

Relation to scikit-learn's ``roc_curve(y, scores, drop_intermediate=False)``: it thresholds
with ``score >= u`` at every distinct score u, giving points (fpr_u, tpr_u).  Our threshold t is
one of those scores; the decision ``score > t`` equals ``score >= u'`` with u' the next larger
distinct score, and

    TPR@f = max{ tpr_u : fpr_u <= f }      (the best ROC point whose FPR does not exceed f)

since a point with fpr_u <= f has fewer than m + 1 negatives at or above u, i.e. u > t.
``python_tests/test_metrics.py`` checks this on random scores with ties.

Two entry points:
- ``tpr_at_fpr(positive_scores, negative_scores, fprs)``: for given pair scores (a pairs list
  such as LFW's, or any scores you computed).
- ``verify_all_pairs(embeddings, labels, fprs)``: every pair i < j of a set of embeddings (the
  1:1 protocol over a whole gallery), without a B x B matrix and without sorting: the cosine
  similarities are produced tile by tile (rows x columns of the upper triangle) and the
  thresholds selected exactly by a two-pass radix selection on order-preserving integer keys
  of the fp32 scores (pass 1: a histogram of the top 16 bits; pass 2: inside the buckets that
  hold the target indices, a histogram of the low 16 bits, which pins the exact value).
  Memory is O(tile + 2^17) whatever the number of pairs; it runs on any device the embeddings
  are on (CPU, CUDA).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from .config import fpr_fraction
from .reference import NORM_EPS, autocast_off
from .validation import check_flag

#: The FPRs reported by default (face verification's usual operating points).
DEFAULT_EVAL_FPRS: Tuple[float, ...] = (1e-2, 1e-3, 1e-4)

RADIX_BITS = 16
NUM_BUCKETS = 1 << RADIX_BITS          # buckets of one radix pass
_BUCKET_OFFSET = NUM_BUCKETS // 2      # (key >> 16) lies in [-32768, 32767]
_LOW_MASK = NUM_BUCKETS - 1


@dataclasses.dataclass(frozen=True)
class VerificationResult:
    """Per FPR: the threshold and the TPR (see the module docstring for the definitions)."""

    fprs: Tuple[float, ...]
    thresholds: Tuple[float, ...]
    tprs: Tuple[float, ...]
    threshold_indices: Tuple[int, ...]   # m = floor(L * fpr), 0-based, descending order
    num_positive_pairs: int
    num_negative_pairs: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def tpr(self, fpr: float) -> float:
        """The TPR at one of the evaluated FPRs (matched to 1e-6 relative: an FPR given in fp32,
        0.0010000000474974513 for 1e-3, is found by 1e-3)."""
        for f, t in zip(self.fprs, self.tprs):
            if math.isclose(f, float(fpr), rel_tol=1e-6):
                return t
        raise KeyError(f"FPR {fpr!r} was not evaluated (evaluated: {self.fprs})")


def _fpr_tuple(fprs) -> Tuple[float, ...]:
    """The FPRs as a tuple of floats: a sequence, or one number; at least one, each in (0, 1)
    (checked here, before any pass over the pairs)."""
    if isinstance(fprs, numbers.Real) and not isinstance(fprs, bool):
        out = (float(fprs),)
    else:
        if isinstance(fprs, (torch.Tensor, np.ndarray)):  # a 0-d array or tensor is one FPR too
            fprs = fprs.reshape(-1).tolist()
        try:
            out = tuple(float(f) for f in fprs)
        except (TypeError, ValueError) as error:
            raise ValueError(f"fprs must be false-positive rates (a number or a sequence of them), "
                             f"got {fprs!r}") from error
    if not out:
        raise ValueError("fprs must hold at least one false-positive rate, got none")
    threshold_indices(0, out)  # each in (0, 1), as the thresholds will need
    return out


def threshold_indices(num_negatives: int, fprs: Sequence[float]) -> Tuple[int, ...]:
    """m_k = floor(L * fpr_k), with each FPR as its exact fraction (as EKDConfig does)."""
    out = []
    for f in fprs:
        f = float(f)
        if not (0.0 < f < 1.0):
            raise ValueError(f"every FPR must lie in (0, 1), got {f!r}")
        q = fpr_fraction(f)
        if q >= 1:  # the index would be L: past the last negative
            raise ValueError(f"every FPR must lie in (0, 1): {f!r} in fprs={tuple(fprs)} is within 1e-12 of 1, and "
                             "the threshold index floor(L * fpr) reads an FPR as the nearest fraction with a "
                             "denominator of at most 10^12, which is 1 here")
        out.append(num_negatives * q.numerator // q.denominator)
    return tuple(out)


# --------------------------------------------------------------------------- input checks
_FP32_MAX = torch.finfo(torch.float32).max


def _check_values(name: str, x: torch.Tensor) -> None:
    """A dense tensor with values: sparse layouts and meta tensors are refused by name (they
    failed deep inside torch: a reshape or an .item() that their kind does not have)."""
    if x.layout != torch.strided:
        raise ValueError(f"{name} must be a dense (strided) tensor, got layout {x.layout}: call .to_dense() first")
    if x.is_meta:
        raise ValueError(f"{name} is on the meta device, which holds no values: verification needs real scores")


def _check_finite(name: str, x: torch.Tensor) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} hold a non-finite value")


def _as_fp32(name: str, x: torch.Tensor) -> torch.Tensor:
    """`x` in fp32, what the raw dot products (normalize=False) are computed in; a non-finite
    value, or a finite one past fp32's range (fp64 input), is refused with what it is (the cast
    made it inf, then NaN scores)."""
    _check_finite(name, x)
    if x.dtype == torch.float64 and bool((x.abs() > _FP32_MAX).any()):
        raise ValueError(f"{name} hold values past fp32's range (|x| > {_FP32_MAX:.3g}); with normalize=False the "
                         "dot products are computed in fp32: scale the embeddings down, or normalize=True")
    return x.float()


#: Rows whose largest |x| reaches this are scaled by a power of two before they are normalised.
_SCALE_ROWS_FROM = 2.0 ** 48


def _unit_rows_fp32(name: str, x: torch.Tensor) -> torch.Tensor:
    """The rows of `x` normalised, in fp32 (the cosines' dtype).  A row whose largest |x| reaches
    2^48 is first multiplied by a power of two that brings it below 1: exact, so the unit row is
    the same bits, and its squared norm no longer overflows (fp32's did from |x| of about 1.8e19,
    and fp64 input past fp32's range became inf: a row of zeros, cosines of 0, silently).  Rows
    below 2^48 are normalised as they were.  Non-finite values are refused."""
    _check_finite(name, x)
    if not x.is_floating_point():
        x = x.double()                      # integer coordinates
    elif x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    largest = x.abs().amax(dim=1, keepdim=True)
    big = largest >= _SCALE_ROWS_FROM
    if bool(big.any()):
        x = x * torch.where(big, torch.ldexp(torch.ones_like(largest), -torch.frexp(largest).exponent),
                            torch.ones_like(largest))
    return torch.nn.functional.normalize(x.float(), dim=1, eps=NORM_EPS)


# --------------------------------------------------------------------------- given scores
def tpr_at_fpr(positive_scores: torch.Tensor, negative_scores: torch.Tensor,
               fprs: Sequence[float] = DEFAULT_EVAL_FPRS) -> VerificationResult:
    """Thresholds and TPRs for given positive and negative pair scores (1-D, any float dtype).

    Higher score = more similar.  Raises ValueError for an empty set, a non-finite score or
    scores that are not numbers.  Python lists of floats are read in fp64 (what Python floats are;
    the default dtype, fp32, would round 1.0000000001 onto 1.0 and make ties of distinct scores).
    """
    pos, neg = (_scores_tensor(name, x) for name, x in (("positive_scores", positive_scores),
                                                        ("negative_scores", negative_scores)))
    for name, s in (("positive_scores", pos), ("negative_scores", neg)):
        _check_values(name, s)
        if s.dtype.is_complex or s.dtype == torch.bool:
            raise ValueError(f"{name} must be real scores, got {s.dtype}")
    # One dtype for both, so that "positive > threshold" compares the scores as given: their own
    # dtype when they share a float one, else fp64 (exact for every fp16/bf16/fp32 value and for
    # integers below 2^53; torch's promotion would round an int64 16777217 to fp32's 16777216).
    dtype = pos.dtype if pos.dtype == neg.dtype and pos.dtype.is_floating_point else torch.float64
    pos, neg = pos.to(dtype), neg.to(dtype)
    for name, s in (("positive_scores", pos), ("negative_scores", neg)):
        if s.numel() == 0:
            raise ValueError(f"{name} is empty: TPR at FPR needs at least one positive and one negative pair")
        if not bool(torch.isfinite(s).all()):
            raise ValueError(f"{name} holds a non-finite score")
    fprs = _fpr_tuple(fprs)
    indices = threshold_indices(neg.numel(), fprs)
    num_negatives = neg.numel()
    thresholds, tprs = [], []
    for m in indices:
        # element m of the descending order = the (L - m)-th smallest (1-based)
        t = torch.kthvalue(neg, num_negatives - m).values
        thresholds.append(float(t))
        tprs.append(int((pos > t).sum()) / pos.numel())
    return VerificationResult(fprs, tuple(thresholds), tuple(tprs), indices, pos.numel(), num_negatives)


def _scores_tensor(name: str, scores) -> torch.Tensor:
    """`scores` as a detached 1-D tensor: a tensor or numpy array keeps its dtype; anything else
    (a list of Python numbers) is read in fp64 when it holds a float, as Python floats are; what
    is not numbers is refused by name."""
    try:
        tensor = torch.as_tensor(scores)
        if not isinstance(scores, (torch.Tensor, np.ndarray)) and tensor.dtype.is_floating_point:
            tensor = torch.as_tensor(scores, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{name} must be a tensor, an array or a sequence of numbers, got {type(scores).__name__} "
                         f"({error})") from None
    if tensor.layout != torch.strided or tensor.is_meta:
        return tensor.detach()  # (refused by name in tpr_at_fpr: a sparse tensor has no reshape)
    return tensor.detach().reshape(-1)


def pair_scores(embeddings_a: torch.Tensor, embeddings_b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of row i of `embeddings_a` with row i of `embeddings_b` (a pairs list), in
    fp32, as verify_all_pairs computes it; a non-finite embedding is refused (a ValueError here,
    rather than a NaN score that tpr_at_fpr refuses later)."""
    if not (isinstance(embeddings_a, torch.Tensor) and isinstance(embeddings_b, torch.Tensor)):
        raise ValueError(f"expected two N x D tensors, got {type(embeddings_a).__name__} and "
                         f"{type(embeddings_b).__name__}")
    for name, x in (("embeddings_a", embeddings_a), ("embeddings_b", embeddings_b)):
        _check_values(name, x)
        if x.dtype.is_complex or x.dtype == torch.bool:
            raise ValueError(f"{name} must be real numbers (float or integer), got {x.dtype}")
    if embeddings_a.shape != embeddings_b.shape or embeddings_a.dim() != 2 or embeddings_a.shape[1] < 1:
        raise ValueError(f"expected two N x D tensors of the same shape, D >= 1, got {tuple(embeddings_a.shape)} "
                         f"and {tuple(embeddings_b.shape)}")
    if embeddings_a.device != embeddings_b.device:
        raise ValueError(f"embeddings_a and embeddings_b must be on the same device, got {embeddings_a.device} and "
                         f"{embeddings_b.device}")
    a, b = _unit_rows_fp32("embeddings_a", embeddings_a), _unit_rows_fp32("embeddings_b", embeddings_b)
    return (a * b).sum(dim=1)


# --------------------------------------------------------------------------- order-preserving keys
def order_keys(scores: torch.Tensor) -> torch.Tensor:
    """int32 keys with key(x) < key(y) exactly when x < y, for finite fp32 x, y.

    The IEEE bits of a non-negative float already sort as signed integers; for a negative float
    flipping the 31 non-sign bits reverses its order.  -0.0 becomes +0.0 first (x + 0.0), so that
    equal values get equal keys.
    """
    bits = (scores + 0.0).view(torch.int32)
    # torch.bitwise_right_shift: the `>>` operator takes a much slower path on CPU tensors.
    return bits ^ (torch.bitwise_right_shift(bits, 31) & 0x7FFFFFFF)


def key_to_float(key: int) -> float:
    """The fp32 value whose ``order_keys`` is `key` (an int in the int32 range)."""
    k = torch.tensor([key], dtype=torch.int32)
    return float((k ^ ((k >> 31) & 0x7FFFFFFF)).view(torch.float32)[0])


# --------------------------------------------------------------------------- all pairs
#: Hook for fast backends: device type -> (histogram_pass, refine_pass), the two stages of the
#: selection, with the signatures of ``_histogram_pass`` and ``_refine_pass`` below:
#:   histogram_pass(pairs) -> (negative, positive): int64 (2^16,) counts of the top 16 bits of
#:       ``order_keys`` (offset by 2^15) over the negative / positive pairs i < j;
#:   refine_pass(pairs, buckets) -> (negative, positive): int64 (len(buckets), 2^16) counts of
#:       the low 16 bits of the keys whose top bits are buckets[s];
#: ``pairs`` is the ``_SortedPairs`` of the call (embeddings sorted by label, normalised fp32).
#: Empty: the tiled torch passes run on every device.  A backend that fuses the similarity
#: tiles with the histograms (the EKD selection kernels, when they exist) registers here with
#: ``register_pair_histogram_kernel`` and ``verify_all_pairs(backend="auto")`` picks it up;
#: ``backend="torch"`` always runs the passes below.
PAIR_HISTOGRAM_KERNELS: Dict[str, Tuple[Callable, Callable]] = {}


def register_pair_histogram_kernel(device_type: str, histogram_pass: Callable, refine_pass: Callable) -> None:
    PAIR_HISTOGRAM_KERNELS[device_type] = (histogram_pass, refine_pass)


def _default_tile(device: torch.device) -> Tuple[int, int]:
    # Few, large tiles: every element-wise step is one parallel region, and on a busy CPU each
    # region can wait a scheduler quantum for its threads (measured on 2 shared cores, 10,000
    # embeddings: 44 s with 512 x 1024 tiles, 8 s with 2048 x 4096; 4 s either way on 1 thread).
    # 2048 x 4096 fp32 scores are 32 MB; 8192 x 8192 (256 MB) gives a GPU enough work per launch.
    return (8192, 8192) if device.type == "cuda" else (2048, 4096)


class _SortedPairs:
    """The embeddings sorted by label, so that the positive pairs of a row block lie in one
    band of columns; tiles of the upper triangle (i < j) are produced on demand.

    Both passes walk the same tiles with the same matmul shapes, hence identical scores.
    """

    def __init__(self, embeddings: torch.Tensor, labels: torch.Tensor, tile: Tuple[int, int]):
        order = torch.argsort(labels, stable=True)
        self.embeddings = embeddings[order].contiguous()
        self.labels = labels[order]
        _, counts = torch.unique_consecutive(self.labels, return_counts=True)
        counts = counts.cpu()
        ends = counts.cumsum(0)
        # for every (sorted) row: the columns [group_start, group_end) of its own identity
        self.group_start = torch.repeat_interleave(ends - counts, counts).tolist()
        self.group_end = torch.repeat_interleave(ends, counts).tolist()
        self.tile_rows, self.tile_cols = tile
        self.size = embeddings.shape[0]
        # With check_finite, tiles() also notes whether every counted score (j > i) was finite:
        # raw dot products (normalize=False) can overflow fp32 though the embeddings are finite.
        self.check_finite = False
        self.all_finite = torch.ones((), dtype=torch.bool, device=embeddings.device)

    def tiles(self):
        """Yields (scores, r0, r1, c0, c1) for row block [r0, r1) x column block [c0, c1), c0 >= r0.

        The scores are canonicalised in place (-0.0 -> +0.0) so that equal values have equal keys.
        """
        e, n = self.embeddings, self.size
        for r0 in range(0, n - 1, self.tile_rows):
            r1 = min(r0 + self.tile_rows, n)
            rows = e[r0:r1]
            for c0 in range(r0, n, self.tile_cols):
                c1 = min(c0 + self.tile_cols, n)
                scores = rows @ e[c0:c1].t()
                scores.add_(0.0)
                if self.check_finite:
                    finite = torch.isfinite(scores)
                    lower = self.lower_mask(r0, r1, c0, c1)
                    if lower is not None:
                        width, mask = lower
                        finite[:, :width] |= mask  # pairs j <= i are not counted
                    self.all_finite &= finite.all()
                yield scores, r0, r1, c0, c1

    def positive_band(self, r0: int, r1: int, c0: int, c1: int) -> Tuple[int, int]:
        """Local columns [a, b) of the tile that may hold positive pairs (a == b: none)."""
        a = max(self.group_start[r0], c0)
        b = min(self.group_end[r1 - 1], c1)
        return a - c0, max(a, b) - c0

    def lower_mask(self, r0: int, r1: int, c0: int, c1: int):
        """(local columns [0, w), mask of pairs with j <= i there) or None when every j > i."""
        width = min(c1, r1) - c0
        if width <= 0:
            return None
        rows = torch.arange(r0, r1, device=self.embeddings.device).unsqueeze(1)
        cols = torch.arange(c0, c0 + width, device=self.embeddings.device).unsqueeze(0)
        return width, cols <= rows


def _raw_to_ordered_buckets(device: torch.device) -> torch.Tensor:
    """Bucket of the raw top 16 bits (bits >> 16, offset) -> bucket of the order key's top 16 bits.

    The key flips the 31 low bits of a negative float, so its top 16 bits are the raw top 16
    bits with the low 15 flipped when the sign is set: the histogram of raw bits, permuted, is
    the histogram of keys, and pass 1 saves the flip on every element.
    """
    raw = torch.arange(NUM_BUCKETS, device=device) - _BUCKET_OFFSET
    ordered = torch.where(raw < 0, raw ^ 0x7FFF, raw)
    return ordered + _BUCKET_OFFSET


def _histogram_pass(pairs: _SortedPairs) -> Tuple[torch.Tensor, torch.Tensor]:
    """Histograms of the top 16 key bits over negative and over positive pairs (int64, 2^16 each)."""
    device = pairs.embeddings.device
    dump = 2 * NUM_BUCKETS
    total = torch.zeros(dump + 1, dtype=torch.int64, device=device)
    for scores, r0, r1, c0, c1 in pairs.tiles():
        bucket = torch.bitwise_right_shift(scores.view(torch.int32), RADIX_BITS)
        bucket.add_(_BUCKET_OFFSET)
        a, b = pairs.positive_band(r0, r1, c0, c1)
        if b > a:
            positive = pairs.labels[r0:r1].unsqueeze(1) == pairs.labels[c0 + a:c0 + b].unsqueeze(0)
            bucket[:, a:b].add_(positive.to(torch.int32) * NUM_BUCKETS)
        lower = pairs.lower_mask(r0, r1, c0, c1)
        if lower is not None:
            width, mask = lower
            bucket[:, :width].masked_fill_(mask, dump)
        total += torch.bincount(bucket.view(-1), minlength=dump + 1)
    ordered = _raw_to_ordered_buckets(device)
    negative = torch.zeros(NUM_BUCKETS, dtype=torch.int64, device=device)
    positive = torch.zeros(NUM_BUCKETS, dtype=torch.int64, device=device)
    negative[ordered] = total[:NUM_BUCKETS]
    positive[ordered] = total[NUM_BUCKETS:dump]
    return negative, positive


def _bucket_float_range(bucket_low: int, bucket_high: int) -> Tuple[Optional[float], Optional[float]]:
    """Float bounds [lo, hi) of the keys in buckets bucket_low..bucket_high (None: unbounded).

    Keys are monotonic in the value, so a key interval is a float interval; the two ends of the
    key range (NaN / infinity bit patterns) need no bound since every score is finite.
    """
    low_key = (bucket_low - _BUCKET_OFFSET) << RADIX_BITS
    high_key = (bucket_high + 1 - _BUCKET_OFFSET) << RADIX_BITS
    lo = None if bucket_low == 0 else key_to_float(low_key)
    hi = None if high_key > 2**31 - 1 else key_to_float(high_key)
    return lo, hi


def _refine_pass(pairs: _SortedPairs, buckets: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inside each of `buckets` (top 16 key bits, offset to [0, 2^16)), histograms of the low
    16 bits over negative and over positive pairs: two (len(buckets), 2^16) int64."""
    device = pairs.embeddings.device
    slots = len(buckets)
    lookup = torch.full((NUM_BUCKETS,), -1, dtype=torch.int64, device=device)
    lookup[torch.tensor(list(buckets), dtype=torch.int64, device=device)] = torch.arange(slots, device=device)
    lo, hi = _bucket_float_range(min(buckets), max(buckets))
    size = 2 * slots * NUM_BUCKETS
    total = torch.zeros(size, dtype=torch.int64, device=device)
    for scores, r0, r1, c0, c1 in pairs.tiles():
        # A cheap range test on every score; the exact bucket test only on the few inside.
        if lo is not None and hi is not None:
            inside = (scores >= lo) & (scores < hi)
        elif lo is not None:
            inside = scores >= lo
        elif hi is not None:
            inside = scores < hi
        else:
            inside = torch.ones_like(scores, dtype=torch.bool)
        lower = pairs.lower_mask(r0, r1, c0, c1)
        if lower is not None:
            width, mask = lower
            inside[:, :width].masked_fill_(mask, False)
        rows, cols = inside.nonzero(as_tuple=True)
        keys = order_keys(scores[rows, cols]).long()
        slot = lookup[torch.bitwise_right_shift(keys, RADIX_BITS) + _BUCKET_OFFSET]
        is_positive = pairs.labels[r0 + rows] == pairs.labels[c0 + cols]
        index = slot * NUM_BUCKETS + (keys & _LOW_MASK) + is_positive.long() * (slots * NUM_BUCKETS)
        total += torch.bincount(index[slot >= 0], minlength=size)
    negative, positive = total.view(2, slots, NUM_BUCKETS).unbind(0)
    return negative, positive


def _locate(histogram: torch.Tensor, index: int) -> Tuple[int, int, int]:
    """For the element at descending `index` of a histogram (ascending bins): its bin, how many
    elements lie in higher bins, and its descending index inside the bin."""
    descending = histogram.flip(0).cumsum(0)                      # elements in bins >= each (flipped)
    position = int(torch.searchsorted(descending, torch.tensor([index], device=histogram.device),
                                      right=True)[0])
    bin_ = histogram.numel() - 1 - position
    above = int(descending[position - 1]) if position > 0 else 0
    return bin_, above, index - above


def _count_above(histogram: torch.Tensor, bin_: int) -> int:
    return int(histogram[bin_ + 1:].sum())


def verify_all_pairs(embeddings: torch.Tensor, labels: torch.Tensor, fprs: Sequence[float] = DEFAULT_EVAL_FPRS,
                     *, normalize: bool = True, tile: Optional[Tuple[int, int]] = None,
                     backend: str = "auto") -> VerificationResult:
    """1:1 verification over every pair i < j of `embeddings` (B x D) with identities `labels` (B).

    Scores are cosine similarities in fp32 (``normalize=False``: plain dot products of the fp32
    embeddings), also inside ``torch.autocast`` (it does not apply here).  Thresholds and TPRs
    follow the module docstring exactly: the selected threshold is the element a full sort of
    the tile-computed scores would give.  Memory:
    one ``tile`` of scores (rows, columns; default 2048 x 4096 on CPU, 8192 x 8192 on CUDA) and
    2^17 counters; time: two passes over the B(B-1)/2 pairs (two matmuls of each tile).  ``backend``: "auto" (a kernel
    registered in ``PAIR_HISTOGRAM_KERNELS`` for this device, else "torch") or "torch".

    On CUDA the matmul follows torch's fp32 matmul precision setting; keep it at "highest"
    (the default) for scores that agree with the CPU to fp32 rounding.
    """
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2:
        raise ValueError(f"embeddings must be a 2-D tensor (B x D), got "
                         f"{getattr(embeddings, 'shape', type(embeddings))}")
    _check_values("embeddings", embeddings)
    normalize = check_flag("normalize", normalize)  # (a string "False" is truthy: it normalised)
    if embeddings.dtype.is_complex or embeddings.dtype == torch.bool:
        # (complex lost its imaginary part with a warning, bool read as 0 and 1; integer
        # coordinates are read as floats, as given)
        raise ValueError(f"embeddings must be real numbers (float or integer), got {embeddings.dtype}")
    batch = embeddings.shape[0]
    if batch < 2:
        raise ValueError(f"all-pairs verification needs at least 2 embeddings, got {batch}")
    if embeddings.shape[1] < 1:
        raise ValueError(f"embeddings must have at least one column (B x D, D >= 1), got shape "
                         f"{tuple(embeddings.shape)}")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != batch \
            or labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be a 1-D integer tensor of length {batch}, got "
                         f"{getattr(labels, 'shape', type(labels))} {getattr(labels, 'dtype', '')}")
    _check_values("labels", labels)
    labels = labels.to(embeddings.device)
    if backend not in ("auto", "torch"):
        raise ValueError(f"backend must be 'auto' or 'torch', got {backend!r}")
    if tile is not None:
        if not (isinstance(tile, (tuple, list)) and len(tile) == 2
                and all(isinstance(t, numbers.Integral) and not isinstance(t, bool) and t >= 1 for t in tile)):
            raise ValueError(f"tile must be two positive integers (rows, columns), got {tile!r}")
    fprs = _fpr_tuple(fprs)

    # An enclosing torch.autocast would run the tiles' matmuls in bf16/fp16: the scores would no
    # longer be the fp32 cosines promised, and the radix passes read their fp32 bits (int32 view).
    with torch.no_grad(), autocast_off(embeddings.device):
        e = _unit_rows_fp32("embeddings", embeddings.detach()) if normalize else _as_fp32("embeddings",
                                                                                        embeddings.detach())
        e = e.contiguous()

        _, counts = torch.unique(labels, return_counts=True)
        num_positive = int((counts * (counts - 1) // 2).sum())
        num_negative = batch * (batch - 1) // 2 - num_positive
        if num_positive == 0 or num_negative == 0:
            raise ValueError(f"need both positive and negative pairs, got {num_positive} positive and "
                             f"{num_negative} negative pairs among {batch} embeddings")
        indices = threshold_indices(num_negative, fprs)

        pairs = _SortedPairs(e, labels, tuple(int(t) for t in tile) if tile is not None else _default_tile(e.device))
        histogram_pass, refine_pass = _histogram_pass, _refine_pass
        if backend == "auto" and e.device.type in PAIR_HISTOGRAM_KERNELS:
            histogram_pass, refine_pass = PAIR_HISTOGRAM_KERNELS[e.device.type]

        # Pass 1: which top-16-bit bucket holds each target index.
        pairs.check_finite = not normalize
        negative_high, positive_high = histogram_pass(pairs)
        pairs.check_finite = False
        if not bool(pairs.all_finite):
            raise ValueError("a pair score is not finite: with normalize=False the dot products of these embeddings "
                             "overflow fp32 (|x_i . x_j| > 3.4e38); scale the embeddings down, or normalize=True")
        located = [_locate(negative_high, m) for m in indices]
        buckets = sorted({b for b, _, _ in located})
        # Pass 2: the low 16 bits inside those buckets: together they are the exact key.
        negative_low, positive_low = refine_pass(pairs, buckets)
        negative_low, positive_low = negative_low.cpu(), positive_low.cpu()
        positive_high = positive_high.cpu()

        thresholds, tprs = [], []
        for bucket, _, rest in located:
            slot = buckets.index(bucket)
            low, _, _ = _locate(negative_low[slot], rest)
            key = ((bucket - _BUCKET_OFFSET) << RADIX_BITS) | low
            thresholds.append(key_to_float(key))
            positives_above = _count_above(positive_high, bucket) + _count_above(positive_low[slot], low)
            tprs.append(positives_above / num_positive)
    return VerificationResult(fprs, tuple(thresholds), tuple(tprs), indices, num_positive, num_negative)
