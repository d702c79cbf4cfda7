"""Scoring the test protocol: every Monte Carlo run's query set ranked against its gallery, each image
embedded once. (How the runs are made is the split protocol, :mod:`handclip.data.split`.)"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from handclip.data.datamodule import HandDataModule, TestImages
from handclip.errors import HandCLIPError
from handclip.evaluation.embed import embed_loader
from handclip.evaluation.rerank import Rerank
from handclip.metrics import compute_reid_metrics
from handclip.metrics.templates import mean_templates

log = logging.getLogger(__name__)

#: Figures summarised as mean and standard deviation over the runs.
SUMMARY_KEYS = ("rank1", "rank5", "rank10", "mAP")


def identity_labels(identities: Sequence[str]) -> torch.Tensor:
    """Integer labels for identity names (same name, same label)."""
    index: dict[str, int] = {}
    return torch.tensor([index.setdefault(i, len(index)) for i in identities], dtype=torch.long)


def score_runs(features: torch.Tensor, test: TestImages, ranks=(1, 5, 10), ap: str = "standard",
               rerank: Rerank | None = None, gallery_mode: str = "max") -> list[dict]:
    """Rank-k and mAP of every run from features of ``test.paths`` (row i = image i); ``gallery_mode="mean"``:
    against the mean templates of the gallery's persons (``gallery_size`` then counts templates).

    A run none of whose queries has a true match in its gallery is reported with its counts and no
    metrics (and left out of the summary) rather than stopping the evaluation.
    """
    if not torch.isfinite(features).all():
        raise HandCLIPError("the model produced NaN or infinite embeddings for test images; "
                            "the checkpoint is probably diverged")
    labels = identity_labels(test.identities).to(features.device)
    results = []
    for run in test.runs:
        q = torch.as_tensor(run["query"], dtype=torch.long, device=features.device)
        g = torch.as_tensor(run["gallery"], dtype=torch.long, device=features.device)
        info = {"run": run["name"], "gallery": run["gallery_name"], "gallery_size": len(run["gallery"])}
        gf, gl = features[g], labels[g]
        if gallery_mode == "mean":
            gf, gl = mean_templates(gf, gl)
            info["gallery_size"] = int(gl.numel())
        valid = int(torch.isin(labels[q], labels[g]).sum())
        if valid == 0:
            log.warning("%s: none of its %d queries has a true match in %s; run left out", run["name"], len(q),
                        run["gallery_name"])
            results.append({**info, "num_queries": len(q), "num_valid_queries": 0, "num_invalid_queries": len(q)})
            continue
        if rerank is None:
            metrics = compute_reid_metrics(features[q], labels[q], gf, gl, ranks=ranks, ap=ap)
        else:
            metrics = rerank.metrics(features[q], labels[q], gf, gl, ranks, ap)
        if metrics["num_invalid_queries"]:
            log.warning("%s: %d queries have no true match in %s (excluded)", run["name"],
                        metrics["num_invalid_queries"], run["gallery_name"])
        results.append({**metrics, **info})
    if not any(r["num_valid_queries"] for r in results):
        raise HandCLIPError("no run has a query whose identity is in its gallery: nothing to score "
                            f"({', '.join(r['run'] + ' vs ' + r['gallery'] for r in results)})")
    return results


def summarize(runs: list[dict]) -> dict:
    """Mean and (population) standard deviation over the scored runs of each metric, plus sizes."""
    scored = [r for r in runs if "mAP" in r]
    summary: dict = {"num_runs": len(scored)}
    if len(scored) < len(runs):
        summary["num_runs_without_valid_query"] = len(runs) - len(scored)
    for key in SUMMARY_KEYS:
        values = [r[key] for r in scored if key in r]
        if values:
            mean = sum(values) / len(values)
            summary[key] = {"mean": mean, "std": math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))}
    for key in ("num_valid_queries", "num_invalid_queries", "gallery_size"):
        values = [r[key] for r in scored if key in r]
        if values:
            summary[key] = sum(values) / len(values)
    return summary


def evaluate_hand(encoder: nn.Module, datamodule: HandDataModule, device: torch.device, ranks=(1, 5, 10),
                  ap: str = "standard", cross_aspect: bool = False, progress: bool = True,
                  extra: Callable[[torch.Tensor, TestImages], dict] | None = None,
                  rerank: Rerank | None = None, gallery_mode: str = "max") -> dict:
    """Embed the hand's test images once, score every run, summarise.

    With ``cross_aspect`` the result also holds ``cross_aspect``: the runs against ``gallery{i}_all``; with ``rerank``,
    ``reranked``: the same-aspect runs scored after re-ranking; with ``gallery_mode="mean"``, ``mean_templates``: the
    same-aspect runs scored against the gallery persons' mean templates.
    ``extra(features, test)`` adds its own entries to the result from the same embeddings.
    """
    test = datamodule.test_images(cross_aspect=cross_aspect)
    loader = datamodule.image_dataloader(test.paths, desc="test", device=device)
    features = embed_loader(encoder, loader, device, desc=f"{datamodule.hand}: embedding", progress=progress)
    scored = score_runs(features, test, ranks=ranks, ap=ap)
    runs = [r for run, r in zip(test.runs, scored) if not run.get("cross_aspect")]
    result = {"hand": datamodule.hand, "num_images": len(test.paths), "runs": runs, "summary": summarize(runs)}
    if cross_aspect:
        cross = [r for run, r in zip(test.runs, scored) if run.get("cross_aspect")]
        result["cross_aspect"] = {"runs": cross, "summary": summarize(cross)}
    if rerank is not None:
        same = dataclasses.replace(test, runs=[r for r in test.runs if not r.get("cross_aspect")])
        reranked = score_runs(features, same, ranks=ranks, ap=ap, rerank=rerank)
        result["reranked"] = {"label": rerank.label, "settings": vars(rerank), "runs": reranked,
                              "summary": summarize(reranked)}
    if gallery_mode == "mean":
        same = dataclasses.replace(test, runs=[r for r in test.runs if not r.get("cross_aspect")])
        templated = score_runs(features, same, ranks=ranks, ap=ap, gallery_mode="mean")
        result["mean_templates"] = {"runs": templated, "summary": summarize(templated)}
    if extra is not None:
        result.update(extra(features, test))
    return result
