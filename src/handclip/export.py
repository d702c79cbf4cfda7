"""Export for use outside HandCLIP.

    python -m handclip.export hand=dorsal_right                  # outputs/train/dorsal_right/checkpoints/best.ckpt
    python -m handclip.export ckpt_path=CKPT out=handclip-dorsal-right.safetensors
    python -m handclip.export format=open_clip_dir ckpt_path=CKPT out=DIR   # open_clip's local-dir: folder
    python -m handclip.export format=embeddings ckpt_path=CKPT images=DIR out=embeddings.npz   # or .safetensors
    python -m handclip.export format=onnx ckpt_path=CKPT out=handclip_image_tower.onnx         # needs .[onnx]

``format=open_clip`` (the default) writes the whole open_clip model with the fine-tuned image tower, loadable with
``open_clip.create_model(model_name, pretrained=<file>)``. Without ckpt_path, embeddings and onnx export the
zero-shot model given by `model`. Options: configs/export.yaml.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

from handclip.command_line import hydra_entry
from handclip.errors import HandCLIPError
from handclip.hands import check_hand
from handclip.utils.files import check_output_file

# Each format imports what it needs (torch, open_clip, onnx) when it runs: a mistyped option on the command
# line is answered before they load.


def _checkpoint(cfg: DictConfig) -> Path:
    """``ckpt_path``, or the best checkpoint of the hand type's training run."""
    from handclip.run_folder import trained_checkpoint

    if cfg.ckpt_path:
        return Path(str(cfg.ckpt_path)).expanduser().resolve()
    return trained_checkpoint(cfg.paths.output_root, check_hand(cfg.hand.name))


def open_clip(cfg: DictConfig) -> dict:
    """The whole open_clip model (both towers) with the fine-tuned image tower, as .safetensors."""
    from handclip.models.open_clip_export import export_open_clip

    ckpt = _checkpoint(cfg)
    out = export_open_clip(ckpt, cfg.out, pretrained=cfg.pretrained, cache_dir=cfg.cache_dir,
                           overwrite=cfg.overwrite)
    return {"path": str(out), "checkpoint": str(ckpt),
            "load with": "open_clip.create_model(<model_name as trained>, pretrained=<this file>)"}


def open_clip_dir(cfg: DictConfig) -> dict:
    """open_clip's folder layout (open_clip_config.json + open_clip_model.safetensors): model and transforms."""
    from handclip.models.open_clip_export import export_open_clip_dir

    ckpt = _checkpoint(cfg)
    out = export_open_clip_dir(ckpt, cfg.out, pretrained=cfg.pretrained, cache_dir=cfg.cache_dir,
                               overwrite=cfg.overwrite)
    return {"path": str(out), "checkpoint": str(ckpt),
            "load with": f"open_clip.create_model_and_transforms('local-dir:{out}')"}


def embeddings(cfg: DictConfig) -> dict:
    """Embeddings of every image of a folder, with paths and identities (.npz or .safetensors)."""
    from handclip.identify.embeddings_export import SUFFIXES, export_embeddings, scan_images
    from handclip.identify.run import load_embedder
    from handclip.utils.devices import resolve_device

    if not cfg.images:
        raise HandCLIPError("format=embeddings needs images=DIR (<identity>/<image> folders or a flat folder)")
    check_output_file(cfg.out, cfg.overwrite, SUFFIXES)  # the output and the images before loading the model
    files = scan_images(cfg.images)
    device = resolve_device(cfg.device)
    embedder, model, _ = load_embedder(cfg, device)
    info = {**model.key, "fingerprint": model.fingerprint, "backend": embedder.name, "agreement": embedder.agreement}
    return export_embeddings(embedder, info, cfg.images, cfg.out, device, cfg.overwrite, cfg.batch_size,
                             cfg.num_workers, cfg.progress, files=files, decode=model.decode)


def onnx(cfg: DictConfig) -> dict:
    """The image tower as ONNX, checked against PyTorch on onnxruntime (CPU)."""
    from handclip.identify.run import load_model
    from handclip.models.onnx_export import export_onnx

    out = check_output_file(cfg.out, cfg.overwrite, (".onnx",))
    encoder, model, meta = load_model(cfg)
    info = {**model.key, "model_fingerprint": model.fingerprint, "hand": meta.get("hand")}
    o = cfg.onnx
    return export_onnx(encoder, out, info, opset=o.opset, check=o.check, check_images=o.check_images,
                       tolerance=o.tolerance, seed=cfg.seed, overwrite=cfg.overwrite)


#: format -> exporter (each takes the composed config and returns a short report with the path written).
FORMATS: dict[str, Callable[[DictConfig], dict]] = {"open_clip": open_clip, "open_clip_dir": open_clip_dir,
                                                    "embeddings": embeddings, "onnx": onnx}


def export(cfg: DictConfig) -> dict:
    if cfg.format not in FORMATS:
        raise HandCLIPError(f"format={cfg.format!r}: choose one of {', '.join(FORMATS)}")
    if cfg.get("decode", "full") != "full" and cfg.format != "embeddings":
        raise HandCLIPError(f"decode={cfg.decode} applies to format=embeddings only (it decodes photos); "
                            f"format={cfg.format} exports the model: leave decode=full")
    report = FORMATS[cfg.format](cfg)
    details = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in report.items()
                        if k != "path")
    print(f"written: {Path(report['path'])} ({details})")
    return report


@hydra_entry("export")
def main(cfg: DictConfig) -> None:
    export(cfg)


if __name__ == "__main__":
    main()
