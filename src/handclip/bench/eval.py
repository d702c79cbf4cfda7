"""Embedding throughput, and re-ID metric time and memory on random unit vectors against the argsort reference."""

from __future__ import annotations

import gc
import statistics
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader

from handclip.bench.measure import MB, PeakMemory, ratio, summary, timed
from handclip.bench.report import size_label
from handclip.data.datasets import TensorImageDataset, batch_collate
from handclip.evaluation.embed import embed_loader
from handclip.metrics import argsort_reference_metrics, compute_reid_metrics, similarity_only

Say = Callable[[str], None]


def _embed_bench(module, s: dict, device: torch.device, seed: int, say: Say) -> tuple[dict, dict]:
    n, batch = int(s["embed_images"]), int(s["embed_batch_size"])
    input_size = tuple(int(v) for v in module.encoder.preprocess.input_size)
    generator = torch.Generator().manual_seed(seed + 1)
    images = torch.randint(0, 256, (n, *input_size), dtype=torch.uint8, generator=generator)
    dataset = TensorImageDataset(images, list(range(n)))

    def loader(count: int):
        part = dataset if count >= n else TensorImageDataset(images[:count], list(range(count)))
        return DataLoader(part, batch_size=batch, shuffle=False, num_workers=0, collate_fn=batch_collate)

    say(f"  embedding: {module.hparams.model_name}, {n} images, batch {batch}, {s['embed_repeats']} passes ...")
    embed_loader(module.encoder, loader(min(batch, n)), device, progress=False)  # warm-up: one batch
    with PeakMemory(device) as mem:
        times = timed(lambda: embed_loader(module.encoder, loader(n), device, progress=False), device,
                      int(s["embed_repeats"]))
    return {
        "model_name": module.hparams.model_name,
        "images": n,
        "batch_size": batch,
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "images_per_s": n / statistics.median(times),
        "pass": summary(times),
    }, mem.result


def reid_inputs(n: int, dim: int, per_identity: int, device: torch.device, seed: int):
    """N queries and N gallery items (random unit vectors); ``per_identity`` gallery items per identity,
    every query's identity drawn from the gallery's."""
    generator = torch.Generator().manual_seed(seed)
    identities = max(1, n // per_identity)
    gallery_labels = torch.arange(n) % identities
    query_labels = torch.randint(0, identities, (n,), generator=generator)
    gallery = torch.nn.functional.normalize(torch.randn(n, dim, generator=generator), dim=1)
    query = torch.nn.functional.normalize(torch.randn(n, dim, generator=generator), dim=1)
    return query.to(device), query_labels.to(device), gallery.to(device), gallery_labels.to(device), identities


def _agree(a: dict, b: dict) -> bool:
    keys = [k for k in a if k.startswith("rank") or k == "mAP"]
    return all(abs(a[k] - b[k]) <= 1e-6 for k in keys) and a["num_valid_queries"] == b["num_valid_queries"]


def _metrics_at(n: int, s: dict, device: torch.device, seed: int, warm: bool, say: Say) -> dict:
    """Similarity product, compute_reid_metrics and (where asked) the argsort reference at N x N."""
    label, repeats, dim = size_label(n), int(s["repeats"]), int(s["dim"])
    with_argsort = n in {int(v) for v in s.get("argsort_sizes") or []}
    q, ql, g, gl, identities = reid_inputs(n, dim, int(s["gallery_per_identity"]), device, seed + n)
    if warm:  # first call of each function: thread pools, allocator
        similarity_only(q, g)
        compute_reid_metrics(q, ql, g, gl)
        argsort_reference_metrics(q[:64], ql[:64], g, gl)
    say(f"  metrics {label} x {label} ({identities} identities): similarity product, compute_reid_metrics"
        + (", argsort reference" if with_argsort else "") + f", {repeats} repeats each ...")
    entry: dict[str, Any] = {"queries": n, "gallery": n, "identities": identities, "dim": dim}
    with PeakMemory(device) as mem:
        sim = timed(lambda: similarity_only(q, g), device, repeats)
    entry["similarity"], entry["similarity_memory"] = summary(sim), mem.result
    result: dict = {}
    with PeakMemory(device) as mem:
        met = timed(lambda: result.update(compute_reid_metrics(q, ql, g, gl)), device, repeats)
    entry["metrics"], entry["metrics_memory"] = summary(met), mem.result
    entry["rank1"], entry["mAP"] = result["rank1"], result["mAP"]
    entry["metrics_vs_matmul"] = ratio(statistics.median(met), statistics.median(sim))
    if with_argsort:
        reference: dict = {}
        with PeakMemory(device) as mem:
            ref = timed(lambda: reference.update(argsort_reference_metrics(q, ql, g, gl)), device, repeats)
        entry["argsort"], entry["argsort_memory"] = summary(ref), mem.result
        entry["speedup_vs_argsort"] = ratio(statistics.median(ref), statistics.median(met))
        entry["agrees_with_argsort"] = _agree(result, reference)
    entry["full_similarity_matrix_mb"] = round(n * n * 4 / MB, 1)
    return entry


def _metrics_bench(s: dict, device: torch.device, seed: int, say: Say) -> tuple[dict, dict]:
    out: dict[str, dict] = {}
    for i, n in enumerate(int(v) for v in s["sizes"]):
        out[size_label(n)] = _metrics_at(n, s, device, seed, warm=i == 0, say=say)
        gc.collect()  # the inputs of this size are gone with _metrics_at's frame
    return out, {f"metrics_{label}": entry["metrics_memory"] for label, entry in out.items()}


def bench_eval(s: dict, device: torch.device, module, seed: int, say: Say) -> tuple[dict, dict]:
    embed, embed_memory = _embed_bench(module, s, device, seed, say)
    per_size, memory = _metrics_bench(s, device, seed, say)
    result: dict[str, Any] = {"embed": embed, "embed_images_per_s": embed["images_per_s"], "metrics": per_size}
    for label, entry in per_size.items():
        result[f"metrics_s_{label}"] = entry["metrics"]["median_s"]
        result[f"similarity_s_{label}"] = entry["similarity"]["median_s"]
        result[f"metrics_vs_matmul_{label}"] = entry["metrics_vs_matmul"]
        if "argsort" in entry:
            result[f"argsort_s_{label}"] = entry["argsort"]["median_s"]
            result[f"speedup_vs_argsort_{label}"] = entry["speedup_vs_argsort"]
    largest = size_label(max(int(v) for v in s["sizes"]))
    mem = per_size[largest]["metrics_memory"]
    key = "peak_gpu_delta_mb" if device.type == "cuda" else "peak_rss_delta_mb"
    result[f"metrics_peak_mem_delta_mb_{largest}"] = mem[key]
    result["metrics_peak_mem_kind"] = "GPU (max_memory_allocated)" if device.type == "cuda" else "host RSS"
    return result, {"embed": embed_memory, **memory}
