"""The open-set threshold of a fused identify run (``fusion=mean|max``), decided per result.

* ``threshold=VALUE``: that value for every result;
* otherwise a result fused over **two or more** hand types is decided at the fused threshold calibrated on val
  (``calibration=FILE``, or ``<output_root>/train/fusion.calibration.json`` written by ``python -m handclip.eval
  all=true cross_hand=true``; :mod:`handclip.evaluation.fused_calibration`, which checks that it was computed for
  these very models), and a result scored on **one** hand type (a single routed photo, or a person sharing one
  hand type with the probe) at that hand type's own checkpoint calibration (``<ckpt stem>.calibration.json``):
  a single model's score, calibrated as such.

Every threshold is resolved before any photo is embedded.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from handclip.errors import HandCLIPError
from handclip.evaluation.calibration import read_calibration, select_threshold, sidecar_path
from handclip.evaluation.fused_calibration import (
    fused_calibration_path,
    load_fused_calibration,
    read_fused_calibration,
)
from handclip.models.checkpoint import load_encoder
from handclip.models.fingerprint import encoder_fingerprint

FUSED_HOW_TO = ("compute it with `python -m handclip.eval all=true cross_hand=true` (on the data the models were "
                "trained on), pass calibration=FILE, or pass threshold=VALUE")


def checkpoint_fingerprint(cfg: DictConfig, ckpt: Path) -> str:
    """The fingerprint identify's loading gives ``ckpt`` (with the configured test-time augmentation)."""
    encoder, _ = load_encoder(ckpt, tta=(cfg.get("eval") or {}).get("tta"))
    return encoder_fingerprint(encoder)


def fused_calibration_file(cfg: DictConfig) -> Path | None:
    """The fused calibration file to read (None with ``threshold=``); an error when it does not exist."""
    if cfg.threshold is not None:
        return None
    path = (Path(str(cfg.calibration)).expanduser() if cfg.calibration
            else fused_calibration_path(str(cfg.paths.output_root)))
    if not path.is_file():
        raise HandCLIPError(f"fusion={cfg.fusion} has no calibrated threshold: {str(path)!r} not found; {FUSED_HOW_TO}")
    return path


def hand_threshold(cfg: DictConfig, hand: str, ckpt: Path, fingerprint: str) -> dict:
    """The threshold of one hand type's checkpoint (its calibration file beside it)."""
    path = sidecar_path(ckpt)
    how_to = (f"compute it with `python -m handclip.eval hand={hand} ckpt_path={ckpt}`, or pass threshold=VALUE "
              "(results scored on one hand type are decided at their model's own calibrated threshold)")
    if not path.is_file():
        raise HandCLIPError(f"checkpoint {str(ckpt)!r} of {hand} has no calibrated threshold ({path.name} not found "
                            f"beside it); {how_to}")
    return {**select_threshold(read_calibration(path), path, fingerprint, cfg.target_fmr, how_to),
            "source": str(path)}


def resolve_fused_thresholds(cfg: DictConfig, fingerprints: dict[str, str], checkpoints: dict[str, Path],
                             model_path) -> dict:
    """``{"fused": {...}, "per_hand": {hand: {...}}}`` for the query's hand types (``fingerprints``,
    ``checkpoints``); ``model_path(cfg, hand, where)`` finds the models of the calibration's other hand types."""
    path = fused_calibration_file(cfg)
    if path is None:
        given = {"threshold": float(cfg.threshold), "source": "threshold= (given)"}
        return {"fused": given, "per_hand": {h: given for h in fingerprints}}
    data = load_fused_calibration(path)
    every = dict(fingerprints)
    for hand in data["models"]:
        if hand not in every:
            every[hand] = checkpoint_fingerprint(cfg, model_path(cfg, hand, f"named by the fused calibration {path}"))
    every = {h: every[h] for h in data["models"]} if set(data["models"]) >= set(fingerprints) else every
    fused = {**read_fused_calibration(path, every, str(cfg.fusion), cfg.target_fmr),
             "source": f"{path}; a result on one hand type: its checkpoint's own calibration"}
    return {"fused": fused, "per_hand": {h: hand_threshold(cfg, h, checkpoints[h], fingerprints[h])
                                         for h in fingerprints}}


def threshold_for(thresholds: dict, used: list[str]) -> dict:
    """The threshold a result fused over the hand types ``used`` is decided at."""
    return thresholds["fused"] if len(used) != 1 else thresholds["per_hand"][used[0]]
