"""The backward of a compiled loss op is a first derivative only: its own backward has no
autograd formula. Differentiating it again (create_graph=True, a gradient penalty) must raise,
never return a silently truncated second derivative (zero, or the terms through the Python glue
alone), which is what an unregistered op or torch's @once_differentiable gives when the
incoming gradient is a constant."""

from __future__ import annotations

import functools

import torch
from torch._C import _functions  # DelayedError, as torch.autograd.function.once_differentiable uses it


_REFERENCE_WAY_OUT = "use backend='reference' for that"


def _second_derivative_message(backend: str, transforms: bool = False, what: str = "",
                               way_out: str = _REFERENCE_WAY_OUT) -> str:
    how = "nested torch.func transforms" if transforms else "create_graph=True / double backward through the loss"
    return f"{what or f'the {backend} backend'} has no second derivative ({how})" + (f": {way_out}" if way_out else "")


def first_order_only(backend: str, what: str = "", way_out: str = _REFERENCE_WAY_OUT):
    """Decorator for a ``register_autograd`` (or autograd.Function) backward: computed without a
    graph; when the caller asked for one (grad mode on in the backward: create_graph=True), the
    results carry a node that raises on differentiation, naming the backend and the way out.

    The node also takes the forward's differentiable inputs that ``keep_anchors`` recorded, and
    passes them nowhere: it then lies on every path from the gradient back to them, so
    ``torch.autograd.grad(penalty, x)`` runs it and raises too.  Without them it hung off fresh
    leaves, which only ``.backward()`` (every node) reaches: ``grad(..., x)`` skipped it and
    returned the penalty's other terms alone, or None with allow_unused (torch's
    @once_differentiable does the same).

    The message names `what` (default: "the <backend> backend") and `way_out` (default: the
    reference backend; empty: none)."""
    message = _second_derivative_message(backend, what=what, way_out=way_out).encode()

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            if not torch.is_grad_enabled():  # (no graph asked for: the usual backward, no no_grad region to enter)
                return backward(ctx, *grads)
            with torch.no_grad():
                outputs = backward(ctx, *grads)
            tensors = [i for i, o in enumerate(outputs) if isinstance(o, torch.Tensor)]
            if not tensors:
                return outputs
            anchors = getattr(ctx, "first_order_anchors", ())
            raising = _functions.DelayedError(message, len(tensors) + len(anchors))(
                *[outputs[i].detach().requires_grad_() for i in tensors], *anchors)
            raising = raising if isinstance(raising, tuple) else (raising,)
            outputs = list(outputs)
            for i, value in zip(tensors, raising):
                outputs[i] = value
            return tuple(outputs)

        return wrapper

    return decorate


def _forward_mode_message(backend: str, what: str = "", way_out: str = _REFERENCE_WAY_OUT) -> str:
    return (f"{what or f'the {backend} backend'} has no forward-mode derivative (torch.func.jvp, jacfwd, "
            "hessian, torch.autograd.forward_ad)" + (f": {way_out}" if way_out else ""))


#: The torch.func transforms that differentiate (grad, vjp, jacrev: Grad; jvp, jacfwd: Jvp).
_DERIVATIVES = (torch._C._functorch.TransformType.Grad, torch._C._functorch.TransformType.Jvp)


def _transform_kinds() -> list:
    """The TransformType of each active torch.func transform, outermost first."""
    return [interpreter.key() for interpreter in torch._C._functorch.get_interpreter_stack() or ()]


def no_forward_mode(backend: str, what: str = "", way_out: str = _REFERENCE_WAY_OUT):
    """The ``jvp`` staticmethod of a loss's autograd.Function whose kernels have no forward-mode
    rule: a NotImplementedError naming the loss and the way out, where torch's own ("You must
    implement the jvp function for custom autograd.Function") names neither.  Runs only when a
    tangent reaches the Function, so a call without one pays nothing."""
    message = _forward_mode_message(backend, what, way_out)

    def jvp(ctx, *tangents):
        raise NotImplementedError(message)

    return staticmethod(jvp)


def no_batching_rule(backend: str):
    """The ``vmap`` staticmethod of a fused backend's torch.func Function: a NotImplementedError
    naming the backend and the way out, where torch's own ("You tried to vmap over _FuncForward")
    names an internal class.  vmap of the forward has no batched kernel (jacfwd and hessian stop
    at the forward mode first: no_forward_mode); jacrev of the loss (a vmap of its backward) does
    not come here."""
    message = (f"the {backend} backend has no batching rule (torch.func.vmap over the loss): "
               f"{_REFERENCE_WAY_OUT}, or loop over the batches")

    def vmap(info, in_dims, *args):
        raise NotImplementedError(message)

    return staticmethod(vmap)


def refuse_forward_mode(x: torch.Tensor, backend: str, what: str = "", way_out: str = _REFERENCE_WAY_OUT) -> None:
    """NotImplementedError when `x` carries a forward-mode tangent (a dual tensor of
    torch.autograd.forward_ad, or a torch.func.jvp / jacfwd transform is active), for a loss
    called through a registered op that only computes a gradient when `x` requires one: a dual
    tensor does not, so the op ran without autograd and the tangent was silently dropped (zero)."""
    if torch._C._are_functorch_transforms_active():
        if torch._C._functorch.TransformType.Jvp in _transform_kinds():
            raise NotImplementedError(_forward_mode_message(backend, what, way_out))
    if torch.autograd.forward_ad._current_level >= 0 and \
            torch.autograd.forward_ad.unpack_dual(x).tangent is not None:
        raise NotImplementedError(_forward_mode_message(backend, what, way_out))


def refuse_torch_func(what: str, way_out: str = "", derivatives_only: bool = False) -> None:
    """NotImplementedError under torch.func transforms (all of them, or with `derivatives_only`
    grad / vjp / jacrev / jvp only) for a loss whose gradient comes from an autograd.Function in
    the forward(ctx) style (its gradient is accumulated in the forward, which a setup_context
    forward could not know to do), or from the autograd torch.library registers for an op:
    torch.func refuses those with a message that names no loss ("it must override the
    setup_context staticmethod")."""
    if not torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling():
        return
    if derivatives_only and not any(kind in _DERIVATIVES for kind in _transform_kinds()):
        return
    transforms = "grad, vjp, jacrev, jvp" + ("" if derivatives_only else ", vmap")
    raise NotImplementedError(f"{what} does not run under torch.func's {transforms}: take its gradient with "
                              ".backward() or torch.autograd.grad" + (f", or {way_out}" if way_out else ""))


def keep_anchors(ctx, *inputs) -> None:
    """In a forward (or setup_context) whose backward is first_order_only: record its inputs that
    require grad, for the raising node to hang on.  Plain attributes, not saved tensors: the
    backward does not read them, so autograd's version check (an in-place change of the student
    between forward and backward) and saved-tensor hooks (activation checkpointing unpacks each
    saved tensor once) must not see them.  They live as long as the graph's node (one B x D
    input, typically the student, which its caller holds anyway)."""
    ctx.first_order_anchors = tuple(x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad)


def eager_call(*tensors) -> bool:
    """Whether a loss op may be called through its eager twin (a plain torch.autograd.Function
    running the same checks, kernels and backward) rather than through the registered op: only
    plain tensors (None allowed) in plain eager mode.  torch.compile and export trace the op (its
    fake implementation gives them shapes); tensor subclasses (FakeTensor, DTensor), active
    dispatch modes (make_fx, FakeTensorMode) and torch.func transforms see the op too."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
            or torch._C._are_functorch_transforms_active()):
        return False
    for t in tensors:  # (a loop, not all() over a generator: this runs on every call)
        if t is not None and type(t) is not torch.Tensor:
            return False
    return True


def functorch_call() -> bool:
    """Whether a loss op must be called through its torch.func twin (a setup_context style
    torch.autograd.Function running the same checks, kernels and backward): under torch.func
    transforms (grad, vjp, jacrev, ...) in eager mode.  Why: the autograd torch.library builds
    for a registered op (torch._library.autograd, torch 2.14 included) is a forward(ctx, ...)
    Function, which functorch refuses ("it must override the setup_context staticmethod").
    Under torch.compile and dispatch modes the op is still traced."""
    return (torch._C._are_functorch_transforms_active() and not torch.compiler.is_compiling()
            and torch._C._len_torch_dispatch_stack() == 0)


def refuse_nested_derivative(backend: str) -> None:
    """In a torch.func twin's backward: raise when more than one derivative transform (grad, jvp)
    is active, i.e. an outer one would differentiate this gradient (grad of grad, jacrev of
    grad): first_order_only's raising node cannot be made on a transform's tensors, and the
    backward op under it would give a silently zero second derivative."""
    if sum(kind in _DERIVATIVES for kind in _transform_kinds()) > 1:
        raise RuntimeError(_second_derivative_message(backend, transforms=True))


class _NanGradientUnless(torch.autograd.Function):
    """The identity on x, whose gradient is NaN throughout when `finite` (0-d bool) is False.

    Why: a non-finite batch's loss reads NaN (SPEC), but through torch.where its gradient would
    be 0, and where the bad row takes part in no distilled pair the rest of the gradient stays
    finite: a gradient scaler, which looks at the gradients, would take the step.  Every backend
    gives NaN throughout (the fused ones from their NaN positive coefficient).  A finite batch's
    gradient passes unchanged (torch.where: the same bits).  setup_context style, vmap by rule,
    a differentiable backward and a jvp (the same rule on the tangent): torch.func's transforms,
    forward mode (jvp, jacfwd, hessian) and second derivatives go through."""

    generate_vmap_rule = True

    @staticmethod
    def forward(finite, x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (finite,) = ctx.saved_tensors
        return None, torch.where(finite, grad, torch.full_like(grad, float("nan")))

    @staticmethod
    def jvp(ctx, finite_tangent, x_tangent):
        (finite,) = ctx.saved_tensors
        return torch.where(finite, x_tangent, torch.full_like(x_tangent, float("nan")))


def nan_gradient_unless(finite: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x, with a gradient (and a forward-mode tangent) NaN throughout unless `finite`: see
    _NanGradientUnless (the EKD backends' rule for a non-finite batch, also fast RKD's torch path)."""
    return _NanGradientUnless.apply(finite, x)
