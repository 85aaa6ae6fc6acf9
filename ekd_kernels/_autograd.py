"""The backward of a compiled loss op is a first derivative only: its own backward has no
autograd formula. Differentiating it again (create_graph=True, a gradient penalty) must raise,
never return a silently truncated second derivative (zero, or the terms through the Python glue
alone), which is what an unregistered op or torch's @once_differentiable gives when the
incoming gradient is a constant."""

from __future__ import annotations

import functools

import torch
from torch._C import _functions  # DelayedError, as torch.autograd.function.once_differentiable uses it


def first_order_only(backend: str):
    """Decorator for a ``register_autograd`` backward: computed without a graph; when the caller
    asked for one (grad mode on in the backward: create_graph=True), the results carry a node that
    raises on differentiation, naming the backend and the way out."""
    message = (f"the {backend} backend has no second derivative (create_graph=True / double backward "
               "through the loss): use backend='reference' for that").encode()

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            with torch.no_grad():
                outputs = backward(ctx, *grads)
            if not torch.is_grad_enabled():
                return outputs
            tensors = [i for i, o in enumerate(outputs) if isinstance(o, torch.Tensor)]
            if not tensors:
                return outputs
            raising = _functions.DelayedError(message, len(tensors))(
                *[outputs[i].detach().requires_grad_() for i in tensors])
            raising = raising if isinstance(raising, tuple) else (raising,)
            outputs = list(outputs)
            for i, value in zip(tensors, raising):
                outputs[i] = value
            return tuple(outputs)

        return wrapper

    return decorate


def eager_call(*tensors) -> bool:
    """Whether a loss op may be called through its eager twin (a plain torch.autograd.Function
    running the same checks, kernels and backward) rather than through the registered op: only
    plain tensors (None allowed) in plain eager mode.  torch.compile and export trace the op (its
    fake implementation gives them shapes); tensor subclasses (FakeTensor, DTensor), active
    dispatch modes (make_fx, FakeTensorMode) and torch.func transforms see the op too."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
            or torch._C._are_functorch_transforms_active()):
        return False
    return all(t is None or type(t) is torch.Tensor for t in tensors)
