"""Datasets and loaders of uint8 crops: decoded on the fly, from an in-memory or memory-mapped tensor, or
sliced on the training device."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.data import BatchSampler, Dataset, RandomSampler, SequentialSampler

from handclip.errors import HandCLIPError


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


class UnreadableTolerantDataset(ImageDataset):
    """:class:`ImageDataset` over any files, labelled by position: ``(index, crop, None)`` for a file that decodes,
    ``(index, None, error line)`` for one that does not, so that a bad file does not stop its batch
    (identify, ``export format=embeddings``, the Python API). Collate with :func:`collate_readable`."""

    def __init__(self, paths: Sequence[Path], loader: Callable[[Path], torch.Tensor]):
        super().__init__(paths, range(len(paths)), loader)

    def __getitem__(self, index: int):
        try:
            return index, self.loader(self.paths[index]), None
        except HandCLIPError as err:
            return index, None, str(err)


def collate_readable(batch):
    """``(indices of the decoded files, their crops stacked or None, [(index, error line)] of the others)``."""
    good = [(i, crop) for i, crop, _ in batch if crop is not None]
    bad = [(i, err) for i, crop, err in batch if crop is None]
    return [i for i, _ in good], (torch.stack([c for _, c in good]) if good else None), bad


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


class IndexedDataset(Dataset):
    """``dataset`` whose items (and ``__getitems__`` batches) also carry their index: ``(image, label, index)``.

    Evaluation loaders use it so that results gathered from several processes can be put back in dataset
    order and the duplicates a ``DistributedSampler`` pads with can be dropped.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return (*self.dataset[index], index)

    def __getitems__(self, indices: list[int]):
        if hasattr(self.dataset, "__getitems__"):  # a whole batch at once (collated by batch_collate)
            return (*self.dataset.__getitems__(indices), torch.as_tensor(indices, dtype=torch.long))
        return [self[i] for i in indices]  # items, for the default collate


class DeviceBatchLoader:
    """Batches sliced from (uint8 images, labels) tensors that already live on the training device.

    When a whole cached split fits in GPU memory (all of 11k Hands at 224 px is 1.55 GiB), drawing
    batches there needs no DataLoader workers, no pinned copies and no host-to-device transfer.
    ``batch_sampler`` gives the indices of each batch, as it would to a DataLoader (the data module passes
    one over a ``DistributedSampler`` under DDP: Lightning calls its ``set_epoch``); by default, shuffled
    (torch's global RNG, seeded by ``seed_everything``) or in order. With ``with_index`` every batch also
    carries its indices.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1, shuffle: bool = False,
                 batch_sampler=None, with_index: bool = False):
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        self.images, self.labels = images, labels.to(images.device)
        if batch_sampler is None:
            indices = range(images.shape[0])
            sampler = RandomSampler(indices) if shuffle else SequentialSampler(indices)
            batch_sampler = BatchSampler(sampler, batch_size, drop_last=False)
        self.batch_sampler = batch_sampler
        self.with_index = with_index

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self):
        for indices in self.batch_sampler:
            index = torch.as_tensor(indices, dtype=torch.long).to(self.images.device)
            batch = (self.images[index], self.labels[index])
            yield (*batch, index) if self.with_index else batch
