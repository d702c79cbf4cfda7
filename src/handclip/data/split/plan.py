"""Planning the split: records + seed -> where every image goes (a pure function, no file is touched)."""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from handclip.data.split.raw import MAX_NAMED, Record
from handclip.errors import HandCLIPError
from handclip.hands import ELEVEN_K_HANDS, HAND_TYPES, PUBLISHED_THRESHOLDS, hand_dir_name

DEFAULT_RUNS = 10
SPLIT_MODES = ("threshold", "half")

Assignment = dict[str, dict[str, list[str]]]  # split -> identity folder -> image names


def resolve_thresholds(thresholds: Mapping[str, int] | None) -> dict[str, int]:
    """Default thresholds, overridden by ``thresholds`` (keys: hand types or their folder suffixes)."""
    result = dict(PUBLISHED_THRESHOLDS)
    by_suffix = {suffix: hand for hand, suffix in HAND_TYPES.items()}
    aliases = ", ".join(k for k in by_suffix if k not in HAND_TYPES)
    for key, value in (thresholds or {}).items():
        hand = key if key in HAND_TYPES else by_suffix.get(key)
        if hand is None:
            raise HandCLIPError(f"unknown hand type {key!r} in thresholds; expected one of "
                                f"{', '.join(HAND_TYPES)} (or {aliases})")
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
    #: Identity folder -> images added to every ``gallery{i}`` that can never match a query (HD's 502-712).
    distractors: dict[str, list[str]] = field(default_factory=dict)

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


def check_split_sides(plan: HandPlan, split: str, threshold: int) -> None:
    rule = "--split half" if split == "half" else f"threshold {threshold}"
    for side, ids in (("train", plan.train_ids), ("test", plan.test_ids)):
        if not ids:
            raise HandCLIPError(
                f"{plan.hand}: no {side} identities with {rule} (identities "
                f"{', '.join((plan.train_ids + plan.test_ids)[:MAX_NAMED])}...); adjust --thresholds or use "
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


def check_runs(runs: int) -> None:
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise HandCLIPError(f"runs must be a positive integer, got {runs!r}")


def plan_dataset(records: list[Record], seed: int = 0, runs: int = DEFAULT_RUNS,
                 thresholds: Mapping[str, int] | None = None, split: str = "threshold",
                 cross_aspect: bool = False) -> dict[str, HandPlan]:
    """The whole 11k split, per hand type present in ``records`` (a pure function of its arguments)."""
    if split not in SPLIT_MODES:
        raise HandCLIPError(f"unknown split {split!r}; expected one of {', '.join(SPLIT_MODES)}")
    check_runs(runs)
    limits = resolve_thresholds(thresholds)
    plans: dict[str, HandPlan] = {}
    for hand in ELEVEN_K_HANDS:
        hand_records = [r for r in records if r.hand == hand]
        if not hand_records:
            continue
        plan = plan_hand(hand, hand_records, seed, runs, split, limits[hand])
        check_split_sides(plan, split, limits[hand])
        plans[hand] = plan
    if cross_aspect:
        add_cross_aspect(plans, runs)
    return plans
