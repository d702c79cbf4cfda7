"""HandCLIP's own protocol "person across hand types": its Monte Carlo splits and its figures, from embeddings.

Not a published protocol (the papers score each hand type alone): its figures are not comparable to theirs.

* **Persons**: the test identities (``test/<identity>/`` of each 11k hand type) present in at least two of the
  hand types evaluated.
* **Run** ``r`` (of ``runs``; NumPy generator seeded with ``[seed, r]``): for every (person, hand type) with
  photos, one photo drawn at random is that person's **gallery** photo of the hand type; the others, in a random
  order, are its probe photos ``0, 1, ...``.
* **Combination** ``C`` of ``k`` hand types (every one, ``k = 1..H``): the persons having every hand type of
  ``C`` form the gallery (one column per person). **Probe** ``j`` of such a person is its probe photo ``j`` of
  every hand type of ``C``, for ``j`` below its smallest number of probe photos over ``C``: a probe is a group of
  ``k`` photos of one person, one per hand type. Each hand type's photos are scored by that hand type's model
  (cosine similarity to the gallery photo of the same hand type); the ``k`` scores of a (probe, person) pair are
  fused (:func:`handclip.metrics.fusion.fuse_scores`, ``mean`` or ``max``; both sides have all of ``C``, so
  every pair is fused over exactly ``k`` hand types).
* **Figures** per combination and run: Rank-1 and mAP of the probes against the persons (one gallery column per
  person: AP is 1 / rank of the true person), and TAR at the target FMR from the run's genuine (probe, own
  person) and impostor (probe, other person) fused scores (the threshold on those impostor scores). The summary
  rows of ``k`` hand types average each run's figures over the combinations of size ``k`` (every combination is
  listed too), then take mean and standard deviation over runs.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from handclip.errors import HandCLIPError
from handclip.metrics.fusion import FUSIONS, fuse_scores
from handclip.metrics.rank import reid_metrics_from_scores
from handclip.metrics.verification import match_rate, tar_at_fmrs

#: The figures of each row (fractions), summarised as mean and std over runs; the last two only for fused rows
#: with a calibrated threshold (TAR and FMR on the test runs at the fused threshold calibrated on val).
FIGURES = ("rank1", "mAP", "tar", "tar_at_val", "fmr_at_val")


@dataclass(frozen=True)
class HandRun:
    """One Monte Carlo run: per (person, hand type), the gallery photo and the probe photos in order (indices
    into that hand type's list of test photos)."""

    gallery: dict[tuple[str, str], int]
    probes: dict[tuple[str, str], list[int]]


def eligible_persons(identities: Mapping[str, Sequence[str]]) -> list[str]:
    """Sorted persons present (with at least one photo) in at least two hand types; ``identities[hand][i]`` is
    the person of photo ``i`` of the hand type."""
    count: dict[str, int] = {}
    for names in identities.values():
        for person in set(names):
            count[person] = count.get(person, 0) + 1
    return sorted(p for p, n in count.items() if n >= 2)


def check_protocol_data(identities: Mapping[str, Sequence[str]]) -> list[str]:
    """The eligible persons; one error when fewer than two hand types or two eligible persons exist."""
    if len(identities) < 2:
        raise HandCLIPError(f"the person-across-hand-types protocol needs test photos of at least 2 hand types; "
                            f"found {', '.join(identities) or 'none'}")
    persons = eligible_persons(identities)
    if len(persons) < 2:
        raise HandCLIPError(f"the person-across-hand-types protocol needs at least 2 test identities present in "
                            f"2 or more hand types ({', '.join(identities)}); found {len(persons)}")
    return persons


def make_runs(identities: Mapping[str, Sequence[str]], runs: int, seed: int) -> list[HandRun]:
    """The protocol's Monte Carlo runs (see the module docstring); deterministic for a given ``seed``."""
    persons = check_protocol_data(identities)
    photos: dict[tuple[str, str], list[int]] = {}
    for hand in sorted(identities):
        for i, person in enumerate(identities[hand]):
            photos.setdefault((person, hand), []).append(i)
    keys = [(p, h) for p in persons for h in sorted(identities) if (p, h) in photos]
    out = []
    for r in range(runs):
        rng = np.random.default_rng([seed, r])
        gallery, probes = {}, {}
        for key in keys:
            order = [photos[key][i] for i in rng.permutation(len(photos[key]))]
            gallery[key], probes[key] = order[0], order[1:]
        out.append(HandRun(gallery=gallery, probes=probes))
    return out


def combinations(hands: Sequence[str]) -> list[tuple[str, ...]]:
    """Every combination of the hand types, by size then in the given order."""
    return [c for k in range(1, len(hands) + 1) for c in itertools.combinations(hands, k)]


def combination_pairs(run: HandRun, combo: Sequence[str]) -> tuple[list[str], list[tuple[str, int]]]:
    """(gallery persons, probes as (person, j)) of one combination in one run (see the module docstring)."""
    people = sorted({p for p, _ in run.gallery})
    persons = [p for p in people if all((p, h) in run.gallery for h in combo)]
    probes = [(p, j) for p in persons for j in range(min(len(run.probes[(p, h)]) for h in combo))]
    return persons, probes


def similarities(features: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Cosine similarity of every pair of test photos of each hand type (float64), computed once for all runs."""
    out = {}
    for hand, feats in features.items():
        unit = torch.nn.functional.normalize(feats.detach().cpu().double(), dim=1)
        out[hand] = (unit @ unit.t()).numpy()
    return out


def score_combination(sims: Mapping[str, np.ndarray], run: HandRun, combo: Sequence[str], fusion: str,
                      target_fmr: float, threshold: float | None = None) -> dict | None:
    """Figures of one combination in one run from :func:`similarities` (None with fewer than 2 persons or no
    probe); with a (calibrated) ``threshold``, also the TAR and FMR it gives (``tar_at_val``, ``fmr_at_val``)."""
    persons, probes = combination_pairs(run, combo)
    if len(persons) < 2 or not probes:
        return None
    stacked = np.stack([sims[hand][np.ix_([run.probes[(p, hand)][j] for p, j in probes],
                                          [run.gallery[(p, hand)] for p in persons])] for hand in combo])
    ones_p = torch.ones(len(combo), len(probes), dtype=torch.bool)
    ones_g = torch.ones(len(combo), len(persons), dtype=torch.bool)
    fused = fuse_scores(torch.from_numpy(stacked), ones_p, ones_g, fusion).scores
    index = {p: i for i, p in enumerate(persons)}
    labels = np.array([index[p] for p, _ in probes])
    reid = reid_metrics_from_scores(fused, torch.from_numpy(labels), torch.arange(len(persons)), ranks=(1,))
    scores = fused.numpy()
    own = np.zeros(scores.shape, dtype=bool)
    own[np.arange(len(probes)), labels] = True
    tar = tar_at_fmrs(scores[own], scores[~own], [target_fmr])[0]
    out = {"rank1": reid["rank1"], "mAP": reid["mAP"], "tar": tar["tar"], "threshold": tar["threshold"],
           "resolved": tar["resolved"], "persons": len(persons), "probes": len(probes)}
    if threshold is not None:
        out["tar_at_val"], out["fmr_at_val"] = match_rate(scores[own], threshold), match_rate(scores[~own], threshold)
    return out


def _mean_std(values: list[float]) -> dict:
    mean = sum(values) / len(values)
    return {"mean": mean, "std": math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))}


def evaluate_protocol(features: Mapping[str, torch.Tensor], runs: list[HandRun], hands: Sequence[str],
                      target_fmr: float, thresholds: Mapping[str, Mapping[int, float]] | None = None) -> dict:
    """Every combination (and fusion, for 2 or more hand types) in every run, and the per-size summaries.

    ``features[hand]``: (N_hand, D) embeddings of that hand type's test photos (by its own model), in the order
    of the identities the runs were made from. Returns ``{"combinations": [...], "summary": [...]}``; each row
    has ``hands``, ``fusion`` (None for one hand type), ``per_run`` figures and ``rank1``/``mAP``/``tar`` as
    ``{mean, std}`` over runs, plus ``persons`` and ``probes`` (mean over runs). ``thresholds[fusion][k]``:
    calibrated thresholds for scores fused over ``k`` hand types (rows with one also get ``tar_at_val`` and
    ``fmr_at_val``).
    """
    rows = []
    sims = similarities({hand: features[hand] for hand in hands})
    for combo in combinations(hands):
        for fusion in FUSIONS if len(combo) > 1 else (None,):
            threshold = (thresholds or {}).get(fusion or "", {}).get(len(combo))
            per_run = [score_combination(sims, run, combo, fusion or "mean", target_fmr, threshold) for run in runs]
            row = {"hands": list(combo), "k": len(combo), "fusion": fusion, "per_run": per_run}
            scored = [r for r in per_run if r is not None]
            if scored:
                row.update({key: _mean_std([r[key] for r in scored]) for key in FIGURES if key in scored[0]})
                row["persons"] = sum(r["persons"] for r in scored) / len(scored)
                row["probes"] = sum(r["probes"] for r in scored) / len(scored)
                row["resolved"] = all(r["resolved"] for r in scored)
            rows.append(row)
    summary = []
    for k in range(1, len(hands) + 1):
        for fusion in FUSIONS if k > 1 else (None,):
            group = [r for r in rows if r["k"] == k and r["fusion"] == fusion and "rank1" in r]
            if not group:
                continue
            # per run: the average over the combinations scored in that run, then mean and std over runs
            per_run = [[r["per_run"][i] for r in group if r["per_run"][i] is not None] for i in range(len(runs))]
            per_run = [figs for figs in per_run if figs]
            out = {"k": k, "fusion": fusion, "combinations": len(group)}
            for key in FIGURES:
                if all(key in f for figs in per_run for f in figs):
                    out[key] = _mean_std([sum(f[key] for f in figs) / len(figs) for figs in per_run])
            out["persons"] = sum(r["persons"] for r in group) / len(group)
            out["probes"] = sum(r["probes"] for r in group) / len(group)
            out["resolved"] = all(r["resolved"] for r in group)
            summary.append(out)
    return {"combinations": rows, "summary": summary}
