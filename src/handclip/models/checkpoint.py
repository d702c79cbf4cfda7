"""Reading HandCLIP checkpoints: their metadata and the fine-tuned model, with clear errors.

Checkpoints of earlier versions load too (:mod:`handclip.models.migrate`); what a checkpoint holds besides its
weights is described in :mod:`handclip.models.metadata`.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from handclip.errors import HandCLIPError
from handclip.models.clip import build_image_tower, preprocess_config
from handclip.models.encoder import BNNeck, ImageEncoder
from handclip.models.metadata import META_KEY, preprocess_from_meta
from handclip.models.migrate import upgrade_state_dict
from handclip.models.module import HandCLIPModule
from handclip.models.weights import config_tower, describe, vit_tower


def _load(path: Path) -> dict:
    if not path.is_file():
        raise HandCLIPError(f"checkpoint {str(path)!r} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as err:
        raise HandCLIPError(f"checkpoint {str(path)!r} is corrupt or not a torch checkpoint: {err}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise HandCLIPError(
            f"checkpoint {str(path)!r} is not a HandCLIP Lightning checkpoint (no state_dict/hyper_parameters)")
    return ckpt


def read_checkpoint_meta(path: str | Path) -> dict:
    """What a HandCLIP checkpoint says about itself.

    The saved hyperparameters (``classes``, ``hand``, ``model_name``, ``pretrained``, ``lr``...), plus
    ``preprocess`` (a dict, None before format 2), ``metrics`` (the logged figures when it was written), ``threshold``
    (None: see :mod:`handclip.models.metadata`), ``epoch``, and ``resumable`` (it holds the optimizer and loop state
    a run resumes from; False for a weights-only ``best.ckpt``).
    """
    return _meta(_load(Path(path)), path)


def _meta(ckpt: dict, path: str | Path) -> dict:
    meta = dict(ckpt["hyper_parameters"])
    missing = {"classes", "hand", "model_name"} - set(meta)
    if missing:
        raise HandCLIPError(f"checkpoint {str(path)!r} lacks {', '.join(sorted(missing))}: not a HandCLIP checkpoint")
    block = ckpt.get(META_KEY) or {}
    meta.update(preprocess=block.get("preprocess"), metrics=dict(block.get("metrics") or {}),
                threshold=block.get("threshold"), format=block.get("format", 1), epoch=ckpt.get("epoch"),
                resumable="optimizer_states" in ckpt and "loops" in ckpt)
    return meta


def read_epochs_trained(path: str | Path) -> int:
    """How many epochs a checkpoint has trained, counted as Lightning does when it resumes (an epoch counts
    once its training batches are done: ``fit_loop.epoch_progress.current.processed``)."""
    ckpt = _load(Path(path))
    try:
        return int(ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
    except (KeyError, TypeError, ValueError):
        return int(ckpt.get("epoch", -1)) + 1


#: Recipe hyperparameters a checkpoint may hold (older ones hold none: the module's defaults then apply).
RECIPE_KEYS = ("neck", "neck_feature", "label_smoothing", "triplet_margin", "triplet_weight", "triplet_soft",
               "warmup_epochs", "head_lr", "tta")


def load_module(path: str | Path, map_location: str | torch.device = "cpu", tta: str | None = None):
    """The fine-tuned HandCLIPModule of a checkpoint (architecture rebuilt without downloading weights).

    The image tower gets the preprocessing stored in the checkpoint (older checkpoints: open_clip's for the
    model and pretrained source, as they were trained with), and the recipe it was trained with (BNNeck and its
    test feature, test-time augmentation). ``tta``: another test-time augmentation than the checkpoint's own.
    """
    path = Path(path)
    ckpt = _load(path)
    meta = _meta(ckpt, path)
    recipe = {key: meta[key] for key in RECIPE_KEYS if key in meta}
    if tta is not None:
        recipe["tta"] = tta
    # The checkpoint holds every weight that is used: build the architecture without fetching pretrained ones.
    module = HandCLIPModule(
        classes=meta["classes"], hand=meta["hand"], model_name=meta["model_name"], pretrained=meta.get("pretrained"),
        lr=meta.get("lr", 1e-5), weight_decay=meta.get("weight_decay", 0.01), load_pretrained=False, **recipe,
    )
    state = upgrade_state_dict(ckpt["state_dict"])
    stored = preprocess_from_meta(meta["preprocess"])
    if stored is not None and stored != module.encoder.preprocess:
        old = module.encoder
        module.encoder = ImageEncoder(old.visual, stored, neck=old.neck, feature=old.feature, tta=old.tta)
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        raise HandCLIPError(_misfit(path, meta, state, err)) from None
    return module.to(map_location).eval()


def _misfit(path: Path, meta: dict, state: dict, err: RuntimeError) -> str:
    tower = vit_tower(state, prefix="encoder.visual.")
    if tower is not None and tower != config_tower(meta["model_name"]):
        held = f"its weights are a {describe(tower)}"
    else:
        held = f"its weights do not fit it ({str(err).strip().splitlines()[0]})"
    return f"checkpoint {str(path)!r} says it holds model {meta['model_name']!r}, but {held}; it was altered or " \
           "written by another program"


def load_encoder(path: str | Path, tta: str | None = None) -> tuple[ImageEncoder, dict]:
    """The fine-tuned image encoder of a checkpoint and its metadata, for inference: only the image tower (and its
    BNNeck, when trained with one) is built (no text tower, no classifier head, no optimizer), in eval mode on the
    CPU, with the test-time settings it was trained with. ``tta``: another test-time augmentation than its own."""
    path = Path(path)
    ckpt = _load(path)
    meta = _meta(ckpt, path)
    state = upgrade_state_dict(ckpt["state_dict"])
    visual = {k.removeprefix("encoder.visual."): v for k, v in state.items() if k.startswith("encoder.visual.")}
    tower = build_image_tower(meta["model_name"])
    neck = None
    if meta.get("neck", "none") == "bnneck":
        neck_state = {k.removeprefix("encoder.neck."): v for k, v in state.items() if k.startswith("encoder.neck.")}
        neck = BNNeck(len(neck_state["weight"]))
    try:
        tower.load_state_dict(visual)
        if neck is not None:
            neck.load_state_dict(neck_state)
    except (RuntimeError, KeyError) as err:
        raise HandCLIPError(_misfit(path, meta, state, err)) from None
    preprocess = preprocess_from_meta(meta["preprocess"])
    preprocess = preprocess or preprocess_config(meta["model_name"], meta.get("pretrained"))
    encoder = ImageEncoder(tower, preprocess, neck=neck, feature=meta.get("neck_feature", "before"),
                           tta=tta if tta is not None else meta.get("tta", "none"))
    return encoder.eval(), meta
