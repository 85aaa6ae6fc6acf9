"""EKD over 2 and 3 gloo processes equals single-process EKD on the concatenated batch.

Both paths (gather_batch + EKDLoss, and the sharded EKDLoss(process_group=...)), uneven per-rank
batch sizes (one rank holds a single row at W = 3), several steps of EMA state, paper variants,
batches without positives, and a DDP step whose averaged parameter gradients must equal
single-process training on the concatenated batch.
"""

import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ekd_kernels import EKDLoss
from ekd_kernels.distributed import balanced_rows, key_values, negatives_before_row, order_keys

import dist_workers
from helpers import THRESHOLD_ATOL, assert_grad_close, assert_loss_close

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

TIMEOUT_S = 240


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=[2, 3])
def world_results(request, tmp_path_factory):
    world = request.param
    out_dir = tmp_path_factory.mktemp(f"world{world}")
    ctx = mp.start_processes(dist_workers.worker, args=(world, free_port(), str(out_dir)), nprocs=world,
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
    return world, [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]


def single_process(name, options, labels_kind, world):
    crit = EKDLoss(**options)
    steps = []
    for step in range(dist_workers.STEPS):
        student, teacher, labels = dist_workers.global_batch(step, world, labels_kind)
        student.requires_grad_(True)
        loss = crit(student, teacher, labels, generator=torch.Generator().manual_seed(step))
        loss.backward()
        steps.append(dict(loss=loss.detach(), grad=student.grad, student_thresholds=crit.student_thresholds.clone(),
                          teacher_thresholds=crit.teacher_thresholds.clone(), stats=crit.last_stats))
    return steps


@pytest.mark.parametrize("path", ["gather", "sharded"])
@pytest.mark.parametrize("scenario", dist_workers.SCENARIOS, ids=[s[0] for s in dist_workers.SCENARIOS])
def test_matches_single_process(world_results, path, scenario):
    world, per_rank = world_results
    name, options, labels_kind = scenario
    want = single_process(name, options, labels_kind, world)
    for rank, results in enumerate(per_rank):
        for step, (got, ref) in enumerate(zip(results[path][name], want)):
            where = f"{path}/{name} rank {rank} step {step}"
            assert_loss_close(got["loss"], ref["loss"])
            # convention: W times the single-process gradient of the rank's own rows
            assert_grad_close(got["grad"], world * dist_workers.local_part(ref["grad"], world, rank))
            for key in ("student_thresholds", "teacher_thresholds"):
                torch.testing.assert_close(got[key], ref[key], rtol=0, atol=THRESHOLD_ATOL, msg=where)
            for key, value in got["counts"].items():
                expected = getattr(ref["stats"], key)
                assert (value is None) == (expected is None), f"{where}: {key}"
                if value is not None:
                    assert value.item() == expected.item(), f"{where}: {key} {value.item()} vs {expected.item()}"
    if name == "no_positives_at_all":
        assert want[0]["stats"].positive_term.item() == 0.0


def test_thresholds_identical_on_every_rank(world_results):
    _, per_rank = world_results
    for path in ("gather", "sharded"):
        first = per_rank[0][path]["default"][-1]["student_thresholds"]
        assert all(torch.equal(r[path]["default"][-1]["student_thresholds"], first) for r in per_rank)


@pytest.mark.parametrize("path", ["gather", "sharded"])
def test_ddp_parameter_gradients_equal_single_process(world_results, path):
    world, per_rank = world_results
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8))
    crit = EKDLoss()
    for step in range(2):
        inputs, teacher, labels = dist_workers.global_batch(step, world, "mixed")
        model.zero_grad()
        crit(model(inputs), teacher, labels).backward()
        for rank in range(world):
            for got, want in zip(per_rank[rank]["ddp"][path][step], model.parameters()):
                assert_grad_close(got, want.grad)


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
