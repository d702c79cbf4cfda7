"""When checkpoints are written: ``best.ckpt`` at most once per epoch, ``last.ckpt`` by training time and at the end.

Both are Lightning ``ModelCheckpoint`` callbacks (configs/callbacks/default.yaml); what differs from the stock one:

* :class:`LastCheckpoint` writes at the end of an epoch when it is due (``every_minutes`` of training time since the
  last write, or every ``every_n_epochs`` epochs) and always at the end of training, so a short run writes it about
  once and a crash loses little. Only epoch ends are used: a checkpoint from the middle of an epoch cannot resume
  exactly. It carries the global random-number states (torch, CUDA, NumPy, Python), so that a resumed run draws the
  same shuffled batches as the uninterrupted one.
* :class:`BestCheckpoint` keeps the stock callback's state key (its state in checkpoints of earlier versions is
  still restored) and, when a run resumes from a ``last.ckpt`` older than its ``best.ckpt``, keeps the better score
  of the two, so that a worse epoch never replaces the best model.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any
from weakref import proxy

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.trainer.states import TrainerFn

from handclip.errors import HandCLIPError
from handclip.models.checkpoint import read_checkpoint_meta

log = logging.getLogger(__name__)

#: Training-time clock of the cadence (a name of its own, so that tests can replace it).
_clock = time.monotonic


def rng_states() -> dict[str, Any]:
    """The global random-number states, as values torch's ``weights_only`` loader accepts."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "python": (version, tuple(state), gauss),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what :func:`rng_states` returned (CUDA states only on as many devices as were saved)."""
    torch.set_rng_state(states["torch"].cpu())
    cuda = list(states.get("cuda") or [])
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
    n = states["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, state, gauss = states["python"]
    random.setstate((version, tuple(state), gauss))


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt`` (weights, optimizer, loop and RNG state): at epoch ends when due, and at the end of training.

    ``every_minutes``: due when that much training time passed since the last write (``0``: every epoch);
    ``every_n_epochs``: due every that many epochs. Either may be ``None``; with both ``None`` it is written only
    at the end of training.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "last", every_minutes: float | None = 5.0,
                 every_n_epochs: int | None = None, **kwargs: Any):
        if every_minutes is not None and every_minutes < 0:
            raise HandCLIPError(f"last_checkpoint.every_minutes must be >= 0 or null, got {every_minutes}")
        if every_n_epochs is not None and every_n_epochs < 1:
            raise HandCLIPError(f"last_checkpoint.every_n_epochs must be >= 1 or null, got {every_n_epochs}")
        if kwargs.get("save_weights_only"):
            raise HandCLIPError("last.ckpt is what a run resumes from: it cannot be weights-only")
        kwargs.setdefault("enable_version_counter", False)
        # No trigger of the stock callback fires (every_n_epochs=0, no step or time interval): the hooks below decide.
        super().__init__(dirpath=dirpath, filename=filename, monitor=None, save_top_k=1, every_n_epochs=0, **kwargs)
        self.every_minutes = every_minutes
        self.every_n = every_n_epochs
        # The writes are decided and done here, through Lightning's public API only (trainer.save_checkpoint,
        # format_checkpoint_name, Logger.after_save_checkpoint), with this callback's own clock and step.
        self.last_write_time: float | None = None
        self.saved_step = 0  # as Lightning's: nothing to save before the first step

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.last_write_time = _clock()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._skip(trainer):
            return
        # every process must take the same decision (a save waits for all of them): rank 0's clock decides
        if trainer.strategy.broadcast(self._due(trainer)):
            self._write(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # training that stopped elsewhere than at an epoch end (max_steps, max_time) still leaves its last state
        if not self._skip(trainer):
            self._write(trainer)

    def _skip(self, trainer: pl.Trainer) -> bool:
        """No checkpoint in a fast_dev_run, outside fitting, in the sanity check, or twice at one step (the rules of
        Lightning's ModelCheckpoint)."""
        return (bool(trainer.fast_dev_run) or trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking
                or self.saved_step == trainer.global_step)

    def _due(self, trainer: pl.Trainer) -> bool:
        finished = trainer.current_epoch + 1
        if (trainer.max_epochs is not None and 0 <= trainer.max_epochs <= finished) or trainer.should_stop:
            return True
        if self.every_n and finished % self.every_n == 0:
            return True
        elapsed = _clock() - (self.last_write_time or 0.0)
        return self.every_minutes is not None and elapsed >= 60 * self.every_minutes

    def _write(self, trainer: pl.Trainer) -> None:
        metrics = {**trainer.callback_metrics, "epoch": trainer.current_epoch, "step": trainer.global_step}
        path = self.format_checkpoint_name(metrics)
        trainer.save_checkpoint(path, self.save_weights_only)  # every process: the strategy decides who writes
        self.best_model_path, self.saved_step, self.last_write_time = path, trainer.global_step, _clock()
        for logger in trainer.loggers if trainer.is_global_zero else []:
            logger.after_save_checkpoint(proxy(self))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rng": rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if "rng" in state_dict:
            set_rng_states(state_dict["rng"])


class BestCheckpoint(ModelCheckpoint):
    """The stock ``ModelCheckpoint`` for ``best.ckpt``, keeping the better score of ``last.ckpt`` and ``best.ckpt``
    when a run resumes."""

    @property
    def state_key(self) -> str:
        # the key of a plain ModelCheckpoint with these settings: the state saved by earlier versions still loads
        key = super().state_key
        return "ModelCheckpoint" + key[len(type(self).__qualname__):]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if trainer.ckpt_path and self.monitor and self.save_top_k == 1 and self.dirpath:
            self._keep_saved_best(Path(self.format_checkpoint_name({})))

    def _keep_saved_best(self, path: Path) -> None:
        """Adopt the score stored in an existing ``best.ckpt`` when it beats the one restored from ``last.ckpt``."""
        if not path.is_file():
            return
        try:
            score = (read_checkpoint_meta(path).get("metrics") or {}).get(self.monitor)
        except HandCLIPError as err:
            log.warning("could not read the score of %s: %s", path, err)
            return
        if score is None:
            return
        saved = torch.tensor(float(score))
        current = self.best_model_score
        if current is not None and not (saved > current if self.mode == "max" else saved < current):
            return
        log.info("%s holds %s=%.4f, better than the resumed checkpoint's record; it is kept until beaten",
                 path.name, self.monitor, saved.item())
        self.best_k_models = {str(path): saved}
        self.kth_best_model_path = self.best_model_path = str(path)
        self.kth_value = self.best_model_score = saved


class ProgressBar(TQDMProgressBar):
    """Lightning's progress bar, redrawn every ``refresh_rate`` steps, showing the latest training loss.

    The loss is read from the device only when the bar is redrawn: a step-logged ``prog_bar`` value is read back
    by Lightning after every step, a host sync that stalls a GPU."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        loss = trainer.callback_metrics.get("train/loss_step")
        if loss is not None and trainer.training:
            metrics["train/loss"] = f"{float(loss):.3f}"
        return metrics


def progress_bar(enabled: bool = True, refresh_rate: int = 10) -> ProgressBar | None:
    """The :class:`ProgressBar`, or ``None`` (no callback) when the trainer's bar is off
    (``enabled: ${trainer.enable_progress_bar}``)."""
    if refresh_rate < 1:
        raise HandCLIPError(f"callbacks.progress_bar.refresh_rate must be >= 1, got {refresh_rate}")
    return ProgressBar(refresh_rate=refresh_rate) if enabled else None
