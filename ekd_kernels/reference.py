"""The pure-PyTorch reference of EKD: slow, literal, and the yardstick of every fast backend.

It follows SPEC.md stage by stage, one function per stage, under the names every backend uses:

    normalize_rows -> pair_similarities -> batch_thresholds -> ema_update
    -> select_negatives / critical_mask -> soft_rank / pair_rank_loss -> ekd_reference

It materialises the B x B similarity matrices and sorts all negative pairs, exactly as the
authors' implementation (Tencent/TFace, recognition/tasks/ekd/distillation/ekd.py) does, so its
defaults reproduce the golden figures.  Nothing here is optimised: clarity first.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple, Optional

import torch

from ._autograd import nan_gradient_unless
from .config import EKDConfig
from .result import EKDResult, EKDStats
from .validation import drawn_outside_backward, refuse_redraw

#: Row-norm floor of the normalisation (F.normalize's default): a zero row stays finite.
NORM_EPS = 1e-12
#: The sigmoid's argument is clamped to [-SIGMOID_CLAMP, SIGMOID_CLAMP] (the authors' guard).
SIGMOID_CLAMP = 50.0


def compute_dtype(student: torch.Tensor) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs (SPEC: low precision is computed in fp32); fp64 stays fp64
    so that gradcheck can run."""
    return torch.float64 if student.dtype == torch.float64 else torch.float32


def autocast_off(device: torch.device):
    """A context in which an enclosing ``torch.autocast`` does not apply on `device`.

    Training steps call the loss inside autocast; there its products would run in bf16/fp16 and
    tau = 0.01 would turn that rounding into wrong thresholds (SPEC: low precision is read, then
    computed in fp32), and a compiled op's internal ATen calls would hand back bf16 where its
    kernel reads fp32. The loss's entry points (``ekd_loss``, ``distributed.ekd_sharded_checked``) run in it.

    In plain eager mode where autocast is already off on the device's type, no region is entered
    (a shared no-op context): entering torch.autocast(enabled=False) costs a few microseconds of
    host time on every call and would change nothing there (the same enabled flag, dtype and
    cache flag; only its nesting count, read by no op the losses run, and the clearing of
    autocast's cast cache on leaving it at nesting 0, a cache that holds nothing outside an
    autocast region).  Under torch.compile, and under torch function modes (torch.export's
    pre-dispatch tracing records the region), it is entered."""
    # A fixed list, not torch.amp.is_autocast_available: torch 2.6's dynamo cannot trace that call.
    if device.type not in ("cpu", "cuda"):
        return _NO_REGION
    if (not torch.compiler.is_compiling() and not torch.is_autocast_enabled(device.type)
            and not torch._C._is_torch_function_mode_enabled()):
        return _NO_REGION
    return torch.autocast(device.type, enabled=False)


#: What autocast_off returns where there is nothing to turn off: entering it costs nothing.
_NO_REGION = contextlib.nullcontext()


# --------------------------------------------------------------------------- stage 1: normalise
def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """x / max(||x||, 1e-12), row by row (identical to F.normalize).

    On a contiguous copy: a reduction over a view (transposed, expanded) may sum in another
    order, and SPEC asks views to give the results of contiguous copies, bitwise."""
    x = x.contiguous()
    return x / x.norm(p=2, dim=1, keepdim=True).clamp_min(NORM_EPS)


# --------------------------------------------------------------------------- stage 2: pairs
class Pairs(NamedTuple):
    """All pairs (i, j), i < j, in row-major order, with their similarities and kind."""

    rows: torch.Tensor          # (P,) int64, i
    cols: torch.Tensor          # (P,) int64, j
    student: torch.Tensor       # (P,) a = <s_hat_i, s_hat_j> (carries the student's gradient)
    teacher: torch.Tensor       # (P,) b = <t_hat_i, t_hat_j>
    is_positive: torch.Tensor   # (P,) bool, labels[i] == labels[j]


def gram(x_hat: torch.Tensor) -> torch.Tensor:
    """x_hat @ x_hat^T with full fp32 accuracy.

    On CPU this is the same fp32 matmul the authors use.  On CUDA a plain fp32 matmul may run
    in TF32 (if the user enabled it), whose error tau = 0.01 amplifies 100-fold, so the
    reference computes in fp64 there and rounds once.
    """
    if x_hat.is_cuda and x_hat.dtype == torch.float32:
        xd = x_hat.double()
        return (xd @ xd.t()).float()
    return x_hat @ x_hat.t()


def pair_similarities(student_hat: torch.Tensor, teacher_hat: torch.Tensor, labels: torch.Tensor) -> Pairs:
    batch = student_hat.shape[0]
    rows, cols = torch.triu_indices(batch, batch, offset=1, device=student_hat.device)
    a = gram(student_hat)[rows, cols]
    b = gram(teacher_hat)[rows, cols]
    return Pairs(rows, cols, a, b, labels[rows] == labels[cols])


# --------------------------------------------------------------------------- stage 3: thresholds
def batch_thresholds(negative_similarities: torch.Tensor, config: EKDConfig) -> torch.Tensor:
    """The K order statistics: element m_k = floor(L * fpr_k) of the negatives sorted descending.

    NaN when there is no negative pair (L = 0): there is nothing to pick.
    """
    count = negative_similarities.numel()
    if count == 0:
        return torch.full((config.num_thresholds,), float("nan"), dtype=negative_similarities.dtype,
                          device=negative_similarities.device)
    ordered = torch.sort(negative_similarities.detach(), descending=True).values
    index = torch.tensor(config.threshold_indices(count), device=ordered.device)
    return ordered[index]


def ema_update(previous: torch.Tensor, batch: torch.Tensor, momentum: float, valid: torch.Tensor) -> torch.Tensor:
    """t <- momentum * e + (1 - momentum) * t, where `valid`; unchanged elsewhere.

    `valid` is a 0-d bool tensor (the batch had negatives and finite embeddings), applied with
    torch.where so that no host synchronisation is needed.  Same operation order as the authors.
    """
    previous = previous.detach()  # thresholds carry no gradient (SPEC 8), even from a state that requires one
    updated = momentum * batch.to(previous.dtype) + (1 - momentum) * previous
    return torch.where(valid, updated, previous)


# --------------------------------------------------------------------------- stage 4: selection
def _first_occurrences(values: torch.Tensor) -> torch.Tensor:
    """Bool mask of the elements whose value did not occur earlier in `values`."""
    order = torch.sort(values, stable=True).indices  # equal values keep their draw order
    ordered = values[order]
    new = torch.ones_like(values, dtype=torch.bool)
    new[1:] = ordered[1:] != ordered[:-1]
    mask = torch.empty_like(new)
    mask[order] = new
    return mask


def draw_random_negatives(num_negatives: int, count: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    """`count` distinct ranks in [0, num_negatives), uniform without replacement, in draw order,
    on the generator's device: the draw of negative_selection="random" in every backend.

    The ranks index the negative pairs in row-major order of (i, j), i < j.  A permutation of
    all L negatives would cost 8·L bytes (4.3 GB at B = 32768) for N = 2000 of them, so unless
    the draw is dense (2N >= L, where randperm(L)[:N] is cheap) it draws integers in [0, L)
    i.i.d. and keeps the first N distinct values: each kept value is uniform over the values not
    yet kept, which is sampling without replacement, in O(N) memory.  Deterministic for a given
    generator state; the loop's length check reads one count on the host (this variant already
    needs L as a Python int).
    """
    if generator is None:
        raise ValueError('negative_selection="random" needs a torch.Generator (pass generator=...)')
    refuse_redraw()  # (activation checkpointing's recomputation would draw again: refused)
    device = generator.device
    if 2 * count >= num_negatives:
        return drawn_outside_backward(torch.randperm(num_negatives, generator=generator, device=device)[:count])
    drawn = torch.zeros(0, dtype=torch.int64, device=device)
    kept = drawn
    while kept.numel() < count:
        # at least half of the values are still free (count <= L / 2), so about 2 draws per
        # missing value finish in one round on average; repeats are rare when L >> N
        extra = torch.randint(num_negatives, (2 * (count - kept.numel()),), generator=generator, device=device)
        drawn = torch.cat([drawn, extra])
        kept = drawn[_first_occurrences(drawn)]
    return drawn_outside_backward(kept[:count])


def select_negatives(negative_student: torch.Tensor, config: EKDConfig,
                     generator: Optional[torch.Generator]) -> torch.Tensor:
    """Indices (into the negative pairs) of the N distilled negatives.

    "hardest": the N largest student similarities (ties at the boundary in any order, as the
    authors' unstable sort).  "random": N drawn uniformly without replacement by `generator`
    (`draw_random_negatives`).
    """
    count = negative_student.numel()
    n = min(config.num_hard_negatives, count)
    if config.negative_selection == "random":
        return draw_random_negatives(count, n, generator).to(negative_student.device)
    return torch.sort(negative_student.detach(), descending=True).indices[:n]


def exceeded(similarities: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """(P, K) bool: 1(x > t_k)."""
    return similarities.detach().unsqueeze(1) > thresholds.unsqueeze(0)


def critical_mask(a: torch.Tensor, b: torch.Tensor, student_thresholds: torch.Tensor,
                  teacher_thresholds: torch.Tensor) -> torch.Tensor:
    """Eq. 5: a pair is critical when 1(b > t_k(T)) != 1(a > t_k(S)) for some k."""
    return (exceeded(a, student_thresholds) != exceeded(b, teacher_thresholds)).any(dim=1)


# --------------------------------------------------------------------------- stage 5: rank loss
def clamped_sigmoid(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """1 / (1 + exp(clamp(-x / tau, -50, 50))): the authors' form, gradient zero past the clamp."""
    exponent = torch.clamp(-x / temperature, min=-SIGMOID_CLAMP, max=SIGMOID_CLAMP)
    return 1.0 / (1.0 + torch.exp(exponent))


def soft_rank(x: torch.Tensor, thresholds: torch.Tensor, temperature: float) -> torch.Tensor:
    """R(x) = sum_k sigmoid((x - t_k) / tau)."""
    return clamped_sigmoid(x.unsqueeze(1) - thresholds.unsqueeze(0), temperature).sum(dim=1)


def pair_rank_loss(a: torch.Tensor, b: torch.Tensor, student_thresholds: torch.Tensor,
                   teacher_thresholds: torch.Tensor, config: EKDConfig) -> torch.Tensor:
    """Per-pair loss of the chosen rank-loss variant."""
    if config.rank_loss == "soft_rank":
        return (soft_rank(a, student_thresholds, config.temperature)
                - soft_rank(b, teacher_thresholds, config.temperature)) ** 2
    if config.rank_loss == "eq7":
        student_margin = a.unsqueeze(1) - student_thresholds.unsqueeze(0)
        teacher_margin = b.unsqueeze(1) - teacher_thresholds.unsqueeze(0)
        return (teacher_margin - student_margin).abs().sum(dim=1)
    return (b - a) ** 2  # eq8


def term(per_pair: torch.Tensor, critical: torch.Tensor, config: EKDConfig) -> torch.Tensor:
    """Mean over the pairs of one term (its critical pairs only, in the Eq. 5 variant); 0 if none."""
    if config.critical_only:
        per_pair = per_pair[critical]
    if per_pair.numel() == 0:
        return per_pair.sum()  # a zero that keeps the graph (and the dtype)
    return per_pair.mean()


def nan_unless_finite(loss: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    """``loss`` where ``finite`` (0-d bool) holds, else NaN, decided on the device.

    The rule of every loss of the package (EKD's reference, the comparison losses): a batch with a non-finite input embedding gives a
    NaN loss, whatever its masks, sorts and clamps made of the bad values (a teacher NaN can
    otherwise drop out of a mask and leave a finite loss).  The loss is multiplied by 1 or NaN,
    so that the gradient is NaN too and a gradient scaler (which looks at the gradients) skips
    the step; a finite batch's loss and gradient are unchanged (multiplied by exactly 1).
    """
    factor = torch.where(finite, torch.ones((), dtype=loss.dtype, device=loss.device),
                         torch.full((), float("nan"), dtype=loss.dtype, device=loss.device))
    return loss * factor


# --------------------------------------------------------------------------- the whole pipeline
def ekd_reference(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                  student_thresholds: torch.Tensor, teacher_thresholds: torch.Tensor,
                  config: EKDConfig, update_thresholds: bool = True,
                  generator: Optional[torch.Generator] = None) -> EKDResult:
    """EKD on (student, teacher, labels) with the given EMA state; inputs already validated.

    Returns the loss (gradient to `student` only), the new threshold state (the old one when
    `update_thresholds` is False, the batch has no negative pair, or the embeddings are not
    finite) and the statistics.
    """
    dtype = compute_dtype(student)
    state_dtype = student_thresholds.dtype
    finite = torch.isfinite(student).all() & torch.isfinite(teacher).all()

    student_hat = normalize_rows(nan_gradient_unless(finite, student).to(dtype))
    with torch.no_grad():
        teacher_hat = normalize_rows(teacher.detach().to(dtype))
    pairs = pair_similarities(student_hat, teacher_hat, labels)

    negative = ~pairs.is_positive
    a_pos, b_pos = pairs.student[pairs.is_positive], pairs.teacher[pairs.is_positive]
    a_neg, b_neg = pairs.student[negative], pairs.teacher[negative]

    batch_student = batch_thresholds(a_neg, config)
    batch_teacher = batch_thresholds(b_neg, config)
    valid = finite & torch.tensor(a_neg.numel() > 0 and update_thresholds, device=student.device)
    new_student = ema_update(student_thresholds, batch_student, config.momentum, valid)
    new_teacher = ema_update(teacher_thresholds, batch_teacher, config.momentum, valid)
    # The loss uses the state after this call's update, as the authors do.
    st, tt = new_student.to(dtype), new_teacher.to(dtype)

    selected = select_negatives(a_neg, config, generator)
    a_sel, b_sel = a_neg[selected], b_neg[selected]

    critical_pos = critical_mask(a_pos, b_pos, st, tt)
    critical_sel = critical_mask(a_sel, b_sel, st, tt)
    positive_term = term(pair_rank_loss(a_pos, b_pos, st, tt, config), critical_pos, config)
    negative_term = term(pair_rank_loss(a_sel, b_sel, st, tt, config), critical_sel, config)
    # (the weights as tensors of the terms' dtype: a Python float's forward-mode tangent is a
    # float64 zero that upcasts the loss's tangent, pytorch/pytorch#90065)
    loss = (positive_term.new_full((), config.positive_weight) * positive_term
            + negative_term.new_full((), config.negative_weight) * negative_term)
    # A non-finite batch must read as NaN (a gradient scaler then skips the step), whatever
    # the sort and the clamps made of it: multiplied by 1 or NaN (a finite batch's loss and
    # gradient unchanged), so that a forward-mode tangent reads NaN too, as the gradient does
    # (_autograd.nan_gradient_unless); torch.where would give the NaN branch a tangent of 0.
    loss = nan_unless_finite(loss, finite)

    def count(mask: torch.Tensor) -> torch.Tensor:
        return mask.sum(dtype=torch.int64)

    nan = torch.tensor(float("nan"), dtype=torch.float32, device=student.device)  # (not the default dtype)
    stats = EKDStats(
        # a non-finite batch's statistics read as NaN, on every backend (the sort and the clamps
        # may leave some of them finite)
        batch_student_thresholds=torch.where(finite, batch_student, nan).to(state_dtype),
        batch_teacher_thresholds=torch.where(finite, batch_teacher, nan).to(state_dtype),
        student_thresholds=new_student,
        teacher_thresholds=new_teacher,
        num_positive_pairs=count(pairs.is_positive),
        num_negative_pairs=count(negative),
        num_selected_negatives=torch.tensor(selected.numel(), dtype=torch.int64, device=student.device),
        num_critical_selected=count(critical_pos) + count(critical_sel),
        positive_term=torch.where(finite, positive_term, nan.to(positive_term.dtype)),
        negative_term=torch.where(finite, negative_term, nan.to(negative_term.dtype)),
    )
    if config.compute_critical_ratio:
        critical_all = critical_mask(pairs.student, pairs.teacher, st, tt)
        stats.num_critical_pairs = count(critical_all)
        stats.critical_ratio = torch.where(finite, stats.num_critical_pairs.to(torch.float32) / pairs.student.numel(),
                                           nan)
    return EKDResult(loss, new_student.detach(), new_teacher.detach(), stats.detach())
