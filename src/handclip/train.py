"""Fine-tune CLIP's image tower on one hand type.

    python -m handclip.train hand=dorsal_right
    python -m handclip.train -m hand=dorsal_right,dorsal_left,palmar_right,palmar_left
    python -m handclip.train experiment=demo
    python -m handclip.train hand=dorsal_right ckpt_path=last        # resume
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from handclip import CONFIG_DIR
from handclip import config as _config  # noqa: F401  (registers the ${handclip_root:} resolver)
from handclip.checkpoints import read_checkpoint_meta
from handclip.data.layout import check_hand
from handclip.errors import HandCLIPError, exit_on_error

log = logging.getLogger(__name__)


def resolve_ckpt_path(cfg: DictConfig, checkpoint_dir: Path) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run; refuse to mix with an earlier run."""
    existing = sorted(checkpoint_dir.glob("*.ckpt")) if checkpoint_dir.is_dir() else []
    if cfg.ckpt_path is None:
        if existing:
            raise HandCLIPError(
                f"{checkpoint_dir} already holds a run ({', '.join(p.name for p in existing)}). Resume it with "
                "ckpt_path=last, start elsewhere with paths.output_root=DIR, or move that folder away."
            )
        return None
    path = checkpoint_dir / "last.ckpt" if str(cfg.ckpt_path) == "last" else Path(str(cfg.ckpt_path)).expanduser()
    if not path.is_file():
        raise HandCLIPError(f"checkpoint {str(path)!r} to resume from not found")
    return path.resolve()


def check_resume_compatible(ckpt_path: Path, model: pl.LightningModule) -> None:
    """A resumed checkpoint must have been trained with the same model and the same classes."""
    meta = read_checkpoint_meta(ckpt_path)
    for key in ("model_name", "hand"):
        if meta.get(key) != model.hparams[key]:
            raise HandCLIPError(
                f"checkpoint {ckpt_path} was trained with {key}={meta.get(key)!r}, but this run uses "
                f"{key}={model.hparams[key]!r}; resume with the same config or start a new run"
            )
    if list(meta.get("classes", [])) != list(model.hparams.classes):
        raise HandCLIPError(
            f"checkpoint {ckpt_path} was trained on {len(meta.get('classes', []))} identities that differ from "
            f"the {len(model.hparams.classes)} training identities of this data; resume on the same data"
        )


def save_config(cfg: DictConfig, output_dir: Path, resumed: bool) -> Path:
    """Save the composed config beside the checkpoints, never over an earlier run's copy."""
    output_dir.mkdir(parents=True, exist_ok=True)
    name = "config.yaml"
    if resumed or (output_dir / name).exists():
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        name = f"config.resumed-{stamp}.yaml"
    path = output_dir / name
    OmegaConf.save(cfg, path, resolve=True)
    return path


def train(cfg: DictConfig) -> dict[str, float]:
    """Train one hand type as configured; return the final logged metrics."""
    check_hand(cfg.hand.name)
    output_dir = Path(cfg.paths.output_dir)
    ckpt_path = resolve_ckpt_path(cfg, output_dir / "checkpoints")
    pl.seed_everything(cfg.seed, workers=True)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")

    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    model = instantiate(cfg.model, classes=datamodule.classes, hand=cfg.hand.name)
    if ckpt_path is not None:
        check_resume_compatible(ckpt_path, model)
    config_path = save_config(cfg, output_dir, resumed=ckpt_path is not None)
    log.info("config saved to %s", config_path)

    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c]
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    trainer.fit(model, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None and checkpoint.best_model_path:
        log.info("best checkpoint: %s (val/rank1=%s)", checkpoint.best_model_path, checkpoint.best_model_score)
    return metrics


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
@exit_on_error
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
