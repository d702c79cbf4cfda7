"""Speed and memory benchmark of HandCLIP's data loading, training step and evaluation.

    python -m handclip.bench                      # full run -> benchmarks/results/<device>.json
    python -m handclip.bench bench.quick=true     # seconds -> benchmarks/results/<device>-quick.json
    python -m handclip.bench bench.device=cpu bench.parts=[eval]

Every figure is a median over repeats after warm-up, and every goal is a ratio of two figures measured
in the same run on the same machine:

* ``data.cached_speedup``: images/s of one epoch served from the decode-once crop cache
  (:class:`TensorImageDataset` over :func:`cached_crops`) / images/s decoding the JPEGs on the fly
  (:class:`ImageDataset` through a DataLoader), same batch size, on synthetic 1600x1200 photos.
* ``train.vs_bare_loop``: images/s of :class:`HandCLIPModule`'s training step run by a Lightning
  Trainer / the same step (forward, cross-entropy, backward, AdamW) in a bare PyTorch loop over the
  same module's parameters and the same optimizer.
* ``eval.metrics_vs_matmul_<N>``: time of :func:`compute_reid_metrics` / time of the similarity
  product alone (:func:`similarity_only`) at N x N.
* ``eval.speedup_vs_argsort_<N>``: time of :func:`argsort_reference_metrics` / time of
  :func:`compute_reid_metrics` at N x N.

Peak host RSS (reset per block through ``/proc/self/clear_refs`` where Linux allows it) and peak GPU
memory are recorded for every measured block.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import platform
import re
import resource
import shutil
import statistics
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from handclip import CONFIG_DIR
from handclip import config as _config  # noqa: F401  (registers the ${handclip_root:} resolver)
from handclip.errors import HandCLIPError, exit_on_error

log = logging.getLogger(__name__)

PARTS = ("data", "train", "eval")
#: (figure, comparison, target, meaning); ``{goal}`` is replaced by the eval goal size label (e.g. 10k).
GOALS = (
    ("data.cached_speedup", ">=", 100.0, "cached images/s / uncached images/s"),
    ("train.vs_bare_loop", ">=", 0.9, "HandCLIP (Lightning) images/s / bare PyTorch loop images/s"),
    ("eval.metrics_vs_matmul_{goal}", "<=", 2.0, "compute_reid_metrics time / similarity product time"),
    ("eval.speedup_vs_argsort_{goal}", ">=", 10.0, "argsort reference time / compute_reid_metrics time"),
)
#: Peak memory of compute_reid_metrics at the largest size must stay below this (MiB): bounded, not N x N.
METRICS_MEMORY_TARGET_MB = 1024.0

Say = Callable[[str], None]


# ============================================================================================ helpers


def _say(message: str) -> None:
    print(message, flush=True)


def size_label(n: int) -> str:
    """1000 -> '1k', 10000 -> '10k', 2500 -> '2.5k', 500 -> '500'."""
    if n >= 1000 and n % 100 == 0:
        text = f"{n / 1000:.1f}".rstrip("0").rstrip(".")
        return f"{text}k"
    return str(n)


def slugify(text: str) -> str:
    """'Intel(R) Xeon(R) Processor (2 cores)' -> 'intel-xeon-processor-2-cores'."""
    text = re.sub(r"\((r|tm|c)\)", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "unknown"


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def cpu_info() -> dict:
    """Model name (and, on Linux, family/model/vector extensions) of the CPU."""
    info: dict[str, Any] = {"model_name": platform.processor() or platform.machine() or "unknown CPU"}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break  # first processor only
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    if fields.get("model name"):
        info["model_name"] = fields["model name"]
    for key in ("vendor_id", "cpu family", "model", "stepping"):
        if key in fields:
            info[key.replace(" ", "_")] = fields[key]
    flags = set(fields.get("flags", "").split())
    info["vector_extensions"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return info


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HandCLIPError(f"bench.device={name} but CUDA is not available; use bench.device=cpu or auto")
    if device.type not in ("cpu", "cuda"):
        raise HandCLIPError(f"bench.device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {cpu_info()['model_name']} ({cpu_cores()} cores)"


def device_slug(device: torch.device) -> str:
    """File-name stem of a device: 'nvidia-h100-80gb-hbm3', 'cpu-intel-xeon-processor-2-cores'."""
    return slugify(device_name(device))


class CpuShare:
    """Share of the machine's CPU time that *other* processes used between start() and stop().

    Busy time of all cores (``/proc/stat``) minus this process's own CPU time (its children included,
    e.g. DataLoader workers), over wall time x cores. Near 0: the figures were measured on a quiet machine.
    """

    def __init__(self):
        self._start: tuple[float, float, float] | None = None

    @staticmethod
    def _busy_s() -> float | None:
        try:
            fields = [float(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
        busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal (guest is in user)
        return busy / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own_s() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def start(self) -> "CpuShare":
        busy = self._busy_s()
        self._start = None if busy is None else (busy, self._own_s(), time.perf_counter())
        return self

    def stop(self) -> float | None:
        busy = self._busy_s()
        if self._start is None or busy is None:
            return None
        busy0, own0, wall0 = self._start
        others = (busy - busy0) - (self._own_s() - own0)
        capacity = (time.perf_counter() - wall0) * (os.cpu_count() or 1)
        return round(min(1.0, max(0.0, others / capacity)), 3) if capacity > 0 else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _summary(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "times_s": times}


def _timed(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 0) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.inf


# ============================================================================================ memory

_MB = 2**20


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _lifetime_peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class PeakMemory(contextlib.AbstractContextManager):
    """Peak host RSS and peak GPU memory of a block, absolute and relative to the block's start.

    Host RSS counts this process only (not DataLoader or cache-building worker processes). Where the
    peak mark cannot be reset (not Linux), the process-lifetime peak is reported and marked so.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.result: dict = {}

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        self._resettable = _reset_peak_rss()
        current = _status_kb("VmRSS")
        self._rss_start = current * 1024 if current is not None else _lifetime_peak_rss()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._gpu_start = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc) -> None:
        peak_kb = _status_kb("VmHWM") if self._resettable else None
        peak = peak_kb * 1024 if peak_kb is not None else _lifetime_peak_rss()
        self.result = {
            "peak_rss_mb": round(peak / _MB, 1),
            "peak_rss_delta_mb": round(max(0, peak - self._rss_start) / _MB, 1),
            "rss_peak_scope": "block" if peak_kb is not None else "process lifetime",
            "peak_gpu_mb": None,
            "peak_gpu_delta_mb": None,
        }
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            gpu_peak = torch.cuda.max_memory_allocated(self.device)
            self.result["peak_gpu_mb"] = round(gpu_peak / _MB, 1)
            self.result["peak_gpu_delta_mb"] = round(max(0, gpu_peak - self._gpu_start) / _MB, 1)


def _larger(a: dict, b: dict) -> dict:
    """Field-by-field maximum of two PeakMemory results."""
    out = dict(a)
    for key, value in b.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = value if out.get(key) is None else max(out[key], value)
    return out


# ============================================================================================ settings


def _per_device(node: Any, device_type: str) -> Any:
    """Replace every ``{cpu: a, cuda: b}`` mapping by the value for ``device_type``."""
    if isinstance(node, dict):
        if node and set(node) <= {"cpu", "cuda"}:
            return node.get(device_type, node.get("cpu"))
        return {k: _per_device(v, device_type) for k, v in node.items()}
    if isinstance(node, list):
        return [_per_device(v, device_type) for v in node]
    return node


def bench_settings(cfg: DictConfig) -> tuple[dict, torch.device]:
    """The ``bench`` settings as plain values: quick settings applied, per-device values chosen."""
    if "bench" not in cfg:
        raise HandCLIPError("config has no 'bench' section (compose the 'bench' config)")
    bench = OmegaConf.to_container(cfg.bench, resolve=True)
    quick_settings = bench.pop("quick_settings", None) or {}
    device = resolve_device(str(bench.get("device", "auto")))
    bench = _per_device(bench, device.type)
    if bench.get("quick"):
        merged = OmegaConf.merge(bench, _per_device(quick_settings, device.type))
        bench = OmegaConf.to_container(merged, resolve=True)
    parts = list(bench.get("parts") or PARTS)
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise HandCLIPError(f"bench.parts: unknown part(s) {unknown}; choose from {list(PARTS)}")
    bench["parts"] = parts
    return bench, device


# ============================================================================================ data


def synthetic_jpegs(scratch: Path, count: int, size: tuple[int, int], seed: int, say: Say) -> tuple[list[Path], dict]:
    """``count`` synthetic hand photos of ``size`` (generated once under ``scratch``, then reused)."""
    from handclip.data import synthetic

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
            raw, subjects=subjects, images_per_aspect=2, seed=seed, size=tuple(size), force=True, progress=progress
        )
        info.update(generated=True, generate_s=round(summary.seconds, 2))
    paths = sorted(hands.glob("*.jpg"))[:count]
    if len(paths) < count:
        raise HandCLIPError(f"expected {count} synthetic images under {hands}, found {len(paths)}")
    info["mean_file_kb"] = round(sum(p.stat().st_size for p in paths) / len(paths) / 1024, 1)
    return paths, info


def _epoch(loader: Iterable) -> int:
    """Iterate one epoch; return the number of images seen."""
    seen = 0
    for images, _labels in loader:
        seen += int(images.shape[0])
    return seen


def bench_data(s: dict, device: torch.device, scratch: Path, say: Say) -> tuple[dict, dict]:
    from torch.utils.data import DataLoader

    from handclip.data.cache import cached_crops
    from handclip.data.images import ImageDataset, ImageLoader, TensorImageDataset, batch_collate
    from handclip.models.clip import preprocess_config

    n, batch = int(s["images"]), int(s["batch_size"])
    size = (int(s["image_size"][0]), int(s["image_size"][1]))
    workers = cpu_cores() if s.get("num_workers") is None else int(s["num_workers"])
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
        uncached = _timed(lambda: _epoch(uncached_loader), torch.device("cpu"), int(s["repeats"]), int(s["warmup"]))
    memory["uncached"] = mem.result
    del uncached_loader
    gc.collect()

    say(f"  cached: TensorImageDataset, batch {batch}, in-process, {s['warmup']}+{s['cached_repeats']} epochs ...")
    cached_loader = DataLoader(
        TensorImageDataset(crops, labels), batch_size=batch, shuffle=True, num_workers=0, collate_fn=batch_collate
    )
    with PeakMemory(device) as mem:
        cached = _timed(lambda: _epoch(cached_loader), torch.device("cpu"), int(s["cached_repeats"]), int(s["warmup"]))
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
        "cached_speedup": _ratio(cached_ips, uncached_ips),
        "cache_build_s": build_s,
        "cache_build_images_per_s": n / build_s,
        "cache_reopen_s": reopen_s,
        "cache_bytes": int(crops.numel()),
        "crops_match_loader": crops_match,
        "uncached_epoch": _summary(uncached),
        "cached_epoch": _summary(cached),
    }
    return result, memory


# ============================================================================================ train


class _TimedLoader:
    """An iterable over a DataLoader that records how long each ``next()`` takes (loader time)."""

    def __init__(self, loader):
        self.loader = loader
        self.fetch_s: list[float] = []

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        iterator = iter(self.loader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.fetch_s.append(time.perf_counter() - start)
            yield batch


def _step_timer(device: torch.device):
    import pytorch_lightning as pl

    class StepTimer(pl.Callback):
        """Seconds of every training step (on_train_batch_start -> on_train_batch_end) and iteration."""

        def __init__(self):
            self.steps: list[float] = []
            self.iterations: list[float] = []
            self._start: float | None = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            _sync(device)
            now = time.perf_counter()
            if self._start is not None:
                self.iterations.append(now - self._start)
            self._start = now

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            _sync(device)
            self.steps.append(time.perf_counter() - self._start)

    return StepTimer()


def count_gflops_per_image(module, input_size: tuple[int, ...], device: torch.device) -> float:
    """Forward + backward FLOPs of one image through the module (torch.utils.flop_counter), in GFLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    images = torch.randint(0, 256, (1, *input_size), dtype=torch.uint8, device=device)
    labels = torch.zeros(1, dtype=torch.long, device=device)
    with FlopCounterMode(display=False) as counter:
        module.loss_fn(module(images), labels).backward()
    module.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 1e9


def _train_loader(images: torch.Tensor, labels: torch.Tensor, batch: int):
    from torch.utils.data import DataLoader

    from handclip.data.images import TensorImageDataset, batch_collate

    return DataLoader(
        TensorImageDataset(images, labels), batch_size=batch, shuffle=True, num_workers=0, collate_fn=batch_collate
    )


def _bare_loop(module, loader, device: torch.device, total: int) -> list[float]:
    """The training step without Lightning: forward, cross-entropy, backward, AdamW step; seconds per step."""
    optimizer = module.configure_optimizers()  # the module's own AdamW (fused on CUDA)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    )
    module.train()
    times: list[float] = []
    while len(times) < total:
        for images, labels in loader:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            _sync(device)
            start = time.perf_counter()
            with autocast:
                loss = module.loss_fn(module(images), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _sync(device)
            times.append(time.perf_counter() - start)
            if len(times) == total:
                break
    return times


def _lightning_loop(module, loader, device: torch.device, total: int, scratch: Path):
    import pytorch_lightning as pl

    timer = _step_timer(device)
    timed_loader = _TimedLoader(loader)
    trainer = pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=[device.index or 0] if device.type == "cuda" else 1,
        precision="bf16-mixed" if device.type == "cuda" else "32-true",
        max_steps=total,
        max_epochs=-1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        default_root_dir=str(scratch / "lightning"),
    )
    trainer.fit(module, train_dataloaders=timed_loader)
    return timer, timed_loader.fetch_s


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Hide Lightning's banner lines and its advice about DataLoader workers during the benchmark."""
    names = ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    with warnings.catch_warnings():
        for message in ("does not have many workers", "but have no `val_dataloader`", "LeafSpec"):
            warnings.filterwarnings("ignore", message=f".*{re.escape(message)}.*")
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def build_module(model_name: str, num_classes: int, lr: float, weight_decay: float):
    """HandCLIPModule with random weights (no download)."""
    from handclip.models.module import HandCLIPModule

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # open_clip logs every build step, and random weights on purpose, on root
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return HandCLIPModule(
                [f"id{i:04d}" for i in range(num_classes)], hand="bench", model_name=model_name,
                pretrained=None, lr=lr, weight_decay=weight_decay,
            )
    finally:
        root.setLevel(level)


def bench_train(s: dict, device: torch.device, scratch: Path, seed: int, say: Say):
    from handclip.models.clip import preprocess_config

    batch, warmup, steps = int(s["batch_size"]), int(s["warmup_steps"]), int(s["steps"])
    total = warmup + steps
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # as handclip.train does
    torch.manual_seed(seed)
    module = build_module(s["model_name"], int(s["num_classes"]), float(s["lr"]), float(s["weight_decay"]))
    input_size = tuple(int(v) for v in preprocess_config(s["model_name"], None).input_size)
    module.to(device)
    counted = count_gflops_per_image(module, input_size, device)
    gflops = float(s["gflops_per_image"]) if s.get("gflops_per_image") is not None else counted

    generator = torch.Generator().manual_seed(seed)
    pool = batch * min(total, 4)  # in memory, cycled: data time is not part of the step
    images = torch.randint(0, 256, (pool, *input_size), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, int(s["num_classes"]), (pool,), generator=generator)
    precision = "bf16-mixed" if device.type == "cuda" else "32-true"
    memory: dict[str, dict] = {}

    # The bare loop runs in two halves, before and after the Lightning run (each with its own warm-up
    # and optimizer), so that neither side gains from running second (allocator, caches, clocks).
    first_half = (steps + 1) // 2
    say(f"  bare PyTorch loop (first half): {s['model_name']}, batch {batch}, {precision}, "
        f"{warmup}+{first_half} steps ...")
    with PeakMemory(device) as mem:
        bare_before = _bare_loop(module, _train_loader(images, labels, batch), device, warmup + first_half)[warmup:]
    memory["bare_loop"] = mem.result
    module.zero_grad(set_to_none=True)

    say(f"  Lightning Trainer + HandCLIPModule: same batch and precision, {warmup}+{steps} steps ...")
    with PeakMemory(device) as mem, _quiet_lightning():
        timer, fetch = _lightning_loop(module, _train_loader(images, labels, batch), device, total, scratch)
    memory["lightning"] = mem.result
    module.zero_grad(set_to_none=True)

    say(f"  bare PyTorch loop (second half): {warmup}+{steps - first_half} steps ...")
    module.to(device)  # Lightning's teardown moves the module back to the CPU
    with PeakMemory(device) as mem:
        bare_after = _bare_loop(module, _train_loader(images, labels, batch), device, total - first_half)[warmup:]
    memory["bare_loop"] = _larger(memory["bare_loop"], mem.result)
    bare = bare_before + bare_after
    steps_s = timer.steps[warmup:]
    iterations_s = timer.iterations[warmup:] or timer.steps[warmup:]
    fetch_s = fetch[warmup:] or fetch

    ips = batch / statistics.median(steps_s)
    bare_ips = batch / statistics.median(bare)
    ips_e2e = batch / statistics.median(iterations_s)
    result = {
        "model_name": s["model_name"],
        "input_size": list(input_size),
        "batch_size": batch,
        "precision": precision,
        "warmup_steps": warmup,
        "steps": steps,
        "images_per_s": ips,
        "bare_images_per_s": bare_ips,
        "vs_bare_loop": _ratio(ips, bare_ips),
        "gflops_per_image": gflops,
        "gflops_per_image_counted": counted,
        "tflops": ips * gflops / 1e3,
        "bare_tflops": bare_ips * gflops / 1e3,
        # Whole Lightning iterations (loader, transfer and loop bookkeeping included)
        "images_per_s_end_to_end": ips_e2e,
        "vs_bare_loop_end_to_end": _ratio(ips_e2e, bare_ips),
        # Share of an iteration spent fetching the batch from the (in-memory) loader
        "data_fraction": min(1.0, statistics.median(fetch_s) / statistics.median(iterations_s)),
        "loader_s_per_batch": statistics.median(fetch_s),
        "lightning_step": _summary(steps_s),
        "bare_step": _summary(bare),
        "bare_step_before_lightning_median_s": statistics.median(bare_before),
        "bare_step_after_lightning_median_s": statistics.median(bare_after) if bare_after else None,
    }
    return result, memory, module


# ============================================================================================ eval


def _embed_bench(module, s: dict, device: torch.device, seed: int, say: Say) -> tuple[dict, dict]:
    from torch.utils.data import DataLoader

    from handclip.data.images import TensorImageDataset, batch_collate
    from handclip.evaluation.embed import embed_loader
    from handclip.models.clip import preprocess_config

    n, batch = int(s["embed_images"]), int(s["embed_batch_size"])
    input_size = tuple(int(v) for v in preprocess_config(module.hparams.model_name, None).input_size)
    generator = torch.Generator().manual_seed(seed + 1)
    images = torch.randint(0, 256, (n, *input_size), dtype=torch.uint8, generator=generator)
    dataset = TensorImageDataset(images, list(range(n)))

    def loader(count: int):
        part = dataset if count >= n else TensorImageDataset(images[:count], list(range(count)))
        return DataLoader(part, batch_size=batch, shuffle=False, num_workers=0, collate_fn=batch_collate)

    say(f"  embedding: {module.hparams.model_name}, {n} images, batch {batch}, {s['embed_repeats']} passes ...")
    embed_loader(module, loader(min(batch, n)), device, progress=False)  # warm-up: one batch
    with PeakMemory(device) as mem:
        times = _timed(lambda: embed_loader(module, loader(n), device, progress=False), device, int(s["embed_repeats"]))
    return {
        "model_name": module.hparams.model_name,
        "images": n,
        "batch_size": batch,
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "images_per_s": n / statistics.median(times),
        "pass": _summary(times),
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


def _metrics_bench(s: dict, device: torch.device, seed: int, say: Say) -> tuple[dict, dict]:
    from handclip.evaluation.metrics import argsort_reference_metrics, compute_reid_metrics, similarity_only

    sizes = [int(v) for v in s["sizes"]]
    argsort_sizes = {int(v) for v in s.get("argsort_sizes") or []}
    repeats, dim, per_id = int(s["repeats"]), int(s["dim"]), int(s["gallery_per_identity"])
    out: dict[str, dict] = {}
    memory: dict[str, dict] = {}
    warmed = False
    for n in sizes:
        label = size_label(n)
        q, ql, g, gl, identities = reid_inputs(n, dim, per_id, device, seed + n)
        if not warmed:  # first call of each function: thread pools, allocator
            similarity_only(q, g)
            compute_reid_metrics(q, ql, g, gl)
            argsort_reference_metrics(q[:64], ql[:64], g, gl)
            warmed = True
        say(f"  metrics {label} x {label} ({identities} identities): similarity product, compute_reid_metrics"
            + (", argsort reference" if n in argsort_sizes else "") + f", {repeats} repeats each ...")
        entry: dict[str, Any] = {"queries": n, "gallery": n, "identities": identities, "dim": dim}
        with PeakMemory(device) as mem:
            sim = _timed(lambda: similarity_only(q, g), device, repeats)
        entry["similarity"], entry["similarity_memory"] = _summary(sim), mem.result
        result: dict = {}
        with PeakMemory(device) as mem:
            met = _timed(lambda: result.update(compute_reid_metrics(q, ql, g, gl)), device, repeats)
        entry["metrics"], entry["metrics_memory"] = _summary(met), mem.result
        entry["rank1"], entry["mAP"] = result["rank1"], result["mAP"]
        entry["metrics_vs_matmul"] = _ratio(statistics.median(met), statistics.median(sim))
        if n in argsort_sizes:
            reference: dict = {}
            with PeakMemory(device) as mem:
                ref = _timed(lambda: reference.update(argsort_reference_metrics(q, ql, g, gl)), device, repeats)
            entry["argsort"], entry["argsort_memory"] = _summary(ref), mem.result
            entry["speedup_vs_argsort"] = _ratio(statistics.median(ref), statistics.median(met))
            entry["agrees_with_argsort"] = _agree(result, reference)
        entry["full_similarity_matrix_mb"] = round(n * n * 4 / _MB, 1)
        out[label] = entry
        memory[f"metrics_{label}"] = entry["metrics_memory"]
        del q, ql, g, gl
        gc.collect()
    return out, memory


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


# ============================================================================================ report


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


def result_path(out_dir: Path, slug: str, quick: bool) -> Path:
    """``<slug>.json`` for a full run, ``<slug>-quick.json`` for a quick one (never the full file)."""
    return Path(out_dir) / f"{slug}{'-quick' if quick else ''}.json"


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, allow_nan=True) + "\n")
    os.replace(tmp, path)


# ============================================================================================ entry


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
    out_path = result_path(Path(s["out_dir"]).expanduser(), slug, quick)
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    cores = cpu_cores()

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
    _write_json(out_path, result)
    result["path"] = str(out_path)
    say("")
    say(format_table(result))
    say(f"\nwritten: {out_path}  ({result['total_s']:.0f} s)")
    return result


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="bench")
@exit_on_error
def main(cfg: DictConfig) -> None:
    run_benchmark(cfg)


if __name__ == "__main__":
    main()
