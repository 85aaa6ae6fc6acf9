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

Communication per step (sharded path, K thresholds): one all-gather of the embeddings and labels,
B·(Ds + Dt)·4 + 8·B bytes; 3 rounds of radix-select histograms: 2 x 65536 int64 (1 MiB),
then twice (2K + 1) x 256 int64 (26 KiB each for K = 6); a handful of scalar all-reduces (counts and loss terms); the
reduce-scatter of the embeddings' gradient in backward, B·Ds·4 bytes.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .config import EKDConfig
from .reference import critical_mask, ema_update, normalize_rows, pair_rank_loss
from .result import EKDResult, EKDStats

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


def _all_gather_sizes(count: int, device, group) -> List[int]:
    world, _ = _world(group)
    mine = torch.tensor([count], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(sizes, mine, group=group)
    return [int(s.item()) for s in sizes]


def gather_batch(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, group=None):
    """All-gather the global batch from every rank of `group` (per-rank sizes may differ).

    Returns ``(student, teacher, labels, sizes)``: the concatenation in rank order, and the
    per-rank row counts. The student keeps its gradient: ``EKDLoss()(student, teacher, labels)``
    on the result, computed identically on every rank, sends each rank's own rows W times their
    single-process gradient (the backward of the gather sums the W identical contributions), so
    that after DDP's gradient averaging the parameters see exactly single-process training on the
    concatenated batch (module docstring). Teacher and labels are gathered without gradient.
    """
    sizes = _all_gather_sizes(student.shape[0], student.device, group)
    padded_rows = max(sizes)

    def gather(x: torch.Tensor, autograd: bool) -> torch.Tensor:
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

    return (gather(student, autograd=student.requires_grad), gather(teacher.detach(), autograd=False),
            gather(labels, autograd=False), sizes)


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


def negatives_before_row(labels: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """Exclusive prefix count of negative pairs (i, j > i) per row i, and their total L, from the
    label groups alone (no B x B comparison): row i has (B - 1 - i) - #{j > i, same label}."""
    batch = labels.shape[0]
    order = torch.sort(labels, stable=True).indices              # rows grouped by label, index order inside
    sorted_labels = labels[order]
    group_start = torch.ones(batch, dtype=torch.bool, device=labels.device)
    group_start[1:] = sorted_labels[1:] != sorted_labels[:-1]
    start_index = torch.cummax(torch.where(group_start, torch.arange(batch, device=labels.device), 0), 0).values
    _, counts = torch.unique_consecutive(sorted_labels, return_counts=True)
    size = torch.repeat_interleave(counts, counts)
    position = torch.arange(batch, device=labels.device) - start_index
    same_after = torch.empty_like(position)
    same_after[order] = size - 1 - position
    per_row = (batch - 1 - torch.arange(batch, device=labels.device)) - same_after
    prefix = torch.cumsum(per_row, 0) - per_row
    return prefix, int(per_row.sum().item())


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


def _descend(hist: torch.Tensor, remaining: torch.Tensor):
    """Per row of `hist` (counts by digit), the digit holding the element of descending rank
    `remaining`, and that rank within the digit's bin."""
    from_top = torch.cumsum(hist.flip(1), dim=1)
    index = torch.searchsorted(from_top, remaining.unsqueeze(1), right=True).squeeze(1)
    above = torch.where(index > 0, from_top.gather(1, (index - 1).clamp_min(0).unsqueeze(1)).squeeze(1), 0)
    return hist.shape[1] - 1 - index, remaining - above


def distributed_select(keys: Sequence[torch.Tensor], targets: Sequence[Tuple[int, int]], group) -> torch.Tensor:
    """Exact order statistics over the union of every rank's values, by a 3-round radix select.

    keys: per value set, this rank's order keys. targets: (value set, descending rank m): the
    element at 0-based index m of that set's global values sorted in descending order.
    Round 1 all-reduces one 65536-bin histogram of the top 16 key bits per value set (shared by
    all its targets); rounds 2 and 3 all-reduce a 256-bin histogram per target of the next 8 bits
    among the few values left in its bucket. Returns the selected values (float32, one per target).
    """
    device = keys[0].device
    sets = sorted({which for which, _ in targets})
    remaining = torch.tensor([m for _, m in targets], dtype=torch.int64, device=device)
    hist = torch.stack([torch.bincount(keys[w] >> 16, minlength=1 << 16) for w in sets])
    hist = _all_reduce_sum(hist, group)
    rows = torch.tensor([sets.index(w) for w, _ in targets], device=device)
    prefix, remaining = _descend(hist[rows], remaining)
    # the values of each set that fall in one of its targets' buckets: one pass per set
    in_buckets = {}
    for w in sets:
        wanted = torch.zeros(1 << 16, dtype=torch.bool, device=device)   # a lookup table beats isin here
        wanted[prefix[rows == sets.index(w)]] = True
        in_buckets[w] = keys[w][wanted[keys[w] >> 16]]
    candidates = [in_buckets[w][(in_buckets[w] >> 16) == prefix[t]] for t, (w, _) in enumerate(targets)]
    for shift in (8, 0):
        hist = torch.stack([torch.bincount((c >> shift) & 255, minlength=256) for c in candidates])
        digit, remaining = _descend(_all_reduce_sum(hist, group), remaining)
        prefix = (prefix << 8) | digit
        candidates = [c[(c >> shift) == prefix[t]] for t, c in enumerate(candidates)]
    return key_values(prefix)


class LocalPairs(NamedTuple):
    """This rank's pairs (i in its rows, j > i), split into positives and negatives, in row-major
    order; values carry no gradient (see ekd_sharded's pair_values)."""

    pos_i: torch.Tensor
    pos_j: torch.Tensor
    pos_student: torch.Tensor
    pos_teacher: torch.Tensor
    neg_i: torch.Tensor
    neg_j: torch.Tensor
    neg_student: torch.Tensor
    neg_teacher: torch.Tensor
    neg_global_index: Optional[torch.Tensor]  # row-major index among all negatives (random selection)


@torch.no_grad()
def local_pairs(s_hat, t_hat, labels, rows, neg_prefix, with_global_index: bool, chunk: int = 256) -> LocalPairs:
    """Similarities of the pairs (i in `rows`, j > i), computed in chunks of consecutive rows.

    A chunk multiplies its rows by the columns after its first row only, so the work wasted on
    pairs j <= i stays a fraction of the chunk's span instead of half of every row.
    """
    batch = labels.shape[0]
    parts = {k: [] for k in LocalPairs._fields}
    for start in range(0, rows.numel(), chunk):
        chunk_rows = rows[start:start + chunk]
        first = int(chunk_rows[0].item()) + 1
        columns = torch.arange(first, batch, device=rows.device)
        upper = columns.unsqueeze(0) > chunk_rows.unsqueeze(1)
        same = labels[chunk_rows].unsqueeze(1) == labels[first:].unsqueeze(0)
        a = s_hat[chunk_rows] @ s_hat[first:].t()
        b = t_hat[chunk_rows] @ t_hat[first:].t()
        for kind, mask in (("pos", upper & same), ("neg", upper & ~same)):
            r, c = torch.nonzero(mask, as_tuple=True)
            parts[f"{kind}_i"].append(chunk_rows[r])
            parts[f"{kind}_j"].append(columns[c])
            parts[f"{kind}_student"].append(a[r, c])
            parts[f"{kind}_teacher"].append(b[r, c])
            if kind == "neg" and with_global_index:
                within_row = torch.cumsum(mask.to(torch.int64), dim=1) - 1
                parts["neg_global_index"].append(neg_prefix[chunk_rows][r] + within_row[r, c])
    empty_index = torch.zeros(0, dtype=torch.int64, device=rows.device)
    empty_value = torch.zeros(0, dtype=s_hat.dtype, device=rows.device)
    out = {}
    for name, chunks in parts.items():
        if name == "neg_global_index" and not with_global_index:
            out[name] = None
        else:
            default = empty_value if name.endswith(("student", "teacher")) else empty_index
            out[name] = torch.cat(chunks) if chunks else default
    return LocalPairs(**out)


# ----------------------------------------------------------------------------- the sharded loss


def ekd_sharded(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                student_thresholds: torch.Tensor, teacher_thresholds: torch.Tensor, config: EKDConfig,
                update_thresholds: bool = True, generator: Optional[torch.Generator] = None,
                group=None) -> EKDResult:
    """EKD of the global batch (the concatenation of every rank's rows), computed sharded.

    Inputs are this rank's rows. The result, thresholds and statistics are the single-process
    ones on the global batch and identical on every rank; the gradient of this rank's student
    rows is W times the single-process one (module docstring). Computes in fp32 (bf16/fp16 are
    read and computed in fp32); fp64 is not supported here (use the gather path for gradcheck).
    """
    if student.dtype == torch.float64:
        raise ValueError("the sharded EKD computes in fp32; for fp64 inputs use gather_batch + EKDLoss")
    world, rank = _world(group)
    device = student.device
    student_all, teacher_all, labels_all, _ = gather_batch(student, teacher, labels, group)
    batch = labels_all.shape[0]
    if batch < 2:
        raise ValueError(f"EKD needs a global batch of at least 2 embeddings, got B={batch}")
    finite = torch.isfinite(student_all).all() & torch.isfinite(teacher_all).all()

    # stage 1-2: similarities of this rank's pairs (i in its rows, j > i), never B x B
    s_hat = normalize_rows(student_all.float())
    t_hat = normalize_rows(teacher_all.detach().float())
    neg_prefix, num_negatives = negatives_before_row(labels_all)
    rows = balanced_rows(batch, world, rank).to(device)
    pairs = local_pairs(s_hat, t_hat, labels_all, rows, neg_prefix, config.negative_selection == "random")
    a_neg, b_neg = pairs.neg_student, pairs.neg_teacher

    def pair_values(i, j, value):
        """The student similarity of pairs (i, j) with a gradient: the block's value forward (so
        thresholds and masks see the same numbers), the gradient of <s_hat_i, s_hat_j>. Only
        positives and selected negatives need one."""
        dot = (s_hat[i] * s_hat[j]).sum(1)
        return value + (dot - dot.detach())

    a_pos, b_pos = pair_values(pairs.pos_i, pairs.pos_j, pairs.pos_student), pairs.pos_teacher

    # global counts come from the labels alone, identical on every rank
    num_pairs = batch * (batch - 1) // 2
    num_positives = num_pairs - num_negatives
    num_selected = min(config.num_hard_negatives, num_negatives)

    # stage 3: exact global thresholds and the N-th largest student negative
    student_keys, teacher_keys = order_keys(a_neg), order_keys(b_neg)
    k = config.num_thresholds
    if num_negatives > 0:
        indices = config.threshold_indices(num_negatives)
        targets = [(0, m) for m in indices] + [(1, m) for m in indices]
        if 0 < num_selected < num_negatives:
            targets.append((0, num_selected - 1))
        picked = distributed_select([student_keys, teacher_keys], targets, group)
        batch_student, batch_teacher = picked[:k], picked[k:2 * k]
        hardest_cut = picked[2 * k] if len(targets) > 2 * k else None
    else:
        batch_student = batch_teacher = torch.full((k,), float("nan"), device=device)
        hardest_cut = None
    valid = finite & torch.tensor(num_negatives > 0 and update_thresholds, device=device)
    new_student = ema_update(student_thresholds, batch_student, config.momentum, valid)
    new_teacher = ema_update(teacher_thresholds, batch_teacher, config.momentum, valid)
    st, tt = new_student.float(), new_teacher.float()

    # stage 4: this rank's share of the N selected negatives
    chosen = _select_local_negatives(pairs, num_negatives, num_selected, hardest_cut, student_keys, config,
                                     generator, group)
    a_sel = pair_values(pairs.neg_i[chosen], pairs.neg_j[chosen], a_neg[chosen])
    b_sel = b_neg[chosen]

    # stage 5: per-pair losses; the means' denominators are global
    critical_pos = critical_mask(a_pos, b_pos, st, tt)
    critical_sel = critical_mask(a_sel, b_sel, st, tt)
    pos_losses = pair_rank_loss(a_pos, b_pos, st, tt, config)
    sel_losses = pair_rank_loss(a_sel, b_sel, st, tt, config)
    # the selected count is counted, not assumed: every rank's share must add up to N
    local_counts = torch.stack([critical_pos.sum(), critical_sel.sum(), torch.tensor(a_sel.numel(), device=device)])
    local_counts = local_counts.to(torch.int64)
    if config.compute_critical_ratio:
        critical_all = critical_mask(a_neg, b_neg, st, tt).sum() + critical_pos.sum()
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
    # value: the global loss; gradient: W times this rank's share (the gather's backward sums shares)
    loss = world * local + (terms[2] - world * local).detach()
    loss = torch.where(finite, loss, torch.full_like(loss, float("nan")))

    stats = EKDStats(
        batch_student_thresholds=batch_student.to(student_thresholds.dtype),
        batch_teacher_thresholds=batch_teacher.to(teacher_thresholds.dtype),
        student_thresholds=new_student, teacher_thresholds=new_teacher,
        num_positive_pairs=torch.tensor(num_positives, device=device),
        num_negative_pairs=torch.tensor(num_negatives, device=device),
        num_selected_negatives=counts[2],
        num_critical_selected=counts[0] + counts[1],
        positive_term=terms[0], negative_term=terms[1],
    )
    if config.compute_critical_ratio:
        stats.num_critical_pairs = counts[3]
        stats.critical_ratio = counts[3].to(torch.float32) / num_pairs
    return EKDResult(loss, new_student.detach(), new_teacher.detach(), stats.detach())


def _select_local_negatives(pairs, num_negatives, num_selected, hardest_cut, student_keys, config, generator,
                            group) -> torch.Tensor:
    """Indices into this rank's negatives of its share of the globally selected N."""
    device = student_keys.device
    if num_selected == 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    if config.negative_selection == "random":
        if generator is None:
            raise ValueError('negative_selection="random" needs a torch.Generator (pass generator=...); '
                             "seed it identically on every rank")
        drawn = torch.randperm(num_negatives, generator=generator, device=generator.device)[:num_selected]
        return torch.nonzero(torch.isin(pairs.neg_global_index, drawn.to(device))).squeeze(1)
    if hardest_cut is None:  # N >= L: every negative
        return torch.arange(student_keys.numel(), device=device)
    cut_key = order_keys(hardest_cut.view(1))
    above = student_keys > cut_key
    ties = torch.nonzero(student_keys == cut_key).squeeze(1)
    # ties at the cut: rank order decides who contributes (the spec leaves ties unspecified)
    _, rank = _world(group)
    tie_counts = torch.tensor(_all_gather_sizes(ties.numel(), device, group), device=device)
    need = num_selected - int(_all_reduce_sum(above.sum().view(1), group).item())
    before = int(tie_counts[:rank].sum().item())
    take = max(0, min(ties.numel(), need - before))
    return torch.cat([torch.nonzero(above).squeeze(1), ties[:take]])


def ekd_sharded_checked(student, teacher, labels, student_thresholds, teacher_thresholds, config,
                        update_thresholds=True, generator=None, group=None) -> EKDResult:
    """``ekd_sharded`` after the input checks (each rank's part may hold any number of rows)."""
    from .validation import check_embeddings_and_labels, check_thresholds

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("EKDLoss(process_group=...) needs torch.distributed to be initialised "
                           "(torch.distributed.init_process_group)")
    check_embeddings_and_labels(student, teacher, labels, min_rows=0)
    check_thresholds(student_thresholds, teacher_thresholds, config.num_thresholds, student.device)
    return ekd_sharded(student, teacher, labels, student_thresholds, teacher_thresholds, config,
                       update_thresholds=update_thresholds, generator=generator, group=group)
