"""What a weights file holds, in words: for errors when weights do not load into the model asked for.

A state dict that does not fit a model makes torch list every missing and unexpected key (dozens of
lines). These helpers say instead what the file is (empty, not a weights file, a HandCLIP training
checkpoint) or which image tower it holds, and which open_clip models have that tower.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import open_clip
import torch

#: At most this many open_clip model names are suggested.
MAX_SUGGESTED = 4

_BLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


def read_weights(path: str | Path) -> dict:
    """The object saved in a ``.safetensors`` or torch file, read without executing code.

    Raises ValueError for a file that is neither (judged by its first bytes), else the reader's own error.
    """
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    is_zip = zipfile.is_zipfile(path)
    with open(path, "rb") as f:
        if not is_zip and f.read(1) != b"\x80":  # torch files are zip archives, or pickles (older format)
            raise ValueError("neither a zip archive nor a pickle")
    return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)


def vit_tower(state_dict: dict, prefix: str = "visual.") -> dict | None:
    """(patch_size, width, layers, image_size) of the ViT image tower under ``prefix``, or None if there is none."""
    conv = state_dict.get(f"{prefix}conv1.weight")
    position = state_dict.get(f"{prefix}positional_embedding")
    if conv is None or position is None or conv.ndim != 4:
        return None
    blocks = {int(m.group(1)) for key in state_dict if key.startswith(prefix) and (m := _BLOCK.search(key))}
    grid = round((position.shape[0] - 1) ** 0.5)
    return {"patch_size": int(conv.shape[-1]), "width": int(conv.shape[0]), "layers": len(blocks),
            "image_size": grid * int(conv.shape[-1])}


def config_tower(model_name: str) -> dict | None:
    """The same four numbers from an open_clip model config (None for non-ViT image towers)."""
    vision = (open_clip.get_model_config(model_name) or {}).get("vision_cfg", {})
    if "timm_model_name" in vision or not isinstance(vision.get("layers"), int):
        return None
    size = vision.get("image_size", 224)
    return {"patch_size": vision.get("patch_size"), "width": vision.get("width"), "layers": vision["layers"],
            "image_size": size if isinstance(size, int) else size[0]}


def describe(tower: dict) -> str:
    return (f"ViT image tower with patch {tower['patch_size']}, width {tower['width']}, {tower['layers']} layers, "
            f"{tower['image_size']} px input")


def models_with(tower: dict) -> list[str]:
    """open_clip model names whose image tower has these dimensions."""
    return [name for name in open_clip.list_models() if config_tower(name) == tower]


def weights_problem(path: str | Path, model_name: str, err: BaseException) -> str:
    """Why the weights file ``path`` did not load into ``model_name`` (which raised ``err``), in one line."""
    path = Path(path)
    where = f"pretrained weights file {str(path)!r}"
    if path.stat().st_size == 0:
        return f"{where} is empty; pass the open_clip weights of {model_name} (e.g. open_clip_pytorch_model.bin)"
    try:
        saved = read_weights(path)
    except Exception as load_err:  # torch and safetensors raise many types for a file that is not theirs
        return (f"{where} is not a PyTorch or safetensors weights file, or a damaged one ({_first_line(load_err)}); "
                f"pass the open_clip weights of {model_name} (e.g. open_clip_pytorch_model.bin)")
    if isinstance(saved, dict) and "hyper_parameters" in saved and "state_dict" in saved:
        meta = saved["hyper_parameters"]
        return (f"{where} is a HandCLIP training checkpoint (model {meta.get('model_name')!r}, hand "
                f"{meta.get('hand')!r}), not pretrained open_clip weights: evaluate it with `python -m handclip.eval "
                f"ckpt_path={path}` or continue its training with ckpt_path={path}")
    state = saved.get("state_dict", saved) if isinstance(saved, dict) else {}
    state = {k.removeprefix("module."): v for k, v in state.items()} if isinstance(state, dict) else {}
    held, expected = vit_tower(state), config_tower(model_name)
    if held is not None and held != expected:
        fits = models_with(held)[:MAX_SUGGESTED]
        hint = f"; it fits {', '.join(fits)}: set model.model_name to one of them" if fits else ""
        wanted = describe(expected) if expected else "another image tower"
        return f"{where} holds a {describe(held)}, but {model_name} has a {wanted}{hint}"
    return f"{where} does not fit {model_name} ({_first_line(err)})"
