"""The HD protocol (PolyU contactless hand dorsal images), as MBA-Net, CLIP-HandID and CLIP-FH evaluate it.

Input: ``<raw>/1-501/<id>_<n>.jpg`` and ``<raw>/502-712/<id>_<n>.jpg`` (``<raw>`` may also be the folder
holding ``Original Images/``). The identity is the number before the first ``_`` of the file name, never
the position of a file or folder in a listing. Images of ``1-501`` with an id at or below the threshold
(447) train (``train_all``, one of each identity's images to ``val``), the others test; run ``i`` puts one
random image of each test identity in ``gallery{i}`` and the rest in ``query{i}``. Every ``gallery{i}``
also holds all images of ``502-712`` as distractors, in identity folders ``distractor_<id>``: a name no
query identity can have, so they never count as a match (MBA-Net's script adds 1000 to their ids).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from handclip.data.layout import IMAGE_EXTENSIONS
from handclip.data.split.plan import HandPlan, check_runs, check_split_sides, plan_hand
from handclip.data.split.raw import MAX_NAMED, Record
from handclip.errors import HandCLIPError

log = logging.getLogger(__name__)

HAND = "hd"
MAIN_DIR = "1-501"
DISTRACTOR_DIR = "502-712"
ORIGINAL_DIR = "Original Images"
#: Identity folders of the distractors in every gallery: ``distractor_0502`` (never a query identity).
DISTRACTOR_PREFIX = "distractor_"
_NAME_RE = re.compile(r"(\d{1,6})_.+")


@dataclass
class HDImages:
    """The images of an HD download: ``main`` (1-501) and ``distractors`` (502-712), and where each file is."""

    main: list[Record]
    distractors: list[Record]
    sources: dict[str, Path]
    notes: list[str] = field(default_factory=list)


def hd_root(raw: Path) -> Path:
    """The folder holding ``1-501/`` and ``502-712/``: ``raw`` itself or ``raw/Original Images``."""
    for cand in (raw, raw / ORIGINAL_DIR):
        if (cand / MAIN_DIR).is_dir():
            if not (cand / DISTRACTOR_DIR).is_dir():
                raise HandCLIPError(f"{cand / DISTRACTOR_DIR} not found; the HD protocol adds its images to every "
                                    f"gallery as distractors (expected next to {cand / MAIN_DIR})")
            return cand
    raise HandCLIPError(f"{str(raw)!r} holds no {MAIN_DIR}/ folder (nor {ORIGINAL_DIR}/{MAIN_DIR}/); expected the "
                        f"HD download: {ORIGINAL_DIR}/{MAIN_DIR}/<id>_<n>.jpg and {ORIGINAL_DIR}/{DISTRACTOR_DIR}/")


def identity_of(name: str) -> str:
    """The identity an HD file name gives (``12_3.jpg`` -> ``0012``), zero-padded so that folders sort by id."""
    match = _NAME_RE.fullmatch(name)
    if match is None:
        raise ValueError(name)
    return f"{int(match.group(1)):04d}"


def _read_folder(folder: Path, sources: dict[str, Path]) -> list[Record]:
    records, bad = [], []
    for name in sorted(os.listdir(folder)):
        path = folder / name
        if name.startswith(".") or path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
            continue
        try:
            identity = identity_of(name)
        except ValueError:
            bad.append(name)
            continue
        if name in sources:
            raise HandCLIPError(f"image name {name!r} is in both {sources[name].parent} and {folder}; every HD "
                                "file name must be unique")
        sources[name] = path
        records.append(Record(0, identity, HAND, name, False))
    if bad:
        more = f" and {len(bad) - MAX_NAMED} more" if len(bad) > MAX_NAMED else ""
        raise HandCLIPError(f"{len(bad)} image(s) in {folder} do not name their identity: "
                            f"{', '.join(bad[:MAX_NAMED])}{more}; expected <id>_<n>.jpg, e.g. 12_3.jpg")
    if not records:
        raise HandCLIPError(f"{folder} holds no images; expected <id>_<n>.jpg files "
                            f"(suffixes {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return records


def read_hd(raw_dir: str | Path) -> HDImages:
    """Every image of the HD download and its identity (from its file name), checked."""
    root = hd_root(Path(raw_dir).expanduser())
    sources: dict[str, Path] = {}
    main = _read_folder(root / MAIN_DIR, sources)
    distractors = _read_folder(root / DISTRACTOR_DIR, sources)
    images = HDImages(main, distractors, sources)
    both = sorted({r.identity for r in main} & {r.identity for r in distractors}, key=int)
    if both:
        images.notes.append(f"hd: {len(both)} id(s) have images in both {MAIN_DIR} and {DISTRACTOR_DIR}; as "
                            f"published, the {DISTRACTOR_DIR} ones stay distractors: {', '.join(both[:MAX_NAMED])}")
        log.warning(images.notes[-1])
    return images


def distractor_label(identity: str) -> str:
    return DISTRACTOR_PREFIX + identity


def plan_hd(images: HDImages, seed: int, runs: int, threshold: int, split: str = "threshold") -> dict[str, HandPlan]:
    """The HD split (a pure function of its arguments): the 11k rules on ``1-501``, plus the distractors."""
    check_runs(runs)
    plan = plan_hand(HAND, images.main, seed, runs, split, threshold)
    check_split_sides(plan, split, threshold)
    for rec in images.distractors:
        plan.distractors.setdefault(distractor_label(rec.identity), []).append(rec.image)
    plan.distractors = {i: sorted(v) for i, v in sorted(plan.distractors.items())}
    for run in range(runs):
        plan.splits[f"gallery{run}"].update({i: list(v) for i, v in plan.distractors.items()})  # lists not shared
    return {HAND: plan}
