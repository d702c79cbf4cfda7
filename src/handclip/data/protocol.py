"""The published 11k Hands evaluation protocol, reproducible: raw download -> split folders.

Input: ``<raw>/HandInfo.csv`` and ``<raw>/Hands/*.jpg`` as downloaded. Output, per hand type,
``<out>/train_val_test_split_<dorsal_r|dorsal_l|palmar_r|palmar_l>/`` with::

    train_all/<id>/<image>     train + val (identities at or below the hand's id threshold)
    train/<id>/...             training images
    val/<id>/...               one image per training identity (none for single-image identities)
    test/<id>/...              test identities (above the threshold), disjoint from train
    query{i}/<id>/...          run i: all test images of an identity but one
    gallery{i}/<id>/...        run i: the remaining image of each test identity
    gallery{i}_all/<id>_<suffix>/...  (--cross-aspect) the four hand types' gallery{i} merged

plus ``<out>/split_info.json`` describing the split. Images with accessories are left out. Every random
choice comes from ``random.Random`` seeded by the seed and the hand type, so one seed always gives the
same split. Output is built in a temporary sibling folder, checked, and only then moved into place.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from handclip.data.layout import HAND_DIR_PREFIX, HAND_TYPES, hand_dir_name
from handclip.errors import HandCLIPError

log = logging.getLogger(__name__)

#: Published protocol: ids at or below the threshold go to train_all, the rest to test.
DEFAULT_THRESHOLDS: dict[str, int] = {
    "dorsal_right": 1050,
    "dorsal_left": 1037,
    "palmar_right": 1051,
    "palmar_left": 1042,
}
DEFAULT_RUNS = 10
SPLIT_MODES = ("threshold", "half")
CSV_NAME = "HandInfo.csv"
IMAGES_DIR = "Hands"
INFO_NAME = "split_info.json"
REQUIRED_COLUMNS = ("id", "accessories", "aspectOfHand", "imageName")
#: ``aspectOfHand`` values (lower case) -> hand type.
ASPECT_TO_HAND: dict[str, str] = {hand.replace("_", " "): hand for hand in HAND_TYPES}
_ID_RE = re.compile(r"\d{1,7}")
_MAX_NAMED = 5

Assignment = dict[str, dict[str, list[str]]]  # split -> identity folder -> image names


# --------------------------------------------------------------------------------------------------
# Reading and checking the raw download
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """One row of HandInfo.csv."""

    line: int
    identity: str  # 7-digit id
    hand: str  # HAND_TYPES key
    image: str
    accessories: bool


def _row_error(csv_path: Path, line: int, message: str) -> HandCLIPError:
    return HandCLIPError(f"{csv_path}: line {line}: {message}")


def _parse_row(csv_path: Path, line: int, row: Mapping[str | None, str | None], n_columns: int) -> Record:
    if None in row or any(v is None for v in row.values()):
        found = n_columns + len(row.get(None) or []) - sum(v is None for v in row.values())  # type: ignore[arg-type]
        raise _row_error(csv_path, line, f"expected {n_columns} columns, found {found}")
    raw_id = (row["id"] or "").strip()
    if not _ID_RE.fullmatch(raw_id):
        raise _row_error(csv_path, line, f"bad id {raw_id!r}; expected a number of up to 7 digits, e.g. 0000123")
    aspect = " ".join((row["aspectOfHand"] or "").replace("_", " ").lower().split())
    if aspect not in ASPECT_TO_HAND:
        raise _row_error(csv_path, line, f"unknown aspectOfHand {row['aspectOfHand']!r}; expected one of "
                                         f"{', '.join(repr(a) for a in ASPECT_TO_HAND)}")
    accessories = (row["accessories"] or "").strip()
    if accessories not in ("0", "1"):
        raise _row_error(csv_path, line, f"accessories must be 0 or 1, got {accessories!r}")
    image = (row["imageName"] or "").strip()
    if not image or os.path.basename(image) != image or image.startswith("."):
        raise _row_error(csv_path, line, f"bad imageName {image!r}; expected a file name like Hand_0000002.jpg")
    return Record(line, raw_id.zfill(7), ASPECT_TO_HAND[aspect], image, accessories == "1")


def read_hand_info(raw_dir: str | Path) -> list[Record]:
    """Parse and validate ``<raw_dir>/HandInfo.csv`` (errors name the line and the bad value)."""
    csv_path = Path(raw_dir).expanduser() / CSV_NAME
    if not csv_path.is_file():
        raise HandCLIPError(f"{csv_path} not found; expected the 11k Hands HandInfo.csv next to the Hands/ folder")
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise HandCLIPError(f"{csv_path}: line 1: missing column(s) {', '.join(missing)}; header is "
                                f"{','.join(header) or '(empty)'}")
        reader.fieldnames = header
        records = [_parse_row(csv_path, reader.line_num, row, len(header)) for row in reader]
    if not records:
        raise HandCLIPError(f"{csv_path} has a header but no image rows")
    _check_duplicates(csv_path, records)
    return records


def _check_duplicates(csv_path: Path, records: list[Record]) -> None:
    seen: dict[str, int] = {}
    for rec in records:
        if rec.image in seen:
            raise _row_error(csv_path, rec.line, f"imageName {rec.image!r} already listed on line {seen[rec.image]}")
        seen[rec.image] = rec.line


def check_images(raw_dir: str | Path, records: Iterable[Record]) -> None:
    """Every image the CSV lists must exist in ``<raw_dir>/Hands``."""
    images_dir = Path(raw_dir).expanduser() / IMAGES_DIR
    if not images_dir.is_dir():
        raise HandCLIPError(f"image folder {images_dir} not found; expected the 11k Hands images next to "
                            f"{CSV_NAME}")
    present = set(os.listdir(images_dir))
    missing = [rec for rec in records if rec.image not in present]
    if missing:
        named = ", ".join(f"{r.image} (line {r.line})" for r in missing[:_MAX_NAMED])
        more = f" and {len(missing) - _MAX_NAMED} more" if len(missing) > _MAX_NAMED else ""
        raise HandCLIPError(f"{len(missing)} image(s) listed in {images_dir.parent / CSV_NAME} are missing from "
                            f"{images_dir}: {named}{more}")


def resolve_thresholds(thresholds: Mapping[str, int] | None) -> dict[str, int]:
    """Default thresholds, overridden by ``thresholds`` (keys: hand types or their folder suffixes)."""
    result = dict(DEFAULT_THRESHOLDS)
    by_suffix = {suffix: hand for hand, suffix in HAND_TYPES.items()}
    for key, value in (thresholds or {}).items():
        hand = key if key in HAND_TYPES else by_suffix.get(key)
        if hand is None:
            raise HandCLIPError(f"unknown hand type {key!r} in thresholds; expected one of "
                                f"{', '.join(HAND_TYPES)} (or {', '.join(by_suffix)})")
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise HandCLIPError(f"threshold for {hand} must be a non-negative integer id, got {value!r}")
        result[hand] = value
    return result


def parse_thresholds(text: str) -> dict[str, int]:
    """``"dorsal_right=1050,palmar_left=1042"`` -> dict (values checked by :func:`resolve_thresholds`)."""
    result: dict[str, int] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit():
            raise HandCLIPError(f"bad threshold {item!r}; expected HAND=ID, e.g. dorsal_right=1050")
        result[key.strip()] = int(value)
    resolve_thresholds(result)
    return result


# --------------------------------------------------------------------------------------------------
# Planning the split (pure: records + seed -> assignment)
# --------------------------------------------------------------------------------------------------


@dataclass
class HandPlan:
    """Where every image of one hand type goes, plus what is worth reporting."""

    hand: str
    train_ids: list[str]
    test_ids: list[str]
    splits: Assignment = field(default_factory=dict)
    single_image_train: list[str] = field(default_factory=list)
    single_image_test: list[str] = field(default_factory=list)
    no_usable_images: list[str] = field(default_factory=list)
    excluded_images: int = 0

    @property
    def folder(self) -> str:
        return hand_dir_name(self.hand)


def _images_by_identity(records: Iterable[Record]) -> dict[str, list[str]]:
    by_id: dict[str, list[str]] = {}
    for rec in records:
        by_id.setdefault(rec.identity, []).append(rec.image)
    return {i: sorted(by_id[i]) for i in sorted(by_id, key=int)}


def _split_identities(ids: list[str], split: str, threshold: int) -> tuple[list[str], list[str]]:
    """(train_all ids, test ids) of one hand type."""
    if split == "half":
        n_train = (len(ids) + 1) // 2
        return ids[:n_train], ids[n_train:]
    return [i for i in ids if int(i) <= threshold], [i for i in ids if int(i) > threshold]


def plan_hand(hand: str, records: list[Record], seed: int, runs: int, split: str, threshold: int) -> HandPlan:
    """Assign the images of one hand type to train_all/train/val/test/query{i}/gallery{i}."""
    usable = [r for r in records if not r.accessories]
    images = _images_by_identity(usable)
    all_ids = {r.identity for r in records}
    train_ids, test_ids = _split_identities(list(images), split, threshold)
    plan = HandPlan(hand, train_ids, test_ids, excluded_images=len(records) - len(usable),
                    no_usable_images=sorted(all_ids - set(images), key=int))
    rng = random.Random(f"handclip-split/{seed}/{hand}")
    s = plan.splits
    s["train_all"] = {i: images[i] for i in train_ids}
    s["train"], s["val"] = {}, {}
    for i in train_ids:
        if len(images[i]) == 1:
            plan.single_image_train.append(i)
            s["train"][i] = images[i]
            continue
        val = rng.choice(images[i])
        s["val"][i] = [val]
        s["train"][i] = [m for m in images[i] if m != val]
    s["test"] = {i: images[i] for i in test_ids}
    plan.single_image_test = [i for i in test_ids if len(images[i]) == 1]
    for run in range(runs):
        gallery = {i: rng.choice(images[i]) for i in test_ids}
        s[f"query{run}"] = {i: [m for m in images[i] if m != gallery[i]] for i in test_ids if len(images[i]) > 1}
        s[f"gallery{run}"] = {i: [gallery[i]] for i in test_ids}
    return plan


def _check_plan_sides(plan: HandPlan, split: str, threshold: int) -> None:
    rule = "--split half" if split == "half" else f"threshold {threshold}"
    for side, ids in (("train", plan.train_ids), ("test", plan.test_ids)):
        if not ids:
            raise HandCLIPError(
                f"{plan.hand}: no {side} identities with {rule} (identities "
                f"{', '.join((plan.train_ids + plan.test_ids)[:_MAX_NAMED])}...); adjust --thresholds or use "
                "--split half"
            )


def add_cross_aspect(plans: dict[str, HandPlan], runs: int) -> None:
    """Add ``gallery{i}_all`` to every hand: all hand types' gallery{i}, identities as ``<id>_<suffix>``."""
    for run in range(runs):
        merged: dict[str, list[str]] = {}
        for hand, plan in plans.items():
            for identity, imgs in plan.splits[f"gallery{run}"].items():
                merged[f"{identity}_{HAND_TYPES[hand]}"] = imgs
        for plan in plans.values():
            plan.splits[f"gallery{run}_all"] = dict(merged)


def plan_dataset(records: list[Record], seed: int = 0, runs: int = DEFAULT_RUNS,
                 thresholds: Mapping[str, int] | None = None, split: str = "threshold",
                 cross_aspect: bool = False) -> dict[str, HandPlan]:
    """The whole split, per hand type present in ``records`` (a pure function of its arguments)."""
    if split not in SPLIT_MODES:
        raise HandCLIPError(f"unknown split {split!r}; expected one of {', '.join(SPLIT_MODES)}")
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise HandCLIPError(f"runs must be a positive integer, got {runs!r}")
    limits = resolve_thresholds(thresholds)
    plans: dict[str, HandPlan] = {}
    for hand in HAND_TYPES:
        hand_records = [r for r in records if r.hand == hand]
        if not hand_records:
            continue
        plan = plan_hand(hand, hand_records, seed, runs, split, limits[hand])
        _check_plan_sides(plan, split, limits[hand])
        plans[hand] = plan
    if cross_aspect:
        add_cross_aspect(plans, runs)
    return plans


# --------------------------------------------------------------------------------------------------
# Writing, checking and reporting
# --------------------------------------------------------------------------------------------------


def _planned_files(plan: HandPlan) -> dict[str, str]:
    """Relative path inside the hand folder -> source image name."""
    return {
        f"{split}/{identity}/{image}": image
        for split, identities in plan.splits.items()
        for identity, images in identities.items()
        for image in images
    }


class _Linker:
    """Hard-link files, falling back to copies once linking fails (other device, no permission)."""

    def __init__(self) -> None:
        self.can_link = True
        self.linked = 0
        self.copied = 0

    def __call__(self, src: Path, dst: Path) -> None:
        if self.can_link:
            try:
                os.link(src, dst)
                self.linked += 1
                return
            except OSError as err:
                if err.errno not in (errno.EXDEV, errno.EPERM, errno.EACCES, errno.EMLINK, errno.ENOTSUP):
                    raise
                self.can_link = False
                log.info("hard links not possible (%s); copying images instead", err.strerror)
        shutil.copy2(src, dst)
        self.copied += 1


def write_plans(plans: Mapping[str, HandPlan], images_dir: Path, root: Path) -> _Linker:
    """Create every planned file under ``root``."""
    linker = _Linker()
    for plan in plans.values():
        hand_root = root / plan.folder
        made: set[Path] = set()
        for rel, image in _planned_files(plan).items():
            dst = hand_root / rel
            if dst.parent not in made:
                dst.parent.mkdir(parents=True, exist_ok=True)
                made.add(dst.parent)
            linker(images_dir / image, dst)
    return linker


def _listing(hand_root: Path) -> set[str]:
    return {
        str(p.relative_to(hand_root)).replace(os.sep, "/")
        for p in hand_root.rglob("*") if p.is_file()
    }


def _read_assignment(hand_root: Path) -> Assignment:
    tree: Assignment = {}
    for rel in sorted(_listing(hand_root)):
        split, identity, image = rel.split("/")
        tree.setdefault(split, {}).setdefault(identity, []).append(image)
    return tree


def _verify_hand(hand_root: Path, plan: HandPlan, runs: int) -> list[str]:
    """Problems found in one written hand folder (empty when it is right)."""
    problems = []
    planned, written = set(_planned_files(plan)), _listing(hand_root)
    if planned != written:
        missing, extra = sorted(planned - written), sorted(written - planned)
        problems.append(f"{len(missing)} planned file(s) missing {missing[:3]}, {len(extra)} unexpected {extra[:3]}")
    tree = _read_assignment(hand_root)
    get = lambda split: tree.get(split, {})  # noqa: E731
    train_all, test = get("train_all"), get("test")
    if set(train_all) & set(test):
        problems.append(f"identities in both train_all and test: {sorted(set(train_all) & set(test))[:3]}")
    for identity, imgs in train_all.items():
        train, val = get("train").get(identity, []), get("val").get(identity, [])
        if sorted(train + val) != sorted(imgs) or len(val) > 1:
            problems.append(f"train/val do not partition train_all identity {identity}")
    for run in range(runs):
        query, gallery = get(f"query{run}"), get(f"gallery{run}")
        if set(gallery) != set(test):
            problems.append(f"gallery{run} identities differ from the test identities")
        for identity, imgs in test.items():
            q, g = query.get(identity, []), gallery.get(identity, [])
            if len(g) != 1 or sorted(q + g) != sorted(imgs):
                problems.append(f"query{run}/gallery{run} do not partition test identity {identity}")
    return problems


def verify_output(root: Path, plans: Mapping[str, HandPlan], runs: int) -> None:
    """Check a written output against its plan and the protocol's invariants; raise if anything is off."""
    problems = [f"{plan.folder}: {p}" for plan in plans.values() for p in _verify_hand(root / plan.folder, plan, runs)]
    if problems:
        more = f" (and {len(problems) - _MAX_NAMED} more)" if len(problems) > _MAX_NAMED else ""
        raise HandCLIPError(f"the prepared split failed its self-check: {'; '.join(problems[:_MAX_NAMED])}{more}")


def _counts(assignment: Assignment) -> dict[str, dict[str, int]]:
    return {
        split: {"identities": len(ids), "images": sum(len(v) for v in ids.values())}
        for split, ids in assignment.items()
    }


def _fingerprint(plan: HandPlan) -> str:
    """sha256 of the sorted relative file list: equal fingerprints mean identical splits."""
    return hashlib.sha256("\n".join(sorted(_planned_files(plan))).encode()).hexdigest()


def build_split_info(plans: Mapping[str, HandPlan], records: list[Record], seed: int, runs: int,
                     thresholds: Mapping[str, int], split: str, cross_aspect: bool) -> dict:
    """The JSON-serialisable description written to split_info.json (no paths, no timestamps)."""
    hands = {}
    notes = []
    for hand, plan in plans.items():
        hands[hand] = {
            "folder": plan.folder,
            "counts": _counts(plan.splits),
            "excluded_accessory_images": plan.excluded_images,
            "single_image_train_identities": plan.single_image_train,
            "single_image_test_identities": plan.single_image_test,
            "identities_without_usable_images": plan.no_usable_images,
            "listing_sha256": _fingerprint(plan),
        }
        if plan.single_image_train:
            notes.append(f"{hand}: {len(plan.single_image_train)} training identit(y/ies) with a single image "
                         f"kept in train without a val image: {', '.join(plan.single_image_train)}")
        if plan.single_image_test:
            notes.append(f"{hand}: {len(plan.single_image_test)} test identit(y/ies) with a single image put in "
                         f"the gallery only (no query): {', '.join(plan.single_image_test)}")
        if plan.no_usable_images:
            notes.append(f"{hand}: {len(plan.no_usable_images)} identit(y/ies) dropped, every image has "
                         f"accessories: {', '.join(plan.no_usable_images)}")
    missing_hands = [h for h in HAND_TYPES if h not in plans]
    if missing_hands:
        notes.append(f"no images for hand type(s) {', '.join(missing_hands)}; their folders are not written")
    return {
        "format_version": 1,
        "protocol": "11k Hands (Afifi 2019): accessories excluded, identities split by id threshold"
                    if split == "threshold" else "sorted identities split in half per hand type",
        "seed": seed,
        "split": split,
        "thresholds": dict(thresholds) if split == "threshold" else None,
        "runs": runs,
        "cross_aspect": cross_aspect,
        "csv_rows": len(records),
        "excluded_accessory_images": sum(r.accessories for r in records),
        "hands": hands,
        "notes": notes,
    }


# --------------------------------------------------------------------------------------------------
# Output folder handling: build beside, check, swap in
# --------------------------------------------------------------------------------------------------


def _check_out(out: Path, raw: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise HandCLIPError(f"output {str(out)!r} exists and is not a folder")
    out_r, raw_r = out.resolve(), raw.resolve()
    if out_r == raw_r or out_r in raw_r.parents:
        raise HandCLIPError(f"output folder {str(out)!r} contains the raw data {str(raw)!r}; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise HandCLIPError(f"output folder {str(out)!r} is not empty; choose a new folder or pass --force to "
                                "replace it")
        foreign = [p.name for p in out.iterdir() if p.name != "split_info.json" and not p.name.startswith(HAND_DIR_PREFIX)]
        if foreign:
            raise HandCLIPError(
                f"--force replaces only an earlier prepare output, but {str(out)!r} also holds "
                f"{', '.join(sorted(foreign)[:5])}{' ...' if len(foreign) > 5 else ''}; choose another --out"
            )


def _make_parents(path: Path) -> Path | None:
    """Create ``path``'s missing parent folders; return the topmost one created (to undo), if any."""
    top = None
    for parent in reversed(path.parents):
        if not parent.exists():
            top = top or parent
    path.parent.mkdir(parents=True, exist_ok=True)
    return top


def _swap_in(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` to ``out``, replacing an old ``out`` only once the new one is in place."""
    if not out.exists():
        tmp.rename(out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    old.rmdir()
    out.rename(old)
    try:
        tmp.rename(out)
    except OSError:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def prepare_dataset(raw_dir: str | Path, out_dir: str | Path, seed: int = 0, runs: int = DEFAULT_RUNS,
                    thresholds: Mapping[str, int] | None = None, split: str = "threshold",
                    cross_aspect: bool = False, force: bool = False) -> dict:
    """Build the 11k Hands split folders from the raw download; return the split_info dict.

    The input is fully validated before anything is written; the output is built in a temporary
    sibling folder, checked against the plan and the protocol's invariants, and only then moved to
    ``out_dir`` (replacing an existing one only with ``force``). On any error nothing is left behind.
    """
    raw, out = Path(raw_dir).expanduser(), Path(out_dir).expanduser().resolve()
    if not raw.is_dir():
        raise HandCLIPError(f"raw data folder {str(raw)!r} not found; expected the 11k Hands download with "
                            f"{CSV_NAME} and {IMAGES_DIR}/")
    records = read_hand_info(raw)
    check_images(raw, records)
    limits = resolve_thresholds(thresholds)
    plans = plan_dataset(records, seed, runs, limits, split, cross_aspect)
    _check_out(out, raw, force)
    info = build_split_info(plans, records, seed, runs, limits, split, cross_aspect)

    created_top = _make_parents(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        linker = write_plans(plans, raw / IMAGES_DIR, tmp)
        verify_output(tmp, plans, runs)
        (tmp / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created_top is not None:
            shutil.rmtree(created_top, ignore_errors=True)
        raise
    log.info("wrote %s: %d file(s) hard-linked, %d copied", out, linker.linked, linker.copied)
    return info
