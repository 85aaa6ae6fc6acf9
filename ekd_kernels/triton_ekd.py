"""Fused Triton backend of EKD: ``EKDLoss(backend="triton")``.

It computes SPEC.md (the semantics of ``reference.ekd_reference``) without ever holding a
B x B tensor: every pass recomputes its similarity tiles from the raw rows (the fused-attention
pattern), and memory beyond the inputs is O(B * (Ds + Dt)) plus fixed histograms.

The stages, under the reference's names (kernels in ``_triton/kernels.py``):

    sort by label     rows are gathered once in label order (contiguous copies, any input
                      strides), so each row's positives are one column range.
    normalise         inverse row norms (B floats); tiles scale raw dots by them.
    batch_thresholds  exact order statistics by radix select over order-preserving 32-bit keys:
                      pass 1 histograms the top 16 bits of every negative similarity (student and
                      teacher), pass 2 the low 16 bits inside each wanted bucket.  The key found
                      is the bits of the element the sort-based reference picks, for any rank.
    ema_update        on the device, torch.where: no host synchronisation.
    select_negatives  the N-th largest student similarity is one more rank of the same radix
                      select.  Pass 2 also gathers every negative at or above its 16-bit bucket
                      into a candidate buffer when pass 1's counts show they fit (the usual
                      case); one sort of the candidates by (above / tie, row, col) then takes the
                      N hardest, ties in (row, col) order: deterministic whatever the order the
                      atomics filled the buffer in.  After an overflow (decided on the device),
                      pass 3 counts per row the negatives above / at the boundary and pass 4
                      writes the pairs at slots given by prefix sums; otherwise their programs
                      return at once.  "random" maps the reference's randperm ranks to pairs.
    rank loss         positives: one pass over each row block's label range; selected
                      negatives: one gathered dot per pair.
    backward          positives recompute their tiles and multiply g into the rows (no atomics:
                      a program owns its rows); the selected negatives' contributions are sorted
                      by row and summed per row, then back through the normalisation.

Per call, forward: 2 norm kernels, 2 full tile passes over the pairs i < j (student and teacher
Gram tiles each), the 2 fallback selection kernels (return at once unless the candidates
overflowed; pass 3 is a full student+teacher pass when the critical ratio is requested),
1 positive pass, 1 selected-pairs kernel.  Backward: 1 positive pass, 1 per-row kernel.  Plus
small torch glue on B-, N-, candidate- and 65536-sized vectors (about a hundred tiny ops per
forward: at small B a CUDA graph, or fusing the glue into a selection kernel, is what removes
the launch cost); no host synchronisation except for negative_selection="random" (randperm
needs the number of negatives as a Python int).  fp32 dots run as "tf32x3" unless
EKD_TRITON_FP32_PRECISION=ieee.
Buffers: 2 + (2K + 1) histograms of 65536 int32, the candidate buffer (16 bytes a slot), B-sized
vectors, and in the backward an fp32 B x Ds gradient accumulator and label-sorted copies of the
embeddings.

The forward and backward are ``torch.library.custom_op``s with fake implementations and
autograd registered there, so ``torch.compile(fullgraph=True)`` traces through them.

fp64 inputs are rejected (use the reference backend for gradcheck): the kernels compute in fp32.
"""

import contextlib
import os
from typing import List, NamedTuple, Optional, Tuple

import torch

from ._autograd import first_order_only
from .config import EKDConfig, fpr_fraction
from .result import EKDResult, EKDStats

try:  # the module must import without triton: unavailable_reason then says why
    import triton
except ImportError:  # pragma: no cover - depends on the environment
    triton = None

#: Pair tile edge of every tile pass (equal rows and columns: pass 4 walks the same tiles as
#: passes 1-3, so a pair's similarity has the same bits in all of them).
TILE = 64
#: Feature chunk of the dots (GPU; the interpreter takes larger chunks: fewer, bigger numpy ops).
BLOCK_K = 32
INTERPRETER_BLOCK_K = 128
#: Feature chunk of the positive backward's g @ s_hat update.
BLOCK_D = 64
#: Pairs per program of the selected-pairs kernel.
BLOCK_PAIRS = 64
#: Rows per program of the norm kernel and of the backward's per-row kernel.
BLOCK_ROWS = 64
BACKWARD_BLOCK_ROWS = 16
#: The interpreter pays per program and per op, not per element: it takes bigger blocks.
INTERPRETER_BLOCK_PAIRS = 1024
INTERPRETER_BACKWARD_BLOCK_ROWS = 128
#: fp32 dots need fp32 accuracy (tau = 0.01 amplifies errors 100-fold): three-pass TF32 runs on
#: tensor cores; "ieee" is the slower exact fallback.  Plain "tf32" is not accurate enough.
FP32_DOT_PRECISION = os.environ.get("EKD_TRITON_FP32_PRECISION", "tf32x3")
NUM_BUCKETS = 1 << 16
#: Top-N candidate buffer: max(CANDIDATE_FACTOR * N, MIN_CANDIDATE_CAPACITY) slots.
CANDIDATE_FACTOR = 4
MIN_CANDIDATE_CAPACITY = 8192

_RANK_LOSS_CODES = {"soft_rank": 0, "eq7": 1, "eq8": 2}


# --------------------------------------------------------------------------- availability
def _interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


_kernels_module = None


def _kernels():
    """The kernels module, imported on first use: @triton.jit picks interpreter or native mode
    when the kernels are defined, so TRITON_INTERPRET only has to be set before the first call."""
    global _kernels_module
    if _kernels_module is None:
        from ._triton import kernels
        _kernels_module = kernels
    return _kernels_module


def _kernels_interpreted() -> Optional[bool]:
    """Whether the loaded kernels run under the interpreter (None: not loaded yet)."""
    if _kernels_module is None:
        return None
    return type(_kernels_module.coarse_histogram_kernel).__name__ == "InterpretedFunction"


def unavailable_reason(device: torch.device) -> Optional[str]:
    """None when the kernels can run on `device`, else why not."""
    device = torch.device(device)
    if triton is None:
        return "triton is not installed"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA GPU is visible"
        return None
    if device.type == "cpu":
        if not _interpreter_requested():
            return "CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter)"
        if _kernels_interpreted() is False:
            return ("the Triton kernels were loaded before TRITON_INTERPRET=1 was set; set it before the "
                    "first call of the triton backend")
        return None
    return f"the Triton kernels run on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), not on {device.type}"


def _block_k() -> int:
    return INTERPRETER_BLOCK_K if _kernels_interpreted() else BLOCK_K


def _block_pairs() -> int:
    return INTERPRETER_BLOCK_PAIRS if _kernels_interpreted() else BLOCK_PAIRS


def _backward_block_rows() -> int:
    return INTERPRETER_BACKWARD_BLOCK_ROWS if _kernels_interpreted() else BACKWARD_BLOCK_ROWS


def _dot_precision(x: torch.Tensor) -> str:
    """input_precision of the similarity dots of `x` (kernels.UPCAST_PRECISION: 16-bit tiles
    dotted in fp32, for the interpreter whose bf16 dot is wrong)."""
    if x.dtype == torch.float32:
        if FP32_DOT_PRECISION not in ("tf32x3", "ieee"):
            raise ValueError(f"EKD_TRITON_FP32_PRECISION must be 'tf32x3' or 'ieee' (plain tf32 is not accurate "
                             f"enough for tau = 0.01), got {FP32_DOT_PRECISION!r}")
        return FP32_DOT_PRECISION
    return "upcast_ieee" if _kernels_interpreted() else "ieee"


def _num_tiles(batch: int) -> int:
    return (batch + TILE - 1) // TILE


# --------------------------------------------------------------------------- torch glue (small)
def _sort_by_label(labels: torch.Tensor):
    """Label order (stable, so equal labels keep their original order), then _label_groups."""
    order = torch.sort(labels, stable=True).indices
    return (order,) + _label_groups(labels, order)


def _label_groups(labels: torch.Tensor, order: torch.Tensor):
    """The labels in `order` (int64) and, per sorted row, the column range
    [group_start, group_end) of its label."""
    sorted_labels = labels.index_select(0, order).to(torch.int64).contiguous()
    group_start = torch.searchsorted(sorted_labels, sorted_labels, right=False)
    group_end = torch.searchsorted(sorted_labels, sorted_labels, right=True)
    return sorted_labels, group_start, group_end


def _inverse_norms(x: torch.Tensor) -> torch.Tensor:
    batch, dim = x.shape
    inverse = torch.empty(batch, dtype=torch.float32, device=x.device)
    _kernels().inverse_norm_kernel[(triton.cdiv(batch, BLOCK_ROWS),)](
        x, inverse, batch, dim, BLOCK_R=BLOCK_ROWS, BLOCK_K=_block_k())
    return inverse


#: (fprs, device) -> int64 tensor [[numerators], [denominators]] of the FPRs (see _threshold_ranks).
_RANK_FRACTIONS = {}


def _threshold_ranks(num_negative: torch.Tensor, config: EKDConfig, num_pairs: int) -> torch.Tensor:
    """m_k = floor(L * fpr_k) on the device (exact rationals, as EKDConfig.threshold_indices).

    The rationals are copied to the device once per (fprs, device) and cached: a copy on every
    call would synchronise with the host and could not be captured in a CUDA graph.
    """
    fractions = [fpr_fraction(f) for f in config.fprs]
    if max(q.numerator for q in fractions) * num_pairs >= 2**63:
        raise ValueError(f"fprs={config.fprs}: L * numerator would overflow int64 at {num_pairs} pairs; use FPRs "
                         "with small rational forms (such as 1e-3) or the reference backend")
    key = (config.fprs, str(num_negative.device))
    if key not in _RANK_FRACTIONS:
        _RANK_FRACTIONS[key] = torch.tensor([[q.numerator for q in fractions], [q.denominator for q in fractions]],
                                            dtype=torch.int64, device=num_negative.device)
    numerators, denominators = _RANK_FRACTIONS[key]
    return num_negative * numerators // denominators


def _coarse_select(histograms: torch.Tensor, ranks: torch.Tensor):
    """Per model (row of `histograms`) and wanted descending rank (row of `ranks`): the bucket
    (top 16 key bits) holding it, its rank inside that bucket, and the number of elements in
    the buckets above."""
    cumulative = histograms.cumsum(1)
    bucket = torch.searchsorted(cumulative, ranks, right=True).clamp_(max=NUM_BUCKETS - 1)
    above = torch.where(bucket > 0, cumulative.gather(1, (bucket - 1).clamp(min=0)), 0)
    return bucket, ranks - above, above


def _fine_select(histograms: torch.Tensor, bucket: torch.Tensor, rank_in_bucket: torch.Tensor):
    """Exact keys from the per-target low-bit histograms (one row per target): the key, and the
    number of elements above it inside its bucket."""
    cumulative = histograms.cumsum(1)
    low = torch.searchsorted(cumulative, rank_in_bucket.unsqueeze(1), right=True).clamp_(max=NUM_BUCKETS - 1)
    above = torch.where(low > 0, cumulative.gather(1, (low - 1).clamp(min=0)), 0)
    return bucket * NUM_BUCKETS + low.squeeze(1), above.squeeze(1)


def _candidate_capacity(num_slots: int) -> int:
    """Size of the top-N candidate buffer: the N hardest negatives plus the rest of the
    boundary's 16-bit bucket must fit, else passes 3 and 4 run."""
    return max(CANDIDATE_FACTOR * num_slots, MIN_CANDIDATE_CAPACITY)


def _select_candidates(candidate_key: torch.Tensor, candidate_rows: torch.Tensor, candidate_cols: torch.Tensor,
                       boundary_key: torch.Tensor, num_selected: torch.Tensor, num_slots: int, batch: int):
    """The N hardest negatives among the candidates, as (rows, cols) of `num_slots` slots
    (row index `batch` marks an empty slot).

    All candidates above the boundary are taken, then ties in (row, col) order: one sort of
    (class, row, col), whose keys are unique, so the atomics' slot order does not matter.
    """
    rows, cols = candidate_rows.to(torch.int64), candidate_cols.to(torch.int64)
    kind = torch.where(candidate_key < boundary_key, 0, torch.where(candidate_key == boundary_key, 1, 2))
    kind = torch.where(rows < batch, kind, 3)
    order = torch.sort(kind * (batch + 1) ** 2 + rows * (batch + 1) + cols, stable=True).indices[:num_slots]
    filled = torch.arange(num_slots, device=rows.device) < num_selected
    return torch.where(filled, rows[order], batch), torch.where(filled, cols[order], batch)


def _key_to_float(key: torch.Tensor) -> torch.Tensor:
    """Inverse of kernels._descending_key, for int64 keys in [0, 2^32)."""
    bits = torch.where(key < 2**31, key ^ 0x7FFFFFFF, key)
    bits = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)
    return bits.view(torch.float32)


def _random_negative_pairs(labels: torch.Tensor, num_hard_negatives: int,
                           generator: Optional[torch.Generator]) -> torch.Tensor:
    """(2, n) original-index pairs (i < j) the reference's random selection draws.

    The reference takes ``randperm(L, generator)[:N]`` as ranks into the negative pairs in
    row-major order; here each rank becomes its pair without listing the pairs: the row from a
    prefix sum of per-row negative counts, the column by a binary search on the count of
    negatives in (i, j] (columns minus same-label columns, found in the label-sorted order).
    randperm needs L as a Python int: this is the one host synchronisation of the backend, and
    only this variant pays it.
    """
    if generator is None:
        raise ValueError('negative_selection="random" needs a torch.Generator (pass generator=...)')
    batch = labels.shape[0]
    device = labels.device
    order, _, group_start, group_end = _sort_by_label(labels)
    position = torch.empty_like(order)
    position[order] = torch.arange(batch, device=device)
    index = torch.arange(batch, device=device)
    same_label_after = (group_end - index - 1).index_select(0, position)  # per original row
    negatives_per_row = (batch - 1 - index) - same_label_after
    num_negative = int(negatives_per_row.sum())
    count = min(num_hard_negatives, num_negative)
    ranks = torch.randperm(num_negative, generator=generator, device=generator.device)[:count].to(device)

    row_end = negatives_per_row.cumsum(0)
    rows = torch.searchsorted(row_end, ranks, right=True)
    wanted = ranks - (row_end[rows] - negatives_per_row[rows]) + 1  # 1-based among the row's negatives
    # Sorted positions ordered by (group, original index): same-label columns <= j of row i are
    # searchsorted(composite, group_start_i * B + j) - position_i - 1.
    composite = group_start * batch + order
    row_position = position[rows]
    row_group_key = group_start[row_position] * batch

    def negatives_through(column):
        same = torch.searchsorted(composite, row_group_key + column, right=True) - row_position - 1
        return (column - rows) - same

    low, high = rows + 1, torch.full_like(rows, batch - 1)
    for _ in range(max(batch - 1, 1).bit_length() + 1):
        middle = (low + high) // 2
        enough = negatives_through(middle) >= wanted
        high = torch.where(enough, middle, high)
        low = torch.where(enough, low, middle + 1)
    return torch.stack([rows, low])


# --------------------------------------------------------------------------- forward stages
class _Prepared(NamedTuple):
    """The batch as the kernels read it: rows sorted by label, contiguous, with inverse norms."""

    s: torch.Tensor
    t: torch.Tensor
    s_inv: torch.Tensor
    t_inv: torch.Tensor
    labels: torch.Tensor       # sorted, int64
    group_start: torch.Tensor  # per sorted row: its label's column range [start, end)
    group_end: torch.Tensor
    order: torch.Tensor        # sorted row r is original row order[r]
    tile_options: dict         # constexprs of the tile kernels

    @property
    def batch(self) -> int:
        return self.s.shape[0]

    @property
    def tiles(self) -> int:
        return _num_tiles(self.batch)

    @property
    def models(self) -> tuple:
        """The leading arguments of every tile kernel."""
        return (self.s, self.t, self.s_inv, self.t_inv, self.labels, self.batch, self.s.shape[1], self.t.shape[1])


def _prepare(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> _Prepared:
    order, sorted_labels, group_start, group_end = _sort_by_label(labels)
    s = student.detach().index_select(0, order)  # contiguous, whatever the input strides
    t = teacher.detach().index_select(0, order)
    options = dict(TILE=TILE, BLOCK_K=_block_k(), S_PRECISION=_dot_precision(s), T_PRECISION=_dot_precision(t))
    return _Prepared(s, t, _inverse_norms(s), _inverse_norms(t), sorted_labels, group_start, group_end, order,
                     options)


class _Selection(NamedTuple):
    """What the radix select found (all on the device)."""

    num_negative: torch.Tensor    # L
    batch_student: torch.Tensor   # K batch thresholds, NaN when L = 0
    batch_teacher: torch.Tensor
    num_selected: torch.Tensor    # min(N, L)
    selection_state: torch.Tensor  # (overflow, N taken, number above the boundary, boundary key)
    candidates: tuple             # (key, row, col) buffers, filled when there was no overflow


def _radix_select(prepared: _Prepared, config: EKDConfig, hardest: bool, num_slots: int) -> _Selection:
    """Passes 1 and 2: the K batch thresholds of each model and the top-N boundary, exactly."""
    kernels = _kernels()
    device = prepared.s.device
    num_thresholds = config.num_thresholds

    # Pass 1: histograms of the top 16 key bits.
    coarse = torch.zeros((2, NUM_BUCKETS), dtype=torch.int32, device=device)
    kernels.coarse_histogram_kernel[(prepared.tiles, prepared.tiles)](
        *prepared.models, coarse[0], coarse[1], **prepared.tile_options)
    num_negative = coarse[0].sum(dtype=torch.int64)
    num_selected = num_negative.clamp(max=config.num_hard_negatives)
    # Wanted ranks, one row per model: the K thresholds, plus (hardest) the N-th hardest student
    # negative, whose teacher twin is a padding copy of the first threshold's rank.
    ranks = _threshold_ranks(num_negative, config, prepared.batch * (prepared.batch - 1) // 2).expand(2, -1)
    if hardest:
        ranks = torch.cat([ranks, torch.stack([num_selected - 1, ranks[0, 0]]).view(2, 1)], dim=1)
    ranks = torch.minimum(ranks, num_negative - 1).clamp(min=0).contiguous()
    bucket, rank_in_bucket, above = _coarse_select(coarse, ranks)
    num_targets = ranks.shape[1]

    # The top-N candidates (every negative at or above the boundary's bucket) are gathered by
    # pass 2 when pass 1's counts say they fit; else passes 3 and 4 select (decided on device).
    capacity = _candidate_capacity(num_slots) if hardest else 0
    if hardest:
        # gather, not coarse[0][bucket[0, -1]]: indexing by a 0-dim tensor calls .item() (a host sync).
        overflow = above[0, -1] + coarse[0].gather(0, bucket[0, -1:])[0] > capacity
    else:
        overflow = torch.zeros((), dtype=torch.bool, device=device)
    candidate_count = torch.zeros(1, dtype=torch.int32, device=device)
    # At least N slots, so that the selection below always has N to take (empty ones included),
    # and never a zero-size (null) pointer argument.
    buffer_size = max(capacity, num_slots, 1)
    candidates = (torch.full((buffer_size,), 2**32, dtype=torch.int64, device=device),
                  torch.full((buffer_size,), prepared.batch, dtype=torch.int32, device=device),
                  torch.full((buffer_size,), prepared.batch, dtype=torch.int32, device=device))

    # Pass 2: histograms of the low 16 bits inside each wanted bucket -> exact keys.
    fine = torch.zeros((2, num_targets, NUM_BUCKETS), dtype=torch.int32, device=device)
    bucket32 = bucket.to(torch.int32)
    kernels.fine_histogram_kernel[(prepared.tiles, prepared.tiles)](
        *prepared.models, bucket32[0], num_targets, bucket32[1], num_thresholds, fine[0], fine[1],
        overflow.to(torch.int64).view(1), candidate_count, *candidates, capacity,
        COLLECT=hardest, **prepared.tile_options)
    keys, above_in_bucket = _fine_select(fine.view(2 * num_targets, NUM_BUCKETS), bucket.view(-1),
                                         rank_in_bucket.view(-1))
    keys, above_in_bucket = keys.view(2, num_targets), above_in_bucket.view(2, num_targets)

    batch_thresholds = torch.where(num_negative > 0, _key_to_float(keys[:, :num_thresholds]), float("nan"))
    num_greater = torch.minimum(above[0, -1] + above_in_bucket[0, -1], num_selected)
    selection_state = torch.stack([overflow.to(torch.int64), num_selected, num_greater, keys[0, -1]])
    return _Selection(num_negative, batch_thresholds[0], batch_thresholds[1], num_selected, selection_state,
                      candidates)


def _ema_update(previous: torch.Tensor, batch_thresholds: torch.Tensor, momentum: float,
                valid: torch.Tensor) -> torch.Tensor:
    """reference.ema_update: same operation order, torch.where instead of a host branch."""
    updated = momentum * batch_thresholds.to(previous.dtype) + (1 - momentum) * previous
    return torch.where(valid, updated, previous)


def _boundary_and_critical_counts(prepared: _Prepared, selection: _Selection, thresholds_used: torch.Tensor,
                                  config: EKDConfig, hardest: bool):
    """Pass 3: per-row counts at the top-N boundary (after an overflow only) and, on request,
    the critical pairs among all pairs."""
    device = prepared.s.device
    critical_all = torch.zeros(1, dtype=torch.int64, device=device)
    row_greater = torch.zeros(prepared.batch if hardest else 1, dtype=torch.int32, device=device)
    row_equal = torch.zeros_like(row_greater)
    if hardest or config.compute_critical_ratio:
        _kernels().boundary_count_kernel[(prepared.tiles, prepared.tiles)](
            *prepared.models, selection.selection_state, row_greater, row_equal, thresholds_used[0],
            thresholds_used[1], config.num_thresholds, critical_all,
            COUNT_HARD=hardest, COUNT_CRITICAL=config.compute_critical_ratio, **prepared.tile_options)
    return row_greater, row_equal, critical_all[0]


def _hardest_negatives(prepared: _Prepared, selection: _Selection, row_greater: torch.Tensor,
                       row_equal: torch.Tensor, num_slots: int):
    """(rows, cols) of the N hardest negatives: from the candidates, or after an overflow from
    pass 4, which writes them from recomputed tiles (its programs return at once otherwise)."""
    batch = prepared.batch
    device = prepared.s.device
    from_candidates = _select_candidates(*selection.candidates, selection.selection_state[3],
                                         selection.num_selected, num_slots, batch)
    written_rows = torch.full((num_slots,), batch, dtype=torch.int32, device=device)
    written_cols = torch.full((num_slots,), batch, dtype=torch.int32, device=device)
    greater_offset = (row_greater.cumsum(0) - row_greater).to(torch.int32)
    equal_offset = (row_equal.cumsum(0) - row_equal).to(torch.int32)
    _kernels().hard_negative_write_kernel[(prepared.tiles,)](
        prepared.s, prepared.s_inv, prepared.labels, batch, prepared.s.shape[1], selection.selection_state,
        row_greater, row_equal, greater_offset, equal_offset, written_rows, written_cols,
        TILE=TILE, BLOCK_K=_block_k(), S_PRECISION=prepared.tile_options["S_PRECISION"])
    overflow = selection.selection_state[0] != 0
    return (torch.where(overflow, written_rows.to(torch.int64), from_candidates[0]),
            torch.where(overflow, written_cols.to(torch.int64), from_candidates[1]))


def _selected_pair_terms(prepared: _Prepared, rows: torch.Tensor, cols: torch.Tensor,
                         thresholds_used: torch.Tensor, config: EKDConfig):
    """Per selected pair: (loss, d loss / d a, critical); zeros in empty slots."""
    num_slots = rows.numel()
    device = prepared.s.device
    loss = torch.zeros(num_slots, dtype=torch.float32, device=device)
    loss_grad = torch.zeros(num_slots, dtype=torch.float32, device=device)
    critical = torch.zeros(num_slots, dtype=torch.int32, device=device)
    if num_slots > 0:
        block_pairs = _block_pairs()
        _kernels().selected_pairs_kernel[(triton.cdiv(num_slots, block_pairs),)](
            prepared.s, prepared.t, prepared.s_inv, prepared.t_inv, prepared.batch, prepared.s.shape[1],
            prepared.t.shape[1], rows, cols, num_slots, thresholds_used[0], thresholds_used[1],
            config.num_thresholds, config.temperature, loss, loss_grad, critical,
            RANK_LOSS=_RANK_LOSS_CODES[config.rank_loss], BLOCK_P=block_pairs, BLOCK_K=_block_k())
    return loss, loss_grad, critical.bool()


def _positive_sums(prepared: _Prepared, thresholds_used: torch.Tensor, config: EKDConfig):
    """(sum of the counted positives' loss, number of critical positives)."""
    device = prepared.s.device
    partial_loss = torch.empty(prepared.tiles, dtype=torch.float32, device=device)
    partial_critical = torch.empty(prepared.tiles, dtype=torch.int64, device=device)
    _kernels().positive_forward_kernel[(prepared.tiles,)](
        *prepared.models[:5], prepared.group_end, *prepared.models[5:], thresholds_used[0], thresholds_used[1],
        config.num_thresholds, config.temperature, partial_loss, partial_critical,
        RANK_LOSS=_RANK_LOSS_CODES[config.rank_loss], CRITICAL_ONLY=config.critical_only,
        **prepared.tile_options)
    return partial_loss.sum(), partial_critical.sum()  # fixed-order sums: deterministic


def _mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """total / count, 0 when count is 0 (a term with no pair)."""
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def _forward_impl(student, teacher, labels, student_thresholds, teacher_thresholds, random_pairs,
                  config: EKDConfig, update_thresholds: bool):
    _kernels()  # defined first: the block sizes depend on interpreter or native mode
    device = student.device
    batch = student.shape[0]
    num_pairs = batch * (batch - 1) // 2
    hardest = random_pairs is None and config.num_hard_negatives > 0
    num_slots = min(config.num_hard_negatives, num_pairs) if hardest else 0

    prepared = _prepare(student, teacher, labels)
    finite = torch.isfinite(student).all() & torch.isfinite(teacher).all()
    num_positive = (prepared.group_end - torch.arange(batch, device=device) - 1).sum()

    # Thresholds: radix select, then the EMA update (the loss uses the updated state).
    selection = _radix_select(prepared, config, hardest, num_slots)
    valid = finite & (selection.num_negative > 0)
    if not update_thresholds:
        valid = torch.zeros_like(valid)
    new_student = _ema_update(student_thresholds, selection.batch_student, config.momentum, valid)
    new_teacher = _ema_update(teacher_thresholds, selection.batch_teacher, config.momentum, valid)
    thresholds_used = torch.stack([new_student, new_teacher]).to(torch.float32).contiguous()

    # Negative pairs distilled.
    row_greater, row_equal, critical_all = _boundary_and_critical_counts(
        prepared, selection, thresholds_used, config, hardest)
    if hardest:
        rows, cols = _hardest_negatives(prepared, selection, row_greater, row_equal, num_slots)
    elif random_pairs is not None:
        position = torch.empty_like(prepared.order)
        position[prepared.order] = torch.arange(batch, device=device)
        rows, cols = position[random_pairs[0]], position[random_pairs[1]]
    else:
        rows = torch.empty(0, dtype=torch.int64, device=device)
        cols = torch.empty(0, dtype=torch.int64, device=device)  # not `rows`: outputs must not alias

    # The two terms.
    selected_loss, selected_loss_grad, selected_critical = _selected_pair_terms(
        prepared, rows, cols, thresholds_used, config)
    filled = rows < batch
    counted = selected_critical if config.critical_only else filled
    negative_count = counted.sum()
    negative_term = _mean((selected_loss * counted).sum(), negative_count)
    positive_sum, critical_positive = _positive_sums(prepared, thresholds_used, config)
    positive_count = critical_positive if config.critical_only else num_positive
    positive_term = _mean(positive_sum, positive_count)
    loss = config.positive_weight * positive_term + config.negative_weight * negative_term
    # A non-finite batch reads as NaN, whatever the clamps made of it (as the reference).
    loss = torch.where(finite, loss, torch.full_like(loss, float("nan")))

    # What the backward needs: d loss / d a per pair, up to the incoming gradient.
    one = torch.ones((), device=device)
    positive_coefficient = config.positive_weight * _mean(one, positive_count)
    selected_coefficient = config.negative_weight * _mean(one, negative_count) * selected_loss_grad * counted
    # A non-finite batch must give a non-finite gradient too (as the reference), so that a gradient
    # scaler skips the step: the kernels' clamps (max/min drop NaN) turn a NaN teacher into finite terms.
    positive_coefficient = torch.where(finite, positive_coefficient, float("nan"))
    selected_coefficient = torch.where(finite, selected_coefficient, float("nan"))

    state_dtype = student_thresholds.dtype
    counts = torch.stack([num_positive, selection.num_negative, filled.sum(),
                          critical_positive + selected_critical.sum(dtype=torch.int64), critical_all])
    critical_ratio = critical_all.to(torch.float32) / num_pairs
    terms = torch.stack([positive_term, negative_term, critical_ratio]).to(torch.float32)
    # copy=True: the two batch threshold rows are views of one tensor, and outputs must not alias.
    return (loss.to(torch.float32), new_student, new_teacher, selection.batch_student.to(state_dtype, copy=True),
            selection.batch_teacher.to(state_dtype, copy=True), counts, terms, prepared.order, prepared.s_inv,
            prepared.t_inv, thresholds_used, positive_coefficient.to(torch.float32), rows, cols,
            selected_coefficient.to(torch.float32))


# --------------------------------------------------------------------------- forward op
def _on_device(device: torch.device):
    """Triton launches on the *current* CUDA device: tensors on cuda:1 while cuda:0 is current
    (a process that never called torch.cuda.set_device) would be handed to another GPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _config_from(fprs, temperature, num_hard_negatives, momentum, positive_weight, negative_weight,
                 critical_only, rank_loss, compute_critical_ratio) -> EKDConfig:
    return EKDConfig(fprs=tuple(fprs), temperature=temperature, num_hard_negatives=num_hard_negatives,
                     momentum=momentum, positive_weight=positive_weight, negative_weight=negative_weight,
                     critical_only=critical_only, rank_loss=rank_loss, compute_critical_ratio=compute_critical_ratio)


_ForwardOutputs = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                        torch.Tensor, torch.Tensor, torch.Tensor]


@torch.library.custom_op("ekd_kernels::triton_ekd_forward", mutates_args=())
def _forward_op(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                student_thresholds: torch.Tensor, teacher_thresholds: torch.Tensor,
                random_pairs: Optional[torch.Tensor], fprs: List[float], temperature: float,
                num_hard_negatives: int, momentum: float, positive_weight: float, negative_weight: float,
                critical_only: bool, rank_loss: str, compute_critical_ratio: bool,
                update_thresholds: bool) -> _ForwardOutputs:
    """EKD forward.  Outputs: loss, new student/teacher thresholds, batch student/teacher
    thresholds, counts (positive, negative, selected, critical among selected, critical among
    all), terms (positive, negative, critical ratio), then what the backward needs."""
    config = _config_from(fprs, temperature, num_hard_negatives, momentum, positive_weight, negative_weight,
                          critical_only, rank_loss, compute_critical_ratio)
    with _on_device(student.device):
        return _forward_impl(student, teacher, labels, student_thresholds, teacher_thresholds, random_pairs,
                             config, update_thresholds)


@_forward_op.register_fake
def _forward_fake(student, teacher, labels, student_thresholds, teacher_thresholds, random_pairs, fprs,
                  temperature, num_hard_negatives, momentum, positive_weight, negative_weight, critical_only,
                  rank_loss, compute_critical_ratio, update_thresholds):
    batch = student.shape[0]
    if random_pairs is not None:
        num_slots = random_pairs.shape[1]
    else:
        num_slots = torch.sym_min(num_hard_negatives, batch * (batch - 1) // 2)
    f32, i64 = torch.float32, torch.int64
    new = student_thresholds.new_empty

    def empty(shape, dtype):
        return student.new_empty(shape, dtype=dtype)

    return (empty((), f32), new(student_thresholds.shape), new(student_thresholds.shape),
            new(student_thresholds.shape), new(student_thresholds.shape), empty((5,), i64), empty((3,), f32),
            empty((batch,), i64), empty((batch,), f32), empty((batch,), f32),
            empty((2, len(fprs)), f32), empty((), f32), empty((num_slots,), i64), empty((num_slots,), i64),
            empty((num_slots,), f32))


# --------------------------------------------------------------------------- backward op
@torch.library.custom_op("ekd_kernels::triton_ekd_backward", mutates_args=())
def _backward_op(grad_loss: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                 order: torch.Tensor, s_inv: torch.Tensor, t_inv: torch.Tensor, thresholds_used: torch.Tensor,
                 positive_coefficient: torch.Tensor, selected_rows: torch.Tensor, selected_cols: torch.Tensor,
                 selected_coefficient: torch.Tensor, temperature: float, critical_only: bool,
                 rank_loss: str) -> torch.Tensor:
    """d loss / d student (in the student's dtype and shape, contiguous)."""
    with _on_device(student.device):
        return _backward_impl(grad_loss, student, teacher, labels, order, s_inv, t_inv, thresholds_used,
                              positive_coefficient, selected_rows, selected_cols, selected_coefficient, temperature,
                              critical_only, rank_loss)


def _backward_impl(grad_loss, student, teacher, labels, order, s_inv, t_inv, thresholds_used, positive_coefficient,
                   selected_rows, selected_cols, selected_coefficient, temperature, critical_only, rank_loss):
    kernels = _kernels()
    device = student.device
    batch, dim_s = student.shape
    dim_t = teacher.shape[1]
    sorted_labels, group_start, group_end = _label_groups(labels, order)
    s = student.detach().index_select(0, order)
    t = teacher.detach().index_select(0, order)
    grad_loss = grad_loss.to(torch.float32)

    # Positive pairs: recomputed tiles, g multiplied into each row block's own rows.
    grad_hat = torch.zeros((batch, dim_s), dtype=torch.float32, device=device)
    coefficient = (grad_loss * positive_coefficient).reshape(1)
    kernels.positive_backward_kernel[(_num_tiles(batch),)](
        s, t, s_inv, t_inv, sorted_labels, group_start, group_end, batch, dim_s, dim_t,
        thresholds_used[0], thresholds_used[1], thresholds_used.shape[1], temperature, coefficient, grad_hat,
        RANK_LOSS=_RANK_LOSS_CODES[rank_loss], CRITICAL_ONLY=critical_only, TILE=TILE, BLOCK_K=_block_k(),
        BLOCK_D=BLOCK_D, S_PRECISION=_dot_precision(student), T_PRECISION=_dot_precision(teacher),
        G_PRECISION=FP32_DOT_PRECISION)

    # Selected negatives, summed per row in a fixed order, then back through the normalisation.
    segment_start, segment_end, others, coefficients = _entries_by_row(
        selected_rows, selected_cols, grad_loss * selected_coefficient, batch)
    grad = torch.empty((batch, dim_s), dtype=student.dtype, device=device)
    block_rows = _backward_block_rows()
    kernels.backward_rows_kernel[(triton.cdiv(batch, block_rows),)](
        s, s_inv, grad_hat, order, segment_start, segment_end, others, coefficients, grad, batch, dim_s,
        BLOCK_R=block_rows, BLOCK_D=triton.next_power_of_2(dim_s))
    return grad


def _entries_by_row(rows: torch.Tensor, cols: torch.Tensor, coefficients: torch.Tensor, batch: int):
    """Both directions of each selected pair, sorted by (row, other): per row its segment
    [start, end) of (other, coefficient) entries.  The sort fixes the summation order, which
    makes the gradient bitwise reproducible without float atomics."""
    if rows.numel() == 0:  # one empty-slot entry: no zero-size (null) pointer for the kernel
        rows = cols = torch.full((1,), batch, dtype=torch.int64, device=rows.device)
        coefficients = torch.zeros(1, dtype=torch.float32, device=rows.device)
    entry_rows = torch.cat([rows, cols])
    entry_others = torch.cat([cols, rows])
    entry_order = torch.sort(entry_rows * (batch + 1) + entry_others, stable=True).indices
    entry_rows = entry_rows[entry_order].contiguous()
    row_index = torch.arange(batch, device=rows.device, dtype=entry_rows.dtype)
    return (torch.searchsorted(entry_rows, row_index, right=False),
            torch.searchsorted(entry_rows, row_index, right=True),
            entry_others[entry_order].contiguous(),
            coefficients.repeat(2)[entry_order].contiguous())


@_backward_op.register_fake
def _backward_fake(grad_loss, student, *args):
    return torch.empty(student.shape, dtype=student.dtype, device=student.device)


# --------------------------------------------------------------------------- autograd
_FORWARD_INPUTS = 16
_SAVED_OUTPUTS = slice(7, 15)


def _setup_context(ctx, inputs, output):
    student, teacher, labels = inputs[:3]
    ctx.save_for_backward(student, teacher, labels, *output[_SAVED_OUTPUTS])
    ctx.temperature = inputs[7]
    ctx.critical_only = inputs[12]
    ctx.rank_loss = inputs[13]


@first_order_only("triton")
def _backward(ctx, grad_loss, *unused_grads):
    student, teacher, labels, *saved = ctx.saved_tensors
    grad_student = None
    if ctx.needs_input_grad[0]:
        if grad_loss is None:
            grad_loss = torch.zeros((), dtype=torch.float32, device=student.device)
        grad_student = _backward_op(grad_loss, student, teacher, labels, *saved, ctx.temperature,
                                    ctx.critical_only, ctx.rank_loss)
    return (grad_student,) + (None,) * (_FORWARD_INPUTS - 1)


torch.library.register_autograd("ekd_kernels::triton_ekd_forward", _backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- entry point
def _check_dtypes(student: torch.Tensor, teacher: torch.Tensor) -> None:
    for name, x in (("student", student), ("teacher", teacher)):
        if x.dtype == torch.float64:
            raise TypeError(
                f"the triton EKD backend computes in fp32 and does not take float64 {name} embeddings; "
                "use backend='reference' for float64 (e.g. gradcheck), or pass float32/bfloat16/float16")


def ekd_forward(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                student_thresholds: torch.Tensor, teacher_thresholds: torch.Tensor, config: EKDConfig,
                update_thresholds: bool = True, generator: Optional[torch.Generator] = None) -> EKDResult:
    """EKD with the semantics of ``reference.ekd_reference`` (inputs already validated)."""
    _check_dtypes(student, teacher)
    random_pairs = None
    if config.negative_selection == "random":
        random_pairs = _random_negative_pairs(labels, config.num_hard_negatives, generator)
    outputs = _forward_op(student, teacher.detach(), labels, student_thresholds, teacher_thresholds, random_pairs,
                          list(config.fprs), config.temperature, config.num_hard_negatives, config.momentum,
                          config.positive_weight, config.negative_weight, config.critical_only, config.rank_loss,
                          config.compute_critical_ratio, bool(update_thresholds))
    loss, new_student, new_teacher, batch_student, batch_teacher, counts, terms = outputs[:7]
    stats = EKDStats.from_counts(batch_student, batch_teacher, new_student, new_teacher, counts, terms,
                                 terms[2] if config.compute_critical_ratio else None)
    return EKDResult(loss, new_student.detach(), new_teacher.detach(), stats.detach())
