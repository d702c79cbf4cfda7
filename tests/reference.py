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


# -- verification and open-set figures ----------------------------------------------------------------------------
def brute_identity_scores(qf, ql, gf, gl) -> dict:
    """Per query, per gallery identity, the best cosine over that identity's images (float64, plain loops).

    Returns lists: ``genuine`` (mated queries, in order), ``impostor`` (row by row, identities ascending),
    ``nonmated_top`` (best other identity per query) and ``identified`` (mated queries: own > best other).
    """
    qf = np.asarray(qf, dtype=np.float64)
    gf = np.asarray(gf, dtype=np.float64)
    qn = qf / np.maximum(np.sqrt((qf * qf).sum(axis=1, keepdims=True)), 1e-12)
    gn = gf / np.maximum(np.sqrt((gf * gf).sum(axis=1, keepdims=True)), 1e-12)
    gl = [int(x) for x in np.asarray(gl).tolist()]
    identities = sorted(set(gl))
    out = {"genuine": [], "impostor": [], "nonmated_top": [], "identified": []}
    for q, label in enumerate(int(x) for x in np.asarray(ql).tolist()):
        best = {}
        for g, ident in enumerate(gl):
            s = float(sum(a * b for a, b in zip(qn[q], gn[g])))
            best[ident] = max(best.get(ident, -np.inf), s)
        others = [best[i] for i in identities if i != label]
        out["impostor"] += others
        out["nonmated_top"].append(max(others) if others else -np.inf)
        if label in best:
            out["genuine"].append(best[label])
            out["identified"].append(best[label] > (max(others) if others else -np.inf))
    return out


def brute_fmr(impostor, t) -> float:
    return sum(1 for s in impostor if s >= t) / len(impostor)


def brute_threshold_at_fmr(impostor, target) -> float:
    """The smallest candidate threshold whose FMR (counted) is at most ``target``: candidates are every score
    and the next float above every score."""
    candidates = sorted(set(impostor) | {float(np.nextafter(s, np.inf)) for s in impostor})
    return next(t for t in candidates if brute_fmr(impostor, t) <= target + 1e-12)


def brute_eer(genuine, impostor) -> float:
    """Walk every distinct score (and +inf) upwards; interpolate linearly where FNMR - FMR turns >= 0."""
    points = []
    for t in sorted(set(genuine) | set(impostor)) + [float("inf")]:
        fmr = brute_fmr(impostor, t)
        fnmr = sum(1 for s in genuine if s < t) / len(genuine)
        points.append((fmr, fnmr))
    for j, (fmr, fnmr) in enumerate(points):
        if fnmr - fmr >= 0:
            if fnmr == fmr:
                return fmr
            f0, n0 = points[j - 1]
            lam = (f0 - n0) / ((fnmr - fmr) - (n0 - f0))
            return f0 + lam * (fmr - f0)
    raise AssertionError("unreachable: at +inf FNMR is 1 and FMR is 0")


def brute_open_set(genuine, identified, nonmated_top, t) -> dict:
    """Match rate, unknown rate and DIR at threshold t, by counting (accepted: score >= t)."""
    accepted = sum(1 for s in genuine if s >= t)
    unknown = sum(1 for s in nonmated_top if not s >= t)
    detected = sum(1 for s, first in zip(genuine, identified) if first and s >= t)
    nan = float("nan")
    return {"match_rate": accepted / len(genuine) if genuine else nan,
            "unknown_rate": unknown / len(nonmated_top) if nonmated_top else nan,
            "dir": detected / len(genuine) if genuine else nan}


def _unit_rows(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.sqrt((x * x).sum(axis=1, keepdims=True)), 1e-12)


def brute_k_reciprocal(qf, gf, k1=20, k2=6, lambda_value=0.3):
    """k-reciprocal re-ranking written from its definition (Zhong et al. 2017, the authors' code): full distance
    matrix, every neighbour list by a stable sort, sets as Python sets, a dense V, and the Jaccard sums pair by pair."""
    x = _unit_rows(np.concatenate([np.asarray(qf, dtype=np.float64), np.asarray(gf, dtype=np.float64)]))
    n, q = len(x), len(qf)
    d = np.maximum(2 - 2 * (x @ x.T), 0)
    d = d / d.max(axis=1, keepdims=True)
    ranked = [sorted(range(n), key=lambda j, i=i: (d[i, j], j)) for i in range(n)]

    def reciprocal(i, k):
        return [j for j in ranked[i][:k + 1] if i in ranked[j][:k + 1]]

    v = np.zeros((n, n))
    for i in range(n):
        r = reciprocal(i, k1)
        expansion = list(r)
        for c in r:
            rc = reciprocal(c, int(round(k1 / 2)))
            if len(set(rc) & set(r)) > 2 / 3 * len(rc):
                expansion += rc
        members = sorted(set(expansion))
        weight = np.exp(-d[i, members])
        v[i, members] = weight / weight.sum()
    if k2 != 1:
        v = np.stack([v[ranked[i][:k2]].mean(axis=0) for i in range(n)])
    jaccard = np.zeros((q, n - q))
    for i in range(q):
        for j in range(q, n):
            shared = np.minimum(v[i], v[j]).sum()
            jaccard[i, j - q] = 1 - shared / (2 - shared)
    return jaccard * (1 - lambda_value) + d[:q, q:] * lambda_value


def brute_alpha_query_expansion(qf, gf, k=5, alpha=3.0):
    """Alpha query expansion from its definition: each feature plus its k nearest others (by distance, then index),
    weighted by max(similarity, 0)^alpha, L2-normalised; queries and gallery alike."""
    x = _unit_rows(np.concatenate([np.asarray(qf, dtype=np.float64), np.asarray(gf, dtype=np.float64)]))
    n = len(x)
    out = []
    for i in range(n):
        others = sorted((j for j in range(n) if j != i), key=lambda j, i=i: (max(2 - 2 * x[i] @ x[j], 0), j))[:k]
        new = x[i] + sum(max(x[i] @ x[j], 0) ** alpha * x[j] for j in others)
        out.append(new / np.linalg.norm(new))
    out = np.array(out)
    return out[:len(qf)], out[len(qf):]
