"""Relational Knowledge Distillation (Park et al., CVPR 2019), as the EKD authors compare with it.

Reference form, following Tencent/TFace recognition/tasks/ekd/distillation/rkd.py: raw
(unnormalised) features, a distance term (pairwise distances divided by their mean over
nonzero entries) and an angle term (cosines of the angles of every triplet), both smooth-L1,
weighted 25 and 50; the teacher carries no gradient.  It materialises B x B x D difference
tensors (the angle term), which is what makes RKD expensive: 2 GiB per tensor at B = 1024,
D = 512 in fp32.  It is the benchmark's opponent.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .losses._common import check_has_values, check_number, compute_dtypes, fp32_under_autocast
from .validation import check_embedding_pair

PDIST_EPS = 1e-12


def pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """Euclidean distances via the Gram expansion, floored at 1e-12 before the root, diagonal 0."""
    squared_norms = x.pow(2).sum(dim=1)
    squared = (squared_norms.unsqueeze(1) + squared_norms.unsqueeze(0) - 2 * (x @ x.t())).clamp(min=PDIST_EPS)
    distances = squared.sqrt().clone()
    distances[range(len(x)), range(len(x))] = 0
    return distances


def mean_normalised_distances(x: torch.Tensor) -> torch.Tensor:
    d = pairwise_distances(x)
    return d / d[d > 0].mean()


def triplet_angles(x: torch.Tensor) -> torch.Tensor:
    """cos of the angle at every vertex i between (x_j - x_i) and (x_k - x_i), flattened (B^3)."""
    differences = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), p=2, dim=2)
    return torch.bmm(differences, differences.transpose(1, 2)).view(-1)


def check_rkd_weights(distance_weight, angle_weight) -> None:
    """The two weights: finite, non-negative numbers (a negative weight would reward a worse relation)."""
    check_number("distance_weight", distance_weight, non_negative=True)
    check_number("angle_weight", angle_weight, non_negative=True)


@fp32_under_autocast
def rkd_loss(student: torch.Tensor, teacher: torch.Tensor, distance_weight: float = 25.0,
             angle_weight: float = 50.0) -> torch.Tensor:
    """RKD loss of one batch (0-d); gradient to `student` only."""
    check_embedding_pair(student, teacher, what="rkd_loss")
    check_has_values(student, "rkd_loss")
    check_rkd_weights(distance_weight, angle_weight)
    student, teacher = compute_dtypes(student, teacher)
    with torch.no_grad():
        teacher_distances = mean_normalised_distances(teacher)
        teacher_angles = triplet_angles(teacher)
    distance_term = F.smooth_l1_loss(mean_normalised_distances(student), teacher_distances)
    angle_term = F.smooth_l1_loss(triplet_angles(student), teacher_angles)
    return distance_weight * distance_term + angle_weight * angle_term


class RKDLoss(nn.Module):
    """``RKDLoss()(student, teacher)``: the module form of ``rkd_loss`` (weights 25 and 50)."""

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0):
        super().__init__()
        check_rkd_weights(distance_weight, angle_weight)
        self.distance_weight = distance_weight
        self.angle_weight = angle_weight

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return rkd_loss(student, teacher, self.distance_weight, self.angle_weight)

    def extra_repr(self) -> str:
        return f"distance_weight={self.distance_weight}, angle_weight={self.angle_weight}"
