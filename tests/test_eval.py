"""Evaluation: each test image embedded once, runs scored, the comparison report, and user errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import eval_cfg, make_layout, read_csv, run_module, tiny_preprocess
from reference import brute_force_metrics

from handclip.config import compose
from handclip.data.datamodule import HandDataModule
from handclip.errors import HandCLIPError
from handclip.eval import evaluate
from handclip.evaluation.runs import evaluate_hand, summarize
from handclip.hands import HAND_TYPES
from handclip.metrics import compute_reid_metrics
from handclip.models.encoder import zero_shot_encoder
from handclip.train import train


class CountingEncoder(torch.nn.Module):
    """Wraps an encoder and counts the images it embeds."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.seen = 0

    def embed(self, images):
        self.seen += len(images)
        return self.inner.embed(images)


@pytest.mark.parametrize("cache", [True, False])
def test_every_test_image_is_embedded_once_for_ten_runs(tmp_path, cache):
    data = make_layout(tmp_path / "d", n_test_ids=4, per_id=3, runs=10)
    dm = HandDataModule(str(data), "dorsal_right", tiny_preprocess(), cache=cache, cache_dir=str(tmp_path / "c"),
                        progress=False, cache_workers=0)
    encoder = CountingEncoder(zero_shot_encoder("HandCLIP-Tiny", None))
    result = evaluate_hand(encoder, dm, torch.device("cpu"), progress=False)
    assert encoder.seen == 4 * 3 == result["num_images"]
    assert len(result["runs"]) == 10 and result["summary"]["num_runs"] == 10
    assert [r["run"] for r in result["runs"]] == [f"query{i}" for i in range(10)]
    assert all(r["num_valid_queries"] == 4 * 2 and r["gallery_size"] == 4 for r in result["runs"])


def test_runs_use_the_right_images(tmp_path):
    """Scores equal those computed from per-run embeddings of the query/gallery folders themselves."""
    data = make_layout(tmp_path / "d", n_test_ids=5, per_id=3, runs=3)
    dm = HandDataModule(str(data), "dorsal_right", tiny_preprocess(), cache=False, progress=False)
    encoder = zero_shot_encoder("HandCLIP-Tiny", None)
    result = evaluate_hand(encoder, dm, torch.device("cpu"), progress=False)
    from handclip.data import layout

    for i, run in enumerate(result["runs"]):
        feats, labels = {}, {}
        for split in (f"query{i}", f"gallery{i}"):
            samples = layout.list_split(data, "dorsal_right", split)
            with torch.no_grad():
                feats[split] = torch.cat([encoder.embed(dm.loader(s.path).unsqueeze(0)) for s in samples])
            labels[split] = torch.tensor([int(s.identity) for s in samples])
        expected = compute_reid_metrics(feats[f"query{i}"], labels[f"query{i}"], feats[f"gallery{i}"],
                                        labels[f"gallery{i}"])
        for key in ("rank1", "rank5", "mAP"):
            assert run[key] == pytest.approx(expected[key], abs=1e-6)


def test_query_identity_missing_from_gallery_is_counted(tmp_path):
    data = make_layout(tmp_path / "d", n_test_ids=4, per_id=3, runs=2)
    gallery = data / "train_val_test_split_dorsal_r" / "gallery1"
    shutil.rmtree(gallery / "0002000")
    dm = HandDataModule(str(data), "dorsal_right", tiny_preprocess(), cache=False, progress=False)
    result = evaluate_hand(zero_shot_encoder("HandCLIP-Tiny", None), dm, torch.device("cpu"), progress=False)
    assert result["runs"][0]["num_invalid_queries"] == 0
    assert result["runs"][1]["num_invalid_queries"] == 2
    assert result["runs"][1]["num_valid_queries"] == 6


def test_summary_is_mean_and_std_over_runs():
    runs = [{"rank1": 0.5, "mAP": 0.25, "gallery_size": 4, "num_valid_queries": 8},
            {"rank1": 1.0, "mAP": 0.75, "gallery_size": 4, "num_valid_queries": 8}]
    s = summarize(runs)
    assert s["rank1"] == {"mean": 0.75, "std": 0.25} and s["mAP"] == {"mean": 0.5, "std": 0.25}
    assert s["num_runs"] == 2 and s["gallery_size"] == 4


@pytest.fixture(scope="module")
def trained_root(tmp_path_factory):
    """Tiny layout for three hand types, a 1-epoch model for two of them."""
    base = tmp_path_factory.mktemp("evalrun")
    data = make_layout(base / "data", hands=("dorsal_right", "dorsal_left", "palmar_left"), n_train_ids=4, runs=3)
    for hand in ("dorsal_right", "palmar_left"):
        train(compose("train", [
            "experiment=demo", f"hand={hand}", f"paths.data_dir={data}", f"paths.output_root={base / 'out'}",
            f"paths.cache_dir={base / 'out' / 'cache'}", "data.progress=false", "data.cache_workers=0",
            "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
        ]))
    return data, base / "out"


def test_eval_all_writes_the_comparison(trained_root, capsys):
    data, out = trained_root
    result = evaluate(eval_cfg(data, out, "all=true"))
    files = {p.suffix: p for p in result["files"].values()}
    assert set(files) == {".md", ".csv", ".json"} and all(p.parent == out / "eval" for p in files.values())
    rows = read_csv(files[".csv"])
    assert [(r["hand"], r["model"], r["status"]) for r in rows] == [
        ("dorsal_right", "zero-shot CLIP", "ok"), ("dorsal_right", "HandCLIP (fine-tuned)", "ok"),
        ("dorsal_left", "zero-shot CLIP", "ok"), ("dorsal_left", "HandCLIP (fine-tuned)", "no checkpoint"),
        ("palmar_left", "zero-shot CLIP", "ok"), ("palmar_left", "HandCLIP (fine-tuned)", "ok"),
    ]
    assert all(float(r["num_runs"]) == 3 for r in rows if r["status"] == "ok")
    report = json.loads(files[".json"].read_text())
    fine = [e for e in report["entries"] if e["model"] == "HandCLIP (fine-tuned)" and e["status"] == "ok"]
    assert all(len(e["runs"]) == 3 and Path(e["checkpoint"]).is_file() for e in fine)
    assert report["config"]["metrics"]["ap"] == "standard"
    md = files[".md"].read_text()
    comparison = md.split("## Verification")[0]  # the verification table follows (tests/test_eval_verification.py)
    assert comparison.count("\n| ") == 1 + 6 and "ΔRank-1" in md and "no checkpoint" in md
    printed = capsys.readouterr().out
    assert "| dorsal_right | HandCLIP (fine-tuned) |" in printed
    # the deltas are fine-tuned minus zero-shot, in points, for every hand with both
    by = {(e["hand"], e["model"]): e for e in result["entries"]}
    lines = {tuple(cell.strip() for cell in line.strip("|").split("|")[:2]): line for line in comparison.splitlines()}
    for hand in ("dorsal_right", "palmar_left"):
        zero, tuned = by[(hand, "zero-shot CLIP")]["summary"], by[(hand, "HandCLIP (fine-tuned)")]["summary"]
        cells = [c.strip() for c in lines[(hand, "HandCLIP (fine-tuned)")].strip("|").split("|")]
        assert cells[-2] == f"{100 * (tuned['rank1']['mean'] - zero['rank1']['mean']):+.1f}"
        assert cells[-1] == f"{100 * (tuned['mAP']['mean'] - zero['mAP']['mean']):+.1f}"


def test_eval_one_checkpoint_and_hand_mismatch(trained_root):
    data, out = trained_root
    ckpt = out / "train" / "dorsal_right" / "checkpoints" / "best.ckpt"
    result = evaluate(eval_cfg(data, out, "hand=dorsal_right", f"ckpt_path={ckpt}"))
    (entry,) = result["entries"]
    assert entry["model"] == "HandCLIP (fine-tuned)" and entry["summary"]["num_runs"] == 3
    mismatch = r"trained on hand type 'dorsal_right', not 'dorsal_left'.*allow_hand_mismatch"
    with pytest.raises(HandCLIPError, match=mismatch):
        evaluate(eval_cfg(data, out, "hand=dorsal_left", f"ckpt_path={ckpt}"))
    allowed = evaluate(eval_cfg(data, out, "hand=dorsal_left", f"ckpt_path={ckpt}", "allow_hand_mismatch=true"))
    assert allowed["entries"][0]["trained_on"] == "dorsal_right" and allowed["entries"][0]["hand"] == "dorsal_left"


def brute_force_runs(data: Path, hand: str, encoder, ap: str = "standard") -> list[dict]:
    """Every run's figures from embeddings of its own query/gallery folders, by the brute-force reference."""
    from handclip.data import layout

    dm = HandDataModule(str(data), hand, tiny_preprocess(), cache=False, progress=False)
    runs = []
    for query, gallery in layout.discover_hand(data, hand).runs:
        feats, labels = {}, {}
        for split in (query, gallery):
            samples = layout.list_split(data, hand, split)
            with torch.no_grad():
                feats[split] = torch.cat([encoder.embed(dm.loader(s.path).unsqueeze(0)) for s in samples])
            labels[split] = [int(s.identity) for s in samples]
        runs.append(brute_force_metrics(feats[query], labels[query], feats[gallery], labels[gallery], ap=ap))
    return runs



def test_eval_zero_shot_only(trained_root, built_encoders):
    data, out = trained_root
    (entry,) = evaluate(eval_cfg(data, out, "hand=dorsal_left"))["entries"]
    assert entry["model"] == "zero-shot CLIP"
    expected = brute_force_runs(data, "dorsal_left", built_encoders[0])
    assert [r["rank1"] for r in entry["runs"]] == pytest.approx([r["rank1"] for r in expected], abs=1e-9)
    assert [r["mAP"] for r in entry["runs"]] == pytest.approx([r["mAP"] for r in expected], abs=1e-6)
    mean = sum(r["rank1"] for r in expected) / len(expected)
    assert entry["summary"]["rank1"]["mean"] == pytest.approx(mean, abs=1e-9)


def test_trapezoid_option(trained_root, built_encoders):
    """metrics.ap=trapezoid reaches the metric: per-run mAP equals the trapezoid reference, not the standard one."""
    data, out = trained_root
    std = evaluate(eval_cfg(data, out, "hand=dorsal_left"))["entries"][0]["runs"]
    trap = evaluate(eval_cfg(data, out, "hand=dorsal_left", "metrics.ap=trapezoid"))["entries"][0]["runs"]
    assert [r["rank1"] for r in std] == [r["rank1"] for r in trap]
    expected = brute_force_runs(data, "dorsal_left", built_encoders[1], ap="trapezoid")
    assert [r["mAP"] for r in trap] == pytest.approx([r["mAP"] for r in expected], abs=1e-6)
    assert any(r["rank1"] < 1 for r in std), "needs a query whose match is not first"
    assert all(t["mAP"] <= s["mAP"] + 1e-12 for s, t in zip(std, trap))
    assert any(t["mAP"] < s["mAP"] - 1e-6 for s, t in zip(std, trap))


def test_checkpoint_missing_or_corrupt(trained_root, tmp_path):
    data, out = trained_root
    with pytest.raises(HandCLIPError, match="nope.ckpt' not found"):
        evaluate(eval_cfg(data, out, f"ckpt_path={tmp_path / 'nope.ckpt'}"))
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(HandCLIPError, match="bad.ckpt' is corrupt"):
        evaluate(eval_cfg(data, out, f"ckpt_path={bad}"))
    good = out / "train" / "dorsal_right" / "checkpoints" / "best.ckpt"
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(HandCLIPError, match="truncated.ckpt' is corrupt"):
        evaluate(eval_cfg(data, out, f"ckpt_path={truncated}"))


def test_run_folder_without_gallery_and_no_test_data(tmp_path):
    data = make_layout(tmp_path / "d", runs=2)
    hand_dir = data / "train_val_test_split_dorsal_r"
    shutil.rmtree(hand_dir / "gallery1")
    with pytest.raises(HandCLIPError, match="query1 found without the matching gallery1"):
        evaluate(eval_cfg(data, tmp_path / "o"))
    for run in ("query0", "gallery0", "query1"):
        shutil.rmtree(hand_dir / run)
    with pytest.raises(HandCLIPError, match="no test data for 'dorsal_right'"):
        evaluate(eval_cfg(data, tmp_path / "o"))


def test_eval_all_without_data(tmp_path):
    with pytest.raises(HandCLIPError, match="make demo"):
        evaluate(eval_cfg(tmp_path / "missing", tmp_path / "o", "all=true"))


def test_eval_config_defaults():
    cfg = compose("eval")
    assert cfg.metrics.ap == "standard" and list(cfg.metrics.ranks) == [1, 5, 10]
    assert cfg.metrics.cross_aspect is False and cfg.all is False and cfg.ckpt_path is None
    assert set(HAND_TYPES) >= {cfg.hand.name}


def test_cross_aspect_protocol(tmp_path):
    """query{i} against gallery{i}_all: the same person's other aspects are not matches."""
    from handclip.data.split import prepare_dataset
    from handclip.data.synthetic import generate_dataset

    generate_dataset(tmp_path / "raw", subjects=8, images_per_aspect=3, size=(96, 72), workers=1, progress=False)
    prepare_dataset(tmp_path / "raw", tmp_path / "splits", runs=2, cross_aspect=True)
    cfg = eval_cfg(tmp_path / "splits", tmp_path / "o", "hand=palmar_left", "metrics.cross_aspect=true")
    (entry,) = evaluate(cfg)["entries"]
    same, cross = entry["runs"], entry["cross_aspect"]["runs"]
    assert len(same) == len(cross) == 2
    for s, c in zip(same, cross):
        assert c["gallery"] == s["gallery"] + "_all"
        assert c["gallery_size"] > s["gallery_size"]  # the four aspects' galleries
        assert c["num_valid_queries"] == s["num_valid_queries"]  # each query still has exactly its own match
        assert c["rank1"] <= s["rank1"] + 1e-9  # more distractors can only push the true match down
    md = (tmp_path / "o" / "eval" / "palmar_left_zeroshot.md").read_text()
    assert "Cross-aspect" in md
    with pytest.raises(HandCLIPError, match="gallery0_all.*--cross-aspect"):
        prepare_dataset(tmp_path / "raw", tmp_path / "plain", runs=1)
        evaluate(eval_cfg(tmp_path / "plain", tmp_path / "o", "hand=palmar_left", "metrics.cross_aspect=true"))


def test_run_without_any_valid_query_is_reported_not_fatal(tmp_path):
    data = make_layout(tmp_path / "d", n_test_ids=3, per_id=3, runs=2)
    gallery = data / "train_val_test_split_dorsal_r" / "gallery1"
    for ident in list(gallery.iterdir()):
        (gallery / ident.name).rename(gallery / f"9{ident.name[1:]}")  # no query identity left in gallery1
    dm = HandDataModule(str(data), "dorsal_right", tiny_preprocess(), cache=False, progress=False)
    result = evaluate_hand(zero_shot_encoder("HandCLIP-Tiny", None), dm, torch.device("cpu"), progress=False)
    assert result["runs"][1]["num_valid_queries"] == 0 and "mAP" not in result["runs"][1]
    assert result["summary"]["num_runs"] == 1 and result["summary"]["num_runs_without_valid_query"] == 1
    gallery0 = data / "train_val_test_split_dorsal_r" / "gallery0"
    for ident in list(gallery0.iterdir()):
        (gallery0 / ident.name).rename(gallery0 / f"9{ident.name[1:]}")
    with pytest.raises(HandCLIPError, match="no run has a query whose identity is in its gallery"):
        evaluate_hand(zero_shot_encoder("HandCLIP-Tiny", None), dm, torch.device("cpu"), progress=False)


@pytest.mark.slow
def test_eval_cli_all_with_data_root_override(trained_root, tmp_path):
    """`python -m handclip.eval all=true` as `make eval` runs it, the data given as data.root."""
    data, out = trained_root
    result = run_module("handclip.eval", "all=true", "model=tiny", f"data.root={data}", f"paths.output_root={out}",
                        f"paths.cache_dir={out / 'cache'}", "data.progress=false")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| palmar_left | HandCLIP (fine-tuned) |" in result.stdout
    rows = read_csv(out / "eval" / "comparison.csv")
    assert len(rows) == 6 and {r["hand"] for r in rows} == {"dorsal_right", "dorsal_left", "palmar_left"}


def test_table_deltas_are_fine_tuned_minus_zero_shot():
    from handclip.evaluation.report import table_rows

    def entry(model, rank1, mAP):
        return {"hand": "palmar_right", "model": model, "summary": {
            "rank1": {"mean": rank1, "std": 0.0}, "mAP": {"mean": mAP, "std": 0.0}, "num_valid_queries": 5,
            "gallery_size": 3}}

    rows = table_rows([entry("HandCLIP (fine-tuned)", 0.5, 0.25), entry("zero-shot CLIP", 0.2, 0.35)])
    assert [r["model"] for r in rows] == ["zero-shot CLIP", "HandCLIP (fine-tuned)"]
    assert rows[0]["ΔRank-1"] == rows[0]["ΔmAP"] == ""
    assert (rows[1]["ΔRank-1"], rows[1]["ΔmAP"]) == ("+30.0", "-10.0")
    assert (rows[1]["Rank-1 (%)"], rows[0]["mAP (%)"]) == ("50.0 ± 0.0", "35.0 ± 0.0")


def test_table_row_for_a_protocol_without_scored_runs():
    from handclip.evaluation.report import table_rows

    (row,) = table_rows([{"hand": "dorsal_right", "model": "zero-shot CLIP",
                          "summary": summarize([{"run": "query0", "num_valid_queries": 0}])}])
    assert row["Rank-1 (%)"] == row["mAP (%)"] == row["queries"] == row["gallery"] == "-"
