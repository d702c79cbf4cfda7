"""Independent brute-force references for re-identification figures: plain Python over ranked lists."""

from __future__ import annotations

import numpy as np


def brute_force_metrics(qf, ql, gf, gl, ranks=(1, 5, 10), ap="standard"):
    """Plain-Python reference: rank every gallery item by (-similarity, gallery index).

    Similarities are numpy float64 dot products of L2-normalised rows (zero rows stay zero),
    then everything else walks Python lists. For tie cases the features are chosen so that
    every similarity is exact in float32 and float64 alike.
    """
    qf = np.asarray(qf, dtype=np.float64)
    gf = np.asarray(gf, dtype=np.float64)
    ql = [int(x) for x in np.asarray(ql).tolist()]
    gl = [int(x) for x in np.asarray(gl).tolist()]

    def normalise(x):
        norms = np.sqrt((x * x).sum(axis=1, keepdims=True))
        return x / np.maximum(norms, 1e-12)

    sims = (normalise(qf) @ normalise(gf).T).tolist()
    hits = {k: 0 for k in ranks}
    ap_total = 0.0
    valid = 0
    for q, row in enumerate(sims):
        ranked = sorted(range(len(gl)), key=lambda g: (-row[g], g))
        is_match = [gl[g] == ql[q] for g in ranked]
        n_good = sum(is_match)
        if n_good == 0:
            continue
        valid += 1
        first = is_match.index(True)
        for k in ranks:
            if first < k:
                hits[k] += 1
        found = 0
        ap_q = 0.0
        for r, good in enumerate(is_match):  # r: 0-based position in the ranked list
            if not good:
                continue
            found += 1
            precision = found / (r + 1)
            if ap == "standard":
                ap_q += precision
            else:
                old_precision = (found - 1) / r if r != 0 else 1.0
                ap_q += (old_precision + precision) / 2
        ap_total += ap_q / n_good
    out = {f"rank{k}": hits[k] / valid for k in ranks} if valid else {}
    out.update(
        mAP=ap_total / valid if valid else float("nan"),
        num_valid_queries=valid,
        num_queries=len(ql),
        num_invalid_queries=len(ql) - valid,
    )
    return out


def brute_force_rank1(query, query_labels, gallery, gallery_labels) -> float:
    """Share of queries whose most similar gallery item (cosine; ties to the earlier item) shares the label."""
    import torch

    hits = 0
    for q, ql in zip(query, query_labels):
        sims = [torch.nn.functional.cosine_similarity(q, g, dim=0).item() for g in gallery]
        best = max(range(len(sims)), key=lambda j: (sims[j], -j))
        hits += int(int(gallery_labels[best]) == int(ql))
    return hits / len(query)
