"""``EKDLoss``: the drop-in nn.Module, holding the EMA thresholds as buffers."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .backends import check_backend_name, preload
from .config import DEFAULT_FPRS, EKDConfig
from .functional import ekd_loss, initial_thresholds
from .result import EKDStats


class EKDLoss(nn.Module):
    """Evaluation-oriented Knowledge Distillation loss (Huang et al., CVPR 2022).

    ``EKDLoss()`` has the authors' defaults and reproduces their implementation; every option
    is described in ``EKDConfig`` and SPEC.md.

    Buffers (saved in ``state_dict``): ``student_thresholds`` and ``teacher_thresholds``, the K
    EMA thresholds in FPR order (1e-1 first). They update in training mode (the default) and
    stay frozen in ``eval()`` mode.  ``last_stats`` holds the ``EKDStats`` of the last call.

    ``process_group``: compute the loss of the global batch (every rank's rows concatenated)
    sharded over the ranks of this torch.distributed group; each rank passes its own rows
    (see ``ekd_kernels.distributed`` for the gradient convention).

    Example::

        crit = EKDLoss().to(device)
        loss = arcface_loss + crit(student_emb, teacher_emb, labels)
    """

    def __init__(self, fprs: Sequence[float] = DEFAULT_FPRS, temperature: float = 0.01,
                 num_hard_negatives: int = 2000, momentum: float = 0.01, positive_weight: float = 0.02,
                 negative_weight: float = 0.01, critical_only: bool = False, rank_loss: str = "soft_rank",
                 negative_selection: str = "hardest", compute_critical_ratio: bool = False,
                 backend: str = "auto", generator: Optional[torch.Generator] = None, process_group=None):
        super().__init__()
        self.config = EKDConfig(fprs=fprs, temperature=temperature, num_hard_negatives=num_hard_negatives,
                                momentum=momentum, positive_weight=positive_weight,
                                negative_weight=negative_weight, critical_only=critical_only,
                                rank_loss=rank_loss, negative_selection=negative_selection,
                                compute_critical_ratio=compute_critical_ratio)
        check_backend_name(backend)
        preload(backend)
        self.backend = backend
        self.generator = generator
        # Sharded across the ranks of this group (ekd_kernels.distributed); None: one process.
        self.process_group = process_group
        self.register_buffer("student_thresholds", initial_thresholds(self.config))
        self.register_buffer("teacher_thresholds", initial_thresholds(self.config))
        self.last_stats: Optional[EKDStats] = None

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The loss of one batch (0-d, fp32); updates the thresholds in training mode."""
        if isinstance(student, torch.Tensor) and self.student_thresholds.device != student.device:
            raise ValueError(
                f"the EKDLoss thresholds are on {self.student_thresholds.device} but the embeddings are on "
                f"{student.device}: move the loss module with .to(device)")
        if self.process_group is not None:
            from .distributed import ekd_sharded_checked
            result = ekd_sharded_checked(student, teacher, labels, self.student_thresholds, self.teacher_thresholds,
                                         self.config, update_thresholds=self.training,
                                         generator=generator or self.generator, group=self.process_group)
        else:
            result = ekd_loss(student, teacher, labels, self.student_thresholds, self.teacher_thresholds,
                              update_thresholds=self.training, generator=generator or self.generator,
                              backend=self.backend, config=self.config)
        if self.training:
            with torch.no_grad():
                self.student_thresholds.copy_(result.student_thresholds)
                self.teacher_thresholds.copy_(result.teacher_thresholds)
        self.last_stats = result.stats
        return result.loss

    def extra_repr(self) -> str:
        c = self.config
        return (f"fprs={c.fprs}, temperature={c.temperature}, num_hard_negatives={c.num_hard_negatives}, "
                f"momentum={c.momentum}, weights=({c.positive_weight}, {c.negative_weight}), "
                f"rank_loss={c.rank_loss!r}, critical_only={c.critical_only}, "
                f"negative_selection={c.negative_selection!r}, backend={self.backend!r}")
