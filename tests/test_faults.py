"""Faults and bad input (issue 10): real photos, kills and crashes, runs that cannot be finished, and errors
that must come out as one ``error:`` line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY, write_image
from PIL import Image

from handclip.data import cache as cache_mod
from handclip.data import images as images_mod
from handclip.data.cache import cached_crops
from handclip.data.images import MAX_ASPECT_RATIO, ImageLoader, load_rgb
from handclip.errors import HandCLIPError

# -- 1. EXIF orientation -----------------------------------------------------------------------
#: What a viewer shows for each EXIF orientation value, written out from the EXIF specification
#: (row 0 / column 0 of the stored pixels is ...): numpy operations on the stored (H, W, 3) array.
UPRIGHT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],                    # mirrored left-right
    3: lambda a: a[::-1, ::-1],                 # rotated 180
    4: lambda a: a[::-1, :],                    # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),          # mirrored along the main diagonal
    6: lambda a: a.transpose(1, 0, 2)[:, ::-1],  # stored rotated 90 counter-clockwise: turn clockwise
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # mirrored along the anti-diagonal
    8: lambda a: a.transpose(1, 0, 2)[::-1, :],  # stored rotated 90 clockwise: turn counter-clockwise
}


def _with_orientation(path, orientation: int, size=(6, 4)) -> np.ndarray:
    """Write a PNG of distinct pixels tagged with ``orientation``; return its stored pixels."""
    pixels = np.arange(size[0] * size[1] * 3, dtype=np.uint8).reshape(size[1], size[0], 3)
    img = Image.fromarray(pixels, "RGB")
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, exif=exif)
    return pixels


@pytest.mark.parametrize("orientation", sorted(UPRIGHT))
def test_exif_orientation_is_applied(tmp_path, orientation):
    stored = _with_orientation(tmp_path / "photo.png", orientation)
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "photo.png")), UPRIGHT[orientation](stored))


def test_images_without_orientation_decode_as_before(tmp_path):
    """No tag: exactly Pillow's own decode (also of a JPEG with other EXIF data)."""
    path = write_image(tmp_path / "plain.jpg", seed=3, size=(50, 30))
    exif = Image.Exif()
    exif[0x010F] = "camera maker"  # Make, no Orientation
    Image.open(path).save(tmp_path / "exif.jpg", exif=exif)
    for p in (path, tmp_path / "exif.jpg"):
        with Image.open(p) as img:
            assert np.array_equal(np.asarray(load_rgb(p)), np.asarray(img.convert("RGB")))


def test_cache_of_an_earlier_version_is_not_reused_for_oriented_photos(tmp_path, monkeypatch):
    """A cache written before orientation was applied (format 1) is ignored: the crop comes out upright."""
    path = tmp_path / "img" / "photo.png"
    path.parent.mkdir()
    _with_orientation(path, 6, size=(90, 60))
    upright = ImageLoader(TINY)(path)

    def old_load_rgb(p):  # what format 1 did: no EXIF orientation
        with Image.open(p) as img:
            return img.convert("RGB")

    with monkeypatch.context() as patch:
        patch.setattr(cache_mod, "FORMAT_VERSION", 1)
        patch.setattr(images_mod, "load_rgb", old_load_rgb)
        old = cached_crops([path], ImageLoader(TINY), tmp_path / "cache", num_workers=0, progress=False)
    assert not torch.equal(old[0], upright)
    assert torch.equal(cached_crops([path], ImageLoader(TINY), tmp_path / "cache", num_workers=0,
                                    progress=False)[0], upright)


# -- 2. degenerate shapes ----------------------------------------------------------------------
@pytest.mark.parametrize("size", [(10000, 1), (1, 3000), (MAX_ASPECT_RATIO * 20 + 1, 20)])
def test_degenerate_aspect_ratio_is_refused_before_resizing(tmp_path, size, monkeypatch):
    path = tmp_path / "strip.png"
    Image.new("RGB", size, (200, 120, 90)).save(path)
    resized = []
    monkeypatch.setattr(Image.Image, "resize", lambda self, *a, **k: resized.append(self.size))
    with pytest.raises(HandCLIPError, match=rf"strip.png.*{size[0]} x {size[1]}.*{MAX_ASPECT_RATIO}:1"):
        ImageLoader(TINY)(path)
    assert resized == []


def test_aspect_ratio_at_the_bound_is_read(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("RGB", (MAX_ASPECT_RATIO * 20, 20), (200, 120, 90)).save(path)
    assert ImageLoader(TINY)(path).shape == (3, 64, 64)


def test_too_many_pixels_is_refused_unread(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    Image.new("RGB", (400, 300), (1, 2, 3)).save(path)
    monkeypatch.setattr(images_mod, "MAX_PIXELS", 400 * 300 - 1)
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded an image over the bound"))
    with pytest.raises(HandCLIPError, match=r"huge.png.*400 x 300.*megapixels"):
        load_rgb(path)
