"""The Python API: a trained (or zero-shot) model in a notebook or another program.

    import handclip

    model = handclip.load("outputs/train/dorsal_right/checkpoints/best.ckpt")   # backend="onnx-int8", device=...
    vectors = model.embed(["a.jpg", "b.jpg"])          # (2, D) float32, L2-normalised: cosine = dot product
    model.threshold(0.001)                             # the calibrated open-set threshold at FMR 0.1 %
    records = model.identify("photo.jpg", "gallery/")  # the records of results.json, one per query

Everything is built from the same pieces as the command line: the encoder of a checkpoint (image tower only),
the backends of :mod:`handclip.models.backends`, the one embedding loop of :mod:`handclip.evaluation.embed`, and
:func:`handclip.identify.run.identify`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import OmegaConf
from PIL import Image, ImageOps
from torchvision.transforms.functional import pil_to_tensor

from handclip.data.images import ImageLoader, check_decode, geometric_transform, open_clip_transform
from handclip.errors import HandCLIPError
from handclip.evaluation.embed import embed_batches
from handclip.identify.images import embed_files
from handclip.identify.index import ModelInfo
from handclip.identify.run import with_settings
from handclip.models.backends import default_cache_dir, make_embedder
from handclip.models.checkpoint import load_encoder
from handclip.models.clip import uses_pretrained_weights
from handclip.models.encoder import ImageEncoder, pixels_to_unit, zero_shot_encoder
from handclip.models.fingerprint import encoder_fingerprint
from handclip.utils.devices import resolve_device


class HandCLIP:
    """A loaded model: ``embed``, ``preprocess``, ``classes``, ``threshold`` and ``identify``."""

    def __init__(self, encoder: ImageEncoder, meta: dict, key: dict, backend: str, device: str,
                 calibration: str | Path | None, cache_dir: str | Path | None, seed: int, decode: str = "full"):
        self.encoder, self.meta, self.seed, self.decode = encoder, meta, seed, check_decode(decode)
        self.device = resolve_device(device)
        self.fingerprint = encoder_fingerprint(encoder)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.embedder = make_embedder(encoder, backend, self.device, self.fingerprint, self.cache_dir)
        self.model = with_settings(ModelInfo(key=key, fingerprint=self.fingerprint), self.embedder.name, decode)
        self.calibration = calibration
        #: open_clip's evaluation transform for this model (PIL image -> normalised float tensor), as
        #: ``open_clip.create_model_and_transforms`` returns it; feed its output to :meth:`embed_normalized`.
        self.preprocess = open_clip_transform(encoder.preprocess)
        self._geometric = geometric_transform(encoder.preprocess)

    @property
    def backend(self) -> str:
        return self.embedder.name

    @property
    def classes(self) -> list[str]:
        """The training identities of a fine-tuned checkpoint (empty for a zero-shot model)."""
        return list(self.meta.get("classes") or [])

    @property
    def dim(self) -> int:
        return self.embedder.output_dim

    def __repr__(self) -> str:
        source = self.model.key.get("checkpoint") or self.model.key.get("zero_shot")
        draft = ", decode='draft'" if self.decode == "draft" else ""
        return f"HandCLIP({source!r}, backend={self.backend!r}{draft}, device={str(self.device)!r}, dim={self.dim})"

    # -- embeddings ------------------------------------------------------------------------------
    def _crop(self, image) -> torch.Tensor:
        if isinstance(image, Image.Image):
            return pil_to_tensor(self._geometric(ImageOps.exif_transpose(image).convert("RGB")))
        raise HandCLIPError(f"cannot embed a {type(image).__name__}: pass file paths, PIL images or image tensors")

    def _tensor_crops(self, images: torch.Tensor, scale: float | None) -> torch.Tensor:
        batch = images.unsqueeze(0) if images.ndim == 3 else images
        size = tuple(int(v) for v in self.encoder.preprocess.input_size)
        if batch.ndim != 4 or tuple(batch.shape[1:]) != size:
            raise HandCLIPError(f"image tensors must be crops of shape (3, {size[1]}, {size[2]}) or (N, 3, "
                                f"{size[1]}, {size[2]}), got {tuple(images.shape)}; pass file paths or PIL images "
                                "to have them resized and cropped as open_clip does")
        if batch.dtype == torch.uint8 and scale in (None, 255, 255.0):
            return batch
        # float pixels with their stated range: checked, then as the uint8 crops every backend takes
        return pixels_to_unit(batch, scale).mul(255).round().to(torch.uint8)

    def embed(self, images, scale: float | None = None, batch_size: int = 64, normalize: bool = True) -> torch.Tensor:
        """Embeddings ``(N, D)`` float32 (L2-normalised unless ``normalize=False``) of one image or a list of them:
        file paths, PIL images, or uint8 tensors of crops ``(3, H, W)`` / ``(N, 3, H, W)``. Float tensors only with
        their range: ``scale=1.0`` for ``[0, 1]``, ``scale=255.0`` for ``[0, 255]`` (refused otherwise). A file
        that cannot be read stops with one line naming it. Files are decoded as ``load(decode=...)`` says."""
        if isinstance(images, torch.Tensor):
            crops = self._tensor_crops(images, scale)
            out = torch.cat(embed_batches(self.embedder, crops.split(batch_size), self.device, check_finite=True))
            return torch.nn.functional.normalize(out, dim=1).cpu() if normalize else out.cpu()
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if not items:
            return torch.empty((0, self.dim), dtype=torch.float32)
        if all(isinstance(i, (str, Path)) for i in items):
            if not normalize:
                loader = ImageLoader(self.encoder.preprocess, self.decode)
                return self.embed(torch.stack([loader(p) for p in items]), batch_size=batch_size, normalize=False)
            done = embed_files(self.embedder, [Path(p) for p in items], self.device, batch_size, num_workers=None,
                               progress=False, decode=self.decode)
            if done.failed:
                raise HandCLIPError(done.failed[0][1])
            return done.embeddings
        return self.embed(torch.stack([self._crop(i) for i in items]), batch_size=batch_size, normalize=normalize)

    @torch.inference_mode()
    def embed_normalized(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Embeddings of crops already normalised by open_clip's mean and std (``self.preprocess`` output,
        ``(3, H, W)`` or ``(N, 3, H, W)``), with PyTorch whatever the backend."""
        batch = images.unsqueeze(0) if images.ndim == 3 else images
        out = self.encoder.to(self.device).embed_normalized(batch.to(self.device)).float()
        return torch.nn.functional.normalize(out, dim=1).cpu() if normalize else out.cpu()

    # -- decisions -------------------------------------------------------------------------------
    def _cfg(self, **values) -> dict:
        key = self.model.key
        return {"ckpt_path": key.get("checkpoint"), "seed": self.seed, "calibration": self.calibration,
                "model": {"model_name": key.get("zero_shot") or self.meta.get("model_name"),
                          "pretrained": key.get("pretrained"), "cache_dir": None}, **values}

    def threshold(self, target_fmr: float | None = None, gallery_mode: str = "max", query_mode: str = "each",
                  case_mode: str = "mean") -> float:
        """The calibrated open-set threshold of a decision mode (as for :meth:`identify`) at ``target_fmr`` (None:
        the calibration's own target), from the checkpoint's calibration file (or ``calibration=`` given to
        :func:`load`)."""
        from handclip.identify.run import modes, resolve_threshold

        cfg = OmegaConf.create(self._cfg(threshold=None, target_fmr=target_fmr, gallery_mode=gallery_mode,
                                         query_mode=query_mode, case_mode=case_mode))
        return float(resolve_threshold(cfg, self.meta, self.fingerprint, modes(cfg)["decision_mode"])["threshold"])

    def identify(self, query, gallery, top_k: int = 5, target_fmr: float | None = None,
                 threshold: float | None = None, out: str | Path | None = None, index: str | Path | None = None,
                 pictures: bool = False, overwrite: bool = False, batch_size: int = 64, gallery_mode: str = "max",
                 query_mode: str = "each", case_mode: str = "mean") -> list[dict]:
        """``python -m handclip.identify`` with this model: one record per query (as in ``results.json``: query,
        decision, identity, score, top-k). ``out``: a folder for results.json/csv (and pictures); by default they
        are not kept. The gallery index is kept under the cache folder (or ``index=``) and reused.
        ``gallery_mode``: ``max`` (a person scores as their best photo) or ``mean`` (their mean template);
        ``query_mode="case"``: ``query`` is a folder of case folders, one record per case, probed by its mean
        template (``case_mode="mean"``) or its best photo per person (``"max"``)."""
        from handclip.identify.run import identify, index_path

        gallery = Path(gallery).expanduser().resolve()
        if index is None:
            where = OmegaConf.create({"index": None, "paths": {"output_root": str(self.cache_dir.parent)}})
            index = index_path(where, gallery, self.model)
        # a temporary folder only when the results are not kept (out= given: nothing is written elsewhere)
        with contextlib.nullcontext() if out else tempfile.TemporaryDirectory(prefix="handclip-identify-") as tmp:
            root = Path(out).expanduser().resolve() if out else Path(tmp) / "api"
            cfg = copy.deepcopy(_identify_defaults(os.getcwd(), os.environ.get("HANDCLIP_ROOT")))
            for key, value in self._cfg(threshold=threshold, target_fmr=target_fmr).items():
                if key != "model":
                    cfg[key] = value
            cfg.paths.output_root = str(root.parent)
            cfg.update(name=root.name, query=str(query), gallery=str(gallery), index=str(index), top_k=int(top_k),
                       pictures=bool(pictures), overwrite=bool(overwrite), batch_size=int(batch_size),
                       device=str(self.device), gallery_mode=str(gallery_mode), query_mode=str(query_mode),
                       case_mode=str(case_mode), decode=self.decode)
            with contextlib.redirect_stdout(io.StringIO()):  # the command line's summary: the records are returned
                result = identify(cfg, loaded=(self.embedder, self.model, self.meta), out_dir=root)
        return result["queries"]


@functools.lru_cache(maxsize=4)
def _identify_defaults(cwd: str, root: str | None):
    """identify's composed config (composing takes ~0.5 s; each call gets a copy), per working folder and
    HANDCLIP_ROOT (they anchor its relative paths)."""
    from handclip.config import compose

    return compose("identify", ["progress=false"])


def load(checkpoint: str | Path | None = None, *, model: str | None = None, pretrained: str | None = None,
         backend: str = "torch", device: str = "cpu", calibration: str | Path | None = None,
         cache_dir: str | Path | None = None, seed: int = 42, decode: str = "full") -> HandCLIP:
    """A fine-tuned checkpoint (``best.ckpt``), or with ``model=`` the zero-shot open_clip model (``pretrained``: a
    tag or a weights file; None: random weights drawn from ``seed``). Only the image tower is built.

    ``backend``: torch, torch-bf16, onnx, onnx-int8 or auto (README "Fast CPU inference"); ``cache_dir``: where
    ONNX graphs are kept (default ``~/.cache/handclip/backends``); ``calibration``: a calibration file for the
    threshold of a zero-shot model; ``decode``: ``full``, or ``draft`` to decode JPEG files at a reduced scale
    (faster, embeddings slightly different; PIL images and tensors are already decoded)."""
    if (checkpoint is None) == (model is None):
        raise HandCLIPError("handclip.load needs a checkpoint path, or model=NAME (and pretrained=...) for a "
                            "zero-shot model, not both")
    if checkpoint is not None:
        ckpt = Path(checkpoint).expanduser().resolve()
        encoder, meta = load_encoder(ckpt)
        key = {"checkpoint": str(ckpt), "model_name": meta["model_name"]}
    else:
        torch.manual_seed(seed)  # random weights come out as in `eval` and `identify` with the same seed
        encoder = zero_shot_encoder(model, pretrained)
        meta, key = {}, {"zero_shot": model, "pretrained": pretrained if uses_pretrained_weights(pretrained) else None}
    return HandCLIP(encoder, meta, key, backend, device, calibration, cache_dir, seed, decode)


def identify_fused(query, gallery, *, fusion: str = "mean", models: dict | None = None, threshold: float | None = None,
                   query_hand: str | None = None, hand_classifier: str | Path | None = None,
                   min_confidence: float | None = None, top_k: int = 5, out: str | Path | None = None,
                   index: str | Path | None = None, pictures: bool = False, overwrite: bool = False,
                   device: str = "cpu", batch_size: int = 64, calibration: str | Path | None = None,
                   target_fmr: float | None = None) -> list[dict]:
    """``python -m handclip.identify fusion=...``: a ``<person>/<hand type>/<photo>`` gallery, each hand type
    scored by its own checkpoint (``models={hand: ckpt}``; a hand type left out: ``outputs/train/<hand>/
    checkpoints/best.ckpt``), scores fused (``mean``/``max``) over the hand types probe and person share. A photo's
    hand type: its folder, ``query_hand``, or the classifier file ``hand_classifier`` (default
    ``outputs/train/hand_type/hand_type.json``). ``threshold``: None decides each result at its calibrated threshold
    (README "Fusion across hand types"): the fused one from ``calibration`` (default ``outputs/train/
    fusion.calibration.json``) at ``target_fmr`` (None: the calibration's own target). Returns the records of
    ``results.json``; with ``out`` they are also written there. The gallery indexes (one per hand type) are kept
    in ``index/<hand>`` (default: as the command line keeps them, ``outputs/identify/index/``)."""
    from handclip.config import compose
    from handclip.identify.run import identify

    with tempfile.TemporaryDirectory(prefix="handclip-identify-") as tmp:
        root = Path(out).expanduser().resolve() if out else Path(tmp) / "api"
        cfg = compose("identify", ["progress=false", f"fusion={fusion}"])
        cfg.threshold = None if threshold is None else float(threshold)
        cfg.target_fmr = None if target_fmr is None else float(target_fmr)
        if calibration is not None:
            cfg.calibration = str(Path(calibration).expanduser().resolve())
        for hand, ckpt in (models or {}).items():
            if hand not in cfg.models:
                raise HandCLIPError(f"models: unknown hand type {hand!r}; expected one of: {', '.join(cfg.models)}")
            cfg.models[hand] = str(Path(ckpt).expanduser().resolve())
        if hand_classifier is not None:
            cfg.hand_classifier.path = str(Path(hand_classifier).expanduser().resolve())
        cfg.hand_classifier.min_confidence = min_confidence
        cfg.update(name=root.name, query=str(query), gallery=str(Path(gallery).expanduser().resolve()),
                   index=str(Path(index).expanduser().resolve()) if index else None, top_k=int(top_k),
                   query_hand=query_hand,
                   pictures=bool(pictures), overwrite=bool(overwrite), batch_size=int(batch_size), device=device)
        with contextlib.redirect_stdout(io.StringIO()):
            result = identify(cfg, out_dir=root)
    return result["queries"]


__all__: Sequence[str] = ("HandCLIP", "identify_fused", "load")
