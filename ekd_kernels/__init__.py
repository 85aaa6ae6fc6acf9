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

__version__ = "0.1.0"

__all__ = [
    "EKDLoss", "ekd_loss", "EKDConfig", "EKDResult", "EKDStats", "DEFAULT_FPRS", "initial_thresholds",
    "RKDLoss", "rkd_loss", "BACKEND_NAMES", "available_backends", "__version__",
]
