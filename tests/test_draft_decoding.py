"""decode=draft: JPEGs decoded at a reduced scale (Pillow's draft mode) that keeps the short side >= 2x the model's
input (at the boundary), opt-in for identify, export format=embeddings and the API, never for training or
evaluation; an index of draft-decoded images is never reused for full decoding (or the other way round)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_preprocess, write_image
from PIL import Image

import handclip
from handclip.command_line import check_override_keys
from handclip.config import compose
from handclip.data.cache_keys import settings_of
from handclip.data.datamodule import HandDataModule
from handclip.data.images import DRAFT_MARGIN, ImageLoader, draft_side, load_rgb
from handclip.errors import HandCLIPError
from handclip.export import export
from handclip.identify import identify
from handclip.identify.embeddings_export import load_embeddings


def smooth_jpeg(path, size, seed=0, exif_rotate=False):
    """A photo-like JPEG (smooth colour field with mild noise) of ``size`` (width, height)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8), "RGB").resize(size, Image.BICUBIC)
    pixels = np.asarray(coarse).astype(np.int16) + rng.integers(-6, 6, (size[1], size[0], 3))
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    exif = Image.Exif()
    if exif_rotate:
        exif[0x0112] = 6  # rotate 90 degrees to stand upright
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, quality=90, exif=exif)
    return path


def test_draft_scale_keeps_the_short_side_at_the_boundary(tmp_path):
    cfg = tiny_preprocess()
    side = draft_side(cfg)
    assert side == DRAFT_MARGIN * 64 == 128
    # short side exactly 8 x side: decoded at 1/8, the short side is exactly side
    exact = smooth_jpeg(tmp_path / "exact.jpg", (10 * side, 8 * side))
    assert load_rgb(exact, side).size == (10 * side // 8, side)
    # one pixel less: 1/8 would go under side, so 1/4 (rounded up)
    under = smooth_jpeg(tmp_path / "under.jpg", (10 * side, 8 * side - 1))
    assert load_rgb(under, side).size == (10 * side // 4, -(-(8 * side - 1) // 4))
    # a photo just under 2 x side is not reduced at all; full decoding never is
    small = smooth_jpeg(tmp_path / "small.jpg", (3 * side, 2 * side - 1))
    assert load_rgb(small, side).size == (3 * side, 2 * side - 1)
    assert load_rgb(exact).size == (10 * side, 8 * side)
    # EXIF orientation applies after the reduction: the short side is still >= side
    turned = smooth_jpeg(tmp_path / "turned.jpg", (10 * side, 8 * side - 1), exif_rotate=True)
    assert load_rgb(turned, side).size == (-(-(8 * side - 1) // 4), 10 * side // 4)
    for path in (exact, under, small, turned):
        for size in (load_rgb(path, side).size, load_rgb(path).size):
            assert min(size) >= min(side, min(Image.open(path).size))


def test_draft_crops_are_close_to_full_ones_and_other_formats_decode_in_full(tmp_path):
    cfg = tiny_preprocess()
    full, draft = ImageLoader(cfg), ImageLoader(cfg, "draft")
    photo = smooth_jpeg(tmp_path / "photo.jpg", (1600, 1200))
    a, b = full(photo), draft(photo)
    assert a.shape == b.shape == (3, 64, 64) and a.dtype == b.dtype == torch.uint8
    diff = (a.float() - b.float()).abs()
    assert 0 < diff.mean() < 3  # not the same pixels, but close
    png = write_image(tmp_path / "photo.png", seed=1, size=(1600, 1200))
    assert torch.equal(full(png), draft(png))


def test_bad_decode_values_and_draft_where_it_is_not_allowed(tmp_path):
    with pytest.raises(HandCLIPError, match=r"^decode='fast': choose one of full, draft$"):
        ImageLoader(tiny_preprocess(), "fast")
    with pytest.raises(HandCLIPError, match=r"^decode='fast': choose one of full, draft$"):
        handclip.load(model="HandCLIP-Tiny", decode="fast")
    for command in ("train", "eval"):
        for override in ("decode=draft", "+decode=draft", "data.decode=draft", "+data.decode=draft"):
            with pytest.raises(HandCLIPError, match=rf"^{override.replace('+', '[+]')}: {command} always decodes "
                                                    "photos in full; decode=draft .* identify, export"):
                check_override_keys(command, [override])
    with pytest.raises(HandCLIPError, match=r"^decode=fast: expected one of full, draft"):
        check_override_keys("identify", ["decode=fast"])
    check_override_keys("identify", ["decode=draft"])
    check_override_keys("export", ["decode=draft"])
    with pytest.raises(HandCLIPError, match=r"^decode=draft applies to format=embeddings only"):
        export(compose("export", ["experiment=demo", f"paths.output_root={tmp_path}", "format=onnx", "decode=draft",
                                  f"out={tmp_path / 'm.onnx'}"]))
    assert not (tmp_path / "m.onnx").exists()


def test_training_and_evaluation_decode_in_full(tmp_path):
    for name in ("train", "eval"):
        assert "decode" not in compose(name, ["experiment=demo"])
    dm = HandDataModule(str(tmp_path), "dorsal_right", tiny_preprocess(), cache=False)
    assert dm.loader.decode == "full" and dm.loader.min_side is None
    # the crop cache of the data module is keyed by its settings: a draft loader's rows could never be taken
    full, draft = settings_of(ImageLoader(tiny_preprocess())), settings_of(ImageLoader(tiny_preprocess(), "draft"))
    assert "decode" not in full and draft == {**full, "decode": "draft"}


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    root = tmp_path_factory.mktemp("draft_gallery")
    for i in range(3):
        for k in range(2):
            smooth_jpeg(root / "gallery" / f"person{i}" / f"{k}.jpg", (640, 480), seed=10 * i + k)
    smooth_jpeg(root / "query" / "q.jpg", (640, 480), seed=11)
    return root


def test_an_index_of_draft_decoded_images_is_never_reused_for_full_decoding(gallery, tmp_path):
    base = ["experiment=demo", f"paths.output_root={tmp_path}", "progress=false", "num_workers=0", "threshold=0.5",
            f"gallery={gallery / 'gallery'}", f"query={gallery / 'query'}", "pictures=false"]
    runs = {d: identify(compose("identify", [*base, f"decode={d}", f"name={d}"])) for d in ("draft", "full")}
    assert runs["draft"]["model"]["decode"] == "draft" and "decode" not in runs["full"]["model"]
    assert runs["draft"]["gallery"]["index"] != runs["full"]["gallery"]["index"]
    assert runs["full"]["gallery"]["index_status"]["status"] == "built"
    again = identify(compose("identify", [*base, "decode=draft", "name=again"]))
    assert again["gallery"]["index"] == runs["draft"]["gallery"]["index"]
    assert again["gallery"]["index_status"]["status"] == "reused"
    # the same index folder given for both: the other decoding is refused, never served from it
    shared = ["index=" + runs["draft"]["gallery"]["index"], "name=shared"]
    with pytest.raises(HandCLIPError, match=r"was made with other inference settings .*\"decode\": \"draft\".*; pass "
                                            r"index="):
        identify(compose("identify", [*base, "decode=full", *shared]))
    top = {d: r["queries"][0]["top"][0]["identity"] for d, r in runs.items()}
    assert top["draft"] == top["full"]


def test_api_and_embeddings_export_with_draft_decoding(gallery, tmp_path):
    files = sorted((gallery / "gallery").rglob("*.jpg"))
    full = handclip.load(model="HandCLIP-Tiny")
    draft = handclip.load(model="HandCLIP-Tiny", decode="draft")
    assert draft.decode == "draft" and "decode='draft'" in repr(draft) and draft.model.key["decode"] == "draft"
    a, b = full.embed(files), draft.embed(files)
    cos = (a * b).sum(dim=1)
    assert (cos > 0.99).all() and not torch.equal(a, b)
    assert torch.allclose(draft.embed(files, normalize=False), draft.embed(files, normalize=False))
    out = tmp_path / "draft.npz"
    export(compose("export", ["experiment=demo", f"paths.output_root={tmp_path}", "progress=false", "num_workers=0",
                              "format=embeddings", f"images={gallery / 'gallery'}", f"out={out}", "decode=draft"]))
    written = load_embeddings(out)
    assert written["meta"]["decode"] == "draft" and written["meta"]["model"]["decode"] == "draft"
    assert np.allclose(written["embeddings"], b.numpy(), atol=1e-5)
