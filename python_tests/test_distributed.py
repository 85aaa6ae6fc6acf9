"""EKD over 2 and 3 gloo processes equals single-process EKD on the concatenated batch.

Both paths (gather_batch + EKDLoss, and the sharded EKDLoss(process_group=...), with its default
chunks and with one-row chunks), uneven per-rank batch sizes (one rank holds a single row at
W = 3), several steps of EMA state, paper variants, batches without positives, and a DDP step
whose averaged parameter gradients must equal single-process training on the concatenated batch.
A global batch of 2048 rows (2.1M negatives, several chunks per rank) is held against the
reference backend, once with a small chunk budget under a recorder of every tensor the sharded
step produces: none may exceed the chunk budget (the rank's pairs are never materialised). A
collapsed student (every negative similarity in one bucket, the hardest-N cut among ties) must
give the single-process result while pass B keeps O(N) hard candidates, and, with a small
VALUE_BUDGET, while the wanted buckets' values are histogrammed by their low 16 key bits instead
of kept (every scenario also runs through that path).  A group of one process runs the sharded
paths and a DDP step with CUDA tensors over NCCL where a GPU is present (one GPU holds one NCCL
rank; gloo has no all_gather of CUDA tensors), and with CPU tensors over gloo here.
"""

import functools
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ekd_kernels import EKDLoss
from ekd_kernels import distributed
from ekd_kernels.distributed import (balanced_rows, bucket16, chunk_plan, hardest_positions, key_values,
                                     negative_pairs_at, negatives_before_row, order_keys, positive_pairs)

import dist_workers
from helpers import THRESHOLD_ATOL, assert_grad_close, assert_loss_close

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

TIMEOUT_S = 240


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(worker, world, out_dir, *args):
    ctx = mp.start_processes(worker, args=(world, free_port(), str(out_dir), *args), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world} gloo workers did not finish in {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module", params=[2, 3])
def world_results(request, tmp_path_factory):
    world = request.param
    return world, run_workers(dist_workers.worker, world, tmp_path_factory.mktemp(f"world{world}"))


@pytest.fixture(scope="module", params=[2, 3])
def big_results(request, tmp_path_factory):
    world = request.param
    return world, run_workers(dist_workers.big_worker, world, tmp_path_factory.mktemp(f"big{world}"))


def single_process_steps(crit, batches):
    """`crit` on each global batch in turn (EMA state carried), step `s` drawing from a generator
    seeded s, as the workers do: what every rank's results must equal."""
    steps = []
    for step, (student, teacher, labels) in enumerate(batches):
        student.requires_grad_(True)
        loss = crit(student, teacher, labels, generator=torch.Generator().manual_seed(step))
        loss.backward()
        steps.append(dict(loss=loss.detach(), grad=student.grad, student_thresholds=crit.student_thresholds.clone(),
                          teacher_thresholds=crit.teacher_thresholds.clone(), stats=crit.last_stats))
    return steps


def single_process(name, options, labels_kind, world):
    return single_process_steps(EKDLoss(**options), (dist_workers.global_batch(step, world, labels_kind)
                                                     for step in range(dist_workers.STEPS)))


def assert_step_matches(got, ref, world, local_grad, where):
    assert_loss_close(got["loss"], ref["loss"])
    # convention: W times the single-process gradient of the rank's own rows (local_grad None: unchecked)
    if local_grad is not None:
        assert_grad_close(got["grad"], world * local_grad)
    for key in ("student_thresholds", "teacher_thresholds"):
        torch.testing.assert_close(got[key], ref[key], rtol=0, atol=THRESHOLD_ATOL, msg=where)
    for key, value in got["counts"].items():
        expected = getattr(ref["stats"], key)
        assert (value is None) == (expected is None), f"{where}: {key}"
        if value is not None:
            assert value.item() == expected.item(), f"{where}: {key} {value.item()} vs {expected.item()}"


@pytest.mark.parametrize("path", ["gather", *dist_workers.SHARDED_PATHS])
@pytest.mark.parametrize("scenario", dist_workers.SCENARIOS, ids=[s[0] for s in dist_workers.SCENARIOS])
def test_matches_single_process(world_results, path, scenario):
    world, per_rank = world_results
    name, options, labels_kind = scenario
    want = single_process(name, options, labels_kind, world)
    for rank, results in enumerate(per_rank):
        for step, (got, ref) in enumerate(zip(results[path][name], want)):
            assert_step_matches(got, ref, world, dist_workers.local_part(ref["grad"], world, rank),
                                f"{path}/{name} rank {rank} step {step}")
    if name == "no_positives_at_all":
        assert want[0]["stats"].positive_term.item() == 0.0


@pytest.mark.parametrize("path", dist_workers.COMPILED_PATHS)
def test_compiled_step_runs_the_eager_sharded_loss(world_results, path):
    """Called from a torch.compile'd step, the sharded loss is the eager one, bitwise: it reads
    counts on the host, so it and gather_batch opt out of tracing (no frame is compiled in them)."""
    _, per_rank = world_results
    for rank, results in enumerate(per_rank):
        assert results["frames_compiled"] == {"gather_batch": 0, "ekd_sharded_checked": 0}
        for name, *_ in dist_workers.SCENARIOS:
            for got, want in zip(results[path][name], results["sharded"][name]):
                for key in ("loss", "grad", "student_thresholds", "teacher_thresholds"):
                    assert torch.equal(got[key], want[key]), f"{path}/{name} rank {rank}: {key}"


@pytest.mark.parametrize("path", ["gather", *dist_workers.SHARDED_PATHS])
def test_loss_and_thresholds_identical_on_every_rank(world_results, path):
    """Bit for bit, every scenario and step: a logger or an early-stopping rule on any rank sees
    the same loss (the sharded value once read share + (total - share), which rounds by rank)."""
    _, per_rank = world_results
    for name, *_ in dist_workers.SCENARIOS:
        for step, first in enumerate(per_rank[0][path][name]):
            for rank, results in enumerate(per_rank[1:], 1):
                for key in ("loss", "student_thresholds", "teacher_thresholds"):
                    got = results[path][name][step][key]
                    assert torch.equal(got, first[key]), f"{path}/{name} step {step} rank {rank}: {key}"


@pytest.mark.parametrize("path", ["gather", "sharded"])
def test_ddp_parameter_gradients_equal_single_process(world_results, path):
    world, per_rank = world_results
    model = dist_workers.embedding_model()
    crit = EKDLoss()
    for step in range(2):
        inputs, teacher, labels = dist_workers.global_batch(step, world, "mixed")
        model.zero_grad()
        crit(model(inputs), teacher, labels).backward()
        for rank in range(world):
            for got, want in zip(per_rank[rank]["ddp"][path][step], model.parameters()):
                assert_grad_close(got, want.grad)


def _nccl_reason():
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not dist.is_nccl_available():
        return "torch.distributed without NCCL"
    return None


@pytest.mark.parametrize("device_type", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(_nccl_reason() is not None, reason=f"{_nccl_reason()}"))])
def test_one_rank_group_matches_single_process(device_type, tmp_path):
    """A group of one process (NCCL on CUDA, gloo on the CPU), every sharded path and a DDP step
    with their tensors on `device_type`, against the single-process loss on the same device (its
    default backend there): the sharded engine's tensor work and collectives on CUDA tensors,
    which the gloo groups above (CPU only) never run.  The CPU case is this test's twin."""
    device = torch.device(device_type)
    (results,) = run_workers(dist_workers.one_rank_worker, 1, tmp_path, device_type)
    for name, options, labels_kind in dist_workers.SCENARIOS:
        batches = [tuple(x.to(device) for x in dist_workers.global_batch(step, 1, labels_kind))
                   for step in range(dist_workers.STEPS)]
        want = single_process_steps(EKDLoss(**options).to(device), batches)
        want = [{**step, "grad": step["grad"].cpu()} for step in want]
        for path in dist_workers.SHARDED_PATHS:
            for step, (got, ref) in enumerate(zip(results[path][name], want)):
                got = {**got, "loss": got["loss"].to(device), "student_thresholds": got["student_thresholds"].to(device),
                       "teacher_thresholds": got["teacher_thresholds"].to(device)}
                assert_step_matches(got, ref, 1, ref["grad"], f"{device_type} {path}/{name} step {step}")
    model, crit = dist_workers.embedding_model(device), EKDLoss().to(device)
    for step in range(2):
        inputs, teacher, labels = (x.to(device) for x in dist_workers.global_batch(step, 1, "mixed"))
        model.zero_grad()
        crit(model(inputs), teacher, labels).backward()
        for got, want in zip(results["ddp"][step], model.parameters()):
            assert_grad_close(got, want.grad.cpu())


# ----------------------------------------------------------------------------- a batch of many chunks


@functools.lru_cache(maxsize=None)
def big_reference(name):
    """Single-process EKDLoss(backend="reference") on the big global batches (the same for every
    W), for the most steps any run of scenario `name` takes."""
    runs = [(options, steps) for n, options, steps in dist_workers.BIG_SCENARIOS + dist_workers.BIG_INSTRUMENTED
            if n == name]
    options, steps = runs[0][0], max(steps for _, steps in runs)
    assert all(o == options for o, _ in runs)
    return single_process_steps(EKDLoss(**options, backend="reference"),
                                (dist_workers.big_global_batch(step) for step in range(steps)))


def check_big_run(world, per_rank, run, scenarios):
    for name, _, steps in scenarios:
        want = big_reference(name)[:steps]
        for rank, results in enumerate(per_rank):
            for step, (got, ref) in enumerate(zip(results[run][name], want)):
                assert_step_matches(got, ref, world, dist_workers.big_local_part(ref["grad"], world, rank),
                                    f"{run}/{name} rank {rank} step {step}")
            assert len(results[run][name]) == steps


def test_big_batch_many_chunks_matches_reference(big_results):
    world, per_rank = big_results
    batch = dist_workers.BIG_BATCH
    _, labels = dist_workers.big_global_batch(0)[1:]
    _, num_negatives = negatives_before_row(labels)
    assert num_negatives > 10**5  # FPR 1e-5 and 1e-6 are distinct order statistics
    for rank in range(world):
        plan = chunk_plan(balanced_rows(batch, world, rank).tolist(), batch, distributed.CHUNK_PAIRS)
        assert len(plan) > 1, plan
    check_big_run(world, per_rank, "default_chunks", dist_workers.BIG_SCENARIOS)


def test_sharded_memory_is_bounded_by_the_chunk_budget(big_results):
    """With a chunk budget far below a rank's pairs, no tensor of the sharded forward and backward
    (recorded operator by operator) holds more elements than the budget, and the result is still
    the reference's."""
    world, per_rank = big_results
    batch, budget = dist_workers.BIG_BATCH, dist_workers.SMALL_CHUNK_PAIRS
    rank_pairs = [int((batch - 1 - balanced_rows(batch, world, r)).sum()) for r in range(world)]
    assert min(rank_pairs) > 3 * budget, rank_pairs
    for rank, results in enumerate(per_rank):
        for name, steps in results["small_chunks"].items():
            for step, got in enumerate(steps):
                assert got["largest_numel"] <= budget, (
                    f"rank {rank} {name} step {step}: {got['largest_op']} holds {got['largest_numel']} elements "
                    f"> the chunk budget {budget} (this rank has {rank_pairs[rank]} pairs)")
                assert got["largest_numel"] >= budget // 2  # the recorder saw the chunks
    check_big_run(world, per_rank, "small_chunks", dist_workers.BIG_INSTRUMENTED)


def sharded_hardest_allotment(student, labels, world, num_hard):
    """Per rank, the pairs (i, j) the sharded engine selects (``select_hardest``'s own rule; SPEC
    leaves ties unspecified): every negative above the N-th largest student similarity, then of
    the ties at it the first N - (number above) in rank order (a pair is its row i's rank's),
    each rank's ties in row-major order; a rank lists its pairs above the cut, then its ties.
    Exact for the collapsed batches, whose similarities are integers / 2^24. Also returns the
    number of ranks holding ties at the cut and the number of those ties."""
    batch = labels.shape[0]
    dots = (student.double() @ student.double().t()).long()
    owner = [0] * batch
    for r in range(world):
        for row in balanced_rows(batch, world, r).tolist():
            owner[row] = r
    i, j = torch.triu_indices(batch, batch, 1)
    negative = labels[i] != labels[j]
    pairs = list(zip(i[negative].tolist(), j[negative].tolist(), dots[i, j][negative].tolist()))  # row-major
    cut = sorted((d for _, _, d in pairs), reverse=True)[num_hard - 1]
    above = [(a, b) for a, b, d in pairs if d > cut]
    ties = sorted(((a, b) for a, b, d in pairs if d == cut), key=lambda p: owner[p[0]])  # stable
    taken = set(ties[:num_hard - len(above)])
    selected = [[p for p in above if owner[p[0]] == r] + [p for p in ties if owner[p[0]] == r and p in taken]
                for r in range(world)]
    return selected, len({owner[a] for a, _ in ties}), len(ties)


def test_collapsed_student_keeps_o_n_hard_candidates(big_results):
    """A collapsed student (every negative similarity in one 16-bit bucket): the result is still the
    single-process one, the pairs selected are those of the sharded engine's tie rule (step 1: the
    hardest-N cut among equivalent ties spread over the ranks), and pass B keeps the rank's N
    hardest pairs only. Its int64 tensors (positions and (i, j) pairs; the wanted buckets'
    values, float32, do number all the rank's pairs here) stay within one chunk, and
    select_hardest works on N candidates, where keeping every pair at or above the cut's bucket
    made tensors of all the rank's negatives."""
    world, per_rank = big_results
    batch, budget = dist_workers.COLLAPSED_BATCH, dist_workers.COLLAPSED_CHUNK_PAIRS
    num_hard = dist_workers.COLLAPSED_OPTIONS["num_hard_negatives"]
    rank_pairs = [int((batch - 1 - balanced_rows(batch, world, r)).sum()) for r in range(world)]
    assert min(rank_pairs) > 8 * budget, rank_pairs
    batches = [dist_workers.collapsed_global_batch(step) for step in range(dist_workers.COLLAPSED_STEPS)]
    want = single_process_steps(EKDLoss(**dist_workers.COLLAPSED_OPTIONS), batches)
    for step, ((student, _, labels), ref) in enumerate(zip(batches, want)):
        s_hat = student / student.norm(dim=1, keepdim=True)
        i, j = torch.triu_indices(batch, batch, 1)
        assert torch.unique(bucket16((s_hat @ s_hat.t())[i, j][labels[i] != labels[j]])).numel() == 1
        selected, tied_ranks, num_ties = sharded_hardest_allotment(student, labels, world, num_hard)
        # step 0: no tie at the cut, the full comparison; step 1: ties at the cut on several ranks, more
        # than needed: which are chosen moves the gradient between identical rows only (compared summed)
        assert ((tied_ranks, num_ties) == (1, 1)) if step == 0 else (tied_ranks > 1 and num_ties > num_hard)
        for rank, results in enumerate(per_rank):
            got, where = results["collapsed"][step], f"collapsed rank {rank} step {step}"
            local_grad = dist_workers.collapsed_local_part(ref["grad"], world, rank) if step == 0 else None
            assert_step_matches(got, ref, world, local_grad, where)
            assert [tuple(p) for p in got["selected"].tolist()] == selected[rank], where
            assert got["hard_candidates"] <= num_hard, where
            numel, op = got["pass_b"][torch.int64]
            assert numel <= budget, (f"{where}: pass B's {op} holds {numel} elements > the chunk budget "
                                     f"{budget} (the rank has {rank_pairs[rank]} pairs)")
            assert got["select_numel"] <= num_hard, f"{where}: select_hardest's {got['select_op']}"
            assert not got["low_bits"], where  # the values kept (below the default VALUE_BUDGET)
        if step > 0:
            grad = torch.cat([results["collapsed"][step]["grad"] for results in per_rank])
            by_identity = [torch.zeros(labels.max() + 1, grad.shape[1]).index_add_(0, labels, g)
                           for g in (grad, world * ref["grad"])]
            assert_grad_close(*by_identity)


def test_collapsed_student_histograms_the_low_key_bits(big_results):
    """The collapsed batches with a VALUE_BUDGET far below a rank's values in the collapsed bucket:
    pass B keeps no value but histograms the low 16 key bits of the negatives in each distinct
    wanted (model, bucket), and the all-reduced histograms give the exact keys. Thresholds, loss and
    selected pairs are bitwise those of the kept-values path (held to single-process EKD above and
    here), and no float32 or int64 tensor of pass B and of the rest of the threshold selection
    holds more than the chunk budget (or the embeddings, B x D, that pass B's chunks multiply),
    except the (buckets, 65536) histograms of the low bits (buckets <= 2K + 1) and the rows of the
    65537-entry bucket lookup tables: keeping the values
    made tensors of all the rank's negatives, 38K to 57K."""
    world, per_rank = big_results
    batch, budget = dist_workers.COLLAPSED_BATCH, dist_workers.COLLAPSED_CHUNK_PAIRS
    rank_pairs = [int((batch - 1 - balanced_rows(batch, world, r)).sum()) for r in range(world)]
    assert min(rank_pairs) > 8 * budget and dist_workers.COLLAPSED_VALUE_BUDGET < min(rank_pairs) // 8
    num_targets = 2 * EKDLoss(**dist_workers.COLLAPSED_OPTIONS).config.num_thresholds + 1
    batches = [dist_workers.collapsed_global_batch(step) for step in range(dist_workers.COLLAPSED_STEPS)]
    want = single_process_steps(EKDLoss(**dist_workers.COLLAPSED_OPTIONS), batches)
    for rank, results in enumerate(per_rank):
        for step, (got, kept, ref) in enumerate(zip(results["collapsed_histograms"], results["collapsed"], want)):
            where = f"collapsed, low bits histogrammed: rank {rank} step {step}"
            assert got["low_bits"], where
            for key in ("loss", "student_thresholds", "teacher_thresholds", "selected"):
                assert torch.equal(got[key], kept[key]), f"{where}: {key}"
            assert_grad_close(got["grad"], kept["grad"])
            local_grad = dist_workers.collapsed_local_part(ref["grad"], world, rank) if step == 0 else None
            assert_step_matches(got, ref, world, local_grad, where)
            bound = max(budget, batches[step][0].numel())  # the chunk; the embeddings (480 x 9)
            large = [(dtype, numel, op) for dtype, numel, op in got["refine_large"]
                     if dtype in (torch.float32, torch.int64) and numel > bound]
            assert any(dtype == torch.int64 for dtype, _, _ in large), where  # the recorder saw the histograms
            for dtype, numel, op in large:
                # a (buckets, 65536) histogram, or a lookup table's row (65537 buckets, the spare included)
                assert (numel % (1 << 16) == 0 and numel <= num_targets << 16) or numel == (1 << 16) + 1, (
                    f"{where}: {op} holds {numel} {dtype} elements, neither within {bound} (chunk, embeddings) "
                    f"nor a histogram of the low key bits (the rank has {rank_pairs[rank]} pairs)")
            assert got["pass_b"][torch.float32][0] <= bound, where


# ----------------------------------------------------------------------------- pieces, one process
def test_balanced_rows_cover_every_row_once_with_even_work():
    for batch, world in [(10, 3), (11, 2), (2, 4), (1000, 7)]:
        parts = [balanced_rows(batch, world, r) for r in range(world)]
        assert sorted(torch.cat(parts).tolist()) == list(range(batch))
        work = [int((batch - 1 - p).sum()) for p in parts]
        assert max(work) - min(work) <= batch, work


def test_negatives_before_row_counts_from_labels():
    labels = torch.tensor([3, 1, 3, 2, 1, 3, 7])
    prefix, total = negatives_before_row(labels)
    per_row = [sum(1 for j in range(i + 1, 7) if labels[j] != labels[i]) for i in range(7)]
    assert total == sum(per_row)
    assert prefix.tolist() == [sum(per_row[:i]) for i in range(7)]


def test_order_keys_preserve_order_and_invert():
    values = torch.tensor([-1.0, -0.5, -1e-30, -0.0, 0.0, 1e-30, 0.25, 1.0, 3e38, -3e38])
    keys = order_keys(values)
    assert torch.equal(key_values(keys), values) or torch.equal(key_values(keys).abs(), values.abs())
    order = torch.argsort(values, stable=True)
    assert torch.all(keys[order][1:] >= keys[order][:-1])


def test_hardest_positions_take_larger_keys_then_earlier_positions():
    g = torch.Generator().manual_seed(3)
    keys = order_keys(torch.randint(-3, 4, (500,), generator=g).float() / 4)  # many ties
    keys[7] = 2**32 - 1  # the largest key: the high bits of the combined order
    for keep in (1, 7, 100, 499, 500):
        want = torch.sort(torch.sort(keys, descending=True, stable=True).indices[:keep]).values
        assert torch.equal(hardest_positions(keys, keep), want), keep


def test_bucket16_is_the_top_16_bits_of_the_order_keys():
    g = torch.Generator().manual_seed(0)
    values = torch.cat([torch.randn(1000, generator=g), torch.tensor([-0.0, 0.0, 1e-38, -1e-38, 1.0, -1.0,
                                                                      float("inf"), float("-inf"), float("nan")])])
    assert torch.equal(bucket16(values).long(), order_keys(values) >> 16)


def brute_pairs(labels):
    batch = labels.shape[0]
    return [(i, j) for i in range(batch) for j in range(i + 1, batch)]


def test_positive_pairs_lists_the_same_label_pairs_of_the_marked_rows():
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 5, (40,), generator=g)
    mine = torch.rand(40, generator=g) < 0.5
    i, j = positive_pairs(labels, mine)
    want = [(a, b) for a, b in brute_pairs(labels) if labels[a] == labels[b] and mine[a]]
    assert list(zip(i.tolist(), j.tolist())) == want


def test_negative_pairs_at_maps_row_major_ranks_to_pairs():
    g = torch.Generator().manual_seed(2)
    for labels in (torch.randint(0, 4, (37,), generator=g), torch.arange(9), torch.tensor([1, 1, 2, 1, 1, 2, 2, 3])):
        negatives = [(a, b) for a, b in brute_pairs(labels) if labels[a] != labels[b]]
        ranks = torch.arange(len(negatives))
        i, j = negative_pairs_at(labels, ranks)
        assert list(zip(i.tolist(), j.tolist())) == negatives


def test_chunk_plan_covers_the_rows_within_the_budget():
    for batch, world, budget in [(2048, 2, 1 << 22), (2048, 3, 3 << 16), (1000, 7, 5000), (23, 2, 1), (5, 4, 1)]:
        for rank in range(world):
            rows = balanced_rows(batch, world, rank).tolist()
            plan = chunk_plan(rows, batch, budget)
            covered = [r for s, e in plan for r in rows[s:e]]
            # every row with a pair, in order; row B - 1 (no pair) rides along only inside a chunk
            assert covered in (rows, [r for r in rows if r < batch - 1])
            for s, e in plan:
                width = batch - 1 - rows[s]
                assert (e - s) * width <= max(budget, width), (batch, world, rank, s, e)


# ----------------------------------------------------------------------------- ranks that disagree

REFUSED_BY_RANK_1 = "rank 1's input was refused: see that rank's error"
#: per failing case of dist_workers.AGREEMENT_CASES: what every rank's ValueError must say (a
#: string: the same message on every rank; a list: per rank, the one rank's own error and what
#: the others say)
AGREEMENT_EXPECTED = {
    "student_width": "the student width Ds: rank 0 has 12, rank 1 has 14",
    "teacher_width": "the teacher width Dt: rank 0 has 10, rank 1 has 8",
    "student_dtype": "the student dtype: rank 0 has torch.float32, rank 1 has torch.bfloat16",
    "teacher_dtype": "the teacher dtype: rank 0 has torch.float16, rank 1 has torch.float32",
    "momentum": "the option momentum: rank 0 has 0.01, rank 1 has 0.5",
    "temperature": "the option temperature: rank 0 has 0.01, rank 1 has 0.05",
    "critical_only": "the option critical_only: rank 0 has False, rank 1 has True",
    "compute_critical_ratio": "the option compute_critical_ratio: rank 0 has False, rank 1 has True",
    "rank_loss": "the option rank_loss: rank 0 has 'soft_rank', rank 1 has 'eq8'",
    "positive_weight": "the option positive_weight: rank 0 has 0.02, rank 1 has 1.0",
    "num_hard_negatives": "the option num_hard_negatives: rank 0 has 2000, rank 1 has 5",
    "negative_selection": "the option negative_selection: rank 0 has 'hardest', rank 1 has 'random'",
    "fprs_length": "the length of the option fprs: rank 0 has 6, rank 1 has 2",
    "fprs_values": "the option fprs: rank 0 has value #1, rank 1 has value #2",
    "eval_on_one_rank": "update_thresholds (training mode): rank 0 has True, rank 1 has False",
    "threshold_state": "the threshold state (student_thresholds and teacher_thresholds, bit for bit): rank 0 has "
                       "value #1, rank 1 has value #2",
    "threshold_one_ulp": "the threshold state",
    "generator_on_one_rank": "whether a generator is given (negative_selection=\"random\"): rank 0 has True, "
                             "rank 1 has False",
    "gradient_on_one_rank": "whether the student's gradient is computed (requires_grad, grad mode): rank 0 has True, "
                            "rank 1 has False",
    "empty_part_width": "the student width Ds: rank 0 has 12, rank 1 has 1; on the teacher width Dt: rank 0 has 10, "
                        "rank 1 has 1",
    "random_seeds": "the ranks drew different negatives (their generators were in different states); seed the "
                    "generator identically on every rank",
    "labels_refused": [REFUSED_BY_RANK_1, "labels must be 1-D of length B=14, got shape (14, 1)"],
    "rows_refused": [REFUSED_BY_RANK_1, "student and teacher must have the same number of rows, got 14 and 13"],
    "fp64_refused": [REFUSED_BY_RANK_1, "the sharded EKD computes in fp32"],
    "thresholds_refused": [REFUSED_BY_RANK_1, "student_thresholds must be float32 (or float64), got torch.float16"],
    "gather_width": "gather_batch needs every rank of its process group to agree, but the ranks disagree on the "
                    "student's elements per row: rank 0 has 12, rank 1 has 14",
    "gather_gradient_on_one_rank": "whether the student's gradient is computed (requires_grad, grad mode): rank 0 has "
                                   "True, rank 1 has False",
    "gather_rows_refused": ["gather_batch: " + REFUSED_BY_RANK_1,
                            "student, teacher and labels must have the same number of rows, got 14, 14 and 13"],
    "gather_labels_2d_refused": ["gather_batch: " + REFUSED_BY_RANK_1,
                                 "gather_batch: student and teacher must be 2-D (B x D) and labels 1-D (B), got shapes "
                                 "(14, 12), (14, 10) and (14, 1)"],
    "gather_student_3d_refused": ["gather_batch: " + REFUSED_BY_RANK_1,
                                  "gather_batch: student and teacher must be 2-D (B x D) and labels 1-D (B), got "
                                  "shapes (14, 2, 6)"],
    "gather_float_labels_refused": "gather_batch: labels must be an integer tensor, got torch.float32",
    "gather_bool_labels_refused": ["gather_batch: " + REFUSED_BY_RANK_1,
                                   "gather_batch: labels must be an integer tensor, got torch.bool"],
    "gather_loss_num_hard_negatives": "gather_batch needs every rank of its process group to agree, but the ranks "
                                      "disagree on the option num_hard_negatives: rank 0 has 2000, rank 1 has 5. "
                                      "Nothing was computed",
    "gather_loss_fprs": "the length of the option fprs: rank 0 has 6, rank 1 has 2; on the option fprs: rank 0 has "
                        "value #1, rank 1 has value #2",
    "gather_loss_eval_on_one_rank": "the loss's training mode: rank 0 has True, rank 1 has False",
    "gather_loss_threshold_one_ulp": "the threshold state (student_thresholds and teacher_thresholds, bit for bit)",
    # only the gate is named, not the options that a missing loss reads as zeros
    "gather_loss_on_one_rank": "but the ranks disagree on whether gather_batch was given the loss: rank 0 has True, "
                               "rank 1 has False (pass loss= on every rank or none). Nothing was computed",
    "gather_loss_generator_seeds": "the state of the loss's generator (negative_selection=\"random\"): rank 0 has "
                                   "value #1, rank 1 has value #2 (seed it identically on every rank",
    "gather_loss_generator_on_one_rank": "whether the loss has a generator (negative_selection=\"random\"): rank 0 "
                                         "has True, rank 1 has False",
    "random_without_generator_no_negatives": ["negative_selection=\"random\" needs a torch.Generator"] * 2,
    "gather_loss_sharded_refused": ["gather_batch: " + REFUSED_BY_RANK_1,
                                    "gather_batch: loss must be a single-process EKDLoss"],
    "update_thresholds_refused": [REFUSED_BY_RANK_1, "update_thresholds must be True or False, got 'False' (str)"],
    "mixed_entry_points": "the ranks of the process group called different entry points: rank 0 called "
                          "EKDLoss(process_group=...); rank 1 called gather_batch. Every rank must compute the loss "
                          "the same way",
    "mixed_entry_points_no_loss": "called different entry points: rank 0 called EKDLoss(process_group=...); rank 1 "
                                  "called gather_batch",
    "meta_refused": [REFUSED_BY_RANK_1, "EKDLoss(process_group=...): meta tensors hold no values"],
    "gather_meta_refused": ["gather_batch: " + REFUSED_BY_RANK_1, "gather_batch: meta tensors hold no values"],
}
AGREEMENT_WORLD = 2


@pytest.fixture(scope="module")
def agreement_results(tmp_path_factory):
    """Every rank's outcome of each case of dist_workers.AGREEMENT_CASES, in one launch of 2
    workers whose process group times out after AGREEMENT_TIMEOUT_S: a case that left the ranks
    in different collectives fails within that (or the launch dies with a gloo abort)."""
    return run_workers(dist_workers.agreement_worker, AGREEMENT_WORLD, tmp_path_factory.mktemp("agreement"))


def test_every_agreement_case_is_expected():
    names = [name for name, _ in dist_workers.AGREEMENT_CASES]
    assert len(set(names)) == len(names)
    assert sorted(n for n in names if not n.startswith("ok_")) == sorted(AGREEMENT_EXPECTED)


@pytest.mark.parametrize("name", sorted(AGREEMENT_EXPECTED))
def test_ranks_that_disagree_all_raise_the_same_value_error(agreement_results, name):
    """Ranks that disagree (options, train/eval, threshold state, widths, dtypes, gradient, a
    generator on one rank, different random draws) or whose input one rank refused: every rank
    raises a ValueError saying what and where, before any later collective (no gloo abort, no
    hang, and the next call still works: ok_after_refusals)."""
    expected = AGREEMENT_EXPECTED[name]
    outcomes = [results["cases"][name] for results in agreement_results]
    for rank, got in enumerate(outcomes):
        want = expected if isinstance(expected, str) else expected[rank]
        assert not got["ok"], f"{name}: rank {rank} returned a result"
        assert got["type"] == "ValueError", f"{name}: rank {rank}: {got['type']}: {got['message']}"
        assert want in got["message"], f"{name}: rank {rank}: {got['message']}"
    if isinstance(expected, str):  # the ranks disagree: the same message everywhere
        assert len({got["message"] for got in outcomes}) == 1, outcomes


def agreement_reference(options=None, labels_dtype=torch.int64, generator_seed=None):
    student, teacher, labels = dist_workers.global_batch(0, AGREEMENT_WORLD, "mixed")
    student = student.clone().requires_grad_(True)
    crit = EKDLoss(**(options or {}))
    generator = None if generator_seed is None else torch.Generator().manual_seed(generator_seed)
    loss = crit(student, teacher, labels.to(labels_dtype), generator=generator)
    loss.backward()
    return dict(loss=loss.detach(), grad=student.grad, student_thresholds=crit.student_thresholds.clone(),
                teacher_thresholds=crit.teacher_thresholds.clone(), stats=crit.last_stats)


@pytest.mark.parametrize("name, reference", [
    ("ok_labels_int16", dict(labels_dtype=torch.int16)),
    ("ok_labels_mixed_dtypes", dict()),
    ("ok_random_same_seed", dict(options=dict(negative_selection="random", num_hard_negatives=9), generator_seed=0)),
    ("ok_after_refusals", dict()),
    ("ok_gather_with_loss", dict()),
    ("ok_gather_with_compiled_loss", dict()),
    ("ok_gather_loss_random_same_seed", dict(options=dict(negative_selection="random", num_hard_negatives=9),
                                             generator_seed=0)),
])
def test_agreeing_ranks_get_the_single_process_result(agreement_results, name, reference):
    """Labels of any integer dtype (int16: no gloo type; or a different dtype per rank) are
    gathered as int64; random selection with the same seed everywhere passes the draws' check;
    after all the refused calls the ranks are still in step."""
    want = agreement_reference(**reference)
    for rank, results in enumerate(agreement_results):
        got = results["cases"][name]
        assert got["ok"], f"{name}: rank {rank}: {got.get('type')}: {got.get('message')}"
        assert_step_matches(got["value"], want, AGREEMENT_WORLD,
                            dist_workers.local_part(want["grad"], AGREEMENT_WORLD, rank), f"{name} rank {rank}")


def test_non_finite_part_on_one_rank(agreement_results):
    """A NaN in one rank's rows: on every rank a NaN loss and NaN float statistics (the critical
    ratio too), a gradient NaN throughout (a scaler skips the step, on every rank: not only the
    rows the NaN row's pairs reach), the threshold state untouched (SPEC, edge cases)."""
    for rank, results in enumerate(agreement_results):
        got = results["cases"]["ok_non_finite_on_rank_1"]
        assert got["ok"], f"rank {rank}: {got.get('type')}: {got.get('message')}"
        got = got["value"]
        for name in ("loss", "positive_term", "negative_term", "batch_student_thresholds", "batch_teacher_thresholds",
                     "critical_ratio"):
            assert torch.isnan(got[name]).all(), f"rank {rank}: {name} {got[name]}"
        assert got["grad_all_nan"], f"rank {rank}"
        assert not got["student_thresholds"].any() and not got["teacher_thresholds"].any()


def test_non_finite_row_outside_every_pair(agreement_results):
    """A NaN teacher row on rank 0 that takes part in no distilled pair: the pairs' terms stay
    finite, and still the loss is NaN and the gradient NaN throughout on every rank (a gradient
    scaler reads the gradients), as on every backend."""
    for rank, results in enumerate(agreement_results):
        got = results["cases"]["ok_non_finite_outside_pairs"]
        assert got["ok"], f"rank {rank}: {got.get('type')}: {got.get('message')}"
        assert torch.isnan(got["value"]["loss"]) and got["value"]["grad_all_nan"], f"rank {rank}: {got['value']}"


def test_bf16_gradient_is_rounded_once(agreement_results):
    """bf16 embeddings: each rank's gradient is W times the single-process one rounded once to
    bf16, as single-process training rounds it (up to the fp32 sums' order).  The sharded loss
    gathered bf16 rows, so its gradient shares were rounded to bf16 and summed in bf16: about a
    third of the elements one bf16 step off (a relative error of 2.5e-3) on such a batch."""
    student, teacher, labels = (x.bfloat16() if x.is_floating_point() else x
                                for x in dist_workers.global_batch(0, AGREEMENT_WORLD, "mixed"))
    student = student.clone().requires_grad_(True)
    EKDLoss()(student, teacher, labels).backward()
    for rank, results in enumerate(agreement_results):
        got = results["cases"]["ok_bf16_gradient"]
        assert got["ok"], f"rank {rank}: {got.get('type')}: {got.get('message')}"
        grad = got["value"]["grad"]
        want = AGREEMENT_WORLD * dist_workers.local_part(student.grad, AGREEMENT_WORLD, rank)
        assert grad.dtype == torch.bfloat16
        differ = (grad != want).float().mean().item()
        error = ((grad.float() - want.float()).norm() / want.float().norm()).item()
        # (0 and 0 on this batch; the bounds leave room for the fp32 sums' order elsewhere)
        assert differ <= 0.02 and error <= 1e-4, f"rank {rank}: {differ:.1%} of the elements differ, {error:.2e}"


def test_gather_batch_gathers_labels_of_any_integer_dtype_as_int64(agreement_results):
    student, teacher, labels = dist_workers.global_batch(0, AGREEMENT_WORLD, "mixed")
    for rank, results in enumerate(agreement_results):
        got = results["cases"]["ok_gather_labels_int16"]
        assert got["ok"], got
        assert got["value"]["labels"].dtype == torch.int64 and torch.equal(got["value"]["labels"], labels)
        assert torch.equal(got["value"]["student"], student) and torch.equal(got["value"]["teacher"], teacher)
        assert got["value"]["sizes"] == dist_workers.rank_sizes(AGREEMENT_WORLD)


def test_copies_of_a_sharded_loss(agreement_results):
    """copy.deepcopy (an EMA or SWA copy of a model holding the loss) and torch.save of the whole
    module work on a loss built with a process group: the copies share the group (the pickled
    one holds None, the same default group) and their next step equals the original's, bit for
    bit; a new_group loss copies (deep or shallow) sharing its group, and pickling it raises a TypeError
    saying what to do (before: torch's "cannot pickle ProcessGroup", also for the default group)."""
    for rank, results in enumerate(agreement_results):
        got = results["copies"]
        assert got["ok"], f"rank {rank}: {got.get('type')}: {got.get('message')}"
        value = got["value"]
        assert value["deepcopy_shares_group"] and value["pickled_group"] is None
        assert value["subgroup_deepcopy_shares_group"] and value["subgroup_copy_shares_group"]
        assert value["refused"] is not None and "new_group" in value["refused"] and "state_dict" in value["refused"]
        original = value["steps"]["original"]
        for name in ("deepcopy", "pickled"):
            step = value["steps"][name]
            for key in ("loss", "grad", "student_thresholds", "teacher_thresholds"):
                assert torch.equal(step[key], original[key]), f"rank {rank} {name}: {key}"


@pytest.mark.parametrize("name", ["world_before_init", "none"])
def test_module_built_before_init_process_group_is_sharded(agreement_results, name):
    """EKDLoss(process_group=dist.group.WORLD) built before init_process_group (WORLD is None
    then), or process_group=None: the default group, resolved at the call, so the loss is the
    global batch's on every rank (before the fix: each rank's own single-process loss)."""
    want = agreement_reference()
    for rank, results in enumerate(agreement_results):
        got = results[name]
        assert got["ok"], f"rank {rank}: {got.get('type')}: {got.get('message')}"
        assert_step_matches(got["value"], want, AGREEMENT_WORLD,
                            dist_workers.local_part(want["grad"], AGREEMENT_WORLD, rank), f"{name} rank {rank}")


@pytest.mark.parametrize("kwargs, match", [
    (dict(process_group="world"), r"process_group must be a torch.distributed process group .* got 'world' \(str\)"),
    (dict(process_group=3), r"process_group must be a torch.distributed process group .* got 3 \(int\)"),
    (dict(process_group=None, backend="triton"), "backend='triton' with process_group: the sharded loss computes"),
    (dict(process_group=dist.group.WORLD, backend="csrc"), "backend='csrc' with process_group"),
])
def test_process_group_and_backend_are_checked_when_built(kwargs, match):
    """A process_group that is no group failed only at the first call, inside torch.distributed;
    a backend named with one did nothing (the sharded loss computes with PyTorch ops)."""
    with pytest.raises(ValueError, match=match):
        EKDLoss(**kwargs)


def test_loss_built_on_a_rank_outside_its_group():
    """dist.new_group returns GroupMember.NON_GROUP_MEMBER on the ranks outside the group: code
    that builds the loss on every rank (and calls it on the members only) still builds it."""
    assert EKDLoss(process_group=dist.GroupMember.NON_GROUP_MEMBER).process_group is dist.GroupMember.NON_GROUP_MEMBER


def test_repr_says_whether_the_loss_is_sharded():
    assert "sharded" not in repr(EKDLoss())
    assert repr(EKDLoss(process_group=None)).endswith("backend='auto', sharded over the default process group)")


def test_process_group_none_without_torch_distributed_raises():
    """process_group=None (or dist.group.WORLD, None before init) needs torch.distributed; the
    default EKDLoss() is single-process, also after a copy or a pickle."""
    import copy
    import pickle

    assert not dist.is_initialized()
    student, teacher, labels = dist_workers.global_batch(0, 2, "mixed")
    for group in (None, dist.group.WORLD):
        with pytest.raises(RuntimeError, match="torch.distributed must be initialised"):
            EKDLoss(process_group=group)(student, teacher, labels)
    crit = EKDLoss()
    clones = [copy.deepcopy(crit), pickle.loads(pickle.dumps(crit))]
    want = crit(student, teacher, labels)
    for clone in clones:
        assert torch.equal(clone(student, teacher, labels), want)


def test_disagreement_messages_group_the_ranks():
    fields = [distributed._Field("the row count", compared=False), distributed._Field("the student width Ds"),
              distributed._Field("the option momentum", distributed._show_float),
              distributed._Field("the threshold state", None, hint="load the same checkpoint")]
    momentum = distributed._float_bits(0.01)
    table = [[5, 16, momentum, 7], [3, 12, momentum, 7], [9, 16, momentum, 8], [5, 16, momentum, 7],
             [5, 16, momentum, 7], [0, 12, momentum, 7]]
    assert distributed._disagreements(fields, table) == [
        "the student width Ds: ranks 0, 2-4 have 16, ranks 1, 5 have 12",
        "the threshold state: ranks 0-1, 3-5 have value #1, rank 2 has value #2 (load the same checkpoint)"]
    assert distributed._disagreements(fields, [table[0]] * 3) == []


def test_fingerprint_sees_every_bit():
    g = torch.Generator().manual_seed(0)
    state = [torch.rand(6, generator=g), torch.rand(6, generator=g)]
    base = distributed.fingerprint(state)
    assert base.dtype == torch.int64 and 0 <= base.item() < 2**62
    assert distributed.fingerprint([x.clone() for x in state]).item() == base.item()
    for which in range(2):
        for k in range(6):
            changed = [x.clone() for x in state]
            changed[which][k] = torch.nextafter(changed[which][k], torch.tensor(2.0))
            assert distributed.fingerprint(changed).item() != base.item(), (which, k)
    swapped = [state[1], state[0]]
    assert distributed.fingerprint(swapped).item() != base.item()
    assert distributed.fingerprint([x.double() for x in state]).item() != base.item()
