"""BalancedBatchSampler: batch composition, determinism, epochs without replacement, small
identities and rank splitting."""

import collections

import numpy as np
import pytest
import torch

from ekd_kernels.sampler import BalancedBatchSampler


def make_labels(seed=0, identities=30, low=1, high=9):
    rng = np.random.default_rng(seed)
    counts = rng.integers(low, high, identities)
    return np.repeat(np.arange(identities), counts)


def split(batch, general_size, q):
    general, balanced = batch[:general_size], batch[general_size:]
    return general, [balanced[i:i + q] for i in range(0, len(balanced), q)]


@pytest.mark.parametrize("replacement", [False, True])
def test_batch_composition(replacement):
    labels = make_labels(low=4, high=9)
    sampler = BalancedBatchSampler(labels, general_size=10, num_identities=5, images_per_identity=4,
                                   num_batches=12, replacement=replacement, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 12
    for batch in batches:
        assert len(batch) == 10 + 5 * 4 and all(isinstance(i, int) for i in batch)
        general, groups = split(batch, 10, 4)
        assert len(set(general)) == 10
        identities = [labels[g[0]] for g in groups]
        assert len(set(identities)) == 5                        # p distinct identities
        for g in groups:
            assert len(set(labels[g])) == 1 and len(set(g)) == 4  # q distinct images of one identity


def test_deterministic_and_epoch_dependent():
    labels = make_labels()
    kwargs = dict(general_size=8, num_identities=4, images_per_identity=4, num_batches=6, seed=7)
    a, b = BalancedBatchSampler(labels, **kwargs), BalancedBatchSampler(labels, **kwargs)
    assert list(a) == list(b) == list(a)
    a.set_epoch(1)
    assert list(a) != list(b)
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(BalancedBatchSampler(labels, **{**kwargs, "seed": 8})) != list(b)


def test_epoch_without_replacement():
    labels = np.repeat(np.arange(40), 5)   # 200 samples, 40 identities
    sampler = BalancedBatchSampler(labels, general_size=20, num_identities=8, images_per_identity=4,
                                   num_batches=5, seed=3)
    batches = list(sampler)
    general = [i for b in batches for i in split(b, 20, 4)[0]]
    assert len(set(general)) == 100             # 100 distinct samples
    identities = [labels[g[0]] for b in batches for g in split(b, 20, 4)[1]]
    assert sorted(identities) == list(range(40))   # every identity exactly once in 5 x 8 slots


def test_longer_epoch_reuses_only_after_exhausting():
    labels = np.repeat(np.arange(10), 4)   # 10 identities, p = 4: a fresh permutation mid-batch
    sampler = BalancedBatchSampler(labels, general_size=0, num_identities=4, images_per_identity=2,
                                   num_batches=10, seed=0)
    identities = [labels[g[0]] for b in sampler for g in split(b, 0, 2)[1]]
    counts = collections.Counter(identities)
    assert set(counts.values()) == {4}          # 40 slots over 10 identities: each exactly 4 times
    for b in sampler:                           # and never twice in one batch
        ids = [labels[g[0]] for g in split(b, 0, 2)[1]]
        assert len(set(ids)) == 4


def test_no_repeat_where_a_batch_straddles_two_permutations():
    """A batch whose draws run past the end of one permutation into the next holds no sample
    (general part) and no identity (balanced part) twice: what the next permutation's first
    items clash with is moved to its end.  41 samples in parts of 10 and 7 identities in groups of
    5 straddle often; without the move, some batch drew an identity twice (a mutation check)."""
    labels = np.repeat(np.arange(7), 6)[:41]   # 41 samples, 7 identities (one with 5 images)
    sampler = BalancedBatchSampler(labels, general_size=10, num_identities=5, images_per_identity=4,
                                   num_batches=60, seed=3)
    for batch in sampler:
        general, groups = split(batch, 10, 4)
        assert len(set(general)) == 10, general
        assert len({labels[g[0]] for g in groups}) == 5, groups


def test_small_identities():
    labels = np.array([0] * 6 + [1] * 2 + [2] * 1 + [3] * 5 + [4] * 3)
    repeat = BalancedBatchSampler(labels, general_size=2, num_identities=4, images_per_identity=4,
                                  num_batches=20, seed=0)
    seen = set()
    for batch in repeat:
        for g in split(batch, 2, 4)[1]:
            ident = labels[g[0]]
            seen.add(int(ident))
            assert len(set(labels[g])) == 1
            counts = collections.Counter(g)
            # an identity with n < q images: every image used, evenly (q // n or q // n + 1 times)
            n = int((labels == ident).sum())
            assert len(counts) == min(n, 4) and max(counts.values()) - min(counts.values()) <= 1
    assert seen == {0, 1, 3, 4}                  # the single-image identity 2 never forms a group
    drop = BalancedBatchSampler(labels, general_size=2, num_identities=2, images_per_identity=4,
                                num_batches=20, small_identities="drop", seed=0)
    assert {int(labels[g[0]]) for b in drop for g in split(b, 2, 4)[1]} == {0, 3}
    with pytest.raises(ValueError, match="only 2 identities"):
        BalancedBatchSampler(labels, general_size=2, num_identities=3, images_per_identity=4,
                             small_identities="drop")


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_splitting(world_size):
    labels = make_labels(low=4, high=9)
    kwargs = dict(general_size=6, num_identities=3, images_per_identity=4, num_batches=4, seed=5)
    ranks = [BalancedBatchSampler(labels, rank=r, world_size=world_size, **kwargs) for r in range(world_size)]
    for s in ranks:
        s.set_epoch(2)
        assert len(s) == 4
    global_batches = list(ranks[0].global_batches())
    assert len(global_batches) == 4 * world_size
    for r, s in enumerate(ranks):
        assert list(s) == global_batches[r::world_size]
    # without replacement the ranks' general parts are disjoint within the epoch
    general = [i for s in ranks for b in s for i in b[:6]]
    assert len(general) == len(set(general))


def test_default_length_and_tensor_labels():
    labels = torch.arange(50).repeat_interleave(4)
    sampler = BalancedBatchSampler(labels, general_size=4, num_identities=4, images_per_identity=4)
    assert len(sampler) == 200 // 20
    assert len(BalancedBatchSampler(labels, 4, 4, 4, world_size=2, rank=1)) == 200 // 40
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(labels), batch_sampler=sampler)
    (first,) = next(iter(loader))
    assert first.shape == (20,)


@pytest.mark.parametrize("kwargs,match", [
    (dict(general_size=-1, num_identities=2), "general_size"),
    (dict(general_size=0, num_identities=0), "empty"),
    (dict(general_size=2, num_identities=2, images_per_identity=1), "at least 2"),
    (dict(general_size=2, num_identities=2, small_identities="pad"), "small_identities"),
    (dict(general_size=2, num_identities=2, rank=2, world_size=2), "rank"),
    (dict(general_size=10_000, num_identities=2), "exceeds"),
    (dict(general_size=2, num_identities=2, num_batches=0), "num_batches"),
    # by type: a string "False" drew with replacement, a fractional rank yielded no batch
    (dict(general_size=2, num_identities=2, replacement="False"), "replacement must be True or False"),
    (dict(general_size=2, num_identities=2, rank=0.5, world_size=2), "rank must be an integer, got 0.5"),
    (dict(general_size=2, num_identities=2, world_size=2.0), "world_size must be an integer, got 2.0"),
    # the sizes alike (2.0 was taken, None raised a TypeError from int())
    (dict(general_size=2.0, num_identities=2), "general_size must be a non-negative integer, got 2.0"),
    (dict(general_size=None, num_identities=2), "general_size must be a non-negative integer, got None"),
    (dict(general_size=2, num_identities=2, images_per_identity=4.0), "images_per_identity must be a non-negative"),
])
def test_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BalancedBatchSampler(make_labels(low=4), **kwargs)


def test_rejects_bad_labels():
    with pytest.raises(ValueError, match="labels"):
        BalancedBatchSampler(np.zeros((3, 2), dtype=int), 1, 1)
    with pytest.raises(ValueError, match="labels"):
        BalancedBatchSampler([0.5, 1.5], 1, 1)


@pytest.mark.parametrize("seed", [-1, 1.5, True, "0"])
def test_seed_is_checked_when_built(seed):
    """numpy's seed sequences take non-negative integers: refused at construction, not at the
    first batch."""
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        BalancedBatchSampler(np.repeat(np.arange(10), 4), general_size=4, num_identities=2, seed=seed)


def test_epoch_is_checked():
    sampler = BalancedBatchSampler(np.repeat(np.arange(10), 4), general_size=4, num_identities=2)
    with pytest.raises(ValueError, match="epoch must be a non-negative integer"):
        sampler.set_epoch(-1)
    sampler.set_epoch(np.int64(3))
    assert sampler.epoch == 3
