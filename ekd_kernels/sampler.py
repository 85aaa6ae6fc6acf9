"""Batches for EKD training: a general part (random samples) plus a balanced part (p identities x q).

EKD compares relations inside a batch, so a batch must hold positive pairs: the authors build
each batch from a general random part and a balanced part of p identities with q images each
(q = 4 in the paper).  ``BalancedBatchSampler`` yields such index lists, for a DataLoader's
``batch_sampler``::

    sampler = BalancedBatchSampler(dataset_labels, general_size=64, num_identities=16,
                                   images_per_identity=4, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for images, labels in loader: ...

Each batch is ``general_size`` indices followed by ``num_identities * images_per_identity``
indices, identity by identity (q consecutive indices per identity).

Rules:
- Deterministic: the batches depend only on (labels, options, seed, epoch, rank, world_size).
- ``replacement=False`` (the default): within an epoch the general part draws from a random
  permutation of all samples and the balanced part from a random permutation of the identities,
  so nothing repeats until every sample (identity) has been used; only when an epoch asks for
  more than the data holds does a fresh permutation start.  The p identities of one batch are
  always distinct.  ``replacement=True`` draws every batch independently (the general part
  without repeats inside the batch).
- Inside an identity the q images are distinct when it has at least q; an identity with fewer
  than q images is handled by ``small_identities``: ``"repeat"`` (default) fills the q slots by
  cycling through a shuffled list of its images (an image then appears more than once: its
  self-pair is a positive pair of similarity 1), ``"drop"`` leaves it out of the balanced part
  (it still appears in the general part).  Identities with a single image are always left out
  of the balanced part: they cannot form a positive pair.
- Distributed: with ``world_size`` ranks, every rank computes the same global sequence of
  ``world_size * num_batches`` batches and takes batches ``rank, rank + world_size, ...``, so
  ranks see disjoint batches (DistributedSampler's rank splitting, applied to whole batches).
- ``__len__`` is ``num_batches`` (default: the dataset size divided by the batch size and by
  ``world_size``, at least 1), the number of batches this rank yields per epoch.
- The two parts are drawn independently: an index of the balanced part may also sit in the
  general part of the same batch (about 0.76 per batch at 100 identities x 10 images with 16 +
  12 x 4): EKD then sees that image's self-pair, a positive pair of similarity 1.
"""

from __future__ import annotations

from typing import Iterator, List, Optional, Sequence

import numpy as np
import torch

from .validation import check_flag

SMALL_IDENTITY_POLICIES = ("repeat", "drop")


class _Stream:
    """Draws from successive random permutations of `items` without repeats until exhausted."""

    def __init__(self, items: np.ndarray, rng: np.random.Generator):
        self.items = items
        self.rng = rng
        self.pool = np.empty(0, dtype=items.dtype)
        self.position = 0

    def take(self, count: int, distinct: bool) -> np.ndarray:
        """`count` items; with `distinct`, no item twice in the result (needs count <= len(items))."""
        out: List[np.ndarray] = []
        taken = 0
        while taken < count:
            if self.position >= len(self.pool):
                self.pool = self.rng.permutation(self.items)
                self.position = 0
                if distinct and out:
                    # A fresh permutation started mid-batch: move what this batch already
                    # holds to the end so that the batch stays free of repeats.
                    held = np.concatenate(out)
                    clash = np.isin(self.pool, held)
                    self.pool = np.concatenate([self.pool[~clash], self.pool[clash]])
            chunk = self.pool[self.position:self.position + (count - taken)]
            self.position += len(chunk)
            taken += len(chunk)
            out.append(chunk)
        return np.concatenate(out) if out else np.empty(0, dtype=self.items.dtype)


class BalancedBatchSampler(torch.utils.data.Sampler):
    """Yields lists of dataset indices: ``general_size`` random, then p identities x q images.

    Args:
        labels: the identity of every sample (sequence or 1-D tensor of integers).
        general_size: random samples per batch (0 for a purely balanced batch).
        num_identities: p, identities in the balanced part (0 for a purely random batch).
        images_per_identity: q, images per identity (4 in the paper).
        num_batches: batches per epoch on this rank; default len(labels) // (batch size x world_size), at
            least 1 (the ranks together see about one pass over the data).
        replacement: False: draw from per-epoch permutations (see the module docstring).
        small_identities: "repeat" or "drop", for identities with fewer than q (>= 2) images.
        seed: base seed; each epoch's draw comes from (seed, epoch), the epoch set by ``set_epoch``
            (a generator seeded by both, not their sum: seed 0 at epoch 1 differs from seed 1 at 0).
        rank, world_size: this process's place among the data-parallel ranks.
    """

    def __init__(self, labels: Sequence[int], general_size: int, num_identities: int,
                 images_per_identity: int = 4, num_batches: Optional[int] = None, replacement: bool = False,
                 small_identities: str = "repeat", seed: int = 0, rank: int = 0, world_size: int = 1):
        labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
        if labels.ndim != 1 or len(labels) == 0 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be a non-empty 1-D sequence of integers, got shape {labels.shape} "
                             f"and dtype {labels.dtype}")
        for name, value in (("general_size", general_size), ("num_identities", num_identities),
                            ("images_per_identity", images_per_identity)):
            # (integers only, as rank and world_size: 2.0 was taken and None raised a TypeError)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r} ({type(value).__name__})")
        if general_size + num_identities * images_per_identity == 0:
            raise ValueError("the batch is empty: general_size and num_identities * images_per_identity are both 0")
        if num_identities > 0 and images_per_identity < 2:
            raise ValueError(f"images_per_identity must be at least 2 to form positive pairs, "
                             f"got {images_per_identity}")
        if small_identities not in SMALL_IDENTITY_POLICIES:
            raise ValueError(f"small_identities must be one of {SMALL_IDENTITY_POLICIES}, got {small_identities!r}")
        for name, value in (("rank", rank), ("world_size", world_size)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
        if not (0 <= rank < world_size):
            raise ValueError(f"rank must lie in [0, world_size), got rank={rank}, world_size={world_size}")
        if general_size > len(labels):
            raise ValueError(f"general_size={general_size} exceeds the {len(labels)} samples")

        self.labels = labels
        self.general_size = int(general_size)
        self.num_identities = int(num_identities)
        self.images_per_identity = int(images_per_identity)
        self.replacement = check_flag("replacement", replacement)
        self.small_identities = small_identities
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            # (numpy's seed sequences take non-negative integers only: refused here, not at the first batch)
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.epoch = 0

        # Samples of every identity, in dataset order.
        order = np.argsort(labels, kind="stable")
        identities, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
        minimum = self.images_per_identity if small_identities == "drop" else 2
        eligible = counts >= minimum
        self.identity_samples = [order[s:s + c] for s, c, ok in zip(starts, counts, eligible) if ok]
        self.identities = identities[eligible]
        if self.num_identities > len(self.identity_samples):
            raise ValueError(
                f"num_identities={self.num_identities} but only {len(self.identity_samples)} identities have "
                f"{minimum} or more images (small_identities={small_identities!r})")

        self.batch_size = self.general_size + self.num_identities * self.images_per_identity
        if num_batches is None:
            num_batches = max(1, len(labels) // (self.batch_size * world_size))
        if isinstance(num_batches, bool) or int(num_batches) != num_batches or num_batches < 1:
            raise ValueError(f"num_batches must be a positive integer, got {num_batches!r}")
        self.num_batches = int(num_batches)

    def set_epoch(self, epoch: int) -> None:
        """As DistributedSampler.set_epoch: a different (still deterministic) draw per epoch."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches

    def _identity_images(self, identity: int, rng: np.random.Generator) -> np.ndarray:
        samples = self.identity_samples[identity]
        q = self.images_per_identity
        if len(samples) >= q:
            return rng.choice(samples, size=q, replace=False)
        # "repeat": cycle through a shuffled copy so each image appears as evenly as possible.
        return np.resize(rng.permutation(samples), q)

    def global_batches(self) -> Iterator[List[int]]:
        """Every rank's batches of this epoch, interleaved (rank r takes r, r + world_size, ...)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        all_samples = np.arange(len(self.labels))
        sample_stream = _Stream(all_samples, rng)
        identity_stream = _Stream(np.arange(len(self.identity_samples)), rng)
        for _ in range(self.num_batches * self.world_size):
            if self.replacement:
                general = rng.choice(all_samples, size=self.general_size, replace=False)
                chosen = rng.choice(len(self.identity_samples), size=self.num_identities, replace=False)
            else:
                general = sample_stream.take(self.general_size, distinct=True)
                chosen = identity_stream.take(self.num_identities, distinct=True)
            balanced = [self._identity_images(int(i), rng) for i in chosen]
            yield np.concatenate([general, *balanced]).astype(np.int64).tolist()

    def __iter__(self) -> Iterator[List[int]]:
        for position, batch in enumerate(self.global_batches()):
            if position % self.world_size == self.rank:
                yield batch
