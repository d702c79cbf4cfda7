"""Checkpoints written by earlier versions: they load, evaluate to the same figures, and resume."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT, column, eval_cfg, make_layout, read_metrics, tiny_cfg

from handclip.data.split import prepare_dataset
from handclip.data.synthetic import generate_dataset
from handclip.eval import evaluate
from handclip.models.checkpoint import load_module, read_checkpoint_meta
from handclip.models.migrate import upgrade_state_dict
from handclip.train import train

V1 = ROOT / "tests" / "data" / "v1_tiny_best.ckpt"
V1_EXPECTED = json.loads(V1.with_suffix(".json").read_text())


def _raw_sha256(raw: Path) -> str:
    h = hashlib.sha256()
    for p in sorted((raw / "Hands").iterdir()):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    h.update((raw / "HandInfo.csv").read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def v1_data(tmp_path_factory) -> Path:
    """The synthetic split the v1 checkpoint was trained and scored on, made again."""
    base = tmp_path_factory.mktemp("v1")
    s, p = V1_EXPECTED["synthetic"], V1_EXPECTED["prepare"]
    generate_dataset(base / "raw", subjects=s["subjects"], images_per_aspect=s["images_per_aspect"], seed=s["seed"],
                     size=tuple(s["size"]), workers=1)
    info = prepare_dataset(base / "raw", base / "splits", seed=p["seed"], runs=p["runs"])
    # the same photos and the same split: a difference below is then loading or scoring, not data
    assert _raw_sha256(base / "raw") == V1_EXPECTED["raw_sha256"]
    assert info["hands"]["dorsal_right"]["listing_sha256"] == V1_EXPECTED["listing_sha256"]
    return base / "splits"


def test_v1_checkpoint_evaluates_to_the_same_figures(v1_data, tmp_path):
    ckpt = tmp_path / V1.name  # a copy: eval writes the open-set threshold beside the checkpoint it scores
    ckpt.write_bytes(V1.read_bytes())
    (entry,) = evaluate(eval_cfg(v1_data, tmp_path, "hand=dorsal_right", f"ckpt_path={ckpt}"))["entries"]
    assert ckpt.with_name("v1_tiny_best.calibration.json").is_file()  # a 0.1.0 checkpoint gets its threshold
    assert len(entry["runs"]) == len(V1_EXPECTED["runs"])
    for got, want in zip(entry["runs"], V1_EXPECTED["runs"]):
        assert got["run"] == want["run"] and got["num_valid_queries"] == want["num_valid_queries"]
        for key in ("rank1", "rank5", "rank10", "mAP"):
            assert got[key] == pytest.approx(want[key], abs=1e-9), (want["run"], key)


def test_v1_checkpoint_metadata_and_weights():
    meta = read_checkpoint_meta(V1)
    assert meta["model_name"] == "HandCLIP-Tiny" and meta["hand"] == "dorsal_right" and len(meta["classes"]) == 8
    raw = torch.load(V1, weights_only=True, map_location="cpu")["state_dict"]
    module = load_module(V1)
    for name, value in module.encoder.visual.state_dict().items():
        assert torch.equal(value, raw[f"clip.visual.{name}"]), name
    assert torch.equal(module.head.weight, raw["head.weight"])


def test_upgrade_maps_the_image_tower_and_drops_the_text_tower():
    old = {"clip.visual.conv1.weight": torch.ones(1), "clip.visual.proj": torch.zeros(2),
           "clip.transformer.resblocks.0.ln_1.weight": torch.ones(3), "clip.logit_scale": torch.tensor(1.0),
           "head.weight": torch.ones(2, 2), "head.bias": torch.zeros(2)}
    new = upgrade_state_dict(old)
    assert set(new) == {"encoder.visual.conv1.weight", "encoder.visual.proj", "head.weight", "head.bias"}
    assert new["encoder.visual.conv1.weight"] is old["clip.visual.conv1.weight"]
    assert upgrade_state_dict(new) == new  # today's layout is left alone


def _to_v1_layout(src: Path, dst: Path) -> Path:
    """Rewrite a checkpoint of today's layout the way 0.1.0 wrote it (image tower under clip.visual.)."""
    ckpt = torch.load(src, weights_only=True, map_location="cpu")
    state = {}
    for key, value in ckpt["state_dict"].items():
        state[key.replace("encoder.visual.", "clip.visual.", 1)] = value
    state["clip.logit_scale"] = torch.tensor(4.6)  # and a text-tower tensor, as 0.1.0 saved them
    ckpt["state_dict"] = state
    torch.save(ckpt, dst)
    return dst


def test_resume_from_a_v1_last_checkpoint(tmp_path):
    """An old last.ckpt (weights and AdamW state) resumes: the epochs continue and learning goes on."""
    data = make_layout(tmp_path / "data", n_train_ids=4, per_id=4)
    cfg = tiny_cfg(data, tmp_path / "a", "trainer.max_epochs=2", "seed=3")
    train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    _to_v1_layout(last, last)
    assert any(k.startswith("clip.visual.") for k in torch.load(last, weights_only=True)["state_dict"])
    train(tiny_cfg(data, tmp_path / "a", "trainer.max_epochs=3", "seed=3", "ckpt_path=last"))
    resumed = read_metrics(run_dir, version=1)
    assert sorted({int(r["epoch"]) for r in resumed}) == [2]
    assert column(resumed, "train/loss_epoch")[0] < column(read_metrics(run_dir), "train/loss_epoch")[0]
