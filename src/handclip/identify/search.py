"""Exact top-k search of L2-normalised embeddings by matrix product, in gallery chunks of bounded memory.

Scores are cosine similarities (float32 products of the stored rows, float16 rows being widened chunk by
chunk). Results are ordered by decreasing score, ties broken by gallery position (the earlier row first), so
they equal a stable argsort of every query's full score row, without ever holding that row.

Identities score as their best image. The top k identities are found among the top ``m`` images with
``m = (k - 1) * (most images of one identity) + 1``: fewer than k distinct identities among them would mean
that at most k - 1 identities filled all m places, which is impossible. So the identity ranking is exact too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Temporary memory (bytes) one gallery chunk may use: its float32 copy plus the scores of every query.
DEFAULT_CHUNK_BYTES = 256 * 2**20


def chunk_rows(num_queries: int, dim: int, budget: int = DEFAULT_CHUNK_BYTES) -> int:
    """Gallery rows per chunk so that the widened chunk and its score block fit ``budget`` bytes."""
    return max(1, budget // (4 * (dim + num_queries)))


def _order(scores: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row by (-score, index): two stable sorts."""
    by_index = torch.argsort(index, dim=1, stable=True)
    scores, index = scores.gather(1, by_index), index.gather(1, by_index)
    by_score = torch.argsort(-scores, dim=1, stable=True)
    return scores.gather(1, by_score), index.gather(1, by_score)


#: Queries searched together: more share each widened gallery chunk, fewer keep the score block small.
QUERY_BLOCK = 1024


@torch.inference_mode()
def top_k_images(queries: torch.Tensor, gallery: torch.Tensor, k: int, rows: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, gallery indices), each (Q, min(k, G)), of every query's k best gallery rows.

    ``queries`` (Q, D) and ``gallery`` (G, D) hold L2-normalised rows; the gallery may be float16 and
    memory-mapped: only one chunk of ``rows`` rows (default: :func:`chunk_rows`) is widened at a time, and
    at most :data:`QUERY_BLOCK` queries are scored together, so memory stays bounded for any Q and G.
    """
    num_q, num_g = queries.shape[0], gallery.shape[0]
    k = min(int(k), num_g)
    if k < 1:
        raise ValueError(f"k must be >= 1 and the gallery non-empty (k={k}, gallery rows={num_g})")
    queries = queries.to(torch.float32)
    if num_q > QUERY_BLOCK:
        parts = [top_k_images(queries[i:i + QUERY_BLOCK], gallery, k, rows) for i in range(0, num_q, QUERY_BLOCK)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    rows = min(max(rows or chunk_rows(num_q, gallery.shape[1]), k), num_g)
    # Two scratch buffers for the whole search: the widened chunk and its scores (no allocation per chunk).
    block_buf = torch.empty((rows, gallery.shape[1]), dtype=torch.float32, device=queries.device)
    score_buf = torch.empty(num_q * rows, dtype=torch.float32, device=queries.device)
    best_s = torch.empty((num_q, 0), dtype=torch.float32, device=queries.device)
    best_i = torch.empty((num_q, 0), dtype=torch.long, device=queries.device)
    for start in range(0, num_g, rows):
        n = min(rows, num_g - start)
        block = block_buf[:n]
        block.copy_(gallery[start:start + n])
        scores = torch.mm(queries, block.t(), out=score_buf[:num_q * n].view(num_q, n))
        kk = min(k, n)
        vals, idx = scores.topk(min(kk + 1, n), dim=1)
        if vals.shape[1] > kk:
            # The cut falls inside a run of equal scores where the (kk+1)-th equals the kk-th: keep the
            # earliest rows of that run (rare; exact ties come from duplicate images).
            ties = torch.nonzero(vals[:, kk] == vals[:, kk - 1]).flatten().tolist()
            vals, idx = vals[:, :kk].clone(), idx[:, :kk].clone()
            for r in ties:
                cand = torch.nonzero(scores[r] >= vals[r, -1]).flatten()
                s, i = _order(scores[r, cand].unsqueeze(0), cand.unsqueeze(0))
                vals[r], idx[r] = s[0, :kk], i[0, :kk]
        # Merge with the best so far and keep k: memory stays (Q, 2k) whatever the number of chunks.
        best_s, best_i = _order(torch.cat([best_s, vals], dim=1), torch.cat([best_i, idx + start], dim=1))
        best_s, best_i = best_s[:, :k], best_i[:, :k]
    return best_s, best_i


@dataclass
class IdentityHits:
    """Per query, the top identities (best first): label, score, and the gallery row of the best image."""

    labels: list[list[int]]
    scores: list[list[float]]
    rows: list[list[int]]


@torch.inference_mode()
def top_k_identities(queries: torch.Tensor, gallery: torch.Tensor, labels: torch.Tensor, k: int,
                     rows: int | None = None) -> IdentityHits:
    """The k best identities of every query, an identity scoring as its best image (exact; see the module)."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    if labels.shape[0] != gallery.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {gallery.shape[0]} gallery rows")
    counts = torch.bincount(labels)
    k = min(int(k), int((counts > 0).sum()))
    m = min(gallery.shape[0], (k - 1) * int(counts.max()) + 1)
    scores, index = top_k_images(queries, gallery, m, rows)
    cand_labels = labels[index.cpu()].tolist()
    scores_l, index_l = scores.cpu().tolist(), index.cpu().tolist()
    out = IdentityHits([], [], [])
    for lab_row, s_row, i_row in zip(cand_labels, scores_l, index_l):
        seen: dict[int, int] = {}
        for j, lab in enumerate(lab_row):
            if lab not in seen:
                seen[lab] = j
                if len(seen) == k:
                    break
        picks = list(seen.values())
        out.labels.append([lab_row[j] for j in picks])
        out.scores.append([s_row[j] for j in picks])
        out.rows.append([i_row[j] for j in picks])
    return out
