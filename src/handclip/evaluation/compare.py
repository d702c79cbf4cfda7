"""Zero-shot CLIP against fine-tuned HandCLIP: score one model on one hand type, or every hand type."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from open_clip.transform import PreprocessCfg

from handclip.data.datamodule import HandDataModule
from handclip.errors import HandCLIPError
from handclip.evaluation.calibration import calibrate_or_reuse, sidecar_path
from handclip.evaluation.report import ZERO_SHOT, fine_tuned_label
from handclip.evaluation.rerank import Rerank
from handclip.evaluation.runs import evaluate_hand
from handclip.evaluation.verification import VerificationOptions, verify_runs
from handclip.models.checkpoint import load_encoder, read_checkpoint_meta
from handclip.models.encoder import ImageEncoder
from handclip.run_folder import trained_runs

log = logging.getLogger(__name__)

#: ``(hand, preprocess) -> HandDataModule``: the configured data of one hand type for one model.
DataFor = Callable[[str, PreprocessCfg], HandDataModule]


@dataclass(frozen=True)
class ScoreOptions:
    """How runs are scored (``metrics`` in configs/eval.yaml) and where."""

    device: torch.device
    ranks: tuple[int, ...] = (1, 5, 10)
    ap: str = "standard"
    cross_aspect: bool = False
    progress: bool = True
    #: Verification figures, open-set threshold and examples (None: Rank-k and mAP only).
    verification: VerificationOptions | None = None
    #: Where the zero-shot model's calibration files go (``<hand>_zeroshot.calibration.json``).
    calibration_dir: Path | None = None
    #: Also score the runs after re-ranking (rows of their own, transductive).
    rerank: Rerank | None = None
    #: Test-time augmentation of checkpoints (``eval.tta``): None keeps each checkpoint's own.
    tta: str | None = None
    #: ``mean``: also score the runs against the gallery's mean templates (rows of their own).
    gallery_mode: str = "max"


def _score(encoder: ImageEncoder, data_for: DataFor, hand: str, options: ScoreOptions,
           calibration_path: Path | None = None, checkpoint: Path | None = None) -> dict:
    datamodule = data_for(hand, encoder.preprocess)
    extra = None
    if options.verification is not None:
        vopt = options.verification
        calibration = calibrate_or_reuse(encoder, datamodule, options.device, vopt.target_fmr, calibration_path,
                                         checkpoint, progress=options.progress)
        threshold = calibration["threshold"] if calibration else None

        def extra(features, test):
            summary = None if calibration is None else {
                k: calibration.get(k) for k in ("threshold", "target_fmr", "fmr", "tar", "eer", "val_unknown_rate",
                                                "genuine_scores", "impostor_scores", "resolved")}
            if summary is not None and calibration_path is not None:
                summary["file"] = str(calibration_path)
            return {"verification": {**verify_runs(features, test, threshold, vopt), "calibration": summary}}

    return evaluate_hand(encoder, datamodule, options.device, ranks=options.ranks, ap=options.ap,
                         cross_aspect=options.cross_aspect, progress=options.progress, extra=extra,
                         rerank=options.rerank, gallery_mode=options.gallery_mode)


def score_zero_shot(encoder: ImageEncoder, model_name: str, pretrained: str | None, hand: str, data_for: DataFor,
                    options: ScoreOptions) -> dict:
    path = options.calibration_dir / f"{hand}_zeroshot.calibration.json" if options.calibration_dir else None
    result = _score(encoder, data_for, hand, options, calibration_path=path)
    return {"model": ZERO_SHOT, "model_name": model_name, "pretrained": pretrained, "checkpoint": None,
            "status": "ok", **result}


def score_checkpoint(ckpt_path: Path, hand: str, data_for: DataFor, options: ScoreOptions,
                     allow_hand_mismatch: bool = False, run: str = "") -> dict:
    """Score a fine-tuned checkpoint; ``run`` names the training run it comes from when it is not the plain one
    (a sweep job's folder: what it changed), and labels its rows."""
    meta = read_checkpoint_meta(ckpt_path)
    if meta["hand"] != hand and not allow_hand_mismatch:
        raise HandCLIPError(
            f"checkpoint {ckpt_path} was trained on hand type {meta['hand']!r}, not {hand!r}; "
            f"pass hand={meta['hand']}, or allow_hand_mismatch=true to score it on {hand!r} anyway"
        )
    encoder, _ = load_encoder(ckpt_path, tta=options.tta)
    # The sidecar belongs to the hand type the checkpoint was trained on: written only when scoring that one.
    path = sidecar_path(ckpt_path) if meta["hand"] == hand else None
    result = _score(encoder, data_for, hand, options, calibration_path=path, checkpoint=ckpt_path)
    return {"model": fine_tuned_label(run), "run": run, "model_name": meta["model_name"],
            "pretrained": meta.get("pretrained"), "trained_on": meta["hand"], "checkpoint": str(ckpt_path),
            "status": "ok", **result}


def compare_hands(hands: list[str], zero_shot: ImageEncoder, model_name: str, pretrained: str | None,
                  output_root: str | Path, data_for: DataFor, options: ScoreOptions) -> list[dict]:
    """For every hand type: the zero-shot baseline, and every run training left (the plain run's, then each sweep
    job's, named by what it changed)."""
    entries = []
    for hand in hands:
        entries.append(score_zero_shot(zero_shot, model_name, pretrained, hand, data_for, options))
        for run, ckpt in trained_runs(output_root, hand):
            if not ckpt.is_file():
                log.info("%s: no fine-tuned checkpoint at %s (baseline only)", hand, ckpt)
                entries.append({"hand": hand, "model": fine_tuned_label(run), "run": run, "checkpoint": str(ckpt),
                                "status": "no checkpoint"})
                continue
            entries.append(score_checkpoint(ckpt, hand, data_for, options, run=run))
            if entries[-1]["model_name"] != model_name:
                log.warning("%s: the checkpoint is a fine-tuned %s but the zero-shot baseline is %s "
                            "(choose the baseline with model=...)", hand, entries[-1]["model_name"], model_name)
    return entries
