"""Build open_clip models and their preprocessing; register the tiny test architecture shipped here."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import open_clip
import torch
from open_clip.transform import PreprocessCfg, merge_preprocess_dict

from handclip.errors import HandCLIPError
from handclip.models.weights import weights_problem

log = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
#: Values of ``pretrained`` that mean "random weights".
NO_WEIGHTS = (None, "", "none", "None", "random")


def register_model_configs() -> None:
    """Make the architectures in ``model_configs/`` (e.g. ``HandCLIP-Tiny``) known to open_clip."""
    if "HandCLIP-Tiny" not in open_clip.list_models():
        open_clip.add_model_config(MODEL_CONFIG_DIR)


register_model_configs()


def _model_config(model_name: str) -> dict:
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise HandCLIPError(
            f"unknown open_clip model {model_name!r}; known models include "
            f"ViT-B-32-quickgelu, ViT-B-32, HandCLIP-Tiny (see open_clip.list_models())"
        )
    return cfg


def uses_pretrained_weights(pretrained: str | None) -> bool:
    return pretrained not in NO_WEIGHTS


def preprocess_config(model_name: str, pretrained: str | None) -> PreprocessCfg:
    """The evaluation preprocessing open_clip uses for this model and weights, without building it."""
    size = _model_config(model_name)["vision_cfg"].get("image_size", 224)
    base = PreprocessCfg(size=size)
    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained) if uses_pretrained_weights(pretrained) else {}
    return PreprocessCfg(**merge_preprocess_dict(base, tag_cfg))


def _check_pretrained(model_name: str, pretrained: str) -> None:
    if open_clip.get_pretrained_cfg(model_name, pretrained):
        return
    if os.path.isfile(pretrained):
        return
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    raise HandCLIPError(
        f"pretrained weights {pretrained!r} for {model_name!r}: not a file and not a known tag "
        f"(known tags: {', '.join(tags) or 'none'}). Pass an existing local checkpoint with "
        "model.pretrained=/path/to/file, or model.pretrained=null for random weights."
    )


def create_clip(model_name: str, pretrained: str | None = None, cache_dir: str | None = None) -> torch.nn.Module:
    """Create the full open_clip model (both towers), loading ``pretrained`` weights (a tag or a file)."""
    _model_config(model_name)
    if not uses_pretrained_weights(pretrained):
        return open_clip.create_model(model_name, pretrained=None)
    _check_pretrained(model_name, pretrained)
    if os.path.isfile(pretrained):
        try:
            return open_clip.create_model(model_name, pretrained=pretrained, cache_dir=cache_dir)
        except Exception as err:  # EOFError, UnpicklingError, KeyError, RuntimeError (missing keys)...
            raise HandCLIPError(weights_problem(pretrained, model_name, err)) from None
    try:
        return open_clip.create_model(model_name, pretrained=pretrained, cache_dir=cache_dir)
    except RuntimeError as err:
        raise HandCLIPError(_download_hint(model_name, pretrained, err)) from None


def build_image_tower(model_name: str) -> torch.nn.Module:
    """The image tower of ``model_name`` alone (random weights, drawn as ``create_clip`` draws them: the image tower
    is built first), without building the text tower or logging open_clip's "No pretrained weights" warning."""
    from open_clip.model import _build_vision_tower

    cfg = _model_config(model_name)
    return _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], cfg.get("quick_gelu", False))


def load_image_tower(model_name: str, pretrained: str | None = None, cache_dir: str | None = None) -> torch.nn.Module:
    """The image tower of ``model_name`` with the ``visual.*`` weights of ``pretrained`` (a tag or a file; None:
    random weights). The text tower is never built: for ViT-B/32 that is ~63M parameters (~250 MB) less."""
    tower = build_image_tower(model_name)
    if not uses_pretrained_weights(pretrained):
        return tower
    _check_pretrained(model_name, pretrained)
    path = pretrained
    if not os.path.isfile(pretrained):
        try:
            path = open_clip.download_pretrained(open_clip.get_pretrained_cfg(model_name, pretrained),
                                                 cache_dir=cache_dir)
        except Exception as err:  # no internet, no cache
            raise HandCLIPError(_download_hint(model_name, pretrained, err)) from None
    try:
        from open_clip.factory import load_state_dict

        state = load_state_dict(str(path))
        visual = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
        tower.load_state_dict(visual)
    except Exception as err:  # EOFError, UnpicklingError, KeyError, RuntimeError (missing keys)...
        raise HandCLIPError(weights_problem(path, model_name, err)) from None
    return tower


def _download_hint(model_name: str, pretrained: str, err: BaseException) -> str:
    return (f"could not load pretrained weights {pretrained!r} for {model_name!r} ({err}). Without "
            "internet, download the weights elsewhere and pass the file with "
            "model.pretrained=/path/to/file (e.g. the OpenAI ViT-B/32 'open_clip_pytorch_model.bin' or "
            "'.safetensors'), or set model.cache_dir=DIR to a folder that holds the open_clip/Hugging Face "
            "download cache.")


def freeze_text_tower(clip: torch.nn.Module) -> None:
    """Freeze every parameter outside the image tower (text tower, logit scale/bias)."""
    for name, param in clip.named_parameters():
        if not name.startswith("visual."):
            param.requires_grad_(False)
