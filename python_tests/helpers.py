"""Input makers and comparisons shared by the test files.

``assert_matches_reference`` is the one place where a fast backend's call is held against the
reference's: test_against_reference.py and test_triton.py both use it, so a check added there
covers both."""

import importlib.util
import pathlib
from typing import NamedTuple

import torch

from ekd_kernels import EKDLoss
from ekd_kernels.result import EKDResult

# Golden tolerances (../shared/golden/README.md): what a correct float32 implementation meets.
LOSS_RTOL = 1e-5
GRAD_REL_NORM = 1e-4
THRESHOLD_ATOL = 1e-6
TERM_ATOL = 1e-7  # floor for the per-term losses and the critical ratio, which may be exactly 0

COUNTS = ("num_positive_pairs", "num_negative_pairs", "num_selected_negatives", "num_critical_selected",
          "num_critical_pairs")


def make_batch(batch, student_dim=32, teacher_dim=None, num_identities=None, seed=0, device="cpu",
               dtype=torch.float32):
    """Fresh random raw embeddings (not normalised, never zeros) and labels.

    The teacher is a noisy copy of the student's direction where the dimensions allow, so that
    the two models broadly agree, like a trained pair; labels repeat so that positives exist.
    """
    teacher_dim = teacher_dim or student_dim
    num_identities = num_identities or max(1, batch // 4)
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, student_dim, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(batch, teacher_dim, generator=g, dtype=torch.float64)
    shared = min(student_dim, teacher_dim)
    teacher[:, :shared] += student[:, :shared]
    labels = torch.randint(0, num_identities, (batch,), generator=g)
    return (student.to(device=device, dtype=dtype), teacher.to(device=device, dtype=dtype), labels.to(device))


def uniform_tiles_batch():
    """A 150-row batch (fp64) whose 64 x 64 pair tiles hold every kind the histogram passes
    aggregate differently, with exact similarities.  Rows are +-1 (Ds = 16, Dt = 4: norms 4 and
    2, so every similarity is an exact multiple of 1/D whatever the order a dot sums in, and 0
    for a zero row).  Rows 0-63 (tile 0) are copies of one row: tile (0, 0) collapses into one
    bin, positives excluded; in rows 64-127 every third row is zero (its similarities all 0:
    uniform rows among mixed ones); the rest are random signs, rows 128-149 with a few more
    copies.  Labels are sorted, so a backend that orders rows by label keeps these tiles."""
    generator = torch.Generator().manual_seed(11)
    batch = 150
    student, teacher = (torch.randint(0, 2, (batch, dim), generator=generator).double() * 2 - 1 for dim in (16, 4))
    student[:64] = student[0]
    student[64:128:3] = 0.0
    student[130:150:5] = student[0]
    teacher[:64] = teacher[3]
    teacher[65:128:3] = 0.0
    labels = torch.randint(0, 100, (batch,), generator=generator).sort().values
    return student, teacher, labels


def rel_norm(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def assert_loss_close(loss, ref, rtol=LOSS_RTOL):
    assert torch.isfinite(loss).item(), f"loss {loss.item()} is not finite"
    diff = abs(loss.item() - ref.item())
    assert diff <= rtol * abs(ref.item()) + 1e-12, f"loss {loss.item()!r} vs reference {ref.item()!r} (diff {diff:.3g})"


def assert_grad_close(grad, ref, tol=GRAD_REL_NORM):
    """Relative norm, since gradients of saturated sigmoids can be tiny; a zero reference
    gradient (nothing selected) must be matched exactly, not just "relatively"."""
    if ref.double().norm().item() == 0:
        assert grad.double().norm().item() == 0, "gradient should be exactly zero"
        return
    err = rel_norm(grad, ref)
    assert err < tol, f"gradient relative error {err:.3g} >= {tol}"


class Call(NamedTuple):
    """One call of the loss as the comparison reads it: the student leaf it ran on, what it
    returned (an ``EKDResult``) and d loss / d student."""

    student: torch.Tensor
    result: EKDResult
    grad: torch.Tensor


def run_ekd(loss_fn, student, teacher, labels, *args, **kwargs) -> Call:
    """``loss_fn(student, teacher, labels, ...)``, ``ekd_loss`` or an ``EKDLoss`` (its result made
    of its buffers, copied since the next call overwrites them, and last_stats), on `student` as
    a leaf: a detached view, not a copy, so that strided and stride-0 inputs reach the backend."""
    student = student.detach().requires_grad_(True)
    result = loss_fn(student, teacher, labels, *args, **kwargs)
    if isinstance(loss_fn, EKDLoss):
        result = EKDResult(result, loss_fn.student_thresholds.clone(), loss_fn.teacher_thresholds.clone(),
                           loss_fn.last_stats)
    (grad,) = torch.autograd.grad(result.loss, student)
    return Call(student, result, grad)


def assert_matches_reference(got: Call, want: Call, loss_rtol=LOSS_RTOL, grad_tol=GRAD_REL_NORM):
    """A fast backend's call (`got`) against the reference's on the same inputs and state.

    Everything a caller can observe is compared, at the golden tolerances (a correct float32
    implementation meets them: only inputs rounded to a lower precision justify a looser
    loss_rtol / grad_tol).  Counts are integers, so exactly equal, None-ness included (the
    critical-pair ones exist only with compute_critical_ratio).  Batch thresholds are NaN when
    there is no negative pair, so NaN must match NaN; the EMA state then keeps its value, so
    NaN there is a failure.
    """
    loss, stats, want_stats = got.result.loss, got.result.stats, want.result.stats
    loss_dtype = torch.float64 if got.student.dtype == torch.float64 else torch.float32  # SPEC: fp32 unless fp64
    assert loss.dim() == 0 and loss.dtype == loss_dtype, f"loss: {loss.dtype} {tuple(loss.shape)}"
    assert_loss_close(loss.cpu(), want.result.loss.cpu(), rtol=loss_rtol)
    assert got.grad.dtype == got.student.dtype and got.grad.shape == got.student.shape, \
        f"gradient: {got.grad.dtype} {tuple(got.grad.shape)} for a {got.student.dtype} {tuple(got.student.shape)} input"
    assert_grad_close(got.grad, want.grad, tol=grad_tol)
    for name in ("student_thresholds", "teacher_thresholds"):
        for prefix, a, b in (("", got.result, want.result), ("stats.", stats, want_stats)):
            torch.testing.assert_close(getattr(a, name).cpu(), getattr(b, name).cpu(), rtol=0, atol=THRESHOLD_ATOL,
                                       msg=lambda m: f"{prefix}{name}: {m}")
    for name in ("batch_student_thresholds", "batch_teacher_thresholds"):
        torch.testing.assert_close(getattr(stats, name).cpu(), getattr(want_stats, name).cpu(), rtol=0,
                                   atol=THRESHOLD_ATOL, equal_nan=True, msg=lambda m: f"{name}: {m}")
    for name in COUNTS + ("positive_term", "negative_term", "critical_ratio"):
        value, expected = getattr(stats, name), getattr(want_stats, name)
        assert (value is None) == (expected is None), f"{name}: {value} vs {expected}"
        if expected is None:
            continue
        if name in COUNTS:
            assert int(value) == int(expected), f"{name}: {int(value)} vs {int(expected)}"
        else:
            torch.testing.assert_close(value.float().cpu(), expected.float().cpu(), rtol=LOSS_RTOL, atol=TERM_ATOL,
                                       msg=lambda m: f"{name}: {m}")


def compare_with_reference(backend, batches, generator_seed=None, loss_rtol=LOSS_RTOL, grad_tol=GRAD_REL_NORM,
                           **options):
    """`backend` and the reference, each an ``EKDLoss(**options)``, on the same consecutive
    `batches`, every call compared: each module carries its own EMA state, so a state update
    that drifts shows at a later call.  Call `step` of both draws from a generator seeded
    `generator_seed + step` (None: no generator)."""
    device = batches[0][0].device
    fast, reference = (EKDLoss(backend=name, **options).to(device) for name in (backend, "reference"))
    for step, (student, teacher, labels) in enumerate(batches):
        got, want = (run_ekd(crit, student, teacher, labels, generator=None if generator_seed is None
                             else torch.Generator().manual_seed(generator_seed + step)) for crit in (fast, reference))
        try:
            assert_matches_reference(got, want, loss_rtol=loss_rtol, grad_tol=grad_tol)
        except AssertionError as error:
            raise AssertionError(f"call {step}: {error}") from error


def load_setup_module():
    """The repository's setup.py as a module (not __main__: its helpers, such as the decision
    whether to build the CUDA ops, without running setup())."""
    spec = importlib.util.spec_from_file_location(
        "ekd_setup", pathlib.Path(__file__).resolve().parent.parent / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
