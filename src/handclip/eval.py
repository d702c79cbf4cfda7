"""Score re-identification on the test query/gallery runs: zero-shot CLIP and fine-tuned HandCLIP.

    python -m handclip.eval hand=dorsal_right ckpt_path=outputs/train/dorsal_right/checkpoints/best.ckpt
    python -m handclip.eval hand=dorsal_right                 # zero-shot model given by `model`
    python -m handclip.eval all=true                          # every hand type: the comparison table
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from handclip import CONFIG_DIR
from handclip import config as _config  # noqa: F401  (registers the ${handclip_root:} resolver)
from handclip.checkpoints import load_module, read_checkpoint_meta
from handclip.data.layout import available_hands, check_hand
from handclip.errors import HandCLIPError, exit_on_error
from handclip.evaluation.embed import resolve_device
from handclip.evaluation.protocol import evaluate_hand
from handclip.evaluation.report import FINE_TUNED, ZERO_SHOT, markdown_table, table_rows, write_report
from handclip.models.encoder import zero_shot_encoder

log = logging.getLogger(__name__)


def trained_checkpoint(cfg: DictConfig, hand: str) -> Path:
    """Where `python -m handclip.train hand=<hand>` leaves its best checkpoint."""
    return Path(cfg.paths.output_root) / "train" / hand / "checkpoints" / "best.ckpt"


def _score(cfg: DictConfig, hand: str, encoder, model_name: str, pretrained, device) -> dict:
    datamodule = instantiate(cfg.data, hand=hand, model_name=model_name, pretrained=pretrained)
    return evaluate_hand(encoder, datamodule, device, ranks=tuple(cfg.metrics.ranks), ap=cfg.metrics.ap,
                         cross_aspect=cfg.metrics.cross_aspect, progress=cfg.data.progress)


def score_zero_shot(cfg: DictConfig, hand: str, device, encoder=None) -> dict:
    encoder = encoder or zero_shot_encoder(cfg.model.model_name, cfg.model.pretrained, cfg.model.cache_dir)
    result = _score(cfg, hand, encoder, cfg.model.model_name, cfg.model.pretrained, device)
    return {"model": ZERO_SHOT, "model_name": cfg.model.model_name, "pretrained": cfg.model.pretrained,
            "checkpoint": None, "status": "ok", **result}


def score_checkpoint(cfg: DictConfig, hand: str, ckpt_path: Path, device) -> dict:
    meta = read_checkpoint_meta(ckpt_path)
    if meta["hand"] != hand and not cfg.allow_hand_mismatch:
        raise HandCLIPError(
            f"checkpoint {ckpt_path} was trained on hand type {meta['hand']!r}, not {hand!r}; "
            f"pass hand={meta['hand']}, or allow_hand_mismatch=true to score it on {hand!r} anyway"
        )
    module = load_module(ckpt_path)
    result = _score(cfg, hand, module, meta["model_name"], meta.get("pretrained"), device)
    return {"model": FINE_TUNED, "model_name": meta["model_name"], "pretrained": meta.get("pretrained"),
            "trained_on": meta["hand"], "checkpoint": str(ckpt_path), "status": "ok", **result}


def evaluate(cfg: DictConfig) -> dict:
    """Score as configured, write the report files, return ``{"entries": [...], "files": {...}}``."""
    pl.seed_everything(cfg.seed, verbose=False)
    device = resolve_device(cfg.device)
    out_dir = Path(cfg.paths.output_root) / "eval"
    entries = []
    if cfg.all:
        hands = available_hands(cfg.data.root)
        if not hands:
            raise HandCLIPError(f"no hand folders under {cfg.data.root}; prepare data or run `make demo`")
        encoder = zero_shot_encoder(cfg.model.model_name, cfg.model.pretrained, cfg.model.cache_dir)
        for hand in hands:
            entries.append(score_zero_shot(cfg, hand, device, encoder))
            ckpt = trained_checkpoint(cfg, hand)
            if ckpt.is_file():
                entries.append(score_checkpoint(cfg, hand, ckpt, device))
                if entries[-1]["model_name"] != cfg.model.model_name:
                    log.warning("%s: the checkpoint is a fine-tuned %s but the zero-shot baseline is %s "
                                "(choose the baseline with model=...)", hand, entries[-1]["model_name"],
                                cfg.model.model_name)
            else:
                log.info("%s: no fine-tuned checkpoint at %s (baseline only)", hand, ckpt)
                entries.append({"hand": hand, "model": FINE_TUNED, "checkpoint": str(ckpt),
                                "status": "no checkpoint"})
        stem = "comparison"
    else:
        hand = check_hand(cfg.hand.name)
        if cfg.ckpt_path:
            entries.append(score_checkpoint(cfg, hand, Path(str(cfg.ckpt_path)).expanduser().resolve(), device))
            stem = f"{hand}_finetuned"
        else:
            entries.append(score_zero_shot(cfg, hand, device))
            stem = f"{hand}_zeroshot"
    config = OmegaConf.to_container(cfg, resolve=True)
    files = write_report(entries, out_dir, config, stem=stem)
    print(markdown_table(table_rows(entries)), end="")
    print(f"written: {', '.join(str(p) for p in files.values())}")
    return {"entries": entries, "files": files}


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="eval")
@exit_on_error
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
