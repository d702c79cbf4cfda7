"""Identify end to end on a new gallery of full-size JPEGs: scanning, decoding, resizing, embedding, writing the
index, searching and writing the results, as ``python -m handclip.identify`` runs them (the model already loaded:
building an ONNX graph is once per model, not per gallery).

The gallery (``gallery_size`` files, ``per_identity`` per identity folder) is written into a temporary folder under
the scratch folder and removed afterwards, also when the run is interrupted (Ctrl-C). Its files are copies of the
demo's photos rendered at the benchmark's size, cycled: each is a real 1600x1200 JPEG decoded in full (or at draft
scale) on every read; only their content repeats.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import OmegaConf

from handclip.identify.index import ModelInfo
from handclip.identify.run import identify, with_settings

Say = Callable[[str], None]
#: Prefix of the temporary gallery folder (under the scratch folder).
PREFIX = "handclip-bench-gallery-"


def write_gallery(folder: Path, photos: list[Path], size: int, per_identity: int) -> int:
    """``size`` copies of ``photos`` (cycled) as ``<identity>/<n>.jpg`` under ``folder``; returns the bytes written."""
    written = 0
    for n in range(size):
        source = photos[n % len(photos)]
        target = folder / f"id{n // per_identity:05d}" / f"{n:06d}{source.suffix}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        written += target.stat().st_size
    return written


def _config(gallery: Path, queries: Path, index: Path, out: Path, s: dict) -> OmegaConf:
    """identify's settings (configs/identify.yaml's defaults), a given threshold and no pictures."""
    return OmegaConf.create({
        "query": str(queries), "gallery": str(gallery), "index": str(index), "index_dtype": "float16",
        "threshold": 0.5, "calibration": None, "target_fmr": None, "top_k": 5, "overwrite": False, "pictures": False,
        "print_limit": 0, "device": "cpu", "batch_size": int(s["batch_size"]), "num_workers": None,
        "progress": False, "name": out.name, "paths": {"output_root": str(out.parent)}})


def identify_gallery(runs: dict[str, tuple], model: ModelInfo, photos: list[Path], queries: list[Path],
                     scratch: Path, s: dict, say: Say) -> dict:
    """Photos/s of identify on a new gallery of ``s['gallery_size']`` copies of ``photos`` with ``len(queries)``
    queries, for each ``runs[label] = (embedder, decode)``; the temporary gallery is removed afterwards."""
    size, per_identity = int(s["gallery_size"]), int(s["gallery_per_identity"])
    scratch.mkdir(parents=True, exist_ok=True)
    out: dict = {"gallery_photos": size, "per_identity": per_identity, "queries": len(queries),
                 "photo_size": list(s["photo_size"]), "distinct_photos": min(size, len(photos)),
                 "threads": torch.get_num_threads(), "runs": {}}
    with tempfile.TemporaryDirectory(prefix=PREFIX, dir=scratch) as tmp:
        root = Path(tmp)
        say(f"  identify end to end: writing a gallery of {size} {s['photo_size'][0]}x{s['photo_size'][1]} JPEGs "
            f"into {root} (removed afterwards) ...")
        start = time.perf_counter()
        out["gallery_mb"] = round(write_gallery(root / "gallery", photos, size, per_identity) / 2**20, 1)
        out["write_s"] = round(time.perf_counter() - start, 1)
        query_dir = root / "queries"
        query_dir.mkdir()
        for n, q in enumerate(queries):
            shutil.copyfile(q, query_dir / f"{n:04d}{q.suffix}")
        for label, (embedder, decode) in runs.items():
            say(f"  identify end to end ({label}): {size} gallery photos + {len(queries)} queries ...")
            info = with_settings(model, embedder.name, decode)
            cfg = _config(root / "gallery", query_dir, root / f"index-{label}", root / f"out-{label}", s)
            start = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                result = identify(cfg, loaded=(embedder, info, {}), out_dir=root / f"out-{label}")
            seconds = time.perf_counter() - start
            decoded = result["gallery"]["index_status"]["decoded"] + len(result["queries"])
            out["runs"][label] = {"backend": embedder.name, "decode": decode, "seconds": round(seconds, 2),
                                  "photos_decoded": decoded, "photos_per_s": decoded / seconds}
            say(f"    {decoded / seconds:.1f} photos/s ({seconds:.0f} s)")
    return out
