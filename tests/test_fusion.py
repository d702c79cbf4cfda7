"""Score fusion across hand types (metrics/fusion.py) against a plain-Python implementation of its definition."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from handclip.metrics.fusion import fuse_scores


def reference_fusion(scores, probe_has, gallery_has, fusion):
    """Per pair: the hand types both sides have, then their mean or max; -inf and 0 with none in common."""
    h, p, g = len(scores), len(scores[0]), len(scores[0][0])
    fused = [[0.0] * g for _ in range(p)]
    count = [[0] * g for _ in range(p)]
    for i in range(p):
        for j in range(g):
            used = [float(scores[k][i][j]) for k in range(h) if probe_has[k][i] and gallery_has[k][j]]
            count[i][j] = len(used)
            if not used:
                fused[i][j] = -math.inf
            elif fusion == "mean":
                fused[i][j] = sum(used) / len(used)
            else:
                fused[i][j] = max(used)
    return fused, count


@pytest.mark.parametrize("fusion", ["mean", "max"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fusion_matches_reference(fusion, seed):
    rng = np.random.default_rng(seed)
    h, p, g = 4, 23, 17
    # few distinct values: many ties between hand types and between pairs
    scores = rng.integers(-4, 5, size=(h, p, g)).astype(np.float32) / 4
    probe_has = rng.random((h, p)) < 0.6
    gallery_has = rng.random((h, g)) < 0.6
    probe_has[:, 0] = False  # a probe with no hand type at all
    gallery_has[:, 1] = True  # a person with every hand type
    # entries of a missing hand type are never read
    missing = ~(probe_has[:, :, None] & gallery_has[:, None, :])
    noisy = scores.copy()
    noisy[missing] = np.nan
    out = fuse_scores(torch.from_numpy(noisy), torch.from_numpy(probe_has), torch.from_numpy(gallery_has), fusion)
    want, want_count = reference_fusion(scores.tolist(), probe_has.tolist(), gallery_has.tolist(), fusion)
    assert out.count.tolist() == want_count
    assert out.scored.tolist() == [[c > 0 for c in row] for row in want_count]
    got = out.scores.double().numpy()
    want = np.array(want)
    assert np.array_equal(np.isneginf(got), np.isneginf(want))
    finite = np.isfinite(want)
    assert finite.sum() > 0 and (~finite).sum() > 0
    assert np.abs(got[finite] - want[finite]).max() <= 1e-6
    assert sorted(set(np.array(want_count).ravel().tolist())) == [0, 1, 2, 3, 4]


def test_mapping_input_in_any_order():
    rng = np.random.default_rng(5)
    hands = ["dorsal_right", "palmar_left", "dorsal_left"]
    mats = {hand: torch.from_numpy(rng.random((3, 4)).astype(np.float32)) for hand in hands}
    probe = {hand: torch.tensor([True, hand != "dorsal_left", False]) for hand in hands}
    gallery = {hand: torch.tensor([True, True, hand == "palmar_left", False]) for hand in reversed(hands)}
    got = fuse_scores(mats, probe, gallery, "mean")
    stacked = fuse_scores([mats[h] for h in hands], [probe[h] for h in hands], [gallery[h] for h in hands], "mean")
    assert torch.equal(got.scores, stacked.scores) and torch.equal(got.count, stacked.count)
    assert got.count.tolist() == [[3, 3, 1, 0], [2, 2, 1, 0], [0, 0, 0, 0]]
    assert math.isclose(float(got.scores[1, 2]), float(mats["palmar_left"][1, 2]), rel_tol=0, abs_tol=0)


def test_bad_arguments():
    s = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="fusion must be one of"):
        fuse_scores(s, torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 4, dtype=torch.bool), "median")
    with pytest.raises(ValueError, match="masks must be"):
        fuse_scores(s, torch.ones(2, 4, dtype=torch.bool), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="same hand types"):
        fuse_scores({"a": s[0]}, {"b": torch.ones(3, dtype=torch.bool)}, {"a": torch.ones(4, dtype=torch.bool)})
