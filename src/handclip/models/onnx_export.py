"""The image tower as an ONNX model (optional extra: ``pip install -e ".[onnx]"``), checked against PyTorch.

The exported graph is :meth:`ImageEncoder.embed` (with its flip TTA and BNNeck test feature, when set): input
``images``, uint8 ``(batch, 3, H, W)`` crops made by
open_clip's resize + center crop (``H = W = 224`` for ViT-B/32); the normalisation by open_clip's mean and
std is inside the graph. Output ``embedding``: ``(batch, D)`` image-tower embeddings, not normalised
(divide by their L2 norm before comparing with cosine similarity). The preprocessing settings and the
model's fingerprint are stored as ONNX metadata (``preprocess``, ``model_fingerprint``, ...).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import torch

from handclip.errors import HandCLIPError
from handclip.models.encoder import ImageEncoder
from handclip.models.export_attention import export_ready
from handclip.utils.files import write_file

log = logging.getLogger(__name__)


def _require(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise HandCLIPError(f"ONNX export needs the '{module}' package: pip install -e \".[onnx]\" "
                            "(onnx, onnxscript, onnxruntime)") from None


def parity(encoder: ImageEncoder, path: str | Path, images: torch.Tensor) -> float:
    """Max abs difference between the L2-normalised embeddings of PyTorch and onnxruntime (CPU) on ``images``."""
    ort = _require("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {"images": images.numpy()})[0].astype(np.float64)
    with torch.inference_mode():
        torch_out = encoder.to("cpu").eval().embed(images).double().numpy()

    def unit(a):
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    return float(np.abs(unit(onnx_out) - unit(torch_out)).max())


def export_onnx(encoder: ImageEncoder, out: str | Path, metadata: dict | None = None, opset: int = 18,
                check: bool = True, check_images: int = 8, tolerance: float = 1e-4, seed: int = 0,
                overwrite: bool = False) -> dict:
    """Export ``encoder`` to ``out`` (written atomically); with ``check``, refuse a graph whose normalised
    embeddings differ from PyTorch's by more than ``tolerance`` on ``check_images`` random crops."""
    onnx = _require("onnx")
    _require("onnxscript")
    out = Path(out)
    encoder = encoder.to("cpu").eval()
    size = tuple(int(v) for v in encoder.preprocess.input_size)  # (3, H, W)
    example = torch.randint(0, 256, (2, *size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    report = {"path": str(out), "opset": opset, "input_size": list(size)}

    def write(tmp: Path) -> None:
        torch.onnx.export(export_ready(encoder), (example,), str(tmp), dynamo=True, external_data=False,
                          opset_version=opset, input_names=["images"], output_names=["embedding"],
                          dynamic_shapes={"images": {0: torch.export.Dim("batch")}})
        model = onnx.load(str(tmp))
        props = {"producer": "handclip", "input": "uint8 (batch, 3, H, W) resized + center-cropped crops",
                 "output": "image-tower embedding (not L2-normalised)",
                 "preprocess": json.dumps(dataclasses.asdict(encoder.preprocess), default=str),
                 # in the graph: flip TTA (mean with the mirrored crop), the post-BNNeck feature
                 **({"embedding": json.dumps(encoder.embedding_settings())} if encoder.embedding_settings() else {}),
                 **{k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}}
        onnx.helper.set_model_props(model, props)
        onnx.save(model, str(tmp))
        if check:
            images = torch.randint(0, 256, (check_images, *size), dtype=torch.uint8,
                                   generator=torch.Generator().manual_seed(seed + 1))
            diff = parity(encoder, tmp, images)
            report.update(parity_max_abs_diff=diff, parity_images=check_images, tolerance=tolerance)
            if not diff <= tolerance:
                raise HandCLIPError(f"the ONNX export differs from PyTorch by {diff:.3g} (L2-normalised embeddings, "
                                    f"max abs) > {tolerance:g}; not written")

    write_file(out, overwrite, write, "export")
    return report
