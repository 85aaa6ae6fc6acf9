"""Options of the EKD loss, validated once and shared by every backend.

The defaults are the authors' settings (Tencent/TFace, recognition/tasks/ekd); SPEC.md
lists what each option means.  Every backend receives the same frozen ``EKDConfig``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from fractions import Fraction
from typing import Tuple

from .validation import check_flag

#: False-positive rates of the thresholds, 1e-1 first (the authors' anchors 10 ... 1e6).
DEFAULT_FPRS: Tuple[float, ...] = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)

RANK_LOSSES = ("soft_rank", "eq7", "eq8")
NEGATIVE_SELECTIONS = ("hardest", "random")
#: Smallest temperature: the smallest normal float32.  The kernels divide by tau in fp32, where a
#: smaller value is subnormal or 0 (0 / 0 is NaN).
MIN_TEMPERATURE = 2.0**-126
#: Largest N: the compiled ops take it as a 64-bit integer.
MAX_HARD_NEGATIVES = 2**63 - 1


@functools.lru_cache(maxsize=1024)
def fpr_fraction(fpr: float) -> Fraction:
    """The exact rational behind a float FPR (1e-6 -> 1/1000000).

    The threshold index is floor(L * fpr); doing that in floating point would give
    L // 1000000 - 1 for some L because 1e-6 is stored slightly below 1/1000000.
    Cached: every call of the loss asks for the same few (limit_denominator costs about 20 us each,
    a quarter of a millisecond per call in all); a Fraction is immutable, so sharing it is safe.
    """
    return Fraction(fpr).limit_denominator(10**12)


def _ratios(fprs) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    fractions = [fpr_fraction(f) for f in fprs]
    return tuple(q.numerator for q in fractions), tuple(q.denominator for q in fractions)


def _real(name: str, value) -> float:
    """`value` as a finite float; ValueError naming `name` for anything else (bool, str, None, a
    tensor: ``float()`` would take some of those silently)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    # (comparisons, not math.isfinite: under torch.compile(dynamic=True) a float option is a
    # SymFloat, which a comparison guards on and math.isfinite cannot trace; NaN fails both)
    if not -math.inf < value < math.inf:
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


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
        # Types first: a string "False" from a config file must not switch a variant on, nor a
        # tensor or bool stand for a number.  The checked values are stored as plain Python types.
        fprs = self.fprs
        if isinstance(fprs, (str, bytes)) or not hasattr(fprs, "__iter__") or getattr(fprs, "ndim", 1) == 0:
            raise ValueError(f"fprs must be a sequence of false-positive rates, got {fprs!r}")
        fprs = tuple(_real("every FPR", f) for f in fprs)
        if len(fprs) == 0:
            raise ValueError("fprs must hold at least one false-positive rate, got an empty list")
        for f in fprs:
            if not (0.0 < f < 1.0):
                raise ValueError(f"every FPR must lie in (0, 1), got {f!r} in fprs={fprs}")
            fraction = fpr_fraction(f)
            # (its two integers compared: Dynamo of torch 2.6 traces no Fraction comparison, an
            # EKDLoss built inside a fullgraph-compiled function)
            if fraction.numerator >= fraction.denominator:  # the index floor(L * fpr) is read from this fraction
                raise ValueError(f"every FPR must lie in (0, 1): {f!r} in fprs={fprs} is within 1e-12 of 1, and the "
                                 "threshold index floor(L * fpr) reads an FPR as the nearest fraction with a "
                                 "denominator of at most 10^12, which is 1 here")
        set_field = functools.partial(object.__setattr__, self)
        set_field("fprs", fprs)
        set_field("_fpr_ratios", _ratios(fprs))
        temperature = _real("temperature", self.temperature)
        if not temperature >= MIN_TEMPERATURE:
            raise ValueError(f"temperature must be a finite number >= {MIN_TEMPERATURE:.8g} (the smallest normal "
                             f"float32: the loss divides by it in fp32), got {self.temperature!r}")
        set_field("temperature", temperature)
        n = self.num_hard_negatives
        if isinstance(n, bool) or not isinstance(n, numbers.Real) or not math.isfinite(n) or int(n) != n \
                or not 0 <= n <= MAX_HARD_NEGATIVES:
            raise ValueError(f"num_hard_negatives must be an integer in [0, 2^63 - 1], got {n!r}")
        set_field("num_hard_negatives", int(n))
        momentum = _real("momentum", self.momentum)
        if not (0.0 <= momentum <= 1.0):
            raise ValueError(f"momentum must lie in [0, 1], got {self.momentum!r}")
        set_field("momentum", momentum)
        for name in ("positive_weight", "negative_weight"):
            set_field(name, _real(name, getattr(self, name)))
        for name in ("critical_only", "compute_critical_ratio"):
            set_field(name, check_flag(name, getattr(self, name)))
        if not isinstance(self.rank_loss, str) or self.rank_loss not in RANK_LOSSES:
            raise ValueError(f"rank_loss must be one of {RANK_LOSSES}, got {self.rank_loss!r}")
        if not isinstance(self.negative_selection, str) or self.negative_selection not in NEGATIVE_SELECTIONS:
            raise ValueError(
                f"negative_selection must be one of {NEGATIVE_SELECTIONS}, got {self.negative_selection!r}")

    @property
    def num_thresholds(self) -> int:
        return len(self.fprs)

    @property
    def fpr_ratios(self) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
        """(numerators, denominators) of the FPRs' exact rationals (``fpr_fraction``), in FPR order.
        Computed once, at construction: the ops take them as integers, and a step traced by
        torch.compile then reads two tuples instead of tracing Fraction arithmetic."""
        ratios = self.__dict__.get("_fpr_ratios")
        if ratios is None:  # unpickled from a version without them (unpickling skips __post_init__)
            ratios = _ratios(self.fprs)
            object.__setattr__(self, "_fpr_ratios", ratios)
        return ratios

    def threshold_indices(self, num_negatives: int) -> Tuple[int, ...]:
        """0-based positions, in the descending order of negatives, of the K batch thresholds."""
        return tuple(num_negatives * p // q for p, q in zip(*self.fpr_ratios))
