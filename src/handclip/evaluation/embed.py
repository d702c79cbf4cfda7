"""The one embedding loop: batches of uint8 crops through an encoder or a backend, to float32 embeddings.

Evaluation and calibration (loaders of the data module), identify and ``export format=embeddings`` (image files,
:mod:`handclip.identify.images`) and the Python API all embed here, so a backend
(:mod:`handclip.models.backends`) plugs in once.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from handclip.errors import HandCLIPError
from handclip.models.backends import Embedder, TorchEmbedder


def as_embedder(model, device: torch.device) -> Embedder:
    """``model`` if it is an :class:`Embedder` already, else PyTorch on ``device`` (bf16 autocast on CUDA)."""
    return model if isinstance(model, Embedder) else TorchEmbedder(model, torch.device(device))


def embed_batches(model, batches: Iterable[torch.Tensor], device: torch.device,
                  check_finite: bool = False) -> list[torch.Tensor]:
    """Float32 embeddings (not normalised, on ``device``) of each uint8 batch; ``check_finite``: stop with one line
    when the model produces NaN or infinite values (a diverged checkpoint)."""
    embedder = as_embedder(model, device)
    chunks = []
    with torch.inference_mode():
        for images in batches:
            out = embedder.embed(images)
            if check_finite and not bool(torch.isfinite(out).all()):
                raise HandCLIPError("the model produced NaN or infinite embeddings; the checkpoint is probably "
                                    "diverged")
            chunks.append(out)
    return chunks


def embed_loader(encoder, loader: DataLoader, device: torch.device, desc: str = "embedding",
                 progress: bool = True) -> torch.Tensor:
    """Float32 embeddings of every image of ``loader``, in loader order (bf16 autocast on CUDA).

    A batch is ``(images, labels)`` or ``(images, labels, indices)`` (validation loaders); only images are used.
    """
    batches = (batch[0] for batch in tqdm(loader, desc=desc, disable=not progress, leave=False))
    return torch.cat(embed_batches(encoder, batches, device))
