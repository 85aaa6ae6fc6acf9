"""Input checks and dtype handling shared by the distillation losses of this subpackage."""

from __future__ import annotations

import functools
import numbers

import numpy
import torch

from ..config import _real
from ..reference import autocast_off, compute_dtype, nan_unless_finite, normalize_rows
from ..validation import check_embedding_pair

# the package's one normalisation and one input check, with the dtype rule below
__all__ = ["all_finite", "check_embedding_pair", "compute_dtypes", "fp32_under_autocast", "nan_unless_finite",
           "normalize_rows", "check_has_values", "check_integer", "check_number"]


def fp32_under_autocast(loss_fn):
    """Run a functional loss ``loss_fn(student, teacher, ...)`` with any enclosing ``torch.autocast``
    off on the inputs' device (its first tensor argument's), as ``ekd_loss`` does.  Why: the losses read fp16/bf16 inputs and
    compute in fp32 (compute_dtypes); inside autocast their matmuls would run in 16 bits anyway,
    changing the loss by 1e-3 and the gradient by up to 1e-1 (and a compiled op's internal ATen
    calls would too)."""

    @functools.wraps(loss_fn)
    def wrapper(*args, **kwargs):
        # (any parameter names, positional or keyword: hinton_kd_loss takes student_logits=...)
        tensors = [x for x in (*args, *kwargs.values()) if isinstance(x, torch.Tensor)]
        device = tensors[0].device if tensors else torch.device("cpu")
        with autocast_off(device):
            return loss_fn(*args, **kwargs)

    return wrapper


def check_number(name: str, value, *, positive: bool = False, non_negative: bool = False,
                 at_most_one: bool = False) -> float:
    """A loss option that is a finite real number (not a bool, str, None or tensor), optionally
    > 0, >= 0 or <= 1; ValueError naming it otherwise.  Returns it as a float."""
    value = _real(name, value)
    if positive and not value > 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    if non_negative and not value >= 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    if at_most_one and not value <= 1:
        raise ValueError(f"{name} must be at most 1, got {value!r}")
    return value


def check_has_values(x: torch.Tensor, what: str) -> None:
    """Losses whose selection reads values (sorts into masks, nonzero, unique) cannot run on meta
    tensors: a ValueError naming the loss, not an error from deep inside torch."""
    if x.device.type == "meta":
        raise ValueError(f"{what} selects by the values (sorts, masks of nonzero entries): meta tensors hold none")


def check_integer(name: str, value, minimum: int) -> int:
    """A loss option that is an integer (not a bool) >= minimum, as a Python int (a numpy integer
    too, as EKDConfig takes it); ValueError naming it otherwise."""
    if isinstance(value, (bool, numpy.bool_)) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r} ({type(value).__name__})")
    return int(value)


def compute_dtypes(student: torch.Tensor, teacher: torch.Tensor):
    """(student, teacher) in the compute dtype: fp16/bf16 -> fp32, fp32/fp64 kept; the teacher is
    detached (no gradient ever reaches it) and cast to the student's compute dtype."""
    student = student.to(compute_dtype(student))
    return student, teacher.detach().to(student.dtype)


def all_finite(*tensors: torch.Tensor) -> torch.Tensor:
    """0-d bool tensor on the tensors' device: every element of every tensor is finite (no host sync)."""
    finite = torch.isfinite(tensors[0]).all()
    for t in tensors[1:]:
        finite = finite & torch.isfinite(t).all()
    return finite


