"""The Triton kernels of the fused EKD backend, stage by stage (see ekd_kernels/triton_ekd.py).

Layout every kernel assumes: the rows of the student and teacher embeddings are sorted by label
and contiguous (the launcher gathers them once), so the positive pairs of a row are one
contiguous column range, and pairs (i, j), i < j, of the sorted order are the unordered pairs
of the batch, each once.  Similarities are never stored: every pass recomputes its tiles from
the raw rows and their inverse norms.

Stages and kernels:
    normalise            inverse_norm_kernel
    similarity tiles     _similarity_tile (shared by every tile pass)
    threshold selection  coarse_histogram_kernel, fine_histogram_kernel (radix select, 2 x 16 bits)
    pair selection       fine_histogram_kernel also gathers the top-N candidates; after a
                         candidate-buffer overflow, boundary_count_kernel and
                         hard_negative_write_kernel select from recomputed tiles instead;
                         boundary_count_kernel also counts the critical pairs among all pairs
    rank loss            positive_forward_kernel, selected_pairs_kernel (shared _pair_loss)
    backward             positive_backward_kernel, backward_rows_kernel
"""

import triton
import triton.language as tl

#: Row-norm floor, as F.normalize (reference.NORM_EPS).
NORM_EPS: tl.constexpr = tl.constexpr(1e-12)
#: The sigmoid's argument is clamped to [-50, 50] (reference.SIGMOID_CLAMP).
SIGMOID_CLAMP: tl.constexpr = tl.constexpr(50.0)
#: Radix digit: the 32-bit keys are selected 16 bits at a time, in two passes.
RADIX_BITS: tl.constexpr = tl.constexpr(16)
NUM_BUCKETS: tl.constexpr = tl.constexpr(65536)

#: PRECISION value that makes _similarity_tile upcast 16-bit tiles to fp32 before the dot.
UPCAST_PRECISION: tl.constexpr = tl.constexpr("upcast_ieee")

# rank_loss codes (constexpr): soft_rank, eq7, eq8.
SOFT_RANK: tl.constexpr = tl.constexpr(0)
EQ7: tl.constexpr = tl.constexpr(1)
EQ8: tl.constexpr = tl.constexpr(2)


# --------------------------------------------------------------------------- stage 1: normalise
@triton.jit
def inverse_norm_kernel(x_ptr, inv_norm_ptr, batch, dim, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """1 / max(||x_i||, eps) per row, in fp32: the tiles scale raw dots by it instead of
    reading a normalised copy."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < batch
    row_offset = rows.to(tl.int64) * dim
    squares = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, dim, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row_offset[:, None] + ks[None, :], mask=row_mask[:, None] & (ks < dim)[None, :],
                    other=0.0).to(tl.float32)
        squares += tl.sum(x * x, axis=1)
    norm = tl.maximum(tl.sqrt_rn(squares), NORM_EPS)
    tl.store(inv_norm_ptr + rows, tl.div_rn(tl.full((BLOCK_R,), 1.0, tl.float32), norm), mask=row_mask)


# --------------------------------------------------------------------------- stage 2: tiles
@triton.jit
def _similarity_tile(x_ptr, inv_norm_ptr, rows, cols, row_mask, col_mask, dim,
                     TILE: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """<x_hat_i, x_hat_j> for a TILE x TILE block of pairs of one model.

    Raw rows in their own dtype (bf16/fp16 use their tensor-core dot), fp32 accumulation,
    fp32 inputs at PRECISION ("ieee" or "tf32x3", never plain tf32).  UPCAST_PRECISION dots
    bf16/fp16 tiles in fp32 (exact products, as the tensor-core dot): the interpreter's bf16
    dot is wrong (it multiplies the raw 16-bit patterns).  Every tile pass calls
    this with the same tile alignment, so a pair's similarity is the same bits in every pass:
    the radix selection finds in pass 2 exactly the keys it counted in pass 1.
    """
    acc = tl.zeros((TILE, TILE), dtype=tl.float32)
    row_offset = rows.to(tl.int64) * dim
    col_offset = cols.to(tl.int64) * dim
    for k0 in range(0, dim, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < dim
        left = tl.load(x_ptr + row_offset[:, None] + ks[None, :], mask=row_mask[:, None] & k_mask[None, :],
                       other=0.0)
        right = tl.load(x_ptr + col_offset[None, :] + ks[:, None], mask=k_mask[:, None] & col_mask[None, :],
                        other=0.0)
        if PRECISION == UPCAST_PRECISION:
            acc = tl.dot(left.to(tl.float32), right.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(left, right, acc, input_precision=PRECISION)
    inv_i = tl.load(inv_norm_ptr + rows, mask=row_mask, other=0.0)
    inv_j = tl.load(inv_norm_ptr + cols, mask=col_mask, other=0.0)
    return acc * inv_i[:, None] * inv_j[None, :]


@triton.jit
def _descending_key(x):
    """uint32 key of a float32 whose ascending order is the floats' descending order.

    The usual order-preserving map (flip the sign bit of x >= 0, all bits of x < 0), inverted,
    so that key 0 is the largest similarity and a histogram's prefix sum counts from the top.
    """
    bits = x.to(tl.uint32, bitcast=True)
    flip = tl.where((bits >> 31) == 1, 0, 0x7FFFFFFF).to(tl.uint32)
    return bits ^ flip


@triton.jit
def _tile_indices(pid_m, pid_n, batch, TILE: tl.constexpr):
    """Rows and columns of the (pid_m, pid_n) tile of the pair matrix, and which lie in the batch."""
    rows = pid_m * TILE + tl.arange(0, TILE)
    cols = pid_n * TILE + tl.arange(0, TILE)
    return rows, cols, rows < batch, cols < batch


@triton.jit
def _pair_masks(labels_ptr, rows, cols, row_mask, col_mask):
    """(upper, negative): pairs i < j inside the batch, and those of different labels."""
    label_i = tl.load(labels_ptr + rows, mask=row_mask, other=0)
    label_j = tl.load(labels_ptr + cols, mask=col_mask, other=0)
    upper = (cols[None, :] > rows[:, None]) & row_mask[:, None] & col_mask[None, :]
    return upper, upper & (label_i[:, None] != label_j[None, :])


# --------------------------------------------------------------------------- stage 3: thresholds
@triton.jit
def coarse_histogram_kernel(s_ptr, t_ptr, s_inv_ptr, t_inv_ptr, labels_ptr, batch, dim_s, dim_t,
                            hist_s_ptr, hist_t_ptr,
                            TILE: tl.constexpr, BLOCK_K: tl.constexpr,
                            S_PRECISION: tl.constexpr, T_PRECISION: tl.constexpr):
    """Pass 1 of the radix select: histograms of the top 16 key bits of every negative pair's
    student and teacher similarity.  Integer atomics: the counts are exact and deterministic."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_n < pid_m:  # lower-triangle tiles hold no pair i < j
        return
    rows, cols, row_mask, col_mask = _tile_indices(pid_m, pid_n, batch, TILE)
    _, negative = _pair_masks(labels_ptr, rows, cols, row_mask, col_mask)
    a = _similarity_tile(s_ptr, s_inv_ptr, rows, cols, row_mask, col_mask, dim_s, TILE, BLOCK_K, S_PRECISION)
    b = _similarity_tile(t_ptr, t_inv_ptr, rows, cols, row_mask, col_mask, dim_t, TILE, BLOCK_K, T_PRECISION)
    bucket_a = (_descending_key(a) >> RADIX_BITS).to(tl.int32)
    bucket_b = (_descending_key(b) >> RADIX_BITS).to(tl.int32)
    tl.atomic_add(hist_s_ptr + bucket_a, 1, mask=negative, sem="relaxed")
    tl.atomic_add(hist_t_ptr + bucket_b, 1, mask=negative, sem="relaxed")


@triton.jit
def _fine_histograms(hist_ptr, target_bucket_ptr, num_targets, key, negative):
    """For each target rank: histogram of the low 16 key bits of the elements in its bucket."""
    high = (key >> RADIX_BITS).to(tl.int32)
    low = (key & 0xFFFF).to(tl.int32)
    for target in range(num_targets):
        bucket = tl.load(target_bucket_ptr + target)
        tl.atomic_add(hist_ptr + target * NUM_BUCKETS + low, 1, mask=negative & (high == bucket), sem="relaxed")


@triton.jit
def _collect_candidates(key, rows, cols, negative, boundary_bucket, candidate_count_ptr, candidate_key_ptr,
                        candidate_rows_ptr, candidate_cols_ptr, capacity, TILE: tl.constexpr):
    """Append the tile's negatives at or above the top-N boundary bucket to the candidate buffer.

    Slots come from one integer atomic per tile, so their order varies from run to run; the
    launcher sorts the candidates by (key, row, col), which makes the selection deterministic.
    Called only when pass 1 showed that every candidate fits in `capacity`.
    """
    wanted = negative & ((key >> RADIX_BITS).to(tl.int32) <= boundary_bucket)
    flat_wanted = tl.reshape(wanted.to(tl.int32), (TILE * TILE,))
    base = tl.atomic_add(candidate_count_ptr, tl.sum(flat_wanted, axis=0), sem="relaxed")
    slot = base + tl.cumsum(flat_wanted, axis=0) - flat_wanted
    write = (flat_wanted != 0) & (slot < capacity)
    tl.store(candidate_key_ptr + slot, tl.reshape(key, (TILE * TILE,)).to(tl.int64), mask=write)
    tl.store(candidate_rows_ptr + slot, tl.reshape(tl.broadcast_to(rows[:, None], (TILE, TILE)), (TILE * TILE,)),
             mask=write)
    tl.store(candidate_cols_ptr + slot, tl.reshape(tl.broadcast_to(cols[None, :], (TILE, TILE)), (TILE * TILE,)),
             mask=write)


@triton.jit
def fine_histogram_kernel(s_ptr, t_ptr, s_inv_ptr, t_inv_ptr, labels_ptr, batch, dim_s, dim_t,
                          s_bucket_ptr, num_s_targets, t_bucket_ptr, num_t_targets, fine_s_ptr, fine_t_ptr,
                          selection_state_ptr, candidate_count_ptr, candidate_key_ptr, candidate_rows_ptr,
                          candidate_cols_ptr, capacity,
                          COLLECT: tl.constexpr, TILE: tl.constexpr, BLOCK_K: tl.constexpr,
                          S_PRECISION: tl.constexpr, T_PRECISION: tl.constexpr):
    """Pass 2 of the radix select: recompute the tiles, refine inside each wanted bucket.
    After it, every wanted order statistic is known to the bit (32 = 16 + 16).

    With COLLECT (hardest negatives), it also gathers the top-N candidates when they fit the
    buffer (selection_state[0] == 0: no overflow), which makes passes 3 and 4 unnecessary.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_n < pid_m:
        return
    rows, cols, row_mask, col_mask = _tile_indices(pid_m, pid_n, batch, TILE)
    _, negative = _pair_masks(labels_ptr, rows, cols, row_mask, col_mask)
    a = _similarity_tile(s_ptr, s_inv_ptr, rows, cols, row_mask, col_mask, dim_s, TILE, BLOCK_K, S_PRECISION)
    key_a = _descending_key(a)
    _fine_histograms(fine_s_ptr, s_bucket_ptr, num_s_targets, key_a, negative)
    if COLLECT:
        if tl.load(selection_state_ptr) == 0:
            boundary_bucket = tl.load(s_bucket_ptr + num_s_targets - 1)
            _collect_candidates(key_a, rows, cols, negative, boundary_bucket, candidate_count_ptr,
                                candidate_key_ptr, candidate_rows_ptr, candidate_cols_ptr, capacity, TILE)
    b = _similarity_tile(t_ptr, t_inv_ptr, rows, cols, row_mask, col_mask, dim_t, TILE, BLOCK_K, T_PRECISION)
    _fine_histograms(fine_t_ptr, t_bucket_ptr, num_t_targets, _descending_key(b), negative)


# --------------------------------------------------------------------------- stage 4: selection
@triton.jit
def _is_critical(a, b, st_ptr, tt_ptr, num_thresholds):
    """Eq. 5: 1(b > t_k(T)) != 1(a > t_k(S)) for some k (elementwise)."""
    critical = tl.zeros_like(a) != 0.0
    for k in range(num_thresholds):
        critical = critical | ((a > tl.load(st_ptr + k)) != (b > tl.load(tt_ptr + k)))
    return critical


@triton.jit
def boundary_count_kernel(s_ptr, t_ptr, s_inv_ptr, t_inv_ptr, labels_ptr, batch, dim_s, dim_t,
                          selection_state_ptr, row_greater_ptr, row_equal_ptr,
                          st_ptr, tt_ptr, num_thresholds, critical_count_ptr,
                          COUNT_HARD: tl.constexpr, COUNT_CRITICAL: tl.constexpr,
                          TILE: tl.constexpr, BLOCK_K: tl.constexpr,
                          S_PRECISION: tl.constexpr, T_PRECISION: tl.constexpr):
    """Pass 3: on request, the number of critical pairs among all pairs (the critical ratio);
    and, only when the candidates overflowed their buffer (decided on the device), per row, how
    many negatives lie strictly above / exactly at the N-th largest student similarity: their
    prefix sums place the writes of pass 4 without atomics."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    overflow = tl.load(selection_state_ptr) != 0
    work = (pid_n >= pid_m).to(tl.int32)  # lower-triangle tiles hold no pair i < j
    if not COUNT_CRITICAL:
        work = work * overflow.to(tl.int32)
    if work == 0:
        return
    rows, cols, row_mask, col_mask = _tile_indices(pid_m, pid_n, batch, TILE)
    upper, negative = _pair_masks(labels_ptr, rows, cols, row_mask, col_mask)
    a = _similarity_tile(s_ptr, s_inv_ptr, rows, cols, row_mask, col_mask, dim_s, TILE, BLOCK_K, S_PRECISION)
    if COUNT_HARD:
        if overflow:
            key = _descending_key(a)
            boundary = tl.load(selection_state_ptr + 3).to(tl.uint32)
            greater = (negative & (key < boundary)).to(tl.int32)
            equal = (negative & (key == boundary)).to(tl.int32)
            tl.atomic_add(row_greater_ptr + rows, tl.sum(greater, axis=1), mask=row_mask, sem="relaxed")
            tl.atomic_add(row_equal_ptr + rows, tl.sum(equal, axis=1), mask=row_mask, sem="relaxed")
    if COUNT_CRITICAL:
        b = _similarity_tile(t_ptr, t_inv_ptr, rows, cols, row_mask, col_mask, dim_t, TILE, BLOCK_K, T_PRECISION)
        critical = (upper & _is_critical(a, b, st_ptr, tt_ptr, num_thresholds)).to(tl.int32)
        tl.atomic_add(critical_count_ptr, tl.sum(tl.sum(critical, axis=1), axis=0).to(tl.int64), sem="relaxed")


@triton.jit
def hard_negative_write_kernel(s_ptr, s_inv_ptr, labels_ptr, batch, dim_s, selection_state_ptr,
                               row_greater_ptr, row_equal_ptr, greater_offset_ptr, equal_offset_ptr,
                               selected_rows_ptr, selected_cols_ptr,
                               TILE: tl.constexpr, BLOCK_K: tl.constexpr, S_PRECISION: tl.constexpr):
    """Pass 4 (only after a candidate overflow): write the N hardest negatives (i, j).

    Every negative above the boundary is taken; ties at the boundary are taken in row-major
    order until N are written, so the set is the same run after run.  A program walks its rows'
    column tiles left to right, so running counts plus in-tile prefix sums give each pair its
    slot; row blocks with nothing to write skip the loop (decided on the device).
    selection_state = (overflow, N taken, number strictly above the boundary, boundary key).
    """
    pid = tl.program_id(0)
    rows = pid * TILE + tl.arange(0, TILE)
    row_mask = rows < batch
    overflow = tl.load(selection_state_ptr) != 0
    num_selected = tl.load(selection_state_ptr + 1).to(tl.int32)
    num_greater = tl.load(selection_state_ptr + 2).to(tl.int32)
    boundary = tl.load(selection_state_ptr + 3).to(tl.uint32)
    ties_needed = num_selected - num_greater
    greater_count = tl.load(row_greater_ptr + rows, mask=row_mask, other=0)
    equal_count = tl.load(row_equal_ptr + rows, mask=row_mask, other=0)
    greater_seen = tl.load(greater_offset_ptr + rows, mask=row_mask, other=0)
    equal_seen = tl.load(equal_offset_ptr + rows, mask=row_mask, other=0)
    wanted = (greater_count > 0) | ((equal_count > 0) & (equal_seen < ties_needed))
    col_end = tl.where(overflow & (tl.max(wanted.to(tl.int32), axis=0) > 0), batch, 0)
    for col_start in range(pid * TILE, col_end, TILE):
        cols = col_start + tl.arange(0, TILE)
        col_mask = cols < batch
        _, negative = _pair_masks(labels_ptr, rows, cols, row_mask, col_mask)
        a = _similarity_tile(s_ptr, s_inv_ptr, rows, cols, row_mask, col_mask, dim_s, TILE, BLOCK_K, S_PRECISION)
        key = _descending_key(a)
        greater = negative & (key < boundary)
        equal = negative & (key == boundary)
        greater32 = greater.to(tl.int32)
        equal32 = equal.to(tl.int32)
        greater_slot = greater_seen[:, None] + tl.cumsum(greater32, axis=1) - greater32
        tie_rank = equal_seen[:, None] + tl.cumsum(equal32, axis=1) - equal32
        take = greater | (equal & (tie_rank < ties_needed))
        slot = tl.where(greater, greater_slot, num_greater + tie_rank)
        # Never past the buffer, even if a pass disagreed with the histograms (non-finite input).
        take = take & (slot < num_selected)
        tl.store(selected_rows_ptr + slot, tl.broadcast_to(rows[:, None], (TILE, TILE)), mask=take)
        tl.store(selected_cols_ptr + slot, tl.broadcast_to(cols[None, :], (TILE, TILE)), mask=take)
        greater_seen += tl.sum(greater32, axis=1)
        equal_seen += tl.sum(equal32, axis=1)


# --------------------------------------------------------------------------- stage 5: rank loss
@triton.jit
def _clamped_sigmoid(x, temperature):
    """(sigmoid, d sigmoid / dx) of x / tau with the exponent clamped to [-50, 50], as the
    reference: 1 / (1 + exp(clamp(-x / tau))), gradient zero where the clamp is active.
    The derivative is written sig^2 * e / tau, not sig * (1 - sig) / tau, which cancels."""
    scaled = -x / temperature
    exponent = tl.minimum(tl.maximum(scaled, -SIGMOID_CLAMP), SIGMOID_CLAMP)
    e = tl.exp(exponent)
    sig = 1.0 / (1.0 + e)
    in_range = (scaled >= -SIGMOID_CLAMP) & (scaled <= SIGMOID_CLAMP)
    return sig, tl.where(in_range, sig * sig * e / temperature, 0.0)


@triton.jit
def _pair_loss(a, b, st_ptr, tt_ptr, num_thresholds, temperature, RANK_LOSS: tl.constexpr):
    """(per-pair loss, d loss / d a, critical) elementwise, for the chosen rank-loss variant,
    with the EMA thresholds after this call's update."""
    zero = tl.zeros_like(a)
    critical = zero != 0.0
    rank_s = zero
    rank_t = zero
    rank_s_grad = zero
    eq7_loss = zero
    eq7_grad = zero
    for k in range(num_thresholds):
        ts = tl.load(st_ptr + k)
        tt = tl.load(tt_ptr + k)
        critical = critical | ((a > ts) != (b > tt))
        if RANK_LOSS == SOFT_RANK:
            sig_s, dsig_s = _clamped_sigmoid(a - ts, temperature)
            sig_t, _ = _clamped_sigmoid(b - tt, temperature)
            rank_s += sig_s
            rank_t += sig_t
            rank_s_grad += dsig_s
        elif RANK_LOSS == EQ7:
            margin_gap = (b - tt) - (a - ts)
            eq7_loss += tl.abs(margin_gap)
            eq7_grad += tl.where(margin_gap > 0, -1.0, tl.where(margin_gap < 0, 1.0, 0.0))
    if RANK_LOSS == SOFT_RANK:
        gap = rank_s - rank_t
        return gap * gap, 2.0 * gap * rank_s_grad, critical
    elif RANK_LOSS == EQ7:
        return eq7_loss, eq7_grad, critical
    else:
        gap = b - a
        return gap * gap, -2.0 * gap, critical


@triton.jit
def positive_forward_kernel(s_ptr, t_ptr, s_inv_ptr, t_inv_ptr, labels_ptr, group_end_ptr, batch, dim_s, dim_t,
                            st_ptr, tt_ptr, num_thresholds, temperature, partial_loss_ptr, partial_critical_ptr,
                            RANK_LOSS: tl.constexpr, CRITICAL_ONLY: tl.constexpr,
                            TILE: tl.constexpr, BLOCK_K: tl.constexpr,
                            S_PRECISION: tl.constexpr, T_PRECISION: tl.constexpr):
    """Positive term, per row block: sum of the per-pair loss over its positive pairs i < j
    (critical ones only in the Eq. 5 variant) and its number of critical positives.

    Rows are sorted by label, so a block's positives lie in columns [block start, group end of
    its last row): the scan costs sum of group sizes, not B, per row.  One partial per
    program, summed in a fixed order by the launcher.
    """
    pid = tl.program_id(0)
    rows = pid * TILE + tl.arange(0, TILE)
    row_mask = rows < batch
    last_row = tl.minimum(pid * TILE + TILE, batch) - 1
    col_end = tl.load(group_end_ptr + last_row)
    loss_sum = tl.zeros((TILE,), dtype=tl.float32)
    critical_sum = tl.zeros((TILE,), dtype=tl.int32)
    for col_start in range(pid * TILE, col_end, TILE):
        cols = col_start + tl.arange(0, TILE)
        col_mask = cols < batch
        upper, negative = _pair_masks(labels_ptr, rows, cols, row_mask, col_mask)
        positive = upper & (negative == 0)  # not `~negative`: triton 3.2's interpreter lacks ~ on bools
        a = _similarity_tile(s_ptr, s_inv_ptr, rows, cols, row_mask, col_mask, dim_s, TILE, BLOCK_K, S_PRECISION)
        b = _similarity_tile(t_ptr, t_inv_ptr, rows, cols, row_mask, col_mask, dim_t, TILE, BLOCK_K, T_PRECISION)
        loss, _, critical = _pair_loss(a, b, st_ptr, tt_ptr, num_thresholds, temperature, RANK_LOSS)
        critical = critical & positive
        if CRITICAL_ONLY:
            counted = critical
        else:
            counted = positive
        loss_sum += tl.sum(tl.where(counted, loss, 0.0), axis=1)
        critical_sum += tl.sum(critical.to(tl.int32), axis=1)
    tl.store(partial_loss_ptr + pid, tl.sum(loss_sum, axis=0))
    tl.store(partial_critical_ptr + pid, tl.sum(critical_sum.to(tl.int64), axis=0))


@triton.jit
def _pair_dot(x_ptr, inv_norm_ptr, i, j, mask, dim, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    """<x_hat_i, x_hat_j> for a list of pairs (gathered rows, fp32 products)."""
    acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
    offset_i = i.to(tl.int64) * dim
    offset_j = j.to(tl.int64) * dim
    for k0 in range(0, dim, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        m = mask[:, None] & (ks < dim)[None, :]
        x_i = tl.load(x_ptr + offset_i[:, None] + ks[None, :], mask=m, other=0.0).to(tl.float32)
        x_j = tl.load(x_ptr + offset_j[:, None] + ks[None, :], mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(x_i * x_j, axis=1)
    inv_i = tl.load(inv_norm_ptr + i, mask=mask, other=0.0)
    inv_j = tl.load(inv_norm_ptr + j, mask=mask, other=0.0)
    return acc * inv_i * inv_j


@triton.jit
def selected_pairs_kernel(s_ptr, t_ptr, s_inv_ptr, t_inv_ptr, batch, dim_s, dim_t,
                          selected_rows_ptr, selected_cols_ptr, num_slots,
                          st_ptr, tt_ptr, num_thresholds, temperature,
                          loss_ptr, loss_grad_ptr, critical_ptr,
                          RANK_LOSS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    """Negative term: per selected pair (slot), the loss, d loss / d a and the critical flag.
    Unfilled slots (row index == batch) give zeros."""
    slots = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    slot_mask = slots < num_slots
    i = tl.load(selected_rows_ptr + slots, mask=slot_mask, other=batch)
    j = tl.load(selected_cols_ptr + slots, mask=slot_mask, other=batch)
    valid = (i < batch) & (j < batch)
    a = _pair_dot(s_ptr, s_inv_ptr, i, j, valid, dim_s, BLOCK_P, BLOCK_K)
    b = _pair_dot(t_ptr, t_inv_ptr, i, j, valid, dim_t, BLOCK_P, BLOCK_K)
    loss, loss_grad, critical = _pair_loss(a, b, st_ptr, tt_ptr, num_thresholds, temperature, RANK_LOSS)
    tl.store(loss_ptr + slots, tl.where(valid, loss, 0.0), mask=slot_mask)
    tl.store(loss_grad_ptr + slots, tl.where(valid, loss_grad, 0.0), mask=slot_mask)
    tl.store(critical_ptr + slots, (valid & critical).to(tl.int32), mask=slot_mask)


# --------------------------------------------------------------------------- stage 6: backward
@triton.jit
def positive_backward_kernel(s_ptr, t_ptr, s_inv_ptr, t_inv_ptr, labels_ptr, group_start_ptr, group_end_ptr,
                             batch, dim_s, dim_t, st_ptr, tt_ptr, num_thresholds, temperature,
                             coefficient_ptr, grad_hat_ptr,
                             RANK_LOSS: tl.constexpr, CRITICAL_ONLY: tl.constexpr,
                             TILE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                             S_PRECISION: tl.constexpr, T_PRECISION: tl.constexpr, G_PRECISION: tl.constexpr):
    """d loss / d s_hat_i from the positive pairs: sum_j g_ij s_hat_j over the row's group
    (both directions of each pair: the row scans its whole group, j != i).

    The fused-attention pattern: tiles of a and b are recomputed, g is formed in registers and
    multiplied into the rows' feature chunks at once.  A program owns its rows of grad_hat, so
    the read-modify-write needs no atomics and sums in a fixed order.
    """
    pid = tl.program_id(0)
    rows = pid * TILE + tl.arange(0, TILE)
    row_mask = rows < batch
    last_row = tl.minimum(pid * TILE + TILE, batch) - 1
    col_begin = tl.load(group_start_ptr + pid * TILE)
    col_end = tl.load(group_end_ptr + last_row)
    coefficient = tl.load(coefficient_ptr)
    label_i = tl.load(labels_ptr + rows, mask=row_mask, other=0)
    row_offset = rows.to(tl.int64) * dim_s
    for col_start in range(col_begin, col_end, TILE):
        cols = col_start + tl.arange(0, TILE)
        col_mask = cols < batch
        label_j = tl.load(labels_ptr + cols, mask=col_mask, other=0)
        positive = (row_mask[:, None] & col_mask[None, :] & (rows[:, None] != cols[None, :])
                    & (label_i[:, None] == label_j[None, :]))
        a = _similarity_tile(s_ptr, s_inv_ptr, rows, cols, row_mask, col_mask, dim_s, TILE, BLOCK_K, S_PRECISION)
        b = _similarity_tile(t_ptr, t_inv_ptr, rows, cols, row_mask, col_mask, dim_t, TILE, BLOCK_K, T_PRECISION)
        _, loss_grad, critical = _pair_loss(a, b, st_ptr, tt_ptr, num_thresholds, temperature, RANK_LOSS)
        if CRITICAL_ONLY:
            positive = positive & critical
        inv_j = tl.load(s_inv_ptr + cols, mask=col_mask, other=0.0)
        # g_ij * inv_norm_j multiplies the raw row j: s_hat_j without a normalised copy.
        weight = tl.where(positive, coefficient * loss_grad, 0.0) * inv_j[None, :]
        col_offset = cols.to(tl.int64) * dim_s
        for d0 in range(0, dim_s, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_mask = ds < dim_s
            s_j = tl.load(s_ptr + col_offset[:, None] + ds[None, :], mask=col_mask[:, None] & d_mask[None, :],
                          other=0.0).to(tl.float32)
            grad_ptrs = grad_hat_ptr + row_offset[:, None] + ds[None, :]
            grad_mask = row_mask[:, None] & d_mask[None, :]
            update = tl.dot(weight, s_j, input_precision=G_PRECISION)
            tl.store(grad_ptrs, tl.load(grad_ptrs, mask=grad_mask, other=0.0) + update, mask=grad_mask)


@triton.jit
def backward_rows_kernel(s_ptr, s_inv_ptr, grad_hat_ptr, order_ptr, segment_start_ptr, segment_end_ptr,
                         other_ptr, coefficient_ptr, grad_ptr, batch, dim_s,
                         BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per row: add the selected negatives' g * s_hat_other (entries pre-sorted by row, so each
    row sums in a fixed order), then back through the normalisation,
    (G - s_hat <s_hat, G>) / max(||s||, eps), written to the row's original position."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < batch
    ds = tl.arange(0, BLOCK_D)
    mask = row_mask[:, None] & (ds < dim_s)[None, :]
    row_offset = rows.to(tl.int64) * dim_s
    grad_hat = tl.load(grad_hat_ptr + row_offset[:, None] + ds[None, :], mask=mask, other=0.0)
    segment_start = tl.load(segment_start_ptr + rows, mask=row_mask, other=0)
    segment_length = tl.load(segment_end_ptr + rows, mask=row_mask, other=0) - segment_start
    for step in range(0, tl.max(segment_length, axis=0)):
        has_entry = step < segment_length
        entry = segment_start + step
        other = tl.load(other_ptr + entry, mask=has_entry, other=0)
        weight = tl.load(coefficient_ptr + entry, mask=has_entry, other=0.0) \
            * tl.load(s_inv_ptr + other, mask=has_entry, other=0.0)
        x_other = tl.load(s_ptr + other.to(tl.int64)[:, None] * dim_s + ds[None, :],
                          mask=has_entry[:, None] & mask, other=0.0).to(tl.float32)
        grad_hat += weight[:, None] * x_other
    x = tl.load(s_ptr + row_offset[:, None] + ds[None, :], mask=mask, other=0.0).to(tl.float32)
    inv_norm = tl.load(s_inv_ptr + rows, mask=row_mask, other=0.0)
    x_hat = x * inv_norm[:, None]
    # Below the eps floor the norm is a constant: no projection (what autograd of clamp_min gives).
    unclamped = tl.sqrt_rn(tl.sum(x * x, axis=1)) > NORM_EPS
    projection = tl.where(unclamped, tl.sum(x_hat * grad_hat, axis=1), 0.0)
    grad = (grad_hat - x_hat * projection[:, None]) * inv_norm[:, None]
    destination = tl.load(order_ptr + rows, mask=row_mask, other=0)
    tl.store(grad_ptr + destination[:, None] * dim_s + ds[None, :], grad.to(grad_ptr.dtype.element_ty), mask=mask)
