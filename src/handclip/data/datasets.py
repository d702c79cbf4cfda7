"""Datasets and loaders of uint8 crops: decoded on the fly, from an in-memory or memory-mapped tensor, or
sliced on the training device."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset


class ImageDataset(Dataset):
    """(uint8 crop, label) pairs decoded on the fly from image files."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int], loader: Callable[[Path], torch.Tensor]):
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths = list(paths)
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)
        self.loader = loader

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loader(self.paths[index]), self.labels[index]


class TensorImageDataset(Dataset):
    """(uint8 crop, label) pairs served from an in-memory (or memory-mapped) uint8 tensor.

    ``__getitems__`` returns whole batches with one indexing operation instead of per-item copies.
    """

    def __init__(self, images: torch.Tensor, labels: Sequence[int]):
        if images.shape[0] != len(labels):
            raise ValueError(f"{images.shape[0]} images but {len(labels)} labels")
        self.images = images
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.images[idx], self.labels[idx]


def batch_collate(batch):
    """Collate for datasets whose ``__getitems__`` already returns a batch."""
    return batch


class DeviceBatchLoader:
    """Batches sliced from (uint8 images, labels) tensors that already live on the training device.

    When a whole cached split fits in GPU memory (all of 11k Hands at 224 px is 1.55 GiB), drawing
    batches there needs no DataLoader workers, no pinned copies and no host-to-device transfer. The
    shuffle order comes from torch's global RNG (seeded by ``seed_everything``), one permutation per epoch.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool):
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        self.images, self.labels = images, labels.to(images.device)
        self.batch_size, self.shuffle = batch_size, shuffle

    def __len__(self) -> int:
        return -(-self.images.shape[0] // self.batch_size)

    def __iter__(self):
        n = self.images.shape[0]
        order = torch.randperm(n) if self.shuffle else torch.arange(n)
        order = order.to(self.images.device)
        for start in range(0, n, self.batch_size):
            index = order[start:start + self.batch_size]
            yield self.images[index], self.labels[index]
