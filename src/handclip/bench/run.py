"""The benchmark run: the configured parts one after the other, the result file and its table (see
:mod:`handclip.bench` for what is measured and the goals)."""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from handclip.bench.app import bench_app
from handclip.bench.checkpoints import bench_checkpoints
from handclip.bench.data import bench_data
from handclip.bench.eval import bench_eval
from handclip.bench.inference import bench_inference
from handclip.bench.machine import cpu_info, device_name, device_slug, slugify
from handclip.bench.measure import CpuShare
from handclip.bench.report import evaluate_goals, format_table, result_path, size_label
from handclip.bench.rerank import bench_rerank
from handclip.bench.scaling import bench_scaling
from handclip.bench.search import bench_search
from handclip.bench.settings import PARTS, bench_settings
from handclip.bench.train import bench_train, build_module
from handclip.utils.devices import resolve_device, usable_cpus
from handclip.utils.files import atomic_write

log = logging.getLogger(__name__)

Say = Callable[[str], None]

__all__ = [
    "PARTS", "bench_settings", "device_slug", "evaluate_goals", "format_table", "resolve_device", "result_path",
    "run_benchmark", "size_label", "slugify",
]


def _say(message: str) -> None:
    print(message, flush=True)


def run_benchmark(cfg: DictConfig, say: Say = _say) -> dict:
    """Run the configured parts, write ``<out_dir>/<device slug>[-quick].json``, print a table; return the result."""
    started = time.perf_counter()
    s, device = bench_settings(cfg)
    threads = torch.get_num_threads()
    if s.get("threads") is not None:
        torch.set_num_threads(int(s["threads"]))
    try:
        return _run(s, device, started, say)
    finally:
        torch.set_num_threads(threads)


def _run(s: dict, device: torch.device, started: float, say: Say) -> dict:
    quick = bool(s.get("quick"))
    seed = int(s.get("seed", 0))
    scratch = Path(s["scratch_dir"]).expanduser()
    scratch.mkdir(parents=True, exist_ok=True)
    name, slug = device_name(device), device_slug(device)
    out_path = result_path(Path(s["out_dir"]).expanduser(), slug, quick, s["parts"])
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    cores = usable_cpus()

    say(f"HandCLIP benchmark on {name}{' (quick)' if quick else ''}: {', '.join(s['parts'])} -> {out_path}")
    cpu_share = CpuShare().start()

    result: dict[str, Any] = {
        "device": name,
        "device_slug": slug,
        "torch": torch.__version__,
        "quick": quick,
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    config = {k: v for k, v in s.items() if k not in ("out_dir", "scratch_dir")}
    config["device"] = str(device)
    result["config"] = config
    host: dict[str, Any] = {"cpu": cpu_info(), "cores": cores, "torch_threads": torch.get_num_threads(),
                            "python": platform.python_version(), "platform": platform.platform()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        host["gpu"] = {"name": props.name, "memory_gb": round(props.total_memory / 2**30, 1),
                       "cuda": torch.version.cuda}
    memory: dict[str, dict] = {}

    module = None
    part_s: dict[str, float] = {}
    others: dict[str, float | None] = {}
    for step, part in enumerate(s["parts"], 1):
        say(f"[{step}/{len(s['parts'])}] {part}")
        part_start = time.perf_counter()
        part_share = CpuShare().start()
        if part == "data":
            result["data"], memory["data"] = bench_data({**s["data"], "seed": seed}, device, scratch, say)
        elif part == "train":
            result["train"], memory["train"], module = bench_train(s["train"], device, scratch, seed, say)
        elif part == "eval":
            if module is None:
                t = s["train"]
                module = build_module(t["model_name"], int(t["num_classes"]), float(t["lr"]), float(t["weight_decay"]))
            result["eval"], memory["eval"] = bench_eval(s["eval"], device, module, seed, say)
        elif part == "search":
            result["search"], memory["search"] = bench_search(s["search"], device, scratch, seed, say)
        elif part == "checkpoints":
            result["checkpoints"], memory["checkpoints"] = bench_checkpoints(s["checkpoints"], device, scratch, seed,
                                                                             say)
        elif part == "rerank":
            result["rerank"], memory["rerank"] = bench_rerank(s["rerank"], device, seed, say)
        elif part == "inference":  # on the CPU whatever bench.device says: CPU inference is what it measures
            result["inference"], memory["inference"] = bench_inference(s["inference"], scratch, seed, say)
        elif part == "app":  # the app in a server process of its own: no memory figures of this process
            result["app"] = bench_app(s["app"], scratch, seed, say)
        elif part == "scaling":  # in processes of its own: no memory figures
            result["scaling"] = bench_scaling(s["scaling"], device, scratch / "scaling", seed, say)
        part_s[part] = round(time.perf_counter() - part_start, 1)
        others[part] = part_share.stop()
        if others[part] is not None and others[part] > 0.1:
            say(f"  note: other processes used {others[part]:.0%} of the CPU during '{part}': its figures are low")

    result["memory"] = memory
    result["goals"] = evaluate_goals(result, s["eval"] if "eval" in result else None)
    load_end = os.getloadavg() if hasattr(os, "getloadavg") else None
    host["load_average_start"] = [round(v, 2) for v in load_start] if load_start else None
    host["load_average_end"] = [round(v, 2) for v in load_end] if load_end else None
    # Share of all cores' time used by other processes (0: a quiet machine), whole run and per part
    host["other_processes_cpu_share"] = cpu_share.stop()
    host["other_processes_cpu_share_per_part"] = others
    result["host"] = host
    result["part_s"] = part_s
    result["total_s"] = round(time.perf_counter() - started, 1)

    if out_path.exists():
        try:
            previous = json.loads(out_path.read_text()).get("timestamp", "unknown time")
        except (OSError, ValueError):
            previous = "unreadable"
        say(f"replacing the earlier {'quick ' if quick else ''}result in {out_path} (from {previous})")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out_path, json.dumps(result, indent=2, allow_nan=True) + "\n")
    result["path"] = str(out_path)
    say("")
    say(format_table(result))
    say(f"\nwritten: {out_path}  ({result['total_s']:.0f} s)")
    return result
