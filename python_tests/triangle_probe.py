"""Kernels that run the tile passes' kernels._triangle_block (and its step either way) on given
tile numbers (test_triton.py's test_triangle_blocks_at_every_size).  A module of its own, as
histogram_rank_probe.py (import it from a test, after TRITON_INTERPRET is settled)."""
import triton
import triton.language as tl

from ekd_kernels import triton_ekd

kernels = triton_ekd._kernels()


@triton.jit
def triangle_block_kernel(p_ptr, out_ptr, count, BLOCK: tl.constexpr):
    """out[2i], out[2i + 1] = (m, n) of tile number p[i]."""
    index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = index < count
    m, n = kernels._triangle_block(tl.load(p_ptr + index, mask=mask, other=0))
    tl.store(out_ptr + 2 * index, m, mask=mask)
    tl.store(out_ptr + 2 * index + 1, n, mask=mask)


@triton.jit
def triangle_correction_kernel(p_ptr, estimate_ptr, out_ptr, count, BLOCK: tl.constexpr):
    """out[2i], out[2i + 1] = (m, n) of tile number p[i] from the estimate estimate[i] of n."""
    index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = index < count
    m, n = kernels._triangle_block_from(tl.load(p_ptr + index, mask=mask, other=0),
                                        tl.load(estimate_ptr + index, mask=mask, other=0))
    tl.store(out_ptr + 2 * index, m, mask=mask)
    tl.store(out_ptr + 2 * index + 1, n, mask=mask)


@triton.jit
def floor_fraction_kernel(n_ptr, p_ptr, q_ptr, out_ptr, count, BLOCK: tl.constexpr):
    """out[i] = kernels._floor_fraction(n[i], p[i], q[i]), floor(n p / q) (test_triton.py's
    test_floor_fraction_is_exact_past_int64_products)."""
    index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = index < count
    n = tl.load(n_ptr + index, mask=mask, other=0)
    p = tl.load(p_ptr + index, mask=mask, other=0)
    q = tl.load(q_ptr + index, mask=mask, other=1)
    tl.store(out_ptr + index, kernels._floor_fraction(n, p, q), mask=mask)
