"""Writing a planned split to disk, checking what was written, and describing it (split_info.json)."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from handclip.data.split.plan import Assignment, HandPlan
from handclip.data.split.raw import MAX_NAMED, Record
from handclip.errors import HandCLIPError
from handclip.hands import DATASETS

log = logging.getLogger(__name__)


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


def write_plans(plans: Mapping[str, HandPlan], images: Path | Mapping[str, Path], root: Path) -> _Linker:
    """Create every planned file under ``root``; ``images`` is the folder of the source images, or maps each
    image name to its file."""
    source = images.__getitem__ if isinstance(images, Mapping) else images.joinpath
    linker = _Linker()
    for plan in plans.values():
        hand_root = root / plan.folder
        made: set[Path] = set()
        for rel, image in _planned_files(plan).items():
            dst = hand_root / rel
            if dst.parent not in made:
                dst.parent.mkdir(parents=True, exist_ok=True)
                made.add(dst.parent)
            linker(source(image), dst)
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
    distractors = plan.distractors
    if set(distractors) & (set(train_all) | set(test)):
        problems.append(f"distractor identities also train or test: {sorted(set(distractors) & set(tree))[:3]}")
    for run in range(runs):
        query, gallery = get(f"query{run}"), get(f"gallery{run}")
        if set(gallery) != set(test) | set(distractors):
            problems.append(f"gallery{run} identities differ from the test identities and the distractors")
        if set(query) & set(distractors):
            problems.append(f"query{run} holds distractor identities")
        if any(sorted(gallery.get(i, [])) != imgs for i, imgs in distractors.items()):
            problems.append(f"gallery{run} does not hold every distractor image")
        for identity, imgs in test.items():
            q, g = query.get(identity, []), gallery.get(identity, [])
            if len(g) != 1 or sorted(q + g) != sorted(imgs):
                problems.append(f"query{run}/gallery{run} do not partition test identity {identity}")
    return problems


def verify_output(root: Path, plans: Mapping[str, HandPlan], runs: int) -> None:
    """Check a written output against its plan and the protocol's invariants; raise if anything is off."""
    problems = [f"{plan.folder}: {p}" for plan in plans.values() for p in _verify_hand(root / plan.folder, plan, runs)]
    if problems:
        more = f" (and {len(problems) - MAX_NAMED} more)" if len(problems) > MAX_NAMED else ""
        raise HandCLIPError(f"the prepared split failed its self-check: {'; '.join(problems[:MAX_NAMED])}{more}")


def _counts(assignment: Assignment) -> dict[str, dict[str, int]]:
    return {
        split: {"identities": len(ids), "images": sum(len(v) for v in ids.values())}
        for split, ids in assignment.items()
    }


def _fingerprint(plan: HandPlan) -> str:
    """sha256 of the sorted relative file list: equal fingerprints mean identical splits."""
    return hashlib.sha256("\n".join(sorted(_planned_files(plan))).encode()).hexdigest()


PROTOCOLS = {
    ("11k", "threshold"): "11k Hands (Afifi 2019): accessories excluded, identities split by id threshold",
    ("11k", "half"): "sorted identities split in half per hand type",
    ("hd", "threshold"): "HD (MBA-Net): identity from the file name; 1-501 split by id threshold; every image of "
                         "502-712 in every gallery as a distractor (identities distractor_<id>)",
    ("hd", "half"): "HD: sorted identities of 1-501 split in half; every image of 502-712 in every gallery as a "
                    "distractor (identities distractor_<id>)",
}


def build_split_info(plans: Mapping[str, HandPlan], records: list[Record], seed: int, runs: int,
                     thresholds: Mapping[str, int], split: str, cross_aspect: bool, dataset: str = "11k",
                     notes: list[str] | None = None) -> dict:
    """The JSON-serialisable description written to split_info.json (no paths, no timestamps)."""
    hands = {}
    notes = list(notes or [])
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
        if plan.distractors:
            hands[hand]["distractors"] = {"identities": len(plan.distractors),
                                          "images": sum(map(len, plan.distractors.values()))}
        if plan.single_image_train:
            notes.append(f"{hand}: {len(plan.single_image_train)} training identit(y/ies) with a single image "
                         f"kept in train without a val image: {', '.join(plan.single_image_train)}")
        if plan.single_image_test:
            notes.append(f"{hand}: {len(plan.single_image_test)} test identit(y/ies) with a single image put in "
                         f"the gallery only (no query): {', '.join(plan.single_image_test)}")
        if plan.no_usable_images:
            notes.append(f"{hand}: {len(plan.no_usable_images)} identit(y/ies) dropped, every image has "
                         f"accessories: {', '.join(plan.no_usable_images)}")
    missing_hands = [h for h in DATASETS[dataset] if h not in plans]
    if missing_hands:
        notes.append(f"no images for hand type(s) {', '.join(missing_hands)}; their folders are not written")
    return {
        "format_version": 1,
        "dataset": dataset,
        "protocol": PROTOCOLS[dataset, split],
        "seed": seed,
        "split": split,
        "thresholds": {h: thresholds[h] for h in DATASETS[dataset]} if split == "threshold" else None,
        "runs": runs,
        "cross_aspect": cross_aspect,
        "csv_rows" if dataset == "11k" else "raw_images": len(records),
        "excluded_accessory_images": sum(r.accessories for r in records),
        "hands": hands,
        "notes": notes,
    }
