"""Gallery templates, case probes and the calibration per decision mode, against straightforward implementations
written here from their definitions (plain loops in float64): random features with ties (duplicated photos and
duplicated persons), exact rankings and best photos, scores to 1e-6, thresholds against a brute-force FMR count."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from handclip.evaluation.calibration import (
    DECISION_MODES,
    _mode_scores,
    calibration_from_embeddings,
    decision_mode,
    select_threshold,
)
from handclip.identify.modes import top_k_persons
from handclip.identify.search import top_k_identities
from handclip.metrics.templates import calibration_cases, case_max, fixed_size_cases, mean_templates


# -- the definitions, written out ------------------------------------------------------------------
def unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / math.sqrt(float(v @ v))


def ref_template(rows) -> np.ndarray:
    """The L2-normalised mean of the L2-normalised rows."""
    total = np.zeros(len(rows[0]))
    for r in rows:
        total = total + unit(r)
    return unit(total / len(rows))


def ref_ranking(photos, gallery, labels, gallery_mode, case_mode, k):
    """[(person, score, best row)] best first, for one probe made of ``photos`` (one photo: a single probe)."""
    vectors = [ref_template(photos)] if case_mode == "mean" else [unit(p) for p in photos]
    found = []
    for person in sorted(set(labels)):
        rows = [i for i, lab in enumerate(labels) if lab == person]
        template = ref_template([gallery[i] for i in rows])
        score, best_cos, best_row = -math.inf, -math.inf, None
        for v in vectors:
            cosines = [float(v @ unit(gallery[i])) for i in rows]
            s = max(cosines) if gallery_mode == "max" else float(v @ template)
            score = max(score, s)
            for c, i in zip(cosines, rows):  # the best-matching photo: highest cosine, earliest row
                if c > best_cos or (c == best_cos and i < best_row):
                    best_cos, best_row = c, i
        found.append((person, score, best_row))
    # equal scores (the same photos summed in another order differ by ~1e-16 here): the earlier best photo first
    found.sort(key=lambda t: (-round(t[1], 9), t[2]))
    return found[:k]


def features_with_ties(seed: int, persons: int = 9, dim: int = 6):
    """A gallery where persons 1 and 2 are the same photos (tied in every mode) and some photos repeat."""
    rng = np.random.default_rng(seed)
    gallery, labels = [], []
    for p in range(persons):
        n = int(rng.integers(1, 5))
        rows = [rng.normal(size=dim) for _ in range(n)]
        if p == 2:
            rows = [r.copy() for r in gallery_rows_of(gallery, labels, 1)]
        elif n > 1:
            rows[-1] = rows[0].copy()  # a duplicated photo
        gallery += rows
        labels += [p] * len(rows)
    order = rng.permutation(len(labels))  # persons' rows interleaved
    gallery = [gallery[i] for i in order]
    labels = [labels[i] for i in order]
    queries = [rng.normal(size=dim) for _ in range(10)] + [gallery[3].copy(), gallery[3].copy()]
    return np.array(gallery), labels, np.array(queries)


def gallery_rows_of(gallery, labels, person):
    return [g for g, lab in zip(gallery, labels) if lab == person]


def flat(rows: list[list[float]]) -> list[float]:
    return [v for row in rows for v in row]


def normalized(a) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.as_tensor(np.asarray(a), dtype=torch.float32), dim=1)


# -- templates --------------------------------------------------------------------------------------
def test_mean_templates_equal_the_definition_in_any_row_order_and_block_size():
    gallery, labels, _ = features_with_ties(0)
    for block in (1, 4, 65536):
        templates, names = mean_templates(torch.as_tensor(gallery, dtype=torch.float32), torch.tensor(labels),
                                          block=block)
        assert names.tolist() == sorted(set(labels))
        for t, person in zip(templates.numpy(), names.tolist()):
            assert t == pytest.approx(ref_template(gallery_rows_of(gallery, labels, person)), abs=1e-6)
    assert torch.equal(templates[1], templates[2])  # the same photos: the same template, bit for bit
    one = mean_templates(torch.tensor([[3.0, 4.0]]), torch.tensor([5]))
    assert one[0].tolist() == [[0.6000000238418579, 0.800000011920929]] and one[1].tolist() == [5]


def test_fixed_size_cases_and_case_max_follow_their_definitions():
    labels = torch.tensor([4, 4, 1, 4, 1, 4, 4, 1, 4])
    cases = fixed_size_cases(labels, size=2).tolist()
    # label 4's rows (0, 1, 3, 5, 6, 8) in pairs: (0,1) (3,5) (6,8); label 1's rows (2, 4, 7): (2,4) (7)
    groups = {}
    for row, c in enumerate(cases):
        groups.setdefault(c, []).append(row)
    assert sorted(groups.values()) == [[0, 1], [2, 4], [3, 5], [6, 8], [7]]
    assert cases[0] == 0 and cases[2] == 1  # numbered by first row
    with pytest.raises(ValueError):
        fixed_size_cases(labels, size=0)
    # one val photo per identity (the 11k and HD splits): each case filled with 2 training photos of its identity
    val_case, train_case = calibration_cases(torch.tensor([7, 3, 7]), torch.tensor([3, 7, 3, 3, 7, 7, 9]), size=3)
    assert val_case.tolist() == [0, 1, 0]
    # case 0 (identity 7: 2 val photos) takes 1 of 7's rows (1, 4, 5); case 1 (identity 3: 1 photo) takes 2 of
    # 3's rows (0, 2, 3); identity 9 has no case; every identity keeps a photo in the gallery
    assert train_case.tolist() == [1, 0, 1, -1, -1, -1, -1]
    _, single = calibration_cases(torch.tensor([1]), torch.tensor([1, 2]), size=3)
    assert single.tolist() == [-1, -1]  # its only training photo stays
    table = torch.tensor([[1.0, 5.0], [2.0, -1.0], [0.5, 0.5], [2.0, 7.0]])
    assert case_max(table, torch.tensor([1, 0, 1, 0])).tolist() == [[2.0, 7.0], [1.0, 5.0]]


# -- rankings of every mode -------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("gallery_mode, query_mode, case_mode",
                         [("max", "each", None), ("mean", "each", None), ("max", "case", "mean"),
                          ("max", "case", "max"), ("mean", "case", "mean"), ("mean", "case", "max")])
def test_rankings_equal_the_definitions_with_ties(seed, gallery_mode, query_mode, case_mode):
    gallery, labels, queries = features_with_ties(seed)
    groups = [[i] for i in range(len(queries))] if query_mode == "each" else [[0, 1, 2], [3], [4, 5], [6, 7, 8, 9],
                                                                              [10, 11], [2, 10]]
    k = 7
    g = normalized(gallery)
    templates = mean_templates(g, torch.tensor(labels))[0] if gallery_mode == "mean" else None
    # small chunks and blocks: the gallery in chunks of 3 rows, probes a few at a time
    hits = top_k_persons(normalized(queries), g, torch.tensor(labels), k, templates=templates,
                         groups=None if query_mode == "each" else groups, case_mode=case_mode or "mean",
                         budget=12 * 9 * 3, rows=3)
    assert len(hits.labels) == len(groups)
    ties = 0
    for n, group in enumerate(groups):
        expected = ref_ranking([queries[i] for i in group], gallery, labels, gallery_mode,
                               case_mode if query_mode == "case" else None, k)
        assert hits.labels[n] == [p for p, _, _ in expected]
        assert hits.rows[n] == [r for _, _, r in expected]
        assert hits.scores[n] == pytest.approx([s for _, s, _ in expected], abs=1e-6)
        if {1, 2} <= set(hits.labels[n]):  # persons 1 and 2 have the same photos: tied, bit for bit
            assert hits.scores[n][hits.labels[n].index(1)] == hits.scores[n][hits.labels[n].index(2)]
            ties += 1
    assert ties  # the tie is exercised


def test_the_plain_mode_of_top_k_persons_equals_the_identity_search():
    gallery, labels, queries = features_with_ties(5)
    for k in (1, 3, 9):
        a = top_k_identities(normalized(queries), normalized(gallery), torch.tensor(labels), k)
        b = top_k_persons(normalized(queries), normalized(gallery), torch.tensor(labels), k, rows=2)
        assert a.labels == b.labels
        # the same photo file: or a byte-identical copy of it (float32 products of two copies may differ by an ulp)
        assert [[list(gallery[r]) for r in row] for row in a.rows] == [[list(gallery[r]) for r in row]
                                                                       for row in b.rows]
        assert flat(a.scores) == pytest.approx(flat(b.scores), abs=1e-6)


def test_a_one_photo_case_is_that_photo_and_one_photo_persons_make_mean_equal_max():
    rng = np.random.default_rng(3)
    gallery, queries = rng.normal(size=(6, 5)), rng.normal(size=(4, 5))
    labels = torch.arange(6)
    g = normalized(gallery)
    plain = top_k_persons(normalized(queries), g, labels, 6)
    as_cases = top_k_persons(normalized(queries), g, labels, 6, groups=[[0], [1], [2], [3]], case_mode="mean")
    templated = top_k_persons(normalized(queries), g, labels, 6, templates=mean_templates(g, labels)[0])
    for other in (as_cases, templated):
        assert other.labels == plain.labels and other.rows == plain.rows
        assert flat(other.scores) == pytest.approx(flat(plain.scores), abs=1e-6)


# -- calibration per mode ---------------------------------------------------------------------------
def ref_mode_scores(mode, val, val_labels, train, train_labels):
    """(genuine, impostor) of one decision mode, from the definitions. Cases: 3 consecutive val photos of one
    identity, a case of fewer filled with the identity's first training photos not taken yet (never its last),
    and those training photos leave the gallery."""
    gallery_mode, _, case = mode.partition("+")
    gallery = list(range(len(train_labels)))
    if case:
        by_identity: dict[int, list[int]] = {}
        for i, lab in enumerate(val_labels):
            by_identity.setdefault(lab, []).append(i)
        groups = sorted(((rows[j:j + 3][0], lab, [val[i] for i in rows[j:j + 3]]) for lab, rows in by_identity.items()
                         for j in range(0, len(rows), 3)), key=lambda t: t[0])  # cases in order of first photo
        probes = []
        for _, lab, photos in groups:
            own = [r for r in gallery if train_labels[r] == lab]
            take = own[:max(0, min(3 - len(photos), len(own) - 1))]
            gallery = [r for r in gallery if r not in take]
            probes.append((lab, photos + [train[r] for r in take]))
    else:
        probes = [(lab, [val[i]]) for i, lab in enumerate(val_labels)]
    genuine, impostor = [], []
    g_features, g_labels = [train[r] for r in gallery], [train_labels[r] for r in gallery]
    for lab, photos in probes:
        ranking = ref_ranking(photos, g_features, g_labels, gallery_mode, case.removeprefix("case_") if case else None,
                              k=len(set(g_labels)))
        for person, score, _ in ranking:
            (genuine if person == lab else impostor).append(score)
    return np.array(genuine), np.array(impostor)


def quantized(rng, n, dim=4):
    """Unit vectors with entries +-0.5: every cosine is a multiple of 0.25, exact in float32 (many ties). The
    first entry is always +0.5, so that no sum of them (a case's or a person's mean) is zero."""
    out = rng.choice([-0.5, 0.5], size=(n, dim))
    out[:, 0] = 0.5
    return out


@pytest.mark.parametrize("exact", [True, False])
def test_every_mode_threshold_equals_a_brute_force_fmr_count_at_the_boundary(exact):
    rng = np.random.default_rng(11)
    make = (lambda n: quantized(rng, n)) if exact else (lambda n: rng.normal(size=(n, 6)))
    train, val = make(60), make(44)
    train_labels = [i % 12 for i in range(60)]
    train_labels[59] = 12  # an identity with a single training photo: it stays in the gallery
    val_labels = [int(v) for v in rng.integers(0, 13, size=44)]
    target = 0.1
    vt, tt = torch.as_tensor(val, dtype=torch.float32), torch.as_tensor(train, dtype=torch.float32)
    cal = calibration_from_embeddings(vt, val_labels, tt, train_labels, target, levels=())
    assert set(cal["modes"]) == set(DECISION_MODES) and DECISION_MODES[0] == "max"
    assert {k: cal[k] for k in cal["modes"]["max"]} == cal["modes"]["max"]  # the top level is the max mode
    for mode in DECISION_MODES:
        entry = cal["modes"][mode]
        genuine, impostor = ref_mode_scores(mode, val, val_labels, train, train_labels)
        scores = _mode_scores(mode, vt, val_labels, tt, train_labels)
        got_gen, got_imp = scores.genuine().double().numpy(), scores.impostor().double().numpy()
        assert np.sort(got_gen) == pytest.approx(np.sort(genuine), abs=1e-6)
        assert np.sort(got_imp) == pytest.approx(np.sort(impostor), abs=1e-6)
        assert (entry["genuine_scores"], entry["impostor_scores"]) == (genuine.size, impostor.size)
        # brute force: s = the largest impostor score whose acceptance would exceed the target FMR; the lowest
        # threshold meeting the target lies just above it
        s = max(v for v in impostor if np.sum(impostor >= v) > target * impostor.size)
        t = entry["threshold"]
        if exact and mode in ("max", "max+case_max"):  # cosines of +-0.5 vectors are exact: the very next float
            assert t == float(np.nextafter(s, np.inf))
        else:
            assert t == pytest.approx(s, abs=1e-6)
        # at the boundary, on the module's own scores: a score equal to t is accepted, the one just below is not
        assert np.sum(got_imp >= t) == round(entry["fmr"] * got_imp.size) <= target * got_imp.size
        assert np.sum(got_imp >= np.nextafter(t, -np.inf)) > target * got_imp.size
        assert entry["tar"] == np.mean(got_gen >= t)


def test_a_score_equal_to_a_mode_threshold_is_accepted_and_select_threshold_reads_modes():
    cal = {"model_fingerprint": "f", "threshold": 0.5, "target_fmr": 0.01, "levels": [],
           "modes": {"mean": {"threshold": 0.25, "target_fmr": 0.01, "levels": [
               {"target_fmr": 0.1, "threshold": 0.125, "fmr": 0.1, "tar": 1.0, "resolved": True}]}}}
    assert select_threshold(cal, "x", "f", None, "how")["threshold"] == 0.5
    assert select_threshold(cal, "x", "f", None, "how", mode="mean")["threshold"] == 0.25
    assert select_threshold(cal, "x", "f", 0.1, "how", mode="mean")["threshold"] == 0.125
    from handclip.errors import HandCLIPError

    with pytest.raises(HandCLIPError, match="no threshold for decision mode 'max\\+case_mean'.*; how"):
        select_threshold(cal, "x", "f", None, "how", mode=decision_mode("max", "case", "mean"))
    old = {k: v for k, v in cal.items() if k != "modes"}  # a file written before the modes: max still works
    assert select_threshold(old, "x", "f", None, "how")["threshold"] == 0.5
    with pytest.raises(HandCLIPError, match="decision mode 'mean'"):
        select_threshold(old, "x", "f", None, "how", mode="mean")
    from handclip.identify.results import decide

    top = [{"rank": 1, "identity": "a", "score": 0.25, "file": "f"}]
    assert decide("q", None, top, 0.25)["accepted"] and not decide("q", None, top, 0.25 + 1e-12)["accepted"]


def test_the_index_writes_templates_a_block_of_identities_at_a_time(tmp_path):
    from handclip.identify.index import _write_templates

    gallery, labels, _ = features_with_ties(7)
    rows = normalized(gallery).numpy()
    identities = [f"person{lab:02d}" for lab in labels]
    for block, dtype in ((2, "float32"), (65536, "float32"), (3, "float16")):
        _write_templates(tmp_path / "t.npy", rows, identities, dtype, block)
        written = np.load(tmp_path / "t.npy")
        assert written.dtype == np.dtype(dtype) and written.shape == (len(set(labels)), rows.shape[1])
        for t, person in zip(written.astype(np.float64), sorted(set(labels))):
            expected = ref_template(gallery_rows_of(rows, labels, person))
            assert t == pytest.approx(expected, abs=1e-6 if dtype == "float32" else 1e-3)
