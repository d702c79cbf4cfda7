"""One training step of HandCLIPModule under a Lightning Trainer against the same step in a bare PyTorch loop."""

from __future__ import annotations

import contextlib
import logging
import re
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from handclip.bench.measure import PeakMemory, larger, ratio, summary, sync
from handclip.data.datasets import DeviceBatchLoader, TensorImageDataset, batch_collate
from handclip.models.module import HandCLIPModule

Say = Callable[[str], None]


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
    class StepTimer(pl.Callback):
        """Seconds of every training step (on_train_batch_start -> on_train_batch_end) and iteration."""

        def __init__(self):
            self.steps: list[float] = []
            self.iterations: list[float] = []
            self._start: float | None = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            sync(device)
            now = time.perf_counter()
            if self._start is not None:
                self.iterations.append(now - self._start)
            self._start = now

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            sync(device)
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
            sync(device)
            start = time.perf_counter()
            with autocast:
                loss = module.loss_fn(module(images), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync(device)
            times.append(time.perf_counter() - start)
            if len(times) == total:
                break
    return times


def _lightning_loop(module, loader, device: torch.device, total: int, scratch: Path):
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


def build_module(model_name: str, num_classes: int, lr: float, weight_decay: float, compile: bool = False):
    """HandCLIPModule with random weights (no download); ``compile``: as ``model.compile=true``."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # open_clip logs every build step, and random weights on purpose, on root
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return HandCLIPModule(
                [f"id{i:04d}" for i in range(num_classes)], hand="bench", model_name=model_name,
                pretrained=None, lr=lr, weight_decay=weight_decay, compile=compile,
            )
    finally:
        root.setLevel(level)


def bench_train(s: dict, device: torch.device, scratch: Path, seed: int, say: Say):
    batch, warmup, steps = int(s["batch_size"]), int(s["warmup_steps"]), int(s["steps"])
    total = warmup + steps
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # as handclip.train does
    torch.manual_seed(seed)
    module = build_module(s["model_name"], int(s["num_classes"]), float(s["lr"]), float(s["weight_decay"]))
    input_size = tuple(int(v) for v in module.encoder.preprocess.input_size)
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
    memory["bare_loop"] = larger(memory["bare_loop"], mem.result)
    bare = bare_before + bare_after
    bare_ips = batch / statistics.median(bare)
    # images_per_s, vs_bare_loop, *_end_to_end (whole Lightning iterations: loader, transfer and loop bookkeeping
    # included), data_fraction (share of an iteration spent fetching the batch), lightning_step
    figures = _lightning_figures(timer, fetch, warmup, batch, bare_ips)
    ips = figures["images_per_s"]
    result = {
        "model_name": s["model_name"],
        "input_size": list(input_size),
        "batch_size": batch,
        "precision": precision,
        "warmup_steps": warmup,
        "steps": steps,
        **figures,
        "bare_images_per_s": bare_ips,
        "gflops_per_image": gflops,
        "gflops_per_image_counted": counted,
        "tflops": ips * gflops / 1e3,
        "bare_tflops": bare_ips * gflops / 1e3,
        "loader_s_per_batch": statistics.median(fetch[warmup:] or fetch),
        "bare_step": summary(bare),
        "bare_step_before_lightning_median_s": statistics.median(bare_before),
        "bare_step_after_lightning_median_s": statistics.median(bare_after) if bare_after else None,
    }
    if s.get("device_batches"):
        say(f"  Lightning Trainer, batches sliced from crops on {device.type} (data.device_batches): "
            f"{warmup}+{steps} steps ...")
        with PeakMemory(device) as mem, _quiet_lightning():
            loader = DeviceBatchLoader(images.to(device), labels.to(device), batch_size=batch, shuffle=True)
            timer, fetch = _lightning_loop(module, loader, device, total, scratch)
        memory["lightning_device_batches"] = mem.result
        module.zero_grad(set_to_none=True)
        result["device_batches"] = _lightning_figures(timer, fetch, warmup, batch, bare_ips)
    if s.get("compile"):
        result["compiled"], memory["compiled"] = _bench_compiled(s, device, images, labels, scratch, seed, say)
        if "images_per_s" in result["compiled"]:
            result["compiled"]["speedup_vs_eager"] = ratio(result["compiled"]["images_per_s"], ips)
    return result, memory, module


def _lightning_figures(timer, fetch: list[float], warmup: int, batch: int, bare_ips: float) -> dict:
    steps_s = timer.steps[warmup:]
    iterations_s = timer.iterations[warmup:] or steps_s
    fetch_s = fetch[warmup:] or fetch
    ips, ips_e2e = batch / statistics.median(steps_s), batch / statistics.median(iterations_s)
    return {
        "images_per_s": ips,
        "vs_bare_loop": ratio(ips, bare_ips),
        "images_per_s_end_to_end": ips_e2e,
        "vs_bare_loop_end_to_end": ratio(ips_e2e, bare_ips),
        "data_fraction": min(1.0, statistics.median(fetch_s) / statistics.median(iterations_s)),
        "lightning_step": summary(steps_s),
    }


def _bench_compiled(s: dict, device: torch.device, images, labels, scratch: Path, seed: int, say: Say):
    """The same bare loop and Lightning run with the image tower compiled (``model.compile=true``): the time of
    the first steps (compiling) and the step time after it. A failure to compile is recorded, not raised."""
    batch, warmup, steps = int(s["batch_size"]), int(s["warmup_steps"]), int(s["steps"])
    memory: dict[str, dict] = {}
    say(f"  compiled image tower (model.compile=true): bare loop and Lightning, {warmup}+{steps} steps each ...")
    try:
        torch.manual_seed(seed)
        module = build_module(s["model_name"], int(s["num_classes"]), float(s["lr"]), float(s["weight_decay"]),
                              compile=True)
        module.to(device)
        with PeakMemory(device) as mem:
            start = time.perf_counter()
            first = _bare_loop(module, _train_loader(images, labels, batch), device, 1)
            compile_s = time.perf_counter() - start
            bare = _bare_loop(module, _train_loader(images, labels, batch), device, warmup + steps)[warmup:]
        memory["bare_loop"] = mem.result
        module.zero_grad(set_to_none=True)
        with PeakMemory(device) as mem, _quiet_lightning():
            timer, fetch = _lightning_loop(module, _train_loader(images, labels, batch), device, warmup + steps,
                                           scratch)
        memory["lightning"] = mem.result
    except Exception as error:  # noqa: BLE001 - recorded in the result: the eager figures stand on their own
        say(f"  compiling failed: {type(error).__name__}: {error}")
        return {"error": f"{type(error).__name__}: {str(error)[:2000]}"}, memory
    bare_ips = batch / statistics.median(bare)
    figures = _lightning_figures(timer, fetch, warmup, batch, bare_ips)
    # The first step compiles (forward and backward graphs); later steps reuse them, the short last batch too.
    return {"first_step_s": compile_s, "compile_s": max(0.0, first[0] - statistics.median(bare)),
            "bare_images_per_s": bare_ips, "bare_step": summary(bare), **figures}, memory
