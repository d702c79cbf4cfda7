"""Loggers (``logger=csv|tensorboard|mlflow|wandb|many``, configs/logger/): checked, built, closed, and fed the
figures of a run that Lightning does not log itself (the calibrated threshold, the final and best val figures,
eval's test summary).

Nothing here imports a tracker's package: a preset whose package is missing is refused by
:func:`check_loggers_installed` (one line naming the optional extra) before torch loads.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import sys
from collections.abc import Iterator, Mapping
from typing import Any

from handclip.errors import HandCLIPError

#: Lightning logger class -> (modules, any one of which it needs; the optional extra that installs it).
LOGGER_PACKAGES = {
    "MLFlowLogger": (("mlflow",), "mlflow"),
    "WandbLogger": (("wandb",), "wandb"),
    "TensorBoardLogger": (("tensorboard", "tensorboardX"), "tensorboard"),
}


def _loggers(logger_cfg: Mapping | None) -> Iterator[tuple[str, Mapping]]:
    for name, node in (logger_cfg or {}).items():
        if node:
            yield str(name), node


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module hidden in sys.modules
        return False


def check_loggers_installed(logger_cfg: Mapping | None) -> None:
    """Refuse, in one line naming the extra to install, a logger whose package is not installed."""
    for name, node in _loggers(logger_cfg):
        cls = str(node.get("_target_", "")).rpartition(".")[2]
        if cls not in LOGGER_PACKAGES:
            continue
        modules, extra = LOGGER_PACKAGES[cls]
        if not any(_installed(m) for m in modules):
            raise HandCLIPError(f"logger.{name} ({cls}) needs the {modules[0]} package, which is not installed; "
                                f"install the optional extra: pip install -e \".[{extra}]\" (or pip install "
                                f"{extra}), or choose another logger (logger=csv)")


def build_loggers(logger_cfg: Mapping | None) -> list:
    """The configured Lightning loggers (an empty list for none).

    MLflow (3.x) refuses a ``file:`` tracking store unless ``MLFLOW_ALLOW_FILE_STORE`` is set: the presets keep
    a run's store in its folder, which is what that setting is for, so it is set when such a store is asked for
    (a database store, ``logger.mlflow.tracking_uri=sqlite:///...``, needs nothing)."""
    from hydra.utils import instantiate

    check_loggers_installed(logger_cfg)
    for _, node in _loggers(logger_cfg):
        if str(node.get("_target_", "")).endswith("MLFlowLogger") and str(node.get("tracking_uri", "")).startswith(
                "file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return [instantiate(node) for _, node in _loggers(logger_cfg)]


@contextlib.contextmanager
def open_loggers(logger_cfg: Mapping | None) -> Iterator[list]:
    """:func:`build_loggers` for the block; at its end the W&B run is finished (Lightning leaves it open until
    the process exits, and the next job of a sweep in this process would otherwise log into it)."""
    loggers = build_loggers(logger_cfg)
    failed = True
    try:
        yield loggers
        failed = False
    finally:
        wandb = sys.modules.get("wandb")
        if wandb is not None and getattr(wandb, "run", None) is not None:
            wandb.finish(exit_code=1 if failed else 0)


def log_figures(loggers: list, figures: Mapping[str, float], step: int | None = None, epoch: int | None = None) -> None:
    """Log ``figures`` to every logger, under names every tracker accepts (MLflow refuses ``@``, ``=``, ``%``:
    ``tar@fmr=1%`` is logged as ``tar_at_fmr_1pct``); ``epoch`` (the epoch they belong to) is logged with them, as
    Lightning logs it with every figure, so that every row of a CSV log names its epoch."""
    clean: dict[str, float | int] = {_metric_name(k): float(v) for k, v in figures.items() if v is not None}
    if not clean:
        return
    if epoch is not None:
        clean["epoch"] = int(epoch)
    for logger in loggers:
        logger.log_metrics(clean, step=step)
        logger.save()


def _metric_name(key: str) -> str:
    return re.sub(r"[^\w.\- /]", "_", key.replace("@fmr=", "_at_fmr_").replace("%", "pct"))


def test_figures(entries: list[dict[str, Any]]) -> dict[str, float]:
    """Eval's summary as flat figures,
    ``test/<hand>/<finetuned|zeroshot>[/<sweep run>][/reranked|/mean_templates]/<figure>`` (means over the test
    runs): Rank-k and mAP, and the verification figures (TAR at each FMR, EER, open-set figures and the threshold)
    when scored."""
    figures: dict[str, float] = {}
    for entry in entries:
        parts = [str(entry.get("hand")), "zeroshot" if "zero-shot" in str(entry.get("model", "")) else "finetuned"]
        parts += [str(entry["run"])] if entry.get("run") else []  # a sweep job's run: what it changed
        parts += ["reranked"] if entry.get("reranked_from") else []
        parts += ["mean_templates"] if entry.get("templates_of") else []
        parts += ["cross_aspect"] if entry.get("protocol") == "cross-aspect" else []
        prefix = "test/" + "/".join(parts)
        summaries = [entry.get("summary") or {}, (entry.get("verification") or {}).get("summary") or {}]
        for summary in summaries:
            for key, value in summary.items():
                if key.endswith("_scores"):  # how many comparisons, not a figure
                    continue
                if isinstance(value, Mapping) and isinstance(value.get("mean"), (int, float)):
                    figures[f"{prefix}/{key}"] = float(value["mean"])
        calibration = (entry.get("verification") or {}).get("calibration")
        if calibration:
            figures[f"{prefix}/threshold"] = float(calibration["threshold"])
    return figures


def log_test_summary(logger_cfg: Mapping | None, entries: list[dict[str, Any]], params: Mapping[str, Any]) -> None:
    """Eval with a logger: the test summary (:func:`test_figures`) and what was scored, to every logger."""
    if not any(True for _ in _loggers(logger_cfg)):
        return
    with open_loggers(logger_cfg) as loggers:
        for logger in loggers:
            logger.log_hyperparams(dict(params))
        log_figures(loggers, test_figures(entries))
        for logger in loggers:
            logger.finalize("success")
