"""Decisions, and what identify writes and prints: results.json, results.csv, a ranking picture per query."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

from tqdm.auto import tqdm

from handclip.errors import HandCLIPError
from handclip.evaluation.pictures import BLUE, Row, Tile, match_colour, ranking_picture
from handclip.utils.files import atomic_write, partial_folder, printable, slug, swap_in

UNKNOWN = "unknown"
#: What identify writes into its output folder (and may replace with overwrite=true).
OWNED = ("results.json", "results.csv", "rankings")
CSV_FIELDS = ("query", "true_identity", "decision", "decision_score", "threshold", "correct", "rank", "identity",
              "score", "file")


def decide(query: Path, truth: str | None, top: list[dict], threshold: float) -> dict:
    """The top identity when its score reaches ``threshold``, else "unknown"; right or wrong when the truth is known."""
    best = top[0]
    accepted = best["score"] >= threshold
    decision = best["identity"] if accepted else UNKNOWN
    return {"query": str(query), "true_identity": truth, "decision": decision, "score": best["score"],
            "accepted": accepted, "correct": None if truth is None else decision == truth, "top": top}


def _pictures_written(out_dir: Path) -> set[str]:
    """The ranking pictures (names in ``rankings/``) that the results in ``out_dir`` list as written by identify."""
    try:
        records = json.loads((out_dir / "results.json").read_text())["queries"]
        return {Path(r["picture"]).name for r in records if isinstance(r, dict) and r.get("picture")}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def check_output(out_dir: Path, overwrite: bool) -> None:
    """Refuse a folder holding earlier results (unless ``overwrite``) or anything identify did not write: in the
    folder, or in its ``rankings/`` (only the pictures its results.json lists are identify's)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise HandCLIPError(f"output {str(out_dir)!r} exists and is not a folder")
    present = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    foreign = [n for n in present if n not in OWNED]
    rankings = out_dir / "rankings"
    if rankings.is_symlink() or rankings.exists() and not rankings.is_dir():
        foreign.append("rankings (not a folder of pictures)")
    elif rankings.is_dir():
        written = _pictures_written(out_dir)
        foreign += sorted(f"rankings/{p.name}" for p in rankings.iterdir() if p.name not in written or not p.is_file()
                          or p.is_symlink())
    if foreign:
        raise HandCLIPError(f"output folder {str(out_dir)!r} holds files identify did not write "
                            f"({', '.join(foreign[:5])}); choose another name=...")
    if present and not overwrite:
        raise HandCLIPError(f"output folder {str(out_dir)!r} already holds results ({', '.join(present)}); pass "
                            "overwrite=true to replace them, or name=OTHER to keep them")


def _heading(record: dict, threshold: float) -> str:
    name = Path(record["query"]).name
    if record["accepted"]:
        text = f"{name}: {record['decision']} (score {record['score']:.3f} >= threshold {threshold:.3f})"
    else:
        text = f"{name}: unknown (best score {record['score']:.3f} < threshold {threshold:.3f})"
    if record["true_identity"] is not None:
        text += f"; true identity {record['true_identity']}: " + ("right" if record["correct"] else "wrong")
    return text


#: The photos of a case shown in its ranking picture (the first ones; the heading counts them all).
CASE_TILES = 4


def _picture_rows(record: dict, threshold: float) -> list[Row]:
    truth = record["true_identity"]
    items = [Tile(t["file"], [f"{t['rank']}. {t['identity']}", f"score {t['score']:.3f}", Path(t["file"]).name],
                  match_colour(None if truth is None else t["identity"] == truth)) for t in record["top"]]
    if "photos" in record:  # a case: its photos (the first CASE_TILES) as the query
        photos = record["photos"]
        tiles = [Tile(p, [f"case photo {i + 1}/{len(photos)}", Path(p).name], BLUE)
                 for i, p in enumerate(photos[:CASE_TILES])]
        tiles[0].caption += [f"true: {truth}"] if truth else []
        heading = f"case {_heading(record, threshold)} ({len(photos)} photos)"
        return [Row(heading, tiles[0], items, more=tiles[1:])]
    caption = ["query", Path(record["query"]).name] + ([f"true: {truth}"] if truth else [])
    return [Row(_heading(record, threshold), Tile(record["query"], caption, BLUE), items)]


def _csv(result: dict) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in result["queries"]:
        threshold = r.get("threshold", result["threshold"]["threshold"])  # fused runs: one per result
        for t in r["top"]:
            writer.writerow({"query": r["query"], "true_identity": r["true_identity"] or "", "decision": r["decision"],
                             "decision_score": r["score"], "threshold": threshold,
                             "correct": "" if r["correct"] is None else r["correct"], "rank": t["rank"],
                             "identity": t["identity"], "score": t["score"], "file": t["file"]})
    return out.getvalue()


def summary(result: dict) -> dict:
    records = result["queries"]
    known = [r for r in records if r["true_identity"] is not None]
    return {"queries": len(records), "identified": sum(r["accepted"] for r in records),
            "unknown": sum(not r["accepted"] for r in records), "skipped": len(result["skipped_queries"]),
            "with_known_identity": len(known), "correct_decisions": sum(bool(r["correct"]) for r in known),
            "top1_right": sum(r["top"][0]["identity"] == r["true_identity"] for r in known)}


def write_results(result: dict, out_dir: Path, overwrite: bool = False, pictures: bool = True,
                  progress: bool = True) -> dict[str, Path]:
    """Write results.json, results.csv and rankings/ into a fresh folder and swap it in as ``out_dir``.

    Call it holding ``out_dir``'s claim (:func:`~handclip.utils.files.claimed`): the partial folder of a killed run
    is then removed by the next one."""
    check_output(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_folder(out_dir)
    try:
        threshold = result["threshold"]["threshold"]
        if pictures:
            for n, record in enumerate(tqdm(result["queries"], desc="ranking pictures", disable=not progress,
                                            leave=False)):
                stem = slug(Path(record["query"]).stem)
                rel = f"rankings/{n:05d}_{stem}.png"
                ranking_picture(_picture_rows(record, record.get("threshold", threshold)), tmp / rel)
                record["picture"] = str(out_dir / rel)
        result["summary"] = summary(result)
        atomic_write(tmp / "results.json", json.dumps(result, indent=2, default=str, allow_nan=False) + "\n")
        atomic_write(tmp / "results.csv", _csv(result))
        swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = {"json": out_dir / "results.json", "csv": out_dir / "results.csv"}
    if pictures:
        files["rankings"] = out_dir / "rankings"
    return files


def print_results(result: dict, files: dict[str, Path], limit: int = 50) -> None:
    """One line per query (the first ``limit``), then a summary and the files written."""
    threshold = result["threshold"]["threshold"]
    print(f"threshold {threshold:.4f} ({result['threshold']['source']}); gallery: {result['gallery']['images']} images "
          f"of {result['gallery']['identities']} identities (index {result['gallery']['index_status']['status']})")
    mode = result.get("mode") or {}
    if mode.get("decision_mode", "max") != "max":
        print(f"decision mode {mode['decision_mode']}: gallery_mode={mode['gallery_mode']}, "
              f"query_mode={mode['query_mode']}" + (f", case_mode={mode['case_mode']}" if "case_mode" in mode else ""))
    paths = [Path(r["query"]) for r in result["queries"]]
    base = Path(os.path.commonpath(paths)) if len(paths) > 1 else paths[0].parent
    if len(paths) > 1:
        print(f"queries under {printable(str(base))}:")
    for r, path in zip(result["queries"][:limit], paths):
        top = ", ".join(f"{t['identity']} {t['score']:.3f}" for t in r["top"])
        verdict = "" if r["correct"] is None else ("  [right]" if r["correct"] else f"  [wrong: {r['true_identity']}]")
        name = printable(str(path.relative_to(base)))
        if "photos" in r:
            name = f"case {name} ({len(r['photos'])} photos)"
        print(f"{name}: {r['decision']} ({r['score']:.3f}){verdict}  | top-{len(r['top'])}: {top}")
    s = result["summary"]
    if s["queries"] > limit:
        print(f"... {s['queries'] - limit} more in {files['csv']}")
    line = f"{s['queries']} queries: {s['identified']} identified, {s['unknown']} unknown"
    if s["skipped"]:
        line += f", {s['skipped']} unreadable (skipped)"
    if s["with_known_identity"]:
        line += (f"; of {s['with_known_identity']} with a known identity, {s['correct_decisions']} decided right "
                 f"(top-1 right: {s['top1_right']})")
    print(line)
    print(f"written: {', '.join(str(p) for p in files.values())}")
