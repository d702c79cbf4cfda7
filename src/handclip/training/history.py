"""What a run learnt, epoch by epoch, seen without a tracker: ``curves.png`` in its folder.

:class:`RunHistory` is a callback that every training run has, whatever ``callbacks`` and ``logger`` say: it
records the figures the model logs (training loss and accuracy, val loss, accuracy and rank-1) at each epoch
end, keeps them in ``last.ckpt`` (a resumed run draws every epoch, not only its own), draws them when training
ends or fails, and at the end of ``fit`` gives the loggers the final and best figures (``final/val/rank1``,
``best/val/rank1``, ...), which a tracker shows as the run's summary.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from matplotlib.figure import Figure

from handclip.evaluation.plots import save_png
from handclip.training.trackers import log_figures

log = logging.getLogger(__name__)

CURVES_NAME = "curves.png"
#: Figures of the training epoch, and of the validation that ends it.
TRAIN_FIGURES = ("train/loss_epoch", "train/acc")
VAL_FIGURES = ("val/loss", "val/acc", "val/rank1")


class RunHistory(pl.Callback):
    """Per-epoch figures of the run; ``curves.png`` at ``path``; the final and best figures to the loggers."""

    def __init__(self, path: str | Path, title: str = ""):
        self.path = Path(path)
        self.title = title
        self.epochs: dict[int, dict[str, float]] = {}

    def _record(self, trainer: pl.Trainer, keys: tuple[str, ...]) -> None:
        row = self.epochs.setdefault(int(trainer.current_epoch), {})
        for key in keys:
            value = trainer.callback_metrics.get(key)
            if value is not None:
                row[key] = float(value)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._record(trainer, VAL_FIGURES)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record(trainer, TRAIN_FIGURES)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._draw(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._draw(trainer)  # the epochs done so far

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.epochs:
            log_figures(trainer.loggers, self.summary(), step=trainer.global_step, epoch=max(self.epochs))

    def _draw(self, trainer: pl.Trainer) -> None:
        if not trainer.is_global_zero or not self.epochs:
            return
        try:
            curves_plot(self.epochs, self.path, self.title)
        except OSError as err:  # a picture is not worth failing (or hiding the error of) a run
            log.warning("could not write %s: %s", self.path, err)

    def summary(self) -> dict[str, float]:
        """``final/<figure>`` of the last epoch (``final/val/rank1``, ``final/train/loss``, ...), ``best/val/rank1`` and
        ``best/epoch`` (epochs counted from 1)."""
        if not self.epochs:
            return {}
        last = max(self.epochs)
        figures = {f"final/{key.removesuffix('_epoch')}": value for key, value in self.epochs[last].items()}
        figures["final/epoch"] = last + 1
        scored = [(row["val/rank1"], -epoch) for epoch, row in self.epochs.items() if "val/rank1" in row]
        if scored:
            rank1, epoch = max(scored)  # the first epoch of the highest rank-1: the one best.ckpt holds
            figures["best/val/rank1"], figures["best/epoch"] = rank1, 1 - epoch
        return figures

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": {epoch: dict(row) for epoch, row in self.epochs.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epochs = {int(epoch): dict(row) for epoch, row in state_dict.get("epochs", {}).items()}


def run_title(output_dir: Path, output_root: str | Path) -> str:
    """The run folder below ``output_root`` (``train/dorsal_right``), or its whole path."""
    root = Path(output_root)
    return str(output_dir.relative_to(root)) if output_dir.is_relative_to(root) else str(output_dir)


def curves_plot(epochs: dict[int, dict[str, float]], path: Path, title: str = "") -> Path:
    """Loss, accuracy and val rank-1 against the epoch (from 1), training solid and val dashed."""
    fig = Figure(figsize=(13, 4), layout="constrained")
    loss, acc, rank1 = fig.subplots(1, 3)
    lines = ((loss, "train/loss_epoch", "train", "-", 1), (loss, "val/loss", "val", "--", 1),
             (acc, "train/acc", "train", "-", 100), (acc, "val/acc", "val", "--", 100),
             (rank1, "val/rank1", "val", "--", 100))
    for ax, key, label, style, scale in lines:
        points = [(epoch + 1, scale * row[key]) for epoch, row in sorted(epochs.items()) if key in row]
        if points:
            ax.plot(*zip(*points), style, marker="o", markersize=3, label=label,
                    color="tab:blue" if label == "train" else "tab:orange")
    ranked = [(row["val/rank1"], -epoch) for epoch, row in epochs.items() if "val/rank1" in row]
    if ranked:
        best, epoch = max(ranked)
        rank1.plot([1 - epoch], [100 * best], "*", markersize=11, color="tab:red",
                   label=f"best {100 * best:.1f} % (epoch {1 - epoch})")
    loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    acc.set(xlabel="epoch", ylabel="%", ylim=(0, 100.5), title="identity accuracy")
    rank1.set(xlabel="epoch", ylabel="%", ylim=(0, 100.5), title="val rank-1 (against the training images)")
    for ax in (loss, acc, rank1):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=8)
    if title:
        fig.suptitle(title)
    return save_png(fig, path)
