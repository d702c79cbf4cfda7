"""Verification figures (threshold at a target FMR, TAR, EER, open-set rates) and identity-level scores,
against hand-computed values and the brute-force references in tests/reference.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from reference import brute_eer, brute_fmr, brute_identity_scores, brute_open_set, brute_threshold_at_fmr

from handclip.metrics.scores import identity_scores
from handclip.metrics.verification import (
    det_curve,
    detection_identification_rate,
    equal_error_rate,
    match_rate,
    tar_at_fmrs,
    threshold_at_fmr,
    unknown_rate,
)

IMPOSTOR = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0]


@pytest.mark.parametrize(("target", "above", "fmr"), [
    (0.1, 0.8, 0.1),     # one false match of ten allowed: just above the 2nd highest impostor
    (0.05, 0.9, 0.0),    # none allowed: just above the highest
    (0.25, 0.7, 0.2),    # two allowed (2.5 rounds down)
    (0.29, 0.7, 0.2),    # 0.29 * 10 = 2.9: two
    (0.3, 0.6, 0.3),     # exactly three
])
def test_threshold_at_a_target_fmr_by_hand(target, above, fmr):
    t = threshold_at_fmr(IMPOSTOR, target)
    assert t == np.nextafter(above, np.inf)  # the lowest threshold at which `above` is no longer a match
    assert brute_fmr(IMPOSTOR, t) == pytest.approx(fmr)
    assert brute_fmr(IMPOSTOR, above) > target  # one step lower would exceed the target


def test_tied_impostors_cannot_be_split():
    # one false match of three is allowed, but the two highest are equal: neither may match
    assert threshold_at_fmr([0.9, 0.9, 0.5], 0.34) == np.nextafter(0.9, np.inf)
    assert threshold_at_fmr([0.9, 0.9, 0.5], 0.67) == np.nextafter(0.5, np.inf)


def test_tar_at_fmr_by_hand():
    (row,) = tar_at_fmrs([0.95, 0.85, 0.81, 0.75], IMPOSTOR, [0.1])
    assert row["threshold"] == np.nextafter(0.8, np.inf)
    assert (row["fmr"], row["tar"], row["resolved"]) == (0.1, 0.75, True)
    (row,) = tar_at_fmrs([0.95], IMPOSTOR, [0.01])  # 10 impostor scores cannot resolve 1 %
    assert row["resolved"] is False and row["fmr"] == 0.0


def test_eer_by_hand():
    # at t = 0.65 one genuine of four is rejected and one impostor of four accepted
    assert equal_error_rate([0.6, 0.7, 0.8, 0.9], [0.1, 0.2, 0.3, 0.65])["eer"] == 0.25
    assert equal_error_rate([0.6, 0.7], [0.1, 0.2])["eer"] == 0.0  # separable
    # interleaved: FNMR - FMR jumps over 0 between two operating points, the EER is interpolated
    eer = equal_error_rate([0.2, 0.5, 0.9], [0.1, 0.4, 0.6])["eer"]
    assert eer == pytest.approx(brute_eer([0.2, 0.5, 0.9], [0.1, 0.4, 0.6]))
    assert 0 < eer < 1


def test_eer_threshold_is_the_first_operating_point_with_fnmr_at_least_fmr():
    # separable: FNMR = FMR = 0 first at t = 0.6
    assert equal_error_rate([0.6, 0.7], [0.1, 0.2]) == {"eer": 0.0, "threshold": 0.6}
    # the crossing right after the lowest score: at t = 0.1 (FMR 1, FNMR 0), at t = 0.9 (FMR 1/2, FNMR 1);
    # the line between them meets FNMR = FMR at 2/3
    result = equal_error_rate([0.1, 0.1, 0.1], [0.1, 0.9])
    assert result == {"eer": pytest.approx(2 / 3), "threshold": 0.9}
    assert result["eer"] == pytest.approx(brute_eer([0.1, 0.1, 0.1], [0.1, 0.9]))


@pytest.mark.parametrize("seed", range(6))
def test_figures_equal_the_brute_force_reference(seed):
    rng = np.random.default_rng(seed)
    # two decimals: many exact ties between and within the two score sets
    genuine = np.round(rng.normal(0.6, 0.15, size=int(rng.integers(3, 40))), 2).tolist()
    impostor = np.round(rng.normal(0.3, 0.15, size=int(rng.integers(3, 400))), 2).tolist()
    targets = [0.5, 0.1, 0.05, 0.01, 0.001]
    for row in tar_at_fmrs(genuine, impostor, targets):
        t = brute_threshold_at_fmr(impostor, row["target_fmr"])
        assert row["threshold"] == t
        assert row["fmr"] == pytest.approx(brute_fmr(impostor, t))
        assert row["tar"] == pytest.approx(sum(s >= t for s in genuine) / len(genuine))
        assert match_rate(impostor, t) == row["fmr"]
    assert equal_error_rate(genuine, impostor)["eer"] == pytest.approx(brute_eer(genuine, impostor), abs=1e-12)


def random_gallery(seed: int, num_ids=6, per_id=(1, 4), num_queries=25, dim=8):
    rng = np.random.default_rng(seed)
    gl = [i for i in range(num_ids) for _ in range(int(rng.integers(*per_id)))]
    gf = rng.normal(size=(len(gl), dim)).astype(np.float32)
    ql = rng.integers(0, num_ids + 3, size=num_queries)  # ids >= num_ids are not in the gallery
    qf = rng.normal(size=(num_queries, dim)).astype(np.float32)
    return qf, ql, gf, np.array(gl) * 7 + 3  # labels need not be 0..I-1


@pytest.mark.parametrize(("seed", "chunk"), [(0, None), (1, 1), (2, 4), (3, None)])
def test_identity_scores_equal_the_brute_force_reference(seed, chunk):
    qf, ql, gf, gl = random_gallery(seed)
    ql = np.where(ql < 6, ql * 7 + 3, ql + 1000)
    fast = identity_scores(qf, ql, gf, gl, chunk_size=chunk)
    ref = brute_identity_scores(qf, ql, gf, gl)
    assert fast.genuine().tolist() == pytest.approx(ref["genuine"], abs=1e-6)
    assert fast.impostor().tolist() == pytest.approx(ref["impostor"], abs=1e-6)
    assert fast.nonmated_top().tolist() == pytest.approx(ref["nonmated_top"], abs=1e-6)
    assert fast.identified()[fast.mated].tolist() == ref["identified"]
    assert int(fast.mated.sum()) == len(ref["genuine"]) < len(ql)


def test_an_identity_scores_as_its_best_image():
    gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])  # identity 5 has two images
    scores = identity_scores(torch.tensor([[0.0, 1.0]]), [5], gallery, [5, 9, 5])
    assert scores.identities.tolist() == [5, 9]
    assert scores.table.tolist() == [[pytest.approx(0.8), pytest.approx(1.0)]]
    assert scores.genuine().tolist() == [pytest.approx(0.8)] and scores.identified().tolist() == [False]
    unknown = identity_scores(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), [7, 9], gallery, [5, 9, 5])
    assert unknown.own.tolist() == [-1, 1]  # the column of its identity, -1 when it is not in the gallery


def test_open_set_rates():
    assert unknown_rate([0.2, 0.5, 0.7, 0.9], 0.7) == 0.5  # 0.7 is accepted: not "unknown"
    assert detection_identification_rate([0.9, 0.8, 0.6], [True, False, True], 0.7) == pytest.approx(1 / 3)
    assert math.isnan(unknown_rate([], 0.5))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_open_set_rates_equal_the_brute_force_reference(seed):
    rng = np.random.default_rng(seed)
    genuine = np.round(rng.uniform(0, 1, 40), 2)  # rounded: many scores fall exactly on a threshold
    identified = rng.uniform(size=40) < 0.6
    nonmated = np.round(rng.uniform(0, 1, 30), 2)
    for t in (0.0, 0.25, 0.5, float(genuine[3]), float(nonmated[5]), 1.0, 1.5):
        expected = brute_open_set(genuine.tolist(), identified.tolist(), nonmated.tolist(), t)
        assert match_rate(genuine, t) == pytest.approx(expected["match_rate"])
        assert unknown_rate(nonmated, t) == pytest.approx(expected["unknown_rate"])
        assert detection_identification_rate(genuine, identified, t) == pytest.approx(expected["dir"])
        # tensors as the evaluation passes them
        assert detection_identification_rate(torch.tensor(genuine), torch.tensor(identified), t) == pytest.approx(
            expected["dir"])


def test_open_set_rates_of_nothing_are_not_a_number():
    assert math.isnan(match_rate([], 0.5)) and math.isnan(unknown_rate([], 0.5))
    assert math.isnan(detection_identification_rate([], [], 0.5))


def test_bad_scores_are_named():
    with pytest.raises(ValueError, match="^impostor must be 1-D"):
        threshold_at_fmr([[0.1, 0.2]], 0.1)
    with pytest.raises(ValueError, match=r"^scores must be 1-D; got shape \(1, 2\)$"):
        match_rate([[0.1, 0.2]], 0.5)
    with pytest.raises(ValueError, match="^nonmated_top contains NaN or infinite values$"):
        unknown_rate([0.1, float("nan")], 0.5)
    with pytest.raises(ValueError, match="^genuine must be 1-D"):
        detection_identification_rate([[0.9]], [[True]], 0.5)
    with pytest.raises(ValueError, match=r"^identified has shape \(2,\), genuine has \(3,\)$"):
        detection_identification_rate([0.9, 0.8, 0.6], [True, False], 0.7)


def test_a_tie_with_another_identity_is_not_a_first_place():
    """"identified" is documented as strictly above every other identity: an exact tie does not count."""
    gallery = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # identities 1 and 2 score alike
    scores = identity_scores(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), [1, 3], gallery, [1, 2, 3])
    assert scores.identified().tolist() == [False, True]
    assert scores.nonmated_top().tolist() == [pytest.approx(1.0), pytest.approx(0.0)]


def test_identity_scores_refuse_a_bad_chunk_size():
    q, g = torch.eye(2), torch.eye(2)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="chunk_size must be a positive integer or None"):
            identity_scores(q, [0, 1], g, [0, 1], chunk_size=bad)


def test_scores_from_tensors_arrays_and_lists_agree():
    as_list = [0.9, 0.8, 0.55, 0.3]
    for scores in (torch.tensor(as_list, dtype=torch.float64), np.array(as_list), as_list,
                   torch.tensor(as_list, dtype=torch.float32, requires_grad=True)):
        assert match_rate(scores, 0.55) == 0.75
    with pytest.raises(ValueError, match="target false-match rate must be a number in \\(0, 1\\); got '0.1'"):
        threshold_at_fmr([0.1, 0.2], "0.1")


def test_empty_or_malformed_scores_are_named():
    with pytest.raises(ValueError, match="^genuine must be 1-D"):
        tar_at_fmrs([[0.9]], [0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="^impostor must be 1-D"):
        tar_at_fmrs([0.9], [[0.1, 0.2]], [0.1])
    with pytest.raises(ValueError, match="^no impostor scores"):
        tar_at_fmrs([0.9], [], [0.1])
    with pytest.raises(ValueError, match="^genuine contains NaN"):
        det_curve([float("inf")], [0.1])
    with pytest.raises(ValueError, match="^no genuine scores"):
        det_curve([], [0.1])
    with pytest.raises(ValueError, match="^impostor must be 1-D"):
        det_curve([0.9], [[0.1]])
    with pytest.raises(ValueError, match="^no impostor scores"):
        det_curve([0.9], [])


def test_bad_inputs():
    with pytest.raises(ValueError, match="target false-match rate"):
        threshold_at_fmr([0.1, 0.2], 0)
    with pytest.raises(ValueError, match="target false-match rate"):
        threshold_at_fmr([0.1, 0.2], 1.0)
    with pytest.raises(ValueError, match="no impostor scores: the gallery needs at least two identities"):
        threshold_at_fmr([], 0.01)
    with pytest.raises(ValueError, match="NaN"):
        equal_error_rate([0.5, float("nan")], [0.1])
    with pytest.raises(ValueError, match="no genuine scores"):
        tar_at_fmrs([], [0.1, 0.2], [0.1])
