"""Distillation losses besides EKD: PWR, unified instance + relation KD, and the comparison set
of the EKD paper (SP, CC, DarkRank, FitNet, KD, cosine).  Fast RKD lives in ``ekd_kernels.rkd_fast``.

Every loss takes raw embeddings (logits for ``hinton_kd_loss``), has a module and a functional
form, sends gradient to the student only and raises ValueError on bad input.
"""

from .comparison import (CorrelationCongruenceLoss, CosineDistillLoss, FitNetLoss, HardDarkRankLoss, HintonKDLoss,
                         SimilarityPreservingLoss, correlation_congruence_loss, cosine_distill_loss, fitnet_loss,
                         hard_darkrank_loss, hinton_kd_loss, similarity_preserving_loss)
from .pwr import PWRLoss, pwr_loss
from .unified import UnifiedKDLoss, UnifiedKDResult, unified_kd_loss, unified_kd_terms

__all__ = [
    "PWRLoss", "pwr_loss",
    "UnifiedKDLoss", "UnifiedKDResult", "unified_kd_loss", "unified_kd_terms",
    "SimilarityPreservingLoss", "similarity_preserving_loss",
    "CorrelationCongruenceLoss", "correlation_congruence_loss",
    "HardDarkRankLoss", "hard_darkrank_loss",
    "FitNetLoss", "fitnet_loss",
    "HintonKDLoss", "hinton_kd_loss",
    "CosineDistillLoss", "cosine_distill_loss",
]
