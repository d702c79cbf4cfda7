"""Image decoding with the geometric half of open_clip's own evaluation preprocessing.

open_clip's eval transform is ``Resize -> CenterCrop -> convert to RGB -> ToTensor -> Normalize``.
HandCLIP runs the geometric half (everything before ``ToTensor``) here, on the CPU, and keeps the result
as a ``uint8`` ``3 x H x W`` crop (what the decode-once cache stores). The arithmetic half (``/255`` then
``Normalize``) belongs to the model (:class:`handclip.models.encoder.Normalizer`), which applies it on its
device, per batch. For RGB images the two halves together give exactly the tensor open_clip's transform
gives; other modes are converted to RGB first (open_clip converts after resizing).

The preprocessing settings (``PreprocessCfg``) come from the model: this module never looks a model up.
"""

from __future__ import annotations

from pathlib import Path

import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from torchvision.transforms import Compose, Normalize
from torchvision.transforms.functional import pil_to_tensor

from handclip.errors import HandCLIPError

#: open_clip's transform classes that turn a PIL image into a float tensor.
_TO_TENSOR_NAMES = ("ToTensor", "MaybeToTensor")


def open_clip_transform(cfg: PreprocessCfg) -> Compose:
    """open_clip's evaluation transform for ``cfg`` (no augmentation)."""
    return image_transform_v2(cfg, is_train=False)


def geometric_transform(cfg: PreprocessCfg) -> Compose:
    """The PIL -> PIL part of open_clip's eval transform (resize, center crop), cut before ``ToTensor``."""
    steps = list(open_clip_transform(cfg).transforms)
    names = [type(t).__name__ for t in steps]
    cut = next((i for i, n in enumerate(names) if n in _TO_TENSOR_NAMES), None)
    if cut is None or not isinstance(steps[-1], Normalize):
        raise RuntimeError(f"unexpected open_clip eval transform layout: {names}")
    return Compose(steps[:cut])


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
        self.geometric = geometric_transform(cfg)

    def __call__(self, path: str | Path) -> torch.Tensor:
        return pil_to_tensor(self.geometric(load_rgb(path)))
