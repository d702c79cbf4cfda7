"""Tests for handclip.metrics, checked against an independent brute-force reference."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from reference import brute_force_metrics

from handclip.metrics import (
    argsort_reference_metrics,
    compute_reid_metrics,
    similarity_only,
)
from handclip.metrics import inputs as metrics_inputs

AP_MODES = ("standard", "trapezoid")


def assert_same(result, expected, abs_tol=1e-6):
    assert set(result) == set(expected)
    for key, value in expected.items():
        if key.startswith("num_"):
            assert result[key] == value, key
            assert type(result[key]) is int, key
        else:
            assert result[key] == pytest.approx(value, abs=abs_tol), key
            assert type(result[key]) is float, key
            assert 0.0 <= result[key] <= 1.0, key


# --------------------------------------------------------------------------- data


def random_reid_data(seed=0, num_ids=50, num_gallery_ids=44, dim=16, num_queries=61):
    """Clustered embeddings: ids >= num_gallery_ids appear only among the queries."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_ids, dim))
    gallery_labels = np.concatenate(
        [np.full(rng.integers(1, 6), i) for i in range(num_gallery_ids)]
    )
    rng.shuffle(gallery_labels)
    gallery = centres[gallery_labels] + 0.9 * rng.normal(size=(len(gallery_labels), dim))
    query_labels = rng.integers(0, num_ids, size=num_queries)
    queries = centres[query_labels] + 0.9 * rng.normal(size=(num_queries, dim))
    return (
        torch.tensor(queries, dtype=torch.float32),
        torch.tensor(query_labels),
        torch.tensor(gallery, dtype=torch.float32),
        torch.tensor(gallery_labels),
    )


def tie_heavy_data(seed=0, num_queries=40, num_gallery=90, num_ids=8):
    """Features from a small set of vectors in {-1,0,1}^4 with norm 1 or 2 (and a zero vector).

    Normalised entries are 0, +-0.5 or +-1 and every dot product is a sum of four such
    products, so all similarities are exact and equal values really are equal: many ties,
    decided only by gallery order.
    """
    rng = np.random.default_rng(seed)
    atoms = [np.eye(4)[i] * s for i in range(4) for s in (1, -1)]
    atoms += [np.array(signs, dtype=float) for signs in rng.choice([-1.0, 1.0], size=(6, 4))]
    atoms.append(np.zeros(4))
    atoms = np.stack(atoms)
    g_idx = rng.integers(0, len(atoms), size=num_gallery)
    q_idx = rng.integers(0, len(atoms), size=num_queries)
    gallery_labels = rng.integers(0, num_ids, size=num_gallery)
    query_labels = rng.integers(0, num_ids + 2, size=num_queries)  # some ids absent
    return (
        # Scaled by 3: norms become 3 or 6, and 3/3, 3/6 are still exact.
        torch.tensor(atoms[q_idx] * 3.0, dtype=torch.float32),
        torch.tensor(query_labels),
        torch.tensor(atoms[g_idx], dtype=torch.float32),
        torch.tensor(gallery_labels),
    )


# --------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("ap", AP_MODES)
@pytest.mark.parametrize("chunk_size", [None, 1, 7, 13, 1000])
def test_random_embeddings_match_brute_force(ap, chunk_size):
    qf, ql, gf, gl = random_reid_data(seed=1)
    expected = brute_force_metrics(qf, ql, gf, gl, ranks=(1, 5, 10), ap=ap)
    assert expected["num_invalid_queries"] > 0  # the data really contains absent identities
    assert 0.2 < expected["rank1"] < 1.0  # and is neither trivial nor hopeless
    result = compute_reid_metrics(qf, ql, gf, gl, ranks=(1, 5, 10), ap=ap, chunk_size=chunk_size)
    assert_same(result, expected)


@pytest.mark.parametrize("seed", [2, 3])
def test_random_embeddings_other_seeds_and_ranks(seed):
    qf, ql, gf, gl = random_reid_data(seed=seed, num_ids=30, num_gallery_ids=27, dim=8, num_queries=45)
    ranks = (1, 2, 3, 20, 10_000)
    for ap in AP_MODES:
        expected = brute_force_metrics(qf, ql, gf, gl, ranks=ranks, ap=ap)
        result = compute_reid_metrics(qf, ql, gf, gl, ranks=ranks, ap=ap, chunk_size=4)
        assert_same(result, expected)
    assert result["rank10000"] == 1.0


@pytest.mark.parametrize("ap", AP_MODES)
@pytest.mark.parametrize("chunk_size", [None, 1, 7, 64])
def test_tie_heavy_data_match_brute_force(ap, chunk_size):
    qf, ql, gf, gl = tie_heavy_data(seed=4)
    sims = (torch.nn.functional.normalize(qf, dim=1) @ torch.nn.functional.normalize(gf, dim=1).T)
    # Sanity: the data is tie-heavy, and every similarity is one of the exact values.
    assert len(torch.unique(sims)) <= 9
    assert (sims * 4 == torch.round(sims * 4)).all()
    expected = brute_force_metrics(qf, ql, gf, gl, ranks=(1, 3, 5), ap=ap)
    result = compute_reid_metrics(qf, ql, gf, gl, ranks=(1, 3, 5), ap=ap, chunk_size=chunk_size)
    assert_same(result, expected, abs_tol=1e-12)


@pytest.mark.parametrize("seed", [0, 5])
def test_rank_k_and_map_agree_with_torchmetrics_retrieval(seed):
    """A second, independent library: torchmetrics' retrieval metrics per query (hit rate at k = CMC Rank-k,
    average precision = torchreid's AP), averaged over the valid queries, on data without ties (where both
    rankings are the same whatever the tie rule)."""
    from torchmetrics.functional.retrieval import retrieval_average_precision, retrieval_hit_rate

    q, ql, g, gl = random_reid_data(seed=seed)
    sim = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(g, dim=1).T
    assert all(len(row.unique()) == len(row) for row in sim)  # no ties
    # torchmetrics counts a relevant item with a score <= 0 as irrelevant: cosine similarities shifted by 2 (all
    # positive, same order)
    sim = sim.double() + 2
    ranks = (1, 3, 5, 10)
    hits = {k: [] for k in ranks}
    aps = []
    for i in range(len(q)):
        target = gl == ql[i]
        if not target.any():
            continue  # invalid query: left out, as HandCLIP does
        for k in ranks:
            hits[k].append(float(retrieval_hit_rate(sim[i], target, top_k=k)))
        aps.append(float(retrieval_average_precision(sim[i], target)))
    result = compute_reid_metrics(q, ql, g, gl, ranks=ranks, ap="standard")
    assert result["num_valid_queries"] == len(aps) < len(q)
    assert 0 < result["rank1"] < result["rank10"] < 1  # not a degenerate case
    for k in ranks:
        assert result[f"rank{k}"] == pytest.approx(np.mean(hits[k]), abs=1e-6), k
    assert result["mAP"] == pytest.approx(np.mean(aps), abs=1e-6)


def test_ties_are_broken_by_gallery_order():
    v = [1.0, 1.0, 1.0, 1.0]
    w = [1.0, -1.0, 1.0, -1.0]  # orthogonal to v
    query = torch.tensor([v])
    # Three identical copies of v: similarity 1 for all, so only their order decides.
    gallery = torch.tensor([w, v, v, v])
    # Query id 2. Ranked list: g1 (id 1), g2 (id 2), g3 (id 1), g0 (id 2).
    result = compute_reid_metrics(query, [2], gallery, [2, 1, 2, 1], ranks=(1, 2))
    # Matches at 1-based positions 2 and 4: AP = (1/2 + 2/4) / 2 = 1/2.
    assert result["rank1"] == 0.0
    assert result["rank2"] == 1.0
    assert result["mAP"] == pytest.approx(0.5, abs=1e-12)
    # Swap the labels of the tied copies: the match now ranks first.
    result = compute_reid_metrics(query, [2], gallery, [2, 2, 1, 1], ranks=(1, 2))
    # Matches at positions 1 and 4: AP = (1/1 + 2/4) / 2 = 3/4.
    assert result["rank1"] == 1.0
    assert result["mAP"] == pytest.approx(0.75, abs=1e-12)
    for res in (
        argsort_reference_metrics(query, [2], gallery, [2, 2, 1, 1], ranks=(1, 2)),
        brute_force_metrics(query, [2], gallery, [2, 2, 1, 1], ranks=(1, 2)),
    ):
        assert res["rank1"] == 1.0 and res["mAP"] == pytest.approx(0.75, abs=1e-12)


def test_zero_query_vector_ranks_purely_by_gallery_order():
    gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    query = torch.zeros(1, 2)  # similarity 0 with everything
    result = compute_reid_metrics(query, [5], gallery, [1, 2, 5, 5], ranks=(1, 3))
    # Matches at positions 3 and 4: AP = (1/3 + 2/4) / 2 = 5/12.
    assert result["rank1"] == 0.0
    assert result["rank3"] == 1.0
    assert result["mAP"] == pytest.approx(5 / 12, abs=1e-12)


def _angles_gallery(order_angles_deg):
    """2-D unit vectors at the given angles; a query at angle 0 ranks them by |angle|."""
    a = np.deg2rad(np.asarray(order_angles_deg, dtype=np.float64))
    return torch.tensor(np.stack([np.cos(a), np.sin(a)], axis=1), dtype=torch.float32)


def test_hand_computed_two_queries():
    # Five gallery items at angles 30, 40, 10, 50, 20 degrees; a query at 0 degrees ranks
    # them by angle: g2 (10), g4 (20), g0 (30), g1 (40), g3 (50).
    gallery = _angles_gallery([30, 40, 10, 50, 20])
    query = _angles_gallery([0])

    # Query A, id 7 = labels of g0 and g2 -> ranked list  M x M x x : matches at 1-based
    # positions 1 and 3.
    labels_a = [7, 8, 7, 9, 3]
    res_a = {ap: compute_reid_metrics(query, [7], gallery, labels_a, ranks=(1, 2, 5), ap=ap) for ap in AP_MODES}
    # standard:  (1/1 + 2/3) / 2 = 5/6
    # trapezoid: match 0 at r=0: precision 1/1, old precision 1 (r == 0) -> (1 + 1)/2     = 1
    #            match 1 at r=2: precision 2/3, old precision 1/2        -> (1/2 + 2/3)/2 = 7/12
    #            AP = (1 + 7/12) / 2 = 19/24
    assert res_a["standard"]["mAP"] == pytest.approx(float(Fraction(5, 6)), abs=1e-12)
    assert res_a["trapezoid"]["mAP"] == pytest.approx(float(Fraction(19, 24)), abs=1e-12)
    for ap in AP_MODES:
        assert res_a[ap]["rank1"] == 1.0 and res_a[ap]["rank5"] == 1.0

    # Query B, id 4 = labels of g3 and g4 -> ranked list  x M x x M : matches at 1-based
    # positions 2 and 5.
    labels_b = [1, 2, 3, 4, 4]
    res_b = {ap: compute_reid_metrics(query, [4], gallery, labels_b, ranks=(1, 2, 5), ap=ap) for ap in AP_MODES}
    # standard:  (1/2 + 2/5) / 2 = 9/20
    # trapezoid: match 0 at r=1: precision 1/2, old precision 0/1 = 0 -> (0 + 1/2)/2   = 1/4
    #            match 1 at r=4: precision 2/5, old precision 1/4      -> (1/4 + 2/5)/2 = 13/40
    #            AP = (1/4 + 13/40) / 2 = 23/80
    assert res_b["standard"]["mAP"] == pytest.approx(float(Fraction(9, 20)), abs=1e-12)
    assert res_b["trapezoid"]["mAP"] == pytest.approx(float(Fraction(23, 80)), abs=1e-12)
    assert res_b["standard"]["rank1"] == 0.0
    assert res_b["standard"]["rank2"] == 1.0
    assert res_b["standard"]["rank5"] == 1.0

    # Both in one call: gallery = the five items (labels A) followed by their negations
    # (labels B + 100); query A at 0 degrees, query B (id 104) at 180 degrees. Each query
    # sees its own half in the order above, the other half after it, with no matches there.
    gallery2 = torch.cat([gallery, -gallery])
    labels2 = labels_a + [100 + x for x in labels_b]
    queries = torch.cat([query, -query])
    combined = {
        ap: compute_reid_metrics(queries, [7, 104], gallery2, labels2, ranks=(1, 2, 5), ap=ap, chunk_size=1)
        for ap in AP_MODES
    }
    # standard:  (5/6 + 9/20) / 2 = (50/60 + 27/60) / 2 = 77/120
    # trapezoid: (19/24 + 23/80) / 2 = (190/240 + 69/240) / 2 = 259/480
    assert combined["standard"]["mAP"] == pytest.approx(77 / 120, abs=1e-12)
    assert combined["trapezoid"]["mAP"] == pytest.approx(259 / 480, abs=1e-12)
    for ap in AP_MODES:
        assert combined[ap]["rank1"] == 0.5
        assert combined[ap]["rank2"] == 1.0
        assert combined[ap]["num_valid_queries"] == 2
        assert_same(combined[ap], brute_force_metrics(queries, [7, 104], gallery2, labels2, (1, 2, 5), ap), 1e-12)


# --------------------------------------------------------------------------- invalid queries


def test_queries_without_matches_are_excluded_and_counted():
    qf, ql, gf, gl = random_reid_data(seed=5)
    valid = torch.isin(ql, gl)
    assert 0 < int((~valid).sum()) < len(ql)
    full = compute_reid_metrics(qf, ql, gf, gl)
    only_valid = compute_reid_metrics(qf[valid], ql[valid], gf, gl)
    assert full["num_queries"] == len(ql)
    assert full["num_invalid_queries"] == int((~valid).sum())
    assert full["num_valid_queries"] == int(valid.sum())
    assert only_valid["num_invalid_queries"] == 0
    for key in ("rank1", "rank5", "rank10", "mAP"):
        assert full[key] == pytest.approx(only_valid[key], abs=1e-12)


def test_all_queries_invalid_raises():
    gf = torch.randn(5, 3)
    with pytest.raises(ValueError, match="none of the 3 query identities has a true match in the gallery"):
        compute_reid_metrics(torch.randn(3, 3), [10, 11, 12], gf, [0, 1, 2, 3, 4])
    with pytest.raises(ValueError, match="none of the 3 query identities has a true match in the gallery"):
        argsort_reference_metrics(torch.randn(3, 3), [10, 11, 12], gf, [0, 1, 2, 3, 4])
    with pytest.raises(ValueError, match="no valid query"):
        compute_reid_metrics(torch.zeros(0, 3), [], gf, [0, 1, 2, 3, 4])


# --------------------------------------------------------------------------- inputs


def test_bad_ap_value_raises():
    qf, ql, gf, gl = random_reid_data()
    with pytest.raises(ValueError, match="standard.*trapezoid"):
        compute_reid_metrics(qf, ql, gf, gl, ap="11-point")
    with pytest.raises(ValueError, match="standard.*trapezoid"):
        argsort_reference_metrics(qf, ql, gf, gl, ap="area")


@pytest.mark.parametrize(
    "args, message",
    [
        ((torch.randn(4, 3), [0, 1, 2, 3], torch.randn(5, 2), [0, 1, 2, 3, 4]), "dimension"),
        ((torch.randn(4, 3), [0, 1, 2], torch.randn(5, 3), [0, 1, 2, 3, 4]), "query_labels"),
        ((torch.randn(4, 3), [0, 1, 2, 3], torch.randn(5, 3), [0, 1, 2]), "gallery_labels"),
        ((torch.randn(4, 3), [0, 1, 2, 3], torch.zeros(0, 3), []), "empty"),
        ((torch.randn(4), [0, 1, 2, 3], torch.randn(5, 4), [0, 1, 2, 3, 4]), "2-D"),
        ((torch.randn(4, 3), [0, 1, 2, 3], torch.randn(5, 3, 1), [0, 1, 2, 3, 4]), "2-D"),
        ((torch.randn(4, 3), [[0, 1, 2, 3]], torch.randn(5, 3), [0, 1, 2, 3, 4]), "1-D"),
        ((torch.randn(4, 3), [0.5, 1, 2, 3], torch.randn(5, 3), [0, 1, 2, 3, 4]), "integer"),
        ((torch.full((4, 3), float("nan")), [0, 1, 2, 3], torch.randn(5, 3), [0, 1, 2, 3, 4]), "NaN"),
    ],
)
def test_input_validation(args, message):
    with pytest.raises(ValueError, match=message):
        compute_reid_metrics(*args)
    with pytest.raises(ValueError, match=message):
        argsort_reference_metrics(*args)


@pytest.mark.parametrize("kwargs", [{"ranks": (0,)}, {"ranks": ()}, {"ranks": (1.5,)}, {"chunk_size": 0}])
def test_bad_ranks_and_chunk_size(kwargs):
    qf, ql, gf, gl = random_reid_data()
    with pytest.raises(ValueError):
        compute_reid_metrics(qf, ql, gf, gl, **kwargs)


def test_numpy_and_list_inputs():
    qf, ql, gf, gl = random_reid_data(seed=6)
    expected = compute_reid_metrics(qf, ql, gf, gl)
    as_numpy = compute_reid_metrics(qf.numpy().astype(np.float64), ql.numpy(), gf.numpy(), gl.tolist())
    assert_same(as_numpy, expected)


def test_half_precision_inputs_are_upcast():
    qf, ql, gf, gl = random_reid_data(seed=7)
    for dtype in (torch.float16, torch.bfloat16):
        q16, g16 = qf.to(dtype), gf.to(dtype)
        # Same values, given in float32: identical results.
        expected = compute_reid_metrics(q16.float(), ql, g16.float(), gl)
        assert_same(compute_reid_metrics(q16, ql, g16, gl), expected, abs_tol=0.0)


def test_unnormalised_features_give_same_results():
    qf, ql, gf, gl = random_reid_data(seed=8)
    gen = torch.Generator().manual_seed(0)
    q_scale = torch.exp(torch.empty(len(qf), 1).uniform_(-3, 3, generator=gen))
    g_scale = torch.exp(torch.empty(len(gf), 1).uniform_(-3, 3, generator=gen))
    q_unit = torch.nn.functional.normalize(qf, dim=1)
    g_unit = torch.nn.functional.normalize(gf, dim=1)
    for ap in AP_MODES:
        expected = compute_reid_metrics(q_unit, ql, g_unit, gl, ap=ap)
        assert_same(compute_reid_metrics(q_unit * q_scale, ql, g_unit * g_scale, gl, ap=ap), expected)
        assert_same(brute_force_metrics(q_unit * q_scale, ql, g_unit * g_scale, gl, ap=ap), expected)


def test_query_order_does_not_matter():
    qf, ql, gf, gl = random_reid_data(seed=9)
    perm = torch.randperm(len(ql), generator=torch.Generator().manual_seed(1))
    assert_same(compute_reid_metrics(qf[perm], ql[perm], gf, gl, chunk_size=5), compute_reid_metrics(qf, ql, gf, gl))


# --------------------------------------------------------------------------- reference & chunking


@pytest.mark.parametrize("ap", AP_MODES)
def test_argsort_reference_equals_fast_path(ap):
    for data in (random_reid_data(seed=10, dim=32, num_queries=80), tie_heavy_data(seed=11)):
        qf, ql, gf, gl = data
        fast = compute_reid_metrics(qf, ql, gf, gl, ranks=(1, 2, 5, 10), ap=ap, chunk_size=9)
        for chunk_size in (None, 1, 9):
            ref = argsort_reference_metrics(qf, ql, gf, gl, ranks=(1, 2, 5, 10), ap=ap, chunk_size=chunk_size)
            assert_same(ref, fast, abs_tol=1e-9)


def test_many_matches_under_tiny_memory_budget(monkeypatch):
    """A tiny budget forces 1-query chunks and several passes over match slots."""
    rng = np.random.default_rng(12)
    gl = rng.integers(0, 4, size=120)  # ~30 gallery matches per query
    gf = rng.normal(size=(120, 6))
    ql = rng.integers(0, 5, size=17)
    qf = rng.normal(size=(17, 6))
    # Exact duplicates of some gallery rows add ties between different identities.
    gf[60:70] = gf[0:10]
    qf[:3] = gf[:3]
    expected = {ap: brute_force_metrics(qf, ql, gf, gl, ap=ap) for ap in AP_MODES}
    monkeypatch.setattr(metrics_inputs, "DEFAULT_MEMORY_BUDGET_BYTES", 120 * 4 * 6)
    for chunk_size in (None, 3):
        for ap in AP_MODES:
            assert_same(compute_reid_metrics(qf, ql, gf, gl, ap=ap, chunk_size=chunk_size), expected[ap])
    assert_same(argsort_reference_metrics(qf, ql, gf, gl), expected["standard"])


def test_memory_budget_decides_how_the_work_is_split(monkeypatch):
    """A query costs G x (4 bytes of similarity + 4 per true match of 0/1 comparisons; 8 from 2**24 gallery items,
    where float32 would stop counting exactly): the chunks and comparison passes are the largest that fit."""
    from handclip.metrics.rank import _chunks, _ChunkScorer, _indicator_dtype

    assert _indicator_dtype(2**24 - 1) is torch.float32 and _indicator_dtype(2**24) is torch.float64
    monkeypatch.setattr(metrics_inputs, "DEFAULT_MEMORY_BUDGET_BYTES", 10_000)
    assert metrics_inputs.default_rows(10, 3) == 10_000 // (10 * (4 + 4 * 3))
    assert metrics_inputs.default_rows(10, 0) == metrics_inputs.default_rows(10, 1) == 10_000 // 80
    assert metrics_inputs.default_rows(1000, 5) == 1  # never less than one query
    monkeypatch.setattr(metrics_inputs, "DEFAULT_MEMORY_BUDGET_BYTES", 10**9)
    assert metrics_inputs.default_rows(2**24, 1) == 10**9 // (2**24 * 12)
    assert metrics_inputs.default_rows(2**24 - 1, 1) == 10**9 // ((2**24 - 1) * 8)

    monkeypatch.setattr(metrics_inputs, "DEFAULT_MEMORY_BUDGET_BYTES", 2_000)
    counts = torch.tensor([1, 1, 1, 2, 2, 3, 3, 3, 5, 8, 8, 13])  # ascending, as the match table orders them
    chunks = list(_chunks(counts, 10, None))
    assert chunks[0][0] == 0 and chunks[-1][1] == len(counts)
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(chunks, chunks[1:]))
    assert all(j - i <= metrics_inputs.default_rows(10, int(counts[j - 1])) for i, j in chunks)  # each one fits
    rows = metrics_inputs.default_rows(10, 2)
    assert [j - i for i, j in _chunks(torch.full((40,), 2), 10, None)] == [rows] * (40 // rows) + [40 % rows]
    assert list(_chunks(counts, 10, 5)) == [(0, 5), (5, 10), (10, 12)]  # a given chunk size is used as is
    # a chunk sized for its first count is cut back to fit the larger count that it would reach
    step = torch.tensor([1] * 24 + [13] * 36)
    assert [j - i for i, j in _chunks(step, 10, None)][:2] == [3, 3]
    assert all(j - i <= metrics_inputs.default_rows(10, int(step[j - 1])) for i, j in _chunks(step, 10, None))

    queries, gallery = torch.nn.functional.normalize(torch.randn(3, 4), dim=1), torch.randn(10, 4)
    match_idx = torch.tensor([[0, 1, 2, 3, 4, 5]] * 3)
    for budget, slots in ((120 + 4 * 120, 4), (120 + 4 * 120 + 119, 4), (120 + 50, 1), (10**6, 6)):
        monkeypatch.setattr(metrics_inputs, "DEFAULT_MEMORY_BUDGET_BYTES", budget)
        scorer = _ChunkScorer(torch.nn.functional.normalize(gallery, dim=1))
        positions = scorer.positions(queries, match_idx)  # similarities: 3 x 10 x 4 bytes = 120
        assert scorer.ind_buf.numel() == 3 * slots * 10, budget
        sim = queries @ torch.nn.functional.normalize(gallery, dim=1).t()
        expected = (sim.unsqueeze(1) > sim.gather(1, match_idx).unsqueeze(2)).sum(dim=2)
        assert torch.equal(positions, expected)


def test_similarity_only_runs():
    qf, _, gf, _ = random_reid_data()
    assert similarity_only(qf, gf) is None
    assert similarity_only(qf, gf, chunk_size=7) is None
    with pytest.raises(ValueError):
        similarity_only(qf, gf[:, :3])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    for data in (random_reid_data(seed=13), tie_heavy_data(seed=14)):
        qf, ql, gf, gl = data
        for ap in AP_MODES:
            cpu = compute_reid_metrics(qf, ql, gf, gl, ap=ap, chunk_size=6)
            gpu = compute_reid_metrics(qf.cuda(), ql.cuda(), gf.cuda(), gl, ap=ap, chunk_size=6)
            assert_same(gpu, cpu)
            assert_same(argsort_reference_metrics(qf.cuda(), ql, gf.cuda(), gl, ap=ap), cpu)
