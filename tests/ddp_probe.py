"""A callback for the DDP tests, added to a training run on the command line as
``+callbacks.probe._target_=ddp_probe.SeenImages +callbacks.probe.out=DIR`` (with tests/ on PYTHONPATH).

Each process writes ``DIR/seen-rank<r>.json``: per epoch, a digest of every training image it was given.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytorch_lightning as pl
import torch


def digest(image: torch.Tensor) -> str:
    """Identifies a uint8 crop by its pixels."""
    return hashlib.sha1(image.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


class SeenImages(pl.Callback):
    def __init__(self, out: str):
        self.out = Path(out)
        self.seen: dict[int, list[str]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.setdefault(trainer.current_epoch, []).extend(digest(image) for image in batch[0])

    def on_train_end(self, trainer, pl_module):
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / f"seen-rank{trainer.global_rank}.json"
        path.write_text(json.dumps({"world_size": trainer.world_size, "epochs": self.seen}))
