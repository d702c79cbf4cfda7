"""Image decoding with open_clip's own evaluation preprocessing, split into two halves.

open_clip's eval transform is ``Resize -> CenterCrop -> convert to RGB -> ToTensor -> Normalize``.
HandCLIP runs the geometric half (everything before ``ToTensor``) on the CPU and keeps the result as a
``uint8`` ``3 x H x W`` crop (what the decode-once cache stores), and the arithmetic half
(``/255`` then ``Normalize``) on the device, per batch. For RGB images the two halves together give
exactly the tensor open_clip's transform gives; other modes are converted to RGB first (open_clip
converts after resizing).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import Compose, Normalize
from torchvision.transforms.functional import pil_to_tensor

from handclip.errors import HandCLIPError

#: open_clip's transform classes that turn a PIL image into a float tensor.
_TO_TENSOR_NAMES = ("ToTensor", "MaybeToTensor")


def open_clip_transform(cfg: PreprocessCfg) -> Compose:
    """open_clip's evaluation transform for ``cfg`` (no augmentation)."""
    return image_transform_v2(cfg, is_train=False)


def split_transform(cfg: PreprocessCfg) -> tuple[Compose, Normalize]:
    """Split open_clip's eval transform into (PIL -> PIL geometric part, Normalize)."""
    steps = list(open_clip_transform(cfg).transforms)
    names = [type(t).__name__ for t in steps]
    cut = next((i for i, n in enumerate(names) if n in _TO_TENSOR_NAMES), None)
    normalize = steps[-1]
    if cut is None or not isinstance(normalize, Normalize):
        raise RuntimeError(f"unexpected open_clip eval transform layout: {names}")
    return Compose(steps[:cut]), normalize


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image fully and convert it to RGB (grayscale, RGBA, CMYK, palette...)."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise HandCLIPError(f"cannot read image {str(path)!r}: {err}") from None


class ImageLoader:
    """Picklable ``path -> uint8 (3, H, W)`` crop, exactly open_clip's resize + center crop."""

    def __init__(self, cfg: PreprocessCfg):
        self.cfg = cfg
        self.geometric, _ = split_transform(cfg)

    def __call__(self, path: str | Path) -> torch.Tensor:
        return pil_to_tensor(self.geometric(load_rgb(path)))


class Normalizer(torch.nn.Module):
    """uint8 (or float in [0, 255]) batches -> open_clip's normalised float batches, on any device."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            images = images.to(torch.float32).div(255)
        # Same operations, in the same order, as ToTensor + torchvision's Normalize: bit-identical.
        return images.sub(self.mean).div(self.std)


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
