"""The comparison table: zero-shot CLIP vs fine-tuned HandCLIP for every hand type (md, csv, json)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from pathlib import Path

from handclip.errors import HandCLIPError
from handclip.evaluation import verification_report
from handclip.hands import HAND_TYPES
from handclip.utils.files import atomic_write, slug

log = logging.getLogger(__name__)

ZERO_SHOT = "zero-shot CLIP"
FINE_TUNED = "HandCLIP (fine-tuned)"


def fine_tuned_label(run: str = "") -> str:
    """The model column of a fine-tuned checkpoint: the plain run's, or a sweep job's named by what it changed."""
    return f"HandCLIP ({run})" if run else FINE_TUNED

COLUMNS = ("hand", "model", "Rank-1 (%)", "Rank-5 (%)", "mAP (%)", "queries", "gallery", "ΔRank-1", "ΔmAP")


def _pct(summary: dict, key: str) -> str:
    if key not in summary:
        return "-"
    return f"{100 * summary[key]['mean']:.1f} ± {100 * summary[key]['std']:.1f}"


def _delta(entry: dict, baseline: dict | None, key: str) -> str:
    if entry["model"] == ZERO_SHOT or not baseline or "summary" not in baseline or "summary" not in entry:
        return ""
    diff = 100 * (entry["summary"][key]["mean"] - baseline["summary"][key]["mean"])
    return f"{diff:+.1f}"


def table_rows(entries: list[dict]) -> list[dict]:
    """One row per (hand, model), hands in canonical order, the baseline first."""
    order = {h: i for i, h in enumerate(HAND_TYPES)}
    models = {ZERO_SHOT: 0, FINE_TUNED: 1}  # pragma: no mutate (any larger number keeps the order)
    rows = []
    # sweep jobs' runs after the plain run, by name
    def position(e):  # a re-ranked row right after the row it re-ranks
        base = e.get("reranked_from") or e.get("templates_of") or e["model"]
        return order.get(e["hand"], 99), models.get(base, 9), base, "templates_of" in e, "reranked_from" in e

    for entry in sorted(entries, key=position):
        baseline = next((e for e in entries if e["hand"] == entry["hand"] and e["model"] == ZERO_SHOT), None)
        summary = entry.get("summary")
        if summary is None:
            cells = (entry["hand"], entry["model"], entry.get("status", "-"))
            rows.append({column: "" for column in COLUMNS} | dict(zip(COLUMNS, cells)))
            continue
        rows.append({
            "hand": entry["hand"],
            "model": entry["model"],
            "Rank-1 (%)": _pct(summary, "rank1"),
            "Rank-5 (%)": _pct(summary, "rank5"),
            "mAP (%)": _pct(summary, "mAP"),
            # a protocol whose every run lacked a valid query has no sizes (nor scores): "-"
            "queries": f"{summary['num_valid_queries']:g}" if "num_valid_queries" in summary else "-",
            "gallery": f"{summary['gallery_size']:g}" if "gallery_size" in summary else "-",
            "ΔRank-1": _delta(entry, baseline, "rank1"),
            "ΔmAP": _delta(entry, baseline, "mAP"),
        })
    return rows


def cross_aspect_entries(entries: list[dict]) -> list[dict]:
    """The cross-aspect results (query{i} vs gallery{i}_all) shaped like ordinary entries."""
    return [{**e, **e["cross_aspect"], "protocol": "cross-aspect"} for e in entries if "cross_aspect" in e]


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def csv_text(entries: list[dict]) -> str:
    """Machine-readable figures: fractions, mean and std, one row per (hand, model)."""
    out = io.StringIO()
    fields = ["protocol", "hand", "model", "status", "num_runs", "rank1_mean", "rank1_std", "rank5_mean", "rank5_std",
              "rank10_mean", "rank10_std", "mAP_mean", "mAP_std", "num_queries", "gallery_size", "checkpoint"]
    fields += verification_report.csv_fields(entries)
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")  # missing and None values: empty cells
    writer.writeheader()
    for entry in entries + cross_aspect_entries(entries):
        s = entry.get("summary", {})
        row = {"protocol": entry.get("protocol", "same-aspect"), "hand": entry["hand"], "model": entry["model"],
               "status": entry.get("status", "ok"),
               "num_runs": s.get("num_runs"), "num_queries": s.get("num_valid_queries"),
               "gallery_size": s.get("gallery_size"), "checkpoint": entry.get("checkpoint")}
        for key in ("rank1", "rank5", "rank10", "mAP"):
            if key in s:
                row[f"{key}_mean"], row[f"{key}_std"] = s[key]["mean"], s[key]["std"]
        if entry.get("protocol") != "cross-aspect":
            row.update(verification_report.csv_values(entry))
        writer.writerow(row)
    return out.getvalue()


def report_name(hand: str, ckpt: Path | None, run: str | None) -> str:
    """The default name of a single evaluation's files: ``<hand>_zeroshot``, ``<hand>_finetuned`` for the plain
    training run's best.ckpt, ``<hand>_finetuned_<run>`` for a sweep job's; another checkpoint of a run adds its
    stem, and one outside the training runs its folder and a hash of its path, so no two checkpoints share files."""
    if ckpt is None:
        return f"{hand}_zeroshot"
    name = f"{hand}_finetuned" + (f"_{run}" if run else "")
    if run is None:
        folder = ckpt.parent.parent.name if ckpt.parent.name == "checkpoints" else ckpt.parent.name
        digest = hashlib.sha256(str(ckpt).encode()).hexdigest()[:8]
        return f"{name}_{_name(folder)}-{digest}" + ("" if ckpt.name == "best.ckpt" else f"_{_name(ckpt.stem)}")
    return name + ("" if ckpt.name == "best.ckpt" else f"_{_name(ckpt.stem)}")


def _name(text: str) -> str:
    return slug(text, allowed="A-Za-z0-9._=,+-", default="run")


def _evaluated(entries: list[dict]) -> list[tuple]:
    return [(e.get("hand"), e.get("checkpoint"), e.get("model_name"), e.get("pretrained")) for e in entries]


def check_report_target(out_dir: Path, stem: str, entries_to_come: list[dict], overwrite: bool) -> None:
    """Refuse, before any work, to replace ``<stem>.*`` written for another model or checkpoint (the same
    evaluation run again replaces its own files); ``overwrite=true`` replaces them anyway."""
    path = out_dir / f"{stem}.json"
    if overwrite or not path.is_file():
        return
    try:
        before = json.loads(path.read_text()).get("entries", [])
    except (OSError, ValueError, AttributeError):
        before = None
    if before is not None and _evaluated(before) == _evaluated(entries_to_come):
        return
    what = ", ".join(str(c or f"zero-shot {m} ({p})") for _, c, m, p in _evaluated(before or [])) or "unreadable"
    raise HandCLIPError(f"{path} holds another evaluation ({what}); choose another name=..., or pass "
                        "overwrite=true to replace it")


def write_report(entries: list[dict], out_dir: Path, config: dict, stem: str = "comparison") -> dict[str, Path]:
    """Write ``<stem>.md``, ``.csv`` and ``.json`` (every per-run figure, checkpoints, config)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md = "# HandCLIP: zero-shot CLIP vs fine-tuned (mean ± std over Monte Carlo runs)\n\n"
    md += markdown_table(table_rows(entries))
    cross = cross_aspect_entries(entries)
    if cross:
        md += "\n## Cross-aspect: query{i} against gallery{i}_all (all four aspects' galleries)\n\n"
        md += markdown_table(table_rows(cross))
    md += verification_report.verification_markdown(entries)
    texts = {
        "md": md,
        "csv": csv_text(entries),
        "json": json.dumps({"entries": entries, "config": config}, indent=2, default=str) + "\n",
    }
    paths = {}
    for ext, text in texts.items():
        path = out_dir / f"{stem}.{ext}"
        if path.exists():
            log.info("replacing %s with this evaluation's results", path)
        paths[ext] = atomic_write(path, text)
    return paths
