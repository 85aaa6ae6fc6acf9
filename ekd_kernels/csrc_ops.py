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

from typing import Optional

import torch

from ._autograd import first_order_only
from .config import EKDConfig, fpr_fraction
from .reference import compute_dtype, draw_random_negatives
from .result import EKDResult, EKDStats

_RANK_LOSS_CODES = {"soft_rank": 0, "eq7": 1, "eq8": 2}
_FORWARD_OP = "ekd_kernels::ekd_forward"
_BACKWARD_OP = "ekd_kernels::ekd_backward"

try:
    from . import _C  # noqa: F401  (loading the library registers the ops)

    _LOAD_ERROR: Optional[str] = None
except ImportError as exc:
    _LOAD_ERROR = f"the C++ extension was not built: {exc} (run `make install`)"


def cuda_ops_built() -> bool:
    """Whether the extension was compiled with its CUDA kernels (whatever this machine's GPUs)."""
    return _LOAD_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(_FORWARD_OP, "CUDA")


def unavailable_reason(device: torch.device) -> Optional[str]:
    """None when the compiled ops can run on `device`, else why not."""
    device = torch.device(device)
    if _LOAD_ERROR is not None:
        return _LOAD_ERROR
    if device.type == "cpu":
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
    return torch.empty_like(student, memory_format=torch.contiguous_format)


# --------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    student, teacher, labels = inputs[:3]
    ctx.options = (inputs[8], inputs[13], inputs[14])  # temperature, critical_only, rank_loss
    _, new_student, new_teacher, _, _, _, _, selected_pairs, selected_grads, positive_scale = output
    ctx.save_for_backward(student, teacher, labels, new_student, new_teacher, selected_pairs, selected_grads,
                          positive_scale)


@first_order_only("csrc")
def _backward(ctx, grad_loss, *unused_grads):
    student, teacher, labels, new_student, new_teacher, selected_pairs, selected_grads, positive_scale = \
        ctx.saved_tensors
    temperature, critical_only, rank_loss = ctx.options
    grad_student = None
    if ctx.needs_input_grad[0]:
        grad_student = torch.ops.ekd_kernels.ekd_backward(
            grad_loss, student, teacher.detach(), labels, new_student.to(student.dtype), new_teacher.to(student.dtype),
            selected_pairs, selected_grads, positive_scale, temperature, critical_only, rank_loss)
    return (grad_student,) + (None,) * 16


if _LOAD_ERROR is None:
    torch.library.register_fake(_FORWARD_OP)(_fake_forward)
    torch.library.register_fake(_BACKWARD_OP)(_fake_backward)
    torch.library.register_autograd(_FORWARD_OP, _backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- the backend
def _random_negative_ranks(labels: torch.Tensor, config: EKDConfig, generator: Optional[torch.Generator]):
    """The reference's draw (`draw_random_negatives`): ranks into the negatives enumerated in
    row-major order of (i, j), i < j.  L needs the label counts on the host (a sync, as the
    reference has)."""
    if generator is None:
        raise ValueError('negative_selection="random" needs a torch.Generator (pass generator=...)')
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
    fractions = [fpr_fraction(f) for f in config.fprs]
    (loss, new_student, new_teacher, batch_student, batch_teacher, counts, terms, _, _, _) = \
        torch.ops.ekd_kernels.ekd_forward(
            student.to(dtype), teacher.detach().to(dtype), labels, student_thresholds, teacher_thresholds,
            random_ranks, [q.numerator for q in fractions], [q.denominator for q in fractions],
            float(config.temperature), int(config.num_hard_negatives), float(config.momentum),
            float(config.positive_weight), float(config.negative_weight), bool(config.critical_only),
            _RANK_LOSS_CODES[config.rank_loss], bool(update_thresholds), bool(config.compute_critical_ratio))
    batch = student.shape[0]
    critical_ratio = (counts[4].to(torch.float32) / (batch * (batch - 1) // 2)
                      if config.compute_critical_ratio else None)
    stats = EKDStats.from_counts(batch_student, batch_teacher, new_student, new_teacher, counts, terms, critical_ratio)
    return EKDResult(loss, new_student.detach(), new_teacher.detach(), stats.detach())
