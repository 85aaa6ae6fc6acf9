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


def keep_precision_under_assign(module: nn.Module, names: Sequence[str], load: Callable[[], None]) -> None:
    """Run ``load`` (the module's ``nn.Module._load_from_state_dict``), then give each named
    floating buffer back its dtype where ``load_state_dict(assign=True)`` brought it in 16 bits
    (fp16 and bf16 widen exactly), each named integer buffer back its dtype where assign brought
    another integer dtype (int32 counts or labels, say: index writes need the module's dtype; the
    values are those a copying load casts them to, exact for every value a narrower integer
    holds), and a contiguous layout (assign may bring any): the state a copying load leaves,
    which the module's forward takes (its own 16-bit casts never narrow these buffers either:
    keep_precision_under_16_bit_casts)."""
    dtypes = {name: module._buffers[name].dtype for name in names if module._buffers.get(name) is not None}
    load()
    for name, dtype in dtypes.items():
        buffer = module._buffers.get(name)
        if buffer is None:
            continue
        if (buffer.dtype in (torch.float16, torch.bfloat16) and dtype.is_floating_point
                and dtype.itemsize > buffer.dtype.itemsize):
            buffer = buffer.to(dtype)
        elif _dtype_kind(buffer.dtype) == _dtype_kind(dtype) == "integer" and buffer.dtype != dtype:
            buffer = buffer.to(dtype)
        module._buffers[name] = buffer.contiguous()


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
