"""Discover the 11k Hands split layout on disk and list (image path, identity) for any split.

The layout, one folder per hand type under a data root::

    <root>/train_val_test_split_dorsal_r/
        train_all/<identity>/<image>     train + val together
        train/<identity>/*               training images
        val/<identity>/*                 one image per training identity
        test/<identity>/*                test identities (disjoint from train)
        query0..9/<identity>/*           all test images of an identity but one
        gallery0..9/<identity>/*         the remaining image per test identity

A single ``query/`` + ``gallery/`` pair is accepted as one Monte Carlo run.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from handclip.errors import HandCLIPError
from handclip.hands import HAND_DIR_PREFIX, HAND_TYPES, hand_dir_name

log = logging.getLogger(__name__)

#: File suffixes (lower case) read as images; anything else in an identity folder is ignored.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})

#: At most this many offending paths are named in one message.
MAX_NAMED = 5

_RUN_RE = re.compile(r"^(query|gallery)(\d*)$")


@dataclass(frozen=True)
class Sample:
    """One image and the identity (folder name) it belongs to."""

    path: Path
    identity: str


@dataclass(frozen=True)
class HandLayout:
    """What exists on disk for one hand type."""

    hand: str
    path: Path
    splits: tuple[str, ...]
    runs: tuple[tuple[str, str], ...] = field(default=())
    """(query split, gallery split) pairs, in run order: ("query0", "gallery0"), ..."""


def is_image_file(path: Path) -> bool:
    """True for a regular, non-hidden file with an image suffix (any case)."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def _check_root(root: str | Path) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise HandCLIPError(
            f"data root {str(root)!r} does not exist or is not a folder; expected folders named "
            f"{HAND_DIR_PREFIX}<{'|'.join(HAND_TYPES.values())}>. Create them from the 11k Hands (or HD) "
            "download with `python -m handclip.prepare [--dataset hd] --raw DIR --out DIR`, or run `make demo` for "
            "synthetic data."
        )
    return root


def available_hands(root: str | Path) -> list[str]:
    """Hand types whose folder exists under ``root``, in HAND_TYPES order."""
    root = _check_root(root)
    return [hand for hand in HAND_TYPES if (root / hand_dir_name(hand)).is_dir()]


def hand_path(root: str | Path, hand: str) -> Path:
    """The folder of one hand type; a clear error lists the hand folders found when it is missing."""
    root = _check_root(root)
    path = root / hand_dir_name(hand)
    if not path.is_dir():
        found = [p.name for p in sorted(root.iterdir()) if p.is_dir() and p.name.startswith(HAND_DIR_PREFIX)]
        raise HandCLIPError(
            f"hand folder {str(path)!r} for hand type {hand!r} not found; hand folders found under "
            f"{str(root)!r}: {', '.join(found) if found else 'none'}"
        )
    return path


def _find_runs(splits: list[str]) -> tuple[tuple[str, str], ...]:
    """Pair ``query{i}`` with ``gallery{i}`` (or ``query`` with ``gallery``); a lone half is an error."""
    queries: dict[str, str] = {}
    galleries: dict[str, str] = {}
    for name in splits:
        match = _RUN_RE.match(name)
        if match:
            (queries if match.group(1) == "query" else galleries)[match.group(2)] = name
    missing = sorted(set(queries) ^ set(galleries))
    if missing:
        lone = [queries.get(k) or galleries.get(k) for k in missing]
        wanted = [f"gallery{k}" if k in queries else f"query{k}" for k in missing]
        raise HandCLIPError(
            f"Monte Carlo run folder(s) {', '.join(lone)} found without the matching "
            f"{', '.join(wanted)}; every query{{i}} needs its gallery{{i}}"
        )
    keys = sorted(queries, key=lambda k: (k != "", int(k) if k else -1))
    return tuple((queries[k], galleries[k]) for k in keys)


def discover_hand(root: str | Path, hand: str) -> HandLayout:
    """Describe the splits and Monte Carlo runs present for one hand type."""
    path = hand_path(root, hand)
    splits = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    return HandLayout(hand=hand, path=path, splits=tuple(splits), runs=_find_runs(splits))


def _broken_link(path: Path) -> bool:
    """A symbolic link whose target does not exist (or cannot be reached)."""
    return path.is_symlink() and not path.exists()


def _check_no_broken_links(split_dir: Path, broken: list[Path]) -> None:
    """An image or identity folder that is a dangling link is an error (skipping it would lose data silently)."""
    if not broken:
        return
    named = ", ".join(f"{p.relative_to(split_dir)} -> {os.readlink(p)}" for p in broken[:MAX_NAMED])
    more = f" and {len(broken) - MAX_NAMED} more" if len(broken) > MAX_NAMED else ""
    raise HandCLIPError(
        f"split folder {str(split_dir)!r} holds {len(broken)} broken link(s) whose target does not exist: "
        f"{named}{more}; restore their targets or remove the links")


def list_split(root: str | Path, hand: str, split: str, *, allow_empty: bool = False) -> list[Sample]:
    """List (image path, identity) of one split, sorted by identity then file name.

    Non-image files (``.DS_Store``, ``Thumbs.db``...) and empty identity folders are skipped. An image or
    identity folder that is a broken symbolic link is an error naming it.
    """
    split_dir = hand_path(root, hand) / split
    if not split_dir.is_dir():
        present = sorted(p.name for p in split_dir.parent.iterdir() if p.is_dir())
        raise HandCLIPError(
            f"split folder {str(split_dir)!r} not found; splits present: {', '.join(present) or 'none'}"
        )
    samples, broken = [], []
    for entry in sorted(p for p in split_dir.iterdir() if not p.name.startswith(".")):
        if _broken_link(entry):
            broken.append(entry)
        if not entry.is_dir():
            continue
        for image in sorted(entry.iterdir()):
            if is_image_file(image):
                samples.append(Sample(image, entry.name))
            elif _broken_link(image) and not image.name.startswith("."):
                broken.append(image)
    _check_no_broken_links(split_dir, broken)
    if not samples and not allow_empty:
        raise HandCLIPError(
            f"split folder {str(split_dir)!r} holds no images; expected <identity>/<image> files "
            f"with suffixes {', '.join(sorted(IMAGE_EXTENSIONS))}"
        )
    return samples


def class_mapping(train: list[Sample]) -> list[str]:
    """The sorted training identities; identity ``classes[i]`` gets label ``i``."""
    return sorted({s.identity for s in train})


def drop_unknown_identities(samples: list[Sample], classes: list[str], split: str) -> list[Sample]:
    """Drop samples whose identity is not a training class, with a warning naming each image."""
    known = set(classes)
    kept = [s for s in samples if s.identity in known]
    for s in samples:
        if s.identity not in known:
            log.warning("%s image %s: identity %r has no training images; dropped", split, s.path, s.identity)
    return kept
