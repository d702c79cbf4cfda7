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

from collections.abc import Iterator

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
