"""Exercise every GPU-facing path, for compute-sanitizer and for the large-B consistency check.

    python tools/gpu_exercise.py sanitize --sizes 33 4096
        every CUDA op and Triton kernel forward and backward (all backends, variants, fp32/bf16),
        plus the fast-RKD and evaluator CUDA paths; run it under
        compute-sanitizer --tool memcheck|racecheck|initcheck|synccheck.
    python tools/gpu_exercise.py consistency --sizes 1024 8192 32768 --out result.json
        every fast backend against the reference (the reference only up to --reference-max B),
        fp32 and bf16, three consecutive calls: loss, gradient, thresholds and statistics within
        the golden tolerances, and bitwise determinism across two runs. Exit status 1 on a miss.
    python tools/gpu_exercise.py large --sizes 46341 65536 65537 --out large.json
        past 32-bit ranges without the B x B reference: B = 46341 (just above sqrt(2^31)), 65536
        (its B(B-1)/2 pairs still fit int32) and 65537 (they do not), a random batch and a
        collapsed one (identical student rows, distinct labels: every student similarity ties, one
        histogram bin holds all L pairs, 2^31 + 32768 of them at 65537).  The fast backends
        against each other (csrc CUDA vs triton: loss, gradient, thresholds, counts) and against
        invariants: exact pair counts from the labels, min(N, L) selected, finite loss and
        gradient, and each batch threshold's rank among the negatives, counted by a chunked fp64
        Gram (1024 rows at a time: under 1 GiB).  Peak memory per call is reported.
    python tools/gpu_exercise.py profile --sizes 64 1024 8192 --out profile.json
        where each backend's forward+backward time goes: wall time, the host's time to issue the
        call, the device's busy time, kernel launches per call, the top kernels (torch.profiler).
    python tools/gpu_exercise.py profile --sizes 8192 --backends triton triton:no-skip triton:one-aggregation triton:no-cutoff triton:one-copy
        the Triton forward against its earlier states, one after the other in one process (A/B);
        each variant's loss and gradient are compared with those of the first variant listed.
    python tools/gpu_exercise.py profile --sizes 1024 8192 --backends triton triton:warps8 triton:no-launch-options
        likewise, the kernels' launch settings (LAUNCH_VARIANTS: warps, register caps).
    python tools/gpu_exercise.py once --sizes 8192 --backend triton --dtype bfloat16
        one warm forward+backward inside an NVTX range "ekd", for ncu --nvtx --nvtx-include "ekd/".

Issue 9's checklist; needs CUDA (``--device cpu`` runs the same code on CPU tensors for a dry run).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "bench"))

from common import PeakMemory, at_least, environment_variables  # noqa: E402  (bench/)
from ekd_kernels import EKDLoss, triton_ekd  # noqa: E402
from ekd_kernels._triton.launch import LaunchCache  # noqa: E402
from ekd_kernels.backends import available_backends  # noqa: E402

LOSS_RTOL, GRAD_REL_NORM, THRESHOLD_ATOL = 1e-5, 1e-4, 1e-6  # ../shared/golden/README.md
VARIANTS = [dict(), dict(critical_only=True, compute_critical_ratio=True), dict(rank_loss="eq7"),
            dict(rank_loss="eq8", num_hard_negatives=100), dict(negative_selection="random")]
COUNTS = ("num_positive_pairs", "num_negative_pairs", "num_selected_negatives", "num_critical_selected")
# Pass 2's ways (triton_ekd settings, each named in full so that it means the same whatever the
# defaults): per target, skipping the targets (and the top-N candidates) a tile has no pair of
# (the third GPU run's default), without skipping them (the second run's pass 2), in one
# aggregation for all targets, and by per-element atomics for a tile's few pairs of a bucket (at
# most 256), per target or in one aggregation (the default since the third run).  All are A/B
# variants and forced paths below.
PASS2_VARIANTS = {"per-target": dict(PASS2_SKIP_EMPTY_TARGETS=True, PASS2_ONE_AGGREGATION=False, PASS2_DIRECT_MAX=0),
                  "no-skip": dict(PASS2_SKIP_EMPTY_TARGETS=False, PASS2_ONE_AGGREGATION=False, PASS2_DIRECT_MAX=0),
                  "one-aggregation": dict(PASS2_SKIP_EMPTY_TARGETS=True, PASS2_ONE_AGGREGATION=True, PASS2_DIRECT_MAX=0),
                  "direct-atomics": dict(PASS2_SKIP_EMPTY_TARGETS=True, PASS2_ONE_AGGREGATION=False, PASS2_DIRECT_MAX=256),
                  "one-aggregation-direct": dict(PASS2_SKIP_EMPTY_TARGETS=True, PASS2_ONE_AGGREGATION=True,
                                                 PASS2_DIRECT_MAX=256)}
# Pass 1 keeping the keys in windows around the targets, so that pass 2 reads them instead of
# recomputing the tiles when every target lies in its window (triton_ekd.PASS1_WINDOWS, off until
# measured; at B >= triton_ekd.CUTOFF_MIN_BATCH, where the cutoff's sample places the windows);
# windows-warps8 runs them with every tile kernel at 8 warps (warps8-tiles), where pass 1's
# appends do not spill (bench/NOTES.md, 2b): all tile passes at one warp count, as every launch
# variant keeps them, since the passes must compute a pair's similarity to the same bits.
PASS1_VARIANTS = {"windows": dict(PASS1_WINDOWS=True)}  # (windows-warps8: after LAUNCH_VARIANTS)
# The Triton forward's other paths, forced at any B: pass 1's histogram in copies and counted in
# two parts, with every target in the head, and with the tail counted too (the large-B default);
# pass 2's variants (but those the shipped settings already are, which the plain runs cover),
# and its direct atomics at a limit of 1, per target and in one aggregation (a small B then takes
# both sides); 32 x 32 tiles (at B = 33 a last tile of one row); pass 1's windows, hit (pass 2
# from the window buffers) and missed (buffers of no key).  The
# cutoff at any B and N (at B = 33 the default N = 2000 exceeds the pairs, where the host would
# not place a cutoff; there it sits at the last bucket, and the windows hold every negative).
CUTOFF_AT_ANY_B = dict(CUTOFF_MIN_BATCH=0, CUTOFF_MAX_FRACTION=float("inf"))
FORCED_TRITON_PATHS = {"copies+head": dict(COARSE_TILES_PER_COPY=1, **CUTOFF_AT_ANY_B),
                       "copies+fallback": dict(COARSE_TILES_PER_COPY=1, CUTOFF_SAFETY=1e-12, **CUTOFF_AT_ANY_B),
                       **{name: settings for name, settings in PASS2_VARIANTS.items()
                          if any(getattr(triton_ekd, key) != value for key, value in settings.items())},
                       "direct-limit-1": dict(PASS2_VARIANTS["direct-atomics"], PASS2_DIRECT_MAX=1),
                       "one-aggregation-direct-limit-1": dict(PASS2_VARIANTS["one-aggregation-direct"], PASS2_DIRECT_MAX=1),
                       "tile32": dict(TILE=32),
                       "copies+windows": dict(COARSE_TILES_PER_COPY=1, PASS1_WINDOWS=True, **CUTOFF_AT_ANY_B),
                       "windows-missed": dict(PASS1_WINDOWS=True, WINDOW_CAPACITY_RANGE=(0, 0), **CUTOFF_AT_ANY_B),
                       "no-gram-cache": dict(GRAM_CACHE_MAX_BATCH=0)}
# Launch settings (triton_ekd.LAUNCH_OPTIONS) against Triton's defaults (4 warps, 3 stages, no
# register cap), for A/B runs; sm_90a registers and spills of each: bench/NOTES.md
# (tools/kernel_registers.py VARIANT):
# - warps8-tiles: 8 warps for the kernels that compute similarity tiles.  At B <= 1024 each is a
#   few programs whose dot loops are latency chains; at 4 warps most hold 255 registers and
#   three spill.
# - warps8-rest: 8 warps for the others: the scans over 65536 bins (a program per target and
#   model), the gathers, fills and the backward's rows.
# - warps8: both.
# - pass1-maxnreg168: pass 1 at 4 warps capped at 168 registers: three programs an SM (the
#   shipped setting since the third GPU run, so now the same as the default).
# - no-launch-options: no kernel named, Triton's defaults everywhere (the setting before the
#   third run; the pass-2 settings stay the shipped ones).
# Each variant replaces the shipped options whole: the warps8 ones leave pass 1 uncapped.
# - histograms-warps8-maxnreg128: passes 1 and 2 at 8 warps capped at 128 registers: two
#   programs an SM, twice the default's warps for pass 2.
TILE_KERNELS = ("probe_histogram_kernel", "coarse_histogram_kernel", "coarse_histogram_windows_kernel",
                "fine_histogram_kernel", "boundary_count_kernel", "hardest_negatives_kernel", "rank_loss_kernel",
                "positive_backward_kernel")
OTHER_KERNELS = ("stable_sort_kernel", "normalise_kernel", "cutoff_select_kernel", "window_select_kernel", "coarse_select_kernel",
                 "window_histogram_kernel", "fine_select_kernel", "finalize_kernel", "backward_rows_kernel")
LAUNCH_VARIANTS = {"warps8-tiles": {name: dict(num_warps=8) for name in TILE_KERNELS},
                   "warps8-rest": {name: dict(num_warps=8) for name in OTHER_KERNELS},
                   "warps8": {name: dict(num_warps=8) for name in TILE_KERNELS + OTHER_KERNELS},
                   "pass1-maxnreg168": {"coarse_histogram_kernel": dict(maxnreg=168)},
                   "no-launch-options": {},
                   "histograms-warps8-maxnreg128": {name: dict(num_warps=8, maxnreg=128)
                                                    for name in ("coarse_histogram_kernel", "fine_histogram_kernel")}}
PASS1_VARIANTS["windows-warps8"] = dict(PASS1_WINDOWS=True, LAUNCH_OPTIONS=LAUNCH_VARIANTS["warps8-tiles"])
# Other states of the Triton forward, for A/B runs on one machine (profile/once --backends
# triton:NAME): pass 1 without its head/tail split, and without its histogram copies too (the
# first GPU run's pass-1 structure; both keep the later change to one model's tile at a time,
# and the pass-2 skip, so they compare with the default, not with the earlier runs' figures);
# pass 2's variants; pass 1's windows; the launch settings.
# - tile32: every tile pass (and the positive kernels' row blocks) on 32 x 32 tiles instead of
#   64 x 64: at B <= 1024 each tile kernel is one wave of few programs, each a latency chain over
#   its tile; 4x the programs of a quarter of the work each.  Same results up to rounding (the
#   dots' blocks differ), not bitwise.
# - tile128, tile128-warps8: 128 x 128 tiles (and selected-pair blocks of 128), at 4 warps or
#   with the tile kernels at 8: at large B a 64 x 64 tile's K loop reads 32 FLOP a byte from L2
#   (bf16), and pass 1 ran at about 90 TFLOP/s (third lease, bf16, B = 8192: 69 GFLOP of
#   upper-triangle dots in ncu's 747 us); 128 x 128 halves the bytes a FLOP.
#   sm_90a with triton 3.6 (tools/kernel_registers.py tile128 tile128-warps8): at 4 warps the
#   tile passes spill 5-13 KB; at 8 warps pass 1 255 registers and 8-148 B spilled, pass 2 255
#   and 1.7-2.0 KB, boundary_count none: one program an SM.  Up to rounding, as tile32.
# - stages4: the tile kernels' K loops with 4 stages (3 loads in flight) instead of Triton's 3, the
#   shipped options kept (pass 1's register cap): the passes are latency-bound (the third lease's
#   ncu: pass 1 at 34% of the SM, 41% of L2, in bf16) and a model's K loop is only D / BLOCK_K =
#   16 steps.  Bitwise the default's outputs expected (the same dots, loaded earlier).  sm_90a,
#   triton 3.6: the tile passes' registers and spills as shipped.
# - block-k64: feature chunks of 64 instead of 32: half the K steps a tile (the latency chain of a
#   small B's few tile programs: at B = 64 the one tile of pass 1 took 38 us in fp32).  Up to
#   rounding.  sm_90a, triton 3.6: bf16 as shipped; fp32 pass 1 spills 440-640 B (32 shipped),
#   pass 2 255 registers (226).
# - square-grid: the tile passes on the square (T, T) grid whose lower triangle's programs
#   return at once, as before the triangular grid (triton_ekd.TRIANGLE_TILE_GRID): half the
#   programs at large B, and all of them in the launches that rarely work (pass 1's tail,
#   boundary_count without an overflow), each taking a block slot.  Bitwise the same outputs.
# - linear-scan: the selection scans in one level (a 4096-wide running sum a step), as before the
#   three-level scan (triton_ekd.SELECT_LINEAR_SCAN); bitwise the same outputs.
# - levels-scan: every scan in three levels, coarse_select over copies (from B = 2817) included, as
#   in the fourth GPU run's default (triton_ekd.COARSE_SELECT_LINEAR_MIN_COPIES); the same bits.
# - torch-sort: the label sort and the backward's entry sort by torch.sort, as before the small
#   sort kernel (triton_ekd.SMALL_SORT_MAX = 0); bitwise the same outputs.
# - one-split: positive_backward_kernel with one program a row block (walking every feature
#   chunk), as before the feature splits (triton_ekd.POSITIVE_BACKWARD_PROGRAMS); bitwise the
#   same outputs.
# - normalise-tile-rows: normalise_kernel on TILE = 64 rows a program in chunks of 32, as before
#   its own blocks (triton_ekd.NORMALISE_BLOCK_ROWS); the same up to the norms' rounding.
# - copies-512, copies-128: pass 1's histograms in one copy per 512 (128) tile programs instead
#   of the default's 32 (triton_ekd.COARSE_TILES_PER_COPY): 512 is the fifth GPU run's default,
#   one copy up to B = 2048, 2 at 3072 and 4 at 4096, where the default has 16; 128 gives 9 and
#   16.  The fifth run measured 32 (and 8) against 512 at 256-2048 only; bitwise the same outputs.
# - no-launch-cache: every launch through Triton's JITFunction.run, as before the launch cache
#   (_triton/launch.py); the same launches: host time only.
# - rows-16: backward_rows_kernel on 16-row programs walking one selected entry a step at every
#   B, as before its small-B shape (2-row programs, the walk unrolled 8 times, up to B = 512:
#   triton_ekd.SMALL_BACKWARD_MAX_BATCH); both keep the one search for a segment's two ends.
#   Bitwise the same outputs.
# - candidates-64x128: hardest_negatives_kernel ranking its candidates 64 a program, 128 a step,
#   as before 16 and 512 (triton_ekd.CANDIDATE_BLOCK, CANDIDATE_CHUNK); bitwise the same outputs.
# - no-gram-cache: every pass computes its similarity tiles, as before pass 1 kept them for the
#   later passes and the positive backward up to B = 2048 (triton_ekd.GRAM_CACHE_MAX_BATCH);
#   bitwise the same outputs.  (The positive backward without the cache is not the one of
#   before: it takes each pair in the forward's orientation, a second tile where a label group
#   crosses a tile edge.)  Also a forced path of the sanitize run: at B = 33 the cache is on.
# - gram-cache-4096: the cache up to B = 4096 (34.6 MB a model there): whether it pays past 2048.
SHIPPED_OPTIONS = dict(triton_ekd.LAUNCH_OPTIONS)
TRITON_VARIANTS = {"no-launch-cache": dict(launches=LaunchCache(enabled=False)),
                   "no-cutoff": dict(CUTOFF_MIN_BATCH=2**62),
                   "tile32": dict(TILE=32),
                   "tile128": dict(TILE=128, BLOCK_PAIRS=128),
                   "tile128-warps8": dict(TILE=128, BLOCK_PAIRS=128,
                                          LAUNCH_OPTIONS={name: dict(num_warps=8) for name in TILE_KERNELS}),
                   "stages4": dict(LAUNCH_OPTIONS={name: dict(num_stages=4, **SHIPPED_OPTIONS.get(name, {}))
                                                   for name in TILE_KERNELS}),
                   "block-k64": dict(BLOCK_K=64),
                   "square-grid": dict(TRIANGLE_TILE_GRID=False),
                   "linear-scan": dict(SELECT_LINEAR_SCAN=True),
                   "levels-scan": dict(COARSE_SELECT_LINEAR_MIN_COPIES=2**62),
                   "torch-sort": dict(SMALL_SORT_MAX=0),
                   "one-copy": dict(CUTOFF_MIN_BATCH=2**62, MAX_COARSE_COPIES=1),
                   "one-split": dict(POSITIVE_BACKWARD_PROGRAMS=0),
                   "normalise-tile-rows": dict(NORMALISE_BLOCK_ROWS=64, NORMALISE_BLOCK_K=32),
                   "copies-512": dict(COARSE_TILES_PER_COPY=512),
                   "copies-128": dict(COARSE_TILES_PER_COPY=128),
                   "rows-16": dict(SMALL_BACKWARD_MAX_BATCH=0),
                   "candidates-64x128": dict(CANDIDATE_BLOCK=64, CANDIDATE_CHUNK=128),
                   "no-gram-cache": dict(GRAM_CACHE_MAX_BATCH=0),
                   "gram-cache-4096": dict(GRAM_CACHE_MAX_BATCH=4096),
                   **PASS2_VARIANTS, **PASS1_VARIANTS,
                   **{name: dict(LAUNCH_OPTIONS=options) for name, options in LAUNCH_VARIANTS.items()}}


# The csrc CUDA op's A/B variants, environment settings its forward reads at every call
# (csrc/ekd_cuda.cu):
# - tensor-cores: the fp32 tiles (bf16/fp16 embeddings included: the op computes them in fp32)
#   on tensor cores in 3xTF32 through wmma (EKD_CUDA_TENSOR_CORES=1, off by default until a GPU
#   run has checked and measured it), against the FMA tiles (18 TFLOP/s on the H200: 11.4 of
#   12.3 ms at B = 8192).  Not bitwise the default's outputs: the dots round otherwise.
# - tensor-cores-mma: the same arithmetic through mma.sync PTX (EKD_CUDA_TENSOR_CORES=2): values
#   split once when staged, shared-memory loads at fixed offsets; its tile kernel's K loop is 459
#   sm_90 instructions a 32-feature step against wmma's 893 (nvcc 13.0, cuobjdump).
# - candidates: the hardest negatives' candidates collected in the student's second histogram
#   pass (EKD_CUDA_CANDIDATES=1, off by default until a GPU run has checked and timed it): the two
#   passes that count the boundary's ties and collect the selection return at once when they fit,
#   2 of the 6 tile launches at B = 8192.  Bitwise the default's outputs.
CSRC_VARIANTS = {"tensor-cores": dict(environ={"EKD_CUDA_TENSOR_CORES": "1"}),
                 "tensor-cores-mma": dict(environ={"EKD_CUDA_TENSOR_CORES": "2"}),
                 "candidates": dict(environ={"EKD_CUDA_CANDIDATES": "1"})}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def batch_of(size, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(size, 512, generator=g)
    teacher = student + 0.5 * torch.randn(size, 512, generator=g)
    labels = torch.cat([torch.randint(0, 10**6, (size // 2,), generator=g), 10**6 + torch.arange(size - size // 2) // 4])
    return student.to(device, dtype), teacher.to(device, dtype), labels.to(device)


class triton_settings:
    """Set triton_ekd module settings for a block (the forced large-B variants, the A/B switches)."""

    def __init__(self, **settings):
        from ekd_kernels import triton_ekd

        self.module, self.settings = triton_ekd, settings

    def __enter__(self):
        self.saved = {name: getattr(self.module, name) for name in self.settings}
        for name, value in self.settings.items():
            setattr(self.module, name, value)

    def __exit__(self, *exc):
        for name, value in self.saved.items():
            setattr(self.module, name, value)


class variant_settings:
    """A backend variant's settings for a block: environment variables under "environ" (what the
    csrc CUDA op reads at every call: CSRC_VARIANTS), the rest triton_ekd settings."""

    def __init__(self, settings):
        settings = dict(settings)
        self.values = settings.pop("environ", {})
        self.triton = triton_settings(**settings)

    def __enter__(self):
        self.environ = environment_variables(self.values)
        self.environ.__enter__()
        self.triton.__enter__()

    def __exit__(self, *exc):
        self.triton.__exit__(*exc)
        self.environ.__exit__(*exc)


def backend_variant(name):
    """(backend, its settings) for "triton:VARIANT" (TRITON_VARIANTS) or "csrc:VARIANT"
    (CSRC_VARIANTS), (name, {}) otherwise."""
    backend, _, variant = name.partition(":")
    if not variant:
        return backend, {}
    groups = {"triton": TRITON_VARIANTS, "csrc": CSRC_VARIANTS}
    if variant not in groups.get(backend, {}):
        raise SystemExit(f"unknown backend variant {name!r}; known: "
                         + ", ".join(f"{b}:{v}" for b, group in groups.items() for v in group))
    return backend, groups[backend][variant]


def call(crit, student, teacher, labels, seed):
    x = student.detach().clone().requires_grad_(True)
    loss = crit(x, teacher, labels, generator=torch.Generator().manual_seed(seed))
    loss.backward()
    return loss.detach(), x.grad, crit.last_stats


def sanitize(sizes, device, dtypes=("float32", "bfloat16")):
    """Every fast backend's variants and forced Triton paths at each size and dtype (then fast
    RKD and the metrics once): the run compute-sanitizer watches.  `dtypes` splits it in parts
    (memcheck at B = 33 took more than 150 s for both)."""
    fast = [b for b in available_backends(device) if b != "reference"]
    print(f"backends: {fast}", flush=True)
    for size in sizes:
        for dtype in (getattr(torch, name) for name in dtypes):
            student, teacher, labels = batch_of(size, dtype, device, seed=size)
            for backend in fast:
                for options in VARIANTS:
                    crit = EKDLoss(backend=backend, **options).to(device)
                    for step in range(2):
                        call(crit, student, teacher, labels, step)
                    print(f"ok B={size} {dtype} {backend} {options}", flush=True)
            if "triton" in fast:
                for name, settings in FORCED_TRITON_PATHS.items():
                    with variant_settings(settings):
                        crit = EKDLoss(backend="triton").to(device)
                        for step in range(2):
                            call(crit, student, teacher, labels, step)
                    print(f"ok B={size} {dtype} triton {name}", flush=True)
    from ekd_kernels.metrics import verify_all_pairs
    from ekd_kernels.rkd_fast import fast_rkd_loss
    student, teacher, labels = batch_of(min(sizes), torch.float32, device, seed=0)
    fast_rkd_loss(student.requires_grad_(True), teacher).backward()
    verify_all_pairs(student.detach(), labels)
    if "csrc" in fast and device.type == "cuda":
        # Last (a fault in these new kernels would spoil what ran after it): the csrc op's
        # variants (CSRC_VARIANTS: the tensor-core tiles, the top-N candidates), every tile pass (the critical pass with the ratio) and the selected
        # pairs' dots (random selection recomputes both models' similarities)
        for size in sizes:
            for dtype in (getattr(torch, name) for name in dtypes):
                student, teacher, labels = batch_of(size, dtype, device, seed=size)
                for name, settings in CSRC_VARIANTS.items():
                    for options in (VARIANTS[0], VARIANTS[1], VARIANTS[4]):
                        with variant_settings(settings):
                            crit = EKDLoss(backend="csrc", **options).to(device)
                            for step in range(2):
                                call(crit, student, teacher, labels, step)
                        print(f"ok B={size} {dtype} csrc:{name} {options}", flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    print("sanitize run complete", flush=True)


def compare(got, want):
    """Misses between two (loss, grad, stats) triples at the golden tolerances."""
    misses = []
    (loss, grad, stats), (ref_loss, ref_grad, ref_stats) = got, want
    if not abs(loss.item() - ref_loss.item()) <= LOSS_RTOL * abs(ref_loss.item()) + 1e-12:
        misses.append(f"loss {loss.item()} vs {ref_loss.item()}")
    err = ((grad.double() - ref_grad.double()).norm() / ref_grad.double().norm().clamp_min(1e-30)).item()
    if not err < GRAD_REL_NORM:
        misses.append(f"gradient relative error {err:.3g}")
    for name in ("student_thresholds", "teacher_thresholds", "batch_student_thresholds", "batch_teacher_thresholds"):
        diff = (getattr(stats, name).double() - getattr(ref_stats, name).double()).abs().max().item()
        if not diff <= THRESHOLD_ATOL:
            misses.append(f"{name} differ by {diff:.3g}")
    for name in COUNTS:
        if getattr(stats, name).item() != getattr(ref_stats, name).item():
            misses.append(f"{name} {getattr(stats, name).item()} vs {getattr(ref_stats, name).item()}")
    return misses


def consistency(sizes, device, reference_max, out, backends=None):
    """`backends` (default: every fast backend of the device) against the reference up to
    `reference_max`, past it against the device's first fast backend; a variant such as
    csrc:tensor-cores is judged as its backend.  (The lease runs the csrc variants in a process
    of their own: a fault there would spoil every later check of the same process.)"""
    available = [b for b in available_backends(device) if b != "reference"]
    fast = backends or available
    report, failed = [], False
    for size in sizes:
        for dtype in (torch.float32, torch.bfloat16):
            batches = [batch_of(size, dtype, device, seed=size + s) for s in range(3)]
            judge = "reference" if size <= reference_max else available[0]
            crits = {b: EKDLoss(backend=backend_variant(b)[0]).to(device)
                     for b in dict.fromkeys([judge] + fast)}
            for step, inputs in enumerate(batches):
                want = call(crits[judge], *inputs, step)
                for backend in fast:
                    if backend == judge:
                        continue
                    with variant_settings(backend_variant(backend)[1]):
                        misses = compare(call(crits[backend], *inputs, step), want)
                    failed |= bool(misses)
                    report.append({"B": size, "dtype": str(dtype), "backend": backend, "judge": judge, "step": step,
                                   "misses": misses})
                    print(f"B={size} {dtype} {backend} vs {judge} step {step}: {misses or 'ok'}", flush=True)
            for backend in fast:  # bitwise determinism: two fresh modules, same inputs
                name, settings = backend_variant(backend)
                with variant_settings(settings):
                    runs = [call(EKDLoss(backend=name).to(device), *batches[0], 0) for _ in range(2)]
                same = torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
                failed |= not same
                report.append({"B": size, "dtype": str(dtype), "backend": backend, "deterministic": same})
                print(f"B={size} {dtype} {backend} deterministic: {same}", flush=True)
    if out:
        pathlib.Path(out).write_text(json.dumps({"device": torch.cuda.get_device_name() if device.type == "cuda"
                                                 else "cpu", "torch": torch.__version__, "report": report}, indent=1))
    return 1 if failed else 0


# --------------------------------------------------------------------------- large batches
LARGE_VARIANTS = {"random": [dict(), dict(critical_only=True, compute_critical_ratio=True)], "collapsed": [dict()]}
RANK_EPS = 2e-6  # the backends' fp32 similarities against the fp64 Gram of the rank check


def large_batch(kind, size, device, seed):
    """"random": batch_of's; "collapsed": every student row the same (all student similarities
    tie, early-training collapse at its extreme), a random teacher, distinct labels (every pair
    negative, and the label order is the row order, so both backends take the same ties)."""
    if kind == "random":
        return batch_of(size, torch.float32, device, seed)
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(1, 512, generator=g).expand(size, 512).contiguous()
    teacher = torch.randn(size, 512, generator=g)
    return student.to(device), teacher.to(device), torch.arange(size, device=device)


def pair_counts(labels):
    """(positive, negative) pair counts from the label groups, as Python ints."""
    sizes = torch.unique(labels, return_counts=True)[1].tolist()
    positive = sum(n * (n - 1) // 2 for n in sizes)
    batch = labels.numel()
    return positive, batch * (batch - 1) // 2 - positive


@torch.no_grad()
def threshold_rank_misses(name, x, labels, thresholds, indices, chunk=1024):
    """Each threshold t_k must be the element of descending rank m_k among the negatives:
    #(> t_k) <= m_k < #(>= t_k), counted on an fp64 Gram, 1024 rows at a time (RANK_EPS slack
    for the backends' fp32 rounding)."""
    x_hat = torch.nn.functional.normalize(x.double(), dim=1)
    t = thresholds.double()
    above = torch.zeros_like(t, dtype=torch.int64)
    at_or_above = torch.zeros_like(above)
    columns = torch.arange(x.shape[0], device=x.device)
    for start in range(0, x.shape[0], chunk):
        rows = columns[start:start + chunk]
        sims = x_hat[rows] @ x_hat.t()
        negative = (columns[None, :] > rows[:, None]) & (labels[None, :] != labels[rows][:, None])
        values = sims[negative]
        above += (values[:, None] > t + RANK_EPS).sum(0)
        at_or_above += (values[:, None] >= t - RANK_EPS).sum(0)
        del sims, negative, values
    misses = []
    for k, m in enumerate(indices):
        if not (above[k].item() <= m < at_or_above[k].item()):
            misses.append(f"{name} threshold {k} = {t[k].item()!r}: {above[k].item()} negatives above, "
                          f"{at_or_above[k].item()} at or above, wanted rank {m}")
    return misses


def invariant_misses(result, labels, config, student, teacher):
    (loss, grad, stats) = result
    misses = []
    if not torch.isfinite(loss).item():
        misses.append(f"loss {loss.item()} is not finite")
    if not torch.isfinite(grad).all().item():
        misses.append("gradient is not finite")
    positive, negative = pair_counts(labels)
    expected = {"num_positive_pairs": positive, "num_negative_pairs": negative,
                "num_selected_negatives": min(config.num_hard_negatives, negative)}
    for name, value in expected.items():
        if getattr(stats, name).item() != value:
            misses.append(f"{name} {getattr(stats, name).item()} vs {value} from the labels")
    indices = config.threshold_indices(negative)
    misses += threshold_rank_misses("student", student, labels, stats.batch_student_thresholds, indices)
    misses += threshold_rank_misses("teacher", teacher, labels, stats.batch_teacher_thresholds, indices)
    return misses


def large(sizes, device, out):
    from ekd_kernels import EKDConfig
    from ekd_kernels.backends import resolve_backend

    fast = []
    for name in ("csrc", "triton"):
        try:
            resolve_backend(name, device)
            fast.append(name)
        except RuntimeError as exc:
            print(f"{name}: skipped ({exc})", flush=True)
    report, failed = [], False
    for size in sizes:
        for kind, variants in LARGE_VARIANTS.items():
            student, teacher, labels = large_batch(kind, size, device, seed=size)
            for options in variants:
                config = EKDConfig(**options)
                results = {}
                for backend in fast:
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                    start = time.perf_counter()
                    results[backend] = call(EKDLoss(backend=backend, **options).to(device), student, teacher, labels, 0)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    seconds = time.perf_counter() - start
                    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
                    misses = invariant_misses(results[backend], labels, config, student, teacher)
                    failed |= bool(misses)
                    stats = results[backend][2]
                    report.append({"B": size, "kind": kind, "options": options, "backend": backend,
                                   "seconds": round(seconds, 3), "peak_GiB": peak, "loss": results[backend][0].item(),
                                   "num_negative_pairs": stats.num_negative_pairs.item(),
                                   "num_critical_pairs": None if stats.num_critical_pairs is None
                                   else stats.num_critical_pairs.item(), "misses": misses})
                    print(f"B={size} {kind} {options} {backend}: {seconds:.2f} s, peak {peak} GiB, "
                          f"invariants {misses or 'ok'}", flush=True)
                if len(results) == 2:
                    misses = compare(results["csrc"], results["triton"])
                    critical = [results[b][2].num_critical_pairs for b in ("csrc", "triton")]
                    # pairs within rounding of a threshold may flip between IEEE and tf32x3 dots
                    if critical[0] is not None and abs(critical[0].item() - critical[1].item()) > 1e-5 * size * size:
                        misses.append(f"num_critical_pairs {critical[0].item()} vs {critical[1].item()}")
                    failed |= bool(misses)
                    report.append({"B": size, "kind": kind, "options": options, "backend": "csrc vs triton",
                                   "misses": misses})
                    print(f"B={size} {kind} {options} csrc vs triton: {misses or 'ok'}", flush=True)
                del results
            del student, teacher, labels
    if out:
        pathlib.Path(out).write_text(json.dumps({"device": torch.cuda.get_device_name() if device.type == "cuda"
                                                 else "cpu", "torch": torch.__version__, "report": report}, indent=1))
    return 1 if failed else 0


# --------------------------------------------------------------------------- where a call's time goes
def host_op_times(prof, calls):
    """{op: (count, self CPU us)} per call, from a torch.profiler run: the host-side ops (aten
    ops, CUDA runtime and driver calls such as cudaLaunchKernel / cuLaunchKernel, the caching
    allocator's).  Self times do not overlap; what they leave of the host's issue time is Python
    between the ops."""
    ops = {}
    for e in prof.key_averages():
        if getattr(e, "device_type", None) == torch.autograd.DeviceType.CPU and e.self_cpu_time_total > 0:
            ops[e.key] = (e.count / calls, e.self_cpu_time_total / calls)
    return ops


def compare_with_first(first_results, name, label, loss, grad):
    """How far `label`'s loss and gradient lie from those of the first variant of backend `name`
    in the run (None for that first one, which is recorded)."""
    if name not in first_results:
        first_results[name] = (label, loss, grad)
        return None
    first, first_loss, first_grad = first_results[name]
    return {"backend": first, "bitwise": bool(torch.equal(loss, first_loss) and torch.equal(grad, first_grad)),
            "loss_abs_diff": float((loss.double() - first_loss.double()).abs()),
            "grad_max_abs_diff": float((grad.double() - first_grad.double()).abs().max())}


def windows_outcome(run):
    """What pass 1's windows did in the Triton forward(s) of `run()` (PASS1_WINDOWS on): whether
    every target lay in its window (else pass 2 recomputed the tiles), and the keys and top-N
    candidates the windows held, read from the last forward's scratch (a host sync)."""
    from ekd_kernels import triton_ekd
    from ekd_kernels._triton import kernels

    scratch, carve = [], triton_ekd._carve

    def recording_carve(dtype, device, **shapes):
        buffer, views = carve(dtype, device, **shapes)
        scratch.append(views)
        return buffer, views

    triton_ekd._carve = recording_carve
    try:
        run()
    finally:
        triton_ekd._carve = carve
    w32 = next((views for views in reversed(scratch) if "bucket" in views), None)
    state = next((views["state"] for views in reversed(scratch) if "state" in views), None)
    if w32 is None or state is None:
        return None
    if "window_keys" not in w32:  # not used (below CUTOFF_MIN_BATCH, or no cutoff for these options)
        return {"used": False}
    return {"used": True, "hit": int(state[kernels.WINDOW_MISS.value]) == 0, "keys": w32["window_count"].tolist(),
            "capacity": w32["window_keys"].shape[1], "candidates": int(w32["candidate_count"][1])}


def peak_extra_mib(step, device):
    """The most memory one warm call allocates above what was allocated before it (MiB, CUDA only):
    an A/B variant's buffers (pass 1's windows grow with the pairs) beside its time."""
    if device.type != "cuda":
        return None
    with PeakMemory(device) as peak:
        step()
    return round(peak.bytes / 2**20, 1)


def profile(sizes, device, out, calls=5, backends=None, rounds=1):
    """Per backend, dtype and B: the time of a forward+backward over `calls` back-to-back calls
    synchronised at the end ("wall": a loop's throughput, the host issuing a call while the device
    runs the previous one), the host's time to issue them (no sync), and from torch.profiler the
    device kernels: launches per call, busy time per call, and the kernels that take the most.
    When the wall time is far above the busy time the call is bound by its launches and Python
    (the GPU idles between kernels); when they are close, the top kernels are the ones to speed up.

    Every backend (and A/B variant) is built, checked against the first variant of its backend
    and warmed up (compiled) before any is measured; then `rounds` rounds measure them in turn,
    one warm call before each measurement, so that no variant owes its figure to its place in the
    order or to clocks that drift during the run: the figures are the medians over the rounds, the
    device times of every round listed beside them (their spread is the noise of an A/B)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = device.type == "cuda"
    backends = backends or [b for b in available_backends(device) if b != "reference"] + ["reference"]
    report = []

    def save():  # rewritten after every row, a failed one too: a run cut by a time limit keeps what it had
        if out:
            pathlib.Path(out).write_text(json.dumps({"device": torch.cuda.get_device_name() if cuda else "cpu",
                                                     "torch": torch.__version__, "report": report}, indent=1))
    for size in sizes:
        for dtype in (torch.float32, torch.bfloat16):
            student, teacher, labels = batch_of(size, dtype, device, seed=size)
            first_results = {}  # backend name -> (label, loss, gradient) of its first variant in the list
            prepared = []
            for backend in backends:
                name, settings = backend_variant(backend)
                crit = EKDLoss(backend=name).to(device)

                def step(crit=crit):
                    x = student.detach().requires_grad_(True)
                    crit(x, teacher, labels).backward()

                try:
                    with variant_settings(settings):
                        # one call from a fresh module, compared with the first variant of the same
                        # backend: an A/B variant must compute the same loss and gradient
                        loss, grad, _ = call(EKDLoss(backend=name).to(device), student, teacher, labels, 0)
                        agreement = compare_with_first(first_results, name, backend, loss, grad)
                        windows = windows_outcome(step) if settings.get("PASS1_WINDOWS") else None
                        for _ in range(3):  # compile, warm the allocator
                            step()
                        sync(device)
                        peak_mib = peak_extra_mib(step, device)
                except Exception as error:  # noqa: BLE001 (any failure: reported, the variant left out)
                    # A variant that cannot run at this size (a compile's resources, a refusal) is
                    # left out of the A/B, which goes on with the others: the GPU's minutes are few.
                    # (A fault that spoils the CUDA context fails the variants after it too.)
                    report.append({"B": size, "dtype": str(dtype).replace("torch.", ""), "backend": backend,
                                   "failed": f"{type(error).__name__}: {str(error)[:300]}"})
                    print(f"B={size} {report[-1]['dtype']} {backend}: FAILED, left out: {report[-1]['failed']}",
                          flush=True)
                    save()
                    continue
                prepared.append((backend, settings, step, agreement, windows, peak_mib))
            measured = {backend: [] for backend, *_ in prepared}
            for _ in range(rounds):
                for backend, settings, step, *_ in prepared:
                    with variant_settings(settings):
                        step()  # (after another variant's calls)
                        sync(device)
                        start = time.perf_counter()
                        for _ in range(calls):
                            step()
                        issued = (time.perf_counter() - start) / calls  # host time, while the device may lag
                        sync(device)
                        wall = (time.perf_counter() - start) / calls
                        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
                        with torch_profile(activities=activities) as prof:
                            for _ in range(calls):
                                step()
                            sync(device)
                    kernels = {}
                    for e in prof.key_averages():
                        busy = getattr(e, "self_device_time_total", None)
                        if busy is None:
                            busy = getattr(e, "self_cuda_time_total", 0)
                        if cuda and busy > 0 and getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA:
                            kernels[e.key] = (e.count / calls, busy / calls)
                    busy_us = sum(us for _, us in kernels.values())
                    measured[backend].append(dict(wall=wall, issued=issued, busy_us=busy_us, kernels=kernels,
                                                  host_ops=host_op_times(prof, calls)))
            for backend, _, _, agreement, windows, peak_mib in prepared:
                runs = measured[backend]
                # the round of median device time gives the kernel and host-op breakdown
                middle = sorted(runs, key=lambda r: r["busy_us"])[len(runs) // 2]
                wall, issued = statistics.median(r["wall"] for r in runs), statistics.median(r["issued"] for r in runs)
                busy_us, kernels, host_ops = middle["busy_us"], middle["kernels"], middle["host_ops"]
                launches = sum(n for n, _ in kernels.values())
                top = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:12]
                row = {"B": size, "dtype": str(dtype).replace("torch.", ""), "backend": backend,
                       "wall_ms": round(wall * 1e3, 3), "host_issue_ms": round(issued * 1e3, 3),
                       "device_busy_ms": round(busy_us / 1e3, 3), "kernel_launches": round(launches, 1),
                       "rounds": len(runs), "device_busy_ms_rounds": [round(r["busy_us"] / 1e3, 3) for r in runs],
                       "wall_ms_rounds": [round(r["wall"] * 1e3, 3) for r in runs],
                       **({"peak_extra_MiB": peak_mib} if peak_mib is not None else {}),
                       **({"same_as": agreement} if agreement else {}),
                       **({"windows": windows} if windows else {}),
                       "top_kernels": [{"name": k[:120], "per_call": round(n, 1), "us": round(us, 1)}
                                       for k, (n, us) in top],
                       "host_ops_ms": round(sum(us for _, us in host_ops.values()) / 1e3, 3),
                       "top_host_ops": [{"name": k[:120], "per_call": round(n, 1), "self_us": round(us, 1)}
                                        for k, (n, us) in sorted(host_ops.items(), key=lambda kv: -kv[1][1])[:12]]}
                report.append(row)
                print(f"B={size} {row['dtype']} {backend}: wall {row['wall_ms']} ms, host issue {row['host_issue_ms']} "
                      f"ms, device busy {row['device_busy_ms']} ms in {row['kernel_launches']} launches"
                      + (f", peak {peak_mib} MiB above what was allocated before the call" if peak_mib is not None
                         else ""), flush=True)
                if len(runs) > 1:
                    print(f"  rounds: device busy {row['device_busy_ms_rounds']} ms, wall {row['wall_ms_rounds']} ms",
                          flush=True)
                if agreement:
                    print(f"  against {agreement['backend']}: {'bitwise equal' if agreement['bitwise'] else 'differs'}, "
                          f"loss {agreement['loss_abs_diff']:.3g}, gradient {agreement['grad_max_abs_diff']:.3g} "
                          "(max abs differences)", flush=True)
                if windows and not windows["used"]:
                    print("  windows: not used at this B", flush=True)
                elif windows:  # (a miss: pass 2 recomputed the tiles, the timing is of that path)
                    print(f"  windows: {'every target in its window' if windows['hit'] else 'MISSED'}, keys "
                          f"{windows['keys']} of {windows['capacity']} a model, {windows['candidates']} candidates",
                          flush=True)
                for k in row["top_kernels"][:6]:
                    print(f"    {k['us']:10.1f} us  x{k['per_call']:<5} {k['name'][:90]}", flush=True)
                # the host's side: where issuing the call goes, beyond Python between the ops
                print(f"  host: {row['host_ops_ms']} ms inside profiled ops (self time), top:", flush=True)
                for k in row["top_host_ops"][:5]:
                    print(f"  host op {k['self_us']:8.1f} us  x{k['per_call']:<5} {k['name'][:90]}", flush=True)
                save()
            del student, teacher, labels
    # (every variant failed: a non-zero status, so that a lease's summary does not read it as measured)
    return 0 if any("failed" not in row for row in report) else 1


def once(sizes, device, backend, dtype_name):
    """One forward+backward per B after two warm-up calls, the measured one inside an NVTX range
    "ekd" (CUDA), for Nsight Compute: ncu --nvtx --nvtx-include "ekd/" profiles its kernels only."""
    dtype = getattr(torch, dtype_name)
    backend, settings = backend_variant(backend)
    for size in sizes:
        student, teacher, labels = batch_of(size, dtype, device, seed=size)
        crit = EKDLoss(backend=backend).to(device)
        with variant_settings(settings):
            for _ in range(2):
                call(crit, student, teacher, labels, 0)
            sync(device)
            if device.type == "cuda":
                torch.cuda.nvtx.range_push("ekd")
            call(crit, student, teacher, labels, 0)
            sync(device)
            if device.type == "cuda":
                torch.cuda.nvtx.range_pop()
        print(f"once: B={size} {dtype_name} {backend} done", flush=True)
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["sanitize", "consistency", "large", "profile", "once"])
    parser.add_argument("--sizes", type=at_least(2), nargs="+", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--reference-max", type=int, default=8192, help="largest B the reference judges")
    parser.add_argument("--out", default=None)
    parser.add_argument("--backend", default="triton", help="once: the backend (or triton:VARIANT, as --backends)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="once: the dtype")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"],
                        help="sanitize: the dtypes")
    parser.add_argument("--backends", nargs="+", default=None,
                        help="profile, consistency: these backends only; triton:VARIANT is an earlier state of the Triton "
                             f"forward, for an A/B in one process ({', '.join(TRITON_VARIANTS)}); csrc:VARIANT "
                             f"a setting of the csrc CUDA op ({', '.join(CSRC_VARIANTS)})")
    parser.add_argument("--rounds", type=at_least(1), default=1,
                        help="profile: rounds measuring every backend in turn (after all are compiled); medians")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.what == "sanitize":
        sanitize(args.sizes, device, args.dtypes)
        return 0
    if args.what == "large":
        return large(args.sizes, device, args.out)
    if args.what == "profile":
        return profile(args.sizes, device, args.out, backends=args.backends, rounds=args.rounds)
    if args.what == "once":
        return once(args.sizes, device, args.backend, args.dtype)
    return consistency(args.sizes, device, args.reference_max, args.out, backends=args.backends)


if __name__ == "__main__":
    sys.exit(main())
