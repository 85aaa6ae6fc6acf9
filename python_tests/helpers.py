"""Input makers and comparisons shared by the test files."""

import torch

# Golden tolerances (../shared/golden/README.md): what a correct float32 implementation meets.
LOSS_RTOL = 1e-5
GRAD_REL_NORM = 1e-4
THRESHOLD_ATOL = 1e-6


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


def rel_norm(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def assert_loss_close(loss, ref, rtol=LOSS_RTOL):
    assert torch.isfinite(loss).item(), f"loss {loss.item()} is not finite"
    diff = abs(loss.item() - ref.item())
    assert diff <= rtol * abs(ref.item()) + 1e-12, f"loss {loss.item()!r} vs reference {ref.item()!r} (diff {diff:.3g})"


def assert_grad_close(grad, ref, tol=GRAD_REL_NORM):
    if ref.double().norm().item() == 0:
        assert grad.double().norm().item() == 0, "gradient should be exactly zero"
        return
    err = rel_norm(grad, ref)
    assert err < tol, f"gradient relative error {err:.3g} >= {tol}"
