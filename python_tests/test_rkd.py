"""RKD, the benchmark's opponent (its golden figure is replayed in test_golden.py)."""

import math

import pytest
import torch

from ekd_kernels import RKDLoss, rkd_loss


def test_hand_three_points():
    """Teacher = student: both terms vanish.  A scaled student: distances are mean-normalised, so
    the distance term still vanishes and angles are scale-free, the loss stays 0."""
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    assert rkd_loss(x, x).item() == pytest.approx(0.0, abs=1e-7)
    assert rkd_loss(3 * x, x).item() == pytest.approx(0.0, abs=1e-6)


def test_hand_distance_term():
    """Two points: one pair distance, normalised by its own mean, is 1 for both; the angle term
    has only degenerate (zero) difference vectors: loss 0.  Three collinear vs a right triangle:
    the distance term is smooth-L1 of the mean-normalised distance matrices (diagonal included)."""
    student = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    teacher = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    d_s = torch.tensor([[0, 1, 2], [1, 0, 1], [2, 1, 0]], dtype=torch.float32)
    d_t = torch.tensor([[0, 1, 1], [1, 0, math.sqrt(2)], [1, math.sqrt(2), 0]], dtype=torch.float32)
    d_s, d_t = d_s / (d_s.sum() / 6), d_t / (d_t.sum() / 6)
    diff = (d_s - d_t).abs()
    distance = torch.where(diff < 1, 0.5 * diff**2, diff - 0.5).mean()
    angle = rkd_loss(student, teacher, distance_weight=0.0, angle_weight=1.0)
    total = rkd_loss(student, teacher)
    assert total.item() == pytest.approx(25 * distance.item() + 50 * angle.item(), rel=1e-5)


def test_teacher_gets_no_gradient_and_module_matches_function():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(12, 8, generator=g, requires_grad=True)
    teacher = torch.randn(12, 8, generator=g, requires_grad=True)
    loss = RKDLoss()(student, teacher)
    loss.backward()
    assert teacher.grad is None and student.grad is not None
    assert loss.item() == rkd_loss(student, teacher).item()


def test_bad_input():
    with pytest.raises(ValueError, match="same number of rows"):
        RKDLoss()(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="2-D"):
        RKDLoss()(torch.randn(4), torch.randn(4, 3))


def test_batch_of_one_names_the_loss():
    with pytest.raises(ValueError, match="rkd_loss needs a batch of at least 2") as info:
        RKDLoss()(torch.randn(1, 3), torch.randn(1, 3))
    assert "EKD" not in str(info.value)
