"""Training: configs, the module's recipe, learning, checkpoints and logs, resuming, multirun, and user errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import FIVE_METRICS, column, make_layout, read_metrics, run_module, tiny_cfg, tiny_preprocess
from hydra.errors import MissingConfigException
from reference import brute_force_rank1

from handclip.config import compose
from handclip.errors import HandCLIPError
from handclip.hands import HAND_TYPES
from handclip.models.checkpoint import load_module, read_checkpoint_meta
from handclip.models.clip import create_clip
from handclip.models.module import HandCLIPModule
from handclip.train import train

#: The training identities of the layouts below, as their folder names.
CLASSES = [f"{i:07d}" for i in range(6)]
#: A recipe on which the tiny model learns the layout's identity patterns within a few epochs.
LEARNING = ("seed=7", "trainer.deterministic=true", "model.lr=1e-3", "data.batch_size=8")
EPOCHS = 8


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_layout(tmp_path_factory.mktemp("layout"), hands=tuple(HAND_TYPES), n_train_ids=6, per_id=5)


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
    """The brief's fixed defaults, written out here (not read back from the code)."""
    cfg = compose("train")
    assert cfg.model.model_name == "ViT-B-32-quickgelu" and cfg.model.pretrained == "openai"
    assert cfg.model.lr == 1e-5 and cfg.model.weight_decay == 0.01
    assert cfg.trainer.max_epochs == 50
    assert cfg.trainer.precision == "32-true"
    assert cfg.trainer.check_val_every_n_epoch == 1
    assert cfg.data.batch_size == 64
    assert cfg.data.num_workers == 0 and cfg.data.cache is True
    assert cfg.model.compile is False
    targets = [c["_target_"] for c in cfg.callbacks.values() if c]
    assert not any("EarlyStopping" in t or "LearningRateMonitor" in t for t in targets)
    monitors = {c.get("filename"): c.get("monitor") for c in cfg.callbacks.values()
                if c and c["_target_"].endswith("Checkpoint")}
    assert monitors == {"best": "val/rank1", "last": None}
    # the open-set threshold of best.ckpt is calibrated when training ends (tests/test_eval_verification.py)
    assert cfg.callbacks.calibration.target_fmr == 0.01 and cfg.callbacks.calibration.checkpoint.endswith("best.ckpt")
    assert cfg.callbacks.best_checkpoint.mode == "max"


def test_the_optimizer_has_no_scheduler():
    module = HandCLIPModule(classes=["a", "b"], hand="dorsal_right", model_name="HandCLIP-Tiny", pretrained=None)
    configured = module.configure_optimizers()
    # A bare optimizer: no lr_scheduler entry, no (optimizers, schedulers) pair, no dict.
    assert isinstance(configured, torch.optim.AdamW)


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
    assert names == {n for n, _ in module.named_parameters() if n.startswith(("encoder.visual.", "head."))}
    frozen = [n for n, p in module.clip.named_parameters() if not n.startswith("visual.")]
    assert "logit_scale" in frozen and any(n.startswith("transformer.") for n in frozen)
    assert all(not p.requires_grad for n, p in module.clip.named_parameters() if n in frozen)


def test_forward_gives_logits_over_identities(module):
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    assert module(images).shape == (2, 3)
    assert module.encoder.embed(images).shape == (2, 64)


def test_a_training_step_moves_the_image_tower(module):
    """One optimizer step on the cross-entropy changes every trainable image-tower tensor that gets a gradient."""
    step = HandCLIPModule(classes=["a", "b", "c"], hand="dorsal_right", model_name="HandCLIP-Tiny", pretrained=None)
    before = {n: p.detach().clone() for n, p in step.clip.visual.named_parameters()}
    optimizer = step.configure_optimizers()
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    step.loss_fn(step(images), torch.tensor([0, 1, 2, 0])).backward()
    with_grad = {n for n, p in step.clip.visual.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert "conv1.weight" in with_grad and "proj" in with_grad
    optimizer.step()
    changed = {n for n, p in step.clip.visual.named_parameters() if not torch.equal(before[n], p.detach())}
    assert with_grad <= changed


def test_vit_b32_embedding_is_512_wide():
    clip = create_clip("ViT-B-32-quickgelu", None)
    assert clip.visual.output_dim == 512


def test_val_rank1_matches_brute_force(module, monkeypatch):
    g = torch.Generator().manual_seed(0)
    query, gallery = torch.randn(30, 64, generator=g), torch.randn(50, 64, generator=g)  # tiny: 64-d embeddings
    qlab, glab = torch.randint(0, 3, (30,), generator=g), torch.randint(0, 3, (50,), generator=g)
    logged = {}
    monkeypatch.setattr(module, "log", lambda name, value, **kw: logged.__setitem__(name, value))
    module._val_outputs = {0: [(query[:13], qlab[:13], torch.arange(13)),
                               (query[13:], qlab[13:], torch.arange(13, 30))],
                           1: [(gallery, glab, torch.arange(50))]}
    module.on_validation_epoch_end()
    assert float(logged["val/rank1"]) == pytest.approx(brute_force_rank1(query, qlab, gallery, glab))


def test_val_figures_use_each_image_once_in_dataset_order(monkeypatch):
    """Gathered validation outputs in any order, with a DistributedSampler's padding duplicates: the figures
    are those of the whole val set in dataset order (rank-1 ties go to the earlier gallery image)."""
    module = HandCLIPModule(classes=["a", "b", "c"], hand="dorsal_right", model_name="HandCLIP-Tiny", pretrained=None)
    module.head = torch.nn.Linear(4, 3)
    g = torch.Generator().manual_seed(1)
    query, qlab = torch.randn(7, 4, generator=g), torch.randint(0, 3, (7,), generator=g)
    # two gallery images identical to query 0's nearest, with different labels: a tie broken by gallery order
    gallery, glab = torch.randn(9, 4, generator=g), torch.arange(9) % 3
    gallery[4], gallery[6], glab[4], glab[6] = query[0], query[0], qlab[0], (qlab[0] + 1) % 3
    logged = {}
    monkeypatch.setattr(module, "log", lambda name, value, **kw: logged.__setitem__(name, float(value)))
    q_order, g_order = torch.tensor([3, 5, 0, 6, 1, 4, 2, 3]), torch.tensor([8, 6, 2, 0, 4, 1, 7, 3, 5, 8])
    module._val_outputs = {0: [(query[q_order[:5]], qlab[q_order[:5]], q_order[:5]),
                               (query[q_order[5:]], qlab[q_order[5:]], q_order[5:])],
                           1: [(gallery[g_order], glab[g_order], g_order)]}
    module.on_validation_epoch_end()
    logits = module.head(query)
    assert logged["val/rank1"] == pytest.approx(brute_force_rank1(query, qlab, gallery, glab))
    assert logged["val/loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, qlab)))
    assert logged["val/acc"] == pytest.approx(float((logits.argmax(1) == qlab).float().mean()))


# -- training runs -----------------------------------------------------------------------------
def test_fast_dev_run(data, tmp_path):
    """One training and one validation batch, the five metrics, and no checkpoint (Lightning's dry run)."""
    cfg = tiny_cfg(data, tmp_path, "trainer.fast_dev_run=true")
    metrics = train(cfg)
    assert {"train/loss_epoch", "val/loss", "val/rank1"} <= set(metrics)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert 0.0 <= metrics["val/rank1"] <= 1.0
    assert not list(Path(cfg.paths.output_dir).rglob("*.ckpt"))


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """An 8-epoch run on identity-bearing images; the initial weights are recorded when fit starts."""
    out = tmp_path_factory.mktemp("run")
    cfg = tiny_cfg(data, out, f"trainer.max_epochs={EPOCHS}", *LEARNING)
    before, live = {}, []
    original = HandCLIPModule.configure_optimizers

    def recording(self):  # called once when fit starts, before any training step
        before.update({n: p.detach().clone() for n, p in self.clip.named_parameters()})
        live.append(self)
        return original(self)

    HandCLIPModule.configure_optimizers = recording
    try:
        metrics = train(cfg)
    finally:
        HandCLIPModule.configure_optimizers = original
    return {"cfg": cfg, "out": out, "run_dir": Path(cfg.paths.output_dir), "before": before, "module": live[0],
            "metrics": metrics}


def test_run_writes_checkpoints_config_and_all_metrics(trained):
    run_dir = trained["run_dir"]
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "config.yaml").is_file()
    assert not list((run_dir / "checkpoints").rglob("*/")), "metric names must not create sub-folders"
    rows = read_metrics(run_dir)
    for key in FIVE_METRICS:
        assert len(column(rows, key)) == EPOCHS, key
    assert sorted({int(r["epoch"]) for r in rows}) == list(range(EPOCHS))


def test_the_model_learns(trained):
    """Loss falls and val/rank1 rises on images whose identity is learnable."""
    rows = read_metrics(trained["run_dir"])
    loss, rank1 = column(rows, "train/loss_epoch"), column(rows, "val/rank1")
    assert loss[-1] < 0.6 * loss[0]
    assert max(rank1) >= rank1[0] + 0.3


def test_best_checkpoint_holds_the_highest_val_rank1(trained, data):
    """best.ckpt is the first epoch with the highest logged val/rank1, and its weights reproduce that value."""
    rows = read_metrics(trained["run_dir"])
    rank1 = column(rows, "val/rank1")
    assert len(set(rank1)) > 1, "val/rank1 must move for this test to mean anything"
    best_epoch = rank1.index(max(rank1))
    best = trained["run_dir"] / "checkpoints" / "best.ckpt"
    assert torch.load(best, weights_only=True, map_location="cpu")["epoch"] == best_epoch
    assert recomputed_val_rank1(best, data) == pytest.approx(max(rank1), abs=1e-6)


def test_checkpoint_knows_its_classes_and_loads_weights_only(trained):
    meta = read_checkpoint_meta(trained["run_dir"] / "checkpoints" / "best.ckpt")
    assert meta["classes"] == CLASSES
    assert meta["hand"] == "dorsal_right" and meta["model_name"] == "HandCLIP-Tiny"
    module = HandCLIPModule.load_from_checkpoint(trained["run_dir"] / "checkpoints" / "last.ckpt", weights_only=True)
    assert module.classes == meta["classes"]


def test_only_the_image_tower_trained(trained):
    """Against the run's own initial weights: the text tower is unchanged, every image-tower tensor moved
    (and last.ckpt holds the moved image tower)."""
    after = {n: p.detach() for n, p in trained["module"].clip.named_parameters()}
    before = trained["before"]
    assert before and set(before) == set(after)
    for name, value in before.items():
        if name.startswith("visual."):
            assert not torch.equal(value, after[name]), f"image tower tensor {name} never changed"
        else:
            assert torch.equal(value, after[name]), f"text tower tensor {name} changed"
    saved = load_module(trained["run_dir"] / "checkpoints" / "last.ckpt").encoder.visual.state_dict()
    for name, value in saved.items():
        assert torch.equal(value, after[f"visual.{name}"]), name


def recomputed_val_rank1(ckpt: Path, data: Path) -> float:
    """val/rank1 of a checkpoint by brute force over the val and training images."""
    from handclip.data.datamodule import HandDataModule

    module = load_module(ckpt)
    dm = HandDataModule(str(data), "dorsal_right", tiny_preprocess(), cache=False)
    dm.setup()
    with torch.no_grad():
        val = [(module.encoder.embed(x.unsqueeze(0))[0], int(y)) for x, y in dm.val_set]
        gal = [(module.encoder.embed(x.unsqueeze(0))[0], int(y)) for x, y in dm.train_set]
    return brute_force_rank1([v for v, _ in val], [y for _, y in val], [g for g, _ in gal], [y for _, y in gal])


def test_logged_val_rank1_is_the_nearest_training_image(trained, data):
    """Recompute the last epoch's val/rank1 from last.ckpt by brute force over the val/train images."""
    logged = column(read_metrics(trained["run_dir"]), "val/rank1")[-1]
    last = trained["run_dir"] / "checkpoints" / "last.ckpt"
    assert recomputed_val_rank1(last, data) == pytest.approx(logged, abs=1e-6)


def test_same_seed_same_metrics(trained, data, tmp_path):
    """A 3-epoch run with the same seed repeats the first 3 epochs of the 8-epoch run (no schedule to differ)."""
    again = tiny_cfg(data, tmp_path, "trainer.max_epochs=3", *LEARNING)
    train(again)
    first, second = read_metrics(trained["run_dir"]), read_metrics(Path(again.paths.output_dir))
    for key in FIVE_METRICS:
        assert column(first, key)[:3] == pytest.approx(column(second, key), rel=1e-5), key


def test_second_run_refuses_then_resume_continues(trained, data, tmp_path):
    """Resuming the first 4 epochs of the run for 4 more gives the run's own last 4 epochs."""
    cfg = tiny_cfg(data, tmp_path, "trainer.max_epochs=4", *LEARNING)
    train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    before = {p.name: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").iterdir()}
    again = tiny_cfg(data, tmp_path, f"trainer.max_epochs={EPOCHS}", *LEARNING)
    with pytest.raises(HandCLIPError, match="already holds a run.*ckpt_path=last"):
        train(again)
    assert before == {p.name: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").iterdir()}
    train(tiny_cfg(data, tmp_path, f"trainer.max_epochs={EPOCHS}", *LEARNING, "ckpt_path=last"))
    rows = read_metrics(run_dir, version=1)
    assert sorted({int(r["epoch"]) for r in rows}) == list(range(4, EPOCHS))
    assert (run_dir / "config.yaml").is_file()
    assert list(run_dir.glob("config.resumed-*.yaml"))
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == EPOCHS - 1
    # the run's history came back too: curves.png of the resumed run draws the first run's epochs as well
    history = last["callbacks"]["RunHistory"]["epochs"]
    assert sorted(history) == list(range(EPOCHS))
    assert [history[e]["val/rank1"] for e in range(4)] == pytest.approx(column(read_metrics(run_dir), "val/rank1"))
    # the weights came back: the resumed epochs start where the first 4 left off, not from scratch
    first = read_metrics(run_dir, version=0)
    assert column(rows, "train/loss_epoch")[0] < 0.8 * column(first, "train/loss_epoch")[0]


def _checkpoint_with(src: Path, dst: Path, **hparams) -> Path:
    ckpt = torch.load(src, weights_only=True, map_location="cpu")
    ckpt["hyper_parameters"].update(hparams)
    torch.save(ckpt, dst)
    return dst


def test_resume_refuses_other_classes_hand_or_model(trained, data, tmp_path):
    last = trained["run_dir"] / "checkpoints" / "last.ckpt"
    other = make_layout(tmp_path / "other", n_train_ids=3)
    with pytest.raises(HandCLIPError, match="identities that differ"):
        train(tiny_cfg(other, tmp_path / "o1", f"ckpt_path={last}"))
    with pytest.raises(HandCLIPError, match="hand='dorsal_right'.*hand='palmar_left'"):
        train(tiny_cfg(data, tmp_path / "o2", f"ckpt_path={last}", hand="palmar_left"))
    with pytest.raises(HandCLIPError, match="to resume from not found"):
        train(tiny_cfg(data, tmp_path / "o3", "ckpt_path=last"))
    vit = _checkpoint_with(last, tmp_path / "vit.ckpt", model_name="ViT-B-32")
    with pytest.raises(HandCLIPError, match="model_name='ViT-B-32'.*model_name='HandCLIP-Tiny'"):
        train(tiny_cfg(data, tmp_path / "o4", f"ckpt_path={vit}"))
    assert not (tmp_path / "o4" / "train").exists()


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


@pytest.mark.slow
def test_cli_multirun_two_hands_and_clean_errors(data, tmp_path):
    common = ["experiment=demo", f"paths.data_dir={data}", f"paths.output_root={tmp_path}",
              f"paths.cache_dir={tmp_path / 'cache'}", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
              "data.progress=false"]
    result = run_module("handclip.train", "-m", "hand=dorsal_right,palmar_left", *common)
    assert result.returncode == 0, result.stderr[-3000:]
    for hand in ("dorsal_right", "palmar_left"):
        assert (tmp_path / "train" / hand / "checkpoints" / "best.ckpt").is_file()
    assert not (tmp_path / "train" / "dorsal_left").exists()

    again = run_module("handclip.train", "hand=dorsal_right", *common)
    assert again.returncode == 2
    assert "error:" in again.stderr and "already holds a run" in again.stderr
    assert "Traceback" not in again.stderr


def test_device_batches_cover_each_image_once_per_epoch():
    from handclip.data.datasets import DeviceBatchLoader

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


def test_training_from_device_batches(data, tmp_path, monkeypatch):
    """data.device_batches=true: every training and validation batch comes from a DeviceBatchLoader."""
    from handclip.data import datamodule as datamodule_mod
    from handclip.data.datasets import DeviceBatchLoader

    served = []

    class Recording(DeviceBatchLoader):
        def __iter__(self):
            for batch in super().__iter__():
                served.append(len(batch[1]))
                yield batch

    monkeypatch.setattr(datamodule_mod, "DeviceBatchLoader", Recording)
    cfg = tiny_cfg(data, tmp_path, "trainer.max_epochs=2", "data.device_batches=true")
    train(cfg)
    rows = read_metrics(Path(cfg.paths.output_dir))
    assert len(column(rows, "val/rank1")) == 2 and len(column(rows, "train/loss_epoch")) == 2
    # per epoch: the 24 training images, then the 6 val and 24 training images for val/rank1; at the end the
    # open-set calibration embeds val and training images once more (CalibrationCallback)
    assert sum(served) == 2 * (24 + 6 + 24) + (6 + 24)


def test_shuffled_training_batches(data, tmp_path):
    from handclip.data.datamodule import HandDataModule

    dm = HandDataModule(str(data), "dorsal_right", tiny_preprocess(), cache=False, batch_size=4)
    dm.setup()
    torch.manual_seed(0)
    order = torch.cat([y for _, y in dm.train_dataloader()]).tolist()
    assert sorted(order) == sorted(dm.train_set.labels.tolist()) and order != dm.train_set.labels.tolist()
    val_batches = list(dm.val_dataloader()[0])
    assert torch.cat([y for _, y, _ in val_batches]).tolist() == dm.val_set.labels.tolist()
    assert torch.cat([i for _, _, i in val_batches]).tolist() == list(range(len(dm.val_set)))  # indices for DDP


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
    """A run still running (it holds its folder's lock) that wrote no checkpoint yet is not mixed with."""
    from handclip.run_folder import LOCK_NAME
    from handclip.utils.locks import try_lock

    run_dir = Path(tiny_cfg(data, tmp_path).paths.output_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("from a live run\n")
    with try_lock(run_dir / LOCK_NAME), pytest.raises(HandCLIPError, match="in use by another training run"):
        train(tiny_cfg(data, tmp_path))
    assert (run_dir / "config.yaml").read_text() == "from a live run\n"


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
