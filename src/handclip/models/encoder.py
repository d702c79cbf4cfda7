"""An open_clip image tower with the preprocessing it expects: ``embed(uint8 crops) -> embeddings``.

As in open_clip, preprocessing is carried by the model: the encoder holds its ``PreprocessCfg`` (resize,
crop, mean, std), data loading receives the geometric part of it, and the encoder applies the arithmetic
part (:class:`Normalizer`) on its own device. Evaluation scores any object with ``embed``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from open_clip.transform import PreprocessCfg
from torch import nn

from handclip.models.clip import create_clip, preprocess_config


class Normalizer(nn.Module):
    """uint8 (or float in [0, 255]) batches -> open_clip's normalised float batches, on any device."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            images = images.to(torch.float32).div(255)
        # Same operations, in the same order, as ToTensor + torchvision's Normalize: bit-identical.
        return images.sub(self.mean).div(self.std)


class ImageEncoder(nn.Module):
    """An image tower and its preprocessing. ``embed`` takes uint8 crops (``N x 3 x H x W``)."""

    def __init__(self, visual: nn.Module, preprocess: PreprocessCfg):
        super().__init__()
        self.visual = visual
        self.preprocess = preprocess
        self.normalize = Normalizer(preprocess.mean, preprocess.std)

    @property
    def output_dim(self) -> int:
        """Width of the image embedding (512 for ViT-B/32)."""
        if getattr(self.visual, "output_dim", None):
            return int(self.visual.output_dim)
        return int(self.visual.proj.shape[1])

    def compile_tower(self, **options) -> None:
        """``torch.compile`` the image tower in place (state-dict keys stay open_clip's). The batch dimension is
        marked dynamic from the first call, so that one graph serves the full batches and the short last batch of
        an epoch (otherwise a second compile per process). ``options`` go to ``torch.compile`` (e.g. backend)."""
        self.visual.compile(**options)
        self._dynamic_batch = True

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Image-tower embeddings (not normalised) of a batch of uint8 crops."""
        images = self.normalize(images)
        if getattr(self, "_dynamic_batch", False):
            torch._dynamo.maybe_mark_dynamic(images, 0)
        return self.visual(images)

    forward = embed


def zero_shot_encoder(model_name: str, pretrained: str | None, cache_dir: str | None = None) -> ImageEncoder:
    """The image tower of a (pretrained) open_clip model, untouched by HandCLIP; the text tower is dropped."""
    clip = create_clip(model_name, pretrained, cache_dir)
    return ImageEncoder(clip.visual, preprocess_config(model_name, pretrained)).eval()
