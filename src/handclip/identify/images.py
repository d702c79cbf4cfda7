"""Decode and embed arbitrary image files, skipping (and naming) the ones that cannot be read."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from handclip.data.images import ImageLoader
from handclip.errors import HandCLIPError
from handclip.models.encoder import ImageEncoder
from handclip.utils.devices import usable_cpus

log = logging.getLogger(__name__)


class _Files(Dataset):
    """``(index, uint8 crop or None, error or None)`` for each file: a bad file does not stop the batch."""

    def __init__(self, paths: list[Path], loader: ImageLoader):
        self.paths, self.loader = paths, loader

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, self.loader(self.paths[i]), None
        except HandCLIPError as err:
            return i, None, str(err)


def _collate(batch):
    good = [(i, crop) for i, crop, _ in batch if crop is not None]
    bad = [(i, err) for i, crop, err in batch if crop is None]
    return [i for i, _ in good], (torch.stack([c for _, c in good]) if good else None), bad


@dataclass
class Embedded:
    """L2-normalised float32 embeddings of the readable files, which files they are, and the failures."""

    embeddings: torch.Tensor
    rows: list[int]
    """Index (into the input paths) of each embedding row."""
    failed: list[tuple[int, str]] = field(default_factory=list)
    """(index, reason) of every file that could not be decoded."""

    @property
    def decoded(self) -> int:
        return len(self.rows) + len(self.failed)


def default_workers(num_files: int, batch_size: int) -> int:
    """Decoding processes: none for a few files (starting them costs more), else the usable cores (at most 4)."""
    return 0 if num_files < 2 * batch_size else min(4, usable_cpus())


@torch.inference_mode()
def embed_files(encoder: ImageEncoder, paths: list[Path], device: torch.device, batch_size: int = 64,
                num_workers: int | None = None, progress: bool = True, desc: str = "embedding") -> Embedded:
    """Embed ``paths`` with ``encoder`` (open_clip's preprocessing, bf16 autocast on CUDA as in ``eval``)."""
    encoder = encoder.to(device).eval()
    workers = default_workers(len(paths), batch_size) if num_workers is None else num_workers
    loader = DataLoader(_Files(list(paths), ImageLoader(encoder.preprocess)), batch_size=batch_size, shuffle=False,
                        num_workers=workers, collate_fn=_collate)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    chunks, rows, failed = [], [], []
    with autocast, tqdm(total=len(paths), desc=desc, disable=not progress, unit="img", leave=False) as bar:
        for index, crops, bad in loader:
            failed += bad
            if crops is not None:
                out = encoder.embed(crops.to(device, non_blocking=True)).float()
                if not bool(torch.isfinite(out).all()):
                    raise HandCLIPError("the model produced NaN or infinite embeddings; the checkpoint is "
                                        "probably diverged")
                chunks.append(F.normalize(out, dim=1).cpu())
                rows += index
            bar.update(len(index) + len(bad))
    dim = encoder.output_dim
    embeddings = torch.cat(chunks) if chunks else torch.empty((0, dim), dtype=torch.float32)
    return Embedded(embeddings=embeddings, rows=rows, failed=failed)


def report_failures(failed: list[tuple[Path, str]], what: str, limit: int = 10) -> None:
    """One warning naming the unreadable files (the first ``limit``) and counting them."""
    if not failed:
        return
    names = "; ".join(reason for _, reason in failed[:limit])
    more = f" (and {len(failed) - limit} more)" if len(failed) > limit else ""
    log.warning("%d %s file(s) could not be read and were left out: %s%s", len(failed), what, names, more)
