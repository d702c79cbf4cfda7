"""Training the hand-type classifier (:mod:`handclip.identify.hand_classifier`): ``python -m handclip.identify
task=train_hand_type`` embeds the ``train`` and ``val`` photos of the 11k hand types under ``paths.data_dir`` with
one model (``ckpt_path``, or the zero-shot model given by ``model``), fits the probe on train, measures it on val
and writes ``hand_classifier.path``."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig

from handclip.data.layout import available_hands, list_split
from handclip.errors import HandCLIPError
from handclip.hands import ELEVEN_K_HANDS
from handclip.identify.hand_classifier import (
    DEFAULT_MIN_CONFIDENCE,
    HandClassifier,
    fit_probe,
    save_classifier,
    val_figures,
)
from handclip.identify.images import embed_files, report_failures
from handclip.identify.run import load_model
from handclip.utils.devices import resolve_device
from handclip.utils.files import check_output_file


def _photos(root: Path, hands: list[str], split: str) -> tuple[list[Path], list[int]]:
    paths, labels = [], []
    for c, hand in enumerate(hands):
        samples = list_split(root, hand, split)
        paths += [s.path for s in samples]
        labels += [c] * len(samples)
    return paths, labels


def _embed(encoder, paths: list[Path], labels: list[int], cfg: DictConfig, device, what: str):
    done = embed_files(encoder, paths, device, int(cfg.batch_size), cfg.num_workers, bool(cfg.progress),
                       desc=f"{what}: embedding")
    report_failures([(paths[i], msg) for i, msg in done.failed], what)
    if not done.rows:
        raise HandCLIPError(f"none of the {len(paths)} {what} photos could be read")
    return done.embeddings, [labels[i] for i in done.rows]


def train_hand_classifier(cfg: DictConfig) -> dict:
    """Train the probe as configured (``hand_classifier.*``, the model of ``ckpt_path``/``model``), write it to
    ``hand_classifier.path``, print its val figures and return them."""
    settings = cfg.hand_classifier
    out = check_output_file(settings.path, bool(cfg.overwrite), (".json",))
    root = Path(str(cfg.paths.data_dir)).expanduser()
    hands = [h for h in ELEVEN_K_HANDS if h in available_hands(root)]
    if len(hands) < 2:
        raise HandCLIPError(f"the hand-type classifier needs the 11k layout of at least 2 hand types under "
                            f"paths.data_dir={str(root)!r} (train_val_test_split_<hand>/train and val: "
                            f"`python -m handclip.prepare`); found {', '.join(hands) or 'none'}")
    train_paths, train_labels = _photos(root, hands, "train")
    val_paths, val_labels = _photos(root, hands, "val")
    device = resolve_device(cfg.device)
    encoder, model, _ = load_model(cfg)
    x, y = _embed(encoder, train_paths, train_labels, cfg, device, "train")
    vx, vy = _embed(encoder, val_paths, val_labels, cfg, device, "val")
    weight, bias = fit_probe(x, torch.tensor(y), len(hands), float(settings.weight_decay))
    level = DEFAULT_MIN_CONFIDENCE if settings.min_confidence is None else float(settings.min_confidence)
    clf = HandClassifier(weight, bias, hands, {"key": model.key, "fingerprint": model.fingerprint,
                                               "seed": int(cfg.seed)}, level, {})
    clf.figures = {**val_figures(clf, vx, vy), "train_images": len(y), "data_dir": str(root.resolve()),
                   "weight_decay": float(settings.weight_decay)}
    save_classifier(clf, out, bool(cfg.overwrite))
    f = clf.figures
    routed = "-" if f["val_accuracy_routed"] is None else f"{f['val_accuracy_routed']:.3f}"
    print(f"hand-type classifier ({', '.join(hands)}) on {json.dumps(model.key)}: val accuracy "
          f"{f['val_accuracy']:.3f} ({f['val_images']} photos); at min_confidence {level:g}: "
          f"{f['val_coverage']:.1%} routed, accuracy {routed}\nwritten: {out}")
    return {"path": str(out), **f, "classes": hands, "min_confidence": level}
