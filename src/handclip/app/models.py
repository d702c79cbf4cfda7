"""The models the app offers: fine-tuned checkpoints (``<root>/train/.../checkpoints/*.ckpt``, the demo's under
``<root>/demo/train`` too), exported open_clip models (``*.safetensors`` written by ``python -m handclip.export``)
and the zero-shot model with a calibration file written by ``eval`` (``<root>/eval/<hand>_zeroshot.calibration
.json``). Each is loaded through :func:`handclip.load`, once, and kept."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from handclip.errors import HandCLIPError
from handclip.hands import HAND_TYPES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelChoice:
    """One entry of the model list: what it is, where it lies, the calibration file that gives its threshold."""

    label: str
    kind: str  # checkpoint | export | zero-shot
    path: Path | None
    model_name: str | None = None
    pretrained: str | None = None
    calibration: Path | None = None
    hand: str | None = None


def _hand_in(path: Path) -> str | None:
    return next((part for part in reversed(path.parts) for hand in HAND_TYPES if part == hand), None) or next(
        (hand for hand in HAND_TYPES if path.name.startswith(hand)), None)


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def run_roots(models_root: Path) -> list[Path]:
    """The models root and the folders one level down that hold runs (outputs/demo)."""
    if not models_root.is_dir():
        return []
    return [models_root, *sorted(p for p in models_root.glob("*") if (p / "train").is_dir() or (p / "eval").is_dir())]


def _export_meta(path: Path) -> dict | None:
    """The safetensors metadata of an open_clip export (None: not one)."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= 2**24:
                return None
            meta = json.loads(f.read(size)).get("__metadata__") or {}
    except (OSError, ValueError):
        return None
    return meta if meta.get("model_name") and meta.get("source_checkpoint") else None


def find_models(models_root: str | Path, zero_shot: tuple[str, str | None] | None = None) -> list[ModelChoice]:
    """Every model under ``models_root``, checkpoints first (``best.ckpt`` before others, by hand type)."""
    from handclip.evaluation.calibration import sidecar_path

    root = Path(models_root).expanduser().resolve()
    found: list[ModelChoice] = []
    for base in run_roots(root):
        for ckpt in sorted((base / "train").glob("**/checkpoints/*.ckpt")) if (base / "train").is_dir() else []:
            if ckpt.name != "best.ckpt" and not sidecar_path(ckpt).is_file():
                continue
            found.append(ModelChoice(label=f"{_hand_in(ckpt) or 'model'} · {_rel(ckpt, root)}", kind="checkpoint",
                                     path=ckpt, calibration=sidecar_path(ckpt), hand=_hand_in(ckpt)))
        for file in sorted(base.glob("**/*.safetensors")):
            meta = _export_meta(file)
            if meta is not None:
                found.append(ModelChoice(label=f"exported · {_rel(file, root)}", kind="export", path=file,
                                         model_name=meta["model_name"], pretrained=str(file),
                                         calibration=sidecar_path(Path(meta["source_checkpoint"])),
                                         hand=meta.get("hand")))
        if zero_shot is not None:
            for calib in sorted((base / "eval").glob("*_zeroshot.calibration.json")):
                hand = calib.name.removesuffix("_zeroshot.calibration.json")
                found.append(ModelChoice(label=f"zero-shot {zero_shot[0]} · {_rel(calib, root)}", kind="zero-shot",
                                         path=None, model_name=zero_shot[0], pretrained=zero_shot[1],
                                         calibration=calib, hand=hand))
    kinds = ("checkpoint", "export", "zero-shot")
    found.sort(key=lambda c: (kinds.index(c.kind), c.path is None or c.path.name != "best.ckpt",
                              c.hand != "dorsal_right", c.label))
    return found


def load_choice(choice: ModelChoice, device: str, backend: str, cache_dir: Path, seed: int):
    """The :class:`handclip.api.HandCLIP` of a choice, through the one door, :func:`handclip.load`."""
    import handclip

    if choice.kind == "checkpoint":
        if not choice.path.is_file():
            raise HandCLIPError(f"checkpoint {str(choice.path)!r} is gone; refresh the model list")
        return handclip.load(choice.path, backend=backend, device=device, cache_dir=cache_dir, seed=seed)
    return handclip.load(model=choice.model_name, pretrained=choice.pretrained, calibration=choice.calibration,
                         backend=backend, device=device, cache_dir=cache_dir, seed=seed)
