"""The opt-in recipe options of issue 22: batch-hard triplet loss, PK sampler (one process and DDP sharding), BNNeck,
label smoothing, warm-up and head lr, flip TTA; checkpoints of each evaluate to the same figures after export."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_layout, quiet_overrides, tiny_cfg
from torch.nn import functional as F
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from handclip.config import compose
from handclip.data.sampling import PKBatchSampler
from handclip.errors import HandCLIPError
from handclip.hands import hand_dir_name
from handclip.models.encoder import BNNeck, ImageEncoder, zero_shot_encoder
from handclip.models.fingerprint import encoder_fingerprint
from handclip.models.losses import batch_hard_triplet_loss
from handclip.models.module import HandCLIPModule


# -- batch-hard triplet loss against every triplet ----------------------------------------------
def brute_force_triplet(features: torch.Tensor, labels: list[int], margin: float, soft: bool) -> float:
    """For each anchor, the worst loss over all its (positive, negative) pairs; mean over anchors that have any."""
    x = features.double().tolist()
    losses = []
    for a in range(len(x)):
        worst = None
        for p, n in itertools.product(range(len(x)), repeat=2):
            if p == a or labels[p] != labels[a] or labels[n] == labels[a]:
                continue
            gap = math.dist(x[a], x[p]) - math.dist(x[a], x[n])
            loss = math.log1p(math.exp(gap)) if soft else max(0.0, gap + margin)
            worst = loss if worst is None else max(worst, loss)
        if worst is not None:
            losses.append(worst)
    return sum(losses) / len(losses) if losses else 0.0


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_batch_hard_triplet_loss_equals_the_worst_triplet_of_each_anchor(seed, soft):
    rng = random.Random(seed)
    n = rng.randint(2, 12)
    labels = [rng.randint(0, max(1, n // 3)) for _ in range(n)]  # singletons and repeated identities alike
    features = torch.randn(n, 5, generator=torch.Generator().manual_seed(seed)) * rng.choice([0.1, 1.0, 3.0])
    margin = rng.choice([0.0, 0.3, 1.0])
    got = batch_hard_triplet_loss(features, torch.tensor(labels), margin, soft)
    assert float(got) == pytest.approx(brute_force_triplet(features, labels, margin, soft), rel=1e-5, abs=1e-6)


def test_triplet_loss_without_any_triplet_is_zero_with_finite_gradients():
    for labels in ([3, 3, 3], [0, 1, 2]):  # no negative / no positive: no anchor counts
        features = torch.randn(3, 4, requires_grad=True)
        loss = batch_hard_triplet_loss(features, torch.tensor(labels), 0.3)
        loss.backward()
        assert float(loss.detach()) == 0.0 and torch.isfinite(features.grad).all()
    features = torch.zeros(4, 4, requires_grad=True)  # identical features: distance 0 has a finite gradient
    batch_hard_triplet_loss(features, torch.tensor([0, 0, 1, 1]), 0.3).backward()
    assert torch.isfinite(features.grad).all()


# -- the PK sampler -----------------------------------------------------------------------------
def random_labels(seed: int) -> list[int]:
    rng = random.Random(seed)
    counts = [rng.choice([1, 2, 3, 4, 5, 7, 9, 12]) for _ in range(rng.randint(2, 15))]
    labels = [i for i, c in enumerate(counts) for _ in range(c)]
    rng.shuffle(labels)
    return labels


def groups_of(batch: list[int], labels: list[int], k: int) -> Counter:
    counts = Counter(labels[i] for i in batch)
    assert all(c % k == 0 for c in counts.values()), "an identity group was split"
    return counts


def check_epoch_coverage(images: list[int], labels: list[int], k: int) -> None:
    """Every image at least once; an identity's images as often as its groups need, and no image more than
    once beyond that."""
    seen = Counter(images)
    for identity in set(labels):
        members = [i for i, label in enumerate(labels) if label == identity]
        groups = max(1, -(-len(members) // k))
        assert all(seen[i] >= 1 for i in members)
        assert sum(seen[i] for i in members) == groups * k
        if len(members) >= k:
            assert all(seen[i] <= 2 for i in members) and sum(seen[i] - 1 for i in members) == groups * k - len(members)


@pytest.mark.parametrize("seed", range(12))
def test_pk_batches_on_one_process(seed):
    labels = random_labels(seed)
    rng = random.Random(seed)
    p, k = rng.randint(1, 5), rng.randint(1, 4)
    torch.manual_seed(seed)
    sampler = PKBatchSampler(torch.utils.data.RandomSampler(labels), p * k, labels=labels, identities=p, images=k)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    for batch in batches:
        counts = groups_of(batch, labels, k)
        assert all(c == k for c in counts.values()), "one group of K images per identity in a batch"
        assert len(counts) <= p
    # as few batches as distinct identities per batch allow: all groups in batches of P, or an identity's groups
    # one per batch
    groups = sum(max(1, -(-labels.count(i) // k)) for i in set(labels))
    assert len(batches) == max(math.ceil(groups / p), max(-(-labels.count(i) // k) for i in set(labels)))
    check_epoch_coverage([i for b in batches for i in b], labels, k)
    # seeded by torch's generator, like a RandomSampler
    torch.manual_seed(seed)
    assert list(sampler) == batches


def ddp_epoch(labels: list[int], p: int, k: int, world: int, epoch: int, seed: int = 3) -> list[list[list[int]]]:
    ranks = []
    for rank in range(world):
        dist = DistributedSampler(range(len(labels)), num_replicas=world, rank=rank, shuffle=True, seed=seed)
        dist.set_epoch(epoch)
        sampler = PKBatchSampler(dist, p * k, labels=labels, identities=p, images=k)
        ranks.append(list(sampler))
        assert len(sampler) == len(ranks[-1])
    return ranks


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("seed", range(8))
def test_pk_batches_under_ddp_give_each_process_whole_groups(seed, world):
    labels = random_labels(100 + seed)
    rng = random.Random(seed)
    p, k = rng.randint(1, 4), rng.randint(1, 4)
    groups = sum(max(1, -(-labels.count(i) // k)) for i in set(labels))
    if groups < world:
        with pytest.raises(ValueError, match="cannot be shared"):
            ddp_epoch(labels, p, k, world, 0)
        return
    ranks = ddp_epoch(labels, p, k, world, epoch=seed)
    assert len({len(r) for r in ranks}) == 1, "every process takes the same number of steps"
    assert all(batch for r in ranks for batch in r), "no process gets an empty batch"
    repeated = 0
    for step in zip(*ranks):
        total = sum(groups_of(b, labels, k).total() for b in step) // k
        assert all(len(groups_of(b, labels, k)) <= p for b in step) or total > p * world
        # distinct identities in a global batch, but where the short batches at the epoch's end were joined
        repeated += len({labels[i] for b in step for i in b}) != total
    short = sum(size < world for size in PKBatchSampler(range(len(labels)), p * k, labels=labels, identities=p,
                                                        images=k)._shape(world))
    assert repeated <= short
    check_epoch_coverage([i for r in ranks for b in r for i in b], labels, k)
    # the same on every call and every process for a seed and epoch; another epoch, another order
    assert ddp_epoch(labels, p, k, world, epoch=seed) == ranks
    if len(ranks[0]) > 2:
        assert ddp_epoch(labels, p, k, world, epoch=seed + 1) != ranks


def test_lightning_reinstantiates_the_pk_sampler_with_its_distributed_sampler(tmp_path):
    """Under DDP Lightning rebuilds the training loader's batch sampler around a DistributedSampler: the PK
    sampler keeps its labels, P and K (as Lightning does it, from the arguments it saved)."""
    from lightning_fabric.utilities.data import _replace_dunder_methods
    from pytorch_lightning.utilities.data import _update_dataloader

    from handclip.data.datamodule import HandDataModule
    from handclip.models.clip import preprocess_config

    data = make_layout(tmp_path / "data", n_train_ids=5, per_id=4)
    dm = HandDataModule(str(data), "dorsal_right", preprocess_config("HandCLIP-Tiny", None), sampler="pk",
                        pk_identities=2, pk_images=2, cache=False, progress=False)
    dm.setup()
    assert dm.batch_size == 4
    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
        loader = dm.train_dataloader()
    dist = DistributedSampler(dm.train_set, num_replicas=2, rank=1, shuffle=True, seed=0)
    rebuilt = _update_dataloader(loader, dist).batch_sampler
    assert isinstance(rebuilt, PKBatchSampler) and rebuilt.sampler is dist
    assert (rebuilt.identities, rebuilt.images) == (2, 2)
    assert rebuilt.labels.tolist() == dm.train_set.labels.tolist()


def test_bad_recipe_settings_are_named():
    from handclip.data.datamodule import HandDataModule
    from handclip.models.clip import preprocess_config

    tiny = {"classes": ["a", "b"], "hand": "dorsal_right", "model_name": "HandCLIP-Tiny", "pretrained": None}
    for bad, setting in (({"neck": "bn"}, "model.neck"), ({"neck_feature": "middle"}, "model.neck_feature"),
                         ({"tta": "rotate"}, "eval.tta"), ({"label_smoothing": 1.0}, "model.label_smoothing"),
                         ({"triplet_margin": -1}, "model.triplet_margin"), ({"head_lr": 0}, "model.head_lr"),
                         ({"warmup_epochs": "x"}, "model.warmup_epochs")):
        with pytest.raises(HandCLIPError, match=setting.replace(".", r"\.")):
            HandCLIPModule(**tiny, **bad)
    for bad, setting in (({"sampler": "balanced"}, "data.sampler"), ({"pk_images": 0}, "data.pk_images")):
        with pytest.raises(HandCLIPError, match=setting.replace(".", r"\.")):
            HandDataModule("x", "dorsal_right", preprocess_config("HandCLIP-Tiny", None), cache=False, **bad)


@pytest.mark.parametrize(("command", "refused", "accepted", "rule"), [
    ("train", "model.neck=bn", "model.neck=bnneck", "model.neck=bn: expected one of none, bnneck"),
    ("train", "model.neck_feature=middle", "model.neck_feature=after",
     "model.neck_feature=middle: expected one of before, after"),
    ("train", "model.label_smoothing=1", "model.label_smoothing=0.999",
     "model.label_smoothing=1.0: expected a number in [0, 1)"),
    ("train", "model.triplet_margin=-0.1", "model.triplet_margin=0",
     "model.triplet_margin=-0.1: expected a number >= 0"),
    ("train", "model.warmup_epochs=-1", "model.warmup_epochs=0", "model.warmup_epochs=-1.0: expected a number >= 0"),
    ("train", "model.head_lr=0", "model.head_lr=1e-9", "model.head_lr=0.0: expected a number > 0"),
    ("train", "data.sampler=balanced", "data.sampler=pk", "data.sampler=balanced: expected one of random, pk"),
    ("train", "data.pk_images=0", "data.pk_images=1", "data.pk_images=0: expected a number >= 1"),
    ("train", "data.pk_identities=0", "data.pk_identities=1", "data.pk_identities=0: expected a number >= 1"),
    ("train", "eval.tta=mirror", "eval.tta=flip", "eval.tta=mirror: expected one of none, flip"),
    ("eval", "eval.tta=mirror", "eval.tta=none", "eval.tta=mirror: expected one of none, flip"),
    ("identify", "eval.tta=both", "eval.tta=flip", "eval.tta=both: expected one of none, flip"),
])
def test_recipe_keys_are_checked_at_their_boundary_before_torch(command, refused, accepted, rule):
    from handclip.command_line import check_override_keys

    check_override_keys(command, [accepted])
    with pytest.raises(HandCLIPError) as err:
        check_override_keys(command, [refused])
    assert str(err.value) == rule


# -- BNNeck, label smoothing, flip TTA on the module --------------------------------------------
TINY = {"classes": ["a", "b", "c"], "hand": "dorsal_right", "model_name": "HandCLIP-Tiny", "pretrained": None}


def crops(n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_default_module_is_unchanged_by_the_options():
    module = HandCLIPModule(**TINY).eval()
    assert module.encoder.neck is None and module.head.bias is not None
    assert module.loss_fn.label_smoothing == 0.0 and module.encoder.tta == "none"
    images = crops()
    with torch.no_grad():
        assert torch.equal(module.encoder.embed(images), module.encoder.visual(module.encoder.normalize(images)))
    # the default encoder's fingerprint is computed as before the options existed: tower weights only
    plain = ImageEncoder(module.encoder.visual, module.encoder.preprocess)
    assert encoder_fingerprint(module.encoder) == encoder_fingerprint(plain)
    with_neck = HandCLIPModule(**TINY, neck="bnneck").encoder  # a pre-BN test feature does not change it either
    assert encoder_fingerprint(with_neck) == encoder_fingerprint(ImageEncoder(with_neck.visual, with_neck.preprocess))


def test_bnneck_sits_between_embedding_and_a_bias_free_classifier(monkeypatch):
    torch.manual_seed(0)
    module = HandCLIPModule(**TINY, neck="bnneck")
    monkeypatch.setattr(module, "log", lambda *a, **k: None)
    neck = module.encoder.neck
    assert isinstance(neck, BNNeck) and module.head.bias is None and not neck.bias.requires_grad
    images, labels = crops(), torch.tensor([0, 1, 2, 0, 1, 2])
    module.train()
    features = module.encoder.features(images)
    normalised = (features - features.mean(0)) / torch.sqrt(features.var(0, unbiased=False) + neck.eps)
    want = normalised * neck.weight @ module.head.weight.T
    assert torch.allclose(module(images), want, atol=1e-4)
    module.training_step((images, labels), 0)  # BN statistics move in training, and a batch of one works
    assert not torch.equal(neck.running_mean, torch.zeros_like(neck.running_mean))
    module.training_step((images[:1], labels[:1]), 1)
    module.eval()
    with torch.no_grad():
        assert torch.equal(module.encoder.embed(images), module.encoder.features(images))  # pre-BN by default
        module.encoder.feature = "after"
        assert torch.equal(module.encoder.embed(images), neck(module.encoder.features(images)))


def test_label_smoothing_is_cross_entropys():
    torch.manual_seed(0)
    module = HandCLIPModule(**TINY, label_smoothing=0.2).eval()
    images, labels = crops(), torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        logp = module(images).log_softmax(1)
        want = (0.8 * -logp[range(6), labels] + 0.2 * -logp.mean(1)).mean()
        assert float(module.loss_fn(module(images), labels)) == pytest.approx(float(want), rel=1e-5)


def test_triplet_loss_is_added_on_the_pre_bn_features_with_its_weight(monkeypatch):
    torch.manual_seed(0)
    module = HandCLIPModule(**TINY, neck="bnneck", triplet_margin=0.3, triplet_weight=0.5).eval()
    monkeypatch.setattr(module, "log", lambda *a, **k: None)
    images, labels = crops(), torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        loss = module.training_step((images, labels), 0)
        features = module.encoder.features(images)
        ce = F.cross_entropy(module.head(module.encoder.neck(features)), labels)
        want = ce + 0.5 * brute_force_triplet(features, labels.tolist(), 0.3, False)
    assert float(loss) == pytest.approx(float(want), rel=1e-5)


def test_flip_tta_is_the_mean_of_a_photo_and_its_mirror():
    torch.manual_seed(0)
    plain = zero_shot_encoder("HandCLIP-Tiny", None)
    flip = ImageEncoder(plain.visual, plain.preprocess, tta="flip").eval()
    images = crops()
    mirrored = torch.from_numpy(np.ascontiguousarray(images.numpy()[:, :, :, ::-1]))  # left-right, by NumPy
    with torch.no_grad():
        want = (plain.embed(images) + plain.embed(mirrored)) / 2
        assert torch.allclose(flip.embed(images), want, atol=1e-6)
    assert not torch.allclose(plain.embed(images), want, atol=1e-3)
    assert encoder_fingerprint(flip) != encoder_fingerprint(plain)  # an index or threshold of one is not the other's


# -- warm-up and the head's lr, in a real run ---------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_layout(tmp_path_factory.mktemp("layout"), n_train_ids=6, per_id=5)


def test_linear_warmup_per_step_and_the_heads_own_lr(data, tmp_path, monkeypatch):
    from handclip.train import train

    seen = []

    def record(self, batch, batch_idx):
        seen.append([g["lr"] for g in self.trainer.optimizers[0].param_groups])

    monkeypatch.setattr(HandCLIPModule, "on_train_batch_start", record, raising=False)
    cfg = tiny_cfg(data, tmp_path, "trainer.max_epochs=3", "data.batch_size=8", "model.lr=1e-3",
                   "model.head_lr=4e-3", "model.warmup_epochs=1.5", "model.neck=bnneck")
    train(cfg)
    per_epoch = len(seen) // 3  # 24 training images in batches of 8
    assert per_epoch == 3 and len(seen) == 9
    warmup = round(1.5 * per_epoch)
    for step, (tower, head) in enumerate(seen):
        factor = 0.1 + 0.9 * min(step, warmup) / warmup
        assert tower == pytest.approx(1e-3 * factor) and head == pytest.approx(4e-3 * factor), step
    # the head group holds the classifier and the neck's scale (its shift stays at 0), the other the tower
    module = HandCLIPModule(**TINY, neck="bnneck", head_lr=4e-3)
    groups = module.configure_optimizers().param_groups
    assert [len(g["params"]) for g in groups] == [sum(1 for _ in module.encoder.visual.parameters()), 2]


def test_default_recipe_keeps_a_single_group_and_no_scheduler():
    module = HandCLIPModule(**TINY)
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW) and len(optimizer.param_groups) == 1
    assert optimizer.param_groups[0]["lr"] == 1e-5


# -- configs -------------------------------------------------------------------------------------
def test_strong_experiment_composes_the_options_with_their_sources_settings():
    cfg = compose("train", ["experiment=strong"])
    m = cfg.model
    assert (m.neck, m.neck_feature, m.label_smoothing, m.triplet_margin, m.warmup_epochs) == \
        ("bnneck", "before", 0.1, 0.3, 10)
    assert (m.lr, m.weight_decay, cfg.trainer.max_epochs) == (5e-6, 1e-4, 60)
    assert (cfg.data.sampler, cfg.data.pk_identities, cfg.data.pk_images, cfg.eval.tta) == ("pk", 16, 4, "flip")
    assert m.model_name == "ViT-B-32-quickgelu"  # the default model unless another is chosen
    demo = compose("train", ["experiment=strong_demo"])
    assert demo.model.model_name == "HandCLIP-Tiny" and demo.data.sampler == "pk" and demo.eval.tta == "flip"
    default = compose("train")
    assert (default.model.neck, default.model.label_smoothing, default.model.triplet_margin) == ("none", 0.0, None)
    assert (default.model.warmup_epochs, default.model.head_lr, default.data.sampler, default.eval.tta) == \
        (0, None, "random", "none")
    for name in ("eval", "identify", "export"):
        assert compose(name).eval.tta is None  # the checkpoint's own
        assert compose(name, ["experiment=strong"]).eval.tta == "flip"


# -- a checkpoint of each option evaluates to the same figures after export -----------------------
OPTIONS = {
    "bnneck": ["model.neck=bnneck"],
    "bnneck_after": ["model.neck=bnneck", "model.neck_feature=after"],
    "flip": ["eval.tta=flip"],
    "pk_soft_triplet_smoothing_warmup_head_lr": [
        "data.sampler=pk", "data.pk_identities=3", "data.pk_images=2", "model.triplet_margin=0.3",
        "model.triplet_soft=true", "model.label_smoothing=0.1", "model.warmup_epochs=1", "model.head_lr=1e-3"],
    "strong_demo": ["data.pk_identities=3", "data.pk_images=2"],
}


def option_cfg(data: Path, out: Path, option: str):
    if option == "strong_demo":
        return compose("train", ["experiment=strong_demo", "hand=dorsal_right", f"paths.data_dir={data}",
                                 *quiet_overrides(out), "trainer.enable_progress_bar=false",
                                 "trainer.enable_model_summary=false", "trainer.max_epochs=2", *OPTIONS[option]])
    return tiny_cfg(data, out, "trainer.max_epochs=2", "data.batch_size=8", *OPTIONS[option])


def figures(embeddings: dict[Path, np.ndarray], test) -> list[dict]:
    from handclip.metrics import compute_reid_metrics

    x = torch.from_numpy(np.stack([embeddings[p] for p in test.paths])).float()
    ids = {name: i for i, name in enumerate(sorted(set(test.identities)))}
    y = torch.tensor([ids[name] for name in test.identities])
    return [compute_reid_metrics(x[run["query"]], y[run["query"]], x[run["gallery"]], y[run["gallery"]])
            for run in test.runs]


def same_figures(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        for key in ("rank1", "rank5", "mAP"):
            assert float(g[key]) == pytest.approx(float(w[key]), abs=1e-9), key


@pytest.mark.parametrize("option", list(OPTIONS))
def test_a_checkpoint_of_each_option_evaluates_to_the_same_figures_after_export(option, data, tmp_path):
    import onnxruntime as ort
    import open_clip
    from safetensors import safe_open

    from handclip.data.datamodule import HandDataModule
    from handclip.data.images import ImageLoader
    from handclip.eval import evaluate
    from handclip.export import export
    from handclip.identify.embeddings_export import load_embeddings
    from handclip.identify.run import load_model
    from handclip.models.checkpoint import load_module, read_checkpoint_meta
    from handclip.train import train

    cfg = option_cfg(data, tmp_path / "o", option)
    train(cfg)
    best = Path(cfg.paths.output_dir) / "checkpoints" / "best.ckpt"
    meta = read_checkpoint_meta(best)
    module = load_module(best)
    encoder = module.encoder
    # the checkpoint restores the recipe: neck, test feature and TTA
    assert (encoder.neck is not None) == (meta["neck"] == "bnneck") and encoder.tta == cfg.eval.tta
    assert encoder.feature == cfg.model.neck_feature

    scored = evaluate(compose("eval", [f"paths.data_dir={data}", *quiet_overrides(tmp_path / "o"), "experiment=demo",
                                       "verification.enabled=false", f"ckpt_path={best}"]))
    (entry,) = scored["entries"]
    test = HandDataModule(str(data), "dorsal_right", encoder.preprocess, cache=False, progress=False).test_images()
    loader = ImageLoader(encoder.preprocess)
    images = torch.stack([loader(p) for p in test.paths])
    with torch.no_grad():
        own = encoder.embed(images).numpy()
        if encoder.neck is not None:  # the test feature is the configured one
            pre = encoder.features(images)
            if encoder.tta == "flip":
                pre = (pre + encoder.features(images.flip(-1))) / 2
            want = encoder.neck(pre) if encoder.feature == "after" else pre
            assert np.allclose(own, want.numpy(), atol=1e-6)
    same_figures(figures(dict(zip(test.paths, own)), test), entry["runs"])

    def export_cfg(*extra: str):
        return compose("export", ["experiment=demo", f"paths.output_root={tmp_path / 'o'}", "progress=false",
                                  "num_workers=0", f"ckpt_path={best}", *extra])

    # identify embeds with the same encoder
    ident, _, _ = load_model(compose("identify", ["experiment=demo", f"ckpt_path={best}"]))
    with torch.no_grad():
        assert np.allclose(ident.embed(images).numpy(), own, atol=1e-6)
    # embeddings export
    npz = tmp_path / "test.npz"
    export(export_cfg("format=embeddings", f"images={data / hand_dir_name('dorsal_right') / 'test'}", f"out={npz}"))
    stored = load_embeddings(npz)  # the same photos as query/gallery, under test/<identity>/<name>
    by_name = {(Path(p).parent.name, Path(p).name): e for p, e in zip(stored["paths"], stored["embeddings"])}
    same_figures(figures({p: by_name[(p.parent.name, p.name)] for p in test.paths}, test), entry["runs"])
    # ONNX export, run on onnxruntime
    onnx_file = tmp_path / "tower.onnx"
    export(export_cfg("format=onnx", f"out={onnx_file}"))
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {"images": images.numpy()})[0]
    assert np.allclose(onnx_out, own, atol=1e-4)
    same_figures(figures(dict(zip(test.paths, onnx_out)), test), entry["runs"])
    # open_clip export: the tower (the pre-BN feature); flip TTA is left to its user, as its metadata says
    out = tmp_path / "model.safetensors"
    if encoder.feature == "after":
        with pytest.raises(HandCLIPError, match="neck_feature=after"):
            export(export_cfg(f"out={out}"))
        return
    export(export_cfg(f"out={out}"))
    with safe_open(str(out), "pt") as f:
        tta = f.metadata()["tta"]
    assert tta == cfg.eval.tta
    clip = open_clip.create_model("HandCLIP-Tiny", pretrained=str(out)).eval()
    with torch.no_grad():
        got = clip.encode_image(encoder.normalize(images))
        if tta == "flip":
            got = (got + clip.encode_image(encoder.normalize(images.flip(-1)))) / 2
    same_figures(figures(dict(zip(test.paths, got.numpy())), test), entry["runs"])


def test_eval_tta_overrides_the_checkpoints_own(data, tmp_path):
    from handclip.identify.run import load_model
    from handclip.models.checkpoint import load_module
    from handclip.train import train

    cfg = tiny_cfg(data, tmp_path / "o", "trainer.max_epochs=1", "eval.tta=flip")
    train(cfg)
    best = Path(cfg.paths.output_dir) / "checkpoints" / "best.ckpt"
    assert load_module(best).encoder.tta == "flip" and load_module(best, tta="none").encoder.tta == "none"
    plain, info, _ = load_model(compose("identify", ["experiment=demo", f"ckpt_path={best}", "eval.tta=none"]))
    flip, flip_info, _ = load_model(compose("identify", ["experiment=demo", f"ckpt_path={best}"]))
    assert (plain.tta, flip.tta) == ("none", "flip") and info.fingerprint != flip_info.fingerprint


def test_resume_refuses_another_neck(data, tmp_path):
    from handclip.train import train

    cfg = tiny_cfg(data, tmp_path / "o", "trainer.max_epochs=1")
    train(cfg)
    again = tiny_cfg(data, tmp_path / "o", "trainer.max_epochs=2", "model.neck=bnneck", "ckpt_path=last")
    with pytest.raises(HandCLIPError, match="neck"):
        train(again)
