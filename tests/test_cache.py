"""Decode-once crop cache: exactness, reuse, invalidation, recovery, atomicity, parallel decoding, errors."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from open_clip.transform import image_transform_v2
from PIL import Image

from handclip.data.cache import CacheWarning, cached_crops
from handclip.data.datasets import TensorImageDataset
from handclip.data.images import ImageLoader
from handclip.errors import HandCLIPError
from handclip.models.clip import preprocess_config
from handclip.models.encoder import Normalizer

CFG = preprocess_config("HandCLIP-Tiny", None)  # 64 x 64


class CountingLoader(ImageLoader):
    """ImageLoader that counts (in this process) which files it decoded."""

    def __init__(self, cfg, fail_after: int | None = None):
        super().__init__(cfg)
        self.decoded: list[str] = []
        self.fail_after = fail_after

    def __call__(self, path):
        if self.fail_after is not None and len(self.decoded) >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.decoded.append(Path(path).name)
        return super().__call__(path)


def _save(path: Path, mode: str, size: tuple[int, int], seed: int, fmt: str | None = None) -> Path:
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    img = rgb.convert(mode) if mode != "RGBA" else Image.merge("RGBA", (*rgb.split(), rgb.getchannel(0)))
    img.save(path, fmt)
    return path


@pytest.fixture()
def images(tmp_path: Path) -> list[Path]:
    d = tmp_path / "img"
    d.mkdir()
    return [
        _save(d / "rgb.jpg", "RGB", (80, 60), 0),
        _save(d / "gray.jpg", "L", (50, 90), 1),
        _save(d / "alpha.png", "RGBA", (70, 70), 2),
        _save(d / "cmyk.jpg", "CMYK", (100, 40), 3, "JPEG"),
        _save(d / "palette.png", "P", (33, 47), 4),
        _save(d / "big.png", "RGB", (300, 200), 5),
    ]


def _expected(paths, loader) -> torch.Tensor:
    return torch.stack([loader(p) for p in paths])


def _files(cache_dir: Path, pattern: str) -> list[Path]:
    return sorted(cache_dir.rglob(pattern))


def test_rows_are_bit_identical_to_loader_and_open_clip(images, tmp_path):
    loader = ImageLoader(CFG)
    crops = cached_crops(images, loader, tmp_path / "cache", num_workers=0, progress=False)
    assert crops.dtype == torch.uint8 and crops.shape == (len(images), 3, 64, 64)
    assert torch.equal(crops, _expected(images, loader))

    normalized = Normalizer(CFG.mean, CFG.std)(crops)
    reference = image_transform_v2(CFG, is_train=False)
    for row, path in zip(normalized, images):
        with Image.open(path) as img:
            assert torch.equal(row, reference(img.convert("RGB"))), path.name

    # Served from the memory map through the dataset used for training.
    ds = TensorImageDataset(crops, list(range(len(images))))
    batch, labels = ds.__getitems__([5, 0, 3])
    assert torch.equal(batch, crops[[5, 0, 3]]) and labels.tolist() == [5, 0, 3]


def test_second_call_decodes_nothing(images, tmp_path):
    cache = tmp_path / "cache"
    first = CountingLoader(CFG)
    a = cached_crops(images, first, cache, num_workers=0, progress=False)
    assert sorted(first.decoded) == sorted(p.name for p in images)

    second = CountingLoader(CFG)
    b = cached_crops(images, second, cache, num_workers=0, progress=False)
    assert second.decoded == [] and torch.equal(a, b)
    assert len(_files(cache, "*.json")) == 1 and len(_files(cache, "*.npy")) == 1
    assert sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) > a.numel()
    # Relative paths or another spelling of the same files hit the same cache.
    third = CountingLoader(CFG)
    rel = [Path(os.path.relpath(p)) for p in images]
    assert torch.equal(cached_crops(rel, third, cache, num_workers=0, progress=False), a)
    assert third.decoded == []


def test_changed_file_is_the_only_one_redecoded(images, tmp_path):
    cache = tmp_path / "cache"
    old = cached_crops(images, ImageLoader(CFG), cache, num_workers=0, progress=False)
    old_copy = old.clone()

    _save(images[2], "RGB", (64, 90), 99, "PNG")  # new content (and size) under the same name
    st = images[2].stat()
    os.utime(images[2], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    os.utime(images[4], ns=(st.st_atime_ns, images[4].stat().st_mtime_ns + 10**9))  # touched only

    loader = CountingLoader(CFG)
    crops = cached_crops(images, loader, cache, num_workers=0, progress=False)
    assert sorted(loader.decoded) == sorted([images[2].name, images[4].name])
    assert torch.equal(crops, _expected(images, ImageLoader(CFG)))
    assert not torch.equal(crops[2], old_copy[2])
    assert torch.equal(old, old_copy)  # a tensor returned earlier (memory map) is not changed by the rebuild


def test_path_list_changes_reuse_rows_of_other_caches(images, tmp_path):
    cache = tmp_path / "cache"
    cached_crops(images[:4], ImageLoader(CFG), cache, num_workers=0, progress=False)

    added = CountingLoader(CFG)  # two files added, one removed, order changed
    paths = [images[5], images[3], images[0], images[4], images[1]]
    crops = cached_crops(paths, added, cache, num_workers=0, progress=False)
    assert sorted(added.decoded) == sorted([images[4].name, images[5].name])
    assert torch.equal(crops, _expected(paths, ImageLoader(CFG)))

    subset = CountingLoader(CFG)  # only removals, duplicates allowed: nothing to decode
    paths = [images[5], images[2], images[5]]
    crops = cached_crops(paths, subset, cache, num_workers=0, progress=False)
    assert subset.decoded == [] and torch.equal(crops, _expected(paths, ImageLoader(CFG)))


def test_changed_settings_rebuild(images, tmp_path):
    cache = tmp_path / "cache"
    cached_crops(images, ImageLoader(CFG), cache, num_workers=0, progress=False)

    for cfg in (dataclasses.replace(CFG, size=32), dataclasses.replace(CFG, interpolation="bilinear")):
        loader = CountingLoader(cfg)
        crops = cached_crops(images, loader, cache, num_workers=0, progress=False)
        assert len(loader.decoded) == len(images)
        assert torch.equal(crops, _expected(images, ImageLoader(cfg)))
    assert crops.shape[-2:] == (64, 64) and len(list(cache.iterdir())) == 3


def test_truncated_data_file_is_rebuilt(images, tmp_path):
    cache = tmp_path / "cache"
    cached_crops(images, ImageLoader(CFG), cache, num_workers=0, progress=False)
    (npy,) = _files(cache, "*.npy")
    with open(npy, "r+b") as f:
        f.truncate(npy.stat().st_size // 2)

    loader = CountingLoader(CFG)
    with pytest.warns(CacheWarning, match=npy.name):
        crops = cached_crops(images, loader, cache, num_workers=0, progress=False)
    assert len(loader.decoded) == len(images)
    assert torch.equal(crops, _expected(images, ImageLoader(CFG)))


@pytest.mark.parametrize("garbage", ["{not json", '{"format": 1}', "[]"])
def test_garbage_manifest_is_rebuilt(images, tmp_path, garbage):
    cache = tmp_path / "cache"
    cached_crops(images, ImageLoader(CFG), cache, num_workers=0, progress=False)
    (manifest,) = _files(cache, "*.json")
    manifest.write_text(garbage)

    with pytest.warns(CacheWarning, match=manifest.name):
        crops = cached_crops(images, ImageLoader(CFG), cache, num_workers=0, progress=False)
    assert torch.equal(crops, _expected(images, ImageLoader(CFG)))
    json.loads(manifest.read_text())  # rewritten


def test_manifest_not_matching_its_data_is_rebuilt(images, tmp_path):
    cache = tmp_path / "cache"
    cached_crops(images, ImageLoader(CFG), cache, num_workers=0, progress=False)
    (manifest,) = _files(cache, "*.json")
    meta = json.loads(manifest.read_text())
    meta["shape"][0] += 1
    meta["entries"].append(meta["entries"][0])
    manifest.write_text(json.dumps(meta))

    with pytest.warns(CacheWarning, match=manifest.name):
        crops = cached_crops(images, ImageLoader(CFG), cache, num_workers=0, progress=False)
    assert torch.equal(crops, _expected(images, ImageLoader(CFG)))


def test_interrupted_build_leaves_no_valid_cache(images, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        cached_crops(images, CountingLoader(CFG, fail_after=3), cache, num_workers=0, progress=False)
    assert _files(cache, "*.json") == [] and _files(cache, "*.tmp") == []

    loader = CountingLoader(CFG)
    crops = cached_crops(images, loader, cache, num_workers=0, progress=False)
    assert len(loader.decoded) == len(images)
    assert torch.equal(crops, _expected(images, ImageLoader(CFG)))


def test_interrupted_rebuild_keeps_the_previous_cache(images, tmp_path):
    cache = tmp_path / "cache"
    before = cached_crops(images, ImageLoader(CFG), cache, num_workers=0, progress=False).clone()
    _save(images[0], "RGB", (90, 90), 42, "JPEG")
    os.utime(images[0], ns=(0, images[0].stat().st_mtime_ns + 10**9))

    with pytest.raises(KeyboardInterrupt):
        cached_crops(images, CountingLoader(CFG, fail_after=0), cache, num_workers=0, progress=False)
    assert _files(cache, "*.tmp") == []

    loader = CountingLoader(CFG)
    crops = cached_crops(images, loader, cache, num_workers=0, progress=False)
    assert loader.decoded == [images[0].name]
    assert torch.equal(crops, _expected(images, ImageLoader(CFG)))
    assert torch.equal(crops[1:], before[1:]) and not torch.equal(crops[0], before[0])


def test_parallel_build_equals_serial(images, tmp_path):
    serial = cached_crops(images, ImageLoader(CFG), tmp_path / "a", num_workers=0, progress=False)
    parallel = cached_crops(images, ImageLoader(CFG), tmp_path / "b", num_workers=2, progress=True, desc="test")
    assert torch.equal(serial, parallel)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_unreadable_image_raises_handclip_error(images, tmp_path, num_workers):
    bad = tmp_path / "img" / "truncated.jpg"
    bad.write_bytes(images[0].read_bytes()[:200])
    paths = [*images[:3], bad, *images[3:]]
    with pytest.raises(HandCLIPError, match="truncated.jpg"):
        cached_crops(paths, ImageLoader(CFG), tmp_path / "cache", num_workers=num_workers, progress=False)
    assert _files(tmp_path / "cache", "*.json") == [] and _files(tmp_path / "cache", "*.tmp") == []

    with pytest.raises(HandCLIPError, match="missing.png"):
        cached_crops([tmp_path / "missing.png"], ImageLoader(CFG), tmp_path / "cache", num_workers=num_workers)


def test_empty_list(tmp_path):
    crops = cached_crops([], ImageLoader(CFG), tmp_path / "cache", progress=False)
    assert crops.shape == (0, 3, 64, 64) and crops.dtype == torch.uint8


def test_same_mtime_but_other_size_is_redecoded(images, tmp_path):
    """A file replaced by one of another size keeps its cache row only if size and mtime both match."""
    cache = tmp_path / "cache"
    cached_crops(images, ImageLoader(CFG), cache, num_workers=0, progress=False)
    target = images[5]
    st = target.stat()
    _save(target, "RGB", (120, 80), 77, "PNG")  # other content, other size
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # the old modification time
    assert target.stat().st_size != st.st_size and target.stat().st_mtime_ns == st.st_mtime_ns

    loader = CountingLoader(CFG)
    crops = cached_crops(images, loader, cache, num_workers=0, progress=False)
    assert loader.decoded == [target.name]
    assert torch.equal(crops, _expected(images, ImageLoader(CFG)))


def test_same_size_but_other_mtime_is_redecoded(images, tmp_path):
    cache = tmp_path / "cache"
    cached_crops(images, ImageLoader(CFG), cache, num_workers=0, progress=False)
    target = images[0]
    data = bytearray(target.read_bytes())
    st = target.stat()
    target.write_bytes(bytes(data))  # same bytes and size, new mtime
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))
    loader = CountingLoader(CFG)
    cached_crops(images, loader, cache, num_workers=0, progress=False)
    assert loader.decoded == [target.name]


def test_cache_keys(tmp_path):
    """A file's key is its resolved path, size and modification time; digests ignore key order."""
    from handclip.data.cache_keys import digest, file_entry, list_key

    image = tmp_path / "a.png"
    image.write_bytes(b"12345")
    path, size, mtime = file_entry(tmp_path / "." / "a.png")
    assert (path, size, mtime) == (str(image.resolve()), 5, image.stat().st_mtime_ns)
    assert digest({"a": 1, "b": [2, 3]}) == digest({"b": [2, 3], "a": 1}) != digest({"a": 1, "b": [3, 2]})
    assert len(digest("x")) == 20
    # the cache file of a list of images is named by their paths, in order
    first, second = (str(tmp_path / "a.png"), 5, 1), (str(tmp_path / "b.png"), 5, 1)
    assert list_key([first, second]) == list_key([(first[0], 9, 2), (second[0], 7, 3)])
    assert list_key([first, second]) != list_key([second, first])
    assert list_key([first]) != list_key([(str(tmp_path / "c.png"), 5, 1)])
    with pytest.raises(HandCLIPError, match=f"^cannot read image '{tmp_path / 'missing.png'}': "):
        file_entry(tmp_path / "missing.png")


def test_cache_names_are_stable_across_versions():
    """A cache folder or file name that changed would make every user's cache be decoded again: the names of
    this storage format are pinned (the values of HandCLIP 0.3, written out)."""
    from handclip.data.cache_keys import digest, folder_name, list_key, settings_of
    from handclip.models.clip import preprocess_config

    assert digest({"b": [1, 2], "a": "x"}) == "5125d018f84d57c49a8d"
    assert folder_name(2, {"size": [224, 224], "mode": "RGB"}) == "v2-20bda0d4d390602ddcfd"
    assert list_key([("/d/a.jpg", 10, 5), ("/d/b.jpg", 11, 6)]) == "4023f8147cf49e07ba7f"
    vit = settings_of(ImageLoader(preprocess_config("ViT-B-32-quickgelu", None)))
    assert vit["size"] == 224 and vit["interpolation"] == "bicubic" and vit["resize_mode"] == "shortest"
    assert folder_name(2, vit) == "v2-1d238472924061f986c9"  # ViT-B/32's crops
