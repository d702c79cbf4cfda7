"""A bare image encoder (open_clip image tower + normalisation) for zero-shot CLIP embeddings."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from handclip.data.images import Normalizer
from handclip.models.clip import create_clip, preprocess_config


class ImageEncoder(nn.Module):
    """``embed(uint8 crops) -> image-tower embeddings``, the interface evaluation uses."""

    def __init__(self, visual: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.visual = visual
        self.normalize = Normalizer(mean, std)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(self.normalize(images))


def zero_shot_encoder(model_name: str, pretrained: str | None, cache_dir: str | None = None) -> ImageEncoder:
    """The image tower of a (pretrained) open_clip model, untouched by HandCLIP."""
    clip = create_clip(model_name, pretrained, cache_dir)
    cfg = preprocess_config(model_name, pretrained)
    return ImageEncoder(clip.visual, cfg.mean, cfg.std).eval()
