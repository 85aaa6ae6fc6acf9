"""Input checks and dtype handling shared by the distillation losses of this subpackage."""

from __future__ import annotations

import torch

from ..reference import compute_dtype, normalize_rows
from ..validation import check_embedding_pair

# the package's one normalisation and one input check, with the dtype rule below
__all__ = ["check_embedding_pair", "compute_dtypes", "normalize_rows"]


def compute_dtypes(student: torch.Tensor, teacher: torch.Tensor):
    """(student, teacher) in the compute dtype: fp16/bf16 -> fp32, fp32/fp64 kept; the teacher is
    detached (no gradient ever reaches it) and cast to the student's compute dtype."""
    student = student.to(compute_dtype(student))
    return student, teacher.detach().to(student.dtype)
