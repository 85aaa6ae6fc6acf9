"""PWR: pairwise ranking distillation (Nikitin, Konushin and Konushin, GraphiCon 2020).

The student learns the teacher's *order* of pair scores rather than the scores themselves.

Scores.  Embeddings are L2-normalised (x / max(||x||, 1e-12)); the M = B(B-1)/2 pairs (i < j)
get a distance score, ``"l2"``: d = sqrt(max(2 - 2 cos, 1e-12)), or ``"cosine"``: d = 1 - cos.

Couples.  Every ordered couple of pairs (p, q) with d_t(p) > d_t(q) (ties excluded) asks the
student to keep that order.  With Δs = d_s(p) - d_s(q) and Δt = d_t(p) - d_t(q) > 0:

    ranknet      log(1 + exp(-beta Δs))
    diff_power   (relu(m - Δs) + 1e-12)^power
    diff_exp     relu(exp(beta (m - Δs)) - 1)

where the margin m is ``"teacher_diff"`` (m = Δt, the default), ``"const"`` (m = ``margin``) or
``"teacher_std"`` (m = the population standard deviation of the M teacher scores).  The loss is
the mean over the ordered couples, 0 when there is none (all teacher scores equal).  Defaults:
l2 scores, diff_exp, m = Δt, beta = 1, power = 1 (the authors' MXNet code has the same options
and defaults for power and beta).

Cost.  M^2 / 2 couples, M = B(B-1)/2.  Two exact algorithms (``algorithm``):

- ``"couples"`` visits the couples in blocks of pairs (``chunk`` rows of M at a time) and
  accumulates the gradient w.r.t. the M student scores in the same pass: O(B^4) time, memory
  O(chunk * M), never the M x M matrix (8 GiB at B = 256: the blocks compute in fp64).  Every
  variant.
- ``"sorted"``, for the default variant (diff_exp with m = Δt): with a = d_t - d_s the couple
  term is relu(exp(beta (a_p - a_q)) - 1), nonzero exactly when a_p > a_q, and it factorises as
  e^{beta a_p} e^{-beta a_q} - 1.  The loss is then a sum over the 2-D dominance set
  {d_t(q) < d_t(p), a_q < a_p}, which sorting by d_t and a divide-and-conquer over a (sorted
  blocks, searchsorted, prefix sums; vectorised level by level) gives in O(M log^2 M) =
  O(B^2 log^2 B) time and O(M) memory, gradient included.  Computed in fp64.  Tied teacher
  scores (common in fp32) are excluded exactly, as the strict order demands.

``"auto"`` (default) takes "sorted" when it applies, else "couples".  Both give the same loss
and gradient (tests compare them, ties included).

Non-finite input.  A NaN or infinite embedding (student or teacher) gives a NaN loss and
gradient, with every variant and algorithm (a NaN teacher score would otherwise drop out of
"couples"' strict order test and leave a finite loss).  Finite input whose couple terms overflow
(diff_exp at a large beta) gives +inf with both algorithms.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .._autograd import first_order_only, keep_anchors, refuse_forward_mode, refuse_torch_func
from ._common import (all_finite, check_embedding_pair, check_has_values, check_integer, check_number, compute_dtypes,
                      fp32_under_autocast, nan_unless_finite, normalize_rows)

SCORES = ("l2", "cosine")
LOSS_TYPES = ("diff_exp", "diff_power", "ranknet")
MARGINS = ("teacher_diff", "const", "teacher_std")
_CHUNK_ELEMENTS = 1 << 22  # couples per block: 4M (32 MiB per temporary: the couples compute in fp64)


def pair_scores(x: torch.Tensor, score: str = "l2") -> torch.Tensor:
    """The M = B(B-1)/2 pair scores (i < j, row-major) of normalised embeddings."""
    x_hat = normalize_rows(x)
    i, j = torch.triu_indices(x.shape[0], x.shape[0], offset=1, device=x.device)
    cosines = (x_hat @ x_hat.t())[i, j]
    if score == "l2":
        return (2 - 2 * cosines).clamp_min(1e-12).sqrt()
    return 1 - cosines


def _couple_loss(student_diff, teacher_diff, loss_type, margin_type, margin, teacher_std, power, beta):
    """(per-couple loss, its derivative w.r.t. Δs) on a block of couples."""
    if loss_type == "ranknet":
        value = torch.nn.functional.softplus(-beta * student_diff)
        return value, -beta * torch.sigmoid(-beta * student_diff)
    if margin_type == "teacher_diff":
        m = teacher_diff
    elif margin_type == "teacher_std":
        m = teacher_std
    else:
        m = margin
    gap = m - student_diff
    if loss_type == "diff_power":
        positive = gap.clamp_min(0) + 1e-12
        value = positive.pow(power)
        slope = torch.where(gap > 0, -power * positive.pow(power - 1), torch.zeros_like(gap))
        return value, slope
    # expm1: e^x - 1 without the cancellation of exp(x) - 1 at small beta * gap (fp32 lost it all
    # at beta = 1e-10); gap > 0 is e^(beta gap) > 1 (beta > 0)
    value = torch.expm1(beta * gap).clamp_min(0)
    slope = torch.where(gap > 0, -beta * torch.exp(beta * gap), torch.zeros_like(gap))
    return value, slope


def _dominance_exp_sums(order, values, beta):
    """For every element p: (sum of e^{beta (values[p] - values[q])}, count of q) over the q with
    order[q] < order[p] and values[q] < values[p], both strict.  Divide and conquer over the
    positions of the sequence sorted by `order`: at the level of blocks of 2h, each element of a
    right half gains the elements of its left half with a smaller value, found by searchsorted in
    the sorted left half and a prefix sum.  All blocks of a level run as one batched operation.
    Equal `order` keys are sorted by decreasing value, so a tied q placed before p never has a
    smaller value: ties are excluded as the strict order demands.

    Each left half's exponentials are shifted by its smallest value m: the prefix sums add
    e^{-beta (v_q - m)} <= 1, and p's share is e^{beta (v_p - m)} times one, where v_p > m
    whenever p has any q below it.  So no factor overflows unless a couple's own term does (the
    sum is then +inf, as the couples algorithm's), and none is 0 where the sum is not: one shift
    for all elements (the mean) overflowed e^{beta a_p} and underflowed its partner to 0 at large
    beta * range, a NaN loss where the couples give +inf."""
    n = order.shape[0]
    size = 1 << max(0, (n - 1).bit_length())
    by_value = values.argsort(descending=True, stable=True)
    perm = by_value[order[by_value].argsort(stable=True)]
    inf = torch.tensor(float("inf"), dtype=values.dtype, device=values.device)
    v = torch.cat([values[perm], inf.expand(size - n)])          # padding sits after every real element
    sums = torch.zeros(size, dtype=values.dtype, device=values.device)
    counts = torch.zeros(size, dtype=torch.int64, device=values.device)
    half = 1
    while half < size:
        blocks = v.view(-1, 2, half)
        left_sorted = blocks[:, 0, :].sort(dim=1).values
        # (a left half of padding only, m = inf, sits before a right half of padding only: its
        # NaN stays in the padding, which is cut off below)
        smallest = left_sorted[:, :1]
        shrunk = torch.exp(-beta * (left_sorted - smallest))       # 0 for the padding's inf
        prefix = torch.cat([shrunk.new_zeros(shrunk.shape[0], 1), shrunk.cumsum(1)], dim=1)
        right = blocks[:, 1, :]
        below = torch.searchsorted(left_sorted.contiguous(), right.contiguous())  # count of left < value
        gained = prefix.gather(1, below)
        # (below = 0: no term, and v_p <= m, whose exponential may be inf beside a 0 prefix)
        sums.view(-1, 2, half)[:, 1, :] += torch.where(below > 0, torch.exp(beta * (right - smallest)) * gained,
                                                       torch.zeros_like(gained))
        counts.view(-1, 2, half)[:, 1, :] += below
        half *= 2
    out_sums, out_counts = torch.empty_like(values), torch.empty(n, dtype=torch.int64, device=values.device)
    out_sums[perm], out_counts[perm] = sums[:n], counts[:n]
    return out_sums, out_counts


class _SortedDiffExp(torch.autograd.Function):
    """The default PWR variant (diff_exp, m = Δt) over the dominance set, in fp64 (module docstring).
    Where the loss is 0 (no ordered couple) the gradient is 0 too."""

    @staticmethod
    def forward(ctx, student_scores, teacher_scores, beta):
        num_pairs = student_scores.shape[0]
        t = teacher_scores.double()
        a = t - student_scores.double()
        below_sum, below_count = _dominance_exp_sums(t, a, beta)   # sum over q under p of e^{beta (a_p - a_q)}
        above_sum, _ = _dominance_exp_sums(-t, -a, beta)           # sum over r over p of e^{beta (a_r - a_p)}
        # Couples t_p > t_q: all pairs minus the tied ones.  A sorted element ties with those before
        # it that share its value (its position minus its value's first position): a count of
        # fixed shapes, no unique_consecutive (a data-dependent size that torch.compile cannot trace
        # in one graph) and no host read; an exact integer in fp64, as the count before.
        sorted_t = t.sort().values
        positions = torch.arange(num_pairs, dtype=torch.int64, device=t.device)
        tied = (positions - torch.searchsorted(sorted_t, sorted_t)).sum().double()
        couples = (num_pairs * (num_pairs - 1) / 2 - tied).clamp_min(1.0)  # (0 couples: loss 0, as 0 / 1)
        total = below_sum.sum() - below_count.sum().double()
        loss = (total / couples).to(student_scores.dtype)
        grad = None
        if ctx.needs_input_grad[0]:
            # d loss / d a_p = beta (sum_q e^{beta (a_p - a_q)} - sum_r e^{beta (a_r - a_p)}) / couples,
            # and a = d_t - d_s
            grad = (-(beta / couples) * (below_sum - above_sum)).to(student_scores.dtype)
        ctx.save_for_backward(grad)
        keep_anchors(ctx, student_scores)  # (first_order_only's refusal of a second derivative hangs on it)
        return loss

    @staticmethod
    @first_order_only("PWR", what="pwr_loss", way_out="")
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return grad_loss * grad, None, None


class _RankingCouples(torch.autograd.Function):
    """Mean per-couple loss over ordered couples, from the M student and teacher scores, in blocks;
    the gradient w.r.t. the student scores is accumulated in the forward (the loss is a scalar),
    so the backward is a multiply and no block is kept."""

    @staticmethod
    def forward(ctx, student_scores, teacher_scores, loss_type, margin_type, margin, power, beta, chunk):
        # In fp64, as _SortedDiffExp: in fp32 the blocks' e^(beta gap) overflowed where the sorted
        # algorithm's shifted sums do not (an inf loss and NaN gradients at beta = 30), and the
        # gradient's sums lost digits; the loss and gradient return in the scores' dtype.
        dtype = student_scores.dtype
        # (first_order_only's refusal of a second derivative hangs on the input itself, not on
        # its fp64 copy, which does not require grad inside forward for fp32 scores)
        keep_anchors(ctx, student_scores)
        student_scores, teacher_scores = student_scores.double(), teacher_scores.double()
        num_pairs = student_scores.shape[0]
        want_grad = ctx.needs_input_grad[0]
        teacher_std = teacher_scores.std(unbiased=False) if num_pairs > 0 else teacher_scores.new_zeros(())
        total = student_scores.new_zeros((), dtype=torch.float64)
        count = torch.zeros((), dtype=torch.int64, device=student_scores.device)
        grad = torch.zeros_like(student_scores) if want_grad else None
        for start in range(0, num_pairs, chunk):
            stop = min(num_pairs, start + chunk)
            student_diff = student_scores[start:stop, None] - student_scores[None, :]
            teacher_diff = teacher_scores[start:stop, None] - teacher_scores[None, :]
            ordered = teacher_diff > 0
            value, slope = _couple_loss(student_diff, teacher_diff, loss_type, margin_type, margin, teacher_std,
                                        power, beta)
            zero = torch.zeros((), dtype=value.dtype, device=value.device)
            total += torch.where(ordered, value, zero).sum(dtype=torch.float64)
            count += ordered.sum()
            if want_grad:
                slope = torch.where(ordered, slope, zero)
                grad[start:stop] += slope.sum(1)     # p = this block: dΔs/dd_s(p) = +1
                grad -= slope.sum(0)                 # q: dΔs/dd_s(q) = -1
        denominator = count.clamp_min(1)
        loss = (total / denominator).to(dtype)   # 0 when there is no ordered couple
        if want_grad:
            grad = (grad / denominator.to(grad.dtype)).to(dtype)
        ctx.save_for_backward(grad if want_grad else None)
        return loss

    @staticmethod
    @first_order_only("PWR", what="pwr_loss", way_out="")
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return grad_loss * grad, None, None, None, None, None, None, None


ALGORITHMS = ("auto", "sorted", "couples")


def _check_options(score, loss_type, margin_type, margin, power, beta, algorithm="auto"):
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if algorithm == "sorted" and not (loss_type == "diff_exp" and margin_type == "teacher_diff"):
        raise ValueError("algorithm='sorted' computes the diff_exp loss with margin 'teacher_diff' only, got "
                         f"loss_type={loss_type!r}, margin={margin_type!r}")
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if margin_type not in MARGINS:
        raise ValueError(f"margin must be one of {MARGINS} (with margin_value for 'const'), got {margin_type!r}")
    check_number("power", power, positive=True)
    check_number("beta", beta, positive=True)
    check_number("margin_value", margin)


def _check_chunk(chunk) -> int:
    try:
        return check_integer("chunk", chunk, 1)
    except ValueError:
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}") from None


@fp32_under_autocast
def pwr_loss(student: torch.Tensor, teacher: torch.Tensor, score: str = "l2", loss_type: str = "diff_exp",
             margin: str = "teacher_diff", margin_value: float = 0.0, power: float = 1.0, beta: float = 1.0,
             chunk: int = None, algorithm: str = "auto") -> torch.Tensor:
    """PWR loss of one batch (0-d); gradient to ``student`` only.  See the module docstring.

    ``margin`` picks the margin m ("teacher_diff", "const" with ``margin_value``, "teacher_std");
    ``beta`` is the ranknet / diff_exp scale, ``power`` the diff_power exponent; ``algorithm``
    "auto", "sorted" or "couples" (module docstring); ``chunk`` the pairs per block of "couples"
    (default: about 4M couples per block).
    """
    check_embedding_pair(student, teacher, what="pwr_loss")
    check_has_values(student, "pwr_loss")
    _check_options(score, loss_type, margin, margin_value, power, beta, algorithm)
    # (its Functions have no jvp; a jvp staticmethod there would make Dynamo refuse the fullgraph compile)
    refuse_forward_mode(student, "PWR", what="pwr_loss", way_out="")
    refuse_torch_func("pwr_loss")
    student, teacher = compute_dtypes(student, teacher)
    with torch.no_grad():
        teacher_scores = pair_scores(teacher, score)
    student_scores = pair_scores(student, score)
    num_pairs = student_scores.shape[0]
    finite = all_finite(student, teacher)
    if algorithm != "couples" and loss_type == "diff_exp" and margin == "teacher_diff":
        return nan_unless_finite(_SortedDiffExp.apply(student_scores, teacher_scores, float(beta)), finite)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, num_pairs)) if chunk is None else _check_chunk(chunk)
    return nan_unless_finite(_RankingCouples.apply(student_scores, teacher_scores, loss_type, margin,
                                                   float(margin_value), float(power), float(beta), chunk), finite)


class PWRLoss(nn.Module):
    """``PWRLoss()(student, teacher)``: module form of :func:`pwr_loss` (l2, diff_exp, m = Δt)."""

    def __init__(self, score: str = "l2", loss_type: str = "diff_exp", margin: str = "teacher_diff",
                 margin_value: float = 0.0, power: float = 1.0, beta: float = 1.0, algorithm: str = "auto",
                 chunk: Optional[int] = None):
        super().__init__()
        _check_options(score, loss_type, margin, margin_value, power, beta, algorithm)
        if chunk is not None:
            chunk = _check_chunk(chunk)
        self.score, self.loss_type, self.margin = score, loss_type, margin
        self.margin_value, self.power, self.beta, self.algorithm = margin_value, power, beta, algorithm
        self.chunk = chunk

    def forward(self, student, teacher):
        return pwr_loss(student, teacher, self.score, self.loss_type, self.margin, self.margin_value, self.power,
                        self.beta, chunk=self.chunk, algorithm=self.algorithm)

    def extra_repr(self):
        return (f"score={self.score!r}, loss_type={self.loss_type!r}, margin={self.margin!r}, "
                f"margin_value={self.margin_value}, power={self.power}, beta={self.beta}, algorithm={self.algorithm!r}"
                + (f", chunk={self.chunk}" if self.chunk is not None else ""))
