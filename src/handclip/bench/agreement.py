"""Agreement of a backend with torch fp32 on ``make demo``'s identify photos: cosine of each photo's embedding, the
share of queries whose top-1 identity is unchanged, how far any query-gallery score moved, and how close torch fp32's
own top-1 decisions are (the gap between the best and the second-best gallery photo).

A top-1 identity changes when a backend moves scores by more than that gap. ViT-B/32 with random weights (all this
machine can have) scores every gallery photo of the demo almost alike, so its gaps are tiny and its top-1 share
measures those near-ties more than the backend. The same figures are therefore also taken on ``make demo``'s trained
model (HandCLIP-Tiny fine-tuned on those hands: scores that tell its people apart), when its checkpoint is there.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from handclip.data.images import ImageLoader
from handclip.errors import HandCLIPError
from handclip.evaluation.embed import embed_batches
from handclip.models.backends import available, make_embedder
from handclip.models.checkpoint import load_encoder
from handclip.models.fingerprint import encoder_fingerprint

Say = Callable[[str], None]


def _scores(e: torch.Tensor, queries: int) -> torch.Tensor:
    e = F.normalize(e.double(), dim=1)
    return e[:queries] @ e[queries:].T


def on_photos(reference: torch.Tensor, other: torch.Tensor, queries: int, identities: list[str]) -> dict:
    """Cosine of ``other``'s embeddings of the demo's photos (queries first, then the gallery) with ``reference``'s,
    the share of queries whose top-1 identity (identify's: the identity of the best gallery photo) is the same, and
    the largest change of a query-gallery score."""
    cosine = F.cosine_similarity(other.double(), reference.double(), dim=1)
    want, got = _scores(reference, queries), _scores(other, queries)
    same = [identities[a] == identities[b] for a, b in zip(want.argmax(dim=1).tolist(), got.argmax(dim=1).tolist())]
    return {"photos_cosine_min": float(cosine.min()), "photos_cosine_mean": float(cosine.mean()),
            "top1_same_share": sum(same) / len(same), "score_change_max": float((got - want).abs().max()),
            "queries": queries, "gallery": len(identities)}


def top1_margins(reference: torch.Tensor, queries: int) -> dict:
    """Torch fp32's gap between each query's best and second-best gallery score: lowest, 5th percentile, median."""
    top = _scores(reference, queries).topk(2, dim=1).values
    gap = top[:, 0] - top[:, 1]
    return {"min": float(gap.min()), "p05": float(gap.quantile(0.05)), "median": float(gap.median())}


def embed_all(embedder, crops: torch.Tensor, batch: int) -> torch.Tensor:
    """``crops`` embedded by ``embedder`` on the CPU through the project's one embedding loop."""
    return torch.cat(embed_batches(embedder, crops.split(batch), torch.device("cpu")))


def on_trained_model(ckpt: str | None, backends: list[str], demo: dict, cache: Path, batch: int, say: Say) -> dict:
    """Each available backend's agreement with torch fp32 on the trained model at ``ckpt`` (``make demo``'s), with
    full and draft decoding of the demo's photos; ``{"skipped": why}`` without that checkpoint."""
    if not ckpt or not Path(ckpt).is_file():
        return {"skipped": f"no trained model at {ckpt} (run `make demo` first)"}
    encoder, meta = load_encoder(ckpt)
    photos, queries, identities = demo["queries"] + demo["gallery"], len(demo["queries"]), demo["gallery_identities"]
    crops = {d: torch.stack([ImageLoader(encoder.preprocess, d)(p) for p in photos]) for d in ("full", "draft")}
    fingerprint, out = encoder_fingerprint(encoder), {"checkpoint": str(ckpt), "model_name": meta["model_name"]}
    reference = embed_all(make_embedder(encoder, "torch", "cpu"), crops["full"], batch)
    out["top1_margin"], out["backends"] = top1_margins(reference, queries), {}
    for name in backends:
        if not available(name):
            out["backends"][name] = {"skipped": "not available on this machine"}
            continue
        try:
            embedder = make_embedder(encoder, name, "cpu", fingerprint, cache)
        except HandCLIPError as err:
            out["backends"][name] = {"refused": str(err)}
            continue
        out["backends"][name] = {d: on_photos(reference, embed_all(embedder, c, batch), queries, identities)
                                 for d, c in crops.items()}
    measured = [v["full"]["top1_same_share"] for v in out["backends"].values() if "full" in v]
    out["top1_same_min"] = min(measured) if measured else None
    say(f"  trained model ({meta['model_name']}, {ckpt}): top-1 same, lowest of the backends "
        f"{out['top1_same_min']}")
    return out
