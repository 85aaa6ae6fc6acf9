"""Large global batches (up to B = 131072 = 2^17): every backend is exact or refuses.

Quantities that grow with B and can pass a 32-bit range or a launch limit: the pair count
L ~ B^2 / 2 (2^31 at B = 65537), histogram bins (one bin can hold nearly every pair when the
embeddings collapse, e.g. early in training with all similarities near 1), prefix sums over
ties, launch grids, and the CPU op's B x B buffer.  Such batches cannot run here (no GPU, the
Triton interpreter is slow), so each fix is exercised where it lives: small kernels called with
synthetic counts past 2^31, the launch-grid arithmetic at B = 131072 without launching, the
int64 histogram path forced at a small B, and the entry checks with expanded (stride-0) inputs
that cost no memory.  tools/gpu_exercise.py's "large" stage runs B = 46341, 65536 and 65537 on a
GPU.
"""

import os

import pytest
import torch

# conftest.py has set TRITON_INTERPRET=1 on a machine without a GPU before this module loads.
from ekd_kernels import EKDConfig, ekd_loss
from ekd_kernels import csrc_ops, reference, triton_ekd
from ekd_kernels.config import fpr_fraction
from ekd_kernels.validation import check_batch_limit
import helpers

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
_TRITON_REASON = triton_ekd.unavailable_reason(DEVICE)
needs_triton = pytest.mark.skipif(_TRITON_REASON is not None, reason=f"triton backend unavailable: {_TRITON_REASON}")
_CSRC_REASON = csrc_ops.unavailable_reason(torch.device("cpu"))
needs_csrc = pytest.mark.skipif(_CSRC_REASON is not None, reason=f"csrc backend unavailable: {_CSRC_REASON}")

INT32_MAX = 2**31 - 1
# Selection state slots (kernels.OVERFLOW ...).
OVERFLOW, NUM_SELECTED, NUM_GREATER, BOUNDARY, NUM_NEGATIVE, CRITICAL_ALL, NONFINITE = range(7)


def expanded_batch(batch: int, dim: int = 4, device=DEVICE):
    """B embedding rows that cost one row of memory (stride 0), distinct labels: for the entry
    checks, which must refuse before anything of size B x B is allocated."""
    student = torch.randn(1, dim, device=device).expand(batch, dim)
    teacher = torch.randn(1, dim, device=device).expand(batch, dim)
    labels = torch.arange(batch, device=device)  # distinct: no label group of B^2 pairs
    return student, teacher, labels


def descending_key(value: float) -> int:
    """kernels._descending_key of a float32, on the host."""
    bits = torch.tensor([value], dtype=torch.float32).view(torch.int32).item() & 0xFFFFFFFF
    return bits ^ (0 if bits >> 31 else 0x7FFFFFFF)


def key_to_float(key: int) -> float:
    """kernels._key_to_float on the host."""
    bits = key ^ 0x7FFFFFFF if key < 2**31 else key
    return torch.tensor([bits - 2**32 if bits >= 2**31 else bits], dtype=torch.int32).view(torch.float32).item()


# --------------------------------------------------------------------------- shared entry check
def test_check_batch_limit_names_limit_and_batch():
    check_batch_limit(100, 100, "x", "why")
    with pytest.raises(ValueError, match=r"at most B=100 \(why\), got B=101"):
        check_batch_limit(101, 100, "x", "why")


# --------------------------------------------------------------------------- triton: host side
@needs_triton
def test_triton_launch_grids_at_131072(monkeypatch):
    """The tile passes' grid at B = 2^17 is T(T + 1) / 2 = 2098176 programs for T = 2048, within
    axis 0's limit (2^31 - 1); the largest accepted B still fits and the next does not, with the
    triangular grid and with the square one (axis 1 <= 65535)."""
    assert triton_ekd._tile_grid(131072) == (2048 * 2049 // 2,)
    assert triton_ekd._tile_grid(triton_ekd.MAX_BATCH)[0] <= INT32_MAX
    assert triton_ekd._tile_grid(triton_ekd.MAX_BATCH + 1)[0] > INT32_MAX
    monkeypatch.setattr(triton_ekd, "TRIANGLE_TILE_GRID", False)
    assert triton_ekd._tile_grid(131072) == (2048, 2048)
    assert triton_ekd._tile_grid(triton_ekd.MAX_BATCH)[1] == 65535
    assert triton_ekd._tile_grid(triton_ekd.MAX_BATCH + 1)[1] == 65536
    # the 1-D grids: rank_loss (row blocks + selected pairs), hardest_negatives (candidates)
    capacity = triton_ekd._candidate_capacity(triton_ekd.MAX_SELECTED_NEGATIVES)
    assert capacity <= INT32_MAX  # int32 slots of the candidate buffer
    assert triton_ekd._num_tiles(triton_ekd.MAX_BATCH) + capacity // triton_ekd.BLOCK_PAIRS < INT32_MAX


@needs_triton
def test_triton_histogram_dtype():
    """int32 bins while the B(B-1)/2 pairs fit int32 (B <= 65536), int64 from B = 65537 on,
    where one bin can hold every pair (collapsed embeddings, distinct labels)."""
    assert 65536 * 65535 // 2 <= INT32_MAX < 65537 * 65536 // 2
    assert triton_ekd._histogram_dtype(65536 * 65535 // 2) == torch.int32
    assert triton_ekd._histogram_dtype(65537 * 65536 // 2) == torch.int64
    assert triton_ekd._histogram_dtype(131072 * 131071 // 2) == torch.int64


@needs_triton
def test_triton_refuses_batches_past_its_grid():
    student, teacher, labels = expanded_batch(triton_ekd.MAX_BATCH + 1)
    with pytest.raises(ValueError, match=rf"at most B={triton_ekd.MAX_BATCH} .*got B={triton_ekd.MAX_BATCH + 1}"):
        ekd_loss(student, teacher, labels, backend="triton")


@needs_triton
def test_triton_refuses_too_many_selected_negatives():
    batch = 32769  # 536887296 pairs > 2^29 - 1
    student, teacher, labels = expanded_batch(batch)
    with pytest.raises(ValueError, match=rf"at most {triton_ekd.MAX_SELECTED_NEGATIVES} negatives.*B={batch}"):
        ekd_loss(student, teacher, labels, backend="triton", num_hard_negatives=2**29)


@needs_triton
@pytest.mark.parametrize("top_n_path", ["candidates", "overflow"])
def test_triton_int64_histograms_match_reference(monkeypatch, top_n_path):
    """The int64-bin path (B > 65536 on a GPU), forced at a small B: same results as the
    reference, on both top-N paths (candidates; overflow -> passes 3 and 4), with the
    backend's uninitialised buffers poisoned (the int64 views must be zeroed in full)."""
    import sys

    monkeypatch.setattr(triton_ekd, "INT32_HISTOGRAM_MAX_PAIRS", 0)
    empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        tensor = empty(*args, **kwargs)
        if sys._getframe(1).f_globals.get("__name__") == triton_ekd.__name__ and tensor.numel():
            tensor.fill_(float("nan") if tensor.dtype.is_floating_point else -123456789)
        return tensor

    monkeypatch.setattr(torch, "empty", poisoned_empty)
    if top_n_path == "overflow":
        monkeypatch.setattr(triton_ekd, "MIN_CANDIDATE_CAPACITY", 0)
        monkeypatch.setattr(triton_ekd, "CANDIDATE_FACTOR", 0)
    assert triton_ekd._histogram_dtype(1) == torch.int64
    student, teacher, labels = helpers.make_batch(130, 32, 24, 30, seed=3, device=DEVICE)
    helpers.compare_with_reference("triton", [(student, teacher, labels), (student.roll(1, dims=1), teacher, labels)],
                                   generator_seed=0, num_hard_negatives=50, compute_critical_ratio=True)


# --------------------------------------------------------------------------- triton: kernels
def _kernels():
    triton_ekd._kernels()
    from ekd_kernels._triton import kernels
    return kernels


PASS4_BATCH, PASS4_SELECTED = 128, 10


def run_pass4(ties_before_row_64):
    """hardest_negatives_kernel's pass 4 (the overflow path) on a batch whose only boundary ties
    are the negatives among rows 64+: rows 0-63 share one label and direction e0, rows 64-127
    have distinct labels and direction e1, so rows 64+ meet at similarity 1 (the boundary) and
    rows < 64 see 0 (below it).  `ties_before_row_64` ({row: count}) are synthetic tie counts of
    rows < 64, standing for a far larger batch.  Returns the N slots' (rows, cols)."""
    kernels = _kernels()
    batch, dim, n = PASS4_BATCH, 4, PASS4_SELECTED
    s = torch.zeros(batch, dim, dtype=torch.float32, device=DEVICE)
    s[:64, 0] = 2.0
    s[64:, 1] = 2.0
    s_inv = torch.full((batch,), 0.5, dtype=torch.float32, device=DEVICE)
    labels = torch.cat([torch.zeros(64, dtype=torch.int64), torch.arange(1, 65)]).to(DEVICE)
    state = torch.zeros(8, dtype=torch.int64, device=DEVICE)
    state[OVERFLOW], state[NUM_SELECTED], state[NUM_GREATER], state[BOUNDARY] = 1, n, 0, descending_key(1.0)
    row_greater = torch.zeros(batch, dtype=torch.int32, device=DEVICE)
    row_equal = torch.zeros(batch, dtype=torch.int32, device=DEVICE)
    for row, count in ties_before_row_64.items():
        row_equal[row] = count
    row_equal[64:] = torch.arange(63, -1, -1, dtype=torch.int32)  # the true ties of rows 64+
    rows = torch.full((n,), batch, dtype=torch.int64, device=DEVICE)
    cols = rows.clone()
    spare32 = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    spare64 = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    no_gram = torch.zeros(1, dtype=torch.float32, device=DEVICE)  # (GRAM_OFF: the tiles computed)
    kernels.hardest_negatives_kernel[(2,)](
        s, s_inv, labels, batch, dim, state, row_greater, row_equal, spare32, spare64, spare32, spare32, 1, rows, cols,
        no_gram, TILE=64, BLOCK_K=32, S_PRECISION="ieee", BLOCK_C=64, CHUNK=64, PREFIX_BLOCK=1024)
    return rows.tolist(), cols.tolist()


@needs_triton
def test_pass4_tie_prefix_past_int32():
    """Pass 4 places the boundary ties in row-major order from per-row prefix sums.  With
    collapsed embeddings nearly every pair ties, and from B = 65537 on the ties before a row
    pass 2^31: an int32 prefix wraps (here to 0), the row block takes ties it must not (or
    writes at negative slots).  Rows 0-63 report 2^32 ties (synthetic, as B = 92682 would), so
    the rows after them must take none."""
    rows, cols = run_pass4({1: INT32_MAX, 2: 2, 63: INT32_MAX})  # 2^32 ties before row 64
    assert rows == [PASS4_BATCH] * PASS4_SELECTED, f"rows after 2^32 ties took slots: {rows}"
    assert cols == [PASS4_BATCH] * PASS4_SELECTED


@needs_triton
def test_pass4_tie_prefix_below_the_clamp_still_places_ties():
    """The clamp of the prefix (to the ties still wanted) keeps the slots of rows that do take
    ties: 7 ties before row 64, N = 10, so row 64 takes its first 3 ties at slots 7-9."""
    rows, cols = run_pass4({5: 7})
    assert rows == [PASS4_BATCH] * 7 + [64] * 3
    assert cols == [PASS4_BATCH] * 7 + [65, 66, 67]


@needs_triton
@pytest.mark.parametrize("one_aggregation", [False, True], ids=["per_target", "one_aggregation"])
def test_radix_select_with_int64_counts(one_aggregation):
    """coarse_select and fine_select on int64 histograms holding more than 2^31 (and 2^32)
    elements in one bin, L = 8e9 (B = 131072 has 8.6e9 pairs), split between two copies as pass 1
    spreads its atomics: exact buckets, ranks, keys and the top-N overflow decision.  With pass 2
    in one aggregation, targets sharing a bucket (here the student's 0 and 2, the teacher's 0
    and 1) have their histogram in the first one's row only, where fine_select must read it."""
    kernels = _kernels()
    num_negative = 8 * 10**9
    # two copies of each model's histogram (coarse_histogram_kernel's), the counts split between them
    coarse = torch.zeros(2, 2, 65536, dtype=torch.int64, device=DEVICE)
    high, low, teacher_bin = (descending_key(x) >> 16 for x in (0.9, 0.5, 0.3))  # high < low: from the top
    coarse[0, 0, high], coarse[0, 1, high] = 10**9, 2 * 10**9  # student: 3e9 in bin `high`
    coarse[0, 0, low], coarse[0, 1, low] = 4 * 10**9, 10**9     # and 5e9 in bin `low`
    coarse[1, 1, teacher_bin] = num_negative                   # teacher: one bin (of copy 1) holds all
    fprs = (0.1, 0.5)
    num_thresholds, num_targets = len(fprs), len(fprs) + 1
    fine = torch.full((2, num_targets, 65536), -1, dtype=torch.int64, device=DEVICE)
    state = torch.zeros(8, dtype=torch.int64, device=DEVICE)
    state[NUM_NEGATIVE] = num_negative
    fractions = torch.tensor([[1, 1], [10, 2]], dtype=torch.int64, device=DEVICE)
    bucket = torch.zeros(2, num_targets, dtype=torch.int32, device=DEVICE)
    target_state = torch.zeros(2, num_targets, 2, dtype=torch.int64, device=DEVICE)
    nonfinite = torch.zeros(4, dtype=torch.int32, device=DEVICE)
    kernels.coarse_select_kernel[(num_targets, 2)](
        coarse, 2, fine, state, fractions, num_thresholds, num_targets, 2000, 8192, bucket, target_state, nonfinite,
        4, HARDEST=True, SCAN_BLOCK=4096)
    # student: rank 8e8 and the N-th (rank 1999) in bin `high`, rank 4e9 in bin `low` after 3e9
    assert bucket[0].tolist() == [high, low, high]
    assert target_state[0].tolist() == [[8 * 10**8, 0], [10**9, 3 * 10**9], [1999, 0]]
    assert bucket[1, :2].tolist() == [teacher_bin] * 2
    assert target_state[1, :2].tolist() == [[8 * 10**8, 0], [4 * 10**9, 0]]
    assert state[OVERFLOW].item() == 1 and state[NUM_SELECTED].item() == 2000
    assert (fine[:, :2] == 0).all() and (fine[0, 2] == 0).all()  # zeroed for pass 2

    # pass 2 (synthetic): the student's threshold bins split 3e9 = 2e9 + 1e9 over two low digits
    fine[0, 0, 10], fine[0, 0, 20] = 2 * 10**9, 10**9
    fine[0, 1, 0] = 5 * 10**9
    fine[0, 2, 10], fine[0, 2, 20] = 2 * 10**9, 10**9
    fine[1, 0, 3] = fine[1, 1, 3] = num_negative
    if one_aggregation:  # the later rows of a shared bucket stay as coarse_select zeroed them
        fine[0, 2] = 0
        fine[1, 1] = 0
    ema = torch.tensor([0.01, 0.99], dtype=torch.float64, device=DEVICE)
    previous = torch.zeros(num_thresholds, dtype=torch.float32, device=DEVICE)
    outputs = [torch.empty(num_thresholds, dtype=torch.float32, device=DEVICE) for _ in range(4)]
    used = torch.empty(2, num_thresholds, dtype=torch.float32, device=DEVICE)
    slots = torch.empty(4, dtype=torch.int64, device=DEVICE)
    kernels.fine_select_kernel[(num_targets, 2)](
        fine, bucket, target_state, state, num_thresholds, num_targets, 1, previous, 1, previous, 1, *outputs, used,
        ema, slots, slots.clone(), 4, 128, SCAN_BLOCK=4096, FILL_BLOCK=1024, ONE_AGGREGATION=one_aggregation)
    assert state[BOUNDARY].item() == high * 65536 + 10
    batch_student, batch_teacher = outputs[2], outputs[3]
    assert batch_student.tolist() == [key_to_float(high * 65536 + 10), key_to_float(low * 65536)]
    assert batch_teacher.tolist() == [key_to_float(teacher_bin * 65536 + 3)] * 2
    assert 0.85 < batch_student[0].item() < 0.95 and 0.45 < batch_student[1].item() < 0.55
    assert state[NUM_GREATER].item() == 0


@needs_triton
def test_nonfinite_count_past_int32():
    """The per-program counts of non-finite elements are summed in int64: 2^32 of them (B * D
    can pass it) must not wrap to 0, which would read as a finite batch."""
    kernels = _kernels()
    scan_block = 1024
    nonfinite = torch.zeros(3 * scan_block, dtype=torch.int32, device=DEVICE)
    nonfinite[0], nonfinite[scan_block], nonfinite[2 * scan_block] = INT32_MAX, INT32_MAX, 2  # one lane, 2^32
    coarse = torch.zeros(2, 65536, dtype=torch.int32, device=DEVICE)
    fine = torch.zeros(2, 1, 65536, dtype=torch.int32, device=DEVICE)
    state = torch.zeros(8, dtype=torch.int64, device=DEVICE)
    fractions = torch.tensor([[1], [10]], dtype=torch.int64, device=DEVICE)
    bucket = torch.zeros(2, 1, dtype=torch.int32, device=DEVICE)
    target_state = torch.zeros(2, 1, 2, dtype=torch.int64, device=DEVICE)
    kernels.coarse_select_kernel[(1, 2)](
        coarse, 1, fine, state, fractions, 1, 1, 0, 0, bucket, target_state, nonfinite, nonfinite.numel(),
        HARDEST=False, SCAN_BLOCK=scan_block)
    assert state[NONFINITE].item() == 2**32


_COMPILE_INT64_SCRIPT = r"""
import inspect
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ekd_kernels._triton import kernels

tile = dict(TILE=64, BLOCK_K=32, S_PRECISION="tf32x3", T_PRECISION="tf32x3")
# pass 1 and its select in every part and cutoff mode: int64 bins come with B > 65536, where pass 1
# counts the head of the order first (triton_ekd.CUTOFF_MIN_BATCH)
cases = [(kernels.coarse_histogram_kernel, dict(tile, PART=part)) for part in (0, 1, 2)] + [
    (kernels.coarse_select_kernel, dict(HARDEST=True, SCAN_BLOCK=4096, CUTOFF_MODE=mode)) for mode in (0, 1, 2)] + [
    # pass 2, per target and in one aggregation (triton_ekd.PASS2_ONE_AGGREGATION), sparse tiles
    # by the aggregation or per-element atomics (PASS2_DIRECT_MAX), and its select
    # (pass 1's windows need int32 counts, so they never meet int64 bins: WINDOWS off)
    (kernels.fine_histogram_kernel, dict(tile, COLLECT=True, SKIP_EMPTY=True, ONE_AGGREGATION=one, DIRECT_MAX=direct,
                                         WINDOWS=False))
    for one in (False, True) for direct in (0, 256)] + [
    (kernels.fine_select_kernel, dict(SCAN_BLOCK=4096, FILL_BLOCK=1024, ONE_AGGREGATION=one)) for one in (False, True)
]
int64 = ("hist_", "coarse_ptr", "fine_", "labels_ptr", "state_ptr", "candidate_key_ptr", "selected_", "target_state",
         "fractions_ptr")
int32 = ("bucket_ptr", "candidate_count", "candidate_rows", "candidate_cols", "nonfinite")
float64 = ("ema_ptr",)
for kernel, constants in cases:
    # (a constexpr parameter left at its default is a constant too: Triton 3.2 compiled it as a
    # runtime int where the signature said so, and a later comparison with a constexpr failed)
    constants = {**{p.name: p.default for p in kernel.params
                    if p.is_constexpr and p.default is not inspect.Parameter.empty}, **constants}

    def arg_type(name):
        if name in constants:
            return "constexpr"
        if name.endswith("_ptr"):
            for prefix, kind in ((int64, "*i64"), (int32, "*i32"), (float64, "*fp64")):
                if any(part in name for part in prefix):
                    return kind
            return "*fp32"
        return "i64" if name in ("num_hard_negatives", "capacity") else "i32"
    signature = {name: arg_type(name) for name in kernel.arg_names}
    if "constexprs" in inspect.signature(ASTSource).parameters:
        source = ASTSource(kernel, signature, constexprs={(kernel.arg_names.index(name),): value
                                                          for name, value in constants.items()})
    else:
        source = ASTSource(kernel, signature, constants=dict(constants))
    triton.compile(source, target=GPUTarget("cuda", 90, 32))
print("compiled", len(cases))
"""


@needs_triton
@pytest.mark.skipif(ON_GPU, reason="on a GPU the int64 path is compiled and run by test_triton_int64_histograms...")
def test_int64_histogram_kernels_compile_for_sm90():
    """The interpreter does not run Triton's compiler: compile the histogram kernels with int64
    bins (64-bit atomics and scans) for an H100 without a GPU."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_INT64_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    last_line = (done.stderr.strip().splitlines() or [""])[-1]
    if "No module named 'triton.backends.compiler'" in done.stderr or "cannot import name" in done.stderr:
        pytest.skip(f"this triton has no ahead-of-time compile API: {last_line}")
    if "ptxas" in done.stderr and ("not found" in done.stderr or "No such file" in done.stderr):
        pytest.skip(f"no ptxas for an sm_90 compile: {last_line}")
    assert done.returncode == 0, done.stderr[-4000:]


# --------------------------------------------------------------------------- csrc
@needs_csrc
def test_csrc_cpu_refuses_a_buffer_past_physical_memory():
    """The CPU op holds a B x B buffer (64 GiB in fp32 at B = 131072): a B whose buffer cannot fit
    is refused with a ValueError naming B, not a failed allocation (or, with overcommitted
    memory, a process killed while it fills the buffer).  2^20 rows need 4 TiB."""
    student, teacher, labels = expanded_batch(2**20, device="cpu")
    with pytest.raises(ValueError, match=r"B=1048576 needs 4096 GiB .*B x B similarity buffer"):
        ekd_loss(student, teacher, labels, backend="csrc")


def _memory_cgroup_child(limit_bytes: int):
    """A new child of this process's memory cgroup (v1 memory.limit_in_bytes or v2 memory.max)
    limited to `limit_bytes`, as a path; skips when the cgroup tree cannot be written here."""
    import pathlib
    import uuid

    for line in pathlib.Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        unified = pathlib.Path("/sys/fs/cgroup" + path) / "cgroup.controllers"
        if "memory" in controllers.split(","):
            parent, limit_file = pathlib.Path("/sys/fs/cgroup/memory" + path), "memory.limit_in_bytes"
        elif controllers == "" and unified.exists() and "memory" in unified.read_text().split():
            parent, limit_file = unified.parent, "memory.max"
        else:
            continue
        child = parent / f"ekd-test-{uuid.uuid4().hex[:8]}"
        try:
            child.mkdir()
            (child / limit_file).write_text(str(limit_bytes))
            return child
        except OSError as exc:
            if child.exists():
                child.rmdir()
            pytest.skip(f"cannot make a memory-limited cgroup here ({exc})")
    pytest.skip("no memory cgroup controller for this process")


@needs_csrc
def test_csrc_cpu_refuses_a_buffer_past_the_cgroup_memory_limit():
    """In a container the process may use its cgroup's limit, not the machine's memory: past it
    the kernel kills the process.  A B whose buffer fits the machine but not the limit is refused
    with a ValueError naming the limit (B = 32768: a 4 GiB buffer under a 1.5 GiB limit; importing
    torch alone peaks at about 0.5 GiB here)."""
    import subprocess
    import sys

    child = _memory_cgroup_child(3 << 29)
    script = ("import torch; from ekd_kernels import ekd_loss\n"
              "s = torch.randn(1, 4).expand(32768, 4); y = torch.arange(32768) // 2\n"
              "try:\n    ekd_loss(s, s, y, backend='csrc')\nexcept ValueError as e:\n    print('refused:', e)\n")
    try:
        done = subprocess.run(["sh", "-c", f'echo $$ > "{child}/cgroup.procs" && exec "$0" -c "$1"', sys.executable,
                               script], capture_output=True, text=True, timeout=300)
    finally:
        child.rmdir()
    assert done.returncode == 0, f"killed or failed (rc {done.returncode}): {done.stderr[-2000:]}"
    assert "refused: ekd_forward (CPU): B=32768 needs 4 GiB" in done.stdout, done.stdout
    assert "more than this process's cgroup memory limit of 1.5 GiB" in done.stdout, done.stdout


def _csrc_selected_pairs(student, teacher, labels, config):
    """The CPU op's selected pairs (n_max x 2, -1 padded), straight from the op."""
    fractions = [fpr_fraction(f) for f in config.fprs]
    state = torch.zeros(config.num_thresholds)
    outputs = torch.ops.ekd_kernels.ekd_forward(
        student, teacher, labels, state, state, None, [q.numerator for q in fractions],
        [q.denominator for q in fractions], config.temperature, config.num_hard_negatives, config.momentum,
        config.positive_weight, config.negative_weight, False, 0, True, False)
    return [tuple(p) for p in outputs[7].tolist()]


@needs_csrc
@pytest.mark.parametrize("num_hard_negatives", [1, 37, 5000])
def test_csrc_cpu_collapsed_similarities(num_hard_negatives):
    """Collapsed embeddings (every student similarity exactly 1, all in one radix bucket, every
    negative a tie at the top-N boundary): the CPU op keeps N candidates a row chunk instead of
    all L pairs and still takes the first N ties in row-major order.  Thresholds, counts and the
    positive term are the reference's; the negative term is the reference's formula over those
    pairs (the reference's own tie order is unspecified)."""
    batch = 300
    labels = torch.arange(batch) // 3
    student = torch.zeros(batch, 8)
    student[:, 0] = 1.0
    teacher = helpers.make_batch(batch, 8, seed=5)[1]
    config = EKDConfig(num_hard_negatives=num_hard_negatives)
    got = ekd_loss(student, teacher, labels, backend="csrc", config=config)
    want = ekd_loss(student, teacher, labels, backend="reference", config=config)
    for name in ("student_thresholds", "teacher_thresholds", "batch_student_thresholds", "batch_teacher_thresholds"):
        torch.testing.assert_close(getattr(got.stats, name), getattr(want.stats, name), rtol=0,
                                   atol=helpers.THRESHOLD_ATOL)
    for name in helpers.COUNTS[:3]:  # not the critical count among the selected: it depends on the tie order
        assert int(getattr(got.stats, name)) == int(getattr(want.stats, name)), name
    torch.testing.assert_close(got.stats.positive_term, want.stats.positive_term, rtol=helpers.LOSS_RTOL, atol=1e-7)

    pairs = _csrc_selected_pairs(student, teacher, labels, config)
    first = [(i, j) for i in range(batch) for j in range(i + 1, batch) if labels[i] != labels[j]][:num_hard_negatives]
    assert pairs == first
    i, j = torch.tensor(first).T
    teacher_hat = reference.normalize_rows(teacher)
    b = (teacher_hat[i] * teacher_hat[j]).sum(1)
    negative_term = reference.pair_rank_loss(torch.ones_like(b), b, got.student_thresholds, got.teacher_thresholds,
                                             config).mean()
    torch.testing.assert_close(got.stats.negative_term, negative_term, rtol=helpers.LOSS_RTOL, atol=1e-7)
    torch.testing.assert_close(got.loss, 0.02 * want.stats.positive_term + 0.01 * negative_term,
                               rtol=helpers.LOSS_RTOL, atol=1e-9)


_RSS_SCRIPT = r"""
import resource, sys, torch
from ekd_kernels import ekd_loss
batch = int(sys.argv[1])
student = torch.zeros(batch, 8)
student[:, 0] = 1.0  # every similarity exactly 1: all L negatives in the top-N boundary's bucket
teacher = torch.randn(batch, 8, generator=torch.Generator().manual_seed(0))
labels = torch.arange(batch)
ekd_loss(student[:64], teacher[:64], labels[:64], backend="csrc")  # load and warm up the op
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ekd_loss(student, teacher, labels, backend="csrc")
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


@needs_csrc
def test_csrc_cpu_collapsed_memory_stays_near_the_buffer():
    """Peak memory of the CPU op on collapsed embeddings at B = 6000 (L = 1.8e7): the buffer (137
    MiB) and the student's keys of the one wanted bucket (69 MiB, held twice while gathered),
    about 360 MiB; not also 24 bytes per negative pair of top-N candidates (412 MiB, held twice:
    about 1.5 GiB before the candidates were cut to N per row chunk)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, "6000"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    peak_mib = int(done.stdout.split()[-1])
    assert peak_mib < 600, f"the CPU op's peak grew by {peak_mib} MiB"


@pytest.mark.skipif(not ON_GPU or csrc_ops.unavailable_reason(DEVICE) is not None,
                    reason="the csrc CUDA op needs a CUDA GPU")
def test_csrc_cuda_refuses_batches_past_its_grid():
    limit = 65535 * 64
    student, teacher, labels = expanded_batch(limit + 1)
    with pytest.raises(ValueError, match=rf"at most B={limit} .*got B={limit + 1}"):
        ekd_loss(student, teacher, labels, backend="csrc")
