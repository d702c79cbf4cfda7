"""A gallery folder changed from the app: people added (several photos each), photos or people removed.

Every change holds the gallery's exclusive lock (``.handclip-studio.lock`` inside the gallery: hidden, so no scan
sees it) while readers (identify) hold it shared: a reader sees the gallery and its index before a change or
after it, never half of it. Photos are written to a temporary file in the person's folder and renamed into place
(:func:`handclip.utils.files.atomic_write`), named by their content's hash; a person is removed by renaming the
folder to a hidden name first. Person names are checked: no path separators, no ``..``, nothing unprintable."""

from __future__ import annotations

import contextlib
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from handclip.app.uploads import Upload
from handclip.data.layout import IMAGE_EXTENSIONS
from handclip.errors import HandCLIPError
from handclip.identify.results import UNKNOWN
from handclip.utils.files import printable
from handclip.utils.locks import exclusive_lock, shared_lock

LOCK_NAME = ".handclip-studio.lock"
MAX_NAME = 80


def check_person(name: str | None) -> str:
    """A person's name as a folder name of the gallery, or an error saying what is wrong with it."""
    text = (name or "").strip()
    if not text:
        raise HandCLIPError("a person's name is required")
    shown = printable(text)
    if len(text) > MAX_NAME:
        raise HandCLIPError(f"name {shown[:40]!r}...: at most {MAX_NAME} characters")
    if shown != text:
        raise HandCLIPError(f"name {shown!r}: unprintable characters are not allowed")
    if any(sep in text for sep in ("/", "\\", "\0")) or ".." in text or text.startswith((".", "~")):
        raise HandCLIPError(f"name {shown!r}: no path separators, no '..', and not starting with '.' or '~'")
    if text.lower() == UNKNOWN:
        raise HandCLIPError(f"name {shown!r}: '{UNKNOWN}' is identify's decision for no match; choose another name")
    return text


@contextlib.contextmanager
def reading(gallery: Path) -> Iterator[None]:
    """Hold the gallery shared: no change happens meanwhile (several readers at once)."""
    gallery.mkdir(parents=True, exist_ok=True)
    with shared_lock(gallery / LOCK_NAME):
        yield


@contextlib.contextmanager
def writing(gallery: Path) -> Iterator[None]:
    """Hold the gallery exclusively: no reader and no other change meanwhile."""
    gallery.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(gallery / LOCK_NAME):
        yield


def _photos(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def people(gallery: Path) -> dict[str, list[str]]:
    """Person -> their photos (paths relative to the person's folder), sorted; flat entries count as people."""
    if not gallery.is_dir():
        return {}
    out: dict[str, list[str]] = {}
    for entry in sorted(gallery.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            out[entry.name] = _photos(entry)
        elif entry.is_file() and entry.suffix.lower() in IMAGE_EXTENSIONS:
            out[entry.stem] = [entry.name]
    return out


def _known(gallery: Path, person: str) -> Path:
    """The folder of a person the gallery has (looked up among its entries, never built from the client's text)."""
    for entry in gallery.iterdir() if gallery.is_dir() else []:
        if entry.name == person and entry.is_dir() and not entry.name.startswith("."):
            return entry
    raise HandCLIPError(f"the gallery has no person {printable(person)!r} (only people enrolled through folders "
                        "can be changed here)")


def add_photos(gallery: Path, person: str, uploads: list[Upload]) -> tuple[list[Path], int]:
    """Write the photos into ``<gallery>/<person>/`` (created); (written, already there). Hold :func:`writing`."""
    person = check_person(person)
    folder = gallery / person
    if folder.exists() and not folder.is_dir():
        raise HandCLIPError(f"{printable(person)!r} is a photo of a flat gallery entry, not a person's folder")
    written, present = [], 0
    for upload in uploads:
        if (folder / upload.file_name).exists():
            present += 1
            continue
        written.append(upload.save(folder))
    return written, present


def remove_photo(gallery: Path, person: str, photo: str) -> Path:
    """Remove one photo of a person (chosen among theirs); their folder goes once empty. Hold :func:`writing`."""
    folder = _known(gallery, person)
    match = next((p for p in _photos(folder) if p == photo), None)
    if match is None:
        raise HandCLIPError(f"{printable(person)!r} has no photo {printable(str(photo))!r}")
    target = folder / match
    target.unlink()
    with contextlib.suppress(OSError):
        for parent in [target.parent, *target.parent.parents]:
            if parent == gallery:
                break
            parent.rmdir()  # stops at the first folder that is not empty
    return target


def remove_person(gallery: Path, person: str) -> int:
    """Remove a person and their photos (renamed to a hidden folder first, so no scan sees half of it); the number
    of photos removed. Hold :func:`writing`."""
    folder = _known(gallery, person)
    count = len(_photos(folder))
    hidden = gallery / f".{secrets.token_hex(6)}.removed"
    folder.rename(hidden)
    shutil.rmtree(hidden, ignore_errors=True)
    return count


def clean_removed(gallery: Path) -> None:
    """Remove what an interrupted :func:`remove_person` left (hidden ``.*.removed`` folders). Hold :func:`writing`."""
    for left in gallery.glob(".*.removed") if gallery.is_dir() else []:
        shutil.rmtree(left, ignore_errors=True)
