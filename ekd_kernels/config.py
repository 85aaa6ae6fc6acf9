"""Options of the EKD loss, validated once and shared by every backend.

The defaults are the authors' settings (Tencent/TFace, recognition/tasks/ekd); SPEC.md
lists what each option means.  Every backend receives the same frozen ``EKDConfig``.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from typing import Tuple

#: False-positive rates of the thresholds, 1e-1 first (the authors' anchors 10 ... 1e6).
DEFAULT_FPRS: Tuple[float, ...] = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)

RANK_LOSSES = ("soft_rank", "eq7", "eq8")
NEGATIVE_SELECTIONS = ("hardest", "random")


def fpr_fraction(fpr: float) -> Fraction:
    """The exact rational behind a float FPR (1e-6 -> 1/1000000).

    The threshold index is floor(L * fpr); doing that in floating point would give
    L // 1000000 - 1 for some L because 1e-6 is stored slightly below 1/1000000.
    """
    return Fraction(fpr).limit_denominator(10**12)


@dataclasses.dataclass(frozen=True)
class EKDConfig:
    """Every knob of the loss. Build it through ``EKDConfig(...)``: it validates itself.

    fprs: false-positive rates of the K thresholds, in the order the threshold buffers use.
    temperature: tau of the soft rank's sigmoid.
    num_hard_negatives: N, negative pairs distilled per call.
    momentum: weight of the batch threshold in the EMA update.
    positive_weight / negative_weight: weights of the two terms.
    critical_only: average each term over its critical pairs only (the paper's Eq. 5).
    rank_loss: "soft_rank" (default), "eq7" (sum_k |(b - t_k(T)) - (a - t_k(S))|) or "eq8" ((b - a)^2).
    negative_selection: "hardest" (default) or "random" (uniform, from a caller generator).
    compute_critical_ratio: also count critical pairs among all pairs (one more pass).
    """

    fprs: Tuple[float, ...] = DEFAULT_FPRS
    temperature: float = 0.01
    num_hard_negatives: int = 2000
    momentum: float = 0.01
    positive_weight: float = 0.02
    negative_weight: float = 0.01
    critical_only: bool = False
    rank_loss: str = "soft_rank"
    negative_selection: str = "hardest"
    compute_critical_ratio: bool = False

    def __post_init__(self):
        fprs = tuple(float(f) for f in self.fprs)
        object.__setattr__(self, "fprs", fprs)
        if len(fprs) == 0:
            raise ValueError("fprs must hold at least one false-positive rate, got an empty list")
        for f in fprs:
            if not (0.0 < f < 1.0):
                raise ValueError(f"every FPR must lie in (0, 1), got {f!r} in fprs={fprs}")
        if not (self.temperature > 0.0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite positive number, got {self.temperature!r}")
        if isinstance(self.num_hard_negatives, bool) or int(self.num_hard_negatives) != self.num_hard_negatives \
                or self.num_hard_negatives < 0:
            raise ValueError(f"num_hard_negatives must be a non-negative integer, got {self.num_hard_negatives!r}")
        object.__setattr__(self, "num_hard_negatives", int(self.num_hard_negatives))
        if not (0.0 <= self.momentum <= 1.0):
            raise ValueError(f"momentum must lie in [0, 1], got {self.momentum!r}")
        for name in ("positive_weight", "negative_weight"):
            w = getattr(self, name)
            if not math.isfinite(w):
                raise ValueError(f"{name} must be finite, got {w!r}")
        if self.rank_loss not in RANK_LOSSES:
            raise ValueError(f"rank_loss must be one of {RANK_LOSSES}, got {self.rank_loss!r}")
        if self.negative_selection not in NEGATIVE_SELECTIONS:
            raise ValueError(
                f"negative_selection must be one of {NEGATIVE_SELECTIONS}, got {self.negative_selection!r}")

    @property
    def num_thresholds(self) -> int:
        return len(self.fprs)

    def threshold_indices(self, num_negatives: int) -> Tuple[int, ...]:
        """0-based positions, in the descending order of negatives, of the K batch thresholds."""
        out = []
        for f in self.fprs:
            q = fpr_fraction(f)
            out.append(num_negatives * q.numerator // q.denominator)
        return tuple(out)
