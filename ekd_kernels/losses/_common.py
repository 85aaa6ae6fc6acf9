"""Input checks and dtype handling shared by the distillation losses of this subpackage."""

from __future__ import annotations

import torch

from ..reference import compute_dtype, normalize_rows
from ..validation import check_embedding_pair

# the package's one normalisation and one input check, with the dtype rule below
__all__ = ["all_finite", "check_embedding_pair", "compute_dtypes", "nan_unless_finite", "normalize_rows"]


def compute_dtypes(student: torch.Tensor, teacher: torch.Tensor):
    """(student, teacher) in the compute dtype: fp16/bf16 -> fp32, fp32/fp64 kept; the teacher is
    detached (no gradient ever reaches it) and cast to the student's compute dtype."""
    student = student.to(compute_dtype(student))
    return student, teacher.detach().to(student.dtype)


def all_finite(*tensors: torch.Tensor) -> torch.Tensor:
    """0-d bool tensor on the tensors' device: every element of every tensor is finite (no host sync)."""
    finite = torch.isfinite(tensors[0]).all()
    for t in tensors[1:]:
        finite = finite & torch.isfinite(t).all()
    return finite


def nan_unless_finite(loss: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    """``loss`` where ``finite`` (0-d bool) holds, else NaN, decided on the device.

    The rule of every loss here (as of EKD): a batch with a non-finite input embedding gives a
    NaN loss, whatever its masks, sorts and clamps made of the bad values (a teacher NaN can
    otherwise drop out of a mask and leave a finite loss).  The loss is multiplied by 1 or NaN,
    so that the gradient is NaN too and a gradient scaler (which looks at the gradients) skips
    the step; a finite batch's loss and gradient are unchanged (multiplied by exactly 1).
    """
    factor = torch.where(finite, torch.ones((), dtype=loss.dtype, device=loss.device),
                         torch.full((), float("nan"), dtype=loss.dtype, device=loss.device))
    return loss * factor
