"""Every fast backend against the reference on fresh random inputs: loss, gradient, thresholds and
statistics, over odd shapes, every variant and consecutive calls.  (The reference itself is
checked against the golden figures and the loop oracle.)"""

import copy

import pytest
import torch

from ekd_kernels import EKDLoss

from conftest import DEVICES, require_backend
from helpers import assert_matches_reference, compare_with_reference, make_batch, run_ekd

SHAPES = [  # (B, Ds, Dt, identities)
    (7, 3, 5, 3), (33, 16, 8, 8), (130, 64, 48, 40), (257, 24, 24, 64),
]


@pytest.mark.parametrize("batch,student_dim,teacher_dim,identities", SHAPES)
def test_random_shapes_consecutive_calls(fast_backend, device, batch, student_dim, teacher_dim, identities):
    batches = [make_batch(batch, student_dim, teacher_dim, identities, seed=s, device=device) for s in range(3)]
    compare_with_reference(fast_backend, batches, compute_critical_ratio=True)


VARIANTS = [
    dict(critical_only=True), dict(rank_loss="eq7"), dict(rank_loss="eq8"),
    dict(rank_loss="eq7", critical_only=True), dict(num_hard_negatives=1),
    dict(fprs=(0.5, 0.2, 0.01), temperature=0.05, momentum=0.5, positive_weight=1.0, negative_weight=3.0,
         num_hard_negatives=100),
]


@pytest.mark.parametrize("options", VARIANTS, ids=str)
def test_variants(fast_backend, device, options):
    batches = [make_batch(70, 12, 20, 20, seed=10 + s, device=device) for s in range(2)]
    compare_with_reference(fast_backend, batches, **options)


def test_random_selection(fast_backend, device):
    options = dict(negative_selection="random", num_hard_negatives=50)
    batches = [make_batch(40, 8, 8, 10, seed=s, device=device) for s in range(2)]
    compare_with_reference(fast_backend, batches, generator_seed=7, **options)


@pytest.mark.parametrize("selection", ["hardest", "random"])
def test_thresholds_that_are_pairs_of_the_batch(fast_backend, device, selection):
    """momentum = 1: every EMA threshold is a negative pair's similarity of this very batch, and
    that pair is among the selected ones (all pairs are, B = 12; the random draw takes them all,
    in random order and orientation).  At its own threshold a == t (not above): a backend whose
    selected pairs' similarities round differently from the pass that chose the thresholds
    counts it critical, which changes the counts and the critical_only loss (Triton did, 14 of
    40 seeds)."""
    batches = [make_batch(12, 7, 5, 12, seed=s, device=device) for s in range(16)]
    compare_with_reference(fast_backend, batches, generator_seed=0 if selection == "random" else None,
                           momentum=1.0, critical_only=True, compute_critical_ratio=True,
                           negative_selection=selection)


@pytest.mark.parametrize("labels_kind", ["all_distinct", "all_equal", "two_identities"])
def test_label_extremes(fast_backend, device, labels_kind):
    student, teacher, _ = make_batch(45, 10, 10, seed=1, device=device)
    labels = {"all_distinct": torch.arange(45), "all_equal": torch.zeros(45, dtype=torch.long),
              "two_identities": torch.arange(45) % 2}[labels_kind].to(device)
    compare_with_reference(fast_backend, [(student, teacher, labels)] * 2)


@pytest.mark.parametrize("selection", ["hardest", "random"])
def test_uint64_labels_past_int64(fast_backend, device, selection):
    """uint64 identities past 2^63 (hashes, say) group the batch as the same partition of int64
    labels does, in both selections: the random draw's pairs come from label groups searched in
    int64, and Triton sorted the uint64 values first, which put 2^63 and 2^64 - 1 after the
    others, out of int64 order (wrong pairs drawn, or a column past the batch: a ValueError)."""
    student, teacher, _ = make_batch(20, 8, 8, seed=0, device=device)
    identity = torch.randint(0, 5, (20,), generator=torch.Generator().manual_seed(1))
    values = torch.tensor([0, 1, -2**63, -1, 5], dtype=torch.int64)  # as uint64: 2^63, 2^64 - 1
    labels = values[identity].view(torch.uint64).to(device)  # (torch 2.6 indexes no uint64 tensor)
    options = dict(negative_selection=selection, num_hard_negatives=25)
    seed = 3 if selection == "random" else None
    compare_with_reference(fast_backend, [(student, teacher, labels)] * 2, generator_seed=seed, **options)
    # the same partition as int64 labels: the same pairs and results (up to the summation order
    # of the gradient, which follows the label sort's group order)
    fast = [EKDLoss(backend=fast_backend, **options).to(device) for _ in range(2)]
    generator = (lambda: torch.Generator().manual_seed(5)) if seed is not None else (lambda: None)
    got = run_ekd(fast[0], student, teacher, labels, generator=generator())
    want = run_ekd(fast[1], student, teacher, identity.to(device), generator=generator())
    assert_matches_reference(got, want)


def test_duplicated_rows(fast_backend, device):
    """Ties everywhere: identical rows in both models give identical pairs, so the result does
    not depend on how a backend breaks ties at a threshold or at the top-N boundary."""
    student, teacher, labels = make_batch(20, 8, 8, seed=3, device=device)
    student, teacher = student.repeat(3, 1), teacher.repeat(3, 1)
    labels = torch.cat([labels, labels + 100, labels + 200])
    compare_with_reference(fast_backend, [(student, teacher, labels)], num_hard_negatives=37)


def test_wide_embeddings(fast_backend, device):
    compare_with_reference(fast_backend, [make_batch(96, 512, 384, 24, seed=4, device=device)])


def test_many_pairs_all_thresholds_distinct(fast_backend, device):
    """Over 1e5 negatives on CPU runs (1e6 where a GPU is present), so the small-FPR thresholds
    are distinct order statistics, not all the largest negative."""
    batch = 1600 if device.type == "cuda" else 500
    batches = [make_batch(batch, 32, 32, batch // 4, seed=s, device=device) for s in range(2)]
    compare_with_reference(fast_backend, batches)


def test_deterministic(fast_backend, device):
    student, teacher, labels = make_batch(100, 32, 32, 25, seed=8, device=device)
    first, second = (run_ekd(EKDLoss(backend=fast_backend).to(device), student, teacher, labels) for _ in range(2))
    assert torch.equal(first.result.loss, second.result.loss) and torch.equal(first.grad, second.grad)


def count_host_reads(fn) -> int:
    """How many times `fn` reads a tensor's value to the host (.item(), bool(), indexing by a 0-d
    tensor: aten::_local_scalar_dense, seen by the profiler however deep in a custom op it
    happens). On CUDA each one is a host synchronisation, which the fused backends must not do."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for event in prof.events() if event.name == "aten::_local_scalar_dense")


# (the Triton interpreter's products of the 1e20 rows overflow to inf, as meant; numpy says so)
@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")
def test_rows_whose_norm_overflows(fast_backend, device):
    """Finite rows of magnitude ~1e20 have an fp32 norm of inf: the reference (F.normalize, as
    the authors) makes each a zero row.  With several such rows their raw dots overflow too; a
    fast backend must still give the reference's results, not NaN similarities."""
    student, teacher, labels = make_batch(40, 8, 8, 8, seed=4, device=device)
    student[[3, 4, 9]] *= 1e20
    teacher[[5, 9, 12]] *= 1e20
    compare_with_reference(fast_backend, [(student, teacher, labels)] * 2)


@pytest.mark.parametrize("options", [dict(), dict(critical_only=True, compute_critical_ratio=True, rank_loss="eq7")],
                         ids=["default", "critical"])
def test_no_host_reads_in_forward_and_backward(fast_backend, device, options):
    """Checked through the profiler, so it also runs on CPU (CI), not only on a GPU."""
    if fast_backend == "csrc" and device.type == "cpu":
        pytest.skip("the C++ CPU op reads host scalars freely (there is no device to wait for); "
                    "the CUDA op is a separate implementation, checked on CUDA tensors")
    crit = EKDLoss(backend=fast_backend, **options).to(device)
    student, teacher, labels = make_batch(48, 16, 16, 12, seed=2, device=device)
    crit(student, teacher, labels)  # first call: one-time setup may read scalars
    student = student.detach().requires_grad_(True)
    assert count_host_reads(lambda: crit(student, teacher, labels).backward()) == 0


@pytest.mark.parametrize("tail", [False, True], ids=["head", "head_and_tail"])
def test_no_host_reads_in_the_triton_large_b_variants(device, monkeypatch, tail):
    """The Triton forward's large-B variants, forced at a small B (pass 1 in histogram copies and
    in two parts, the tail counted or not, which the device decides), read nothing to the host."""
    from ekd_kernels import triton_ekd

    require_backend("triton", device)
    monkeypatch.setattr(triton_ekd, "CUTOFF_MIN_BATCH", 0)
    monkeypatch.setattr(triton_ekd, "COARSE_TILES_PER_COPY", 1)
    if tail:
        monkeypatch.setattr(triton_ekd, "CUTOFF_SAFETY", 1e-12)
    crit = EKDLoss(backend="triton").to(device)
    student, teacher, labels = make_batch(150, 16, 16, 30, seed=2, device=device)
    crit(student, teacher, labels)  # first call: one-time setup may read scalars
    student = student.detach().requires_grad_(True)
    assert count_host_reads(lambda: crit(student, teacher, labels).backward()) == 0


# CUDA devices only (none on a machine without a GPU: pytest then reports the empty set as one
# skip), rather than CPU variants that skip: a GPU run's `-k cuda` selects no skipped case.
@pytest.mark.parametrize("device", [d for d in DEVICES if d == "cuda"], indirect=True)
def test_cuda_graph_replays_equal_eager_steps(fast_backend, device):
    """KERNEL-NOTES: forward + backward capturable in a CUDA graph (no host sync, fixed shapes).
    One step is captured, then replayed on three new batches copied into its static inputs; an
    eager module fed the same batches gives bitwise the same loss, gradient and EMA state (the
    module updates its buffers in place, so the state chains across replays).  As the README's
    recipe: the warm-up's threshold updates are undone (load_state_dict, in place) before the
    capture, so the replays continue from a new module's state, as the eager module does."""
    batches = [make_batch(96, 32, 24, 24, seed=30 + s, device=device) for s in range(5)]
    captured, eager = EKDLoss(backend=fast_backend).to(device), EKDLoss(backend=fast_backend).to(device)
    initial = copy.deepcopy(captured.state_dict())
    student = batches[0][0].clone().requires_grad_(True)
    teacher, labels = batches[0][1].clone(), batches[0][2].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compilation, one-time constants) off the capture
        for s, t, l in batches[:2]:
            student.data.copy_(s), teacher.copy_(t), labels.copy_(l)
            captured(student, teacher, labels).backward()
    torch.cuda.current_stream().wait_stream(side)
    assert not torch.equal(captured.student_thresholds, eager.student_thresholds)  # the warm-up moved them
    captured.load_state_dict(initial)
    student.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = captured(student, teacher, labels)
        loss.backward()
    # capturing ran nothing: the captured module's state is still a new module's
    assert torch.equal(captured.student_thresholds, eager.student_thresholds)
    assert torch.equal(captured.teacher_thresholds, eager.teacher_thresholds)
    for s, t, l in batches[2:]:
        student.data.copy_(s), teacher.copy_(t), labels.copy_(l)
        graph.replay()
        reference_student = s.clone().requires_grad_(True)
        want = eager(reference_student, t, l)
        want.backward()
        assert torch.equal(loss, want)
        assert torch.equal(student.grad, reference_student.grad)
        assert torch.equal(captured.student_thresholds, eager.student_thresholds)
        assert torch.equal(captured.teacher_thresholds, eager.teacher_thresholds)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (a tensor off the current device)")
@pytest.mark.parametrize("name", ["triton", "csrc"])
def test_tensors_off_the_current_device(name):
    """Kernels launch on the current device unless told otherwise: tensors on cuda:1 while
    cuda:0 is current (a process that never called torch.cuda.set_device) must still work."""
    device = torch.device("cuda", 1)
    backend = require_backend(name, device)
    batches = [make_batch(100, 32, 24, 25, seed=s, device=device) for s in range(2)]
    with torch.cuda.device(0):
        compare_with_reference(backend, batches)
