"""The decision as the page shows it: identify's own (the top person when their score reaches the threshold at the
chosen false-match rate, else *unknown*), with the grey zone around it.

A calibration file lists thresholds at several FMR levels (0.1, 0.01, 0.001, 0.0001); the lower the FMR, the
higher the threshold. The grey zone of a decision at level ``f`` lies between the thresholds of the levels next to
it: from the threshold of the next looser level (higher FMR) up to that of the next stricter one (lower FMR). A
score inside it is shown as "grey zone" whatever the decision; at the ends (no looser or no stricter level) the
decision's own threshold closes the zone."""

from __future__ import annotations

import math
from dataclasses import dataclass

from handclip.identify.results import UNKNOWN


@dataclass(frozen=True)
class Band:
    """The threshold of the decision and the grey zone ``[low, high)`` with the FMR levels of its ends."""

    threshold: float
    fmr: float | None
    low: float
    high: float
    low_fmr: float | None
    high_fmr: float | None

    def zone(self, score: float) -> str:
        """"match" (at or above the zone), "grey zone" (inside it), "no match" (below it)."""
        if score >= self.high:
            return "match"
        return "grey zone" if score >= self.low else "no match"


def band(threshold: dict, levels: list[dict] | None) -> Band:
    """The :class:`Band` of identify's ``threshold`` record (``threshold``, ``target_fmr``) and the calibration's
    ``levels``; without levels (``threshold=`` given) the zone is empty at the threshold."""
    value, target = float(threshold["threshold"]), threshold.get("target_fmr")
    rows = sorted((r for r in levels or [] if math.isfinite(r.get("threshold", math.nan))),
                  key=lambda r: -r["target_fmr"])  # loosest first: thresholds rise along the list
    at = next((i for i, r in enumerate(rows) if target is not None
               and math.isclose(r["target_fmr"], target, rel_tol=1e-9)), None)
    if at is None:
        return Band(value, target, value, value, target, target)
    looser = rows[at - 1] if at > 0 else rows[at]
    stricter = rows[at + 1] if at + 1 < len(rows) else rows[at]
    low, high = min(looser["threshold"], value), max(stricter["threshold"], value)
    return Band(value, target, low, high, looser["target_fmr"], stricter["target_fmr"])


def percent(fmr: float | None) -> str:
    return "?" if fmr is None else f"{100 * fmr:g} %"


def describe(record: dict, b: Band) -> str:
    """One line: the decision, its score against the threshold and its FMR, and the zone."""
    score = record["score"]
    if record["decision"] != UNKNOWN:
        text = f"**{record['decision']}** (score {score:.3f} ≥ threshold {b.threshold:.3f} at FMR {percent(b.fmr)})"
    else:
        text = f"**unknown** (best score {score:.3f} < threshold {b.threshold:.3f} at FMR {percent(b.fmr)})"
    if b.zone(score) == "grey zone":
        text += (f" — grey zone: between the thresholds at FMR {percent(b.low_fmr)} ({b.low:.3f}) and "
                 f"{percent(b.high_fmr)} ({b.high:.3f}); check by eye")
    return text
