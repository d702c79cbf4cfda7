"""The person-across-hand-types protocol (splits, figures) and the fused calibration, against plain-Python
references written from their definitions."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from handclip.errors import HandCLIPError
from handclip.evaluation.cross_hand_protocol import (
    combination_pairs,
    combinations,
    evaluate_protocol,
    make_runs,
)
from handclip.evaluation.fused_calibration import (
    fused_calibration_from_embeddings,
    read_fused_calibration,
    write_fused_calibration,
)

HANDS = ("dorsal_right", "dorsal_left", "palmar_right", "palmar_left")


def random_identities(seed: int, persons: int = 12) -> dict[str, list[str]]:
    """Test photos per hand type: some persons in one hand type only, some with a single photo of a hand type."""
    rng = np.random.default_rng(seed)
    out = {h: [] for h in HANDS}
    for p in range(persons):
        hands = [h for h in HANDS if rng.random() < 0.7] or [HANDS[p % 4]]
        if p == 0:
            hands = [HANDS[1]]  # a person in one hand type only: not in the protocol
        for h in hands:
            out[h] += [f"{p:03d}"] * (1 if p == 1 else int(rng.integers(1, 6)))  # person 1: gallery photos only
    for h in HANDS:  # photos of a hand type are not grouped by person on disk order alone
        rng.shuffle(out[h])
    return out


def test_splits_disjoint_counts_and_persons():
    identities = random_identities(0)
    photos = {}
    for h, names in identities.items():
        for i, p in enumerate(names):
            photos.setdefault((p, h), set()).add(i)
    eligible = {p for p in {p for p, _ in photos} if sum((p, h) in photos for h in HANDS) >= 2}
    assert 2 <= len(eligible) < len({p for p, _ in photos})  # the data has persons in one hand type only
    runs = make_runs(identities, runs=5, seed=3)
    assert len(runs) == 5
    for run in runs:
        # one gallery photo per (person, hand type) with photos, for the eligible persons only
        assert set(run.gallery) == {(p, h) for (p, h) in photos if p in eligible} == set(run.probes)
        for key, g in run.gallery.items():
            probes = run.probes[key]
            assert g in photos[key] and g not in probes  # the person's own photo of that hand type
            assert len(set(probes)) == len(probes) and set(probes) | {g} == photos[key]  # the rest are probes
        for combo in combinations(HANDS):
            persons, probe_list = combination_pairs(run, combo)
            assert persons == sorted(p for p in eligible if all((p, h) in photos for h in combo))
            want = sum(min(len(photos[(p, h)]) - 1 for h in combo) for p in persons)
            assert len(probe_list) == want and len(set(probe_list)) == want
    assert len(combinations(HANDS)) == 15
    # deterministic per seed, different across seeds and runs
    again = make_runs(identities, runs=5, seed=3)
    assert [r.gallery for r in again] == [r.gallery for r in runs] and [r.probes for r in again] == [
        r.probes for r in runs]
    assert [r.gallery for r in make_runs(identities, runs=5, seed=4)] != [r.gallery for r in runs]
    assert len({tuple(sorted(r.gallery.items())) for r in runs}) > 1


def test_too_few_hand_types_or_persons():
    with pytest.raises(HandCLIPError, match="at least 2 hand types"):
        make_runs({"dorsal_right": ["001", "002"]}, 1, 0)
    with pytest.raises(HandCLIPError, match="at least 2 test identities present in 2 or more"):
        make_runs({"dorsal_right": ["001", "002"], "palmar_left": ["001", "003"]}, 1, 0)


def reference_combination(feats, run, combo, fusion, target_fmr):
    """Rank-1, AP and TAR of one combination, straight from the definitions (float64, Python lists)."""
    people = sorted({p for p, _ in run.gallery})
    persons = [p for p in people if all((p, h) in run.gallery for h in combo)]
    probes = [(p, j) for p in persons for j in range(min(len(run.probes[(p, h)]) for h in combo))]

    def cos(a, b):
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    hits, ap, genuine, impostor = 0, 0.0, [], []
    for p, j in probes:
        row = []
        for q in persons:
            s = [cos(feats[h][run.probes[(p, h)][j]], feats[h][run.gallery[(q, h)]]) for h in combo]
            row.append(sum(s) / len(s) if fusion == "mean" else max(s))
        own = persons.index(p)
        rank = sum(1 for i, v in enumerate(row) if v > row[own] or (v == row[own] and i < own))
        hits += rank == 0
        ap += 1 / (rank + 1)
        genuine.append(row[own])
        impostor += [v for i, v in enumerate(row) if i != own]
    allowed = math.floor(target_fmr * len(impostor) + 1e-9)
    ranked = sorted(impostor, reverse=True)
    threshold = np.nextafter(ranked[min(allowed, len(ranked) - 1)], np.inf)
    tar = sum(g >= threshold for g in genuine) / len(genuine)
    return {"rank1": hits / len(probes), "mAP": ap / len(probes), "tar": tar, "persons": len(persons),
            "probes": len(probes), "genuine": genuine, "impostor": impostor}


def midway(scores, q):
    """A threshold halfway between two neighbouring distinct scores near quantile q (no float ambiguity)."""
    values = sorted(set(scores))
    i = min(len(values) - 2, int(q * len(values)))
    return (values[i] + values[i + 1]) / 2


def test_protocol_figures_match_reference():
    identities = random_identities(1, persons=14)
    rng = np.random.default_rng(2)
    # float32 values (as embeddings are), compared in float64 by both sides
    feats = {h: rng.normal(size=(len(names), 6)).astype(np.float32).astype(np.float64)
             for h, names in identities.items()}
    runs = make_runs(identities, runs=3, seed=0)
    # calibrated thresholds for 2 (mean) and 3 (max) hand types, between scores of the first run
    first = {k: reference_combination(feats, runs[0], HANDS[:k], fusion, 0.05) for k, fusion in ((2, "mean"),
                                                                                                (3, "max"))}
    thresholds = {"mean": {2: midway(first[2]["impostor"], 0.9)}, "max": {3: midway(first[3]["genuine"], 0.5)}}
    result = evaluate_protocol({h: torch.tensor(f, dtype=torch.float32) for h, f in feats.items()}, runs, HANDS,
                               0.05, thresholds)
    assert len(result["combinations"]) == 4 + 11 * 2
    want_runs = {}
    for row in result["combinations"]:
        combo = tuple(row["hands"])
        assert (row["fusion"] is None) == (len(combo) == 1)
        for i, run in enumerate(runs):
            want = reference_combination(feats, run, combo, row["fusion"] or "mean", 0.05)
            want_runs[(combo, row["fusion"], i)] = want
            got = row["per_run"][i]
            for key in ("rank1", "mAP", "tar"):
                assert got[key] == pytest.approx(want[key], abs=1e-6), (combo, row["fusion"], i, key)
            assert (got["persons"], got["probes"]) == (want["persons"], want["probes"])
            threshold = thresholds.get(row["fusion"] or "", {}).get(len(combo))
            if threshold is None:
                assert "tar_at_val" not in got and "fmr_at_val" not in got
            else:
                assert got["tar_at_val"] == np.mean([g >= threshold for g in want["genuine"]])
                assert got["fmr_at_val"] == np.mean([s >= threshold for s in want["impostor"]])
        values = [want_runs[(combo, row["fusion"], i)]["rank1"] for i in range(len(runs))]
        assert row["rank1"]["mean"] == pytest.approx(np.mean(values), abs=1e-9)
        assert row["rank1"]["std"] == pytest.approx(np.std(values), abs=1e-9)
    # a summary row of k hand types: per run, the mean over the combinations of size k; then mean/std over runs
    for row in result["summary"]:
        combos = [c for c in itertools.combinations(HANDS, row["k"])]
        per_run = [np.mean([want_runs[(c, row["fusion"], i)]["mAP"] for c in combos]) for i in range(len(runs))]
        assert row["combinations"] == len(combos)
        assert row["mAP"]["mean"] == pytest.approx(np.mean(per_run), abs=1e-6)
        assert row["mAP"]["std"] == pytest.approx(np.std(per_run), abs=1e-6)
    with_val = {(r["k"], r["fusion"]) for r in result["summary"] if "tar_at_val" in r}
    assert with_val == {(2, "mean"), (3, "max")}
    assert 0 < next(r for r in result["summary"] if r["k"] == 2 and r["fusion"] == "mean")["fmr_at_val"]["mean"] < 1
    assert [(r["k"], r["fusion"]) for r in result["summary"]] == [
        (1, None), (2, "mean"), (2, "max"), (3, "mean"), (3, "max"), (4, "mean"), (4, "max")]


def random_val_train(seed: int):
    """Per hand type (features, person names) of val and train: persons missing from some hand types (1 and 6 in
    every train split, 6, 8, 9 in every val split), a val person in one hand type only, a val person with two
    photos per hand type."""
    rng = np.random.default_rng(seed)
    val, train = {}, {}
    for k, h in enumerate(HANDS):
        train_names = [f"{p:02d}" for p in range(10) if (p + k) % 5 != 0 for _ in range(int(rng.integers(1, 4)))]
        val_names = [f"{p:02d}" for p in range(10) if (p % 4 != k or p in (6, 8, 9)) and (p != 3 or k == 0)]
        val_names += ["07"] if "07" in val_names else []
        val[h] = (torch.tensor(rng.normal(size=(len(val_names), 5)), dtype=torch.float32), val_names)
        train[h] = (torch.tensor(rng.normal(size=(len(train_names), 5)), dtype=torch.float32), train_names)
    return val, train


def reference_fused_pairs(val, train, fusion):
    """(score, count, genuine?) of every (val probe, training person) pair, from the definition (float64)."""
    def unit(x):
        x = x.double().numpy()
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    hands = list(val)
    in_val = {p: [h for h in hands if p in val[h][1]] for h in hands for p in val[h][1]}
    persons = sorted({p for h in hands for p in train[h][1]})
    pairs, subsets = [], []
    for p in sorted(in_val):
        hs = in_val[p]
        if len(hs) < 2:
            continue
        for j in range(min(val[h][1].count(p) for h in hs)):
            photo = {h: [i for i, n in enumerate(val[h][1]) if n == p][j] for h in hs}
            for q in persons:
                scores = []
                for h in hs:
                    rows = [i for i, n in enumerate(train[h][1]) if n == q]
                    if rows:
                        scores.append(max(float(unit(val[h][0])[photo[h]] @ unit(train[h][0])[i]) for i in rows))
                if scores:
                    fused = sum(scores) / len(scores) if fusion == "mean" else max(scores)
                    pairs.append((fused, len(scores), q == p))
                for k in range(2, len(scores) + 1):  # every k of the hand types both sides have, fused alone
                    for sub in itertools.combinations(scores, k):
                        subsets.append((sum(sub) / k if fusion == "mean" else max(sub), k, q == p))
    return pairs, subsets


def brute_threshold(impostor, target):
    """The lowest candidate threshold (an impostor score or the next float above one) whose FMR <= target."""
    candidates = sorted(set(impostor) | {float(np.nextafter(s, np.inf)) for s in impostor})
    return next(t for t in candidates if sum(s >= t for s in impostor) / len(impostor) <= target)


@pytest.mark.parametrize("fusion", ["mean", "max"])
def test_fused_calibration_matches_brute_force(fusion):
    val, train = random_val_train(4)
    target = 0.05
    result = fused_calibration_from_embeddings(val, train, target, levels=(0.1,))
    fig = result["fusions"][fusion]
    pairs, subsets = reference_fused_pairs(val, train, fusion)
    pairs = [(s, c, g) for s, c, g in pairs if c >= 2]
    genuine = [s for s, _, g in pairs if g]
    impostor = [s for s, _, g in pairs if not g]
    assert (fig["genuine_scores"], fig["impostor_scores"]) == (len(genuine), len(impostor))
    assert len(impostor) * target >= 2  # the target is resolved, with false matches allowed
    want = brute_threshold(impostor, target)
    assert fig["threshold"] == pytest.approx(want, abs=1e-6)
    # the exact boundary, counted on the scores the calibration saw (1e-6 from the reference's)
    allowed = math.floor(target * len(impostor) + 1e-9)
    near = [s for s in impostor if abs(s - fig["threshold"]) < 1e-5]
    assert len(near) == 1  # no float32/float64 ambiguity at this boundary
    above = sum(s >= fig["threshold"] + 1e-5 for s in impostor)
    assert above + 0 <= allowed and above + 1 > allowed  # the threshold sits just above the (allowed+1)-th score
    assert fig["fmr"] == pytest.approx(above / len(impostor))
    assert fig["tar"] == pytest.approx(sum(s >= want for s in genuine) / len(genuine))
    assert [row["target_fmr"] for row in fig["levels"]] == [0.1, 0.05]
    for k in ("2", "3", "4"):
        sub = [s for s, c, g in subsets if c == int(k) and not g]
        assert fig["by_hand_count"][k]["threshold"] == pytest.approx(brute_threshold(sub, target), abs=1e-6)
        assert fig["by_hand_count"][k]["impostor_scores"] == len(sub)
        assert fig["by_hand_count"][k]["genuine_scores"] == sum(g for _, c, g in subsets if c == int(k))


def test_read_fused_calibration_checks_the_models(tmp_path):
    val, train = random_val_train(5)
    result = fused_calibration_from_embeddings(val, train, 0.05, levels=(0.1,))
    models = {h: {"fingerprint": f"fp-{h}", "checkpoint": None, "model_name": "HandCLIP-Tiny"} for h in HANDS}
    path = write_fused_calibration(tmp_path / "fusion.calibration.json", result, models)
    prints = {h: f"fp-{h}" for h in reversed(HANDS)}
    got = read_fused_calibration(path, prints, "max")
    assert got["threshold"] == result["fusions"]["max"]["threshold"] and got["fusion"] == "max"
    assert read_fused_calibration(path, prints, "mean", target_fmr=0.1)["threshold"] == \
        result["fusions"]["mean"]["levels"][0]["threshold"]
    k = next(iter(result["fusions"]["mean"]["by_hand_count"]))
    assert read_fused_calibration(path, prints, hand_count=int(k))["threshold"] == \
        result["fusions"]["mean"]["by_hand_count"][k]["threshold"]
    with pytest.raises(HandCLIPError, match="another palmar_left model"):
        read_fused_calibration(path, {**prints, "palmar_left": "other"})
    with pytest.raises(HandCLIPError, match="is for hand types"):
        read_fused_calibration(path, {h: prints[h] for h in HANDS[:3]})
    with pytest.raises(HandCLIPError, match="no threshold for FMR 0.001"):
        read_fused_calibration(path, prints, target_fmr=0.001)
    with pytest.raises(HandCLIPError, match="no threshold for fusion='median'"):
        read_fused_calibration(path, prints, "median")
    with pytest.raises(HandCLIPError, match="not found"):
        read_fused_calibration(tmp_path / "none.json", prints)
    (tmp_path / "bad.json").write_text('{"format": 1}')
    with pytest.raises(HandCLIPError, match="not a HandCLIP fused calibration"):
        read_fused_calibration(tmp_path / "bad.json", prints)


@pytest.mark.parametrize("fusion", ["mean", "max"])
def test_fused_threshold_at_its_exact_boundary_with_ties(fusion):
    """Features drawn from 3 vectors: many exactly equal fused scores. On the scores the calibration fused, at most
    floor(FMR x N) impostor scores reach the threshold, and more than that reach the next float below it."""
    from handclip.evaluation.fused_calibration import fused_scores_on_val
    from handclip.metrics.fusion import fuse_scores

    val, train = random_val_train(6)
    rng = np.random.default_rng(7)
    basis = torch.tensor(rng.normal(size=(3, 5)), dtype=torch.float32)
    val = {h: (basis[rng.integers(0, 3, len(n))], n) for h, (_, n) in val.items()}
    train = {h: (basis[rng.integers(0, 3, len(n))], n) for h, (_, n) in train.items()}
    target = 0.1
    fig = fused_calibration_from_embeddings(val, train, target, levels=())["fusions"][fusion]
    scores, probe_has, gallery_has, own = fused_scores_on_val(val, train)
    fused = fuse_scores(scores, probe_has, gallery_has, fusion)
    impostor = [float(fused.scores[i, j]) for i in range(fused.scores.shape[0]) for j in range(fused.scores.shape[1])
                if fused.count[i, j] >= 2 and j != own[i]]
    assert len(set(impostor)) < len(impostor) / 3  # ties everywhere
    allowed = math.floor(target * len(impostor) + 1e-9)
    t = fig["threshold"]
    assert sum(s >= t for s in impostor) <= allowed < sum(s >= float(np.nextafter(t, -np.inf)) for s in impostor)
    assert fig["fmr"] == sum(s >= t for s in impostor) / len(impostor) and fig["impostor_scores"] == len(impostor)
