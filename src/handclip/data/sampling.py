"""Batches of dataset indices for one process of a (possibly distributed) run.

Lightning gives every process a share of each loader by injecting a :class:`DistributedSampler`
(``Trainer(use_distributed_sampler=True)``, its default). That sampler pads the data with repeated
indices so that every process gets as many: right for evaluation (the duplicates are dropped after
gathering), wrong for training, where it would show a few images twice in every epoch.
:class:`EveryImageOnceBatchSampler` keeps the sampler's seeded order, rank and epoch but cuts it without
padding, so that each epoch shows every training image exactly once across all processes while every
process runs the same number of steps (DDP steps together).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import BatchSampler, DistributedSampler, Sampler


class EveryImageOnceBatchSampler(BatchSampler):
    """A :class:`BatchSampler`; under a :class:`DistributedSampler` (injected by Lightning), this process's
    batches of an epoch in which every index appears exactly once across processes.

    The epoch's order is the distributed sampler's (its seed, epoch and shuffle; one permutation shared by
    all processes). It is cut into global batches of ``batch_size x world size`` indices, and process
    ``r`` takes every ``world size``-th index of each, starting at ``r``. A last global batch with fewer
    indices than processes joins the one before it (a few processes then take ``batch_size + 1``), so no
    process ever gets an empty batch and all take the same number of steps. Without a distributed
    sampler this is a plain ``BatchSampler``.
    """

    def __init__(self, sampler: Sampler[int], batch_size: int, drop_last: bool = False):
        super().__init__(sampler, batch_size, drop_last)

    def _windows(self) -> list[torch.Tensor]:
        sampler = self.sampler
        assert isinstance(sampler, DistributedSampler)
        world = sampler.num_replicas
        # The order all processes share: the same sampler seen by a single process (no padding).
        whole = DistributedSampler(sampler.dataset, num_replicas=1, rank=0, shuffle=sampler.shuffle, seed=sampler.seed)
        whole.set_epoch(sampler.epoch)
        order = torch.as_tensor(list(whole), dtype=torch.long)
        if len(order) < world:
            raise ValueError(f"{len(order)} images cannot be shared by {world} processes (one image each at least)")
        size = self.batch_size * world
        windows = list(order.split(size))
        if self.drop_last and len(windows[-1]) < size and len(windows) > 1:
            windows.pop()
        elif len(windows) > 1 and len(windows[-1]) < world:
            windows[-2:] = [torch.cat(windows[-2:])]
        return windows

    def __iter__(self) -> Iterator[list[int]]:
        if not isinstance(self.sampler, DistributedSampler):
            yield from super().__iter__()
            return
        rank, world = self.sampler.rank, self.sampler.num_replicas
        for window in self._windows():
            yield window[rank::world].tolist()

    def __len__(self) -> int:
        if not isinstance(self.sampler, DistributedSampler):
            return super().__len__()
        return len(self._windows())


class PKBatchSampler(BatchSampler):
    """Identity-balanced batches (``data.sampler=pk``): ``identities`` (P) identities x ``images`` (K) images each.

    Each epoch, every identity's images are shuffled and cut into groups of K; a last incomplete group is filled
    with other images of the same identity drawn without replacement, and an identity with fewer than K images
    is drawn with replacement (all of its images first). So every image appears at least once per epoch, and
    only as often as filling whole groups needs. A global batch takes one group each from the ``P x world size``
    identities with the most groups left (ties broken at random), so its identities are distinct and the epoch
    has as few batches as that allows (short ones only at its end, when few identities have groups left); the
    global batches are then shuffled. Process ``r`` of a run on ``world size`` processes takes every
    ``world size``-th group of each global batch, starting at ``r``: whole groups, never split. Global batches
    with fewer groups than processes are joined (with each other, the last with the one before), so every process
    gets a non-empty batch and all take the same number of steps.

    The order is seeded: under a :class:`DistributedSampler` (injected by Lightning) by its seed and epoch (the
    same on every process); otherwise by torch's global generator (``seed_everything``), like a
    :class:`RandomSampler`. ``batch_size`` is P x K (the size of a full batch of one process).
    """

    def __init__(self, sampler: Sampler[int], batch_size: int, drop_last: bool = False,
                 labels: Sequence[int] = (), identities: int = 16, images: int = 4):
        super().__init__(sampler, batch_size, drop_last)
        if identities < 1 or images < 1:
            raise ValueError(f"P and K must be >= 1, got P={identities}, K={images}")
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)
        self.identities, self.images = int(identities), int(images)
        self._by_identity = [torch.nonzero(self.labels == c).flatten() for c in torch.unique(self.labels)]
        self._groups = [max(1, -(-len(members) // self.images)) for members in self._by_identity]
        self._cached: tuple[tuple, list[list[int]]] | None = None

    def _world(self) -> tuple[int, int]:
        if isinstance(self.sampler, DistributedSampler):
            return self.sampler.rank, self.sampler.num_replicas
        return 0, 1

    def _shape(self, world: int) -> list[int]:
        """How many groups each global batch takes, in the order built (depends on the group counts only)."""
        left = sorted(self._groups, reverse=True)
        sizes = []
        while left and left[0]:
            take = min(self.identities * world, sum(1 for n in left if n))
            sizes.append(take)
            left = sorted([n - 1 for n in left[:take]] + left[take:], reverse=True)
        return sizes

    @staticmethod
    def _joined(sizes: list[int], world: int) -> list[list[int]]:
        """Which built global batches form each final one: short ones (fewer groups than processes) are joined
        to the one before them until it has enough; a short first one takes the next."""
        joined: list[list[int]] = []
        count: list[int] = []
        for i, size in enumerate(sizes):
            if joined and count[-1] < world:
                joined[-1].append(i)
                count[-1] += size
            else:
                joined.append([i])
                count.append(size)
        if len(joined) > 1 and count[-1] < world:
            joined[-2:] = [joined[-2] + joined[-1]]
        return joined

    def _global_batches(self, generator: torch.Generator, world: int) -> list[list[torch.Tensor]]:
        groups = []  # per identity: its groups of K indices, in a random order
        for members in self._by_identity:
            order = members[torch.randperm(len(members), generator=generator)]
            if len(order) < self.images:
                extra = order[torch.randint(len(order), (self.images - len(order),), generator=generator)]
            else:
                short = -len(order) % self.images
                pool = order[: len(order) - (self.images - short) if short else 0]
                extra = pool[torch.randperm(len(pool), generator=generator)[:short]]
            groups.append(list(torch.cat([order, extra]).split(self.images)))
        left = torch.tensor([len(g) for g in groups], dtype=torch.float64)
        batches = []
        while bool((left > 0).any()):
            take = min(self.identities * world, int((left > 0).sum()))
            keys = left + torch.rand(len(left), generator=generator, dtype=torch.float64) * 0.5  # ties: random
            chosen = torch.topk(keys, take).indices.tolist()
            batches.append([groups[i][int(left[i]) - 1] for i in chosen])
            left[chosen] -= 1
        batches = [[g for i in part for g in batches[i]] for part in self._joined([len(b) for b in batches], world)]
        order = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in order]

    def _batches(self) -> list[list[int]]:
        rank, world = self._world()
        if isinstance(self.sampler, DistributedSampler):
            key = (self.sampler.seed, self.sampler.epoch, rank, world)
            if self._cached is not None and self._cached[0] == key:
                return self._cached[1]
            generator = torch.Generator().manual_seed(self.sampler.seed + self.sampler.epoch)
        else:
            key = None
            generator = torch.Generator().manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))
        if sum(self._groups) < world:
            raise ValueError(f"{sum(self._groups)} identity groups cannot be shared by {world} processes")
        out = [torch.cat(batch[rank::world]).tolist() for batch in self._global_batches(generator, world)]
        if key is not None:
            self._cached = (key, out)
        return out

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._batches()

    def __len__(self) -> int:
        _, world = self._world()
        return len(self._joined(self._shape(world), world))
