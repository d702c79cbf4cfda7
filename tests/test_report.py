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
    summary = {"rank1": stat(rank1, 0.2), "rank5": stat(min(1.0, rank1 + 0.1), 0.1), "rank10": stat(1.0),
               "mAP": stat(mAP, 0.3), "num_runs": 2, "num_valid_queries": 12, "gallery_size": 4}
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
    assert rows[1] == {"hand": "dorsal_right", "model": FINE_TUNED, "Rank-1 (%)": "50.0 ± 20.0",
                       "Rank-5 (%)": "60.0 ± 10.0", "mAP (%)": "25.0 ± 30.0", "queries": "12", "gallery": "4",
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
        "| dorsal_right | zero-shot CLIP | 20.0 ± 20.0 | 30.0 ± 10.0 | 35.0 ± 30.0 | 12 | 4 |  |  |\n"
        "| dorsal_right | HandCLIP (fine-tuned) | 50.0 ± 20.0 | 60.0 ± 10.0 | 25.0 ± 30.0 | 12 | 4 | +30.0 | -10.0 |\n")


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
                       "num_runs": "2", "rank1_mean": "0.5", "rank1_std": "0.2", "rank5_mean": "0.6",
                       "rank5_std": "0.1", "rank10_mean": "1.0", "rank10_std": "0.0", "mAP_mean": "0.25",
                       "mAP_std": "0.3", "num_queries": "12", "gallery_size": "4", "checkpoint": ""}
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
    assert md.count("| dorsal_right | HandCLIP (fine-tuned) | 50.0 ± 20.0 |") == 3  # two same-aspect rows, one cross
    data = json.loads(files["json"].read_text())
    assert data == {"entries": json.loads(json.dumps(ENTRIES + [cross])), "config": {"seed": 7}}
    assert files["csv"].read_text() == csv_text(ENTRIES + [cross])
    plain = write_report(ENTRIES, tmp_path / "eval", {}, stem="plain")
    assert "Cross-aspect" not in plain["md"].read_text()
    with caplog.at_level(logging.INFO, logger="handclip.evaluation.report"):
        write_report(ENTRIES[:1], tmp_path / "eval", {}, stem="run")
    assert f"replacing {files['md']} with this evaluation's results" in caplog.text
    assert "HandCLIP (fine-tuned)" in files["md"].read_text() and "zero-shot CLIP |" not in files["md"].read_text()


def test_row_order_and_placeholders_for_what_is_missing():
    """Unknown hands after the four, unknown models after the two; '-' where a figure or status is missing."""
    stds = entry("dorsal_left", FINE_TUNED, 0.5, 0.25)
    stds["summary"]["rank1"] = stat(0.5, 0.25)
    del stds["summary"]["num_valid_queries"]
    rows = table_rows([
        entry("pooled", ZERO_SHOT, 0.1, 0.1), {"hand": "dorsal_right", "model": "ensemble"},
        stds, entry("dorsal_right", ZERO_SHOT, 0.2, 0.35), entry("dorsal_right", FINE_TUNED, 0.5, 0.25)])
    assert [(r["hand"], r["model"]) for r in rows] == [
        ("dorsal_right", ZERO_SHOT), ("dorsal_right", FINE_TUNED), ("dorsal_right", "ensemble"),
        ("dorsal_left", FINE_TUNED), ("pooled", ZERO_SHOT)]
    assert rows[2]["Rank-1 (%)"] == "-" and list(rows[2]) == list(COLUMNS)  # no summary, no status
    assert rows[2]["ΔRank-1"] == rows[2]["gallery"] == ""
    assert rows[3]["Rank-1 (%)"] == "50.0 ± 25.0" and rows[3]["queries"] == "-" and rows[3]["gallery"] == "4"


def test_csv_checkpoints_and_verification_columns_of_the_same_aspect_only():
    verified = entry("dorsal_right", FINE_TUNED, 0.5, 0.25, checkpoint="/runs/dr/best.ckpt")
    verified["verification"] = {"runs": [{}], "summary": {"tar@fmr=0.01": stat(0.75, 0.125), "eer": stat(0.25)},
                                "calibration": {"threshold": 0.5, "target_fmr": 0.01}}
    verified["cross_aspect"] = {"summary": verified["summary"]}
    plain = entry("dorsal_right", ZERO_SHOT, 0.2, 0.35)
    rows = list(csv.DictReader(io.StringIO(csv_text([verified, plain]))))
    assert [(r["protocol"], r["model"]) for r in rows] == [
        ("same-aspect", FINE_TUNED), ("same-aspect", ZERO_SHOT), ("cross-aspect", FINE_TUNED)]
    assert rows[0]["checkpoint"] == rows[2]["checkpoint"] == "/runs/dr/best.ckpt" and rows[1]["checkpoint"] == ""
    assert (rows[0]["tar@fmr=0.01_mean"], rows[0]["tar@fmr=0.01_std"], rows[0]["eer_mean"]) == ("0.75", "0.125", "0.25")
    assert (rows[0]["threshold"], rows[0]["threshold_target_fmr"]) == ("0.5", "0.01")
    for row in rows[1:]:  # no verification figures: empty cells
        assert row["tar@fmr=0.01_mean"] == row["eer_mean"] == row["threshold"] == "", row


def test_json_report_is_indented_and_writes_paths_as_text(tmp_path, caplog):
    out = tmp_path / "new" / "nested" / "eval"  # made with its parents
    files = write_report(ENTRIES[:1], out, {"root": tmp_path / "data"}, stem="c")
    text = files["json"].read_text()
    assert text.startswith('{\n  "entries": [\n    {\n      "hand": "palmar_left",') and text.endswith("}\n")
    assert json.loads(text)["config"] == {"root": str(tmp_path / "data")}
    with caplog.at_level(logging.INFO, logger="handclip.evaluation.report"):
        write_report(ENTRIES[:1], out, {}, stem="c")
    assert [r.getMessage() for r in caplog.records if r.name == "handclip.evaluation.report"] == [
        f"replacing {out / f'c.{ext}'} with this evaluation's results" for ext in ("md", "csv", "json")]
