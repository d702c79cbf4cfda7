"""python -m handclip.export: embeddings of a folder (.npz, .safetensors) and the image tower as ONNX, with a parity
check against PyTorch on onnxruntime (CPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_module, tiny_preprocess, write_image

from handclip.config import compose
from handclip.data.images import ImageLoader
from handclip.errors import HandCLIPError
from handclip.export import export
from handclip.identify.embeddings_export import load_embeddings
from handclip.models.encoder import zero_shot_encoder
from handclip.models.fingerprint import encoder_fingerprint


def export_cfg(tmp_path: Path, *extra: str):
    return compose("export", ["experiment=demo", f"paths.output_root={tmp_path / 'o'}", "progress=false",
                              "num_workers=0", *extra])


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    for i in range(3):
        for k in range(2):
            write_image(root / f"person{i}" / f"{k}.png", seed=k, size=(40, 30), identity=i)
    write_image(root / "loose.jpg", seed=5)  # a flat file: its own entry
    return root


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_embeddings_of_a_folder_with_paths_and_identities(folder, tmp_path, suffix):
    (folder / "person0" / "broken.png").write_bytes(b"nope")
    out = tmp_path / f"emb{suffix}"
    report = export(export_cfg(tmp_path, "format=embeddings", f"images={folder}", f"out={out}"))
    assert report == {"path": str(out), "images": 7, "unreadable": 1, "dim": 64, "format": suffix[1:]}
    data = load_embeddings(out)
    assert data["identities"] == ["loose", "person0", "person0", "person1", "person1", "person2", "person2"]
    assert [Path(p).name for p in data["paths"]] == ["loose.jpg", "0.png", "1.png", "0.png", "1.png", "0.png", "1.png"]
    assert data["meta"]["unreadable"][0]["path"].endswith("broken.png") and data["meta"]["normalised"] is True
    assert data["embeddings"].dtype == np.float32 and data["embeddings"].shape == (7, 64)
    # each row is the normalised embedding of its own file (same seed, same random tiny weights)
    torch.manual_seed(42)
    encoder = zero_shot_encoder("HandCLIP-Tiny", None)
    assert data["meta"]["model"]["zero_shot"] == "HandCLIP-Tiny"
    loader = ImageLoader(tiny_preprocess())
    with torch.no_grad():
        expected = torch.nn.functional.normalize(
            torch.cat([encoder.embed(loader(p).unsqueeze(0)) for p in data["paths"]]), dim=1)
    assert np.abs(data["embeddings"] - expected.numpy()).max() < 1e-5
    with pytest.raises(HandCLIPError, match="exists; pass overwrite=true"):
        export(export_cfg(tmp_path, "format=embeddings", f"images={folder}", f"out={out}"))


def test_bad_export_requests(folder, tmp_path):
    with pytest.raises(HandCLIPError, match="format='pdf': choose one of open_clip, open_clip_dir, embeddings, onnx"):
        export(export_cfg(tmp_path, "format=pdf"))
    with pytest.raises(HandCLIPError, match="needs images=DIR"):
        export(export_cfg(tmp_path, "format=embeddings", f"out={tmp_path / 'x.npz'}"))
    with pytest.raises(HandCLIPError, match=r"expected a file name ending in \.npz or \.safetensors"):
        export(export_cfg(tmp_path, "format=embeddings", f"images={folder}", f"out={tmp_path / 'x.csv'}"))
    with pytest.raises(HandCLIPError, match="image folder .* holds no images"):
        (tmp_path / "empty").mkdir()
        export(export_cfg(tmp_path, "format=embeddings", f"images={tmp_path / 'empty'}", f"out={tmp_path / 'x.npz'}"))
    with pytest.raises(HandCLIPError, match=r"expected a file name ending in \.onnx"):
        export(export_cfg(tmp_path, "format=onnx", f"out={tmp_path / 'x.npz'}"))


def test_onnx_needs_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ImportError
    with pytest.raises(HandCLIPError, match=r"needs the 'onnx' package: pip install -e \"\.\[onnx\]\""):
        export(export_cfg(tmp_path, "format=onnx", f"out={tmp_path / 'm.onnx'}"))


@pytest.mark.slow  # a real export (~10 s) before the check
def test_onnx_that_fails_parity_is_not_written(tmp_path, monkeypatch):
    import handclip.models.onnx_export as onnx_export

    monkeypatch.setattr(onnx_export, "parity", lambda *a, **k: 0.5)
    out = tmp_path / "m.onnx"
    with pytest.raises(HandCLIPError, match=r"differs from PyTorch by 0.5 .* > 0.0001; not written"):
        export(export_cfg(tmp_path, "format=onnx", f"out={out}"))
    assert list(tmp_path.glob("*m.onnx*")) == []  # neither the file nor a temporary one


@pytest.mark.slow
def test_onnx_parity_with_pytorch_on_onnxruntime(folder, tmp_path):
    """The exported image tower gives PyTorch's L2-normalised embeddings (max abs difference <= 1e-4) on real
    crops, for any batch size; run as a user runs it."""
    import onnx
    import onnxruntime as ort

    out = tmp_path / "tower.onnx"
    result = run_module("handclip.export", "experiment=demo", "format=onnx", f"out={out}",
                        f"paths.output_root={tmp_path / 'o'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "parity_max_abs_diff=" in result.stdout and out.is_file() and not list(tmp_path.glob("*.data"))
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert '"size": 64' in props["preprocess"] and props["zero_shot"] == "HandCLIP-Tiny"
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    torch.manual_seed(42)  # the zero-shot tiny model the command built (export seeds like eval)
    encoder = zero_shot_encoder("HandCLIP-Tiny", None).eval()
    assert props["model_fingerprint"] == encoder_fingerprint(encoder)
    loader = ImageLoader(tiny_preprocess())
    crops = torch.stack([loader(p) for p in sorted(folder.rglob("*.png"))])
    for batch in (crops[:1], crops):
        got = session.run(None, {"images": batch.numpy()})[0]
        with torch.no_grad():
            want = encoder.embed(batch).numpy()
        unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
        assert np.abs(unit(got) - unit(want)).max() <= 1e-4


def test_output_file_rules_are_the_same_for_every_format(tmp_path):
    from handclip.utils.files import check_output_file

    with pytest.raises(HandCLIPError, match=r"^out=FILE is required \(one of: \.npz, \.safetensors\)$"):
        check_output_file(None, False, (".npz", ".safetensors"))
    with pytest.raises(HandCLIPError, match=r"^out='.*x\.pt': expected a file name ending in \.safetensors$"):
        check_output_file(tmp_path / "x.pt", False, (".safetensors",))
    (tmp_path / "d.onnx").mkdir()
    with pytest.raises(HandCLIPError, match=r"^out='.*d\.onnx' is a folder; expected a file name$"):
        check_output_file(tmp_path / "d.onnx", True, (".onnx",))
    (tmp_path / "e.ONNX").write_text("")
    with pytest.raises(HandCLIPError, match=r"^'.*e\.ONNX' exists; pass overwrite=true to replace it, or choose "
                                            r"another out=FILE$"):
        check_output_file(tmp_path / "e.ONNX", False, (".onnx",))
    assert check_output_file(str(tmp_path / "e.ONNX"), True, (".onnx",)) == tmp_path / "e.ONNX"
