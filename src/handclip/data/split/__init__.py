"""The published 11k Hands and HD evaluation protocols, reproducible: raw download -> split folders.

Input: ``<raw>/HandInfo.csv`` and ``<raw>/Hands/*.jpg`` as downloaded. Output, per hand type,
``<out>/train_val_test_split_<dorsal_r|dorsal_l|palmar_r|palmar_l>/`` with::

    train_all/<id>/<image>     train + val (identities at or below the hand's id threshold)
    train/<id>/...             training images
    val/<id>/...               one image per training identity (none for single-image identities)
    test/<id>/...              test identities (above the threshold), disjoint from train
    query{i}/<id>/...          run i: all test images of an identity but one
    gallery{i}/<id>/...        run i: the remaining image of each test identity
    gallery{i}_all/<id>_<suffix>/...  (--cross-aspect) the four hand types' gallery{i} merged

plus ``<out>/split_info.json`` describing the split. ``dataset="hd"`` writes ``train_val_test_split_hd/`` by
the HD protocol instead (:mod:`handclip.data.split.hd`: the same folders, plus distractors in every gallery).
Images with accessories are left out. Every random
choice comes from ``random.Random`` seeded by the seed and the hand type, so one seed always gives the
same split. Output is built in a temporary sibling folder, checked, and only then moved into place.
Such a folder left by a killed run (``.<out>.partial-*``, no longer locked by a live one) is removed by the
next run, which says so.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path

from handclip.data.split.hd import plan_hd, read_hd
from handclip.data.split.plan import (
    DEFAULT_RUNS,
    SPLIT_MODES,
    HandPlan,
    parse_thresholds,
    plan_dataset,
    resolve_thresholds,
)
from handclip.data.split.raw import CSV_NAME, IMAGES_DIR, check_images, read_hand_info
from handclip.data.split.write import build_split_info, verify_output, write_plans
from handclip.errors import HandCLIPError
from handclip.hands import DATASETS, HAND_DIR_PREFIX
from handclip.utils.files import check_output_folder, check_writable, clean_leftovers, partial_folder, swap_in
from handclip.utils.locks import try_lock

log = logging.getLogger(__name__)

INFO_NAME = "split_info.json"

__all__ = [
    "DEFAULT_RUNS", "INFO_NAME", "SPLIT_MODES", "HandPlan", "build_split_info", "check_images", "parse_thresholds",
    "plan_dataset", "plan_hd", "prepare_dataset", "read_hd", "read_hand_info", "resolve_thresholds", "verify_output",
    "write_plans",
]


def _check_out(out: Path, raw: Path, overwrite: bool) -> None:
    out_r, raw_r = out.resolve(), raw.resolve()
    if out_r == raw_r or out_r in raw_r.parents:
        raise HandCLIPError(f"output folder {str(out)!r} contains the raw data {str(raw)!r}; choose another --out")
    check_output_folder(out, overwrite, "an earlier prepare output",
                        owned=lambda name: name == INFO_NAME or name.startswith(HAND_DIR_PREFIX))


def _make_parents(path: Path) -> Path | None:
    """Create ``path``'s missing parent folders; return the topmost one created (to undo), if any."""
    top = None
    for parent in reversed(path.parents):
        if not parent.exists():
            top = top or parent
    path.parent.mkdir(parents=True, exist_ok=True)
    return top


def _plan(dataset: str, raw: Path, seed: int, runs: int, limits: dict[str, int], split: str, cross_aspect: bool):
    """(plans, records, image sources, notes) of one dataset's raw download, fully checked."""
    if dataset == "hd":
        if cross_aspect:
            raise HandCLIPError("--cross-aspect needs the four 11k hand types; HD has one (drop --cross-aspect)")
        if split not in SPLIT_MODES:
            raise HandCLIPError(f"unknown split {split!r}; expected one of {', '.join(SPLIT_MODES)}")
        images = read_hd(raw)
        plans = plan_hd(images, seed, runs, limits["hd"], split)
        return plans, images.main + images.distractors, images.sources, images.notes
    records = read_hand_info(raw)
    check_images(raw, records)
    return plan_dataset(records, seed, runs, limits, split, cross_aspect), records, raw / IMAGES_DIR, []


def prepare_dataset(raw_dir: str | Path, out_dir: str | Path, seed: int = 0, runs: int = DEFAULT_RUNS,
                    thresholds: Mapping[str, int] | None = None, split: str = "threshold",
                    cross_aspect: bool = False, overwrite: bool = False, dataset: str = "11k") -> dict:
    """Build the split folders of ``dataset`` (11k or hd) from its raw download; return the split_info dict.

    The input is fully validated before anything is written; the output is built in a temporary
    sibling folder, checked against the plan and the protocol's invariants, and only then moved to
    ``out_dir`` (replacing an existing one only with ``overwrite``). On any error nothing is left behind.
    """
    if dataset not in DATASETS:
        raise HandCLIPError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    raw, out = Path(raw_dir).expanduser(), Path(out_dir).expanduser().resolve()
    if not raw.is_dir():
        wanted = f"{CSV_NAME} and {IMAGES_DIR}/" if dataset == "11k" else "Original Images/1-501 and 502-712"
        raise HandCLIPError(f"raw data folder {str(raw)!r} not found; expected the {dataset} download with {wanted}")
    if out.parent.is_dir():
        clean_leftovers(out, "prepare")
    limits = resolve_thresholds(thresholds)
    plans, records, sources, notes = _plan(dataset, raw, seed, runs, limits, split, cross_aspect)
    _check_out(out, raw, overwrite)
    check_writable(out, "output folder (--out)")
    info = build_split_info(plans, records, seed, runs, limits, split, cross_aspect, dataset, notes)

    created_top = _make_parents(out)
    tmp = partial_folder(out)
    try:
        with try_lock(tmp) or contextlib.nullcontext():  # a live run's partial folder is not a leftover
            linker = write_plans(plans, sources, tmp)
            verify_output(tmp, plans, runs)
            (tmp / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
            swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created_top is not None:
            shutil.rmtree(created_top, ignore_errors=True)
        raise
    log.info("wrote %s: %d file(s) hard-linked, %d copied", out, linker.linked, linker.copied)
    return info
