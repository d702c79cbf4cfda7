"""Embedding a loader of uint8 crops with any encoder that has ``embed(images)``."""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm


@torch.inference_mode()
def embed_loader(encoder: nn.Module, loader: DataLoader, device: torch.device, desc: str = "embedding",
                 progress: bool = True) -> torch.Tensor:
    """Float32 embeddings of every image of ``loader``, in loader order (bf16 autocast on CUDA).

    A batch is ``(images, labels)`` or ``(images, labels, indices)`` (validation loaders); only images are used.
    """
    encoder = encoder.to(device).eval()
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    )
    chunks = []
    with autocast:
        for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
            images = batch[0].to(device, non_blocking=True)
            chunks.append(encoder.embed(images).float())
    return torch.cat(chunks)
