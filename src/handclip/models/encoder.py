"""An open_clip image tower with the preprocessing it expects: ``embed(uint8 crops) -> embeddings``.

As in open_clip, preprocessing is carried by the model: the encoder holds its ``PreprocessCfg`` (resize,
crop, mean, std), data loading receives the geometric part of it, and the encoder applies the arithmetic
part (:class:`Normalizer`) on its own device. Evaluation scores any object with ``embed``.

``embed`` is the *test-time* embedding, the one every path uses (eval, calibration, identify, every export):
the tower's output, optionally averaged with that of the mirrored photo (``tta="flip"``) and optionally taken
after the BNNeck (``feature="after"``). Training uses :meth:`ImageEncoder.features` (the tower alone).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from open_clip.transform import PreprocessCfg
from torch import nn
from torch.nn import functional as F

from handclip.errors import HandCLIPError
from handclip.models.clip import load_image_tower, preprocess_config


def pixels_to_unit(images: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """uint8 pixels, or float pixels in ``[0, scale]`` -> float32 in ``[0, 1]``, as open_clip's ``ToTensor`` gives.

    A float tensor's range cannot be guessed (``[0, 1]``, ``[0, 255]``, or open_clip's ``preprocess()`` output, which
    is already normalised): float input needs its ``scale`` (1.0 or 255.0), and values outside ``[0, scale]`` are
    refused, so that normalised tensors are never normalised a second time.
    """
    if images.dtype == torch.uint8:
        if scale not in (None, 255, 255.0):
            raise HandCLIPError(f"uint8 images are pixel values in [0, 255]; scale={scale!r} does not apply to them")
        return images.to(torch.float32).div(255)
    if not images.is_floating_point():
        raise HandCLIPError(f"images must be uint8 or float tensors, got {images.dtype}")
    if scale is None:
        raise HandCLIPError("float images need their range: embed(images, scale=1.0) for values in [0, 1], "
                            "scale=255.0 for [0, 255] (uint8 tensors, PIL images and files need none; open_clip's "
                            "preprocess() output is already normalised: use embed_normalized)")
    scale = float(scale)
    if not scale > 0:
        raise HandCLIPError(f"scale must be a positive number (the largest pixel value), got {scale!r}")
    lo, hi = (float(v) for v in torch.aminmax(images.detach()))
    if lo < 0 or hi > scale * (1 + 1e-6):
        raise HandCLIPError(f"float images with scale={scale:g} must lie in [0, {scale:g}], these span "
                            f"[{lo:.3g}, {hi:.3g}]; open_clip's preprocess() output is already normalised: use "
                            "embed_normalized")
    images = images.to(torch.float32)
    return images if scale == 1.0 else images.div(scale)

#: Test-time augmentation of ``embed``: none, or the mean of a photo's and its mirror's embeddings.
TTA_MODES = ("none", "flip")
#: Which feature ``embed`` returns when the encoder has a BNNeck: before BN (CLIP-ReID, the default) or after.
NECK_FEATURES = ("before", "after")


def check_choice(setting: str, value, choices: tuple[str, ...]) -> str:
    """``value`` when it is one of ``choices``, else an error naming the setting."""
    if value not in choices:
        raise HandCLIPError(f"{setting} must be one of {', '.join(choices)}, got {value!r}")
    return str(value)


class Normalizer(nn.Module):
    """uint8 batches (or float ones with their ``scale``) -> open_clip's normalised float batches, on any device."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        images = pixels_to_unit(images, scale)
        # Same operations, in the same order, as ToTensor + torchvision's Normalize: bit-identical.
        return images.sub(self.mean).div(self.std)


class BNNeck(nn.BatchNorm1d):
    """The bag-of-tricks BNNeck: BatchNorm between the embedding and the classifier, its shift frozen at 0 (as in
    BoT and CLIP-ReID). A training batch of one image (the short last batch of an epoch) is normalised with the
    running statistics instead of failing."""

    def __init__(self, width: int):
        super().__init__(width)
        self.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


class ImageEncoder(nn.Module):
    """An image tower and its preprocessing. ``embed`` takes uint8 crops (``N x 3 x H x W``).

    ``neck``: a :class:`BNNeck` (or None), ``feature``: which feature ``embed`` returns with a neck (before or
    after it), ``tta``: "flip" averages the embeddings of each photo and its mirror image.
    """

    def __init__(self, visual: nn.Module, preprocess: PreprocessCfg, neck: nn.Module | None = None,
                 feature: str = "before", tta: str = "none"):
        super().__init__()
        self.visual = visual
        self.preprocess = preprocess
        self.normalize = Normalizer(preprocess.mean, preprocess.std)
        self.neck = neck
        self.feature = check_choice("model.neck_feature", feature, NECK_FEATURES)
        self.tta = check_choice("eval.tta", tta, TTA_MODES)

    def embedding_settings(self) -> dict[str, str]:
        """What decides ``embed`` besides the weights, where it differs from the plain tower output (empty for
        the default encoder): ``{"tta": "flip"}``, ``{"feature": "after"}``."""
        settings = {}
        if self.tta != "none":
            settings["tta"] = self.tta
        if self.neck is not None and self.feature != "before":
            settings["feature"] = self.feature
        return settings

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

    def features(self, images: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        """Image-tower outputs (not normalised) of a batch of uint8 crops (float crops: in ``[0, scale]``): what
        training uses."""
        return self.features_normalized(self.normalize(images, scale))

    def features_normalized(self, images: torch.Tensor) -> torch.Tensor:
        """Image-tower outputs of crops normalised by the model's mean and std (open_clip's ``preprocess()``)."""
        if getattr(self, "_dynamic_batch", False):
            torch._dynamo.maybe_mark_dynamic(images, 0)
        return self.visual(images)

    def embed(self, images: torch.Tensor, scale: float | None = None, features: torch.Tensor | None = None
              ) -> torch.Tensor:
        """Test-time embeddings (not L2-normalised) of a batch of uint8 crops (float crops: in ``[0, scale]``): the
        tower's output, averaged with that of the mirrored crops when ``tta="flip"``, after the BNNeck when
        ``feature="after"``. ``features``: the tower's output for ``images`` when already computed. Without neck
        and TTA, exactly :meth:`features`."""
        return self._test_time(self.normalize(images, scale), features)

    def embed_normalized(self, images: torch.Tensor) -> torch.Tensor:
        """:meth:`embed` of crops already normalised by the model's mean and std (open_clip's ``preprocess()``)."""
        return self._test_time(images, None)

    def _test_time(self, normalized: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        if features is None:
            features = self.features_normalized(normalized)
        if self.tta == "flip":
            features = (features + self.features_normalized(normalized.flip(-1))) / 2
        if self.neck is not None and self.feature == "after":
            features = self.neck(features)
        return features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(images)


def zero_shot_encoder(model_name: str, pretrained: str | None, cache_dir: str | None = None,
                      tta: str | None = None) -> ImageEncoder:
    """The image tower of a (pretrained) open_clip model, untouched by HandCLIP; the text tower is never built.
    ``tta``: test-time augmentation (None: none)."""
    tower = load_image_tower(model_name, pretrained, cache_dir)
    return ImageEncoder(tower, preprocess_config(model_name, pretrained), tta=tta or "none").eval()
