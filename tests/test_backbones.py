"""Other backbones (model=rn50, vit_b16, vit_l14) through every path: train, calibration, eval, identify, the crop
cache and every export, each with its own preprocessing. Tested on the tiny random-weight instances of each family
(model=tiny_rn50, tiny_vit_b16, tiny_vit_l14: src/handclip/models/model_configs/HandCLIP-Tiny-{RN,B16,L14}.json)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import eval_cfg, make_layout, quiet_overrides, tiny_cfg
from reference import brute_force_metrics

from handclip.config import compose
from handclip.data import layout
from handclip.data.datamodule import HandDataModule
from handclip.data.images import ImageLoader
from handclip.eval import evaluate
from handclip.evaluation.calibration import sidecar_path
from handclip.export import export
from handclip.identify import identify
from handclip.identify.embeddings_export import load_embeddings
from handclip.models.checkpoint import load_module
from handclip.train import train

#: config -> (open_clip architecture, the real model it stands for, crop size, family)
TINY = {
    "tiny_rn50": ("HandCLIP-Tiny-RN", "rn50", 64, "ModifiedResNet"),
    "tiny_vit_b16": ("HandCLIP-Tiny-B16", "vit_b16", 64, "VisionTransformer"),
    "tiny_vit_l14": ("HandCLIP-Tiny-L14", "vit_l14", 56, "VisionTransformer"),
}
REAL = {"rn50": "RN50-quickgelu", "vit_b16": "ViT-B-16-quickgelu", "vit_l14": "ViT-L-14-quickgelu"}


def unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


@pytest.mark.parametrize("model", sorted(REAL))
def test_the_real_backbones_are_openai_clip_towers(model):
    for name in ("train", "eval", "identify", "export"):
        cfg = compose(name, [f"model={model}"])
        assert (cfg.model.model_name, cfg.model.pretrained) == (REAL[model], "openai")
    tiny = compose("train", ["experiment=demo", f"model=tiny_{model}"]).model
    assert tiny.model_name == TINY[f"tiny_{model}"][0] and tiny.pretrained is None


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_layout(tmp_path_factory.mktemp("layout"), n_train_ids=5, n_test_ids=4, per_id=3, runs=2)


@pytest.fixture(scope="module", params=sorted(TINY))
def trained(request, data, tmp_path_factory) -> dict:
    model = request.param
    out = tmp_path_factory.mktemp(model)
    train(tiny_cfg(data, out, f"model={model}", "trainer.max_epochs=2"))
    ckpt = out / "train" / "dorsal_right" / "checkpoints" / "best.ckpt"
    return {"model": model, "out": out, "ckpt": ckpt, "module": load_module(ckpt)}


@pytest.mark.slow  # trains each tiny backbone (~2 min for the three on 2 cores)
def test_training_builds_the_family_and_calibrates(trained):
    name, _, size, family = TINY[trained["model"]]
    module = trained["module"]
    assert module.hparams.model_name == name and type(module.encoder.visual).__name__ == family
    assert module.encoder.preprocess.size == size
    assert sidecar_path(trained["ckpt"]).is_file()  # the open-set threshold, calibrated when training ended


@pytest.mark.slow
def test_the_crop_cache_holds_each_models_own_crops(trained, data):
    encoder = trained["module"].encoder
    size = TINY[trained["model"]][2]
    dm = HandDataModule(str(data), "dorsal_right", encoder.preprocess, cache=True,
                        cache_dir=str(trained["out"] / "cache"), cache_workers=0, progress=False)
    dm.prepare_data()
    dm.setup("fit")
    train_samples = layout.list_split(data, "dorsal_right", "train")
    loader = ImageLoader(encoder.preprocess)
    for i in (0, len(train_samples) - 1):
        crop = dm.train_set[i][0]
        assert crop.shape == (3, size, size) and crop.dtype == torch.uint8
        assert torch.equal(crop, loader(train_samples[i].path))


@pytest.mark.slow
def test_eval_scores_the_checkpoint_like_brute_force(trained, data, tmp_path):
    result = evaluate(eval_cfg(data, tmp_path, f"model={trained['model']}", f"ckpt_path={trained['ckpt']}"))
    (entry,) = result["entries"]
    encoder = trained["module"].encoder
    loader = ImageLoader(encoder.preprocess)
    for run, (query, gallery) in zip(entry["runs"], layout.discover_hand(data, "dorsal_right").runs):
        feats, labels = {}, {}
        for split in (query, gallery):
            samples = layout.list_split(data, "dorsal_right", split)
            with torch.no_grad():
                feats[split] = torch.cat([encoder.embed(loader(s.path).unsqueeze(0)) for s in samples])
            labels[split] = [int(s.identity) for s in samples]
        ref = brute_force_metrics(feats[query], labels[query], feats[gallery], labels[gallery])
        assert run["rank1"] == pytest.approx(ref["rank1"], abs=1e-6) and run["mAP"] == pytest.approx(ref["mAP"])
    zero = evaluate(eval_cfg(data, tmp_path / "zero", f"model={trained['model']}"))["entries"][0]
    assert zero["model_name"] == TINY[trained["model"]][0] and zero["status"] == "ok"


@pytest.mark.slow
def test_identify_ranks_by_the_checkpoints_embeddings(trained, data, tmp_path):
    test_dir = data / "train_val_test_split_dorsal_r" / "test"
    for ident in sorted(test_dir.iterdir()):
        for i, image in enumerate(sorted(ident.iterdir())):
            target = tmp_path / ("gallery" if i < 2 else "queries") / ident.name / image.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(image, target)
    result = identify(compose("identify", [
        "experiment=demo", f"model={trained['model']}", f"paths.output_root={tmp_path / 'o'}", "progress=false",
        "num_workers=0", f"gallery={tmp_path / 'gallery'}", f"query={tmp_path / 'queries'}",
        f"ckpt_path={trained['ckpt']}", "index_dtype=float32", "top_k=2", "pictures=false"]))
    encoder = trained["module"].encoder
    loader = ImageLoader(encoder.preprocess)

    def embed(path):
        with torch.no_grad():
            return unit(encoder.embed(loader(path).unsqueeze(0)).double().numpy())[0]

    gallery = [(embed(p), p.parent.name) for p in sorted((tmp_path / "gallery").rglob("*.png"))]
    assert len(result["queries"]) == 4
    for record in result["queries"]:
        q = embed(Path(record["query"]))
        best: dict[str, float] = {}
        for g, ident in gallery:
            best[ident] = max(best.get(ident, -2.0), float(q @ g))
        ranked = sorted(best.items(), key=lambda kv: -kv[1])[:2]
        assert [t["identity"] for t in record["top"]] == [i for i, _ in ranked]
        assert [t["score"] for t in record["top"]] == pytest.approx([s for _, s in ranked], abs=1e-5)


@pytest.mark.slow
def test_every_export_gives_the_checkpoints_embeddings(trained, data, tmp_path):
    import onnxruntime as ort
    import open_clip

    name = TINY[trained["model"]][0]
    encoder = trained["module"].encoder
    loader = ImageLoader(encoder.preprocess)
    images = sorted((data / "train_val_test_split_dorsal_r" / "test").rglob("*.png"))
    crops = torch.stack([loader(p) for p in images])
    with torch.no_grad():
        want = unit(encoder.embed(crops).numpy())
    common = ["experiment=demo", f"model={trained['model']}", f"ckpt_path={trained['ckpt']}", "progress=false",
              "num_workers=0", *quiet_overrides(tmp_path)[:1]]

    export(compose("export", [*common, "format=onnx", f"out={tmp_path / 'tower.onnx'}"]))  # parity-checked inside
    session = ort.InferenceSession(str(tmp_path / "tower.onnx"), providers=["CPUExecutionProvider"])
    assert np.abs(unit(session.run(None, {"images": crops.numpy()})[0]) - want).max() <= 1e-4

    export(compose("export", [*common, "format=embeddings", f"images={data / 'train_val_test_split_dorsal_r' / 'test'}",
                              f"out={tmp_path / 'emb.npz'}"]))
    emb = load_embeddings(tmp_path / "emb.npz")
    order = [images.index(Path(p)) for p in emb["paths"]]
    assert np.abs(emb["embeddings"] - want[order]).max() <= 1e-5

    export(compose("export", [*common, f"out={tmp_path / 'clip.safetensors'}"]))
    clip = open_clip.create_model(name, pretrained=str(tmp_path / "clip.safetensors")).eval()
    with torch.no_grad():
        got = clip.encode_image(encoder.normalize(crops)).numpy()
    assert np.abs(unit(got) - want).max() <= 1e-5
