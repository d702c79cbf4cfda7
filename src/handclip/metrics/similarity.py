"""The chunked similarity product alone: the floor that the metrics' cost is measured against."""

from __future__ import annotations

import torch

from handclip.metrics.inputs import check_chunk_size, default_rows, prepare_pair, scratch


def similarity_only(query_features, gallery_features, chunk_size: int | None = None) -> None:
    """Compute (and discard) the chunked cosine-similarity products, nothing else.

    Normalises like :func:`compute_reid_metrics` and multiplies query chunks by the gallery
    with the same default chunking (for one true match per query), so that
    ``time(compute_reid_metrics) / time(similarity_only)`` measures the overhead of the
    metrics over the unavoidable matrix product. Returns ``None``; on CUDA it synchronises
    before returning so that wall-clock timing is meaningful.
    """
    chunk_size = check_chunk_size(chunk_size)
    qn, gn = prepare_pair(query_features, gallery_features)
    if chunk_size is None:
        chunk_size = default_rows(gn.shape[0], 1)
    gn_t = gn.t()
    buf = None
    for i in range(0, qn.shape[0], chunk_size):
        q = qn[i : i + chunk_size]
        buf = scratch(buf, q.shape[0] * gn.shape[0], torch.float32, qn.device)
        torch.mm(q, gn_t, out=buf[: q.shape[0] * gn.shape[0]].view(q.shape[0], gn.shape[0]))
    if qn.device.type == "cuda":
        torch.cuda.synchronize(qn.device)
    return None
