"""Buffers that keep their precision when a module is cast to 16 bits."""

from __future__ import annotations

from typing import Callable, Sequence

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
