"""The threshold for scores fused across hand types, calibrated on val and stored with the models it belongs to.

Computed from the val and train splits of every hand type, each embedded by its own model:

* **probes**: the val identities present in at least two hand types' val splits; probe ``j`` of such a person
  holds its val photo ``j`` (file order) of every hand type it has there, for ``j`` below its smallest number of
  val photos over those hand types (11k: one val photo per identity and hand type, so one probe per person);
* **gallery**: every training identity, each hand type scoring as its best training photo of that hand type
  (as the per-model calibration, :mod:`handclip.evaluation.calibration`);
* each (probe, person) pair is fused over the hand types both have (:func:`handclip.metrics.fusion.fuse_scores`,
  ``mean`` and ``max``); only pairs fused over **two or more** hand types count (a pair with one hand type in
  common is a single model's score: that model's own calibration applies). Genuine: the probe's own person;
  impostor: every other person. The threshold at a target FMR is
  :func:`handclip.metrics.verification.threshold_at_fmr` of those impostor scores (accepted: score >= threshold).
  ``by_hand_count[k]`` is the threshold for scores fused over exactly ``k`` hand types (``max`` fusion's impostor
  scores grow with the count): every pair counts once for each set of ``k`` hand types both sides have, fused
  over that set only (so a val split where everyone has all four hand types still calibrates 2 and 3).

The file, ``<output_root>/train/fusion.calibration.json`` when every hand type's model is its training run's
``best.ckpt`` (:func:`fused_calibration_path`), names each hand type's model fingerprint;
:func:`read_fused_calibration` refuses it for any other set of models.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from handclip.errors import HandCLIPError
from handclip.evaluation.calibration import write_calibration
from handclip.evaluation.cross_hand_protocol import eligible_persons
from handclip.metrics.fusion import FUSIONS, fuse_scores
from handclip.metrics.scores import identity_scores
from handclip.metrics.verification import check_fmr, tar_at_fmrs

#: Bump when the meaning of a fused calibration file changes.
FUSED_CALIBRATION_FORMAT = 1
#: Pairs fused over fewer hand types are left out of the fused calibration.
MIN_HAND_TYPES = 2


def fused_calibration_path(output_root: str | Path) -> Path:
    """Where the fused calibration of the four training runs' checkpoints lives."""
    return Path(output_root) / "train" / "fusion.calibration.json"


def _probes(val_ids: Mapping[str, Sequence[str]]) -> list[tuple[str, dict[str, int]]]:
    """(person, {hand: photo index}) of every fused val probe (see the module docstring)."""
    photos: dict[tuple[str, str], list[int]] = {}
    for hand, names in val_ids.items():
        for i, person in enumerate(names):
            photos.setdefault((person, hand), []).append(i)
    out = []
    for person in eligible_persons(val_ids):
        hands = [h for h in val_ids if (person, h) in photos]
        for j in range(min(len(photos[(person, h)]) for h in hands)):
            out.append((person, {h: photos[(person, h)][j] for h in hands}))
    return out


def fused_scores_on_val(val: Mapping[str, tuple[torch.Tensor, Sequence[str]]],
                        train: Mapping[str, tuple[torch.Tensor, Sequence[str]]]) -> tuple:
    """(scores (H, P, G), probe_has, gallery_has, own (P,) column of each probe's person) on the val probes."""
    hands = list(val)
    probes = _probes({h: val[h][1] for h in hands})
    persons = sorted({p for h in hands for p in train[h][1]})
    column = {p: i for i, p in enumerate(persons)}
    if not probes or len(persons) < 2:
        raise HandCLIPError(f"fused calibration needs val identities in 2 or more hand types and at least 2 "
                            f"training identities; found {len({p for p, _ in probes})} and {len(persons)}")
    scores = torch.full((len(hands), len(probes), len(persons)), float("nan"))
    probe_has = torch.zeros(len(hands), len(probes), dtype=torch.bool)
    gallery_has = torch.zeros(len(hands), len(persons), dtype=torch.bool)
    for k, hand in enumerate(hands):
        rows = [i for i, (_, photos) in enumerate(probes) if hand in photos]
        train_feats, train_names = train[hand]
        gallery_has[k, [column[p] for p in set(train_names)]] = True
        if not rows:
            continue
        val_feats, val_names = val[hand]
        queries = val_feats[[probes[i][1][hand] for i in rows]]
        table = identity_scores(queries, torch.zeros(len(rows), dtype=torch.long), train_feats,
                                torch.tensor([column[p] for p in train_names]))
        scores[k, torch.tensor(rows).unsqueeze(1), table.identities.cpu().unsqueeze(0)] = table.table.cpu()
        probe_has[k, rows] = True
    own = torch.tensor([column.get(p, -1) for p, _ in probes])
    return scores, probe_has, gallery_has, own


def fused_calibration_from_embeddings(val, train, target_fmr: float = 0.01, levels=(0.1, 0.01, 0.001)) -> dict:
    """The fused thresholds (``fusions[mean|max]``) from per-hand ``(features, person names)`` of val and train."""
    target_fmr = check_fmr(target_fmr)
    scores, probe_has, gallery_has, own = fused_scores_on_val(val, train)
    mine = torch.zeros(scores.shape[1:], dtype=torch.bool)
    rows = torch.nonzero(own >= 0).flatten()
    mine[rows, own[rows]] = True
    targets = sorted({float(v) for v in levels} | {target_fmr}, reverse=True)
    out = {"format": FUSED_CALIBRATION_FORMAT, "target_fmr": target_fmr, "hands": list(val),
           "min_hand_types": MIN_HAND_TYPES, "val_probes": int(scores.shape[1]),
           "gallery_persons": int(scores.shape[2]), "fusions": {}}
    for fusion in FUSIONS:
        fused = fuse_scores(scores, probe_has, gallery_has, fusion)
        counted = fused.count >= MIN_HAND_TYPES
        genuine, impostor = fused.scores[counted & mine], fused.scores[counted & ~mine]
        if genuine.numel() == 0 or impostor.numel() == 0:
            raise HandCLIPError(f"fused calibration: {genuine.numel()} genuine and {impostor.numel()} impostor "
                                f"scores fused over {MIN_HAND_TYPES} or more hand types; need at least one each")
        levels_out = tar_at_fmrs(genuine, impostor, targets)
        main = next(r for r in levels_out if r["target_fmr"] == target_fmr)
        by_count = {}
        for k in range(MIN_HAND_TYPES, len(val) + 1):
            gen_k, imp_k = _restricted_to_subsets(scores, probe_has, gallery_has, mine, fusion, k)
            if gen_k.numel() and imp_k.numel():
                by_count[str(k)] = {**tar_at_fmrs(gen_k, imp_k, [target_fmr])[0],
                                    "genuine_scores": int(gen_k.numel()), "impostor_scores": int(imp_k.numel())}
        out["fusions"][fusion] = {**main, "levels": levels_out, "by_hand_count": by_count,
                                  "genuine_scores": int(genuine.numel()), "impostor_scores": int(impostor.numel())}
    return out


def _restricted_to_subsets(scores, probe_has, gallery_has, mine, fusion: str, k: int) -> tuple:
    """(genuine, impostor) scores fused over exactly the hand types of a k-subset, for every k-subset of the hand
    types that both sides of a pair have (each pair counted once per such subset)."""
    genuine, impostor = [], []
    for combo in itertools.combinations(range(scores.shape[0]), k):
        keep = torch.zeros_like(probe_has)
        keep[list(combo)] = True
        fused = fuse_scores(scores, probe_has & keep, gallery_has, fusion)
        counted = fused.count == k
        genuine.append(fused.scores[counted & mine])
        impostor.append(fused.scores[counted & ~mine])
    return torch.cat(genuine), torch.cat(impostor)


def write_fused_calibration(path: str | Path, calibration: dict, models: Mapping[str, dict]) -> Path:
    """Write the calibration with ``models`` (hand type -> ``{fingerprint, checkpoint, model_name}``)."""
    return write_calibration(path, {**calibration, "models": dict(models)})


def load_fused_calibration(path: str | Path) -> dict:
    """A fused calibration file's contents, checked for its shape (not yet for the models)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise HandCLIPError(f"fused calibration file {str(path)!r} not found; compute it with "
                            "`python -m handclip.eval all=true cross_hand=true`") from None
    except (OSError, ValueError) as err:
        raise HandCLIPError(f"fused calibration file {str(path)!r} is unreadable or not JSON: {err}") from None
    ok = (isinstance(data, dict) and data.get("format") == FUSED_CALIBRATION_FORMAT
          and isinstance(data.get("models"), dict) and isinstance(data.get("fusions"), dict)
          and all(isinstance(m, dict) and isinstance(m.get("fingerprint"), str) for m in data["models"].values())
          and all(isinstance(f, dict) and isinstance(f.get("threshold"), (int, float))
                  and math.isfinite(f["threshold"]) for f in data["fusions"].values()))
    if not ok:
        raise HandCLIPError(f"{str(path)!r} is not a HandCLIP fused calibration file (format "
                            f"{FUSED_CALIBRATION_FORMAT}: models with fingerprints, fusions with thresholds)")
    return data


def read_fused_calibration(path: str | Path, fingerprints: Mapping[str, str], fusion: str = "mean",
                           target_fmr: float | None = None, hand_count: int | None = None) -> dict:
    """The fused threshold of ``path`` for these models: ``{threshold, target_fmr, fmr, tar, resolved, fusion}``.

    Args:
        path: a file written by :func:`write_fused_calibration` (e.g. :func:`fused_calibration_path`).
        fingerprints: hand type -> :func:`~handclip.models.fingerprint.encoder_fingerprint` of the model that
            scores it. Must name exactly the file's hand types, each with the file's fingerprint (the threshold
            depends on every model): anything else is refused.
        fusion: ``mean`` or ``max``.
        target_fmr: one of the file's levels (None: the file's own target).
        hand_count: the threshold for pairs fused over exactly this many hand types (file's target only);
            None: the one for every pair fused over 2 or more.

    Raises:
        HandCLIPError: a missing or malformed file, other models, an unknown fusion, level or hand count.
    """
    data = load_fused_calibration(path)
    where = f"fused calibration {str(path)!r}"
    if set(fingerprints) != set(data["models"]):
        raise HandCLIPError(f"{where} is for hand types {', '.join(data['models'])}, not "
                            f"{', '.join(fingerprints) or 'none'}; recompute it with cross_hand=true")
    for hand, fingerprint in fingerprints.items():
        if data["models"][hand]["fingerprint"] != fingerprint:
            raise HandCLIPError(f"{where} was computed for another {hand} model (fingerprint "
                                f"{data['models'][hand]['fingerprint']} vs {fingerprint}); recompute it with "
                                "`python -m handclip.eval all=true cross_hand=true`")
    if fusion not in data["fusions"]:
        raise HandCLIPError(f"{where} has no threshold for fusion={fusion!r} (it has {', '.join(data['fusions'])})")
    entry = data["fusions"][fusion]
    keys = ("threshold", "target_fmr", "fmr", "tar", "resolved")
    if hand_count is not None:
        if target_fmr is not None and not math.isclose(check_fmr(target_fmr), data["target_fmr"], rel_tol=1e-9):
            raise HandCLIPError(f"{where}: thresholds per hand count exist for FMR {data['target_fmr']:g} only")
        row = entry.get("by_hand_count", {}).get(str(hand_count))
        if row is None:
            raise HandCLIPError(f"{where} has no {fusion} threshold for {hand_count} hand types (it has "
                                f"{', '.join(entry.get('by_hand_count', {})) or 'none'})")
        return {**{k: row.get(k) for k in keys}, "fusion": fusion, "hand_count": hand_count}
    if target_fmr is None:
        return {**{k: entry.get(k) for k in keys}, "fusion": fusion}
    target_fmr = check_fmr(target_fmr)
    for row in entry.get("levels", []):
        if math.isclose(row["target_fmr"], target_fmr, rel_tol=1e-9):
            return {**{k: row.get(k) for k in keys}, "fusion": fusion}
    known = ", ".join(f"{r['target_fmr']:g}" for r in entry.get("levels", []))
    raise HandCLIPError(f"{where} has no threshold for FMR {target_fmr:g} (it has {known})")
