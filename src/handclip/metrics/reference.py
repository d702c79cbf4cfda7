"""The classic way: fully sort every query's similarity row. A slow, independent second opinion."""

from __future__ import annotations

import torch

from handclip.metrics import inputs
from handclip.metrics.inputs import acc_dtype, check_ap, check_chunk_size, check_ranks, finish, prepare_inputs


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
    ranks = check_ranks(ranks)
    ap = check_ap(ap)
    chunk_size = check_chunk_size(chunk_size)
    qn, ql, gn, gl = prepare_inputs(query_features, query_labels, gallery_features, gallery_labels)
    device = qn.device
    num_queries, num_gallery = qn.shape[0], gn.shape[0]
    if chunk_size is None:
        # sim (4 B) + sort values/indices (12 B) + gathered labels/flags/cumsum (~17 B).
        chunk_size = max(1, inputs.DEFAULT_MEMORY_BUDGET_BYTES // (num_gallery * 33))

    acc = acc_dtype(device)
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

    return finish(num_queries, num_valid, ranks, hit_sums.tolist(), ap_sum.item())
