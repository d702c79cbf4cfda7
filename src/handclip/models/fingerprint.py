"""A fingerprint of an image encoder: what decides its embeddings (weights and preprocessing), as a short hash.

Two encoders with the same fingerprint embed every image identically, so anything computed from embeddings
(a gallery index, a calibrated threshold) stays valid exactly as long as the fingerprint does. Hashing the
weights of ViT-B/32's image tower (88M parameters) takes about half a second on a CPU.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import torch

from handclip.models.encoder import ImageEncoder


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.int16)  # NumPy has no bfloat16: hash the raw bits
    return memoryview(t.numpy()).cast("B")


def encoder_fingerprint(encoder: ImageEncoder) -> str:
    """sha256 (hex, 20 characters) of the preprocessing settings and every weight of the image tower; and, when
    they change the embeddings, of the test-time settings (flip TTA) and the BNNeck (post-BN test feature). The
    default encoder's fingerprint is what it was before these options existed."""
    digest = hashlib.sha256()
    digest.update(json.dumps(dataclasses.asdict(encoder.preprocess), sort_keys=True, default=str).encode())
    state = dict(encoder.visual.state_dict())
    settings = encoder.embedding_settings()
    if settings:
        digest.update(json.dumps(settings, sort_keys=True).encode())
        if "feature" in settings:
            state.update({f"neck.{k}": v for k, v in encoder.neck.state_dict().items()})
    for name, tensor in sorted(state.items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()[:20]
