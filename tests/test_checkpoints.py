"""Checkpoints: those of earlier versions load, evaluate to the same figures and resume; today's hold only what
training changes (best.ckpt weights only, last.ckpt with the optimizer state of the trainable parameters), resume
bit for bit, and export to a plain open_clip model."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ROOT, column, eval_cfg, make_layout, read_metrics, run_module, tiny_cfg

from handclip.data.split import prepare_dataset
from handclip.data.synthetic import generate_dataset
from handclip.errors import HandCLIPError
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


# -- slim checkpoints (format 2) ---------------------------------------------------------------
#: A recipe on which the tiny model learns within a few epochs (as in test_train.py).
LEARNING = ("seed=7", "trainer.deterministic=true", "model.lr=1e-3", "data.batch_size=8")


@pytest.fixture(scope="module")
def slim_run(tmp_path_factory):
    """A 3-epoch run of today's code: its best.ckpt, last.ckpt and the module it trained."""
    tmp = tmp_path_factory.mktemp("slim")
    data = make_layout(tmp / "data", n_train_ids=6, per_id=5)
    cfg = tiny_cfg(data, tmp / "out", "trainer.max_epochs=3", *LEARNING)
    train(cfg)
    folder = Path(cfg.paths.output_dir) / "checkpoints"
    return {"data": data, "tmp": tmp, "best": folder / "best.ckpt", "last": folder / "last.ckpt"}


def test_best_checkpoint_holds_weights_only_without_the_text_tower(slim_run):
    from handclip.models.module import HandCLIPModule

    ckpt = torch.load(slim_run["best"], weights_only=True, map_location="cpu")
    assert "optimizer_states" not in ckpt and "callbacks" not in ckpt and "lr_schedulers" not in ckpt
    clip = HandCLIPModule(["a", "b"], "dorsal_right", model_name="HandCLIP-Tiny", pretrained=None).clip.state_dict()
    text = [name for name in clip if not name.startswith("visual.")]
    assert "token_embedding.weight" in text and "logit_scale" in text and len(text) > 10
    # exactly the image tower and the head: no text-tower tensor under any name
    image_tower = {"encoder." + name for name in clip if name.startswith("visual.")}
    assert set(ckpt["state_dict"]) == image_tower | {"head.weight", "head.bias"}
    meta = read_checkpoint_meta(slim_run["best"])
    assert meta["resumable"] is False and meta["format"] == 2


def test_last_checkpoint_holds_the_optimizer_state_of_exactly_the_trainable_parameters(slim_run):
    ckpt = torch.load(slim_run["last"], weights_only=True, map_location="cpu")
    module = load_module(slim_run["last"])
    trainable = [p for p in module.encoder.parameters() if p.requires_grad] + list(module.head.parameters())
    (optimizer,) = ckpt["optimizer_states"]
    (group,) = optimizer["param_groups"]
    assert len(group["params"]) == len(trainable) == len(optimizer["state"])
    for index, param in zip(group["params"], trainable):
        state = optimizer["state"][index]
        assert state["exp_avg"].shape == param.shape and state["exp_avg_sq"].shape == param.shape
    moments = sum(s["exp_avg"].numel() + s["exp_avg_sq"].numel() for s in optimizer["state"].values())
    assert moments == 2 * sum(p.numel() for p in trainable)
    assert set(ckpt["state_dict"]) == set(torch.load(slim_run["best"], weights_only=True)["state_dict"])
    assert read_checkpoint_meta(slim_run["last"])["resumable"] is True


def test_checkpoints_carry_their_preprocessing_and_figures(slim_run):
    import dataclasses

    from handclip.models.clip import preprocess_config

    for path in (slim_run["best"], slim_run["last"]):
        meta = read_checkpoint_meta(path)
        assert meta["preprocess"] == dataclasses.asdict(preprocess_config("HandCLIP-Tiny", None))
        assert meta["model_name"] == "HandCLIP-Tiny" and meta["pretrained"] is None and meta["hand"] == "dorsal_right"
        assert meta["classes"] == [f"{i:07d}" for i in range(6)]
        assert 0.0 <= meta["metrics"]["val/rank1"] <= 1.0 and meta["threshold"] is None
    rows = read_metrics(slim_run["best"].parents[1])
    assert read_checkpoint_meta(slim_run["best"])["metrics"]["val/rank1"] == pytest.approx(
        max(column(rows, "val/rank1")))


def test_stored_preprocessing_is_the_one_used(slim_run, tmp_path):
    """A checkpoint's own preprocessing wins over what the model name implies (here a changed mean)."""
    ckpt = torch.load(slim_run["best"], weights_only=True)
    ckpt["handclip"]["preprocess"]["mean"] = (0.5, 0.5, 0.5)
    torch.save(ckpt, tmp_path / "b.ckpt")
    module = load_module(tmp_path / "b.ckpt")
    assert module.encoder.preprocess.mean == (0.5, 0.5, 0.5)
    assert module.encoder.normalize.mean.flatten().tolist() == [0.5, 0.5, 0.5]
    assert load_module(slim_run["best"]).encoder.preprocess.mean != (0.5, 0.5, 0.5)


def _as_old_full_checkpoint(src: Path, dst: Path) -> Path:
    """The weights of a slim checkpoint in the layout of 0.1.0: the whole open_clip model (the text tower of a
    freshly built model), the optimizer state, the loops and callbacks (here those of a last.ckpt)."""
    from handclip.models.module import HandCLIPModule

    ckpt = torch.load(src, weights_only=True, map_location="cpu")
    module = HandCLIPModule(["a", "b"], "dorsal_right", model_name="HandCLIP-Tiny", pretrained=None)
    state = {f"clip.{k}": v for k, v in module.clip.state_dict().items() if not k.startswith("visual.")}
    for key, value in ckpt["state_dict"].items():
        state[key.replace("encoder.visual.", "clip.visual.", 1)] = value
    ckpt["state_dict"] = state
    del ckpt["handclip"]
    torch.save(ckpt, dst)
    return dst


def test_slim_best_evaluates_like_the_same_weights_in_an_old_full_checkpoint(slim_run, tmp_path):
    old = _as_old_full_checkpoint(slim_run["best"], tmp_path / "old_full.ckpt")
    assert old.stat().st_size > 2 * slim_run["best"].stat().st_size  # the text tower is the larger part here
    scored = {}
    for name, ckpt in (("slim", slim_run["best"]), ("old", old)):
        (entry,) = evaluate(eval_cfg(slim_run["data"], tmp_path / name, f"ckpt_path={ckpt}"))["entries"]
        scored[name] = entry["runs"]
    assert len(scored["slim"]) == 2
    for slim, full in zip(scored["slim"], scored["old"]):
        for key in ("rank1", "rank5", "mAP", "num_valid_queries"):
            assert slim[key] == full[key], key


def test_resume_from_the_weights_only_best_is_refused(slim_run, tmp_path):
    with pytest.raises(HandCLIPError, match="holds weights only.*ckpt_path=last"):
        train(tiny_cfg(slim_run["data"], tmp_path, "trainer.max_epochs=4", f"ckpt_path={slim_run['best']}"))
    assert not (tmp_path / "train").exists()


def test_resume_continues_bit_for_bit(tmp_path, monkeypatch):
    """3 epochs at once, or 2 then a resume from the slim last.ckpt: the same loss at every later step, the same
    weights at the end (trainer.deterministic=true)."""
    from handclip.models.module import HandCLIPModule

    data = make_layout(tmp_path / "data", n_train_ids=6, per_id=5)
    losses: dict[str, dict[int, float]] = {}
    run = ["whole"]
    original = HandCLIPModule.training_step

    def recording(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        losses.setdefault(run[0], {})[self.global_step] = loss.item()
        return loss

    monkeypatch.setattr(HandCLIPModule, "training_step", recording)
    whole = tiny_cfg(data, tmp_path / "whole", "trainer.max_epochs=3", *LEARNING)
    train(whole)
    run[0] = "first"
    parts = tiny_cfg(data, tmp_path / "parts", "trainer.max_epochs=2", *LEARNING)
    train(parts)
    run[0] = "resumed"
    train(tiny_cfg(data, tmp_path / "parts", "trainer.max_epochs=3", *LEARNING, "ckpt_path=last"))
    resumed = losses["resumed"]
    assert sorted(resumed) == [s for s in sorted(losses["whole"]) if s >= min(resumed)] and len(resumed) == 3
    assert min(resumed) == max(losses["first"]) + 1
    for step, loss in resumed.items():
        assert loss == losses["whole"][step], step
    end = [torch.load(Path(c.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
           for c in (whole, parts)]
    assert end[0].keys() == end[1].keys()
    assert all(torch.equal(end[0][k], end[1][k]) for k in end[0])


def test_a_resumed_run_keeps_a_better_best_than_its_last_checkpoint_knew(slim_run, tmp_path):
    """last.ckpt is written less often than best.ckpt: after a resume from a last.ckpt older than best.ckpt, best.ckpt
    is only replaced by an epoch that beats the score stored in it, not the older record in last.ckpt."""
    cfg = tiny_cfg(slim_run["data"], tmp_path, "trainer.max_epochs=1", *LEARNING)
    train(cfg)
    folder = Path(cfg.paths.output_dir) / "checkpoints"
    best, last = folder / "best.ckpt", folder / "last.ckpt"
    ckpt = torch.load(best, weights_only=True)
    ckpt["handclip"]["metrics"]["val/rank1"] = 1.0  # as if a later epoch, lost in a crash, had been perfect
    torch.save(ckpt, best)
    ckpt = torch.load(last, weights_only=True)
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint")]
    state["best_model_score"] = state["kth_value"] = torch.tensor(-1.0)  # ... and last.ckpt predates every epoch
    state["best_k_models"] = {k: torch.tensor(-1.0) for k in state["best_k_models"]}
    torch.save(ckpt, last)
    before = best.read_bytes()
    train(tiny_cfg(slim_run["data"], tmp_path, "trainer.max_epochs=3", *LEARNING, "ckpt_path=last"))
    assert len(column(read_metrics(folder.parent, version=1), "val/rank1")) == 2
    assert best.read_bytes() == before  # the stock callback would have replaced it after the first resumed epoch


# -- export ------------------------------------------------------------------------------------
@pytest.mark.slow  # builds the whole open_clip model twice (~10 s)
def test_open_clip_export_loads_in_open_clip_with_the_same_image_embeddings(slim_run, tmp_path):
    import open_clip

    out = tmp_path / "model.safetensors"
    result = run_module("handclip.export", f"ckpt_path={slim_run['best']}", f"out={out}",
                        f"paths.output_root={tmp_path / 'outputs'}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert str(out) in result.stdout
    clip = open_clip.create_model("HandCLIP-Tiny", pretrained=str(out)).eval()
    module = load_module(slim_run["best"])
    images = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(clip.encode_image(module.encoder.normalize(images)), module.encoder.embed(images))
    # both towers are there: open_clip loads strictly, and the text tower encodes
    assert clip.encode_text(open_clip.get_tokenizer("HandCLIP-Tiny")(["a hand"])).shape == (1, 64)


def _export_cfg(tmp_path: Path, *overrides: str):
    from handclip.config import compose

    return compose("export", [f"paths.output_root={tmp_path / 'outputs'}", *overrides])


def test_export_refuses_to_overwrite_and_unknown_formats(slim_run, tmp_path):
    from handclip.export import export

    out = tmp_path / "model.safetensors"
    out.write_bytes(b"keep me")
    args = (f"ckpt_path={slim_run['best']}", f"out={out}")
    with pytest.raises(HandCLIPError, match="exists; pass overwrite=true"):
        export(_export_cfg(tmp_path, *args))
    assert out.read_bytes() == b"keep me"
    with pytest.raises(HandCLIPError, match="format='tflite'.*open_clip"):
        export(_export_cfg(tmp_path, *args, "format=tflite"))
    with pytest.raises(HandCLIPError, match="not found"):
        export(_export_cfg(tmp_path, f"ckpt_path={tmp_path / 'none.ckpt'}", f"out={tmp_path / 'n.safetensors'}"))
    assert export(_export_cfg(tmp_path, *args, "overwrite=true"))["path"] == str(out) and out.read_bytes() != b"keep me"
    assert not list(tmp_path.glob(".*.tmp"))


def test_export_defaults_to_the_trained_best_checkpoint_and_a_file_beside_it(slim_run, tmp_path):
    from safetensors.torch import load_file

    from handclip.export import export
    from handclip.models.open_clip_export import default_output

    run = tmp_path / "outputs" / "train" / "dorsal_right"
    shutil.copytree(slim_run["best"].parents[1], run)
    written = Path(export(_export_cfg(tmp_path))["path"])
    expected = run / "checkpoints" / "best.open_clip.safetensors"
    assert written == default_output(run / "checkpoints" / "best.ckpt") == expected
    module = load_module(slim_run["best"])
    tensors = load_file(written)
    assert all(torch.equal(tensors[f"visual.{k}"], v) for k, v in module.encoder.visual.state_dict().items())


@pytest.mark.slow  # a new Python process (~8 s)
def test_export_cli_error_is_one_line(tmp_path):
    result = run_module("handclip.export", f"ckpt_path={tmp_path / 'none.ckpt'}", f"paths.output_root={tmp_path}")
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("error: checkpoint")
    assert "Traceback" not in result.stderr
