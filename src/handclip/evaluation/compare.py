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
from handclip.evaluation.report import FINE_TUNED, ZERO_SHOT
from handclip.evaluation.runs import evaluate_hand
from handclip.models.checkpoint import load_module, read_checkpoint_meta
from handclip.models.encoder import ImageEncoder
from handclip.run_folder import trained_checkpoint

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


def _score(encoder: ImageEncoder, data_for: DataFor, hand: str, options: ScoreOptions) -> dict:
    return evaluate_hand(encoder, data_for(hand, encoder.preprocess), options.device, ranks=options.ranks,
                         ap=options.ap, cross_aspect=options.cross_aspect, progress=options.progress)


def score_zero_shot(encoder: ImageEncoder, model_name: str, pretrained: str | None, hand: str, data_for: DataFor,
                    options: ScoreOptions) -> dict:
    result = _score(encoder, data_for, hand, options)
    return {"model": ZERO_SHOT, "model_name": model_name, "pretrained": pretrained, "checkpoint": None,
            "status": "ok", **result}


def score_checkpoint(ckpt_path: Path, hand: str, data_for: DataFor, options: ScoreOptions,
                     allow_hand_mismatch: bool = False) -> dict:
    meta = read_checkpoint_meta(ckpt_path)
    if meta["hand"] != hand and not allow_hand_mismatch:
        raise HandCLIPError(
            f"checkpoint {ckpt_path} was trained on hand type {meta['hand']!r}, not {hand!r}; "
            f"pass hand={meta['hand']}, or allow_hand_mismatch=true to score it on {hand!r} anyway"
        )
    module = load_module(ckpt_path)
    result = _score(module.encoder, data_for, hand, options)
    return {"model": FINE_TUNED, "model_name": meta["model_name"], "pretrained": meta.get("pretrained"),
            "trained_on": meta["hand"], "checkpoint": str(ckpt_path), "status": "ok", **result}


def compare_hands(hands: list[str], zero_shot: ImageEncoder, model_name: str, pretrained: str | None,
                  output_root: str | Path, data_for: DataFor, options: ScoreOptions) -> list[dict]:
    """For every hand type: the zero-shot baseline, and the fine-tuned model where training left one."""
    entries = []
    for hand in hands:
        entries.append(score_zero_shot(zero_shot, model_name, pretrained, hand, data_for, options))
        ckpt = trained_checkpoint(output_root, hand)
        if ckpt.is_file():
            entries.append(score_checkpoint(ckpt, hand, data_for, options))
            if entries[-1]["model_name"] != model_name:
                log.warning("%s: the checkpoint is a fine-tuned %s but the zero-shot baseline is %s "
                            "(choose the baseline with model=...)", hand, entries[-1]["model_name"], model_name)
        else:
            log.info("%s: no fine-tuned checkpoint at %s (baseline only)", hand, ckpt)
            entries.append({"hand": hand, "model": FINE_TUNED, "checkpoint": str(ckpt), "status": "no checkpoint"})
    return entries
