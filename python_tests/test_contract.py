"""SPEC.md, clause by clause: hand-computed cases, an independent loop oracle, gradcheck, edge cases,
state handling and dtypes.  Runs on every backend available on every device (conftest)."""

import collections
import copy
import functools
import io
import math
import re
import warnings

import numpy
import pytest
import torch

from ekd_kernels import BACKEND_NAMES, DEFAULT_FPRS, EKDConfig, EKDLoss, ekd_loss
from ekd_kernels import backends as backends_module
from ekd_kernels import reference
from ekd_kernels.reference import draw_random_negatives

from conftest import require_backend
from helpers import THRESHOLD_ATOL, assert_grad_close, assert_loss_close, make_batch
from loop_oracle import oracle

SIG99 = 1.0 / (1.0 + math.exp(-50.0))  # sigmoid(99) after the clamp at 50


def hand_pair(device, labels):
    """Two rows: student orthogonal (a = 0), teacher identical (b = 1)."""
    student = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], device=device, requires_grad=True)
    teacher = torch.tensor([[0.0, 2.0], [0.0, 5.0]], device=device)
    return student, teacher, torch.tensor(labels, device=device)


# ----------------------------------------------------------------------------- by hand
@pytest.mark.parametrize("rank_loss,expected", [
    # L = 1: batch thresholds are a = 0 and b = 1; EMA from 0: t(S) = 0, t(T) = 0.01.
    # soft rank: R_S(0) = 6 * 0.5 = 3, R_T(1) = 6 * sigmoid(99 -> clamp 50); term (3 - 6 s)^2, weight 0.01
    ("soft_rank", 0.01 * (3.0 - 6 * SIG99) ** 2),
    ("eq7", 0.01 * 6 * 0.99),     # sum_k |(1 - 0.01) - (0 - 0)|
    ("eq8", 0.01 * 1.0),          # (b - a)^2
])
def test_hand_single_negative_pair(backend, device, rank_loss, expected):
    student, teacher, labels = hand_pair(device, [0, 1])
    crit = EKDLoss(rank_loss=rank_loss, backend=backend).to(device)
    loss = crit(student, teacher, labels)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(crit.student_thresholds.cpu(), torch.zeros(6))
    torch.testing.assert_close(crit.teacher_thresholds.cpu(), torch.full((6,), 0.01))
    stats = crit.last_stats
    assert (stats.num_positive_pairs.item(), stats.num_negative_pairs.item(), stats.num_selected_negatives.item()) \
        == (0, 1, 1)
    if rank_loss == "soft_rank":
        # dloss/da = 0.01 * 2 (R_S - R_T) * dR_S/da, dR_S/da = 6 * sigmoid'(0) / tau = 6 * 0.25 / 0.01;
        # da/ds_1 = s_hat_2 (unit rows, a = 0), da/ds_2 = s_hat_1.
        g = 0.01 * 2 * (3.0 - 6 * SIG99) * 6 * 0.25 / 0.01
        loss.backward()
        expected_grad = torch.tensor([[0.0, g, 0.0], [g, 0.0, 0.0]])
        torch.testing.assert_close(student.grad.cpu(), expected_grad, rtol=1e-5, atol=1e-6)


def test_sigmoid_clamp_gives_exact_zero_gradient_far_from_thresholds(backend, device):
    """SPEC step 5: the argument is clamped to [-50, 50], so |x - t_k| > 0.5 (tau = 0.01) carries no
    gradient at all, and nothing overflows (exp(190) is inf in fp32)."""
    student = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], device=device, requires_grad=True)  # a = -1
    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0]], device=device)                      # b = 0
    thresholds = torch.full((6,), 0.9, device=device)
    result = ekd_loss(student, teacher, torch.tensor([0, 1], device=device), thresholds, thresholds,
                      update_thresholds=False, backend=backend)
    result.loss.backward()
    assert result.loss.item() == pytest.approx(0.0, abs=1e-30)  # both soft ranks are 0 (saturated)
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_hand_single_positive_pair(backend, device):
    """No negative pair: the thresholds stay as they were (0), batch thresholds are NaN, and
    the positive term is (R_S(0) - R_T(1))^2 = (3 - 6 sigmoid(100 -> 50))^2 with weight 0.02."""
    student, teacher, labels = hand_pair(device, [7, 7])
    crit = EKDLoss(backend=backend).to(device)
    loss = crit(student, teacher, labels)
    assert loss.item() == pytest.approx(0.02 * (3.0 - 6 * SIG99) ** 2, rel=1e-6)
    assert torch.all(crit.student_thresholds == 0) and torch.all(crit.teacher_thresholds == 0)
    assert torch.isnan(crit.last_stats.batch_student_thresholds).all()
    assert crit.last_stats.negative_term.item() == 0.0


# ----------------------------------------------------------------------------- loop oracle
VARIANTS = [
    dict(),
    dict(critical_only=True),
    dict(rank_loss="eq7"),
    dict(rank_loss="eq8"),
    dict(rank_loss="eq7", critical_only=True),
    dict(num_hard_negatives=5, temperature=0.05, momentum=0.3, positive_weight=1.5, negative_weight=0.7),
    dict(fprs=(0.5, 0.25, 0.05), num_hard_negatives=7),
    dict(fprs=(0.3,), critical_only=True, num_hard_negatives=0),
]


@pytest.mark.parametrize("options", VARIANTS, ids=[str(v) or "default" for v in VARIANTS])
def test_variants_against_loop_oracle(backend, device, options):
    """Three consecutive calls on one module (EMA carried), compared with plain float64 loops."""
    crit = EKDLoss(backend=backend, compute_critical_ratio=True, **options).to(device)
    fprs = options.get("fprs", DEFAULT_FPRS)
    oracle_options = {k: v for k, v in options.items() if k != "fprs"}
    st, tt = [0.0] * len(fprs), [0.0] * len(fprs)
    for step in range(3):
        student, teacher, labels = make_batch(11, 5, 4, num_identities=4, seed=step, device=device)
        loss = crit(student, teacher, labels)
        want = oracle(student.double().tolist(), teacher.double().tolist(), labels.tolist(), st, tt, fprs=fprs,
                      **oracle_options)
        st, tt = want["student_thresholds"], want["teacher_thresholds"]
        # fp32 similarities against a float64 oracle, amplified by 1/tau inside the sigmoid
        assert loss.item() == pytest.approx(want["loss"], rel=1e-4, abs=1e-7)
        torch.testing.assert_close(crit.student_thresholds.double().cpu(), torch.tensor(st, dtype=torch.float64),
                                   rtol=0, atol=1e-6)
        torch.testing.assert_close(crit.teacher_thresholds.double().cpu(), torch.tensor(tt, dtype=torch.float64),
                                   rtol=0, atol=1e-6)
        stats = crit.last_stats
        for name in ("num_positive_pairs", "num_negative_pairs", "num_selected_negatives", "num_critical_selected",
                     "num_critical_pairs"):
            assert getattr(stats, name).item() == want[name], name
        assert stats.critical_ratio.item() == pytest.approx(want["num_critical_pairs"] / 55)
        assert stats.positive_term.item() == pytest.approx(want["positive_term"], rel=1e-4, abs=1e-7)
        assert stats.negative_term.item() == pytest.approx(want["negative_term"], rel=1e-4, abs=1e-7)
        torch.testing.assert_close(stats.batch_student_thresholds.double().cpu(),
                                   torch.tensor(want["batch_student"], dtype=torch.float64), rtol=0, atol=1e-6)


def test_random_negative_selection_draws_from_the_generator(backend, device):
    """The ablation: N negatives uniformly without replacement, from the caller's generator, in the
    row-major order of the negative pairs."""
    student, teacher, labels = make_batch(12, 6, 6, num_identities=3, seed=5, device=device)
    n = 9
    crit = EKDLoss(negative_selection="random", num_hard_negatives=n, backend=backend).to(device)
    loss = crit(student, teacher, labels, generator=torch.Generator().manual_seed(123))
    num_negatives = crit.last_stats.num_negative_pairs.item()
    chosen = draw_random_negatives(num_negatives, n, torch.Generator().manual_seed(123)).tolist()
    zeros = [0.0] * 6
    want = oracle(student.double().tolist(), teacher.double().tolist(), labels.tolist(), zeros, zeros,
                  fprs=DEFAULT_FPRS, selected_negatives=chosen)
    assert loss.item() == pytest.approx(want["loss"], rel=1e-4, abs=1e-7)
    hardest = oracle(student.double().tolist(), teacher.double().tolist(), labels.tolist(), zeros, zeros,
                     fprs=DEFAULT_FPRS, num_hard_negatives=n)
    assert want["negative_term"] != pytest.approx(hardest["negative_term"], rel=1e-3), \
        "the case must tell random from hardest selection"


@pytest.mark.parametrize("num_negatives,n,ordered", [(10, 3, True), (10, 6, False), (4, 1, True)],
                         ids=["iid_draws", "dense_randperm", "frequent_repeats"])
def test_random_draw_is_uniform_without_replacement(num_negatives, n, ordered):
    """draw_random_negatives: n distinct ranks in [0, L), and every ordered n-sample (or, on the
    dense path, every n-subset) equally likely: a chi-square over all of them, far in the tail
    (mean dof, sd sqrt(2 dof); a fixed seed, so the test is deterministic)."""
    generator = torch.Generator().manual_seed(0)
    draws = 24000
    seen = collections.Counter()
    for _ in range(draws):
        ranks = draw_random_negatives(num_negatives, n, generator)
        assert ranks.dtype == torch.int64 and ranks.shape == (n,)
        values = ranks.tolist()
        assert len(set(values)) == n and all(0 <= v < num_negatives for v in values)
        seen[tuple(values) if ordered else tuple(sorted(values))] += 1
    cells = math.perm(num_negatives, n) if ordered else math.comb(num_negatives, n)
    assert len(seen) == cells
    expected = draws / cells
    chi2 = sum((count - expected) ** 2 / expected for count in seen.values())
    assert chi2 < (cells - 1) + 6 * math.sqrt(2 * (cells - 1)), chi2


def test_random_draw_is_the_documented_algorithm():
    """The README's algorithm, draw for draw (so that a seed gives the same negatives wherever the
    draw is re-derived): randperm(L)[:N] when 2N >= L (the boundary 2N = L included), otherwise
    i.i.d. integers in [0, L), 2(N - kept) at a time, keeping the first N distinct values in
    draw order.  The uniformity test above cannot see either choice."""
    for seed in range(5):
        got = draw_random_negatives(10, 5, torch.Generator().manual_seed(seed))
        assert torch.equal(got, torch.randperm(10, generator=torch.Generator().manual_seed(seed))[:5])
    num_negatives, n = 1000, 300  # enough repeats among the draws that their order matters
    for seed in range(5):
        generator = torch.Generator().manual_seed(seed)
        drawn, kept = [], []
        while len(kept) < n:
            drawn += torch.randint(num_negatives, (2 * (n - len(kept)),), generator=generator).tolist()
            kept = list(dict.fromkeys(drawn))  # the distinct values, in the order first drawn
        assert draw_random_negatives(num_negatives, n, torch.Generator().manual_seed(seed)).tolist() == kept[:n]


def test_sigmoid_clamp_is_the_authors():
    """The soft rank's sigmoid argument is clamped to [-50, 50], as the authors' code does: at
    |x / T| = 40 the value and the gradient are the sigmoid's, past 50 the value is the clamp's
    and the gradient 0."""
    x = torch.tensor([-0.40, 0.40, -0.60], dtype=torch.float64, requires_grad=True)
    y = reference.clamped_sigmoid(x, 0.01)
    assert y[0].item() == pytest.approx(1 / (1 + math.exp(40)), rel=1e-9)
    assert y[2].item() == pytest.approx(1 / (1 + math.exp(50)), rel=1e-9)
    y.sum().backward()
    assert x.grad[0].item() > 0 and x.grad[2].item() == 0


def test_random_draw_needs_memory_of_n_not_of_the_negatives():
    """At L = 1e12 negatives (far beyond any batch) a draw of 2000 is immediate: a permutation
    of all negatives (8 TB) is never built.  Same generator state, same ranks."""
    ranks = draw_random_negatives(10 ** 12, 2000, torch.Generator().manual_seed(7))
    assert ranks.shape == (2000,) and torch.unique(ranks).numel() == 2000
    assert int(ranks.min()) >= 0 and int(ranks.max()) < 10 ** 12
    assert torch.equal(ranks, draw_random_negatives(10 ** 12, 2000, torch.Generator().manual_seed(7)))


def test_random_selection_without_generator_is_an_error(backend, device):
    student, teacher, labels = make_batch(6, device=device)
    with pytest.raises(ValueError, match="generator"):
        EKDLoss(negative_selection="random", backend=backend).to(device)(student, teacher, labels)


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("options", [dict(temperature=0.2), dict(rank_loss="eq8"), dict(rank_loss="eq7"),
                                     dict(temperature=0.2, critical_only=True, num_hard_negatives=4)],
                         ids=["soft_rank", "eq8", "eq7", "critical"])
# Not the Triton backend: it computes in fp32 (its gradients are checked against the reference).
@pytest.mark.parametrize("backend", [name for name in BACKEND_NAMES if name != "triton"], indirect=True)
def test_gradcheck_float64(backend, device, options):
    """With the thresholds held fixed (no update), the loss is a smooth function of the student."""
    student, teacher, labels = make_batch(9, 4, 3, num_identities=3, seed=3, device=device, dtype=torch.float64)
    student.requires_grad_(True)
    config = EKDConfig(**options)
    thresholds = torch.linspace(0.6, -0.3, config.num_thresholds, device=device)

    def fn(x):
        return ekd_loss(x, teacher, labels, thresholds, thresholds * 0.9, update_thresholds=False,
                        backend=backend, config=config).loss

    assert fn(student).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, (student,), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_second_derivative_is_exact_or_refused(backend, device):
    """A gradient penalty differentiates the loss's gradient again. The reference is plain
    autograd, so its second derivative is checked (gradgradcheck, fp64, thresholds fixed); the
    fused backends have none and must say so, even when the gradient is mixed with other terms,
    rather than treat it as a constant (which is what an op without a formula silently does)."""
    if backend == "reference":
        student, teacher, labels = make_batch(9, 4, 3, num_identities=3, seed=3, device=device, dtype=torch.float64)
        thresholds = torch.linspace(0.6, -0.3, 6, device=device, dtype=torch.float64)

        def fn(x):
            return ekd_loss(x, teacher, labels, thresholds, thresholds * 0.9, update_thresholds=False,
                            backend=backend, temperature=0.2).loss

        assert torch.autograd.gradgradcheck(fn, (student.requires_grad_(True),), eps=1e-6, atol=1e-5, rtol=1e-4)
        return
    student, teacher, labels = make_batch(20, 8, seed=5, device=device)
    x = student.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(EKDLoss(backend=backend).to(device)(x, teacher, labels), x, create_graph=True)
    with pytest.raises(RuntimeError, match=f"the {backend} backend has no second derivative"):
        (grad.pow(2).sum() + x.sum()).backward()
    # autograd.grad runs only the nodes on paths to its inputs: the refusal must lie on them
    for penalty in (grad.pow(2).sum() + x.sum(), grad.pow(2).sum()):
        with pytest.raises(RuntimeError, match=f"the {backend} backend has no second derivative"):
            torch.autograd.grad(penalty, x, retain_graph=True, allow_unused=True)


def test_torch_func_transforms(backend, device):
    """torch.func.grad, vjp and jacrev of the loss give bitwise the gradient .backward() gives,
    on every backend (the fused ones through a setup_context style twin of their autograd: the
    autograd torch.library builds for a registered op is refused by torch.func); a gradient of
    the gradient (nested transforms) is exact on the reference and refused, naming the backend,
    on the fused ones, never a silent zero."""
    student, teacher, labels = make_batch(24, 8, seed=6, device=device)
    x = student.clone().requires_grad_(True)
    ekd_loss(x, teacher, labels, backend=backend).loss.backward()

    def loss(a):
        return ekd_loss(a, teacher, labels, backend=backend).loss

    assert torch.equal(torch.func.grad(loss)(student), x.grad)
    _, vjp = torch.func.vjp(loss, student)
    assert torch.equal(vjp(torch.ones((), device=device))[0], x.grad)
    with warnings.catch_warnings():  # jacrev's vmap runs the backward op one row at a time (no batching rule)
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
        assert torch.equal(torch.func.jacrev(loss)(student), x.grad)

    def curvature(a):
        return (torch.func.grad(loss)(a) * a).sum()  # a gradient penalty's shape

    if backend == "reference":
        assert torch.isfinite(torch.func.grad(curvature)(student)).all()
    else:
        with pytest.raises(RuntimeError, match=f"the {backend} backend has no second derivative"):
            torch.func.grad(curvature)(student)


def test_reference_forward_mode(device):
    """The reference backend's forward mode (torch.func.jvp, jacfwd, hessian): the directional
    derivative equals the gradient's dot with the tangent, the Hessian is finite and symmetric,
    and a non-finite batch's tangent reads NaN throughout, as its gradient does (the gradient's
    NaN rule has its forward-mode twin: without it these transforms raised)."""
    student, teacher, labels = make_batch(9, 4, 4, 3, seed=0, device=device, dtype=torch.float64)

    def loss(a, t=teacher):
        return ekd_loss(a, t, labels, backend="reference", update_thresholds=False).loss

    tangent = torch.randn(student.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
    _, directional = torch.func.jvp(loss, (student,), (tangent,))
    gradient = torch.func.grad(loss)(student)
    torch.testing.assert_close(directional, (gradient * tangent).sum(), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(torch.func.jacfwd(loss)(student), gradient, rtol=1e-10, atol=1e-14)
    hessian = torch.func.hessian(loss)(student).reshape(student.numel(), -1)
    assert torch.isfinite(hessian).all()
    torch.testing.assert_close(hessian, hessian.t(), rtol=1e-8, atol=1e-10)
    bad = teacher.clone()
    bad[2, 1] = float("nan")
    _, directional = torch.func.jvp(lambda a: loss(a, bad), (student,), (tangent,))
    assert torch.isnan(directional)
    # fp32: the tangent in fp32 too (a Python-float weight's zero tangent upcast it to fp64,
    # pytorch/pytorch#90065), equal to the gradient's dot with the tangent
    value, directional = torch.func.jvp(loss, (student.float(),), (tangent.float(),))
    assert value.dtype == directional.dtype == torch.float32
    torch.testing.assert_close(directional.double(), (gradient * tangent).sum(), rtol=1e-4, atol=1e-6)


def test_fused_backends_refuse_forward_mode_and_vmap(fast_backend, device):
    """Forward mode (torch.func.jvp, jacfwd, hessian; torch.autograd.forward_ad) and vmap over the
    loss have no rule on the fused backends: a NotImplementedError naming the backend and the
    way out, where torch's own messages named neither (jvp) or an internal class (vmap)."""
    import torch.autograd.forward_ad as forward_ad

    student, teacher, labels = make_batch(12, 8, seed=2, device=device)
    tangent = torch.ones_like(student)

    def loss(a):
        return ekd_loss(a, teacher, labels, backend=fast_backend).loss

    forward_mode = f"the {fast_backend} backend has no forward-mode derivative.*backend='reference'"
    with pytest.raises(NotImplementedError, match=forward_mode):
        torch.func.jvp(loss, (student,), (tangent,))
    with pytest.raises(NotImplementedError, match=forward_mode):
        torch.func.jacfwd(loss)(student)
    with forward_ad.dual_level(), pytest.raises(NotImplementedError, match=forward_mode):
        loss(forward_ad.make_dual(student, tangent))
    with pytest.raises(NotImplementedError, match=f"the {fast_backend} backend has no batching rule"):
        torch.func.vmap(loss)(torch.stack([student, student]))


def test_teacher_gets_no_gradient(backend, device):
    student, teacher, labels = make_batch(8, device=device)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    EKDLoss(backend=backend).to(device)(student, teacher, labels).backward()
    assert teacher.grad is None and student.grad is not None


# ----------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("make,match", [
    (lambda d: (torch.randn(1, 4), torch.randn(1, 4), torch.zeros(1, dtype=torch.long)), "at least 2"),
    (lambda d: (torch.randn(4, 2, 2), torch.randn(4, 4), torch.zeros(4, dtype=torch.long)), "student.*2-D"),
    (lambda d: (torch.randn(4, 4), torch.randn(4), torch.zeros(4, dtype=torch.long)), "teacher.*2-D"),
    (lambda d: (torch.randn(4, 4), torch.randn(5, 4), torch.zeros(4, dtype=torch.long)), "same number of rows"),
    (lambda d: (torch.randn(4, 4), torch.randn(4, 4), torch.zeros(4, 1, dtype=torch.long)), "labels must be 1-D"),
    (lambda d: (torch.randn(4, 4), torch.randn(4, 4), torch.zeros(3, dtype=torch.long)), "length B=4"),
    (lambda d: (torch.randn(4, 4), torch.randn(4, 4), torch.zeros(4)), "integer"),
    (lambda d: (torch.randn(4, 4), torch.randn(4, 4, device="meta"), torch.zeros(4, dtype=torch.long)),
     "same device"),
    (lambda d: (torch.ones(4, 4, dtype=torch.long), torch.randn(4, 4), torch.zeros(4, dtype=torch.long)),
     "float"),
    (lambda d: (torch.randn(4, 4).to_sparse(), torch.randn(4, 4), torch.zeros(4, dtype=torch.long)),
     "student must be a dense .strided. tensor, got layout torch.sparse_coo"),
    (lambda d: (torch.randn(4, 4), torch.randn(4, 4).to_sparse(), torch.zeros(4, dtype=torch.long)),
     "teacher must be a dense .strided. tensor, got layout torch.sparse_coo"),
])
def test_bad_input_raises_value_error_naming_it(make, match):
    student, teacher, labels = make(None)
    with pytest.raises(ValueError, match=match):
        EKDLoss()(student, teacher, labels)


def test_bad_options_raise_value_error():
    for options, match in [(dict(fprs=()), "fprs"), (dict(fprs=(0.1, 1.5)), "FPR"), (dict(temperature=0), "temperature"),
                           (dict(num_hard_negatives=-1), "num_hard_negatives"), (dict(momentum=2), "momentum"),
                           # the bounds themselves: (0, 1) open for an FPR, [0, 1] closed for the momentum
                           (dict(fprs=(0.0,)), "every FPR must lie in"), (dict(fprs=(0.1, 0.0)), "every FPR"),
                           (dict(fprs=(-0.1,)), "every FPR must lie in"), (dict(momentum=1 + 1e-9), "momentum"),
                           (dict(momentum=-1e-9), "momentum"),
                           (dict(rank_loss="eq9"), "rank_loss"), (dict(negative_selection="x"), "negative_selection"),
                           (dict(backend="cuda"), "backend")]:
        with pytest.raises(ValueError, match=match):
            EKDLoss(**options)
    for momentum in (0.0, 1.0):
        assert EKDLoss(momentum=momentum).config.momentum == momentum


def test_small_fprs_are_read_as_exact_fractions():
    """The threshold index floor(L * fpr) reads each FPR as its nearest fraction of denominator at
    most 10^12, so FPRs far below the defaults' 1e-6 keep their index (a denominator bound of
    10^6 read 1e-7 as 0: the hardest negative, at every L)."""
    config = EKDConfig(fprs=(1e-7, 3e-8, 1e-9))
    assert config.threshold_indices(10 ** 10) == (1000, 300, 10)
    assert config.threshold_indices(10 ** 7 - 1) == (0, 0, 0)


def test_eval_loss_reads_the_state_without_this_batch(backend, device):
    """In eval mode the loss is measured against the thresholds as they were, not as this batch
    would move them (an eval or validation loss must not depend on an update it does not make);
    the buffers and last_stats' thresholds stay as they were."""
    student, teacher, labels = make_batch(24, 8, 6, num_identities=8, seed=3, device=device)
    crit = EKDLoss(backend=backend, momentum=0.5).to(device)
    crit(*make_batch(24, 8, 6, num_identities=8, seed=4, device=device))  # a state that is not zero
    state = crit.student_thresholds.clone(), crit.teacher_thresholds.clone()
    loss = crit.eval()(student, teacher, labels)
    frozen = ekd_loss(student, teacher, labels, *state, update_thresholds=False, backend=backend, momentum=0.5)
    moved = ekd_loss(student, teacher, labels, *state, update_thresholds=True, backend=backend, momentum=0.5)
    assert not torch.equal(frozen.loss, moved.loss), "the case must tell the two apart"
    assert torch.equal(loss, frozen.loss)
    assert torch.equal(crit.student_thresholds, state[0]) and torch.equal(crit.teacher_thresholds, state[1])
    assert torch.equal(crit.last_stats.student_thresholds, state[0])


def test_a_calls_generator_wins_over_the_modules():
    """generator= at the call is used instead of the module's own, which stays where it was (a
    resumed run replays the module's draws only if nothing else moved them)."""
    student, teacher, labels = make_batch(24, 8, 6, num_identities=8, seed=5)
    options = dict(negative_selection="random", num_hard_negatives=10, backend="reference")
    own = torch.Generator().manual_seed(1)
    before = own.get_state().clone()
    loss = EKDLoss(generator=own, **options)(student, teacher, labels, generator=torch.Generator().manual_seed(2))
    want = ekd_loss(student, teacher, labels, generator=torch.Generator().manual_seed(2), **options).loss
    other = ekd_loss(student, teacher, labels, generator=torch.Generator().manual_seed(1), **options).loss
    assert not torch.equal(want, other), "the case must tell the two generators apart"
    assert torch.equal(loss, want) and torch.equal(own.get_state(), before)


@pytest.mark.parametrize("options, match", [
    # a string from a config file or the command line must not switch a variant on
    (dict(critical_only="False"), "critical_only must be True or False"),
    (dict(compute_critical_ratio=1), "compute_critical_ratio must be True or False"),
    (dict(critical_only=None), "critical_only must be True or False"),
    # numbers must be numbers: no str, None, bool or tensor standing for one
    (dict(temperature="0.01"), "temperature must be a real number"),
    (dict(temperature=None), "temperature must be a real number"),
    (dict(temperature=True), "temperature must be a real number"),
    (dict(momentum=True), "momentum must be a real number"),
    (dict(momentum=torch.tensor(0.01)), "momentum must be a real number"),
    (dict(positive_weight="1"), "positive_weight must be a real number"),
    (dict(negative_weight=float("inf")), "negative_weight must be finite"),
    (dict(fprs=0.1), "fprs must be a sequence"),
    (dict(fprs="0.1"), "fprs must be a sequence"),
    (dict(fprs=numpy.array(0.1)), "fprs must be a sequence"),  # 0-d: iterating it raised TypeError
    (dict(fprs=(0.1, None)), "every FPR must be a real number"),
    # an FPR within 1e-12 of 1 reads as the fraction 1: index L, past the last negative
    (dict(fprs=(0.1, 0.999999999999999)), r"within 1e-12 of 1"),
    (dict(num_hard_negatives=float("inf")), "num_hard_negatives must be an integer"),
    (dict(num_hard_negatives=float("nan")), "num_hard_negatives must be an integer"),
    (dict(num_hard_negatives=2**70), "num_hard_negatives must be an integer"),
    (dict(num_hard_negatives="2000"), "num_hard_negatives must be an integer"),
    # tau is divided by in fp32, where 1e-300 is 0
    (dict(temperature=1e-300), "temperature must be a finite number >="),
    (dict(rank_loss=["eq7"]), "rank_loss must be one of"),
])
def test_option_types_are_checked(options, match):
    with pytest.raises(ValueError, match=match):
        EKDConfig(**options)
    with pytest.raises(ValueError, match=match):
        EKDLoss(**options)


@pytest.mark.parametrize("value", ["False", "True", 0, 1, None, torch.tensor(True)], ids=repr)
def test_update_thresholds_must_be_a_bool(backend, device, value):
    """The backends read a non-bool apart (a truthy "False" updated the state on the fused ones, the
    reference failed deep inside torch): every backend refuses it first, naming it."""
    student, teacher, labels = make_batch(8, device=device)
    with pytest.raises(ValueError, match="update_thresholds must be True or False, got"):
        ekd_loss(student, teacher, labels, backend=backend, update_thresholds=value)


def test_update_thresholds_takes_numpy_bools(backend, device):
    """As EKDConfig's flags: numpy.bool_ reads as the bool it is."""
    student, teacher, labels = make_batch(8, device=device)
    kept = ekd_loss(student, teacher, labels, backend=backend, update_thresholds=numpy.bool_(False))
    moved = ekd_loss(student, teacher, labels, backend=backend, update_thresholds=numpy.bool_(True))
    assert torch.equal(kept.student_thresholds, torch.zeros_like(kept.student_thresholds))
    assert not torch.equal(moved.student_thresholds, kept.student_thresholds)


def test_unknown_option_keyword_is_named():
    with pytest.raises(ValueError, match=r"unknown EKD option\(s\) \['critical', 'tau'\]; the options are"):
        ekd_loss(*make_batch(8), tau=0.01, critical=True)


def test_generator_and_config_types_are_checked():
    student, teacher, labels = make_batch(8)
    with pytest.raises(ValueError, match="generator must be a torch.Generator or None, got 5"):
        EKDLoss(generator=5)
    with pytest.raises(ValueError, match="generator must be a torch.Generator or None, got 5"):
        EKDLoss()(student, teacher, labels, generator=5)
    with pytest.raises(ValueError, match="generator must be a torch.Generator"):
        ekd_loss(student, teacher, labels, negative_selection="random", generator=5)
    with pytest.raises(ValueError, match="config must be an EKDConfig"):
        ekd_loss(student, teacher, labels, config={"temperature": 0.1})


def test_options_are_stored_as_python_values():
    """numpy scalars and arrays are numbers and sequences like any other; the config holds plain
    floats, ints and bools, whatever the caller passed."""
    import numpy

    config = EKDConfig(fprs=numpy.array([0.1, 0.01]), temperature=numpy.float32(0.5), num_hard_negatives=numpy.int64(7),
                       momentum=0, positive_weight=1, critical_only=numpy.bool_(True))
    assert config.fprs == (0.1, 0.01) and type(config.fprs[0]) is float
    assert type(config.temperature) is float and config.temperature == 0.5
    assert type(config.num_hard_negatives) is int and config.num_hard_negatives == 7
    assert type(config.momentum) is float and type(config.positive_weight) is float
    assert config.critical_only is True


def test_fpr_ratios_are_the_exact_rationals():
    """The integers the ops read the FPRs as (1e-6 is 1/1000000, though the float lies below it),
    also for a config unpickled from a version that did not store them."""
    import pickle

    config = EKDConfig(fprs=(1e-6, 0.1, 3e-4))
    assert config.fpr_ratios == ((1, 1, 3), (1000000, 10, 10000))
    assert config.threshold_indices(10**6 - 1) == (0, 99999, 299)
    del config.__dict__["_fpr_ratios"]
    assert pickle.loads(pickle.dumps(config)).fpr_ratios == ((1, 1, 3), (1000000, 10, 10000))


def test_no_positive_pair_gives_zero_positive_term(backend, device):
    student, teacher, _ = make_batch(10, device=device)
    crit = EKDLoss(backend=backend).to(device)
    loss = crit(student, teacher, torch.arange(10, device=device))
    assert torch.isfinite(loss)
    assert crit.last_stats.positive_term.item() == 0.0 and crit.last_stats.num_positive_pairs.item() == 0


def test_no_negative_pair_leaves_thresholds(backend, device):
    student, teacher, labels = make_batch(10, device=device)
    crit = EKDLoss(backend=backend).to(device)
    crit(student, teacher, labels)
    before = crit.student_thresholds.clone(), crit.teacher_thresholds.clone()
    loss = crit(student, teacher, torch.full((10,), 3, device=device))
    assert torch.isfinite(loss)
    assert crit.last_stats.negative_term.item() == 0.0
    assert torch.equal(crit.student_thresholds, before[0]) and torch.equal(crit.teacher_thresholds, before[1])


def test_zero_row_stays_finite(backend, device):
    student, teacher, labels = make_batch(8, device=device)
    student[3] = 0
    teacher[5] = 0
    student.requires_grad_(True)
    loss = EKDLoss(backend=backend).to(device)(student, teacher, labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


def test_normalisation_is_f_normalize():
    """Stage 1 is the authors' F.normalize, bit for bit, down to its overflow: a finite row of
    magnitude ~1e20 has an fp32 norm of inf and becomes a zero row; a tiny row stays tiny."""
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    x[1] *= 1e20
    x[2] *= 1e-30
    x[3] = 0
    got = reference.normalize_rows(x)
    assert torch.equal(got, torch.nn.functional.normalize(x, dim=1))
    assert torch.equal(got[1], torch.zeros(8))


def test_non_contiguous_and_expanded_inputs(backend, device):
    student, teacher, labels = make_batch(12, 8, 6, seed=2, device=device)
    views = (student.t().contiguous().t(),                        # transposed storage
             torch.cat([teacher, teacher], 1)[:, ::2],            # strided columns
             labels.view(1, -1).expand(2, -1)[1])                 # a view of a stride-1 row
    expanded = (student[:1].expand(12, -1), teacher[:1].expand(12, -1))  # stride 0
    for s, t, lab in [(views[0], teacher, labels), (student, views[1], labels), (student, teacher, views[2]),
                      (expanded[0], teacher, labels), (student, expanded[1], labels)]:
        s = s.detach().requires_grad_(True)
        s_copy = s.detach().clone().requires_grad_(True)
        got = EKDLoss(backend=backend).to(device)(s, t, lab)
        want = EKDLoss(backend=backend).to(device)(s_copy, t.contiguous(), lab.contiguous())
        got.backward()
        want.backward()
        assert torch.equal(got, want)
        assert torch.equal(s.grad, s_copy.grad)


@pytest.mark.parametrize("ratio", [False, True], ids=["", "critical_ratio"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["student", "teacher"])
def test_non_finite_batch_gives_nan_and_keeps_state(backend, device, bad, where, ratio):
    crit = EKDLoss(backend=backend, compute_critical_ratio=ratio).to(device)
    crit(*make_batch(16, seed=0, device=device))
    before = crit.student_thresholds.clone(), crit.teacher_thresholds.clone()
    student, teacher, labels = make_batch(16, seed=1, device=device)
    (student if where == "student" else teacher)[4, 2] = bad
    student.requires_grad_(True)
    loss = crit(student, teacher, labels)
    assert torch.isnan(loss)
    # its statistics too, on every backend (a logger must not show finite terms beside a NaN loss)
    stats = crit.last_stats
    for name in ("positive_term", "negative_term", "batch_student_thresholds", "batch_teacher_thresholds") \
            + ("critical_ratio",) * ratio:
        assert torch.isnan(getattr(stats, name)).all(), f"{name}: {getattr(stats, name)}"
    # a gradient scaler decides from the gradients, not the loss: NaN throughout, on every backend
    loss.backward()
    assert torch.isnan(student.grad).all()
    assert torch.equal(crit.student_thresholds, before[0]) and torch.equal(crit.teacher_thresholds, before[1])
    # the next good batch proceeds from the untouched state
    assert torch.isfinite(crit(*make_batch(16, seed=2, device=device)))


@pytest.mark.parametrize("finite", [True, False], ids=["finite", "non_finite"])
def test_statistics_dtypes_ignore_the_default_dtype(backend, device, finite):
    """The statistics' dtypes do not follow torch.set_default_dtype: with fp64 as the default
    and fp32 inputs, the critical ratio (NaN for a non-finite batch) and the terms are fp32 on
    every backend (the reference and csrc built their NaN in the default dtype, and the critical
    ratio came out fp64 there, fp32 on Triton)."""
    student, teacher, labels = make_batch(20, 6, seed=2, device=device)
    if not finite:
        teacher[3, 1] = float("inf")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        result = ekd_loss(student, teacher, labels, backend=backend, compute_critical_ratio=True)
    finally:
        torch.set_default_dtype(previous)
    stats = result.stats
    for name in ("critical_ratio", "positive_term", "negative_term", "batch_student_thresholds"):
        assert getattr(stats, name).dtype == torch.float32, f"{name}: {getattr(stats, name).dtype}"
    assert result.loss.dtype == torch.float32
    assert bool(torch.isnan(stats.critical_ratio)) == (not finite)


@pytest.mark.parametrize("options", [dict(), dict(critical_only=True), dict(negative_selection="random")],
                         ids=["default", "critical_only", "random"])
def test_non_finite_row_outside_every_pair_poisons_the_gradient(backend, device, options):
    """A non-finite teacher row that takes part in no distilled pair (no positive partner, none
    of its pairs among the selected negatives) leaves every pair's terms finite: through the
    loss's NaN alone the gradient would be 0 or finite, and a gradient scaler, which reads the
    gradients, would take the step.  Every backend gives a NaN loss and a gradient NaN
    throughout, and a GradScaler skips the step (the parameter and the state unchanged)."""
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(8, 4, generator=generator, dtype=torch.float64).float()
    student[0] = -student[1:].sum(0)  # row 0 far from the others: none of its pairs is the hardest
    labels = torch.tensor([0, 1, 1, 2, 2, 3, 3, 4])  # row 0 without a positive partner
    teacher = torch.randn(8, 4, generator=generator, dtype=torch.float64).float()
    teacher[0, 0] = float("nan")
    student, teacher, labels = student.to(device), teacher.to(device), labels.to(device)
    crit = EKDLoss(backend=backend, num_hard_negatives=1, **options).to(device)
    before = crit.student_thresholds.clone()
    parameter = torch.nn.Parameter(student.clone())
    optimizer = torch.optim.SGD([parameter], lr=0.1, weight_decay=0.1)  # (a step would move it even at 0 gradient)
    scaler = torch.amp.GradScaler(torch.device(device).type)
    extra = dict(generator=torch.Generator().manual_seed(1)) if options.get("negative_selection") else {}
    loss = crit(parameter, teacher, labels, **extra)
    assert torch.isnan(loss)
    scaler.scale(loss).backward()
    assert torch.isnan(parameter.grad).all(), parameter.grad
    scaler.step(optimizer)
    scaler.update()
    assert torch.equal(parameter.detach(), student)  # the step was skipped
    assert torch.equal(crit.student_thresholds, before)


@pytest.mark.parametrize("options", [dict(), dict(critical_only=True), dict(update_thresholds=False)],
                         ids=["default", "critical_only", "frozen"])
@pytest.mark.parametrize("where", ["student", "teacher"])
def test_non_finite_threshold_state_gives_nan(backend, device, where, options):
    """A NaN in the threshold state a caller passes to ekd_loss (EKDLoss refuses one in a
    checkpoint) gives a NaN loss on every backend, as the reference's clamped sigmoid does: never
    a finite loss from a corrupt state."""
    student, teacher, labels = make_batch(30, seed=5, device=device)
    thresholds = [torch.linspace(0.05, 0.4, 6, device=device) for _ in range(2)]
    thresholds[0 if where == "student" else 1][2] = float("nan")
    result = ekd_loss(student.requires_grad_(True), teacher, labels, *thresholds, backend=backend,
                      compute_critical_ratio=True, **options)
    assert torch.isnan(result.loss), f"{backend}: {result.loss}"
    # the batch itself is finite: its critical ratio is a ratio of counts, as the reference's
    assert torch.isfinite(result.stats.critical_ratio), f"{backend}: {result.stats.critical_ratio}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(backend, device, dtype):
    student, teacher, labels = make_batch(24, 16, seed=4, device=device)
    low = student.to(dtype).requires_grad_(True)
    loss = EKDLoss(backend=backend).to(device)(low, teacher.to(dtype), labels)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert low.grad.dtype == dtype
    # the same rounded inputs in fp32 give the same loss (low precision is read, then computed in fp32)
    rounded = low.detach().float().requires_grad_(True)
    ref = EKDLoss(backend=backend).to(device)(rounded, teacher.to(dtype).float(), labels)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert_grad_close(low.grad.float(), rounded.grad, tol=1e-2)
    # and it stays close to the unrounded fp32 loss
    full = EKDLoss(backend=backend).to(device)(student, teacher, labels)
    assert loss.item() == pytest.approx(full.item(), rel=0.1)


def test_autocast_region_changes_nothing(backend, device):
    """AMP: the loss called inside torch.autocast (where a training step usually calls it) is
    the same call as outside: autocast would run the similarity products in bf16, and tau = 0.01
    turns that rounding into wrong thresholds (SPEC: low precision is computed in fp32); a
    compiled op's internal ATen calls would return bf16 to a kernel that reads fp32. The student
    embeddings come from a layer run under autocast (bf16), as in training, in both runs; the
    backward runs after the autocast region, as PyTorch's AMP recipe has it."""
    student, teacher, labels = make_batch(60, 16, 16, 15, seed=3, device=device)
    layer = torch.nn.Linear(16, 12).to(device)
    teacher = teacher[:, :12].to(torch.bfloat16)

    def step(amp):
        layer.zero_grad()
        crit = EKDLoss(backend=backend).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            embeddings = layer(student)  # bf16, the same in both runs
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = crit(embeddings, teacher, labels)
        loss.backward()
        return loss.detach(), layer.weight.grad.clone(), crit.student_thresholds, crit.teacher_thresholds

    plain, amp = step(False), step(True)
    for name, a, b in zip(("loss", "weight gradient", "student thresholds", "teacher thresholds"), plain, amp):
        assert torch.equal(a, b), f"{name} differs under autocast"


# ----------------------------------------------------------------------------- state
def test_buffers_state_dict_round_trip_resumes(backend, device):
    batches = [make_batch(20, seed=s, device=device) for s in range(3)]
    crit = EKDLoss(backend=backend).to(device)
    for b in batches[:2]:
        crit(*b)
    assert set(crit.state_dict()) == {"student_thresholds", "teacher_thresholds", "_extra_state"}
    assert crit.state_dict()["_extra_state"] == {"fprs": list(DEFAULT_FPRS)}
    assert crit.student_thresholds.shape == (6,) and crit.student_thresholds.dtype == torch.float32
    buffer = io.BytesIO()
    torch.save(crit.state_dict(), buffer)
    resumed = EKDLoss(backend=backend).to(device)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(crit(*batches[2]), resumed(*batches[2]))
    assert torch.equal(crit.student_thresholds, resumed.student_thresholds)
    assert torch.equal(crit.teacher_thresholds, resumed.teacher_thresholds)


def test_thresholds_follow_fpr_order(backend, device):
    crit = EKDLoss(backend=backend).to(device)
    crit(*make_batch(64, seed=9, num_identities=40, device=device))
    for t in (crit.student_thresholds, crit.teacher_thresholds):
        assert torch.all(t[:-1] <= t[1:]), "FPR 1e-1 first: thresholds grow as the FPR falls"


def test_eval_freezes_thresholds(backend, device):
    crit = EKDLoss(backend=backend).to(device)
    crit(*make_batch(16, seed=0, device=device))
    frozen = copy.deepcopy(crit.state_dict())
    crit.eval()
    loss = crit(*make_batch(16, seed=1, device=device))
    assert torch.isfinite(loss)
    for k, v in crit.state_dict().items():
        assert torch.equal(v, frozen[k]) if isinstance(v, torch.Tensor) else v == frozen[k]
    crit.train()
    crit(*make_batch(16, seed=1, device=device))
    assert not torch.equal(crit.student_thresholds, frozen["student_thresholds"])


def test_functional_form_matches_module(backend, device):
    batches = [make_batch(20, seed=s, device=device) for s in range(2)]
    crit = EKDLoss(backend=backend).to(device)
    st = tt = None
    for b in batches:
        result = ekd_loss(*b, st, tt, backend=backend)
        st, tt = result.student_thresholds, result.teacher_thresholds
        assert torch.equal(result.loss, crit(*b))
        assert torch.equal(st, crit.student_thresholds) and torch.equal(tt, crit.teacher_thresholds)
    frozen = ekd_loss(*batches[0], st, tt, update_thresholds=False, backend=backend)
    assert torch.equal(frozen.student_thresholds, st)


def test_functional_rejects_bad_thresholds(device):
    student, teacher, labels = make_batch(6, device=device)
    with pytest.raises(ValueError, match="student_thresholds must have shape"):
        ekd_loss(student, teacher, labels, torch.zeros(5, device=device), torch.zeros(6, device=device))
    with pytest.raises(ValueError, match="either config"):
        ekd_loss(student, teacher, labels, config=EKDConfig(), temperature=0.1)
    with pytest.raises(ValueError, match="teacher_thresholds must be float32"):
        ekd_loss(student, teacher, labels, torch.zeros(6, device=device), torch.zeros(6, device=device).half())
    with pytest.raises(ValueError, match="must be a floating|must be float32"):
        ekd_loss(student, teacher, labels, torch.zeros(6, dtype=torch.int64, device=device),
                 torch.zeros(6, device=device))
    with pytest.raises(ValueError, match="must have the same dtype, got torch.float64 and torch.float32"):
        ekd_loss(student, teacher, labels, torch.zeros(6, dtype=torch.float64, device=device),
                 torch.zeros(6, device=device))


def test_thresholds_carry_no_gradient(backend, device):
    """SPEC 8: the gradient flows to the student only, even when the caller's threshold state
    requires one; the results are those of a state that does not."""
    student, teacher, labels = make_batch(12, device=device)
    previous = [torch.linspace(-0.2, 0.3, 6, device=device), torch.linspace(0.1, 0.5, 6, device=device)]
    tracked = [t.clone().requires_grad_() for t in previous]
    leaf = student.clone().requires_grad_()
    got = ekd_loss(leaf, teacher, labels, *tracked, backend=backend)
    want = ekd_loss(student, teacher, labels, *previous, backend=backend)
    got.loss.backward()
    assert all(t.grad is None for t in tracked) and leaf.grad is not None
    assert not got.student_thresholds.requires_grad and not got.teacher_thresholds.requires_grad
    assert torch.equal(got.loss, want.loss) and torch.equal(got.student_thresholds, want.student_thresholds)


@pytest.mark.parametrize("cast", ["half", "bfloat16"])
def test_module_cast_to_16_bits_keeps_fp32_thresholds(backend, device, cast):
    """A module cast with .half()/.bfloat16() (say, with the model it sits in) keeps its EMA in
    fp32, bit for bit: in 16 bits a step of 0.01 x the change vanishes, and the rounding would
    change the state a run resumes from.  It then computes what an uncast module computes."""
    batches = [make_batch(8, seed=s, device=device) for s in range(3)]
    crit, plain = EKDLoss(backend=backend).to(device), EKDLoss(backend=backend).to(device)
    for crit_ in (crit, plain):
        crit_(*batches[0])
    before = crit.student_thresholds.clone(), crit.teacher_thresholds.clone()
    getattr(crit, cast)()
    for name, value in zip(("student_thresholds", "teacher_thresholds"), before):
        assert getattr(crit, name).dtype == torch.float32 and torch.equal(getattr(crit, name), value), name
    low = [(s.to(getattr(torch, cast if cast != "half" else "float16")), t, lab) for s, t, lab in batches[1:]]
    for b in low:
        assert torch.equal(crit(*b), plain(*b))
        assert torch.equal(crit.student_thresholds, plain.student_thresholds)
        assert torch.equal(crit.teacher_thresholds, plain.teacher_thresholds)
    # casts other than 16-bit apply as before: fp64 state (the gradcheck set-up), then back
    assert crit.double().student_thresholds.dtype == torch.float64
    assert crit.float().student_thresholds.dtype == torch.float32


def test_checkpoint_of_other_fprs_or_non_finite_is_refused():
    """The state_dict records the FPRs: thresholds of other FPRs (same K) would load silently and
    be used as if they were this module's.  Refused, as are non-finite thresholds (never a state
    of this module); either way nothing is copied."""
    saved = EKDLoss()
    saved(*make_batch(16, seed=0))
    state = saved.state_dict()
    other = EKDLoss(fprs=(0.2, 0.02, 1e-3, 1e-4, 1e-5, 1e-6))
    with pytest.raises(RuntimeError, match=r"belong to fprs=\(0.1, 0.01.*this EKDLoss has fprs=\(0.2, 0.02"):
        other.load_state_dict(state)
    assert torch.equal(other.student_thresholds, torch.zeros(6))
    for name in ("student_thresholds", "teacher_thresholds"):
        corrupted = dict(state, **{name: torch.tensor([0.1, float("nan"), 0.2, 0.3, 0.4, 0.5])})
        fresh = EKDLoss()
        with pytest.raises(RuntimeError, match=f"{name} in the checkpoint is not finite"):
            fresh.load_state_dict(corrupted)
        assert torch.equal(fresh.student_thresholds, torch.zeros(6))
        assert torch.equal(fresh.teacher_thresholds, torch.zeros(6))


@pytest.mark.parametrize("name", ["student_thresholds", "teacher_thresholds"])
@pytest.mark.parametrize("change, match", [
    (lambda x: x[:3], r"has shape \(3,\), but this EKDLoss's has shape \(6,\)"),
    (lambda x: x.reshape(2, 3), r"has shape \(2, 3\), but this EKDLoss's has shape \(6,\)"),
    (lambda x: x.long(), "is torch.int64, but this EKDLoss holds floating values there"),
    (lambda x: x > 0, "is torch.bool, but this EKDLoss holds floating values there"),
    (lambda x: x.to(torch.complex64), "is torch.complex64, but this EKDLoss holds floating values there"),
], ids=["fewer", "2-D", "int64", "bool", "complex"])
def test_checkpoint_of_another_shape_or_dtype_kind_is_refused(name, change, match):
    """A threshold buffer of another shape (torch's own check came after the buffers before it
    were copied: a half-loaded module) or of a non-floating dtype (cast and loaded silently
    before) is refused by name, nothing copied, whichever of the two it is."""
    saved = EKDLoss()
    saved(*make_batch(16, seed=0))
    state = dict(saved.state_dict())
    state[name] = change(state[name])
    fresh = EKDLoss()
    with pytest.raises(RuntimeError, match=f"{name} in the checkpoint {match}"):
        fresh.load_state_dict(state)
    assert torch.equal(fresh.student_thresholds, torch.zeros(6))
    assert torch.equal(fresh.teacher_thresholds, torch.zeros(6))
    fresh.load_state_dict(saved.state_dict())  # a good one loads; other floating dtypes too
    fresh.load_state_dict({k: v.double() if torch.is_tensor(v) else v for k, v in saved.state_dict().items()})
    assert torch.equal(fresh.student_thresholds, saved.student_thresholds)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_assigned_16_bit_thresholds_stay_in_fp32(dtype):
    """load_state_dict(assign=True) of a checkpoint whose thresholds were saved in 16 bits leaves
    them in fp32 (their values, which widen exactly), as a copying load does and as the module's
    own 16-bit casts keep them: the module then runs (it refuses 16-bit thresholds, where the
    EMA stalls) and continues as the copying load's does; a non-contiguous one comes in
    contiguous."""
    saved = EKDLoss()
    saved(*make_batch(16, seed=0))
    state = {k: v.to(dtype) if k.endswith("thresholds") else v for k, v in saved.state_dict().items()}
    assigned, copied = EKDLoss(), EKDLoss()
    assigned.load_state_dict(state, assign=True)
    copied.load_state_dict(state)
    for name in ("student_thresholds", "teacher_thresholds"):
        assert getattr(assigned, name).dtype == torch.float32
        assert torch.equal(getattr(assigned, name), getattr(copied, name))
    batch = make_batch(16, seed=1)
    assert torch.equal(assigned(*batch), copied(*batch))
    strided = dict(saved.state_dict(), student_thresholds=torch.stack([saved.student_thresholds] * 2, 1)[:, 0])
    assigned.load_state_dict(strided, assign=True)  # fp32 with stride 2
    assert assigned.student_thresholds.is_contiguous()
    assert torch.equal(assigned.student_thresholds, saved.student_thresholds)
    doubled = EKDLoss().double()  # a wider module keeps its own width
    doubled.load_state_dict(state, assign=True)
    assert doubled.student_thresholds.dtype == torch.float64


def test_checkpoint_from_before_the_extra_state_loads():
    """State dicts that hold only the two buffers (this package before it saved the FPRs) load
    with strict=True; one saved by this version must carry its extra state."""
    saved = EKDLoss()
    saved(*make_batch(16, seed=0))
    buffers = {name: getattr(saved, name).clone() for name in ("student_thresholds", "teacher_thresholds")}
    resumed = EKDLoss()
    resumed.load_state_dict(buffers)
    assert torch.equal(resumed.student_thresholds, saved.student_thresholds)
    current = saved.state_dict()
    del current["_extra_state"]
    with pytest.raises(RuntimeError, match="_extra_state"):
        EKDLoss().load_state_dict(current)  # carries this version's metadata: the key is expected


@pytest.mark.parametrize("extra, match", [
    ({"generator_state": torch.zeros(3, dtype=torch.uint8)}, r"_extra_state\['generator_state'\] is not a state of "
     r"this module's generator \(cpu generator\): .*size"),
    ({"generator_state": "seed"}, r"_extra_state\['generator_state'\] is not a state .*: a str"),
    ({"generator_state": "meta"}, r"_extra_state\['generator_state'\] is not a state .*on the meta device"),
    ({"fprs": 0.1}, r"_extra_state\['fprs'\] must be a sequence of false-positive rates, got 0.1"),
    ({"fprs": ["a"]}, r"_extra_state\['fprs'\] must be a sequence of false-positive rates"),
    (5, "_extra_state must be a dict .*got int"),
], ids=["generator-size", "generator-str", "generator-meta", "fprs-float", "fprs-str", "not-a-dict"])
def test_checkpoint_of_a_bad_extra_state_is_refused_before_anything_is_copied(extra, match):
    """The extra state (FPRs, the module generator's state) is checked with the thresholds, before
    anything is copied: a generator state of another generator, or of the meta device, failed in
    set_extra_state with torch's own message, after the checkpoint's thresholds had replaced the
    module's; a float for the FPRs failed as a bare TypeError."""
    def make():
        return EKDLoss(negative_selection="random", num_hard_negatives=20, generator=torch.Generator().manual_seed(5))

    saved = make()
    saved(*make_batch(16, seed=0))
    state = saved.state_dict()
    if isinstance(extra, dict):
        if extra.get("generator_state") == "meta":
            extra = {"generator_state": state["_extra_state"]["generator_state"].to("meta")}
        extra = dict(state["_extra_state"], **extra)
    fresh = make()
    with pytest.raises(RuntimeError, match=match):
        fresh.load_state_dict(dict(state, _extra_state=extra))
    assert torch.equal(fresh.student_thresholds, torch.zeros(6))
    assert torch.equal(fresh.teacher_thresholds, torch.zeros(6))
    assert torch.equal(fresh.generator.get_state(), make().generator.get_state())
    fresh.load_state_dict(state)  # the good one loads
    assert torch.equal(fresh.generator.get_state(), saved.generator.get_state())


def test_random_selection_resumes_with_the_module_generator(backend, device):
    """negative_selection="random" with the module's own generator: a run resumed from a
    state_dict draws the same negatives as the uninterrupted one, bit for bit."""
    batches = [make_batch(24, seed=s, device=device) for s in range(4)]
    options = dict(negative_selection="random", num_hard_negatives=20, backend=backend)
    crit = EKDLoss(generator=torch.Generator().manual_seed(5), **options).to(device)
    for b in batches[:2]:
        crit(*b)
    buffer = io.BytesIO()
    torch.save(crit.state_dict(), buffer)
    buffer.seek(0)
    resumed = EKDLoss(generator=torch.Generator().manual_seed(123), **options).to(device)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for b in batches[2:]:
        assert torch.equal(crit(*b), resumed(*b))
        assert torch.equal(crit.student_thresholds, resumed.student_thresholds)


def test_activation_checkpointing_in_training_mode_is_refused(backend, device):
    """torch.utils.checkpoint recomputes the forward during backward, where a training-mode
    EKDLoss would see (and redo) its own threshold update and give the gradient of another loss.
    Refused with the remedy; in eval mode (no update) and in the functional form (explicit state)
    the recomputation is exact."""
    from torch.utils.checkpoint import checkpoint

    student, teacher, labels = make_batch(16, seed=3, device=device)
    for reentrant in (False, True):
        leaf = student.clone().requires_grad_()
        loss = checkpoint(EKDLoss(backend=backend).to(device), leaf, teacher, labels, use_reentrant=reentrant)
        with pytest.raises(RuntimeError, match="inside a backward pass"):
            loss.backward()

    def gradient(loss_fn, wrap, create_graph=False):
        leaf = student.clone().requires_grad_()
        loss = checkpoint(loss_fn, leaf, teacher, labels, use_reentrant=False) if wrap else loss_fn(leaf, teacher,
                                                                                                    labels)
        (grad,) = torch.autograd.grad(loss, leaf, create_graph=create_graph)
        return grad.detach()

    state = EKDLoss(backend=backend).to(device)
    state(*make_batch(16, seed=4, device=device))
    frozen = state.eval()
    assert torch.equal(gradient(frozen, True), gradient(frozen, False))
    functional = functools.partial(lambda s, t, y: ekd_loss(s, t, y, backend=backend).loss)
    assert torch.equal(gradient(functional, True), gradient(functional, False))
    # create_graph=True (for a penalty on another term): the checkpoint unpacks each saved tensor
    # once, so the refusal of a second derivative must not unpack them again
    assert torch.equal(gradient(functional, True, create_graph=True), gradient(functional, False))


def test_activation_checkpointing_with_random_selection_is_refused(backend, device):
    """An eval() module or ekd_loss with explicit thresholds recomputes the hardest selection
    exactly under torch.utils.checkpoint, but not a random one: the recomputation drew other
    negatives from the generator (checkpoint restores the global RNG only) and advanced it again,
    so the loss was the first draw's and the gradient the second's, silently.  Refused on every
    backend, both kinds of checkpoint, eager and compiled; in eager before the generator moves
    again."""
    from torch.utils.checkpoint import checkpoint

    student, teacher, labels = make_batch(32, seed=3, device=device)
    options = dict(negative_selection="random", num_hard_negatives=20, backend=backend)
    one_draw = torch.Generator(device).manual_seed(1)
    EKDLoss(generator=one_draw, **options).to(device).eval()(student, teacher, labels)
    thresholds = (torch.full((6,), 0.1, device=device), torch.full((6,), 0.05, device=device))

    def functional(generator):
        return lambda s, t, y: ekd_loss(s, t, y, *thresholds, generator=generator, **options).loss

    def module(generator):
        return EKDLoss(generator=generator, **options).to(device).eval()

    def compiled_module(generator):
        # (fullgraph off: the draw reads the generator, where Dynamo breaks the graph)
        return torch.compile(module(generator), backend="aot_eager")

    for make in (module, functional, compiled_module):
        for reentrant in (False, True):
            generator = torch.Generator(device).manual_seed(1)
            loss = checkpoint(make(generator), student.clone().requires_grad_(), teacher, labels,
                              use_reentrant=reentrant)
            with pytest.raises(RuntimeError, match='negative_selection="random" ran inside a backward pass'):
                loss.backward()
            if make is not compiled_module:  # (compiled, the op that refuses reads the drawn ranks)
                assert torch.equal(generator.get_state(), one_draw.get_state()), (make.__name__, reentrant)

    # a draw in a plain backward's hook (grad mode off: no recomputation), say a metric, is not refused
    crit, drawn = module(torch.Generator(device).manual_seed(1)), []
    weight = torch.ones(3, device=device, requires_grad=True)
    weight.register_hook(lambda grad: drawn.append(crit(student, teacher, labels)) or grad)
    (weight * 2).sum().backward()
    assert torch.equal(drawn[0], EKDLoss(generator=torch.Generator(device).manual_seed(1), **options).to(device).eval()(
        student, teacher, labels))


def test_the_run_time_recomputation_checks_pass_opcheck(device):
    """The two ops through which a compiled loss checks at run time for a recomputation inside a
    backward pass (the stateful modules' state, a random selection's ranks): schema, fake
    implementation and the traced forms agree with eager."""
    from ekd_kernels.validation import random_draw_checked, read_state_checked

    torch.library.opcheck(random_draw_checked, (torch.tensor([5, 0, 3], device=device),))
    torch.library.opcheck(read_state_checked, ([torch.rand(6, device=device), torch.rand(6, device=device)],
                                               "EKDLoss", "updates its thresholds", "see the README"))


def test_activation_checkpointing_of_a_compiled_loss_is_refused(backend, device):
    """A torch.compile'd training-mode EKDLoss under torch.utils.checkpoint, both kinds.  Before,
    the eager rule's Python test ran only while tracing: the recomputation updated the thresholds
    a second time and the backward returned its gradient, silently.  Then the compiled update
    checked at run time, but the non-reentrant checkpoint (PyTorch's default) stops recomputing
    once it has its saved tensors, before that update where a graph break splits the forward
    (the reference): the gradient was the recomputed call's.  Now the forward's head reads the
    thresholds through an op that checks at run time (read_state_checked): both kinds are
    refused on every backend, and the state is one update."""
    from torch.utils.checkpoint import checkpoint

    student, teacher, labels = make_batch(16, seed=3, device=device)
    eager = EKDLoss(backend=backend).to(device)
    want = eager(student.clone().requires_grad_(), teacher, labels)
    for reentrant in (False, True):
        crit = EKDLoss(backend=backend).to(device)
        x = student.clone().requires_grad_()
        # (the reference traces with graph breaks: its selection has data-dependent sizes)
        compiled = torch.compile(crit, fullgraph=backend != "reference", backend="aot_eager")
        loss = checkpoint(compiled, x, teacher, labels, use_reentrant=reentrant)
        assert torch.equal(loss, want)
        with pytest.raises(RuntimeError, match="EKDLoss ran in training mode inside a backward pass"):
            loss.backward()
        assert torch.equal(crit.student_thresholds, eager.student_thresholds)  # one update, not two
        assert torch.equal(crit.teacher_thresholds, eager.teacher_thresholds)
    # outside a checkpoint the compiled module trains as the eager one, call after call
    crit, eager = EKDLoss(backend=backend).to(device), EKDLoss(backend=backend).to(device)
    compiled = torch.compile(crit, fullgraph=backend != "reference", backend="aot_eager")
    for seed in (5, 6):
        batch = make_batch(16, seed=seed, device=device)
        x, y = batch[0].clone().requires_grad_(), batch[0].clone().requires_grad_()
        compiled(x, *batch[1:]).backward()
        eager(y, *batch[1:]).backward()
        assert torch.equal(x.grad, y.grad)
        assert torch.equal(crit.student_thresholds, eager.student_thresholds)
        assert torch.equal(crit.teacher_thresholds, eager.teacher_thresholds)


def test_compiled_loss_under_an_activation_memory_budget_is_refused_not_wrong(backend, device):
    """torch.compile's min-cut partitioner with activation_memory_budget < 1 recomputes forward
    ops in the backward from the module's buffers, which the forward has updated by then
    (pytorch/pytorch#197039): a compiled training-mode EKDLoss gave a silently wrong gradient.
    Its state read now checks at run time, so the backward raises, naming the budget."""
    import torch._functorch.config as functorch_config

    student, teacher, labels = make_batch(16, seed=3, device=device)
    eager = EKDLoss(backend=backend).to(device)
    want = student.clone().requires_grad_()
    eager(want, teacher, labels).backward()
    torch._dynamo.reset()
    with functorch_config.patch(activation_memory_budget=0.5):
        crit = EKDLoss(backend=backend).to(device)
        # (the reference traces with graph breaks: its selection has data-dependent sizes)
        compiled = torch.compile(crit, fullgraph=backend != "reference", backend="aot_eager")
        x = student.clone().requires_grad_()
        loss = compiled(x, teacher, labels)
        # Right or refused, never wrong: which one depends on what the partitioner recomputes (it
        # refuses here for csrc and Triton under torch 2.14; the reference's graphs save the state
        # they read), and that is PyTorch's choice, version to version.
        try:
            loss.backward()
        except RuntimeError as error:
            assert backend != "reference", error
            assert re.search(r"activation_memory_budget < 1.*keep the budget at 1", str(error)), error
        else:
            assert torch.equal(x.grad, want.grad)
    assert torch.equal(crit.student_thresholds, eager.student_thresholds)  # one update
    torch._dynamo.reset()


def test_module_on_wrong_device_says_so():
    crit = EKDLoss().to("meta")
    with pytest.raises(ValueError, match="move the loss module"):
        crit(*make_batch(6))


# ----------------------------------------------------------------------------- backends
def test_unavailable_backend_says_why(monkeypatch):
    broken = backends_module.Backend("csrc", None, lambda device: "the extension was not built (test)")
    monkeypatch.setitem(backends_module._REGISTRY, "csrc", broken)
    with pytest.raises(RuntimeError, match="'csrc' cannot run on cpu: the extension was not built"):
        EKDLoss(backend="csrc")(*make_batch(6))
    assert "csrc" not in backends_module.available_backends("cpu")


def test_meta_tensors_list_no_reference(monkeypatch):
    """available_backends lists for meta tensors only what runs on them (the csrc op's fake
    implementation, when built): the reference refuses them.  Without the compiled op "auto"
    there gives the reference's ValueError, which says why."""
    assert "reference" not in backends_module.available_backends("meta")
    broken = backends_module.Backend("csrc", None, lambda device: "the extension was not built (test)")
    monkeypatch.setitem(backends_module._REGISTRY, "csrc", broken)
    assert backends_module.available_backends("meta") == ()
    with pytest.raises(ValueError, match="meta tensors hold no values"):
        backends_module.resolve_backend("auto", "meta", (torch.float32, torch.float32))


def test_auto_passes_over_backends_without_float64(monkeypatch):
    """The Triton kernels compute in fp32 and refuse fp64: "auto" (Triton first on CUDA) takes the
    next backend for fp64 inputs (gradcheck) instead of raising."""
    monkeypatch.setattr(backends_module, "available_backends", lambda device: ("triton", "csrc", "reference"))
    assert backends_module.resolve_backend("auto", "cuda", (torch.float32, torch.float32)).name == "triton"
    assert backends_module.resolve_backend("auto", "cuda", (torch.float64, torch.float32)).name == "csrc"
    assert backends_module.resolve_backend("auto", "cuda", (torch.bfloat16, torch.float64)).name == "csrc"
    monkeypatch.setattr(backends_module, "available_backends", lambda device: ("triton", "reference"))
    assert backends_module.resolve_backend("auto", "cuda", (torch.float64, torch.float64)).name == "reference"


def test_auto_computes_float64_inputs_in_float64(device):
    student, teacher, labels = make_batch(40, 12, 10, 10, seed=5, device=device, dtype=torch.float64)
    got = ekd_loss(student, teacher, labels)
    want = ekd_loss(student, teacher, labels, backend="reference")
    assert got.loss.dtype == torch.float64
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-9, atol=0)


def test_meta_tensors():
    """Shape propagation on meta tensors: "auto" takes the csrc op (its fake implementation); the
    reference, whose selection reads values, refuses them naming why."""
    require_backend("csrc", "cpu")
    student, teacher, labels = (x.to("meta") for x in make_batch(8))
    loss = EKDLoss().to("meta")(student.requires_grad_(True), teacher, labels)
    assert loss.device.type == "meta" and loss.shape == () and loss.dtype == torch.float32
    loss.backward()
    assert student.grad.shape == student.shape and student.grad.device.type == "meta"
    with pytest.raises(ValueError, match="meta tensors hold no values, and the reference EKD backend needs them"):
        EKDLoss(backend="reference").to("meta")(student, teacher, labels)
    with pytest.raises(ValueError, match='negative_selection="random" counts the negatives .* not on meta tensors'):
        EKDLoss(negative_selection="random").to("meta")(student, teacher, labels, generator=torch.Generator())


def test_meta_construction_then_to_empty_and_reset_parameters():
    """A module built on the meta device and materialised by to_empty holds uninitialised
    buffers (FSDP's deferred initialisation); reset_parameters, which FSDP calls there, puts the
    thresholds back to a new module's, in place, so the first call gives a new module's loss and
    state.  It also resets a module that has trained."""
    with torch.device("meta"):
        crit = EKDLoss()
    crit = crit.to_empty(device="cpu")
    for name in ("student_thresholds", "teacher_thresholds"):
        getattr(crit, name).fill_(7.0)  # what to_empty may leave (its memory is not zeroed)
    buffers = [crit.student_thresholds.data_ptr(), crit.teacher_thresholds.data_ptr()]
    crit.reset_parameters()
    assert [crit.student_thresholds.data_ptr(), crit.teacher_thresholds.data_ptr()] == buffers  # in place
    fresh = EKDLoss()
    for name, value in fresh.state_dict().items():
        if name != "_extra_state":
            assert torch.equal(crit.state_dict()[name], value), name
    batch = make_batch(40, 12, 10, 10, seed=3)
    assert torch.equal(crit(*batch), fresh(*batch))
    assert torch.equal(crit.student_thresholds, fresh.student_thresholds)
    assert crit.last_stats is not None and bool(crit.student_thresholds.ne(0).any())
    crit.reset_parameters()  # a trained module too
    assert crit.last_stats is None and not bool(crit.student_thresholds.ne(0).any())
    assert not bool(crit.teacher_thresholds.ne(0).any())


def test_auto_picks_the_first_available(monkeypatch):
    calls = []
    fast = backends_module.Backend("csrc", lambda *a, **k: calls.append(1) or backends_module.ekd_reference(*a, **k),
                                   lambda device: None)
    monkeypatch.setitem(backends_module._REGISTRY, "csrc", fast)
    EKDLoss()(*make_batch(6))
    assert calls == [1]


# ----------------------------------------------------------------------------- eager path
_FAST_MODULES = {"triton": "ekd_kernels.triton_ekd", "csrc": "ekd_kernels.csrc_ops"}


@pytest.mark.parametrize("options", [{}, dict(negative_selection="random", num_hard_negatives=7),
                                     dict(compute_critical_ratio=True, critical_only=True, num_hard_negatives=9)],
                         ids=["hardest", "random", "critical"])
def test_eager_path_equals_the_registered_op_bitwise(fast_backend, device, options, monkeypatch):
    """In plain eager mode the fast backends call their forward through a plain autograd.Function
    (_EagerForward: less host time), elsewhere through the registered op; both run the same
    kernels, so loss, gradient, state and statistics agree bit for bit over consecutive calls.
    The grad_fn says which path ran: each path is really taken."""
    import importlib

    module = importlib.import_module(_FAST_MODULES[fast_backend])
    runs = {}
    for path in ("eager", "op"):
        if path == "op":
            monkeypatch.setattr(module, "eager_call", lambda *tensors: False)
        crit = EKDLoss(backend=fast_backend, generator=torch.Generator().manual_seed(5), **options).to(device)
        results = []
        for seed in (1, 2, 3):
            student, teacher, labels = make_batch(24, seed=seed, device=device)
            leaf = student.clone().requires_grad_()
            loss = crit(leaf, teacher, labels)
            assert ("_EagerForward" in type(loss.grad_fn).__name__) == (path == "eager"), type(loss.grad_fn)
            loss.backward()
            results.append((loss, leaf.grad, crit.student_thresholds.clone(), crit.teacher_thresholds.clone(),
                            crit.last_stats.as_dict()))
        runs[path] = results
    for eager, op in zip(runs["eager"], runs["op"]):
        for a, b in zip(eager[:4], op[:4]):
            assert torch.equal(a, b)
        assert repr(eager[4]) == repr(op[4])  # (NaN-safe: the batch thresholds may hold NaN)


def test_eager_call_only_for_plain_tensors_in_plain_eager_mode():
    """Where the registered op must be seen (a dispatch mode such as make_fx or FakeTensorMode, a
    torch.func transform, a tensor subclass), the eager path is not taken."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from ekd_kernels._autograd import eager_call

    x = torch.ones(3)
    assert eager_call(x, None, x)

    class Subclass(torch.Tensor):
        pass

    assert not eager_call(x, x.as_subclass(Subclass))

    class PassThrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with PassThrough():
        assert not eager_call(x)
    with torch._subclasses.fake_tensor.FakeTensorMode():
        assert not eager_call(torch.ones(3))  # (a FakeTensor, and a mode)
    seen = []
    torch.func.grad(lambda y: (seen.append(eager_call(x)) or y).sum())(torch.ones(2))
    assert seen == [False]


def test_dispatch_mode_sees_the_registered_op(fast_backend, device):
    """Under a dispatch mode (what make_fx and non-strict export trace with) the loss is one op
    call, not the kernels' launches that the mode cannot see."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = set()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.add(func.name())
            return func(*args, **(kwargs or {}))

    student, teacher, labels = make_batch(12, seed=4, device=device)
    with Record():
        ekd_loss(student, teacher, labels, backend=fast_backend)
    assert {"triton": "ekd_kernels::triton_ekd_forward", "csrc": "ekd_kernels::ekd_forward"}[fast_backend] in seen


@pytest.mark.parametrize("device_type", ["cpu", "cuda", "meta"])
def test_backend_resolution_traces_under_compile(device_type):
    """Choosing a backend asks each one whether it can run on the device (for CUDA: whether the
    extension has CUDA kernels, a dispatcher query); under torch.compile(fullgraph=True) that
    must trace, whatever this machine has.  It did not for CUDA while the csrc backend asked the
    dispatcher on every call (a graph break, so an error under fullgraph: seen on an H200)."""
    import torch._dynamo

    device = torch.device(device_type)

    def count(x):
        return x + len(backends_module.available_backends(device))

    backends_module.preload("auto")  # as EKDLoss and ekd_loss do: no import traced
    torch._dynamo.reset()
    assert torch.equal(torch.compile(count, fullgraph=True, backend="eager")(torch.zeros(2)), count(torch.zeros(2)))


@pytest.mark.parametrize("name, module", [("triton", "ekd_kernels.triton_ekd"), ("csrc", "ekd_kernels.csrc_ops")])
def test_a_backend_module_missing_from_the_build_says_so(monkeypatch, name, module):
    """A lazy backend whose module is not in the build reads "not part of this build yet" (its
    importer's ModuleNotFoundError names the module); an import failing inside the module reads
    "could not be imported" with the error (a relative "from . import" raised a plain ImportError
    naming the package: every missing module read as a broken one)."""
    import sys

    import ekd_kernels

    importer = {"triton": backends_module._import_triton, "csrc": backends_module._import_csrc}[name]
    what = "the x kernels"
    class NotInThisBuild:
        """A meta path finder that finds no `module`, as none finds a file that is not there
        (ahead of the editable install's finder, which maps the package to its sources)."""

        @staticmethod
        def find_spec(fullname, path=None, target=None):
            if fullname == module:
                raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
            return None

    # the package as a build without that module: not imported, not found
    monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.delattr(ekd_kernels, module.rsplit(".", 1)[1], raising=False)
    monkeypatch.setattr(sys, "meta_path", [NotInThisBuild()] + sys.meta_path)
    missing = backends_module._LazyBackend(name, module, importer, what)
    assert missing.unavailable_reason("cpu") == "the x kernels are not part of this build yet"

    def broken():
        import ekd_kernels._no_such_dependency  # noqa: F401 - an import inside the module that fails

    failing = backends_module._LazyBackend(name, module, broken, what)
    assert failing.unavailable_reason("cpu").startswith("the x kernels could not be imported (No module named")


@pytest.mark.parametrize("backend", ["auto", "csrc"])
def test_loss_built_inside_a_fullgraph_compiled_function(backend):
    """An EKDLoss made inside a torch.compile(fullgraph=True) function compiles, in a fresh process
    where no backend was imported yet, and gives the eager loss and gradient.  Dynamo refused
    twice before: the process_group default (an instance of a plain class) and the backends'
    importlib.import_module."""
    import subprocess
    import sys
    import textwrap

    require_backend("csrc", torch.device("cpu"))  # ("auto" is csrc on the CPU; the reference has graph breaks)
    script = textwrap.dedent(f"""
        import torch
        from ekd_kernels import EKDLoss
        import ekd_kernels.backends as backends
        assert all(getattr(b, "_module", None) is None for b in backends._REGISTRY.values())  # nothing imported
        g = torch.Generator().manual_seed(0)
        s, t, y = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g), torch.arange(16) // 2
        compiled = torch.compile(lambda x, t, y: EKDLoss(backend="{backend}")(x, t, y), fullgraph=True,
                                 backend="eager")
        x1, x2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
        got, want = compiled(x1, t, y), EKDLoss(backend="{backend}")(x2, t, y)
        got.backward(); want.backward()
        assert torch.equal(got, want) and torch.equal(x1.grad, x2.grad), (got, want)
        print("same")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("same"), done.stdout + done.stderr[-3000:]


def _layer_then_loss(model, crit, x, t, y):
    """The compiled steps' step: a layer, then the loss."""
    return crit(model(x), t, y)


def _layer_and_loss(backend, device):
    """A seeded layer and a loss on `backend`: two calls give identical pairs, eager and compiled."""
    torch.manual_seed(1)
    return torch.nn.Linear(16, 10).to(device), EKDLoss(backend=backend, num_hard_negatives=50).to(device)


def test_compiled_step_follows_a_changing_batch_size(fast_backend, device):
    """torch.compile(dynamic=True) of a step (a layer, then the loss): the graph compiled for the
    first batch serves batches of two other sizes (a short last batch of an epoch) without a
    recompile, and each step equals the eager one bitwise (loss, the layer's gradient, the EMA
    state)."""
    import torch._dynamo

    step = _layer_then_loss
    (eager_model, eager_crit), (compiled_model, compiled_crit) = (_layer_and_loss(fast_backend, device) for _ in "ab")
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend="aot_eager")
    for batch in (24, 32, 20):
        x, t, y = make_batch(batch, 16, 12, seed=batch, device=device)
        want = step(eager_model, eager_crit, x, t, y)
        want.backward()
        with torch._dynamo.config.patch(error_on_recompile=batch != 24):
            got = compiled(compiled_model, compiled_crit, x, t, y)
        got.backward()
        assert torch.equal(got, want)
        assert torch.equal(compiled_model.weight.grad, eager_model.weight.grad)
        assert torch.equal(compiled_crit.student_thresholds, eager_crit.student_thresholds)
        assert torch.equal(compiled_crit.teacher_thresholds, eager_crit.teacher_thresholds)


def test_exported_loss_follows_a_dynamic_batch(fast_backend, device):
    """torch.export of a module holding an EKDLoss, the batch dimension dynamic from 3 (the
    README: a batch of 2 gives a size-1 output, which export specialises; Triton: up to 2048,
    where its forward stops keeping its similarity tiles): the exported module
    equals the eager one at other batch sizes, call after call, its thresholds included."""
    from torch.export import Dim, export

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.loss = EKDLoss(backend=fast_backend)

        def forward(self, student, teacher, labels):
            return self.loss(student, teacher, labels)

    # (Triton: up to GRAM_CACHE_MAX_BATCH the forward also outputs its similarity tiles, whose
    # size the fake implementation branches on: a range on one side of it, as the README says)
    batch = Dim("batch", min=3, **({"max": 2048} if fast_backend == "triton" else {}))
    example = make_batch(16, 8, seed=1, device=device)
    exported = export(Holder().to(device), example, dynamic_shapes=({0: batch}, {0: batch}, {0: batch})).module()
    eager = Holder().to(device)
    for size in (24, 5, 16):
        inputs = make_batch(size, 8, seed=size, device=device)
        assert torch.equal(exported(*inputs), eager(*inputs))
        assert torch.equal(exported.loss.student_thresholds, eager.loss.student_thresholds)


def test_reduce_overhead_compile_graphs_the_loss(fast_backend, device):
    """torch.compile(mode="reduce-overhead") of a step (a layer, then the loss): inductor captures
    it in CUDA graphs, the loss's kernels included (no graph skipped: the fast backends run no
    host synchronisation and mutate only the module's buffers), and each replayed step gives the
    eager step's loss, the layer's gradient and the EMA state (inductor's own layer kernels: close,
    not bitwise).  The easy way to the graphed rows of the benchmark, without the manual capture."""
    if device.type != "cuda":
        pytest.skip("mode='reduce-overhead' captures CUDA graphs: CUDA only")
    import torch._dynamo
    from torch._dynamo.utils import counters

    step = _layer_then_loss
    (eager_model, eager_crit), (compiled_model, compiled_crit) = (_layer_and_loss(fast_backend, device) for _ in "ab")
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)  # (a break: the loss run eagerly)
    for seed in range(5):  # the first calls warm up and record, the later ones replay
        x, t, y = make_batch(64, 16, 12, seed=seed, device=device)
        want = step(eager_model, eager_crit, x, t, y)
        want.backward()
        got = compiled(compiled_model, compiled_crit, x, t, y)
        got.backward()
        assert_loss_close(got.detach(), want.detach())
        assert_grad_close(compiled_model.weight.grad, eager_model.weight.grad)
        for name in ("student_thresholds", "teacher_thresholds"):
            torch.testing.assert_close(getattr(compiled_crit, name), getattr(eager_crit, name), rtol=0,
                                       atol=THRESHOLD_ATOL, msg=f"step {seed}: {name}")
        eager_model.zero_grad()
        compiled_model.zero_grad()
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
