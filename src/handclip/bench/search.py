"""Gallery search at scale, and gallery-index reuse (identify's two performance goals).

* ``search``: exact top-k identities (:func:`handclip.identify.search.top_k_identities`) for one batch of
  queries against a memory-mapped index of N L2-normalised embeddings (1,000,000 x 512 float16 in the full
  run; ``images_per_identity`` rows per identity), as identify searches it: queries/s, and the peak RSS the
  search adds (the mapped index pages included) over the index size. A subset of the queries is checked
  against a brute-force ranking: a full float64 score row per query, ``numpy.argsort(kind="stable")``.
* ``reuse``: a gallery folder of small images (10,000 in the full run) indexed with the tiny model, then
  opened again unchanged (:func:`handclip.identify.index.open_index`): images decoded and embedded the second
  time (goal: none) and the seconds it takes.
"""

from __future__ import annotations

import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from handclip.bench.measure import MB, PeakMemory, summary, timed
from handclip.identify.index import ModelInfo, open_index
from handclip.identify.search import top_k_identities
from handclip.identify.sources import scan_gallery
from handclip.models.encoder import zero_shot_encoder
from handclip.models.fingerprint import encoder_fingerprint

Say = Callable[[str], None]


def gallery_file(scratch: Path, n: int, dim: int, dtype: str, seed: int, say: Say) -> Path:
    """An (n, dim) .npy of random unit rows, written once in blocks (bounded memory) and reused."""
    path = scratch / f"gallery-{n}x{dim}-{dtype}-seed{seed}.npy"
    if path.is_file():
        return path
    say(f"  writing a {n:,} x {dim} {dtype} gallery once into {path} ...")
    tmp = path.with_suffix(".tmp.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype), shape=(n, dim))
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, n, 65536):
        rows = min(65536, n - start)
        out[start:start + rows] = torch.nn.functional.normalize(torch.randn(rows, dim, generator=generator),
                                                                dim=1).numpy()
    out.flush()
    del out
    tmp.rename(path)
    return path


def brute_force_identities(queries: np.ndarray, gallery: np.ndarray, labels: np.ndarray, k: int, block: int = 32768):
    """Per query: full float64 score row, stable argsort, the first k distinct identities (label, row)."""
    scores = np.concatenate([queries @ gallery[s:s + block].astype(np.float64).T
                             for s in range(0, gallery.shape[0], block)], axis=1)
    out = []
    for row in scores:
        order = np.argsort(-row, kind="stable")
        seen: dict[int, int] = {}
        for g in order:
            if int(labels[g]) not in seen:
                seen[int(labels[g])] = int(g)
                if len(seen) == k:
                    break
        out.append(list(seen.items()))
    return out


def _search(s: dict, device: torch.device, scratch: Path, seed: int, say: Say) -> tuple[dict, dict]:
    n, dim, dtype, per_id = int(s["gallery"]), int(s["dim"]), str(s["dtype"]), int(s["images_per_identity"])
    q, k = int(s["queries"]), int(s["top_k"])
    path = gallery_file(scratch, n, dim, dtype, seed, say)
    index_bytes = path.stat().st_size
    labels = torch.arange(n) // per_id
    generator = torch.Generator().manual_seed(seed + 1)
    rows = torch.randint(0, n, (q,), generator=generator)
    source = torch.from_numpy(np.load(path, mmap_mode="r")[rows.numpy()].astype(np.float32))
    # queries near a gallery row (a true match exists), as a real search would mostly have
    queries = torch.nn.functional.normalize(source + 0.05 * torch.randn(q, dim, generator=generator), dim=1)
    say(f"  search: {q} queries, top-{k} identities, {n:,} x {dim} {dtype} index ({index_bytes / MB:,.0f} MiB, "
        f"{n // per_id:,} identities), {s['repeats']} repeats ...")
    hits = {}

    def run() -> None:
        hits["h"] = top_k_identities(queries.to(device), hits["index"], labels, k)

    with PeakMemory(device) as mem:
        hits["index"] = torch.from_numpy(np.load(path, mmap_mode="c"))  # as identify opens it
        times = timed(run, device, int(s["repeats"]), warmup=1)
    del hits["index"]
    median = statistics.median(times)
    check = int(s["check_queries"])
    reference = brute_force_identities(queries[:check].double().numpy(), np.load(path, mmap_mode="r"),
                                       labels.numpy(), k)
    found = [list(zip(hits["h"].labels[i], hits["h"].rows[i])) for i in range(check)]
    delta = mem.result["peak_rss_delta_mb"] * MB
    return {
        "gallery": n, "dim": dim, "dtype": dtype, "identities": n // per_id, "queries": q, "top_k": k,
        "index_mb": round(index_bytes / MB, 1), "batch": summary(times), "queries_per_s": q / median,
        "peak_rss_delta_mb": mem.result["peak_rss_delta_mb"], "peak_mem_vs_index": round(delta / index_bytes, 3),
        "checked_queries": check, "agrees_with_argsort": found == reference,
    }, mem.result


def _reuse_gallery(scratch: Path, count: int, per_id: int, size: int, seed: int, say: Say) -> Path:
    root = scratch / f"reuse-gallery-{count}-{per_id}-{size}px-seed{seed}"
    if (root / ".complete").is_file():
        return root
    say(f"  writing {count:,} small images once into {root} ...")
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        folder = root / f"{i // per_id:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.png", compress_level=1)
    (root / ".complete").write_text("ok\n")
    return root


def _reuse(s: dict, device: torch.device, scratch: Path, seed: int, say: Say) -> dict:
    count = int(s["reuse_images"])
    root = _reuse_gallery(scratch, count, int(s["images_per_identity"]), int(s["reuse_image_size"]), seed, say)
    encoder = zero_shot_encoder(str(s["reuse_model"]), None)
    model = ModelInfo(key={"bench": str(s["reuse_model"])}, fingerprint=encoder_fingerprint(encoder))
    index_dir = scratch / "reuse-index"
    shutil.rmtree(index_dir, ignore_errors=True)
    say(f"  index reuse: {count:,} images, {s['reuse_model']}: build, then open unchanged ...")

    def open_it():
        files = scan_gallery(root)
        return open_index(index_dir, root.resolve(), files, encoder, model, device, progress=False,
                          batch_size=int(s["reuse_batch_size"]))

    start = time.perf_counter()
    built = open_it().status
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    reused = open_it().status
    reuse_s = time.perf_counter() - start
    return {"reuse_images": count, "index_build_s": round(build_s, 2), "index_build_embedded": built["embedded"],
            "index_reuse_s": round(reuse_s, 3), "reuse_status": reused["status"],
            "reuse_decoded_images": reused["decoded"], "reuse_embedded_images": reused["embedded"]}


def bench_search(s: dict, device: torch.device, scratch: Path, seed: int, say: Say) -> tuple[dict, dict]:
    scratch = scratch / "search"
    scratch.mkdir(parents=True, exist_ok=True)
    result, memory = _search(s, device, scratch, seed, say)
    result.update(_reuse(s, device, scratch, seed, say))
    return result, {"search": memory}
