"""The tables of the person-across-hand-types protocol: ``<name>.md``, ``.csv`` and ``.json`` in outputs/eval/."""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

from handclip.utils.files import atomic_write

log = logging.getLogger(__name__)

TITLE = "Person across hand types (HandCLIP's own protocol: not comparable to the papers' figures)"


def _pct(row: dict, key: str) -> str:
    return f"{100 * row[key]['mean']:.1f} ± {100 * row[key]['std']:.1f}" if key in row else "-"


def _short(hand: str) -> str:
    """``dorsal_right`` -> ``DR``."""
    return "".join(word[0] for word in hand.split("_")).upper()


def _hands(hands: list[str]) -> str:
    return " + ".join(_short(h) for h in hands)


def _fusion(row: dict) -> str:
    return row["fusion"] or "-"


def markdown(results: dict, entries: list[dict], calibration: dict | None, target_fmr: float,
             num_runs: int) -> str:
    tar = f"TAR@FMR {100 * target_fmr:g}% (%)"
    lines = [f"# {TITLE}", "",
             f"Mean ± std over {num_runs} Monte Carlo runs. Test identities in 2 or more hand types; per run one "
             "gallery photo per (person, hand type), a probe is one photo of each hand type of the row, each hand "
             "type scored by its own model, scores fused by mean or max. Rows of k hand types average each run "
             "over the combinations of k hand types (every combination below). TAR@FMR from the run's own "
             "impostor scores; at val threshold: what the fused threshold calibrated on val for k hand types "
             "(below) gives on the test runs.", "",
             "Models: " + "; ".join(f"{e['hand']}: {e['model']}" + (f" ({e['checkpoint']})" if e["checkpoint"]
                                                                      else "") for e in entries), "",
             f"| hand types | fusion | combinations | persons | probes | Rank-1 (%) | mAP (%) | {tar} "
             "| TAR at val threshold (%) | FMR at val threshold (%) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in results["summary"]:
        flag = "" if row["resolved"] else " (unresolved)"
        lines.append(f"| {row['k']} | {_fusion(row)} | {row['combinations']} | {row['persons']:.0f} | "
                     f"{row['probes']:.0f} | {_pct(row, 'rank1')} | {_pct(row, 'mAP')} | {_pct(row, 'tar')}{flag} | "
                     f"{_pct(row, 'tar_at_val')} | {_pct(row, 'fmr_at_val')} |")
    lines += ["", "## Every combination", "",
              f"| hand types | fusion | persons | probes | Rank-1 (%) | mAP (%) | {tar} |",
              "|---|---|---|---|---|---|---|"]
    for row in results["combinations"]:
        if "rank1" not in row:
            lines.append(f"| {_hands(row['hands'])} | {_fusion(row)} | - | - | - | - | - |")
            continue
        lines.append(f"| {_hands(row['hands'])} | {_fusion(row)} | {row['persons']:.0f} | {row['probes']:.0f} | "
                     f"{_pct(row, 'rank1')} | {_pct(row, 'mAP')} | {_pct(row, 'tar')} |")
    lines += ["", ", ".join(f"{_short(e['hand'])}: {e['hand'].replace('_', ' ')}" for e in entries) + "."]
    if calibration is not None:
        lines += ["", f"## Fused threshold (val identities in 2 or more hand types, FMR {target_fmr:g})", "",
                  "| fusion | threshold | val FMR | val TAR | by number of hand types |", "|---|---|---|---|---|"]
        for fusion, fig in calibration["fusions"].items():
            counts = ", ".join(f"{k}: {v['threshold']:.4f}" for k, v in fig.get("by_hand_count", {}).items())
            lines.append(f"| {fusion} | {fig['threshold']:.4f} | {100 * fig['fmr']:.2f}% | {100 * fig['tar']:.1f}% "
                         f"| {counts or '-'} |")
        lines += ["", f"Stored in {calibration['file']}."]
    return "\n".join(lines) + "\n"


CSV_FIELDS = ("level", "hands", "k", "fusion", "combinations", "persons", "probes", "rank1_mean", "rank1_std",
              "mAP_mean", "mAP_std", "tar_mean", "tar_std", "target_fmr", "resolved", "tar_at_val_mean",
              "tar_at_val_std", "fmr_at_val_mean", "fmr_at_val_std")


def csv_text(results: dict, target_fmr: float) -> str:
    """One row per summary (``level=summary``) and per combination (``level=combination``); fractions."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for level, rows in (("summary", results["summary"]), ("combination", results["combinations"])):
        for row in rows:
            line = {"level": level, "hands": "+".join(row["hands"]) if "hands" in row else "", "k": row["k"],
                    "fusion": row["fusion"] or "", "combinations": row.get("combinations", 1),
                    "persons": row.get("persons"), "probes": row.get("probes"), "target_fmr": target_fmr,
                    "resolved": row.get("resolved")}
            for key in ("rank1", "mAP", "tar", "tar_at_val", "fmr_at_val"):
                if key in row:
                    line[f"{key}_mean"], line[f"{key}_std"] = row[key]["mean"], row[key]["std"]
            writer.writerow(line)
    return out.getvalue()


def write_cross_hand_report(results: dict, entries: list[dict], calibration: dict | None, out_dir: Path, stem: str,
                            config: dict, target_fmr: float) -> dict[str, Path]:
    """Write ``<stem>.md``, ``.csv`` and ``.json``; print the markdown; return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    num_runs = len(results["combinations"][0]["per_run"]) if results["combinations"] else 0
    md = markdown(results, entries, calibration, target_fmr, num_runs)
    texts = {"md": md, "csv": csv_text(results, target_fmr),
             "json": json.dumps({"protocol": TITLE, "entries": entries, "results": results,
                                 "fused_calibration": calibration, "config": config}, indent=2, default=str) + "\n"}
    paths = {}
    for ext, text in texts.items():
        path = out_dir / f"{stem}.{ext}"
        if path.exists():
            log.info("replacing %s with this evaluation's results", path)
        paths[f"cross_hand_{ext}"] = atomic_write(path, text)
    print(md, end="")
    return paths
