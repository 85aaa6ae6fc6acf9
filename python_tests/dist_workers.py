"""Worker processes of test_distributed.py (spawned; each is one rank of a gloo group)."""

import contextlib
import datetime
import os

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

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


def run_scenarios(world, rank, path):
    with engine_settings(**SHARDED_PATHS.get(path, {})):
        return _run_scenarios(world, rank, path)


def _run_scenarios(world, rank, path):
    group = dist.group.WORLD
    sharded = path in SHARDED_PATHS
    results = {}
    for name, options, labels_kind in SCENARIOS:
        crit = EKDLoss(**options, process_group=group if sharded else None)
        call = torch.compile(crit, backend="eager") if path in COMPILED_PATHS else crit
        steps = []
        for step in range(STEPS):
            student, teacher, labels = (local_part(x, world, rank) for x in global_batch(step, world, labels_kind))
            student = student.clone().requires_grad_(True)
            generator = torch.Generator().manual_seed(step)
            if sharded:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=path in AUTOCAST_PATHS):
                    loss = call(student, teacher, labels, generator=generator)
            else:
                s_all, t_all, l_all, _ = gather_batch(student, teacher, labels, group)
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


@contextlib.contextmanager
def gloo_process_group(rank, world, port):
    """This process as rank `rank` of a local gloo group of `world`, one thread each (the ranks
    share the machine's cores)."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
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


def worker(rank, world, port, out_dir):
    with gloo_process_group(rank, world, port):
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
    with gloo_process_group(rank, world, port):
        out = {"default_chunks": run_big(world, rank, BIG_SCENARIOS, instrumented=False)}
        with engine_settings(CHUNK_PAIRS=SMALL_CHUNK_PAIRS):
            out["small_chunks"] = run_big(world, rank, BIG_INSTRUMENTED, instrumented=True)
        out["collapsed"] = run_collapsed(world, rank)
        out["collapsed_histograms"] = run_collapsed(world, rank, VALUE_BUDGET=COLLAPSED_VALUE_BUDGET)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
