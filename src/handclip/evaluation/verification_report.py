"""The verification table of the report: TAR at FMR, EER and the open-set figures at the calibrated threshold."""

from __future__ import annotations

from handclip.hands import HAND_TYPES

#: (column title, summary key) of the figures shown as percentages.
_FIGURES = (
    ("EER (%)", "eer"),
    ("TAR at threshold (%)", "tar_at_threshold"),
    ("FMR at threshold (%)", "fmr_at_threshold"),
    ("unknown rate (%)", "unknown_rate"),
    ("DIR at threshold (%)", "dir_at_threshold"),
)


def _tar_keys(entries: list[dict]) -> list[str]:
    keys: list[str] = []
    for entry in entries:
        for key in entry.get("verification", {}).get("summary", {}):
            if key.startswith("tar@fmr=") and not key.endswith(" resolved") and key not in keys:
                keys.append(key)
    return keys


def _pct(summary: dict, key: str) -> str:
    value = summary.get(key)
    if not isinstance(value, dict):
        return "-"
    text = f"{100 * value['mean']:.1f} ± {100 * value['std']:.1f}"
    return text + "*" if summary.get(key + " resolved") is False else text


def _ordered(entries: list[dict]) -> list[dict]:
    order = {h: i for i, h in enumerate(HAND_TYPES)}
    return sorted((e for e in entries if e.get("verification", {}).get("runs")),
                  key=lambda e: (order.get(e["hand"], 99), e["model"] != "zero-shot CLIP"))


def verification_markdown(entries: list[dict]) -> str:
    """A markdown section (empty when no entry has verification figures)."""
    rows = _ordered(entries)
    if not rows:
        return ""
    tars = _tar_keys(rows)
    columns = ["hand", "model", *[k.replace("tar@fmr=", "TAR@FMR ") + " (%)" for k in tars], "EER (%)",
               "threshold (val FMR)", *[c for c, _ in _FIGURES[1:]]]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for entry in rows:
        v = entry["verification"]
        s = v["summary"]
        cal = v.get("calibration")
        threshold = f"{cal['threshold']:.4f} ({100 * cal['target_fmr']:g} %)" if cal else "not calibrated"
        cells = [entry["hand"], entry["model"], *[_pct(s, k) for k in tars], _pct(s, "eer"), threshold,
                 *[_pct(s, key) for _, key in _FIGURES[1:]]]
        lines.append("| " + " | ".join(cells) + " |")
    note = ("\nTAR@FMR a: share of genuine comparisons accepted at the threshold where a share a of the test "
            "impostor comparisons is accepted. EER: where false matches and false non-matches are equally "
            "frequent. Threshold: calibrated on val against the training identities for the FMR in brackets. "
            "FMR at threshold: on the test comparisons. Unknown rate: share of queries answered \"unknown\" "
            "when their identity is withheld from the gallery. DIR: share of queries whose identity is ranked "
            "first and accepted. Mean ± std over the runs; * marks an FMR too small for the number of "
            "impostor comparisons.\n")
    return "\n## Verification and open-set figures\n\n" + "\n".join(lines) + "\n" + note


def csv_fields(entries: list[dict]) -> list[str]:
    """Extra CSV columns (mean and std of every verification figure), appended after the re-ID ones."""
    if not _ordered(entries):
        return []
    keys = [*_tar_keys(entries), *[key for _, key in _FIGURES]]
    return [f"{k}_{stat}" for k in keys for stat in ("mean", "std")] + ["threshold", "threshold_target_fmr"]


def csv_values(entry: dict) -> dict:
    v = entry.get("verification") or {}
    wanted = {*_tar_keys([entry]), *[key for _, key in _FIGURES]}
    out = {}
    for key, value in v.get("summary", {}).items():
        if key in wanted:
            out[f"{key}_mean"], out[f"{key}_std"] = value["mean"], value["std"]
    if v.get("calibration"):
        out["threshold"], out["threshold_target_fmr"] = v["calibration"]["threshold"], v["calibration"]["target_fmr"]
    return out
