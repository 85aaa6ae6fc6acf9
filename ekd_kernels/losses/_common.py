"""Input checks and dtype handling shared by the distillation losses of this subpackage."""

from __future__ import annotations

import torch

from ..validation import check_embeddings_and_labels


def check_embedding_pair(student: torch.Tensor, teacher: torch.Tensor, *, same_dim: bool = False,
                         labels: torch.Tensor = None, what: str = "this loss") -> None:
    """ValueError naming what is wrong (the EKD checks of SPEC.md, Edge cases, plus equal widths
    for losses that compare the two embeddings coordinate by coordinate)."""
    if labels is None:
        rows = student.shape[0] if isinstance(student, torch.Tensor) and student.dim() >= 1 else 0
        device = student.device if isinstance(student, torch.Tensor) else "cpu"
        labels = torch.zeros(rows, dtype=torch.int64, device=device)
    check_embeddings_and_labels(student, teacher, labels)
    if same_dim and student.shape[1] != teacher.shape[1]:
        raise ValueError(f"{what} compares student and teacher embeddings coordinate by coordinate: their widths "
                         f"must match, got {student.shape[1]} and {teacher.shape[1]} (project one of them first)")


def compute_dtypes(student: torch.Tensor, teacher: torch.Tensor):
    """(student, teacher) in the compute dtype: fp16/bf16 -> fp32, fp32/fp64 kept; the teacher is
    detached (no gradient ever reaches it) and cast to the student's compute dtype."""
    if student.dtype in (torch.float16, torch.bfloat16):
        student = student.float()
    return student, teacher.detach().to(student.dtype)


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """x / max(||x||, 1e-12), F.normalize's default: a zero row stays zero."""
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
