"""Calibrate the open-set threshold when training ends (``callbacks.calibration`` in configs/callbacks)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl

from handclip.evaluation.calibration import calibrate, sidecar_path, write_calibration
from handclip.models.checkpoint import load_encoder
from handclip.training.trackers import log_figures

log = logging.getLogger(__name__)


class CalibrationCallback(pl.Callback):
    """At the end of ``fit``: load the best checkpoint, calibrate its threshold on val against the training
    identities and write ``<checkpoint stem>.calibration.json`` beside it (the checkpoint is not rewritten); the
    threshold and its TAR on val also go to the loggers (``calibration/threshold``, ``calibration/tar``)."""

    def __init__(self, checkpoint: str, target_fmr: float = 0.01, progress: bool = False):
        self.checkpoint = Path(checkpoint)
        self.target_fmr = float(target_fmr)
        self.progress = progress
        self._epoch = 0  # the last epoch trained, which the threshold is logged with

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch = trainer.current_epoch

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "val_set"):
            log.warning("no HandDataModule: the open-set threshold was not calibrated")
            return
        if not self.checkpoint.is_file():
            log.warning("%s not found: the open-set threshold was not calibrated", self.checkpoint)
            return
        encoder, _ = load_encoder(self.checkpoint)
        result = calibrate(encoder, datamodule, pl_module.device, self.target_fmr, progress=self.progress)
        path = write_calibration(sidecar_path(self.checkpoint), result, self.checkpoint)
        log.info("open-set threshold %.4f (FMR %g on val against the training identities; TAR %.3f) written to %s",
                 result["threshold"], self.target_fmr, result["tar"], path)
        # to whichever logger is on (a tracker shows it with the run's figures)
        figures = {"calibration/threshold": result["threshold"], "calibration/tar": result["tar"],
                   "calibration/target_fmr": self.target_fmr}
        log_figures(trainer.loggers, figures, step=trainer.global_step, epoch=self._epoch)
