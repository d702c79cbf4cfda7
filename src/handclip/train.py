"""Fine-tune CLIP's image tower on one hand type.

    python -m handclip.train hand=dorsal_right
    python -m handclip.train -m hand=dorsal_right,dorsal_left,palmar_right,palmar_left
    python -m handclip.train experiment=demo
    python -m handclip.train hand=dorsal_right ckpt_path=last        # resume
    python -m handclip.train -m 'hand=glob(*)' ckpt_path=auto        # resume, start or skip each hand type
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from handclip.command_line import hydra_entry
from handclip.hands import check_hand
from handclip.training.trackers import check_loggers_installed

if TYPE_CHECKING:
    from omegaconf import DictConfig

# torch, Lightning and open_clip are imported when the job runs, not with this module: `python -m
# handclip.train` checks its command line first, so a mistyped option answers in about a second.

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, float]:
    """Train one hand type as configured; return the final logged metrics (none when already complete)."""
    from handclip.run_folder import (
        RunComplete,
        best_figures,
        check_folders_writable,
        check_max_epochs,
        claim_run_folder,
        resolve_ckpt_path,
    )
    from handclip.utils.devices import check_trainer_devices, launched_as_rank_zero

    check_hand(cfg.hand.name)
    check_loggers_installed(cfg.get("logger"))
    max_epochs = check_max_epochs(cfg.trainer.get("max_epochs"))
    check_trainer_devices(cfg.trainer.get("accelerator", "auto"), cfg.trainer.get("devices", 1))
    # Under DDP every process runs this function; only rank 0 checks, claims and writes the run folder.
    rank_zero = launched_as_rank_zero()
    if rank_zero:
        check_folders_writable(cfg)
    output_dir = Path(cfg.paths.output_dir)
    with claim_run_folder(output_dir):
        try:
            ckpt_path = resolve_ckpt_path(cfg.ckpt_path, output_dir, max_epochs, rank_zero=rank_zero)
        except RunComplete as done:
            log.info("%s: %s", cfg.hand.name, done)
            return best_figures(output_dir)  # a sweeper still gets the run's figure
        return _fit(cfg, output_dir, ckpt_path, rank_zero)


def _fit(cfg: DictConfig, output_dir: Path, ckpt_path: Path | None, rank_zero: bool) -> dict[str, float]:
    import pytorch_lightning as pl
    import torch
    from hydra.utils import instantiate

    from handclip.launch import ddp_job, describe_scale
    from handclip.models.clip import preprocess_config
    from handclip.run_folder import MONITORED, check_resume_compatible, save_config
    from handclip.training.history import CURVES_NAME, RunHistory, run_title
    from handclip.training.trackers import open_loggers

    pl.seed_everything(cfg.seed, workers=True)
    if torch.cuda.is_available() and str(cfg.trainer.get("precision")) in ("bf16-mixed", "16-mixed"):
        torch.set_float32_matmul_precision("high")  # TF32 for what autocast leaves in fp32 (trainer=gpu)

    # The model decides the preprocessing; the data receives it (and decodes images in prepare_data).
    data_for = instantiate(cfg.data, _partial_=True)  # objects are passed at call time, not through OmegaConf
    datamodule = data_for(preprocess=preprocess_config(cfg.model.model_name, cfg.model.pretrained))
    # A resumed run takes every weight it uses from its checkpoint: no need to fetch the pretrained ones.
    model = instantiate(cfg.model, classes=datamodule.classes, hand=cfg.hand.name, load_pretrained=ckpt_path is None,
                        tta=(cfg.get("eval") or {}).get("tta") or "none")
    if ckpt_path is not None:
        check_resume_compatible(ckpt_path, model.hparams)
    if rank_zero:
        log.info("config saved to %s", save_config(cfg, output_dir, resumed=ckpt_path is not None))

    callbacks = [cb for cb in (instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c) if cb is not None]
    # every run draws its curves (curves.png) and gives its final figures to the loggers, whatever `callbacks` says
    callbacks.append(RunHistory(output_dir / CURVES_NAME, title=run_title(output_dir, cfg.paths.output_root)))
    with open_loggers(cfg.get("logger")) as loggers:
        # callbacks=none: no checkpoint at all (Lightning would otherwise add one of its own)
        trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                              enable_checkpointing=any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks))
        if scale := describe_scale(trainer, datamodule.batch_size):
            log.info(scale)
        with ddp_job(trainer):  # DDP re-runs this job's command line (not a -m sweep's) for its processes
            trainer.fit(model, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None)
    figures = {k: float(v) for k, v in trainer.callback_metrics.items()}
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None and checkpoint.best_model_path and checkpoint.best_model_score is not None:
        figures[f"best/{MONITORED}"] = float(checkpoint.best_model_score)
        log.info("best checkpoint: %s (%s=%.4f)", checkpoint.best_model_path, MONITORED, figures[f"best/{MONITORED}"])
    return figures


@hydra_entry("train")
def main(cfg: DictConfig) -> float | None:
    """The best val/rank1 of the run: what a sweeper (hparams_search=optuna) optimises."""
    # From the importable module, not __main__: the submitit launchers pickle this task function, and
    # cloudpickle copies __main__'s functions by value (with what they use; torch.classes cannot be).
    from handclip.run_folder import MONITORED
    from handclip.train import train as train_job

    return train_job(cfg).get(f"best/{MONITORED}")


if __name__ == "__main__":
    main()
