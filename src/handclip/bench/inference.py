"""CPU inference: images/s of each backend at batch 64, batch-1 latency, agreement with torch fp32, identify end to
end on 1600x1200 JPEGs, and what the CPU could do at most (``fp32_peak_fraction``).

``fp32_peak_fraction`` = images/s x GFLOPs per image / the cores' fp32 peak, the peak being cores x clock x fp32
FLOPs per cycle: vector lanes (16 with AVX-512, 8 with AVX2) x 2 (fused multiply-add) x 2 FMA units per core (the
server cores this project runs on; a core with one unit halves it). The clock is the ``cpu MHz`` of
``/proc/cpuinfo`` (a virtual machine reports its nominal clock), so the fraction is an estimate, stated as such.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from handclip.bench.data import synthetic_jpegs
from handclip.bench.machine import cpu_info
from handclip.bench.measure import MB, PeakMemory, ratio, summary, timed
from handclip.data.images import ImageLoader
from handclip.errors import HandCLIPError
from handclip.identify.images import embed_files
from handclip.models.backends import AGREEMENT_GOAL, agreement, available, check_images, make_embedder
from handclip.models.clip import build_image_tower, create_clip, preprocess_config
from handclip.models.encoder import ImageEncoder
from handclip.models.fingerprint import encoder_fingerprint
from handclip.utils.devices import cpu_flags, usable_cpus

Say = Callable[[str], None]
#: Flags that decide which backend is fast: vector width, int8 dot products, bf16.
FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def fp32_peak_gflops(cores: int) -> dict:
    """The cores' fp32 peak from their clock and vector width (see the module), with how it was computed."""
    flags = cpu_flags()
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    mhz = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                mhz = float(line.split(":")[1])
                break
    except (OSError, ValueError):
        pass
    if mhz is None:
        return {"gflops": None, "how": "clock unknown"}
    per_cycle = lanes * 2 * 2
    return {"gflops": cores * mhz / 1000 * per_cycle, "cores": cores, "clock_ghz": round(mhz / 1000, 3),
            "flops_per_cycle_per_core": per_cycle,
            "how": f"{cores} cores x {mhz / 1000:.2f} GHz (cpu MHz) x {lanes} fp32 lanes x 2 (FMA) x 2 FMA units"}


def _text_tower_saving(model_name: str) -> dict:
    """Parameters and peak RSS of building the whole open_clip model vs the image tower alone (inference loads)."""
    cpu = torch.device("cpu")
    with PeakMemory(cpu) as alone_mem:
        alone = build_image_tower(model_name)
    alone_params = sum(p.numel() for p in alone.parameters())
    del alone
    gc.collect()
    with PeakMemory(cpu) as full_mem:
        full = create_clip(model_name, None)
    full_params = sum(p.numel() for p in full.parameters())
    del full
    gc.collect()
    return {"image_tower_params": alone_params, "whole_model_params": full_params,
            "not_built_mb": round((full_params - alone_params) * 4 / MB, 1),
            "build_peak_rss_delta_mb": {"image_tower": alone_mem.result["peak_rss_delta_mb"],
                                        "whole_model": full_mem.result["peak_rss_delta_mb"]}}


def _throughput(embedder, images: torch.Tensor, batch: int, repeats: int, latency_calls: int) -> dict:
    cpu = torch.device("cpu")
    embedder.embed(images[:batch])  # warm-up (oneDNN / onnxruntime pick their kernels)
    times = timed(lambda: [embedder.embed(chunk) for chunk in images.split(batch)], cpu, repeats)
    one = images[:1]
    embedder.embed(one)
    latencies = sorted(timed(lambda: embedder.embed(one), cpu, latency_calls))
    p95 = latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]
    return {"images_per_s_b64": images.shape[0] / statistics.median(times), "pass": summary(times),
            "latency_b1_p50_ms": 1000 * statistics.median(latencies), "latency_b1_p95_ms": 1000 * p95}


def _top1_agreement(reference: torch.Tensor, other: torch.Tensor, subjects: list[str]) -> dict:
    """Share of queries whose top-1 identity is the same with both sets of embeddings: the first image of each
    subject is the gallery, the others are queries."""
    first = {}
    for row, s in enumerate(subjects):
        first.setdefault(s, row)
    gallery = sorted(first.values())
    queries = [r for r in range(len(subjects)) if r not in set(gallery)]

    def top1(e):
        e = F.normalize(e.double(), dim=1)
        return (e[queries] @ e[gallery].T).argmax(dim=1)

    same = (top1(reference) == top1(other)).double().mean()
    return {"top1_same_share": float(same), "queries": len(queries), "gallery": len(gallery)}


def _subjects(paths: list[Path]) -> list[str]:
    import csv

    with open(paths[0].parent.parent / "HandInfo.csv", newline="") as f:
        owner = {row["imageName"]: row["id"] for row in csv.DictReader(f)}
    return [owner[p.name] for p in paths]


def bench_inference(s: dict, scratch: Path, seed: int, say: Say) -> tuple[dict, dict]:
    """Every backend of ``s['backends']`` on ``s['model_name']`` (random weights) on the CPU."""
    cores = min(usable_cpus(), torch.get_num_threads())  # bench.threads=1 measures one core
    torch.manual_seed(seed)
    encoder = ImageEncoder(build_image_tower(s["model_name"]), preprocess_config(s["model_name"], None)).eval()
    fingerprint = encoder_fingerprint(encoder)
    flags = cpu_flags()
    result: dict = {"model_name": s["model_name"], "gflops_per_image": float(s["gflops_per_image"]), "cores": cores,
                    "cpu": {**cpu_info(), "flags": [f for f in FLAGS if f in flags]},
                    "fp32_peak": fp32_peak_gflops(cores), "text_tower": _text_tower_saving(s["model_name"])}
    say(f"  image tower alone: {result['text_tower']['not_built_mb']} MB of text tower not built")
    paths, info = synthetic_jpegs(scratch, int(s["photos"]), tuple(s["photo_size"]), seed, say)
    subjects = _subjects(paths)
    loader = ImageLoader(encoder.preprocess)
    start = time.perf_counter()
    crops = torch.stack([loader(p) for p in paths])
    result["decode_ms_per_photo"] = 1000 * (time.perf_counter() - start) / len(paths)
    images = torch.cat([crops, check_images(encoder, max(0, int(s["images"]) - len(crops)), seed)])[:int(s["images"])]
    cache = scratch / "backends"
    backends, memory, reference = {}, {}, None
    for name in s["backends"]:
        if not available(name):
            backends[name] = {"skipped": "not available on this machine"}
            say(f"  {name}: not available on this machine")
            continue
        say(f"  {name}: building / loading, agreement, {images.shape[0]} images at batch {s['batch_size']} x "
            f"{s['repeats']}, {s['latency_calls']} batch-1 calls ...")
        try:
            start = time.perf_counter()
            embedder = make_embedder(encoder, name, "cpu", fingerprint, cache)
            entry: dict = {"load_s": time.perf_counter() - start}
        except HandCLIPError as err:
            backends[name] = {"refused": str(err)}
            say(f"  {name}: refused: {err}")
            continue
        with PeakMemory(torch.device("cpu")) as mem:
            entry.update(_throughput(embedder, images, int(s["batch_size"]), int(s["repeats"]),
                                     int(s["latency_calls"])))
        memory[name] = mem.result
        with torch.inference_mode():
            on_photos = embedder.embed(crops)
        reference = on_photos if name == "torch" else reference
        entry["agreement"] = embedder.agreement or agreement(embedder, encoder, check_images(encoder))
        if reference is not None:
            cosine = F.cosine_similarity(on_photos.double(), reference.double(), dim=1)
            entry["agreement"].update(photos_cosine_min=float(cosine.min()),
                                      **_top1_agreement(reference, on_photos, subjects))
        entry["meets_agreement"] = entry["agreement"]["cosine_min"] >= AGREEMENT_GOAL[name]
        peak = result["fp32_peak"]["gflops"]
        entry["fp32_peak_fraction"] = (entry["images_per_s_b64"] * result["gflops_per_image"] / peak) if peak else None
        backends[name] = entry
        say(f"  {name}: {entry['images_per_s_b64']:.1f} images/s at b{s['batch_size']}, batch 1 p50 "
            f"{entry['latency_b1_p50_ms']:.0f} ms, cosine >= {entry['agreement']['cosine_min']:.5f}")
    result["backends"] = backends
    measured = {k: v for k, v in backends.items() if "images_per_s_b64" in v and v["meets_agreement"]}
    if "torch" in measured:
        best = max(measured, key=lambda k: measured[k]["images_per_s_b64"])
        result["best_backend"] = best
        result["best_vs_torch_b64"] = ratio(measured[best]["images_per_s_b64"], measured["torch"]["images_per_s_b64"])
        result["best_latency_b1_p50_ms"] = min(v["latency_b1_p50_ms"] for v in measured.values())
        result["auto_picks"] = make_embedder(encoder, "auto", "cpu", fingerprint, cache).name
        result["identify"] = _identify_rate(encoder, best, fingerprint, cache, paths, s, info, say)
        result["identify_photos_per_s"] = result["identify"][best]["photos_per_s"]
    return result, memory


def _identify_rate(encoder, best: str, fingerprint: str, cache: Path, paths: list[Path], s: dict, info: dict,
                   say: Say) -> dict:
    """Photos/s of identify's embedding of new photos (decode + resize + embed, DataLoader workers as identify
    runs them), with torch fp32 and the best backend."""
    out = {"photos": len(paths), "photo_size": list(s["photo_size"]), "mean_file_kb": info.get("mean_file_kb")}
    for name in dict.fromkeys(("torch", best)):
        embedder = make_embedder(encoder, name, "cpu", fingerprint, cache)
        say(f"  identify end to end ({name}): {len(paths)} {s['photo_size'][0]}x{s['photo_size'][1]} JPEGs ...")
        start = time.perf_counter()
        done = embed_files(embedder, paths, torch.device("cpu"), int(s["batch_size"]), progress=False)
        seconds = time.perf_counter() - start
        out[name] = {"photos_per_s": len(done.rows) / seconds, "seconds": seconds}
    return out
