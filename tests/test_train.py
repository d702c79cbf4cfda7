"""Training: configs, the module's recipe, checkpoints and logs, resuming, multirun, and user errors."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_layout
from hydra.errors import MissingConfigException

from handclip.checkpoints import load_module, read_checkpoint_meta
from handclip.config import compose
from handclip.data.layout import HAND_TYPES
from handclip.errors import HandCLIPError
from handclip.models.clip import create_clip
from handclip.models.module import HandCLIPModule
from handclip.train import train

ROOT = Path(__file__).resolve().parents[1]
FIVE_METRICS = ("train/loss_epoch", "train/acc", "val/loss", "val/acc", "val/rank1")


def tiny_cfg(data: Path, out: Path, *extra: str, hand: str = "dorsal_right"):
    return compose("train", [
        "experiment=demo", f"hand={hand}", f"paths.data_dir={data}", f"paths.output_root={out}",
        f"paths.cache_dir={out / 'cache'}", "data.progress=false", "data.cache_workers=0",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", *extra,
    ])


def read_metrics(run_dir: Path, version: int = 0) -> list[dict]:
    with open(run_dir / "logs" / f"version_{version}" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def column(rows: list[dict], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key)]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_layout(tmp_path_factory.mktemp("layout"), hands=tuple(HAND_TYPES), n_train_ids=5, per_id=4)


# -- configs -----------------------------------------------------------------------------------
@pytest.mark.parametrize("hand", list(HAND_TYPES))
@pytest.mark.parametrize("experiment", [None, "demo"])
@pytest.mark.parametrize("name", ["train", "eval"])
def test_configs_compose_for_every_hand_and_experiment(name, hand, experiment):
    overrides = [f"hand={hand}"] + ([f"experiment={experiment}"] if experiment else [])
    cfg = compose(name, overrides)
    assert cfg.data.hand == hand
    assert Path(cfg.paths.data_dir).is_absolute() and Path(cfg.paths.output_root).is_absolute()
    if name == "train":
        assert cfg.paths.output_dir.endswith(f"outputs/{'demo/' if experiment else ''}train/{hand}")


def test_default_recipe_is_the_mission():
    cfg = compose("train")
    assert cfg.model.model_name == "ViT-B-32-quickgelu" and cfg.model.pretrained == "openai"
    assert cfg.model.lr == 1e-5 and cfg.model.weight_decay == 0.01
    assert cfg.trainer.max_epochs == 50
    assert cfg.data.num_workers == 0 and cfg.data.cache is True
    targets = [c["_target_"] for c in cfg.callbacks.values() if c]
    assert not any("EarlyStopping" in t for t in targets)
    monitors = {c.get("filename"): c.get("monitor") for c in cfg.callbacks.values() if c}
    assert monitors == {"best": "val/rank1", "last": None}
    assert cfg.callbacks.best_checkpoint.mode == "max"


def test_unknown_hand_lists_valid_ones():
    with pytest.raises(MissingConfigException, match="dorsal_left"):
        compose("train", ["hand=dorsal_middle"])


# -- the module --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def module() -> HandCLIPModule:
    return HandCLIPModule(classes=["a", "b", "c"], hand="dorsal_right", model_name="HandCLIP-Tiny", pretrained=None)


def test_only_the_image_tower_and_head_are_optimised(module):
    optimizer = module.configure_optimizers()
    assert type(optimizer) is torch.optim.AdamW
    group = optimizer.param_groups[0]
    assert len(optimizer.param_groups) == 1 and group["lr"] == 1e-5 and group["weight_decay"] == 0.01
    optimised = {id(p) for p in group["params"]}
    names = {n for n, p in module.named_parameters() if id(p) in optimised}
    assert names == {n for n, _ in module.named_parameters() if n.startswith(("clip.visual.", "head."))}
    frozen = [n for n, p in module.clip.named_parameters() if not n.startswith("visual.")]
    assert "logit_scale" in frozen and any(n.startswith("transformer.") for n in frozen)
    assert all(not p.requires_grad for n, p in module.clip.named_parameters() if n in frozen)


def test_forward_gives_logits_over_identities(module):
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    assert module(images).shape == (2, 3)
    assert module.embed(images).shape == (2, 64)


def test_vit_b32_embedding_is_512_wide():
    clip = create_clip("ViT-B-32-quickgelu", None)
    assert clip.visual.output_dim == 512


def test_val_rank1_matches_brute_force(module, monkeypatch):
    g = torch.Generator().manual_seed(0)
    query, gallery = torch.randn(30, 8, generator=g), torch.randn(50, 8, generator=g)
    qlab, glab = torch.randint(0, 6, (30,), generator=g), torch.randint(0, 6, (50,), generator=g)
    logged = {}
    monkeypatch.setattr(module, "log", lambda name, value, **kw: logged.__setitem__(name, value))
    module._val_outputs = {0: [(query[:13], qlab[:13]), (query[13:], qlab[13:])], 1: [(gallery, glab)]}
    module.on_validation_epoch_end()
    hits = 0
    for i in range(len(query)):
        sims = [
            sum(a * b for a, b in zip(query[i].tolist(), gallery[j].tolist()))
            / (query[i].norm().item() * gallery[j].norm().item())
            for j in range(len(gallery))
        ]
        best = max(range(len(gallery)), key=lambda j: (sims[j], -j))
        hits += int(glab[best] == qlab[i])
    assert logged["val/rank1"] == pytest.approx(hits / len(query))


# -- training runs -----------------------------------------------------------------------------
def test_fast_dev_run(data, tmp_path):
    train(tiny_cfg(data, tmp_path, "+trainer.fast_dev_run=true"))


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A 3-epoch run whose text tower is recorded when fit starts."""
    out = tmp_path_factory.mktemp("run")
    cfg = tiny_cfg(data, out, "trainer.max_epochs=3", "seed=7", "trainer.deterministic=true")
    text_before = {}
    original = HandCLIPModule.configure_optimizers

    def recording(self):  # called once when fit starts, before any training step
        text_before.update({n: p.detach().clone() for n, p in self.clip.named_parameters() if not n.startswith("visual.")})
        return original(self)

    HandCLIPModule.configure_optimizers = recording
    try:
        metrics = train(cfg)
    finally:
        HandCLIPModule.configure_optimizers = original
    return {"cfg": cfg, "out": out, "run_dir": Path(cfg.paths.output_dir), "text_before": text_before, "metrics": metrics}


def test_run_writes_checkpoints_config_and_all_metrics(trained):
    run_dir = trained["run_dir"]
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "config.yaml").is_file()
    assert not list((run_dir / "checkpoints").rglob("*/")), "metric names must not create sub-folders"
    rows = read_metrics(run_dir)
    for key in FIVE_METRICS:
        assert len(column(rows, key)) == 3, key
    assert sorted({int(r["epoch"]) for r in rows}) == [0, 1, 2]


def test_checkpoint_knows_its_classes_and_loads_weights_only(trained):
    meta = read_checkpoint_meta(trained["run_dir"] / "checkpoints" / "best.ckpt")
    assert meta["classes"] == [f"{i:07d}" for i in range(5)]
    assert meta["hand"] == "dorsal_right" and meta["model_name"] == "HandCLIP-Tiny"
    module = HandCLIPModule.load_from_checkpoint(trained["run_dir"] / "checkpoints" / "last.ckpt", weights_only=True)
    assert module.classes == meta["classes"]


def test_text_tower_untouched_by_training(trained):
    module = load_module(trained["run_dir"] / "checkpoints" / "last.ckpt")
    after = dict(module.clip.named_parameters())
    assert trained["text_before"]
    for name, before in trained["text_before"].items():
        assert torch.equal(before, after[name].detach()), name
    initial_visual = HandCLIPModule(classes=list(module.classes), hand="dorsal_right", model_name="HandCLIP-Tiny",
                                    pretrained=None)
    # the image tower did change
    assert not torch.equal(initial_visual.clip.visual.conv1.weight, module.clip.visual.conv1.weight)


def test_logged_val_rank1_is_the_nearest_training_image(trained, data):
    """Recompute the last epoch's val/rank1 from last.ckpt by brute force over the val/train images."""
    from handclip.data.datamodule import HandDataModule

    module = load_module(trained["run_dir"] / "checkpoints" / "last.ckpt")
    dm = HandDataModule(str(data), "dorsal_right", "HandCLIP-Tiny", None, cache=False)
    dm.setup()
    with torch.no_grad():
        val = [(module.embed(x.unsqueeze(0))[0], int(y)) for x, y in dm.val_set]
        gal = [(module.embed(x.unsqueeze(0))[0], int(y)) for x, y in dm.train_set]
    hits = 0
    for q, ql in val:
        sims = [torch.nn.functional.cosine_similarity(q, g, dim=0).item() for g, _ in gal]
        best = max(range(len(gal)), key=lambda j: (sims[j], -j))
        hits += int(gal[best][1] == ql)
    logged = column(read_metrics(trained["run_dir"]), "val/rank1")[-1]
    assert logged == pytest.approx(hits / len(val), abs=1e-6)


def test_same_seed_same_metrics(trained, data, tmp_path):
    again = tiny_cfg(data, tmp_path, "trainer.max_epochs=3", "seed=7", "trainer.deterministic=true")
    train(again)
    first, second = read_metrics(trained["run_dir"]), read_metrics(Path(again.paths.output_dir))
    for key in FIVE_METRICS:
        assert column(first, key) == pytest.approx(column(second, key), rel=1e-5), key


def test_second_run_refuses_then_resume_continues_epochs(trained, data):
    cfg = tiny_cfg(data, trained["out"], "trainer.max_epochs=5", "seed=7")
    before = {p.name: p.stat().st_mtime_ns for p in (trained["run_dir"] / "checkpoints").iterdir()}
    with pytest.raises(HandCLIPError, match="already holds a run.*ckpt_path=last"):
        train(cfg)
    assert before == {p.name: p.stat().st_mtime_ns for p in (trained["run_dir"] / "checkpoints").iterdir()}
    resumed = tiny_cfg(data, trained["out"], "trainer.max_epochs=5", "seed=7", "ckpt_path=last")
    train(resumed)
    rows = read_metrics(trained["run_dir"], version=1)
    assert sorted({int(r["epoch"]) for r in rows}) == [3, 4]
    assert (trained["run_dir"] / "config.yaml").is_file()
    assert list(trained["run_dir"].glob("config.resumed-*.yaml"))
    assert torch.load(trained["run_dir"] / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 4  # 0-based: the fifth epoch


def test_resume_refuses_other_classes_or_model(trained, data, tmp_path):
    last = trained["run_dir"] / "checkpoints" / "last.ckpt"
    other = make_layout(tmp_path / "other", n_train_ids=3)
    with pytest.raises(HandCLIPError, match="identities that differ"):
        train(tiny_cfg(other, tmp_path / "o1", f"ckpt_path={last}"))
    with pytest.raises(HandCLIPError, match="hand='dorsal_right'.*hand='palmar_left'"):
        train(tiny_cfg(data, tmp_path / "o2", f"ckpt_path={last}", hand="palmar_left"))
    with pytest.raises(HandCLIPError, match="to resume from not found"):
        train(tiny_cfg(data, tmp_path / "o3", "ckpt_path=last"))


# -- errors ------------------------------------------------------------------------------------
def test_missing_data_root_says_how_to_make_data(tmp_path):
    with pytest.raises(HandCLIPError, match="make demo"):
        train(tiny_cfg(tmp_path / "none", tmp_path))


def test_fewer_than_two_identities(tmp_path):
    data = make_layout(tmp_path / "one", n_train_ids=1)
    with pytest.raises(HandCLIPError, match="at least 2 training identities"):
        train(tiny_cfg(data, tmp_path))


def test_pretrained_weights_unavailable_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HandCLIPError, match=r"model.pretrained=/path/to/file"):
        create_clip("ViT-B-32-quickgelu", "openai")
    with pytest.raises(HandCLIPError, match=r"/no/such/weights.bin.*model.pretrained=/path/to/file"):
        create_clip("ViT-B-32-quickgelu", "/no/such/weights.bin")


def test_nan_loss_stops_with_the_step(data, tmp_path, monkeypatch):
    original = HandCLIPModule.forward

    def nan_forward(self, images):
        logits = original(self, images)
        return logits * float("nan") if self.global_step >= 1 else logits

    monkeypatch.setattr(HandCLIPModule, "forward", nan_forward)
    with pytest.raises(HandCLIPError, match=r"loss became nan at global step 1"):
        train(tiny_cfg(data, tmp_path, "trainer.max_epochs=2"))


def test_cli_multirun_two_hands_and_clean_errors(data, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    common = ["experiment=demo", f"paths.data_dir={data}", f"paths.output_root={tmp_path}",
              f"paths.cache_dir={tmp_path / 'cache'}", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
              "data.progress=false"]
    result = subprocess.run([sys.executable, "-m", "handclip.train", "-m", "hand=dorsal_right,palmar_left", *common],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for hand in ("dorsal_right", "palmar_left"):
        assert (tmp_path / "train" / hand / "checkpoints" / "best.ckpt").is_file()
    assert not (tmp_path / "train" / "dorsal_left").exists()

    again = subprocess.run([sys.executable, "-m", "handclip.train", "hand=dorsal_right", *common],
                           env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2
    assert "error:" in again.stderr and "already holds a run" in again.stderr
    assert "Traceback" not in again.stderr


def test_device_batches_cover_each_image_once_per_epoch():
    from handclip.data.images import DeviceBatchLoader

    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 2, 2)
    loader = DeviceBatchLoader(images, torch.arange(10), batch_size=4, shuffle=True)
    assert len(loader) == 3
    torch.manual_seed(0)
    first = [(x, y) for x, y in loader]
    assert [len(y) for _, y in first] == [4, 4, 2]
    seen = torch.cat([y for _, y in first])
    assert sorted(seen.tolist()) == list(range(10)) and seen.tolist() != list(range(10))
    assert all(torch.equal(x[:, 0, 0, 0].long(), y) for x, y in first)  # images stay with their labels
    torch.manual_seed(0)
    assert torch.equal(torch.cat([y for _, y in loader]), seen)  # the global seed decides the order
    ordered = DeviceBatchLoader(images, torch.arange(10), batch_size=4, shuffle=False)
    assert torch.cat([y for _, y in ordered]).tolist() == list(range(10))


def test_training_from_device_batches(data, tmp_path):
    cfg = tiny_cfg(data, tmp_path, "trainer.max_epochs=2", "data.device_batches=true")
    train(cfg)
    rows = read_metrics(Path(cfg.paths.output_dir))
    assert len(column(rows, "val/rank1")) == 2 and len(column(rows, "train/loss_epoch")) == 2


def test_explicit_resume_into_another_run_is_refused(trained, data, tmp_path):
    other = tiny_cfg(data, tmp_path, "trainer.max_epochs=1")
    train(other)
    other_dir = Path(other.paths.output_dir)
    before = {p.name: p.stat().st_mtime_ns for p in (other_dir / "checkpoints").iterdir()}
    last = trained["run_dir"] / "checkpoints" / "last.ckpt"
    with pytest.raises(HandCLIPError, match="already holds another run.*mix"):
        train(tiny_cfg(data, tmp_path, "trainer.max_epochs=9", f"ckpt_path={last}"))
    assert before == {p.name: p.stat().st_mtime_ns for p in (other_dir / "checkpoints").iterdir()}


def test_run_without_checkpoint_yet_is_not_mixed(data, tmp_path):
    run_dir = Path(tiny_cfg(data, tmp_path).paths.output_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("from an interrupted run\n")
    with pytest.raises(HandCLIPError, match="already holds a run \\(no checkpoint yet\\)"):
        train(tiny_cfg(data, tmp_path))


def test_resume_and_load_need_no_pretrained_download(trained, monkeypatch):
    """Weights come from the checkpoint: a pretrained tag that cannot be fetched is never fetched."""
    import handclip.models.module as module_mod

    calls = []
    real = module_mod.create_clip
    monkeypatch.setattr(module_mod, "create_clip", lambda name, pretrained, cache_dir=None: (
        calls.append(pretrained), real(name, pretrained, cache_dir))[1])
    last = trained["run_dir"] / "checkpoints" / "last.ckpt"
    HandCLIPModule.load_from_checkpoint(last, load_pretrained=False, weights_only=True)
    load_module(last)
    assert calls == [None, None]
