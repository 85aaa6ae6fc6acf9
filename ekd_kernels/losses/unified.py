"""Unified instance- and relation-level KD for face recognition (Mishra and Uikey, 2025).

Only the paper's abstract is public.  It names two parts: Instance-Level Embedding
Distillation with dynamic hard mining (ILED) and Relation-Based Pairwise Similarity
Distillation with a memory bank and sample mining (RPSD).  What follows is the most faithful
reading of that abstract we could make; every choice the abstract leaves open is a parameter,
and the defaults are ours, not the authors'.

ILED.  Per sample, the gap between the normalised student and teacher embeddings,
g_i = 1 - cos(s_i, t_i).  Dynamic hard mining keeps the k = ceil(hard_fraction * B) samples with
the largest gap (recomputed every batch); ILED = mean of g over them.  hard_fraction = 1 is
plain cosine distillation.  k is computed from the decimal hard_fraction is written as (0.07 is
7/100: k = 7 at B = 100), as the FPRs are read as exact fractions, not from the float product
(0.07 * 100 = 7.000000000000001, whose ceiling would be 8).

RPSD.  A memory bank holds the last ``bank_size`` (normalised teacher embedding, label) entries
in FIFO order.  For a sample i and a bank entry m, the relation difference is
r_im = cos(s_i, b_m) - cos(t_i, b_m): student and teacher similarity to the same teacher
anchor (so the student and teacher widths must match).  A sample's own entry (the bank row
holding t_i, when the batch was enqueued before the loss) is excluded, and ``pair_filter``
may keep only same-identity ("positive") or different-identity ("negative") relations by the
labels.  Sample mining keeps the ``num_mined_pairs`` relations with the largest |r_im| over the
whole batch (all of them when None or fewer); RPSD = mean of r^2 over them.

loss = iled_weight * ILED + rpsd_weight * RPSD.  Gradient to the student only; the bank and
the choice of hard samples / mined pairs carry none.  With an empty bank (and no in-batch
fallback) RPSD is 0.

Order of the bank update (``UnifiedKDLoss``): by default the batch is enqueued first and the
loss computed against the bank with the batch in it, so the first batch already has relations
(its own entries excluded); ``enqueue="after"`` computes against the older entries only, as
MoCo-style queues do.  The functional form takes the bank explicitly and updates nothing; with
no bank it uses the batch's own teacher embeddings (own entries excluded).

Non-finite input.  A batch with a NaN or infinite student or teacher embedding (or bank entry,
functional form) gives a NaN loss, gradient and terms, and ``UnifiedKDLoss`` does not write it
into its bank (the pointer and count stay; decided on the device): one bad batch does not
poison the following ones.

Cost.  ILED O(B D); RPSD O(B M D) for M bank entries plus a top-k over B x M; memory O(B M).
"""

from __future__ import annotations

from fractions import Fraction
from typing import NamedTuple, Optional

import torch
from torch import nn

from .._buffers import checkpoint_layout_problems, keep_precision_under_16_bit_casts, keep_precision_under_assign
from ..validation import int64_labels, refuse_stateful_recomputation
from ._common import (all_finite, check_embedding_pair, check_has_values, check_integer, check_number, compute_dtypes,
                      fp32_under_autocast, nan_unless_finite, normalize_rows)

#: The bank's ring state (state_dict entries), written by every training-mode call.
_RING_BUFFERS = ("bank_embeddings", "bank_labels", "bank_count", "bank_pointer")

PAIR_FILTERS = ("all", "positive", "negative")


class UnifiedKDResult(NamedTuple):
    loss: torch.Tensor
    iled: torch.Tensor            # detached
    rpsd: torch.Tensor            # detached
    num_hard_samples: int
    num_mined_pairs: int


def _num_hard_samples(hard_fraction: float, batch: int) -> int:
    """k = ceil(hard_fraction * B), at least 1, with hard_fraction read as the decimal it was written
    as: repr gives the shortest decimal that reads back as the float (the one written, up to 15
    digits), and in exact integers its ceiling is not pushed up by the float's rounding."""
    ratio = Fraction(repr(float(hard_fraction)))
    return max(1, -(-ratio.numerator * batch // ratio.denominator))


def _check_options(hard_fraction, num_mined_pairs, pair_filter, iled_weight, rpsd_weight) -> Optional[int]:
    """Checks the options; returns num_mined_pairs as a Python int (or None)."""
    check_number("hard_fraction", hard_fraction, positive=True, at_most_one=True)
    if num_mined_pairs is not None:
        num_mined_pairs = check_integer("num_mined_pairs (or None: all)", num_mined_pairs, 1)
    if pair_filter not in PAIR_FILTERS:
        raise ValueError(f"pair_filter must be one of {PAIR_FILTERS}, got {pair_filter!r}")
    for name, w in (("iled_weight", iled_weight), ("rpsd_weight", rpsd_weight)):
        check_number(name, w, non_negative=True)
    return num_mined_pairs


@fp32_under_autocast
def unified_kd_terms(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                     bank_embeddings: Optional[torch.Tensor] = None, bank_labels: Optional[torch.Tensor] = None,
                     own_index: Optional[torch.Tensor] = None, *, hard_fraction: float = 0.5,
                     num_mined_pairs: Optional[int] = 4096, pair_filter: str = "all", iled_weight: float = 1.0,
                     rpsd_weight: float = 1.0) -> UnifiedKDResult:
    """The loss and its two terms.  ``bank_embeddings`` (M x D, rows normalised by the caller or
    not: they are normalised here), ``bank_labels`` (M,), ``own_index`` (B,): the bank row of each
    sample's own entry or -1.  No bank: the batch's teacher embeddings, own entries excluded."""
    check_embedding_pair(student, teacher, same_dim=True, labels=labels, what="unified_kd_loss")
    check_has_values(student, "unified_kd_loss")
    num_mined_pairs = _check_options(hard_fraction, num_mined_pairs, pair_filter, iled_weight, rpsd_weight)
    student, teacher = compute_dtypes(student, teacher)
    labels = int64_labels(labels)
    batch = student.shape[0]
    if bank_embeddings is None:
        if bank_labels is not None or own_index is not None:
            raise ValueError("bank_labels / own_index given without bank_embeddings")
        bank_embeddings, bank_labels = teacher, labels
        own_index = torch.arange(batch, device=student.device)
    else:
        if not isinstance(bank_embeddings, torch.Tensor) or bank_embeddings.dim() != 2 \
                or bank_embeddings.shape[1] != teacher.shape[1]:
            raise ValueError(f"bank_embeddings must be M x {teacher.shape[1]}, got "
                             f"{getattr(bank_embeddings, 'shape', type(bank_embeddings).__name__)}")
        size = bank_embeddings.shape[0]
        if not isinstance(bank_labels, torch.Tensor) or bank_labels.shape != (size,) \
                or bank_labels.dtype.is_floating_point or bank_labels.dtype.is_complex \
                or bank_labels.dtype == torch.bool:
            raise ValueError(f"bank_labels must be a tensor of {size} integer labels, got "
                             f"{getattr(bank_labels, 'dtype', type(bank_labels).__name__)} "
                             f"{tuple(getattr(bank_labels, 'shape', ()))}")
        if own_index is None:
            own_index = torch.full((batch,), -1, dtype=torch.int64, device=student.device)
        elif not isinstance(own_index, torch.Tensor) or own_index.shape != (batch,) \
                or own_index.dtype.is_floating_point or own_index.dtype.is_complex or own_index.dtype == torch.bool \
                or bool(((own_index.long() < -1) | (own_index.long() >= size)).any()):
            # (a bool tensor would index as a mask: rows where True, not row 0 and row 1; the range
            # is checked in int64: uint8 would read -1 as 255)
            shown = (own_index if not isinstance(own_index, torch.Tensor) else
                     own_index.tolist() if own_index.numel() <= 16 else tuple(own_index.shape))
            dtype = f" ({own_index.dtype})" if isinstance(own_index, torch.Tensor) else ""
            raise ValueError(f"own_index must be {batch} bank rows in [0, {size}) or -1 (not in the bank), got "
                             f"{shown!r}{dtype}")
        if bank_embeddings.device != student.device or bank_labels.device != student.device:
            raise ValueError(f"the bank is on {bank_embeddings.device}, the embeddings on {student.device}")
        own_index = own_index.long()  # rows of any integer dtype, indexed as int64 (int8, uint8: values, not masks)
        bank_labels = int64_labels(bank_labels)

    s_hat, t_hat = normalize_rows(student), normalize_rows(teacher)

    # ILED: dynamic hard mining of the per-sample gaps
    gaps = 1 - (s_hat * t_hat).sum(1)
    num_hard = _num_hard_samples(hard_fraction, batch)
    hard = gaps.detach().topk(num_hard).indices
    iled = gaps[hard].mean()

    # RPSD: relations to the bank, own entry and filtered identities excluded, hardest kept
    bank = normalize_rows(bank_embeddings.detach().to(student.dtype))
    differences = s_hat @ bank.t() - t_hat @ bank.t()                     # B x M
    valid = torch.ones_like(differences, dtype=torch.bool)
    rows = torch.arange(batch, device=student.device)
    has_own = own_index >= 0
    valid[rows[has_own], own_index[has_own]] = False
    if pair_filter != "all":
        same = labels.unsqueeze(1) == bank_labels.unsqueeze(0)
        valid &= same if pair_filter == "positive" else ~same
    candidates = differences[valid]
    if candidates.numel() == 0:
        rpsd = differences.sum() * 0
        num_mined = 0
    else:
        num_mined = candidates.numel() if num_mined_pairs is None else min(num_mined_pairs, candidates.numel())
        mined = candidates.detach().abs().topk(num_mined).indices
        rpsd = candidates[mined].pow(2).mean()
    loss = iled_weight * iled + rpsd_weight * rpsd
    # mining keeps the largest gaps: a non-finite row may or may not be among them; the batch reads NaN
    finite = all_finite(student, teacher, bank_embeddings)
    loss, iled, rpsd = (nan_unless_finite(x, finite) for x in (loss, iled, rpsd))
    return UnifiedKDResult(loss, iled.detach(), rpsd.detach(), num_hard, num_mined)


def unified_kd_loss(student, teacher, labels, bank_embeddings=None, bank_labels=None, own_index=None,
                    **options) -> torch.Tensor:
    """Functional form: the 0-d loss of :func:`unified_kd_terms` (same arguments)."""
    return unified_kd_terms(student, teacher, labels, bank_embeddings, bank_labels, own_index, **options).loss


class UnifiedKDLoss(nn.Module):
    """``UnifiedKDLoss(dim)(student, teacher, labels)``: ILED + RPSD with a FIFO memory bank.

    Buffers (saved in ``state_dict``): ``bank_embeddings`` (bank_size x dim, normalised teacher
    embeddings, fp32), ``bank_labels``, ``bank_count`` (entries filled) and ``bank_pointer`` (next
    row to write).  The bank is updated in training mode only (``enqueue="before"`` the loss by
    default, or ``"after"``); in ``eval()`` it is read, not written.  A batch with a non-finite
    student or teacher embedding is not written (its loss is NaN).  ``last_terms`` holds the
    detached terms of the last call.
    """

    def __init__(self, dim: int, bank_size: int = 4096, hard_fraction: float = 0.5,
                 num_mined_pairs: Optional[int] = 4096, pair_filter: str = "all", iled_weight: float = 1.0,
                 rpsd_weight: float = 1.0, enqueue: str = "before"):
        super().__init__()
        dim = check_integer("dim (the teacher embedding width)", dim, 1)
        bank_size = check_integer("bank_size", bank_size, 1)
        if enqueue not in ("before", "after"):
            raise ValueError(f"enqueue must be 'before' or 'after', got {enqueue!r}")
        num_mined_pairs = _check_options(hard_fraction, num_mined_pairs, pair_filter, iled_weight, rpsd_weight)
        self.dim, self.bank_size, self.enqueue = dim, bank_size, enqueue
        self.options = dict(hard_fraction=hard_fraction, num_mined_pairs=num_mined_pairs, pair_filter=pair_filter,
                            iled_weight=iled_weight, rpsd_weight=rpsd_weight)
        self.register_buffer("bank_embeddings", torch.zeros(bank_size, dim))
        self.register_buffer("bank_labels", torch.full((bank_size,), -1, dtype=torch.int64))
        self.register_buffer("bank_count", torch.zeros((), dtype=torch.int64))
        self.register_buffer("bank_pointer", torch.zeros((), dtype=torch.int64))
        self.last_terms: Optional[UnifiedKDResult] = None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Back to the state of a new module: an empty bank (zero rows, labels -1, count and pointer
        0), in place, and no ``last_terms``.  Why: a module built on the meta device and
        materialised by ``to_empty`` (FSDP's deferred initialisation, which calls this) holds
        uninitialised memory in its buffers, and a garbage count or pointer would read garbage rows."""
        self.bank_embeddings.zero_()
        self.bank_labels.fill_(-1)
        self.bank_count.zero_()
        self.bank_pointer.zero_()
        self.last_terms = None

    @torch.no_grad()
    def _enqueue(self, teacher: torch.Tensor, labels: torch.Tensor, finite: torch.Tensor, pointer: torch.Tensor,
                 count: torch.Tensor) -> torch.Tensor:
        """Write the batch into the ring; returns each sample's bank row (-1 if it did not fit).

        ``finite`` (0-d bool): whether the batch is finite; when it is not, the bank, pointer and
        count are left as they were (chosen on the device) and every row is -1.  ``pointer`` and
        ``count``: the ring's state as the forward read it (refuse_stateful_recomputation)."""
        batch = teacher.shape[0]
        kept = min(batch, self.bank_size)                     # a batch larger than the bank keeps its tail
        rows = (pointer + torch.arange(kept, device=teacher.device)) % self.bank_size
        new_embeddings = normalize_rows(teacher[batch - kept:].detach().float())
        new_labels = labels[batch - kept:].to(torch.int64)
        self.bank_embeddings[rows] = torch.where(finite, new_embeddings, self.bank_embeddings[rows])
        self.bank_labels[rows] = torch.where(finite, new_labels, self.bank_labels[rows])
        self.bank_pointer.copy_(torch.where(finite, (pointer + kept) % self.bank_size, pointer))
        self.bank_count.copy_(torch.where(finite, (count + kept).clamp_max(self.bank_size), count))
        own = torch.full((batch,), -1, dtype=torch.int64, device=teacher.device)
        own[batch - kept:] = torch.where(finite, rows, -1)
        return own

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # the ring's pointer and count as this call reads them (copies under torch.compile)
        pointer, count = refuse_stateful_recomputation(self, "writes the batch into its memory bank",
                                                       "checkpoint unified_kd_loss with an explicit bank",
                                                       self.bank_pointer, self.bank_count)
        check_embedding_pair(student, teacher, same_dim=True, labels=labels, what="UnifiedKDLoss")
        check_has_values(student, "UnifiedKDLoss")
        if teacher.shape[1] != self.dim:
            raise ValueError(f"UnifiedKDLoss was built for width {self.dim}, "
                             f"got embeddings of width {teacher.shape[1]}")
        labels = int64_labels(labels)  # (the bank's dtype, before anything is written to it)
        update = self.training
        finite = all_finite(student, teacher)
        own = None
        if update and self.enqueue == "before":
            own = self._enqueue(teacher, labels, finite, pointer, count)
        filled = int(self.bank_count)
        # the ring's first `filled` rows are the valid entries (rows are filled in order 0, 1, ...)
        bank, bank_labels = self.bank_embeddings[:filled], self.bank_labels[:filled]
        if own is None:
            own = torch.full((student.shape[0],), -1, dtype=torch.int64, device=student.device)
        result = unified_kd_terms(student, teacher, labels, bank, bank_labels, own, **self.options)
        if update and self.enqueue == "after":
            self._enqueue(teacher, labels, finite, pointer, count)
        # (detached, as the docstring says: the loss's graph held here made a model holding this
        # module fail copy.deepcopy after a step, an EMA-of-weights copy's idiom)
        self.last_terms = result._replace(loss=result.loss.detach())
        return result.loss

    def _apply(self, fn, recurse=True):
        """Casts to 16 bits (``.half()``, ``.bfloat16()``, say with the model the loss sits in)
        leave the bank in fp32, on the new device: it holds normalised fp32 embeddings, and the
        ring writes fp32 rows into it.  Every other cast applies as usual."""
        return super()._apply(keep_precision_under_16_bit_casts(self, ("bank_embeddings",), fn), recurse)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """A checkpoint whose ring state cannot be this module's is refused, nothing copied: a
        buffer of another shape or dtype kind (another bank size, integer embeddings, float
        labels), a count or pointer outside the bank (a negative count would silently shrink the
        part read), a pointer other than the count while the bank fills (a state the ring never
        reaches), or non-finite bank rows (every later loss would read NaN)."""
        problems = checkpoint_layout_problems(self, state_dict, prefix, _RING_BUFFERS)
        if problems:
            error_msgs.extend(problems)
            return
        count, pointer = state_dict.get(prefix + "bank_count"), state_dict.get(prefix + "bank_pointer")
        bank = state_dict.get(prefix + "bank_embeddings")
        if isinstance(count, torch.Tensor) and not count.is_meta and not 0 <= int(count) <= self.bank_size:
            problems.append(f"{prefix}bank_count in the checkpoint is {int(count)}, outside [0, {self.bank_size}]")
        if isinstance(pointer, torch.Tensor) and not pointer.is_meta and not 0 <= int(pointer) < self.bank_size:
            problems.append(f"{prefix}bank_pointer in the checkpoint is {int(pointer)}, outside [0, {self.bank_size})")
        if not problems:
            problems.extend(self._ring_order_problems(count, pointer, prefix))
        if isinstance(bank, torch.Tensor) and not bank.is_meta and bank.is_floating_point() \
                and not torch.isfinite(bank).all():
            problems.append(f"{prefix}bank_embeddings in the checkpoint are not finite; an UnifiedKDLoss never "
                            "writes such rows (a corrupted checkpoint?)")
        if problems:
            error_msgs.extend(problems)
            return
        # (load_state_dict(assign=True) may bring a 16-bit bank, int32 count, pointer or labels
        # (index writes need int64), or any layout)
        keep_precision_under_assign(self, _RING_BUFFERS, lambda: super(
            UnifiedKDLoss, self)._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                                       unexpected_keys, error_msgs))

    def _ring_order_problems(self, count, pointer, prefix):
        """While the bank fills (count < bank_size) the ring writes rows 0, 1, ... in order, so the
        pointer equals the count, and forward reads rows [0, count) as the entries.  Any other
        pointer would write past the read rows (a later own_index outside the bank) or overwrite
        them while never-written zero rows are read.  The module's own value stands in for one
        the checkpoint lacks (a non-strict load keeps it)."""
        count = self.bank_count if count is None else count
        pointer = self.bank_pointer if pointer is None else pointer
        if not (isinstance(count, torch.Tensor) and isinstance(pointer, torch.Tensor)) or count.is_meta \
                or pointer.is_meta:
            return []
        if int(count) < self.bank_size and int(pointer) != int(count):
            return [f"{prefix}bank_count {int(count)} and {prefix}bank_pointer {int(pointer)} in the checkpoint: "
                    f"while the bank fills (count < bank_size {self.bank_size}) the pointer equals the count "
                    "(a state this ring never reaches; a corrupted checkpoint?)"]
        return []

    def extra_repr(self):
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"dim={self.dim}, bank_size={self.bank_size}, enqueue={self.enqueue!r}, {opts}"
