"""Export a fine-tuned HandCLIP checkpoint for use outside HandCLIP.

    python -m handclip.export hand=dorsal_right                   # outputs/train/dorsal_right/checkpoints/best.ckpt
    python -m handclip.export ckpt_path=path/to/best.ckpt out=handclip-dorsal-right.safetensors
    python -m handclip.export hand=dorsal_right pretrained=/path/to/open_clip_pytorch_model.bin   # offline

Formats (``format=``): ``open_clip``, the whole open_clip model with the fine-tuned image tower, loadable with
``open_clip.create_model(model_name, pretrained=<file>)``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

from handclip.config import hydra_entry
from handclip.errors import HandCLIPError
from handclip.hands import check_hand
from handclip.models.export import export_open_clip
from handclip.run_folder import trained_checkpoint


def _checkpoint(cfg: DictConfig) -> Path:
    if cfg.ckpt_path:
        return Path(str(cfg.ckpt_path)).expanduser().resolve()
    return trained_checkpoint(cfg.paths.output_root, check_hand(cfg.hand.name))


def _open_clip(cfg: DictConfig) -> Path:
    out = export_open_clip(_checkpoint(cfg), cfg.out, pretrained=cfg.pretrained, cache_dir=cfg.cache_dir,
                           force=cfg.force)
    print(f"written: {out}")
    print("load it with: open_clip.create_model(<model_name>, pretrained=<that file>) (model_name as trained; "
          "HandCLIP-Tiny needs handclip.models.clip.register_model_configs() first)")
    return out


#: format -> exporter(cfg) returning the file written
FORMATS: dict[str, Callable[[DictConfig], Path]] = {"open_clip": _open_clip}


def export(cfg: DictConfig) -> Path:
    exporter = FORMATS.get(str(cfg.format))
    if exporter is None:
        raise HandCLIPError(f"format={cfg.format!r} is not an export format; choose from {', '.join(FORMATS)}")
    return exporter(cfg)


@hydra_entry("export")
def main(cfg: DictConfig) -> None:
    export(cfg)


if __name__ == "__main__":
    main()
