"""Uploaded photos checked by their content, never by their name: size, count, a decodable image of an accepted
format (the project's decoder, :func:`handclip.data.images.load_rgb`: EXIF orientation applied, decompression
bombs and extreme aspect ratios refused), not over-large, not degenerate. An accepted photo is kept as its bytes
and named by its SHA-256 and its decoded format; the client's file name is only ever shown, escaped."""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from handclip.app.settings import Limits
from handclip.data.images import load_rgb
from handclip.errors import HandCLIPError
from handclip.utils.files import atomic_write, printable

#: Pillow's format name -> the suffix a saved copy gets (formats the project's decoder reads).
SUFFIXES = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp"}
#: Decoded pixels beyond which an upload is refused before decoding (RGB: 3 bytes each).
MAX_UPLOAD_PIXELS = 40_000_000
#: Longest side of the thumbnails shown on the page.
THUMB_SIDE = 192


@dataclass
class Upload:
    """An accepted photo: the client's name (display only), its bytes, their SHA-256, a suffix from its format."""

    label: str
    data: bytes
    digest: str
    suffix: str

    @property
    def file_name(self) -> str:
        """The name a saved copy gets: content, not the client's name."""
        return f"{self.digest[:24]}{self.suffix}"

    def save(self, folder: Path, name: str | None = None) -> Path:
        """Write the bytes into ``folder`` atomically (temporary file in the same folder, then a rename)."""
        folder.mkdir(parents=True, exist_ok=True)
        return atomic_write(folder / (name or self.file_name), self.data)


def label_of(path: str | Path) -> str:
    """What the page shows for an upload: its base name, escaped, at most 80 characters."""
    name = printable(Path(str(path)).name) or "(unnamed)"
    return name if len(name) <= 80 else name[:77] + "..."


def check_upload(path: str | Path, limits: Limits) -> Upload:
    """One uploaded file, checked by content; a :class:`HandCLIPError` naming it (by its label) otherwise."""
    label = label_of(path)
    path = Path(str(path))
    try:
        size = path.stat().st_size
    except OSError:
        raise HandCLIPError(f"{label}: the upload could not be read") from None
    if size > limits.max_file_bytes:
        raise HandCLIPError(f"{label}: {size / 2**20:.1f} MB, over the {limits.max_file_bytes / 2**20:g} MB a file "
                            "may have")
    if size == 0:
        raise HandCLIPError(f"{label}: the file is empty")
    data = path.read_bytes()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:  # the header only: format and size, nothing decoded yet
                fmt, (width, height) = img.format, img.size
    except Image.DecompressionBombError:
        raise HandCLIPError(f"{label}: a decompression bomb (its header claims far too many pixels)") from None
    except Exception:  # noqa: BLE001 - any decoder failure: not an image
        raise HandCLIPError(f"{label}: not an image (expected a JPEG, PNG, BMP, TIFF or WebP photo)") from None
    if fmt not in SUFFIXES:
        raise HandCLIPError(f"{label}: a {fmt} image; expected a JPEG, PNG, BMP, TIFF or WebP photo")
    if width * height > MAX_UPLOAD_PIXELS:
        raise HandCLIPError(f"{label}: {width} x {height} pixels, over the {MAX_UPLOAD_PIXELS // 10**6} megapixels "
                            "a photo may have")
    if min(width, height) < limits.min_side:
        raise HandCLIPError(f"{label}: {width} x {height} pixels, too small (at least {limits.min_side} pixels a "
                            "side)")
    try:
        load_rgb(path)  # the whole decode, as identify will do it: truncated data, odd modes, extreme shapes
    except HandCLIPError as err:
        raise HandCLIPError(f"{label}: {str(err).replace(repr(str(path)), 'the photo')}") from None
    return Upload(label=label, data=data, digest=hashlib.sha256(data).hexdigest(), suffix=SUFFIXES[fmt])


def check_uploads(paths: list, limits: Limits, max_files: int) -> tuple[list[Upload], list[str]]:
    """The accepted uploads and one message per refused one; over ``max_files`` files: all refused, one message."""
    paths = [p for p in (paths or []) if p]
    if len(paths) > max_files:
        return [], [f"{len(paths)} files at once; at most {max_files} are taken (send them in parts)"]
    accepted, messages = [], []
    for path in paths:
        try:
            accepted.append(check_upload(path, limits))
        except HandCLIPError as err:
            messages.append(str(err))
    return accepted, messages


def thumbnail(source: Path, out: Path, side: int = THUMB_SIDE) -> Path:
    """A small JPEG of an image (upright by its EXIF orientation) for the page; written atomically."""
    import io

    img = load_rgb(source)
    img.thumbnail((side, side))
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=85)
    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(out, buffer.getvalue(), durable=False)
