"""Goals, the printed summary table and the result file's name."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

#: (figure, comparison, target, meaning); ``{goal}`` is replaced by the eval goal size label (e.g. 10k).
GOALS = (
    ("data.cached_speedup", ">=", 100.0, "cached images/s / uncached images/s"),
    ("train.vs_bare_loop", ">=", 0.9, "HandCLIP (Lightning) images/s / bare PyTorch loop images/s"),
    ("eval.metrics_vs_matmul_{goal}", "<=", 2.0, "compute_reid_metrics time / similarity product time"),
    ("eval.speedup_vs_argsort_{goal}", ">=", 10.0, "argsort reference time / compute_reid_metrics time"),
    ("search.queries_per_s", ">=", 20.0, "exact top-k identities per second, one batch against the index"),
    ("search.peak_mem_vs_index", "<=", 1.5, "peak RSS added by a search (mapped index included) / index size"),
    ("search.agrees_with_argsort", ">=", 1, "top-k equal to a brute-force stable argsort on a subset (yes = 1)"),
    ("search.reuse_embedded_images", "<=", 0, "gallery images embedded again when the index is reopened unchanged"),
    ("search.reuse_decoded_images", "<=", 0, "gallery images decoded again when the index is reopened unchanged"),
    ("checkpoints.run_share", "<=", 0.05, "share of a default-recipe run spent writing checkpoints"),
    ("scaling.cuda_efficiency_2", ">=", 0.9, "images/s on 2 GPUs (DDP) / (2 x images/s on 1 GPU)"),
    ("rerank.sizes.4k.seconds", "<=", 1.0, "k-reciprocal re-ranking of N = 4,000 (the HD protocol's size), seconds"),
    ("rerank.sizes.20k.seconds", "<=", 60.0, "k-reciprocal re-ranking of N = 20,000, seconds"),
    ("rerank.sizes.20k.peak_rss_gib", "<=", 8.0, "peak host memory of re-ranking N = 20,000 (GiB)"),
    ("rerank.vs_straightforward.speedup", ">=", 5.0, "straightforward dense implementation time / this one's"),
    ("rerank.vs_straightforward.float64_rankings_equal", ">=", 1, "the same rankings as the straightforward one"),
    ("inference.best_vs_torch_b64", ">=", 2.0,
     "images/s of the fastest CPU backend that meets its agreement / torch eager fp32, batch 64"),
    ("inference.best_latency_b1_p50_ms", "<=", 40.0, "batch-1 latency (median ms) of the fastest such backend"),
    ("inference.identify_photos_per_s", ">=", 40.0,
     "identify on a new gallery of 1600x1200 JPEGs (10,000 in a full run), photos/s end to end, decoding included: "
     "the best backend, with full or (when it meets its agreement) draft decoding, the faster"),
    ("inference.top1_same_min", ">=", 0.99,
     "share of the demo's queries with torch fp32's top-1 identity, lowest of the backends that meet their cosine "
     "goal (the benchmark's model: ViT-B/32 with random weights)"),
    ("inference.trained.top1_same_min", ">=", 0.99,
     "the same on make demo's trained model (HandCLIP-Tiny fine-tuned on the demo's hands)"),
    ("app.load.all_right", ">=", 1,
     "every concurrent identify request of the app answered with its own photo's person"),
    ("app.race.consistent_and_seen", ">=", 1,
     "identify during enrolments saw the gallery before or after each, never between (and saw both)"),
)

#: Goals of a CUDA run only (the training step's speed is a GPU goal).
CUDA_GOALS = (
    ("train.images_per_s", ">=", 10_000.0, "training images/s of ViT-B/32 in bf16 (the goal set for an H100)"),
    ("train.device_batches.data_fraction", "<=", 0.05,
     "share of a Lightning iteration spent getting the batch (crops on the GPU, data.device_batches)"),
    ("train.device_batches.vs_bare_loop", ">=", 0.9,
     "HandCLIP (Lightning, crops on the GPU) images/s / bare PyTorch loop images/s"),
    ("train.compiled.vs_bare_loop", ">=", 0.9, "the same with the image tower compiled (model.compile=true)"),
)

#: Peak memory of compute_reid_metrics at the largest size must stay below this (MiB): bounded, not N x N.
METRICS_MEMORY_TARGET_MB = 1024.0


def size_label(n: int) -> str:
    """1000 -> '1k', 10000 -> '10k', 2500 -> '2.5k', 500 -> '500'."""
    if n >= 1000 and n % 100 == 0:
        text = f"{n / 1000:.1f}".rstrip("0").rstrip(".")
        return f"{text}k"
    return str(n)


def _lookup(result: dict, dotted: str) -> Any:
    node: Any = result
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def evaluate_goals(result: dict, eval_settings: dict | None) -> dict:
    """{figure: {value, target, op, met, meaning}} for every goal whose figure was measured."""
    goal_label = size_label(int(eval_settings["goal_size"])) if eval_settings else "10k"
    goals: dict[str, dict] = {}
    specs = list(GOALS)
    if str((result.get("config") or {}).get("device", "")).startswith("cuda"):
        specs += CUDA_GOALS
    if eval_settings and "eval" in result:
        largest = size_label(max(int(v) for v in eval_settings["sizes"]))
        full = result["eval"]["metrics"][largest]["full_similarity_matrix_mb"]
        specs.append((
            f"eval.metrics_peak_mem_delta_mb_{largest}", "<=", METRICS_MEMORY_TARGET_MB,
            f"peak memory added by compute_reid_metrics at {largest} x {largest} (MiB; a full similarity "
            f"matrix would need {full:.0f})",
        ))
    for figure, op, target, meaning in specs:
        figure = figure.format(goal=goal_label)
        value = _lookup(result, figure)
        if value is None:
            continue
        met = value >= target if op == ">=" else value <= target
        goals[figure] = {"value": value, "target": target, "op": op, "met": bool(met), "meaning": meaning}
    return goals


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0 or math.isinf(value):
            return str(value)
        magnitude = abs(value)
        if magnitude >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}" if magnitude < 1 else f"{value:.{max(digits, len(str(int(magnitude))))}g}"
    return str(value)


def format_table(result: dict) -> str:
    """A readable summary of a result dict."""
    rows: list[tuple[str, str]] = []
    data, train, ev = result.get("data"), result.get("train"), result.get("eval")
    if data:
        rows += [
            ("data: uncached images/s", _fmt(data["uncached_images_per_s"])),
            ("data: cached images/s", _fmt(data["cached_images_per_s"])),
            ("data: cached speedup (x)", _fmt(data["cached_speedup"])),
            ("data: cache build s", _fmt(data["cache_build_s"])),
        ]
    if train:
        rows += [
            (f"train: HandCLIP images/s ({train['model_name']}, b{train['batch_size']})", _fmt(train["images_per_s"])),
            ("train: bare loop images/s", _fmt(train["bare_images_per_s"])),
            ("train: HandCLIP / bare", _fmt(train["vs_bare_loop"])),
            ("train: TFLOP/s", _fmt(train["tflops"])),
            ("train: data fraction", _fmt(train["data_fraction"])),
        ]
        if "device_batches" in train:
            db = train["device_batches"]
            rows += [("train: crops on the device: images/s (/ bare)",
                      f"{_fmt(db['images_per_s'])} ({_fmt(db['vs_bare_loop'])}); data fraction "
                      f"{_fmt(db['data_fraction'])}")]
        if "compiled" in train:
            c = train["compiled"]
            rows += [("train: compiled: images/s (/ bare), first step s",
                      c["error"][:80] if "error" in c else
                      f"{_fmt(c['images_per_s'])} ({_fmt(c['vs_bare_loop'])}), {_fmt(c['first_step_s'])}")]
    if ev:
        rows.append(("eval: embedding images/s", _fmt(ev["embed_images_per_s"])))
        for label, entry in ev["metrics"].items():
            rows.append((f"eval: {label} metrics s / matmul s", f"{_fmt(entry['metrics']['median_s'])} / "
                         f"{_fmt(entry['similarity']['median_s'])} = {_fmt(entry['metrics_vs_matmul'])}x"))
            if "argsort" in entry:
                rows.append((f"eval: {label} argsort s (speedup)",
                             f"{_fmt(entry['argsort']['median_s'])} ({_fmt(entry['speedup_vs_argsort'])}x)"))
            mem = entry["metrics_memory"]
            key = "peak_gpu_delta_mb" if mem.get("peak_gpu_delta_mb") is not None else "peak_rss_delta_mb"
            rows.append((f"eval: {label} metrics peak mem delta MiB", _fmt(mem[key])))
    srch = result.get("search")
    if srch:
        rows += [
            (f"search: {srch['gallery']:,} x {srch['dim']} {srch['dtype']}, {srch['queries']} queries, "
             f"top-{srch['top_k']}: queries/s", _fmt(srch["queries_per_s"])),
            ("search: peak memory / index size", f"{_fmt(srch['peak_mem_vs_index'])} (index {srch['index_mb']} MiB)"),
            ("search: equals a brute-force argsort", _fmt(srch["agrees_with_argsort"])),
            (f"search: reopen an unchanged {srch['reuse_images']:,}-image index s", _fmt(srch["index_reuse_s"])),
            ("search: images decoded / embedded on reopening",
             f"{srch['reuse_decoded_images']} / {srch['reuse_embedded_images']}"),
        ]
    ckpt = result.get("checkpoints")
    if ckpt:
        writes = ckpt["writes"]
        rows += [
            ("checkpoints: best / last MB", f"{_fmt(ckpt['best_mb'])} / {_fmt(ckpt['last_mb'])}"),
            ("checkpoints: disk per hand type GB (0.1.0)",
             f"{_fmt(ckpt['disk_per_hand_gb'])} ({_fmt(ckpt['disk_per_hand_gb_0_1_0'])})"),
            *((f"checkpoints: {mode} best / last s", f"{_fmt(writes[mode]['best']['blocking_s'])} / "
               f"{_fmt(writes[mode]['last']['blocking_s'])}") for mode in writes),
            ("checkpoints: share of the run", _fmt(ckpt["run_share"])),
            ("checkpoints: projected share, 50 epochs", _fmt(ckpt["projected_share"])),
        ]
    for name, entry in ((result.get("inference") or {}).get("backends") or {}).items():
        if "images_per_s_b64" not in entry:
            rows.append((f"inference: {name}", (entry.get("skipped") or entry.get("refused", ""))[:80]))
            continue
        agree = entry["agreement"]
        rows.append((f"inference: {name} images/s b64, b1 p50/p95 ms, cosine min, top-1 same",
                     f"{_fmt(entry['images_per_s_b64'])}, {_fmt(entry['latency_b1_p50_ms'])}/"
                     f"{_fmt(entry['latency_b1_p95_ms'])}, {agree['cosine_min']:.5f}, "
                     f"{_fmt(agree.get('top1_same_share'))}"))
    if (result.get("inference") or {}).get("identify"):
        inf = result["inference"]
        gallery = inf["identify"]
        rows.append((f"inference: identify photos/s, gallery of {gallery['gallery_photos']}",
                     ", ".join(f"{label} {_fmt(run['photos_per_s'])}" for label, run in gallery["runs"].items())))
    for count, entry in ((result.get("scaling") or {}).get("processes") or {}).items():
        if "skipped" in entry:
            rows.append((f"scaling: {count} process(es)", entry["skipped"]))
            continue
        value = f"{_fmt(entry['images_per_s'])} images/s"
        if "speedup_vs_1" in entry:
            value += f" ({_fmt(entry['speedup_vs_1'])}x one process; gradient sync {entry['grad_sync_share']:.0%})"
        rows.append((f"scaling: {count} process(es) x b{result['scaling']['batch_size_per_process']}", value))
    app = result.get("app")
    if app:
        load, race = app["load"], app["race"]
        rows += [
            ("app: one client alone: latency p50 / p95 ms",
             f"{_fmt(app['solo']['latency_ms']['p50'])} / {_fmt(app['solo']['latency_ms']['p95'])}"),
            (f"app: {load['clients']} clients x {load['requests_per_client']} identify, {app['gallery_photos']:,} "
             "photos: right", f"{load['right']} / {load['requests']}"),
            ("app: latency p50 / p95 / max ms", f"{_fmt(load['latency_ms']['p50'])} / {_fmt(load['latency_ms']['p95'])}"
             f" / {_fmt(load['latency_ms']['max'])}; {_fmt(load['requests_per_s'])} requests/s"),
            (f"app: {race['rounds']} enrolments during identify: before / after / torn",
             f"{race['answers']['before']} / {race['answers']['after']} / {race['answers']['torn']}"),
        ]
    width = max((len(r[0]) for r in rows), default=10)
    lines = [f"HandCLIP benchmark on {result['device']} (torch {result['torch']}"
             f"{', quick' if result.get('quick') else ''})", ""]
    lines += [f"  {name:<{width}}  {value}" for name, value in rows]
    share = (result.get("host") or {}).get("other_processes_cpu_share")
    if share is not None:
        lines += ["", f"  other processes used {share:.0%} of the CPU during the run"
                  + (" (figures may be low)" if share > 0.1 else "")]
    if result.get("goals"):
        lines += ["", "  goals:"]
        for figure, g in result["goals"].items():
            lines.append(f"    {'MET ' if g['met'] else 'MISS'}  {figure} = {_fmt(g['value'])} "
                         f"(target {g['op']} {_fmt(g['target'])})")
    return "\n".join(lines)


def result_path(out_dir: Path, slug: str, quick: bool, parts=None) -> Path:
    """``<slug>.json`` for a full run, ``<slug>-quick.json`` for a quick one (never the full file); a run of
    other parts than a full run's adds them to the name (``<slug>-scaling.json``)."""
    from handclip.bench.settings import FULL_RUN

    label = "" if parts is None or sorted(parts) == sorted(FULL_RUN) else "-" + "-".join(parts)
    return Path(out_dir) / f"{slug}{label}{'-quick' if quick else ''}.json"
