"""The fine-tuned model as a plain open_clip model (both towers), for use outside HandCLIP.

HandCLIP checkpoints hold only what training changes (the image tower and the head). The export rebuilds the
whole open_clip model from the checkpoint's ``pretrained`` source (the text tower, logit scale and everything
else HandCLIP never trains), puts the fine-tuned image tower into it and writes its state dict as
``.safetensors``, which ``open_clip.create_model(model_name, pretrained=<file>)`` loads. The classifier head is
not part of it (open_clip has no place for it; it scores only the training identities). Neither is a BNNeck:
a checkpoint whose test feature is the one after the BN (``model.neck_feature=after``) is refused, one with the
default pre-BN feature exports its tower as is. Flip test-time augmentation is recorded in the file's metadata
(``tta``): a user of the open_clip model averages a photo's and its mirror's embeddings.

``format=open_clip_dir`` writes open_clip's own folder layout instead: ``open_clip_config.json`` (``model_cfg``: the
architecture, so that no model config needs registering, HandCLIP-Tiny included; ``preprocess_cfg``: the
preprocessing the model was trained with) and ``open_clip_model.safetensors``, which
``open_clip.create_model_and_transforms("local-dir:DIR")`` turns into the model and its transforms.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file

import handclip
from handclip.errors import HandCLIPError
from handclip.models.checkpoint import load_module, read_checkpoint_meta
from handclip.models.clip import create_clip, uses_pretrained_weights
from handclip.utils.files import check_output_file, claimed, swap_in, write_file

log = logging.getLogger(__name__)

SUFFIX = ".open_clip.safetensors"


def open_clip_state_dict(image_tower: torch.nn.Module, clip: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the open_clip model ``clip`` with ``image_tower``'s weights as its ``visual``."""
    clip.visual.load_state_dict(image_tower.state_dict())
    # safetensors stores every tensor on its own: contiguous, no shared memory
    return {name: value.detach().cpu().contiguous().clone() for name, value in clip.state_dict().items()}


def default_output(ckpt_path: Path) -> Path:
    """``checkpoints/best.ckpt`` -> ``checkpoints/best.open_clip.safetensors``."""
    return ckpt_path.with_name(ckpt_path.stem + SUFFIX)


def export_open_clip(ckpt_path: str | Path, out: str | Path | None = None, pretrained: str | None = None,
                     cache_dir: str | None = None, overwrite: bool = False) -> Path:
    """Write the fine-tuned open_clip model of a HandCLIP checkpoint; return the file written.

    ``pretrained``: where the text tower comes from (default: the checkpoint's own source, e.g. ``openai``; a file
    when offline). An existing ``out`` is replaced only with ``overwrite``.
    """
    ckpt_path = Path(ckpt_path).expanduser()
    read_checkpoint_meta(ckpt_path)  # a missing or foreign checkpoint is named first
    out = check_output_file(out or default_output(ckpt_path), overwrite, (".safetensors",))
    state, metadata, _ = _fine_tuned(ckpt_path, pretrained, cache_dir)
    return write_file(out, overwrite, lambda tmp: save_file(state, str(tmp), metadata=metadata), "export")


def _fine_tuned(ckpt_path: Path, pretrained: str | None, cache_dir: str | None):
    """(open_clip state dict with the fine-tuned image tower, safetensors metadata, the checkpoint's encoder)."""
    meta = read_checkpoint_meta(ckpt_path)
    source = pretrained if pretrained is not None else meta.get("pretrained")
    module = load_module(ckpt_path)
    if module.encoder.embedding_settings().get("feature") == "after":
        raise HandCLIPError(f"checkpoint {str(ckpt_path)!r} embeds after its BNNeck (model.neck_feature=after), "
                            "which an open_clip model has no place for; export format=onnx or format=embeddings")
    clip = create_clip(meta["model_name"], source, cache_dir or meta.get("cache_dir"))
    if not uses_pretrained_weights(source):
        log.warning("the text tower of %s is randomly initialised (pretrained=%r): only the image tower is trained",
                    meta["model_name"], source)
    state = open_clip_state_dict(module.encoder.visual, clip)
    metadata = {"format": "pt", "model_name": meta["model_name"], "text_tower": str(source), "hand": meta["hand"],
                "handclip_version": handclip.__version__, "source_checkpoint": str(ckpt_path.resolve()),
                "tta": module.encoder.tta}
    if module.encoder.tta != "none":
        log.warning("%s was evaluated with test-time augmentation tta=%s; the open_clip model embeds one image: "
                    "average a photo's and its mirror's embeddings to get the same figures", ckpt_path,
                    module.encoder.tta)
    return state, metadata, module.encoder


CONFIG_FILE, WEIGHTS_FILE = "open_clip_config.json", "open_clip_model.safetensors"


def _owned(folder: Path) -> bool:
    return {p.name for p in folder.iterdir()} <= {CONFIG_FILE, WEIGHTS_FILE}


def export_open_clip_dir(ckpt_path: str | Path, out: str | Path, pretrained: str | None = None,
                         cache_dir: str | None = None, overwrite: bool = False) -> Path:
    """Write open_clip's folder layout for a HandCLIP checkpoint (see the module); return the folder.

    The folder is written next to ``out`` and moved into place whole; an existing non-empty ``out`` is replaced only
    with ``overwrite``, and only when it holds nothing but an earlier export."""
    if not out:
        raise HandCLIPError("format=open_clip_dir needs out=DIR (a new or empty folder)")
    ckpt_path, out = Path(ckpt_path).expanduser(), Path(str(out)).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise HandCLIPError(f"out={str(out)!r} is a file; expected a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise HandCLIPError(f"out={str(out)!r} is not empty; pass overwrite=true to replace an earlier export, or "
                                "choose another out=DIR")
        if not _owned(out):
            raise HandCLIPError(f"out={str(out)!r} holds files other than {CONFIG_FILE} and {WEIGHTS_FILE}; it is "
                                "never replaced: choose another out=DIR")
    state, metadata, encoder = _fine_tuned(ckpt_path, pretrained, cache_dir)
    model_cfg = open_clip.get_model_config(metadata["model_name"])
    config = {"model_cfg": model_cfg, "preprocess_cfg": dataclasses.asdict(encoder.preprocess),
              "handclip": {k: v for k, v in metadata.items() if k != "format"}}
    with claimed(out, "export"):  # another export to the same folder is refused while this one runs
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=list))
            save_file(state, str(tmp / WEIGHTS_FILE), metadata=metadata)
            if out.is_dir() and not any(out.iterdir()):
                out.rmdir()
            swap_in(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out
