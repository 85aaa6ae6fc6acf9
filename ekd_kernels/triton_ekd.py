"""Fused Triton backend of EKD: ``EKDLoss(backend="triton")``.

It computes SPEC.md (the semantics of ``reference.ekd_reference``) without ever holding a
B x B tensor: every pass recomputes its similarity tiles from the raw rows (the fused-attention
pattern), and memory beyond the inputs is O(B * (Ds + Dt)) plus fixed histograms.

The stages, under the reference's names (kernels in ``_triton/kernels.py``, in launch order):

    normalise         a stable sort of the labels (stable_sort, or torch.sort past SMALL_SORT_MAX
                      labels); normalise_kernel gathers the rows in label
                      order (contiguous copies, any input strides, so each row's positives are
                      one column range), their inverse norms (tiles scale raw dots by them) and
                      whether the batch is finite, and zeroes the counters of the later passes.
    batch_thresholds  exact order statistics by radix select over order-preserving 32-bit keys:
                      pass 1 (coarse_histogram) histograms the top 16 bits of every negative
                      similarity (student and teacher) and counts the negatives L;
                      coarse_select finds each wanted rank's bucket (one program per rank: the
                      K thresholds from the FPRs' exact rationals, plus the N-th hardest);
                      pass 2 (fine_histogram) histograms the low 16 bits inside each wanted
                      bucket.  The key found is the bits of the element the sort-based reference
                      picks, for any rank.  With PASS1_WINDOWS (off until measured), pass 1
                      also keeps the keys in a window of buckets around each target, placed by
                      the cutoff's sample (window_select), and when every exact bucket lies in its
                      window, window_histogram builds pass 2's histograms from them and pass 2
                      returns at once (decided on the device).
    ema_update        fine_select, one program per rank: the exact key, the batch threshold
                      (NaN when L = 0) and the EMA update where the batch is finite, L > 0 and
                      update_thresholds, all on the device: no host synchronisation.
    select_negatives  the N-th largest student similarity is one more rank of the same radix
                      select.  Pass 2 also gathers every negative at or above its 16-bit bucket
                      into a candidate buffer when pass 1's counts show they fit (the usual
                      case); hardest_negatives ranks each candidate by counting the candidates
                      before it in (above / tie, row, col) order, which takes the N hardest, ties
                      in (row, col) order: deterministic whatever the order the atomics filled
                      the buffer in.  After an overflow (decided on the device), pass 3
                      (boundary_count) counts per row the negatives above / at the boundary and
                      hardest_negatives writes the pairs from recomputed tiles at slots given by
                      prefix sums (pass 4); otherwise those programs return at once.  "random"
                      maps the reference's drawn ranks (draw_random_negatives) to pairs.
    rank loss         rank_loss: positives, one pass over each row block's label range, and
                      selected negatives, one gathered dot per pair, in one launch; finalize sums
                      the per-program partials in a fixed order into the loss, the statistics
                      and the backward's coefficients.
    backward          positives recompute their tiles and multiply g into the rows (no atomics:
                      a program owns its rows); the selected negatives' contributions are sorted
                      by row (a stable sort of their keys, as the labels') and summed per row,
                      then back through the normalisation.

Per call, forward: the label sort (one kernel up to SMALL_SORT_MAX labels, else torch.sort) and
9 kernels: normalise; 2 full tile passes over
the pairs i < j (student and teacher Gram tiles each) with the two small selection kernels after
them; pass 3 and hardest_negatives (pass 3 returns at once unless the candidates overflowed or
the critical ratio is requested, when it is a full student+teacher pass; launched only with
hardest negatives or the ratio); rank_loss; finalize.  Backward: the entry sort (likewise) and
2 kernels.  The small kernels replace what was about 170 torch ops a forward on the
histograms, K-vectors and candidates (each a launch of about 5 us on a GPU, more than the
arithmetic at B <= 1024).  No host synchronisation except for negative_selection="random"
(the draw needs the number of negatives as a Python int); no float atomics, sums in fixed
order: the results are bitwise reproducible.  fp32 dots run as "tf32x3" unless
EKD_TRITON_FP32_PRECISION=ieee.
Buffers, all allocated uninitialised (the kernels write or zero what they read): 2 + (2K + 1)
histograms of 65536 int32 (int64 for B > 65536), the candidate buffer (16 bytes a slot), B-, K-
and N-sized vectors (with PASS1_WINDOWS, two window buffers of pairs / 8 32-bit keys within
[2^16, 2^24], 34 MB at B = 8192, and 4x the candidate slots); the label-sorted copies of the
embeddings and labels are outputs the backward reuses, where it adds an fp32 B x Ds gradient
accumulator.

Limits, as B grows (checked at the entry, ValueError naming the limit and the B given):
B <= MAX_BATCH = 65535 * 64 = 4194240 (the tile passes launch T(T + 1) / 2 programs for
T = cdiv(B, 64), on a grid axis that stops at 2^31 - 1) and min(N, B(B-1)/2) <=
MAX_SELECTED_NEGATIVES = 2^29 - 1 (the top-N candidate buffer, 4 slots a pair, is indexed in
int32).  Within them the results are exact: pair counts,
ranks, pair keys (i * (B + 1) + j) and the selection state are int64; histogram bins are int64
once L can pass 2^31 (B > 65536), since one bin may hold nearly every pair when the embeddings
collapse; the tie prefix sums of pass 4 are int64, clamped to N before the tile loop, whose
tile-local arithmetic stays int32 (N + B < 2^31); the threshold ranks floor(L p / q) of the FPRs'
exact fractions are formed in int64 without the product L p (kernels._floor_fraction), so any
FPR works at any B.  Means divide by the pair count rounded to fp32
(as torch's mean does in the reference), a relative error below 2^-24.

The forward and backward are ``torch.library.custom_op``s with fake implementations and
autograd registered there, so ``torch.compile(fullgraph=True)`` traces through them.

fp64 inputs are rejected (use the reference backend for gradcheck): the kernels compute in fp32.
"""

import contextlib
import functools
import math
import os
from typing import Dict, List, Optional, Tuple

import torch

from ._autograd import (eager_call, first_order_only, functorch_call, keep_anchors, no_batching_rule,
                        no_forward_mode, refuse_nested_derivative)
from .config import EKDConfig
from .reference import draw_random_negatives
from .result import EKDResult, EKDStats
from .validation import check_batch_limit

try:  # the module must import without triton: unavailable_reason then says why
    import triton
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
from ._triton.launch import launches  # noqa: E402  (needs no triton: off without it)

#: Pair tile edge of every tile pass (equal rows and columns: pass 4 walks the same tiles as
#: passes 1-3, so a pair's similarity has the same bits in all of them).  It is also the row
#: block of the positive kernels.
TILE = 64
#: The tile passes' grid: one program per upper-triangle tile (kernels._tile_program); off, the
#: square grid of before, whose lower triangle's programs return at once (an A/B variant:
#: triton:square-grid).  The same tiles either way, hence the same results.
TRIANGLE_TILE_GRID = True
#: Feature chunk of the dots (GPU; the interpreter takes larger chunks: fewer, bigger numpy ops).
BLOCK_K = 32
INTERPRETER_BLOCK_K = 128
#: Rows and feature chunk a program of normalise_kernel gathers (the interpreter's too: its
#: programs are few ops each, cheap next to the tile passes' there).  Why not TILE rows: at
#: small B the pass was a few programs each copying 64 rows in 16 dependent steps (28 us at
#: B = 256 and 1024 on the H200, for 1-4 MB), where the tile passes' row blocks need not be its
#: own.  TILE and the tiles' chunk (NORMALISE_BLOCK_ROWS = 64, NORMALISE_BLOCK_K = 32) are the
#: pass of before, for the benchmark's A/B (tools/gpu_exercise.py triton:normalise-tile-rows).
#: Unmeasured on a GPU when made the default (2026-11-27, seventeenth session).
NORMALISE_BLOCK_ROWS = 16
NORMALISE_BLOCK_K = 128
#: Up to this B, pass 1 keeps both models' similarity tiles (the upper triangle's T(T + 1) / 2
#: tiles of TILE^2 fp32: 2.2 MB a model at B = 1024, 8.7 MB at 2048, an output of the forward
#: held until the backward) and the later passes read them back instead of recomputing them
#: (kernels._pass_tile): pass 2, the rank loss's positive blocks and selected pairs, passes 3
#: and 4, the positive backward (kernels._upper_pair_tile).  Why: at small B a call is a chain
#: of kernels, each a few programs that recompute the same tiles in a chain of D / BLOCK_K dot
#: steps (fifth GPU run, B = 1024, fp32: pass 2 56 us, the rank loss 46, against 78 for pass 1,
#: which also counts every pair); a tile read back is one 16 KB load.  The bits are the ones pass
#: 1 computed, which the later passes recompute anyway: the same outputs with or without.  Past
#: it the cache would outgrow its use (bytes at B^2, recompute at B^2 D spread over more
#: programs).  0 is the forward of before, for the benchmark's A/B (tools/gpu_exercise.py
#: triton:no-gram-cache).  Unmeasured on a GPU when made the default (2026-11-27, twentieth
#: session).
GRAM_CACHE_MAX_BATCH = 2048
#: Feature chunk of the positive backward's g @ s_hat update.
BLOCK_D = 64
#: Pairs per program of the selected-pairs part of rank_loss_kernel (a multiple of TILE: the
#: pairs' similarities are taken TILE at a time from similarity tiles, kernels._pair_similarities).
BLOCK_PAIRS = 64
#: Programs positive_backward_kernel aims for when its row blocks are fewer (about an H100's or
#: H200's SMs): each row block's feature chunks are split over programs (_positive_splits), which
#: all recompute the block's similarity tiles; at B = 1024, 16 row blocks x 8 splits instead of
#: 16 programs walking 8 chunks each.  The same gradient bits for any split; 0 is the one program
#: a row block of before (the benchmark's A/B: tools/gpu_exercise.py triton:one-split).  Unmeasured
#: on a GPU when made the default (2026-11-27, seventeenth session).
POSITIVE_BACKWARD_PROGRAMS = 128
#: Rows per program of the backward's per-row kernel, and its widest feature chunk: a block of
#: 16 x 512 fp32 stays in registers on an H100 (sm_90 compile: no spills); wider students are
#: taken in chunks of this size.
BACKWARD_BLOCK_ROWS = 16
BACKWARD_MAX_BLOCK_D = 512
#: Up to SMALL_BACKWARD_MAX_BATCH rows, the per-row kernel's programs take
#: SMALL_BACKWARD_BLOCK_ROWS rows each and walk a row's selected entries SMALL_BACKWARD_ENTRY_UNROLL
#: at a time (an unrolled loop).  Why: at small B a row holds many of the N selected negatives
#: (2N / B entries: 62 at B = 64, N = 2000), walked one entry a step, each step two dependent
#: loads (the entry, then the other row's features); that chain made backward_rows 53 us of the
#: 0.345 ms a call took on the device at B = 64 (fifth GPU run), four 16-row programs on 132 SMs.
#: Unrolled, 8 entries' loads are in flight together, and 2-row programs spread the rows over
#: 8 times the SMs.  Each row sums its entries in the same order: the same bits.  Larger batches
#: keep 16-row programs (about 2 entries a row at B = 2048; more programs would add waves of the
#: segment search's fixed latency).  sm_90 (triton 3.8): 157 registers, no spill.
#: SMALL_BACKWARD_MAX_BATCH = 0 is the kernel's shape of before, for the benchmark's A/B
#: (tools/gpu_exercise.py triton:rows-16).  Unmeasured on a GPU when made the default
#: (2026-11-27, twentieth session).
SMALL_BACKWARD_MAX_BATCH = 512
SMALL_BACKWARD_BLOCK_ROWS = 2
SMALL_BACKWARD_ENTRY_UNROLL = 8
#: Histogram bins per step of the selection scans (coarse_select, fine_select).
SCAN_BLOCK = 4096
#: Sorts of at most this many keys (the labels in the forward, the selected negatives' gradient
#: entries, 2N, in the backward) run as one kernel (kernels.stable_sort_kernel: each key's
#: position counted against all the others, O(n^2) compares); longer ones by torch.sort.  The
#: same values and indices either way (a stable sort's are unique); 0 sorts everything by
#: torch.sort, as before, for the benchmark's A/B (tools/gpu_exercise.py triton:torch-sort).
SMALL_SORT_MAX = 8192
#: Its limit under the interpreter, where each of the n^2 compares is numpy work (the two sorts
#: of a B = 90 call, the backward's 4000 entries most of it, took 0.19 s): the labels of the
#: tests' small batches, and the entries of N <= 512, still take the kernel in every call; its
#: own tests set the GPU's limit.
INTERPRETER_SMALL_SORT_MAX = 1024
#: Keys a program places, and keys it compares them with a step, in stable_sort_kernel.
SMALL_SORT_BLOCK_ROWS = 16
SMALL_SORT_BLOCK_COLS = 1024
INTERPRETER_SMALL_SORT_BLOCK_ROWS = 256
#: Whether the selection scans (coarse_select, fine_select, cutoff_select, window_select) walk
#: the histogram in one level, a SCAN_BLOCK-wide running sum a step, instead of three (block
#: totals until the wanted rank's block, then its groups, then the bins of one group:
#: kernels._histogram_rank).  Same buckets and counts either way; True is the scan before the
#: three levels, kept for the benchmark's A/B (tools/gpu_exercise.py triton:linear-scan).
SELECT_LINEAR_SCAN = False
#: coarse_select scans in one level whenever pass 1's histograms have at least this many copies
#: (from B = 641: _coarse_copies), the other scans in three.  The fourth GPU run (H200, A/B in one
#: process, bench/NOTES.md) found the three levels faster where a scan reads one histogram
#: (fine_select: under 28 us against 41 at B = 1024) but coarse_select over 16 copies 4x slower
#: (B = 8192: 257 us fp32 / 134 bf16 against 64 / under 52 for its two launches; whole call
#: 3.70 -> 3.54 ms fp32, 1.83 -> 1.77 bf16 with every scan in one level).  Not yet understood
#: (the two loops load alike: sm_90a PTX, 16 v4 loads each); same bits either way.
COARSE_SELECT_LINEAR_MIN_COPIES = 2
#: Elements per step of the fills, the fixed-order sums of finalize and the entry keys.
SMALL_BLOCK = 1024
#: Candidates per program, and per step of the rank count, of hardest_negatives_kernel.  Each
#: program counts, for each of its candidates, the candidates ranked before it: filled^2 integer
#: comparisons in all (about 2500^2 at N = 2000), spread over cdiv(filled, CANDIDATE_BLOCK)
#: programs that each walk all `filled` in steps of CANDIDATE_CHUNK.  64 x 128 (the fifth GPU
#: run's) made that 40 programs of 20 steps of 836 sm_90 instructions a thread: 30 us of the
#: call's 0.345 (B = 64) to 0.36 ms (B = 1024) on the device, whatever B.  16 x 512: 157 programs
#: (two an SM fit) of 5 steps of 591 instructions, and 32 B of spill instead of 144.  The ranks
#: are exact counts: the same slots either way.  64 x 128 is the benchmark's A/B
#: (tools/gpu_exercise.py triton:candidates-64x128); unmeasured on a GPU when made the default
#: (2026-11-27, twentieth session).
CANDIDATE_BLOCK = 16
CANDIDATE_CHUNK = 512
#: Rows per step of the label-group scans (one step for groups shorter than this).
LABEL_BLOCK = 64
#: The interpreter pays per program and per op, not per element: it takes bigger blocks.
INTERPRETER_BLOCK_PAIRS = 1024
INTERPRETER_BACKWARD_BLOCK_ROWS = 128
INTERPRETER_BACKWARD_ENTRY_UNROLL = 1
INTERPRETER_SCAN_BLOCK = 65536
INTERPRETER_CANDIDATE_BLOCK = 1024
INTERPRETER_CANDIDATE_CHUNK = 1024
#: Under the interpreter a split's programs each recompute their row block's tiles, numpy work
#: that the GPU does in parallel: one program a row block there (the same bits; the splits' own
#: test sets it).
INTERPRETER_POSITIVE_BACKWARD_PROGRAMS = 0
#: fp32 dots need fp32 accuracy (tau = 0.01 amplifies errors 100-fold): three-pass TF32 runs on
#: tensor cores; "ieee" is the slower exact fallback.  Plain "tf32" is not accurate enough.
FP32_DOT_PRECISION = os.environ.get("EKD_TRITON_FP32_PRECISION", "tf32x3")
NUM_BUCKETS = 1 << 16
#: Copies of pass 1's histograms (coarse_histogram_kernel): one per this many tile programs, at
#: most MAX_COARSE_COPIES.  Every copy costs its zeroing (256 KiB a model) and coarse_select's
#: scan, but one copy queues the B^2 / 2 atomics at the hot bins.  32 since the fifth GPU run
#: (H200, A/B in one process, bitwise the same outputs, device time of a forward+backward): at
#: B = 1024 (4 copies) 0.360 ms against 0.401 with 512 a copy (one copy) in fp32, 0.266 against
#: 0.301 in bf16; at 2048 (16 copies) 0.560 against 0.770 and 0.370 against 0.576; at 256 one
#: copy either way (bench/results/gpu_proof_h200_2026-11-27b; 8 a copy was no better).  At 4096
#: this gives 16 copies where 512 gave 4: not measured there yet (the lease's copies-ab).
COARSE_TILES_PER_COPY = 32
MAX_COARSE_COPIES = 16
#: Whether pass 2 (fine_histogram_kernel) skips, tile by tile, the targets whose bucket holds
#: none of the tile's pairs, and the top-N candidates' slot atomic and prefix sums in a tile
#: without a candidate.  Same histograms and candidates either way; False is the earlier pass 2,
#: kept for the benchmark's A/B (tools/gpu_exercise.py profile --backends triton triton:no-skip).
PASS2_SKIP_EMPTY_TARGETS = True
#: Whether pass 2 adds all its targets' histograms in one aggregation a tile (kernels.
#: _fine_histograms) instead of one per target.  Same thresholds either way.  Used only while
#: num_targets x 65536 bins fit in int32.  On by default since the third GPU run (H200, B = 8192,
#: device time, medians of 3 interleaved rounds, bitwise the same outputs): with PASS2_DIRECT_MAX
#: below, 3.81 ms a forward+backward against 4.05 per target in fp32, 1.88 against 2.13 in bf16
#: (bench/results/gpu_proof_h200_2026-11-26c; A/B: tools/gpu_exercise.py triton:per-target).
PASS2_ONE_AGGREGATION = True
#: Pass 2 adds a tile's pairs of a target bucket by per-element atomics, without the
#: aggregation's reductions, when they are at most this many (kernels._histogram_add_if_any; 0:
#: always the aggregation).  Needs PASS2_SKIP_EMPTY_TARGETS (the tile's count).  Same histograms
#: either way; 256 since the third GPU run (above; alone it gained 0.8% in fp32, within the noise,
#: and 2.3% in bf16; with one aggregation 1.5% in fp32 and 3.6% in bf16 over one aggregation alone).
PASS2_DIRECT_MAX = 256
#: Pass 1 also keeps the keys in a window of buckets around each target, placed by the cutoff's
#: sample (kernels.window_select_kernel), and the top-N candidates at or above the top-N window;
#: when every target's exact bucket lies in its window and the buffers held (decided on the
#: device), pass 2 histograms those keys instead of recomputing every tile.  Only with the cutoff
#: (B >= CUTOFF_MIN_BATCH, whose sample places the windows) and int32 counts.  A window spans
#: WINDOW_Z sqrt(r + 1) + WINDOW_RELATIVE r + WINDOW_SLACK sample ranks each side of the target's
#: sample rank r (the relative part: the sample is 64 rows, and where rows differ, as a trained
#: model's do, its fat targets' ranks stray by 10-20%: tools/window_coverage.py); each model's
#: buffer holds pairs / WINDOW_CAPACITY_DIVISOR keys (within WINDOW_CAPACITY_RANGE), and the
#: top-N candidate buffer gets WINDOW_CANDIDATE_FACTOR x its slots (both passes use them).  Same
#: results either way; off until a GPU run measures it (tools/gpu_exercise.py triton:windows).
PASS1_WINDOWS = False
WINDOW_Z = 8.0
WINDOW_RELATIVE = 0.25
WINDOW_SLACK = 16.0
WINDOW_CAPACITY_DIVISOR = 8
WINDOW_CAPACITY_RANGE = (2**16, 2**24)
WINDOW_CANDIDATE_FACTOR = 4
#: Programs per model of window_histogram_kernel, and the side of its blocks of keys (32 x 32 keys
#: at a time: no spills on sm_90a, where 64 x 64 spilled 200 B).
WINDOW_HISTOGRAM_PROGRAMS = 132
WINDOW_HISTOGRAM_BLOCK = 32
#: Pass 1 counts the head of the order first (coarse_histogram_kernel) from this B on, where the
#: pass's B^2 atomics, not launches, set the forward's time.  The cutoff is the bucket of the
#: sample's descending rank CUTOFF_SAFETY x (the largest target fraction: the largest FPR, or
#: N / pairs); none when that passes CUTOFF_MAX_FRACTION (the head would hold most pairs).
CUTOFF_MIN_BATCH = 4096
CUTOFF_SAFETY = 2.0
CUTOFF_MAX_FRACTION = 0.5
#: Top-N candidate buffer: max(CANDIDATE_FACTOR * N, MIN_CANDIDATE_CAPACITY) slots.
CANDIDATE_FACTOR = 4
MIN_CANDIDATE_CAPACITY = 8192
#: Length of the int64 selection state (kernels.STATE_SIZE).
STATE_SIZE = 16
#: Launch options by kernel name (num_warps, num_stages, maxnreg); a kernel not named takes
#: Triton's defaults (4 warps, 3 stages, no register cap).  Any setting gives the same counts,
#: thresholds and selection, and float sums that agree up to rounding (the warps split a block's
#: reductions differently); each setting is bitwise deterministic run to run.  The interpreter
#: ignores them.  Pass 1 capped at 168 registers (three 4-warp programs an SM instead of two;
#: fp32 spills 8-32 B, bf16 none) since the third GPU run's A/B (H200, device time, bitwise the
#: same outputs): 3.80 against 4.05 ms a forward+backward at B = 8192 in fp32, 2.19 against 2.22
#: in bf16 (within the noise), no change at 1024.  8 warps for the tile kernels lost (7.0 against
#: 4.05 ms in fp32 at 8192); for the other kernels they gained 2-3% at 1024 only
#: (tools/gpu_exercise.py LAUNCH_VARIANTS; bench/NOTES.md).
LAUNCH_OPTIONS: Dict[str, Dict[str, int]] = {"coarse_histogram_kernel": dict(maxnreg=168)}
#: ROCm: Triton's HIP backend takes no maxnreg (_launch leaves it out there).
_ON_HIP = torch.version.hip is not None
#: Histogram bins are int32 while no bin can pass 2^31 - 1, i.e. while the B(B-1)/2 pairs fit
#: (B <= 65536); int64 beyond, where one bin can hold nearly every pair (collapsed embeddings).
INT32_HISTOGRAM_MAX_PAIRS = 2**31 - 1
#: Largest batch: T = cdiv(B, TILE) blocks a side, and the tile passes launch T(T + 1) / 2
#: programs on a CUDA grid's x axis (at most 2^31 - 1: T <= 65535), or, with the square grid,
#: (T, T), whose y axis may not pass 65535: the same bound either way.  (MAX_BATCH: at the
#: shipped TILE; the check reads TILE at each call, which an A/B variant may change.)
MAX_GRID_Y = 65535
MAX_BATCH = MAX_GRID_Y * TILE
#: Largest number of selected negatives min(N, B(B-1)/2): the top-N candidate buffer holds
#: CANDIDATE_FACTOR (4) slots per selected pair and is indexed in int32.
MAX_SELECTED_NEGATIVES = (2**31 - 1) // 4

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
    if not _kernels_interpreted():
        return BLOCK_K
    # The interpreter's ordered tiles hold TILE x BLOCK_K x TILE products, and its tensors at most
    # 2^20 elements (128 x 128 tiles: chunks of 64).
    return min(INTERPRETER_BLOCK_K, 2**20 // TILE**2)


def _block_pairs() -> int:
    return INTERPRETER_BLOCK_PAIRS if _kernels_interpreted() else BLOCK_PAIRS


def _backward_rows_shape(batch: int) -> Tuple[int, int]:
    """(rows a program, unroll of the entry walk) of backward_rows_kernel at `batch` rows."""
    if _kernels_interpreted():
        return INTERPRETER_BACKWARD_BLOCK_ROWS, INTERPRETER_BACKWARD_ENTRY_UNROLL
    if batch <= SMALL_BACKWARD_MAX_BATCH:
        return SMALL_BACKWARD_BLOCK_ROWS, SMALL_BACKWARD_ENTRY_UNROLL
    return BACKWARD_BLOCK_ROWS, 1


def _positive_splits(batch: int, dim_s: int) -> int:
    """Feature splits of positive_backward_kernel's row blocks: enough to give it about
    POSITIVE_BACKWARD_PROGRAMS programs, at most one per BLOCK_D chunk of the student's row."""
    programs = INTERPRETER_POSITIVE_BACKWARD_PROGRAMS if _kernels_interpreted() else POSITIVE_BACKWARD_PROGRAMS
    return max(1, min(_cdiv(dim_s, BLOCK_D), programs // _num_tiles(batch)))


def _scan_block() -> int:
    return INTERPRETER_SCAN_BLOCK if _kernels_interpreted() else SCAN_BLOCK


def _small_sort_max() -> int:
    return INTERPRETER_SMALL_SORT_MAX if _kernels_interpreted() else SMALL_SORT_MAX


def _small_sort_block_rows() -> int:
    return INTERPRETER_SMALL_SORT_BLOCK_ROWS if _kernels_interpreted() else SMALL_SORT_BLOCK_ROWS


def _candidate_blocks() -> Tuple[int, int]:
    if _kernels_interpreted():
        return INTERPRETER_CANDIDATE_BLOCK, INTERPRETER_CANDIDATE_CHUNK
    return CANDIDATE_BLOCK, CANDIDATE_CHUNK


def _fp32_precision() -> str:
    """EKD_TRITON_FP32_PRECISION, checked: the input_precision of every fp32 dot, those of 16-bit
    inputs' backward included (the gradient's fp32 dots)."""
    if FP32_DOT_PRECISION not in ("tf32x3", "ieee"):
        raise ValueError(f"EKD_TRITON_FP32_PRECISION must be 'tf32x3' or 'ieee' (plain tf32 is not accurate "
                         f"enough for tau = 0.01), got {FP32_DOT_PRECISION!r}")
    return FP32_DOT_PRECISION


def _dot_precision(x: torch.Tensor) -> str:
    """input_precision of the similarity dots of `x`; under the interpreter
    kernels.ORDERED_PRECISION (fp32 products summed in k order, see _similarity_tile).  Checks
    the setting whatever x's dtype, so that a bad one fails in the forward, not at the backward."""
    precision = _fp32_precision()
    if _kernels_interpreted():
        return "ordered_fp32"
    return precision if x.dtype == torch.float32 else "ieee"


def _num_tiles(batch: int) -> int:
    return (batch + TILE - 1) // TILE


def _tile_grid(batch: int) -> Tuple[int, ...]:
    """Grid of the tile passes (1-3): one program per upper-triangle tile, T(T + 1) / 2 for T
    blocks a side (kernels._tile_program numbers them); with TRIANGLE_TILE_GRID off, the square
    grid whose program (m, n) is the tile of row block m and column block n, the lower triangle
    returning at once."""
    tiles = _num_tiles(batch)
    # (ROCm: the square grid.  HIP refuses a launch whose grid x blockDim passes 2^32 on axis 0:
    # 256 threads a program would stop the triangular grid at T = 5792, B ~ 370000.)
    return (tiles * (tiles + 1) // 2,) if TRIANGLE_TILE_GRID and not _ON_HIP else (tiles, tiles)


def _gram_size(batch: int) -> int:
    """Elements of a model's Gram cache at `batch` rows (kernels._gram_offsets)."""
    tiles = _num_tiles(batch)
    return tiles * (tiles + 1) // 2 * TILE * TILE


def _gram_indexable(batch: int) -> int:
    """_gram_size where the kernels can index a cache (in 32 bits: below B ~ 65500), 0 past it:
    the widths a cache may have, whatever GRAM_CACHE_MAX_BATCH says."""
    size = _gram_size(batch)
    return size if size < 2**31 else 0


def _gram_tiles(batch: int) -> int:
    """_gram_size where the forward keeps the cache (GRAM_CACHE_MAX_BATCH), 0 elsewhere."""
    return _gram_indexable(batch) if batch <= GRAM_CACHE_MAX_BATCH else 0


#: The Gram cache output's width when the forward keeps none (a spare: never a null pointer).
NO_GRAM = 4


def _coarse_copies(batch: int) -> int:
    """Copies of each coarse histogram (see coarse_histogram_kernel): 1 at B <= 640, 4 at 1024,
    16 from 2048 on."""
    tiles = _num_tiles(batch) * (_num_tiles(batch) + 1) // 2
    return max(1, min(MAX_COARSE_COPIES, tiles // COARSE_TILES_PER_COPY))


def _cutoff_fraction(batch: int, config: EKDConfig, hardest: bool) -> Optional[float]:
    """The sample fraction that places pass 1's cutoff (cutoff_select_kernel), or None: pass 1
    counts every bucket at once (below CUTOFF_MIN_BATCH, or when the targets reach too deep).
    The targets' ranks are fractions of L: at most the largest FPR, and N / L for the top-N
    (L is not known on the host; N over all pairs stands for it, the safety factor and the
    fallback cover the positives).  Any value gives the same results, only more or less work."""
    if batch < CUTOFF_MIN_BATCH:
        return None
    deepest = max(config.fprs)
    if hardest:
        deepest = max(deepest, config.num_hard_negatives / (batch * (batch - 1) // 2))
    fraction = CUTOFF_SAFETY * deepest
    return fraction if fraction <= CUTOFF_MAX_FRACTION else None


def _window_capacity(num_pairs: int) -> int:
    """Keys a model's window buffer holds (PASS1_WINDOWS)."""
    low, high = WINDOW_CAPACITY_RANGE
    return max(low, min(high, num_pairs // WINDOW_CAPACITY_DIVISOR))


def _window_fractions(config: EKDConfig, num_pairs: int, device: torch.device) -> torch.Tensor:
    """fp32 target fractions that place the windows in the sample: the FPRs, then N over the pairs
    (L is not known on the host; the window's width covers the positives)."""
    fractions = list(config.fprs) + [config.num_hard_negatives / num_pairs]
    return _device_constant(("window fractions", config.fprs, config.num_hard_negatives, num_pairs), fractions,
                            torch.float32, device)


def _histogram_dtype(num_pairs: int) -> torch.dtype:
    """dtype of the radix histograms' bins: int32 unless a bin could pass 2^31 - 1."""
    return torch.int32 if num_pairs <= INT32_HISTOGRAM_MAX_PAIRS else torch.int64


def _check_limits(batch: int, config: EKDConfig) -> None:
    """The sizes the kernels' launch grids and int32 buffers allow (module docstring, Limits)."""
    check_batch_limit(batch, MAX_GRID_Y * TILE, "triton", f"its tile passes launch T(T + 1) / 2 programs for T = "
                                                          f"cdiv(B, {TILE}), and a grid's axis 0 stops at 2^31 - 1")
    num_pairs = batch * (batch - 1) // 2
    if config.num_hard_negatives > MAX_SELECTED_NEGATIVES and num_pairs > MAX_SELECTED_NEGATIVES:
        raise ValueError(f"the triton EKD backend selects at most {MAX_SELECTED_NEGATIVES} negatives per call (its "
                         f"top-N candidate buffer is indexed in int32), got num_hard_negatives="
                         f"{config.num_hard_negatives} with B={batch} ({num_pairs} pairs)")


# --------------------------------------------------------------------------- host-side helpers
def _sort_by_label(labels: torch.Tensor):
    """Label order (stable, so equal labels keep their original order), then _label_groups.

    Sorted as int64, the dtype _label_groups searches in: a uint64 label past 2^63 wraps to a
    negative one (equal labels stay equal, different ones different), and sorting the uint64
    values first put it last, out of the int64 order searchsorted needs (wrong pairs drawn, or
    a column past the batch)."""
    labels = labels.to(torch.int64)
    order = torch.sort(labels, stable=True).indices
    return (order,) + _label_groups(labels, order)


def _label_groups(labels: torch.Tensor, order: torch.Tensor):
    """The labels in `order` (int64) and, per sorted row, the column range
    [group_start, group_end) of its label (for the random draw; the kernels find a row block's
    range themselves, from the sorted labels)."""
    sorted_labels = labels.index_select(0, order).to(torch.int64).contiguous()
    group_start = torch.searchsorted(sorted_labels, sorted_labels, right=False)
    group_end = torch.searchsorted(sorted_labels, sorted_labels, right=True)
    return sorted_labels, group_start, group_end


#: Constants the kernels read from the device, copied there once per key and cached: a copy on
#: every call would synchronise with the host and could not be captured in a CUDA graph.
_DEVICE_CONSTANTS = {}


def _device_constant(key, values, dtype, device: torch.device) -> torch.Tensor:
    key = (key, dtype, str(device))
    if key not in _DEVICE_CONSTANTS:
        _DEVICE_CONSTANTS[key] = torch.tensor(values, dtype=dtype, device=device)
    return _DEVICE_CONSTANTS[key]


def _rank_fractions(config: EKDConfig, device: torch.device) -> torch.Tensor:
    """int64 [[numerators], [denominators]] of the FPRs: coarse_select_kernel computes
    m_k = floor(L * fpr_k) with them exactly (as EKDConfig.threshold_indices), in int64 without
    forming L * numerator (kernels._floor_fraction: denominators below 2^40, which
    config.fpr_fraction's limit of 10^12 keeps)."""
    numerators, denominators = config.fpr_ratios
    assert max(denominators) < 2**40 and all(0 <= p <= q for p, q in zip(numerators, denominators))
    return _device_constant(("fprs", config.fprs), [list(numerators), list(denominators)], torch.int64, device)


def _ema_constants(momentum: float, device: torch.device) -> torch.Tensor:
    """float64 (momentum, 1 - momentum), the latter computed in Python as the reference does;
    fine_select_kernel rounds both to the state's dtype."""
    return _device_constant(("ema", momentum), [momentum, 1 - momentum], torch.float64, device)


def _candidate_capacity(num_slots: int) -> int:
    """Size of the top-N candidate buffer: the N hardest negatives plus the rest of the
    boundary's 16-bit bucket must fit, else passes 3 and 4 run."""
    return max(CANDIDATE_FACTOR * num_slots, MIN_CANDIDATE_CAPACITY)


def _random_negative_pairs(labels: torch.Tensor, num_hard_negatives: int,
                           generator: Optional[torch.Generator]) -> torch.Tensor:
    """(2, n) original-index pairs (i < j) the reference's random selection draws.

    The reference draws N ranks (``draw_random_negatives(L, N, generator)``) into the negative
    pairs in row-major order; here each rank becomes its pair without listing the pairs: the row from a
    prefix sum of per-row negative counts, the column by a binary search on the count of
    negatives in (i, j] (columns minus same-label columns, found in the label-sorted order).
    The draw needs L as a Python int: this is the one host synchronisation of the backend, and
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
    ranks = draw_random_negatives(num_negative, count, generator).to(device)

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


def _stable_sort(keys: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """torch.sort(keys, stable=True) of a 1-D integer tensor: (sorted keys, their indices), by
    one stable_sort_kernel launch up to SMALL_SORT_MAX keys."""
    if keys.dtype.is_floating_point or keys.dtype.is_complex or keys.dtype == torch.bool:
        raise TypeError(f"_stable_sort takes integer keys, got {keys.dtype}")
    num_keys = keys.numel()
    # (SMALL_SORT_MAX bounds the interpreter too: its 0, the A/B's torch.sort, holds everywhere)
    if num_keys > min(SMALL_SORT_MAX, _small_sort_max()):
        return torch.sort(keys, stable=True)
    keys = keys.contiguous()
    sorted_keys = torch.empty_like(keys)
    order = torch.empty(num_keys, dtype=torch.int64, device=keys.device)
    block_rows = _small_sort_block_rows()
    _launch(_kernels().stable_sort_kernel, (_cdiv(num_keys, block_rows),))(
        keys, num_keys, sorted_keys, order, BLOCK_R=block_rows, BLOCK_C=SMALL_SORT_BLOCK_COLS)
    return sorted_keys, order


# --------------------------------------------------------------------------- forward stages
def _launch(kernel, grid):
    """``kernel[grid]`` with the kernel's LAUNCH_OPTIONS (on ROCm without maxnreg, which
    Triton's HIP backend does not take), through the launch cache (``_triton/launch.py``: the
    compiled kernel's launcher called directly once JITFunction.run has picked it)."""
    options = LAUNCH_OPTIONS.get(kernel.__name__) if LAUNCH_OPTIONS else None
    if options and _ON_HIP and "maxnreg" in options:
        options = {key: value for key, value in options.items() if key != "maxnreg"}

    def launch(*args, **kwargs):
        return launches.launch(kernel, grid, args, {**options, **kwargs} if options else kwargs)

    return launch


def _cdiv(a: int, b: int) -> int:
    """-(-a // b): triton.cdiv (and next_power_of_2) are constexpr functions, a few us a call
    from host code."""
    return -(-a // b)


def _carve(dtype: torch.dtype, device: torch.device, **shapes) -> Tuple[torch.Tensor, dict]:
    """One uninitialised allocation split into named views, in order (no fill: the kernels that
    use a buffer write it first, or normalise_kernel zeroes it).  One split_with_sizes, then a
    view only where a shape has more than one dimension: a slice and a view per buffer cost twice
    the host time (three carves a call, about 20 views)."""
    sizes = [math.prod(shape) for shape in shapes.values()]
    buffer = torch.empty(sum(sizes), dtype=dtype, device=device)
    return buffer, {name: part if len(shape) == 1 else part.view(shape)
                    for (name, shape), part in zip(shapes.items(), buffer.split_with_sizes(sizes))}


def _forward_impl(student, teacher, labels, student_thresholds, teacher_thresholds, random_pairs,
                  config: EKDConfig, update_thresholds: bool):
    kernels = _kernels()  # first: the block sizes depend on interpreter or native mode
    device = student.device
    batch, dim_s = student.shape
    dim_t = teacher.shape[1]
    num_pairs = batch * (batch - 1) // 2
    hardest = random_pairs is None and config.num_hard_negatives > 0
    if random_pairs is not None:
        num_slots = random_pairs.shape[1]
    else:
        num_slots = min(config.num_hard_negatives, num_pairs) if hardest else 0
    num_thresholds = config.num_thresholds
    # Wanted ranks per model: the K thresholds, plus (hardest) the N-th hardest student negative.
    num_targets = num_thresholds + int(hardest)
    capacity = _candidate_capacity(num_slots) if hardest else 0
    cutoff_fraction = _cutoff_fraction(batch, config, hardest)
    # Pass 1's windows (PASS1_WINDOWS) need the cutoff's sample and int32 counters and slots.
    windows = (PASS1_WINDOWS and cutoff_fraction is not None and num_pairs <= INT32_HISTOGRAM_MAX_PAIRS
               and WINDOW_CANDIDATE_FACTOR * capacity < 2**31)
    if windows:  # pass 1's top-N candidates are all at or above the top-N window: more slots
        capacity *= WINDOW_CANDIDATE_FACTOR
        window_capacity = _window_capacity(num_pairs)
    # At least one element everywhere: never a zero-size (null) pointer argument.
    candidate_size = max(capacity, num_slots, 1)
    slot_size = max(num_slots, 1)
    row_blocks = _num_tiles(batch)
    normalise_blocks = _cdiv(batch, NORMALISE_BLOCK_ROWS)
    scan_block = _scan_block()
    linear_scan = int(SELECT_LINEAR_SCAN)
    f32, i64 = torch.float32, torch.int64

    # Scratch.  The int32 buffers of `counters`, after `fine`, are zeroed by normalise_kernel.
    # The histograms take `words` int32 words a bin and are viewed as their dtype (int32 or
    # int64, see _histogram_dtype); `fine` comes first so that both views are 8-byte aligned.
    histogram_dtype = _histogram_dtype(num_pairs)
    words = histogram_dtype.itemsize // 4
    copies = _coarse_copies(batch)
    coarse_linear_scan = int(SELECT_LINEAR_SCAN or copies >= COARSE_SELECT_LINEAR_MIN_COPIES)
    # candidate_count: [pass 2's candidates] and, with windows, [pass 1's window candidates]
    counters = dict(coarse=(2, copies, NUM_BUCKETS * words), row_greater=(batch,), row_equal=(batch,),
                    candidate_count=(1 + windows,))
    if windows:
        counters["window_count"] = (2,)
    if cutoff_fraction is not None:
        counters["probe"] = (2, NUM_BUCKETS)  # the sample's histograms (int32: TILE x B pairs)
    zeroed_size = sum(math.prod(shape) for shape in counters.values())
    int32_buffer, w32 = _carve(torch.int32, device, fine=(2, num_targets, NUM_BUCKETS * words), **counters,
                               bucket=(2, num_targets), candidate_rows=(candidate_size,),
                               candidate_cols=(candidate_size,), nonfinite=(2 * normalise_blocks,),
                               pair_flags=(slot_size,),
                               **(dict(window=(2, num_targets, 2), window_keys=(2, window_capacity)) if windows else {}))
    zeroed = int32_buffer[w32["fine"].numel():]
    _, w64 = _carve(i64, device, state=(STATE_SIZE,), target_state=(2, num_targets, 2),
                    candidate_key=(candidate_size,), partial_critical=(row_blocks,), position=(batch,),
                    spare_rows=(1,), spare_cols=(1,))
    _, wf = _carve(f32, device, partial_loss=(row_blocks,), pair_loss=(slot_size,), spare_grad=(1,))
    # Pass 1 keeps the tiles, the later passes and the backward read them back
    # (GRAM_CACHE_MAX_BATCH).  An output of its own (the backward's), each model's a multiple of
    # 16 bytes: its tiles' loads and stores are 16-byte vectors only when Triton sees its
    # pointers 16-byte aligned.
    gram_size = _gram_tiles(batch)
    gram = torch.empty((2, gram_size or NO_GRAM), dtype=f32, device=device)
    grams = (gram, gram.stride(0))  # (the kernels' gram_ptr, gram_stride: a model a row)
    keep, reuse = ((kernels.GRAM_STORE.value, kernels.GRAM_LOAD.value) if gram_size
                   else (kernels.GRAM_OFF.value, kernels.GRAM_OFF.value))

    # Outputs (each its own allocation: the op's outputs must not alias).
    loss = torch.empty((), dtype=f32, device=device)
    # The new EMA state in each state's dtype; the batch thresholds in the student state's (as the reference).
    new_student, batch_student, batch_teacher = (
        torch.empty(student_thresholds.shape, dtype=student_thresholds.dtype, device=device) for _ in range(3))
    new_teacher = torch.empty(teacher_thresholds.shape, dtype=teacher_thresholds.dtype, device=device)
    counts = torch.empty(5, dtype=i64, device=device)
    terms = torch.empty(3, dtype=f32, device=device)
    s_sorted = torch.empty((batch, dim_s), dtype=student.dtype, device=device)
    t_sorted = torch.empty((batch, dim_t), dtype=teacher.dtype, device=device)
    s_inv = torch.empty(batch, dtype=f32, device=device)
    t_inv = torch.empty(batch, dtype=f32, device=device)
    thresholds_used = torch.empty((2, num_thresholds), dtype=f32, device=device)
    positive_coefficient = torch.empty((), dtype=f32, device=device)
    rows = torch.empty(num_slots, dtype=i64, device=device)
    cols = torch.empty(num_slots, dtype=i64, device=device)
    selected_coefficient = torch.empty(num_slots, dtype=f32, device=device)
    # Kernel arguments for the slot buffers (a spare element when there is no slot).
    rows_arg, cols_arg = (rows, cols) if num_slots else (w64["spare_rows"], w64["spare_cols"])
    grad_arg = selected_coefficient if num_slots else wf["spare_grad"]

    # normalise: rows gathered in label order (stable sort: equal labels keep their order), so
    # each row's positives are one column range; inverse norms; counters zeroed.
    sorted_labels, order = _stable_sort(labels)
    _launch(kernels.normalise_kernel, (normalise_blocks, 2))(
        student, teacher, order, batch, dim_s, dim_t, student.stride(0), student.stride(1), teacher.stride(0),
        teacher.stride(1), s_sorted, t_sorted, s_inv, t_inv, w64["position"], w32["nonfinite"], zeroed,
        zeroed_size, w64["state"], BLOCK_R=NORMALISE_BLOCK_ROWS, BLOCK_K=NORMALISE_BLOCK_K, ZERO_BLOCK=scan_block)
    models = (s_sorted, t_sorted, s_inv, t_inv, sorted_labels, batch, dim_s, dim_t)
    options = dict(TILE=TILE, BLOCK_K=_block_k(), S_PRECISION=_dot_precision(student),
                   T_PRECISION=_dot_precision(teacher))
    tiles = _tile_grid(batch)

    # batch_thresholds: pass 1, the wanted buckets, pass 2 (which also gathers the top-N
    # candidates when they fit; else passes 3 and 4 select, decided on the device).  At large B,
    # pass 1 counts the head of the order first, and the rest only when a target lies in it.
    coarse, fine = w32["coarse"].view(histogram_dtype), w32["fine"].view(histogram_dtype)
    bucket, state = w32["bucket"], w64["state"]
    fractions = _rank_fractions(config, device)
    parts = ((kernels.ALL_BUCKETS, kernels.NO_CUTOFF),)
    if cutoff_fraction is not None:
        probe = w32["probe"]
        _launch(kernels.probe_histogram_kernel, (row_blocks,))(*models, max(1, batch // TILE), probe[0], probe[1],
                                                               state, **options)
        _launch(kernels.cutoff_select_kernel, (2,))(probe, state, cutoff_fraction, SCAN_BLOCK=scan_block,
                                                    LINEAR_SCAN=linear_scan)
        parts = ((kernels.HEAD_BUCKETS, kernels.CHECK_CUTOFF), (kernels.TAIL_BUCKETS, kernels.AFTER_FALLBACK))
        if windows:
            _launch(kernels.window_select_kernel, (num_targets, 2))(
                probe, state, _window_fractions(config, num_pairs, device), num_thresholds, num_targets, w32["window"],
                WINDOW_Z, WINDOW_RELATIVE, WINDOW_SLACK, SCAN_BLOCK=scan_block, LINEAR_SCAN=linear_scan)
    candidates = (w32["candidate_count"], w64["candidate_key"], w32["candidate_rows"], w32["candidate_cols"], capacity)
    for part, mode in parts:
        if windows:  # (a kernel of its own: the default launch takes none of the windows' arguments)
            _launch(kernels.coarse_histogram_windows_kernel, tiles)(
                *models, coarse[0], coarse[1], state, copies, w32["window"], num_targets, num_thresholds,
                w32["window_count"], w32["window_keys"], window_capacity, w32["candidate_count"][1:], *candidates[1:],
                *grams, PART=part.value, COLLECT=hardest, GRAM=keep, **options)
        else:
            _launch(kernels.coarse_histogram_kernel, tiles)(*models, coarse[0], coarse[1], state, copies, *grams,
                                                            PART=part.value, GRAM=keep, **options)
        _launch(kernels.coarse_select_kernel, (num_targets, 2))(
            coarse, copies, fine, state, fractions, num_thresholds, num_targets, config.num_hard_negatives, capacity,
            bucket, w64["target_state"], w32["nonfinite"], 2 * normalise_blocks, HARDEST=hardest, SCAN_BLOCK=scan_block,
            CUTOFF_MODE=mode.value, LINEAR_SCAN=coarse_linear_scan)
    # (pass 2 and its select must agree on where a target's histogram is)
    one_aggregation = PASS2_ONE_AGGREGATION and num_targets * NUM_BUCKETS < 2**31
    pass2 = dict(SKIP_EMPTY=PASS2_SKIP_EMPTY_TARGETS, ONE_AGGREGATION=one_aggregation,
                 DIRECT_MAX=PASS2_DIRECT_MAX if PASS2_SKIP_EMPTY_TARGETS else 0)
    if windows:  # pass 2 from the window buffers, unless a target lay outside its window
        _launch(kernels.window_histogram_kernel, (2 * WINDOW_HISTOGRAM_PROGRAMS,))(
            state, w32["window"], w32["window_count"], w32["window_keys"], window_capacity, w32["candidate_count"],
            capacity, bucket, num_targets, fine[0], fine[1], BLOCK=WINDOW_HISTOGRAM_BLOCK, HARDEST=hardest, **pass2)
    _launch(kernels.fine_histogram_kernel, tiles)(
        *models, bucket[0], num_targets, bucket[1], num_thresholds, fine[0], fine[1], state, *candidates, *grams,
        COLLECT=hardest, WINDOWS=windows, GRAM=reuse, **pass2, **options)

    # ema_update (the loss uses the updated state), with the exact keys of pass 2.  No fused
    # multiply-add: the GPU compiler would contract momentum * e + (1 - momentum) * t into an
    # fma, one rounding fewer than the reference's order, so the EMA state would drift from it.
    _launch(kernels.fine_select_kernel, (num_targets, 2))(
        fine, bucket, w64["target_state"], state, num_thresholds, num_targets, int(update_thresholds),
        student_thresholds, student_thresholds.stride(0), teacher_thresholds, teacher_thresholds.stride(0),
        new_student, new_teacher, batch_student, batch_teacher, thresholds_used,
        _ema_constants(config.momentum, device), rows_arg, cols_arg, num_slots if hardest else 0, batch,
        SCAN_BLOCK=scan_block, FILL_BLOCK=SMALL_BLOCK, ONE_AGGREGATION=one_aggregation, LINEAR_SCAN=linear_scan,
        enable_fp_fusion=False)

    # select_negatives: pass 3 (critical pairs among all pairs on request; boundary counts after
    # an overflow only), then the hardest negatives from the candidates or from pass 4.
    if hardest or config.compute_critical_ratio:
        _launch(kernels.boundary_count_kernel, tiles)(
            *models, state, w32["row_greater"], w32["row_equal"], thresholds_used[0], thresholds_used[1],
            num_thresholds, *grams, COUNT_HARD=hardest, COUNT_CRITICAL=config.compute_critical_ratio, GRAM=reuse,
            **options)
    if hardest:
        block_c, chunk = _candidate_blocks()
        _launch(kernels.hardest_negatives_kernel, (max(row_blocks, _cdiv(candidate_size, block_c)),))(
            s_sorted, s_inv, sorted_labels, batch, dim_s, state, w32["row_greater"], w32["row_equal"], *candidates,
            rows, cols, gram, TILE=TILE, BLOCK_K=_block_k(), S_PRECISION=options["S_PRECISION"], BLOCK_C=block_c,
            CHUNK=chunk, PREFIX_BLOCK=SMALL_BLOCK, WINDOWS=windows, GRAM=reuse)

    # rank loss: the positive row blocks and the selected pairs in one launch ("random" maps the
    # reference's draw to sorted rows there), then the fixed-order sums.
    random = random_pairs is not None and num_slots > 0
    random_rows, random_cols = (random_pairs[0], random_pairs[1]) if random else (w64["spare_rows"], w64["spare_cols"])
    block_pairs = _block_pairs()
    _launch(kernels.rank_loss_kernel, (row_blocks + _cdiv(num_slots, block_pairs),))(
        *models, thresholds_used[0], thresholds_used[1], num_thresholds, config.temperature, row_blocks,
        wf["partial_loss"],
        w64["partial_critical"], rows_arg, cols_arg, num_slots, w64["position"], random_rows, random_cols,
        wf["pair_loss"], grad_arg, w32["pair_flags"], *grams, RANK_LOSS=_RANK_LOSS_CODES[config.rank_loss],
        CRITICAL_ONLY=config.critical_only, RANDOM=random, BLOCK_P=block_pairs, LABEL_BLOCK=LABEL_BLOCK, GRAM=reuse,
        **options)
    _launch(kernels.finalize_kernel, (1,))(
        wf["partial_loss"], w64["partial_critical"], row_blocks, wf["pair_loss"], w32["pair_flags"], num_slots, state,
        num_pairs, float(num_pairs), config.positive_weight, config.negative_weight, loss, counts, terms,
        positive_coefficient, grad_arg,
        CRITICAL_ONLY=config.critical_only, BLOCK=SMALL_BLOCK)
    return (loss, new_student, new_teacher, batch_student, batch_teacher, counts, terms, order, s_inv, t_inv,
            thresholds_used, positive_coefficient, rows, cols, selected_coefficient, s_sorted, t_sorted,
            sorted_labels, gram)


# --------------------------------------------------------------------------- argument checks
# The custom ops are public (torch.ops.ekd_kernels.*): ekd_forward below validates before it calls
# them, but a direct call with a malformed argument must fail here, naming it, rather than hand a
# kernel an index past a buffer.  Shapes, dtypes and devices are checked on every device (and in
# the fake implementations); the VALUES that index memory (random_pairs, order, the selected
# pairs) only for CPU tensors, which the interpreter runs: on CUDA reading them would synchronise
# with the host, which the forward and backward never do, so there the ops check shapes only (an
# index value out of range on CUDA is not detected: pass the forward's own outputs).
_EMBEDDING_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_index_values(device: torch.device) -> bool:
    """Whether the ops read their index arguments' values to check them: for CPU tensors, which
    only the interpreter runs (no host synchronisation to avoid there).  Not on CUDA, and not
    for CPU tensors handed to natively compiled kernels (a compile-only harness: they never run)."""
    return device.type == "cpu" and _interpreter_requested()


def _host_values(x: torch.Tensor):
    """The values of a CPU tensor as a numpy view, read without an ATen op.  The value checks run
    for CPU tensors only, so they can never synchronise a device; reading through numpy keeps them
    out of the profiler's aten::_local_scalar_dense count, with which the tests check on CPU that
    the code path CUDA takes reads nothing back to the host."""
    return x.detach().numpy()


def _require(condition, message, error=ValueError) -> None:
    """`error(message())` unless `condition` (a bool, or a SymBool in a fake implementation:
    a runtime assertion then, not a guard).  Plain bools take the short way: these checks run on
    every call, where the host time of a launch-bound forward is what a small batch costs."""
    if condition is True:
        return
    if condition is False:
        raise error(message())
    torch._check_with(error, condition, message)


def _is_index_dtype(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _check_same_device(op: str, device: torch.device, **tensors) -> None:
    for name, x in tensors.items():
        if x is not None and x.device != device:
            raise ValueError(f"{op}: {name} must be on the student's device {device}, got {x.device}")


def _check_embeddings(op: str, student_name: str, student, teacher_name: str, teacher) -> None:
    """2-D fp32/fp16/bf16 rows of the same count B >= 2, at least one column each."""
    for name, x in ((student_name, student), (teacher_name, teacher)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"{op}: {name} must be 2-D (B x D), got shape {tuple(x.shape)}")
        if x.dtype not in _EMBEDDING_DTYPES:
            raise ValueError(f"{op}: {name} must be float32, float16 or bfloat16 (the kernels compute in fp32), "
                             f"got {x.dtype}")
        _require(x.shape[1] >= 1, lambda: f"{op}: {name} needs at least one column, got shape {tuple(x.shape)}")
    batch = student.shape[0]
    _require(batch >= 2, lambda: f"{op}: {student_name} needs B >= 2 rows, got shape {tuple(student.shape)}")
    _require(teacher.shape[0] == batch, lambda: f"{op}: {teacher_name} must have B = {batch} rows (as "
                                                f"{student_name}), got shape {tuple(teacher.shape)}")


def _check_vector(op: str, name: str, x, length, dtypes=None, what: str = "") -> None:
    """1-D of `length` (a dtype among `dtypes`, or a predicate on the dtype)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    def message():
        return f"{op}: {name} must be 1-D of length {length}{what}, got shape {tuple(x.shape)}"

    _require(x.dim() == 1, message)
    _require(x.shape[0] == length, message)
    if callable(dtypes):
        if not dtypes(x.dtype):
            raise ValueError(f"{op}: {name} must be an integer tensor, got {x.dtype}")
    elif dtypes is not None and x.dtype not in dtypes:
        raise ValueError(f"{op}: {name} must be {' or '.join(str(d) for d in dtypes)}, got {x.dtype}")


def _check_scalar(op: str, name: str, x, dtypes=None) -> None:
    """One value (the forward's 0-d outputs), floating."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    _require(x.numel() == 1, lambda: f"{op}: {name} must hold one value, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        raise ValueError(f"{op}: {name} must be {' or '.join(str(d) for d in dtypes)}, got {x.dtype}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{op}: {name} must be floating, got {x.dtype}")


def _check_forward_args(student, teacher, labels, student_thresholds, teacher_thresholds, random_pairs,
                        num_thresholds: int, check_values: bool) -> None:
    """triton_ekd_forward's tensors: student B x Ds and teacher B x Dt (fp32/fp16/bf16), labels B
    integers, the two thresholds K = len(fprs) floats, random_pairs None or 2 x n int64 with
    n <= B(B-1)/2 and (check_values: CPU tensors) every index in [0, B); one device."""
    op = "triton_ekd_forward"
    _check_embeddings(op, "student", student, "teacher", teacher)
    batch = student.shape[0]
    _check_vector(op, "labels", labels, batch, _is_index_dtype, " (B)")
    for name, x in (("student_thresholds", student_thresholds), ("teacher_thresholds", teacher_thresholds)):
        _check_vector(op, name, x, num_thresholds, what=" (K, one per FPR)")
        if not x.dtype.is_floating_point:
            raise ValueError(f"{op}: {name} must be floating, got {x.dtype}")
    if random_pairs is not None:
        if not isinstance(random_pairs, torch.Tensor):
            raise ValueError(f"{op}: random_pairs must be a torch.Tensor or None, got {type(random_pairs).__name__}")
        if random_pairs.dtype != torch.int64:
            raise ValueError(f"{op}: random_pairs must be int64, got {random_pairs.dtype}")
        def message():
            return (f"{op}: random_pairs must be 2 x n with n <= B(B-1)/2 = {batch * (batch - 1) // 2}, got shape "
                    f"{tuple(random_pairs.shape)}")

        _require(random_pairs.dim() == 2, message)
        _require(random_pairs.shape[0] == 2, message)
        _require(random_pairs.shape[1] <= batch * (batch - 1) // 2, message)
    _check_same_device(op, student.device, teacher=teacher, labels=labels, student_thresholds=student_thresholds,
                       teacher_thresholds=teacher_thresholds, random_pairs=random_pairs)
    if check_values and random_pairs is not None and random_pairs.numel() > 0:
        pairs = _host_values(random_pairs)
        outside = ((pairs < 0) | (pairs >= batch)).any(axis=0)
        if outside.any():
            bad = pairs[:, int(outside.argmax())].tolist()
            raise ValueError(f"{op}: random_pairs holds a pair {tuple(bad)} with an index outside [0, B = {batch})")


def _check_backward_args(grad_loss, s, t, sorted_labels, order, s_inv, t_inv, thresholds_used,
                         positive_coefficient, selected_rows, selected_cols, selected_coefficient, gram, temperature,
                         rank_loss, check_values: bool) -> None:
    """triton_ekd_backward's tensors, as the forward leaves them: s_sorted B x Ds and t_sorted
    B x Dt (fp32/fp16/bf16), sorted_labels B integers, order B int64, s_inv and t_inv B fp32,
    thresholds_used 2 x K fp32 (K >= 1), positive_coefficient and grad_loss one float,
    selected_rows / selected_cols n int64 and selected_coefficient n fp32 (n <= B(B-1)/2), gram
    2 x (the Gram cache's size at B, where the forward may keep one, or NO_GRAM) fp32; one
    device.  check_values (CPU tensors): order a permutation of [0, B), sorted_labels
    ascending, each selected pair two rows in [0, B) or the unfilled slot (B, B)."""
    op = "triton_ekd_backward"
    _check_embeddings(op, "s_sorted", s, "t_sorted", t)
    batch = s.shape[0]
    _check_scalar(op, "grad_loss", grad_loss)
    _check_vector(op, "sorted_labels", sorted_labels, batch, _is_index_dtype, " (B)")
    _check_vector(op, "order", order, batch, (torch.int64,), " (B)")
    _check_vector(op, "s_inv", s_inv, batch, (torch.float32,), " (B)")
    _check_vector(op, "t_inv", t_inv, batch, (torch.float32,), " (B)")
    if not isinstance(thresholds_used, torch.Tensor):
        raise ValueError(f"{op}: thresholds_used must be a torch.Tensor, got {type(thresholds_used).__name__}")
    def thresholds_message():
        return f"{op}: thresholds_used must be 2 x K (K >= 1), got shape {tuple(thresholds_used.shape)}"

    _require(thresholds_used.dim() == 2, thresholds_message)
    _require(thresholds_used.shape[0] == 2, thresholds_message)
    _require(thresholds_used.shape[1] >= 1, thresholds_message)
    if thresholds_used.dtype != torch.float32:
        raise ValueError(f"{op}: thresholds_used must be torch.float32, got {thresholds_used.dtype}")
    _check_scalar(op, "positive_coefficient", positive_coefficient, (torch.float32,))
    if not isinstance(selected_rows, torch.Tensor):
        raise ValueError(f"{op}: selected_rows must be a torch.Tensor, got {type(selected_rows).__name__}")
    def slots_message():
        return (f"{op}: selected_rows must be 1-D with n <= B(B-1)/2 = {batch * (batch - 1) // 2} slots, got shape "
                f"{tuple(selected_rows.shape)}")

    _require(selected_rows.dim() == 1, slots_message)
    _require(selected_rows.shape[0] <= batch * (batch - 1) // 2, slots_message)
    num_slots = selected_rows.shape[0]
    _check_vector(op, "selected_rows", selected_rows, num_slots, (torch.int64,))
    _check_vector(op, "selected_cols", selected_cols, num_slots, (torch.int64,), " (n, as selected_rows)")
    _check_vector(op, "selected_coefficient", selected_coefficient, num_slots, (torch.float32,),
                  " (n, as selected_rows)")
    if not isinstance(gram, torch.Tensor):
        raise ValueError(f"{op}: gram must be a torch.Tensor, got {type(gram).__name__}")
    cache_size = _gram_indexable(batch)

    def gram_message():
        cache = f"2 x {cache_size} at B = {batch} or " if cache_size else ""
        return (f"{op}: gram must be the forward's Gram cache, {cache}2 x {NO_GRAM} when it kept none, got shape "
                f"{tuple(gram.shape)}")

    _require(gram.dim() == 2, gram_message)
    _require(gram.shape[0] == 2, gram_message)
    width = gram.shape[1] == NO_GRAM
    if cache_size:
        width = width | (gram.shape[1] == cache_size)
    _require(width, gram_message)
    if gram.dtype != torch.float32:
        raise ValueError(f"{op}: gram must be torch.float32, got {gram.dtype}")
    if rank_loss not in _RANK_LOSS_CODES:
        raise ValueError(f"{op}: rank_loss must be one of {tuple(_RANK_LOSS_CODES)}, got {rank_loss!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{op}: temperature must be a finite number > 0, got {temperature!r}")
    _check_same_device(op, s.device, grad_loss=grad_loss, t_sorted=t, sorted_labels=sorted_labels, order=order,
                       s_inv=s_inv, t_inv=t_inv, thresholds_used=thresholds_used,
                       positive_coefficient=positive_coefficient, selected_rows=selected_rows,
                       selected_cols=selected_cols, selected_coefficient=selected_coefficient, gram=gram)
    if not check_values:
        return
    # O(B + n), CPU tensors only (see _host_values).
    import numpy

    positions = _host_values(order)
    if ((positions < 0) | (positions >= batch)).any() or (numpy.bincount(positions, minlength=batch) != 1).any():
        raise ValueError(f"{op}: order must be a permutation of [0, B = {batch}) (the forward's label order)")
    labels = _host_values(sorted_labels)
    if (labels[1:] < labels[:-1]).any():
        raise ValueError(f"{op}: sorted_labels must be in ascending order (the forward's label-sorted labels)")
    rows, cols = _host_values(selected_rows), _host_values(selected_cols)
    filled = (rows >= 0) & (rows < batch) & (cols >= 0) & (cols < batch)
    ok = filled | ((rows == batch) & (cols == batch))
    if not ok.all():
        slot = int(ok.argmin())
        raise ValueError(f"{op}: selected_rows / selected_cols slot {slot} = ({int(rows[slot])}, {int(cols[slot])}) "
                         f"is neither a pair of sorted rows in [0, B = {batch}) nor the unfilled slot (B, B)")


# --------------------------------------------------------------------------- forward op
def _on_device(device: torch.device):
    """Triton launches on the *current* CUDA device: tensors on cuda:1 while cuda:0 is current
    (a process that never called torch.cuda.set_device) would be handed to another GPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _config_from(fprs, temperature, num_hard_negatives, momentum, positive_weight, negative_weight,
                 critical_only, rank_loss, compute_critical_ratio) -> EKDConfig:
    return _cached_config(tuple(fprs), temperature, num_hard_negatives, momentum, positive_weight, negative_weight,
                          critical_only, rank_loss, compute_critical_ratio)


@functools.lru_cache(maxsize=64, typed=True)
def _cached_config(fprs, temperature, num_hard_negatives, momentum, positive_weight, negative_weight, critical_only,
                   rank_loss, compute_critical_ratio) -> EKDConfig:
    """The op's options rebuilt into a validated EKDConfig, once per distinct set: validation
    costs more host time than the launches of a small batch.  EKDConfig is frozen; a set that
    fails validation raises and is not cached.  Keyed by value *and type* (typed=True): 1 and
    1.0 or True and 1 are different options to the validation."""
    return EKDConfig(fprs=fprs, temperature=temperature, num_hard_negatives=num_hard_negatives, momentum=momentum,
                     positive_weight=positive_weight, negative_weight=negative_weight, critical_only=critical_only,
                     rank_loss=rank_loss, compute_critical_ratio=compute_critical_ratio)


_ForwardOutputs = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                        torch.Tensor]


@torch.library.custom_op("ekd_kernels::triton_ekd_forward", mutates_args=())
def _forward_op(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                student_thresholds: torch.Tensor, teacher_thresholds: torch.Tensor,
                random_pairs: Optional[torch.Tensor], fprs: List[float], temperature: float,
                num_hard_negatives: int, momentum: float, positive_weight: float, negative_weight: float,
                critical_only: bool, rank_loss: str, compute_critical_ratio: bool,
                update_thresholds: bool) -> _ForwardOutputs:
    """EKD forward.  Outputs: loss, new student/teacher thresholds, batch student/teacher
    thresholds, counts (positive, negative, selected, critical among selected, critical among
    all), terms (positive, negative, critical ratio), then what the backward needs: label order,
    inverse norms, thresholds used, the positive pairs' coefficient, the selected pairs and
    their coefficients, the label-sorted student rows, teacher rows and labels, and the Gram
    cache (2 x NO_GRAM when the forward keeps none)."""
    config = _config_from(fprs, temperature, num_hard_negatives, momentum, positive_weight, negative_weight,
                          critical_only, rank_loss, compute_critical_ratio)
    return _forward_checked(student, teacher, labels, student_thresholds, teacher_thresholds, random_pairs, config,
                            update_thresholds)


def _forward_checked(student, teacher, labels, student_thresholds, teacher_thresholds, random_pairs,
                     config: EKDConfig, update_thresholds: bool) -> _ForwardOutputs:
    """The forward op's body once its options are an EKDConfig (also the eager path's forward,
    see _EagerForward): the argument checks, then the kernels on the tensors' device."""
    _check_forward_args(student, teacher, labels, student_thresholds, teacher_thresholds, random_pairs,
                        config.num_thresholds, check_values=_check_index_values(student.device))
    _check_limits(student.shape[0], config)
    if random_pairs is not None:
        random_pairs = random_pairs.contiguous()  # the kernels read each of its rows as one contiguous run
    with _on_device(student.device):
        return _forward_impl(student, teacher, labels, student_thresholds, teacher_thresholds, random_pairs,
                             config, update_thresholds)


@_forward_op.register_fake
def _forward_fake(student, teacher, labels, student_thresholds, teacher_thresholds, random_pairs, fprs,
                  temperature, num_hard_negatives, momentum, positive_weight, negative_weight, critical_only,
                  rank_loss, compute_critical_ratio, update_thresholds):
    _check_forward_args(student, teacher, labels, student_thresholds, teacher_thresholds, random_pairs, len(fprs),
                        check_values=False)
    batch = student.shape[0]
    if random_pairs is not None:
        num_slots = random_pairs.shape[1]
    else:
        num_slots = torch.sym_min(num_hard_negatives, batch * (batch - 1) // 2)
    f32, i64 = torch.float32, torch.int64
    state = student_thresholds.new_empty

    def empty(shape, dtype):
        return student.new_empty(shape, dtype=dtype)

    return (empty((), f32), state(student_thresholds.shape), teacher_thresholds.new_empty(teacher_thresholds.shape),
            state(student_thresholds.shape), state(student_thresholds.shape), empty((5,), i64), empty((3,), f32),
            empty((batch,), i64), empty((batch,), f32), empty((batch,), f32),
            empty((2, len(fprs)), f32), empty((), f32), empty((num_slots,), i64), empty((num_slots,), i64),
            empty((num_slots,), f32), empty(student.shape, student.dtype), empty(teacher.shape, teacher.dtype),
            empty((batch,), labels.dtype), empty((2, _gram_tiles(batch) or NO_GRAM), f32))


# --------------------------------------------------------------------------- backward op
@torch.library.custom_op("ekd_kernels::triton_ekd_backward", mutates_args=())
def _backward_op(grad_loss: torch.Tensor, s_sorted: torch.Tensor, t_sorted: torch.Tensor,
                 sorted_labels: torch.Tensor, order: torch.Tensor, s_inv: torch.Tensor, t_inv: torch.Tensor,
                 thresholds_used: torch.Tensor, positive_coefficient: torch.Tensor, selected_rows: torch.Tensor,
                 selected_cols: torch.Tensor, selected_coefficient: torch.Tensor, gram: torch.Tensor,
                 temperature: float, critical_only: bool, rank_loss: str) -> torch.Tensor:
    """d loss / d student (in the student's dtype and shape, contiguous), from the forward's
    label-sorted rows and what it saved."""
    return _backward_checked(grad_loss, s_sorted, t_sorted, sorted_labels, order, s_inv, t_inv, thresholds_used,
                             positive_coefficient, selected_rows, selected_cols, selected_coefficient, gram,
                             temperature, critical_only, rank_loss)


def _backward_checked(grad_loss, s_sorted, t_sorted, sorted_labels, order, s_inv, t_inv, thresholds_used,
                      positive_coefficient, selected_rows, selected_cols, selected_coefficient, gram, temperature,
                      critical_only, rank_loss) -> torch.Tensor:
    """The backward op's body (also the eager path's backward): the argument checks, then the kernels."""
    _check_backward_args(grad_loss, s_sorted, t_sorted, sorted_labels, order, s_inv, t_inv, thresholds_used,
                         positive_coefficient, selected_rows, selected_cols, selected_coefficient, gram, temperature,
                         rank_loss, check_values=_check_index_values(s_sorted.device))
    # The kernels index every tensor but the thresholds as a contiguous run (no-ops for the
    # forward's outputs, which are contiguous).
    (s_sorted, t_sorted, sorted_labels, order, s_inv, t_inv, thresholds_used, selected_rows, selected_cols,
     selected_coefficient) = (x.contiguous() for x in (s_sorted, t_sorted, sorted_labels, order, s_inv, t_inv,
                                                       thresholds_used, selected_rows, selected_cols,
                                                       selected_coefficient))
    with _on_device(s_sorted.device):
        return _backward_impl(grad_loss, s_sorted, t_sorted, sorted_labels, order, s_inv, t_inv, thresholds_used,
                              positive_coefficient, selected_rows, selected_cols, selected_coefficient,
                              gram.contiguous(), temperature, critical_only, rank_loss)


def _backward_impl(grad_loss, s, t, sorted_labels, order, s_inv, t_inv, thresholds_used, positive_coefficient,
                   selected_rows, selected_cols, selected_coefficient, gram, temperature, critical_only, rank_loss):
    kernels = _kernels()
    device = s.device
    batch, dim_s = s.shape
    dim_t = t.shape[1]
    num_slots = selected_rows.numel()
    # Both directions of each selected pair; one padding entry for an empty selection, and
    # spare slot buffers: never a zero-size (null) pointer argument.
    num_entries = max(2 * num_slots, 1)
    if num_slots == 0:
        selected_rows = selected_cols = torch.empty(1, dtype=torch.int64, device=device)
        selected_coefficient = torch.empty(1, dtype=torch.float32, device=device)

    # Positive pairs: their tiles read from the forward's Gram cache when it kept one, else
    # recomputed; g multiplied into each row block's own rows (the kernel writes every row of
    # grad_hat); its programs also write the selected entries' sort keys.
    grad_hat = torch.empty((batch, dim_s), dtype=torch.float32, device=device)
    entry_keys = torch.empty(num_entries, dtype=torch.int64, device=device)
    cache_size = _gram_indexable(batch)
    cached = cache_size > 0 and gram.shape[1] == cache_size
    _launch(kernels.positive_backward_kernel, (_num_tiles(batch), _positive_splits(batch, dim_s)))(
        s, t, s_inv, t_inv, sorted_labels, batch, dim_s, dim_t, thresholds_used[0], thresholds_used[1],
        thresholds_used.shape[1], temperature, grad_loss, positive_coefficient, grad_hat, selected_rows,
        selected_cols, num_slots, entry_keys, num_entries, gram, gram.stride(0), RANK_LOSS=_RANK_LOSS_CODES[rank_loss],
        CRITICAL_ONLY=critical_only, TILE=TILE, BLOCK_K=_block_k(), BLOCK_D=BLOCK_D, S_PRECISION=_dot_precision(s),
        T_PRECISION=_dot_precision(t), G_PRECISION=_fp32_precision(), LABEL_BLOCK=LABEL_BLOCK,
        ENTRY_BLOCK=SMALL_BLOCK, GRAM=(kernels.GRAM_LOAD if cached else kernels.GRAM_OFF).value)

    # Selected negatives: the entries sorted by (row, other) fix each row's summation order,
    # which makes the gradient bitwise reproducible without float atomics; then back through
    # the normalisation.
    sorted_keys, entry_index = _stable_sort(entry_keys)
    grad = torch.empty((batch, dim_s), dtype=s.dtype, device=device)
    block_rows, entry_unroll = _backward_rows_shape(batch)
    _launch(kernels.backward_rows_kernel, (_cdiv(batch, block_rows),))(
        s, s_inv, grad_hat, order, sorted_keys, entry_index, num_entries, num_entries.bit_length(),
        selected_coefficient, num_slots, grad_loss, positive_coefficient, grad, batch, dim_s, BLOCK_R=block_rows,
        BLOCK_D=min(1 << max(dim_s - 1, 0).bit_length(), BACKWARD_MAX_BLOCK_D),  # (next power of 2)
        ENTRY_UNROLL=entry_unroll)
    return grad


@_backward_op.register_fake
def _backward_fake(grad_loss, s_sorted, t_sorted, sorted_labels, order, s_inv, t_inv, thresholds_used,
                   positive_coefficient, selected_rows, selected_cols, selected_coefficient, gram, temperature,
                   critical_only, rank_loss):
    _check_backward_args(grad_loss, s_sorted, t_sorted, sorted_labels, order, s_inv, t_inv, thresholds_used,
                         positive_coefficient, selected_rows, selected_cols, selected_coefficient, gram, temperature,
                         rank_loss, check_values=False)
    return torch.empty(s_sorted.shape, dtype=s_sorted.dtype, device=s_sorted.device)


# --------------------------------------------------------------------------- autograd
_FORWARD_INPUTS = 16
#: What the backward reads, in _backward_op's order: the sorted rows and labels (outputs 15-17),
#: then order ... selected_coefficient (outputs 7-14), then the Gram cache (18).
_SAVED_OUTPUTS = (slice(15, 18), slice(7, 15), slice(18, 19))


def _save_for_backward(ctx, output, student, temperature: float, critical_only: bool, rank_loss: str) -> None:
    # Only the loss (output 0) carries a gradient: without this, autograd would fill a zero
    # tensor for each of the 18 other outputs on every backward (two of them B x D), 18 fill
    # launches that the backward never reads.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*(tensor for part in _SAVED_OUTPUTS for tensor in output[part]))
    keep_anchors(ctx, student)  # (first_order_only's refusal of a second derivative hangs on it)
    ctx.temperature, ctx.critical_only, ctx.rank_loss = temperature, critical_only, rank_loss


def _student_gradient(ctx, grad_loss, backward) -> Optional[torch.Tensor]:
    """d loss / d student through `backward` (the op, or its body on the eager path)."""
    if not ctx.needs_input_grad[0]:
        return None
    saved = ctx.saved_tensors
    if grad_loss is None:  # a backward through another output only (grads are not materialised)
        grad_loss = torch.zeros((), dtype=torch.float32, device=saved[0].device)
    return backward(grad_loss, *saved, ctx.temperature, ctx.critical_only, ctx.rank_loss)


def _setup_context(ctx, inputs, output):
    _save_for_backward(ctx, output, inputs[0], temperature=inputs[7], critical_only=inputs[12], rank_loss=inputs[13])


@first_order_only("triton")
def _backward(ctx, grad_loss, *unused_grads):
    return (_student_gradient(ctx, grad_loss, _backward_op),) + (None,) * (_FORWARD_INPUTS - 1)


torch.library.register_autograd("ekd_kernels::triton_ekd_forward", _backward, setup_context=_setup_context)


class _EagerForward(torch.autograd.Function):
    """The forward op's eager twin: the same checks, kernels and backward, called without the
    custom op's dispatch and the autograd that torch.library wraps around it (option defaults
    filled, every output's grad_fn): 1.4x less host time for a small batch's forward+backward
    (tools/host_cost.py).  torch.compile, export and dispatch modes take the op (see
    _autograd.eager_call), torch.func transforms _FuncForward."""

    # forward(ctx, ...) rather than a setup_context: apply() binds a setup_context style forward's
    # arguments through inspect.signature on every call; this class never runs under torch.func.
    @staticmethod
    def forward(ctx, student, teacher, labels, student_thresholds, teacher_thresholds, random_pairs, config,
                update_thresholds):
        output = _forward_checked(student, teacher, labels, student_thresholds, teacher_thresholds, random_pairs,
                                  config, update_thresholds)
        _save_for_backward(ctx, output, student, config.temperature, config.critical_only, config.rank_loss)
        ctx.mark_non_differentiable(*output[1:])
        return output

    @staticmethod
    @first_order_only("triton")
    def backward(ctx, grad_loss, *unused_grads):
        return (_student_gradient(ctx, grad_loss, _backward_checked),) + (None,) * 7

    jvp = no_forward_mode("triton")


class _FuncForward(torch.autograd.Function):
    """_EagerForward in the setup_context style torch.func transforms require (_autograd.
    functorch_call): the forward runs on the tensors the transform unwrapped."""

    @staticmethod
    def forward(student, teacher, labels, student_thresholds, teacher_thresholds, random_pairs, config,
                update_thresholds):
        return _forward_checked(student, teacher, labels, student_thresholds, teacher_thresholds, random_pairs,
                                config, update_thresholds)

    @staticmethod
    def setup_context(ctx, inputs, output):
        config = inputs[6]
        _save_for_backward(ctx, output, inputs[0], config.temperature, config.critical_only, config.rank_loss)
        ctx.mark_non_differentiable(*output[1:])

    @staticmethod
    def backward(ctx, grad_loss, *unused_grads):
        # Through the registered backward op, which takes the transform's wrapped tensors; it has
        # no autograd formula, so a second derivative raises: refuse_nested_derivative under
        # transforms.
        refuse_nested_derivative("triton")
        return (_student_gradient(ctx, grad_loss, _backward_op),) + (None,) * 7

    jvp = no_forward_mode("triton")
    vmap = no_batching_rule("triton")


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
    _check_limits(student.shape[0], config)
    random_pairs = None
    if config.negative_selection == "random":
        random_pairs = _random_negative_pairs(labels, config.num_hard_negatives, generator)
    teacher = teacher.detach()
    if eager_call(student, teacher, labels, student_thresholds, teacher_thresholds, random_pairs):
        outputs = _EagerForward.apply(student, teacher, labels, student_thresholds, teacher_thresholds, random_pairs,
                                      config, bool(update_thresholds))
    elif functorch_call():
        outputs = _FuncForward.apply(student, teacher, labels, student_thresholds, teacher_thresholds, random_pairs,
                                     config, bool(update_thresholds))
    else:
        outputs = _forward_op(student, teacher, labels, student_thresholds, teacher_thresholds, random_pairs,
                              list(config.fprs), config.temperature, config.num_hard_negatives, config.momentum,
                              config.positive_weight, config.negative_weight, config.critical_only, config.rank_loss,
                              config.compute_critical_ratio, bool(update_thresholds))
    loss, new_student, new_teacher, batch_student, batch_teacher, counts, terms = outputs[:7]
    stats = EKDStats.from_counts(batch_student, batch_teacher, new_student, new_teacher, counts, terms,
                                 terms[2] if config.compute_critical_ratio else None)
    return EKDResult(loss, new_student.detach(), new_teacher.detach(), stats.detach())

