"""Functional EKD: the threshold state goes in and comes out, nothing is hidden."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .backends import resolve_backend
from .config import EKDConfig
from .reference import autocast_off
from .result import EKDResult
from .validation import check_embeddings_and_labels, check_flag, check_generator, check_thresholds, signed_labels


#: The option keywords ekd_loss takes: the fields of EKDConfig.
_OPTION_NAMES = tuple(field.name for field in dataclasses.fields(EKDConfig))


def initial_thresholds(config: EKDConfig, device=None) -> torch.Tensor:
    """The EMA state before the first call: K zeros (fp32), as the authors initialise it."""
    return torch.zeros(config.num_thresholds, dtype=torch.float32, device=device)


def ekd_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
             student_thresholds: Optional[torch.Tensor] = None, teacher_thresholds: Optional[torch.Tensor] = None,
             *, update_thresholds: bool = True, generator: Optional[torch.Generator] = None,
             backend: str = "auto", config: Optional[EKDConfig] = None, **options) -> EKDResult:
    """EKD loss of one batch, with explicit threshold state.

    Args:
        student: B x Ds raw student embeddings (the gradient flows here, through the normalisation).
        teacher: B x Dt raw teacher embeddings (no gradient).
        labels: B integer identities.
        student_thresholds, teacher_thresholds: the K EMA thresholds before this call (fp32,
            FPR order); None means the initial state (zeros).
        update_thresholds: apply this batch's EMA update (the module does so in training mode).
        generator: the random source of ``negative_selection="random"``.
        backend: "auto", "reference", "triton" or "csrc" (see ``ekd_kernels.backends``).
        config / **options: an ``EKDConfig``, or its fields as keywords (not both).

    Returns:
        ``EKDResult(loss, student_thresholds, teacher_thresholds, stats)``: the 0-d loss (fp32,
        fp64 for fp64 inputs), the thresholds after this call, and the detached statistics.
    """
    if config is None:
        unknown = sorted(set(options) - set(_OPTION_NAMES))
        if unknown:
            raise ValueError(f"unknown EKD option(s) {unknown}; the options are the fields of EKDConfig: "
                             f"{list(_OPTION_NAMES)}")
        config = EKDConfig(**options)
    elif options:
        raise ValueError(f"pass either config= or option keywords, not both (got {sorted(options)})")
    elif not isinstance(config, EKDConfig):
        raise ValueError(f"config must be an EKDConfig (or pass the options as keywords), got {type(config).__name__}")
    update_thresholds = check_flag("update_thresholds", update_thresholds)
    check_generator(generator)
    check_embeddings_and_labels(student, teacher, labels)
    labels = signed_labels(labels)
    if student_thresholds is None:
        student_thresholds = initial_thresholds(config, student.device)
    if teacher_thresholds is None:
        teacher_thresholds = initial_thresholds(config, student.device)
    check_thresholds(student_thresholds, teacher_thresholds, config.num_thresholds, student.device)
    impl = resolve_backend(backend, student.device, (student.dtype, teacher.dtype))
    with autocast_off(student.device):
        return impl(student, teacher, labels, student_thresholds, teacher_thresholds, config,
                    update_thresholds=update_thresholds, generator=generator)
