"""What is specific to the compiled ops of backend "csrc": the op contract (opcheck, fake
implementations, autograd registration, torch.compile), float64 gradcheck, determinism, the
CUDA build, and the cases the shared suites do not stress (expanded inputs, ties, every variant
on larger odd shapes).  The golden figures and the random comparisons with the reference run
for "csrc" in test_golden.py and test_against_reference.py."""

import os
import pathlib
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch

from ekd_kernels import EKDConfig
from ekd_kernels.config import fpr_fraction
from ekd_kernels.reference import ekd_reference

from helpers import THRESHOLD_ATOL, assert_grad_close, assert_loss_close, load_setup_module, make_batch

csrc_ops = pytest.importorskip("ekd_kernels.csrc_ops")

CPU_REASON = csrc_ops.unavailable_reason(torch.device("cpu"))
pytestmark = pytest.mark.skipif(CPU_REASON is not None, reason=f"csrc backend unavailable: {CPU_REASON}")

CUDA_REASON = csrc_ops.unavailable_reason(torch.device("cuda"))
# The CUDA cases show up as skipped, with the reason, where the CUDA ops cannot run.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(CUDA_REASON is not None,
                                                                reason=f"csrc on CUDA: {CUDA_REASON}"))]

VARIANTS = [
    {},
    {"critical_only": True},
    {"rank_loss": "eq7"},
    {"rank_loss": "eq8", "critical_only": True},
    {"negative_selection": "random"},
    {"fprs": (0.3, 0.05, 1e-3), "temperature": 0.05, "num_hard_negatives": 37, "momentum": 0.5,
     "positive_weight": 1.5, "negative_weight": -0.25, "compute_critical_ratio": True},
]


def call(student, teacher, labels, config, state=None, update=True, seed=0, impl=None):
    impl = impl or csrc_ops.ekd_forward
    k = config.num_thresholds
    if state is None:
        state = (torch.zeros(k, device=student.device), torch.zeros(k, device=student.device))
    generator = torch.Generator().manual_seed(seed)
    return impl(student, teacher, labels, state[0], state[1], config, update_thresholds=update, generator=generator)


def forward_backward(student, teacher, labels, config, **kwargs):
    s = student.detach().clone().requires_grad_(True)
    result = call(s, teacher, labels, config, **kwargs)
    (grad,) = torch.autograd.grad(result.loss, s)
    return result, grad


def op_args(student, teacher, labels, config, state, ranks=None, update=True):
    """The raw op's arguments, as csrc_ops.ekd_forward passes them."""
    fractions = [fpr_fraction(f) for f in config.fprs]
    return (student, teacher, labels, state[0], state[1], ranks, [q.numerator for q in fractions],
            [q.denominator for q in fractions], config.temperature, config.num_hard_negatives, config.momentum,
            config.positive_weight, config.negative_weight, config.critical_only,
            {"soft_rank": 0, "eq7": 1, "eq8": 2}[config.rank_loss], update, config.compute_critical_ratio)


# --------------------------------------------------------------------------- the op contract
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", [{}, {"critical_only": True, "compute_critical_ratio": True}])
def test_opcheck_forward(device, variant):
    config = EKDConfig(num_hard_negatives=40, **variant)
    student, teacher, labels = make_batch(33, 16, 8, 10, seed=1, device=device)
    state = (torch.full((6,), 0.05, device=device), torch.full((6,), 0.02, device=device))
    args = op_args(student.requires_grad_(True), teacher, labels, config, state)
    torch.library.opcheck(torch.ops.ekd_kernels.ekd_forward.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_forward_random_ranks(device):
    config = EKDConfig(num_hard_negatives=25, negative_selection="random")
    student, teacher, labels = make_batch(20, 8, 8, 5, seed=2, device=device)
    ranks = torch.randperm(150, generator=torch.Generator().manual_seed(0))[:25].to(device)
    state = (torch.zeros(6, device=device), torch.zeros(6, device=device))
    torch.library.opcheck(torch.ops.ekd_kernels.ekd_forward.default,
                          op_args(student, teacher, labels, config, state, ranks=ranks))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_backward(device):
    config = EKDConfig(num_hard_negatives=30)
    student, teacher, labels = make_batch(24, 12, 6, 6, seed=3, device=device)
    state = (torch.full((6,), 0.1, device=device), torch.full((6,), 0.1, device=device))
    out = torch.ops.ekd_kernels.ekd_forward(*op_args(student, teacher, labels, config, state))
    args = (torch.ones((), device=device), student, teacher, labels, out[1], out[2], out[7], out[8], out[9],
            config.temperature, config.critical_only, 0)
    torch.library.opcheck(torch.ops.ekd_kernels.ekd_backward.default, args)


def test_gradcheck_float64():
    """The compiled backward against finite differences of the compiled forward.  Thresholds are
    fixed (no update) and nonzero so that no perturbation moves them."""
    student, teacher, labels = make_batch(14, 6, 5, 4, seed=4, dtype=torch.float64)
    state = (torch.tensor([0.3, 0.1, -0.05], dtype=torch.float64), torch.tensor([0.25, 0.0, -0.1], dtype=torch.float64))
    for variant in ({}, {"rank_loss": "eq8"}, {"critical_only": True}):
        config = EKDConfig(fprs=(0.1, 0.01, 0.001), temperature=0.2, num_hard_negatives=20, **variant)

        def loss_of(s):
            return call(s, teacher, labels, config, state=state, update=False).loss

        assert torch.autograd.gradcheck(loss_of, (student.clone().requires_grad_(True),), eps=1e-6, atol=1e-6)


def test_torch_compile_fullgraph():
    config = EKDConfig(num_hard_negatives=50)
    student, teacher, labels = make_batch(40, 16, 16, 10, seed=5)
    state = (torch.zeros(6), torch.zeros(6))

    def step(s, t, y, st, tt):
        result = csrc_ops.ekd_forward(s, t, y, st, tt, config)
        return result.loss, result.student_thresholds, result.stats.num_selected_negatives

    compiled = torch.compile(step, fullgraph=True)
    s1 = student.clone().requires_grad_(True)
    s2 = student.clone().requires_grad_(True)
    got = compiled(s1, teacher, labels, *state)
    want = step(s2, teacher, labels, *state)
    got[0].backward()
    want[0].backward()
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
    assert got[2].item() == want[2].item()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=0, atol=0)


# --------------------------------------------------------------------------- CUDA build
def test_cuda_kernels_registered():
    """A build machine where setup.py can build the CUDA ops (nvcc of torch's CUDA major version,
    a CUDA torch) must ship them, GPU or not; the decision is setup.py's own."""
    from torch.utils.cpp_extension import CUDA_HOME

    setup = load_setup_module()
    build_cuda, reason = setup._cuda_decision(torch.version.cuda, CUDA_HOME, setup._nvcc_version(CUDA_HOME))
    if not build_cuda:
        pytest.skip(f"setup.py builds no CUDA ops on this machine: {reason}")
    for op in ("ekd_kernels::ekd_forward", "ekd_kernels::ekd_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), \
            f"{op} has no CUDA kernel although nvcc and a CUDA torch are present: rebuild (make install)"
    assert csrc_ops.cuda_ops_built()


# --------------------------------------------------------------------------- against the reference
def compare_with_reference(student, teacher, labels, config, steps=1, rtol_loss=1e-5):
    k = config.num_thresholds
    state = (torch.zeros(k, device=student.device), torch.zeros(k, device=student.device))
    ref_state = state
    for step in range(steps):
        got, grad = forward_backward(student, teacher, labels, config, state=state, seed=step)
        want, want_grad = forward_backward(student, teacher, labels, config, state=ref_state, seed=step,
                                           impl=ekd_reference)
        assert_loss_close(got.loss.cpu(), want.loss.cpu(), rtol=rtol_loss)
        assert_grad_close(grad.cpu(), want_grad.cpu())
        assert grad.dtype == student.dtype
        for name in ("student_thresholds", "teacher_thresholds"):
            torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=0, atol=THRESHOLD_ATOL)
        for name in ("num_positive_pairs", "num_negative_pairs", "num_selected_negatives", "num_critical_selected",
                     "num_critical_pairs"):
            g, w = getattr(got.stats, name), getattr(want.stats, name)
            assert (g is None) == (w is None)
            if g is not None:
                assert g.item() == w.item(), name
        state, ref_state = (got.student_thresholds, got.teacher_thresholds), (want.student_thresholds,
                                                                               want.teacher_thresholds)
        student = student.roll(1, 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(f"{k}={v[k]}" for k in v) or "default")
@pytest.mark.parametrize("batch,student_dim,teacher_dim,identities", [(7, 5, 3, 3), (130, 32, 20, 30),
                                                                      (257, 24, 40, 100)])
def test_variants_against_reference(device, variant, batch, student_dim, teacher_dim, identities):
    student, teacher, labels = make_batch(batch, student_dim, teacher_dim, identities, seed=batch, device=device)
    compare_with_reference(student, teacher, labels, EKDConfig(**variant), steps=2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", [{}, {"critical_only": True}, {"rank_loss": "eq7"}])
def test_large_identity_groups(device, variant):
    """Groups of 32 or more members take the CPU's per-group matmul path."""
    student, teacher, labels = make_batch(130, 24, 16, 3, seed=12, device=device)
    compare_with_reference(student, teacher, labels, EKDConfig(compute_critical_ratio=True, **variant), steps=2)


def test_gradcheck_float64_large_group():
    student, teacher, _ = make_batch(36, 4, 3, seed=13, dtype=torch.float64)
    labels = torch.tensor([0] * 33 + [1, 2, 3])
    state = (torch.tensor([0.3, -0.2], dtype=torch.float64), torch.tensor([0.2, -0.1], dtype=torch.float64))
    config = EKDConfig(fprs=(0.1, 0.01), temperature=0.3, num_hard_negatives=50, critical_only=True)

    def loss_of(s):
        return call(s, teacher, labels, config, state=state, update=False).loss

    assert torch.autograd.gradcheck(loss_of, (student.clone().requires_grad_(True),), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_all_thresholds_distinct_at_a_million_negatives(device):
    """B = 1500: over a million negatives, so the 1e-6 threshold is not the largest one."""
    student, teacher, labels = make_batch(1500, 24, 16, 1400, seed=7, device=device)
    compare_with_reference(student, teacher, labels, EKDConfig(compute_critical_ratio=True))


@pytest.mark.parametrize("device", DEVICES)
def test_degenerate_batches(device):
    g = torch.Generator().manual_seed(8)
    student = torch.randn(40, 16, generator=g).to(device)
    teacher = torch.randn(40, 16, generator=g).to(device)
    config = EKDConfig(num_hard_negatives=100, compute_critical_ratio=True)
    compare_with_reference(student, teacher, torch.zeros(40, dtype=torch.long, device=device), config)  # no negative
    compare_with_reference(student, teacher, torch.arange(40, device=device), config)  # no positive
    # Duplicated rows: many exactly tied similarities around the top-N boundary.
    dup_s, dup_t = student[:5].repeat(8, 1), teacher[:5].repeat(8, 1)
    compare_with_reference(dup_s, dup_t, torch.arange(40, device=device) % 7, config)
    zero = student.clone()
    zero[3] = 0
    compare_with_reference(zero, teacher, torch.arange(40, device=device) % 9, config)


@pytest.mark.parametrize("device", DEVICES)
def test_expanded_and_strided_inputs_match_contiguous_bitwise(device):
    config = EKDConfig(num_hard_negatives=60)
    base_s = torch.randn(1, 24, device=device)
    student = (base_s.expand(50, 24) + torch.randn(50, 1, device=device))  # contiguous result, then a view
    wide_t = torch.randn(50, 40, device=device)
    teacher = wide_t[:, ::2]
    labels = (torch.arange(100, device=device) % 13)[::2]
    expanded = torch.randn(24, device=device).expand(50, 24)  # stride 0 rows
    for s in (student.t().contiguous().t(), expanded):
        got, grad = forward_backward(s, teacher, labels, config)
        want, want_grad = forward_backward(s.contiguous(), teacher.contiguous(), labels.contiguous(), config)
        assert torch.equal(got.loss, want.loss)
        assert torch.equal(grad, want_grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtypes(device, dtype):
    student, teacher, labels = make_batch(64, 32, 16, 16, seed=9, device=device, dtype=dtype)
    got, grad = forward_backward(student, teacher, labels, EKDConfig())
    want, want_grad = forward_backward(student, teacher, labels, EKDConfig(), impl=ekd_reference)
    assert got.loss.dtype == want.loss.dtype
    assert grad.dtype == dtype
    assert_loss_close(got.loss.cpu(), want.loss.cpu())
    assert_grad_close(grad.float().cpu(), want_grad.float().cpu(), tol=1e-2 if dtype != torch.float64 else 1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_non_finite_keeps_state(device):
    student, teacher, labels = make_batch(30, 8, 8, 6, seed=10, device=device)
    student = student.clone()
    student[4, 2] = float("nan")
    state = (torch.full((6,), 0.2, device=device), torch.full((6,), 0.1, device=device))
    result = call(student, teacher, labels, EKDConfig(), state=state)
    assert torch.isnan(result.loss)
    assert torch.equal(result.student_thresholds, state[0])
    assert torch.equal(result.teacher_thresholds, state[1])


# --------------------------------------------------------------------------- determinism
def _fingerprint(batch, variant, identities=None):
    student, teacher, labels = make_batch(batch, 48, 32, identities or batch // 3, seed=11)
    result, grad = forward_backward(student, teacher, labels, EKDConfig(compute_critical_ratio=True, **variant))
    return [result.loss, result.student_thresholds, result.teacher_thresholds, grad,
            result.stats.num_critical_pairs]


@pytest.mark.parametrize("variant,identities", [({}, None), ({"critical_only": True, "rank_loss": "eq7"}, None),
                                                ({}, 4)])  # 4 identities: groups of ~75, the matmul path
def test_deterministic_across_runs_and_thread_counts(variant, identities):
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2, 1, 3):
            torch.set_num_threads(n)
            runs.append(_fingerprint(300, variant, identities))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_deterministic_in_a_fresh_process_with_one_thread():
    """OMP_NUM_THREADS=1 from the start (no pool resize) gives the bits of this process."""
    code = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, "python_tests")
        from test_csrc import _fingerprint
        torch.save(_fingerprint(300, {}), sys.argv[1])
    """)
    root = pathlib.Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "fp.pt")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        subprocess.run([sys.executable, "-c", code, path], cwd=root, env=env, check=True)
        fresh = torch.load(path)
    for a, b in zip(fresh, _fingerprint(300, {})):
        assert torch.equal(a, b)


@pytest.mark.skipif(CUDA_REASON is not None, reason=f"csrc on CUDA: {CUDA_REASON}")
def test_cuda_deterministic_across_runs():
    """Integer atomics only, selected pairs sorted by index, fixed-order sums: same bits every run."""
    student, teacher, labels = make_batch(700, 64, 48, 150, seed=14, device="cuda")
    config = EKDConfig(compute_critical_ratio=True, num_hard_negatives=500)
    runs = []
    for _ in range(3):
        result, grad = forward_backward(student, teacher, labels, config)
        runs.append([result.loss, result.student_thresholds, result.teacher_thresholds, grad,
                     result.stats.num_critical_pairs])
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)
