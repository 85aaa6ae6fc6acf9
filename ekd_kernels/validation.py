"""Input checks shared by every backend: bad input fails here, before any kernel runs."""

from __future__ import annotations

from typing import List, Tuple

import numpy
import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_embeddings_and_labels(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                                min_rows: int = 2, what: str = "EKD") -> None:
    """Raise ValueError naming what is wrong with (student, teacher, labels); see SPEC.md, Edge cases.

    min_rows: 2 for a whole batch; the sharded path checks each rank's part with 0 (the global
    batch is checked after the gather).  what: the loss named by the batch-size message ("EKD
    needs a batch of at least 2 ..."); the other losses pass their own name.
    """
    for name, x in (("student", student), ("teacher", teacher), ("labels", labels)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.layout != torch.strided:
            raise ValueError(f"{name} must be a dense (strided) tensor, got layout {x.layout}: call .to_dense() first")
    for name, x in (("student", student), ("teacher", teacher)):
        if x.dim() != 2:
            raise ValueError(f"{name} embeddings must be 2-D (B x D), got shape {tuple(x.shape)}")
        if x.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} embeddings must be float16, bfloat16, float32 or float64, got {x.dtype}")
        if x.shape[1] < 1:
            raise ValueError(f"{name} embeddings must have at least one column, got shape {tuple(x.shape)}")
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"student and teacher must have the same number of rows, got {student.shape[0]} and {teacher.shape[0]}")
    batch = student.shape[0]
    if batch < min_rows:
        raise ValueError(f"{what} needs a batch of at least 2 embeddings to form a pair, got B={batch}")
    if labels.dim() != 1 or labels.shape[0] != batch:
        raise ValueError(f"labels must be 1-D of length B={batch}, got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if not (student.device == teacher.device == labels.device):
        raise ValueError(
            "student, teacher and labels must be on the same device, got "
            f"{student.device}, {teacher.device} and {labels.device}")


def check_embedding_pair(student: torch.Tensor, teacher: torch.Tensor, *, same_dim: bool = False,
                         labels: torch.Tensor = None, what: str = "this loss") -> None:
    """The checks above for losses without labels (RKD, SP, ...), plus equal widths for losses
    that compare the two embeddings coordinate by coordinate.  ``what`` names the loss in the
    messages (B < 2, widths)."""
    if labels is None:
        rows = student.shape[0] if isinstance(student, torch.Tensor) and student.dim() >= 1 else 0
        device = student.device if isinstance(student, torch.Tensor) else "cpu"
        labels = torch.zeros(rows, dtype=torch.int64, device=device)
    check_embeddings_and_labels(student, teacher, labels, what=what)
    if same_dim and student.shape[1] != teacher.shape[1]:
        raise ValueError(f"{what} compares student and teacher embeddings coordinate by coordinate: their widths "
                         f"must match, got {student.shape[1]} and {teacher.shape[1]} (project one of them first)")


def check_batch_limit(batch: int, max_batch: int, backend: str, why: str) -> None:
    """ValueError when a backend cannot take B rows: the limit, why it exists and the B given.

    The fast backends are exact up to their limits (see their module docstrings): past one, they
    refuse instead of overflowing a 32-bit index or a launch limit.
    """
    if batch > max_batch:
        raise ValueError(f"the {backend} EKD backend takes batches of at most B={max_batch} ({why}), got B={batch}")


_SIGNED_OF_UNSIGNED = {torch.uint16: torch.int16, torch.uint32: torch.int32, torch.uint64: torch.int64}


def signed_labels(labels: torch.Tensor) -> torch.Tensor:
    """uint16/32/64 labels as the signed integers of their width (a view, no copy): the same
    partition of the batch (equal labels stay equal, different ones different), in dtypes every
    op indexes, sorts and compares (torch 2.6 indexes no uint64 tensor)."""
    signed = _SIGNED_OF_UNSIGNED.get(labels.dtype)
    return labels if signed is None else labels.view(signed)


def int64_labels(labels: torch.Tensor) -> torch.Tensor:
    """Integer labels as int64 with their values (uint64: a view, values past 2^63 wrap, one to
    one): labels kept across batches (a memory bank's) compare by value, and int64 is what every
    comparison takes (uint16/32/64 promote to nothing: comparing them to int64 raised)."""
    if labels.dtype == torch.uint64:
        return labels.view(torch.int64)
    return labels.to(torch.int64)


def check_thresholds(student_thresholds: torch.Tensor, teacher_thresholds: torch.Tensor, num_thresholds: int,
                     device: torch.device) -> None:
    """Threshold state passed to the functional form must be K floats on the embeddings' device."""
    for name, t in (("student_thresholds", student_thresholds), ("teacher_thresholds", teacher_thresholds)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.shape != (num_thresholds,):
            raise ValueError(f"{name} must have shape ({num_thresholds},) (one per FPR), got {tuple(t.shape)}")
        if t.dtype not in (torch.float32, torch.float64):
            # fp16/bf16 state would stall the EMA: 0.01 * a step is below their resolution near 0.3.
            # (EKDLoss keeps its own in fp32 under .half()/.bfloat16()/.to(dtype): only explicit state gets here)
            raise ValueError(f"{name} must be float32 (or float64), got {t.dtype}: pass fp32 thresholds (the "
                             "embeddings may stay low precision; 16-bit state would stall the EMA)")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but the embeddings are on {device}")
    if student_thresholds.dtype != teacher_thresholds.dtype:
        # one state dtype for both models: the compiled ops take a single one
        raise ValueError(f"student_thresholds and teacher_thresholds must have the same dtype, got "
                         f"{student_thresholds.dtype} and {teacher_thresholds.dtype}")


def check_flag(name: str, value) -> bool:
    """A True/False argument (Python or numpy bool, as EKDConfig's flags), as a bool.  Why: a
    string "False" is truthy and 0 or None are not bools; backends would read them apart."""
    if not isinstance(value, (bool, numpy.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return bool(value)


def refuse_stateful_recomputation(module: torch.nn.Module, what_it_updates: str, advice: str,
                                  *state: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """RuntimeError when a module that updates state in its forward runs in training mode inside
    a backward pass, i.e. activation checkpointing recomputing the call: the recomputation would
    update the state again and see the state the first call left, so its gradient would belong
    to another loss.  Refused rather than corrupted silently.

    Returns ``state`` (tensors the forward reads its state from, and the state writes depend
    on): in eager these tensors, checked here; under torch.compile, where this Python test would
    run once, while tracing, copies made by ``read_state_checked``, an op whose body runs at every
    call of the graph.  Why at the head of the forward: the non-reentrant checkpoint stops a
    recomputation once it has the tensors it saved, which can be before the update at the tail
    (a graph break in the forward puts the update in a later graph); the copies are read by
    what follows, so the op is neither dropped nor moved after the writes."""
    if not module.training:
        return state
    if torch.compiler.is_compiling():
        return tuple(read_state_checked(list(state), type(module).__name__, what_it_updates, advice))
    if torch._C._current_graph_task_id() != -1:
        raise RuntimeError(_recomputation_message(type(module).__name__, what_it_updates, advice))
    return state


def _recomputation_message(name: str, what_it_updates: str, advice: str, compiled: bool = False) -> str:
    message = (f"{name} ran in training mode inside a backward pass, as under torch.utils.checkpoint's "
               f"recomputation: it {what_it_updates} in forward, so the recomputed loss would see another state "
               f"(and update it again): a wrong gradient. Call the loss outside the checkpointed region, or {advice}")
    if compiled:
        # (torch.compile's min-cut partitioner under a memory budget recomputes forward ops in the
        # backward from the module's buffers, after the forward has updated them: PyTorch's
        # pytorch/pytorch#197039; it gave a silently wrong gradient before this check)
        message += (". Without a checkpoint, the cause is torch.compile recomputing the forward in the backward "
                    "(torch._functorch.config.activation_memory_budget < 1), which would read the updated "
                    "state: keep the budget at 1, or keep the loss out of the compiled graph (compile the model alone)")
    return message


@torch.library.custom_op("ekd_kernels::read_state_checked", mutates_args=())
def read_state_checked(state: List[torch.Tensor], name: str, what_it_updates: str, advice: str) -> List[torch.Tensor]:
    """Copies of a stateful module's state, refused inside a backward pass (the run-time form of
    refuse_stateful_recomputation's check, under torch.compile).  Copies: an op may not return
    its inputs, and an op whose output nothing reads is dropped from the graph."""
    if torch._C._current_graph_task_id() != -1:
        raise RuntimeError(_recomputation_message(name, what_it_updates, advice, compiled=True))
    return [t.clone() for t in state]


@read_state_checked.register_fake
def _read_state_checked_fake(state, name, what_it_updates, advice):
    return [torch.empty_like(t) for t in state]


_REDRAW_MESSAGE = (
    'EKD with negative_selection="random" ran inside a backward pass, as under torch.utils.checkpoint\'s '
    "recomputation: it would draw other negatives than the forward did (checkpoint restores the global RNG, "
    "not a torch.Generator) and advance the generator again: a wrong gradient. Call the loss outside the "
    "checkpointed region")


def _recomputing() -> bool:
    """Inside a backward pass with grad mode on: what activation checkpointing's recomputation
    runs in (it rebuilds the graph of the region).  A plain backward's hooks run with grad mode
    off (unless create_graph=True), so a random selection drawn there, say a metric computed in
    a tensor hook, is not refused."""
    return torch._C._current_graph_task_id() != -1 and torch.is_grad_enabled()


def refuse_redraw() -> None:
    """RuntimeError when a random negative selection is about to be drawn inside a backward pass,
    i.e. activation checkpointing recomputing the call (of an ``eval()`` module or of ``ekd_loss``
    with explicit thresholds, which recompute the hardest selection exactly): the recomputation
    would draw other negatives from the generator, which torch.utils.checkpoint does not restore
    (it saves the global RNG's state, not a torch.Generator's), and advance it a second time, so
    the gradient would belong to another draw than the loss.  Refused rather than wrong silently,
    before the generator moves.  Under torch.compile, where this Python test would run once,
    while tracing, ``drawn_outside_backward`` checks the drawn ranks at every call instead."""
    if not torch.compiler.is_compiling() and _recomputing():
        raise RuntimeError(_REDRAW_MESSAGE)


def drawn_outside_backward(ranks: torch.Tensor) -> torch.Tensor:
    """The drawn ranks; under torch.compile through an op that refuses them inside a backward
    pass at run time (``refuse_redraw``'s check, as ``read_state_checked`` is the stateful
    modules'; the generator has advanced by then)."""
    return random_draw_checked(ranks) if torch.compiler.is_compiling() else ranks


@torch.library.custom_op("ekd_kernels::random_draw_checked", mutates_args=())
def random_draw_checked(ranks: torch.Tensor) -> torch.Tensor:
    """A copy of a random selection's ranks, refused inside a backward pass (the run-time form of
    refuse_redraw's check, under torch.compile; a copy: an op may not return its input)."""
    # (the graph task alone: a compiled forward runs with grad mode off inside AOT autograd's
    # Function, recomputed or not, so a compiled random selection drawn in a backward hook is
    # refused too, where the eager check lets it pass)
    if torch._C._current_graph_task_id() != -1:
        raise RuntimeError(_REDRAW_MESSAGE)
    return ranks.clone()


@random_draw_checked.register_fake
def _random_draw_checked_fake(ranks):
    return torch.empty_like(ranks)


def check_generator(generator) -> None:
    """The random source of negative_selection="random": None or a torch.Generator."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {generator!r} ({type(generator).__name__})")
