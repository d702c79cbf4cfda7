"""Verification and open-set figures of the test runs, CMC curves and example rankings, from test embeddings.

For each Monte Carlo run every query is compared with every gallery identity (best image):

* ``tar@fmr=<a>``: TAR at the threshold where the run's own impostor scores give FMR ``a``;
* ``eer``: the equal error rate;
* at the threshold calibrated on val (:mod:`handclip.evaluation.calibration`), when there is one:
  ``fmr_at_threshold`` and ``tar_at_threshold`` on the test comparisons, ``unknown_rate`` (the open-set
  protocol: each query's own identity withheld from the gallery in turn; the share answered "unknown") and
  ``dir_at_threshold`` (the share of queries whose own identity is ranked first and accepted);
* ``cmc``: Rank-1..20 (or the gallery size, when smaller).

The figures are means (± population std) over the runs, like Rank-1 and mAP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from handclip.data.datamodule import TestImages
from handclip.evaluation.runs import identity_labels
from handclip.metrics import compute_reid_metrics
from handclip.metrics.scores import IdentityScores, identity_scores
from handclip.metrics.verification import (
    detection_identification_rate,
    equal_error_rate,
    match_rate,
    tar_at_fmrs,
    unknown_rate,
)


@dataclass(frozen=True)
class VerificationOptions:
    """``verification`` in configs/eval.yaml."""

    fmr_levels: tuple[float, ...] = (0.01, 0.001)
    target_fmr: float = 0.01
    cmc_max_rank: int = 20
    examples: int = 2
    top_k: int = 5
    curve_points: int = 200


def tar_key(fmr: float) -> str:
    """``0.01`` -> ``"tar@fmr=1%"``."""
    return f"tar@fmr={100 * fmr:g}%"


def _run_figures(scores: IdentityScores, threshold: float | None, levels) -> dict:
    genuine, impostor = scores.genuine(), scores.impostor()
    row: dict = {"genuine_scores": int(genuine.numel()), "impostor_scores": int(impostor.numel())}
    for r in tar_at_fmrs(genuine, impostor, levels):
        row[tar_key(r["target_fmr"])] = r["tar"]
        row[tar_key(r["target_fmr"]) + " resolved"] = r["resolved"]
    row["eer"] = equal_error_rate(genuine, impostor)["eer"]
    if threshold is not None:
        row["fmr_at_threshold"] = match_rate(impostor, threshold)
        row["tar_at_threshold"] = match_rate(genuine, threshold)
        row["unknown_rate"] = unknown_rate(scores.nonmated_top(), threshold)
        row["dir_at_threshold"] = detection_identification_rate(genuine, scores.identified()[scores.mated], threshold)
    return row


def _summary(rows: list[dict]) -> dict:
    out: dict = {"num_runs": len(rows)}
    for key in rows[0] if rows else []:
        values = [r[key] for r in rows]
        if isinstance(values[0], bool):
            out[key] = all(values)
        elif key not in ("run",):
            mean = sum(values) / len(values)
            out[key] = {"mean": mean, "std": math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))}
    return out


def _curve(genuine: np.ndarray, impostor: np.ndarray, points: int) -> dict:
    """TAR at log-spaced FMR levels from 1 / (number of impostor scores) to 1, for ROC and DET plots."""
    low = max(1.0 / impostor.size, 1e-6)
    targets = sorted({float(f) for f in np.geomspace(low, 0.999, points)}, reverse=True)
    rows = tar_at_fmrs(genuine, impostor, targets)
    return {"fmr": [r["fmr"] for r in rows], "tar": [r["tar"] for r in rows]}


def _example(features: torch.Tensor, test: TestImages, q: int, gallery: list[int], top_k: int, kind: str,
             rank: int) -> dict:
    """One query's ranking (top-k identities, each with its best gallery image) for a ranking picture."""
    sims = (F.normalize(features[q:q + 1], dim=1) @ F.normalize(features[gallery], dim=1).t())[0].tolist()
    best: dict[str, tuple[float, int]] = {}
    for s, g in zip(sims, gallery):
        ident = test.identities[g]
        if ident not in best or s > best[ident][0]:
            best[ident] = (s, g)
    order = sorted(best.items(), key=lambda kv: (-kv[1][0], kv[1][1]))[:top_k]
    return {"kind": kind, "query": str(test.paths[q]), "identity": test.identities[q], "rank": rank,
            "top": [{"identity": ident, "score": s, "path": str(test.paths[g]), "match": ident == test.identities[q]}
                    for ident, (s, g) in order]}


def _examples(features, test: TestImages, run: dict, scores: IdentityScores, options: VerificationOptions) -> list:
    """The ``examples`` best and worst mated queries of a run: by the rank of their own identity, then margin."""
    genuine_rows = torch.nonzero(scores.mated).flatten()
    if genuine_rows.numel() == 0 or options.examples < 1:
        return []
    own = scores.table[genuine_rows, scores.own[genuine_rows]]
    rank = (scores.table[genuine_rows] > own.unsqueeze(1)).sum(dim=1) + 1
    margin = own - scores.nonmated_top()[genuine_rows]
    order = sorted(range(genuine_rows.numel()), key=lambda i: (int(rank[i]), -float(margin[i])))
    n = min(options.examples, len(order) // 2 or 1)
    picked = [("best", i) for i in order[:n]] + [("worst", i) for i in order[::-1][:n]]
    return [_example(features, test, run["query"][int(genuine_rows[i])], run["gallery"], options.top_k, kind,
                     int(rank[i])) for kind, i in picked]


def verify_runs(features: torch.Tensor, test: TestImages, threshold: float | None,
                options: VerificationOptions = VerificationOptions()) -> dict:
    """Verification figures per same-aspect run and their summary, the pooled curve, CMC and examples."""
    labels = identity_labels(test.identities).to(features.device)
    rows, genuine, impostor, cmc, examples, example_run = [], [], [], [], [], None
    for run in (r for r in test.runs if not r.get("cross_aspect")):
        q = torch.as_tensor(run["query"], dtype=torch.long, device=features.device)
        g = torch.as_tensor(run["gallery"], dtype=torch.long, device=features.device)
        scores = identity_scores(features[q], labels[q], features[g], labels[g])
        if not bool(scores.mated.any()) or scores.identities.numel() < 2:
            continue  # no genuine or no impostor comparison: nothing to verify (reported as such by the runs)
        rows.append({"run": run["name"], **_run_figures(scores, threshold, options.fmr_levels)})
        genuine.append(scores.genuine().cpu().numpy())
        impostor.append(scores.impostor().cpu().numpy())
        max_rank = min(options.cmc_max_rank, scores.identities.numel())
        ranks = tuple(range(1, max_rank + 1))
        reid = compute_reid_metrics(features[q], labels[q], features[g], labels[g], ranks=ranks)
        cmc.append([reid[f"rank{k}"] for k in ranks])
        if not examples:
            examples, example_run = _examples(features, test, run, scores, options), run["name"]
    if not rows:
        return {"runs": [], "summary": {"num_runs": 0}}
    width = min(len(c) for c in cmc)
    pooled_gen, pooled_imp = np.concatenate(genuine), np.concatenate(impostor)
    return {
        "threshold": threshold,
        "runs": rows,
        "summary": _summary([{k: v for k, v in r.items() if k != "run"} for r in rows]),
        "curve": {**_curve(pooled_gen, pooled_imp, options.curve_points),
                  "eer": equal_error_rate(pooled_gen, pooled_imp)["eer"],
                  "at_threshold": None if threshold is None else {"fmr": match_rate(pooled_imp, threshold),
                                                                  "tar": match_rate(pooled_gen, threshold)}},
        "cmc": {"ranks": list(range(1, width + 1)),
                "mean": np.mean([c[:width] for c in cmc], axis=0).tolist(),
                "std": np.std([c[:width] for c in cmc], axis=0).tolist()},
        "examples": examples,
        "example_run": example_run,
    }

