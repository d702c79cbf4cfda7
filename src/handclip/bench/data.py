"""Loading one epoch of 11k-sized photos: decoded on the fly against the decode-once crop cache."""

from __future__ import annotations

import gc
import math
import shutil
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from handclip.bench.measure import PeakMemory, ratio, summary, timed
from handclip.data import synthetic
from handclip.data.cache import cached_crops
from handclip.data.datasets import ImageDataset, TensorImageDataset, batch_collate
from handclip.data.images import ImageLoader
from handclip.data.split import prepare_dataset
from handclip.errors import HandCLIPError
from handclip.models.clip import preprocess_config
from handclip.utils.devices import usable_cpus

Say = Callable[[str], None]


def synthetic_jpegs(scratch: Path, count: int, size: tuple[int, int], seed: int, say: Say) -> tuple[list[Path], dict]:
    """``count`` synthetic hand photos of ``size`` (generated once under ``scratch``, then reused)."""
    # At least 2 images for each of the 4 aspects per subject.
    subjects = max(1, math.ceil(count / 8))
    raw = scratch / f"jpeg-{size[0]}x{size[1]}-s{subjects}-seed{seed}"
    hands = raw / "Hands"
    info: dict[str, Any] = {"dir": str(raw), "generated": False, "generate_s": None}
    if not ((raw / "HandInfo.csv").is_file() and len(list(hands.glob("*.jpg"))) >= count):
        say(f"  generating {count}+ synthetic {size[0]}x{size[1]} JPEGs once into {raw} ...")
        last = [0.0]

        def progress(done: int, total: int) -> None:
            now = time.perf_counter()
            if done == total or now - last[0] > 10:
                last[0] = now
                say(f"    {done}/{total} images")

        summary = synthetic.generate_dataset(
            raw, subjects=subjects, images_per_aspect=2, seed=seed, size=tuple(size), overwrite=True, progress=progress
        )
        info.update(generated=True, generate_s=round(summary.seconds, 2))
    paths = sorted(hands.glob("*.jpg"))[:count]
    if len(paths) < count:
        raise HandCLIPError(f"expected {count} synthetic images under {hands}, found {len(paths)}")
    info["mean_file_kb"] = round(sum(p.stat().st_size for p in paths) / len(paths) / 1024, 1)
    return paths, info


def demo_photos(scratch: Path, demo: dict, size: tuple[int, int], say: Say) -> dict:
    """``make demo``'s identify photos: the synthetic hands at the demo's settings (subjects, photos per aspect,
    seed) rendered at ``size`` and split by the 11k protocol (generated once under ``scratch``, then reused);
    the queries and gallery of ``demo['hand']``'s first run (``query0`` against ``gallery0``)."""
    subjects, per_aspect, seed = int(demo["subjects"]), int(demo["images_per_aspect"]), int(demo["seed"])
    root = scratch / f"demo-{size[0]}x{size[1]}-s{subjects}-i{per_aspect}-seed{seed}"
    splits = root / "splits"
    if not splits.is_dir():  # both are swapped in whole: a folder that is there is complete
        say(f"  generating the demo's synthetic hands at {size[0]}x{size[1]} once into {root} ...")
        synthetic.generate_dataset(root / "raw", subjects=subjects, images_per_aspect=per_aspect, seed=seed,
                                   size=tuple(size), overwrite=True)
        prepare_dataset(root / "raw", splits, overwrite=True)
    hand = splits / f"train_val_test_split_{demo['hand']}"
    gallery = sorted((hand / "gallery0").glob("*/*.jpg"))
    queries = sorted((hand / "query0").glob("*/*.jpg"))
    if not gallery or not queries:
        raise HandCLIPError(f"no demo photos under {hand} (gallery0/, query0/)")
    return {"queries": queries, "gallery": gallery, "gallery_identities": [p.parent.name for p in gallery],
            "source": f"make demo's identify photos ({demo['hand']} query0 against gallery0: {len(queries)} queries, "
                      f"{len(gallery)} gallery photos) of its synthetic hands ({subjects} subjects, {per_aspect} "
                      f"photos per aspect, seed {seed}) rendered at {size[0]}x{size[1]}, generated in the bench",
            "dir": str(root), "mean_file_kb": round(sum(p.stat().st_size for p in queries + gallery)
                                                    / len(queries + gallery) / 1024, 1)}


def _epoch(loader: Iterable) -> int:
    """Iterate one epoch; return the number of images seen."""
    seen = 0
    for images, _labels in loader:
        seen += int(images.shape[0])
    return seen


def bench_data(s: dict, device: torch.device, scratch: Path, say: Say) -> tuple[dict, dict]:
    n, batch = int(s["images"]), int(s["batch_size"])
    size = (int(s["image_size"][0]), int(s["image_size"][1]))
    workers = usable_cpus() if s.get("num_workers") is None else int(s["num_workers"])
    paths, gen = synthetic_jpegs(scratch, n, size, int(s.get("seed", 0)), say)
    loader = ImageLoader(preprocess_config(s["model_name"], None))
    labels = [i % 10 for i in range(n)]
    memory: dict[str, dict] = {}

    # Cache build from scratch (the files are in the OS page cache: this is decode time, not disk time).
    cache_dir = scratch / "crops"
    shutil.rmtree(cache_dir, ignore_errors=True)
    say(f"  building the crop cache of {n} images ...")
    with PeakMemory(device) as mem:
        start = time.perf_counter()
        crops = cached_crops(paths, loader, cache_dir, num_workers=s.get("cache_workers"), progress=False)
        build_s = time.perf_counter() - start
    memory["cache_build"] = mem.result
    start = time.perf_counter()
    crops = cached_crops(paths, loader, cache_dir, num_workers=s.get("cache_workers"), progress=False)
    reopen_s = time.perf_counter() - start
    crops_match = bool(torch.equal(crops[0], loader(paths[0])))

    say(f"  uncached: ImageDataset, batch {batch}, {workers} workers, {s['warmup']}+{s['repeats']} epochs ...")
    uncached_loader = DataLoader(
        ImageDataset(paths, labels, loader), batch_size=batch, shuffle=True, num_workers=workers,
        persistent_workers=workers > 0,
    )
    with PeakMemory(device) as mem:
        uncached = timed(lambda: _epoch(uncached_loader), torch.device("cpu"), int(s["repeats"]), int(s["warmup"]))
    memory["uncached"] = mem.result
    uncached_loader = None  # stops its persistent workers before the cached epochs are timed
    gc.collect()

    say(f"  cached: TensorImageDataset, batch {batch}, in-process, {s['warmup']}+{s['cached_repeats']} epochs ...")
    cached_loader = DataLoader(
        TensorImageDataset(crops, labels), batch_size=batch, shuffle=True, num_workers=0, collate_fn=batch_collate
    )
    with PeakMemory(device) as mem:
        cached = timed(lambda: _epoch(cached_loader), torch.device("cpu"), int(s["cached_repeats"]), int(s["warmup"]))
    memory["cached"] = mem.result

    uncached_ips = n / statistics.median(uncached)
    cached_ips = n / statistics.median(cached)
    result = {
        "images": n,
        "image_size": list(size),
        "crop_size": list(loader.cfg.input_size),
        "batch_size": batch,
        "uncached_num_workers": workers,
        "synthetic": gen,
        "uncached_images_per_s": uncached_ips,
        "cached_images_per_s": cached_ips,
        "cached_speedup": ratio(cached_ips, uncached_ips),
        "cache_build_s": build_s,
        "cache_build_images_per_s": n / build_s,
        "cache_reopen_s": reopen_s,
        "cache_bytes": int(crops.numel()),
        "crops_match_loader": crops_match,
        "uncached_epoch": summary(uncached),
        "cached_epoch": summary(cached),
    }
    return result, memory
