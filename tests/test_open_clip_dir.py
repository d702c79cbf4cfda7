"""export format=open_clip_dir: open_clip's own folder layout, loaded by open_clip.create_model_and_transforms
("local-dir:DIR") into the fine-tuned model and its transforms, with HandCLIP's embeddings (HandCLIP-Tiny in a plain
open_clip that never heard of it, and ViT-B/32 with random weights); and its refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from conftest import cli_env, write_image
from PIL import Image

from handclip.config import compose
from handclip.data.images import ImageLoader
from handclip.errors import HandCLIPError
from handclip.export import export
from handclip.models.checkpoint import load_encoder
from handclip.models.metadata import META_KEY, checkpoint_metadata
from handclip.models.module import HandCLIPModule
from handclip.models.open_clip_export import CONFIG_FILE, WEIGHTS_FILE, export_open_clip_dir


def write_checkpoint(path: Path, model_name: str, seed: int = 0) -> Path:
    """A HandCLIP checkpoint of ``model_name`` with random weights, laid out as training writes one."""
    torch.manual_seed(seed)
    module = HandCLIPModule(classes=["a", "b", "c"], hand="dorsal_right", model_name=model_name, pretrained=None,
                            load_pretrained=False)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "epoch": 0,
                META_KEY: checkpoint_metadata(module.encoder.preprocess, {})}, path)
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("photos")
    return [write_image(root / f"{i}.png", seed=i, size=(90, 70)) for i in range(3)] + \
        [write_image(root / "gray.png", seed=9, size=(50, 80), mode="L")]


def handclip_embeddings(ckpt: Path, photos: list[Path]) -> torch.Tensor:
    encoder, _ = load_encoder(ckpt)
    with torch.inference_mode():
        return encoder.embed(torch.stack([ImageLoader(encoder.preprocess)(p) for p in photos]))


def test_tiny_export_loads_in_a_plain_open_clip_with_handclips_embeddings(tmp_path, photos):
    ckpt = write_checkpoint(tmp_path / "best.ckpt", "HandCLIP-Tiny")
    out = tmp_path / "exported"
    report = export(compose("export", ["format=open_clip_dir", f"ckpt_path={ckpt}", f"out={out}",
                                       f"paths.output_root={tmp_path / 'o'}"]))
    assert report["path"] == str(out.absolute()) and sorted(p.name for p in out.iterdir()) == [CONFIG_FILE,
                                                                                               WEIGHTS_FILE]
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["model_cfg"]["vision_cfg"]["image_size"] == 64 and config["preprocess_cfg"]["size"] == 64
    # a fresh process that imports open_clip only: HandCLIP-Tiny is not registered there
    code = ("import sys, torch, open_clip; from PIL import Image\n"
            "assert 'HandCLIP-Tiny' not in open_clip.list_models()\n"
            "model, _, preprocess = open_clip.create_model_and_transforms('local-dir:' + sys.argv[1])\n"
            "with torch.no_grad():\n"
            "    out = model.eval().encode_image(torch.stack([preprocess(Image.open(p)) for p in sys.argv[3:]]))\n"
            "torch.save(out, sys.argv[2])\n")
    subprocess.run([sys.executable, "-c", code, str(out), str(tmp_path / "emb.pt"), *map(str, photos)],
                   env=cli_env(), check=True, capture_output=True, text=True)
    theirs = torch.load(tmp_path / "emb.pt")
    assert torch.allclose(theirs, handclip_embeddings(ckpt, photos), atol=1e-6, rtol=0)


def test_vit_b32_export_gives_the_fine_tuned_model_and_its_transforms(tmp_path, photos):
    ckpt = write_checkpoint(tmp_path / "b32.ckpt", "ViT-B-32-quickgelu", seed=1)
    out = export_open_clip_dir(ckpt, tmp_path / "b32")
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    encoder, _ = load_encoder(ckpt)
    assert all(torch.equal(a, b) for a, b in zip(model.visual.state_dict().values(),
                                                 encoder.visual.state_dict().values()))
    assert [type(t).__name__ for t in preprocess.transforms][:2] == ["Resize", "CenterCrop"]
    assert preprocess.transforms[0].size == 224 and tuple(preprocess.transforms[-1].mean) == encoder.preprocess.mean
    with torch.inference_mode():
        theirs = model.eval().encode_image(torch.stack([preprocess(Image.open(p)) for p in photos]))
    assert torch.allclose(theirs, handclip_embeddings(ckpt, photos), atol=1e-5, rtol=0)


def test_folder_rules(tmp_path):
    ckpt = write_checkpoint(tmp_path / "best.ckpt", "HandCLIP-Tiny")
    out = tmp_path / "dir"
    export_open_clip_dir(ckpt, out)
    first = (out / WEIGHTS_FILE).read_bytes()
    with pytest.raises(HandCLIPError, match="is not empty; pass overwrite=true"):
        export_open_clip_dir(ckpt, out)
    write_checkpoint(tmp_path / "other.ckpt", "HandCLIP-Tiny", seed=3)
    export_open_clip_dir(tmp_path / "other.ckpt", out, overwrite=True)  # an earlier export is replaced whole
    assert (out / WEIGHTS_FILE).read_bytes() != first
    (out / "notes.txt").write_text("mine")
    with pytest.raises(HandCLIPError, match="holds files other than"):
        export_open_clip_dir(ckpt, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(HandCLIPError, match="is a file; expected a folder"):
        export_open_clip_dir(ckpt, tmp_path / "file")
    with pytest.raises(HandCLIPError, match="needs out=DIR"):
        export_open_clip_dir(ckpt, None)
    (tmp_path / "empty").mkdir()
    assert export_open_clip_dir(ckpt, tmp_path / "empty") == (tmp_path / "empty").absolute()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
