"""Buffers that keep their precision when a module is cast to 16 bits, and checkpoints whose
buffers cannot be loaded as they are."""

from __future__ import annotations

from typing import Callable, List, Sequence

import torch
from torch import nn


def keep_precision_under_16_bit_casts(module: nn.Module, names: Sequence[str], fn: Callable) -> Callable:
    """``fn`` (the function ``nn.Module._apply`` maps over tensors), except that the named floating
    buffers of ``module`` keep their dtype, moved to ``fn``'s device, when ``fn`` casts to fp16 or
    bf16 (``.half()``, ``.bfloat16()``, say with the model the loss sits in).  Every other cast
    applies as usual.  For state that a 16-bit dtype would spoil: EMA thresholds, a bank of fp32
    embeddings."""
    kept = {id(module._buffers[name]) for name in names if module._buffers.get(name) is not None}

    def apply(t):
        out = fn(t)
        if id(t) in kept and out.dtype in (torch.float16, torch.bfloat16) and t.is_floating_point():
            return t.to(device=out.device)
        return out

    return apply


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "floating" if dtype.is_floating_point else "integer"


def checkpoint_layout_problems(module: nn.Module, state_dict, prefix: str, names: Sequence[str]) -> List[str]:
    """Why the named buffers of a checkpoint cannot be loaded into `module` as they are: a shape
    other than the module's (``load_state_dict`` would have copied the buffers before that one,
    then raised), or a dtype of another kind than the module's (floats from integers, bools or
    complex numbers, integers from floats: the copy would cast them and load a changed state
    silently).  For ``_load_from_state_dict`` to check before anything is copied, so that a
    refused checkpoint leaves the module as it was."""
    problems = []
    for name in names:
        value, own = state_dict.get(prefix + name), module._buffers.get(name)
        if not isinstance(value, torch.Tensor) or own is None:
            continue  # a missing entry: load_state_dict's own report (strict) or nothing to copy
        if value.shape != own.shape:
            problems.append(f"{prefix}{name} in the checkpoint has shape {tuple(value.shape)}, but this "
                            f"{type(module).__name__}'s has shape {tuple(own.shape)}")
        elif _dtype_kind(value.dtype) != _dtype_kind(own.dtype):
            problems.append(f"{prefix}{name} in the checkpoint is {value.dtype}, but this {type(module).__name__} "
                            f"holds {_dtype_kind(own.dtype)} values there ({own.dtype}): a corrupted checkpoint?")
    return problems
