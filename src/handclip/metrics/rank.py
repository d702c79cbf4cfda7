"""The fast path: CMC Rank-k and mAP from each query's true-match positions, without sorting the gallery.

See the package docstring for the ranking rule and how positions are counted.
"""

from __future__ import annotations

import torch

from handclip.metrics import inputs
from handclip.metrics.inputs import (
    SIM_BYTES,
    acc_dtype,
    check_ap,
    check_chunk_size,
    check_ranks,
    default_rows,
    finish,
    prepare_inputs,
    scratch,
)


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
    ranks = check_ranks(ranks)
    ap = check_ap(ap)
    chunk_size = check_chunk_size(chunk_size)
    qn, ql, gn, gl = prepare_inputs(query_features, query_labels, gallery_features, gallery_labels)
    num_queries = qn.shape[0]
    matches = _MatchTable(ql, gl)
    if matches.num_valid == 0:
        return finish(num_queries, 0, ranks, [], 0.0)

    acc = acc_dtype(qn.device)
    # Mutation testing skips the lines marked "no mutate": their mutants are equivalent on the CPU (a device= or
    # dtype= argument equal to the default there, an ordering or split of work that does not change the result);
    # test_cuda_matches_cpu checks the device arguments on a GPU.
    hit_sums = torch.zeros(len(ranks), dtype=acc, device=qn.device)  # pragma: no mutate
    ap_sum = torch.zeros((), dtype=acc, device=qn.device)  # pragma: no mutate
    rank_t = torch.tensor(ranks, device=qn.device, dtype=torch.int64)  # pragma: no mutate
    scorer = _ChunkScorer(gn)
    for i, j in _chunks(matches.counts_sorted, gn.shape[0], chunk_size):
        q_idx = matches.valid[i:j]
        n, match_idx, slots = matches.slots(q_idx, int(matches.counts_sorted[j - 1]))
        pos = scorer.positions(qn[q_idx], match_idx)
        _accumulate(pos, n, slots, gn.shape[0], rank_t, ap, hit_sums, ap_sum)
    return finish(num_queries, matches.num_valid, ranks, hit_sums.tolist(), ap_sum.item())


def reid_metrics_from_scores(scores, query_labels, gallery_labels, ranks=(1, 5, 10), ap: str = "standard") -> dict:
    """:func:`compute_reid_metrics` from a given Q x G score matrix (higher is nearer), e.g. minus re-ranked
    distances: the same ranking rule (ties by gallery order), positions and figures."""
    ranks, ap = check_ranks(ranks), check_ap(ap)
    scores = torch.as_tensor(scores)
    device = scores.device
    ql = torch.as_tensor(query_labels, device=device).long()
    gl = torch.as_tensor(gallery_labels, device=device).long()
    if scores.shape != (len(ql), len(gl)):
        raise ValueError(f"scores must be (queries, gallery) = ({len(ql)}, {len(gl)}), got {tuple(scores.shape)}")
    matches = _MatchTable(ql, gl)
    if matches.num_valid == 0:
        return finish(len(ql), 0, ranks, [], 0.0)
    acc = acc_dtype(device)
    hit_sums = torch.zeros(len(ranks), dtype=acc, device=device)  # pragma: no mutate
    ap_sum = torch.zeros((), dtype=acc, device=device)  # pragma: no mutate
    rank_t = torch.tensor(ranks, device=device, dtype=torch.int64)  # pragma: no mutate
    gallery_index = torch.arange(len(gl), device=device)  # pragma: no mutate
    rows = max(1, default_rows(len(gl), int(matches.counts_sorted[-1])))
    for i in range(0, matches.num_valid, rows):
        q_idx = matches.valid[i:i + rows]
        n, match_idx, slots = matches.slots(q_idx, int(matches.counts_sorted[min(i + rows, matches.num_valid) - 1]))
        sim = scores[q_idx]
        sim = sim.float() if sim.dtype == torch.float16 else sim  # exact; CPU comparisons want float
        buf = torch.empty(sim.numel() * match_idx.shape[1], dtype=_indicator_dtype(len(gl)), device=device)
        pos = _match_positions(sim, match_idx, gallery_index, match_idx.shape[1], buf)
        _accumulate(pos, n, slots, len(gl), rank_t, ap, hit_sums, ap_sum)
    return finish(len(ql), matches.num_valid, ranks, hit_sums.tolist(), ap_sum.item())


def _accumulate(pos: torch.Tensor, n: torch.Tensor, slots: torch.Tensor, num_gallery: int, rank_t: torch.Tensor,
                ap: str, hit_sums: torch.Tensor, ap_sum: torch.Tensor) -> None:
    """Add a chunk's Rank-k hits and AP to the running sums, from its (C, M) true-match positions."""
    # Padded slots duplicate a real match; push them past the end before sorting.
    pos = torch.where(slots.unsqueeze(0) >= n.unsqueeze(1), torch.full_like(pos, num_gallery), pos)
    pos, _ = torch.sort(pos, dim=1)
    hit_sums += (pos[:, :1] < rank_t.unsqueeze(0)).to(hit_sums.dtype).sum(dim=0)
    ap_sum += _ap_from_sorted_positions(pos, n, ap).sum()


class _MatchTable:
    """The true matches of every query, and the valid queries ordered by their number of matches.

    ``perm`` lists gallery indices grouped by label, ascending gallery index inside a group (stable
    sort), so ``perm[start[q] + i]`` is the i-th true match of query q. Valid queries (at least one
    match) are sorted by their count so that each chunk pads little.
    """

    def __init__(self, ql: torch.Tensor, gl: torch.Tensor):
        sorted_gl, self.perm = torch.sort(gl, stable=True)  # pragma: no mutate (match order within a label is free)
        self.start = torch.searchsorted(sorted_gl, ql)
        self.counts = torch.searchsorted(sorted_gl, ql, right=True) - self.start
        valid = torch.nonzero(self.counts > 0).flatten()
        self.valid = valid[torch.argsort(self.counts[valid], stable=True)]  # pragma: no mutate (order of sums)
        self.counts_sorted = self.counts[self.valid].cpu()
        self.num_valid = int(self.valid.numel())

    def slots(self, q_idx: torch.Tensor, max_count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(match counts, (C, M) gallery indices of the matches padded with the last one, slot numbers)."""
        n = self.counts[q_idx]
        slots = torch.arange(max_count, device=n.device)  # pragma: no mutate
        offs = torch.minimum(slots.unsqueeze(0), (n - 1).unsqueeze(1))
        return n, self.perm[self.start[q_idx].unsqueeze(1) + offs], slots


def _chunks(counts_sorted: torch.Tensor, num_gallery: int, chunk_size: int | None):
    """(start, end) of query chunks over the valid queries, sized from the memory budget if not given."""
    num_valid = counts_sorted.numel()
    i = 0
    while i < num_valid:
        if chunk_size is None:
            rows = default_rows(num_gallery, int(counts_sorted[i]))
            # counts ascend: the chunk's largest count is at its end; re-fit to it.
            last = min(num_valid, i + rows) - 1
            rows = default_rows(num_gallery, int(counts_sorted[last]))
        else:
            rows = chunk_size
        j = min(num_valid, i + rows)
        yield i, j
        i = j


class _ChunkScorer:
    """Similarities of a query chunk against the whole gallery, and the ranked positions of given items.

    Scratch buffers are reused from chunk to chunk.
    """

    def __init__(self, gn: torch.Tensor):
        self.gn_t = gn.t()
        self.num_gallery = gn.shape[0]
        self.gallery_index = torch.arange(self.num_gallery, device=gn.device)  # pragma: no mutate
        self.ind_dtype = _indicator_dtype(self.num_gallery)
        self.ind_itemsize = torch.empty((), dtype=self.ind_dtype).element_size()  # pragma: no mutate
        self.sim_buf = self.ind_buf = None

    def positions(self, queries: torch.Tensor, match_idx: torch.Tensor) -> torch.Tensor:
        c, g, max_m = queries.shape[0], self.num_gallery, match_idx.shape[1]
        self.sim_buf = scratch(self.sim_buf, c * g, torch.float32, queries.device)
        sim = torch.mm(queries, self.gn_t, out=self.sim_buf[: c * g].view(c, g))
        # Match slots per comparison pass: all of them unless that overflows the budget.
        ind_budget = (inputs.DEFAULT_MEMORY_BUDGET_BYTES - c * g * SIM_BYTES) // self.ind_itemsize
        slot_group = max(1, min(max_m, ind_budget // (c * g)))
        self.ind_buf = scratch(self.ind_buf, c * slot_group * g, self.ind_dtype, queries.device)
        return _match_positions(sim, match_idx, self.gallery_index, slot_group, self.ind_buf)


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
        tie = equal > 1  # pragma: no mutate (>= 1 only sends every pair through the exact path below)
        if bool(tie.any()):
            # Exact ties with other gallery items: those with a lower index rank first.
            # Rare in practice, so handled for the affected (query, match) pairs only.
            r, k = torch.nonzero(tie, as_tuple=True)
            block = max(1, inputs.DEFAULT_MEMORY_BUDGET_BYTES // (g * 8))  # pragma: no mutate (splits work only)
            for b0 in range(0, r.numel(), block):
                rb, kb = r[b0 : b0 + block], k[b0 : b0 + block]
                same = sim[rb] == score[rb, kb].unsqueeze(1)  # (T, G)
                same &= gallery_index.unsqueeze(0) < idx[rb, kb].unsqueeze(1)
                greater[rb, kb] += same.sum(dim=1)
        out.append(greater)
    return out[0] if len(out) == 1 else torch.cat(out, dim=1)


def _ap_from_sorted_positions(pos: torch.Tensor, n: torch.Tensor, ap: str) -> torch.Tensor:
    """AP per query from the 0-based ranked positions of its true matches.

    ``pos``: (C, M) positions sorted ascending along dim 1, padded entries (slot >= n) hold
    any value; ``n``: (C,) number of true matches (>= 1). Returns (C,) AP values.
    """
    dtype = acc_dtype(pos.device)
    m = pos.shape[1]
    j = torch.arange(1, m + 1, device=pos.device, dtype=dtype)  # pragma: no mutate (1-based rank among matches)
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
