"""Worker processes of test_distributed.py (spawned; each is one rank of a gloo group)."""

import datetime
import os

import torch
import torch.distributed as dist

from ekd_kernels import EKDLoss
from ekd_kernels.distributed import gather_batch

# (name, EKDLoss options, how labels are made) of the scenarios every rank runs in order
SCENARIOS = [
    ("default", dict(), "mixed"),
    ("critical_ratio", dict(critical_only=True, compute_critical_ratio=True), "mixed"),
    ("eq7_small_n", dict(rank_loss="eq7", num_hard_negatives=7), "mixed"),
    ("random", dict(negative_selection="random", num_hard_negatives=30), "mixed"),
    ("rank_without_positives", dict(), "distinct_on_rank0"),
    ("no_positives_at_all", dict(), "all_distinct"),
    # every row appears 3 times (spread over the ranks): the N-th largest negative is tied across
    # ranks, so the ranks must share out exactly the ties needed to make N
    ("ties_at_cut", dict(num_hard_negatives=10), "duplicated"),
]
STEPS = 3


def rank_sizes(world):
    return {2: [9, 14], 3: [12, 1, 10]}[world]


def global_batch(step, world, labels_kind):
    """The same global batch on every rank (seeded), split by rank_sizes."""
    g = torch.Generator().manual_seed(100 * step + world)
    batch = sum(rank_sizes(world))
    student = torch.randn(batch, 12, generator=g) * 2
    teacher = torch.randn(batch, 10, generator=g) + student[:, :10]
    if labels_kind == "duplicated":
        rows = torch.arange(batch) % ((batch + 2) // 3)
        student, teacher = student[rows], teacher[rows]
        labels = torch.arange(batch)
    elif labels_kind == "mixed":
        labels = torch.randint(0, 6, (batch,), generator=g)
    elif labels_kind == "all_distinct":
        labels = torch.arange(batch)
    else:  # rank 0's rows all distinct from each other, but sharing identities with other ranks
        n0 = rank_sizes(world)[0]
        labels = torch.cat([torch.arange(n0), torch.randint(0, n0, (batch - n0,), generator=g)])
    return student, teacher, labels


def local_part(x, world, rank):
    sizes = rank_sizes(world)
    start = sum(sizes[:rank])
    return x[start:start + sizes[rank]]


def run_scenarios(world, rank, path):
    group = dist.group.WORLD
    results = {}
    for name, options, labels_kind in SCENARIOS:
        crit = EKDLoss(**options, process_group=group if path == "sharded" else None)
        steps = []
        for step in range(STEPS):
            student, teacher, labels = (local_part(x, world, rank) for x in global_batch(step, world, labels_kind))
            student = student.clone().requires_grad_(True)
            generator = torch.Generator().manual_seed(step)
            if path == "sharded":
                loss = crit(student, teacher, labels, generator=generator)
            else:
                s_all, t_all, l_all, _ = gather_batch(student, teacher, labels, group)
                loss = crit(s_all, t_all, l_all, generator=generator)
            loss.backward()
            stats = crit.last_stats
            steps.append(dict(loss=loss.detach(), grad=student.grad, student_thresholds=crit.student_thresholds.clone(),
                              teacher_thresholds=crit.teacher_thresholds.clone(),
                              counts={k: getattr(stats, k) for k in ("num_positive_pairs", "num_negative_pairs",
                                                                     "num_selected_negatives",
                                                                     "num_critical_selected", "num_critical_pairs")}))
        results[name] = steps
    return results


def ddp_step(world, rank, path):
    """One DDP step of a small embedding model; returns its parameter gradients after averaging."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    crit = EKDLoss(process_group=dist.group.WORLD if path == "sharded" else None)
    grads = []
    for step in range(2):
        inputs, teacher, labels = (local_part(x, world, rank) for x in global_batch(step, world, "mixed"))
        embeddings = ddp(inputs)
        if path == "sharded":
            loss = crit(embeddings, teacher, labels)
        else:
            loss = crit(*gather_batch(embeddings, teacher, labels)[:3])
        ddp.zero_grad()
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    return grads


def worker(rank, world, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        out = {path: run_scenarios(world, rank, path) for path in ("gather", "sharded")}
        out["ddp"] = {path: ddp_step(world, rank, path) for path in ("gather", "sharded")}
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
