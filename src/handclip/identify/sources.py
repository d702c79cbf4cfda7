"""Which files a gallery and a query stand for.

A gallery is a folder of ``<identity>/<image>`` folders (images may sit deeper inside an identity folder), or a
flat folder where each image is its own entry (its identity is the file name without suffix); both may be mixed.
A query is one photo, a folder (searched recursively) or a glob pattern. A query's identity is known when the
folder it sits in is named like a gallery identity (``query/<identity>/photo.jpg``).
"""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from handclip.data.layout import IMAGE_EXTENSIONS, is_image_file
from handclip.errors import HandCLIPError

log = logging.getLogger(__name__)

_EXPECTED = f"images with suffixes {', '.join(sorted(IMAGE_EXTENSIONS))}"


@dataclass(frozen=True)
class GalleryFile:
    """One gallery image: its path, its path relative to the gallery folder, and its identity."""

    path: Path
    rel: str
    identity: str


def _image_entry(path: Path) -> bool:
    """An image file, or a link with an image suffix that leads nowhere (broken or looping): kept, so that
    decoding names it and counts it as unreadable instead of leaving it out unsaid."""
    if not is_image_file(path):
        return (path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_symlink()
                and not path.exists())
    return True


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def scan_gallery(root: str | Path, min_identities: int = 2, what: str = "gallery") -> list[GalleryFile]:
    """Every image of a gallery folder, sorted; an error unless it holds ``min_identities`` identities."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise HandCLIPError(f"{what} {str(root)!r} is not a folder; expected a folder of <identity>/<image> "
                            "folders, or a flat folder where each image is its own entry")
    root = root.resolve()
    files: list[GalleryFile] = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            for image in sorted(entry.rglob("*")):
                if _image_entry(image) and _visible(image, root):
                    files.append(GalleryFile(image, image.relative_to(root).as_posix(), entry.name))
        elif _image_entry(entry):
            files.append(GalleryFile(entry, entry.name, entry.stem))
    if not files:
        raise HandCLIPError(f"{what} {str(root)!r} holds no images; expected <identity>/<image> folders or a flat "
                            f"folder of {_EXPECTED}")
    identities = sorted({f.identity for f in files})
    if len(identities) < min_identities:
        raise HandCLIPError(
            f"gallery {str(root)!r} holds {len(files)} image(s) of a single identity ({identities[0]!r}); "
            "identification ranks identities and needs at least 2 (one folder per identity, or one image per "
            "entry in a flat folder)")
    return files


def _has_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def resolve_queries(query: str | Path) -> list[Path]:
    """The query photos: one image file, every image under a folder, or every image a glob matches."""
    if query is None or str(query) == "":
        raise HandCLIPError("no query given: pass query=PHOTO, query=FOLDER or query='GLOB' (quoted)")
    text = str(query)
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            raise HandCLIPError(f"query {text!r} is not an image (expected a file with one of the suffixes "
                                f"{', '.join(sorted(IMAGE_EXTENSIONS))}, a folder or a glob)")
        return [path.resolve()]
    if path.is_dir():
        root = path.resolve()
        found = sorted(p for p in root.rglob("*") if (p.is_file() or _image_entry(p)) and _visible(p, root))
        where = f"query folder {text!r}"
    elif _has_glob(text):
        found = sorted(Path(os.path.abspath(p)) for p in glob.glob(str(path), recursive=True)
                       if Path(p).is_file() or _image_entry(Path(p)))
        where = f"query pattern {text!r}"
    else:
        raise HandCLIPError(f"query {text!r} not found (expected a photo, a folder or a glob pattern)")
    images = [p for p in found if _image_entry(p)]
    ignored = len(found) - len(images)
    if ignored:
        log.info("%s: %d file(s) without an image suffix ignored", where, ignored)
    if not images:
        raise HandCLIPError(f"{where} matches no image files ({len(found)} other file(s)); expected {_EXPECTED}")
    return images


def known_identity(query: Path, identities: set[str]) -> str | None:
    """The query's identity when the folder it sits in is named like a gallery identity, else None."""
    name = query.parent.name
    return name if name in identities else None
