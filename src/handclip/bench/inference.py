"""CPU inference: images/s of each backend at batch 64, batch-1 latency, agreement with torch fp32, identify end to
end on a new gallery of 1600x1200 JPEGs (:mod:`handclip.bench.gallery`), and what the CPU could do at most
(``fp32_peak_fraction``).

Agreement is measured on the check images (cosine) and on ``make demo``'s identify photos (its synthetic hands at
the demo's settings rendered at ``photo_size``, generated here): cosine of each photo's embedding with torch fp32's
and the share of the demo's queries whose top-1 identity is unchanged, with full decoding and with draft decoding
(JPEGs at a reduced scale, :class:`handclip.data.images.ImageLoader`) against torch fp32 with full decoding; with
torch's own top-1 gaps and, on ``make demo``'s trained model too, when it is there (:mod:`handclip.bench.agreement`).

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

from handclip.bench.agreement import embed_all, on_photos, on_trained_model, top1_margins
from handclip.bench.data import demo_photos
from handclip.bench.gallery import identify_gallery
from handclip.bench.machine import cpu_info
from handclip.bench.measure import MB, PeakMemory, ratio, summary, timed
from handclip.data.images import ImageLoader, draft_side, load_rgb
from handclip.errors import HandCLIPError
from handclip.identify.index import ModelInfo
from handclip.models.backends import AGREEMENT_GOAL, agreement, available, check_images, make_embedder
from handclip.models.clip import build_image_tower, create_clip, preprocess_config
from handclip.models.encoder import ImageEncoder
from handclip.models.fingerprint import encoder_fingerprint
from handclip.utils.devices import cpu_flags, usable_cpus

Say = Callable[[str], None]
#: Flags that decide which backend is fast: vector width, int8 dot products, bf16.
FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
#: The agreement draft decoding must show for identify's goal figure to be taken with it (else with full
#: decoding): torch fp32 with draft decoding against torch fp32 with full decoding, on the demo's photos with the
#: benchmark's model. It judges the decoding alone; the backend's own agreement is judged by its own goal.
DRAFT_GOAL = {"cosine_min": 0.99, "top1_same_share": 0.99}


def draft_verdict(torch_draft: dict) -> dict:
    """Whether draft decoding meets :data:`DRAFT_GOAL`, from torch's ``draft_agreement``."""
    cosine, top1 = torch_draft["photos_cosine_min"], torch_draft["top1_same_share"]
    return {"cosine_min": cosine, "top1_same_share": top1,
            "met": cosine >= DRAFT_GOAL["cosine_min"] and top1 >= DRAFT_GOAL["top1_same_share"]}


def identify_backends(names: list[str], best: str, measured: dict) -> list[str]:
    """``bench.inference.identify_backends`` with ``best`` named; one error line for a backend not measured here."""
    chosen = [best if name == "best" else str(name) for name in names]
    for name in chosen:
        if name not in measured:
            raise HandCLIPError(f"bench.inference.identify_backends: {name!r} was not measured in this run; choose "
                                f"among best, {', '.join(measured)}")
    return chosen


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


def _decode(loader: ImageLoader, paths: list[Path]) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    crops = torch.stack([loader(p) for p in paths])
    return crops, 1000 * (time.perf_counter() - start) / len(paths)


def bench_inference(s: dict, scratch: Path, seed: int, say: Say) -> tuple[dict, dict]:
    """Every backend of ``s['backends']`` on ``s['model_name']`` (random weights) on the CPU."""
    cores = min(usable_cpus(), torch.get_num_threads())  # bench.threads=1 measures one core
    identify_backends(s.get("identify_backends", []), "best", {"best": None, **dict.fromkeys(s["backends"])})
    torch.manual_seed(seed)
    encoder = ImageEncoder(build_image_tower(s["model_name"]), preprocess_config(s["model_name"], None)).eval()
    fingerprint = encoder_fingerprint(encoder)
    flags = cpu_flags()
    result: dict = {"model_name": s["model_name"], "gflops_per_image": float(s["gflops_per_image"]), "cores": cores,
                    "cpu": {**cpu_info(), "flags": [f for f in FLAGS if f in flags]},
                    "fp32_peak": fp32_peak_gflops(cores), "text_tower": _text_tower_saving(s["model_name"])}
    say(f"  image tower alone: {result['text_tower']['not_built_mb']} MB of text tower not built")
    demo = demo_photos(scratch, s["demo"], tuple(s["photo_size"]), say)
    photos, queries, identities = demo["queries"] + demo["gallery"], len(demo["queries"]), demo["gallery_identities"]
    result["agreement_photos"] = demo["source"]
    crops, full_ms = _decode(ImageLoader(encoder.preprocess), photos)
    drafts, draft_ms = _decode(ImageLoader(encoder.preprocess, "draft"), photos)
    with load_rgb(photos[0], draft_side(encoder.preprocess)) as img:
        draft_size = list(img.size)
    result["decode"] = {"photos": len(photos), "mean_file_kb": demo["mean_file_kb"], "photo_size": s["photo_size"],
                        "full_ms_per_photo": full_ms, "draft_ms_per_photo": draft_ms, "draft_size": draft_size,
                        "draft_min_side": draft_side(encoder.preprocess)}
    result["decode_ms_per_photo"] = full_ms
    images = torch.cat([crops, check_images(encoder, max(0, int(s["images"]) - len(crops)), seed)])[:int(s["images"])]
    cache, batch = scratch / "backends", int(s["batch_size"])
    backends, memory, embedders, reference = {}, {}, {}, None
    for name in s["backends"]:
        if not available(name):
            backends[name] = {"skipped": "not available on this machine"}
            say(f"  {name}: not available on this machine")
            continue
        say(f"  {name}: building / loading, agreement, {images.shape[0]} images at batch {batch} x "
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
            entry.update(_throughput(embedder, images, batch, int(s["repeats"]), int(s["latency_calls"])))
        memory[name] = mem.result
        embedded = embed_all(embedder, crops, batch)
        reference = embedded if name == "torch" else reference
        entry["agreement"] = embedder.agreement or agreement(embedder, encoder, check_images(encoder))
        if reference is not None:  # the demo's photos, full and draft decoding, against torch fp32 with full decoding
            entry["agreement"].update(on_photos(reference, embedded, queries, identities))
            entry["draft_agreement"] = on_photos(reference, embed_all(embedder, drafts, batch), queries, identities)
        entry["meets_agreement"] = entry["agreement"]["cosine_min"] >= AGREEMENT_GOAL[name]
        peak = result["fp32_peak"]["gflops"]
        entry["fp32_peak_fraction"] = (entry["images_per_s_b64"] * result["gflops_per_image"] / peak) if peak else None
        backends[name], embedders[name] = entry, embedder
        say(f"  {name}: {entry['images_per_s_b64']:.1f} images/s at b{batch}, batch 1 p50 "
            f"{entry['latency_b1_p50_ms']:.0f} ms, cosine >= {entry['agreement']['cosine_min']:.5f}")
    result["backends"] = backends
    measured = {k: v for k, v in backends.items() if "images_per_s_b64" in v and v["meets_agreement"]}
    if "torch" not in measured:
        return result, memory
    result["top1_margin"] = top1_margins(reference, queries)
    result["top1_same_min"] = min(v["agreement"]["top1_same_share"] for v in measured.values())
    result["trained"] = on_trained_model(s.get("trained_ckpt"), list(s["backends"]), demo, cache, batch, say)
    best = max(measured, key=lambda k: measured[k]["images_per_s_b64"])
    result["best_backend"] = best
    result["best_vs_torch_b64"] = ratio(measured[best]["images_per_s_b64"], measured["torch"]["images_per_s_b64"])
    result["best_latency_b1_p50_ms"] = min(v["latency_b1_p50_ms"] for v in measured.values())
    auto = make_embedder(encoder, "auto", "cpu", fingerprint, cache)
    result["auto_picks"] = auto.name
    result["auto"] = {k: auto.auto[k] for k in ("seconds_per_image", "refused", "reused")}
    if int(s["gallery_size"]) > 0:
        chosen = identify_backends(s.get("identify_backends", ["torch", "best"]), best, embedders)
        runs = {f"{name}-{decode}": (embedders[name], decode) for name in dict.fromkeys(chosen)
                for decode in ("full", "draft")}
        model = ModelInfo(key={"zero_shot": s["model_name"], "pretrained": None}, fingerprint=fingerprint)
        gallery = identify_gallery(runs, model, photos, demo["queries"], scratch, s, say)
        result["identify"] = gallery
        verdict = draft_verdict(backends["torch"]["draft_agreement"])
        gallery["draft_goal"], gallery["draft_verdict"] = dict(DRAFT_GOAL), verdict
        gallery["draft_meets_goal"] = draft_ok = verdict["met"]
        fastest = max((f"{best}-{d}" for d in ("full", "draft") if d == "full" or draft_ok),
                      key=lambda label: gallery["runs"][label]["photos_per_s"])
        result["identify_best"] = fastest
        result["identify_photos_per_s"] = gallery["runs"][fastest]["photos_per_s"]
    return result, memory
