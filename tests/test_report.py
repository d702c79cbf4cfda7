"""The comparison report (evaluation/report.py) from hand-written entries: no model, so mutation testing can run it.

The expected tables are written out in full: a user reads them, papers copy them, scripts parse the CSV."""

from __future__ import annotations

import csv
import io
import json
import logging

from handclip.evaluation.report import (
    COLUMNS,
    FINE_TUNED,
    ZERO_SHOT,
    csv_text,
    markdown_table,
    table_rows,
    write_report,
)


def stat(mean: float, std: float = 0.0) -> dict:
    return {"mean": mean, "std": std}


def entry(hand: str, model: str, rank1: float, mAP: float, **extra) -> dict:
    summary = {"rank1": stat(rank1, 0.02), "rank5": stat(min(1.0, rank1 + 0.1), 0.01), "rank10": stat(1.0),
               "mAP": stat(mAP, 0.03), "num_runs": 2, "num_valid_queries": 12, "gallery_size": 4}
    return {"hand": hand, "model": model, "summary": summary, **extra}


ENTRIES = [
    entry("palmar_left", FINE_TUNED, 0.75, 0.5, checkpoint="/runs/pl/best.ckpt"),
    entry("dorsal_right", FINE_TUNED, 0.5, 0.25, checkpoint="/runs/dr/best.ckpt"),
    entry("palmar_left", ZERO_SHOT, 0.8, 0.45),
    entry("dorsal_right", ZERO_SHOT, 0.2, 0.35),
    {"hand": "dorsal_left", "model": FINE_TUNED, "status": "no checkpoint"},
]


def test_rows_in_hand_order_baseline_first_with_signed_deltas():
    rows = table_rows(ENTRIES)
    assert [(r["hand"], r["model"]) for r in rows] == [
        ("dorsal_right", ZERO_SHOT), ("dorsal_right", FINE_TUNED), ("dorsal_left", FINE_TUNED),
        ("palmar_left", ZERO_SHOT), ("palmar_left", FINE_TUNED)]
    assert rows[1] == {"hand": "dorsal_right", "model": FINE_TUNED, "Rank-1 (%)": "50.0 ± 2.0",
                       "Rank-5 (%)": "60.0 ± 1.0", "mAP (%)": "25.0 ± 3.0", "queries": "12", "gallery": "4",
                       "ΔRank-1": "+30.0", "ΔmAP": "-10.0"}
    assert (rows[4]["ΔRank-1"], rows[4]["ΔmAP"]) == ("-5.0", "+5.0")
    assert rows[0]["ΔRank-1"] == rows[0]["ΔmAP"] == ""  # the baseline has no delta
    assert rows[2] == {**dict.fromkeys(COLUMNS, ""), "hand": "dorsal_left", "model": FINE_TUNED,
                       "Rank-1 (%)": "no checkpoint"}


def test_no_delta_without_a_scored_baseline():
    alone = table_rows([entry("dorsal_right", FINE_TUNED, 0.5, 0.25)])
    assert alone[0]["ΔRank-1"] == alone[0]["ΔmAP"] == ""
    unscored = {"hand": "dorsal_right", "model": ZERO_SHOT, "status": "failed"}
    rows = table_rows([entry("dorsal_right", FINE_TUNED, 0.5, 0.25), unscored])
    assert rows[1]["ΔRank-1"] == "" and rows[0]["Rank-1 (%)"] == "failed"
    partial = entry("dorsal_right", FINE_TUNED, 0.5, 0.25)
    del partial["summary"]["rank5"], partial["summary"]["gallery_size"]
    (row,) = table_rows([partial])
    assert row["Rank-5 (%)"] == "-" and row["gallery"] == "-" and row["queries"] == "12"


def test_markdown_table_text():
    rows = table_rows(ENTRIES[1:2] + ENTRIES[3:4])
    assert markdown_table(rows) == (
        "| hand | model | Rank-1 (%) | Rank-5 (%) | mAP (%) | queries | gallery | ΔRank-1 | ΔmAP |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
        "| dorsal_right | zero-shot CLIP | 20.0 ± 2.0 | 30.0 ± 1.0 | 35.0 ± 3.0 | 12 | 4 |  |  |\n"
        "| dorsal_right | HandCLIP (fine-tuned) | 50.0 ± 2.0 | 60.0 ± 1.0 | 25.0 ± 3.0 | 12 | 4 | +30.0 | -10.0 |\n")


def test_csv_holds_fractions_and_cross_aspect_rows():
    cross = entry("dorsal_right", FINE_TUNED, 0.5, 0.25)
    cross["cross_aspect"] = {"summary": {**cross["summary"], "rank1": stat(0.125, 0.5)}}
    rows = list(csv.DictReader(io.StringIO(csv_text([ENTRIES[4], cross]))))
    assert list(rows[0]) == ["protocol", "hand", "model", "status", "num_runs", "rank1_mean", "rank1_std",
                             "rank5_mean", "rank5_std", "rank10_mean", "rank10_std", "mAP_mean", "mAP_std",
                             "num_queries", "gallery_size", "checkpoint"]
    assert rows[0] == {**dict.fromkeys(rows[0], ""), "protocol": "same-aspect", "hand": "dorsal_left",
                       "model": FINE_TUNED, "status": "no checkpoint"}
    assert rows[1] == {"protocol": "same-aspect", "hand": "dorsal_right", "model": FINE_TUNED, "status": "ok",
                       "num_runs": "2", "rank1_mean": "0.5", "rank1_std": "0.02", "rank5_mean": "0.6",
                       "rank5_std": "0.01", "rank10_mean": "1.0", "rank10_std": "0.0", "mAP_mean": "0.25",
                       "mAP_std": "0.03", "num_queries": "12", "gallery_size": "4", "checkpoint": ""}
    assert rows[2]["protocol"] == "cross-aspect" and (rows[2]["rank1_mean"], rows[2]["rank1_std"]) == ("0.125", "0.5")
    assert len(rows) == 3


def test_written_files(tmp_path, caplog):
    cross = entry("dorsal_right", FINE_TUNED, 0.5, 0.25)
    cross["cross_aspect"] = {"summary": cross["summary"]}
    files = write_report(ENTRIES + [cross], tmp_path / "eval", {"seed": 7}, stem="run")
    assert files == {ext: tmp_path / "eval" / f"run.{ext}" for ext in ("md", "csv", "json")}
    md = files["md"].read_text()
    assert md.startswith("# HandCLIP: zero-shot CLIP vs fine-tuned (mean ± std over Monte Carlo runs)\n\n| hand |")
    assert "\n## Cross-aspect: query{i} against gallery{i}_all (all four aspects' galleries)\n\n| hand |" in md
    assert md.count("| dorsal_right | HandCLIP (fine-tuned) | 50.0 ± 2.0 |") == 3  # two same-aspect rows, one cross
    data = json.loads(files["json"].read_text())
    assert data == {"entries": json.loads(json.dumps(ENTRIES + [cross])), "config": {"seed": 7}}
    assert files["csv"].read_text() == csv_text(ENTRIES + [cross])
    plain = write_report(ENTRIES, tmp_path / "eval", {}, stem="plain")
    assert "Cross-aspect" not in plain["md"].read_text()
    with caplog.at_level(logging.INFO, logger="handclip.evaluation.report"):
        write_report(ENTRIES[:1], tmp_path / "eval", {}, stem="run")
    assert f"replacing {files['md']} with this evaluation's results" in caplog.text
    assert "HandCLIP (fine-tuned)" in files["md"].read_text() and "zero-shot CLIP |" not in files["md"].read_text()
