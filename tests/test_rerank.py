"""Re-ranking (k-reciprocal, alpha query expansion) and metrics from a score matrix, against references written
from the definitions (tests/reference.py), on random features with exact ties (duplicated rows)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import brute_alpha_query_expansion, brute_force_metrics, brute_k_reciprocal

from handclip.metrics import rerank
from handclip.metrics.rank import reid_metrics_from_scores
from handclip.metrics.rerank import alpha_query_expansion, k_reciprocal_distances


def features(seed: int, q: int = 18, g: int = 14, dim: int = 6, duplicates: int = 5):
    """Random features where some queries and gallery items are exact copies of others (tied distances)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(q + g, dim))
    for _ in range(duplicates):
        a, b = rng.choice(q + g, size=2, replace=False)
        x[a] = x[b]
    return x[:q], x[q:]


def stable_ranking(dist: np.ndarray) -> list[list[int]]:
    return [sorted(range(dist.shape[1]), key=lambda j, row=row: (round(float(row[j]), 9), j)) for row in dist]


@pytest.mark.parametrize(("k1", "k2", "lam"), [(20, 6, 0.3), (5, 1, 0.5), (3, 3, 0.0), (4, 2, 1.0), (1, 1, 0.3)])
@pytest.mark.parametrize("seed", [0, 1])
def test_k_reciprocal_matches_its_definition(k1, k2, lam, seed):
    qf, gf = features(seed)
    expected = brute_k_reciprocal(qf, gf, k1, k2, lam)
    got = k_reciprocal_distances(torch.tensor(qf), torch.tensor(gf), k1, k2, lam, dtype=torch.float64).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    assert stable_ranking(got) == stable_ranking(expected)


def test_k_reciprocal_in_small_chunks_and_float32_and_float16(monkeypatch):
    qf, gf = features(3, q=30, g=25)
    whole = k_reciprocal_distances(torch.tensor(qf), torch.tensor(gf), dtype=torch.float64)
    monkeypatch.setattr(rerank, "CHUNK_BYTES", 512)  # every pass in many chunks
    chunked = k_reciprocal_distances(torch.tensor(qf), torch.tensor(gf), dtype=torch.float64)
    np.testing.assert_allclose(chunked.numpy(), whole.numpy(), atol=1e-12, rtol=0)
    monkeypatch.undo()
    single = k_reciprocal_distances(torch.tensor(qf, dtype=torch.float32), torch.tensor(gf, dtype=torch.float32))
    half = k_reciprocal_distances(torch.tensor(qf), torch.tensor(gf), out_dtype=torch.float16)
    assert single.dtype == torch.float32 and half.dtype == torch.float16
    np.testing.assert_allclose(single.double().numpy(), whole.numpy(), atol=1e-5)
    np.testing.assert_allclose(half.double().numpy(), whole.numpy(), atol=2e-3)


def test_k_reciprocal_refuses_bad_settings():
    qf, gf = features(0)
    for k1, k2, lam in [(0, 6, 0.3), (20, 0, 0.3), (20, 6, 1.5)]:
        with pytest.raises(ValueError, match="k1 and k2 must be >= 1 and lambda in"):
            k_reciprocal_distances(torch.tensor(qf), torch.tensor(gf), k1, k2, lam)


@pytest.mark.parametrize(("k", "alpha"), [(5, 3.0), (1, 1.0), (0, 3.0), (40, 0.0)])
def test_alpha_query_expansion_matches_its_definition(k, alpha):
    qf, gf = features(4)
    eq, eg = brute_alpha_query_expansion(qf, gf, min(k, len(qf) + len(gf) - 1), alpha)
    gq, gg = alpha_query_expansion(torch.tensor(qf), torch.tensor(gf), k, alpha)
    np.testing.assert_allclose(gq.double().numpy(), eq, atol=1e-6)
    np.testing.assert_allclose(gg.double().numpy(), eg, atol=1e-6)


@pytest.mark.parametrize("ap", ["standard", "trapezoid"])
def test_metrics_from_scores_match_the_brute_force_reference(ap):
    rng = np.random.default_rng(5)
    qf = rng.integers(-2, 3, size=(40, 4)).astype(np.float64)  # small integers: many exact ties
    gf = rng.integers(-2, 3, size=(30, 4)).astype(np.float64)
    ql, gl = rng.integers(0, 8, 40), rng.integers(0, 8, 30)
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    scores = torch.tensor(unit(qf) @ unit(gf).T)
    got = reid_metrics_from_scores(scores, ql, gl, ranks=(1, 3, 5), ap=ap)
    expected = brute_force_metrics(qf, ql, gf, gl, ranks=(1, 3, 5), ap=ap)
    for key in ("rank1", "rank3", "rank5", "mAP", "num_valid_queries", "num_invalid_queries"):
        assert got[key] == pytest.approx(expected[key], abs=1e-12), key
    with pytest.raises(ValueError, match="scores must be"):
        reid_metrics_from_scores(scores[:5], ql, gl)


def brute_rank1_map(dist: np.ndarray, ql, gl) -> tuple[float, float]:
    """Rank-1 and mAP (torchreid's AP) of the queries with a match, ranking by (distance, gallery index)."""
    rank1, aps = [], []
    for q, row in enumerate(dist):
        ranked = sorted(range(len(gl)), key=lambda g, row=row: (row[g], g))
        hits = [k for k, g in enumerate(ranked) if gl[g] == ql[q]]
        if hits:
            rank1.append(hits[0] == 0)
            aps.append(sum((j + 1) / (k + 1) for j, k in enumerate(hits)) / len(hits))
    return sum(rank1) / len(rank1), sum(aps) / len(aps)


@pytest.mark.parametrize("method", ["kreciprocal", "aqe"])
def test_eval_adds_a_transductive_row_scored_from_the_definition(tmp_path, monkeypatch, method):
    from conftest import eval_cfg, make_layout

    from handclip.eval import evaluate
    from handclip.evaluation import runs
    from handclip.evaluation.report import ZERO_SHOT

    data = make_layout(tmp_path / "data", n_train_ids=4, n_test_ids=5, per_id=4, runs=2)
    seen = []
    original = runs.score_runs

    def recording(features, test, *args, rerank=None, **kwargs):
        if rerank is not None:
            seen.append((features.double().numpy(), test))
        return original(features, test, *args, rerank=rerank, **kwargs)

    monkeypatch.setattr(runs, "score_runs", recording)
    entries = evaluate(eval_cfg(data, tmp_path / "out", f"rerank={method}", "verification.enabled=false",
                                "rerank.k1=6", "rerank.k2=2"))["entries"]
    label = {"kreciprocal": "k-reciprocal re-ranking", "aqe": "alpha query expansion"}[method]
    assert [e["model"] for e in entries] == [ZERO_SHOT, f"{ZERO_SHOT} + {label} (transductive)"]
    assert entries[1]["transductive"] is True and entries[1]["reranked_from"] == ZERO_SHOT
    (features, test), = seen
    identities = test.identities
    assert len(entries[1]["runs"]) == len(test.runs) == 2
    for run, scored in zip(test.runs, entries[1]["runs"]):
        q, g = run["query"], run["gallery"]
        qf, gf = features[q], features[g]
        if method == "kreciprocal":
            dist = brute_k_reciprocal(qf, gf, 6, 2, 0.3)
        else:
            eq, eg = brute_alpha_query_expansion(qf, gf, 5, 3.0)
            dist = -(eq @ eg.T)
        rank1, mean_ap = brute_rank1_map(dist, [identities[i] for i in q], [identities[i] for i in g])
        assert scored["rank1"] == pytest.approx(rank1, abs=1e-9) and scored["mAP"] == pytest.approx(mean_ap, abs=1e-6)
    table = (tmp_path / "out" / "eval" / "dorsal_right_zeroshot.md").read_text()
    assert f"| dorsal_right | {ZERO_SHOT} + {label} (transductive) |" in table


def test_the_rerank_benchmark_part_compares_with_the_straightforward_implementation():
    from handclip.bench.rerank import bench_rerank

    settings = {"sizes": [120, 200], "compare_size": 120, "dim": 16, "per_identity": 4, "k1": 20, "k2": 6,
                "lambda_value": 0.3, "repeats": 1}
    result, memory = bench_rerank(settings, torch.device("cpu"), seed=0, say=lambda _: None)
    assert set(result["sizes"]) == {"120", "200"} and set(memory) == {"120", "200"}
    assert result["sizes"]["200"]["seconds"] > 0
    assert result["sizes"]["200"]["dense_v_gib"] == round(16 * 200**2 / 2**30, 2)
    compared = result["vs_straightforward"]
    assert compared["n"] == 120 and compared["float64_rankings_equal"] is True
    assert compared["float32_max_abs_diff"] < 1e-5 and compared["float32_rows_same_top1"] == 1.0
