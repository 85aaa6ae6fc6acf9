"""ekd_kernels: Evaluation-oriented Knowledge Distillation (EKD) losses for face recognition.

    from ekd_kernels import EKDLoss
    crit = EKDLoss()                      # the authors' defaults
    loss = crit(student_emb, teacher_emb, labels)
"""

from .backends import BACKEND_NAMES, available_backends
from .config import DEFAULT_FPRS, EKDConfig
from .functional import ekd_loss, initial_thresholds
from .module import EKDLoss
from .result import EKDResult, EKDStats
from .rkd import RKDLoss, rkd_loss
from .rkd_fast import FastRKDLoss, fast_rkd_loss
from . import losses
from .losses import (CorrelationCongruenceLoss, CosineDistillLoss, FitNetLoss, HardDarkRankLoss, HintonKDLoss,
                     PWRLoss, SimilarityPreservingLoss, UnifiedKDLoss, correlation_congruence_loss,
                     cosine_distill_loss, fitnet_loss, hard_darkrank_loss, hinton_kd_loss, pwr_loss,
                     similarity_preserving_loss, unified_kd_loss)
from .arcface import ArcFace
from .sampler import BalancedBatchSampler
from .models import IResNet, MobileFaceNet, build_backbone, ir, mobilefacenet
from .metrics import VerificationResult, tpr_at_fpr, verify_all_pairs
from .data import FaceFolder, SyntheticFaces

__version__ = "0.1.0"

__all__ = [
    "EKDLoss", "ekd_loss", "EKDConfig", "EKDResult", "EKDStats", "DEFAULT_FPRS", "initial_thresholds",
    "RKDLoss", "rkd_loss", "FastRKDLoss", "fast_rkd_loss", "BACKEND_NAMES", "available_backends", "__version__",
    "losses", "CorrelationCongruenceLoss", "CosineDistillLoss", "FitNetLoss", "HardDarkRankLoss", "HintonKDLoss",
    "PWRLoss", "SimilarityPreservingLoss", "UnifiedKDLoss", "correlation_congruence_loss", "cosine_distill_loss",
    "fitnet_loss", "hard_darkrank_loss", "hinton_kd_loss", "pwr_loss", "similarity_preserving_loss",
    "unified_kd_loss", "ArcFace", "BalancedBatchSampler", "IResNet", "MobileFaceNet", "build_backbone", "ir",
    "mobilefacenet", "VerificationResult", "tpr_at_fpr", "verify_all_pairs", "FaceFolder", "SyntheticFaces",
]
