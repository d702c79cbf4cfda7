"""Re-ranked rows of the evaluation (``rerank=kreciprocal`` or ``rerank=aqe``): the same runs scored after
k-reciprocal re-ranking or alpha query expansion (:mod:`handclip.metrics.rerank`), reported as rows of their own,
marked transductive (each query's ranking uses the other queries of its run)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from handclip.errors import HandCLIPError
from handclip.metrics import compute_reid_metrics
from handclip.metrics.rank import reid_metrics_from_scores
from handclip.metrics.rerank import alpha_query_expansion, k_reciprocal_distances

#: rerank.method -> what the rows say.
METHODS = {"kreciprocal": "k-reciprocal re-ranking", "aqe": "alpha query expansion"}


@dataclass(frozen=True)
class Rerank:
    """``rerank.*`` of configs/eval.yaml."""

    method: str
    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3
    k: int = 5
    alpha: float = 3.0
    float16: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise HandCLIPError(f"rerank.method={self.method!r}: expected one of {', '.join(METHODS)}")

    @property
    def label(self) -> str:
        return f"{METHODS[self.method]} (transductive)"

    def metrics(self, qf: torch.Tensor, ql: torch.Tensor, gf: torch.Tensor, gl: torch.Tensor, ranks, ap) -> dict:
        """Rank-k and mAP of one run after re-ranking."""
        if self.method == "aqe":
            q2, g2 = alpha_query_expansion(qf, gf, self.k, self.alpha)
            return compute_reid_metrics(q2, ql, g2, gl, ranks=ranks, ap=ap)
        distances = k_reciprocal_distances(qf, gf, self.k1, self.k2, self.lambda_value,
                                           out_dtype=torch.float16 if self.float16 else None)
        return reid_metrics_from_scores(distances.neg_(), ql, gl, ranks=ranks, ap=ap)


def rerank_entries(entry: dict) -> list[dict]:
    """The re-ranked row of a scored entry (none when it was not re-ranked)."""
    reranked = entry.get("reranked")
    if not reranked:
        return []
    return [{"hand": entry["hand"], "model": f"{entry['model']} + {reranked['label']}", "reranked_from": entry["model"],
             "rerank": reranked["settings"], "transductive": True, "checkpoint": entry.get("checkpoint"),
             "model_name": entry.get("model_name"), "pretrained": entry.get("pretrained"), "status": "ok",
             "runs": reranked["runs"], "summary": reranked["summary"]}]


def template_entries(entry: dict) -> list[dict]:
    """The mean-template row of a scored entry (``gallery_mode=mean``; none otherwise)."""
    scored = entry.get("mean_templates")
    if not scored:
        return []
    return [{"hand": entry["hand"], "model": f"{entry['model']} + mean templates", "templates_of": entry["model"],
             "gallery_mode": "mean", "checkpoint": entry.get("checkpoint"), "model_name": entry.get("model_name"),
             "pretrained": entry.get("pretrained"), "status": "ok", "runs": scored["runs"],
             "summary": scored["summary"]}]
