"""What is specific to the compiled ops of backend "csrc": the op contract (opcheck, fake
implementations, autograd registration, torch.compile), float64 gradcheck, determinism, the
CUDA build, and the cases the shared suites do not stress (expanded inputs, ties, every variant
on larger odd shapes).  The golden figures and the random comparisons with the reference run
for "csrc" in test_golden.py and test_against_reference.py."""

import dataclasses
import os
import pathlib
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch

from ekd_kernels import EKDConfig, EKDLoss
from ekd_kernels.config import fpr_fraction
from ekd_kernels.reference import ekd_reference

import helpers
from helpers import (THRESHOLD_ATOL, assert_grad_close, assert_loss_close, load_setup_module, make_batch,
                     run_ekd)

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
def test_uniform_tiles_and_zero_rows_give_the_references_thresholds(device):
    """The CUDA op counts each thread's run of pairs in one histogram bin with one atomic, and a
    warp's runs with one when they share the bin (histogram_flush_warp in ekd_cuda.cu); the CPU
    op counts directly.  On helpers.uniform_tiles_batch (collapsed tiles, zero rows, mixed ones;
    exact similarities) every batch threshold of 63 FPRs must be the reference's bit for bit,
    and the pair counts equal: a miscounted bin shifts a rank."""
    student, teacher, labels = (x.to(device) for x in helpers.uniform_tiles_batch())
    options = dict(fprs=tuple(k / 64 for k in range(1, 64)), num_hard_negatives=student.shape[0] ** 2)
    got, want = (run_ekd(EKDLoss(backend=backend, **options).to(device), student.float(), teacher.float(),
                         labels).result.stats for backend in ("csrc", "reference"))
    for name in ("batch_student_thresholds", "batch_teacher_thresholds"):
        assert torch.equal(getattr(got, name).cpu(), getattr(want, name).cpu()), name
    assert int(got.num_negative_pairs) == int(want.num_negative_pairs)
    assert int(got.num_selected_negatives) == int(want.num_selected_negatives)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case, match", [
    ("labels_complex", "labels must be 1-D integers"), ("labels_bool", "labels must be 1-D integers"),
    ("labels_float", "labels must be 1-D integers"), ("student_no_column", "at least one column"),
    ("teacher_no_column", "at least one column"),
])
def test_raw_forward_refuses_malformed_argument(device, case, match):
    """The raw forward op, called directly, refuses what the Python wrapper would have refused."""
    config = EKDConfig(num_hard_negatives=10)
    student, teacher, labels = make_batch(12, 6, 4, 4, seed=5, device=device)
    state = (torch.zeros(6, device=device), torch.zeros(6, device=device))
    bad = {"labels_complex": lambda: (student, teacher, labels.to(torch.complex64)),
           "labels_bool": lambda: (student, teacher, labels > 1),
           "labels_float": lambda: (student, teacher, labels.float()),
           "student_no_column": lambda: (student[:, :0], teacher, labels),
           "teacher_no_column": lambda: (student, teacher[:, :0], labels)}[case]()
    with pytest.raises(RuntimeError, match=match):
        torch.ops.ekd_kernels.ekd_forward(*op_args(*bad, config, state))
    torch.ops.ekd_kernels.ekd_forward(*op_args(student, teacher, labels, config, state))  # the valid call


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index, value, match", [
    (8, 1e-50, "temperature must be a finite number >= 1.17549e-38"),  # 0 in fp32: a NaN loss before
    (8, 1e-40, "temperature must be a finite number >= 1.17549e-38"),  # subnormal: an infinite gradient
    (8, float("inf"), "temperature must be a finite number"),
    (10, float("nan"), "momentum must be a finite number in \\[0, 1\\], got nan"),  # a NaN state before
    (10, 2.0, "momentum must be a finite number in \\[0, 1\\], got 2"),
    (10, -1.0, "momentum must be a finite number in \\[0, 1\\]"),
    (11, float("nan"), "positive_weight and negative_weight must be finite"),
    (12, float("inf"), "positive_weight and negative_weight must be finite"),
    (6, [1, 1], "fpr_numerators and fpr_denominators must have one entry per FPR, got 2 and 6"),
])
def test_raw_forward_refuses_malformed_options(device, index, value, match):
    """The raw forward's options checked as EKDConfig checks them (the wrapper's path), naming the
    option: before, these gave a NaN loss, an infinite gradient, a NaN or out-of-range state, or
    a message that did not say the FPR lists differ in length."""
    config = EKDConfig(num_hard_negatives=10)
    student, teacher, labels = make_batch(12, 6, 4, 4, seed=5, device=device)
    state = (torch.zeros(6, device=device), torch.zeros(6, device=device))
    args = list(op_args(student, teacher, labels, config, state))
    args[index] = value
    with pytest.raises(ValueError if index != 6 else RuntimeError, match=match):
        torch.ops.ekd_kernels.ekd_forward(*args)


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


@pytest.mark.parametrize("variant", VARIANTS + [{"num_hard_negatives": 1}, {"num_hard_negatives": 5000}],
                         ids=lambda v: ",".join(f"{k}={v[k]}" for k in v) or "default")
def test_direct_selection_is_the_radix_selection(monkeypatch, variant):
    """Up to a few thousand negatives the CPU op selects thresholds and the top N directly (every
    key, nth_element per rank: csrc select_directly) instead of by the radix select; with
    EKD_CPU_DIRECT_SELECT_MAX=0 it takes the radix select at every L.  Both must give every output
    bitwise alike, over consecutive calls, fp32 and fp64, on random batches and on batches whose
    rows all appear three times (exact ties at every rank and at the top-N cut), B = 2 to 90."""
    config = EKDConfig(**variant)
    for batch, ties, dtype in [(2, False, torch.float32), (5, True, torch.float64), (40, False, torch.float32),
                               (61, True, torch.float32), (90, False, torch.float64), (90, True, torch.float64)]:
        student, teacher, labels = make_batch(batch, 8, 6, max(batch // 3, 2), seed=batch, dtype=dtype)
        if ties:
            rows = torch.arange(batch) % max(1, (batch + 2) // 3)
            student, teacher = student[rows], teacher[rows]
        runs = []
        for direct_max in (None, "0"):
            if direct_max is None:
                monkeypatch.delenv("EKD_CPU_DIRECT_SELECT_MAX", raising=False)
            else:
                monkeypatch.setenv("EKD_CPU_DIRECT_SELECT_MAX", direct_max)
            state, outputs = None, []
            for step in range(2):
                result, grad = forward_backward(student.roll(step, 1), teacher, labels, config, state=state, seed=step)
                state = (result.student_thresholds, result.teacher_thresholds)
                outputs += [result.loss, grad, *state, *(getattr(result.stats, f.name) for f in
                                                          dataclasses.fields(result.stats))]
            runs.append(outputs)
        for got, want in zip(*runs):  # (exactly equal; NaN where no negative pair gives a batch threshold)
            assert (got is None) == (want is None), (batch, ties, dtype)
            if got is not None:
                torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg=f"{batch} {ties} {dtype}")


def test_direct_selection_setting_is_checked(monkeypatch):
    student, teacher, labels = make_batch(12, 6, 4, 4, seed=5)
    for bad in ("-1", "x", "1.5"):
        monkeypatch.setenv("EKD_CPU_DIRECT_SELECT_MAX", bad)
        with pytest.raises(ValueError, match="EKD_CPU_DIRECT_SELECT_MAX must be a non-negative integer"):
            forward_backward(student, teacher, labels, EKDConfig(num_hard_negatives=10))


@pytest.mark.parametrize("lanes", [32, 8])
@pytest.mark.parametrize("variant", [{}, {"critical_only": True}, {"rank_loss": "eq7"},
                                     {"negative_selection": "random"}],
                         ids=lambda v: ",".join(f"{k}={v[k]}" for k in v) or "default")
def test_emulated_warp_lanes_against_reference(monkeypatch, lanes, variant):
    """The CUDA op runs a row's positive sums and gradient on a warp, its lanes splitting the
    features (ekd_math.h's Lanes; WarpLanes in ekd_cuda.cu).  CI has no GPU: with
    EKD_CPU_EMULATE_LANES the CPU op runs that per-row code with a thread per lane
    (csrc/lane_emulation.h), every group by the pair loop as on CUDA.  Feature counts below, at
    and past a multiple of the lanes (idle lanes, tails); groups of 1 to 9 (rows without
    positives, rows with many), then (at 8 lanes: 32 threads a row make it slow here) groups of
    40 and 30 (which the serial CPU op does by matmuls); the results must be the reference's,
    and near the serial CPU op's (only the summation orders of the dots and of the large groups
    differ)."""
    shapes = [(40, 45, 20, 9), (40, 32, 37, 9)] + ([(70, 24, 33, 2)] if lanes == 8 else [])
    for batch, student_dim, teacher_dim, identities in shapes:
        student, teacher, labels = make_batch(batch, student_dim, teacher_dim, identities, seed=student_dim,
                                              device="cpu")
        config = EKDConfig(num_hard_negatives=150, **variant)
        serial = forward_backward(student, teacher, labels, config)
        monkeypatch.setenv("EKD_CPU_EMULATE_LANES", str(lanes))
        compare_with_reference(student, teacher, labels, config, steps=2)
        emulated = forward_backward(student, teacher, labels, config)
        monkeypatch.delenv("EKD_CPU_EMULATE_LANES")
        assert_loss_close(emulated[0].loss, serial[0].loss, rtol=1e-6)
        torch.testing.assert_close(emulated[1], serial[1], rtol=1e-5, atol=1e-7)


def test_emulated_warp_lanes_setting_is_checked(monkeypatch):
    student, teacher, labels = make_batch(12, 6, 4, 4, seed=5)
    for bad in ("3", "64", "0", "x"):
        monkeypatch.setenv("EKD_CPU_EMULATE_LANES", bad)
        with pytest.raises(ValueError, match="EKD_CPU_EMULATE_LANES must be a power of two"):
            forward_backward(student, teacher, labels, EKDConfig(num_hard_negatives=10))


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


@pytest.mark.parametrize("batch,variant,identities", [
    (300, {}, None), (300, {"critical_only": True, "rank_loss": "eq7"}, None),
    (300, {}, 4),                    # 4 identities: groups of ~75, the matmul path
    (200, {}, 25), (256, {}, 4)])    # one similarity block (and large groups at 256)
def test_deterministic_across_runs_and_thread_counts(batch, variant, identities):
    """Bitwise the same loss, thresholds and gradient at any torch.set_num_threads (README): a
    matmul outside a parallel region ran MKL on every thread, whose sgemm rounds some shapes
    (one similarity block at B <= 256, a large group's Gram) differently with the thread count."""
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2, 1, 3, 4, 8):
            torch.set_num_threads(n)
            runs.append(_fingerprint(batch, variant, identities))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_radix_tables_carry_nothing_between_calls(monkeypatch):
    """The CPU op keeps its radix select's tables from call to call (RadixTables, ekd_cpu.cpp),
    and each worker clears its own slice only when it takes a row chunk.  A call with fewer
    chunks than threads (B = 2: three chunks) leaves a thread idle that counted in the call
    before (B = 300): what it counted then must not reach the thresholds.  Four threads,
    consecutive calls against the reference, the EMA state carried; B = 2 with one negative
    pair, and with none.  EKD_CPU_DIRECT_SELECT_MAX=0: the radix select at every B (B = 2 would
    otherwise select directly and never touch the tables)."""
    large = make_batch(300, 24, 16, 100, seed=1)
    one_negative = make_batch(2, 24, 16, 2, seed=2)[:2] + (torch.tensor([0, 1]),)
    no_negative = make_batch(2, 24, 16, 2, seed=3)[:2] + (torch.tensor([5, 5]),)
    threads = torch.get_num_threads()
    monkeypatch.setenv("EKD_CPU_DIRECT_SELECT_MAX", "0")
    try:
        torch.set_num_threads(4)
        helpers.compare_with_reference("csrc", [large, one_negative, large, no_negative, large],
                                       num_hard_negatives=500)
    finally:
        torch.set_num_threads(threads)


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


def _assert_cuda_runs_identical():
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


@pytest.mark.skipif(CUDA_REASON is not None, reason=f"csrc on CUDA: {CUDA_REASON}")
def test_cuda_deterministic_across_runs():
    """Integer atomics only, selected pairs sorted by index, fixed-order sums: same bits every run."""
    _assert_cuda_runs_identical()


# --------------------------------------------------------------------------- tensor-core tiles (CUDA)
# EKD_CUDA_TENSOR_CORES=1 or 2: the CUDA op's fp32 tiles on tensor cores in 3xTF32 (csrc/ekd_cuda.cu:
# 1 through wmma, gram_tile_tc and pair_dot_tc; 2 through mma.sync PTX, gram_tile_mma and
# pair_dot_mma), off by default until a GPU run has checked and measured them.  These tests set
# it for themselves, each case in both ways; the GPU lease also runs the CUDA cases of the whole
# suite with each set (tools/gpu_proof.sh, pytest-csrc-tc1 and pytest-csrc-tc2).
TENSOR_CORES = "EKD_CUDA_TENSOR_CORES"
TENSOR_CORE_WAYS = [pytest.param("1", id="wmma"), pytest.param("2", id="mma")]


def _require_cuda_tensor_cores():
    if CUDA_REASON is not None:
        pytest.skip(f"csrc on CUDA: {CUDA_REASON}")
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("the tensor-core tiles need compute capability 8.0 (below it the op takes the FMA tiles)")


@pytest.fixture(params=TENSOR_CORE_WAYS)
def cuda_tensor_cores(request, monkeypatch):
    _require_cuda_tensor_cores()
    monkeypatch.setenv(TENSOR_CORES, request.param)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(f"{k}={v[k]}" for k in v) or "default")
@pytest.mark.parametrize("batch,student_dim,teacher_dim,identities", [(7, 5, 3, 3), (130, 32, 20, 30),
                                                                      (257, 24, 40, 100), (200, 512, 384, 50)])
def test_cuda_tensor_cores_against_reference(cuda_tensor_cores, variant, batch, student_dim, teacher_dim, identities):
    """Features that are not a multiple of the MMA's 8 or of the 32 staged a step (3, 5, 20, 24,
    40), one partial tile (B = 7) and partial last tiles, and the usual D = 512 / 384."""
    student, teacher, labels = make_batch(batch, student_dim, teacher_dim, identities, seed=batch, device="cuda")
    compare_with_reference(student, teacher, labels, EKDConfig(**variant), steps=2)


@pytest.mark.parametrize("selection", ["hardest", "random"])
@pytest.mark.parametrize("batch,student_dim,teacher_dim", [(12, 7, 5), (150, 40, 72)])
def test_cuda_tensor_cores_selected_pairs_have_the_tiles_bits(cuda_tensor_cores, selection, batch, student_dim,
                                                               teacher_dim):
    """momentum = 1: every EMA threshold is a negative's similarity as the tile passes computed it,
    and that pair's similarity, recomputed for the rank loss (pair_dot_tc: the pair at row 0 and
    column 0 of otherwise zero MMA operands), must have the same bits, else the pair counts as
    critical at its own threshold (test_against_reference.py's
    test_thresholds_that_are_pairs_of_the_batch, on the tensor-core tiles; B = 150 puts the
    pairs in off-diagonal tiles, at every place of a tile, and D = 40, 72 past one 32-feature step)."""
    batches = [make_batch(batch, student_dim, teacher_dim, batch, seed=s, device="cuda") for s in range(16)]
    helpers.compare_with_reference("csrc", batches, generator_seed=0 if selection == "random" else None,
                                   momentum=1.0, critical_only=True, compute_critical_ratio=True,
                                   negative_selection=selection)


def test_cuda_tensor_cores_thresholds_distinct_at_a_million_negatives(cuda_tensor_cores):
    student, teacher, labels = make_batch(1500, 24, 16, 1400, seed=7, device="cuda")
    compare_with_reference(student, teacher, labels, EKDConfig(compute_critical_ratio=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_tensor_cores_16_bit_inputs(cuda_tensor_cores, dtype):
    """bf16/fp16 embeddings are computed in fp32 by the op, so they take the tensor-core tiles too."""
    student, teacher, labels = make_batch(64, 32, 16, 16, seed=9, device="cuda", dtype=dtype)
    got, grad = forward_backward(student, teacher, labels, EKDConfig())
    want, want_grad = forward_backward(student, teacher, labels, EKDConfig(), impl=ekd_reference)
    assert grad.dtype == dtype
    assert_loss_close(got.loss.cpu(), want.loss.cpu())
    assert_grad_close(grad.float().cpu(), want_grad.float().cpu(), tol=1e-2)


def test_cuda_tensor_cores_deterministic_across_runs(cuda_tensor_cores):
    _assert_cuda_runs_identical()


@pytest.mark.parametrize("way", TENSOR_CORE_WAYS)
def test_cuda_tensor_cores_switch_changes_the_tiles(monkeypatch, way):
    """The switch is live and read at every call: at D = 512 the batch thresholds (order
    statistics of the similarities as the tiles computed them; 24 FPRs a model, 48 distinct
    values, so that an equality by chance is out of reach) differ in some bit between the FMA
    and the tensor-core tiles, which round otherwise, and both are within the reference's
    tolerance; fp64 ignores it (its tiles stay FMA: the same bits), and so does a value other than
    1 or 2 (FMA tiles)."""
    _require_cuda_tensor_cores()
    student, teacher, labels = make_batch(256, 512, 512, 64, seed=21, device="cuda")
    config = EKDConfig(fprs=tuple(0.5 * 0.8 ** k for k in range(24)))

    def thresholds(x, y, setting):
        if setting is None:
            monkeypatch.delenv(TENSOR_CORES, raising=False)
        else:
            monkeypatch.setenv(TENSOR_CORES, setting)
        stats = call(x, y, labels, config).stats
        return torch.cat([stats.batch_student_thresholds, stats.batch_teacher_thresholds])

    fma, tensor_cores = thresholds(student, teacher, None), thresholds(student, teacher, way)
    want = call(student, teacher, labels, config, impl=ekd_reference).stats
    want = torch.cat([want.batch_student_thresholds, want.batch_teacher_thresholds])
    assert not torch.equal(fma, tensor_cores), f"EKD_CUDA_TENSOR_CORES={way} gave the FMA tiles' thresholds"
    for got in (fma, tensor_cores):
        torch.testing.assert_close(got, want, rtol=0, atol=THRESHOLD_ATOL)
    assert torch.equal(thresholds(student, teacher, "0"), fma)
    student64, teacher64 = student.double(), teacher.double()
    assert torch.equal(thresholds(student64, teacher64, None), thresholds(student64, teacher64, way))


# --------------------------------------------------------------------------- malformed raw-op arguments
# torch.ops.ekd_kernels.ekd_backward is public: called directly with a malformed argument it must
# refuse it, naming the argument, rather than index past a buffer.  Each case corrupts one
# argument of a valid call (what csrc_ops._backward passes).  Shapes, dtypes and devices are
# checked on every device and in the fake implementation; the values of selected_pairs on the CPU
# (ValueError), while the CUDA op, which must not read them on the host, skips a pair with an
# index outside [0, B).
_RAW_BATCH = 8


def _raw_backward_args(device):
    """A valid ekd_backward call (B = 8, 24 negatives in 28 slots: 4 are -1 padded), and the
    gradient autograd gives for it through the wrapper."""
    student, teacher, _ = make_batch(_RAW_BATCH, 4, 5, seed=21, device=device)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3], device=device)
    config = EKDConfig(num_hard_negatives=2000)
    state = (torch.zeros(6, device=device), torch.zeros(6, device=device))
    out = torch.ops.ekd_kernels.ekd_forward(*op_args(student, teacher, labels, config, state))
    args = dict(grad_loss=torch.ones((), device=device), student=student, teacher=teacher, labels=labels,
                student_thresholds=out[1], teacher_thresholds=out[2], selected_pairs=out[7], selected_grads=out[8],
                positive_scale=out[9], temperature=config.temperature, critical_only=False, rank_loss=0)
    leaf = student.detach().clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(call(leaf, teacher, labels, config, state=state).loss, leaf)
    return args, expected


def _replace(**changes):
    """A corruption: each keyword maps an argument name to a function of the valid arguments."""
    return lambda a: {**a, **{name: fn(a) for name, fn in changes.items()}}


def _pairs_with(index, value):
    def corrupt(a):
        pairs = a["selected_pairs"].clone()
        pairs[index] = value
        return pairs
    return _replace(selected_pairs=corrupt)


_FEWER_ROWS = _replace(student=lambda a: a["student"][:3], teacher=lambda a: a["teacher"][:3],
                       labels=lambda a: a["labels"][:3])
# name: (corruption, exception, the argument the message names)
_BACKWARD_SHAPE_CASES = {
    "grad_loss_empty": (_replace(grad_loss=lambda a: a["grad_loss"].new_empty(0)), RuntimeError, "grad_loss"),
    "grad_loss_vector": (_replace(grad_loss=lambda a: a["grad_loss"].new_ones(3)), RuntimeError, "grad_loss"),
    "grad_loss_int": (_replace(grad_loss=lambda a: a["grad_loss"].long()), RuntimeError, "grad_loss"),
    "student_1d": (_replace(student=lambda a: a["student"][0]), RuntimeError, "student"),
    "student_3d": (_replace(student=lambda a: a["student"][None]), RuntimeError, "student"),
    "student_int": (_replace(student=lambda a: a["student"].long()), RuntimeError, "student"),
    "student_fp16": (_replace(student=lambda a: a["student"].half()), RuntimeError, "student"),
    "student_one_row": (_replace(student=lambda a: a["student"][:1], teacher=lambda a: a["teacher"][:1],
                                 labels=lambda a: a["labels"][:1]), RuntimeError, "student"),
    # the probe's case: the pairs refer to rows 3..7 (more slots than 3 rows have pairs)
    "student_fewer_rows_than_pairs": (_FEWER_ROWS, RuntimeError, "selected_pairs"),
    "teacher_fewer_rows": (_replace(teacher=lambda a: a["teacher"][:2]), RuntimeError, "teacher"),
    "teacher_1d": (_replace(teacher=lambda a: a["teacher"][0]), RuntimeError, "teacher"),
    "teacher_int": (_replace(teacher=lambda a: a["teacher"].long()), RuntimeError, "teacher"),
    "labels_shorter": (_replace(labels=lambda a: a["labels"][:3]), RuntimeError, "labels"),
    "labels_longer": (_replace(labels=lambda a: torch.arange(100, device=a["labels"].device)), RuntimeError,
                      "labels"),
    "labels_float": (_replace(labels=lambda a: a["labels"].float() + 0.5), RuntimeError, "labels"),
    "labels_2d": (_replace(labels=lambda a: a["labels"][:, None]), RuntimeError, "labels"),
    # (accepted before, unlike the forward: bool labels regrouped the rows, a gradient 0.43 off)
    "labels_bool": (_replace(labels=lambda a: a["labels"] > 1), RuntimeError, "labels"),
    "teacher_no_column": (_replace(teacher=lambda a: a["teacher"][:, :0]), RuntimeError, "teacher"),
    "student_thresholds_shorter": (_replace(student_thresholds=lambda a: a["student_thresholds"][:2]), RuntimeError,
                                   "student_thresholds"),
    "thresholds_empty": (_replace(student_thresholds=lambda a: a["student_thresholds"][:0],
                                  teacher_thresholds=lambda a: a["teacher_thresholds"][:0]), RuntimeError,
                         "student_thresholds"),
    "student_thresholds_int": (_replace(student_thresholds=lambda a: a["student_thresholds"].long()), RuntimeError,
                               "student_thresholds"),
    "teacher_thresholds_shorter": (_replace(teacher_thresholds=lambda a: a["teacher_thresholds"][:2]), RuntimeError,
                                   "teacher_thresholds"),
    "teacher_thresholds_2d": (_replace(teacher_thresholds=lambda a: a["teacher_thresholds"][None]), RuntimeError,
                              "teacher_thresholds"),
    "selected_pairs_1d": (_replace(selected_pairs=lambda a: a["selected_pairs"].reshape(-1)), RuntimeError,
                          "selected_pairs"),
    "selected_pairs_n_by_3": (_replace(selected_pairs=lambda a: a["selected_pairs"].new_zeros(4, 3),
                                       selected_grads=lambda a: a["selected_grads"][:4]), RuntimeError,
                              "selected_pairs"),
    "selected_pairs_int32": (_replace(selected_pairs=lambda a: a["selected_pairs"].int()), RuntimeError,
                             "selected_pairs"),
    "selected_pairs_too_many": (_replace(selected_pairs=lambda a: a["selected_pairs"].new_full((29, 2), -1),
                                         selected_grads=lambda a: a["selected_grads"].new_zeros(29)), RuntimeError,
                                "selected_pairs"),
    "selected_grads_shorter": (_replace(selected_grads=lambda a: a["selected_grads"][:1]), RuntimeError,
                               "selected_grads"),
    "selected_grads_empty": (_replace(selected_grads=lambda a: a["selected_grads"][:0]), RuntimeError,
                             "selected_grads"),
    "selected_grads_int": (_replace(selected_grads=lambda a: a["selected_grads"].long()), RuntimeError,
                           "selected_grads"),
    "positive_scale_empty": (_replace(positive_scale=lambda a: a["positive_scale"].new_empty(0)), RuntimeError,
                             "positive_scale"),
    "positive_scale_int": (_replace(positive_scale=lambda a: a["positive_scale"].long()), RuntimeError,
                           "positive_scale"),
    "rank_loss_9": (_replace(rank_loss=lambda a: 9), ValueError, "rank_loss"),
    "rank_loss_negative": (_replace(rank_loss=lambda a: -3), ValueError, "rank_loss"),
    "temperature_0": (_replace(temperature=lambda a: 0.0), ValueError, "temperature"),
    "temperature_nan": (_replace(temperature=lambda a: float("nan")), ValueError, "temperature"),
}
# Values of selected_pairs that index no row: ValueError on the CPU, skipped pairs on CUDA.
_BACKWARD_VALUE_CASES = {
    "index_eq_B": _pairs_with((0, 1), _RAW_BATCH),
    "index_big": _pairs_with((0, 0), 10**6),
    "second_index_negative": _pairs_with((0, 1), -5),
    "all_first_indices_huge": _pairs_with((slice(None), 0), 2**40),
    "half_padded_slot": _pairs_with((0, 1), -1),
    "padding_with_a_row": _pairs_with((-1, 1), 3),
    # 4 rows have 6 pairs: the first 6 slots, which refer to rows up to 7
    "student_fewer_rows_than_indices": _replace(
        student=lambda a: a["student"][:4], teacher=lambda a: a["teacher"][:4], labels=lambda a: a["labels"][:4],
        selected_pairs=lambda a: a["selected_pairs"][:6], selected_grads=lambda a: a["selected_grads"][:6]),
}
_BACKWARD_TENSORS = ["grad_loss", "teacher", "labels", "student_thresholds", "teacher_thresholds", "selected_pairs",
                     "selected_grads", "positive_scale"]


def _backward(args):
    return torch.ops.ekd_kernels.ekd_backward(*args.values())


def _other_device(device):
    return "meta" if device == "cpu" else "cpu"


@pytest.mark.parametrize("device", DEVICES)
def test_backward_through_another_output_than_the_loss(device):
    """Autograd hands the backward no zero gradients for the outputs that carry none
    (set_materialize_grads(False)): a backward started from another output (the new EMA state)
    reaches it with no loss gradient, and the student's gradient is zero (the SPEC's thresholds
    carry none), rather than an error."""
    config = EKDConfig(num_hard_negatives=10)
    student, teacher, labels = make_batch(12, 6, 4, 4, seed=5, device=device)
    state = (torch.zeros(6, device=device), torch.zeros(6, device=device))
    leaf = student.detach().clone().requires_grad_(True)
    outputs = torch.ops.ekd_kernels.ekd_forward(*op_args(leaf, teacher, labels, config, state))
    (grad,) = torch.autograd.grad(outputs[1].sum(), leaf)
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("device", DEVICES)
def test_raw_backward_valid_call_matches_autograd(device):
    args, expected = _raw_backward_args(device)
    assert bool((args["selected_pairs"] == -1).all(dim=1).any()), "the valid call should hold padded slots"
    torch.testing.assert_close(_backward(args), expected, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(_BACKWARD_SHAPE_CASES))
def test_raw_backward_refuses_malformed_argument(device, case):
    corrupt, error, name = _BACKWARD_SHAPE_CASES[case]
    args, _ = _raw_backward_args(device)
    with pytest.raises(error, match=rf"\b{name}\b"):
        _backward(corrupt(args))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("change, error, text", [
    ({"grad_loss": lambda a: a["grad_loss"].new_ones(3)}, RuntimeError, "got shape [3] and dtype Float"),
    ({"student": lambda a: a["student"][None]}, RuntimeError, "got shape [1, 8, 4]"),
    ({"selected_pairs": lambda a: a["selected_pairs"].new_full((29, 2), -1),
      "selected_grads": lambda a: a["selected_grads"].new_zeros(29)}, RuntimeError,
     "n <= B(B-1)/2 = 28, got shape [29, 2]"),
    ({"rank_loss": lambda a: -3}, ValueError, "unknown rank_loss -3 (expected 0, 1 or 2)"),
    ({"temperature": lambda a: -0.25}, ValueError,
     "temperature must be a finite number >= 1.17549e-38 (the smallest normal float32: the gradient divides by it "
     "in fp32), got -0.25"),
    ({"temperature": lambda a: 1e-300 * -1e-300}, ValueError, "temperature must be a finite number >= 1.17549e-38"),
    ({"temperature": lambda a: float("nan")}, ValueError, "got nan"),
    # (0 or subnormal in fp32: an infinite gradient before; inf: a gradient of 0)
    ({"temperature": lambda a: 1e-40}, ValueError, "got 1e-40"),
    ({"temperature": lambda a: float("inf")}, ValueError, "got inf"),
])
def test_raw_refusal_messages_print_their_numbers(device, change, error, text):
    """The ops build their refusals' text in csrc/check.h (numbers by std::to_string and %g, not
    an ostream: on the first GPU image, a refusal that streamed a number crashed the process);
    the text stays what c10::str printed: shapes as [2, 3], floats at 6 significant digits."""
    args, _ = _raw_backward_args(device)
    with pytest.raises(error) as caught:
        _backward(_replace(**change)(args))
    assert text in str(caught.value)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", _BACKWARD_TENSORS)
def test_raw_backward_refuses_argument_on_another_device(device, name):
    args, _ = _raw_backward_args(device)
    args[name] = args[name].to(_other_device(device))
    with pytest.raises(RuntimeError, match=rf"\b{name}\b.*device"):
        _backward(args)


@pytest.mark.parametrize("case", list(_BACKWARD_SHAPE_CASES))
def test_raw_backward_fake_refuses_malformed_argument(case):
    """The fake (meta) implementation checks the same shapes, dtypes and options."""
    corrupt, error, name = _BACKWARD_SHAPE_CASES[case]
    args, _ = _raw_backward_args("cpu")
    meta = {key: value.to("meta") if isinstance(value, torch.Tensor) else value for key, value in args.items()}
    assert _backward(meta).shape == args["student"].shape
    with pytest.raises(error, match=rf"\b{name}\b"):
        _backward(corrupt(meta))


@pytest.mark.parametrize("case", list(_BACKWARD_VALUE_CASES))
def test_raw_backward_refuses_pair_index_out_of_range_cpu(case):
    args, _ = _raw_backward_args("cpu")
    with pytest.raises(ValueError, match=r"\bselected_pairs\b.*\[0, B"):
        _backward(_BACKWARD_VALUE_CASES[case](args))


@pytest.mark.skipif(CUDA_REASON is not None, reason=f"csrc on CUDA: {CUDA_REASON}")
@pytest.mark.parametrize("case", list(_BACKWARD_VALUE_CASES))
def test_raw_backward_skips_pair_index_out_of_range_cuda(case):
    """CUDA cannot read the indices on the host (no sync): a pair with an index outside [0, B)
    contributes nothing, as if its slot were padding."""
    args, _ = _raw_backward_args("cuda")
    bad = _BACKWARD_VALUE_CASES[case](args)
    batch = bad["student"].shape[0]
    pairs = bad["selected_pairs"]
    inside = ((pairs >= 0) & (pairs < batch)).all(dim=1, keepdim=True)
    assert not bool(inside.all())
    padded = {**bad, "selected_pairs": torch.where(inside, pairs, torch.full_like(pairs, -1))}
    torch.testing.assert_close(_backward(bad), _backward(padded), rtol=0, atol=0)


# --------------------------------------------------------------------------- top-N candidates (CUDA)
# EKD_CUDA_CANDIDATES=1: the CUDA op collects the hardest negatives' candidates (every negative in
# the N-th largest's top-16-bit bucket or above) in the student's second histogram pass, and the
# two passes that count the boundary's ties and collect the selection return at once when they all
# fit (csrc/ekd_cuda.cu, Candidates); a third of the forward's tile passes.  Off by default until a
# GPU run has checked and timed it; the GPU lease also runs the CUDA cases of the whole suite with it
# set (tools/gpu_proof.sh, pytest-csrc-candidates).
CANDIDATES = "EKD_CUDA_CANDIDATES"


def _candidates_batch(kind, dtype):
    if kind == "random":  # about N candidates: collected
        return make_batch(1024, 64, 48, 256, seed=3, device="cuda", dtype=dtype)
    if kind == "ties":  # 12 distinct directions: every similarity value shared by hundreds of pairs,
        # the N-th largest among them (ties across many rows, a cut row), still a few thousand
        # candidates: collected
        student, teacher, labels = make_batch(300, 32, 24, 75, seed=4, device="cuda", dtype=dtype)
        pick = torch.arange(300, device="cuda") % 12
        return student[:12][pick] * (1 + torch.arange(300, device="cuda")[:, None] % 3), teacher, labels
    # collapsed: every similarity 1, B(B-1)/2 minus the positives candidates, past the 65536 slots:
    # the two passes run as without candidates
    student, teacher, labels = make_batch(1024, 16, 16, 256, seed=5, device="cuda", dtype=dtype)
    return student[:1].expand(1024, 16).contiguous(), teacher, labels


# the tiles the candidates come from: FMA (fp32, fp64) and either tensor-core way (fp32)
CANDIDATE_TILES = [pytest.param(torch.float32, None, id="fp32"), pytest.param(torch.float64, None, id="fp64"),
                   pytest.param(torch.float32, "1", id="fp32-wmma"), pytest.param(torch.float32, "2", id="fp32-mma")]


def _candidate_tiles(monkeypatch, tensor_cores):
    if CUDA_REASON is not None:
        pytest.skip(f"csrc on CUDA: {CUDA_REASON}")
    if tensor_cores is None:
        monkeypatch.delenv(TENSOR_CORES, raising=False)
    else:
        _require_cuda_tensor_cores()
        monkeypatch.setenv(TENSOR_CORES, tensor_cores)


@pytest.mark.parametrize("dtype,tensor_cores", CANDIDATE_TILES)
@pytest.mark.parametrize("kind", ["random", "ties", "collapsed"])
def test_cuda_candidates_select_the_same_pairs(monkeypatch, kind, dtype, tensor_cores):
    """The same selection to the bit, whichever way it was made: loss, gradient, thresholds and
    statistics with the candidates equal those without (a random batch, heavy ties across rows,
    and collapsed similarities that overflow the slots); fp64 (four histogram passes, keys using
    all 64 bits) as fp32, and on the tensor-core tiles (their own collecting kernels)."""
    _candidate_tiles(monkeypatch, tensor_cores)
    student, teacher, labels = _candidates_batch(kind, dtype)
    config = EKDConfig(compute_critical_ratio=True)
    results = {}
    for setting in ("0", "1"):
        monkeypatch.setenv(CANDIDATES, setting)
        results[setting] = forward_backward(student, teacher, labels, config)
    (off, off_grad), (on, on_grad) = results["0"], results["1"]
    assert torch.equal(on.loss, off.loss) and torch.equal(on_grad, off_grad)
    assert torch.equal(on.student_thresholds, off.student_thresholds)
    assert torch.equal(on.teacher_thresholds, off.teacher_thresholds)
    for field in dataclasses.fields(off.stats):
        assert torch.equal(getattr(on.stats, field.name), getattr(off.stats, field.name)), field.name
    # (a full selection: the case reaches the top-N path, not an empty one)
    assert int(off.stats.num_selected_negatives) == min(2000, int(off.stats.num_negative_pairs)) > 0


@pytest.mark.parametrize("dtype,tensor_cores", CANDIDATE_TILES)
def test_cuda_candidates_skip_the_two_selection_passes(monkeypatch, dtype, tensor_cores):
    """The switch is live: with it the student's second histogram pass is the collecting kernel
    (its instantiation's name), and the forward's last two tile launches (the boundary's ties and
    the collection, which return at once when the candidates were collected) each take under a
    fifth of the first launch's device time (a histogram pass over the same tiles); without it,
    no collecting kernel, and the two take about as long as a histogram pass.  Each launch's
    shortest of three calls: the suite's other processes share the GPU."""
    _candidate_tiles(monkeypatch, tensor_cores)
    # (B = 4096, D = 256: a histogram pass takes a few hundred us, a pass that returns at once the
    # few us of its 2080 blocks)
    student, teacher, labels = make_batch(4096, 256, 64, 1024, seed=6, device="cuda", dtype=dtype)
    config = EKDConfig()

    def tile_launches(setting):
        monkeypatch.setenv(CANDIDATES, setting)
        call(student, teacher, labels, config)  # (warm)
        torch.cuda.synchronize()
        calls = []
        for _ in range(3):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                call(student, teacher, labels, config)
                torch.cuda.synchronize()
            kernels = sorted((e for e in prof.events() if "similarity_tile" in e.name),
                             key=lambda e: e.time_range.start)
            calls.append([(e.name, e.time_range.elapsed_us()) for e in kernels])
        assert all([name for name, _ in c] == [name for name, _ in calls[0]] for c in calls), calls
        return [(name, min(c[k][1] for c in calls)) for k, (name, _) in enumerate(calls[0])]

    on, off = tile_launches("1"), tile_launches("0")
    # 2 histogram passes a model (4 in fp64), the boundary's ties, the collection
    assert len(on) == len(off) == (10 if dtype == torch.float64 else 6), (on, off)
    assert sum("true>" in name for name, _ in on) == 1 and not any("true>" in name for name, _ in off)
    first_on, first_off = on[0][1], off[0][1]
    assert all(us < first_on / 5 for _, us in on[-2:]), on
    assert all(us > first_off / 2 for _, us in off[-2:]), off
