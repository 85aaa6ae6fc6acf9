"""A kernel that runs the selection scans' kernels._histogram_rank alone, one rank a program
(test_triton.py's test_histogram_rank_against_searchsorted).  A module of its own: a jitted
function resolves names in its module's globals, and the kernels module must be imported only
after TRITON_INTERPRET is settled (import this from a test, not at collection)."""
import triton
import triton.language as tl

from ekd_kernels import triton_ekd

kernels = triton_ekd._kernels()


@triton.jit
def histogram_rank_kernel(hist_ptr, ranks_ptr, out_ptr, num_copies, SCAN_BLOCK: tl.constexpr,
                          LINEAR_SCAN: tl.constexpr):
    """out[2p], out[2p + 1] = the (bin, count before it) of rank ranks[p]."""
    program = tl.program_id(0)
    bin_, above = kernels._histogram_rank(hist_ptr, tl.load(ranks_ptr + program), num_copies, SCAN_BLOCK,
                                          LINEAR_SCAN)
    tl.store(out_ptr + 2 * program, bin_.to(tl.int64))
    tl.store(out_ptr + 2 * program + 1, above)
