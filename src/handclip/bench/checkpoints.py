"""Checkpoint cost: bytes per write, seconds per write (sync and in the background), disk per hand type, and the
share of a default-recipe run on 11k-sized synthetic data spent writing checkpoints.

* Writes: a HandCLIPModule with random weights and AdamW state (one optimizer step taken) writes ``best.ckpt``
  (weights only) and ``last.ckpt`` (weights, optimizer, loop and RNG state) from inside ``trainer.fit``, through
  :class:`AtomicCheckpointIO` on the training thread (``sync``), :class:`BackgroundCheckpointIO` (``background``:
  ``blocking_s`` is what the training thread waits, ``done_s`` until the file is in place), and as 0.2.0 did
  (``lightning_default``: Lightning's ``TorchCheckpointIO``, best.ckpt in full). Seconds include Lightning's
  ``dump_checkpoint``.
* Run: ``trainer.fit`` of the default recipe (batch 64, validation with val/rank1 every epoch, best.ckpt and
  last.ckpt callbacks as in configs/callbacks/default.yaml) on in-memory random crops of the size of one 11k hand
  type. ``share`` = seconds the training thread spent in checkpoint writes (and waiting for the last one at the end)
  / the run's wall time. ``projected`` extends the measured epoch and write times to the recipe's 50 epochs with
  best.ckpt written after every epoch (the worst case) and last.ckpt every ``every_minutes`` and at the end.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader

from handclip.bench.measure import PeakMemory, ratio
from handclip.bench.train import _quiet_lightning, build_module
from handclip.data.datasets import TensorImageDataset, batch_collate
from handclip.training.callbacks import BestCheckpoint, LastCheckpoint
from handclip.training.checkpoint_io import AtomicCheckpointIO, BackgroundCheckpointIO

Say = Callable[[str], None]


def _loaders(images: torch.Tensor, labels: torch.Tensor, num_classes: int, batch: int, eval_batch: int):
    """Shuffled training batches, and the two validation loaders of HandDataModule: one image per identity
    (the first of each), and the training images as the val/rank1 gallery."""
    val_index = torch.stack([torch.nonzero(labels == c)[0, 0] for c in range(num_classes)])
    train_set = TensorImageDataset(images, labels.tolist())
    val_set = TensorImageDataset(images[val_index], labels[val_index].tolist())

    def loader(dataset, size, shuffle):
        return DataLoader(dataset, batch_size=size, shuffle=shuffle, num_workers=0, collate_fn=batch_collate)

    return loader(train_set, batch, True), [loader(val_set, eval_batch, False), loader(train_set, eval_batch, False)]


def _trainer(device: torch.device, scratch: Path, **kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu",
                      devices=[device.index or 0] if device.type == "cuda" else 1,
                      precision="bf16-mixed" if device.type == "cuda" else "32-true", logger=False,
                      num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=str(scratch / "lightning"), **kwargs)


class _WriteTimer(pl.Callback):
    """At the end of training (optimizer state present, tensors still on the device), time writes through each
    checkpoint IO."""

    def __init__(self, folder: Path, repeats: int):
        self.folder, self.repeats = folder, repeats
        self.result: dict[str, dict] = {}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        writers = {"lightning_default": TorchCheckpointIO(), "sync": AtomicCheckpointIO(),
                   "background": BackgroundCheckpointIO(AtomicCheckpointIO())}
        original = trainer.strategy.checkpoint_io
        try:
            for name, io in writers.items():
                trainer.strategy.checkpoint_io = io
                self.result[name] = {kind: self._time(trainer, io, kind) for kind in ("best", "last")}
                io.teardown()
        finally:
            trainer.strategy.checkpoint_io = original

    def _time(self, trainer: pl.Trainer, io, kind: str) -> dict:
        path = self.folder / f"{kind}.ckpt"
        blocking, done = [], []
        # 0.2.0 (Lightning's default writer) wrote best.ckpt in full, like last.ckpt
        weights_only = kind == "best" and type(io) is not TorchCheckpointIO
        for _ in range(self.repeats):
            path.unlink(missing_ok=True)
            start = time.perf_counter()
            trainer.save_checkpoint(path, weights_only=weights_only)
            blocking.append(time.perf_counter() - start)
            if isinstance(io, BackgroundCheckpointIO):
                io.wait()
                done.append(time.perf_counter() - start)
            else:
                done.append(blocking[-1])
        return {"bytes": path.stat().st_size, "blocking_s": statistics.median(blocking),
                "done_s": statistics.median(done), "blocking_times_s": blocking, "done_times_s": done}


def _text_tower_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for n, t in module.clip.state_dict().items() if not n.startswith("visual."))


def _bench_writes(s: dict, device: torch.device, scratch: Path, seed: int, say: Say) -> dict:
    classes, repeats = int(s["num_classes"]), int(s["repeats"])
    torch.manual_seed(seed)
    module = build_module(s["model_name"], classes, 1e-5, 0.01)
    size = tuple(int(v) for v in module.encoder.preprocess.input_size)
    images = torch.randint(0, 256, (classes, *size), dtype=torch.uint8)
    train_loader, _ = _loaders(images, torch.arange(classes), classes, 8, 8)
    timer = _WriteTimer(scratch / "checkpoint-writes", repeats)
    say(f"  writes: {s['model_name']} ({classes} classes), best.ckpt and last.ckpt x {repeats}, "
        "through Lightning's default writer, sync and background ...")
    with _quiet_lightning():
        _trainer(device, scratch, max_steps=1, limit_val_batches=0, enable_checkpointing=False,
                 callbacks=[timer]).fit(module, train_dataloaders=train_loader)
    writes = timer.result
    best, last = writes["sync"]["best"]["bytes"], writes["sync"]["last"]["bytes"]
    text = _text_tower_bytes(module)
    gb = 1e9
    return {
        "model_name": s["model_name"], "num_classes": classes, "repeats": repeats, "writes": writes,
        "best_mb": best / 1e6, "last_mb": last / 1e6, "text_tower_mb": text / 1e6,
        # at rest: best + last; while last.ckpt is replaced, its new copy sits beside the old one
        "disk_per_hand_gb": (best + last) / gb, "peak_disk_per_hand_gb": (best + 2 * last) / gb,
        "disk_four_hands_gb": 4 * (best + last) / gb, "peak_disk_four_hands_gb": (4 * (best + last) + last) / gb,
        # before: 0.2.0 wrote both files in full (Lightning's default), 0.1.0 also with the text tower
        "disk_per_hand_gb_0_2_0": 2 * writes["lightning_default"]["last"]["bytes"] / gb,
        "disk_per_hand_gb_0_1_0": 2 * (writes["lightning_default"]["last"]["bytes"] + text) / gb,
    }


def _timed_writes(trainer: pl.Trainer) -> dict[str, list[float]]:
    """Seconds the training thread spends in each checkpoint write, by file (best, last): both callbacks write
    through the trainer's public save_checkpoint."""
    seconds: dict[str, list[float]] = {"best": [], "last": []}
    save = trainer.save_checkpoint

    def timed(filepath, *args, **kwargs):
        start = time.perf_counter()
        save(filepath, *args, **kwargs)
        seconds[Path(filepath).stem].append(time.perf_counter() - start)

    trainer.save_checkpoint = timed
    return seconds


class _TimedBackground(BackgroundCheckpointIO):
    teardown_s = 0.0

    def teardown(self) -> None:
        start = time.perf_counter()
        super().teardown()
        self.teardown_s += time.perf_counter() - start


def _bench_run(s: dict, r: dict, mode: str, device: torch.device, scratch: Path, seed: int, say: Say) -> dict:
    classes, n = int(s["num_classes"]), int(r["train_images"])
    torch.manual_seed(seed)
    module = build_module(s["model_name"], classes, 1e-5, 0.01)
    size = tuple(int(v) for v in module.encoder.preprocess.input_size)
    images = torch.randint(0, 256, (n, *size), dtype=torch.uint8)
    labels = torch.arange(n) % classes
    train_loader, val_loaders = _loaders(images, labels, classes, int(r["batch_size"]), int(r["eval_batch_size"]))
    folder = scratch / f"checkpoint-run-{mode}"
    for old in folder.glob("*.ckpt"):
        old.unlink()
    best = BestCheckpoint(dirpath=str(folder), filename="best", monitor="val/rank1", mode="max", save_top_k=1,
                          save_weights_only=True, every_n_epochs=1, auto_insert_metric_name=False,
                          enable_version_counter=False)
    last = LastCheckpoint(dirpath=str(folder), every_minutes=float(r["every_minutes"]))
    io = _TimedBackground(AtomicCheckpointIO()) if mode == "background" else AtomicCheckpointIO()
    epochs = int(r["epochs"])
    say(f"  run ({mode}): {epochs} epochs of {n} images ({classes} identities), batch {r['batch_size']} ...")
    with _quiet_lightning():
        trainer = _trainer(device, scratch, max_epochs=epochs, callbacks=[best, last], plugins=[io])
        seconds = _timed_writes(trainer)
        start = time.perf_counter()
        trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loaders)
        wall = time.perf_counter() - start
    at_end = getattr(io, "teardown_s", 0.0)
    writing = sum(seconds["best"]) + sum(seconds["last"]) + at_end
    return {"mode": mode, "epochs": epochs, "wall_s": wall, "writing_s": writing, "share": writing / wall,
            "best_writes": len(seconds["best"]), "last_writes": len(seconds["last"]), "best_s": seconds["best"],
            "last_s": seconds["last"], "wait_at_end_s": at_end, "epoch_s": (wall - writing) / epochs}


def _projected(epoch_s: float, best_s: float, last_s: float, epochs: int, every_minutes: float | None) -> dict:
    """A whole run of the recipe: best.ckpt after every epoch (the worst case), last.ckpt when due and at the end
    (``every_minutes=None``: after every epoch, as 0.2.0 did)."""
    train_s = epochs * epoch_s
    if every_minutes is None:
        last_writes = epochs
    else:
        last_writes = min(epochs, math.floor(train_s / (60 * every_minutes)) + 1) if every_minutes > 0 else epochs
    writing = epochs * best_s + last_writes * last_s
    return {"epochs": epochs, "epoch_s": epoch_s, "best_writes": epochs, "last_writes": last_writes,
            "writing_s": writing, "share": writing / (train_s + writing)}


def bench_checkpoints(s: dict, device: torch.device, scratch: Path, seed: int, say: Say) -> tuple[dict, dict]:
    r = s["run"]
    memory: dict[str, dict] = {}
    with PeakMemory(device) as mem:
        result = _bench_writes(s, device, scratch, seed, say)
    memory["writes"] = mem.result
    runs = {}
    for mode in r["modes"]:
        with PeakMemory(device) as mem:
            runs[mode] = _bench_run(s, r, mode, device, scratch, seed, say)
        memory[f"run_{mode}"] = mem.result
    result["run"] = {"train_images": int(r["train_images"]), "batch_size": int(r["batch_size"]),
                     "every_minutes": float(r["every_minutes"]), **runs}
    measured = next(iter(runs.values()))
    writes = result["writes"]
    epochs, minutes, full = int(r["recipe_epochs"]), float(r["every_minutes"]), writes["lightning_default"]["last"]
    result["projected"] = {
        # 0.2.0: Lightning's writer, a full best.ckpt and a last.ckpt after every epoch
        "0.2.0": _projected(measured["epoch_s"], full["blocking_s"], full["blocking_s"], epochs, None),
        **{mode: _projected(measured["epoch_s"], writes[mode]["best"]["blocking_s"],
                            writes[mode]["last"]["blocking_s"], epochs, minutes) for mode in ("sync", "background")},
    }
    result["run_share"] = measured["share"]
    result["projected_share"] = result["projected"]["background"]["share"]
    result["background_vs_sync_blocking"] = ratio(writes["sync"]["last"]["blocking_s"],
                                                  writes["background"]["last"]["blocking_s"])
    result["size_vs_0_1_0"] = result["disk_per_hand_gb"] / result["disk_per_hand_gb_0_1_0"]
    return result, memory
