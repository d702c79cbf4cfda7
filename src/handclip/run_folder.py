"""Where a training run lives, and when a folder may be written: the run-folder and resume policy.

A hand type trains into ``<output_root>/train/<hand>/`` (``checkpoints/``, ``logs/``, ``config.yaml``);
its best checkpoint, which evaluation scores, is ``checkpoints/best.ckpt``. A second run never mixes
with the first: it must resume it (``ckpt_path``) or go elsewhere.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from handclip.errors import HandCLIPError
from handclip.models.checkpoint import read_checkpoint_meta


def trained_checkpoint(output_root: str | Path, hand: str) -> Path:
    """Where `python -m handclip.train hand=<hand>` leaves its best checkpoint."""
    return Path(output_root) / "train" / hand / "checkpoints" / "best.ckpt"


def holds_run(output_dir: Path) -> bool:
    """True when a training run already wrote into ``output_dir`` (checkpoints, logs or its config)."""
    checkpoints = output_dir / "checkpoints"
    return (
        (checkpoints.is_dir() and any(checkpoints.glob("*.ckpt")))
        or (output_dir / "config.yaml").exists()
        or (output_dir / "logs").is_dir()
    )


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path, rank_zero: bool = True) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run; refuse to mix with an earlier run.

    ``rank_zero=False`` (the other processes of a multi-process run) skips the refusals about what the
    folder already holds: rank 0 has checked the folder, and may already have written into it.
    """
    checkpoint_dir = output_dir / "checkpoints"
    existing = rank_zero and holds_run(output_dir)
    if ckpt_path is None:
        if existing:
            found = sorted(p.name for p in checkpoint_dir.glob("*.ckpt")) if checkpoint_dir.is_dir() else []
            raise HandCLIPError(
                f"{output_dir} already holds a run ({', '.join(found) or 'no checkpoint yet'}). Resume it with "
                "ckpt_path=last, start elsewhere with paths.output_root=DIR, or move that folder away."
            )
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
    for key in ("model_name", "hand"):
        if meta.get(key) != hparams[key]:
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
    """Save the composed config beside the checkpoints, never over an earlier run's copy."""
    output_dir.mkdir(parents=True, exist_ok=True)
    name = "config.yaml"
    if resumed or (output_dir / name).exists():
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        name = f"config.resumed-{stamp}.yaml"
    path = output_dir / name
    OmegaConf.save(cfg, path, resolve=True)
    return path
