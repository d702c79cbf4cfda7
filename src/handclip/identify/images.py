"""Decode and embed arbitrary image files, skipping (and naming) the ones that cannot be read."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from handclip.data.datasets import UnreadableTolerantDataset, collate_readable
from handclip.data.images import ImageLoader
from handclip.evaluation.embed import as_embedder, embed_batches
from handclip.utils.devices import usable_cpus

log = logging.getLogger(__name__)


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


def default_workers(num_files: int, batch_size: int, device: torch.device, decode: str = "full") -> int:
    """Decoding processes: none for a few files (starting them costs more) or for draft decoding on the CPU (cheap
    decoding beside a forward pass that uses every core: 2 processes made identify 15 % slower on 2 cores), else the
    usable cores (at most 4; with full decoding on the CPU they made it 25 % faster on 2 cores)."""
    few = num_files < 2 * batch_size
    return 0 if few or (device.type == "cpu" and decode == "draft") else min(4, usable_cpus())


def embed_files(model, paths: list[Path], device: torch.device, batch_size: int = 64,
                num_workers: int | None = None, progress: bool = True, desc: str = "embedding",
                decode: str = "full") -> Embedded:
    """Embed ``paths`` with ``model`` (an encoder: open_clip's preprocessing, bf16 autocast on CUDA as in ``eval``;
    or an inference backend) through the one embedding loop, :func:`handclip.evaluation.embed.embed_batches`.
    ``decode``: ``full`` or ``draft`` (JPEGs at a reduced scale, :class:`~handclip.data.images.ImageLoader`)."""
    embedder = as_embedder(model, device)
    workers = num_workers if num_workers is not None else default_workers(len(paths), batch_size,
                                                                          torch.device(device), decode)
    loader = DataLoader(UnreadableTolerantDataset(list(paths), ImageLoader(embedder.preprocess, decode)),
                        batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate_readable)
    rows, failed = [], []

    def crops():
        with tqdm(total=len(paths), desc=desc, disable=not progress, unit="img", leave=False) as bar:
            for index, images, bad in loader:
                failed.extend(bad)
                bar.update(len(index) + len(bad))
                if images is not None:
                    rows.extend(index)
                    yield images

    chunks = [F.normalize(out, dim=1).cpu() for out in embed_batches(embedder, crops(), device, check_finite=True)]
    embeddings = torch.cat(chunks) if chunks else torch.empty((0, embedder.output_dim), dtype=torch.float32)
    return Embedded(embeddings=embeddings, rows=rows, failed=failed)


def report_failures(failed: list[tuple[Path, str]], what: str, limit: int = 10) -> None:
    """One warning naming the unreadable files (the first ``limit``) and counting them."""
    if not failed:
        return
    names = "; ".join(reason for _, reason in failed[:limit])
    more = f" (and {len(failed) - limit} more)" if len(failed) > limit else ""
    log.warning("%d %s file(s) could not be read and were left out: %s%s", len(failed), what, names, more)
