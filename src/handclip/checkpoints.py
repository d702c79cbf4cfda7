"""Reading HandCLIP checkpoints: their metadata and the fine-tuned model, with clear errors."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from handclip.errors import HandCLIPError


def _load(path: Path) -> dict:
    if not path.is_file():
        raise HandCLIPError(f"checkpoint {str(path)!r} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as err:
        raise HandCLIPError(f"checkpoint {str(path)!r} is corrupt or not a torch checkpoint: {err}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise HandCLIPError(f"checkpoint {str(path)!r} is not a HandCLIP Lightning checkpoint (no state_dict/hyper_parameters)")
    return ckpt


def read_checkpoint_meta(path: str | Path) -> dict:
    """The saved hyperparameters of a HandCLIP checkpoint: classes, hand, model_name, pretrained..."""
    meta = dict(_load(Path(path))["hyper_parameters"])
    missing = {"classes", "hand", "model_name"} - set(meta)
    if missing:
        raise HandCLIPError(f"checkpoint {str(path)!r} lacks {', '.join(sorted(missing))}: not a HandCLIP checkpoint")
    return meta


def load_module(path: str | Path, map_location: str | torch.device = "cpu"):
    """The fine-tuned HandCLIPModule of a checkpoint (architecture rebuilt without downloading weights)."""
    from handclip.data.images import Normalizer
    from handclip.models.clip import preprocess_config
    from handclip.models.module import HandCLIPModule

    path = Path(path)
    meta = read_checkpoint_meta(path)
    # The checkpoint holds every weight: build the architecture without loading pretrained ones.
    module = HandCLIPModule(
        classes=meta["classes"], hand=meta["hand"], model_name=meta["model_name"], pretrained=None,
        lr=meta.get("lr", 1e-5), weight_decay=meta.get("weight_decay", 0.01),
    )
    state = _load(path)["state_dict"]
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        raise HandCLIPError(f"checkpoint {str(path)!r} does not fit its own model description: {err}") from None
    # Preprocess as for the weights it started from (their mean/std), which no longer need loading.
    cfg = preprocess_config(meta["model_name"], meta.get("pretrained"))
    module.normalize = Normalizer(cfg.mean, cfg.std)
    module.hparams["pretrained"] = meta.get("pretrained")
    return module.to(map_location).eval()
