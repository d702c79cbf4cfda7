"""Exact chunked top-k search against a stable argsort of every full score row, exact ties included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from handclip.identify.search import chunk_rows, top_k_identities, top_k_images


def tied_data(seed: int, g: int = 40, q: int = 9, d: int = 6):
    """Small integer vectors: every product is exact in float32, so equal scores are really equal; some
    gallery rows are repeated (duplicate photos) to force ties, also across chunk borders."""
    rng = np.random.default_rng(seed)
    gallery = rng.integers(-2, 3, size=(g, d)).astype(np.float32)
    gallery[rng.choice(g, size=g // 4, replace=False)] = gallery[rng.choice(g, size=g // 4)]
    queries = rng.integers(-2, 3, size=(q, d)).astype(np.float32)
    return queries, gallery


def reference_top_k(queries: np.ndarray, gallery: np.ndarray, k: int):
    scores = queries.astype(np.int64) @ gallery.astype(np.int64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


@pytest.mark.parametrize("rows", [1, 3, 7, None])
@pytest.mark.parametrize("seed", range(4))
def test_top_k_images_equal_a_stable_argsort(seed, rows):
    queries, gallery = tied_data(seed)
    for k in (1, 5, 40, 100):
        scores, index = top_k_images(torch.from_numpy(queries), torch.from_numpy(gallery), k, rows=rows)
        ref_scores, ref_index = reference_top_k(queries, gallery, k)
        assert index.tolist() == ref_index.tolist(), (k, rows)
        assert scores.tolist() == ref_scores.astype(np.float32).tolist()


def test_float16_gallery_is_widened_chunk_by_chunk():
    queries, gallery = tied_data(7, g=300)
    half = torch.from_numpy(gallery).to(torch.float16)  # small integers: exact in float16
    _, index = top_k_images(torch.from_numpy(queries), half, 10, rows=64)
    assert index.tolist() == reference_top_k(queries, gallery, 10)[1].tolist()


def reference_identities(queries, gallery, labels, k):
    scores = queries.astype(np.int64) @ gallery.astype(np.int64).T
    out = []
    for row in scores:
        seen: dict[int, int] = {}
        for g in np.argsort(-row, kind="stable"):
            seen.setdefault(int(labels[g]), int(g))
            if len(seen) == k:
                break
        out.append(seen)
    return out


@pytest.mark.parametrize("seed", range(4))
def test_top_k_identities_score_each_identity_by_its_best_image(seed):
    queries, gallery = tied_data(seed, g=60)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 9, size=60)
    labels[:20] = 3  # one identity with many images: the candidate count must cover it
    for k in (1, 4, 9, 20):
        hits = top_k_identities(torch.from_numpy(queries), torch.from_numpy(gallery), torch.from_numpy(labels), k,
                                rows=11)
        for n, expected in enumerate(reference_identities(queries, gallery, labels, k)):
            assert hits.labels[n] == list(expected) and hits.rows[n] == list(expected.values())
            best = [float(max(queries[n] @ gallery[g] for g in np.flatnonzero(labels == lab))) for lab in expected]
            assert hits.scores[n] == best


def test_chunk_rows_bound_the_temporary_memory():
    rows = chunk_rows(num_queries=256, dim=512, budget=256 * 2**20)
    assert rows * 4 * (512 + 256) <= 256 * 2**20 < (rows + 1) * 4 * (512 + 256)
    assert isinstance(rows, int)  # a number of rows, used to slice
    assert chunk_rows(num_queries=256, dim=512, budget=100) == 1  # at least one row, however small the budget
    with pytest.raises(ValueError, match="k must be >= 1"):
        top_k_images(torch.ones(1, 2), torch.ones(3, 2), 0)


def test_queries_are_searched_in_blocks(monkeypatch):
    import handclip.identify.search as search

    monkeypatch.setattr(search, "QUERY_BLOCK", 2)  # 9 queries: blocks of 2, 2, 2, 2, 1
    queries, gallery = tied_data(11)
    scores, index = top_k_images(torch.from_numpy(queries), torch.from_numpy(gallery), 6, rows=5)
    ref_scores, ref_index = reference_top_k(queries, gallery, 6)
    assert index.tolist() == ref_index.tolist() and scores.tolist() == ref_scores.astype(np.float32).tolist()
