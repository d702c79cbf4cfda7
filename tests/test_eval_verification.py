"""The open-set threshold (calibrated at the end of training and by eval, stored beside the checkpoint), the
verification figures of eval against brute-force references, and the pictures eval draws."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import eval_cfg, make_layout, tiny_cfg, tiny_preprocess
from PIL import Image
from reference import brute_eer, brute_fmr, brute_identity_scores, brute_threshold_at_fmr

from handclip.data import layout
from handclip.data.datamodule import HandDataModule
from handclip.eval import evaluate
from handclip.evaluation.calibration import calibration_from_embeddings, read_calibration, sidecar_path
from handclip.models.checkpoint import load_module
from handclip.models.fingerprint import encoder_fingerprint
from handclip.train import train

HAND = "dorsal_right"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny layout with enough identities for a meaningful threshold, and a 2-epoch model on it."""
    base = tmp_path_factory.mktemp("verif")
    data = make_layout(base / "data", n_train_ids=6, n_test_ids=6, per_id=4, runs=3)
    train(tiny_cfg(data, base / "out", "trainer.max_epochs=2"))
    return data, base / "out", base / "out" / "train" / HAND / "checkpoints" / "best.ckpt"


_SEEN: dict[tuple[int, str], np.ndarray] = {}


def embed_split(encoder, data: Path, split: str) -> tuple[np.ndarray, list[int]]:
    """Each image of a split embedded on its own (no loader, no cache): the reference's input."""
    dm = HandDataModule(str(data), HAND, tiny_preprocess(), cache=False, progress=False)
    samples = layout.list_split(data, HAND, split)
    feats = []
    for s in samples:
        key = (id(encoder), f"{s.identity}/{s.path.name}")  # query{i}/gallery{i} hold the same test files
        if key not in _SEEN:
            with torch.no_grad():
                _SEEN[key] = encoder.embed(dm.loader(s.path).unsqueeze(0))[0].numpy()
        feats.append(_SEEN[key])
    return np.stack(feats), [int(s.identity) for s in samples]


def reference_threshold(encoder, data: Path, target: float) -> float:
    vf, vl = embed_split(encoder, data, "val")
    tf, tl = embed_split(encoder, data, "train")
    return brute_threshold_at_fmr(brute_identity_scores(vf, vl, tf, tl)["impostor"], target)


def test_training_writes_the_calibration_beside_the_best_checkpoint(trained):
    data, _, ckpt = trained
    path = sidecar_path(ckpt)
    assert path == ckpt.parent / "best.calibration.json" and path.is_file()
    cal = read_calibration(path)
    encoder = load_module(ckpt).encoder
    assert cal["model_fingerprint"] == encoder_fingerprint(encoder)
    assert cal["checkpoint"]["path"] == str(ckpt.resolve()) and cal["target_fmr"] == 0.01
    assert cal["computed_from"]["query"] == "val" and cal["computed_from"]["val_images"] == 6
    assert cal["genuine_scores"] == 6 and cal["impostor_scores"] == 6 * 5
    assert cal["threshold"] == pytest.approx(reference_threshold(encoder, data, 0.01), abs=1e-6)
    level = next(r for r in cal["levels"] if r["target_fmr"] == 0.1)
    assert level["threshold"] == pytest.approx(reference_threshold(encoder, data, 0.1), abs=1e-6)
    assert "state_dict" in torch.load(ckpt, map_location="cpu", weights_only=True)  # the checkpoint is untouched


def test_calibration_from_embeddings_by_hand():
    # two training identities; val image 0 is identity 0, val image 1 identity 1
    train_f = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    val_f = torch.tensor([[0.8, 0.6], [0.6, 0.8]])
    cal = calibration_from_embeddings(val_f, [0, 1], train_f, [0, 1], target_fmr=0.5, levels=())
    # impostor scores 0.6 and 0.6: one of two may match, but they tie, so neither may
    assert float(np.float32(0.6)) < cal["threshold"] < 0.6 + 1e-6
    assert cal["fmr"] == 0.0 and cal["tar"] == 1.0 and cal["val_unknown_rate"] == 1.0 and cal["val_dir"] == 1.0


def test_eval_reuses_a_valid_calibration_and_recomputes_a_stale_one(trained):
    data, out, ckpt = trained
    path = sidecar_path(ckpt)
    before = path.read_text()
    evaluate(eval_cfg(data, out, f"ckpt_path={ckpt}"))
    assert path.read_text() == before  # same weights, target and files: reused, not rewritten
    stale = json.loads(before)
    stale["model_fingerprint"] = "0" * 20
    path.write_text(json.dumps(stale))
    (entry,) = evaluate(eval_cfg(data, out, f"ckpt_path={ckpt}"))["entries"]
    fresh = read_calibration(path)
    assert fresh["model_fingerprint"] == json.loads(before)["model_fingerprint"]
    assert fresh["threshold"] == json.loads(before)["threshold"]
    assert entry["verification"]["calibration"]["threshold"] == fresh["threshold"]



def test_verification_figures_equal_the_brute_force_reference(trained, built_encoders):
    data, out, _ = trained
    result = evaluate(eval_cfg(data, out, "verification.fmr_levels=[0.2,0.05]"))
    (entry,) = result["entries"]
    encoder = built_encoders[0]
    v = entry["verification"]
    threshold = reference_threshold(encoder, data, 0.01)
    assert v["threshold"] == pytest.approx(threshold, abs=1e-6)
    assert json.loads((out / "eval" / f"{HAND}_zeroshot.calibration.json").read_text())["threshold"] == v["threshold"]
    runs = layout.discover_hand(data, HAND).runs
    assert [r["run"] for r in v["runs"]] == [q for q, _ in runs]
    for row, (query, gallery) in zip(v["runs"], runs):
        qf, ql = embed_split(encoder, data, query)
        gf, gl = embed_split(encoder, data, gallery)
        ref = brute_identity_scores(qf, ql, gf, gl)
        for target in (0.2, 0.05):
            t = brute_threshold_at_fmr(ref["impostor"], target)
            tar = sum(s >= t for s in ref["genuine"]) / len(ref["genuine"])
            assert row[f"tar@fmr={100 * target:g}%"] == pytest.approx(tar)
        assert row["eer"] == pytest.approx(brute_eer(ref["genuine"], ref["impostor"]), abs=1e-6)
        t = v["threshold"]
        assert row["unknown_rate"] == pytest.approx(np.mean([s < t for s in ref["nonmated_top"]]))
        assert row["fmr_at_threshold"] == pytest.approx(brute_fmr(ref["impostor"], t))
        assert row["dir_at_threshold"] == pytest.approx(
            np.mean([ok and s >= t for ok, s in zip(ref["identified"], ref["genuine"])]))
    mean = np.mean([r["eer"] for r in v["runs"]])
    assert v["summary"]["eer"]["mean"] == pytest.approx(mean)
    # CMC: Rank-1 is the table's Rank-1, and the curve never falls
    cmc = v["cmc"]["mean"]
    assert cmc[0] == pytest.approx(entry["summary"]["rank1"]["mean"])
    assert all(b >= a - 1e-12 for a, b in zip(cmc, cmc[1:])) and cmc[-1] == pytest.approx(1.0)
    assert len(cmc) == 6  # Rank-1..20, cut at the gallery size


def test_report_tables_and_pictures(trained):
    data, out, _ = trained
    result = evaluate(eval_cfg(data, out, "all=true", "verification.pictures=true"))
    files = result["files"]
    md = files["md"].read_text()
    assert "## Verification and open-set figures" in md and "TAR@FMR 1% (%)" in md and "unknown rate" in md
    section = md.split("## Verification")[1]
    assert section.count(f"| {HAND} |") == 2  # zero-shot and fine-tuned
    with open(files["csv"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert all(r["eer_mean"] and r["unknown_rate_mean"] and r["threshold"] for r in rows)
    assert {f"cmc_{HAND}", f"ranking_{HAND}", "roc_det"} <= set(files)
    for key in (f"cmc_{HAND}", f"ranking_{HAND}", "roc_det"):
        assert files[key].parent == out / "eval" and files[key].suffix == ".png"
        with Image.open(files[key]) as img:
            img.load()  # decodes completely
            assert img.width > 300 and img.height > 200
    # the ranking picture shows the fine-tuned model's examples: best and worst queries of the first run
    entry = next(e for e in result["entries"] if e["model"] == "HandCLIP (fine-tuned)")
    kinds = [ex["kind"] for ex in entry["verification"]["examples"]]
    assert kinds == ["best", "best", "worst", "worst"]
    ranks = [ex["rank"] for ex in entry["verification"]["examples"]]
    assert ranks[0] <= ranks[-1]
    assert all(len(ex["top"]) == 5 and ex["top"][0]["score"] >= ex["top"][-1]["score"]
               for ex in entry["verification"]["examples"])


def test_verification_off_and_no_val_split(tmp_path):
    data = make_layout(tmp_path / "d", n_test_ids=4, runs=2)
    (entry,) = evaluate(eval_cfg(data, tmp_path / "o", "verification.enabled=false"))["entries"]
    assert "verification" not in entry
    import shutil

    shutil.rmtree(data / "train_val_test_split_dorsal_r" / "val")
    (entry,) = evaluate(eval_cfg(data, tmp_path / "o"))["entries"]
    v = entry["verification"]
    assert v["calibration"] is None and v["threshold"] is None  # figures without a threshold still come
    assert "eer" in v["runs"][0] and "unknown_rate" not in v["runs"][0]


def test_calibration_file_errors(tmp_path):
    from handclip.errors import HandCLIPError
    from handclip.evaluation.calibration import select_threshold

    with pytest.raises(HandCLIPError, match="calibration file '.*none.json' not found"):
        read_calibration(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(HandCLIPError, match="unreadable or not JSON"):
        read_calibration(bad)
    bad.write_text('{"threshold": 0.5}')
    with pytest.raises(HandCLIPError, match="is not a HandCLIP calibration file"):
        read_calibration(bad)
    cal = {"format": 1, "threshold": 0.7, "target_fmr": 0.01, "fmr": 0.0, "tar": 0.5, "model_fingerprint": "abc",
           "levels": [{"target_fmr": 0.1, "threshold": 0.6, "fmr": 0.1, "tar": 0.8, "resolved": True}]}
    assert select_threshold(cal, bad, "abc", None, "")["threshold"] == 0.7
    assert select_threshold(cal, bad, "abc", 0.1, "")["threshold"] == 0.6
    with pytest.raises(HandCLIPError, match="other weights .* HOW"):
        select_threshold(cal, bad, "xyz", None, "HOW")
    with pytest.raises(HandCLIPError, match=r"no threshold for FMR 0.001 \(it has 0.1\)"):
        select_threshold(cal, bad, "abc", 0.001, "")


def test_eval_goes_on_when_the_calibration_cannot_be_written(trained, tmp_path, monkeypatch, caplog):
    import handclip.evaluation.calibration as calibration

    data, _, ckpt = trained
    copy = tmp_path / "ro" / "best.ckpt"
    copy.parent.mkdir()
    copy.write_bytes(ckpt.read_bytes())

    def refuse(path, *a, **k):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(calibration, "write_calibration", refuse)
    with caplog.at_level("WARNING"):
        (entry,) = evaluate(eval_cfg(data, tmp_path / "o", f"ckpt_path={copy}"))["entries"]
    assert "could not write" in caplog.text and "best.calibration.json" in caplog.text
    assert entry["verification"]["calibration"]["threshold"] == read_calibration(sidecar_path(ckpt))["threshold"]
    assert not sidecar_path(copy).exists()
