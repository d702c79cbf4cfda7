"""Re-identification metrics (CMC Rank-k and mAP) computed without sorting the gallery.

Every query is compared with every gallery item by cosine similarity (the features are
L2-normalised here, then multiplied). A gallery item is a *true match* of a query when it
carries the same identity label. Queries whose identity does not occur in the gallery are
*invalid*: they are left out of every metric and only counted.

Ranking rule: gallery items are ordered by decreasing similarity; among equal similarities
the earlier gallery index comes first. This makes every result deterministic.

How it avoids a sort
--------------------
Only the positions of a query's true matches matter. The 0-based position of match ``m`` of
query ``q`` in the ranked gallery is::

    #{g : sim[q, g] > sim[q, m]}  +  #{g : sim[q, g] == sim[q, m] and g < m}

so each query's similarity row is compared against its (usually few) true-match scores:
``O(n_matches * G)`` cheap comparisons instead of an ``O(G log G)`` sort. Queries are
processed in chunks (sorted by their number of matches so that padding stays small), sized
from a memory budget; a query with very many matches is further split over match slots.
Each match costs two comparison passes over its query's similarity row (``>`` and ``==``,
written as 0/1 floats because float sums are far faster than bool sums on CPU); exact ties
are then resolved by gallery index for the affected (query, match) pairs only. With about
one match per query the whole computation costs roughly 1.5x the similarity product alone;
the extra cost grows linearly with the number of matches per query.

Public functions
----------------
* :func:`compute_reid_metrics` - the fast, chunked implementation (use this).
* :func:`argsort_reference_metrics` - same inputs and outputs, computed with a full stable
  argsort of every query's similarity row (the classic way); a slow second opinion used by
  tests and as the speed reference in benchmarks.
* :func:`similarity_only` - only the chunked, normalised similarity products, with the same
  default chunking; lets a benchmark time the matrix product alone.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "AP_MODES",
    "DEFAULT_MEMORY_BUDGET_BYTES",
    "argsort_reference_metrics",
    "compute_reid_metrics",
    "similarity_only",
]

#: Accepted values of the ``ap`` argument.
#: ``"standard"``: AP = mean of precision@k over the positions k of the true matches
#: (torchreid / Market-1501 "standard" definition).
#: ``"trapezoid"``: the older rule of layumi's Market-1501 evaluation code, which averages
#: the precision just before and at each true match.
AP_MODES = ("standard", "trapezoid")

#: Rough bound on the temporary memory (bytes) that one chunk may use when ``chunk_size`` is
#: not given.
DEFAULT_MEMORY_BUDGET_BYTES = 256 * 2**20

# Bytes of scratch per (query, gallery) similarity entry and per (query, match, gallery)
# comparison entry (a float32 0/1 indicator).
_SIM_BYTES = 4
_CMP_BYTES = 4


# --------------------------------------------------------------------------- validation


def _to_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        if not x.flags.writeable:
            x = x.copy()
        return torch.from_numpy(np.ascontiguousarray(x))
    try:
        return torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{name} could not be converted to a tensor: {err}") from None


def _prepare_features(x, name: str) -> torch.Tensor:
    t = _to_tensor(x, name)
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (num_items, dim); got shape {tuple(t.shape)}")
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{name} must be real-valued; got dtype {t.dtype}")
    return t


def _prepare_labels(x, name: str, expected_len: int, device: torch.device) -> torch.Tensor:
    t = _to_tensor(x, name)
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D; got shape {tuple(t.shape)}")
    # (an empty list converts to float32: accept it, there is nothing to misread)
    if t.numel() and (t.dtype.is_floating_point or t.is_complex() or t.dtype == torch.bool):
        raise ValueError(f"{name} must hold integer identity labels; got dtype {t.dtype}")
    if t.numel() != expected_len:
        raise ValueError(
            f"{name} has {t.numel()} entries but its features have {expected_len} rows"
        )
    return t.to(device=device, dtype=torch.int64)


def _check_ranks(ranks) -> tuple[int, ...]:
    if isinstance(ranks, (int, np.integer)):
        ranks = (ranks,)
    out = []
    for k in ranks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"ranks must be positive integers; got {ranks!r}")
        out.append(int(k))
    if not out:
        raise ValueError("ranks must contain at least one positive integer")
    return tuple(out)


def _check_ap(ap) -> str:
    if ap not in AP_MODES:
        raise ValueError(f"ap must be one of {', '.join(repr(m) for m in AP_MODES)}; got {ap!r}")
    return ap


def _check_chunk_size(chunk_size) -> int | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer or None; got {chunk_size!r}")
    return int(chunk_size)


def _prepare_inputs(query_features, query_labels, gallery_features, gallery_labels):
    """Validate, convert and L2-normalise. Returns (qn, ql, gn, gl), all on one device."""
    qf = _prepare_features(query_features, "query_features")
    gf = _prepare_features(gallery_features, "gallery_features")
    if qf.device != gf.device:
        raise ValueError(
            f"query_features and gallery_features are on different devices ({qf.device} vs {gf.device})"
        )
    if qf.shape[1] != gf.shape[1]:
        raise ValueError(
            f"feature dimensions differ: query_features has {qf.shape[1]}, "
            f"gallery_features has {gf.shape[1]}"
        )
    if gf.shape[0] == 0:
        raise ValueError("the gallery is empty (gallery_features has 0 rows)")
    if gf.shape[1] == 0:
        raise ValueError("features have dimension 0")
    device = qf.device
    ql = _prepare_labels(query_labels, "query_labels", qf.shape[0], device)
    gl = _prepare_labels(gallery_labels, "gallery_labels", gf.shape[0], device)

    return _normalize(qf, "query_features"), ql, _normalize(gf, "gallery_features"), gl


def _normalize(t: torch.Tensor, name: str) -> torch.Tensor:
    """Rows scaled to unit L2 norm in float32 (all-zero rows stay zero, like F.normalize)."""
    t = t.detach().to(torch.float32)
    norms = torch.linalg.vector_norm(t, ord=2, dim=1, keepdim=True)
    # A NaN/inf entry makes its row norm non-finite: the check costs no extra pass.
    if norms.numel() and not bool(torch.isfinite(norms).all()):
        raise ValueError(
            f"{name} contains NaN or infinite values (or values so large that the norm overflows)"
        )
    return t / norms.clamp_min(1e-12)


def _acc_dtype(device: torch.device) -> torch.dtype:
    # float64 for the (small) per-query AP arithmetic, except where the backend lacks it.
    return torch.float32 if device.type == "mps" else torch.float64


def _default_rows(num_gallery: int, max_matches: int) -> int:
    """Queries per chunk so that similarities plus comparison scratch fit in the budget."""
    budget = DEFAULT_MEMORY_BUDGET_BYTES
    cmp_bytes = _CMP_BYTES * (2 if num_gallery >= 2**24 else 1)
    per_query = num_gallery * (_SIM_BYTES + cmp_bytes * max(1, max_matches))
    return max(1, budget // per_query)


def _scratch(buf: torch.Tensor | None, numel: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A flat scratch tensor of at least ``numel`` elements, reusing ``buf`` when big enough."""
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype, device=device)
    return buf


def _finish(num_queries: int, num_valid: int, ranks, hit_sums, ap_sum) -> dict:
    if num_queries == 0:
        raise ValueError("no valid query: the query set is empty")
    if num_valid == 0:
        raise ValueError(
            f"no valid query: none of the {num_queries} query identities has a true match "
            "in the gallery, so Rank-k and mAP are undefined"
        )
    result = {}
    for k, s in zip(ranks, hit_sums):
        result[f"rank{k}"] = float(s) / num_valid
    result["mAP"] = float(ap_sum) / num_valid
    result["num_valid_queries"] = int(num_valid)
    result["num_queries"] = int(num_queries)
    result["num_invalid_queries"] = int(num_queries - num_valid)
    return result


def _ap_from_sorted_positions(pos: torch.Tensor, n: torch.Tensor, ap: str) -> torch.Tensor:
    """AP per query from the 0-based ranked positions of its true matches.

    ``pos``: (C, M) positions sorted ascending along dim 1, padded entries (slot >= n) hold
    any value; ``n``: (C,) number of true matches (>= 1). Returns (C,) AP values.
    """
    dtype = _acc_dtype(pos.device)
    m = pos.shape[1]
    j = torch.arange(1, m + 1, device=pos.device, dtype=dtype)  # 1-based rank among matches
    valid = j.unsqueeze(0) <= n.unsqueeze(1).to(dtype)
    p = pos.to(dtype)
    precision = j / (p + 1.0)
    if ap == "standard":
        terms = precision
    else:  # trapezoid
        old = torch.where(p > 0, (j - 1.0) / p.clamp_min(1.0), torch.ones_like(p))
        terms = (old + precision) * 0.5
    terms = torch.where(valid, terms, torch.zeros_like(terms))
    return terms.sum(dim=1) / n.to(dtype)


# --------------------------------------------------------------------------- fast path


def _match_table(ql: torch.Tensor, gl: torch.Tensor):
    """For each query: where its true matches start in ``perm`` and how many there are.

    ``perm`` lists gallery indices grouped by label, ascending gallery index inside a group
    (stable sort), so ``perm[start[q] + i]`` is the i-th true match of query q.
    """
    sorted_gl, perm = torch.sort(gl, stable=True)
    start = torch.searchsorted(sorted_gl, ql, right=False)
    end = torch.searchsorted(sorted_gl, ql, right=True)
    return perm, start, end - start


def _indicator_dtype(num_gallery: int) -> torch.dtype:
    # Comparison results are written as 0/1 floats: float sums are much faster than bool
    # sums on CPU, and float32 adds 0/1 values exactly while the count stays below 2**24.
    return torch.float32 if num_gallery < 2**24 else torch.float64


def _match_positions(
    sim: torch.Tensor,
    match_idx: torch.Tensor,
    gallery_index: torch.Tensor,
    slot_group: int,
    buf: torch.Tensor,
) -> torch.Tensor:
    """0-based ranked positions of the given gallery items in each similarity row.

    ``sim``: (C, G); ``match_idx``: (C, M) gallery indices. Ties go to the lower gallery
    index. Match slots are processed ``slot_group`` at a time; ``buf`` is a flat scratch
    tensor with at least ``C * slot_group * G`` elements. Returns (C, M) int64.
    """
    c, g = sim.shape
    row = sim.unsqueeze(1)  # (C, 1, G)
    out = []
    for s0 in range(0, match_idx.shape[1], slot_group):
        idx = match_idx[:, s0 : s0 + slot_group]  # (C, S)
        score = sim.gather(1, idx)  # (C, S)
        ind = buf[: idx.numel() * g].view(c, idx.shape[1], g)
        torch.gt(row, score.unsqueeze(2), out=ind)
        greater = ind.sum(dim=2).to(torch.int64)  # (C, S)
        torch.eq(row, score.unsqueeze(2), out=ind)
        equal = ind.sum(dim=2)  # counts the match itself too
        tie = equal > 1
        if bool(tie.any()):
            # Exact ties with other gallery items: those with a lower index rank first.
            # Rare in practice, so handled for the affected (query, match) pairs only.
            r, k = torch.nonzero(tie, as_tuple=True)
            block = max(1, DEFAULT_MEMORY_BUDGET_BYTES // (g * 8))
            for b0 in range(0, r.numel(), block):
                rb, kb = r[b0 : b0 + block], k[b0 : b0 + block]
                same = sim[rb] == score[rb, kb].unsqueeze(1)  # (T, G)
                same &= gallery_index.unsqueeze(0) < idx[rb, kb].unsqueeze(1)
                greater[rb, kb] += same.sum(dim=1)
        out.append(greater)
    return out[0] if len(out) == 1 else torch.cat(out, dim=1)


def compute_reid_metrics(
    query_features,
    query_labels,
    gallery_features,
    gallery_labels,
    ranks=(1, 5, 10),
    ap: str = "standard",
    chunk_size: int | None = None,
) -> dict:
    """CMC Rank-k and mAP for a query set searched against a gallery.

    Args:
        query_features: (Q, D) tensor or array. L2-normalised here (in float32).
        query_labels: (Q,) integer identity labels (tensor, array or list).
        gallery_features: (G, D) tensor or array on the same device as the queries.
        gallery_labels: (G,) integer identity labels.
        ranks: the k of the Rank-k (CMC) scores to report.
        ap: ``"standard"`` (torchreid: AP = (1/n) * sum_j j / pos_j, pos_j the 1-based
            position of the j-th true match) or ``"trapezoid"`` (layumi's Market-1501 code).
        chunk_size: queries per chunk; default chosen from a memory budget
            (:data:`DEFAULT_MEMORY_BUDGET_BYTES`) and the number of true matches per query.

    Returns:
        ``{"rank1": ..., "rank5": ..., "rank10": ..., "mAP": ..., "num_valid_queries": int,
        "num_queries": int, "num_invalid_queries": int}``; scores are floats in [0, 1]
        averaged over the valid queries (those with at least one true match in the gallery).

    Raises:
        ValueError: malformed inputs, an unknown ``ap``, or no valid query at all.

    Ranking is by decreasing cosine similarity, ties broken by gallery order (earlier
    first). Runs on the features' device without sorting the gallery.
    """
    ranks = _check_ranks(ranks)
    ap = _check_ap(ap)
    chunk_size = _check_chunk_size(chunk_size)
    qn, ql, gn, gl = _prepare_inputs(query_features, query_labels, gallery_features, gallery_labels)
    device = qn.device
    num_queries, num_gallery = qn.shape[0], gn.shape[0]

    perm, start, n_matches = _match_table(ql, gl)
    # Valid queries, ordered by their number of true matches so each chunk pads little.
    valid_idx = torch.nonzero(n_matches > 0).flatten()
    order = torch.argsort(n_matches[valid_idx], stable=True)
    valid_idx = valid_idx[order]
    n_sorted_cpu = n_matches[valid_idx].cpu()
    q_sorted = qn[valid_idx]  # contiguous, so each chunk is a plain slice
    num_valid = int(valid_idx.numel())
    if num_valid == 0:
        return _finish(num_queries, 0, ranks, [], 0.0)

    acc = _acc_dtype(device)
    hit_sums = torch.zeros(len(ranks), dtype=acc, device=device)
    ap_sum = torch.zeros((), dtype=acc, device=device)
    rank_t = torch.tensor(ranks, device=device, dtype=torch.int64)
    gallery_index = torch.arange(num_gallery, device=device)
    gn_t = gn.t()
    ind_dtype = _indicator_dtype(num_gallery)
    ind_itemsize = torch.empty((), dtype=ind_dtype).element_size()
    sim_buf = ind_buf = None

    i = 0
    while i < num_valid:
        if chunk_size is None:
            rows = _default_rows(num_gallery, int(n_sorted_cpu[i]))
            # n is ascending: the chunk's largest count is at its end; re-fit to it.
            last = min(num_valid, i + rows) - 1
            rows = _default_rows(num_gallery, int(n_sorted_cpu[last]))
        else:
            rows = chunk_size
        j = min(num_valid, i + rows)
        max_m = int(n_sorted_cpu[j - 1])
        q_idx = valid_idx[i:j]
        c = j - i

        n = n_matches[q_idx]  # (C,)
        slots = torch.arange(max_m, device=device)
        # Pad with the query's last true match (masked out later by n).
        offs = torch.minimum(slots.unsqueeze(0), (n - 1).unsqueeze(1))
        match_idx = perm[start[q_idx].unsqueeze(1) + offs]  # (C, M)

        sim_buf = _scratch(sim_buf, c * num_gallery, torch.float32, device)
        sim = torch.mm(q_sorted[i:j], gn_t, out=sim_buf[: c * num_gallery].view(c, num_gallery))
        # Match slots per comparison pass: all of them unless that overflows the budget.
        ind_budget = (DEFAULT_MEMORY_BUDGET_BYTES - c * num_gallery * _SIM_BYTES) // ind_itemsize
        slot_group = max(1, min(max_m, ind_budget // (c * num_gallery)))
        ind_buf = _scratch(ind_buf, c * slot_group * num_gallery, ind_dtype, device)
        pos = _match_positions(sim, match_idx, gallery_index, slot_group, ind_buf)
        del sim
        # Padded slots duplicate a real match; push them past the end before sorting.
        pad = slots.unsqueeze(0) >= n.unsqueeze(1)
        pos = torch.where(pad, torch.full_like(pos, num_gallery), pos)
        pos, _ = torch.sort(pos, dim=1)

        first = pos[:, 0]
        hit_sums += (first.unsqueeze(1) < rank_t.unsqueeze(0)).to(acc).sum(dim=0)
        ap_sum += _ap_from_sorted_positions(pos, n, ap).sum()
        i = j

    return _finish(num_queries, num_valid, ranks, hit_sums.tolist(), ap_sum.item())


# --------------------------------------------------------------------------- reference


def argsort_reference_metrics(
    query_features,
    query_labels,
    gallery_features,
    gallery_labels,
    ranks=(1, 5, 10),
    ap: str = "standard",
    chunk_size: int | None = None,
) -> dict:
    """Same contract as :func:`compute_reid_metrics`, computed the classic way.

    Every query's similarity row is fully sorted (stable argsort of the negated row, so ties
    keep gallery order); true-match flags are read off the ranked list and CMC/AP follow
    from their cumulative sums. Slower (``O(Q G log G)``); meant as an independent check
    and as the speed reference for benchmarks. ``chunk_size`` bounds queries per batch.
    """
    ranks = _check_ranks(ranks)
    ap = _check_ap(ap)
    chunk_size = _check_chunk_size(chunk_size)
    qn, ql, gn, gl = _prepare_inputs(query_features, query_labels, gallery_features, gallery_labels)
    device = qn.device
    num_queries, num_gallery = qn.shape[0], gn.shape[0]
    if chunk_size is None:
        # sim (4 B) + sort values/indices (12 B) + gathered labels/flags/cumsum (~17 B).
        chunk_size = max(1, DEFAULT_MEMORY_BUDGET_BYTES // (num_gallery * 33))

    acc = _acc_dtype(device)
    hit_sums = torch.zeros(len(ranks), dtype=acc, device=device)
    ap_sum = torch.zeros((), dtype=acc, device=device)
    num_valid = 0
    rank_t = torch.tensor(ranks, device=device, dtype=torch.int64)
    positions = torch.arange(1, num_gallery + 1, device=device, dtype=acc)  # 1-based
    for i in range(0, num_queries, chunk_size):
        sim = qn[i : i + chunk_size] @ gn.t()
        order = torch.argsort(-sim, dim=1, stable=True)
        del sim
        good = gl[order] == ql[i : i + chunk_size].unsqueeze(1)  # (C, G) ranked flags
        del order
        n = good.sum(dim=1)
        keep = n > 0
        if not bool(keep.any()):
            continue
        good, n = good[keep], n[keep]
        num_valid += int(keep.sum())

        first = good.to(torch.int8).argmax(dim=1)  # 0-based position of the first match
        hit_sums += (first.unsqueeze(1) < rank_t.unsqueeze(0)).to(acc).sum(dim=0)

        cum = good.to(acc).cumsum(dim=1)  # matches up to and including each position
        precision = cum / positions
        if ap == "standard":
            terms = precision
        else:
            prev = cum - 1.0  # matches strictly before a match position
            old = torch.where(positions > 1, prev / (positions - 1.0).clamp_min(1.0), torch.ones_like(prev))
            terms = (old + precision) * 0.5
        ap_sum += (torch.where(good, terms, torch.zeros_like(terms)).sum(dim=1) / n.to(acc)).sum()

    return _finish(num_queries, num_valid, ranks, hit_sums.tolist(), ap_sum.item())


# --------------------------------------------------------------------------- benchmark helper


def similarity_only(query_features, gallery_features, chunk_size: int | None = None) -> None:
    """Compute (and discard) the chunked cosine-similarity products, nothing else.

    Normalises like :func:`compute_reid_metrics` and multiplies query chunks by the gallery
    with the same default chunking (for one true match per query), so that
    ``time(compute_reid_metrics) / time(similarity_only)`` measures the overhead of the
    metrics over the unavoidable matrix product. Returns ``None``; on CUDA it synchronises
    before returning so that wall-clock timing is meaningful.
    """
    chunk_size = _check_chunk_size(chunk_size)
    qf = _prepare_features(query_features, "query_features")
    gf = _prepare_features(gallery_features, "gallery_features")
    if qf.shape[1] != gf.shape[1]:
        raise ValueError(
            f"feature dimensions differ: query_features has {qf.shape[1]}, "
            f"gallery_features has {gf.shape[1]}"
        )
    if gf.shape[0] == 0:
        raise ValueError("the gallery is empty (gallery_features has 0 rows)")
    qn = _normalize(qf, "query_features")
    gn = _normalize(gf, "gallery_features")
    if chunk_size is None:
        chunk_size = _default_rows(gn.shape[0], 1)
    gn_t = gn.t()
    buf = None
    for i in range(0, qn.shape[0], chunk_size):
        q = qn[i : i + chunk_size]
        buf = _scratch(buf, q.shape[0] * gn.shape[0], torch.float32, qn.device)
        torch.mm(q, gn_t, out=buf[: q.shape[0] * gn.shape[0]].view(q.shape[0], gn.shape[0]))
    if qn.device.type == "cuda":
        torch.cuda.synchronize(qn.device)
    return None
