"""EKD across ranks: exact single-process results on the concatenated (global) batch.

Two ways to train with EKD on several processes (torch.distributed, gloo or NCCL):

1. ``gather_batch`` + any ``EKDLoss``: every rank all-gathers the global batch and computes the
   whole loss (what the authors do). Simple; every rank repeats all B(B-1)/2 pair computations.
2. ``EKDLoss(process_group=group)`` (``ekd_sharded`` below): every rank computes only the pairs
   whose first index is in its share of the rows, balanced so that ranks do similar work; the
   thresholds and the hardest-N negatives are selected exactly over the global batch by a radix
   select whose per-round histograms are all-reduced (no pair similarity ever leaves its rank).

Gradient convention (both paths): the returned loss equals the single-process loss on the
concatenated batch, and the gradient reaching each rank's own student rows is W times the
single-process gradient of those rows. DDP and FSDP *average* parameter gradients over the W
ranks, so after their averaging the parameter gradients equal single-process training on the
concatenated batch exactly. (The authors' gather leaves an extra factor of W in the distilled
gradient after DDP's averaging; to reproduce their effective weighting with W ranks, multiply
``positive_weight`` and ``negative_weight`` by W.)

The sharded engine, stage by stage (the names of ``reference.py`` and SPEC.md):

- similarity chunks: this rank's rows are grouped into chunks of consecutive rows of at most
  ``CHUNK_PAIRS`` pair elements (at least one row); a chunk multiplies its rows by the columns
  after its first row only (``chunk_plan``, ``similarity_chunks``), into one workspace reused
  by every chunk. No chunk is kept, so each pass below recomputes them: passes A and B always,
  pass C with ``compute_critical_ratio``; each costs about 2·(B²/2W)·(Ds + Dt) flops per rank
  (the rank's share of both Grams, plus < 1/8 spent on pairs j <= i inside a chunk).
- threshold selection, a 3-round radix select over the order keys of the global negatives:
  pass A (``count_negatives``) fills the 65536-bin histograms of the top 16 key bits of this
  rank's negatives (student and teacher; same-label pairs and the pairs j <= i of a chunk are
  sent to a spare bin), all-reduced, which fixes each target's bucket (``select_buckets``);
  pass B (``gather_candidates``) keeps the values of the negatives in those few buckets, once
  per distinct (model, bucket), on which rounds 2 and 3 run with all-reduced 256-bin histograms
  per distinct list (``refine_selection``). If some rank holds more than ``VALUE_BUDGET`` such
  values (similarities collapsed into a bucket; decided alike on every rank from an all-reduced
  maximum of pass A's counts), pass B keeps none and histograms instead their low 16 key bits,
  one 65536-bin row per distinct (model, bucket), all-reduced: each target's full 32-bit key at
  once (``select_targets``), bitwise the same selection, in the same pass. The targets are the
  K thresholds of each model and the N-th largest student negative.
- pair selection & critical mask: pass B also keeps, of the negatives at or above the N-th
  largest's bucket, this rank's N hardest (key descending, then row-major; each chunk's N
  hardest, merged: ``gather_candidates`` says why that changes no selection); the N-th
  largest's value cuts them, ties at the cut shared out across ranks in rank order
  (``select_hardest``). Random selection maps the drawn ranks among all negatives (row-major)
  to pairs from the labels alone (``negative_pairs_at``) and reads them in pass A. Positives
  are listed from the label groups (``positive_pairs``) and read in pass A. With
  ``compute_critical_ratio`` a pass C (``count_critical``) counts the critical negatives chunk
  by chunk after the EMA update.
- rank loss: only positives and selected negatives carry a gradient, through ``pair_values``.

Memory per rank, O(chunk x B + B x D + candidates): the gathered embeddings and their normalised
fp32 copies, O(B·(Ds + Dt)); the chunk workspace, sized for the largest chunk (at most
max(CHUNK_PAIRS, B - 1) elements: a chunk holds at least one row): two fp32 blocks and two int32
bucket arrays, 16 bytes per element, plus a byte per element for pass B's bucket flags (a few
bool masks in pass C), about 70-90 MiB at the default 2^22; the candidates: the values of this
rank's negatives inside the <= 2K + 1 wanted 16-bit buckets while no rank holds more than
VALUE_BUDGET (2^22) of them, 4 bytes each, and their 8-byte keys in rounds 2 and 3 (one list
per distinct (model, bucket), then per distinct (list, 24-bit prefix): 12 bytes per kept value,
20 for a model wanting several buckets, whatever the number of targets sharing a bucket);
otherwise (collapsed similarities) none, but a (distinct buckets <= 2K + 1) x 65536 int64
histogram (at most 6.5 MiB, twice while it is all-reduced, and a bincount of that size per
chunk); and of the pairs at or above the bucket of the N-th hardest, the rank's N hardest (32
bytes each; at most 2N + max(N, 4096) while pass B runs, beside the chunk's O(chunk)
temporaries); the positives, O(B x label group size). Never the rank's B²/(2W) pairs. With
``negative_selection="random"`` every rank makes the single-process backends' draw
(``draw_random_negatives``, O(N) memory) from its generator, so that all ranks and the
single-process loss select the same negatives.

Communication per step (sharded path, K thresholds): one all-gather of a vector of a few dozen
int64 per rank (its row count, and what the ranks must agree on: ``_agree``); one all-gather of
the embeddings and labels, B·(Ds + Dt)·4 + 8·B bytes; 3 rounds of radix-select histograms: 2 x 65536 int64 (1 MiB),
then twice at most (2K + 1) x 256 int64 (26 KiB each for K = 6: one row per distinct (model,
bucket), then per distinct (model, 24-bit prefix); 2K rows at most with random selection, which
needs no hardest-N cut), or, when some rank's wanted buckets hold more than VALUE_BUDGET values
(collapsed similarities), one all-reduce of a (distinct buckets) x 65536 int64 histogram instead
(at most 6.5 MiB for K = 6, 512 KiB per distinct bucket); a handful of scalar all-reduces
(counts, the maximum of the ranks' values in the wanted buckets, with random selection of the
fingerprints of their draws too, loss terms) and one all-gather
of this rank's tie count at the hardest-N cut; the reduce-scatter of the embeddings'
gradient in backward, B·Ds·4 bytes. No pair similarity is communicated.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import hashlib
import math
import struct
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple, TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .config import NEGATIVE_SELECTIONS, RANK_LOSSES, EKDConfig
from ._autograd import nan_gradient_unless
from .reference import (autocast_off, critical_mask, draw_random_negatives, ema_update, normalize_rows,
                        pair_rank_loss)
from .result import EKDResult, EKDStats

#: Pair elements of one similarity chunk (each of its student and teacher blocks). A chunk always
#: holds at least one row, so with B - 1 > CHUNK_PAIRS a chunk is one row of B - 1 - i elements.
CHUNK_PAIRS = 1 << 22
#: A chunk stops growing when its rows span more than 1/8 of its columns (the pairs j <= i of its
#: later rows are computed and thrown away), once it holds this many rows.
MIN_CHUNK_ROWS = 32

# ----------------------------------------------------------------------------- collectives


def _world(group) -> Tuple[int, int]:
    return dist.get_world_size(group), dist.get_rank(group)


def _autograd_all_gather(x: torch.Tensor, group) -> torch.Tensor:
    """torch.distributed's autograd-aware all-gather along dim 0: its backward reduce-scatters
    (sums) the gradients of all ranks into each rank's own rows."""
    from torch.distributed import _functional_collectives as fc

    gather = getattr(fc, "all_gather_single_autograd", None) or fc.all_gather_tensor_autograd
    out = gather(x.contiguous(), 0, group if group is not None else dist.group.WORLD)
    return fc.wait_tensor(out) if hasattr(fc, "wait_tensor") else out


def _all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over ranks, no gradient (counts, histograms, loss values)."""
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


def _all_reduce_max(x: torch.Tensor, group) -> torch.Tensor:
    """Maximum over ranks, no gradient."""
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    return x


def _all_gather_sizes(count: int, device, group) -> List[int]:
    world, _ = _world(group)
    mine = torch.tensor([count], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(sizes, mine, group=group)
    return [int(s.item()) for s in sizes]


# ----------------------------------------------------------------------------- agreement of the ranks
#
# Every call starts with one all-gather of a small int64 vector per rank (it replaces the
# all-gather of the per-rank row counts, which it carries): which entry point the rank called
# (gather_batch or the sharded loss), whether the rank's own input checks failed, its row count,
# and what every rank must share (widths, dtypes, device type, options, train/eval, threshold
# state...), zero-padded to one length for both entry points (an all-gather of unequal lengths
# aborts in gloo). Every rank reads the same table, so that every rank raises the same
# ValueError, before any later collective, when the ranks called different entry points, one
# rank's input was refused or the ranks disagree: never a hang, a gloo abort or silently
# different results per rank.


class _Field(NamedTuple):
    """One entry of the vector the ranks exchange: what it is (for the message), how a value
    reads (None: a fingerprint, shown as "value #n"), whether the ranks must agree on it, and a
    hint appended to the message when they do not."""

    what: str
    show: Optional[Callable[[int], str]] = str
    compared: bool = True
    hint: str = ""


def _hash64(text: str) -> int:
    """A deterministic signed 64-bit hash (Python's hash() of a str differs between processes)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool)


def _dtype_code(dtype) -> int:
    return _DTYPES.index(dtype) if dtype in _DTYPES else _hash64(str(dtype))


def _show_dtype(code: int) -> str:
    return str(_DTYPES[code]) if 0 <= code < len(_DTYPES) else f"another dtype (code {code})"


def _show_bool(value: int) -> str:
    return str(bool(value))


def _float_bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", value))[0]


def _show_float(bits: int) -> str:
    return repr(struct.unpack("<d", struct.pack("<q", bits))[0])


#: the prime modulus of ``fingerprint``'s two sums
_PRIME = (1 << 31) - 1


def fingerprint(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """A 62-bit fingerprint (int64, 0-d, in [0, 2^62), on the tensors' device: no host sync) of
    the exact bytes of `tensors`, in order: two sums of the bytes times pseudo-random position
    multipliers in [1, p), modulo the prime p = 2^31 - 1. A difference in a single byte always
    changes both sums (p is prime); other differences collide with a chance of about 2^-62.
    Every term is reduced modulo p before the sum: no int64 overflow below 2^32 bytes."""
    data = torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors]).to(torch.int64)
    position = torch.arange(1, data.numel() + 1, device=data.device, dtype=torch.int64) % _PRIME
    square = position * position % _PRIME
    sums = []
    for a, b in ((48271, 16807), (69621, 39373)):
        multiplier = (square * a + position * b) % (_PRIME - 1) + 1
        sums.append((data * multiplier % _PRIME).sum() % _PRIME)
    return sums[0] * (1 << 31) + sums[1]


def _ranks_text(ranks: Sequence[int]) -> str:
    """"rank 3", "ranks 0, 2-5"."""
    spans: List[List[int]] = []
    for r in ranks:
        if spans and spans[-1][1] == r - 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
    return f"rank {text}" if len(ranks) == 1 else f"ranks {text}"


def _disagreements(fields: Sequence[_Field], table: Sequence[Sequence[int]]) -> List[str]:
    """What the ranks (rows of `table`) disagree on, one text per compared field: its values and
    the ranks holding each, in the order they first appear."""
    out = []
    for field, column in zip(fields, zip(*table)):
        if not field.compared or len(set(column)) == 1:
            continue
        holders: dict = {}
        for rank, value in enumerate(column):
            holders.setdefault(value, []).append(rank)
        parts = []
        for n, (value, ranks) in enumerate(holders.items()):
            shown = field.show(value) if field.show is not None else f"value #{n + 1}"
            parts.append(f"{_ranks_text(ranks)} {'has' if len(ranks) == 1 else 'have'} {shown}")
        out.append(f"{field.what}: {', '.join(parts)}" + (f" ({field.hint})" if field.hint else ""))
    return out


def _exchange_device(group) -> torch.device:
    """Where the exchange vector lives, chosen from the group alone, so the same kind on every
    rank whatever its inputs (a rank whose embeddings are on meta, or on the CPU under NCCL,
    still takes part and is refused there, by its checks or the compared device type): the CPU
    for a group with a CPU backend (gloo, or "cpu:gloo,cuda:nccl"), the current CUDA device for
    NCCL, else the device type torch's object collectives use for the group (XCCL: the XPU)."""
    backend = str(dist.get_backend(group))
    if "gloo" in backend or "cpu:" in backend:
        kind = "cpu"
    elif "nccl" in backend:
        kind = "cuda"
    else:
        choose = getattr(dist.distributed_c10d, "_get_object_coll_device", None)
        kind = choose(group) if choose is not None else "cpu"
    if kind == "cpu":
        return torch.device("cpu")
    accelerator = getattr(torch, kind, None)
    return torch.device(kind, accelerator.current_device() if hasattr(accelerator, "current_device") else 0)


#: The entry points that start with the exchange, by their code in it (field 0).
_ENTRY_POINTS = ("gather_batch", "EKDLoss(process_group=...)")


def _device_code(device: torch.device) -> int:
    """The device type of a rank's embeddings, a compared field: every rank's collectives run on
    it, and a group cannot mix, say, CPU and CUDA parts."""
    return _hash64(device.type)


def _show_device_code(code: int) -> str:
    known = {_hash64(name): name for name in ("cpu", "cuda", "meta", "xpu", "mps", "hpu")}
    return known.get(code, f"another device type (code {code})")


def _meta_refused(what: str) -> ValueError:
    """A rank's meta tensors (no values) cannot take part in the ranks' exchanges of data."""
    return ValueError(f"{what}: meta tensors hold no values, and the ranks exchange their data: give every rank "
                      "real tensors")


@functools.lru_cache(maxsize=None)
def _exchange_width() -> int:
    """The exchange vector's length, the same for both entry points: the code of the entry
    point, the error flag, then the longer of the two field lists (the options' fields are
    those of any EKDConfig: their number does not depend on the values)."""
    return 2 + max(len(_gather_fields()), len(_sharded_fields(EKDConfig())))


def _agree(error: Optional[Exception], fields: Sequence[_Field], values: Sequence[int], device_values: Sequence,
           device, group, what: str, gate: Optional[int] = None) -> List[int]:
    """The one exchange at the start of a call; returns the per-rank row counts.

    error: the ValueError of this rank's own input checks, or None. fields / values: what this
    rank holds (values[0] its row count), host integers; device_values: 0-d int64 tensors on
    `device` (fingerprints), their fields last in `fields`. Ignored when `error` is set: the
    rank sends its error flag and zeros. Raises on every rank alike: this rank's own error; a
    ValueError naming the ranks whose input was refused; a ValueError naming each value the
    ranks disagree on and which rank holds which.  gate: the index of a field that decides what the
    others mean (whether gather_batch was given the loss): when the ranks disagree on it, only it
    is named (the others then compare a loss's values with a missing one's zeros)."""
    entry = _ENTRY_POINTS.index(what)
    if error is not None:
        local = torch.tensor([entry, 1], dtype=torch.int64, device=device)
    else:
        host = torch.tensor([entry, 0, *values], dtype=torch.int64, device=device)
        local = torch.cat([host] + [v.to(device).view(1) for v in device_values]) if device_values else host
    local = F.pad(local, (0, _exchange_width() - local.numel()))
    world, _ = _world(group)
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local, group=group)
    table = torch.stack(parts).tolist()     # the host read the row counts always needed
    entries = [row[0] for row in table]
    if len(set(entries)) > 1:
        callers = "; ".join(f"{_ranks_text([r for r, e in enumerate(entries) if e == code])} called "
                            f"{_ENTRY_POINTS[code]}" for code in dict.fromkeys(entries))
        raise ValueError(f"the ranks of the process group called different entry points: {callers}. Every rank must "
                         "compute the loss the same way (the sharded EKDLoss, or gather_batch then a single-process "
                         "EKDLoss). Nothing was computed on any rank.")
    if error is not None:
        raise error
    table = [row[1:2 + len(fields)] for row in table]
    refused = [r for r, row in enumerate(table) if row[0]]
    if refused:
        whose = "that rank's error" if len(refused) == 1 else "those ranks' errors"
        raise ValueError(f"{what}: {_ranks_text(refused)}'s input was refused: see {whose} (nothing was computed "
                         "on any rank)")
    rows = [row[1:] for row in table]
    if gate is not None and len({row[gate] for row in rows}) > 1:
        fields, rows = [fields[gate]], [[row[gate]] for row in rows]
    differ = _disagreements(fields, rows)
    if differ:
        raise ValueError(f"{what} needs every rank of its process group to agree, but the ranks disagree on "
                         + "; on ".join(differ) + ". Nothing was computed on any rank.")
    return [row[1] for row in table]


def _gather_rows(x: torch.Tensor, sizes: Sequence[int], autograd: bool, group) -> torch.Tensor:
    """All-gather `x` (this rank's sizes[rank] rows) in rank order: padded to the largest part,
    gathered, the padding dropped. autograd: through torch's autograd-aware all-gather."""
    padded_rows = max(sizes)
    pad = padded_rows - x.shape[0]
    x_padded = F.pad(x, (0, 0) * (x.dim() - 1) + (0, pad)) if pad else x
    if autograd:
        full = _autograd_all_gather(x_padded, group)
    else:
        parts = [torch.empty_like(x_padded) for _ in sizes]
        dist.all_gather(parts, x_padded.contiguous(), group=group)
        full = torch.cat(parts)
    keep = torch.cat([torch.arange(n, device=x.device) + r * padded_rows for r, n in enumerate(sizes)])
    return full.index_select(0, keep)


def _gradient_flows(student: torch.Tensor) -> bool:
    """Whether the student's gather must carry a gradient (its backward is a collective too)."""
    return student.requires_grad and torch.is_grad_enabled()


_GATHER_FIELDS = [
    _Field("the row count", compared=False),
    _Field("the student's elements per row"), _Field("the student dtype", _show_dtype),
    _Field("the teacher's elements per row"), _Field("the teacher dtype", _show_dtype),
    _Field("the labels' elements per row"),
    _Field("whether the student's gradient is computed (requires_grad, grad mode)", _show_bool,
           hint="the gather's backward is a collective: every rank or none"),
    _Field("the embeddings' device type", _show_device_code),
]


@functools.lru_cache(maxsize=None)
def _gather_fields() -> Tuple[_Field, ...]:
    """What gather_batch exchanges: _GATHER_FIELDS, whether the loss was given, then (zeros when
    not) its options (the fields of any EKDConfig), its mode, threshold dtype and fingerprint."""
    return tuple(_GATHER_FIELDS
            + [_Field("whether gather_batch was given the loss", _show_bool, hint="pass loss= on every rank or none")]
            + [field for field, _ in _config_entries(EKDConfig())]
            + [_Field("the loss's training mode", _show_bool,
                      hint="call .train() or .eval() on every rank's EKDLoss alike"),
               _Field('whether the loss has a generator (negative_selection="random")', _show_bool,
                      hint="pass an identically seeded generator to every rank's EKDLoss")]
            + _SHARDED_STATE_FIELDS
            + [_Field('the state of the loss\'s generator (negative_selection="random")', None,
                      hint="seed it identically on every rank, or load the same checkpoint on every rank")])


def _gather_loss_error(loss, device) -> Optional[ValueError]:
    """Why `loss` cannot be compared across the ranks (gather_batch's loss=), or None."""
    from .module import EKDLoss, _NOT_SHARDED

    if not isinstance(loss, EKDLoss):
        return ValueError(f"gather_batch: loss must be the EKDLoss applied to the gathered batch, got "
                          f"{type(loss).__name__}")
    if loss.process_group is not _NOT_SHARDED:
        return ValueError("gather_batch: loss must be a single-process EKDLoss; one built with process_group= "
                          "gathers by itself (call it on each rank's own rows)")
    if loss.student_thresholds.device != device:
        return ValueError(f"gather_batch: the loss's thresholds are on {loss.student_thresholds.device} but the "
                          f"embeddings are on {device}: move the loss module with .to(device)")
    return None


def _gather_loss_values(loss, device) -> Tuple[List[int], List[torch.Tensor]]:
    """This rank's values of the loss fields of _gather_fields (zeros without a loss)."""
    if loss is None:
        width = len(_gather_fields()) - len(_GATHER_FIELDS) - 2
        return [0] * width, [torch.zeros((), dtype=torch.int64, device=device)] * 2
    thresholds = (loss.student_thresholds, loss.teacher_thresholds)
    # Random selection: every rank draws the negatives of the gathered batch from its own loss's
    # generator; ranks seeded apart would each compute another loss (a generator is compared as
    # the sharded loss compares it, and its state bit for bit, as the thresholds are)
    generator = loss.generator if loss.config.negative_selection == "random" else None
    drawing = (fingerprint([generator.get_state()]).to(device) if generator is not None
               else torch.zeros((), dtype=torch.int64, device=device))
    values = ([1] + [value for _, value in _config_entries(loss.config)]
              + [int(loss.training), int(generator is not None), _dtype_code(loss.student_thresholds.dtype)])
    return values, [fingerprint(thresholds), drawing]


def _per_row(x: torch.Tensor) -> int:
    return math.prod(x.shape[1:])


# torch.compile runs gather_batch and the sharded loss eagerly (a clean graph break): both read
# counts on the host (per-rank sizes; the selection's counts), which split a traced version into
# many graphs, compiled again whenever a batch size changes (about 10 s a call for the sharded
# loss on 2 CPU ranks, 50 s after a size change), and torch warns at exit of collectives its
# traced graphs left unwaited.  Nothing is lost: the work is collectives and host-driven
# selection, and the single-process backends behind the gather are compilable ops.
@torch.compiler.disable
def gather_batch(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, group=None, loss=None):
    """All-gather the global batch from every rank of `group` (per-rank sizes may differ).

    Returns ``(student, teacher, labels, sizes)``: the concatenation in rank order, and the
    per-rank row counts. The student keeps its gradient: ``EKDLoss()(student, teacher, labels)``
    on the result, computed identically on every rank, sends each rank's own rows W times their
    single-process gradient (the backward of the gather sums the W identical contributions), so
    that after DDP's gradient averaging the parameters see exactly single-process training on the
    concatenated batch (module docstring). Teacher and labels are gathered without gradient;
    labels of any integer dtype are gathered as int64.

    The ranks first exchange their row counts with the shapes and dtypes of their parts: if a
    rank's three tensors differ in row count, or the ranks disagree on the elements per row or
    the dtype of a tensor, or on whether the student's gradient is computed, every rank raises
    a ValueError saying so (instead of a gloo abort or a hang).

    ``loss``: the (single-process) ``EKDLoss`` every rank then applies to the gathered batch.
    Given, the same exchange also compares what the sharded loss compares of it: every option of
    its ``EKDConfig``, train/eval mode and its threshold buffers bit for bit (a fingerprint), so
    ranks holding differently built or differently restored losses raise instead of silently
    computing different losses (and drifting EMA states); with random selection also whether it
    has a generator and that generator's state, bit for bit (ranks seeded apart would draw other
    negatives). Give it on every rank or on none.
    """
    error = None
    if student.dim() != 2 or teacher.dim() != 2 or labels.dim() != 1:
        # (the exchange compares elements per row: a (B, 6) part against a (B, 2, 3) one, or 1-D
        # labels against (B, 1) ones, would pass it and then gather apart or hang the backward)
        error = ValueError("gather_batch: student and teacher must be 2-D (B x D) and labels 1-D (B), got shapes "
                           f"{tuple(student.shape)}, {tuple(teacher.shape)} and {tuple(labels.shape)}")
    elif labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        # (the int64 cast would turn 0.2 and 0.7 into one identity, where the loss refuses them)
        error = ValueError(f"gather_batch: labels must be an integer tensor, got {labels.dtype}")
    elif not (student.shape[0] == teacher.shape[0] == labels.shape[0]):
        error = ValueError(f"gather_batch: student, teacher and labels must have the same number of rows, got "
                           f"{student.shape[0]}, {teacher.shape[0]} and {labels.shape[0]}")
    elif student.is_meta or teacher.is_meta or labels.is_meta:
        error = _meta_refused("gather_batch")
    if loss is not None and isinstance(getattr(loss, "_orig_mod", None), torch.nn.Module):
        loss = loss._orig_mod  # torch.compile(crit): compared as the module it compiles (its state and options)
    if error is None and loss is not None:
        error = _gather_loss_error(loss, student.device)
    autograd = error is None and _gradient_flows(student)
    values = [] if error is not None else [
        student.shape[0], _per_row(student), _dtype_code(student.dtype), _per_row(teacher),
        _dtype_code(teacher.dtype), _per_row(labels), int(autograd), _device_code(student.device)]
    loss_values, fingerprints = ([], []) if error is not None else _gather_loss_values(loss, student.device)
    sizes = _agree(error, _gather_fields(), values + loss_values, fingerprints, _exchange_device(group), group,
                   "gather_batch", gate=len(_GATHER_FIELDS))
    return (_gather_rows(student, sizes, autograd, group), _gather_rows(teacher.detach(), sizes, False, group),
            _gather_rows(labels.to(torch.int64), sizes, False, group), sizes)


# ----------------------------------------------------------------------------- work split


def balanced_rows(batch: int, world: int, rank: int) -> torch.Tensor:
    """The global rows whose pairs (i, j > i) this rank computes.

    Row i has B - 1 - i pairs, so rows are taken two at a time, i and B - 1 - i (B - 1 pairs
    together), and these units dealt round-robin: every rank gets within one unit of B(B-1)/(2W).
    """
    rows = []
    for unit in range(rank, (batch + 1) // 2, world):
        rows.append(unit)
        if batch - 1 - unit != unit:
            rows.append(batch - 1 - unit)
    return torch.tensor(sorted(rows), dtype=torch.int64)


def chunk_plan(rows: Sequence[int], batch: int, budget: int) -> List[Tuple[int, int]]:
    """Chunks of this rank's (ascending) rows, as [start, end) positions in `rows`.

    A chunk starting at row r computes the columns r + 1 ... B - 1 for each of its rows, so it
    holds at most max(1, budget // (B - 1 - r)) rows: at most `budget` pair elements, or one row.
    It also stops once its rows span more than 1/8 of its columns (and it has MIN_CHUNK_ROWS
    rows), which bounds the work wasted on the pairs j <= i of its later rows. Row B - 1 has no
    pair: it starts no chunk (it may end one).
    """
    plan = []
    start = 0
    while start < len(rows):
        width = batch - 1 - rows[start]
        if width <= 0:
            break
        most = min(len(rows), start + max(1, budget // width))
        end = bisect.bisect_right(rows, rows[start] + width // 8, start, most)
        end = max(end, min(most, start + MIN_CHUNK_ROWS))
        plan.append((start, end))
        start = end
    return plan


def _label_groups(labels: torch.Tensor):
    """Rows sorted by label (index order inside a label), and per sorted position the first and
    the end (exclusive) sorted position of its label group."""
    order = torch.sort(labels, stable=True).indices
    _, counts = torch.unique_consecutive(labels[order], return_counts=True)
    group_end = torch.repeat_interleave(torch.cumsum(counts, 0), counts)
    group_start = group_end - torch.repeat_interleave(counts, counts)
    return order, group_start, group_end


def negatives_before_row(labels: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """Exclusive prefix count of negative pairs (i, j > i) per row i, and their total L, from the
    label groups alone (no B x B comparison): row i has (B - 1 - i) - #{j > i, same label}."""
    batch = labels.shape[0]
    order, _, group_end = _label_groups(labels)
    same_after = torch.empty_like(order)
    same_after[order] = group_end - 1 - torch.arange(batch, device=labels.device)
    per_row = (batch - 1 - torch.arange(batch, device=labels.device)) - same_after
    prefix = torch.cumsum(per_row, 0) - per_row
    return prefix, int(per_row.sum().item())


def positive_pairs(labels: torch.Tensor, mine: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The positive pairs (i, j > i, same label) whose row i is marked in `mine` (B bools), in
    row-major order, from the label groups: O(B log B + number of such pairs)."""
    batch = labels.shape[0]
    order, _, group_end = _label_groups(labels)
    position = torch.arange(batch, device=labels.device)[mine[order]]   # sorted positions of my rows
    after = group_end[position] - 1 - position                              # same-label rows after each
    first = torch.repeat_interleave(position, after)
    offset = torch.arange(first.numel(), device=labels.device) - torch.repeat_interleave(
        torch.cumsum(after, 0) - after, after)
    i, j = order[first], order[first + 1 + offset]
    row_major = torch.argsort(i * batch + j)
    return i[row_major], j[row_major]


def negative_pairs_at(labels: torch.Tensor, ranks: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The negative pairs (i, j) at 0-based `ranks` of the row-major order of all negatives
    (i < j, different labels), from the label groups alone.

    Row i is found from ``negatives_before_row``; the pair is the w-th negative of its row. The
    same-label rows after i that come before it are counted from the label groups: with u(k) =
    index - sorted position of the k-th row of i's group (nondecreasing in k), the group's k-th
    row lies before the w-th negative of row i exactly when u(k) <= u(i) + w.
    """
    batch = labels.shape[0]
    device = labels.device
    prefix, _ = negatives_before_row(labels)
    i = torch.searchsorted(prefix, ranks, right=True) - 1
    w = ranks - prefix[i]
    order, group_start, _ = _label_groups(labels)
    where = torch.empty_like(order)
    where[order] = torch.arange(batch, device=device)                      # sorted position of each row
    u = order - torch.arange(batch, device=device) + batch                  # in [1, 2B)
    span = 4 * batch                                                         # > any u + w
    keys = group_start * span + u                                            # nondecreasing
    p = where[i]
    before = torch.searchsorted(keys, group_start[p] * span + u[p] + w, right=True) - (p + 1)
    return i, i + 1 + w + before


# ----------------------------------------------------------------------------- exact selection


def order_keys(values: torch.Tensor) -> torch.Tensor:
    """Order-preserving int64 keys in [0, 2^32) of float32 values (negatives: flip the magnitude bits).

    The flip is done in int32 (half the memory traffic of int64) and widened once at the end.
    """
    bits = values.float().contiguous().view(torch.int32)
    signed = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return signed.to(torch.int64) + 2**31


def key_values(keys: torch.Tensor) -> torch.Tensor:
    """Inverse of ``order_keys``."""
    signed = keys - 2**31
    bits = torch.where(signed < 0, signed ^ 0x7FFFFFFF, signed)
    return bits.to(torch.int32).view(torch.float32)


#: The top 16 bits of ``order_keys`` fill buckets 0 ... 65535; pairs that are not negatives go here.
SPARE_BUCKET = 1 << 16


def bucket16(block: torch.Tensor, out: Optional[torch.Tensor] = None,
             scratch: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``order_keys(block) >> 16`` (int32, same shape), computed on the top 16 bits alone; into
    `out` (int32, block's shape) if given, with `scratch` (the same) as its temporary."""
    bits = block.contiguous().view(torch.int32)
    top = torch.bitwise_right_shift(bits, 16, out=out)
    flip = torch.bitwise_right_shift(top, 15, out=scratch)
    flip &= 0x7FFF                       # negative floats: flip the magnitude bits
    top ^= flip
    top += 1 << 15                       # sign bit: [-2^15, 2^15) -> [0, 2^16)
    return top


def _descend(hist: torch.Tensor, remaining: torch.Tensor, which: Optional[torch.Tensor] = None):
    """Per target t, the digit of row which[t] of `hist` (counts by digit; default: row t) holding
    the element of descending rank remaining[t], and that rank within the digit's bin. Rows are
    not copied per target (round 1 has 2 rows of 65536 bins for 2K + 1 targets)."""
    targets = torch.arange(remaining.numel(), device=hist.device)
    which = targets if which is None else which
    from_top = torch.cumsum(hist.flip(1), dim=1)
    index = torch.searchsorted(from_top, remaining.expand(hist.shape[0], -1).contiguous(), right=True)[which, targets]
    above = torch.where(index > 0, from_top[which, (index - 1).clamp_min(0)], 0)
    return hist.shape[1] - 1 - index, remaining - above


def select_buckets(hist: torch.Tensor, targets: Sequence[Tuple[int, int]], group):
    """Round 1 of the radix select of the order statistics `targets`.

    hist: (value sets, 65536) this rank's counts of the top 16 key bits of each value set.
    targets: (value set, descending rank m): the element at 0-based index m of that set's global
    values sorted in descending order. All-reduces `hist`; returns per target its 16-bit bucket
    and its descending rank inside the bucket.
    """
    hist = _all_reduce_sum(hist, group)
    which = torch.tensor([w for w, _ in targets], device=hist.device)
    remaining = torch.tensor([m for _, m in targets], dtype=torch.int64, device=hist.device)
    return _descend(hist, remaining, which)


def _distinct(keys: Sequence[Tuple[int, int]]) -> Tuple[List[Tuple[int, int]], List[int]]:
    """The distinct entries of `keys` in order of first appearance, and per entry its index there."""
    index: dict = {}
    which = [index.setdefault(key, len(index)) for key in keys]
    return list(index), which


def refine_selection(candidates: Sequence[torch.Tensor], which: Sequence[int], bucket: torch.Tensor,
                     remaining: torch.Tensor, group) -> torch.Tensor:
    """Rounds 2 and 3 of the radix select: target t's candidates are candidates[which[t]], the
    order keys of this rank's values in its bucket (targets of one model wanting one bucket share
    a list). An all-reduced 256-bin histogram of the next 8 key bits per list and round narrows
    each target to one key; after round 2 the lists are narrowed once per distinct (list, 24-bit
    prefix), so that no list is copied per target. Returns the selected values (float32)."""
    prefix = bucket
    for shift in (8, 0):
        hist = torch.stack([torch.bincount((c >> shift) & 255, minlength=256) for c in candidates])
        digit, remaining = _descend(_all_reduce_sum(hist, group), remaining,
                                    torch.tensor(which, dtype=torch.int64, device=bucket.device))
        prefix = (prefix << 8) | digit
        if shift:
            groups, which = _distinct(list(zip(which, prefix.tolist())))
            candidates = [candidates[w][(candidates[w] >> shift) == p] for w, p in groups]
    return key_values(prefix)


def select_targets(candidates, which: Sequence[int], slot_buckets: Sequence[Tuple[int, int]],
                   bucket: torch.Tensor, remaining: torch.Tensor, group) -> torch.Tensor:
    """Rounds 2 and 3 of the radix select, from pass B's ``PassB`` `candidates`: target t wants
    the element of descending rank remaining[t] inside (model, bucket) = slot_buckets[which[t]]
    (its bucket[t]). Returns the selected values (float32).

    Kept values (the small buckets' path): their order keys, one list per distinct (model,
    bucket), refined by ``refine_selection``. Histogrammed (``candidates.low_bits``, the collapsed
    path): the all-reduced (slots, 65536) histogram of the low 16 key bits gives each target's
    low 16 bits at once (one round instead of two), the same exact key."""
    if candidates.low_bits is not None:
        table = _all_reduce_sum(candidates.low_bits, group)
        # order_keys flips the magnitude bits of negative values (buckets below 2^15): their low
        # 16 bits were counted unflipped, so the histogram of the key bits is the reversed one
        negative = [s for s, (_, b) in enumerate(slot_buckets) if b < 1 << 15]
        if negative:
            rows = torch.tensor(negative, dtype=torch.int64, device=table.device)
            table[rows] = table[rows].flip(1)
        low, _ = _descend(table, remaining, torch.tensor(which, dtype=torch.int64, device=table.device))
        return key_values((bucket << 16) | low)
    keys = [order_keys(candidates.student), order_keys(candidates.teacher)]
    per_model = [sum(1 for m, _ in slot_buckets if m == model) for model in range(2)]
    # a model wanting a single bucket kept the values of that bucket only: its keys are the list
    lists = [keys[m] if per_model[m] == 1 else keys[m][(keys[m] >> 16) == b] for m, b in slot_buckets]
    del keys
    return refine_selection(lists, which, bucket, remaining, group)


# ----------------------------------------------------------------------------- similarity chunks


T = TypeVar("T")


class SimilarityChunk(NamedTuple):
    """The similarities of a chunk of this rank's rows with the columns after its first row.

    Entry (r, c) of a block is pair (rows[r], first + c); those with first + c <= rows[r] are not
    pairs (see ``exclude_non_negatives``)."""

    index: int
    rows: torch.Tensor       # (n,) global rows, ascending
    first: int               # global column of block column 0 (= rows[0] + 1)
    last: int                # rows[-1]
    student: torch.Tensor    # (n, B - first) <s_hat_i, s_hat_j>, no gradient
    teacher: torch.Tensor    # (n, B - first) <t_hat_i, t_hat_j>
    scratch: Tuple[torch.Tensor, torch.Tensor]  # 2 x (n * (B - first),) int32 workspace

    def buckets(self, block: torch.Tensor) -> torch.Tensor:
        """``bucket16(block)`` in this chunk's workspace (valid until the next call)."""
        return bucket16(block, self.scratch[0].view(block.shape), self.scratch[1].view(block.shape))


@torch.no_grad()
def similarity_chunks(s_hat: torch.Tensor, t_hat: torch.Tensor, rows: torch.Tensor, row_list: Sequence[int],
                      plan: Sequence[Tuple[int, int]], work: Callable[[SimilarityChunk], T]) -> List[T]:
    """``work(chunk)`` for each chunk of `plan` (``chunk_plan`` of `rows`, also given as the list
    `row_list`), in order; returns the results, which must not refer to the chunk's tensors: the
    blocks of every chunk are written into one workspace allocated for the largest chunk, so
    that chunks of varying shapes neither allocate nor fragment memory."""
    s_hat, t_hat = s_hat.detach(), t_hat.detach()
    batch = s_hat.shape[0]
    size = max(((end - start) * (batch - 1 - row_list[start]) for start, end in plan), default=0)
    blocks = [s_hat.new_empty(size) for _ in range(2)]
    scratch = [torch.empty(size, dtype=torch.int32, device=s_hat.device) for _ in range(2)]
    out = []
    for index, (start, end) in enumerate(plan):
        chunk_rows = rows[start:end]
        first = row_list[start] + 1
        shape = (end - start, batch - first)
        used = shape[0] * shape[1]
        student = torch.mm(s_hat[chunk_rows], s_hat[first:].t(), out=blocks[0][:used].view(shape))
        teacher = torch.mm(t_hat[chunk_rows], t_hat[first:].t(), out=blocks[1][:used].view(shape))
        out.append(work(SimilarityChunk(index, chunk_rows, first, row_list[end - 1], student, teacher,
                                        (scratch[0][:used], scratch[1][:used]))))
    return out


class ListedPairs(NamedTuple):
    """Pairs (i, j > i) of this rank known in advance (positives, random draws), row-major, with
    where each sits in its chunk: pairs bounds[c] ... bounds[c + 1] - 1 are in chunk c, at flat
    position `flat` of its blocks."""

    i: torch.Tensor
    j: torch.Tensor
    flat: torch.Tensor
    bounds: List[int]

    def in_chunk(self, chunk: SimilarityChunk) -> torch.Tensor:
        return self.flat[self.bounds[chunk.index]:self.bounds[chunk.index + 1]]


def list_pairs(i: torch.Tensor, j: torch.Tensor, rows: torch.Tensor, plan, batch: int) -> ListedPairs:
    """Locate row-major pairs (i in `rows`, j > i) in the chunks of `plan`."""
    device = rows.device
    position = torch.full((batch,), -1, dtype=torch.int64, device=device)
    position[rows] = torch.arange(rows.numel(), device=device)
    starts = torch.tensor([s for s, _ in plan], dtype=torch.int64, device=device)
    if starts.numel() == 0:
        return ListedPairs(i, j, i.new_zeros(0), [0])
    firsts = rows[starts] + 1
    p = position[i]
    chunk = torch.searchsorted(starts, p, right=True) - 1
    flat = (p - starts[chunk]) * (batch - firsts[chunk]) + (j - firsts[chunk])
    bounds = torch.searchsorted(chunk, torch.arange(len(plan) + 1, device=device)).tolist()
    return ListedPairs(i, j, flat, bounds)


def exclude_non_negatives(block: torch.Tensor, chunk: SimilarityChunk, positives: ListedPairs, fill) -> torch.Tensor:
    """Overwrite with `fill`, in place, the entries of a chunk-shaped `block` that are not negative
    pairs: the columns j <= i of each row (left of the diagonal, inside the chunk's row span) and
    this chunk's positives."""
    span = min(chunk.last - chunk.first + 1, block.shape[1])
    if span > 0:
        offset = chunk.rows - chunk.first                  # row r's pairs start after column offset[r]
        lower = torch.arange(span, device=block.device) <= offset.unsqueeze(1)
        block[:, :span].masked_fill_(lower, fill)
    block.view(-1).index_fill_(0, positives.in_chunk(chunk), fill)
    return block


#: ``chunks(work)``: ``similarity_chunks`` of this rank's plan, applied to `work`
ChunkMap = Callable[[Callable[[SimilarityChunk], T]], List[T]]


def _read(block: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    return block.reshape(-1).index_select(0, flat)


def _cat(parts: List[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return torch.cat(parts) if parts else like.new_zeros(0)


# ----------------------------------------------------------------------------- the passes


class PassA(NamedTuple):
    hist: torch.Tensor            # (2, 65536) int64: top 16 key bits of this rank's negatives (student, teacher)
    pos_student: torch.Tensor     # block values of the listed pairs (no gradient)
    pos_teacher: torch.Tensor
    drawn_student: torch.Tensor
    drawn_teacher: torch.Tensor


def count_negatives(chunks: ChunkMap, positives: ListedPairs, drawn: ListedPairs, with_histograms: bool,
                    like: torch.Tensor) -> PassA:
    """Pass A: the round-1 histograms of this rank's negatives, and the values of the listed pairs."""
    hist = torch.zeros(2, SPARE_BUCKET, dtype=torch.int64, device=like.device)

    def work(chunk: SimilarityChunk):
        if with_histograms:
            for which, block in enumerate((chunk.student, chunk.teacher)):
                buckets = exclude_non_negatives(chunk.buckets(block), chunk, positives, SPARE_BUCKET)
                hist[which] += torch.bincount(buckets.view(-1), minlength=SPARE_BUCKET + 1)[:SPARE_BUCKET]
        return [_read(block, listed.in_chunk(chunk)) for listed in (positives, drawn)
                for block in (chunk.student, chunk.teacher)]

    parts = list(zip(*chunks(work))) or [[]] * 4
    return PassA(hist, *(_cat(list(v), like) for v in parts))


class PassB(NamedTuple):
    student: torch.Tensor         # student values of this rank's negatives in a wanted student bucket
    teacher: torch.Tensor         # teacher values of this rank's negatives in a wanted teacher bucket
    hard_i: torch.Tensor          # this rank's N hardest negatives at or above the bucket of the
    hard_j: torch.Tensor          # hardest-N cut (``gather_candidates``), row-major
    hard_student: torch.Tensor
    hard_teacher: torch.Tensor
    low_bits: Optional[torch.Tensor] = None  # (slots, 65536) int64 when histogrammed (``gather_candidates``)


WANTED, HARD = 1, 2  # flags of a bucket in gather_candidates' lookup tables


#: A rank keeps the values of its negatives in the wanted buckets (rounds 2 and 3 refine over them)
#: only while no rank holds more than this many of them; otherwise (similarities collapsed into a
#: few buckets) pass B histograms their low 16 key bits instead (``gather_candidates``).
VALUE_BUDGET = 1 << 22
#: Bins of the low 16 key bits of a wanted bucket.
LOW_BINS = 1 << 16


#: A rank's list of hard candidates is cut back to its N hardest once it holds more than
#: N + max(N, CANDIDATE_SLACK) pairs (``candidate_limit``).
CANDIDATE_SLACK = 4096


def candidate_limit(keep: int) -> int:
    """A rank's list of hard candidates is cut back to its `keep` hardest once it holds more than
    this (csrc/ekd_cpu.cpp's ``candidate_limit``): a cut costs O(list), so the list first doubles,
    or grows by CANDIDATE_SLACK when `keep` is small."""
    return keep + max(keep, CANDIDATE_SLACK)


def hardest_positions(keys: torch.Tensor, keep: int) -> torch.Tensor:
    """The positions, ascending, of the `keep` hardest of `keys` (order keys of student values,
    listed in the order that decides ties): the larger key first, equal keys by position. On the
    device, no host sync (one top-k and a sort of `keep` positions)."""
    position = torch.arange(keys.numel(), device=keys.device)
    if keys.numel() <= 1 << 31:
        # one int64 orders both: the key (< 2^32) in the high bits, the reversed position (< 2^31) below
        order = (keys << 31) | ((1 << 31) - 1 - position)
        chosen = torch.topk(order, keep, sorted=False).indices
    else:
        chosen = torch.sort(keys, descending=True, stable=True).indices[:keep]
    return torch.sort(chosen).values


def gather_candidates(chunks: ChunkMap, positives: ListedPairs, student_table: torch.Tensor,
                      teacher_table: torch.Tensor, keep: int, like: torch.Tensor,
                      slots: Optional[torch.Tensor] = None) -> PassB:
    """Pass B: this rank's negatives in the buckets the tables flag (uint8 per bucket, 65537
    entries, the spare bucket 0): WANTED keeps the value; of the pairs in HARD buckets, the
    `keep` (= N) hardest of this rank, both models' values, in row-major order.

    With `slots` ((2, 65537) int64: per model and bucket, the row of a wanted bucket, -1 for the
    others) the values in WANTED buckets are not kept: their low 16 key bits are counted instead
    into ``low_bits``, a (rows, 65536) int64 histogram of this rank (row slots[model, bucket]), the
    bits as ``order_keys`` has them (``select_targets`` reads the exact keys from it).

    The HARD candidates are bounded as csrc/ekd_cpu.cpp's ``keep_hardest`` bounds them: each chunk
    keeps its N hardest by (student key descending, then row-major (i, j), the order in which
    ``select_hardest`` takes a rank's ties), and the rank's list of kept pairs, in row-major order
    (chunk after chunk), is cut back to its N hardest whenever it holds more than
    ``candidate_limit(N)``, and at the end. When the student's similarities collapse into one
    bucket (a dead or freshly initialised student), HARD would otherwise hold almost all of the
    rank's B²/(2W) pairs, 32 bytes each; now O(N + chunk).

    Why ``select_hardest`` picks the same pairs, in the same order: with the cut c (the N-th
    largest student value, A < N pairs above it globally, above_r of them on rank r) it selects
    every pair above c and, of the ties at c, rank r's first take_r = max(0, min(ties_r, N - A -
    sum_{q<r} ties_q)) in row-major order. (1) Every pair above c is among the N hardest of its
    chunk and of its rank: fewer than N pairs beat it anywhere. (2) A rank's N hardest are its
    above_r pairs and then its first min(ties_r, N - above_r) ties in row-major order (a cut of a
    chunk or of the running list keeps the first ties of that part, and what beats a pair in the
    rank beats it in its part, so cutting the parts and then the whole keeps exactly the rank's N
    hardest). Since above_r <= A, a rank keeps kept_r >= min(ties_r, N - A) ties. (3) The
    allotment over the kept ties gives the same take_r: while the earlier ranks' ties add up to
    less than N - A, each of them held fewer than N - A ties and kept them all, so the prefix
    sums agree and take_r <= N - A <= N - above_r needs no tie rank r dropped; once the prefix
    reaches N - A it does so with the kept counts too (sum of min(ties_q, N - A) >= min(sum of
    ties_q, N - A)), and every later rank takes none either way. Cuts keep row-major order, so the
    chosen pairs come out in the order they did uncut. (Pairs below c that a rank keeps when it
    has fewer than N pairs at or above c are never chosen.)
    """
    hard_parts: List[Tuple[torch.Tensor, ...]] = []   # (i, j, student, teacher), row-major
    held = 0

    def hardest(part: Tuple[torch.Tensor, ...]) -> Tuple[torch.Tensor, ...]:
        kept = hardest_positions(order_keys(part[2]), keep)
        return tuple(x.index_select(0, kept) for x in part)

    def joined() -> Tuple[torch.Tensor, ...]:
        return tuple(torch.cat(x) for x in zip(*hard_parts))

    rows = 0 if slots is None else int(slots.max().item()) + 1
    low_bits = None if slots is None else torch.zeros(rows, LOW_BINS, dtype=torch.int64, device=like.device)
    empty = like.new_zeros(0)

    def flagged(which: int, table: torch.Tensor, block: torch.Tensor, chunk: SimilarityChunk):
        buckets = exclude_non_negatives(chunk.buckets(block), chunk, positives, SPARE_BUCKET).view(-1)
        flags = table.index_select(0, buckets)
        hit = torch.nonzero(flags).squeeze(1)
        flags = flags[hit]
        if slots is not None:  # histogram the wanted values' low 16 key bits (of the bits of
            # order_keys: flipped for negative values, whose buckets are below 2^15; see select_targets)
            wanted = hit[(flags & WANTED) != 0]
            row = slots[which].index_select(0, buckets.index_select(0, wanted))
            low = block.reshape(-1).index_select(0, wanted).view(torch.int32) & (LOW_BINS - 1)
            low_bits.view(-1).add_(torch.bincount(row * LOW_BINS + low, minlength=rows * LOW_BINS))
        return hit, flags

    def work(chunk: SimilarityChunk):
        nonlocal hard_parts, held
        width = chunk.student.shape[1]
        hit, flags = flagged(0, student_table, chunk.student, chunk)
        values = _read(chunk.student, hit)
        hard = (flags & HARD) != 0
        hard_hit, hard_values = hit[hard], values[hard]     # their sizes are on the host already
        if hard_hit.numel() > keep:  # this chunk's N hardest
            kept = hardest_positions(order_keys(hard_values), keep)
            hard_hit, hard_values = hard_hit.index_select(0, kept), hard_values.index_select(0, kept)
        if hard_hit.numel() > 0:
            hard_parts.append((chunk.rows[hard_hit // width], chunk.first + hard_hit % width, hard_values,
                               _read(chunk.teacher, hard_hit)))
            held += hard_hit.numel()
            if held > candidate_limit(keep):  # the rank's N hardest so far
                hard_parts = [hardest(joined())]
                held = keep
        teacher_hit, _ = flagged(1, teacher_table, chunk.teacher, chunk)
        if slots is not None:  # histogrammed
            return empty, empty
        return values[(flags & WANTED) != 0], _read(chunk.teacher, teacher_hit)

    parts = list(zip(*chunks(work))) or [[]] * 2
    if held > keep:
        hard_parts = [hardest(joined())]
    index = like.new_zeros(0, dtype=torch.int64)
    hard_pairs = joined() if hard_parts else (index, index, like.new_zeros(0), like.new_zeros(0))
    return PassB(_cat(list(parts[0]), like), _cat(list(parts[1]), like), *hard_pairs, low_bits)


def count_critical(chunks: ChunkMap, positives: ListedPairs, student_thresholds: torch.Tensor,
                   teacher_thresholds: torch.Tensor) -> torch.Tensor:
    """Pass C: the number of critical pairs (``critical_mask``) among this rank's negatives,
    chunk by chunk, the indicators compared one threshold at a time."""

    def work(chunk: SimilarityChunk):
        critical = torch.zeros_like(chunk.student, dtype=torch.bool)
        for s_k, t_k in zip(student_thresholds, teacher_thresholds):
            critical |= (chunk.student > s_k) != (chunk.teacher > t_k)
        return exclude_non_negatives(critical, chunk, positives, False).sum()

    return sum(chunks(work), torch.zeros((), dtype=torch.int64, device=student_thresholds.device))


def select_hardest(candidates: PassB, num_selected: int, hardest_cut: Optional[torch.Tensor], group) -> torch.Tensor:
    """Indices into pass B's hard candidates of this rank's share of the globally hardest N (the
    candidates are the rank's N hardest only: ``gather_candidates`` says why that suffices)."""
    if hardest_cut is None:  # N >= L: every negative is a candidate and selected
        return torch.arange(candidates.hard_student.numel(), device=candidates.hard_student.device)
    keys = order_keys(candidates.hard_student)
    cut_key = order_keys(hardest_cut.view(1))
    above = keys > cut_key
    ties = torch.nonzero(keys == cut_key).squeeze(1)
    # ties at the cut: rank order decides who contributes (the spec leaves ties unspecified)
    _, rank = _world(group)
    tie_counts = _all_gather_sizes(ties.numel(), keys.device, group)
    need = num_selected - int(_all_reduce_sum(above.sum().view(1), group).item())
    take = max(0, min(ties.numel(), need - sum(tie_counts[:rank])))
    return torch.cat([torch.nonzero(above).squeeze(1), ties[:take]])


# ----------------------------------------------------------------------------- the sharded loss


def _local_input_error(student, teacher, labels, student_thresholds, teacher_thresholds, config: EKDConfig,
                       generator, update_thresholds=True) -> Optional[ValueError]:
    """The ValueError of this rank's own input checks (raised by ``_agree`` once every rank knows
    of it), or None."""
    from .validation import check_embeddings_and_labels, check_flag, check_generator, check_thresholds

    try:
        check_flag("update_thresholds", update_thresholds)
        check_embeddings_and_labels(student, teacher, labels, min_rows=0)
        if student.is_meta:  # (the three share a device: checked above)
            raise _meta_refused("EKDLoss(process_group=...)")
        check_thresholds(student_thresholds, teacher_thresholds, config.num_thresholds, student.device)
        check_generator(generator)
        if student.dtype == torch.float64:
            raise ValueError("the sharded EKD computes in fp32; for fp64 inputs use gather_batch + EKDLoss")
    except ValueError as error:
        return error
    return None


_KNOWN_STRINGS = {_hash64(s): repr(s) for s in RANK_LOSSES + NEGATIVE_SELECTIONS}


def _show_string(code: int) -> str:
    return _KNOWN_STRINGS.get(code, f"another string (hash {code})")


def _config_entries(config: EKDConfig) -> List[Tuple[_Field, int]]:
    """Every field of the EKDConfig as (field, host integer): bools and ints as such, floats by
    their bits, strings by a hash, the FPR list by its length and a hash of its values."""
    entries = []
    for field in dataclasses.fields(config):
        value, what = getattr(config, field.name), f"the option {field.name}"
        if isinstance(value, bool):
            entries.append((_Field(what, _show_bool), int(value)))
        elif isinstance(value, int):
            entries.append((_Field(what), value))
        elif isinstance(value, float):
            entries.append((_Field(what, _show_float), _float_bits(value)))
        elif isinstance(value, str):
            entries.append((_Field(what, _show_string), _hash64(value)))
        else:  # fprs
            entries += [(_Field(f"the length of the option {field.name}"), len(value)),
                        (_Field(what, None), _hash64(repr(tuple(value))))]
    return entries


_SHARDED_INPUT_FIELDS = [
    _Field("the row count", compared=False), _Field("the student width Ds"), _Field("the teacher width Dt"),
    _Field("the student dtype", _show_dtype), _Field("the teacher dtype", _show_dtype),
    _Field("whether the student's gradient is computed (requires_grad, grad mode)", _show_bool,
           hint="the loss's backward is a collective: every rank or none"),
    _Field("update_thresholds (training mode)", _show_bool,
           hint="call .train() or .eval() on every rank's EKDLoss alike"),
    _Field('whether a generator is given (negative_selection="random")', _show_bool,
           hint="pass an identically seeded generator on every rank"),
    _Field("the embeddings' device type", _show_device_code),
]
_SHARDED_STATE_FIELDS = [
    _Field("the threshold dtype", _show_dtype),
    _Field("the threshold state (student_thresholds and teacher_thresholds, bit for bit)", None,
           hint="load the same checkpoint on every rank, or broadcast the buffers from one rank"),
]


def _sharded_fields(config: EKDConfig) -> List[_Field]:
    """What the ranks of the sharded loss exchange (``_sharded_values``): row count, widths,
    dtypes, whether the gradient flows, train/eval, whether a generator is given (random
    selection), every field of the EKDConfig, the thresholds' dtype and their fingerprint."""
    return _SHARDED_INPUT_FIELDS + [field for field, _ in _config_entries(config)] + _SHARDED_STATE_FIELDS


def _sharded_values(student, teacher, labels, student_thresholds, teacher_thresholds, config: EKDConfig,
                    update_thresholds: bool, generator) -> Tuple[List[int], List[torch.Tensor]]:
    """This rank's values of ``_sharded_fields``: host integers, and the thresholds' fingerprint
    (on their device, no host sync)."""
    random = config.negative_selection == "random"
    values = [student.shape[0], student.shape[1], teacher.shape[1], _dtype_code(student.dtype),
              _dtype_code(teacher.dtype), int(_gradient_flows(student)), int(bool(update_thresholds)),
              int(random and generator is not None), _device_code(student.device)]
    values += [value for _, value in _config_entries(config)]
    values.append(_dtype_code(student_thresholds.dtype))
    return values, [fingerprint([student_thresholds, teacher_thresholds])]


def ekd_sharded(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                student_thresholds: torch.Tensor, teacher_thresholds: torch.Tensor, config: EKDConfig,
                update_thresholds: bool = True, generator: Optional[torch.Generator] = None,
                group=None) -> EKDResult:
    """EKD of the global batch (the concatenation of every rank's rows), computed sharded.

    Inputs are this rank's rows. Each rank checks its own inputs, then the ranks exchange their
    row counts with what they must agree on (``_sharded_fields``): a rank whose input was refused,
    or ranks that disagree, make every rank raise a ValueError before any later collective
    (``_agree``); with random selection, ranks whose draws differ raise alike, in the selection.
    The result, thresholds and statistics are the single-process ones on the global batch and
    identical on every rank; the gradient of this rank's student rows is W times the
    single-process one (module docstring). Computes in fp32 (bf16/fp16 are read and computed in
    fp32); fp64 is not supported here (use the gather path for gradcheck). Labels of any integer
    dtype are gathered as int64.
    """
    world, rank = _world(group)
    error = _local_input_error(student, teacher, labels, student_thresholds, teacher_thresholds, config, generator,
                               update_thresholds)
    fields = _sharded_fields(config)
    values, fingerprints = [], []
    if error is None:
        values, fingerprints = _sharded_values(student, teacher, labels, student_thresholds, teacher_thresholds,
                                               config, update_thresholds, generator)
    sizes = _agree(error, fields, values, fingerprints, _exchange_device(group), group,
                   "EKDLoss(process_group=...)")
    if config.negative_selection == "random" and generator is None:
        # (every rank alike: they agreed on whether a generator is given; refused as every
        # single-process backend refuses it, also when the global batch has no negative to draw)
        raise ValueError('negative_selection="random" needs a torch.Generator (pass generator=...); '
                         "seed it identically on every rank")
    device = student.device
    # Gathered in fp32 (what the loss computes in): the gradient's rank shares are then summed in
    # fp32 and rounded once to a 16-bit student's dtype, as single-process training rounds it (a
    # bf16 gather summed bf16 shares: about one bf16 step off in a third of the elements).
    student_all = _gather_rows(student.float() if student.dtype in (torch.float16, torch.bfloat16) else student,
                               sizes, _gradient_flows(student), group)
    teacher_all = _gather_rows(teacher.detach(), sizes, False, group)
    labels_all = _gather_rows(labels.to(torch.int64), sizes, False, group)
    batch = labels_all.shape[0]
    if batch < 2:
        raise ValueError(f"EKD needs a global batch of at least 2 embeddings, got B={batch}")
    finite = torch.isfinite(student_all).all() & torch.isfinite(teacher_all).all()
    random = config.negative_selection == "random"

    # stage 1-2 (normalise, similarity chunks): this rank's rows in chunks, the pairs known from the labels
    # (a non-finite global batch: the gradient NaN throughout on every rank, as on every backend)
    s_hat = normalize_rows(nan_gradient_unless(finite, student_all).float())
    t_hat = normalize_rows(teacher_all.detach().float())
    _, num_negatives = negatives_before_row(labels_all)
    num_pairs = batch * (batch - 1) // 2
    num_positives = num_pairs - num_negatives
    num_selected = min(config.num_hard_negatives, num_negatives)
    row_list = balanced_rows(batch, world, rank).tolist()
    rows = torch.tensor(row_list, dtype=torch.int64, device=device)
    plan = chunk_plan(row_list, batch, CHUNK_PAIRS)
    mine = torch.zeros(batch, dtype=torch.bool, device=device)
    mine[rows] = True
    positives = list_pairs(*positive_pairs(labels_all, mine), rows, plan, batch)
    if random and num_selected > 0:
        # the same draw as the single-process backends: ranks among all negatives in row-major order
        ranks = draw_random_negatives(num_negatives, num_selected, generator)
        ranks = torch.sort(ranks.to(device)).values
        drawn_i, drawn_j = negative_pairs_at(labels_all, ranks)
        drawn = list_pairs(drawn_i[mine[drawn_i]], drawn_j[mine[drawn_i]], rows, plan, batch)
    else:
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        drawn = list_pairs(empty, empty, rows, plan, batch)

    def chunks(work):
        return similarity_chunks(s_hat, t_hat, rows, row_list, plan, work)

    # pass A: round-1 histograms of the negatives; values of the positives and the random draws
    listed = count_negatives(chunks, positives, drawn, num_negatives > 0, s_hat)

    def pair_values(i, j, value):
        """The student similarity of pairs (i, j) with a gradient: the block's value forward (so
        thresholds and masks see the same numbers), the gradient of <s_hat_i, s_hat_j>. Only
        positives and selected negatives need one."""
        dot = (s_hat[i] * s_hat[j]).sum(1)
        return value + (dot - dot.detach())

    a_pos, b_pos = pair_values(positives.i, positives.j, listed.pos_student), listed.pos_teacher

    # stage 3 (threshold selection): exact global thresholds and the N-th largest student negative (pass B)
    k = config.num_thresholds
    hardest_cut, hard = None, None
    if num_negatives > 0:
        indices = config.threshold_indices(num_negatives)
        targets = [(0, m) for m in indices] + [(1, m) for m in indices]
        if 0 < num_selected < num_negatives and not random:
            targets.append((0, num_selected - 1))
        bucket, remaining = select_buckets(listed.hist, targets, group)
        # the distinct (model, bucket) wanted: each kept once, or histogrammed once
        slot_buckets, which = _distinct([(w, b) for (w, _), b in zip(targets, bucket.tolist())])
        models = torch.tensor([m for m, _ in slot_buckets], device=device)
        wanted = torch.tensor([b for _, b in slot_buckets], device=device)
        tables = torch.zeros(2, SPARE_BUCKET + 1, dtype=torch.uint8, device=device)
        tables[models, wanted] = WANTED
        if num_selected > 0 and not random:  # gather the hardest candidates in the same pass
            lowest = bucket[2 * k] if len(targets) > 2 * k else 0
            tables[0, lowest:SPARE_BUCKET] |= HARD
        # the values in the wanted buckets are kept unless some rank holds more than VALUE_BUDGET
        # (every rank decides alike, from the all-reduced maximum of their counts from pass A)
        held = listed.hist[models, wanted].sum().view(1)
        if random and num_selected > 0:
            # the ranks' draws must agree (the same generator state everywhere): the maximum of
            # their fingerprints and of their negations, in the same all-reduce
            drawn_print = fingerprint([ranks]).view(1)
            held = torch.cat([held, drawn_print, -drawn_print])
        held = _all_reduce_max(held, group).tolist()
        if len(held) > 1 and held[1] != -held[2]:
            raise ValueError('EKDLoss(process_group=...) with negative_selection="random": the ranks drew different '
                             "negatives (their generators were in different states); seed the generator identically "
                             "on every rank (e.g. torch.Generator().manual_seed(step) on each) and draw from it alike")
        slots = None
        if held[0] > VALUE_BUDGET:
            slots = torch.full((2, SPARE_BUCKET + 1), -1, dtype=torch.int64, device=device)
            slots[models, wanted] = torch.arange(len(slot_buckets), device=device)
        hard = gather_candidates(chunks, positives, tables[0], tables[1], num_selected, s_hat, slots)
        picked = select_targets(hard, which, slot_buckets, bucket, remaining, group)
        batch_student, batch_teacher = picked[:k], picked[k:2 * k]
        hardest_cut = picked[2 * k] if len(targets) > 2 * k else None
    else:
        batch_student = batch_teacher = torch.full((k,), float("nan"), device=device)
    valid = finite & torch.tensor(num_negatives > 0 and update_thresholds, device=device)
    new_student = ema_update(student_thresholds, batch_student, config.momentum, valid)
    new_teacher = ema_update(teacher_thresholds, batch_teacher, config.momentum, valid)
    st, tt = new_student.float(), new_teacher.float()

    # stage 4 (pair selection): this rank's share of the N selected negatives
    if random:
        a_sel = pair_values(drawn.i, drawn.j, listed.drawn_student)
        b_sel = listed.drawn_teacher
    elif num_selected > 0:
        chosen = select_hardest(hard, num_selected, hardest_cut, group)
        a_sel = pair_values(hard.hard_i[chosen], hard.hard_j[chosen], hard.hard_student[chosen])
        b_sel = hard.hard_teacher[chosen]
    else:
        a_sel = b_sel = s_hat.new_zeros(0)

    # stage 4-5 (critical mask, rank loss): per-pair losses; the means' denominators are global
    critical_pos = critical_mask(a_pos, b_pos, st, tt)
    critical_sel = critical_mask(a_sel, b_sel, st, tt)
    pos_losses = pair_rank_loss(a_pos, b_pos, st, tt, config)
    sel_losses = pair_rank_loss(a_sel, b_sel, st, tt, config)
    # the selected count is counted, not assumed: every rank's share must add up to N
    local_counts = torch.stack([critical_pos.sum(), critical_sel.sum(), torch.tensor(a_sel.numel(), device=device)])
    local_counts = local_counts.to(torch.int64)
    if config.compute_critical_ratio:
        critical_all = critical_pos.sum()
        if num_negatives > 0:  # pass C
            critical_all = critical_all + count_critical(chunks, positives, st, tt)
        local_counts = torch.cat([local_counts, critical_all.to(torch.int64).view(1)])
    counts = _all_reduce_sum(local_counts, group)
    if config.critical_only:
        pos_losses, sel_losses = pos_losses[critical_pos], sel_losses[critical_sel]
        pos_denominator, sel_denominator = counts[0], counts[1]
    else:
        pos_denominator = torch.tensor(num_positives, device=device)
        sel_denominator = torch.tensor(num_selected, device=device)
    local_pos = pos_losses.sum() / pos_denominator.clamp_min(1)
    local_neg = sel_losses.sum() / sel_denominator.clamp_min(1)
    local = config.positive_weight * local_pos + config.negative_weight * local_neg
    terms = _all_reduce_sum(torch.stack([local_pos.detach(), local_neg.detach(), local.detach()]), group)
    # value: the global loss, the same bits on every rank (terms[2] + 0; not share + (total -
    # share), whose rounding depends on the rank's share); gradient: W times this rank's share
    # (the gather's backward sums shares)
    share = world * local
    loss = terms[2] + (share - share.detach())
    loss = torch.where(finite, loss, torch.full_like(loss, float("nan")))
    # a non-finite batch's statistics read as NaN, as on every backend (reference.py)
    nan = torch.tensor(float("nan"), dtype=torch.float32, device=device)  # (not the default dtype)
    terms = torch.where(finite, terms, nan)

    stats = EKDStats(
        batch_student_thresholds=torch.where(finite, batch_student, nan).to(student_thresholds.dtype),
        batch_teacher_thresholds=torch.where(finite, batch_teacher, nan).to(teacher_thresholds.dtype),
        student_thresholds=new_student, teacher_thresholds=new_teacher,
        num_positive_pairs=torch.tensor(num_positives, device=device),
        num_negative_pairs=torch.tensor(num_negatives, device=device),
        num_selected_negatives=counts[2],
        num_critical_selected=counts[0] + counts[1],
        positive_term=terms[0], negative_term=terms[1],
    )
    if config.compute_critical_ratio:
        stats.num_critical_pairs = counts[3]
        stats.critical_ratio = torch.where(finite, counts[3].to(torch.float32) / num_pairs, nan)
    return EKDResult(loss, new_student.detach(), new_teacher.detach(), stats.detach())


@torch.compiler.disable  # eager under torch.compile: see gather_batch
def ekd_sharded_checked(student, teacher, labels, student_thresholds, teacher_thresholds, config,
                        update_thresholds=True, generator=None, group=None) -> EKDResult:
    """``ekd_sharded`` (whose input checks cover each rank's part, of any number of rows, and the
    ranks' agreement) once torch.distributed is initialised; `group` None is the default group,
    as everywhere in torch.distributed."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("EKDLoss(process_group=...) computes the loss across the ranks of a torch.distributed "
                           "process group (process_group=None or dist.group.WORLD: the default group, resolved at "
                           "each call), so torch.distributed must be initialised first "
                           "(torch.distributed.init_process_group); for one process, build EKDLoss() without "
                           "process_group")
    device = student.device if isinstance(student, torch.Tensor) else torch.device("cpu")
    with autocast_off(device):  # as ekd_loss: low precision is computed in fp32
        return ekd_sharded(student, teacher, labels, student_thresholds, teacher_thresholds, config,
                           update_thresholds=update_thresholds, generator=generator, group=group)
