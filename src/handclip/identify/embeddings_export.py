"""Embeddings of any folder of images, with their paths and identities, as ``.npz`` or ``.safetensors``.

Contents (both formats): ``embeddings`` float32 ``(N, D)``, L2-normalised (cosine similarity = dot product);
the files' ``paths`` (absolute) and ``identities`` (``<identity>/<image>`` folders, or the file name without
suffix in a flat folder), row by row; and ``meta`` (JSON: the model, its fingerprint, the preprocessing, the
folder, unreadable files left out). In ``.npz`` these are arrays (``meta`` a 0-d string); in ``.safetensors``
``embeddings`` is the one tensor and ``paths``, ``identities`` and ``meta`` are JSON strings in its metadata.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import torch

from handclip import __version__
from handclip.errors import HandCLIPError
from handclip.identify.images import embed_files, report_failures
from handclip.identify.sources import GalleryFile, scan_gallery
from handclip.utils.files import check_output_file, write_file

log = logging.getLogger(__name__)

SUFFIXES = (".npz", ".safetensors")


def save_embeddings(out: Path, embeddings: np.ndarray, paths: list[str], identities: list[str], meta: dict,
                    overwrite: bool = False) -> Path:
    """Write the file atomically, in the format its suffix names (:func:`~handclip.utils.files.write_file`)."""

    def write(tmp: Path) -> None:
        if out.suffix.lower() == ".npz":
            with open(tmp, "wb") as f:
                np.savez(f, embeddings=embeddings, paths=np.array(paths, dtype=str),
                         identities=np.array(identities, dtype=str), meta=np.array(json.dumps(meta)))
        else:
            from safetensors.numpy import save_file

            save_file({"embeddings": np.ascontiguousarray(embeddings)}, str(tmp),
                      metadata={"paths": json.dumps(paths), "identities": json.dumps(identities),
                                "meta": json.dumps(meta)})

    return write_file(out, overwrite, write, "export")


def scan_images(images: str | Path) -> list[GalleryFile]:
    """The images to export (as a gallery is read; one identity is enough)."""
    return scan_gallery(images, min_identities=1, what="image folder")


def export_embeddings(encoder, model: dict, images: str | Path, out: str | Path, device: torch.device,
                      overwrite: bool = False, batch_size: int = 64, num_workers: int | None = None,
                      progress: bool = True, files: list[GalleryFile] | None = None, decode: str = "full") -> dict:
    """Embed every image under ``images`` (``files``: its :func:`scan_images`, when already made) with ``encoder``
    (an encoder or a backend's embedder), decoded by ``decode`` (full or draft), and write them to ``out``; returns
    a short report."""
    out = check_output_file(out, overwrite, SUFFIXES)
    files = scan_images(images) if files is None else files
    embedded = embed_files(encoder, [f.path for f in files], device, batch_size, num_workers, progress,
                           desc="embedding", decode=decode)
    report_failures([(files[i].path, msg) for i, msg in embedded.failed], "image")
    if not embedded.rows:
        raise HandCLIPError(f"none of the {len(files)} images under {str(images)!r} could be read")
    kept = [files[i] for i in embedded.rows]
    meta = {"model": model, "preprocess": dataclasses.asdict(encoder.preprocess), "decode": decode,
            "folder": str(Path(images).expanduser().resolve()), "normalised": True, "count": len(kept),
            "dim": int(embedded.embeddings.shape[1]), "handclip_version": __version__,
            "unreadable": [{"path": str(files[i].path), "reason": msg} for i, msg in embedded.failed]}
    save_embeddings(out, embedded.embeddings.numpy().astype(np.float32), [str(f.path) for f in kept],
                    [f.identity for f in kept], meta, overwrite)
    return {"path": str(out), "images": len(kept), "unreadable": len(embedded.failed),
            "dim": meta["dim"], "format": out.suffix.lower().lstrip(".")}


def load_embeddings(path: str | Path) -> dict:
    """Read a file written by :func:`export_embeddings`: ``embeddings``, ``paths``, ``identities``, ``meta``."""
    path = Path(path)
    if path.suffix.lower() == ".npz":
        with np.load(path) as data:
            return {"embeddings": data["embeddings"], "paths": data["paths"].tolist(),
                    "identities": data["identities"].tolist(), "meta": json.loads(str(data["meta"]))}
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        header = f.metadata()
        return {"embeddings": f.get_tensor("embeddings"), "paths": json.loads(header["paths"]),
                "identities": json.loads(header["identities"]), "meta": json.loads(header["meta"])}
