"""Verification and open-set figures from genuine and impostor scores (see :mod:`handclip.metrics.scores`).

A comparison is *accepted* (a match) when its score is **at or above** the threshold ``t``.

* **FMR(t)** (false match rate): the fraction of impostor scores ``>= t``.
* **FNMR(t)** (false non-match rate): the fraction of genuine scores ``< t``; **TAR(t)** = 1 - FNMR(t).
* **Threshold at a target FMR** ``a``: the lowest threshold whose FMR is at most ``a``: at most
  ``floor(a * N)`` of the ``N`` impostor scores may reach it, so it lies just above the
  ``(floor(a * N) + 1)``-th highest impostor score (the next float64 above it). With fewer than ``1 / a``
  impostor scores no false match is allowed and the target is marked *not resolved*.
* **TAR at FMR a**: TAR at that threshold (no interpolation between operating points: conservative).
* **EER** (equal error rate): where FMR and FNMR are equal. The operating points are the thresholds at
  every distinct score (and +inf); FNMR - FMR rises from -1 to +1 along them, and the EER is read where
  the straight line between the last point with FNMR < FMR and the next one crosses FNMR = FMR.
* **Unknown rate at t**: the fraction of non-mated searches (the query's own identity withheld from the
  gallery) whose best score is ``< t``, i.e. correctly answered "unknown".
* **DIR at t** (detection and identification rate): the fraction of mated searches whose own identity is
  ranked first *and* accepted (score ``>= t``).

Scores are handled in float64 (NumPy). This module imports nothing else of HandCLIP.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def as_scores(x, name: str) -> np.ndarray:
    """A 1-D float64 array of finite scores (tensor, array or list)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D; got shape {arr.shape}")
    if arr.size and not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def check_fmr(target_fmr: float) -> float:
    if isinstance(target_fmr, bool) or not isinstance(target_fmr, (int, float, np.floating)) \
            or not 0 < float(target_fmr) < 1:
        raise ValueError(f"a target false-match rate must be a number in (0, 1); got {target_fmr!r}")
    return float(target_fmr)


_EMPTY = {"impostor": "the gallery needs at least two identities",
          "genuine": "no query has its identity in the gallery"}


def _nonempty(arr: np.ndarray, what: str) -> np.ndarray:
    if arr.size == 0:
        raise ValueError(f"no {what} scores: {_EMPTY[what]}")
    return arr


def allowed_false_matches(num_impostor: int, target_fmr: float) -> int:
    """``floor(target_fmr * num_impostor)``, robust to binary rounding (0.29 * 100 -> 29)."""
    return int(math.floor(target_fmr * num_impostor + 1e-9))


def threshold_at_fmr(impostor, target_fmr: float) -> float:
    """The lowest threshold whose FMR on ``impostor`` is at most ``target_fmr``."""
    return thresholds_at_fmrs(impostor, [target_fmr])[0]


def thresholds_at_fmrs(impostor, targets: Sequence[float]) -> list[float]:
    """:func:`threshold_at_fmr` for several targets, sorting the impostor scores once."""
    imp = np.sort(_nonempty(as_scores(impostor, "impostor"), "impostor"))[::-1]  # descending
    out = []
    for target in targets:
        k = min(allowed_false_matches(imp.size, check_fmr(target)), imp.size - 1)
        out.append(float(np.nextafter(imp[k], np.inf)))
    return out


def match_rate(scores, threshold: float) -> float:
    """Fraction of ``scores`` at or above ``threshold`` (FMR for impostor scores, TAR for genuine ones)."""
    arr = as_scores(scores, "scores")
    return float((arr >= threshold).mean()) if arr.size else float("nan")


def tar_at_fmrs(genuine, impostor, targets: Sequence[float]) -> list[dict]:
    """For each target FMR: ``{target_fmr, threshold, fmr, tar, resolved}`` (see the module docstring)."""
    gen = np.sort(_nonempty(as_scores(genuine, "genuine"), "genuine"))
    imp = np.sort(_nonempty(as_scores(impostor, "impostor"), "impostor"))
    rows = []
    for target, threshold in zip(targets, thresholds_at_fmrs(imp, targets)):
        fmr = (imp.size - np.searchsorted(imp, threshold, side="left")) / imp.size
        tar = (gen.size - np.searchsorted(gen, threshold, side="left")) / gen.size
        rows.append({"target_fmr": float(target), "threshold": threshold, "fmr": float(fmr), "tar": float(tar),
                     "resolved": allowed_false_matches(imp.size, float(target)) >= 1})
    return rows


def det_curve(genuine, impostor) -> dict[str, np.ndarray]:
    """Operating points at every distinct score (ascending) and +inf: ``thresholds``, ``fmr``, ``fnmr``."""
    gen = np.sort(_nonempty(as_scores(genuine, "genuine"), "genuine"))
    imp = np.sort(_nonempty(as_scores(impostor, "impostor"), "impostor"))
    thresholds = np.append(np.unique(np.concatenate([gen, imp])), np.inf)
    fmr = (imp.size - np.searchsorted(imp, thresholds, side="left")) / imp.size
    fnmr = np.searchsorted(gen, thresholds, side="left") / gen.size
    return {"thresholds": thresholds, "fmr": fmr, "fnmr": fnmr}


def equal_error_rate(genuine, impostor) -> dict[str, float]:
    """``{eer, threshold}``: the EER and the first operating threshold at which FNMR >= FMR."""
    curve = det_curve(genuine, impostor)
    fmr, fnmr = curve["fmr"], curve["fnmr"]
    diff = fnmr - fmr  # -1 at the lowest score, +1 at +inf, non-decreasing
    j = int(np.argmax(diff >= 0))
    threshold = float(curve["thresholds"][j])
    if diff[j] == 0 or j == 0:
        return {"eer": float(fmr[j]), "threshold": threshold}
    lam = -diff[j - 1] / (diff[j] - diff[j - 1])
    return {"eer": float(fmr[j - 1] + lam * (fmr[j] - fmr[j - 1])), "threshold": threshold}


def unknown_rate(nonmated_top, threshold: float) -> float:
    """Fraction of non-mated searches answered "unknown": best score below ``threshold``."""
    arr = as_scores(nonmated_top, "nonmated_top")
    return float((arr < threshold).mean()) if arr.size else float("nan")


def detection_identification_rate(genuine, identified, threshold: float) -> float:
    """Fraction of mated searches ranked first (``identified``) with a genuine score ``>= threshold``."""
    gen = as_scores(genuine, "genuine")
    ok = np.asarray(identified.detach().cpu().numpy() if hasattr(identified, "detach") else identified, dtype=bool)
    if ok.shape != gen.shape:
        raise ValueError(f"identified has shape {ok.shape}, genuine has {gen.shape}")
    return float((ok & (gen >= threshold)).mean()) if gen.size else float("nan")
