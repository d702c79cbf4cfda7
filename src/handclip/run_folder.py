"""Where a training run lives, and when a folder may be written: the run-folder and resume policy.

A hand type trains into ``<output_root>/train/<hand>/`` (``checkpoints/``, ``logs/``, ``config.yaml``);
its best checkpoint, which evaluation scores, is ``checkpoints/best.ckpt``. A second run never mixes
with the first: it must resume it (``ckpt_path``) or go elsewhere. A running training holds a lock on its
folder (released by the operating system however the process ends), so a folder whose run wrote no
checkpoint (stopped by a NaN loss, killed in its first epoch) may be reused once that run is gone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from handclip.errors import HandCLIPError
from handclip.models.checkpoint import read_checkpoint_meta, read_epochs_trained
from handclip.utils.devices import launched_as_rank_zero
from handclip.utils.files import check_writable
from handclip.utils.locks import try_lock

#: Lock file held by the training run that writes into a run folder.
LOCK_NAME = ".lock"
#: The figure training monitors for its best checkpoint; a run returns its best value to a sweeper (Optuna).
MONITORED = "val/rank1"


class RunComplete(Exception):
    """``ckpt_path=auto`` found a run that already trained ``max_epochs`` epochs: there is nothing to do."""


def trained_checkpoint(output_root: str | Path, hand: str) -> Path:
    """Where `python -m handclip.train hand=<hand>` leaves its best checkpoint."""
    return Path(output_root) / "train" / hand / "checkpoints" / "best.ckpt"


def trained_runs(output_root: str | Path, hand: str) -> list[tuple[str, Path]]:
    """``(run name, best.ckpt)`` of every training run of ``hand``: the plain run's first (name "", its checkpoint
    path even when it has none yet), then the sweep jobs' (``<output_root>/train/<name>/<hand>``, named by what
    they changed), sorted by name."""
    train = Path(output_root) / "train"
    sweeps = sorted(train.glob(f"*/{hand}/checkpoints/best.ckpt"))
    return [("", trained_checkpoint(output_root, hand))] + [(ckpt.parents[2].name, ckpt) for ckpt in sweeps]


def run_name(ckpt: Path, output_root: str | Path) -> str | None:
    """The name of the training run a checkpoint belongs to: "" for ``<output_root>/train/<hand>/checkpoints/``,
    the sweep job's folder for ``<output_root>/train/<name>/<hand>/checkpoints/``, None for anywhere else."""
    try:
        parts = ckpt.resolve().relative_to((Path(output_root) / "train").resolve()).parts
    except ValueError:
        return None
    if len(parts) == 3 and parts[1] == "checkpoints":
        return ""
    if len(parts) == 4 and parts[2] == "checkpoints":
        return parts[0]
    return None


def best_figures(output_dir: Path) -> dict[str, float]:
    """``{"best/val/rank1": ...}`` as stored in a run's best.ckpt (empty when there is none)."""
    best = output_dir / "checkpoints" / "best.ckpt"
    score = read_checkpoint_meta(best)["metrics"].get(MONITORED) if best.is_file() else None
    return {} if score is None else {f"best/{MONITORED}": float(score)}


def holds_run(output_dir: Path) -> bool:
    """True when a training run already wrote a checkpoint into ``output_dir``."""
    checkpoints = output_dir / "checkpoints"
    return checkpoints.is_dir() and any(checkpoints.glob("*.ckpt"))


def check_max_epochs(max_epochs) -> int:
    """``trainer.max_epochs`` as a number of epochs to train (at least 1)."""
    if isinstance(max_epochs, bool) or not isinstance(max_epochs, int) or max_epochs < 1:
        raise HandCLIPError(f"trainer.max_epochs must be a whole number of at least 1, got {max_epochs!r}")
    return max_epochs


def folders_written(cfg: DictConfig) -> dict[str, str]:
    """Every folder a run of ``cfg`` writes to, by what it is for (the setting that names it)."""
    folders = {"output folder (paths.output_dir)": str(cfg.paths.output_dir)}
    for name, callback in (cfg.get("callbacks") or {}).items():
        if callback and callback.get("dirpath"):
            folders[f"checkpoint folder (callbacks.{name}.dirpath)"] = str(callback.dirpath)
    for name, logger in (cfg.get("logger") or {}).items():
        if logger and logger.get("save_dir"):
            folders[f"log folder (logger.{name}.save_dir)"] = str(logger.save_dir)
    data = cfg.get("data") or {}
    if data.get("cache") and data.get("cache_dir"):
        folders["image cache folder (data.cache_dir)"] = str(data.cache_dir)
    return folders


def check_folders_writable(cfg: DictConfig) -> None:
    """Refuse to start, naming the folder, when a folder the run writes to is not writable."""
    for what, folder in folders_written(cfg).items():
        check_writable(folder, what)


@contextlib.contextmanager
def claim_run_folder(output_dir: Path) -> Iterator[None]:
    """Hold ``output_dir`` for this training run: another run into it is refused while this one lives.

    Only the process of global rank 0 claims it (other ranks of a multi-process run share its folder).
    """
    if not launched_as_rank_zero():
        yield
        return
    created = next((p for p in reversed([output_dir, *output_dir.parents]) if not p.exists()), None)
    output_dir.mkdir(parents=True, exist_ok=True)
    lock = try_lock(output_dir / LOCK_NAME)
    if lock is None:
        raise HandCLIPError(f"{output_dir} is in use by another training run that is still running; wait for it to "
                            "end, or train elsewhere with paths.output_root=DIR")
    try:
        with lock:
            yield
    except BaseException:
        if created is not None:
            _remove_if_unused(output_dir, created)
        raise


def _remove_if_unused(output_dir: Path, created: Path) -> None:
    """Remove the folders up to ``created`` that this run made, if it wrote nothing into them but its lock."""
    if any(p.name != LOCK_NAME for p in output_dir.iterdir()):
        return
    (output_dir / LOCK_NAME).unlink(missing_ok=True)
    for folder in [output_dir, *output_dir.parents]:
        try:
            folder.rmdir()
        except OSError:
            return
        if folder == created:
            return


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path, max_epochs: int | None = None,
                      rank_zero: bool = True) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run; refuse to mix with an earlier run.

    ``ckpt_path``: None (a fresh run; refused where a run wrote checkpoints), ``last``, ``auto`` or a path.
    ``auto`` resumes ``checkpoints/last.ckpt`` when it exists, starts afresh where no run wrote a checkpoint,
    and raises :class:`RunComplete` when last.ckpt has already trained ``max_epochs`` epochs.
    ``rank_zero=False`` (the other processes of a multi-process run) skips the refusals about what the
    folder already holds: rank 0 has checked the folder, and may already have written into it.
    """
    checkpoint_dir = output_dir / "checkpoints"
    existing = rank_zero and holds_run(output_dir)
    found = ", ".join(sorted(p.name for p in checkpoint_dir.glob("*.ckpt"))) if existing else ""
    if ckpt_path is None:
        if existing:
            raise HandCLIPError(
                f"{output_dir} already holds a run ({found}). Resume it with ckpt_path=last (or ckpt_path=auto, "
                "which also skips a finished run), start elsewhere with paths.output_root=DIR, or move that "
                "folder away."
            )
        return None
    if str(ckpt_path) == "auto":
        last = checkpoint_dir / "last.ckpt"
        if last.is_file():
            trained = read_epochs_trained(last)
            if max_epochs is not None and trained >= max_epochs:
                raise RunComplete(f"{output_dir}: already complete ({last} has trained {trained} epoch(s), "
                                  f"trainer.max_epochs={max_epochs}); nothing to do")
            return last.resolve()
        if existing:
            raise HandCLIPError(f"{output_dir} holds {found} but no last.ckpt to resume from; resume a checkpoint "
                                "with ckpt_path=PATH, or move that folder away to start afresh")
        return None
    path = checkpoint_dir / "last.ckpt" if str(ckpt_path) == "last" else Path(str(ckpt_path)).expanduser()
    if not path.is_file():
        raise HandCLIPError(f"checkpoint {str(path)!r} to resume from not found")
    path = path.resolve()
    if existing and path.parent != checkpoint_dir.resolve():
        raise HandCLIPError(
            f"{output_dir} already holds another run; resuming {path} there would mix the two runs. Resume a "
            "checkpoint in its own run folder, or continue it in an empty one with paths.output_root=DIR."
        )
    return path


def check_resume_compatible(ckpt_path: Path, hparams) -> None:
    """A resumed checkpoint must have been trained with the same model and the same classes."""
    meta = read_checkpoint_meta(ckpt_path)
    if not meta["resumable"]:
        raise HandCLIPError(
            f"checkpoint {ckpt_path} holds weights only, without the optimizer and loop state a run resumes from "
            "(best.ckpt is written that way); resume from last.ckpt with ckpt_path=last"
        )
    for key, default in (("model_name", None), ("hand", None), ("neck", "none")):
        if meta.get(key, default) != hparams.get(key, default):
            raise HandCLIPError(
                f"checkpoint {ckpt_path} was trained with {key}={meta.get(key)!r}, but this run uses "
                f"{key}={hparams[key]!r}; resume with the same config or start a new run"
            )
    if list(meta.get("classes", [])) != list(hparams["classes"]):
        raise HandCLIPError(
            f"checkpoint {ckpt_path} was trained on {len(meta.get('classes', []))} identities that differ from "
            f"the {len(hparams['classes'])} training identities of this data; resume on the same data"
        )


def save_config(cfg: DictConfig, output_dir: Path, resumed: bool) -> Path:
    """Save the composed config beside the checkpoints, never over an earlier run's copy.

    A fresh run saves ``config.yaml`` (resolved); the one of an earlier attempt in the same folder that wrote no
    checkpoint is kept as ``config.no-checkpoint-<time>.yaml``. A resumed run saves ``config.resumed-<time>.yaml``.
    Under Hydra, ``.hydra/`` gets the unresolved config and the command line's overrides the same way
    (``.hydra/config.yaml``, ``.hydra/overrides.yaml``: what a sweep job changed).
    """
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    name = f"config.resumed-{stamp}.yaml" if resumed else "config.yaml"
    if not launched_as_rank_zero():  # the other processes of a multi-process run share rank 0's folder and config
        return output_dir / name
    output_dir.mkdir(parents=True, exist_ok=True)
    path = _claim_name(output_dir / name, resumed, stamp)
    OmegaConf.save(cfg, path, resolve=True)
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        hydra_dir = output_dir / ".hydra"
        hydra_dir.mkdir(exist_ok=True)
        OmegaConf.save(cfg, _claim_name(hydra_dir / name, resumed, stamp), resolve=False)
        overrides = list(HydraConfig.get().overrides.task)
        OmegaConf.save(OmegaConf.create(overrides), _claim_name(hydra_dir / name.replace("config", "overrides", 1),
                                                                resumed, stamp))
    return path


def _claim_name(path: Path, resumed: bool, stamp: str) -> Path:
    """``path`` for this run: an earlier attempt's file of a fresh run's name is kept as ``*.no-checkpoint-<time>``."""
    if not resumed and path.exists():
        stem, _, suffix = path.name.partition(".")
        path.rename(path.with_name(f"{stem}.no-checkpoint-{stamp}.{suffix}"))
    return path
