"""The fused Triton backend (issue 3) against the reference and the golden figures.

Backend-specific cases only: the golden replay, the SPEC contract and the comparison with the
reference on random inputs run for every backend in test_golden.py, test_contract.py and
test_against_reference.py.

Where a GPU is present the kernels run natively on CUDA tensors; elsewhere they run on CPU
tensors through the Triton interpreter.  ``@triton.jit`` decides between the two when a kernel
is *defined* (triton 3.x reads TRITON_INTERPRET then, not at launch), and ekd_kernels defines its
kernels on the first call of the backend, so setting the variable here, at collection time,
is early enough whatever imported triton before.

The interpreter is slow (numpy underneath): random batches stay small here.
"""

import functools
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ekd_kernels import EKDConfig, EKDLoss, ekd_loss  # noqa: E402
from ekd_kernels import triton_ekd  # noqa: E402
from ekd_kernels.reference import draw_random_negatives  # noqa: E402
import helpers  # noqa: E402
from helpers import LOSS_RTOL, assert_grad_close, compare_with_reference, run_ekd  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
_REASON = triton_ekd.unavailable_reason(DEVICE)
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"triton backend unavailable on {DEVICE}: {_REASON}")

make_batch = functools.partial(helpers.make_batch, device=DEVICE)


class _Sm90Compile:
    """One sm_90 compile script (the two compile checks' _LAUNCH_SCRIPT, _LAUNCH_OPTIONS_SCRIPT
    below) running in a subprocess of its own, with an empty Triton cache (every kernel compiled
    for real, none from an earlier run's cache)."""

    def __init__(self, script, folder):
        import pathlib
        import subprocess
        import sys

        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["TRITON_CACHE_DIR"] = str(folder / "cache")
        tools = str(pathlib.Path(__file__).resolve().parent.parent / "tools")
        self.stdout, self.stderr = open(folder / "stdout", "w+"), open(folder / "stderr", "w+")  # no pipe to fill
        self.process = subprocess.Popen([sys.executable, "-c", script, tools], env=env, stdin=subprocess.DEVNULL,
                                        stdout=self.stdout, stderr=self.stderr)

    def result(self, timeout=900):
        """(exit status, stdout, stderr) once the script ends (killed past `timeout` seconds)."""
        import subprocess

        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        self.stdout.seek(0)
        self.stderr.seek(0)
        return self.process.returncode, self.stdout.read(), self.stderr.read()

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.stdout.close()
        self.stderr.close()


@pytest.fixture(scope="module", autouse=True)
def sm90_compiles(request, tmp_path_factory):
    """The selected sm_90 compile checks' scripts, started when this module's first test runs.
    Why in the background: each is a minute or two of one core's compiling (107 s and 58 s in one
    run of the suite here, 16% of its time on CI's 2 cores) while the test process would sit
    waiting for it; started here, they compile beside the interpreter tests, and each check
    waits for its own."""
    selected = {getattr(item, "originalname", item.name) for item in request.session.items
                if getattr(item, "module", None) is request.module}
    started = {}
    if not ON_GPU:  # a GPU compiles and runs every kernel natively in the other tests
        for name, script in _SM90_SCRIPTS.items():
            if name in selected:
                started[name] = _Sm90Compile(script, tmp_path_factory.mktemp(name))
                request.addfinalizer(started[name].stop)  # at once: stopped even if the next start fails
    return started


def triton_loss(**options):
    """EKDLoss on the Triton backend, on DEVICE (a module left on the CPU refuses CUDA inputs:
    four tests built one without .to and failed on the H200 only, never under the interpreter)."""
    return EKDLoss(backend="triton", **options).to(DEVICE)


def compare(student, teacher, labels, steps=1, **kwargs):
    """Triton against the reference (helpers.compare_with_reference) over `steps` consecutive
    calls, the EMA state carried; call k sees the student features rotated by k positions, so
    each call gets a different batch (call 0 gets `student` itself, strides included)."""
    batches = [(student if step == 0 else student.roll(step, dims=1), teacher, labels) for step in range(steps)]
    compare_with_reference("triton", batches, generator_seed=0, **kwargs)


# The golden figures run through test_golden.py, which replays every case on every backend
# (this one included, under the interpreter on a CPU).


# --------------------------------------------------------------------------- random inputs
@pytest.mark.parametrize("batch, dim_s, dim_t, num_ids, num_hard_negatives", [
    (7, 3, 5, 3, 2000),       # tiny, D below any block
    (33, 16, 48, 8, 100),     # top-N boundary inside the negatives
    (130, 64, 32, 40, 700),   # several tiles, Ds != Dt
    (257, 512, 128, 64, 1000),
])
def test_random_shapes(batch, dim_s, dim_t, num_ids, num_hard_negatives):
    student, teacher, labels = make_batch(batch, dim_s, dim_t, num_ids, seed=batch)
    compare(student, teacher, labels, steps=2, num_hard_negatives=num_hard_negatives)


@pytest.mark.parametrize("options", [
    dict(critical_only=True),
    dict(rank_loss="eq7"),
    dict(rank_loss="eq8", critical_only=True),
    dict(negative_selection="random", num_hard_negatives=150),
    dict(compute_critical_ratio=True, num_hard_negatives=120),
    dict(compute_critical_ratio=True, negative_selection="random", num_hard_negatives=50),
    dict(fprs=(0.3, 0.05, 0.2), temperature=0.05, num_hard_negatives=37, momentum=0.5,
         positive_weight=1.5, negative_weight=-0.25),
    dict(num_hard_negatives=0),
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_variants(options):
    student, teacher, labels = make_batch(70, 24, 40, 12, seed=1)
    compare(student, teacher, labels, steps=3, **options)


def test_random_pairs_are_the_references_draw():
    """The rank -> pair mapping of negative_selection="random" against listing the negative
    pairs in row-major order, as the reference does (pure torch: no kernel runs here)."""
    generator = torch.Generator().manual_seed(0)
    for trial in range(60):
        batch = int(torch.randint(2, 40, (1,), generator=generator))
        num_ids = int(torch.randint(1, batch + 1, (1,), generator=generator))
        labels = torch.randint(-num_ids, num_ids, (batch,), generator=generator)
        labels = labels.to((torch.int64, torch.int32)[trial % 2])
        num_hard_negatives = int(torch.randint(0, 3 * batch, (1,), generator=generator))
        rows, cols = torch.triu_indices(batch, batch, 1)
        negative = labels[rows] != labels[cols]
        num_negatives = int(negative.sum())
        ranks = draw_random_negatives(num_negatives, min(num_hard_negatives, num_negatives),
                                      torch.Generator().manual_seed(trial))
        got = triton_ekd._random_negative_pairs(labels, num_hard_negatives, torch.Generator().manual_seed(trial))
        assert torch.equal(got, torch.stack([rows[negative][ranks], cols[negative][ranks]]))


@pytest.mark.parametrize("labels_kind", ["no_positives", "all_equal", "pairs"])
def test_label_extremes(labels_kind):
    batch = 40
    student, teacher, _ = make_batch(batch, 12, 9, 4, seed=2)
    labels = {"no_positives": torch.arange(batch), "all_equal": torch.zeros(batch, dtype=torch.int64),
              "pairs": torch.arange(batch) // 2}[labels_kind].to(DEVICE)
    compare(student, teacher, labels, steps=2, num_hard_negatives=300)


def test_no_negative_pair_keeps_thresholds():
    student, teacher, _ = make_batch(9, 6, 6, 1, seed=3)
    labels = torch.full((9,), 5, device=DEVICE)
    previous = (torch.full((6,), 0.25, device=DEVICE), torch.full((6,), -0.5, device=DEVICE))
    result = run_ekd(ekd_loss, student, teacher, labels, *previous, backend="triton").result
    assert torch.equal(result.student_thresholds, previous[0]) and torch.equal(result.teacher_thresholds, previous[1])
    assert torch.isnan(result.stats.batch_student_thresholds).all()
    assert int(result.stats.num_negative_pairs) == 0 and float(result.stats.negative_term) == 0.0


def test_duplicated_rows_and_zero_row():
    """Ties everywhere: duplicated (student, teacher) rows give tied pairs with equal a and b,
    so which tie is taken at the top-N boundary cannot change the loss."""
    student, teacher, labels = make_batch(20, 10, 14, 10, seed=4)
    index = torch.arange(60, device=DEVICE) % 20
    student, teacher, labels = student[index], teacher[index], (labels[index] + index // 20 * 100)
    student[5] = 0.0  # a zero row stays finite
    compare(student, teacher, labels, steps=2, num_hard_negatives=333)


def _descending_keys(similarity):
    """kernels._descending_key of fp32 values, as int64 in [0, 2^32)."""
    bits = similarity.float().view(torch.int32).long() & 0xFFFFFFFF
    return torch.where(bits >> 31 == 1, bits, bits ^ 0x7FFFFFFF)


@pytest.fixture
def scratch_views(monkeypatch):
    """The named views of every scratch buffer the forward carves (triton_ekd._carve), in order,
    for the tests that check what a pass left in them."""
    scratch = []
    carve = triton_ekd._carve

    def recording_carve(dtype, device, **shapes):
        buffer, views = carve(dtype, device, **shapes)
        scratch.append(views)
        return buffer, views

    monkeypatch.setattr(triton_ekd, "_carve", recording_carve)
    return scratch


@pytest.mark.parametrize("pass2", ["skip_empty_targets", "one_aggregation", "direct_atomics",
                                   "one_aggregation_direct_atomics"])
@pytest.mark.parametrize("tiles_per_copy", [None, 1], ids=["copies_as_default", "a_copy_per_tile"])
def test_histograms_aggregate_uniform_tiles_and_rows(monkeypatch, scratch_views, tiles_per_copy, pass2):
    """The histogram passes add one atomic per tile or per row whose counted pairs share a bin
    (kernels._histogram_add), per element elsewhere.  A batch with all three kinds, exact
    similarities: both passes' histograms must be the counts of the negatives' keys exactly.
    The batch is helpers.uniform_tiles_batch (sorted labels: the kernels' row order is the
    batch's, so its tiles are as described there).  Checked to fail when any of the three kinds
    of atomic adds a wrong count.  Pass 1 spreads its atomics over copies of its histograms
    (one copy at this B by default; with a copy per tile program, as many as allowed): their
    sum must be the counts, and more than one copy must have been used.  Pass 2 adds per target
    or in one aggregation for all targets (its bins then row x 65536 + low), and by per-element
    atomics in tiles with few pairs in a bucket."""
    _set_pass2_mode(monkeypatch, pass2)
    if tiles_per_copy is not None:
        monkeypatch.setattr(triton_ekd, "COARSE_TILES_PER_COPY", tiles_per_copy)
    student, teacher, labels = helpers.uniform_tiles_batch()
    batch = student.shape[0]
    crit = triton_loss()
    crit(student.float().to(DEVICE), teacher.float().to(DEVICE), labels.to(DEVICE))
    w32 = next(views for views in scratch_views if "coarse" in views)
    coarse, buckets = (w32[name].cpu() for name in ("coarse", "bucket"))
    fine = _target_histograms(w32, (crit.config.num_thresholds + 1, crit.config.num_thresholds), PASS2_MODES[pass2][1])

    upper = torch.ones(batch, batch, dtype=torch.bool).triu(1)
    negative = upper & (labels[:, None] != labels[None, :])
    num_targets = crit.config.num_thresholds + 1  # the K thresholds and the top-N boundary
    for model, (x, targets) in enumerate(((student, num_targets), (teacher, crit.config.num_thresholds))):
        x = torch.nn.functional.normalize(x, dim=1)
        keys = _descending_keys(x @ x.t())[negative]
        assert coarse.shape[1] == triton_ekd._coarse_copies(batch)
        assert torch.equal(coarse[model].sum(0, dtype=torch.int32), torch.bincount(keys >> 16, minlength=1 << 16).int()), \
            f"model {model}"
        if tiles_per_copy is not None:
            assert coarse.shape[1] > 1 and int((coarse[model].sum(1) > 0).sum()) > 1, "one copy took every atomic"
        for target in range(targets):
            inside = keys >> 16 == int(buckets[model, target])
            want = torch.bincount(keys[inside] & 0xFFFF, minlength=1 << 16).int()
            assert torch.equal(fine[model][target], want), f"model {model}, target {target}"


def test_non_contiguous_and_expanded_inputs():
    student, teacher, labels = make_batch(50, 30, 20, 9, seed=5)
    transposed = student.t().contiguous().t()                      # column-major view
    sliced = torch.cat([teacher, teacher], dim=1)[:, ::2]          # stride 2 along features
    expanded_labels = labels.view(50, 1).expand(50, 3)[:, 1]       # strided labels
    compare(transposed, sliced, expanded_labels, num_hard_negatives=400)
    # Stride-0 views: every row the same, or every feature of a row the same.  Such inputs tie
    # massively, so N covers all negatives here (which tie is taken at the boundary is unspecified).
    same_rows = student[:1].expand(50, 30)
    constant_rows = teacher[:, :1].expand(50, 20)
    assert same_rows.stride(0) == 0 and constant_rows.stride(1) == 0
    compare(same_rows, teacher, labels)
    compare(student, constant_rows, labels)


def test_stride0_gradient_and_expanded_leaf():
    """The incoming gradient and the student leaf may both be expanded (stride 0)."""
    student, teacher, labels = make_batch(24, 8, 8, 6, seed=6)
    grads = {}
    for backend in ("reference", "triton"):
        leaf = student[:1].clone().requires_grad_(True)
        mixed = leaf.expand(24, 8) + student  # every row depends on the leaf through a stride-0 view
        result = ekd_loss(mixed, teacher, labels, backend=backend, num_hard_negatives=50)
        result.loss.expand(7).sum().backward()  # the loss's gradient arrives expanded
        grads[backend] = leaf.grad
    assert_grad_close(grads["triton"], grads["reference"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    student, teacher, labels = make_batch(45, 32, 16, 10, seed=7, dtype=dtype)
    # Both backends compute in fp32 from the same low-precision inputs; the gradient comes back
    # in the input dtype, whose rounding bounds the gradient's agreement.
    compare(student, teacher, labels, steps=2, num_hard_negatives=200, loss_rtol=1e-4,
            grad_tol=2e-2 if dtype == torch.bfloat16 else 2e-3)


def _assert_non_finite_batch_keeps_state(student, teacher, labels):
    """One inf in the student: NaN loss, the EMA state kept."""
    student[3, 2] = float("inf")
    _assert_nan_loss_keeps_state(student, teacher, labels)


def _assert_nan_loss_keeps_state(student, teacher, labels):
    """A batch with a non-finite element: NaN loss, the EMA state kept."""
    previous = (torch.full((6,), 0.1, device=DEVICE),) * 2
    result = run_ekd(ekd_loss, student, teacher, labels, *previous, backend="triton").result
    assert torch.isnan(result.loss)
    assert torch.equal(result.student_thresholds, previous[0]) and torch.equal(result.teacher_thresholds, previous[1])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter meets the inf
def test_non_finite_input():
    _assert_non_finite_batch_keeps_state(*make_batch(16, 8, 8, 4, seed=8))


def test_eval_mode_leaves_thresholds():
    student, teacher, labels = make_batch(30, 8, 8, 6, seed=9)
    previous = (torch.full((6,), 0.2, device=DEVICE),) * 2
    frozen = {backend: run_ekd(ekd_loss, student, teacher, labels, *previous, backend=backend,
                               update_thresholds=False).result for backend in ("reference", "triton")}
    assert torch.equal(frozen["triton"].student_thresholds, previous[0])
    torch.testing.assert_close(frozen["triton"].loss, frozen["reference"].loss, rtol=LOSS_RTOL, atol=0)


def test_float64_is_rejected():
    student, teacher, labels = make_batch(8, 4, 4, 3, seed=10, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        ekd_loss(student, teacher, labels, backend="triton")


@pytest.fixture(params=["candidates", "fallback"])
def top_n_path(request, monkeypatch):
    """The two ways the hardest negatives are found: from the candidate buffer filled by pass 2
    (the usual case), or by passes 3 and 4 when the candidates overflow it (forced here)."""
    if request.param == "fallback":
        monkeypatch.setattr(triton_ekd, "MIN_CANDIDATE_CAPACITY", 0)
        monkeypatch.setattr(triton_ekd, "CANDIDATE_FACTOR", 0)
    return request.param


# Pass 2's ways of adding its histograms: (PASS2_SKIP_EMPTY_TARGETS, PASS2_ONE_AGGREGATION,
# PASS2_DIRECT_MAX).  The direct modes' limit is small here, so that the tests' batches have
# tiles on both of its sides (per-element atomics at most 3 pairs, the aggregation above).
PASS2_MODES = {"skip_empty_targets": (True, False, 0), "every_target": (False, False, 0),
               "one_aggregation": (True, True, 0), "one_aggregation_every_tile": (False, True, 0),
               "direct_atomics": (True, False, 3), "one_aggregation_direct_atomics": (True, True, 3)}


def _set_pass2_mode(monkeypatch, mode):
    skip_empty, one_aggregation, direct_max = PASS2_MODES[mode]
    monkeypatch.setattr(triton_ekd, "PASS2_SKIP_EMPTY_TARGETS", skip_empty)
    monkeypatch.setattr(triton_ekd, "PASS2_ONE_AGGREGATION", one_aggregation)
    monkeypatch.setattr(triton_ekd, "PASS2_DIRECT_MAX", direct_max)


def _target_histograms(w32, num_targets_of, one_aggregation):
    """Each target's fine histogram, per model: its own row, or with one aggregation the row of
    the first target with its bucket (where fine_select_kernel reads it)."""
    fine, buckets = w32["fine"].cpu(), w32["bucket"].cpu()
    histograms = []
    for model, count in enumerate(num_targets_of):
        rows = []
        for target in range(count):
            row = target
            if one_aggregation:
                row = next(t for t in range(count) if int(buckets[model, t]) == int(buckets[model, target]))
            rows.append(fine[model, row])
        histograms.append(torch.stack(rows))
    return histograms


def _tile_bucket_counts(x, labels, buckets):
    """Per tile of pass 2's grid (rows in label order, TILE x TILE tiles of the upper triangle)
    and per target bucket: how many of the tile's negatives lie in it (keys from an fp32 Gram
    here: a pair on a bucket's edge may count on the other side of it than in the kernel)."""
    order = torch.sort(labels.cpu(), stable=True).indices
    x, sorted_labels = torch.nn.functional.normalize(x.cpu().float()[order], dim=1), labels.cpu()[order]
    high = _descending_keys(x @ x.t()) >> 16
    batch, tile = x.shape[0], triton_ekd.TILE
    negative = torch.ones(batch, batch, dtype=torch.bool).triu(1) & (sorted_labels[:, None] != sorted_labels[None, :])
    counts = []
    for row in range(0, batch, tile):
        for col in range(row, batch, tile):
            in_tile = (slice(row, row + tile), slice(col, col + tile))
            counts += [int((negative[in_tile] & (high[in_tile] == int(bucket))).sum()) for bucket in buckets]
    return counts


@pytest.mark.parametrize("mode", list(PASS2_MODES))
def test_pass2_modes_against_the_reference(monkeypatch, mode):
    """Pass 2 with and without skipping, tile by tile, the targets whose bucket holds none of the
    tile's pairs, with one aggregation for all targets, and with per-element atomics for a tile's
    few pairs (the default, one aggregation with direct atomics, and the benchmark's A/B variants
    triton:per-target, triton:no-skip, ...): the reference's results over consecutive calls."""
    _set_pass2_mode(monkeypatch, mode)
    student, teacher, labels = make_batch(150, 20, 12, 30, seed=25)
    compare(student, teacher, labels, steps=2, num_hard_negatives=150, compute_critical_ratio=True)


def _record_grids(monkeypatch):
    """The (kernel name, grid) of every launch from here on, as a list that fills as they come."""
    grids, launch = [], triton_ekd._launch

    def recording_launch(kernel, grid):
        grids.append((kernel.__name__, tuple(grid)))
        return launch(kernel, grid)

    monkeypatch.setattr(triton_ekd, "_launch", recording_launch)
    return grids


@pytest.mark.parametrize("tile", [32, 128])
@pytest.mark.parametrize("options", [dict(), dict(critical_only=True, compute_critical_ratio=True),
                                     dict(negative_selection="random")], ids=["default", "critical", "random"])
def test_tile_variants_against_the_reference(monkeypatch, options, tile):
    """Every tile pass, the positive kernels and the selected pairs' blocks on 32 x 32 or 128 x
    128 tiles (the benchmark's A/B variants triton:tile32, for small B, and triton:tile128 /
    tile128-warps8, for large B): the reference's results over consecutive calls, with partial
    last tiles (B = 150 is a multiple of neither)."""
    monkeypatch.setattr(triton_ekd, "TILE", tile)
    monkeypatch.setattr(triton_ekd, "BLOCK_PAIRS", max(tile, triton_ekd.BLOCK_PAIRS))  # (a multiple of TILE)
    grids = _record_grids(monkeypatch)
    student, teacher, labels = make_batch(150, 20, 12, 30, seed=26)
    compare(student, teacher, labels, steps=2, num_hard_negatives=150, **options)
    tiles = -(-150 // tile)  # the tile passes ran on the upper triangle of cdiv(150, tile)^2 tiles
    assert ("coarse_histogram_kernel", (tiles * (tiles + 1) // 2,)) in grids
    assert ("fine_histogram_kernel", (tiles * (tiles + 1) // 2,)) in grids


@pytest.mark.parametrize("programs, splits", [(6, 2), (9, 3), (10**6, 4)])
@pytest.mark.parametrize("options", [dict(), dict(critical_only=True, rank_loss="eq8")], ids=["default", "critical"])
def test_positive_backward_feature_splits(monkeypatch, programs, splits, options):
    """positive_backward_kernel with each row block's feature chunks split over programs
    (triton_ekd.POSITIVE_BACKWARD_PROGRAMS, and the interpreter's, which otherwise runs one program
    a row block): 3 row blocks (B = 150) x 2, 3 (the chunks dealt unevenly: 0 and 3, 1, 2) or 4
    splits, capped at the student's 4 chunks (D = 200: the last one partial).  The gradient has the bits of one program a row block (each chunk's update is
    the same dot in the same order, whichever program makes it), hence the reference's."""
    monkeypatch.setattr(triton_ekd, "TILE", 64)  # 3 row blocks whatever the run's variant
    student, teacher, labels = make_batch(150, 200, 48, 30, seed=27)
    grads = {}
    for setting in (0, programs):
        monkeypatch.setattr(triton_ekd, "POSITIVE_BACKWARD_PROGRAMS", setting)
        monkeypatch.setattr(triton_ekd, "INTERPRETER_POSITIVE_BACKWARD_PROGRAMS", setting)
        grids = _record_grids(monkeypatch)
        grads[setting] = run_ekd(ekd_loss, student, teacher, labels, backend="triton", num_hard_negatives=150,
                                 **options).grad
        assert ("positive_backward_kernel", (3, splits if setting else 1)) in grids
    assert torch.equal(grads[programs], grads[0])
    compare(student, teacher, labels, steps=2, num_hard_negatives=150, **options)  # (split as the last call)


_GRAM_CACHE_PATHS = {
    "hardest": (dict(), dict()),
    "random": (dict(), dict(negative_selection="random")),
    "critical_ratio": (dict(), dict(critical_only=True, compute_critical_ratio=True, rank_loss="eq8")),
    "overflow": (dict(MIN_CANDIDATE_CAPACITY=0, CANDIDATE_FACTOR=0), dict(compute_critical_ratio=True)),
    "cutoff_fallback": (dict(CUTOFF_MIN_BATCH=0, CUTOFF_SAFETY=1e-12, COARSE_TILES_PER_COPY=1), dict()),
    "windows": (dict(CUTOFF_MIN_BATCH=0, PASS1_WINDOWS=True), dict()),
}


@pytest.mark.parametrize("path", list(_GRAM_CACHE_PATHS))
def test_gram_cache_gives_the_same_bits(monkeypatch, path):
    """The Gram cache (triton_ekd.GRAM_CACHE_MAX_BATCH: pass 1 keeps both models' tiles, pass 2,
    the rank loss's positive blocks and selected pairs, passes 3 and 4 and the positive backward
    read them back) against every tile recomputed: the same loss, gradient, thresholds and statistics, bit for bit, over
    two consecutive calls, on each path that reads tiles (random selection's pairs; the critical
    ratio's pass 3; the candidates' overflow, passes 3 and 4; pass 1 in a head and a tail, whose
    tail launch computes its tiles again; pass 1's windows).  B = 150: three row blocks, six tiles
    a model, the cache's tile order checked against each model's similarities."""
    settings, options = _GRAM_CACHE_PATHS[path]
    monkeypatch.setattr(triton_ekd, "TILE", 64)  # (the tile order checked below) whatever the run's variant
    for name, value in settings.items():
        monkeypatch.setattr(triton_ekd, name, value)
    student, teacher, labels = make_batch(150, 20, 12, 30, seed=31)
    grams = []
    forward_impl = triton_ekd._forward_impl

    def recording_forward(*args):
        outputs = forward_impl(*args)
        grams.append(outputs[18])
        return outputs

    monkeypatch.setattr(triton_ekd, "_forward_impl", recording_forward)
    runs = {}
    for cached in (False, True):
        monkeypatch.setattr(triton_ekd, "GRAM_CACHE_MAX_BATCH", 2048 if cached else 0)
        crit = triton_loss(num_hard_negatives=150, **options)
        calls = [run_ekd(crit, student if step == 0 else student.roll(step, dims=1), teacher, labels,
                         generator=torch.Generator().manual_seed(step)) for step in range(2)]
        runs[cached] = [(call.result.loss, call.grad, call.result.student_thresholds, call.result.teacher_thresholds,
                         *[getattr(call.result.stats, name) for name in ("num_selected_negatives",
                                                                          "num_critical_selected", "positive_term",
                                                                          "negative_term", "num_critical_pairs")])
                        for call in calls]
        gram = grams[-1]
        if not cached:
            assert gram.shape == (2, triton_ekd.NO_GRAM)
            continue
        # the last call's cache: tile n(n + 1) / 2 + m holds rows m, columns n of the label-sorted batch
        order = torch.argsort(labels.cpu(), stable=True)
        rolled = student.roll(1, dims=1)
        for model, x in enumerate((rolled, teacher)):
            unit = torch.nn.functional.normalize(x.double().cpu()[order], dim=1)
            for m, n in ((0, 0), (0, 2), (1, 2), (2, 2)):
                tile = gram[model, (n * (n + 1) // 2 + m) * 64 * 64:][:64 * 64].view(64, 64).cpu().double()
                want = unit[m * 64:(m + 1) * 64] @ unit[n * 64:(n + 1) * 64].T
                rows, cols = want.shape
                assert torch.allclose(tile[:rows, :cols], want, atol=1e-5), (model, m, n)
                assert (tile[rows:] == 0).all() and (tile[:, cols:] == 0).all()
    for got_call, want_call in zip(runs[True], runs[False]):
        for got, want in zip(got_call, want_call):
            if want is None:
                assert got is None
            else:
                assert torch.equal(got, want), (got, want)


def test_a_call_warns_nothing():
    """A forward+backward on an ordinary batch raises no warning: one from the kernels (a
    deprecated Triton API, say) would reach the user at every training step."""
    import warnings

    student, teacher, labels = make_batch(70, 24, 16, 20, seed=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # (but the interpreter's own: Triton 3.2's turns a loop bound into a 1-element numpy array
        # and numpy 2 deprecates its conversion to a scalar; a GPU runs no interpreter)
        warnings.filterwarnings("ignore", "Conversion of an array with ndim > 0 to a scalar", DeprecationWarning,
                                "triton.runtime.interpreter")
        run_ekd(ekd_loss, student, teacher, labels, backend="triton", num_hard_negatives=100)
        run_ekd(triton_loss(negative_selection="random", compute_critical_ratio=True), student, teacher, labels,
                generator=torch.Generator().manual_seed(0))


def _selected_entries_per_row(student, teacher, labels, **options):
    """How many selected-negative entries (both directions of each selected pair) each sorted
    row holds in the Triton forward: the walk backward_rows_kernel makes for that row."""
    config = EKDConfig(**options)
    k = config.num_thresholds
    random_pairs = None
    if config.negative_selection == "random":
        random_pairs = triton_ekd._random_negative_pairs(labels, config.num_hard_negatives,
                                                         torch.Generator().manual_seed(0))
    zeros = torch.zeros(k, device=student.device)
    with torch.no_grad():
        outputs = triton_ekd._forward_impl(student, teacher, labels, zeros, zeros, random_pairs, config, True)
    rows, cols = outputs[12], outputs[13]
    return torch.bincount(torch.cat([rows, cols]).cpu(), minlength=student.shape[0])


@pytest.mark.parametrize("options", [dict(num_hard_negatives=300), dict(negative_selection="random",
                                                                         num_hard_negatives=300)],
                         ids=["hardest", "random"])
def test_backward_rows_small_batch_shape(monkeypatch, options):
    """backward_rows_kernel in the small-B shape (2-row programs walking a row's selected
    entries 8 at a time: triton_ekd.SMALL_BACKWARD_*, and the interpreter's INTERPRETER_BACKWARD_*
    set to the same) against the shape of larger batches (16-row programs, or the interpreter's
    128, one entry a step): B = 75 (the last 2-row program half full), a cluster of 12 rows that
    holds most of the hardest negatives, so that rows hold from no entry (hardest) to about 20,
    on both sides of multiples of 8 (checked).  Each row adds its entries in the same order
    either way: the same gradient bits, and the reference's."""
    student, teacher, labels = make_batch(75, 40, 24, 20, seed=29)
    student[:12] = student[0] + 0.3 * torch.randn(12, 40, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    entries = _selected_entries_per_row(student, teacher, labels, **options)
    assert entries.max() >= 16 and (entries % 8 != 0).any() and (entries % 8 == 0).any()
    grads = {}
    for small in (False, True):
        monkeypatch.setattr(triton_ekd, "SMALL_BACKWARD_MAX_BATCH", 512 if small else 0)
        monkeypatch.setattr(triton_ekd, "INTERPRETER_BACKWARD_BLOCK_ROWS", 2 if small else 128)
        monkeypatch.setattr(triton_ekd, "INTERPRETER_BACKWARD_ENTRY_UNROLL", 8 if small else 1)
        grids = _record_grids(monkeypatch)
        grads[small] = run_ekd(ekd_loss, student, teacher, labels, backend="triton",
                               generator=torch.Generator().manual_seed(0), **options).grad
        rows = 2 if small else (128 if not ON_GPU else triton_ekd.BACKWARD_BLOCK_ROWS)
        assert ("backward_rows_kernel", (-(-75 // rows),)) in grids
    assert torch.equal(grads[True], grads[False])
    compare(student, teacher, labels, steps=2, **options)  # (the small-B shape, as the last call)


@pytest.mark.parametrize("block, chunk", [(16, 512), (8, 32)])
def test_candidate_rank_blocks(monkeypatch, block, chunk):
    """hardest_negatives_kernel's rank count in programs of `block` candidates walking them
    `chunk` at a time (triton_ekd.CANDIDATE_BLOCK, CANDIDATE_CHUNK; the interpreter's set to the
    same): 16 x 512 is the GPU's default, 8 x 32 many steps with a partial last one.  Against
    one program of 1024 counting in one step: the same selected pairs in the same slots, bit
    for bit, and the reference's loss.  The student's rows come in threes (one vector, three
    identities), so similarities come in tied groups of nine and the N-th largest ties with the
    next: the ties' (row, col) order decides which are taken (checked)."""
    base, teacher, labels = make_batch(81, 16, 12, 81, seed=30)
    student = base[torch.arange(81, device=DEVICE) // 3].contiguous()
    num_hard_negatives = 100
    # (exact arithmetic on the copies: float64 on the CPU)
    unit = torch.nn.functional.normalize(student.double().cpu(), dim=1)
    upper = torch.triu(torch.ones(81, 81, dtype=torch.bool), diagonal=1)
    negatives = (unit @ unit.T)[upper & (labels.cpu()[:, None] != labels.cpu()[None, :])]
    ordered = negatives.sort(descending=True).values
    assert ordered[num_hard_negatives - 1] == ordered[num_hard_negatives], "the boundary has no tie"
    selected = {}
    for blocks in ((1024, 1024), (block, chunk)):
        for prefix in ("", "INTERPRETER_"):
            monkeypatch.setattr(triton_ekd, f"{prefix}CANDIDATE_BLOCK", blocks[0])
            monkeypatch.setattr(triton_ekd, f"{prefix}CANDIDATE_CHUNK", blocks[1])
        config = EKDConfig(num_hard_negatives=num_hard_negatives)
        zeros = torch.zeros(config.num_thresholds, device=DEVICE)
        with torch.no_grad():
            outputs = triton_ekd._forward_impl(student, teacher, labels, zeros, zeros, None, config, True)
        selected[blocks] = (outputs[12], outputs[13], outputs[0])
    for got, want in zip(selected[(block, chunk)], selected[(1024, 1024)]):
        assert torch.equal(got, want)
    compare(student, teacher, labels, num_hard_negatives=num_hard_negatives)


@pytest.mark.parametrize("rows, chunk", [(8, 64), (16, 128), (64, 32)])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter meets the inf
def test_normalise_blocks(monkeypatch, rows, chunk):
    """normalise_kernel on blocks of its own (triton_ekd.NORMALISE_BLOCK_ROWS, NORMALISE_BLOCK_K;
    64 x 32 is the benchmark's triton:normalise-tile-rows, the pass before): B = 150 and D = 200
    a multiple of neither, the reference's results over consecutive calls; and a NaN in the last
    sorted row (the last block's, partial), of either model, gives the NaN loss and keeps the
    state."""
    monkeypatch.setattr(triton_ekd, "NORMALISE_BLOCK_ROWS", rows)
    monkeypatch.setattr(triton_ekd, "NORMALISE_BLOCK_K", chunk)
    grids = _record_grids(monkeypatch)
    student, teacher, labels = make_batch(150, 200, 40, 30, seed=28)
    compare(student, teacher, labels, steps=2, num_hard_negatives=150)
    assert ("normalise_kernel", (-(-150 // rows), 2)) in grids
    last = int(torch.argsort(labels.cpu(), stable=True)[-1])  # the last sorted row
    for model, column in ((0, 199), (1, 39)):
        inputs = [student.clone(), teacher.clone()]
        inputs[model][last, column] = float("nan")
        _assert_nan_loss_keeps_state(*inputs, labels)


@pytest.mark.parametrize("overflow", [False, True], ids=["candidates", "overflow"])
def test_square_tile_grid_against_the_reference(monkeypatch, overflow):
    """The tile passes on the square (T, T) grid, as before the triangular one (the benchmark's
    A/B variant triton:square-grid, and the grid on ROCm): the lower triangle's programs return
    and the rest compute the reference's results, with the candidate buffer holding the top N
    and, forced to overflow, through passes 3 and 4 (boundary_count on the square grid too)."""
    monkeypatch.setattr(triton_ekd, "TRIANGLE_TILE_GRID", False)
    if overflow:
        monkeypatch.setattr(triton_ekd, "MIN_CANDIDATE_CAPACITY", 0)
        monkeypatch.setattr(triton_ekd, "CANDIDATE_FACTOR", 0)
    grids = _record_grids(monkeypatch)
    student, teacher, labels = make_batch(150, 20, 12, 30, seed=26)
    compare(student, teacher, labels, steps=2, num_hard_negatives=150, compute_critical_ratio=True)
    tiles = -(-150 // triton_ekd.TILE)
    for kernel in ("coarse_histogram_kernel", "fine_histogram_kernel", "boundary_count_kernel"):
        assert (kernel, (tiles, tiles)) in grids


def test_launch_options_leave_out_maxnreg_on_rocm(monkeypatch):
    """Triton's HIP backend takes no maxnreg: on ROCm a kernel's launch options go without it
    (the shipped pass-1 cap would otherwise fail every launch), and the others stay."""
    class Kernel:
        __name__ = "coarse_histogram_kernel"

        def __getitem__(self, grid):
            return lambda *args, **kwargs: kwargs

    monkeypatch.setattr(triton_ekd, "LAUNCH_OPTIONS", {"coarse_histogram_kernel": dict(maxnreg=168, num_warps=8)})
    monkeypatch.setattr(triton_ekd, "_ON_HIP", False)
    assert triton_ekd._launch(Kernel(), (1,))() == dict(maxnreg=168, num_warps=8)
    monkeypatch.setattr(triton_ekd, "_ON_HIP", True)
    assert triton_ekd._launch(Kernel(), (1,))() == dict(num_warps=8)


def test_pass2_modes_keep_the_histograms(monkeypatch, scratch_views):
    """No mode changes a bin: every target's fine histogram (both models; the teacher has no
    top-N slot) is the same in all of them, on a batch where targets share a bucket (FPRs 1e-5
    and 1e-6 both rank 0 among its ~10^4 negatives), which one aggregation adds once.  On 64 x
    64 tiles whatever the run's variant (EKD_TEST_TRITON_VARIANT): the batch is one whose tiles
    fall on both sides of the direct modes' limit at that size."""
    monkeypatch.setattr(triton_ekd, "TILE", 64)
    student, teacher, labels = make_batch(150, 20, 12, 30, seed=26)
    histograms = {}
    for mode, (_, one_aggregation, _) in PASS2_MODES.items():
        _set_pass2_mode(monkeypatch, mode)
        scratch_views.clear()
        with torch.no_grad():
            crit = triton_loss(num_hard_negatives=150)
            crit(student, teacher, labels)
        w32 = next(views for views in scratch_views if "fine" in views)
        num_thresholds = crit.config.num_thresholds
        histograms[mode] = _target_histograms(w32, (num_thresholds + 1, num_thresholds), one_aggregation)
        buckets = w32["bucket"][0].cpu()
        assert len(set(buckets.tolist())) < buckets.numel(), "no two targets share a bucket: the case is not covered"
    # the direct modes' limit has tiles on both sides: per-element atomics and the aggregation
    direct_max = PASS2_MODES["direct_atomics"][2]
    counts = [c for model, x in enumerate((student, teacher))
              for c in _tile_bucket_counts(x, labels, w32["bucket"][model, :(num_thresholds + 1, num_thresholds)[model]])]
    assert any(0 < c <= direct_max for c in counts) and any(c > direct_max for c in counts), counts
    for mode in PASS2_MODES:
        for model in range(2):
            assert torch.equal(histograms[mode][model], histograms["every_target"][model]), f"{mode}, model {model}"
            assert int(histograms[mode][model].sum()) > 0


@pytest.mark.parametrize("num_hard_negatives", [1, 150, 5000])
def test_top_n_paths(top_n_path, num_hard_negatives):
    student, teacher, labels = make_batch(80, 20, 12, 15, seed=15)
    compare(student, teacher, labels, num_hard_negatives=num_hard_negatives, compute_critical_ratio=True)


@pytest.mark.parametrize("capacity", ["default", "tight"])
def test_coarse_histogram_copies_against_the_reference(monkeypatch, capacity):
    """Pass 1's histograms in copies (forced: a copy per tile program, as many as allowed) give
    the reference's results over consecutive calls: coarse_select scans the copies' sum, and sums
    them to decide whether the top-N candidates overflow their buffer ("tight": a buffer of
    exactly N slots, so only the whole sum shows that the boundary bucket holds more)."""
    monkeypatch.setattr(triton_ekd, "COARSE_TILES_PER_COPY", 1)
    if capacity == "tight":
        monkeypatch.setattr(triton_ekd, "MIN_CANDIDATE_CAPACITY", 0)
        monkeypatch.setattr(triton_ekd, "CANDIDATE_FACTOR", 1)
    student, teacher, labels = make_batch(150, 20, 12, 30, seed=21)
    assert triton_ekd._coarse_copies(150) > 1
    compare(student, teacher, labels, steps=2, num_hard_negatives=150, compute_critical_ratio=True)


@pytest.fixture(params=["head", "fallback", "head+copies", "fallback+copies"])
def pass1_cutoff(request, monkeypatch, scratch_views):
    """Pass 1 in two parts (coarse_histogram_kernel), forced at a small B: the head of the order
    up to a cutoff placed by a sample, which holds every target ("head"), or a cutoff at the
    sample's very top, so that every target lies past it and the tail is counted too
    ("fallback"); into one histogram, or into copies (a copy per tile program, as many as
    allowed), as at the large B where the split is the default.  Returns the path ("head" or
    "fallback") and a recorder of the forward's scratch views, for the checks of what pass 1
    counted."""
    path, _, copies = request.param.partition("+")
    monkeypatch.setattr(triton_ekd, "CUTOFF_MIN_BATCH", 0)
    if path == "fallback":
        monkeypatch.setattr(triton_ekd, "CUTOFF_SAFETY", 1e-12)
    if copies:
        monkeypatch.setattr(triton_ekd, "COARSE_TILES_PER_COPY", 1)
    return path, scratch_views


def _assert_pass1_counted(path, scratch, monkeypatch, student, teacher, labels, **options):
    """What pass 1 counts in a forward on this batch, against pass 1 in one part: with "head",
    the same counts up to each model's cutoff and none past it, fewer than the L negatives (the
    cutoff spared work), and no fallback; with "fallback", the same counts in every bucket, some
    past the cutoff."""
    from ekd_kernels._triton import kernels

    def forward():
        scratch.clear()
        with torch.no_grad():
            triton_loss(**options)(student, teacher, labels, generator=torch.Generator().manual_seed(0))
        w32 = next(views for views in scratch if "coarse" in views)
        state = next(views["state"] for views in scratch if "state" in views).cpu()
        return w32, state

    w32, state = forward()
    with monkeypatch.context() as one_part:
        one_part.setattr(triton_ekd, "CUTOFF_MIN_BATCH", 2**62)
        whole, _ = forward()
    assert "probe" not in whole and w32["coarse"].shape[1] == triton_ekd._coarse_copies(student.shape[0])
    num_negative = int(state[kernels.NUM_NEGATIVE.value])
    sample = int(state[kernels.SAMPLE_NEGATIVE.value])
    assert 0 < sample <= triton_ekd.TILE * student.shape[0]
    assert int(state[kernels.FALLBACK.value]) == (path == "fallback")
    for model in range(2):
        counts, want = w32["coarse"][model].sum(0).cpu(), whole["coarse"][model].sum(0).cpu()
        cutoff = int(state[kernels.CUTOFF.value + model])
        assert int(w32["probe"][model].sum()) == sample, f"model {model}: the probe's histogram"
        assert int(want.sum()) == num_negative
        if path == "head":
            assert torch.equal(counts[:cutoff + 1], want[:cutoff + 1]), f"model {model}: head up to {cutoff}"
            assert int(counts[cutoff + 1:].sum()) == 0 and int(want[cutoff + 1:].sum()) > 0, f"model {model}"
        else:
            assert torch.equal(counts, want) and int(want[cutoff + 1:].sum()) > 0, f"model {model}: cutoff {cutoff}"


# The selections pass 1's two parts (and its windows) are checked with, against the reference.
PASS1_OPTIONS = [dict(num_hard_negatives=150, compute_critical_ratio=True),
                 dict(num_hard_negatives=40, critical_only=True, rank_loss="eq8"),
                 dict(negative_selection="random", num_hard_negatives=100),
                 dict(fprs=(0.2, 1e-3), num_hard_negatives=0)]
PASS1_OPTION_IDS = ["hardest", "critical", "random", "thresholds_only"]


@pytest.mark.parametrize("options", PASS1_OPTIONS, ids=PASS1_OPTION_IDS)
def test_pass1_cutoff_against_the_reference(pass1_cutoff, monkeypatch, options):
    """Pass 1 counting the head first gives the reference's results over consecutive calls, when
    the head holds every target and when it does not (the tail counted after all)."""
    path, scratch = pass1_cutoff
    student, teacher, labels = make_batch(150, 20, 12, 30, seed=22)
    compare(student, teacher, labels, steps=2, **options)
    _assert_pass1_counted(path, scratch, monkeypatch, student, teacher, labels, **options)


def test_pass1_cutoff_with_an_overflowing_candidate_buffer(pass1_cutoff, monkeypatch):
    """The top-N overflow decision (coarse_select sums the boundary bucket) after either part:
    a buffer of exactly N slots, so that only the whole boundary bucket shows it overflows."""
    monkeypatch.setattr(triton_ekd, "MIN_CANDIDATE_CAPACITY", 0)
    monkeypatch.setattr(triton_ekd, "CANDIDATE_FACTOR", 1)
    path, scratch = pass1_cutoff
    student, teacher, labels = make_batch(150, 20, 12, 30, seed=23)
    compare(student, teacher, labels, steps=2, num_hard_negatives=150)
    _assert_pass1_counted(path, scratch, monkeypatch, student, teacher, labels, num_hard_negatives=150)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter meets the inf
def test_pass1_cutoff_with_a_non_finite_batch(pass1_cutoff):
    """A non-finite batch through pass 1's two parts: NaN loss, the EMA state kept."""
    _assert_non_finite_batch_keeps_state(*make_batch(90, 8, 8, 20, seed=24))


@pytest.fixture(params=["hit", "miss", "hit+fallback", "narrow", "candidates-overflow"])
def pass1_windows(request, monkeypatch, scratch_views):
    """Pass 1 keeping the keys in windows around the targets (triton_ekd.PASS1_WINDOWS), forced
    at a small B with the cutoff's sample that places them: windows wide enough that every target
    lies in its own ("hit": pass 2 then reads the window buffers, not the tiles), window buffers of
    no key ("miss": pass 2 recomputes the tiles), a hit after pass 1's fallback to the tail
    ("hit+fallback"), windows of one sample rank (no margin: "narrow", some targets out), and
    wide windows whose top-N candidates overflow their slots ("candidates-overflow": N slots).
    Returns the path and a function that gives, after a forward, (WINDOW_MISS, pass 2's
    candidate count, pass 1's window candidate count)."""
    from ekd_kernels._triton import kernels

    path = request.param
    monkeypatch.setattr(triton_ekd, "CUTOFF_MIN_BATCH", 0)
    monkeypatch.setattr(triton_ekd, "PASS1_WINDOWS", True)
    if path == "miss":
        monkeypatch.setattr(triton_ekd, "WINDOW_CAPACITY_RANGE", (0, 0))
    if path == "hit+fallback":
        monkeypatch.setattr(triton_ekd, "CUTOFF_SAFETY", 1e-12)
    if path == "narrow":
        for name in ("WINDOW_Z", "WINDOW_RELATIVE", "WINDOW_SLACK"):
            monkeypatch.setattr(triton_ekd, name, 0.0)
    if path == "candidates-overflow":
        for name in ("MIN_CANDIDATE_CAPACITY", "CANDIDATE_FACTOR", "WINDOW_CANDIDATE_FACTOR"):
            monkeypatch.setattr(triton_ekd, name, int(name != "MIN_CANDIDATE_CAPACITY"))

    def outcome():
        w32 = next(views for views in scratch_views if "window" in views)
        state = next(views["state"] for views in scratch_views if "state" in views).cpu()
        counts = w32["candidate_count"].cpu().tolist()
        return int(state[kernels.WINDOW_MISS.value]), counts[0], counts[1], int(state[kernels.FALLBACK.value])

    return path, outcome


@pytest.mark.parametrize("options", PASS1_OPTIONS, ids=PASS1_OPTION_IDS)
def test_pass1_windows_against_the_reference(pass1_windows, options):
    """Pass 2 from pass 1's window buffers, or from the tiles after a miss: the reference's
    results over consecutive calls (its second call sees the first's EMA state).  The hardest
    negatives, when the window held them, come from pass 1's candidates, which include negatives
    below the boundary's bucket."""
    path, outcome = pass1_windows
    student, teacher, labels = make_batch(150, 20, 12, 30, seed=22)
    compare(student, teacher, labels, steps=2, **options)
    miss, pass2_candidates, window_candidates, fallback = outcome()
    hardest = options.get("negative_selection") != "random" and options["num_hard_negatives"] > 0
    if path.startswith("hit"):
        assert miss == 0 and pass2_candidates == 0, "pass 2 recomputed the tiles after a hit"
        assert (window_candidates > options["num_hard_negatives"]) == hardest, window_candidates
        assert fallback == (path == "hit+fallback")
    if path == "miss":
        assert miss == 1 and (pass2_candidates > 0) == hardest
    if path == "candidates-overflow":  # (the thresholds' windows are as wide as in "hit")
        assert miss == hardest and window_candidates > (options["num_hard_negatives"] if hardest else -1)


def test_pass1_windows_narrow_misses_some_target(monkeypatch, scratch_views):
    """The "narrow" windows (one sample rank wide) do leave a target out on the tests' batch, so
    that the parametrised test above takes the miss after windows that were placed (not only
    after an empty buffer)."""
    from ekd_kernels._triton import kernels

    for name, value in (("CUTOFF_MIN_BATCH", 0), ("PASS1_WINDOWS", True), ("WINDOW_Z", 0.0), ("WINDOW_RELATIVE", 0.0),
                        ("WINDOW_SLACK", 0.0)):
        monkeypatch.setattr(triton_ekd, name, value)
    student, teacher, labels = make_batch(150, 20, 12, 30, seed=22)
    with torch.no_grad():
        triton_loss(num_hard_negatives=150)(student, teacher, labels)
    state = next(views["state"] for views in scratch_views if "state" in views).cpu()
    assert int(state[kernels.WINDOW_MISS.value]) == 1


def test_pass1_windows_one_bucket_wide(monkeypatch, scratch_views):
    """Windows of exactly one bucket, each holding its target: at B <= TILE the probe's sample is
    every negative twice (both orders), so without a margin a threshold's window is the bucket
    of its own rank (no margin), and with distinct labels (L = all pairs) the top-N window reaches
    rank N.
    Pass 1 must keep the keys of a window's both edges (a window [lo, hi] taken as [lo, hi)
    would hold nothing here) for the reference's results.  (B = 60 <= TILE = 64, whatever the
    run's variant.)"""
    from ekd_kernels._triton import kernels

    for name, value in (("TILE", 64), ("CUTOFF_MIN_BATCH", 0), ("PASS1_WINDOWS", True), ("WINDOW_Z", 0.0), ("WINDOW_RELATIVE", 0.0),
                        ("WINDOW_SLACK", 0.0)):
        monkeypatch.setattr(triton_ekd, name, value)
    student, teacher, _ = make_batch(60, 20, 12, 60, seed=27)
    labels = torch.arange(60, device=DEVICE)
    compare(student, teacher, labels, steps=2, num_hard_negatives=100)
    w32 = next(views for views in scratch_views if "window" in views)
    state = next(views["state"] for views in scratch_views if "state" in views).cpu()
    windows = w32["window"].cpu()
    assert int(state[kernels.WINDOW_MISS.value]) == 0 and int(w32["candidate_count"][0]) == 0
    num_thresholds = len(EKDConfig().fprs)
    assert torch.equal(windows[:, :num_thresholds, 0], windows[:, :num_thresholds, 1]), windows


def test_window_select_places_the_windows(monkeypatch, scratch_views):
    """window_select_kernel's windows against their definition, from the probe's histograms:
    around sample rank r = S x fraction (S sample negatives), from the bucket of rank r - m to
    that of r + m, m = z sqrt(r + 1) + relative r + slack in fp32; the top bucket for the top-N
    target and where r - m < 0, the last where r + m passes the sample."""
    from ekd_kernels._triton import kernels

    z, relative, slack = 2.0, 0.25, 3.0
    for name, value in (("CUTOFF_MIN_BATCH", 0), ("PASS1_WINDOWS", True), ("WINDOW_Z", z),
                        ("WINDOW_RELATIVE", relative), ("WINDOW_SLACK", slack)):
        monkeypatch.setattr(triton_ekd, name, value)
    student, teacher, labels = make_batch(150, 20, 12, 30, seed=22)
    config = EKDConfig(num_hard_negatives=150)
    with torch.no_grad():
        triton_loss(num_hard_negatives=150)(student, teacher, labels)
    w32 = next(views for views in scratch_views if "window" in views)
    state = next(views["state"] for views in scratch_views if "state" in views).cpu()
    num_sample = int(state[kernels.SAMPLE_NEGATIVE.value])
    fractions = triton_ekd._window_fractions(config, 150 * 149 // 2, torch.device("cpu"))
    f32 = functools.partial(torch.tensor, dtype=torch.float32)
    edges = {"lo": 0, "hi": 0}
    for model in range(2):
        cumulative = w32["probe"][model].cpu().long().cumsum(0)

        def bucket(rank):
            return min(int((cumulative <= rank).sum()), 65535)

        for target in range(config.num_thresholds + (model == 0)):
            rank = f32(num_sample) * fractions[target]
            margin = f32(z) * torch.sqrt(rank + f32(1.0)) + f32(relative) * rank + f32(slack)
            first, last = int((rank - margin).long()), int((rank + margin).long())
            lo = 0 if first < 0 or target == config.num_thresholds else bucket(max(first, 0))
            hi = 65535 if last >= num_sample else bucket(min(last, num_sample - 1))
            assert w32["window"][model, target].tolist() == [lo, hi], (model, target, first, last)
            edges["lo"] += 0 < lo
            edges["hi"] += hi < 65535
    assert edges["lo"] > 0 and edges["hi"] > 0  # windows bounded on both sides were checked


@pytest.mark.parametrize("scale", [2.0, 0.5], ids=["target_above_its_window", "target_below_its_window"])
def test_pass1_windows_miss_on_either_side(monkeypatch, scratch_views, scale):
    """One-bucket windows as above, but the first FPR's window placed at twice (half) its rank:
    the target's bucket lies above (below) its window, which window_histogram must call a miss, so
    that pass 2 recomputes the tiles and the results stay the reference's."""
    from ekd_kernels._triton import kernels

    for name, value in (("CUTOFF_MIN_BATCH", 0), ("PASS1_WINDOWS", True), ("WINDOW_Z", 0.0), ("WINDOW_RELATIVE", 0.0),
                        ("WINDOW_SLACK", 0.0)):
        monkeypatch.setattr(triton_ekd, name, value)
    window_fractions = triton_ekd._window_fractions

    def moved(config, num_pairs, device):
        fractions = window_fractions(config, num_pairs, device).clone()
        fractions[0] *= scale
        return fractions

    monkeypatch.setattr(triton_ekd, "_window_fractions", moved)
    student, teacher, _ = make_batch(60, 20, 12, 60, seed=27)
    labels = torch.arange(60, device=DEVICE)
    compare(student, teacher, labels, steps=2, num_hard_negatives=100)
    w32 = next(views for views in scratch_views if "window" in views)
    state = next(views["state"] for views in scratch_views if "state" in views).cpu()
    bucket, window = w32["bucket"].cpu(), w32["window"].cpu()
    assert int(state[kernels.WINDOW_MISS.value]) == 1
    for model in range(2):  # the first target is outside its window, on the side asked for
        outside = bucket[model, 0] < window[model, 0, 0] if scale > 1 else bucket[model, 0] > window[model, 0, 1]
        assert bool(outside), (model, bucket[model], window[model])


@pytest.mark.parametrize("mode", ["skip_empty_targets", "every_target", "one_aggregation", "direct_atomics",
                                  "one_aggregation_direct_atomics"])
def test_pass1_windows_keep_the_histograms(monkeypatch, scratch_views, mode):
    """A hit changes no bin: every target's fine histogram, built from the window buffers, is the
    one pass 2 builds from the tiles, in each of pass 2's ways of adding them (on a batch where
    targets share a bucket, as test_pass2_modes_keep_the_histograms)."""
    from ekd_kernels._triton import kernels

    _set_pass2_mode(monkeypatch, mode)
    monkeypatch.setattr(triton_ekd, "CUTOFF_MIN_BATCH", 0)
    student, teacher, labels = make_batch(150, 20, 12, 30, seed=26)
    histograms = {}
    for windows in (False, True):
        monkeypatch.setattr(triton_ekd, "PASS1_WINDOWS", windows)
        scratch_views.clear()
        with torch.no_grad():
            crit = triton_loss(num_hard_negatives=150)
            crit(student, teacher, labels)
        w32 = next(views for views in scratch_views if "fine" in views)
        state = next(views["state"] for views in scratch_views if "state" in views).cpu()
        assert int(state[kernels.WINDOW_MISS.value]) == 0
        num_thresholds = crit.config.num_thresholds
        histograms[windows] = _target_histograms(w32, (num_thresholds + 1, num_thresholds),
                                                 PASS2_MODES[mode][1])
    assert int(w32["window_count"][0]) > 0 and int(w32["candidate_count"][0]) == 0  # the hit's path
    for model in range(2):
        assert torch.equal(histograms[True][model], histograms[False][model]), f"model {model}"
        assert int(histograms[True][model].sum()) > 0


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter meets the inf
def test_pass1_windows_with_a_non_finite_batch(pass1_windows):
    """A non-finite batch through the windows: NaN loss, the EMA state kept."""
    _assert_non_finite_batch_keeps_state(*make_batch(90, 8, 8, 20, seed=24))


def _windows_on_and_off(monkeypatch, student, teacher, labels, **options):
    """Two calls with the windows as set (the second for determinism) and one without them: every
    output a caller sees, for bitwise comparison."""
    import dataclasses

    def observed():
        call = run_ekd(ekd_loss, student, teacher, labels, backend="triton", generator=torch.Generator().manual_seed(0),
                       **options)
        stats = [getattr(call.result.stats, f.name) for f in dataclasses.fields(call.result.stats)]
        return [call.result.loss, call.grad, call.result.student_thresholds, call.result.teacher_thresholds, *stats]

    first, second = observed(), observed()
    with monkeypatch.context() as off:
        off.setattr(triton_ekd, "PASS1_WINDOWS", False)
        without = observed()
    return first, second, without


@pytest.mark.parametrize("options", [
    dict(num_hard_negatives=500, compute_critical_ratio=True),
    dict(negative_selection="random", num_hard_negatives=300),
], ids=["hardest", "random"])
def test_pass1_windows_bitwise_as_without(pass1_windows, monkeypatch, options):
    """On every path (hit, miss, after the fallback, narrow, overflowing candidates) the windows
    change no bit of what a caller sees: loss, gradient, thresholds and every statistic equal those
    of the call without windows, and of a second call; on a batch with ties at the top-N boundary
    (duplicated rows), whose tie order the selection must keep."""
    student, teacher, labels = make_batch(90, 40, 24, 20, seed=11)
    student, teacher = torch.cat([student, student[:30]]), torch.cat([teacher, teacher[:30]])
    labels = torch.cat([labels, labels[:30] + 1000])
    first, second, without = _windows_on_and_off(monkeypatch, student, teacher, labels, **options)
    for index, (a, b, c) in enumerate(zip(first, second, without)):
        if a is None:
            assert b is None and c is None
            continue
        assert torch.equal(a, b), f"output {index} differs between two calls"
        assert torch.equal(a, c), f"output {index} differs from the call without windows"


def test_floor_fraction_is_exact_past_int64_products():
    """coarse_select's threshold ranks floor(L p / q) (kernels._floor_fraction) equal Python's
    exact integers where L p passes 2^63: an FPR of 0.999999999999 (p = 999999999999) from
    B = 4400, any FPR's fraction at the largest L (B = 4194240), and the edges (p = 0, p = q,
    q = 1, q = 2^40 - 1, n = 0, n near 2^62).  The backend refused such FPRs before (a
    ValueError past int64), where the other backends compute them."""
    import triangle_probe
    from ekd_kernels.config import fpr_fraction

    largest_pairs = 4194240 * 4194239 // 2
    cases = []
    for fpr in (0.999999999999, 0.123456789, 1e-6, 0.1, 1e-12, 0.5, 0.7071067811865476):
        fraction = fpr_fraction(fpr)
        for n in (0, 1, 9677800, 4400 * 4399 // 2, 10**12 - 1, 10**12, largest_pairs, 2**62 - 1):
            cases.append((n, fraction.numerator, fraction.denominator))
    q_max = 2**40 - 1
    generator = torch.Generator().manual_seed(0)
    for p, q in ((0, 1), (1, 1), (0, q_max), (q_max, q_max), (q_max - 1, q_max), (1, q_max), (2**20, 2**20 + 1),
                 (2**20 - 1, 2**39)):
        for n in (0, 1, q - 1 if q > 1 else 0, q, 2**62 - 1, largest_pairs, 123456789012345):
            cases.append((n, p, q))
    for _ in range(200):  # random fractions below 2^40 and counts below 2^62
        q = int(torch.randint(1, 2**40, (), generator=generator))
        p = int(torch.randint(0, q + 1, (), generator=generator))
        n = int(torch.randint(0, 2**62, (), generator=generator))
        cases.append((n, p, q))
    n, p, q = (torch.tensor(column, dtype=torch.int64, device=DEVICE) for column in zip(*cases))
    out = torch.empty_like(n)
    block = 256
    triangle_probe.floor_fraction_kernel[(-(-n.numel() // block),)](n, p, q, out, n.numel(), BLOCK=block)
    want = [a * b // c for a, b, c in cases]
    assert out.tolist() == want


def test_triangle_blocks_at_every_size():
    """kernels._triangle_block, the tile passes' program -> (row block, column block) of the
    triangular grid, against integer arithmetic: every tile number of T = 1 ... 130, and the
    numbers around the first and last tile of every column at T = 2^k - 1 ... 2^k + 1 up to the
    largest grid MAX_BATCH allows (T = 65535: p up to 2^31 - 2), with every column's first and
    last tile near the top, where the fp32 square root's estimate of n is a step off either way
    and the steps decide."""
    import triangle_probe

    largest = 65535 * 65536 // 2  # programs of the largest grid (T = 65535), <= 2^31 - 1
    numbers = set(range(130 * 131 // 2))
    for k in range(8, 17):
        for tiles in (2**k - 1, 2**k, 2**k + 1):
            for n in (tiles - 2, tiles - 1, tiles // 2, tiles // 3 + 1):
                first = n * (n + 1) // 2
                numbers.update(p for p in (first - 1, first, first + 1, first + n - 1, first + n)
                               if 0 <= p < min(tiles * (tiles + 1) // 2, largest))
    for n in range(60000, 65535):  # every column's first and last tile near the top, where the
        first = n * (n + 1) // 2   # fp32 estimate of n is off by one either way at some
        numbers.update((first, first + n))
    numbers.add(largest - 1)  # the last program of the largest grid
    p = torch.tensor(sorted(numbers), dtype=torch.int64, device=DEVICE)
    out = torch.empty(2 * p.numel(), dtype=torch.int64, device=DEVICE)
    block = 1024
    triangle_probe.triangle_block_kernel[(-(-p.numel() // block),)](p, out, p.numel(), BLOCK=block)
    m, n = out.view(-1, 2).cpu().clone().unbind(1)  # (a copy: `out` is reused below)
    p = p.cpu()
    assert bool((n * (n + 1) // 2 <= p).all() and (p < (n + 1) * (n + 2) // 2).all()), "n is not the largest"
    assert torch.equal(m, p - n * (n + 1) // 2) and bool(((0 <= m) & (m <= n)).all())
    assert int(n.max()) == 65534  # the largest grid's last column (T = 65535 blocks: n < T)
    # the step either way from an estimate of n a step off, or right (the GPU's approximate root
    # may err where the interpreter's exact one does not)
    for shift in (-1, 0, 1):
        estimate = (n + shift).clamp(min=0).to(DEVICE)
        out.fill_(-1)
        triangle_probe.triangle_correction_kernel[(-(-p.numel() // block),)](p.to(DEVICE), estimate, out,
                                                                            p.numel(), BLOCK=block)
        assert torch.equal(out.view(-1, 2).cpu(), torch.stack([m, n], 1)), f"estimate n {shift:+d}"


def test_tile_grid_numbers_the_squares_working_programs_in_order(monkeypatch):
    """The triangular grid's programs are the square grid's programs that do work (m <= n), in
    the square grid's order (column by column, rows first): the same tiles, launched in the same
    order; on ROCm, and with TRIANGLE_TILE_GRID off, the square grid comes back."""
    import triangle_probe

    for batch in (1, 64, 65, 200, 1000):
        tiles = triton_ekd._num_tiles(batch)
        (count,) = triton_ekd._tile_grid(batch)
        assert count == tiles * (tiles + 1) // 2
        p = torch.arange(count, dtype=torch.int64, device=DEVICE)
        out = torch.empty(2 * count, dtype=torch.int64, device=DEVICE)
        triangle_probe.triangle_block_kernel[(-(-count // 1024),)](p, out, count, BLOCK=1024)
        square = [(m, n) for n in range(tiles) for m in range(tiles) if m <= n]
        assert [tuple(pair) for pair in out.view(-1, 2).cpu().tolist()] == square
    tiles = triton_ekd._num_tiles(1000)  # (16 on 64 x 64 tiles)
    monkeypatch.setattr(triton_ekd, "_ON_HIP", True)  # ROCm: the square grid (HIP's grid x block limit)
    assert triton_ekd._tile_grid(1000) == (tiles, tiles)
    monkeypatch.setattr(triton_ekd, "_ON_HIP", False)
    monkeypatch.setattr(triton_ekd, "TRIANGLE_TILE_GRID", False)
    assert triton_ekd._tile_grid(1000) == (tiles, tiles)


@pytest.fixture(scope="module")
def histogram_rank_kernel():
    """A kernel that runs kernels._histogram_rank for one rank per program, in either scan."""
    import histogram_rank_probe

    return histogram_rank_probe.histogram_rank_kernel


def _histogram_cases():
    """(name, copies of a 65536-bin histogram as int64): a narrow band (a random batch's
    similarities), counts on both sides of block and group boundaries, the last bin only, empty."""
    generator = torch.Generator().manual_seed(3)
    band = torch.zeros(3, 65536, dtype=torch.int64)
    for copy in range(3):
        band[copy].index_add_(0, torch.randint(16400, 17400, (3000,), generator=generator),
                              torch.ones(3000, dtype=torch.int64))
    edges = torch.zeros(2, 65536, dtype=torch.int64)
    for bin_, count in {0: 2, 255: 1, 256: 3, 4095: 4, 4096: 5, 8191: 1, 61440: 2, 65535: 6}.items():
        edges[bin_ % 2, bin_] = count
    last = torch.zeros(1, 65536, dtype=torch.int64)
    last[0, 65535] = 9
    return {"band": band, "edges": edges, "last_bin_only": last, "empty": torch.zeros(1, 65536, dtype=torch.int64)}


@pytest.mark.parametrize("linear_scan", [0, 1], ids=["three_levels", "linear"])
@pytest.mark.parametrize("scan_block", [1024, 4096, pytest.param(65536, marks=pytest.mark.skipif(
    ON_GPU, reason="the interpreter's block only: compiled, a 65536-wide block takes about a minute"))])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("case", list(_histogram_cases()))
def test_histogram_rank_against_searchsorted(histogram_rank_kernel, case, dtype, scan_block, linear_scan):
    """The selection scans' (bin, count before it) of a descending rank, summed over copies, equal
    searchsorted(cumsum(hist), rank, right=True) clamped to the last bin and the count of the bins
    before it, at every rank next to a running total (a bin's first and last element, the last
    element, past the last), in both scans and at each SCAN_BLOCK the backend uses (GPU 4096,
    interpreter 65536) and a smaller one (test_large_batch's 1024)."""
    copies = _histogram_cases()[case]
    running = copies.sum(0).cumsum(0)
    total = int(running[-1])
    # the distinct running totals: every one for the sparse cases, 12 spread over the band
    values = running.unique()
    values = values[torch.linspace(0, len(values) - 1, min(len(values), 12)).long()].tolist()
    ranks = sorted({r for value in values for r in (value - 1, value, value + 1) if r >= 0} | {0, 1, total + 5})
    ranks = torch.tensor(ranks, dtype=torch.int64)
    wanted_bins = torch.searchsorted(running, ranks, right=True)
    wanted_above = torch.where(wanted_bins > 0, running[(wanted_bins - 1).clamp(min=0)], 0)
    wanted_bins = wanted_bins.clamp(max=65535)
    out = torch.full((2 * len(ranks),), -1, dtype=torch.int64, device=DEVICE)
    histogram_rank_kernel[(len(ranks),)](copies.to(DEVICE, dtype).contiguous(), ranks.to(DEVICE), out,
                                         copies.shape[0], SCAN_BLOCK=scan_block, LINEAR_SCAN=linear_scan)
    out = out.cpu()
    assert out[0::2].tolist() == wanted_bins.tolist()
    assert out[1::2].tolist() == wanted_above.tolist()


def _every_output(student, teacher, labels, **options):
    """Every output a caller sees of one forward+backward, for bitwise comparisons."""
    import dataclasses

    call = run_ekd(ekd_loss, student, teacher, labels, backend="triton", generator=torch.Generator().manual_seed(0),
                   **options)
    stats = [getattr(call.result.stats, f.name) for f in dataclasses.fields(call.result.stats)]
    return [call.result.loss, call.grad, call.result.student_thresholds, call.result.teacher_thresholds, *stats]


@pytest.mark.parametrize("path", ["default", "cutoff+copies", "fallback+copies", "windows"])
def test_linear_scan_bitwise_as_three_levels(monkeypatch, path):
    """The selection scans in one level (SELECT_LINEAR_SCAN, the A/B's), in three, or as shipped
    (coarse_select in one level over copies, COARSE_SELECT_LINEAR_MIN_COPIES) give the same bits
    of every output, through every kernel that scans a histogram: coarse_select (one histogram,
    copies, head and fallback), fine_select, cutoff_select and window_select."""
    if path != "default":
        monkeypatch.setattr(triton_ekd, "CUTOFF_MIN_BATCH", 0)
    if "copies" in path:
        monkeypatch.setattr(triton_ekd, "COARSE_TILES_PER_COPY", 1)
    if path.startswith("fallback"):
        monkeypatch.setattr(triton_ekd, "CUTOFF_SAFETY", 1e-12)
    if path == "windows":
        monkeypatch.setattr(triton_ekd, "PASS1_WINDOWS", True)
    student, teacher, labels = make_batch(90, 40, 24, 20, seed=12)
    options = dict(num_hard_negatives=500, compute_critical_ratio=True)
    shipped = _every_output(student, teacher, labels, **options)
    monkeypatch.setattr(triton_ekd, "COARSE_SELECT_LINEAR_MIN_COPIES", 2**62)
    three_levels = _every_output(student, teacher, labels, **options)
    monkeypatch.setattr(triton_ekd, "SELECT_LINEAR_SCAN", True)
    linear = _every_output(student, teacher, labels, **options)
    for other, name in ((three_levels, "three levels"), (linear, "one level")):
        for index, (a, b) in enumerate(zip(shipped, other)):
            assert (a is None and b is None) or torch.equal(a, b), f"output {index} differs with {name}"


@pytest.mark.parametrize("copies", [False, True])
def test_coarse_select_scans_in_one_level_over_copies(monkeypatch, copies):
    """As shipped, coarse_select scans in one level exactly when pass 1's histograms have copies
    (the fourth GPU run's A/B: bench/NOTES.md), and the other scans in three."""
    if copies:
        monkeypatch.setattr(triton_ekd, "CUTOFF_MIN_BATCH", 0)
        monkeypatch.setattr(triton_ekd, "COARSE_TILES_PER_COPY", 1)
    scans = []
    launch = triton_ekd._launch

    def recording(kernel, grid):
        if kernel.__name__.endswith("_select_kernel"):
            def record(*args, **kwargs):
                scans.append((kernel.__name__, kwargs["LINEAR_SCAN"]))
                return launch(kernel, grid)(*args, **kwargs)
            return record
        return launch(kernel, grid)

    monkeypatch.setattr(triton_ekd, "_launch", recording)
    student, teacher, labels = make_batch(90, 40, 24, 20, seed=12)
    ekd_loss(student, teacher, labels, backend="triton")
    assert triton_ekd._coarse_copies(90) > 1 if copies else triton_ekd._coarse_copies(90) == 1
    assert {name for name, _ in scans} >= {"coarse_select_kernel", "fine_select_kernel"}
    for name, linear in scans:
        assert linear == int(copies and name == "coarse_select_kernel"), (name, linear)


class _CountedLaunches:
    """Stands in for a kernel of the kernels module and counts its launches (triton_ekd._launch
    looks a kernel's LAUNCH_OPTIONS up by its __name__)."""

    def __init__(self, kernel):
        self.kernel, self.__name__, self.launches = kernel, kernel.__name__, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.fixture
def counted_sort(monkeypatch):
    """The sort kernel's launches counted, at the GPU's limit under the interpreter too."""
    from ekd_kernels._triton import kernels

    monkeypatch.setattr(triton_ekd, "INTERPRETER_SMALL_SORT_MAX", triton_ekd.SMALL_SORT_MAX)
    counted = _CountedLaunches(triton_ekd._kernels().stable_sort_kernel)
    monkeypatch.setattr(kernels, "stable_sort_kernel", counted)
    return counted


def _sort_keys(dtype, num_keys):
    """Keys with many ties (small values) and the dtype's extremes (for uint64 2^63 and 2^64 - 1,
    past int64, from their bits)."""
    generator = torch.Generator().manual_seed(num_keys)
    signed = torch.iinfo(dtype).min < 0
    keys = torch.randint(-3 if signed else 0, 5, (num_keys,), generator=generator).to(dtype)
    if dtype == torch.uint64:
        extremes = torch.tensor([-1, -2**63], dtype=torch.int64).view(torch.uint64)
    else:
        extremes = torch.tensor([torch.iinfo(dtype).max, torch.iinfo(dtype).min]).to(dtype)
    keys[::7] = extremes[0]
    keys[3::11] = extremes[1]
    return keys


def _assert_sorts_as_torch(keys):
    """triton_ekd._stable_sort(keys) against torch.sort(stable=True) on the CPU (where torch
    sorts every integer dtype)."""
    values, indices = triton_ekd._stable_sort(keys.to(DEVICE))
    expected = torch.sort(keys.cpu(), stable=True)
    assert values.dtype == keys.dtype and indices.dtype == torch.int64
    assert torch.equal(values.cpu(), expected.values) and torch.equal(indices.cpu(), expected.indices)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.uint16,
                                   torch.uint32, torch.uint64], ids=str)
@pytest.mark.parametrize("num_keys", [1, 2, 15, 16, 17, 255, 256, 257, 1023, 1024, 1025, 4000, 8192])
def test_stable_sort_equals_torch_sort(counted_sort, dtype, num_keys):
    """The small sort (kernels.stable_sort_kernel, one launch up to SMALL_SORT_MAX keys) gives
    torch.sort(stable=True)'s values and indices exactly, in every integer dtype the labels may
    have: many ties (kept in index order), the dtype's extremes, at sizes about the program and
    step blocks (interpreter 256 x 1024; GPU 16 x 1024, below) up to the limit."""
    assert num_keys <= triton_ekd.SMALL_SORT_MAX
    _assert_sorts_as_torch(_sort_keys(dtype, num_keys))
    assert counted_sort.launches == 1


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8], ids=str)
@pytest.mark.parametrize("num_keys", [17, 1025, 4000])
def test_stable_sort_in_the_gpus_blocks(monkeypatch, counted_sort, dtype, num_keys):
    """The same with the GPU's 16 keys a program (the interpreter's 256 otherwise)."""
    monkeypatch.setattr(triton_ekd, "INTERPRETER_SMALL_SORT_BLOCK_ROWS", triton_ekd.SMALL_SORT_BLOCK_ROWS)
    _assert_sorts_as_torch(_sort_keys(dtype, num_keys))
    assert counted_sort.launches == 1


def test_stable_sort_limit_strides_and_dtype(monkeypatch, counted_sort):
    """SMALL_SORT_MAX keys sort by the kernel, one more by torch.sort (the kernel not launched),
    with the same values and indices; a strided tensor sorts as its contiguous copy; float keys
    are refused (the kernel compares integers: NaN would not sort as torch.sort sorts it)."""
    keys = torch.randint(0, 50, (2 * 300,), generator=torch.Generator().manual_seed(1))[::2]
    monkeypatch.setattr(triton_ekd, "SMALL_SORT_MAX", 300)
    _assert_sorts_as_torch(keys)
    assert counted_sort.launches == 1
    monkeypatch.setattr(triton_ekd, "SMALL_SORT_MAX", 299)
    _assert_sorts_as_torch(keys)
    assert counted_sort.launches == 1
    with pytest.raises(TypeError, match="integer keys"):
        triton_ekd._stable_sort(torch.zeros(4, device=DEVICE))


@pytest.mark.parametrize("options", [dict(num_hard_negatives=500, compute_critical_ratio=True),
                                     dict(num_hard_negatives=5000)], ids=["hardest", "more_slots_than_negatives"])
def test_small_sort_bitwise_as_torch_sort(monkeypatch, counted_sort, options):
    """The labels and the backward's entries sorted by the kernel or by torch.sort
    (SMALL_SORT_MAX = 0, the A/B's) give the same bits of every output; with more slots than
    negatives the empty slots' entries tie, and keep their order.  (At the GPU's limit under the
    interpreter too: the 1000 and 8010 entries take the kernel.)"""
    student, teacher, labels = make_batch(90, 40, 24, 20, seed=13)
    labels = labels[torch.randperm(90, generator=torch.Generator().manual_seed(2)).to(DEVICE)] * 7 - 30  # unsorted
    kernel_sorted = _every_output(student, teacher, labels, **options)
    assert counted_sort.launches == 2  # the labels and the entries
    monkeypatch.setattr(triton_ekd, "SMALL_SORT_MAX", 0)
    torch_sorted = _every_output(student, teacher, labels, **options)
    assert counted_sort.launches == 2
    for index, (a, b) in enumerate(zip(kernel_sorted, torch_sorted)):
        assert (a is None and b is None) or torch.equal(a, b), f"output {index} differs between the sorts"


def test_pass1_windows_teacher_target_outside_its_window(monkeypatch, scratch_views):
    """Only the teacher's first target outside its window (its window moved to the last bucket
    after window_select_kernel placed it; every student window holds its target): a miss, decided
    on the teacher's targets alone, for the reference's results."""
    from ekd_kernels._triton import kernels

    monkeypatch.setattr(triton_ekd, "CUTOFF_MIN_BATCH", 0)
    monkeypatch.setattr(triton_ekd, "PASS1_WINDOWS", True)
    window_select = kernels.window_select_kernel

    class MovedTeacherWindow:  # window_select_kernel, then the teacher's first window moved
        __name__ = window_select.__name__

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                window_select[grid](*args, **kwargs)
                window = args[5]  # (2, targets, 2): [model, target] -> (lo, hi)
                window[1, 0] = 65535
            return launch

    monkeypatch.setattr(kernels, "window_select_kernel", MovedTeacherWindow())
    student, teacher, labels = make_batch(150, 20, 12, 30, seed=22)
    compare(student, teacher, labels, steps=1, num_hard_negatives=150)
    w32 = next(views for views in scratch_views if "window" in views)
    state = next(views["state"] for views in scratch_views if "state" in views).cpu()
    assert int(state[kernels.WINDOW_MISS.value]) == 1
    bucket, window = w32["bucket"].cpu(), w32["window"].cpu()
    assert all(window[0, t, 0] <= bucket[0, t] <= window[0, t, 1] for t in range(bucket.shape[1])), (bucket, window)
    assert bucket[1, 0] < 65535


@pytest.mark.parametrize("buffer", ["keys", "candidates"])
@pytest.mark.parametrize("room", [0, -1], ids=["exactly_full", "one_short"])
def test_pass1_windows_at_the_buffers_capacity(monkeypatch, scratch_views, buffer, room):
    """A window buffer (each model's keys, or the top-N candidates) of exactly its count holds it
    (a hit), one slot fewer does not (a miss: pass 2 recomputes the tiles, where the candidates of
    the boundary's bucket alone still fit, so the selection takes pass 2's candidates, not passes
    3 and 4): the reference's results either way."""
    from ekd_kernels._triton import kernels

    monkeypatch.setattr(triton_ekd, "CUTOFF_MIN_BATCH", 0)
    monkeypatch.setattr(triton_ekd, "PASS1_WINDOWS", True)
    student, teacher, labels = make_batch(150, 20, 12, 30, seed=22)
    with torch.no_grad():
        triton_loss(num_hard_negatives=150)(student, teacher, labels)
    w32 = next(views for views in scratch_views if "window" in views)
    if buffer == "keys":
        size = max(w32["window_count"].tolist()) + room
        monkeypatch.setattr(triton_ekd, "WINDOW_CAPACITY_RANGE", (size, size))
    else:
        size = int(w32["candidate_count"][1]) + room
        for name, value in (("MIN_CANDIDATE_CAPACITY", size), ("CANDIDATE_FACTOR", 0), ("WINDOW_CANDIDATE_FACTOR", 1)):
            monkeypatch.setattr(triton_ekd, name, value)
    scratch_views.clear()
    compare(student, teacher, labels, steps=1, num_hard_negatives=150)
    state = next(views["state"] for views in scratch_views if "state" in views).cpu()
    assert int(state[kernels.WINDOW_MISS.value]) == (room < 0)
    assert int(state[kernels.OVERFLOW.value]) == 0


@pytest.mark.parametrize("larger", [0, 1], ids=["student_overflows", "teacher_overflows"])
def test_pass1_windows_one_buffer_overflows(monkeypatch, scratch_views, larger):
    """A window buffer of exactly the smaller model's keys: only the other model's overflows,
    which must count as a miss on its own (pass 2 then recomputes the tiles) for the reference's
    results.  (Random selection: no top-N window; the batch's models swap places so that each
    holds the more keys once.)"""
    from ekd_kernels._triton import kernels

    monkeypatch.setattr(triton_ekd, "CUTOFF_MIN_BATCH", 0)
    monkeypatch.setattr(triton_ekd, "PASS1_WINDOWS", True)
    options = dict(negative_selection="random", num_hard_negatives=100, fprs=(0.2, 1e-3))
    student, teacher, labels = make_batch(150, 20, 12, 30, seed=22)
    if larger:
        student, teacher = teacher, student
    with torch.no_grad():
        triton_loss(**options)(student, teacher, labels, generator=torch.Generator().manual_seed(0))
    counts = next(views for views in scratch_views if "window" in views)["window_count"].tolist()
    assert counts[larger] > counts[1 - larger], counts
    monkeypatch.setattr(triton_ekd, "WINDOW_CAPACITY_RANGE", (counts[1 - larger],) * 2)
    scratch_views.clear()
    compare(student, teacher, labels, steps=1, **options)
    state = next(views["state"] for views in scratch_views if "state" in views).cpu()
    assert int(state[kernels.WINDOW_MISS.value]) == 1


def test_pass1_window_capacity():
    """Each model's window buffer: pairs / WINDOW_CAPACITY_DIVISOR keys within
    WINDOW_CAPACITY_RANGE (64 MiB of 32-bit keys a model at most)."""
    low, high = triton_ekd.WINDOW_CAPACITY_RANGE
    assert triton_ekd._window_capacity(10) == low
    assert triton_ekd._window_capacity(8192 * 8191 // 2) == 8192 * 8191 // 2 // triton_ekd.WINDOW_CAPACITY_DIVISOR
    assert triton_ekd._window_capacity(2**40) == high


def test_pass1_cutoff_fraction():
    """Where pass 1 counts in two parts: from CUTOFF_MIN_BATCH on, at twice the deepest target
    fraction (the largest FPR, or N over the pairs), and not when that passes one half."""
    fraction = triton_ekd._cutoff_fraction
    config = EKDConfig()
    assert fraction(triton_ekd.CUTOFF_MIN_BATCH - 1, config, True) is None
    assert fraction(8192, config, True) == pytest.approx(triton_ekd.CUTOFF_SAFETY * max(config.fprs))
    assert fraction(4096, EKDConfig(num_hard_negatives=10**6), True) == pytest.approx(2 * 10**6 / (4096 * 4095 // 2))
    assert fraction(4096, EKDConfig(num_hard_negatives=10**6), False) == pytest.approx(0.2)  # random selection
    assert fraction(4096, EKDConfig(num_hard_negatives=3 * 10**6), True) is None
    assert fraction(8192, EKDConfig(fprs=(0.3, 1e-4)), True) is None


@pytest.mark.parametrize("options", [dict(), dict(critical_only=True, rank_loss="eq7")], ids=["default", "critical"])
def test_backward_in_feature_chunks(monkeypatch, options):
    """A student wider than the backward's feature chunk (BACKWARD_MAX_BLOCK_D, 512 on a GPU) is
    taken in chunks: forced here to 16 with Ds = 40 (chunks of 16, 16 and a masked 8).  Against
    the reference, and against the one-chunk gradient, which may differ only in the rounding of
    the chunked <x, G> sum."""
    student, teacher, labels = make_batch(90, 40, 24, 20, seed=16)
    whole = run_ekd(triton_loss(**options), student, teacher, labels).grad
    monkeypatch.setattr(triton_ekd, "BACKWARD_MAX_BLOCK_D", 16)
    chunked = run_ekd(triton_loss(**options), student, teacher, labels).grad
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-9)
    compare(student, teacher, labels, steps=2, **options)


@pytest.fixture
def poisoned_buffers(monkeypatch):
    """Every buffer the backend's host code allocates without initialising (torch.empty /
    empty_like called from triton_ekd) starts as garbage: NaN, or -123456789 for integers. The
    kernels are meant to write or zero all they read; one that reads stale memory then changes
    the result (fresh CPU pages are zeros, which would hide it). Returns the poisoned count."""
    import sys

    poisoned = []

    def poisoning(allocate):
        def wrapper(*args, **kwargs):
            tensor = allocate(*args, **kwargs)
            if sys._getframe(1).f_globals.get("__name__") == triton_ekd.__name__ and tensor.numel():
                tensor.fill_(float("nan") if tensor.dtype.is_floating_point else -123456789)
                poisoned.append(tensor.dtype)
            return tensor
        return wrapper

    monkeypatch.setattr(torch, "empty", poisoning(torch.empty))
    monkeypatch.setattr(torch, "empty_like", poisoning(torch.empty_like))
    return poisoned


@pytest.mark.parametrize("options", [dict(num_hard_negatives=300), dict(critical_only=True, compute_critical_ratio=True),
                                     dict(negative_selection="random", num_hard_negatives=80), dict(rank_loss="eq7")],
                         ids=["default", "critical", "random", "eq7"])
def test_uninitialised_buffers_are_never_read(poisoned_buffers, top_n_path, options):
    student, teacher, labels = make_batch(70, 24, 16, 15, seed=21)
    compare(student, teacher, labels, steps=2, **options)
    assert len(poisoned_buffers) > 10  # the poison reached the backend's buffers


# --------------------------------------------------------------------------- determinism
def test_deterministic(top_n_path):
    student, teacher, labels = make_batch(90, 40, 24, 20, seed=11)
    student = torch.cat([student, student[:30]])  # ties at the top-N boundary
    teacher = torch.cat([teacher, teacher[:30]])
    labels = torch.cat([labels, labels[:30] + 1000])
    first, second = (run_ekd(ekd_loss, student, teacher, labels, backend="triton", num_hard_negatives=500,
                             compute_critical_ratio=True) for _ in range(2))
    assert torch.equal(first.result.loss, second.result.loss)
    assert torch.equal(first.grad, second.grad)
    assert torch.equal(first.result.student_thresholds, second.result.student_thresholds)
    assert torch.equal(first.result.teacher_thresholds, second.result.teacher_thresholds)


@pytest.mark.skipif(ON_GPU, reason="the interpreter's dot (numpy's matmul) only")
def test_similarities_do_not_depend_on_numpys_blas(monkeypatch):
    """Under the interpreter a pair's similarity has the same bits wherever it sits in a tile,
    whatever BLAS numpy's matmul uses: with np.matmul made to round entries by their place (one
    ulp down on odd rows; OpenBLAS's Haswell kernels round 42% of a 64 x 64 tile's entries
    differently when moved), the selected pairs, which rank_loss puts on a tile's
    diagonal, still read their thresholds as the passes that chose them (momentum 1: every
    threshold is a pair of the batch; test_thresholds_that_are_pairs_of_the_batch failed on
    such a CPU while the tiles went through tl.dot)."""
    import numpy as np

    matmul = np.matmul

    def by_place(a, b, *args, **kwargs):
        out = matmul(a, b, *args, **kwargs)
        if out.ndim == 2 and out.dtype == np.float32:  # one ulp down on odd rows
            odd = (np.arange(out.shape[0]) % 2 == 1)[:, None]
            out = np.where(odd, np.nextafter(out, np.float32(-np.inf)), out)
        return out

    monkeypatch.setattr(np, "matmul", by_place)
    batches = [make_batch(12, 7, 5, 12, seed=s) for s in range(16)]
    compare_with_reference("triton", batches, momentum=1.0, critical_only=True, compute_critical_ratio=True)


@pytest.mark.skipif(ON_GPU, reason="the interpreter's fast path (conftest.py) is for CPU runs")
def test_interpreter_patching_once_changes_nothing(monkeypatch):
    """conftest.py makes the interpreter patch triton.language once per module and launch:
    the same bits as its patching at every call, with far fewer patches."""
    from triton.runtime import interpreter

    patch_once = interpreter._patch_lang
    assert getattr(patch_once, "_ekd_once", False), "conftest.py's fast path is not installed"
    student, teacher, labels = make_batch(40, 24, 16, 10, seed=12)
    walks = []
    walk = patch_once.original

    def counted(fn):
        walks.append(fn)
        return walk(fn)

    def run():
        walks.clear()
        outcome = run_ekd(ekd_loss, student, teacher, labels, backend="triton", num_hard_negatives=300,
                          compute_critical_ratio=True)
        return outcome, len(walks)

    monkeypatch.setattr(patch_once, "original", counted)
    fast, fast_walks = run()
    monkeypatch.setattr(interpreter, "_patch_lang", counted)
    monkeypatch.setattr(interpreter.GridExecutor, "__call__", interpreter.GridExecutor.__call__.original)
    every_call, every_call_walks = run()
    assert torch.equal(fast.result.loss, every_call.result.loss)
    assert torch.equal(fast.grad, every_call.grad)
    assert torch.equal(fast.result.student_thresholds, every_call.result.student_thresholds)
    assert torch.equal(fast.result.teacher_thresholds, every_call.result.teacher_thresholds)
    assert torch.equal(fast.result.stats.critical_ratio, every_call.result.stats.critical_ratio)
    assert 0 < fast_walks * 10 < every_call_walks, (fast_walks, every_call_walks)


# --------------------------------------------------------------------------- torch.compile
def test_torch_compile_fullgraph():
    """A small model + EKD step compiles without a graph break (on CPU through the interpreter:
    the custom_op's fake implementation keeps the kernels out of tracing) and matches eager."""
    torch.manual_seed(0)
    batch = 32
    features = torch.randn(batch, 16, device=DEVICE)
    teacher = torch.randn(batch, 12, device=DEVICE)
    labels = torch.randint(0, 8, (batch,), device=DEVICE)

    def make():
        torch.manual_seed(1)
        return torch.nn.Linear(16, 10).to(DEVICE), EKDLoss(backend="triton", num_hard_negatives=100).to(DEVICE)

    def step(model, criterion):
        return criterion(model(features), teacher, labels)

    eager_model, eager_criterion = make()
    eager_loss = step(eager_model, eager_criterion)
    eager_loss.backward()
    compiled_model, compiled_criterion = make()
    # dynamo traces the forward (fullgraph: no break) and AOT autograd the backward.  On CPU the
    # aot_eager backend: inductor works there too but spends about a minute compiling C++.
    compiled = torch.compile(step, fullgraph=True, backend="inductor" if ON_GPU else "aot_eager")
    compiled_loss = compiled(compiled_model, compiled_criterion)
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(compiled_model.weight.grad, eager_model.weight.grad, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(compiled_criterion.student_thresholds, eager_criterion.student_thresholds)


def test_opcheck():
    """Schema, fake implementation, autograd registration and AOT dispatch (dynamic shapes)."""
    student, teacher, labels = make_batch(12, 8, 6, 4, seed=12)
    zeros = torch.zeros(6, device=DEVICE)
    args = (student.requires_grad_(True), teacher, labels, zeros, zeros, None, list(EKDConfig().fprs), 0.01, 2000,
            0.01, 0.02, 0.01, False, "soft_rank", False, True)
    torch.library.opcheck(triton_ekd._forward_op, args)


# --------------------------------------------------------------------------- native compilation
# Run in a fresh interpreter: triton fixes interpreter-or-native when its own modules load, so
# one process cannot hold both.  The script takes the real launch path of every kernel (the
# glue's own calls, forward and backward, fp32 and bf16, every variant) with a driver that answers
# as an H100 and launches turned into compile-only warm-ups: what the interpreter cannot check
# gets checked, i.e. Triton's compiler (types, loop-carried dtypes, returns), the exact
# specialisations the glue asks for, and the checks Triton makes at every launch (a NaN global
# once failed them on every call).
_LAUNCH_SCRIPT = r"""
import json
import re
import sys

import torch
from triton.runtime.jit import JITFunction

sys.path.insert(0, sys.argv[1])  # tools/
import sm90_stand_in

launched, normalise_ttir = {}, []


def record(function, kernel):
    launched.setdefault(function.__name__, []).append(kernel.asm["ptx"])
    if function.__name__ == "normalise_kernel":
        normalise_ttir.append(kernel.asm["ttir"])


# CPU tensors: nothing runs, every launch compiles
real_run = sm90_stand_in.compile_launches(record)

from ekd_kernels import ekd_loss, triton_ekd
from ekd_kernels._triton.launch import LaunchCache, launches


def exercise():
    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for options in (dict(), dict(critical_only=True, compute_critical_ratio=True, rank_loss="eq7"),
                        dict(negative_selection="random", rank_loss="eq8")):
            student = torch.randn(300, 64, generator=generator).to(dtype).requires_grad_(True)
            teacher = torch.randn(300, 48, generator=generator).to(dtype)
            labels = torch.randint(0, 60, (300,), generator=generator)
            result = ekd_loss(student, teacher, labels, backend="triton", generator=torch.Generator().manual_seed(1),
                              **options)
            result.loss.backward()
    # pass 1 in several histogram copies (the large-B variant: num_copies > 1 is not specialised to 1)
    default_tiles_per_copy, triton_ekd.COARSE_TILES_PER_COPY = triton_ekd.COARSE_TILES_PER_COPY, 1
    ekd_loss(student.detach().requires_grad_(True), teacher, labels, backend="triton").loss.backward()
    triton_ekd.COARSE_TILES_PER_COPY = default_tiles_per_copy
    # the backward's per-row kernel in the shape of larger batches (16-row programs walking one
    # entry a step; B = 300 takes the small-B shape above)
    default_small_backward, triton_ekd.SMALL_BACKWARD_MAX_BATCH = triton_ekd.SMALL_BACKWARD_MAX_BATCH, 0
    ekd_loss(student.detach().requires_grad_(True), teacher, labels, backend="triton").loss.backward()
    triton_ekd.SMALL_BACKWARD_MAX_BATCH = default_small_backward
    # pass 1 in two parts, in copies, as at large B (the probe, the cutoff, the head and tail launches
    # and coarse_select's two cutoff modes), in both dtypes' dot precisions
    default_min_batch, triton_ekd.CUTOFF_MIN_BATCH = triton_ekd.CUTOFF_MIN_BATCH, 0
    triton_ekd.COARSE_TILES_PER_COPY = 1
    for dtype in (torch.float32, torch.bfloat16):
        ekd_loss(student.detach().to(dtype).requires_grad_(True), teacher.to(dtype), labels,
                 backend="triton").loss.backward()
    # and with pass 1's windows (their select, the window buffers, pass 2 from them), the hardest
    # negatives and the random selection
    triton_ekd.PASS1_WINDOWS = True
    for dtype in (torch.float32, torch.bfloat16):
        for options in (dict(), dict(negative_selection="random")):
            ekd_loss(student.detach().to(dtype).requires_grad_(True), teacher.to(dtype), labels, backend="triton",
                     generator=torch.Generator().manual_seed(1), **options).loss.backward()
    triton_ekd.PASS1_WINDOWS = False
    triton_ekd.CUTOFF_MIN_BATCH, triton_ekd.COARSE_TILES_PER_COPY = default_min_batch, default_tiles_per_copy
    # the same shapes as views: expanded (stride 0), transposed, and 4 bytes off the allocation
    launched["normalise_kernel"].clear()
    for make in (lambda r, c: torch.randn(r, c), lambda r, c: torch.randn(1, c).expand(r, c),
                 lambda r, c: torch.randn(c, r).t(), lambda r, c: torch.randn(r * c + 1)[1:].view(r, c)):
        ekd_loss(make(300, 64).requires_grad_(True), make(300, 48), labels, backend="triton").loss.backward()


exercise()
# (the induction variable's type of normalise_kernel's zeroing loop, "scf.for %start = %5 to %8 step %7 : i64":
# its one loop whose step is no constant, %c128_i32 say; Triton 3.2 names the variable %argN)
zero_loops = sorted({loop for ttir in normalise_ttir
                     for loop in re.findall(r"scf\.for %\w+ = %\w+ to %\w+ step %(?!c)\w+\s*: (i\d+)", ttir)})
report = {"fma": {name: ["fma.rn.f32" in ptx for ptx in ptxs] for name, ptxs in launched.items()},
          "normalise_variants": len(set(launched["normalise_kernel"])), "zero_loops": zero_loops}
if not launches.enabled:  # a Triton without triton.knobs (< 3.3): no cache, every launch through JITFunction.run
    json.dump(report, sys.stdout)
    sys.exit(0)

# The launch cache (ekd_kernels/_triton/launch.py) against JITFunction.run: every launch again,
# the compiled kernels' launchers replaced by a counter (nothing runs), each hit checked against
# what JITFunction.run passes the launcher (verify_hits: a difference raises LaunchMismatch).
JITFunction.run = real_run
launcher_calls = [0]


def launcher(*args):
    launcher_calls[0] += 1


kernels = triton_ekd._kernels()
sm90_stand_in.stub_launchers(sm90_stand_in.jit_functions(kernels), lambda compiled: launcher)
calls = [0]
launch = LaunchCache.launch


def counted(self, *args):
    calls[0] += 1
    return launch(self, *args)


LaunchCache.launch = counted
launches.clear()
launches.verify_hits = True
exercise()  # (each key's first launch notes its compiled kernel, the second is checked)
exercise()
first = dict(calls=calls[0], hits=launches.hits, launcher_calls=launcher_calls[0])
exercise()
# (a key: device, the two debug flags, the instrumentation mode, then the student's dtype and
# alignment, ...)
misaligned = sum(key[5] is False for key in launches.entries(kernels.normalise_kernel))
report["launch_cache"] = dict(first=first, calls=calls[0], hits=launches.hits, launcher_calls=launcher_calls[0],
                              disabled=launches.disabled_kernels(), normalise_misaligned=misaligned)
json.dump(report, sys.stdout)
"""

ALL_KERNELS = {"stable_sort_kernel", "normalise_kernel", "probe_histogram_kernel", "cutoff_select_kernel", "window_select_kernel",
               "coarse_histogram_kernel", "coarse_histogram_windows_kernel", "window_histogram_kernel",
               "coarse_select_kernel", "fine_histogram_kernel",
               "fine_select_kernel", "boundary_count_kernel", "hardest_negatives_kernel", "rank_loss_kernel",
               "finalize_kernel", "positive_backward_kernel", "backward_rows_kernel"}


def _sm90_report(compile_):
    """The JSON report of a compile script (sm90_compiles), its failure shown, or a skip where
    this triton has no ptxas to compile with."""
    import json

    returncode, stdout, stderr = compile_.result()
    last_line = (stderr.strip().splitlines() or [""])[-1]
    if "ptxas" in stderr and ("not found" in stderr or "No such file" in stderr):
        pytest.skip(f"no ptxas for an sm_90 compile: {last_line}")
    assert returncode == 0, stderr[-4000:]
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.skipif(ON_GPU, reason="on a GPU every kernel is compiled and run natively by the other tests")
def test_every_launch_compiles_for_sm90(sm90_compiles):
    """Every kernel launch of the glue compiles for an H100 (sm_90, with the bundled ptxas)
    without a GPU, and passes Triton's launch-time checks; the EMA kernel has no fused
    multiply-add (the reference's operation order), and the normalisation compiles to one
    program whatever the input's strides and alignment (so views sum their norms in the order
    of contiguous copies, bitwise)."""
    report = _sm90_report(sm90_compiles["test_every_launch_compiles_for_sm90"])
    assert set(report["fma"]) == ALL_KERNELS
    assert not any(report["fma"]["fine_select_kernel"])
    assert report["normalise_variants"] == 1
    # the zeroing loop counts in int64: near MAX_BATCH a start plus its step, 2 * programs *
    # ZERO_BLOCK, passes 2^31, where an int32 start wrapped negative and zeroed memory below the buffer
    assert report["zero_loops"] == ["i64"]
    # The launch cache, checked against JITFunction.run at every hit (LaunchMismatch otherwise):
    # every kernel passed its check, each launch called the launcher once, and after two rounds
    # the third was hits only; the 4-bytes-off inputs took entries of their own (their compiled
    # kernel is the aligned inputs' one: normalise_kernel does not specialise on their alignment).
    import triton

    if not hasattr(triton, "knobs"):  # (Triton < 3.3: the cache is off, test_launch_cache.py)
        assert "launch_cache" not in report
        return
    cache = report["launch_cache"]
    assert cache["disabled"] == []
    assert cache["launcher_calls"] == cache["calls"] == 3 * cache["first"]["calls"] // 2
    assert cache["first"]["launcher_calls"] == cache["first"]["calls"] > 0
    assert cache["hits"] - cache["first"]["hits"] == cache["first"]["calls"] // 2
    assert cache["normalise_misaligned"] >= 1


# The GPU lease's A/B variants of triton_ekd.LAUNCH_OPTIONS (tools/gpu_exercise.py LAUNCH_VARIANTS),
# each compiled for sm_90 as above: per variant and kernel, the (num_warps, .maxnreg) pairs its
# launches compiled with (the PTX's .maxnreg directive is what ptxas obeys).
_LAUNCH_OPTIONS_SCRIPT = r"""
import json
import re
import sys

import torch

sys.path.insert(0, sys.argv[1])  # tools/
import sm90_stand_in
from gpu_exercise import FORCED_TRITON_PATHS, LAUNCH_VARIANTS, triton_settings

compiled = {}


def record(function, kernel):
    cap = re.search(r"\.maxnreg\s+(\d+)", kernel.asm["ptx"])
    compiled[variant].setdefault(function.__name__, set()).add((kernel.metadata.num_warps, cap and int(cap.group(1))))


sm90_stand_in.compile_launches(record)  # CPU tensors: nothing runs, every launch compiles
from ekd_kernels import ekd_loss, triton_ekd

variants = {"shipped": triton_ekd.LAUNCH_OPTIONS, **LAUNCH_VARIANTS}
generator = torch.Generator().manual_seed(0)
student, teacher = torch.randn(300, 64, generator=generator), torch.randn(300, 48, generator=generator)
labels = torch.randint(0, 60, (300,), generator=generator)
for variant, options in variants.items():
    compiled[variant] = {}
    # fp32 at a small B, and bf16 with the large-B pass 1 forced (probe, cutoff, head and tail)
    # and its windows (their select, and pass 2 from the window buffers)
    for dtype, forced in ((torch.float32, {}), (torch.bfloat16, FORCED_TRITON_PATHS["copies+windows"])):
        with triton_settings(LAUNCH_OPTIONS=options, **forced):
            leaf = student.to(dtype).requires_grad_(True)
            ekd_loss(leaf, teacher.to(dtype), labels, backend="triton").loss.backward()
print(json.dumps({"variants": {v: {k: sorted(s) for k, s in kernels.items()} for v, kernels in compiled.items()},
                  "options": variants}))
"""

#: The compile checks' scripts, by test name: sm90_compiles starts those of the selected tests.
_SM90_SCRIPTS = {"test_every_launch_compiles_for_sm90": _LAUNCH_SCRIPT,
                 "test_launch_variants_compile_for_sm90_with_their_options": _LAUNCH_OPTIONS_SCRIPT}


@pytest.mark.skipif(ON_GPU, reason="compile-only check for machines without a GPU (a GPU runs the settings)")
def test_launch_variants_compile_for_sm90_with_their_options(sm90_compiles):
    """The shipped launch options (triton_ekd.LAUNCH_OPTIONS) and every A/B variant that the GPU
    lease measures compile for an H100 (sm_90) and reach the compiled kernels: the named kernels
    with their warps and register cap, every other kernel with Triton's defaults (4 warps, no
    cap); no option names a kernel that does not exist."""
    report = _sm90_report(sm90_compiles["test_launch_variants_compile_for_sm90_with_their_options"])
    assert report["options"]["shipped"] == triton_ekd.LAUNCH_OPTIONS and len(report["options"]) > 1
    for variant, kernels in report["variants"].items():
        options = report["options"].get(variant, {})
        assert set(kernels) == ALL_KERNELS, variant
        assert set(options) <= ALL_KERNELS, variant  # no option for a kernel that does not exist
        for name, settings in kernels.items():
            wanted = options.get(name, {})
            assert settings == [[wanted.get("num_warps", 4), wanted.get("maxnreg")]], (variant, name)


# --------------------------------------------------------------------------- availability
def test_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in triton_ekd.unavailable_reason(torch.device("cpu"))


def test_without_triton(monkeypatch):
    monkeypatch.setattr(triton_ekd, "triton", None)  # what a failed `import triton` leaves
    assert triton_ekd.unavailable_reason(DEVICE) == "triton is not installed"


# --------------------------------------------------------------------------- launch cache (GPU)
@pytest.mark.skipif(not ON_GPU, reason="the launch cache serves compiled kernels, on a GPU; without one "
                                       "test_launch_cache.py and the sm_90 compile check run it on the stand-in")
@pytest.mark.parametrize("options", [dict(), dict(critical_only=True, compute_critical_ratio=True, rank_loss="eq7"),
                                     dict(negative_selection="random", rank_loss="eq8")])
def test_launch_cache_on_the_gpu(options):
    """Real launches (ekd_kernels/_triton/launch.py): with the cache the call gives the bits it
    gives through JITFunction.run at every launch, and in verify mode every hit is the launch
    JITFunction.run makes (LaunchMismatch otherwise); every kernel passes its check."""
    from ekd_kernels._triton.launch import launches

    student, teacher, labels = make_batch(300, 64, 48, 60, seed=15)

    def call():
        crit = triton_loss(num_hard_negatives=500, **options)
        got = run_ekd(crit, student, teacher, labels, generator=torch.Generator().manual_seed(3))
        return [got.result.loss, got.grad, got.result.student_thresholds, got.result.teacher_thresholds]

    try:
        launches.clear()
        launches.enabled = False
        want = call()
        launches.enabled = True
        first = call()  # each key's first launch (through JITFunction.run) notes its compiled kernel
        second = call()  # the second is checked against a hit's launch
        assert launches.hits == 0 and launches.disabled_kernels() == []
        launches.verify_hits = True
        checked = call()  # every launch a hit, each compared with JITFunction.run's
        assert launches.hits >= 8
        launches.verify_hits = False
        hits = launches.hits
        fast = call()
        assert launches.hits - hits == hits
    finally:
        launches.enabled, launches.verify_hits = True, False
    for got in (first, second, checked, fast):
        for a, b in zip(got, want):
            assert torch.equal(a, b)


# --------------------------------------------------------------------------- host syncs (GPU)
@pytest.mark.skipif(not ON_GPU, reason="host-synchronisation check needs a CUDA GPU")
@pytest.mark.parametrize("options", [dict(), dict(critical_only=True, compute_critical_ratio=True)])
def test_no_host_synchronisation(options):
    student, teacher, labels = make_batch(300, 64, 48, 60, seed=14)
    student.requires_grad_(True)
    config = EKDConfig(num_hard_negatives=1000, **options)
    thresholds = (torch.zeros(6, device=DEVICE),) * 2
    ekd_loss(student, teacher, labels, *thresholds, config=config, backend="triton").loss.backward()  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        result = ekd_loss(student, teacher, labels, *thresholds, config=config, backend="triton")
        result.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# --------------------------------------------------------------------------- memory (GPU)
@pytest.mark.skipif(not ON_GPU, reason="peak-memory test needs a CUDA GPU (the interpreter has no device memory)")
def test_memory_stays_linear():
    batch, dim = 8192, 512
    student, teacher, labels = make_batch(batch, dim, dim, batch // 4, seed=13)
    student.requires_grad_(True)
    criterion = EKDLoss(backend="triton").to(DEVICE)
    criterion(student, teacher, labels).backward()  # warm-up: compile the kernels
    student.grad = None
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    criterion(student, teacher, labels).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - baseline
    assert extra < 128 * 2**20, f"peak extra memory {extra / 2**20:.1f} MiB at B={batch}, D={dim}"


# --------------------------------------------------------------------------- malformed raw-op arguments
# torch.ops.ekd_kernels.triton_ekd_forward / triton_ekd_backward are public: called directly with
# a malformed argument they must refuse it (ValueError naming it) rather than hand a kernel an
# index past a buffer.  Each case corrupts one argument of a valid call (what ekd_forward and the
# autograd backward pass).  Shapes, dtypes and devices are checked everywhere, in the fake
# implementations too; the values that index memory (random_pairs, order, the selected pairs)
# only for CPU tensors (on CUDA that would be a host synchronisation).
_RAW_FPRS = [0.1, 0.01, 1e-3, 1e-4, 1e-5, 1e-6]
_RAW_BATCH = 8
_FORWARD_NAMES = ["student", "teacher", "labels", "student_thresholds", "teacher_thresholds", "random_pairs", "fprs",
                  "temperature", "num_hard_negatives", "momentum", "positive_weight", "negative_weight",
                  "critical_only", "rank_loss", "compute_critical_ratio", "update_thresholds"]
_BACKWARD_NAMES = ["grad_loss", "s_sorted", "t_sorted", "sorted_labels", "order", "s_inv", "t_inv",
                   "thresholds_used", "positive_coefficient", "selected_rows", "selected_cols",
                   "selected_coefficient", "gram", "temperature", "critical_only", "rank_loss"]
_OTHER_DEVICE = "cpu" if ON_GPU else "meta"


@pytest.fixture(scope="module")
def raw_calls():
    """A valid call of each op (B = 8, 24 negatives in 28 slots: 4 unfilled), the backward's
    arguments taken from the forward's outputs as the autograd backward takes them."""
    student, teacher, _ = helpers.make_batch(_RAW_BATCH, 4, 5, seed=31, device=DEVICE)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3], device=DEVICE)
    zeros = torch.zeros(6, device=DEVICE)
    forward = dict(zip(_FORWARD_NAMES, (student, teacher, labels, zeros, zeros.clone(), None, _RAW_FPRS, 0.01, 2000,
                                        0.01, 0.02, 0.01, False, "soft_rank", False, True)))
    outputs = torch.ops.ekd_kernels.triton_ekd_forward(*forward.values())
    saved = [t for part in triton_ekd._SAVED_OUTPUTS for t in outputs[part]]
    backward = dict(zip(_BACKWARD_NAMES, [torch.ones((), device=DEVICE), *saved, 0.01, False, "soft_rank"]))
    random_pairs = triton_ekd._random_negative_pairs(labels, 10, torch.Generator().manual_seed(0))
    return forward, outputs, backward, random_pairs


def _change(**changes):
    """A corruption: each keyword maps an argument name to a function of the valid arguments."""
    return lambda a: {**a, **{name: fn(a) for name, fn in changes.items()}}


def _with_random_pairs(fn):
    return lambda a, pairs: {**a, "random_pairs": fn(pairs)}


def _set_element(tensor, index, value):
    tensor = tensor.clone()
    tensor[index] = value
    return tensor


_F = lambda name, fn: _change(**{name: lambda a: fn(a[name])})  # noqa: E731  one argument, mapped
# name: (corruption of the forward's arguments, the argument the message names)
_TRITON_FORWARD_CASES = {
    "labels_short": (_F("labels", lambda x: x[:3]), "labels"),
    "labels_long": (_F("labels", lambda x: torch.arange(100, device=x.device)), "labels"),
    "labels_float": (_F("labels", lambda x: x.float()), "labels"),
    "labels_bool": (_F("labels", lambda x: x > 1), "labels"),
    "labels_2d": (_F("labels", lambda x: x[:, None]), "labels"),
    "teacher_fewer_rows": (_F("teacher", lambda x: x[:3].clone()), "teacher"),
    "teacher_1d": (_F("teacher", lambda x: x[0]), "teacher"),
    "teacher_fp64": (_F("teacher", lambda x: x.double()), "teacher"),
    "student_fp64": (_change(student=lambda a: a["student"].double(), teacher=lambda a: a["teacher"].double()),
                     "student"),
    "student_int": (_F("student", lambda x: x.long()), "student"),
    "student_1d": (_F("student", lambda x: x[0]), "student"),
    "student_one_row": (_change(student=lambda a: a["student"][:1], teacher=lambda a: a["teacher"][:1],
                                labels=lambda a: a["labels"][:1]), "student"),
    "student_no_columns": (_F("student", lambda x: x[:, :0]), "student"),
    "student_thresholds_short": (_F("student_thresholds", lambda x: x[:2].clone()), "student_thresholds"),
    "student_thresholds_2d": (_F("student_thresholds", lambda x: x[None]), "student_thresholds"),
    "student_thresholds_int": (_F("student_thresholds", lambda x: x.long()), "student_thresholds"),
    "teacher_thresholds_short": (_F("teacher_thresholds", lambda x: x[:2].clone()), "teacher_thresholds"),
    "random_pairs_1d": (_F("random_pairs", lambda x: x[0]), "random_pairs"),
    "random_pairs_3_rows": (_F("random_pairs", lambda x: torch.cat([x, x[:1]])), "random_pairs"),
    "random_pairs_int32": (_F("random_pairs", lambda x: x.int()), "random_pairs"),
    "random_pairs_too_many": (_F("random_pairs", lambda x: x.new_zeros(2, 29)), "random_pairs"),
}
# Values that index memory: refused for CPU tensors (corruptions of a valid random_pairs).
_TRITON_FORWARD_VALUE_CASES = {
    "random_pairs_index_eq_B": lambda p: _set_element(p, (1, 0), _RAW_BATCH),
    "random_pairs_index_big": lambda p: _set_element(p, (0, -1), 10**6),
    "random_pairs_negative": lambda p: _set_element(p, (0, 2), -1),
}
_TRITON_BACKWARD_CASES = {
    "grad_loss_empty": (_F("grad_loss", lambda x: x.new_empty(0)), "grad_loss"),
    "grad_loss_int": (_F("grad_loss", lambda x: x.long()), "grad_loss"),
    "s_sorted_1d": (_F("s_sorted", lambda x: x[0]), "s_sorted"),
    "s_sorted_fp64": (_F("s_sorted", lambda x: x.double()), "s_sorted"),
    "t_sorted_fewer_rows": (_F("t_sorted", lambda x: x[:3]), "t_sorted"),
    "t_sorted_int": (_F("t_sorted", lambda x: x.long()), "t_sorted"),
    "sorted_labels_short": (_F("sorted_labels", lambda x: x[:3]), "sorted_labels"),
    "sorted_labels_float": (_F("sorted_labels", lambda x: x.float()), "sorted_labels"),
    "order_short": (_F("order", lambda x: x[:2].clone()), "order"),  # the probe's segfault
    "order_int32": (_F("order", lambda x: x.int()), "order"),
    "s_inv_short": (_F("s_inv", lambda x: x[:2].clone()), "s_inv"),
    "s_inv_fp64": (_F("s_inv", lambda x: x.double()), "s_inv"),
    "t_inv_short": (_F("t_inv", lambda x: x[:2].clone()), "t_inv"),
    "thresholds_used_1d": (_F("thresholds_used", lambda x: x[0]), "thresholds_used"),
    "thresholds_used_3_rows": (_F("thresholds_used", lambda x: torch.cat([x, x[:1]])), "thresholds_used"),
    "thresholds_used_fp64": (_F("thresholds_used", lambda x: x.double()), "thresholds_used"),
    "positive_coefficient_empty": (_F("positive_coefficient", lambda x: x.new_empty(0)), "positive_coefficient"),
    "selected_rows_2d": (_F("selected_rows", lambda x: x[None]), "selected_rows"),
    "selected_rows_int32": (_F("selected_rows", lambda x: x.int()), "selected_rows"),
    "selected_rows_too_many": (_change(**{name: (lambda n: lambda a: torch.cat([a[n], a[n][:1]]))(name) for name in
                                          ("selected_rows", "selected_cols", "selected_coefficient")}),
                               "selected_rows"),
    "selected_cols_short": (_F("selected_cols", lambda x: x[:3]), "selected_cols"),
    "selected_coefficient_short": (_F("selected_coefficient", lambda x: x[:3]), "selected_coefficient"),
    "selected_coefficient_fp64": (_F("selected_coefficient", lambda x: x.double()), "selected_coefficient"),
    "gram_1d": (_F("gram", lambda x: x[0]), "gram"),
    "gram_3_rows": (_F("gram", lambda x: torch.cat([x, x[:1]])), "gram"),
    "gram_other_size": (_F("gram", lambda x: x.new_zeros(2, x.shape[1] + 4)), "gram"),
    "gram_empty": (_F("gram", lambda x: x.new_zeros(2, 0)), "gram"),
    "gram_fp64": (_F("gram", lambda x: x.double()), "gram"),
    "rank_loss_bogus": (_change(rank_loss=lambda a: "bogus"), "rank_loss"),
    "temperature_0": (_change(temperature=lambda a: 0.0), "temperature"),
}
_TRITON_BACKWARD_VALUE_CASES = {
    "order_out_of_range": (_F("order", lambda x: _set_element(x, 0, 10**6)), "order"),
    "order_negative": (_F("order", lambda x: _set_element(x, 3, -1)), "order"),
    "order_duplicate": (_F("order", lambda x: _set_element(x, 0, x[1])), "order"),
    "sorted_labels_unsorted": (_F("sorted_labels", lambda x: x.flip(0)), "sorted_labels"),
    "selected_rows_out_of_range": (_F("selected_rows", lambda x: torch.full_like(x, 10**6)), "selected_rows"),
    "selected_cols_negative": (_F("selected_cols", lambda x: torch.full_like(x, -7)), "selected_cols"),
    "selected_col_unfilled_with_a_row": (_F("selected_cols", lambda x: _set_element(x, 0, _RAW_BATCH)),
                                         "selected_cols"),
    "selected_row_unfilled_with_a_col": (_F("selected_rows", lambda x: _set_element(x, -1, 0)), "selected_rows"),
}
_TRITON_FORWARD_TENSORS = ["teacher", "labels", "student_thresholds", "teacher_thresholds", "random_pairs"]
_TRITON_BACKWARD_TENSORS = [name for name in _BACKWARD_NAMES[:13] if name != "s_sorted"]


def _raw_forward(args):
    return torch.ops.ekd_kernels.triton_ekd_forward(*args.values())


def _raw_backward(args):
    return torch.ops.ekd_kernels.triton_ekd_backward(*args.values())


def _to_meta(args):
    return {name: x.to("meta") if isinstance(x, torch.Tensor) else x for name, x in args.items()}


def test_raw_ops_valid_calls_match_the_wrapper(raw_calls):
    """The checks pass the forward's own outputs (unfilled slots included) and the reference's
    random pairs, and change nothing: the raw ops give what the autograd path gives."""
    forward, outputs, backward, random_pairs = raw_calls
    assert bool((backward["selected_rows"] == _RAW_BATCH).any()), "the valid call should hold unfilled slots"
    leaf = forward["student"].detach().clone().requires_grad_(True)
    config = EKDConfig(fprs=tuple(_RAW_FPRS), num_hard_negatives=2000)
    result = triton_ekd.ekd_forward(leaf, forward["teacher"], forward["labels"], forward["student_thresholds"],
                                    forward["teacher_thresholds"], config)
    (expected,) = torch.autograd.grad(result.loss, leaf)
    assert torch.equal(outputs[0], result.loss.detach())
    assert torch.equal(_raw_backward(backward), expected)
    with_random = _raw_forward({**forward, "random_pairs": random_pairs, "num_hard_negatives": 10})
    order = with_random[7]
    position = torch.empty_like(order)
    position[order] = torch.arange(_RAW_BATCH, device=order.device)
    assert torch.equal(with_random[12], position[random_pairs[0]])  # the pairs, in label-sorted rows
    assert torch.equal(with_random[13], position[random_pairs[1]])


def test_raw_backward_refuses_a_gram_cache_past_32_bit_indexing():
    """The kernels index a Gram cache in 32 bits; past B ~ 65500 its size would pass 2^31, the
    forward keeps none there (whatever GRAM_CACHE_MAX_BATCH says), and the backward op refuses one
    of that size, naming gram, rather than read past it (meta tensors: the fake implementation's
    checks, no memory).  The spare width stays accepted."""
    batch = 66000
    assert triton_ekd._gram_size(batch) >= 2**31 and triton_ekd._gram_tiles(batch) == 0
    meta = dict(device="meta")
    index = dict(dtype=torch.int64, **meta)
    args = [torch.empty((), **meta), torch.empty(batch, 4, **meta), torch.empty(batch, 5, **meta),
            torch.empty(batch, **index), torch.empty(batch, **index), torch.empty(batch, **meta),
            torch.empty(batch, **meta), torch.empty(2, 6, **meta), torch.empty((), **meta), torch.empty(10, **index),
            torch.empty(10, **index), torch.empty(10, **meta), torch.empty(2, triton_ekd._gram_size(batch), **meta),
            0.01, False, "soft_rank"]
    with pytest.raises(ValueError, match=r"\bgram\b"):
        torch.ops.ekd_kernels.triton_ekd_backward(*args)
    args[12] = torch.empty(2, triton_ekd.NO_GRAM, **meta)
    assert torch.ops.ekd_kernels.triton_ekd_backward(*args).shape == (batch, 4)


def test_raw_forward_backward_through_another_output_than_the_loss(raw_calls):
    """Autograd hands the backward no zero gradients for the outputs that carry none
    (set_materialize_grads(False)): a backward started from another output (the new EMA state)
    reaches it with no loss gradient, and the student's gradient is zero, as the SPEC's
    thresholds carry none, rather than an error or garbage."""
    forward = dict(raw_calls[0])
    forward["student"] = forward["student"].detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(_raw_forward(forward)[1].sum(), forward["student"])
    assert torch.equal(grad, torch.zeros_like(grad))


def _refused_by_op_and_fake(call, corrupt, args, name):
    """`call` refuses the corrupted arguments naming `name`, on real tensors and on meta ones
    (the fake implementation checks the same shapes and dtypes)."""
    for given in (args, _to_meta(args)):
        with pytest.raises(ValueError, match=rf"\b{name}\b"):
            call(corrupt(given))


@pytest.mark.parametrize("case", list(_TRITON_FORWARD_CASES))
def test_raw_forward_refuses_malformed_argument(raw_calls, case):
    corrupt, name = _TRITON_FORWARD_CASES[case]
    forward, _, _, random_pairs = raw_calls
    args = {**forward, "random_pairs": random_pairs} if name == "random_pairs" else forward
    _refused_by_op_and_fake(_raw_forward, corrupt, args, name)


@pytest.mark.skipif(ON_GPU, reason="index values are checked for CPU tensors only (on CUDA it would sync)")
@pytest.mark.parametrize("case", list(_TRITON_FORWARD_VALUE_CASES))
def test_raw_forward_refuses_random_pair_out_of_range(raw_calls, case):
    forward, _, _, random_pairs = raw_calls
    pairs = _TRITON_FORWARD_VALUE_CASES[case](random_pairs)
    with pytest.raises(ValueError, match=r"\brandom_pairs\b.*\[0, B"):
        _raw_forward({**forward, "random_pairs": pairs, "num_hard_negatives": 10})


@pytest.mark.parametrize("name", _TRITON_FORWARD_TENSORS)
def test_raw_forward_refuses_argument_on_another_device(raw_calls, name):
    forward, _, _, random_pairs = raw_calls
    args = {**forward, "random_pairs": random_pairs}
    args[name] = args[name].to(_OTHER_DEVICE)
    with pytest.raises(ValueError, match=rf"\b{name}\b.*device"):
        _raw_forward(args)


@pytest.mark.parametrize("case", list(_TRITON_BACKWARD_CASES))
def test_raw_backward_refuses_malformed_argument(raw_calls, case):
    corrupt, name = _TRITON_BACKWARD_CASES[case]
    _refused_by_op_and_fake(_raw_backward, corrupt, raw_calls[2], name)


@pytest.mark.skipif(ON_GPU, reason="index values are checked for CPU tensors only (on CUDA it would sync)")
@pytest.mark.parametrize("case", list(_TRITON_BACKWARD_VALUE_CASES))
def test_raw_backward_refuses_index_out_of_range(raw_calls, case):
    corrupt, name = _TRITON_BACKWARD_VALUE_CASES[case]
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        _raw_backward(corrupt(raw_calls[2]))


@pytest.mark.parametrize("name", _TRITON_BACKWARD_TENSORS)
def test_raw_backward_refuses_argument_on_another_device(raw_calls, name):
    backward = dict(raw_calls[2])
    backward[name] = backward[name].to(_OTHER_DEVICE)
    with pytest.raises(ValueError, match=rf"\b{name}\b.*device"):
        _raw_backward(backward)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("setting", ["tf32", "foo"])
def test_fp32_precision_setting_is_checked_in_the_forward_whatever_the_dtype(monkeypatch, dtype, setting):
    """EKD_TRITON_FP32_PRECISION picks the fp32 dots' input_precision; plain tf32 is not accurate
    enough.  A 16-bit batch's backward has fp32 dots too (the gradient's): before, its forward did
    not check the setting, so tf32 ran there silently and a misspelt value failed inside Triton's
    compiler at the first backward.  Refused in the forward now, for every dtype."""
    monkeypatch.setattr(triton_ekd, "FP32_DOT_PRECISION", setting)
    student, teacher, labels = make_batch(40, seed=0)
    with pytest.raises(ValueError, match=f"EKD_TRITON_FP32_PRECISION must be 'tf32x3' or 'ieee'.*got '{setting}'"):
        ekd_loss(student.to(dtype).requires_grad_(True), teacher.to(dtype), labels, backend="triton")
