"""Backend "csrc": the compiled C++ (CPU) and CUDA EKD ops, registered with torch.library.

The C++ side (csrc/) holds the op schemas and one kernel per device; this file holds the rest of
the op contract: the fake (meta) implementations, the autograd registration, and the thin
wrapper ``ekd_forward`` with the signature of ``reference.ekd_reference``.

Ops (namespace ``ekd_kernels``):

``ekd_forward``  every stage of SPEC.md in one call: normalisation, similarity tiles, exact batch
    thresholds by radix selection, EMA update (on device, no host sync), top-N hardest or given
    random negatives, critical mask, rank loss and statistics.  Besides the loss and the state it
    returns what the sparse backward needs: the selected pairs (fixed shape n_max x 2, -1
    padded), d loss / d a of each, and the factor of the positive pairs' loss.
``ekd_backward``  d loss / d student, touching only the positive pairs (recomputed from the label
    groups) and the selected negatives.

The ops take embeddings in the compute dtype (fp32, or fp64 for gradcheck); bf16/fp16 inputs
are converted here, so that autograd brings the gradient back in the input's dtype.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from ._autograd import (eager_call, first_order_only, functorch_call, keep_anchors, no_batching_rule,
                        no_forward_mode, refuse_nested_derivative)
from .config import EKDConfig
from .reference import compute_dtype, draw_random_negatives
from .result import EKDResult, EKDStats

_RANK_LOSS_CODES = {"soft_rank": 0, "eq7": 1, "eq8": 2}
_FORWARD_OP = "ekd_kernels::ekd_forward"
_BACKWARD_OP = "ekd_kernels::ekd_backward"


def load_error_message(error: BaseException) -> str:
    """Why the compiled ops are missing, from the error of importing ekd_kernels._C, with the
    remedy: a missing library was not built; one that fails to load was built against another
    torch (pip's isolated build environment brings its own) or is damaged."""
    if isinstance(error, ModuleNotFoundError) and error.name == "ekd_kernels._C":
        return ("the C++ extension ekd_kernels._C was not built (install the package from its source tree with "
                "`pip install --no-build-isolation .`, or run `make install` in a checkout)")
    return (f"the C++ extension ekd_kernels._C failed to load: {error}; it was most likely built against "
            f"another torch than this one ({torch.__version__}), e.g. in pip's isolated build environment: rebuild "
            "it here with `pip install --no-build-isolation --no-deps --force-reinstall .` from the source tree")


try:
    from . import _C  # noqa: F401  (loading the library registers the ops)

    _LOAD_ERROR: Optional[str] = None
except (ImportError, OSError) as exc:
    _LOAD_ERROR = load_error_message(exc)
    # (said once, here: backend="auto" would otherwise fall back to the others without a word)
    warnings.warn(f"ekd_kernels: {_LOAD_ERROR}. The 'csrc' backend is unavailable; 'auto' uses the others.",
                  RuntimeWarning, stacklevel=2)


# Asked once, when the library loads (which registers every kernel it was compiled with): the
# dispatcher query is a torch._C call that torch.compile cannot trace (a graph break, an error
# under fullgraph=True), and backend resolution asks on every call.
_CUDA_OPS_BUILT = _LOAD_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(_FORWARD_OP, "CUDA")


def cuda_ops_built() -> bool:
    """Whether the extension was compiled with its CUDA kernels (whatever this machine's GPUs)."""
    return _CUDA_OPS_BUILT


def unavailable_reason(device: torch.device) -> Optional[str]:
    """None when the compiled ops can run on `device`, else why not."""
    device = torch.device(device)
    if _LOAD_ERROR is not None:
        return _LOAD_ERROR
    if device.type in ("cpu", "meta"):  # meta: the ops' fake implementations (shapes only)
        return None
    if device.type == "cuda":
        if not cuda_ops_built():
            return ("the C++ extension was built without CUDA ops (at build time: no nvcc, a CPU-only torch, or an "
                    "nvcc of another CUDA major version than torch's; `pip install -v` shows which)")
        if not torch.cuda.is_available():
            return "no CUDA device"
        return None
    return f"no compiled EKD kernels for device type {device.type!r}"


# --------------------------------------------------------------------------- fake implementations
def _max_selected(batch, num_hard_negatives: int):
    """Rows of selected_pairs: min(N, B(B-1)/2), known from the shapes alone."""
    return torch.sym_min(num_hard_negatives, batch * (batch - 1) // 2)


def _fake_forward(student, teacher, labels, student_thresholds, teacher_thresholds, random_negative_ranks,
                  fpr_numerators, fpr_denominators, temperature, num_hard_negatives, momentum, positive_weight,
                  negative_weight, critical_only, rank_loss, update_thresholds, compute_critical_ratio):
    k = len(fpr_numerators)
    n_max = _max_selected(student.shape[0], num_hard_negatives)
    state = student_thresholds.new_empty((k,))
    return (student.new_empty(()), state, state.clone(), state.clone(), state.clone(),
            labels.new_empty((5,), dtype=torch.int64), student.new_empty((2,)),
            labels.new_empty((n_max, 2), dtype=torch.int64), student.new_empty((n_max,)), student.new_empty(()))


def _fake_backward(grad_loss, student, teacher, labels, student_thresholds, teacher_thresholds, selected_pairs,
                   selected_grads, positive_scale, temperature, critical_only, rank_loss):
    # The shape / dtype / device checks of the kernels (csrc/ekd_common.cpp, check_backward_inputs);
    # torch._check on sizes: a runtime assertion under dynamic shapes, not a guard.
    def check(condition, message):
        torch._check(condition, lambda: f"ekd_backward: {message}")

    check(student.dim() == 2, f"student must be 2-D (B x Ds), got shape {tuple(student.shape)}")
    check(student.dtype in (torch.float32, torch.float64), f"student must be float32 or float64, got {student.dtype}")
    batch = student.shape[0]
    check(batch >= 2, f"student needs B >= 2 rows, got shape {tuple(student.shape)}")
    check(teacher.dim() == 2, f"teacher must be 2-D with B rows (as student), got shape {tuple(teacher.shape)}")
    check(teacher.shape[0] == batch, f"teacher must be 2-D with B rows (as student), got shape {tuple(teacher.shape)}")
    check(teacher.dtype.is_floating_point, f"teacher must be a floating tensor, got {teacher.dtype}")
    check(teacher.shape[1] >= 1, f"teacher needs at least one column, got shape {tuple(teacher.shape)}")
    check(labels.dim() == 1, f"labels must be 1-D of length B, got shape {tuple(labels.shape)}")
    check(labels.shape[0] == batch, f"labels must be 1-D of length B, got shape {tuple(labels.shape)}")
    check(not (labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool),
          f"labels must be integers, got {labels.dtype}")
    check(student_thresholds.dim() == 1, f"student_thresholds must be 1-D, got shape {tuple(student_thresholds.shape)}")
    check(student_thresholds.shape[0] >= 1, "student_thresholds must hold K >= 1 values")
    check(teacher_thresholds.dim() == 1, f"teacher_thresholds must be 1-D, got shape {tuple(teacher_thresholds.shape)}")
    check(teacher_thresholds.shape[0] == student_thresholds.shape[0],
          f"student_thresholds and teacher_thresholds must hold the same K values, got shapes "
          f"{tuple(student_thresholds.shape)} and {tuple(teacher_thresholds.shape)}")
    check(student_thresholds.dtype.is_floating_point and teacher_thresholds.dtype.is_floating_point,
          "student_thresholds and teacher_thresholds must be floating")
    check(selected_pairs.dim() == 2, f"selected_pairs must be n x 2, got shape {tuple(selected_pairs.shape)}")
    check(selected_pairs.shape[1] == 2, f"selected_pairs must be n x 2, got shape {tuple(selected_pairs.shape)}")
    check(selected_pairs.shape[0] <= batch * (batch - 1) // 2, "selected_pairs must have n <= B(B-1)/2 rows")
    check(selected_pairs.dtype == torch.int64, f"selected_pairs must be int64, got {selected_pairs.dtype}")
    check(selected_grads.dim() == 1, f"selected_grads must be 1-D, got shape {tuple(selected_grads.shape)}")
    check(selected_grads.shape[0] == selected_pairs.shape[0],
          "selected_grads must hold one value per row of selected_pairs")
    check(selected_grads.dtype.is_floating_point, f"selected_grads must be floating, got {selected_grads.dtype}")
    check(grad_loss.numel() == 1, f"grad_loss must be one floating value, got shape {tuple(grad_loss.shape)}")
    check(grad_loss.dtype.is_floating_point, f"grad_loss must be one floating value, got {grad_loss.dtype}")
    check(positive_scale.numel() == 1, f"positive_scale must be one floating value, got shape "
                                       f"{tuple(positive_scale.shape)}")
    check(positive_scale.dtype.is_floating_point, f"positive_scale must be one floating value, got "
                                                  f"{positive_scale.dtype}")
    for name, x in (("grad_loss", grad_loss), ("teacher", teacher), ("labels", labels),
                    ("student_thresholds", student_thresholds), ("teacher_thresholds", teacher_thresholds),
                    ("selected_pairs", selected_pairs), ("selected_grads", selected_grads),
                    ("positive_scale", positive_scale)):
        check(x.device == student.device, f"{name} must be on the student's device {student.device}, got {x.device}")
    if rank_loss not in _RANK_LOSS_CODES.values():
        raise ValueError(f"ekd_backward: unknown rank_loss {rank_loss} (expected 0, 1 or 2)")
    if not temperature > 0:
        raise ValueError(f"ekd_backward: temperature must be > 0, got {temperature}")
    return torch.empty_like(student, memory_format=torch.contiguous_format)


# --------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # only the loss carries a gradient: no zero fill for the 9 others
    student, teacher, labels = inputs[:3]
    ctx.options = (inputs[8], inputs[13], inputs[14])  # temperature, critical_only, rank_loss
    _, new_student, new_teacher, _, _, _, _, selected_pairs, selected_grads, positive_scale = output
    ctx.save_for_backward(student, teacher, labels, new_student, new_teacher, selected_pairs, selected_grads,
                          positive_scale)
    keep_anchors(ctx, student)  # (first_order_only's refusal of a second derivative hangs on it)


def _student_gradient(ctx, grad_loss) -> Optional[torch.Tensor]:
    if not ctx.needs_input_grad[0]:
        return None
    student, teacher, labels, new_student, new_teacher, selected_pairs, selected_grads, positive_scale = \
        ctx.saved_tensors
    temperature, critical_only, rank_loss = ctx.options
    if grad_loss is None:  # a backward through another output only (grads are not materialised)
        grad_loss = torch.zeros((), dtype=positive_scale.dtype, device=student.device)
    return torch.ops.ekd_kernels.ekd_backward(
        grad_loss, student, teacher.detach(), labels, new_student.to(student.dtype), new_teacher.to(student.dtype),
        selected_pairs, selected_grads, positive_scale, temperature, critical_only, rank_loss)


@first_order_only("csrc")
def _backward(ctx, grad_loss, *unused_grads):
    return (_student_gradient(ctx, grad_loss),) + (None,) * 16


if _LOAD_ERROR is None:
    torch.library.register_fake(_FORWARD_OP)(_fake_forward)
    torch.library.register_fake(_BACKWARD_OP)(_fake_backward)
    torch.library.register_autograd(_FORWARD_OP, _backward, setup_context=_setup_context)


class _EagerForward(torch.autograd.Function):
    """The forward op's eager path: the same op and backward, with the op called below autograd
    instead of through the autograd that torch.library registered for it (option defaults filled,
    every output's grad_fn): 1.3x less host time for the Python side of a forward+backward
    (tools/host_cost.py, on meta tensors).  torch.compile, export and dispatch modes take the
    registered op (see _autograd.eager_call), torch.func transforms _FuncForward."""

    # forward(ctx, ...) rather than a setup_context: apply() binds a setup_context style forward's
    # arguments through inspect.signature on every call; this class never runs under torch.func.
    @staticmethod
    def forward(ctx, *inputs):
        with torch._C._AutoDispatchBelowAutograd():
            output = torch.ops.ekd_kernels.ekd_forward(*inputs)
        _setup_context(ctx, inputs, output)
        ctx.mark_non_differentiable(*output[1:])
        return output

    @staticmethod
    @first_order_only("csrc")
    def backward(ctx, grad_loss, *unused_grads):
        return (_student_gradient(ctx, grad_loss),) + (None,) * 16

    jvp = no_forward_mode("csrc")


class _FuncForward(torch.autograd.Function):
    """_EagerForward in the setup_context style torch.func transforms require (_autograd.
    functorch_call): the op runs below autograd on the tensors the transform unwrapped."""

    @staticmethod
    def forward(*inputs):
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.ekd_kernels.ekd_forward(*inputs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)
        ctx.mark_non_differentiable(*output[1:])

    @staticmethod
    def backward(ctx, grad_loss, *unused_grads):
        # The backward op takes the transform's wrapped tensors; it has no autograd formula, so a
        # second derivative raises: refuse_nested_derivative under transforms.
        refuse_nested_derivative("csrc")
        return (_student_gradient(ctx, grad_loss),) + (None,) * 16

    jvp = no_forward_mode("csrc")
    vmap = no_batching_rule("csrc")


# --------------------------------------------------------------------------- the backend
def _random_negative_ranks(labels: torch.Tensor, config: EKDConfig, generator: Optional[torch.Generator]):
    """The reference's draw (`draw_random_negatives`): ranks into the negatives enumerated in
    row-major order of (i, j), i < j.  L needs the label counts on the host (a sync, as the
    reference has)."""
    if generator is None:
        raise ValueError('negative_selection="random" needs a torch.Generator (pass generator=...)')
    if labels.device.type == "meta":
        raise ValueError('negative_selection="random" counts the negatives from the labels\' values (the draw '
                         'needs L on the host): not on meta tensors, which hold none')
    batch = labels.shape[0]
    group_sizes = torch.unique(labels, return_counts=True)[1]
    num_negatives = batch * (batch - 1) // 2 - int((group_sizes * (group_sizes - 1) // 2).sum())
    n = min(config.num_hard_negatives, num_negatives)
    return draw_random_negatives(num_negatives, n, generator).to(device=labels.device, dtype=torch.int64)


def ekd_forward(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                student_thresholds: torch.Tensor, teacher_thresholds: torch.Tensor, config: EKDConfig,
                update_thresholds: bool = True, generator: Optional[torch.Generator] = None) -> EKDResult:
    """EKD through the compiled ops; the semantics of ``reference.ekd_reference`` (inputs validated)."""
    if _LOAD_ERROR is not None:
        raise RuntimeError(_LOAD_ERROR)
    dtype = compute_dtype(student)
    random_ranks = None
    if config.negative_selection == "random":
        random_ranks = _random_negative_ranks(labels, config, generator)
    numerators, denominators = config.fpr_ratios
    student, teacher = student.to(dtype), teacher.detach().to(dtype)
    forward = (_EagerForward.apply if eager_call(student, teacher, labels, student_thresholds, teacher_thresholds,
                                                 random_ranks)
               else _FuncForward.apply if functorch_call() else torch.ops.ekd_kernels.ekd_forward)
    (loss, new_student, new_teacher, batch_student, batch_teacher, counts, terms, _, _, _) = forward(
        student, teacher, labels, student_thresholds, teacher_thresholds, random_ranks,
        list(numerators), list(denominators), float(config.temperature),
        int(config.num_hard_negatives), float(config.momentum), float(config.positive_weight),
        float(config.negative_weight), bool(config.critical_only), _RANK_LOSS_CODES[config.rank_loss],
        bool(update_thresholds), bool(config.compute_critical_ratio))
    batch = student.shape[0]
    critical_ratio = None
    if config.compute_critical_ratio:
        # NaN for a batch with a non-finite embedding, as its terms, on every backend (the
        # reference's test; not the terms' NaN, which NaN thresholds passed in also give)
        finite = torch.isfinite(student).all() & torch.isfinite(teacher).all()
        critical_ratio = torch.where(finite, counts[4].to(torch.float32) / (batch * (batch - 1) // 2),
                                     torch.full((), float("nan"), dtype=torch.float32, device=counts.device))
    stats = EKDStats.from_counts(batch_student, batch_teacher, new_student, new_teacher, counts, terms, critical_ratio)
    return EKDResult(loss, new_student.detach(), new_teacher.detach(), stats.detach())
