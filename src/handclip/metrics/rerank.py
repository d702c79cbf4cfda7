"""Re-ranking of a query set against a gallery: k-reciprocal encoding (Zhong et al., CVPR 2017) and alpha query
expansion (Radenović et al., TPAMI 2018), in PyTorch on any device, with memory bounded by the neighbour lists.

Both are *transductive*: every query's new ranking depends on the other queries too (each query and gallery item
is a neighbour candidate of every other). On 11k Hands each test identity has one gallery photo and ~14 queries,
so the gain comes mostly from queries of one person helping each other.

k-reciprocal re-ranking, as in the authors' code, over the N = Q + G query and gallery features (L2-normalised):

* ``d(i, j) = 2 - 2 cos(i, j)`` divided by the largest distance of row i; ``N(i, k)`` the k nearest of i (i itself
  included, ties broken by index);
* ``R(i) = {j in N(i, k1 + 1) : i in N(j, k1 + 1)}``, ``R'(j)`` the same with ``round(k1 / 2)``; ``R(i)`` is expanded
  by every ``R'(c)``, c in R(i), that shares more than two thirds of its members with R(i);
* ``V[i, j] = exp(-d(i, j))`` over the expanded set, normalised to sum 1; then (k2 > 1) every row is replaced by the
  mean of the rows of its k2 nearest;
* ``jaccard(i, j) = 1 - s / (2 - s)`` with ``s = sum_k min(V[i, k], V[j, k])``, and the re-ranked distance
  ``(1 - lambda) * jaccard + lambda * d``, for query i and gallery j.

Here ``V`` is kept sparse (one row holds at most ``(k1 + 1) * (round(k1 / 2) + 2)`` entries, a few dozen in practice)
and the Jaccard sums are a join on the columns of V, chunked, so memory grows with N * k1^2 and the Q x G output,
not with N^2 (the authors' dense V needs 16 bytes x N^2: 6.4 GB at N = 20,000).
"""

from __future__ import annotations

import warnings

import torch

#: Bytes a chunk of the distance pass or the Jaccard join may use (besides the Q x G result).
CHUNK_BYTES = 256 * 2**20


def _normalised(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    x = torch.as_tensor(x).to(dtype)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _nearest(x: torch.Tensor, k: int, chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, k) nearest neighbours of every row of ``x`` by distance then index, and the largest distance per row."""
    n = x.shape[0]
    nearest = torch.empty((n, k), dtype=torch.long, device=x.device)
    two = torch.tensor(2.0, dtype=x.dtype, device=x.device)
    row_max = torch.empty(n, dtype=x.dtype, device=x.device)
    for start in range(0, n, chunk_rows):
        d = torch.addmm(two, x[start:start + chunk_rows], x.t(), alpha=-2).clamp_min_(0)  # 2 - 2 cos
        row_max[start:start + len(d)] = d.max(dim=1).values
        values, index = torch.topk(d, k, dim=1, largest=False)
        kth = values[:, -1:]
        # The k smallest by (distance, index). Where more than k distances reach the k-th one, topk may hold any
        # of the tied items: take all below it, then the lowest indices at it.
        crowded = torch.nonzero((d <= kth).sum(dim=1) > k).flatten()
        if len(crowded):
            rows, t = d[crowded], kth[crowded]
            at = rows == t
            need = k - (rows < t).sum(dim=1, keepdim=True)
            chosen = (rows < t) | (at & (torch.cumsum(at, dim=1) <= need))
            index[crowded] = torch.nonzero(chosen)[:, 1].view(len(crowded), k)
        index, _ = torch.sort(index, dim=1)
        order = torch.argsort(d.gather(1, index), dim=1, stable=True)
        nearest[start:start + len(d)] = index.gather(1, order)
    return nearest, row_max


def _reciprocal(nearest: torch.Tensor) -> torch.Tensor:
    """Mask of the neighbours j of each i (rows of ``nearest``) that have i among their own neighbours."""
    rows = torch.arange(nearest.shape[0], device=nearest.device).view(-1, 1, 1)
    return (nearest[nearest] == rows).any(dim=2)


def _expanded_sets(near: torch.Tensor, half: torch.Tensor, chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, M) members of each expanded k-reciprocal set (padded with -1), unique per row."""
    n, s = near.shape
    t = half.shape[1]
    r_mask = _reciprocal(near)
    h_mask = _reciprocal(half)
    members = []
    for start in range(0, n, chunk_rows):
        stop = min(n, start + chunk_rows)
        r, rm = near[start:stop], r_mask[start:stop]  # R(i): (C, S)
        cand, cm = half[r], h_mask[r]  # R'(c) of each slot c of R(i): (C, S, T)
        inside = ((cand.unsqueeze(3) == r.view(-1, 1, 1, s)) & rm.view(-1, 1, 1, s)).any(dim=3) & cm
        accept = rm & (inside.sum(dim=2) * 3 > 2 * cm.sum(dim=2))  # |R' & R| > 2/3 |R'|
        both = torch.cat([torch.where(rm, r, -1), torch.where(accept.unsqueeze(2) & cm, cand, -1).view(-1, s * t)],
                         dim=1)
        both, _ = torch.sort(both, dim=1)
        both[:, 1:][both[:, 1:] == both[:, :-1]] = -1  # duplicates
        members.append(torch.sort(both, dim=1, descending=True).values)  # members first, padding last
    members = torch.cat(members)
    return members[:, :int((members >= 0).sum(dim=1).max())], r_mask


def _encoding(x: torch.Tensor, members: torch.Tensor, row_max: torch.Tensor, near: torch.Tensor, k2: int):
    """V (after the k2 query expansion) as a coalesced sparse COO tensor, N x N."""
    n, m = members.shape
    valid = members >= 0
    safe = members.clamp_min(0)
    dist = torch.empty(members.shape, dtype=x.dtype, device=x.device)
    step = max(1, CHUNK_BYTES // (n * x.element_size()))
    for start in range(0, n, step):  # a row block of the distances, then its members' columns (no copies of x)
        rows = slice(start, start + step)
        dots = (x[rows] @ x.t()).gather(1, safe[rows])
        dist[rows] = (2 - 2 * dots).clamp_min(0) / row_max[rows].unsqueeze(1)
    weight = torch.where(valid, torch.exp(-dist), torch.zeros_like(dist))
    weight = weight / weight.sum(dim=1, keepdim=True)
    rows = torch.arange(n, device=x.device).unsqueeze(1).expand(n, m)
    v = torch.sparse_coo_tensor(torch.stack([rows[valid], members[valid]]), weight[valid], (n, n),
                                check_invariants=False).coalesce()
    if k2 == 1:
        return v
    # V_qe[i] = mean of V[j] over the k2 nearest j of i: a sparse (N x N) averaging matrix times V
    average = torch.sparse_coo_tensor(
        torch.stack([torch.arange(n, device=x.device).repeat_interleave(k2), near[:, :k2].reshape(-1)]),
        torch.full((n * k2,), 1.0 / k2, dtype=x.dtype, device=x.device), (n, n), check_invariants=False).coalesce()
    with warnings.catch_warnings():  # torch.sparse.mm goes through CSR internally, which torch calls beta
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        return torch.sparse.mm(average, v).coalesce()


def _jaccard(v: torch.Tensor, num_query: int, out_dtype: torch.dtype) -> torch.Tensor:
    """Q x G Jaccard distances between the query rows and the gallery rows of the sparse encoding ``v``."""
    n = v.shape[0]
    (row, col), val = v.indices(), v.values()
    g_sel = row >= num_query
    g_col, order = torch.sort(col[g_sel], stable=True)
    g_row, g_val = row[g_sel][order] - num_query, val[g_sel][order]
    start = torch.searchsorted(g_col, torch.arange(n, device=v.device))
    count = torch.searchsorted(g_col, torch.arange(n, device=v.device), right=True) - start
    q_sel = row < num_query
    q_row, q_col, q_val = row[q_sel], col[q_sel], val[q_sel]
    gallery = n - num_query
    shared = torch.zeros(num_query * gallery, dtype=val.dtype, device=v.device)
    pairs = count[q_col]  # gallery entries sharing each query entry's column
    base = start[q_col]
    ends = torch.cumsum(pairs, 0)
    budget = max(1, CHUNK_BYTES // 32)
    first = 0
    while first < len(q_row):
        last = int(torch.searchsorted(ends, ends[first] - pairs[first] + budget, right=True))
        last = max(last, first + 1)
        p = pairs[first:last]
        begin = torch.cumsum(p, 0) - p  # each query entry's first pair in this chunk
        at = torch.arange(int(p.sum()), device=v.device) + torch.repeat_interleave(base[first:last] - begin, p)
        target = torch.repeat_interleave(q_row[first:last] * gallery, p) + g_row[at]
        shared.index_add_(0, target, torch.minimum(torch.repeat_interleave(q_val[first:last], p), g_val[at]))
        first = last
    shared = shared.view(num_query, gallery)
    return (1 - shared / (2 - shared)).to(out_dtype)


def k_reciprocal_distances(query: torch.Tensor, gallery: torch.Tensor, k1: int = 20, k2: int = 6,
                           lambda_value: float = 0.3, dtype: torch.dtype = torch.float32,
                           out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Re-ranked Q x G distances (lower is nearer) of L2-normalised features, on their device.

    ``dtype`` is the precision of the computation (float64 for exact comparisons), ``out_dtype`` that of the result
    (float16 halves the largest array, the Q x G output, at ~1e-3 resolution of the distances).
    """
    if k1 < 1 or k2 < 1 or not 0 <= lambda_value <= 1:
        raise ValueError(f"k1 and k2 must be >= 1 and lambda in [0, 1], got k1={k1}, k2={k2}, lambda={lambda_value}")
    x = torch.cat([_normalised(query, dtype), _normalised(gallery, dtype)])
    n, q = x.shape[0], len(query)
    k = min(k1 + 1, n)
    chunk_rows = max(1, CHUNK_BYTES // (n * x.element_size() * 4))
    near, row_max = _nearest(x, k, chunk_rows)
    half = near[:, :min(k, int(round(k1 / 2)) + 1)]
    rows_per_chunk = max(1, CHUNK_BYTES // (k * k * half.shape[1]))
    members, _ = _expanded_sets(near, half, rows_per_chunk)
    v = _encoding(x, members, row_max, near, min(k2, k))
    jaccard = _jaccard(v, q, out_dtype or dtype)
    original = ((2 - 2 * (x[:q] @ x[q:].t())).clamp_min_(0) / row_max[:q].unsqueeze(1)).to(out_dtype or dtype)
    return jaccard.mul_(1 - lambda_value).add_(original, alpha=lambda_value)


def alpha_query_expansion(query: torch.Tensor, gallery: torch.Tensor, k: int = 5,
                          alpha: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Alpha query expansion (and the same for the gallery, database-side): every feature becomes the L2-normalised
    sum of itself and its k nearest other features among queries and gallery, weighted by similarity^alpha
    (negative similarities weigh 0). Returns the new (query, gallery) features."""
    if k < 0 or alpha < 0:
        raise ValueError(f"k and alpha must be >= 0, got k={k}, alpha={alpha}")
    x = torch.cat([_normalised(query, torch.float32), _normalised(gallery, torch.float32)])
    n = x.shape[0]
    k = min(k, n - 1)
    near, _ = _nearest(x, k + 1, max(1, CHUNK_BYTES // (n * 4 * 4)))
    rows = torch.arange(n, device=x.device).unsqueeze(1)
    others = near != rows  # itself (first, unless an identical feature of lower index ties with it)
    keep = others & (torch.cumsum(others, dim=1) <= k)
    index = near[keep].view(n, k)
    sim = torch.bmm(x[index], x.unsqueeze(2)).squeeze(2)
    weight = sim.clamp_min(0).pow(alpha)
    out = x + torch.bmm(weight.unsqueeze(1), x[index]).squeeze(1)
    out = out / out.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return out[:len(query)], out[len(query):]
