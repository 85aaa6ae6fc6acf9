"""The Triton kernels of the fused EKD backend, stage by stage (see ekd_kernels/triton_ekd.py).

Layout every kernel assumes: the rows of the student and teacher embeddings are sorted by label
and contiguous (normalise_kernel gathers them once), so the positive pairs of a row are one
contiguous column range, and pairs (i, j), i < j, of the sorted order are the unordered pairs
of the batch, each once.  Similarities are never stored: every pass recomputes its tiles from
the raw rows and their inverse norms.

Stages and kernels, in launch order:
    label order          stable_sort_kernel (few labels; torch.sort beyond triton_ekd.SMALL_SORT_MAX)
    normalise            normalise_kernel (label-order copies, inverse norms, counts of non-finite
                         elements; it also zeroes the counters the later kernels add to)
    similarity tiles     _similarity_tile (shared by every tile pass)
    batch_thresholds     coarse_histogram_kernel, coarse_select_kernel, fine_histogram_kernel
                         (radix select, 2 x 16 bits); at large B, probe_histogram_kernel and
                         cutoff_select_kernel first, and pass 1 in two parts (head, then the
                         tail only when a target lies in it); with pass 1's windows,
                         window_select_kernel, coarse_histogram_windows_kernel for pass 1, and
                         window_histogram_kernel before pass 2 (which it then spares)
    ema_update           fine_select_kernel (exact keys -> batch thresholds -> EMA, on the device)
    select_negatives     fine_histogram_kernel also gathers the top-N candidates, which
                         hardest_negatives_kernel ranks; after a candidate-buffer overflow,
                         boundary_count_kernel and hardest_negatives_kernel select from recomputed
                         tiles instead; boundary_count_kernel also counts the critical pairs
                         among all pairs
    rank loss            rank_loss_kernel (positives and selected pairs, shared _pair_loss),
                         finalize_kernel (fixed-order sums -> loss, statistics, backward coefficients)
    backward             positive_backward_kernel, stable_sort_kernel (the entries, as the labels),
                         backward_rows_kernel

The small kernels (coarse_select, fine_select, finalize) replace chains of torch ops on the
histograms, the K-sized threshold vectors and the loss terms: on a GPU each such op is a launch
(about 5 us), which at B <= 1024 costs more than the arithmetic.  They run one program per
target (or one program), scanning their buffers in fixed order: deterministic, no float atomics.
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
#: Bins per group of the selection scans' second level (_histogram_rank).
SCAN_GROUP: tl.constexpr = tl.constexpr(256)
# Above every bin a histogram add can take (pass 2's one aggregation adds at row x 65536 + low):
# _histogram_add's "nothing counted" value.
NO_BIN: tl.constexpr = tl.constexpr(2**31 - 1)
INF: tl.constexpr = tl.constexpr(float("inf"))
# No NaN global: at every launch Triton checks that the globals a kernel uses still equal their
# values at compile time, and NaN != NaN fails that check on every call (the interpreter skips
# it).  _nan() builds the value inside the kernel instead.

#: PRECISION value of the interpreter's similarity tiles (triton_ekd._dot_precision): products
#: in fp32, each entry's summed in k order (see _similarity_tile).
ORDERED_PRECISION: tl.constexpr = tl.constexpr("ordered_fp32")

# rank_loss codes (constexpr): soft_rank, eq7, eq8.
SOFT_RANK: tl.constexpr = tl.constexpr(0)
EQ7: tl.constexpr = tl.constexpr(1)
EQ8: tl.constexpr = tl.constexpr(2)

# The int64 selection state every forward kernel shares (zeroed by normalise_kernel):
OVERFLOW: tl.constexpr = tl.constexpr(0)      # the top-N candidates did not fit their buffer
NUM_SELECTED: tl.constexpr = tl.constexpr(1)  # min(N, L)
NUM_GREATER: tl.constexpr = tl.constexpr(2)   # negatives strictly above the top-N boundary (<= N)
BOUNDARY: tl.constexpr = tl.constexpr(3)      # key of the N-th hardest negative
NUM_NEGATIVE: tl.constexpr = tl.constexpr(4)  # L
CRITICAL_ALL: tl.constexpr = tl.constexpr(5)  # critical pairs among all pairs (on request)
NONFINITE: tl.constexpr = tl.constexpr(6)     # non-finite embedding elements (0: the batch is finite)
# Pass 1's cutoff (large B, triton_ekd._cutoff_fraction; see coarse_histogram_kernel):
SAMPLE_NEGATIVE: tl.constexpr = tl.constexpr(7)  # negatives among the probe's sample pairs
CUTOFF: tl.constexpr = tl.constexpr(8)           # 8, 9: the last bucket pass 1 counts first, per model
FALLBACK: tl.constexpr = tl.constexpr(10)        # 1: a target lies past a cutoff, pass 1 counts the rest
# Pass 1's windows (triton_ekd.PASS1_WINDOWS; see window_select_kernel):
WINDOW_MISS: tl.constexpr = tl.constexpr(11)     # 1: a target lies outside its window, or a window buffer overflowed
STATE_SIZE: tl.constexpr = tl.constexpr(16)

# coarse_histogram_kernel's PART: every bucket; the buckets up to the cutoff (the head); the
# buckets past it (the tail), only after FALLBACK was set.  The kernels' parameters default to
# the first value of each, written as a plain 0: triton 3.2 refuses a constexpr object as a
# parameter's default ("Callable constexpr ... is not supported").
ALL_BUCKETS: tl.constexpr = tl.constexpr(0)
HEAD_BUCKETS: tl.constexpr = tl.constexpr(1)
TAIL_BUCKETS: tl.constexpr = tl.constexpr(2)
# coarse_select_kernel's CUTOFF_MODE: no cutoff; check that every target lies in the head (else
# set FALLBACK); run again over the whole histogram, only after FALLBACK was set.
NO_CUTOFF: tl.constexpr = tl.constexpr(0)
CHECK_CUTOFF: tl.constexpr = tl.constexpr(1)
AFTER_FALLBACK: tl.constexpr = tl.constexpr(2)

# The tile passes' similarity tiles at small B (GRAM): computed; computed by pass 1 and kept in
# the Gram cache (triton_ekd.GRAM_CACHE_MAX_BATCH); read from it by the later passes.
GRAM_OFF: tl.constexpr = tl.constexpr(0)
GRAM_STORE: tl.constexpr = tl.constexpr(1)
GRAM_LOAD: tl.constexpr = tl.constexpr(2)

# Bits of the per-slot flags of the selected pairs.
FILLED: tl.constexpr = tl.constexpr(1)
CRITICAL: tl.constexpr = tl.constexpr(2)


# --------------------------------------------------------------------------- stage 1: normalise
@triton.jit
def _gather_and_normalise(x_ptr, stride_row, stride_col, source, rows, row_mask, dim, sorted_ptr, inv_norm_ptr,
                          BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Copy rows `source` of x (any strides) to rows `rows` of a contiguous copy, store
    1 / max(||x_i||, eps) in fp32 (the tiles scale raw dots by it instead of reading a
    normalised copy) and return the number of non-finite elements met."""
    source_offset = source.to(tl.int64) * stride_row
    row_offset = rows.to(tl.int64) * dim
    squares = tl.zeros((BLOCK_R,), dtype=tl.float32)
    nonfinite = tl.zeros((BLOCK_R,), dtype=tl.int32)
    for k0 in range(0, dim, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask = row_mask[:, None] & (ks < dim)[None, :]
        x = tl.load(x_ptr + source_offset[:, None] + ks.to(tl.int64)[None, :] * stride_col, mask=mask, other=0.0)
        tl.store(sorted_ptr + row_offset[:, None] + ks[None, :], x, mask=mask)
        x = x.to(tl.float32)
        squares += tl.sum(x * x, axis=1)
        # |x| < inf is false for inf and NaN alike (a comparison: no floating-point exception).
        nonfinite += tl.sum(1 - (tl.abs(x) < INF).to(tl.int32), axis=1)
    norm = tl.maximum(tl.sqrt_rn(squares), NORM_EPS)
    tl.store(inv_norm_ptr + rows, tl.div_rn(tl.full((BLOCK_R,), 1.0, tl.float32), norm), mask=row_mask)
    # A finite row whose squares overflow fp32 (|x| ~ 1e20) has norm inf, so in the reference
    # x / inf is a zero row; here its inverse norm is 0, but its raw dots with another such row
    # would be inf * 0 = NaN: zero its copy, as the reference's row.
    overflow = row_mask & (squares == INF)
    if tl.sum(overflow.to(tl.int32), axis=0) > 0:
        tl.debug_barrier()  # after the copy's stores, whichever threads made them
        for k0 in range(0, dim, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            tl.store(sorted_ptr + row_offset[:, None] + ks[None, :],
                     tl.zeros((BLOCK_R, BLOCK_K), dtype=sorted_ptr.dtype.element_ty),
                     mask=overflow[:, None] & (ks < dim)[None, :])
    return tl.sum(nonfinite, axis=0)


# Not specialised on the input strides or alignment: Triton would otherwise pick a different load
# layout for, e.g., a contiguous and an expanded (stride 0) input, hence a different order of
# the norm's sum, and the same values could give a last-bit different loss (SPEC: views give the
# results of contiguous copies).  One B x D pass; its loads lose their vector width, no more.
@triton.jit(do_not_specialize=["s_stride_row", "s_stride_col", "t_stride_row", "t_stride_col"],
            do_not_specialize_on_alignment=["student_ptr", "teacher_ptr"])
def normalise_kernel(student_ptr, teacher_ptr, order_ptr, batch, dim_s, dim_t, s_stride_row, s_stride_col,
                     t_stride_row, t_stride_col, s_sorted_ptr, t_sorted_ptr, s_inv_ptr, t_inv_ptr, position_ptr,
                     nonfinite_ptr, zero_ptr, num_zero, state_ptr,
                     BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, ZERO_BLOCK: tl.constexpr):
    """Program (row block, model): gather the block's rows in label order (contiguous copies,
    whatever the input strides), their inverse norms, and the count of non-finite elements
    (one per program: the later kernels sum them).  The student programs also write the
    inverse permutation `position` (original row -> sorted row).

    All programs together zero the int32 counters of the later passes (`zero_ptr`, grid-stride)
    and program (0, 0) the int64 selection state: they run before every kernel that adds to
    them, so no separate fill is launched."""
    pid = tl.program_id(0)
    model = tl.program_id(1)
    num_blocks = tl.num_programs(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < batch
    source = tl.load(order_ptr + rows, mask=row_mask, other=0)
    if model == 0:
        nonfinite = _gather_and_normalise(student_ptr, s_stride_row, s_stride_col, source, rows, row_mask, dim_s,
                                          s_sorted_ptr, s_inv_ptr, BLOCK_R, BLOCK_K)
        tl.store(position_ptr + source, rows.to(tl.int64), mask=row_mask)
    else:
        nonfinite = _gather_and_normalise(teacher_ptr, t_stride_row, t_stride_col, source, rows, row_mask, dim_t,
                                          t_sorted_ptr, t_inv_ptr, BLOCK_R, BLOCK_K)
    tl.store(nonfinite_ptr + model * num_blocks + pid, nonfinite)
    # (int64 loop bounds: near MAX_BATCH a start plus the step, 2 * programs * ZERO_BLOCK, passes
    # 2^31, and an int32 start would wrap negative there and write below the buffer)
    program = (model * num_blocks + pid).to(tl.int64)
    for start in range(program * ZERO_BLOCK, num_zero, 2 * num_blocks.to(tl.int64) * ZERO_BLOCK):
        offsets = start + tl.arange(0, ZERO_BLOCK)
        tl.store(zero_ptr + offsets, tl.zeros((ZERO_BLOCK,), dtype=tl.int32), mask=offsets < num_zero)
    if program == 0:
        tl.store(state_ptr + tl.arange(0, STATE_SIZE), tl.zeros((STATE_SIZE,), dtype=tl.int64))


@triton.jit
def stable_sort_kernel(key_ptr, num_keys, sorted_key_ptr, order_ptr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """A stable sort of a few integer keys (triton_ekd.SMALL_SORT_MAX): the labels before
    normalise_kernel, the backward's gradient entries.  Key i goes to position = the number of
    keys before it in (key, index) order, the smaller ones and the equal ones of smaller index,
    so program p counts those for its BLOCK_R keys against all of them and writes each key and
    its index at its position: torch.sort(keys, stable=True)'s (values, indices), exactly.
    Why: O(n^2) compares in parallel take one launch, where torch.sort of 1024 and 4000 keys took
    34 and 27 us of the H200 (one block's in-place sort) and its copies (bench/NOTES.md)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < num_keys
    key = tl.load(key_ptr + rows, mask=row_mask, other=0)
    position = tl.zeros((BLOCK_R,), dtype=tl.int32)
    for start in range(0, num_keys, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        col_mask = cols < num_keys
        other = tl.load(key_ptr + cols, mask=col_mask, other=0)
        before = (other[None, :] < key[:, None]) | ((other[None, :] == key[:, None]) & (cols[None, :] < rows[:, None]))
        position += tl.sum((before & col_mask[None, :]).to(tl.int32), axis=1)
    tl.store(sorted_key_ptr + position, key, mask=row_mask)
    tl.store(order_ptr + position, rows.to(tl.int64), mask=row_mask)


# --------------------------------------------------------------------------- stage 2: tiles
@triton.jit
def _similarity_tile(x_ptr, inv_norm_ptr, rows, cols, row_mask, col_mask, dim,
                     TILE: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """<x_hat_i, x_hat_j> for a TILE x TILE block of pairs of one model.

    Raw rows in their own dtype (bf16/fp16 use their tensor-core dot), fp32 accumulation,
    fp32 inputs at PRECISION ("ieee" or "tf32x3", never plain tf32).  Every tile pass calls
    this with the same tile alignment, so a pair's similarity is the same bits in every pass:
    the radix selection finds in pass 2 exactly the keys it counted in pass 1.  And an entry's
    bits do not depend on its place in the tile (a GPU's dot computes each entry alike), so
    _pair_similarities, which puts a pair on a tile's diagonal, gets them too.

    ORDERED_PRECISION (the interpreter): products in fp32 (16-bit inputs upcast, exact products
    as the tensor-core dot), each entry summed in k order by an elementwise product and a sum.
    Not tl.dot there: it is numpy's matmul, whose BLAS may round an entry by its place in the
    tile (OpenBLAS's Haswell kernels, which it picks on some AVX-512 CPUs too: 42% of a 64 x 64
    tile's entries at K = 128 changed bits when moved), and whose bf16 dot multiplies the raw
    16-bit patterns.
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
        if PRECISION == ORDERED_PRECISION:
            acc += tl.sum(left.to(tl.float32)[:, :, None] * right.to(tl.float32)[None, :, :], axis=1)
        else:
            acc = tl.dot(left, right, acc, input_precision=PRECISION)
    inv_i = tl.load(inv_norm_ptr + rows, mask=row_mask, other=0.0)
    inv_j = tl.load(inv_norm_ptr + cols, mask=col_mask, other=0.0)
    return acc * inv_i[:, None] * inv_j[None, :]


@triton.jit
def _gram_offsets(pid_m, pid_n, TILE: tl.constexpr):
    """Where the (pid_m, pid_n) tile (pid_m <= pid_n) lies in a model's Gram cache: the upper
    triangle's tiles packed in the tile passes' program order (tile n(n + 1) / 2 + m, see
    _tile_program), each TILE x TILE row-major.  (32-bit: the host keeps the cache under 2^31
    elements.)"""
    return _gram_tile_start(pid_m, pid_n, TILE) + tl.arange(0, TILE)[:, None] * TILE + tl.arange(0, TILE)[None, :]


@triton.jit
def _gram_tile_start(m, n, TILE: tl.constexpr):
    """Offset of tile (m, n), m <= n, in a model's Gram cache (_gram_offsets)."""
    return (n * (n + 1) // 2 + m) * (TILE * TILE)


@triton.jit
def _pass_tile(x_ptr, inv_norm_ptr, gram_ptr, pid_m, pid_n, rows, cols, row_mask, col_mask, dim,
               TILE: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, GRAM: tl.constexpr):
    """The (pid_m, pid_n) similarity tile of a tile pass (rows and cols its _tile_indices):
    computed (GRAM_OFF); computed and kept in the Gram cache (GRAM_STORE, pass 1); or read back
    from it (GRAM_LOAD, the passes after it), the very bits pass 1 computed.  Why: at small B a
    call is a chain of kernels that each recompute the same tiles (pass 2, the rank loss, passes
    3 and 4), a latency chain of D / BLOCK_K dot steps apiece, where reading a tile back is one
    16 KB load (triton_ekd.GRAM_CACHE_MAX_BATCH).  Entries outside the batch hold 0, as computed."""
    if GRAM == GRAM_LOAD:
        tile = tl.load(gram_ptr + _gram_offsets(pid_m, pid_n, TILE))
    else:
        tile = _similarity_tile(x_ptr, inv_norm_ptr, rows, cols, row_mask, col_mask, dim, TILE, BLOCK_K, PRECISION)
        if GRAM == GRAM_STORE:
            tl.store(gram_ptr + _gram_offsets(pid_m, pid_n, TILE), tile)
    return tile


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
def _nan():
    """A quiet fp32 NaN (bits 0x7FC00000)."""
    return tl.full((), 0x7FC00000, tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _key_to_float(key):
    """Inverse of _descending_key, for an int64 key in [0, 2^32)."""
    bits = tl.where(key < 2147483648, key ^ 0x7FFFFFFF, key)
    return bits.to(tl.uint32).to(tl.float32, bitcast=True)


@triton.jit
def _tile_program():
    """(row block m, column block n) of a tile pass's program.

    The grid (triton_ekd._tile_grid) is one program per upper-triangle tile (m <= n), T(T + 1) / 2
    of them for T blocks a side, numbered column by column: program p = n(n + 1) / 2 + m, the
    order in which the square grid's programs that do work were numbered before (its lower
    triangle's returned at once: half its programs at large B, each taking a block slot).  A
    square (T, T) grid (TRIANGLE_TILE_GRID off, an A/B variant) gives its program ids,
    and the lower triangle's programs return in the kernels."""
    m, n = _triangle_block(tl.program_id(0).to(tl.int64))
    square = tl.num_programs(1) > 1
    pid_m = tl.where(square, tl.program_id(0), m.to(tl.int32))
    pid_n = tl.where(square, tl.program_id(1), n.to(tl.int32))
    return pid_m, pid_n


@triton.jit
def _triangle_block(p):
    """(m, n), m <= n, of upper-triangle tile number p >= 0 (int64): n the largest with
    n(n + 1) / 2 <= p, m = p - n(n + 1) / 2 (see _tile_program).  n from an fp32 square root,
    then a step either way (_triangle_block_from)."""
    return _triangle_block_from(p, ((tl.sqrt((8 * p + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int64))


@triton.jit
def _triangle_block_from(p, n):
    """_triangle_block from an estimate of n at most a step off: up to p < 2^31 (the largest
    grid) the fp32 root is off by its input's rounding to 24 bits (a step too high at some
    columns' last tiles) and, on a GPU, by the approximate root's last bit."""
    n = tl.where(n * (n + 1) // 2 > p, n - 1, n)
    n = tl.where((n + 1) * (n + 2) // 2 <= p, n + 1, n)
    return p - n * (n + 1) // 2, n


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


@triton.jit
def _group_start(labels_ptr, row, BLOCK: tl.constexpr):
    """First sorted row with the label of `row` (labels sorted: a label's rows are one run).
    Walks left a block at a time while the whole block shares the label: one step for the
    usual small groups.  (It counts the run rather than moving a start index: triton 3.2's
    compiler crashes on a later loop that starts at such a while loop's result.)"""
    label = tl.load(labels_ptr + row)
    run = row * 0
    more = row > 0
    while more:
        index = row - run - BLOCK + tl.arange(0, BLOCK)
        inside = index >= 0
        same = tl.sum((inside & (tl.load(labels_ptr + index, mask=inside, other=0) == label)).to(tl.int32), axis=0)
        run += same
        more = (same == BLOCK) & (row - run > 0)
    return row - run


@triton.jit
def _group_end(labels_ptr, row, batch, BLOCK: tl.constexpr):
    """One past the last sorted row with the label of `row` (see _group_start)."""
    label = tl.load(labels_ptr + row)
    run = row * 0
    more = row + 1 < batch
    while more:
        index = row + 1 + run + tl.arange(0, BLOCK)
        inside = index < batch
        same = tl.sum((inside & (tl.load(labels_ptr + index, mask=inside, other=0) == label)).to(tl.int32), axis=0)
        run += same
        more = (same == BLOCK) & (row + 1 + run < batch)
    return row + 1 + run


# --------------------------------------------------------------------------- stage 3: thresholds
@triton.jit
def _histogram_add(hist_ptr, bins, mask):
    """hist[bins] += 1 where `mask`, for a tile of bins (values in [0, NO_BIN)).

    One atomic for the whole tile when its counted elements all share one bin, one per row for
    the rows whose counted elements do, one per element elsewhere.  Why: atomics to the same
    address serialise where they land (about one per clock), and collapsed similarities (a dead
    student, zero rows) put every pair in one bin, i.e. B^2 same-address atomics a pass; this
    way a collapsed tile costs one.  The counts are integers, exact in any order: the histogram
    is the same as per-element atomics give.
    """
    lowest = tl.min(tl.where(mask, bins, NO_BIN), axis=1)
    highest = tl.max(tl.where(mask, bins, -1), axis=1)
    row_count = tl.sum(mask.to(tl.int32), axis=1)
    row_uniform = lowest == highest  # a row with nothing counted has lowest > highest
    tile_lowest = tl.min(lowest, axis=0)
    tile_uniform = tile_lowest == tl.max(highest, axis=0)
    # The tile's one atomic rides on its first row, in the same (vector) atomic as the rows': a
    # scalar atomic's mask is ignored by triton 3.2's interpreter.
    per_tile = (tl.arange(0, bins.shape[0]) == 0) & tile_uniform
    per_row = row_uniform & (tile_uniform == 0)
    tl.atomic_add(hist_ptr + tl.where(per_tile, tile_lowest, lowest),
                  tl.where(per_tile, tl.sum(row_count, axis=0), row_count), mask=per_tile | per_row, sem="relaxed")
    tl.atomic_add(hist_ptr + bins, 1, mask=mask & (row_uniform == 0)[:, None], sem="relaxed")


@triton.jit
def probe_histogram_kernel(s_ptr, t_ptr, s_inv_ptr, t_inv_ptr, labels_ptr, batch, dim_s, dim_t, row_step,
                           probe_s_ptr, probe_t_ptr, state_ptr,
                           TILE: tl.constexpr, BLOCK_K: tl.constexpr,
                           S_PRECISION: tl.constexpr, T_PRECISION: tl.constexpr):
    """Before pass 1 at large B, program n: the coarse histograms of a sample of the negatives,
    the pairs of TILE sample rows (0, row_step, 2 row_step, ...: spread over the label-sorted
    batch) with column block n, and their number (SAMPLE_NEGATIVE).  A pair of two sample rows
    is counted in both orders: the sample only places the cutoff (cutoff_select_kernel), which
    changes the work of pass 1 but none of its results."""
    pid_n = tl.program_id(0)
    rows = tl.arange(0, TILE) * row_step
    cols = pid_n * TILE + tl.arange(0, TILE)
    row_mask = rows < batch
    col_mask = cols < batch
    label_i = tl.load(labels_ptr + rows, mask=row_mask, other=0)
    label_j = tl.load(labels_ptr + cols, mask=col_mask, other=0)
    negative = row_mask[:, None] & col_mask[None, :] & (label_i[:, None] != label_j[None, :])
    # One model's tile at a time (fewer live registers: the strided sample rows cost some).
    a = _similarity_tile(s_ptr, s_inv_ptr, rows, cols, row_mask, col_mask, dim_s, TILE, BLOCK_K, S_PRECISION)
    _histogram_add(probe_s_ptr, (_descending_key(a) >> RADIX_BITS).to(tl.int32), negative)
    b = _similarity_tile(t_ptr, t_inv_ptr, rows, cols, row_mask, col_mask, dim_t, TILE, BLOCK_K, T_PRECISION)
    _histogram_add(probe_t_ptr, (_descending_key(b) >> RADIX_BITS).to(tl.int32), negative)
    num_negative = tl.sum(tl.sum(negative.to(tl.int32), axis=1), axis=0)
    tl.atomic_add(state_ptr + SAMPLE_NEGATIVE, num_negative.to(tl.int64), sem="relaxed")


@triton.jit
def cutoff_select_kernel(probe_ptr, state_ptr, fraction, SCAN_BLOCK: tl.constexpr, LINEAR_SCAN: tl.constexpr = 0):
    """Program (model): pass 1's cutoff, the bucket of descending rank floor(S * fraction) among
    the probe's S sample negatives, or the last bucket (no cutoff) when the sample has none."""
    model = tl.program_id(0)
    num_sample = tl.load(state_ptr + SAMPLE_NEGATIVE)
    rank = (num_sample.to(tl.float32) * fraction).to(tl.int64)
    rank = tl.maximum(tl.minimum(rank, num_sample - 1), 0)
    bucket, _ = _histogram_rank(probe_ptr + model * NUM_BUCKETS, rank, 1, SCAN_BLOCK, LINEAR_SCAN)
    tl.store(state_ptr + CUTOFF + model, tl.where(num_sample > 0, bucket, NUM_BUCKETS - 1).to(tl.int64))


@triton.jit
def window_select_kernel(probe_ptr, state_ptr, fractions_ptr, num_thresholds, num_targets, window_ptr, z, relative,
                         slack, SCAN_BLOCK: tl.constexpr, LINEAR_SCAN: tl.constexpr = 0):
    """Program (target, model), with PASS1_WINDOWS: the window of buckets [lo, hi] in which the
    probe's sample places the target, from which pass 1 keeps every negative's key (and, for the
    top-N target, every negative at or above the window as a candidate) so that pass 2 need not
    recompute the tiles.

    The target's sample rank r = S x fraction (S sample negatives; fraction: its FPR, or N over
    the pairs for the top-N), widened by m = z sqrt(r + 1) + relative r + slack sample ranks each
    way (the relative part for the sample's rows: 64 rows, not independent pairs): the window
    runs from the bucket of rank r - m (the top bucket, 0, when r - m < 0, and always for the
    top-N target, whose candidates are everything above it) to the bucket of rank r + m (the last
    bucket when the sample has fewer).  Whether the target's exact bucket lies in its window
    is decided by window_histogram_kernel (WINDOW_MISS): the window changes the work, never the
    results."""
    target = tl.program_id(0)
    model = tl.program_id(1)
    if (model == 1) & (target >= num_thresholds):  # the teacher has no top-N target
        return
    num_sample = tl.load(state_ptr + SAMPLE_NEGATIVE)
    rank = num_sample.to(tl.float32) * tl.load(fractions_ptr + target)
    margin = z * tl.sqrt(rank + 1.0) + relative * rank + slack
    first = (rank - margin).to(tl.int64)
    last = (rank + margin).to(tl.int64)
    lo, _ = _histogram_rank(probe_ptr + model * NUM_BUCKETS, tl.maximum(first, 0), 1, SCAN_BLOCK, LINEAR_SCAN)
    hi, _ = _histogram_rank(probe_ptr + model * NUM_BUCKETS, tl.minimum(last, num_sample - 1), 1, SCAN_BLOCK,
                            LINEAR_SCAN)
    lo = tl.where((first < 0) | (target >= num_thresholds), 0, lo)
    hi = tl.where(last >= num_sample, NUM_BUCKETS - 1, hi)
    slot = 2 * (model * num_targets + target)
    tl.store(window_ptr + slot, lo.to(tl.int32))
    tl.store(window_ptr + slot + 1, hi.to(tl.int32))


@triton.jit
def _window_keys(key, bins, negative, window_ptr, num_targets, count_ptr, key_ptr, capacity):
    """Pass 1 with windows: append the keys of the tile's negatives whose bucket lies in any of
    the model's target windows (window_select_kernel) to the model's window buffer; tiles
    without one skip the atomic.  The buffer's order varies from run to run, which nothing
    reads: pass 2 only histograms it."""
    inside = bins < 0
    for target in range(num_targets):
        lo = tl.load(window_ptr + 2 * target)
        hi = tl.load(window_ptr + 2 * target + 1)
        inside = inside | ((bins >= lo) & (bins <= hi))
    wanted = (negative & inside).to(tl.int32)
    per_row = tl.sum(wanted, axis=1)
    total = tl.sum(per_row, axis=0)
    if total > 0:
        slot, write = _append_slots(wanted, per_row, total, count_ptr, capacity)
        tl.store(key_ptr + slot, key.to(tl.int32, bitcast=True), mask=write)  # (the uint32 key's bits)


@triton.jit
def _histogram_part(hist_ptr, bins, negative, state_ptr, model, PART: tl.constexpr):
    """Pass 1's histogram add for one model's tile: every negative, or those up to the model's
    cutoff (HEAD_BUCKETS), or past it (TAIL_BUCKETS)."""
    counted = negative
    if PART == HEAD_BUCKETS:
        counted = negative & (bins <= tl.load(state_ptr + CUTOFF + model))
    if PART == TAIL_BUCKETS:
        counted = negative & (bins > tl.load(state_ptr + CUTOFF + model))
    _histogram_add(hist_ptr, bins, counted)


@triton.jit
def coarse_histogram_kernel(s_ptr, t_ptr, s_inv_ptr, t_inv_ptr, labels_ptr, batch, dim_s, dim_t,
                            hist_s_ptr, hist_t_ptr, state_ptr, num_copies, gram_ptr, gram_stride,
                            TILE: tl.constexpr, BLOCK_K: tl.constexpr,
                            S_PRECISION: tl.constexpr, T_PRECISION: tl.constexpr,
                            PART: tl.constexpr = 0, GRAM: tl.constexpr = 0):
    """Pass 1 (_coarse_histogram) without windows: the launch takes only what it reads (each
    argument costs host time at every launch, which bounds a small batch's call)."""
    _coarse_histogram(s_ptr, t_ptr, s_inv_ptr, t_inv_ptr, labels_ptr, batch, dim_s, dim_t, hist_s_ptr, hist_t_ptr,
                      state_ptr, num_copies, state_ptr, 0, 0, state_ptr, state_ptr, 0, state_ptr, state_ptr,
                      state_ptr, state_ptr, 0, gram_ptr, gram_ptr + gram_stride, TILE, BLOCK_K, S_PRECISION,
                      T_PRECISION, PART,
                      False, False, GRAM)


@triton.jit
def coarse_histogram_windows_kernel(s_ptr, t_ptr, s_inv_ptr, t_inv_ptr, labels_ptr, batch, dim_s, dim_t,
                                    hist_s_ptr, hist_t_ptr, state_ptr, num_copies,
                                    window_ptr, num_s_targets, num_t_targets, window_count_ptr, window_key_ptr,
                                    window_capacity, candidate_count_ptr, candidate_key_ptr, candidate_rows_ptr,
                                    candidate_cols_ptr, capacity, gram_ptr, gram_stride,
                                    TILE: tl.constexpr, BLOCK_K: tl.constexpr,
                                    S_PRECISION: tl.constexpr, T_PRECISION: tl.constexpr,
                                    PART: tl.constexpr = 0, COLLECT: tl.constexpr = 0, GRAM: tl.constexpr = 0):
    """Pass 1 (_coarse_histogram) with windows (PASS1_WINDOWS)."""
    _coarse_histogram(s_ptr, t_ptr, s_inv_ptr, t_inv_ptr, labels_ptr, batch, dim_s, dim_t, hist_s_ptr, hist_t_ptr,
                      state_ptr, num_copies, window_ptr, num_s_targets, num_t_targets, window_count_ptr,
                      window_key_ptr, window_capacity, candidate_count_ptr, candidate_key_ptr, candidate_rows_ptr,
                      candidate_cols_ptr, capacity, gram_ptr, gram_ptr + gram_stride, TILE, BLOCK_K, S_PRECISION,
                      T_PRECISION,
                      PART, True, COLLECT, GRAM)


@triton.jit
def _coarse_histogram(s_ptr, t_ptr, s_inv_ptr, t_inv_ptr, labels_ptr, batch, dim_s, dim_t,
                      hist_s_ptr, hist_t_ptr, state_ptr, num_copies,
                      window_ptr, num_s_targets, num_t_targets, window_count_ptr, window_key_ptr,
                      window_capacity, candidate_count_ptr, candidate_key_ptr, candidate_rows_ptr,
                      candidate_cols_ptr, capacity, s_gram_ptr, t_gram_ptr,
                      TILE: tl.constexpr, BLOCK_K: tl.constexpr,
                      S_PRECISION: tl.constexpr, T_PRECISION: tl.constexpr,
                      PART: tl.constexpr, WINDOWS: tl.constexpr, COLLECT: tl.constexpr, GRAM: tl.constexpr):
    """Pass 1 of the radix select: histograms of the top 16 key bits of every negative pair's
    student and teacher similarity, and the number of negatives L.  Integer atomics: the counts
    are exact and deterministic.  The bins are int32, or int64 once L can pass 2^31 (B > 65536;
    one bin may hold nearly every pair when the embeddings collapse): the histogram pointers'
    dtype, chosen by triton_ekd._histogram_dtype, specialises the atomics and every scan.

    Each model's histogram has `num_copies` copies (triton_ekd._coarse_copies), a program adding
    to copy (pid_m + pid_n) mod num_copies; coarse_select sums them.  Why: a random batch's
    similarities fall into a narrow band of bins (on the benchmark's batch, 13 cache lines of
    bins take half of the pairs, the hottest 5%), so the atomics of the whole pass queue at the
    few L2 slices that hold those lines; copies spread them over as many more lines.

    At large B the pass counts in two parts (PART).  Every target rank lies in the top of the
    descending order (at most the largest FPR, or N, of the L negatives), but most pairs lie
    below it (a random batch's hottest bins do not: they sit near one standard deviation of the
    similarities, in the head; the copies spread those).  So the pass first counts only the
    buckets up to a cutoff placed by a sample (HEAD_BUCKETS, cutoff_select_kernel): every
    counted bucket is complete, and coarse_select finds in them every target that lies at or
    above the cutoff, exactly as in the whole histogram.  Should a target lie past it,
    coarse_select sets FALLBACK, and the launch with TAIL_BUCKETS counts the buckets past the
    cutoff (its programs return at once when FALLBACK is not set): the histogram is then whole,
    and coarse_select runs again.

    WINDOWS (triton_ekd.PASS1_WINDOWS, with the cutoff's probe): the first launch also keeps
    each model's keys in its targets' windows (window_select_kernel) and, with COLLECT (hardest
    negatives), the student's negatives at or above the top-N window as candidates, so that pass
    2 histograms those buffers instead of recomputing the tiles when every target lies in its
    window (window_histogram_kernel decides).

    GRAM_STORE (small B): the first launch keeps both models' tiles in the Gram cache for the
    later passes (_pass_tile); a tail launch computes its tiles again."""
    pid_m, pid_n = _tile_program()
    if pid_n < pid_m:  # lower-triangle tiles hold no pair i < j (a square grid's)
        return
    if PART == TAIL_BUCKETS:
        if tl.load(state_ptr + FALLBACK) == 0:
            return
    rows, cols, row_mask, col_mask = _tile_indices(pid_m, pid_n, batch, TILE)
    _, negative = _pair_masks(labels_ptr, rows, cols, row_mask, col_mask)
    copy = ((pid_m + pid_n) % num_copies).to(tl.int64) * NUM_BUCKETS
    gram: tl.constexpr = GRAM if PART != TAIL_BUCKETS else GRAM_OFF
    # One model's tile at a time: fewer live registers than both tiles at once.
    a = _pass_tile(s_ptr, s_inv_ptr, s_gram_ptr, pid_m, pid_n, rows, cols, row_mask, col_mask, dim_s, TILE, BLOCK_K,
                   S_PRECISION, gram)
    key = _descending_key(a)
    bins = (key >> RADIX_BITS).to(tl.int32)
    _histogram_part(hist_s_ptr + copy, bins, negative, state_ptr, 0, PART)
    if WINDOWS:
        if PART != TAIL_BUCKETS:  # (the first launch sees every tile)
            _window_keys(key, bins, negative, window_ptr, num_s_targets, window_count_ptr, window_key_ptr,
                         window_capacity)
            if COLLECT:  # the top-N window (the student's last target) and above
                _collect_candidates(key, rows, cols, negative, tl.load(window_ptr + 2 * num_s_targets - 1),
                                    candidate_count_ptr, candidate_key_ptr, candidate_rows_ptr, candidate_cols_ptr,
                                    capacity, TILE, True)
    b = _pass_tile(t_ptr, t_inv_ptr, t_gram_ptr, pid_m, pid_n, rows, cols, row_mask, col_mask, dim_t, TILE, BLOCK_K,
                   T_PRECISION, gram)
    key = _descending_key(b)
    bins = (key >> RADIX_BITS).to(tl.int32)
    _histogram_part(hist_t_ptr + copy, bins, negative, state_ptr, 1, PART)
    if WINDOWS:
        if PART != TAIL_BUCKETS:
            _window_keys(key, bins, negative, window_ptr + 2 * num_s_targets, num_t_targets, window_count_ptr + 1,
                         window_key_ptr + window_capacity, window_capacity)
    if PART != TAIL_BUCKETS:  # L is counted once, in the first launch
        num_negative = tl.sum(tl.sum(negative.to(tl.int32), axis=1), axis=0)
        tl.atomic_add(state_ptr + NUM_NEGATIVE, num_negative.to(tl.int64), sem="relaxed")


@triton.jit
def _bin_counts(hist_ptr, index, num_copies):
    """int64 counts of bins `index` (0 past the last bin), summed over the histogram's
    `num_copies` copies, NUM_BUCKETS apart (integer sums: exact)."""
    mask = index < NUM_BUCKETS
    counts = tl.load(hist_ptr + index, mask=mask, other=0).to(tl.int64)
    for copy in range(1, num_copies):
        counts += tl.load(hist_ptr + copy * NUM_BUCKETS + index, mask=mask, other=0).to(tl.int64)
    return counts


@triton.jit
def _histogram_rank(hist_ptr, rank, num_copies, SCAN_BLOCK: tl.constexpr, LINEAR_SCAN: tl.constexpr = 0):
    """(bin, count before it) of the element of descending rank `rank` in a 65536-bin histogram
    counted from the top: searchsorted(cumsum(hist), rank, right=True) clamped to the last bin,
    i.e. the number of bins whose running total is <= rank (the running totals never decrease,
    so those bins are a prefix), and the sum of their counts.  The histogram is the sum of
    `num_copies` copies, NUM_BUCKETS apart.

    In three levels: the totals of blocks of SCAN_BLOCK bins, in bin order, up to the block where
    the running total passes `rank` (no later bin can count; until then every bin counted), each
    summed from the totals of its groups of SCAN_GROUP bins; the running sum of the found block's
    group totals; in the group found, its bins' running sum.  Why: a scan's step is a chain of
    dependent latencies (load, reduce, decide), and the earlier one-level scan ran a
    SCAN_BLOCK-wide cumulative sum and two reductions at every step (its programs took 19-65 us
    at 0.2-1.4% of the SM, bench/NOTES.md); a step is now one load and its sums, and two small
    scans finish.  The same (bin, count) either way (integer counts); LINEAR_SCAN=1 keeps the
    one-level scan for the benchmark's A/B (triton_ekd.SELECT_LINEAR_SCAN)."""
    if LINEAR_SCAN:
        index, above = _histogram_rank_linear(hist_ptr, rank, num_copies, SCAN_BLOCK)
    else:
        index, above = _histogram_rank_levels(hist_ptr, rank, num_copies, SCAN_BLOCK)
    return index, above


@triton.jit
def _histogram_rank_levels(hist_ptr, rank, num_copies, SCAN_BLOCK: tl.constexpr):
    """_histogram_rank in three levels (blocks, groups, bins)."""
    tl.static_assert(tl.constexpr(SCAN_BLOCK) % SCAN_GROUP == 0)
    groups: tl.constexpr = tl.constexpr(SCAN_BLOCK) // SCAN_GROUP
    above = rank * 0  # count of the blocks before `block`
    block = above     # the block where the running total passes rank (NUM_BUCKETS / SCAN_BLOCK: none does)
    # the group totals of the block found, kept from its step (no second read of the block)
    group_total = tl.zeros((groups,), dtype=tl.int64)
    group_bins = tl.arange(0, groups)[:, None] * SCAN_GROUP + tl.arange(0, SCAN_GROUP)[None, :]
    for start in range(0, NUM_BUCKETS, SCAN_BLOCK):
        if block * SCAN_BLOCK == start:  # not found yet
            totals = tl.sum(_bin_counts(hist_ptr, start + group_bins, num_copies), axis=1)
            total = tl.sum(totals, axis=0)
            if above + total <= rank:
                above += total
                block += 1
            else:
                group_total = totals
    # Past the last block (none passed rank: every bin counted) the group totals stay 0, the
    # loads below read zeros and the index passes the last bin: clamped to it, with the whole
    # total before it.
    before = above + tl.cumsum(group_total, axis=0) <= rank
    group = tl.sum(before.to(tl.int64), axis=0)
    above += tl.sum(tl.where(before, group_total, 0), axis=0)
    first_bin = block * SCAN_BLOCK + group * SCAN_GROUP
    bins = first_bin + tl.arange(0, SCAN_GROUP)
    counts = _bin_counts(hist_ptr, bins, num_copies)
    before = above + tl.cumsum(counts, axis=0) <= rank
    index = first_bin + tl.sum(before.to(tl.int64), axis=0)
    above += tl.sum(tl.where(before, counts, 0), axis=0)
    return tl.minimum(index, NUM_BUCKETS - 1), above


@triton.jit
def _histogram_rank_linear(hist_ptr, rank, num_copies, SCAN_BLOCK: tl.constexpr):
    """_histogram_rank as one level: a blocked scan in bin order that stops after the first
    block where a bin's running total passes `rank`; until then every bin counted, so the count
    before the block is the running total.  (The scan before the three levels, for the A/B.)"""
    index = rank * 0
    above = index
    start = index
    while (start < NUM_BUCKETS) & (index == start):
        counts = _bin_counts(hist_ptr, start + tl.arange(0, SCAN_BLOCK), num_copies)
        before = above + tl.cumsum(counts, axis=0) <= rank
        index += tl.sum(before.to(tl.int64), axis=0)
        above += tl.sum(tl.where(before, counts, 0), axis=0)
        start += SCAN_BLOCK
    return tl.minimum(index, NUM_BUCKETS - 1), above


@triton.jit
def _floor_fraction(n, p, q):
    """floor(n p / q) for int64 n >= 0 and 0 <= p <= q < 2^40, without forming n p (past 2^63 at
    B of a few thousand for an FPR such as 0.999999999999, p = 999999999999): with r = n mod q
    and p = p1 2^20 + p0, n p = (n // q) q p + r p1 2^20 + r p0, and r p1 = a q + b (b < q), so
    floor(n p / q) = (n // q) p + a 2^20 + floor((b 2^20 + r p0) / q), every product below 2^61.
    Exact: integers throughout (csrc's threshold_index does it in 128 bits)."""
    r = n % q
    p1 = p >> 20
    p0 = p & 0xFFFFF
    high = r * p1
    return (n // q) * p + (high // q) * 1048576 + ((high % q) * 1048576 + r * p0) // q


@triton.jit
def coarse_select_kernel(coarse_ptr, num_copies, fine_ptr, state_ptr, fractions_ptr, num_thresholds, num_targets,
                         num_hard_negatives, capacity, bucket_ptr, target_state_ptr, nonfinite_ptr, num_nonfinite,
                         HARDEST: tl.constexpr, SCAN_BLOCK: tl.constexpr, CUTOFF_MODE: tl.constexpr = 0,
                         LINEAR_SCAN: tl.constexpr = 0):
    """Between passes 1 and 2, program (target, model): the wanted descending rank, its 16-bit
    bucket, its rank inside the bucket and the count above the bucket.

    Targets 0..K-1 are the thresholds, m_k = floor(L * p_k / q_k) with the FPRs' exact rationals
    (fractions = [[p], [q]]); with HARDEST, target K of the student is the N-th hardest negative
    (rank min(N, L) - 1), whose program also decides whether the top-N candidates fit their
    buffer (selection state OVERFLOW).  Ranks are clamped to [0, L - 1], as the reference's
    index into the sorted negatives.  Each program zeroes its fine histogram for pass 2.

    Program (0, 0) also sums normalise_kernel's per-program counts of non-finite elements into
    the selection state (NONFINITE), which the EMA update and the loss read.

    After pass 1 counted only the head buckets (CHECK_CUTOFF), a program whose target lies past
    its model's cutoff sets FALLBACK; its outputs are then rewritten by the launch with
    AFTER_FALLBACK, whose programs return at once unless FALLBACK is set (coarse_histogram_kernel).
    """
    target = tl.program_id(0)
    model = tl.program_id(1)
    if CUTOFF_MODE == AFTER_FALLBACK:
        if tl.load(state_ptr + FALLBACK) == 0:
            return
    if (target == 0) & (model == 0):
        # int64 lanes: B * (Ds + Dt) non-finite elements can pass 2^32, and a wrap to exactly 0
        # would read as a finite batch (and update the EMA state).
        nonfinite = tl.zeros((SCAN_BLOCK,), dtype=tl.int64)
        for start in range(0, num_nonfinite, SCAN_BLOCK):
            index = start + tl.arange(0, SCAN_BLOCK)
            nonfinite += tl.load(nonfinite_ptr + index, mask=index < num_nonfinite, other=0).to(tl.int64)
        tl.store(state_ptr + NONFINITE, tl.sum(nonfinite, axis=0))
    if (model == 1) & (target >= num_thresholds):  # the teacher has no top-N target
        return
    slot = model * num_targets + target
    num_negative = tl.load(state_ptr + NUM_NEGATIVE)
    num_selected = tl.minimum(num_negative, num_hard_negatives)
    is_threshold = target < num_thresholds
    numerator = tl.load(fractions_ptr + target, mask=is_threshold, other=0)
    denominator = tl.load(fractions_ptr + num_thresholds + target, mask=is_threshold, other=1)
    rank = tl.where(is_threshold, _floor_fraction(num_negative, numerator, denominator), num_selected - 1)
    rank = tl.maximum(tl.minimum(rank, num_negative - 1), 0)
    hist_ptr = coarse_ptr + model * num_copies * NUM_BUCKETS  # the model's copies (coarse_histogram_kernel)
    bucket, above = _histogram_rank(hist_ptr, rank, num_copies, SCAN_BLOCK, LINEAR_SCAN)
    if CUTOFF_MODE == CHECK_CUTOFF:
        # Every bucket up to the cutoff is complete; past it the counts are missing (and with no
        # negative at all, the whole-histogram answer is the same empty scan).
        if (bucket > tl.load(state_ptr + CUTOFF + model)) & (num_negative > 0):
            tl.atomic_max(state_ptr + FALLBACK, 1, sem="relaxed")
    tl.store(bucket_ptr + slot, bucket.to(tl.int32))
    tl.store(target_state_ptr + 2 * slot, rank - above)
    tl.store(target_state_ptr + 2 * slot + 1, above)
    if HARDEST:
        if target == num_thresholds:
            # Every candidate (a negative in the boundary's bucket or above) fits, or pass 2
            # gathers none and passes 3 and 4 select from recomputed tiles.
            at_or_above = above
            for copy in range(0, num_copies):
                at_or_above += tl.load(hist_ptr + copy * NUM_BUCKETS + bucket)
            tl.store(state_ptr + OVERFLOW, (at_or_above > capacity).to(tl.int64))
            tl.store(state_ptr + NUM_SELECTED, num_selected)
    fine_row = fine_ptr + slot.to(tl.int64) * NUM_BUCKETS
    for start in range(0, NUM_BUCKETS, SCAN_BLOCK):
        tl.store(fine_row + start + tl.arange(0, SCAN_BLOCK), tl.zeros((SCAN_BLOCK,), dtype=tl.int32))


@triton.jit
def _histogram_add_if_any(hist_ptr, bins, mask, SKIP_EMPTY: tl.constexpr, DIRECT_MAX: tl.constexpr):
    """_histogram_add, which SKIP_EMPTY skips when nothing in the tile is counted: one count of
    the tile instead of the aggregation's reductions and atomics.  In pass 2 most tiles hold no
    pair of a deep target's bucket (at B = 8192, D = 512, about one tile in four holds a pair of
    the FPR-1e-3 bucket, fewer below), and the per-target aggregation was the bulk of the pass's
    work (bench/NOTES.md, the second GPU run's ncu).

    DIRECT_MAX > 0 (with SKIP_EMPTY): a tile counting at most that many elements adds them by
    per-element atomics without the aggregation's reductions (a handful of pairs a tile is pass
    2's usual case); above it, the aggregation keeps a tile of equal bins (collapsed
    similarities) at one atomic.  The same counts either way."""
    if SKIP_EMPTY:
        count = tl.sum(tl.sum(mask.to(tl.int32), axis=1), axis=0)
        if count > DIRECT_MAX:
            _histogram_add(hist_ptr, bins, mask)
        elif DIRECT_MAX > 0:  # (a constexpr test: at 0 nothing is compiled here)
            if count > 0:
                tl.atomic_add(hist_ptr + bins, 1, mask=mask, sem="relaxed")
    else:
        _histogram_add(hist_ptr, bins, mask)


@triton.jit
def _fine_histograms(hist_ptr, target_bucket_ptr, num_targets, key, negative, SKIP_EMPTY: tl.constexpr,
                     ONE_AGGREGATION: tl.constexpr, DIRECT_MAX: tl.constexpr):
    """For each target rank: histogram of the low 16 key bits of the elements in its bucket.

    ONE_AGGREGATION: one histogram add for all targets instead of one per target.  A pair lies
    in one bucket, so it belongs to the histogram row of the first target with that bucket
    (targets sharing a bucket share that row: fine_select_kernel reads it); the per-target work
    shrinks to a compare and a select, and the aggregation's reductions and atomics run once a
    tile (bins row x 65536 + low: the host keeps num_targets x 65536 within int32)."""
    high = (key >> RADIX_BITS).to(tl.int32)
    low = (key & 0xFFFF).to(tl.int32)
    if ONE_AGGREGATION:
        row = tl.zeros_like(high) - 1
        for target in range(num_targets):
            bucket = tl.load(target_bucket_ptr + target)
            row = tl.where((row < 0) & (high == bucket), target, row)
        counted = negative & (row >= 0)
        _histogram_add_if_any(hist_ptr, tl.where(counted, row * NUM_BUCKETS + low, 0), counted, SKIP_EMPTY,
                              DIRECT_MAX)
        return
    for target in range(num_targets):
        bucket = tl.load(target_bucket_ptr + target)
        counted = negative & (high == bucket)
        # (where: the bins, hence their pointers, then depend on the target; with it pass 2 no
        # longer spills on sm_90a, 20-32 B without: tools/kernel_registers.py)
        _histogram_add_if_any(hist_ptr + target * NUM_BUCKETS, tl.where(counted, low, 0), counted, SKIP_EMPTY,
                              DIRECT_MAX)


@triton.jit
def _collect_candidates(key, rows, cols, negative, boundary_bucket, candidate_count_ptr, candidate_key_ptr,
                        candidate_rows_ptr, candidate_cols_ptr, capacity, TILE: tl.constexpr,
                        SKIP_EMPTY: tl.constexpr):
    """Append the tile's negatives at or above the top-N boundary bucket to the candidate buffer.

    Slots come from one integer atomic per tile, so their order varies from run to run;
    hardest_negatives_kernel ranks the candidates by (key class, row, col), which makes the
    selection deterministic.  Called only when pass 1 showed that every candidate fits in
    `capacity`.  SKIP_EMPTY: a tile without a candidate (most: the top N lie in the first few
    buckets) skips the atomic, whose return the tile would wait for, and the prefix sums.
    """
    wanted = (negative & ((key >> RADIX_BITS).to(tl.int32) <= boundary_bucket)).to(tl.int32)
    per_row = tl.sum(wanted, axis=1)
    total = tl.sum(per_row, axis=0)
    # Two call sites, not one `if (total > 0) | (SKIP_EMPTY == 0)`: triton 3.2's interpreter
    # cannot turn the constexpr into a tensor (no get_int1_ty), and without SKIP_EMPTY this
    # compiles to the earlier pass 2's code, without a branch.
    if SKIP_EMPTY:
        if total > 0:
            _append_candidates(key, rows, cols, wanted, per_row, total, candidate_count_ptr, candidate_key_ptr,
                               candidate_rows_ptr, candidate_cols_ptr, capacity, TILE)
    else:
        _append_candidates(key, rows, cols, wanted, per_row, total, candidate_count_ptr, candidate_key_ptr,
                           candidate_rows_ptr, candidate_cols_ptr, capacity, TILE)


@triton.jit
def _append_candidates(key, rows, cols, wanted, per_row, total, candidate_count_ptr, candidate_key_ptr,
                       candidate_rows_ptr, candidate_cols_ptr, capacity, TILE: tl.constexpr):
    """_collect_candidates' slots and stores for the `wanted` elements (`per_row` a row, `total`
    in the tile)."""
    slot, write = _append_slots(wanted, per_row, total, candidate_count_ptr, capacity)
    tl.store(candidate_key_ptr + slot, key.to(tl.int64), mask=write)
    tl.store(candidate_rows_ptr + slot, tl.broadcast_to(rows[:, None], (TILE, TILE)), mask=write)
    tl.store(candidate_cols_ptr + slot, tl.broadcast_to(cols[None, :], (TILE, TILE)), mask=write)


@triton.jit
def _append_slots(wanted, per_row, total, count_ptr, capacity):
    """Buffer slots of a tile's `wanted` elements (int32 0/1; `per_row` of them a row, `total` in
    the tile) from one atomic on the buffer's count, and which of them fit (slot < capacity)."""
    base = tl.atomic_add(count_ptr, total, sem="relaxed")
    # Row-major slots: the wanted before a row, plus those before it in the row (the flat
    # tile's exclusive prefix sum, without flattening it: no layout conversion, fewer registers).
    slot = base + (tl.cumsum(per_row, axis=0) - per_row)[:, None] + tl.cumsum(wanted, axis=1) - wanted
    return slot, (wanted != 0) & (slot >= 0) & (slot < capacity)  # (>= 0: never below the buffer, even wrapped)


@triton.jit
def _window_miss(window_ptr, bucket_ptr, num_targets, window_count_ptr, window_capacity, candidate_count_ptr,
                 capacity, HARDEST: tl.constexpr):
    """Whether some target's exact bucket (coarse_select_kernel's, final after any fallback) lies
    outside its window, or a window buffer overflowed: the window keys of either model, or (with
    HARDEST) the top-N candidates of the student's window (counted in candidate_count_ptr[1])."""
    miss = (tl.load(window_count_ptr) > window_capacity) | (tl.load(window_count_ptr + 1) > window_capacity)
    teacher_targets = num_targets
    if HARDEST:
        miss = miss | (tl.load(candidate_count_ptr + 1) > capacity)
        teacher_targets = num_targets - 1  # (the teacher has no top-N target)
    for slot in range(num_targets):  # the student's, then the teacher's
        miss = miss | _outside_window(window_ptr, bucket_ptr, slot)
    for slot in range(num_targets, num_targets + teacher_targets):
        miss = miss | _outside_window(window_ptr, bucket_ptr, slot)
    return miss


@triton.jit
def _outside_window(window_ptr, bucket_ptr, slot):
    bucket = tl.load(bucket_ptr + slot)
    return (bucket < tl.load(window_ptr + 2 * slot)) | (bucket > tl.load(window_ptr + 2 * slot + 1))


@triton.jit
def window_histogram_kernel(state_ptr, window_ptr, window_count_ptr, window_key_ptr, window_capacity,
                            candidate_count_ptr, capacity, bucket_ptr, num_targets, fine_s_ptr, fine_t_ptr,
                            BLOCK: tl.constexpr, HARDEST: tl.constexpr, SKIP_EMPTY: tl.constexpr,
                            ONE_AGGREGATION: tl.constexpr, DIRECT_MAX: tl.constexpr):
    """Pass 2 from pass 1's window buffers (PASS1_WINDOWS), launched between coarse_select_kernel
    and fine_histogram_kernel.  Every program decides whether every target lay in its window
    (_window_miss, the same answer in all; program 0 records a miss as WINDOW_MISS for pass 2 and
    the selection).  Then, without a miss, program p histograms the keys of model (p mod 2) in
    BLOCK x BLOCK blocks p // 2, p // 2 + P / 2, ... (P programs) through a tile's per-target
    histograms (_fine_histograms): every key of every target's bucket is there.  After a miss the
    programs return and pass 2 recomputes the tiles."""
    miss = _window_miss(window_ptr, bucket_ptr, num_targets, window_count_ptr, window_capacity, candidate_count_ptr,
                        capacity, HARDEST)
    if miss:
        if tl.program_id(0) == 0:
            tl.store(state_ptr + WINDOW_MISS, 1)
        return
    model = tl.program_id(0) % 2
    fine_ptr = fine_s_ptr
    model_targets = num_targets
    if model == 1:
        fine_ptr = fine_t_ptr
        if HARDEST:  # (the teacher has no top-N target)
            model_targets = num_targets - 1
    filled = tl.minimum(tl.load(window_count_ptr + model), window_capacity)
    key_ptr = window_key_ptr + model * window_capacity
    offsets = tl.arange(0, BLOCK)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    for block in range(tl.program_id(0) // 2, tl.cdiv(filled, BLOCK * BLOCK), tl.num_programs(0) // 2):
        index = block * BLOCK * BLOCK + offsets
        valid = index < filled
        key = tl.load(key_ptr + index, mask=valid, other=0).to(tl.uint32, bitcast=True)
        _fine_histograms(fine_ptr, bucket_ptr + model * num_targets, model_targets, key, valid, SKIP_EMPTY,
                         ONE_AGGREGATION, DIRECT_MAX)


@triton.jit
def fine_histogram_kernel(s_ptr, t_ptr, s_inv_ptr, t_inv_ptr, labels_ptr, batch, dim_s, dim_t,
                          s_bucket_ptr, num_s_targets, t_bucket_ptr, num_t_targets, fine_s_ptr, fine_t_ptr,
                          selection_state_ptr, candidate_count_ptr, candidate_key_ptr, candidate_rows_ptr,
                          candidate_cols_ptr, capacity, gram_ptr, gram_stride,
                          COLLECT: tl.constexpr, TILE: tl.constexpr, BLOCK_K: tl.constexpr,
                          S_PRECISION: tl.constexpr, T_PRECISION: tl.constexpr, SKIP_EMPTY: tl.constexpr,
                          ONE_AGGREGATION: tl.constexpr, DIRECT_MAX: tl.constexpr, WINDOWS: tl.constexpr = 0,
                          GRAM: tl.constexpr = 0):
    """Pass 2 of the radix select: recompute the tiles (GRAM_LOAD: read them back from the Gram
    cache), refine inside each wanted bucket.
    After it, every wanted order statistic is known to the bit (32 = 16 + 16).

    With COLLECT (hardest negatives), it also gathers the top-N candidates when they fit the
    buffer (no OVERFLOW), which makes passes 3 and 4 unnecessary.

    WINDOWS: the programs return at once when every target lay in its window (no WINDOW_MISS):
    window_histogram_kernel has built the histograms from pass 1's window buffers.
    """
    s_gram_ptr, t_gram_ptr = gram_ptr, gram_ptr + gram_stride  # (each model's Gram cache)
    pid_m, pid_n = _tile_program()
    if pid_n < pid_m:  # (a square grid's lower triangle)
        return
    if WINDOWS:
        if tl.load(selection_state_ptr + WINDOW_MISS) == 0:
            return
    rows, cols, row_mask, col_mask = _tile_indices(pid_m, pid_n, batch, TILE)
    _, negative = _pair_masks(labels_ptr, rows, cols, row_mask, col_mask)
    a = _pass_tile(s_ptr, s_inv_ptr, s_gram_ptr, pid_m, pid_n, rows, cols, row_mask, col_mask, dim_s, TILE, BLOCK_K,
                   S_PRECISION, GRAM)
    key_a = _descending_key(a)
    _fine_histograms(fine_s_ptr, s_bucket_ptr, num_s_targets, key_a, negative, SKIP_EMPTY, ONE_AGGREGATION,
                     DIRECT_MAX)
    if COLLECT:
        if tl.load(selection_state_ptr + OVERFLOW) == 0:
            boundary_bucket = tl.load(s_bucket_ptr + num_s_targets - 1)
            _collect_candidates(key_a, rows, cols, negative, boundary_bucket, candidate_count_ptr,
                                candidate_key_ptr, candidate_rows_ptr, candidate_cols_ptr, capacity, TILE, SKIP_EMPTY)
    b = _pass_tile(t_ptr, t_inv_ptr, t_gram_ptr, pid_m, pid_n, rows, cols, row_mask, col_mask, dim_t, TILE, BLOCK_K,
                   T_PRECISION, GRAM)
    _fine_histograms(fine_t_ptr, t_bucket_ptr, num_t_targets, _descending_key(b), negative, SKIP_EMPTY,
                     ONE_AGGREGATION, DIRECT_MAX)


# --------------------------------------------------------------------------- stage 3b: EMA
@triton.jit
def _ema_update(previous_ptr, previous_stride, new_ptr, batch_ptr, used_ptr, index, batch_value, ema_ptr, valid):
    """reference.ema_update for one threshold, in the state's dtype and the reference's
    operation order: momentum * e + (1 - momentum) * t where `valid`, t elsewhere.  The two
    coefficients come rounded from float64 (ema_ptr), as torch rounds a Python scalar."""
    previous = tl.load(previous_ptr + index * previous_stride)
    momentum = tl.load(ema_ptr).to(previous.dtype)
    keep = tl.load(ema_ptr + 1).to(previous.dtype)
    updated = momentum * batch_value.to(previous.dtype) + keep * previous
    new = tl.where(valid, updated, previous)
    tl.store(batch_ptr + index, batch_value.to(previous.dtype))
    tl.store(new_ptr + index, new)
    tl.store(used_ptr, new.to(tl.float32))


@triton.jit
def fine_select_kernel(fine_ptr, bucket_ptr, target_state_ptr, state_ptr, num_thresholds, num_targets,
                       update_thresholds,
                       previous_s_ptr, previous_s_stride, previous_t_ptr, previous_t_stride,
                       new_s_ptr, new_t_ptr, batch_s_ptr, batch_t_ptr, used_ptr, ema_ptr,
                       selected_rows_ptr, selected_cols_ptr, num_slots, batch,
                       SCAN_BLOCK: tl.constexpr, FILL_BLOCK: tl.constexpr, ONE_AGGREGATION: tl.constexpr,
                       LINEAR_SCAN: tl.constexpr = 0):
    """After pass 2, program (target, model): the exact key of the target's rank, then

    - a threshold target: the batch threshold (NaN when L = 0 or the batch is not finite), the EMA update of that
      threshold (only when the embeddings are finite, L > 0 and update_thresholds: one bad
      batch must not poison the state) and its fp32 copy for the loss kernels (thresholds_used);
    - the top-N target: the boundary key and the number of negatives strictly above it, and
      every selected slot set empty (row = col = batch) for the selection to fill.
    """
    target = tl.program_id(0)
    model = tl.program_id(1)
    if (model == 1) & (target >= num_thresholds):
        return
    slot = model * num_targets + target
    bucket = tl.load(bucket_ptr + slot).to(tl.int64)
    rank_in_bucket = tl.load(target_state_ptr + 2 * slot)
    above = tl.load(target_state_ptr + 2 * slot + 1)
    histogram_slot = slot
    if ONE_AGGREGATION:  # the row of the first target with this bucket (_fine_histograms)
        first = target
        for earlier in range(0, target):
            same = tl.load(bucket_ptr + model * num_targets + earlier).to(tl.int64) == bucket
            first = tl.where(same & (first == target), earlier, first)
        histogram_slot = model * num_targets + first
    low, above_in_bucket = _histogram_rank(fine_ptr + histogram_slot.to(tl.int64) * NUM_BUCKETS, rank_in_bucket, 1,
                                           SCAN_BLOCK, LINEAR_SCAN)
    key = bucket * NUM_BUCKETS + low
    num_negative = tl.load(state_ptr + NUM_NEGATIVE)
    if target < num_thresholds:
        finite = tl.load(state_ptr + NONFINITE) == 0
        # NaN without negatives, and for a non-finite batch (its statistics read as NaN on every backend)
        batch_value = tl.where((num_negative > 0) & finite, _key_to_float(key), _nan())
        valid = finite & (num_negative > 0) & (update_thresholds != 0)
        if model == 0:
            _ema_update(previous_s_ptr, previous_s_stride, new_s_ptr, batch_s_ptr, used_ptr + target, target,
                        batch_value, ema_ptr, valid)
        else:
            _ema_update(previous_t_ptr, previous_t_stride, new_t_ptr, batch_t_ptr, used_ptr + num_thresholds + target,
                        target, batch_value, ema_ptr, valid)
    else:
        num_selected = tl.load(state_ptr + NUM_SELECTED)
        tl.store(state_ptr + NUM_GREATER, tl.minimum(above + above_in_bucket, num_selected))
        tl.store(state_ptr + BOUNDARY, key)
        for start in range(0, num_slots, FILL_BLOCK):
            slots = start + tl.arange(0, FILL_BLOCK)
            empty = tl.full((FILL_BLOCK,), batch, dtype=tl.int64)
            tl.store(selected_rows_ptr + slots, empty, mask=slots < num_slots)
            tl.store(selected_cols_ptr + slots, empty, mask=slots < num_slots)


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
                          state_ptr, row_greater_ptr, row_equal_ptr, st_ptr, tt_ptr, num_thresholds,
                          gram_ptr, gram_stride,
                          COUNT_HARD: tl.constexpr, COUNT_CRITICAL: tl.constexpr,
                          TILE: tl.constexpr, BLOCK_K: tl.constexpr,
                          S_PRECISION: tl.constexpr, T_PRECISION: tl.constexpr, GRAM: tl.constexpr = 0):
    """Pass 3: on request, the number of critical pairs among all pairs (the critical ratio);
    and, only when the candidates overflowed their buffer (decided on the device), per row, how
    many negatives lie strictly above / exactly at the N-th largest student similarity: their
    prefix sums place the writes of pass 4 without atomics."""
    s_gram_ptr, t_gram_ptr = gram_ptr, gram_ptr + gram_stride  # (each model's Gram cache)
    pid_m, pid_n = _tile_program()
    overflow = tl.load(state_ptr + OVERFLOW) != 0
    work = (pid_n >= pid_m).to(tl.int32)  # lower-triangle tiles hold no pair i < j (a square grid's)
    if not COUNT_CRITICAL:
        work = work * overflow.to(tl.int32)
    if work == 0:
        return
    rows, cols, row_mask, col_mask = _tile_indices(pid_m, pid_n, batch, TILE)
    upper, negative = _pair_masks(labels_ptr, rows, cols, row_mask, col_mask)
    a = _pass_tile(s_ptr, s_inv_ptr, s_gram_ptr, pid_m, pid_n, rows, cols, row_mask, col_mask, dim_s, TILE, BLOCK_K,
                   S_PRECISION, GRAM)
    if COUNT_HARD:
        if overflow:
            key = _descending_key(a)
            boundary = tl.load(state_ptr + BOUNDARY).to(tl.uint32)
            greater = (negative & (key < boundary)).to(tl.int32)
            equal = (negative & (key == boundary)).to(tl.int32)
            tl.atomic_add(row_greater_ptr + rows, tl.sum(greater, axis=1), mask=row_mask, sem="relaxed")
            tl.atomic_add(row_equal_ptr + rows, tl.sum(equal, axis=1), mask=row_mask, sem="relaxed")
    if COUNT_CRITICAL:
        b = _pass_tile(t_ptr, t_inv_ptr, t_gram_ptr, pid_m, pid_n, rows, cols, row_mask, col_mask, dim_t, TILE,
                       BLOCK_K, T_PRECISION, GRAM)
        critical = (upper & _is_critical(a, b, st_ptr, tt_ptr, num_thresholds)).to(tl.int32)
        tl.atomic_add(state_ptr + CRITICAL_ALL, tl.sum(tl.sum(critical, axis=1), axis=0).to(tl.int64), sem="relaxed")


@triton.jit
def _rows_before(count_ptr, rows, row_mask, first_row, BLOCK: tl.constexpr):
    """(count of each row, exclusive prefix sum over all rows): the prefix over the rows before
    the block is summed here, in fixed order, instead of by a separate cumsum."""
    counts = tl.load(count_ptr + rows, mask=row_mask, other=0)
    # int64: the ties at the boundary before a row can be nearly all L pairs (collapsed
    # embeddings), past 2^31 from B = 65537 on; a row's own count (<= B) stays int32.
    before = tl.zeros((BLOCK,), dtype=tl.int64)
    for start in range(0, first_row, BLOCK):
        index = start + tl.arange(0, BLOCK)
        before += tl.load(count_ptr + index, mask=index < first_row, other=0).to(tl.int64)
    return counts, tl.sum(before, axis=0) + tl.cumsum(counts.to(tl.int64), axis=0) - counts


@triton.jit
def _write_from_tiles(pid, s_ptr, s_inv_ptr, labels_ptr, batch, dim_s, state_ptr, row_greater_ptr, row_equal_ptr,
                      selected_rows_ptr, selected_cols_ptr, s_gram_ptr, TILE: tl.constexpr, BLOCK_K: tl.constexpr,
                      S_PRECISION: tl.constexpr, PREFIX_BLOCK: tl.constexpr, GRAM: tl.constexpr):
    """Pass 4 (only after a candidate overflow): write the N hardest negatives (i, j).

    Every negative above the boundary is taken; ties at the boundary are taken in row-major
    order until N are written, so the set is the same run after run.  A program walks its rows'
    column tiles left to right, so running counts plus in-tile prefix sums give each pair its
    slot; row blocks with nothing to write skip the loop (decided on the device).
    """
    rows = pid * TILE + tl.arange(0, TILE)
    row_mask = rows < batch
    num_selected = tl.load(state_ptr + NUM_SELECTED).to(tl.int32)
    num_greater = tl.load(state_ptr + NUM_GREATER).to(tl.int32)
    boundary = tl.load(state_ptr + BOUNDARY).to(tl.uint32)
    ties_needed = num_selected - num_greater
    greater_count, greater_seen = _rows_before(row_greater_ptr, rows, row_mask, pid * TILE, PREFIX_BLOCK)
    equal_count, equal_seen = _rows_before(row_equal_ptr, rows, row_mask, pid * TILE, PREFIX_BLOCK)
    # The int64 prefixes clamped to what a row can still take (a row at or past the clamp takes
    # nothing, as at its true prefix), then int32: the tile loop adds at most B per row, and
    # N + B < 2^31 (triton_ekd's limits), so its slot arithmetic stays 32-bit.
    greater_seen = tl.minimum(greater_seen, num_selected).to(tl.int32)
    equal_seen = tl.minimum(equal_seen, ties_needed).to(tl.int32)
    wanted = (greater_count > 0) | ((equal_count > 0) & (equal_seen < ties_needed))
    col_end = tl.where(tl.max(wanted.to(tl.int32), axis=0) > 0, batch, 0)
    for col_start in range(pid * TILE, col_end, TILE):
        cols = col_start + tl.arange(0, TILE)
        col_mask = cols < batch
        _, negative = _pair_masks(labels_ptr, rows, cols, row_mask, col_mask)
        a = _pass_tile(s_ptr, s_inv_ptr, s_gram_ptr, pid, col_start // TILE, rows, cols, row_mask, col_mask, dim_s,
                       TILE, BLOCK_K, S_PRECISION, GRAM)
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
        tl.store(selected_rows_ptr + slot, tl.broadcast_to(rows[:, None], (TILE, TILE)).to(tl.int64), mask=take)
        tl.store(selected_cols_ptr + slot, tl.broadcast_to(cols[None, :], (TILE, TILE)).to(tl.int64), mask=take)
        greater_seen += tl.sum(greater32, axis=1)
        equal_seen += tl.sum(equal32, axis=1)


@triton.jit
def _candidate_order(candidate_key_ptr, candidate_rows_ptr, candidate_cols_ptr, index, mask, boundary, batch):
    """(order key, class) of candidates: class 0 above the boundary, 1 at it, 2 below (in the
    boundary's bucket), 3 no candidate; the order key (class, row, col) is unique per pair."""
    key = tl.load(candidate_key_ptr + index, mask=mask, other=0)
    row = tl.load(candidate_rows_ptr + index, mask=mask, other=0).to(tl.int64)
    col = tl.load(candidate_cols_ptr + index, mask=mask, other=0).to(tl.int64)
    kind = tl.where(key < boundary, 0, tl.where(key == boundary, 1, 2))
    kind = tl.where(mask, kind, 3).to(tl.int64)
    span = batch + 1
    return (kind * span + row) * span + col, kind, row, col


@triton.jit
def _rank_candidates(pid, batch, state_ptr, candidate_count_ptr, candidate_key_ptr, candidate_rows_ptr,
                     candidate_cols_ptr, capacity, selected_rows_ptr, selected_cols_ptr,
                     BLOCK_C: tl.constexpr, CHUNK: tl.constexpr):
    """The usual path: candidate c goes to slot rank(c) = #candidates before it in
    (class, row, col) order, taken when it is above or at the boundary and rank < min(N, L):
    every candidate above the boundary, then the ties in (row, col) order, which is the order
    pass 4 writes too.  The rank is counted against every candidate (a fixed-order integer sum):
    the selection does not depend on the order the atomics filled the buffer in.

    Cost: filled^2 integer comparisons over cdiv(capacity, BLOCK_C) programs; the usual fill is
    about N plus the rest of the boundary's bucket (a few million comparisons at N = 2000).  For
    N in the tens of thousands a sort would scale better."""
    filled = tl.minimum(tl.load(candidate_count_ptr), capacity)
    if pid * BLOCK_C < filled:
        boundary = tl.load(state_ptr + BOUNDARY)
        num_selected = tl.load(state_ptr + NUM_SELECTED)
        index = pid * BLOCK_C + tl.arange(0, BLOCK_C)
        order, kind, row, col = _candidate_order(candidate_key_ptr, candidate_rows_ptr, candidate_cols_ptr, index,
                                                 index < filled, boundary, batch)
        rank = tl.zeros((BLOCK_C,), dtype=tl.int32)
        for start in range(0, filled, CHUNK):
            other = start + tl.arange(0, CHUNK)
            other_order, _, _, _ = _candidate_order(candidate_key_ptr, candidate_rows_ptr, candidate_cols_ptr, other,
                                                    other < filled, boundary, batch)
            rank += tl.sum((other_order[None, :] < order[:, None]).to(tl.int32), axis=1)
        take = (kind < 2) & (rank < num_selected)
        tl.store(selected_rows_ptr + rank, row, mask=take)
        tl.store(selected_cols_ptr + rank, col, mask=take)


@triton.jit
def hardest_negatives_kernel(s_ptr, s_inv_ptr, labels_ptr, batch, dim_s, state_ptr, row_greater_ptr, row_equal_ptr,
                             candidate_count_ptr, candidate_key_ptr, candidate_rows_ptr, candidate_cols_ptr, capacity,
                             selected_rows_ptr, selected_cols_ptr, s_gram_ptr,
                             TILE: tl.constexpr, BLOCK_K: tl.constexpr, S_PRECISION: tl.constexpr,
                             BLOCK_C: tl.constexpr, CHUNK: tl.constexpr, PREFIX_BLOCK: tl.constexpr,
                             WINDOWS: tl.constexpr = 0, GRAM: tl.constexpr = 0):
    """The N hardest negatives (i, j) in their slots (fine_select_kernel set them empty first):
    ranked from the candidates, or after an overflow (decided on the device) pass 4 from
    recomputed tiles.  One launch for both paths: the programs of the other path return.

    WINDOWS: without a WINDOW_MISS the candidates are pass 1's (counted in the second counter),
    which may include negatives below the boundary's bucket: ranked after every candidate at or
    above the boundary, they are never taken."""
    pid = tl.program_id(0)
    if WINDOWS:
        candidate_count_ptr += (tl.load(state_ptr + WINDOW_MISS) == 0).to(tl.int32)
    if tl.load(state_ptr + OVERFLOW) != 0:
        if pid * TILE < batch:
            _write_from_tiles(pid, s_ptr, s_inv_ptr, labels_ptr, batch, dim_s, state_ptr, row_greater_ptr,
                              row_equal_ptr, selected_rows_ptr, selected_cols_ptr, s_gram_ptr, TILE, BLOCK_K,
                              S_PRECISION, PREFIX_BLOCK, GRAM)
    else:
        _rank_candidates(pid, batch, state_ptr, candidate_count_ptr, candidate_key_ptr, candidate_rows_ptr,
                         candidate_cols_ptr, capacity, selected_rows_ptr, selected_cols_ptr, BLOCK_C, CHUNK)


# --------------------------------------------------------------------------- stage 5: rank loss
@triton.jit
def _clamped_sigmoid(x, temperature):
    """(sigmoid, d sigmoid / dx) of x / tau with the exponent clamped to [-50, 50], as the
    reference: 1 / (1 + exp(clamp(-x / tau))), gradient zero where the clamp is active.
    The derivative is written sig^2 * e / tau, not sig * (1 - sig) / tau, which cancels.
    The clamp by comparisons, not tl.maximum / tl.minimum, which return the other operand of a
    NaN (a NaN threshold in the state the caller passed): a NaN stays NaN, as in the reference's
    torch.clamp and the csrc op."""
    scaled = -x / temperature
    exponent = tl.where(scaled < -SIGMOID_CLAMP, -SIGMOID_CLAMP,
                        tl.where(scaled > SIGMOID_CLAMP, SIGMOID_CLAMP, scaled))
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
def _positive_block(pid, s_ptr, t_ptr, s_inv_ptr, t_inv_ptr, labels_ptr, batch, dim_s, dim_t,
                    st_ptr, tt_ptr, num_thresholds, temperature, partial_loss_ptr, partial_critical_ptr,
                    s_gram_ptr, t_gram_ptr,
                    RANK_LOSS: tl.constexpr, CRITICAL_ONLY: tl.constexpr, TILE: tl.constexpr,
                    BLOCK_K: tl.constexpr, S_PRECISION: tl.constexpr, T_PRECISION: tl.constexpr,
                    LABEL_BLOCK: tl.constexpr, GRAM: tl.constexpr):
    """Positive term, per row block: sum of the per-pair loss over its positive pairs i < j
    (critical ones only in the Eq. 5 variant) and its number of critical positives.

    Rows are sorted by label, so a block's positives lie in columns [block start, group end of
    its last row): the scan costs sum of group sizes, not B, per row.  One partial per
    program, summed in a fixed order by finalize_kernel.
    """
    rows = pid * TILE + tl.arange(0, TILE)
    row_mask = rows < batch
    last_row = tl.minimum(pid * TILE + TILE, batch) - 1
    col_end = _group_end(labels_ptr, last_row, batch, LABEL_BLOCK)
    loss_sum = tl.zeros((TILE,), dtype=tl.float32)
    critical_sum = tl.zeros((TILE,), dtype=tl.int32)
    for col_start in range(pid * TILE, col_end, TILE):
        cols = col_start + tl.arange(0, TILE)
        col_mask = cols < batch
        upper, negative = _pair_masks(labels_ptr, rows, cols, row_mask, col_mask)
        positive = upper & (negative == 0)  # not `~negative`: triton 3.2's interpreter lacks ~ on bools
        a = _pass_tile(s_ptr, s_inv_ptr, s_gram_ptr, pid, col_start // TILE, rows, cols, row_mask, col_mask, dim_s,
                       TILE, BLOCK_K, S_PRECISION, GRAM)
        b = _pass_tile(t_ptr, t_inv_ptr, t_gram_ptr, pid, col_start // TILE, rows, cols, row_mask, col_mask, dim_t,
                       TILE, BLOCK_K, T_PRECISION, GRAM)
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
def _pair_similarities(x_ptr, inv_norm_ptr, i, j, valid, dim, TILE: tl.constexpr, BLOCK_K: tl.constexpr,
                       PRECISION: tl.constexpr):
    """<x_hat_i[p], x_hat_j[p]> for TILE pairs: the diagonal of the TILE x TILE similarity tile of
    rows i against rows j, i.e. the very _similarity_tile the tile passes run.  Why not a plain
    gathered dot: a pair's similarity must have the same bits here as in the passes that chose
    the thresholds and the hardest negatives.  A dot with another summation order rounds
    differently, and then the pair that is a threshold (momentum = 1: every batch threshold is
    some negative's similarity) would sit an ulp above or below itself and read as critical
    (a > t) where the reference reads it equal: another loss under critical_only.  The tile
    costs TILE times the dot's arithmetic, on N pairs (2000 by default): a few tile programs."""
    tile = _similarity_tile(x_ptr, inv_norm_ptr, i, j, valid, valid, dim, TILE, BLOCK_K, PRECISION)
    diagonal = tl.arange(0, TILE)[:, None] == tl.arange(0, TILE)[None, :]
    return tl.sum(tl.where(diagonal, tile, 0.0), axis=1)


@triton.jit
def _gram_pairs(gram_ptr, first, second, valid, TILE: tl.constexpr):
    """The similarities of pairs (first, second), first < second, from the Gram cache: entry
    (first mod TILE, second mod TILE) of tile (first // TILE, second // TILE) (_gram_offsets), the
    bits pass 1 computed, which _pair_similarities recomputes."""
    m = first // TILE
    n = second // TILE
    offset = _gram_tile_start(m, n, TILE) + (first % TILE) * TILE + second % TILE
    return tl.load(gram_ptr + offset, mask=valid, other=0.0)


@triton.jit
def _selected_block(pid, s_ptr, t_ptr, s_inv_ptr, t_inv_ptr, batch, dim_s, dim_t,
                    selected_rows_ptr, selected_cols_ptr, num_slots, position_ptr, random_rows_ptr, random_cols_ptr,
                    st_ptr, tt_ptr, num_thresholds, temperature, pair_loss_ptr, pair_grad_ptr, pair_flags_ptr,
                    s_gram_ptr, t_gram_ptr,
                    RANK_LOSS: tl.constexpr, RANDOM: tl.constexpr, BLOCK_P: tl.constexpr, TILE: tl.constexpr,
                    BLOCK_K: tl.constexpr, S_PRECISION: tl.constexpr, T_PRECISION: tl.constexpr,
                    GRAM: tl.constexpr):
    """Negative term: per selected pair (slot), the loss, d loss / d a and its flags (FILLED,
    CRITICAL), TILE slots at a time (BLOCK_P, a multiple of TILE, per program).  Unfilled slots
    (row index == batch) give zeros.  With RANDOM the slots are the reference's random draw, in
    original indices: mapped to sorted rows here and written out."""
    for start in range(0, BLOCK_P, TILE):
        slots = pid * BLOCK_P + start + tl.arange(0, TILE)
        slot_mask = slots < num_slots
        if RANDOM:
            i = tl.load(position_ptr + tl.load(random_rows_ptr + slots, mask=slot_mask, other=0), mask=slot_mask,
                        other=batch)
            j = tl.load(position_ptr + tl.load(random_cols_ptr + slots, mask=slot_mask, other=0), mask=slot_mask,
                        other=batch)
            tl.store(selected_rows_ptr + slots, i, mask=slot_mask)
            tl.store(selected_cols_ptr + slots, j, mask=slot_mask)
        else:
            i = tl.load(selected_rows_ptr + slots, mask=slot_mask, other=batch)
            j = tl.load(selected_cols_ptr + slots, mask=slot_mask, other=batch)
        valid = (i < batch) & (j < batch)
        # The tile passes hold a pair as (row, column) = (lower, higher sorted index); the random
        # draw may give it the other way round, and tf32x3's split terms are not symmetric.
        first = tl.minimum(i, j)
        second = tl.maximum(i, j)
        if GRAM == GRAM_LOAD:
            a = _gram_pairs(s_gram_ptr, first, second, valid, TILE)
            b = _gram_pairs(t_gram_ptr, first, second, valid, TILE)
        else:
            a = _pair_similarities(s_ptr, s_inv_ptr, first, second, valid, dim_s, TILE, BLOCK_K, S_PRECISION)
            b = _pair_similarities(t_ptr, t_inv_ptr, first, second, valid, dim_t, TILE, BLOCK_K, T_PRECISION)
        loss, loss_grad, critical = _pair_loss(a, b, st_ptr, tt_ptr, num_thresholds, temperature, RANK_LOSS)
        tl.store(pair_loss_ptr + slots, tl.where(valid, loss, 0.0), mask=slot_mask)
        tl.store(pair_grad_ptr + slots, tl.where(valid, loss_grad, 0.0), mask=slot_mask)
        flags = valid.to(tl.int32) * FILLED + (valid & critical).to(tl.int32) * CRITICAL
        tl.store(pair_flags_ptr + slots, flags, mask=slot_mask)


@triton.jit
def rank_loss_kernel(s_ptr, t_ptr, s_inv_ptr, t_inv_ptr, labels_ptr, batch, dim_s, dim_t,
                     st_ptr, tt_ptr, num_thresholds, temperature, num_row_blocks, partial_loss_ptr,
                     partial_critical_ptr, selected_rows_ptr, selected_cols_ptr, num_slots, position_ptr,
                     random_rows_ptr, random_cols_ptr, pair_loss_ptr, pair_grad_ptr, pair_flags_ptr,
                     gram_ptr, gram_stride,
                     RANK_LOSS: tl.constexpr, CRITICAL_ONLY: tl.constexpr, RANDOM: tl.constexpr,
                     TILE: tl.constexpr, BLOCK_K: tl.constexpr, S_PRECISION: tl.constexpr,
                     T_PRECISION: tl.constexpr, BLOCK_P: tl.constexpr, LABEL_BLOCK: tl.constexpr,
                     GRAM: tl.constexpr = 0):
    """Both terms' per-program parts in one launch: the first num_row_blocks = cdiv(B, TILE)
    programs sum the positive pairs of a row block, the others evaluate BLOCK_P selected negative
    pairs each (GRAM_LOAD: every similarity read from the Gram cache)."""
    s_gram_ptr, t_gram_ptr = gram_ptr, gram_ptr + gram_stride  # (each model's Gram cache)
    pid = tl.program_id(0)
    if pid < num_row_blocks:
        _positive_block(pid, s_ptr, t_ptr, s_inv_ptr, t_inv_ptr, labels_ptr, batch, dim_s, dim_t, st_ptr, tt_ptr,
                        num_thresholds, temperature, partial_loss_ptr, partial_critical_ptr, s_gram_ptr, t_gram_ptr,
                        RANK_LOSS, CRITICAL_ONLY, TILE, BLOCK_K, S_PRECISION, T_PRECISION, LABEL_BLOCK, GRAM)
    else:
        _selected_block(pid - num_row_blocks, s_ptr, t_ptr, s_inv_ptr, t_inv_ptr, batch, dim_s, dim_t,
                        selected_rows_ptr, selected_cols_ptr, num_slots, position_ptr, random_rows_ptr,
                        random_cols_ptr, st_ptr, tt_ptr, num_thresholds, temperature, pair_loss_ptr, pair_grad_ptr,
                        pair_flags_ptr, s_gram_ptr, t_gram_ptr, RANK_LOSS, RANDOM, BLOCK_P, TILE, BLOCK_K,
                        S_PRECISION, T_PRECISION, GRAM)


@triton.jit
def _mean_of(total, count):
    """total / count, 0 when count is 0 (a term with no pair)."""
    return tl.where(count > 0, tl.div_rn(total, tl.maximum(count, 1).to(tl.float32)), 0.0)


@triton.jit
def _counted_slots(flags, CRITICAL_ONLY: tl.constexpr):
    """The selected slots a term counts: the critical ones (Eq. 5), else every filled one."""
    if CRITICAL_ONLY:
        counted = (flags & CRITICAL) != 0
    else:
        counted = (flags & FILLED) != 0
    return counted


@triton.jit
def finalize_kernel(partial_loss_ptr, partial_critical_ptr, num_row_blocks, pair_loss_ptr, pair_flags_ptr, num_slots,
                    state_ptr, num_pairs, num_pairs_float, positive_weight, negative_weight,
                    loss_ptr, counts_ptr, terms_ptr, positive_coefficient_ptr, selected_coefficient_ptr,
                    CRITICAL_ONLY: tl.constexpr, BLOCK: tl.constexpr):
    """One program: the loss, its statistics and what the backward needs, from the per-program
    partials of rank_loss_kernel, summed block by block in index order (deterministic, no float
    atomics).  selected_coefficient holds d loss / d a per slot on entry (rank_loss_kernel's
    pair_grad) and d loss / d a times the term's weight and mean on exit.

    A non-finite batch reads as NaN, loss and coefficients alike, whatever the clamps made of
    it (as the reference): a gradient scaler then skips the step.
    counts = (positive, negative, selected, critical among selected, critical among all);
    terms = (positive term, negative term, critical ratio).
    """
    finite = tl.load(state_ptr + NONFINITE) == 0
    positive_sum = tl.zeros((BLOCK,), dtype=tl.float32)
    critical_positive = tl.zeros((BLOCK,), dtype=tl.int64)
    for start in range(0, num_row_blocks, BLOCK):
        index = start + tl.arange(0, BLOCK)
        mask = index < num_row_blocks
        positive_sum += tl.load(partial_loss_ptr + index, mask=mask, other=0.0)
        critical_positive += tl.load(partial_critical_ptr + index, mask=mask, other=0)
    negative_sum = tl.zeros((BLOCK,), dtype=tl.float32)
    filled = tl.zeros((BLOCK,), dtype=tl.int64)
    critical_selected = tl.zeros((BLOCK,), dtype=tl.int64)
    for start in range(0, num_slots, BLOCK):
        index = start + tl.arange(0, BLOCK)
        mask = index < num_slots
        flags = tl.load(pair_flags_ptr + index, mask=mask, other=0)
        counted = _counted_slots(flags, CRITICAL_ONLY)
        negative_sum += tl.where(counted, tl.load(pair_loss_ptr + index, mask=mask, other=0.0), 0.0)
        filled += ((flags & FILLED) != 0).to(tl.int64)
        critical_selected += ((flags & CRITICAL) != 0).to(tl.int64)
    num_negative = tl.load(state_ptr + NUM_NEGATIVE)
    num_positive = num_pairs - num_negative  # every pair i < j is one or the other
    critical_positive_count = tl.sum(critical_positive, axis=0)
    if CRITICAL_ONLY:
        positive_count = critical_positive_count
        negative_count = tl.sum(critical_selected, axis=0)
    else:
        positive_count = num_positive
        negative_count = tl.sum(filled, axis=0)
    positive_term = _mean_of(tl.sum(positive_sum, axis=0), positive_count)
    negative_term = _mean_of(tl.sum(negative_sum, axis=0), negative_count)
    loss = positive_weight * positive_term + negative_weight * negative_term
    tl.store(loss_ptr, tl.where(finite, loss, _nan()))
    tl.store(positive_coefficient_ptr, tl.where(finite, positive_weight * _mean_of(1.0, positive_count), _nan()))
    negative_scale = negative_weight * _mean_of(1.0, negative_count)
    for start in range(0, num_slots, BLOCK):
        index = start + tl.arange(0, BLOCK)
        mask = index < num_slots
        flags = tl.load(pair_flags_ptr + index, mask=mask, other=0)
        counted = _counted_slots(flags, CRITICAL_ONLY)
        coefficient = negative_scale * tl.load(selected_coefficient_ptr + index, mask=mask, other=0.0)
        coefficient = coefficient * counted.to(tl.float32)
        tl.store(selected_coefficient_ptr + index, tl.where(finite, coefficient, _nan()), mask=mask)
    critical_all = tl.load(state_ptr + CRITICAL_ALL)
    tl.store(counts_ptr + 0, num_positive)
    tl.store(counts_ptr + 1, num_negative)
    tl.store(counts_ptr + 2, tl.sum(filled, axis=0))
    tl.store(counts_ptr + 3, critical_positive_count + tl.sum(critical_selected, axis=0))
    tl.store(counts_ptr + 4, critical_all)
    tl.store(terms_ptr + 0, tl.where(finite, positive_term, _nan()))
    tl.store(terms_ptr + 1, tl.where(finite, negative_term, _nan()))
    tl.store(terms_ptr + 2, tl.where(finite, tl.div_rn(critical_all.to(tl.float32), num_pairs_float), _nan()))


# --------------------------------------------------------------------------- stage 6: backward
@triton.jit
def positive_backward_kernel(s_ptr, t_ptr, s_inv_ptr, t_inv_ptr, labels_ptr,
                             batch, dim_s, dim_t, st_ptr, tt_ptr, num_thresholds, temperature,
                             grad_loss_ptr, positive_coefficient_ptr, grad_hat_ptr,
                             selected_rows_ptr, selected_cols_ptr, num_slots, entry_key_ptr, num_entries,
                             gram_ptr, gram_stride,
                             RANK_LOSS: tl.constexpr, CRITICAL_ONLY: tl.constexpr,
                             TILE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                             S_PRECISION: tl.constexpr, T_PRECISION: tl.constexpr, G_PRECISION: tl.constexpr,
                             LABEL_BLOCK: tl.constexpr, ENTRY_BLOCK: tl.constexpr, GRAM: tl.constexpr = 0):
    """d loss / d s_hat_i from the positive pairs: sum_j g_ij s_hat_j over the row's group
    (both directions of each pair: the row scans its whole group, j != i).

    The fused-attention pattern: tiles of a and b are recomputed (GRAM_LOAD: read from the
    forward's Gram cache), each pair in the orientation the forward's passes computed it
    (_upper_pair_tile), g is formed in registers and multiplied into the rows' feature chunks at
    once.  A program owns its rows of grad_hat, so
    the read-modify-write needs no atomics and sums in a fixed order; the first column tile
    (every row's group holds the row itself, so there is one) writes instead of adding, so
    grad_hat needs no zero fill.

    The programs also write, grid-stride, the sort keys of the selected negatives' gradient
    entries for backward_rows_kernel: entry e < S is (rows[e], cols[e]), entry S + e the
    reverse, key own * (B + 1) + other; the padding entry of an empty selection sorts last.

    The grid is (row blocks, feature splits): program (p, f) takes the feature chunks f, f + F,
    ... of block p's rows (triton_ekd._positive_splits; F = 1 at large B).  Why: at small B the
    row blocks are a few programs each walking every chunk in turn (16 at B = 1024 on 132 SMs);
    split, each recomputes the block's tiles (the weights) and updates its own chunks.  Each
    chunk's update is the same dot, in the same order over the column tiles, whichever program
    makes it: grad_hat has the same bits for any F.
    """
    s_gram_ptr, t_gram_ptr = gram_ptr, gram_ptr + gram_stride  # (each model's Gram cache)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    rows = pid * TILE + tl.arange(0, TILE)
    row_mask = rows < batch
    last_row = tl.minimum(pid * TILE + TILE, batch) - 1
    col_begin = _group_start(labels_ptr, pid * TILE, LABEL_BLOCK)
    col_end = _group_end(labels_ptr, last_row, batch, LABEL_BLOCK)
    coefficient = tl.load(grad_loss_ptr).to(tl.float32) * tl.load(positive_coefficient_ptr)
    label_i = tl.load(labels_ptr + rows, mask=row_mask, other=0)
    row_offset = rows.to(tl.int64) * dim_s
    for col_start in range(col_begin, col_end, TILE):
        cols = col_start + tl.arange(0, TILE)
        col_mask = cols < batch
        label_j = tl.load(labels_ptr + cols, mask=col_mask, other=0)
        positive = (row_mask[:, None] & col_mask[None, :] & (rows[:, None] != cols[None, :])
                    & (label_i[:, None] == label_j[None, :]))
        a = _upper_pair_tile(s_ptr, s_inv_ptr, s_gram_ptr, rows, cols, row_mask, col_mask, pid * TILE, col_start,
                             dim_s, TILE, BLOCK_K, S_PRECISION, GRAM)
        b = _upper_pair_tile(t_ptr, t_inv_ptr, t_gram_ptr, rows, cols, row_mask, col_mask, pid * TILE, col_start,
                             dim_t, TILE, BLOCK_K, T_PRECISION, GRAM)
        _, loss_grad, critical = _pair_loss(a, b, st_ptr, tt_ptr, num_thresholds, temperature, RANK_LOSS)
        if CRITICAL_ONLY:
            positive = positive & critical
        inv_j = tl.load(s_inv_ptr + cols, mask=col_mask, other=0.0)
        # g_ij * inv_norm_j multiplies the raw row j: s_hat_j without a normalised copy.
        weight = tl.where(positive, coefficient * loss_grad, 0.0) * inv_j[None, :]
        col_offset = cols.to(tl.int64) * dim_s
        for d0 in range(split * BLOCK_D, dim_s, num_splits * BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_mask = ds < dim_s
            s_j = tl.load(s_ptr + col_offset[:, None] + ds[None, :], mask=col_mask[:, None] & d_mask[None, :],
                          other=0.0).to(tl.float32)
            grad_ptrs = grad_hat_ptr + row_offset[:, None] + ds[None, :]
            grad_mask = row_mask[:, None] & d_mask[None, :]
            update = tl.dot(weight, s_j, input_precision=G_PRECISION)
            previous = tl.load(grad_ptrs, mask=grad_mask & (col_start != col_begin), other=0.0)
            tl.store(grad_ptrs, previous + update, mask=grad_mask)
        # The next column tile loads these elements back, possibly in other threads (the load
        # and the store layouts differ); Triton orders shared memory, not global memory,
        # between a program's threads: a block barrier makes the stores visible.
        tl.debug_barrier()
    span = batch + 1
    program = split * tl.num_programs(0) + pid
    for start in range(program * ENTRY_BLOCK, num_entries, tl.num_programs(0) * num_splits * ENTRY_BLOCK):
        entry = start + tl.arange(0, ENTRY_BLOCK)
        forward = entry < num_slots
        slot = tl.where(forward, entry, entry - num_slots)
        present = entry < 2 * num_slots
        row = tl.load(selected_rows_ptr + slot, mask=present, other=batch)
        col = tl.load(selected_cols_ptr + slot, mask=present, other=batch)
        own = tl.where(forward, row, col)
        other = tl.where(forward, col, row)
        tl.store(entry_key_ptr + entry, own * span + other, mask=entry < num_entries)


@triton.jit
def _upper_pair_tile(x_ptr, inv_norm_ptr, gram_ptr, rows, cols, row_mask, col_mask, row_start, col_start, dim,
                     TILE: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, GRAM: tl.constexpr):
    """The similarities of rows x cols (TILE-row block at row_start, TILE columns from any
    col_start), each pair (i, j) with the bits of (min(i, j), max(i, j)): the orientation in which
    the forward's tile passes computed it (row i against column j for i < j), so that the
    backward differentiates the very similarities the forward judged.  (tf32x3 may round row j
    against column i otherwise: its two cross products are summed in another order.)

    GRAM_LOAD: gathered from the forward's Gram cache (_gram_pairs).  Else computed: the tile of
    rows against cols where a pair lies above the diagonal, the transpose of cols against rows
    where one lies below; on the diagonal tile (cols = rows: a row block whose label groups
    start and end on its edges, as a sampler's K images an identity give) the pairs below are the
    transpose of those above, one tile for both; a tile across the diagonal elsewhere takes two."""
    above = cols[None, :] > rows[:, None]
    if GRAM == GRAM_LOAD:
        first = tl.minimum(rows[:, None], cols[None, :])
        second = tl.maximum(rows[:, None], cols[None, :])
        tile = _gram_pairs(gram_ptr, first, second, row_mask[:, None] & col_mask[None, :], TILE)
    elif col_start == row_start:
        tile = _similarity_tile(x_ptr, inv_norm_ptr, rows, cols, row_mask, col_mask, dim, TILE, BLOCK_K, PRECISION)
        tile = tl.where(above, tile, tl.trans(tile))
    else:
        tile = tl.zeros((TILE, TILE), dtype=tl.float32)
        if col_start + TILE - 1 > row_start:  # some column past some row: pairs above the diagonal
            tile = _similarity_tile(x_ptr, inv_norm_ptr, rows, cols, row_mask, col_mask, dim, TILE, BLOCK_K,
                                    PRECISION)
        if col_start < row_start + TILE - 1:  # some column before some row: pairs below it
            below = tl.trans(_similarity_tile(x_ptr, inv_norm_ptr, cols, rows, col_mask, row_mask, dim, TILE,
                                              BLOCK_K, PRECISION))
            tile = tl.where(above, tile, below)
    return tile


@triton.jit
def _lower_bounds(sorted_ptr, count, first, second, steps):
    """Per element of `first` and of `second`: the number of entries of the ascending
    `sorted_ptr[:count]` below it (vectorised binary searches; `steps` = count.bit_length()
    halvings suffice).  Both in the same loop: each step's two loads are independent, so the two
    chains of `steps` dependent loads overlap.  (Not one search over tl.join(first, second): the
    split halves come out in another layout, which multiplied the loads of the loop that indexes
    with them.)"""
    low_a = first * 0
    high_a = low_a + count
    low_b = low_a
    high_b = high_a
    for _ in range(steps):
        middle_a = (low_a + high_a) // 2
        middle_b = (low_b + high_b) // 2
        searching_a = low_a < high_a
        searching_b = low_b < high_b
        below_a = searching_a & (tl.load(sorted_ptr + middle_a, mask=searching_a & (middle_a < count), other=0)
                                 < first)
        below_b = searching_b & (tl.load(sorted_ptr + middle_b, mask=searching_b & (middle_b < count), other=0)
                                 < second)
        low_a = tl.where(below_a, middle_a + 1, low_a)
        high_a = tl.where(searching_a & (below_a == 0), middle_a, high_a)
        low_b = tl.where(below_b, middle_b + 1, low_b)
        high_b = tl.where(searching_b & (below_b == 0), middle_b, high_b)
    return low_a, low_b


@triton.jit
def backward_rows_kernel(s_ptr, s_inv_ptr, grad_hat_ptr, order_ptr, sorted_key_ptr, entry_index_ptr, num_entries,
                         search_steps, selected_coefficient_ptr, num_slots, grad_loss_ptr, positive_coefficient_ptr,
                         grad_ptr, batch, dim_s,
                         BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ENTRY_UNROLL: tl.constexpr = 1):
    """Per row: add the selected negatives' g * s_hat_other (entries sorted by (row, other), so
    each row sums in a fixed order; its segment found by binary search on the keys), then back
    through the normalisation, (G - s_hat <s_hat, G>) / max(||s||, eps), written to the row's
    original position.

    Feature chunks of BLOCK_D (one chunk up to the glue's cap, 512): a row block of a wide
    student does not fit in registers.  Pass 1 forms G chunk by chunk (each element sums in the
    same order whatever the chunking) into grad_hat, which this program owns, with the chunks'
    parts of <x, G> and ||x||^2; pass 2 projects and writes.

    ENTRY_UNROLL: the walk over the entries unrolled that many times (the loads of that many
    entries in flight at once: a long walk is a latency chain, see triton_ekd.
    SMALL_BACKWARD_MAX_BATCH); the entries are still added one by one, in order.

    A non-finite batch (finalize_kernel's positive coefficient is NaN): every element of the
    gradient NaN, as on every backend, so that a gradient scaler skips the step even when the
    bad row takes part in no distilled pair (the pairs' NaN coefficients reach only their rows)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < batch
    row_offset = rows.to(tl.int64) * dim_s
    grad_loss = tl.load(grad_loss_ptr).to(tl.float32)
    row_key = rows.to(tl.int64) * (batch + 1)
    # Both ends of every row's segment in one search (independent loads a step: half the
    # latency of two searches in turn, a chain of search_steps dependent loads each)
    segment_start, segment_end = _lower_bounds(sorted_key_ptr, num_entries, row_key, row_key + batch + 1,
                                               search_steps)
    segment_length = tl.where(row_mask, segment_end - segment_start, 0)
    inv_norm = tl.load(s_inv_ptr + rows, mask=row_mask, other=0.0)
    x_dot_g = tl.zeros((BLOCK_R,), dtype=tl.float32)
    squares = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, dim_s, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (ds < dim_s)[None, :]
        grad_hat = tl.load(grad_hat_ptr + row_offset[:, None] + ds[None, :], mask=mask, other=0.0)
        for step in tl.range(0, tl.max(segment_length, axis=0), loop_unroll_factor=ENTRY_UNROLL):
            has_entry = step < segment_length
            entry = segment_start + step
            other = tl.load(sorted_key_ptr + entry, mask=has_entry, other=0) - row_key
            other = tl.where(has_entry, other, 0)
            index = tl.load(entry_index_ptr + entry, mask=has_entry, other=0)
            slot = tl.where(index < num_slots, index, index - num_slots)
            weight = (grad_loss * tl.load(selected_coefficient_ptr + slot, mask=has_entry, other=0.0)) \
                * tl.load(s_inv_ptr + other, mask=has_entry, other=0.0)
            x_other = tl.load(s_ptr + other.to(tl.int64)[:, None] * dim_s + ds[None, :],
                              mask=has_entry[:, None] & mask, other=0.0).to(tl.float32)
            grad_hat += weight[:, None] * x_other
        x = tl.load(s_ptr + row_offset[:, None] + ds[None, :], mask=mask, other=0.0).to(tl.float32)
        x_dot_g += tl.sum((x * inv_norm[:, None]) * grad_hat, axis=1)
        squares += tl.sum(x * x, axis=1)
        tl.store(grad_hat_ptr + row_offset[:, None] + ds[None, :], grad_hat, mask=mask)
    # Pass 2 reads G back, possibly in other threads than stored it: a block barrier makes the
    # stores visible (Triton orders shared memory, not global memory, between threads).
    tl.debug_barrier()
    # Below the eps floor the norm is a constant: no projection (what autograd of clamp_min gives).
    unclamped = tl.sqrt_rn(squares) > NORM_EPS
    projection = tl.where(unclamped, x_dot_g, 0.0)
    destination = tl.load(order_ptr + rows, mask=row_mask, other=0)
    positive_coefficient = tl.load(positive_coefficient_ptr)
    nonfinite = positive_coefficient != positive_coefficient
    for d0 in range(0, dim_s, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (ds < dim_s)[None, :]
        grad_hat = tl.load(grad_hat_ptr + row_offset[:, None] + ds[None, :], mask=mask, other=0.0)
        x_hat = tl.load(s_ptr + row_offset[:, None] + ds[None, :], mask=mask, other=0.0).to(tl.float32) \
            * inv_norm[:, None]
        grad = (grad_hat - x_hat * projection[:, None]) * inv_norm[:, None]
        grad = tl.where(nonfinite, _nan(), grad)
        tl.store(grad_ptr + destination[:, None] * dim_s + ds[None, :], grad.to(grad_ptr.dtype.element_ty),
                 mask=mask)
