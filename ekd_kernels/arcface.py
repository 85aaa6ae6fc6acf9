"""ArcFace: additive angular margin softmax (Deng et al., CVPR 2019), the classification loss
that EKD and RKD are added to.

For an embedding x with label y and class centres W (both L2-normalised), cos(theta_j) =
<x_hat, w_hat_j>.  The target logit becomes s * cos(theta_y + m), the others stay s * cos(theta_j),
and the loss is the cross-entropy of these logits (s = 64, m = 0.5 by default).

Numerical safety:
- cos(theta_y + m) = cos(theta_y) cos(m) - sin(theta_y) sin(m), with sin(theta_y) =
  sqrt((1 - c)(1 + c)) on c = cos(theta_y) clamped to [-1 + 1e-7, 1 - 1e-7] (fp32) so that
  neither the square root nor its gradient can blow up at cos = +-1.
- Past theta_y + m > pi the margin would *raise* the logit (cos is not monotonic there); as
  in insightface, the target logit is then cos(theta_y) - m sin(m), which keeps the target
  logit decreasing in theta_y.  ``easy_margin=True`` applies the margin only where cos > 0.
- Logits and the loss are computed in fp32 (fp64 for fp64 inputs), whatever the input dtype,
  also inside ``torch.autocast``.

Input checks (ValueError): embeddings B x D with B >= 1, labels B integers (not bool), each in
[0, num_classes).  The label range is checked by reading the labels, on the CPU only and in
eager mode; on CUDA it is not (that check would cost a host sync every step), and an
out-of-range label there trips the gather's device-side assertion.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from .losses._common import check_number
from .reference import NORM_EPS
from .validation import check_flag, int64_labels


class ArcFace(nn.Module):
    """The ArcFace head: ``ArcFace(512, num_classes)(embeddings, labels)`` returns the mean loss.

    ``logits(embeddings, labels)`` gives the margin-adjusted, scaled logits (B x C) for a caller
    that wants its own reduction; ``cosine(embeddings)`` the plain cosines (for prediction).
    The class centres ``weight`` (C x D) are a parameter, initialised N(0, 0.01).
    """

    def __init__(self, embedding_size: int, num_classes: int, scale: float = 64.0, margin: float = 0.5,
                 easy_margin: bool = False, clamp_eps: float = 1e-7):
        super().__init__()
        for name, value in (("embedding_size", embedding_size), ("num_classes", num_classes)):
            # (numpy integers too, as labels.max() + 1 of a numpy array gives: kept as ints)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        embedding_size, num_classes = int(embedding_size), int(num_classes)
        if isinstance(clamp_eps, bool) or not isinstance(clamp_eps, (int, float)) or not 0 <= clamp_eps < 1:
            # the target cosine is clamped to [-1 + eps, 1 - eps]: eps >= 1 empties that interval
            raise ValueError(f"clamp_eps must be a number in [0, 1), got {clamp_eps!r}")
        # (by type too: a bool would pass as 1.0, a string "False" as a true easy_margin)
        scale = check_number("scale", scale, positive=True)
        margin = check_number("margin", margin)
        if not (0.0 <= margin < math.pi / 2):
            raise ValueError(f"margin must lie in [0, pi/2), got {margin!r}")
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.scale = scale
        self.margin = margin
        self.easy_margin = check_flag("easy_margin", easy_margin)
        self.clamp_eps = float(clamp_eps)
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.normal_(self.weight, std=0.01)

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """B x C cosines between the embeddings and the class centres (fp32, fp64 for fp64)."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"embeddings must be B x {self.embedding_size}, got shape {tuple(embeddings.shape)}")
        dtype = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
        # s = 64 turns a bf16 cosine's rounding (~4e-3) into logit errors of ~0.25: keep the
        # head in fp32 even inside an autocast region.
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            x = F.normalize(embeddings.to(dtype), dim=1, eps=NORM_EPS)
            w = F.normalize(self.weight.to(dtype), dim=1, eps=NORM_EPS)
            return x @ w.t()

    def target_logit(self, target_cosine: torch.Tensor) -> torch.Tensor:
        """cos(theta + m) of the target class, with the guards described in the module docstring."""
        c = target_cosine.clamp(-1.0 + self.clamp_eps, 1.0 - self.clamp_eps)
        sine = torch.sqrt((1.0 - c) * (1.0 + c))
        shifted = c * math.cos(self.margin) - sine * math.sin(self.margin)
        if self.easy_margin:
            return torch.where(target_cosine > 0, shifted, target_cosine)
        # theta + m <= pi  <=>  cos(theta) >= cos(pi - m)
        return torch.where(target_cosine >= math.cos(math.pi - self.margin), shifted,
                           target_cosine - self.margin * math.sin(self.margin))

    def _check(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        for name, x in (("embeddings", embeddings), ("labels", labels)):
            if not isinstance(x, torch.Tensor):
                raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"embeddings must be 2-D, B x {self.embedding_size}, got shape {tuple(embeddings.shape)}")
        batch = embeddings.shape[0]
        if batch < 1:
            raise ValueError(f"ArcFace needs at least one embedding, got shape {tuple(embeddings.shape)}")
        if labels.dim() != 1 or labels.shape[0] != batch or labels.dtype.is_floating_point \
                or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise ValueError(f"labels must be B = {batch} integers, got shape {tuple(labels.shape)} "
                             f"and dtype {labels.dtype}")
        if labels.device != embeddings.device:
            raise ValueError(f"labels are on {labels.device} but the embeddings on {embeddings.device}")
        # Read the labels on the CPU only (elsewhere it is a host sync per step), and not while
        # torch.compile traces (a data-dependent branch would break the graph).
        if labels.device.type == "cpu" and not torch.compiler.is_compiling():
            # (as int64: compared in their own dtype, num_classes wrapped (256 is 0 in uint8), and
            # uint16/32/64 have no comparison kernel)
            values = int64_labels(labels)
            bad = (values < 0) | (values >= self.num_classes)
            if bool(bad.any()):
                index = int(bad.nonzero()[0, 0])
                raise ValueError(f"labels must lie in [0, num_classes={self.num_classes}), got label "
                                 f"{int(labels[index])} at position {index}")

    def logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self._check(embeddings, labels)
        cosine = self.cosine(embeddings)
        labels = labels.long().unsqueeze(1)
        target = self.target_logit(cosine.gather(1, labels))
        return self.scale * cosine.scatter(1, labels, target)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(embeddings, labels), labels.long())

    def extra_repr(self) -> str:
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, scale={self.scale}, "
                f"margin={self.margin}, easy_margin={self.easy_margin}")
