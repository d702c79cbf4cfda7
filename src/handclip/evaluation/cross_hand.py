"""``eval all=true cross_hand=true``: HandCLIP's own protocol "person across hand types" on 11k-format data.

:func:`plan_cross_hand` checks everything before any work (at least two 11k hand types with test photos, at
least two persons in two or more of them, a model for every hand type, the report name); :func:`run_cross_hand`
embeds each hand type's test photos with its own model, calibrates the fused threshold on val (reused while
models and data are unchanged), scores the protocol (:mod:`handclip.evaluation.cross_hand_protocol`) and writes
``<name>.{md,csv,json}`` (:mod:`handclip.evaluation.cross_hand_report`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from handclip.data import layout
from handclip.errors import HandCLIPError
from handclip.evaluation.calibration import data_digest
from handclip.evaluation.cross_hand_protocol import check_protocol_data, evaluate_protocol, make_runs
from handclip.evaluation.cross_hand_report import write_cross_hand_report
from handclip.evaluation.embed import embed_loader
from handclip.evaluation.fused_calibration import (
    fused_calibration_from_embeddings,
    fused_calibration_path,
    load_fused_calibration,
    write_fused_calibration,
)
from handclip.evaluation.report import ZERO_SHOT, check_report_target, fine_tuned_label
from handclip.hands import ELEVEN_K_HANDS
from handclip.models.checkpoint import load_encoder, read_checkpoint_meta
from handclip.models.encoder import zero_shot_encoder
from handclip.models.fingerprint import encoder_fingerprint
from handclip.run_folder import trained_checkpoint

log = logging.getLogger(__name__)

#: ``cross_hand_protocol.models``: which model scores each hand type.
MODEL_CHOICES = ("auto", "finetuned", "zeroshot")


@dataclass
class CrossHandPlan:
    """What the protocol will do, settled before any work."""

    hands: list[str]
    test_identities: dict[str, list[str]]
    test_paths: dict[str, list[Path]]
    checkpoints: dict[str, Path | None]
    """hand type -> its fine-tuned checkpoint, None for the zero-shot model."""
    stem: str
    runs: int
    seed: int
    target_fmr: float
    entries: list[dict] = field(default_factory=list)
    """One per hand type: the model that scores it (hand, model, checkpoint, model_name, pretrained)."""


def _test_samples(root, hand: str) -> list[layout.Sample]:
    """The test photos of a hand type: its first Monte Carlo run's query and gallery folders together (the same
    files as ``test/``, under the paths the comparison table decoded, so their crops come from the cache), or
    ``test/`` when there is no run."""
    runs = layout.discover_hand(root, hand).runs
    if not runs:
        return layout.list_split(root, hand, "test")
    samples = [s for split in runs[0] for s in layout.list_split(root, hand, split)]
    return sorted(samples, key=lambda s: (s.identity, s.path.name))


def plan_cross_hand(cfg, out_dir: Path) -> CrossHandPlan:
    """Check the protocol's data, models and output name (``cfg``: the eval config); one error line if not."""
    options = cfg.cross_hand_protocol
    root = cfg.data.root
    hands = [h for h in layout.available_hands(root) if h in ELEVEN_K_HANDS]
    if options.hands:
        missing = [h for h in options.hands if h not in hands]
        if missing:
            raise HandCLIPError(f"cross_hand_protocol.hands: no 11k hand folder for {', '.join(missing)} under "
                                f"{root} (found: {', '.join(hands) or 'none'})")
        hands = [h for h in ELEVEN_K_HANDS if h in options.hands]
    listed = {h: _test_samples(root, h) for h in hands}
    identities = {h: [s.identity for s in samples] for h, samples in listed.items()}
    check_protocol_data(identities)
    checkpoints: dict[str, Path | None] = {}
    for hand in hands:
        ckpt = trained_checkpoint(cfg.paths.output_root, hand)
        if options.models == "zeroshot" or (options.models == "auto" and not ckpt.is_file()):
            checkpoints[hand] = None
            continue
        if not ckpt.is_file():
            raise HandCLIPError(f"cross_hand_protocol.models=finetuned: no model for hand type {hand!r} ({ckpt} "
                                "not found); train it, or use models=auto (zero-shot where none)")
        meta = read_checkpoint_meta(ckpt)
        if meta["hand"] != hand:
            raise HandCLIPError(f"{ckpt} was trained on hand type {meta['hand']!r}, not {hand!r}")
        checkpoints[hand] = ckpt.resolve()
    stem = f"{cfg.name}_cross_hand" if cfg.name else "cross_hand"
    plan = CrossHandPlan(hands=hands, test_identities=identities,
                         test_paths={h: [s.path for s in samples] for h, samples in listed.items()},
                         checkpoints=checkpoints, stem=stem, runs=options.runs, seed=cfg.seed,
                         target_fmr=cfg.verification.target_fmr)
    for hand, ckpt in checkpoints.items():
        meta = read_checkpoint_meta(ckpt) if ckpt else {}
        plan.entries.append({"hand": hand, "model": fine_tuned_label() if ckpt else ZERO_SHOT,
                             "checkpoint": str(ckpt) if ckpt else None,
                             "model_name": meta.get("model_name", cfg.model.model_name),
                             "pretrained": meta.get("pretrained", cfg.model.pretrained)})
    check_report_target(out_dir, stem, plan.entries, cfg.overwrite)
    return plan


def _split(root, hand: str, split: str) -> tuple[list[Path], list[str]]:
    samples = layout.list_split(root, hand, split)
    return [s.path for s in samples], [s.identity for s in samples]


def _fused_calibration(plan: CrossHandPlan, root, models: dict, embed: Callable, out_dir: Path,
                       output_root) -> dict | None:
    """The fused calibration on val (reused when models, target and data are unchanged); None with a warning
    when the data has no val/train splits to calibrate on."""
    all_trained = all(plan.checkpoints.values())
    path = fused_calibration_path(output_root) if all_trained else out_dir / f"{plan.stem}.calibration.json"
    try:
        digests = {h: data_digest(root, h) for h in plan.hands}
    except HandCLIPError as err:
        log.warning("no fused threshold: %s", err)
        return None
    if path.is_file():
        try:
            old = load_fused_calibration(path)
        except HandCLIPError:
            old = None
        if (old and {h: m["fingerprint"] for h, m in old["models"].items()} == {h: m["fingerprint"]
                                                                                  for h, m in models.items()}
                and old.get("target_fmr") == plan.target_fmr and old.get("data_digests") == digests):
            log.info("fused calibration reused from %s", path)
            return {**old, "file": str(path)}
    val, train = {}, {}
    for hand in plan.hands:
        val_paths, val_ids = _split(root, hand, "val")
        train_paths, train_ids = _split(root, hand, "train")
        val[hand] = (embed(hand, val_paths, "val"), val_ids)
        train[hand] = (embed(hand, train_paths, "train"), train_ids)
    try:
        result = fused_calibration_from_embeddings(val, train, plan.target_fmr)
    except HandCLIPError as err:
        log.warning("no fused threshold: %s", err)
        return None
    result["data_digests"] = digests
    result["data_root"] = str(Path(root).resolve())
    try:
        write_fused_calibration(path, result, models)
    except OSError as err:
        log.warning("could not write %s (%s); the fused threshold is used for this evaluation only", path, err)
    else:
        log.info("fused threshold (mean) %.4f at FMR %g written to %s", result["fusions"]["mean"]["threshold"],
                 plan.target_fmr, path)
    return {**result, "models": models, "file": str(path)}


def run_cross_hand(plan: CrossHandPlan, cfg, data_for: Callable, device: torch.device, tta: str | None,
                   out_dir: Path, config: dict) -> dict[str, Path]:
    """Embed, calibrate, score and write the protocol's tables; returns the files written."""
    model_cfg = cfg.model
    zero_shot = None
    encoders, models = {}, {}
    for hand in plan.hands:
        ckpt = plan.checkpoints[hand]
        if ckpt is None:
            zero_shot = zero_shot or zero_shot_encoder(model_cfg.model_name, model_cfg.pretrained,
                                                       model_cfg.cache_dir, tta=tta)
            encoders[hand] = zero_shot
        else:
            encoders[hand] = load_encoder(ckpt, tta=tta)[0]
        models[hand] = {"fingerprint": encoder_fingerprint(encoders[hand]),
                        "checkpoint": str(ckpt) if ckpt else None,
                        "model_name": next(e["model_name"] for e in plan.entries if e["hand"] == hand)}
    modules = {hand: data_for(hand, encoders[hand].preprocess) for hand in plan.hands}

    def embed(hand: str, paths: list[Path], what: str) -> torch.Tensor:
        loader = modules[hand].image_dataloader(paths, desc=f"cross-hand {what}", device=device)
        feats = embed_loader(encoders[hand], loader, device, desc=f"{hand}: cross-hand {what}",
                             progress=cfg.data.progress)
        if not torch.isfinite(feats).all():
            raise HandCLIPError(f"the {hand} model produced NaN or infinite embeddings; the checkpoint is "
                                "probably diverged")
        return feats.cpu()

    calibration = _fused_calibration(plan, cfg.data.root, models, embed, out_dir, cfg.paths.output_root)
    features = {hand: embed(hand, plan.test_paths[hand], "test") for hand in plan.hands}
    runs = make_runs(plan.test_identities, plan.runs, plan.seed)
    thresholds = None if calibration is None else {
        fusion: {int(k): row["threshold"] for k, row in fig["by_hand_count"].items()}
        for fusion, fig in calibration["fusions"].items()}
    results = evaluate_protocol(features, runs, plan.hands, plan.target_fmr, thresholds)
    return write_cross_hand_report(results, plan.entries, calibration, out_dir, plan.stem, config,
                                   plan.target_fmr)
