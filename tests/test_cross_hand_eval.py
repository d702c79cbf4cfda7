"""``eval all=true cross_hand=true`` end to end on tiny synthetic data, and its refusals before any work."""

from __future__ import annotations

import json

import pytest
from conftest import eval_cfg, make_layout, read_csv, run_module

from handclip.config import compose
from handclip.errors import HandCLIPError
from handclip.eval import evaluate
from handclip.evaluation.fused_calibration import fused_calibration_path, read_fused_calibration
from handclip.models.checkpoint import load_encoder
from handclip.models.fingerprint import encoder_fingerprint
from handclip.train import train

HANDS = ("dorsal_right", "palmar_left")


@pytest.fixture(scope="module")
def two_hands(tmp_path_factory):
    """Two hand types with the same persons, a 1-epoch model for each."""
    base = tmp_path_factory.mktemp("crosshand")
    data = make_layout(base / "data", hands=HANDS, n_train_ids=4, n_test_ids=4, per_id=3, runs=2)
    for hand in HANDS:
        train(compose("train", [
            "experiment=demo", f"hand={hand}", f"paths.data_dir={data}", f"paths.output_root={base / 'out'}",
            f"paths.cache_dir={base / 'out' / 'cache'}", "data.progress=false", "data.cache_workers=0",
            "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
        ]))
    return data, base / "out"


@pytest.mark.slow
def test_cross_hand_tables_and_fused_calibration(two_hands, capsys):
    data, out = two_hands
    result = evaluate(eval_cfg(data, out, "all=true", "cross_hand=true", "cross_hand_protocol.runs=3",
                               "verification.enabled=false"))
    files = result["files"]
    assert {files[f"cross_hand_{e}"].name for e in ("md", "csv", "json")} == {"cross_hand.md", "cross_hand.csv",
                                                                                "cross_hand.json"}
    rows = read_csv(files["cross_hand_csv"])
    summary = [(r["k"], r["fusion"]) for r in rows if r["level"] == "summary"]
    assert summary == [("1", ""), ("2", "mean"), ("2", "max")]
    combos = [(r["hands"], r["fusion"]) for r in rows if r["level"] == "combination"]
    assert combos == [("dorsal_right", ""), ("palmar_left", ""), ("dorsal_right+palmar_left", "mean"),
                      ("dorsal_right+palmar_left", "max")]
    # 4 persons; per run one gallery photo of 3 per (person, hand type): 2 probes each
    assert all(float(r["persons"]) == 4 and float(r["probes"]) == 8 for r in rows)
    report = json.loads(files["cross_hand_json"].read_text())
    assert "not comparable" in report["protocol"]
    assert [(e["hand"], e["model"]) for e in report["entries"]] == [(h, "HandCLIP (fine-tuned)") for h in HANDS]
    assert all(len(r["per_run"]) == 3 for r in report["results"]["combinations"])
    md = files["cross_hand_md"].read_text()
    assert "HandCLIP's own protocol" in md and "| DR + PL | mean |" in md and md in capsys.readouterr().out
    # the fused threshold of the two fine-tuned models, beside their training runs
    path = fused_calibration_path(out)
    assert report["fused_calibration"]["file"] == str(path)
    prints = {h: encoder_fingerprint(load_encoder(out / "train" / h / "checkpoints" / "best.ckpt")[0])
              for h in HANDS}
    stored = json.loads(path.read_text())
    assert read_fused_calibration(path, prints, "mean")["threshold"] == stored["fusions"]["mean"]["threshold"]
    with pytest.raises(HandCLIPError, match="another dorsal_right model"):
        read_fused_calibration(path, {**prints, "dorsal_right": "0" * 20})
    # run again: the same evaluation replaces its own files, the calibration is reused (same models and data)
    mtime = path.stat().st_mtime_ns
    evaluate(eval_cfg(data, out, "all=true", "cross_hand=true", "cross_hand_protocol.runs=3",
                      "verification.enabled=false"))
    assert path.stat().st_mtime_ns == mtime
    # zero-shot models: their own report name is refused over the fine-tuned one's, and their threshold goes to eval/
    with pytest.raises(HandCLIPError, match="holds another evaluation"):
        evaluate(eval_cfg(data, out, "all=true", "cross_hand=true", "cross_hand_protocol.models=zeroshot"))
    evaluate(eval_cfg(data, out, "all=true", "cross_hand=true", "cross_hand_protocol.models=zeroshot",
                      "cross_hand_protocol.runs=1", "name=zs", "verification.enabled=false"))
    zs = json.loads((out / "eval" / "zs_cross_hand.json").read_text())
    assert zs["fused_calibration"]["file"] == str(out / "eval" / "zs_cross_hand.calibration.json")
    assert path.stat().st_mtime_ns == mtime


def test_default_eval_writes_no_cross_hand_files(tmp_path):
    data = make_layout(tmp_path / "data", hands=HANDS, n_train_ids=3, n_test_ids=2, per_id=2, runs=1)
    cfg = eval_cfg(data, tmp_path / "out", "all=true", "verification.enabled=false")
    assert cfg.cross_hand is False
    result = evaluate(cfg)
    assert sorted(p.name for p in result["files"].values()) == ["comparison.csv", "comparison.json",
                                                                "comparison.md"]
    assert sorted(p.name for p in (tmp_path / "out" / "eval").iterdir()) == [
        "comparison.csv", "comparison.json", "comparison.md"]


def test_refusals_before_any_work(tmp_path):
    one = make_layout(tmp_path / "one", hands=("dorsal_right",), n_train_ids=3, n_test_ids=2, per_id=2, runs=1)
    out = tmp_path / "out"
    with pytest.raises(HandCLIPError, match="at least 2 hand types; found dorsal_right"):
        evaluate(eval_cfg(one, out, "all=true", "cross_hand=true"))
    two = make_layout(tmp_path / "two", hands=HANDS, n_train_ids=3, n_test_ids=2, per_id=2, runs=1)
    with pytest.raises(HandCLIPError, match="models=finetuned: no model for hand type 'dorsal_right'"):
        evaluate(eval_cfg(two, out, "all=true", "cross_hand=true", "cross_hand_protocol.models=finetuned"))
    with pytest.raises(HandCLIPError, match="pass all=true too"):
        evaluate(eval_cfg(two, out, "cross_hand=true"))
    with pytest.raises(HandCLIPError, match="no 11k hand folder for dorsal_left"):
        evaluate(eval_cfg(two, out, "all=true", "cross_hand=true", "cross_hand_protocol.hands=[dorsal_right,"
                                                                   "dorsal_left]"))
    assert not (out / "eval").exists()  # nothing scored, nothing written


def test_command_line_error_line(tmp_path):
    one = make_layout(tmp_path / "one", hands=("palmar_left",), n_train_ids=3, n_test_ids=2, per_id=2, runs=1)
    done = run_module("handclip.eval", "experiment=demo", f"paths.data_dir={one}",
                      f"paths.output_root={tmp_path / 'out'}", "all=true", "cross_hand=true",
                      "cross_hand_protocol.hands=[palmar_left]")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: cross_hand_protocol.hands=['palmar_left']: expected null or 2 or more different 11k hand types "
        "of: dorsal_right, dorsal_left, palmar_right, palmar_left"]
    done = run_module("handclip.eval", "experiment=demo", f"paths.data_dir={one}",
                      f"paths.output_root={tmp_path / 'out'}", "all=true", "cross_hand=true")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: the person-across-hand-types protocol needs "
                                                           "test photos of at least 2 hand types")
    assert [p.name for p in (tmp_path / "out" / "eval").iterdir()] == ["eval.log"]  # Hydra's log only
