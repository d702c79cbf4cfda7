"""The open-set threshold: calibrated on the validation split, stored in a sidecar file beside the checkpoint.

Each val image is compared with every training identity (an identity scores as its best training image):
its own identity gives a genuine score, every other one an impostor score. The threshold for a target false
match rate (default 1 %) is the lowest score at which at most that share of the impostor scores would be
accepted (:func:`handclip.metrics.verification.threshold_at_fmr`). It is written to
``<checkpoint stem>.calibration.json`` next to the checkpoint (``checkpoints/best.calibration.json``) at the end
of training (:class:`handclip.evaluation.calibrate_callback.CalibrationCallback`) and by ``eval``, with what it
was computed from and the fingerprint of the weights it belongs to; ``identify`` reads it.

Every decision mode has its own threshold (identify's ``gallery_mode`` x ``query_mode``/``case_mode``;
:mod:`handclip.metrics.templates`). The file's format (``format`` 1, extended compatibly)::

    {"format": 1, "threshold": .., "target_fmr": .., "fmr": .., "tar": .., "resolved": .., "levels": [..], ...,
     "modes": {"max": {...}, "mean": {...}, "max+case_mean": {...}, "max+case_max": {...},
               "mean+case_mean": {...}, "mean+case_max": {...}},
     "model_fingerprint": .., "computed_from": {..}, "written": .., "handclip_version": .., "checkpoint": {..}}

The top-level threshold fields are the ``max`` mode's (a person scores as their best photo, one probe per
photo), as in files written before the modes existed: such a file still serves that mode. Each ``modes`` entry
holds ``threshold``, ``target_fmr``, ``fmr``, ``tar``, ``resolved``, ``levels`` (one row per FMR level:
``target_fmr``, ``threshold``, ``fmr``, ``tar``, ``resolved``), ``eer``, ``val_unknown_rate``, ``val_dir``,
``genuine_scores``, ``impostor_scores`` and ``identity_scoring`` (plus ``probe_scoring``, ``case_size`` and
``cases`` for case probes). A new mode (e.g. ``fused``) is one more entry of that shape, with its own
description keys; :func:`select_threshold` reads any entry by name and refuses a name the file lacks.
Case probes are calibrated on val cases: each val identity's photos, in file order, cut into cases of
:data:`~handclip.metrics.templates.CASE_SIZE` consecutive photos, a case short of that filled with the identity's
first training photos, which then leave the gallery (:func:`~handclip.metrics.templates.calibration_cases`; the
11k and HD splits have one val photo per identity).
"""

from __future__ import annotations

import json
import logging
import math
from datetime import datetime, timezone
from pathlib import Path

import torch

from handclip import __version__
from handclip.data import layout
from handclip.data.cache_keys import digest, file_entry
from handclip.data.datamodule import HandDataModule
from handclip.errors import HandCLIPError
from handclip.evaluation.embed import embed_loader
from handclip.metrics.scores import IdentityScores, identity_scores
from handclip.metrics.templates import (
    CASE_SIZE,
    calibration_cases,
    case_labels,
    case_max,
    case_templates,
    mean_templates,
)
from handclip.metrics.verification import (
    check_fmr,
    detection_identification_rate,
    equal_error_rate,
    tar_at_fmrs,
    unknown_rate,
)
from handclip.models.encoder import ImageEncoder
from handclip.models.fingerprint import encoder_fingerprint
from handclip.utils.files import atomic_write

log = logging.getLogger(__name__)

#: Bump when the meaning of a calibration file changes.
CALIBRATION_FORMAT = 1
#: FMR levels whose thresholds every calibration file lists (identify can pick one with target_fmr=...).
DEFAULT_LEVELS = (0.1, 0.01, 0.001, 0.0001)


def sidecar_path(checkpoint: str | Path) -> Path:
    """``checkpoints/best.ckpt`` -> ``checkpoints/best.calibration.json``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + ".calibration.json")


def decision_mode(gallery_mode: str = "max", query_mode: str = "each", case_mode: str = "mean") -> str:
    """The name of a decision mode in a calibration file's ``modes``: ``max``, ``mean``, ``max+case_mean``, ..."""
    return gallery_mode if query_mode == "each" else f"{gallery_mode}+case_{case_mode}"


#: Every decision mode a calibration file holds (``modes``), the plain one (``max``) first.
DECISION_MODES = tuple(decision_mode(g, q, c) for q, cs in (("each", ("mean",)), ("case", ("mean", "max")))
                       for c in cs for g in ("max", "mean"))


def _mode_scores(mode: str, val_features, val_labels, train_features, train_labels) -> IdentityScores:
    """The identity scores of one decision mode: val probes (photos, or cases of :data:`CASE_SIZE` photos filled
    with training photos that then leave the gallery: :func:`~handclip.metrics.templates.calibration_cases`)
    against the training identities (best photo, or mean template)."""
    gallery_mode, _, case = mode.partition("+")
    val_labels = torch.as_tensor(val_labels, dtype=torch.long)
    train_labels = torch.as_tensor(train_labels, dtype=torch.long)
    if case:
        val_case, train_case = calibration_cases(val_labels, train_labels)
        taken = train_case >= 0
        features = torch.cat([val_features, train_features[taken.to(train_features.device)]])
        labels = torch.cat([val_labels, train_labels[taken]])
        cases = torch.cat([val_case, train_case[taken]])
        train_features, train_labels = train_features[(~taken).to(train_features.device)], train_labels[~taken]
    if gallery_mode == "mean":
        train_features, train_labels = mean_templates(train_features, train_labels)
    if not case:
        return identity_scores(val_features, val_labels, train_features, train_labels)
    if case == "case_mean":
        return identity_scores(case_templates(features, cases), case_labels(labels, cases), train_features,
                               train_labels)
    photos = identity_scores(features, labels, train_features, train_labels)
    cases = cases.to(photos.table.device)
    return IdentityScores(table=case_max(photos.table, cases), identities=photos.identities,
                          own=case_labels(photos.own, cases))


def _mode_calibration(scores: IdentityScores, target_fmr: float, levels, mode: str) -> dict:
    genuine, impostor = scores.genuine(), scores.impostor()
    if genuine.numel() == 0 or impostor.numel() == 0:
        raise HandCLIPError("calibration needs val images of training identities and at least 2 training "
                            f"identities (got {genuine.numel()} genuine and {impostor.numel()} impostor scores)")
    targets = sorted({float(v) for v in levels} | {target_fmr}, reverse=True)
    rows = tar_at_fmrs(genuine, impostor, targets)
    main = next(r for r in rows if r["target_fmr"] == target_fmr)
    threshold = main["threshold"]
    if not main["resolved"]:
        log.warning("%s: %d impostor scores cannot resolve FMR %g (fewer than %d); the threshold allows "
                    "no false match on the val images", "calibration" if mode == "max" else f"calibration ({mode})",
                    impostor.numel(), target_fmr,
                    math.ceil(1 / target_fmr))
    return {
        "threshold": threshold,
        "target_fmr": target_fmr,
        "fmr": main["fmr"],
        "tar": main["tar"],
        "resolved": main["resolved"],
        "levels": rows,
        "eer": equal_error_rate(genuine, impostor)["eer"],
        "val_unknown_rate": unknown_rate(scores.nonmated_top(), threshold),
        "val_dir": detection_identification_rate(genuine, scores.identified()[scores.mated], threshold),
        "genuine_scores": int(genuine.numel()),
        "impostor_scores": int(impostor.numel()),
    }


#: How each mode scores, as its ``modes`` entry says.
_SCORING = {"max": "best image", "mean": "mean template", "case_mean": "mean template of the case",
            "case_max": "best photo of the case"}


def calibration_from_embeddings(val_features, val_labels, train_features, train_labels, target_fmr: float = 0.01,
                                levels=DEFAULT_LEVELS) -> dict:
    """The threshold at ``target_fmr`` (and at every level of ``levels``) and what it gives on the val images,
    for every decision mode (see the module)."""
    target_fmr = check_fmr(target_fmr)
    modes = {}
    for mode in DECISION_MODES:
        scores = _mode_scores(mode, val_features, val_labels, train_features, train_labels)
        gallery_mode, _, case = mode.partition("+")
        modes[mode] = _mode_calibration(scores, target_fmr, levels, mode)
        modes[mode]["identity_scoring"] = _SCORING[gallery_mode]
        if case:
            modes[mode].update(probe_scoring=_SCORING[case], case_size=CASE_SIZE,
                               cases="val photos of one identity in consecutive groups of case_size, each filled up "
                                     "with the identity's first training photos (which leave the gallery)")
    return {"format": CALIBRATION_FORMAT, **modes["max"], "modes": modes}


def data_digest(root: str | Path, hand: str) -> str:
    """A hash of the val and train files (path, size, mtime): the data a calibration was computed from."""
    return digest([[split, *file_entry(sample.path)] for split in ("val", "train")
                   for sample in layout.list_split(root, hand, split)])


def calibrate(encoder: ImageEncoder, datamodule: HandDataModule, device: torch.device, target_fmr: float = 0.01,
              levels=DEFAULT_LEVELS, progress: bool = True) -> dict:
    """Embed the val and training images of ``datamodule`` and calibrate the threshold on them."""
    datamodule.setup("fit")
    val_loader, train_loader = datamodule.whole_val_and_train_loaders(device)  # not sharded, even after DDP
    hand = datamodule.hand
    val = embed_loader(encoder, val_loader, device, desc=f"{hand}: calibration (val)", progress=progress)
    train = embed_loader(encoder, train_loader, device, desc=f"{hand}: calibration (train)", progress=progress)
    result = calibration_from_embeddings(val, datamodule.val_set.labels, train, datamodule.train_set.labels,
                                         target_fmr, levels)
    result["model_fingerprint"] = encoder_fingerprint(encoder)
    result["computed_from"] = {
        "query": "val", "gallery": "train", "data_root": str(Path(datamodule.root).resolve()), "hand": hand,
        "val_images": int(val.shape[0]), "train_images": int(train.shape[0]),
        "identities": len(datamodule.classes or []), "data_digest": data_digest(datamodule.root, hand),
    }
    return result


def write_calibration(path: str | Path, calibration: dict, checkpoint: str | Path | None = None) -> Path:
    """Write a calibration file atomically (with the checkpoint it belongs to, when there is one)."""
    record = {**calibration, "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "handclip_version": __version__}
    if checkpoint is not None:
        st = Path(checkpoint).stat()
        record["checkpoint"] = {"path": str(Path(checkpoint).resolve()), "size": st.st_size,
                                "mtime_ns": st.st_mtime_ns}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, json.dumps(record, indent=2) + "\n")


def read_calibration(path: str | Path) -> dict:
    """A calibration file's contents, checked; a clear error when it is missing or not one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise HandCLIPError(f"calibration file {str(path)!r} not found") from None
    except (OSError, ValueError) as err:
        raise HandCLIPError(f"calibration file {str(path)!r} is unreadable or not JSON: {err}") from None
    ok = (isinstance(data, dict) and data.get("format") == CALIBRATION_FORMAT
          and isinstance(data.get("threshold"), (int, float)) and math.isfinite(data["threshold"])
          and isinstance(data.get("model_fingerprint"), str))
    if not ok:
        raise HandCLIPError(f"{str(path)!r} is not a HandCLIP calibration file (format {CALIBRATION_FORMAT}: "
                            "threshold, model_fingerprint)")
    return data


def select_threshold(calibration: dict, path: str | Path, fingerprint: str, target_fmr: float | None,
                     how_to: str, mode: str = "max") -> dict:
    """``{threshold, target_fmr, fmr, tar, ...}`` of decision ``mode`` for ``target_fmr`` (None: the file's own
    target), after checking that the file belongs to these weights; ``how_to`` says how to compute a fresh one.
    The ``max`` mode is the file's top level (files written before the modes existed have only that)."""
    if calibration["model_fingerprint"] != fingerprint:
        raise HandCLIPError(f"calibration {str(path)!r} was computed for other weights than this model's "
                            f"(fingerprint {calibration['model_fingerprint']} vs {fingerprint}); {how_to}")
    if mode != "max":
        entry = (calibration.get("modes") or {}).get(mode)
        if not isinstance(entry, dict) or not isinstance(entry.get("threshold"), (int, float)):
            raise HandCLIPError(f"calibration {str(path)!r} has no threshold for decision mode {mode!r} (it was "
                                f"written before that mode, or without it); {how_to}")
        calibration = entry
    if target_fmr is None:
        return {k: calibration[k] for k in ("threshold", "target_fmr", "fmr", "tar", "resolved") if k in calibration}
    target_fmr = check_fmr(target_fmr)
    for row in calibration.get("levels", []):
        if math.isclose(row["target_fmr"], target_fmr, rel_tol=1e-9):
            return dict(row)
    known = ", ".join(f"{row['target_fmr']:g}" for row in calibration.get("levels", []))
    raise HandCLIPError(f"calibration {str(path)!r} has no threshold for FMR {target_fmr:g} (it has {known}); "
                        f"{how_to}")


def calibrate_or_reuse(encoder: ImageEncoder, datamodule: HandDataModule, device: torch.device, target_fmr: float,
                       path: Path | None, checkpoint: Path | None = None, progress: bool = True) -> dict | None:
    """The calibration of ``encoder`` on the datamodule's val/train data: reused from ``path`` when it was made
    for the same weights, target and files, else computed (and written to ``path`` when given). None (with a
    warning) when the data has no val/train split to calibrate on."""
    try:
        digest = data_digest(datamodule.root, datamodule.hand)
    except HandCLIPError as err:
        log.warning("%s: no open-set threshold: %s", datamodule.hand, err)
        return None
    if path is not None and path.is_file():
        try:
            old = read_calibration(path)
        except HandCLIPError:
            old = None
        if (old and old["model_fingerprint"] == encoder_fingerprint(encoder) and old.get("target_fmr") == target_fmr
                and old.get("computed_from", {}).get("data_digest") == digest
                and set(DECISION_MODES) <= set(old.get("modes") or {})):  # an older file: every mode computed
            log.info("%s: calibration reused from %s", datamodule.hand, path)
            return old
    try:
        result = calibrate(encoder, datamodule, device, target_fmr, progress=progress)
    except HandCLIPError as err:  # e.g. one training identity: nothing to compare with
        log.warning("%s: no open-set threshold: %s", datamodule.hand, err)
        return None
    if path is not None:
        try:
            write_calibration(path, result, checkpoint)
        except OSError as err:  # e.g. a checkpoint in a read-only folder: the report still gets its figures
            log.warning("%s: could not write %s (%s); the threshold is used for this evaluation only",
                        datamodule.hand, path, err)
        else:
            log.info("%s: open-set threshold %.4f at FMR %g written to %s", datamodule.hand, result["threshold"],
                     target_fmr, path)
    return result
