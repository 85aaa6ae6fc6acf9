"""What one EKD call returns besides the loss: the new threshold state and its statistics."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import torch


@dataclasses.dataclass
class EKDStats:
    """Statistics of one call (SPEC.md, Statistics). Every field is a detached tensor.

    Counts are 0-d int64 tensors on the embeddings' device, so that logging them costs no
    host synchronisation until the caller reads them.  ``batch_*_thresholds`` are NaN when the
    batch has no negative pair (there is nothing to take an order statistic of).
    ``num_critical_pairs`` and ``critical_ratio`` are None unless ``compute_critical_ratio``.
    """

    batch_student_thresholds: torch.Tensor
    batch_teacher_thresholds: torch.Tensor
    student_thresholds: torch.Tensor
    teacher_thresholds: torch.Tensor
    num_positive_pairs: torch.Tensor
    num_negative_pairs: torch.Tensor
    num_selected_negatives: torch.Tensor
    num_critical_selected: torch.Tensor
    positive_term: torch.Tensor
    negative_term: torch.Tensor
    num_critical_pairs: Optional[torch.Tensor] = None
    critical_ratio: Optional[torch.Tensor] = None

    @classmethod
    def from_counts(cls, batch_student_thresholds, batch_teacher_thresholds, student_thresholds, teacher_thresholds,
                    counts, terms, critical_ratio=None) -> "EKDStats":
        """From the packed outputs of a fused op: counts = (positive, negative, selected negative,
        critical selected[, critical among all pairs]) and terms = (positive, negative);
        `critical_ratio` is given when the op counted critical pairs among all pairs."""
        # (positional, in the fields' order: this runs on every call of a fused backend, whose
        # host time bounds a small batch)
        if critical_ratio is None:
            return cls(batch_student_thresholds, batch_teacher_thresholds, student_thresholds, teacher_thresholds,
                       counts[0], counts[1], counts[2], counts[3], terms[0], terms[1])
        return cls(batch_student_thresholds, batch_teacher_thresholds, student_thresholds, teacher_thresholds,
                   counts[0], counts[1], counts[2], counts[3], terms[0], terms[1], counts[4], critical_ratio)

    def detach(self) -> "EKDStats":
        # (the field names looked up once, not through dataclasses.fields on every call; a
        # subclass's own, with its type)
        # (EKDStats named, not type(self) called: torch 2.6's dynamo cannot trace the latter under
        # fullgraph)
        if type(self) is EKDStats:
            cls, names = EKDStats, _FIELD_NAMES
        else:
            cls, names = type(self), [f.name for f in dataclasses.fields(self)]
        values = [getattr(self, name) for name in names]
        return cls(*[None if value is None else value.detach() for value in values])

    def as_dict(self) -> dict:
        """Plain Python numbers and lists (synchronises with the device): handy for loggers."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = None if v is None else v.tolist()
        return out


#: EKDStats's field names, in order (its positional arguments).
_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(EKDStats))


class EKDResult(NamedTuple):
    """Return value of the functional form ``ekd_loss``."""

    loss: torch.Tensor
    student_thresholds: torch.Tensor
    teacher_thresholds: torch.Tensor
    stats: EKDStats
