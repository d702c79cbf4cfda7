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


def holds_run(output_dir: Path) -> bool:
    """True when a training run already wrote into ``output_dir`` (checkpoints, logs or its config)."""
    checkpoints = output_dir / "checkpoints"
    return (
        (checkpoints.is_dir() and any(checkpoints.glob("*.ckpt")))
        or (output_dir / "config.yaml").exists()
        or (output_dir / "logs").is_dir()
    )


def resolve_ckpt_path(cfg: DictConfig, output_dir: Path) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run; refuse to mix with an earlier run."""
    checkpoint_dir = output_dir / "checkpoints"
    existing = holds_run(output_dir)
    if cfg.ckpt_path is None:
        if existing:
            found = sorted(p.name for p in checkpoint_dir.glob("*.ckpt")) if checkpoint_dir.is_dir() else []
            raise HandCLIPError(
                f"{output_dir} already holds a run ({', '.join(found) or 'no checkpoint yet'}). Resume it with "
                "ckpt_path=last, start elsewhere with paths.output_root=DIR, or move that folder away."
            )
        return None
    path = checkpoint_dir / "last.ckpt" if str(cfg.ckpt_path) == "last" else Path(str(cfg.ckpt_path)).expanduser()
    if not path.is_file():
        raise HandCLIPError(f"checkpoint {str(path)!r} to resume from not found")
    path = path.resolve()
    if existing and path.parent != checkpoint_dir.resolve():
        raise HandCLIPError(
            f"{output_dir} already holds another run; resuming {path} there would mix the two runs. Resume a "
            "checkpoint in its own run folder, or continue it in an empty one with paths.output_root=DIR."
        )
    return path


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
    ckpt_path = resolve_ckpt_path(cfg, output_dir)
    pl.seed_everything(cfg.seed, workers=True)
    if torch.cuda.is_available() and str(cfg.trainer.get("precision")) in ("bf16-mixed", "16-mixed"):
        torch.set_float32_matmul_precision("high")  # TF32 for what autocast leaves in fp32 (trainer=gpu)

    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    # A resumed run takes every weight from its checkpoint: no need to fetch the pretrained ones.
    model = instantiate(cfg.model, classes=datamodule.classes, hand=cfg.hand.name,
                        load_pretrained=ckpt_path is None)
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
