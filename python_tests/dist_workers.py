"""Worker processes of test_distributed.py (spawned; each is one rank of a gloo group)."""

import contextlib
import copy
import datetime
import io
import os
import pickle

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from ekd_kernels import EKDLoss, distributed
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
# the sharded paths the scenarios run: the default chunks (one per rank at these sizes), and chunks
# of a single row each (several chunks per rank: every pass crosses chunk boundaries), and the
# wanted buckets' low key bits histogrammed instead of their values kept (the collapsed path)
SHARDED_PATHS = {"sharded": {}, "sharded_one_row_chunks": dict(CHUNK_PAIRS=1, MIN_CHUNK_ROWS=1),
                 "sharded_in_autocast": {}, "sharded_compiled": {},
                 "sharded_value_histograms": dict(VALUE_BUDGET=0)}
# the loss called inside torch.autocast (bf16), as an AMP training step does: must change nothing
AUTOCAST_PATHS = ("sharded_in_autocast",)
# the loss called from a torch.compile'd step (dynamo only: backend "eager"); the sharded loss
# runs eagerly there, so the results must be bitwise those of the "sharded" path
COMPILED_PATHS = ("sharded_compiled",)


def sharded_over(group):
    """EKDLoss's keyword for a loss sharded over `group`, or none (one process) when `group` is
    None: process_group=None would mean the default group."""
    return {} if group is None else dict(process_group=group)


def rank_sizes(world):
    return {1: [23], 2: [9, 14], 3: [12, 1, 10]}[world]


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


@contextlib.contextmanager
def engine_settings(**settings):
    """Temporarily set module constants of ekd_kernels.distributed (chunk sizes)."""
    old = {name: getattr(distributed, name) for name in settings}
    for name, value in settings.items():
        setattr(distributed, name, value)
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(distributed, name, value)


def run_scenarios(world, rank, path, device=torch.device("cpu")):
    with engine_settings(**SHARDED_PATHS.get(path, {})):
        return _run_scenarios(world, rank, path, device)


def _run_scenarios(world, rank, path, device):
    group = dist.group.WORLD
    sharded = path in SHARDED_PATHS
    results = {}
    for name, options, labels_kind in SCENARIOS:
        crit = EKDLoss(**options, **sharded_over(group if sharded else None)).to(device)
        call = torch.compile(crit, backend="eager") if path in COMPILED_PATHS else crit
        steps = []
        for step in range(STEPS):
            student, teacher, labels = (local_part(x, world, rank).to(device)
                                        for x in global_batch(step, world, labels_kind))
            student = student.clone().requires_grad_(True)
            generator = torch.Generator().manual_seed(step)
            if sharded:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=path in AUTOCAST_PATHS):
                    loss = call(student, teacher, labels, generator=generator)
            else:
                s_all, t_all, l_all, _ = gather_batch(student, teacher, labels, group, loss=crit)
                loss = crit(s_all, t_all, l_all, generator=generator)
            loss.backward()
            steps.append(step_result(crit, loss, student))
        results[name] = steps
    return results


def step_result(crit, loss, student):
    stats = crit.last_stats
    return dict(loss=loss.detach(), grad=student.grad, student_thresholds=crit.student_thresholds.clone(),
                teacher_thresholds=crit.teacher_thresholds.clone(),
                counts={k: getattr(stats, k) for k in ("num_positive_pairs", "num_negative_pairs",
                                                       "num_selected_negatives", "num_critical_selected",
                                                       "num_critical_pairs")})


def embedding_model(device=torch.device("cpu")):
    """The small embedding model of the DDP steps, seeded: the same weights in every process."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8)).to(device)


def ddp_step(world, rank, path, device=torch.device("cpu")):
    """One DDP step of a small embedding model; returns its parameter gradients after averaging."""
    model = embedding_model(device)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    crit = EKDLoss(**sharded_over(dist.group.WORLD if path == "sharded" else None)).to(device)
    grads = []
    for step in range(2):
        inputs, teacher, labels = (local_part(x, world, rank).to(device) for x in global_batch(step, world, "mixed"))
        embeddings = ddp(inputs)
        if path == "sharded":
            loss = crit(embeddings, teacher, labels)
        else:
            loss = crit(*gather_batch(embeddings, teacher, labels)[:3])
        ddp.zero_grad()
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    return grads


@contextlib.contextmanager
def local_process_group(rank, world, port, backend="gloo", timeout_s=60):
    """This process as rank `rank` of a local group of `world` (gloo, or NCCL for CUDA tensors),
    one thread each (the ranks share the machine's cores)."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield
    finally:
        dist.destroy_process_group()


def frames_compiled(world, rank):
    """How many frames torch.compile traces in gather_batch and in the sharded loss (both must run
    eagerly: a clean graph break)."""
    from torch._dynamo.testing import CompileCounter

    student, teacher, labels = (local_part(x, world, rank) for x in global_batch(0, world, "mixed"))
    crit = EKDLoss(process_group=dist.group.WORLD)
    counts = {}
    for name, fn, args in [("gather_batch", gather_batch, (student, teacher, labels)),
                           ("ekd_sharded_checked", distributed.ekd_sharded_checked,
                            (student.clone().requires_grad_(True), teacher, labels, crit.student_thresholds,
                             crit.teacher_thresholds, crit.config))]:
        torch._dynamo.reset()
        counter = CompileCounter()
        # through a wrapper: torch.compile(fn) itself would unwrap a torch.compiler.disable
        torch.compile(lambda *a, fn=fn: fn(*a), backend=counter)(*args)
        counts[name] = counter.frame_count
    return counts


def one_rank_worker(rank, world, port, out_dir, device_type):
    """A group of one process on `device_type`: every sharded path and a DDP step, their tensors
    on that device.  On CUDA the group is NCCL's (one GPU cannot hold two NCCL ranks, and gloo
    has no all_gather of CUDA tensors), so this is how a single GPU runs the sharded engine's
    tensor work and its collectives on CUDA tensors; on the CPU, gloo (the same test's twin)."""
    device = torch.device(device_type, 0) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    with local_process_group(rank, world, port, "nccl" if device.type == "cuda" else "gloo", timeout_s=120):
        out = {path: run_scenarios(world, rank, path, device) for path in SHARDED_PATHS}
        out["ddp"] = ddp_step(world, rank, "sharded", device)
        torch.save(tree_map(lambda x: x.cpu() if isinstance(x, torch.Tensor) else x, out),
                   os.path.join(out_dir, f"rank{rank}.pt"))


def worker(rank, world, port, out_dir):
    with local_process_group(rank, world, port):
        out = {path: run_scenarios(world, rank, path) for path in ("gather", *SHARDED_PATHS)}
        out["frames_compiled"] = frames_compiled(world, rank)
        out["ddp"] = {path: ddp_step(world, rank, path) for path in ("gather", "sharded")}
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


# ----------------------------------------------------------------------------- a batch of many chunks

BIG_BATCH = 2048
#: the chunk budget of the instrumented run: above the engine's fixed-size tensors (two 65537-entry
#: lookup tables), below the chunks that chunk_plan's other limit alone (rows spanning 1/8 of the
#: columns: 86 to 128 rows x 2047 here) would make, and far below a rank's B^2/(2W) pairs (700K
#: and more at W <= 3)
SMALL_CHUNK_PAIRS = 9 << 14
# (name, EKDLoss options, steps) of the big-batch runs
BIG_SCENARIOS = [("default", dict(), 3), ("random", dict(negative_selection="random"), 1),
                 ("critical_ratio", dict(critical_only=True, compute_critical_ratio=True), 1)]
BIG_INSTRUMENTED = [("default", dict(), 2),
                    ("critical_ratio", dict(critical_only=True, compute_critical_ratio=True), 1)]


def big_rank_sizes(world):
    return {2: [1000, 1048], 3: [700, 648, 700]}[world]


def big_global_batch(step):
    """About 2.1M negative pairs (so that FPR 1e-5 and 1e-6 pick distinct order statistics) and
    a few thousand positives; widths differ between student and teacher."""
    g = torch.Generator().manual_seed(7000 + step)
    student = torch.randn(BIG_BATCH, 16, generator=g)
    teacher = torch.randn(BIG_BATCH, 12, generator=g) * 0.5 + student[:, :12]
    labels = torch.randint(0, 400, (BIG_BATCH,), generator=g)
    return student, teacher, labels


def big_local_part(x, world, rank):
    sizes = big_rank_sizes(world)
    start = sum(sizes[:rank])
    return x[start:start + sizes[rank]]


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor (in elements) that any operator produces while active, overall
    (numel, op) and per dtype (by_dtype: dtype -> (numel, op)), and every tensor of more than
    `over` elements (large: (dtype, numel, op), if `over` is given)."""

    def __init__(self, over=None):
        super().__init__()
        self.numel, self.op = 0, None
        self.by_dtype = {}
        self.over, self.large = over, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                if t.numel() > self.numel:
                    self.numel, self.op = t.numel(), f"{func} -> {tuple(t.shape)}"
                if t.numel() > self.by_dtype.get(t.dtype, (0, None))[0]:
                    self.by_dtype[t.dtype] = (t.numel(), f"{func} -> {tuple(t.shape)}")
                if self.over is not None and t.numel() > self.over:
                    self.large.append((t.dtype, t.numel(), f"{func} -> {tuple(t.shape)}"))
        return out


def run_big(world, rank, scenarios, instrumented):
    results = {}
    for name, options, steps in scenarios:
        crit = EKDLoss(**options, process_group=dist.group.WORLD)
        results[name] = []
        for step in range(steps):
            student, teacher, labels = (big_local_part(x, world, rank) for x in big_global_batch(step))
            student = student.clone().requires_grad_(True)
            recorder = LargestTensor() if instrumented else contextlib.nullcontext()
            with recorder:
                loss = crit(student, teacher, labels, generator=torch.Generator().manual_seed(step))
                loss.backward()
            out = step_result(crit, loss, student)
            if instrumented:
                out.update(largest_numel=recorder.numel, largest_op=recorder.op)
            results[name].append(out)
    return results


# ----------------------------------------------------------------------------- a collapsed student

#: a collapsed student (a dead or freshly initialised model): every negative pair's similarity
#: lies in one 16-bit bucket, so that all of a rank's negatives are at or above the bucket of the
#: hardest-N cut; N small and chunks small, so that a rank's pairs (38K to 57K) far exceed both
COLLAPSED_BATCH = 480
COLLAPSED_IDENTITIES = 160
COLLAPSED_CHUNK_PAIRS = 1 << 12
#: pass B's list of a rank's hard candidates is cut back to N hardest once it holds more than 2N
#: (default: N + 4096, never reached here): chunk lists merged, then cut, every 2 chunks
COLLAPSED_CANDIDATE_SLACK = 0
COLLAPSED_STEPS = 2
# eq8 ((b - a)^2): every selected pair carries a gradient (the soft rank saturates at these similarities)
COLLAPSED_OPTIONS = dict(num_hard_negatives=7, rank_loss="eq8")
#: r has squared norm 2^24 - 4094^2 = 16380 in every signed permutation
COLLAPSED_BASE = (1.0, 9.0, 18.0, 42.0, 46.0, 57.0, 66.0, 67.0)
#: far below a rank's values in the collapsed bucket (all its 38K to 57K negatives): the engine
#: histograms their low 16 key bits instead of keeping them
COLLAPSED_VALUE_BUDGET = 1 << 10


def collapsed_rank_sizes(world):
    return {2: [230, 250], 3: [100, 200, 180]}[world]


def collapsed_global_batch(step):
    """Student rows (4094, r), r a random signed permutation of COLLAPSED_BASE: integers of norm
    4096 exactly, so that the normalised rows and every similarity (4094^2 + <r, r'>) / 2^24 are
    exact in fp32 whatever the order of summation (chunked or not, any backend). Distinct rows
    have similarities in [0.998, 1): one 16-bit bucket. The teacher is not collapsed.

    Step 0: distinct rows, labels drawn among COLLAPSED_IDENTITIES. Step 1: each identity is 3
    identical rows, student and teacher (placed at random), so that the negative similarities
    come in tied groups of 9 equivalent pairs and the hardest-N cut falls among ties spread over
    the ranks (which of them are chosen changes the loss in no way, only which copies' rows get
    the gradient)."""
    g = torch.Generator().manual_seed(9000 + step)
    distinct = COLLAPSED_BATCH if step == 0 else COLLAPSED_IDENTITIES
    perms = torch.stack([torch.randperm(len(COLLAPSED_BASE), generator=g) for _ in range(distinct)])
    signs = torch.randint(0, 2, perms.shape, generator=g) * 2 - 1
    student = torch.cat([torch.full((distinct, 1), 4094.0), torch.tensor(COLLAPSED_BASE)[perms] * signs], 1)
    teacher = torch.randn(distinct, 8, generator=g)
    if step == 0:
        return student, teacher, torch.randint(0, COLLAPSED_IDENTITIES, (COLLAPSED_BATCH,), generator=g)
    labels = torch.randperm(COLLAPSED_BATCH, generator=g) % COLLAPSED_IDENTITIES
    return student[labels], teacher[labels], labels


def collapsed_local_part(x, world, rank):
    sizes = collapsed_rank_sizes(world)
    start = sum(sizes[:rank])
    return x[start:start + sizes[rank]]


def run_collapsed(world, rank, **settings):
    """The sharded loss on the collapsed batches (engine constants `settings` changed), its pass B
    (gather_candidates), the rest of the threshold selection (select_targets) and select_hardest
    each under a LargestTensor recorder: per step, the step's results, the largest tensor pass B
    produced per dtype, the number of hard candidates it returned, whether it histogrammed the low
    key bits, the tensors of more than COLLAPSED_CHUNK_PAIRS elements that pass B and
    select_targets produced (refine_large), the largest tensor select_hardest produced and the
    pairs (i, j) it selected, in its order."""
    records = []
    gather_candidates, select_hardest = distributed.gather_candidates, distributed.select_hardest
    select_targets = distributed.select_targets

    def gather_recorded(*args, **kwargs):
        recorder = LargestTensor(over=COLLAPSED_CHUNK_PAIRS)
        with recorder:
            out = gather_candidates(*args, **kwargs)
        records.append(dict(pass_b=recorder.by_dtype, hard_candidates=out.hard_i.numel(),
                            low_bits=out.low_bits is not None, refine_large=recorder.large))
        return out

    def targets_recorded(*args, **kwargs):
        recorder = LargestTensor(over=COLLAPSED_CHUNK_PAIRS)
        with recorder:
            out = select_targets(*args, **kwargs)
        records[-1]["refine_large"] += recorder.large
        return out

    def select_recorded(candidates, *args, **kwargs):
        recorder = LargestTensor()
        with recorder:
            chosen = select_hardest(candidates, *args, **kwargs)
        records[-1].update(select_numel=recorder.numel, select_op=recorder.op,
                           selected=torch.stack([candidates.hard_i[chosen], candidates.hard_j[chosen]], 1))
        return chosen

    crit = EKDLoss(**COLLAPSED_OPTIONS, process_group=dist.group.WORLD)
    results = []
    with engine_settings(CHUNK_PAIRS=COLLAPSED_CHUNK_PAIRS, CANDIDATE_SLACK=COLLAPSED_CANDIDATE_SLACK,
                         gather_candidates=gather_recorded, select_hardest=select_recorded,
                         select_targets=targets_recorded, **settings):
        for step in range(COLLAPSED_STEPS):
            student, teacher, labels = (collapsed_local_part(x, world, rank) for x in collapsed_global_batch(step))
            student = student.clone().requires_grad_(True)
            loss = crit(student, teacher, labels, generator=torch.Generator().manual_seed(step))
            loss.backward()
            results.append(dict(step_result(crit, loss, student), **records[-1]))
    return results


def big_worker(rank, world, port, out_dir):
    with local_process_group(rank, world, port):
        out = {"default_chunks": run_big(world, rank, BIG_SCENARIOS, instrumented=False)}
        with engine_settings(CHUNK_PAIRS=SMALL_CHUNK_PAIRS):
            out["small_chunks"] = run_big(world, rank, BIG_INSTRUMENTED, instrumented=True)
        out["collapsed"] = run_collapsed(world, rank)
        out["collapsed_histograms"] = run_collapsed(world, rank, VALUE_BUDGET=COLLAPSED_VALUE_BUDGET)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


# ----------------------------------------------------------------------------- ranks that disagree

#: the process group's timeout in the agreement run: a case that hangs (ranks left waiting in
#: different collectives) fails within this, not the default 60 s or 30 min
AGREEMENT_TIMEOUT_S = 20


def agreement_batch(world, rank, step=0):
    """This rank's part of the small global batch of the agreement cases (rank_sizes)."""
    return [local_part(x, world, rank) for x in global_batch(step, world, "mixed")]


def sharded_call(rank, world, options=None, change=None, crit_hook=None, generator=None, step=0):
    """One sharded EKDLoss step on this rank's part; change(rank, student, teacher, labels) may
    alter the part, crit_hook(rank, crit) the module. Returns the step's results."""
    student, teacher, labels = agreement_batch(world, rank, step)
    student = student.clone().requires_grad_(True)
    if change is not None:
        student, teacher, labels = change(rank, student, teacher, labels)
    crit = EKDLoss(**(options(rank) if options else {}), process_group=dist.group.WORLD)
    if crit_hook is not None:
        crit_hook(rank, crit)
    loss = crit(student, teacher, labels, generator=generator(rank) if generator else None)
    if loss.requires_grad:
        loss.backward()
    return step_result(crit, loss, student)


def on_rank(which, value, default=None):
    """options(rank): `value` on rank `which`, `default` (or nothing) on the others."""
    return lambda rank: value if rank == which else (default or {})


def seeded(rank):
    return torch.Generator().manual_seed(0)


def _ulp_up(rank, crit):
    if rank == 1:
        crit.student_thresholds[3] = torch.nextafter(crit.student_thresholds[3], torch.tensor(1.0))


def _threshold_state(rank, crit):
    if rank == 1:
        crit.student_thresholds.fill_(0.3)
        crit.teacher_thresholds.fill_(0.3)


def _gather_call(rank, world, change):
    student, teacher, labels = agreement_batch(world, rank)
    student = student.clone().requires_grad_(True)
    student, teacher, labels = change(rank, student, teacher, labels)
    s_all, t_all, l_all, sizes = gather_batch(student, teacher, labels)
    return dict(student=s_all.detach(), teacher=t_all, labels=l_all, sizes=sizes)


def _gather_loss_call(rank, world, options=None, crit_hook=None, given=lambda rank: True, wrap=lambda crit: crit):
    """gather_batch with loss= (the EKDLoss built from options(rank), altered by crit_hook, and
    given, as wrap(crit), on the ranks where given(rank)), then the loss of the gathered batch."""
    student, teacher, labels = agreement_batch(world, rank)
    student = student.clone().requires_grad_(True)
    crit = EKDLoss(**(options(rank) if options else {}))
    if crit_hook is not None:
        crit_hook(rank, crit)
    s_all, t_all, l_all, _ = gather_batch(student, teacher, labels, loss=wrap(crit) if given(rank) else None)
    return _step(crit, s_all, t_all, l_all, student)


def _sharded_function_call(rank, world, update_thresholds):
    """distributed.ekd_sharded on this rank's part, with the given update_thresholds."""
    from ekd_kernels import EKDConfig
    student, teacher, labels = agreement_batch(world, rank)
    zeros = torch.zeros(len(EKDConfig().fprs))
    result = distributed.ekd_sharded(student, teacher, labels, zeros, zeros.clone(), EKDConfig(),
                                     update_thresholds=update_thresholds)
    return result.loss


def _wider(student):
    """Two more columns."""
    return torch.cat([student, student[:, :2]], 1)


def _non_finite_call(rank, world):
    """A sharded step (critical ratio on) whose rank-1 part holds a NaN: what a logger and a
    gradient scaler would read on this rank."""
    student, teacher, labels = agreement_batch(world, rank)
    student = student.clone().requires_grad_(True)
    if rank == 1:
        student.data[2, 3] = float("nan")
    crit = EKDLoss(compute_critical_ratio=True, process_group=dist.group.WORLD)
    loss = crit(student, teacher, labels)
    loss.backward()
    stats = crit.last_stats
    return dict(loss=loss.detach(), grad_all_nan=bool(torch.isnan(student.grad).all()),
                student_thresholds=crit.student_thresholds.clone(), teacher_thresholds=crit.teacher_thresholds.clone(),
                **{name: getattr(stats, name) for name in ("positive_term", "negative_term", "batch_student_thresholds",
                                                           "batch_teacher_thresholds", "critical_ratio")})


def _non_finite_outside_pairs_call(rank, world):
    """A sharded step whose global batch has a NaN teacher row taking part in no distilled pair
    (no positive partner, far from every row: none of its pairs is the one hardest negative), on
    rank 0: every pair's terms stay finite, so only the NaN gradient the loss gives throughout
    tells a gradient scaler to skip the step, on every rank."""
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(4 * world, 4, generator=generator, dtype=torch.float64).float()
    student[0] = -student[1:].sum(0)
    teacher = torch.randn(4 * world, 4, generator=generator, dtype=torch.float64).float()
    teacher[0, 0] = float("nan")
    labels = torch.cat([torch.tensor([0]), torch.arange(1, 4 * world) // 2 + 1])  # row 0 alone, pairs after
    rows = slice(4 * rank, 4 * rank + 4)
    part = student[rows].clone().requires_grad_(True)
    crit = EKDLoss(num_hard_negatives=1, process_group=dist.group.WORLD)
    loss = crit(part, teacher[rows], labels[rows])
    loss.backward()
    return dict(loss=loss.detach(), grad_all_nan=bool(torch.isnan(part.grad).all()))


def _bf16_gradient_call(rank, world):
    """The sharded loss's gradient of bf16 embeddings (this rank's part of a bf16 global batch)."""
    student, teacher, labels = (x.bfloat16() if x.is_floating_point() else x
                                for x in agreement_batch(world, rank))
    student = student.clone().requires_grad_(True)
    EKDLoss(process_group=dist.group.WORLD)(student, teacher, labels).backward()
    return dict(grad=student.grad)


def _to_meta(*tensors):
    return tuple(x.detach().to("meta").requires_grad_(x.requires_grad) for x in tensors)


def _on1(fn):
    """change(rank, s, t, l) applying fn(s, t, l) on rank 1 only."""
    return lambda rank, s, t, l: fn(s, t, l) if rank == 1 else (s, t, l)


#: (name, call(rank, world)) of the agreement run, every rank in this order. Cases whose name
#: starts with "ok_" must succeed (and match single-process EKD on the global batch); the others
#: must raise a ValueError on every rank (test_distributed.AGREEMENT_EXPECTED says which)
AGREEMENT_CASES = [
    ("student_width", lambda r, w: sharded_call(r, w, change=_on1(lambda s, t, l: (_wider(s), t, l)))),
    ("teacher_width", lambda r, w: sharded_call(r, w, change=_on1(lambda s, t, l: (s, t[:, :8], l)))),
    ("student_dtype", lambda r, w: sharded_call(r, w, change=_on1(lambda s, t, l: (s.bfloat16(), t, l)))),
    ("teacher_dtype", lambda r, w: sharded_call(
        r, w, change=lambda rank, s, t, l: (s, t.half() if rank == 0 else t, l))),
    ("momentum", lambda r, w: sharded_call(r, w, options=on_rank(1, dict(momentum=0.5)))),
    ("temperature", lambda r, w: sharded_call(r, w, options=on_rank(1, dict(temperature=0.05)))),
    ("critical_only", lambda r, w: sharded_call(r, w, options=on_rank(1, dict(critical_only=True)))),
    # one rank making pass C's extra collectives: a hang until the timeout without the check
    ("compute_critical_ratio", lambda r, w: sharded_call(r, w, options=on_rank(1, dict(compute_critical_ratio=True)))),
    ("rank_loss", lambda r, w: sharded_call(r, w, options=on_rank(1, dict(rank_loss="eq8")))),
    ("positive_weight", lambda r, w: sharded_call(r, w, options=on_rank(1, dict(positive_weight=1.0)))),
    ("num_hard_negatives", lambda r, w: sharded_call(r, w, options=on_rank(1, dict(num_hard_negatives=5)))),
    ("negative_selection", lambda r, w: sharded_call(r, w, options=on_rank(1, dict(negative_selection="random")),
                                                     generator=seeded)),
    ("fprs_length", lambda r, w: sharded_call(r, w, options=on_rank(1, dict(fprs=(0.1, 0.01))))),
    ("fprs_values", lambda r, w: sharded_call(r, w, options=on_rank(1, dict(fprs=(0.2, 0.02, 2e-3, 2e-4, 2e-5,
                                                                                  2e-6))))),
    ("eval_on_one_rank", lambda r, w: sharded_call(r, w, crit_hook=lambda rank, crit: crit.train(rank != 1))),
    ("threshold_state", lambda r, w: sharded_call(r, w, crit_hook=_threshold_state)),
    ("threshold_one_ulp", lambda r, w: sharded_call(r, w, crit_hook=_ulp_up)),
    ("generator_on_one_rank", lambda r, w: sharded_call(
        r, w, options=lambda rank: dict(negative_selection="random", num_hard_negatives=9),
        generator=lambda rank: torch.Generator().manual_seed(0) if rank == 0 else None)),
    ("gradient_on_one_rank", lambda r, w: sharded_call(r, w, change=_on1(lambda s, t, l: (s.detach(), t, l)))),
    # an empty part still has its widths: a 0 x 1 part beside 12 and 10 columns is refused
    ("empty_part_width", lambda r, w: sharded_call(
        r, w, change=_on1(lambda s, t, l: (s[:0, :1], t[:0, :1], l[:0])))),
    # A4: every rank draws its own negatives from its generator; different seeds, different draws
    ("random_seeds", lambda r, w: sharded_call(r, w, options=lambda rank: dict(negative_selection="random",
                                                                               num_hard_negatives=9),
                                               generator=lambda rank: torch.Generator().manual_seed(100 * rank))),
    # one rank's input refused by its own checks: it raises that error, the others say so
    ("labels_refused", lambda r, w: sharded_call(r, w, change=_on1(lambda s, t, l: (s, t, l.view(-1, 1))))),
    ("rows_refused", lambda r, w: sharded_call(r, w, change=_on1(lambda s, t, l: (s, t[:-1], l)))),
    ("fp64_refused", lambda r, w: sharded_call(r, w, change=_on1(lambda s, t, l: (s.double(), t, l)))),
    ("thresholds_refused", lambda r, w: sharded_call(
        r, w, crit_hook=lambda rank, crit: setattr(crit, "student_thresholds", crit.student_thresholds.half())
        if rank == 1 else None)),
    # B2: labels of any integer dtype (int16 is not a gloo type), also different per rank
    ("ok_labels_int16", lambda r, w: sharded_call(r, w, change=lambda rank, s, t, l: (s, t, l.to(torch.int16)))),
    ("ok_labels_mixed_dtypes", lambda r, w: sharded_call(r, w, change=_on1(lambda s, t, l: (s, t, l.int())))),
    # the same seed everywhere: the check of the draws lets it through
    ("ok_random_same_seed", lambda r, w: sharded_call(r, w, options=lambda rank: dict(negative_selection="random",
                                                                                      num_hard_negatives=9),
                                                      generator=seeded)),
    # gather_batch: the same exchange (shapes, dtypes, gradient), labels gathered as int64
    ("gather_width", lambda r, w: _gather_call(r, w, _on1(lambda s, t, l: (_wider(s), t, l)))),
    ("gather_gradient_on_one_rank", lambda r, w: _gather_call(r, w, _on1(lambda s, t, l: (s.detach(), t, l)))),
    ("gather_rows_refused", lambda r, w: _gather_call(r, w, _on1(lambda s, t, l: (s, t, l[:-1])))),
    # shapes the elements-per-row exchange could not tell apart, and labels the int64 cast would
    # turn into other identities: refused by the rank's own checks, every rank raises
    ("gather_labels_2d_refused", lambda r, w: _gather_call(r, w, _on1(lambda s, t, l: (s, t, l.view(-1, 1))))),
    ("gather_student_3d_refused", lambda r, w: _gather_call(
        r, w, _on1(lambda s, t, l: (s.view(s.shape[0], 2, -1), t, l)))),
    ("gather_float_labels_refused", lambda r, w: _gather_call(r, w, lambda rank, s, t, l: (s, t, l.float() + 0.2))),
    ("gather_bool_labels_refused", lambda r, w: _gather_call(r, w, _on1(lambda s, t, l: (s, t, l > 2)))),
    ("ok_gather_labels_int16", lambda r, w: _gather_call(r, w, lambda rank, s, t, l: (s, t, l.to(torch.int16)))),
    # gather_batch(loss=crit): the loss's options, mode and state join the exchange
    ("gather_loss_num_hard_negatives", lambda r, w: _gather_loss_call(
        r, w, options=on_rank(1, dict(num_hard_negatives=5)))),
    ("gather_loss_fprs", lambda r, w: _gather_loss_call(r, w, options=on_rank(1, dict(fprs=(0.2, 0.02))))),
    ("gather_loss_eval_on_one_rank", lambda r, w: _gather_loss_call(
        r, w, crit_hook=lambda rank, crit: crit.train(rank != 1))),
    ("gather_loss_threshold_one_ulp", lambda r, w: _gather_loss_call(r, w, crit_hook=_ulp_up)),
    ("gather_loss_on_one_rank", lambda r, w: _gather_loss_call(
        r, w, options=on_rank(1, dict(momentum=0.5)), given=lambda rank: rank == 0)),
    ("gather_loss_sharded_refused", lambda r, w: _gather_loss_call(
        r, w, crit_hook=lambda rank, crit: setattr(crit, "process_group", None) if rank == 1 else None)),
    ("ok_gather_with_loss", lambda r, w: _gather_loss_call(r, w)),
    # (torch.compile(crit), the module a compiled step calls: compared as the EKDLoss it wraps)
    ("ok_gather_with_compiled_loss", lambda r, w: _gather_loss_call(r, w, wrap=torch.compile)),
    # random selection: every rank draws from its own loss's generator (seeded apart: other
    # negatives, another loss per rank, silently; on one rank only: one rank raised alone and the
    # other died in the backward's collective)
    ("gather_loss_generator_seeds", lambda r, w: _gather_loss_call(r, w, options=lambda rank: dict(
        negative_selection="random", num_hard_negatives=9, generator=torch.Generator().manual_seed(rank)))),
    ("gather_loss_generator_on_one_rank", lambda r, w: _gather_loss_call(r, w, options=lambda rank: dict(
        negative_selection="random", num_hard_negatives=9,
        generator=torch.Generator().manual_seed(0) if rank == 0 else None))),
    ("ok_gather_loss_random_same_seed", lambda r, w: _gather_loss_call(r, w, options=lambda rank: dict(
        negative_selection="random", num_hard_negatives=9, generator=torch.Generator().manual_seed(0)))),
    # random selection without a generator is refused as the single-process backends refuse it,
    # also when the global batch has no negative to draw (one identity)
    ("random_without_generator_no_negatives", lambda r, w: sharded_call(
        r, w, options=lambda rank: dict(negative_selection="random", num_hard_negatives=9),
        change=lambda rank, s, t, l: (s, t, torch.zeros_like(l)))),
    # the public ekd_sharded with a non-bool update_thresholds on one rank: refused, by name
    ("update_thresholds_refused", lambda r, w: _sharded_function_call(r, w, "False" if r == 1 else True)),
    # one rank on the sharded loss, the other on gather_batch (with the loss, or without): their
    # exchanges had different lengths, a gloo abort
    ("mixed_entry_points", lambda r, w: sharded_call(r, w) if r == 0 else _gather_loss_call(r, w)),
    ("mixed_entry_points_no_loss", lambda r, w: _gather_call(r, w, _on1(lambda s, t, l: (s, t, l)))
     if r == 1 else sharded_call(r, w)),
    # meta tensors on one rank: refused, and that rank still takes part in the exchange (on meta
    # it did nothing, and the ranks fell out of step)
    ("meta_refused", lambda r, w: sharded_call(r, w, change=_on1(_to_meta),
                                               crit_hook=lambda rank, crit: crit.to("meta") if rank == 1 else None)),
    ("gather_meta_refused", lambda r, w: _gather_call(r, w, _on1(_to_meta))),
    # a NaN in one rank's part: NaN loss and statistics on every rank, the state untouched
    ("ok_non_finite_on_rank_1", _non_finite_call),
    ("ok_non_finite_outside_pairs", _non_finite_outside_pairs_call),
    ("ok_bf16_gradient", _bf16_gradient_call),
    # after all the refusals, the ranks are still in step: a plain call gives the global loss
    ("ok_after_refusals", lambda r, w: sharded_call(r, w)),
]


def outcome(call):
    try:
        return dict(ok=True, value=call())
    except Exception as error:  # noqa: BLE001 - recorded for the test to judge
        return dict(ok=False, type=type(error).__name__, message=str(error))


def agreement_worker(rank, world, port, out_dir):
    # built before init_process_group, as a model and its loss often are: dist.group.WORLD is None
    # then, and so is process_group=None; both mean the default group, resolved at each call
    early = {"world_before_init": EKDLoss(process_group=dist.group.WORLD), "none": EKDLoss(process_group=None)}
    with local_process_group(rank, world, port, timeout_s=AGREEMENT_TIMEOUT_S):
        out = {}
        for name, crit in early.items():
            student, teacher, labels = agreement_batch(world, rank)
            student = student.clone().requires_grad_(True)
            out[name] = outcome(lambda: _step(crit, student, teacher, labels))
        out["cases"] = {name: outcome(lambda: call(rank, world)) for name, call in AGREEMENT_CASES}
        out["copies"] = outcome(lambda: _copies(rank, world))
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


def _step(crit, student, teacher, labels, leaf=None):
    """One call and its backward; the result's gradient is that of `leaf` (default: student)."""
    loss = crit(student, teacher, labels)
    loss.backward()
    return step_result(crit, loss, student if leaf is None else leaf)


def _copies(rank, world):
    """A sharded EKDLoss after one step, deep-copied and pickled (torch.save of the module):
    each copy's next step against the original's; and a new_group loss (deep copy: the same
    group; pickling refused)."""
    crit = EKDLoss(process_group=dist.group.WORLD)
    student, teacher, labels = agreement_batch(world, rank)
    _step(crit, student.clone().requires_grad_(True), teacher, labels)
    buffer = io.BytesIO()
    torch.save(crit, buffer)
    buffer.seek(0)
    copies = {"original": crit, "deepcopy": copy.deepcopy(crit), "pickled": torch.load(buffer, weights_only=False)}
    student, teacher, labels = agreement_batch(world, rank, step=1)
    steps = {name: _step(module, student.clone().requires_grad_(True), teacher, labels)
             for name, module in copies.items()}
    subgroup = dist.new_group(list(range(world)))
    sub = EKDLoss(process_group=subgroup)
    try:
        pickle.dumps(sub)
        refused = None
    except TypeError as error:
        refused = str(error)
    return dict(steps=steps, deepcopy_shares_group=copies["deepcopy"].process_group is crit.process_group,
                pickled_group=copies["pickled"].process_group, refused=refused,
                subgroup_deepcopy_shares_group=copy.deepcopy(sub).process_group is subgroup,
                subgroup_copy_shares_group=copy.copy(sub).process_group is subgroup)
