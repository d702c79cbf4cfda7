"""The Python API (handclip.load): the README example as written, every input kind against the CLI's embeddings,
float ranges stated or refused, identify records equal to the command line's, and inference loads that build only
the image tower."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, cli_env, make_layout, tiny_cfg, write_image
from PIL import Image

import handclip
from handclip.config import compose
from handclip.data.images import ImageLoader
from handclip.errors import HandCLIPError
from handclip.identify import identify
from handclip.models.checkpoint import load_encoder, load_module
from handclip.models.clip import build_image_tower, create_clip
from handclip.models.encoder import zero_shot_encoder
from handclip.train import train

HAND_DIR = "train_val_test_split_dorsal_r"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 1-epoch tiny model (with its calibration) and a gallery laid out as the README example names it."""
    base = tmp_path_factory.mktemp("api")
    data = make_layout(base / "data", n_train_ids=4, n_test_ids=3, per_id=3, runs=1)
    train(tiny_cfg(data, base / "outputs", "trainer.max_epochs=1"))
    test = sorted((data / HAND_DIR / "test").iterdir())
    gallery = base / "my_gallery"
    for name, ident, suffix in (("alice", test[0], ".jpg"), ("bob", test[1], ".png"), ("carol", test[2], ".png")):
        images = sorted(ident.iterdir())
        for k, image in enumerate(images[:2]):
            target = gallery / name / (f"IMG_000{k + 1}{suffix}" if name == "alice" else f"scan_1{k + 7}{suffix}")
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.open(image).save(target)
    Image.open(sorted(test[0].iterdir())[2]).save(base / "new_photo.jpg")
    return {"base": base, "ckpt": base / "outputs" / "train" / "dorsal_right" / "checkpoints" / "best.ckpt",
            "gallery": gallery, "photo": base / "new_photo.jpg", "data": data}


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = re.split(r"\n#{2,3} ", text.split("\n### Python API\n", 1)[1])[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_import_handclip_loads_neither_torch_nor_open_clip():
    code = "import sys, handclip; print(sorted(m for m in ('torch', 'open_clip', 'omegaconf') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), check=True)
    assert done.stdout.strip() == "[]"
    assert callable(handclip.load) and handclip.HandCLIP.__name__ == "HandCLIP"


def test_readme_python_api_example_runs_as_written(trained, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(trained["base"])
    monkeypatch.setenv("HANDCLIP_CACHE", str(tmp_path / "cache"))
    exec(compile(readme_example(), "README.md (Python API)", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4  # the example's own prints: identify's command-line summary is not printed
    assert lines[0].startswith("HandCLIP(") and "'0000000'" in lines[0]  # the model and its training identities
    decision, score, top = lines[-1].split(" ", 2)
    assert decision in ("alice", "bob", "carol", "unknown") and sorted(eval(top)) == ["alice", "bob", "carol"]
    assert (tmp_path / "cache" / "identify" / "index").is_dir()  # the gallery index is kept for the next call


def test_embed_takes_paths_pil_images_and_uint8_crops_alike(trained):
    model = handclip.load(trained["ckpt"])
    files = sorted(trained["gallery"].rglob("*.*"))
    from_files = model.embed(files)
    assert from_files.shape == (len(files), model.dim) and from_files.dtype == torch.float32
    assert torch.allclose(from_files.norm(dim=1), torch.ones(len(files)), atol=1e-6)
    crops = torch.stack([ImageLoader(model.encoder.preprocess)(f) for f in files])
    reference = torch.nn.functional.normalize(load_module(trained["ckpt"]).encoder.embed(crops), dim=1)
    assert torch.allclose(from_files, reference, atol=1e-6)
    assert torch.equal(model.embed([Image.open(f) for f in files]), from_files)
    assert torch.equal(model.embed(crops), from_files)
    # one image alone: the same up to float rounding of another batch size
    assert torch.allclose(model.embed(str(files[0])), from_files[:1], atol=1e-6)
    assert torch.allclose(model.embed(crops[0]), from_files[:1], atol=1e-6)
    assert torch.allclose(model.embed(crops.float(), scale=255.0), from_files, atol=1e-6)
    assert torch.allclose(model.embed(crops.float() / 255, scale=1.0), from_files, atol=1e-6)
    # open_clip's own preprocess() output: already normalised, embedded as such
    normalised = torch.stack([model.preprocess(Image.open(f)) for f in files])
    assert torch.allclose(model.embed_normalized(normalised), from_files, atol=1e-5)


def test_float_input_needs_its_range_and_normalised_input_is_never_normalised_again(trained):
    model = handclip.load(trained["ckpt"])
    files = sorted(trained["gallery"].rglob("*.*"))[:2]
    crops = torch.stack([ImageLoader(model.encoder.preprocess)(f) for f in files])
    with pytest.raises(HandCLIPError, match=r"^float images need their range: embed\(images, scale=1.0\)"):
        model.embed(crops.float())
    with pytest.raises(HandCLIPError, match=r"must lie in \[0, 1\], these span \[0, \d+\]"):
        model.embed(crops.float(), scale=1.0)  # pixel values stated as [0, 1]: refused, not embedded 255x too large
    normalised = torch.stack([model.preprocess(Image.open(f)) for f in files])
    with pytest.raises(HandCLIPError, match="already normalised: use embed_normalized"):
        model.embed(normalised, scale=1.0)
    with pytest.raises(HandCLIPError, match="must lie in"):
        model.encoder.embed(normalised, scale=255.0)  # the encoder itself refuses too
    # the boundary: exactly 1.0 with scale 1.0 is a pixel value
    assert model.embed(torch.ones_like(crops, dtype=torch.float32), scale=1.0).shape == (2, model.dim)
    with pytest.raises(HandCLIPError, match=r"crops of shape \(3, 64, 64\)"):
        model.embed(torch.zeros((2, 3, 32, 32), dtype=torch.uint8))
    with pytest.raises(HandCLIPError, match="cannot embed a int"):
        model.embed([1, 2])


def test_unreadable_file_is_one_line_naming_it(trained, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    model = handclip.load(trained["ckpt"])
    with pytest.raises(HandCLIPError, match=f"cannot read image '{re.escape(str(bad))}'"):
        model.embed([sorted(trained["gallery"].rglob("*.*"))[0], bad])
    with pytest.raises(HandCLIPError, match="not found"):
        handclip.load(tmp_path / "missing.ckpt")
    with pytest.raises(HandCLIPError, match="needs a checkpoint path, or model=NAME"):
        handclip.load()


def test_identify_records_equal_the_command_line(trained, tmp_path):
    model = handclip.load(trained["ckpt"])
    records = model.identify(trained["photo"], trained["gallery"], top_k=2, out=tmp_path / "api")
    cfg = compose("identify", ["experiment=demo", f"paths.output_root={tmp_path / 'cli'}", "progress=false",
                               f"ckpt_path={trained['ckpt']}", f"gallery={trained['gallery']}",
                               f"query={trained['photo']}", "top_k=2", "pictures=false"])
    cli = identify(cfg)["queries"]
    assert records == cli
    assert (tmp_path / "api" / "results.json").is_file()
    assert [t["rank"] for t in records[0]["top"]] == [1, 2] and records[0]["query"] == str(trained["photo"])


def test_threshold_reads_the_calibration_levels(trained):
    import json

    model = handclip.load(trained["ckpt"])
    calibration = json.loads(trained["ckpt"].with_name("best.calibration.json").read_text())
    assert model.threshold() == calibration["threshold"]
    level = calibration["levels"][-1]
    assert model.threshold(level["target_fmr"]) == level["threshold"]
    with pytest.raises(HandCLIPError, match="has no threshold for FMR 0.5"):
        model.threshold(0.5)
    zero_shot = handclip.load(model="HandCLIP-Tiny")
    assert zero_shot.classes == []
    with pytest.raises(HandCLIPError, match="the zero-shot model has no calibrated open-set threshold"):
        zero_shot.threshold()


def test_inference_loads_build_no_text_tower_and_warn_of_no_missing_weights(trained, caplog):
    caplog.set_level(logging.WARNING)
    encoder, meta = load_encoder(trained["ckpt"])
    module = load_module(trained["ckpt"])
    assert "No pretrained weights loaded" in caplog.text  # the training module still builds both towers ...
    caplog.clear()
    encoder, meta = load_encoder(trained["ckpt"])
    handclip.load(trained["ckpt"])
    assert "No pretrained weights loaded" not in caplog.text  # ... inference loads do not
    params = {n for n, _ in encoder.named_parameters()}
    assert params == {f"visual.{n}" for n, _ in module.encoder.visual.named_parameters()}
    assert all(torch.equal(a, b) for a, b in zip(encoder.state_dict().values(), module.encoder.state_dict().values()))
    assert encoder.preprocess == module.encoder.preprocess and meta["classes"] == module.classes


def test_zero_shot_image_tower_equals_open_clips(tmp_path):
    torch.manual_seed(5)
    full = create_clip("HandCLIP-Tiny", None)
    torch.manual_seed(5)
    alone = build_image_tower("HandCLIP-Tiny")  # random weights drawn as open_clip draws them for the whole model
    assert all(torch.equal(a, b) for a, b in zip(full.visual.state_dict().values(), alone.state_dict().values()))
    from safetensors.torch import save_file

    torch.manual_seed(6)
    other = create_clip("HandCLIP-Tiny", None)
    weights = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(weights))
    loaded = zero_shot_encoder("HandCLIP-Tiny", str(weights))
    assert all(torch.equal(a, b) for a, b in zip(other.visual.state_dict().values(),
                                                 loaded.visual.state_dict().values()))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"nothing")
    with pytest.raises(HandCLIPError, match="not a PyTorch or safetensors weights file"):
        zero_shot_encoder("HandCLIP-Tiny", str(broken))


def test_api_zero_shot_equals_identify_zero_shot(tmp_path):
    folder = tmp_path / "images"
    files = [write_image(folder / f"{i}.png", seed=i) for i in range(3)]
    model = handclip.load(model="HandCLIP-Tiny", seed=42)
    torch.manual_seed(42)
    reference = zero_shot_encoder("HandCLIP-Tiny", None)
    crops = torch.stack([ImageLoader(reference.preprocess)(f) for f in files])
    assert torch.allclose(model.embed(files), torch.nn.functional.normalize(reference.embed(crops), dim=1), atol=1e-6)
    shutil.rmtree(folder)
