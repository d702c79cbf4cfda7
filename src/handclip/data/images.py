"""Image decoding with the geometric half of open_clip's own evaluation preprocessing.

open_clip's eval transform is ``Resize -> CenterCrop -> convert to RGB -> ToTensor -> Normalize``.
HandCLIP runs the geometric half (everything before ``ToTensor``) here, on the CPU, and keeps the result
as a ``uint8`` ``3 x H x W`` crop (what the decode-once cache stores). The arithmetic half (``/255`` then
``Normalize``) belongs to the model (:class:`handclip.models.encoder.Normalizer`), which applies it on its
device, per batch. For RGB images the two halves together give exactly the tensor open_clip's transform
gives; other modes are converted to RGB first (open_clip converts after resizing), 16-bit and floating-point
grayscale scaled to 8 bits (:func:`to_rgb`; Pillow alone would turn them white).

Decoding applies the EXIF orientation tag (phone and camera photos), so a crop shows the hand the way
it was photographed; images without the tag decode exactly as Pillow reads them. Images whose shape
would make preprocessing blow up (resizing the short side of a 10000 x 1 image to 224 px makes it
2.2M x 224) are refused before anything is resized: see :data:`MAX_ASPECT_RATIO` and :data:`MAX_PIXELS`.

``decode="draft"`` (identify, ``export format=embeddings`` and the Python API only, never training or evaluation)
decodes a JPEG at a reduced scale (1/2, 1/4 or 1/8: Pillow's draft mode, libjpeg's DCT scaling), the largest
reduction that keeps its short side at least :data:`DRAFT_MARGIN` times the model's input size, so the resize
that follows still shrinks it; other formats decode in full. It is 3x cheaper on a 1600x1200 photo for ViT-B/32
(800x600 instead of 1600x1200), with embeddings that differ slightly (README "Fast CPU inference").

The preprocessing settings (``PreprocessCfg``) come from the model: this module never looks a model up.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image, ImageOps
from torchvision.transforms import Compose, Normalize
from torchvision.transforms.functional import pil_to_tensor

from handclip.errors import HandCLIPError

#: open_clip's transform classes that turn a PIL image into a float tensor.
_TO_TENSOR_NAMES = ("ToTensor", "MaybeToTensor")
#: Longest side / shortest side beyond which an image is refused (11k Hands photos are 4:3).
MAX_ASPECT_RATIO = 10
#: Decoded size (width x height) beyond which an image is refused: 100 megapixels (300 MB as RGB).
MAX_PIXELS = 100_000_000
#: ``decode=``: ``full`` (always, for training and evaluation) or ``draft`` (JPEGs at a reduced scale).
DECODE_MODES = ("full", "draft")
#: A draft-decoded JPEG keeps its short side at least this many times the model's input size (1 would decode a
#: 1600x1200 photo at 400x300 for ViT-B/32, 2x cheaper again, but 3x further from full decoding's embeddings).
DRAFT_MARGIN = 2


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


def check_image_shape(path: str | Path, size: tuple[int, int]) -> None:
    """Refuse an image whose decoded size or aspect ratio is beyond the stated bounds (before decoding it)."""
    width, height = size
    if width * height > MAX_PIXELS:
        raise HandCLIPError(
            f"image {str(path)!r} is {width} x {height} pixels ({width * height / 1e6:.0f} megapixels); images of "
            f"at most {MAX_PIXELS // 1_000_000} megapixels are read")
    if min(width, height) < 1 or max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise HandCLIPError(
            f"image {str(path)!r} is {width} x {height} pixels; its aspect ratio is beyond the "
            f"{MAX_ASPECT_RATIO}:1 that HandCLIP reads (resizing its short side to the model's input would "
            "take gigabytes). Remove or crop it")


def to_rgb(img: Image.Image, path: str | Path) -> Image.Image:
    """``img`` (any mode Pillow opens) as 8-bit RGB with its brightness kept.

    Pillow's own ``convert("RGB")`` clips high-bit-depth grayscale: a 16-bit photo (mode ``I;16``, PNG and TIFF)
    comes out blank white. 16-bit values (``I;16*``, and ``I`` holding 0..65535) are scaled to 0..255, and
    floating-point ones (``F``) holding 0..1 likewise; an ``I`` or ``F`` image with other values has no agreed
    brightness scale and is refused, naming ``path``. Other modes (1, L, LA, P, PA, RGBA, CMYK, YCbCr, LAB, HSV...)
    go through Pillow's conversion; one that Pillow cannot convert is refused, naming ``path``.
    """
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        values = np.asarray(img, dtype=np.float64)
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        top = 1.0 if img.mode == "F" else 65535.0
        if not (np.isfinite(low) and np.isfinite(high) and low >= 0 and high <= top):
            raise HandCLIPError(
                f"image {str(path)!r} is a {'floating-point' if img.mode == 'F' else '32-bit integer'} image "
                f"(mode {img.mode}) with values from {low:g} to {high:g}; expected values from 0 to {top:g}: "
                "save it as an 8- or 16-bit image")
        img = Image.fromarray(np.rint(values * (255.0 / top)).astype(np.uint8), "L")
    error = None
    for steps in (("RGB",), ("LA", "RGB"), ("RGBA", "RGB")):  # La (premultiplied alpha) converts only through LA
        try:
            for mode in steps:
                img = img.convert(mode)
            return img
        except ValueError as err:
            error = error or err
    raise HandCLIPError(f"cannot read image {str(path)!r}: its mode {img.mode} cannot be converted to RGB ({error})")


def check_decode(decode: str) -> str:
    """``decode`` if it is one of :data:`DECODE_MODES`, else one error line."""
    if decode not in DECODE_MODES:
        raise HandCLIPError(f"decode={decode!r}: choose one of {', '.join(DECODE_MODES)}")
    return decode


def draft_side(cfg: PreprocessCfg) -> int:
    """The short side (pixels) a draft-decoded JPEG keeps at least: :data:`DRAFT_MARGIN` x the model's input."""
    return DRAFT_MARGIN * max(int(v) for v in cfg.input_size[1:])


def load_rgb(path: str | Path, min_side: int | None = None) -> Image.Image:
    """Decode an image, turn it upright by its EXIF orientation and convert it to RGB (grayscale, RGBA,
    CMYK, palette, 16-bit...: :func:`to_rgb`). Images beyond :data:`MAX_PIXELS` or :data:`MAX_ASPECT_RATIO` are
    refused unread. ``min_side``: a JPEG is decoded at the smallest scale (1/1, 1/2, 1/4, 1/8) whose short side
    is still at least ``min_side`` (Pillow's draft mode); None, or another format: in full."""
    try:
        with warnings.catch_warnings():  # the size check below gives a clear error instead of a warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            check_image_shape(path, img.size)
            if min_side:
                img.draft(None, (min_side, min_side))  # JPEG only; scale s <= short side // min_side
            img.load()
            ImageOps.exif_transpose(img, in_place=True)
            return to_rgb(img, path)
    except Image.DecompressionBombError:
        raise HandCLIPError(f"image {str(path)!r} is larger than {MAX_PIXELS // 1_000_000} megapixels, the most "
                            "that is read") from None
    except HandCLIPError:
        raise
    except Exception as err:  # any decoder failure (OSError, SyntaxError, struct.error...) of a bad file
        raise HandCLIPError(f"cannot read image {str(path)!r}: {err or type(err).__name__}") from None


class ImageLoader:
    """Picklable ``path -> uint8 (3, H, W)`` crop, exactly open_clip's resize + center crop; ``decode="draft"``:
    of a JPEG decoded at a reduced scale (see the module; never for training or evaluation)."""

    def __init__(self, cfg: PreprocessCfg, decode: str = "full"):
        self.cfg, self.decode = cfg, check_decode(decode)
        self.min_side = draft_side(cfg) if decode == "draft" else None
        self.geometric = geometric_transform(cfg)

    def __call__(self, path: str | Path) -> torch.Tensor:
        return pil_to_tensor(self.geometric(load_rgb(path, self.min_side)))
