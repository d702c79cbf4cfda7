"""Faults and bad input (issue 10): real photos, kills and crashes, runs that cannot be finished, and errors
that must come out as one ``error:`` line."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import (
    ROOT,
    cli_env,
    fake_checkpoint,
    make_layout,
    run_module,
    tiny_cfg,
    tiny_preprocess,
    tmpfs,
    write_image,
)
from PIL import Image

from handclip.data import cache as cache_mod
from handclip.data import images as images_mod
from handclip.data import layout
from handclip.data.cache import cached_crops
from handclip.data.images import MAX_ASPECT_RATIO, ImageLoader, load_rgb
from handclip.data.split import prepare_dataset
from handclip.errors import HandCLIPError, error_message, exit_on_error
from handclip.hands import hand_dir_name
from handclip.models.module import HandCLIPModule
from handclip.run_folder import RunComplete, resolve_ckpt_path
from handclip.train import train

# -- 1. EXIF orientation -----------------------------------------------------------------------
#: What a viewer shows for each EXIF orientation value, written out from the EXIF specification
#: (row 0 / column 0 of the stored pixels is ...): numpy operations on the stored (H, W, 3) array.
UPRIGHT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],                    # mirrored left-right
    3: lambda a: a[::-1, ::-1],                 # rotated 180
    4: lambda a: a[::-1, :],                    # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),          # mirrored along the main diagonal
    6: lambda a: a.transpose(1, 0, 2)[:, ::-1],  # stored rotated 90 counter-clockwise: turn clockwise
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # mirrored along the anti-diagonal
    8: lambda a: a.transpose(1, 0, 2)[::-1, :],  # stored rotated 90 clockwise: turn counter-clockwise
}


def _with_orientation(path, orientation: int, size=(6, 4)) -> np.ndarray:
    """Write a PNG of distinct pixels tagged with ``orientation``; return its stored pixels."""
    pixels = np.arange(size[0] * size[1] * 3, dtype=np.uint8).reshape(size[1], size[0], 3)
    img = Image.fromarray(pixels, "RGB")
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, exif=exif)
    return pixels


@pytest.mark.parametrize("orientation", sorted(UPRIGHT))
def test_exif_orientation_is_applied(tmp_path, orientation):
    stored = _with_orientation(tmp_path / "photo.png", orientation)
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "photo.png")), UPRIGHT[orientation](stored))


def test_images_without_orientation_decode_as_before(tmp_path):
    """No tag: exactly Pillow's own decode (also of a JPEG with other EXIF data)."""
    path = write_image(tmp_path / "plain.jpg", seed=3, size=(50, 30))
    exif = Image.Exif()
    exif[0x010F] = "camera maker"  # Make, no Orientation
    Image.open(path).save(tmp_path / "exif.jpg", exif=exif)
    for p in (path, tmp_path / "exif.jpg"):
        with Image.open(p) as img:
            assert np.array_equal(np.asarray(load_rgb(p)), np.asarray(img.convert("RGB")))


def test_cache_of_an_earlier_version_is_not_reused_for_oriented_photos(tmp_path, monkeypatch):
    """A cache written before orientation was applied (format 1) is ignored: the crop comes out upright."""
    path = tmp_path / "img" / "photo.png"
    path.parent.mkdir()
    _with_orientation(path, 6, size=(90, 60))
    upright = ImageLoader(tiny_preprocess())(path)

    def old_load_rgb(p, min_side=None):  # what format 1 did: no EXIF orientation (nor draft decoding)
        with Image.open(p) as img:
            return img.convert("RGB")

    with monkeypatch.context() as patch:
        patch.setattr(cache_mod, "FORMAT_VERSION", 1)
        patch.setattr(images_mod, "load_rgb", old_load_rgb)
        old = cached_crops([path], ImageLoader(tiny_preprocess()), tmp_path / "cache", num_workers=0, progress=False)
    assert not torch.equal(old[0], upright)
    assert torch.equal(cached_crops([path], ImageLoader(tiny_preprocess()), tmp_path / "cache", num_workers=0,
                                    progress=False)[0], upright)


# -- 2. degenerate shapes ----------------------------------------------------------------------
@pytest.mark.parametrize("size", [(10000, 1), (1, 3000), (MAX_ASPECT_RATIO * 20 + 1, 20)])
def test_degenerate_aspect_ratio_is_refused_before_resizing(tmp_path, size, monkeypatch):
    path = tmp_path / "strip.png"
    Image.new("RGB", size, (200, 120, 90)).save(path)
    resized = []
    monkeypatch.setattr(Image.Image, "resize", lambda self, *a, **k: resized.append(self.size))
    with pytest.raises(HandCLIPError, match=rf"strip.png.*{size[0]} x {size[1]}.*{MAX_ASPECT_RATIO}:1"):
        ImageLoader(tiny_preprocess())(path)
    assert resized == []


def test_aspect_ratio_at_the_bound_is_read(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("RGB", (MAX_ASPECT_RATIO * 20, 20), (200, 120, 90)).save(path)
    assert ImageLoader(tiny_preprocess())(path).shape == (3, 64, 64)


def test_too_many_pixels_is_refused_unread(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    Image.new("RGB", (400, 300), (1, 2, 3)).save(path)
    monkeypatch.setattr(images_mod, "MAX_PIXELS", 400 * 300 - 1)
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded an image over the bound"))
    with pytest.raises(HandCLIPError, match=r"huge.png.*400 x 300.*megapixels"):
        load_rgb(path)


# -- 3. broken symlinked images ----------------------------------------------------------------
def test_broken_image_links_are_an_error_naming_them(tmp_path):
    root = make_layout(tmp_path / "data", n_train_ids=3)
    train = root / hand_dir_name("dorsal_right") / "train"
    images = sorted(train.rglob("*.png"))
    for image in images[:3]:
        image.unlink()
        image.symlink_to(tmp_path / "gone" / image.name)
    with pytest.raises(HandCLIPError, match=r"3 broken link\(s\).*0000000/Hand_\w+\.png -> .*gone"):
        layout.list_split(root, "dorsal_right", "train")


def test_a_broken_identity_folder_link_is_an_error(tmp_path):
    root = make_layout(tmp_path / "data", n_train_ids=3)
    identity = root / hand_dir_name("dorsal_right") / "train" / "0000001"
    shutil.rmtree(identity)
    identity.symlink_to(tmp_path / "elsewhere" / "0000001")
    with pytest.raises(HandCLIPError, match=r"1 broken link\(s\).*0000001 -> "):
        layout.list_split(root, "dorsal_right", "train")


def test_working_links_are_read(tmp_path):
    root = make_layout(tmp_path / "data", n_train_ids=3)
    train = root / hand_dir_name("dorsal_right") / "train"
    image = sorted(train.rglob("*.png"))[0]
    target = tmp_path / "store" / image.name
    target.parent.mkdir()
    image.rename(target)
    image.symlink_to(target)
    assert image in [s.path for s in layout.list_split(root, "dorsal_right", "train")]


# -- 4. HandInfo.csv that is not UTF-8 ---------------------------------------------------------
@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    from handclip.data.synthetic import generate_dataset

    out = tmp_path_factory.mktemp("faults") / "raw"
    generate_dataset(out, subjects=8, images_per_aspect=2, seed=1, size=(64, 48), workers=1)
    return out


def _copy_raw(raw, dst):
    shutil.copytree(raw, dst)
    return dst


@pytest.mark.parametrize("encoding", ["latin-1", "cp1252", "utf-16", "utf-8-sig"])
def test_hand_info_in_other_encodings_is_read(raw, tmp_path, encoding, caplog):
    from handclip.data.split import read_hand_info

    expected = read_hand_info(raw)
    copy = _copy_raw(raw, tmp_path / "raw")
    text = (raw / "HandInfo.csv").read_text(encoding="utf-8").replace(",medium,", ",médium – ½,", 3)
    if encoding == "latin-1":
        text = text.replace("–", "-")  # not in Latin-1
    (copy / "HandInfo.csv").write_bytes(text.encode(encoding))
    assert read_hand_info(copy) == expected
    if encoding in ("latin-1", "cp1252"):
        assert re.search(r"HandInfo.csv is not UTF-8 \(line \d+ has byte\(s\) [0-9a-f]{2}\)", caplog.text)


def test_hand_info_that_the_csv_reader_refuses_names_the_line(raw, tmp_path):
    from handclip.data.split import read_hand_info

    copy = _copy_raw(raw, tmp_path / "raw")
    lines = (raw / "HandInfo.csv").read_bytes().split(b"\n")
    lines[3] = lines[3] + b"," + b"x" * 200_000  # beyond the csv module's field size limit
    (copy / "HandInfo.csv").write_bytes(b"\n".join(lines))
    with pytest.raises(HandCLIPError, match=r"HandInfo.csv: line 4: not a readable CSV line"):
        read_hand_info(copy)


# -- 5. a killed cache build -------------------------------------------------------------------
SLOW_BUILD = """
import sys, time
from pathlib import Path
from handclip.data.cache import cached_crops
from handclip.data.images import ImageLoader
from handclip.models.clip import preprocess_config

class SlowLoader(ImageLoader):
    def __call__(self, path):
        time.sleep(0.3)
        return super().__call__(path)

paths = sorted(Path(sys.argv[1]).glob("*.png"))
cached_crops(paths, SlowLoader(preprocess_config("HandCLIP-Tiny", None)), sys.argv[2], num_workers=2, progress=False)
"""


def _proc_state(pid: int) -> tuple[str, int] | None:
    """(state letter, parent pid) of a live process, None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[0], int(fields[1])


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            state = _proc_state(int(entry.name))
            if state is not None and state[1] == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    """False once the process has ended: gone, or a zombie whose threads have all exited (so its files are closed;
    the main thread of a multi-threaded process turns zombie before the others have finished)."""
    state = _proc_state(pid)
    if state is None:
        return False
    try:
        threads = len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return False
    return state[0] not in ("Z", "X") or threads > 1


def _wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to follow the decode workers")
@pytest.mark.parametrize("sig", [signal.SIGKILL, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)])
def test_killed_cache_build_leaves_no_worker_and_no_temporary(tmp_path, sig):
    for i in range(40):
        write_image(tmp_path / "img" / f"{i:02d}.png", seed=i, size=(80, 60))
    cache = tmp_path / "cache"
    build = subprocess.Popen([sys.executable, "-c", SLOW_BUILD, str(tmp_path / "img"), str(cache)], env=cli_env())
    workers: list[int] = []
    try:
        workers = _wait_for(lambda: len(_children(build.pid)) >= 2 and _children(build.pid), 60, "2 decode workers")
        _wait_for(lambda: list(cache.rglob("*.npy.*.tmp")), 30, "the cache's temporary file")
        time.sleep(0.5)  # the workers are decoding
        build.send_signal(sig)
        build.wait(timeout=30)
        _wait_for(lambda: not any(_alive(w) for w in workers), 10, f"decode workers {workers} to end")
    finally:
        for pid in [*workers, build.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        build.wait(timeout=30)
    assert list(cache.rglob("*.tmp")), "the killed build should have left its temporary file"

    paths = sorted((tmp_path / "img").glob("*.png"))
    crops = cached_crops(paths, ImageLoader(tiny_preprocess()), cache, num_workers=0, progress=False)
    assert torch.equal(crops, torch.stack([ImageLoader(tiny_preprocess())(p) for p in paths]))
    assert not list(cache.rglob("*.tmp")), "the next run removes the stale temporary files"


def test_temporaries_of_a_live_build_are_kept(tmp_path):
    """Only a build that is no longer running leaves stale temporaries: a live one's (it holds the lock) stay."""
    from handclip.utils.locks import shared_lock

    images = [write_image(tmp_path / "img" / f"{i}.png", seed=i) for i in range(3)]
    cached_crops(images[:1], ImageLoader(tiny_preprocess()), tmp_path / "cache", num_workers=0, progress=False)
    directory = next((tmp_path / "cache").iterdir())
    live = directory / ".0123.npy.abcd.tmp"
    with shared_lock(directory / cache_mod.LOCK_NAME):  # another build is running
        live.write_bytes(b"half a cache")
        cached_crops(images[1:], ImageLoader(tiny_preprocess()), tmp_path / "cache", num_workers=0, progress=False)
        assert live.exists()
    cached_crops(images, ImageLoader(tiny_preprocess()), tmp_path / "cache", num_workers=0, progress=False)
    assert not live.exists()


@pytest.fixture(params=["tmpfs", "injected"])
def full_cache_disk(request, tmp_path, monkeypatch):
    """A cache folder with room for one small cache, not for a large one: a real 1 MB tmpfs where mounting is
    allowed (skipped where it is refused), and ENOSPC injected into the space reservation."""
    folder = tmp_path / "cache"
    folder.mkdir()
    if request.param == "injected":
        real = os.posix_fallocate

        def fallocate(fd, offset, length):
            if length > 1_000_000:
                raise OSError(28, "No space left on device")
            return real(fd, offset, length)

        monkeypatch.setattr(cache_mod.os, "posix_fallocate", fallocate)
        yield folder
        return
    with tmpfs(folder, "1m"):
        yield folder


def test_a_full_disk_while_caching_is_one_error_and_loses_nothing(tmp_path, full_cache_disk):
    """Writing the pages of a sparse memory map on a full disk kills the process (SIGBUS) with no message: the
    cache reserves its space first. A cache already there is kept; no temporary file is left."""
    images = [write_image(tmp_path / "img" / f"{i:03d}.png", seed=i, size=(64, 64)) for i in range(120)]
    small = cached_crops(images[:4], ImageLoader(tiny_preprocess()), full_cache_disk, num_workers=0, progress=False)
    folder = next(p for p in full_cache_disk.iterdir() if p.is_dir())
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(HandCLIPError) as full:
        cached_crops(images, ImageLoader(tiny_preprocess()), full_cache_disk, num_workers=0, progress=False)
    assert re.fullmatch(
        rf"no space left in {re.escape(str(folder))} for the crop cache of 120 images: it needs 1 MB \([\d,]+ MB "
        r"free\); nothing was lost. Free space there, or put the cache elsewhere with data.cache_dir=DIR \(data.cache="
        r"false decodes the images every epoch instead\)", str(full.value)), str(full.value)
    assert sorted(p.name for p in folder.iterdir()) == before  # no temporary file left
    again = cached_crops(images[:4], ImageLoader(tiny_preprocess()), full_cache_disk, num_workers=0, progress=False)
    assert torch.equal(again, small)  # the earlier cache still opens


# -- 6. a killed prepare; 13. the output root's mode -------------------------------------------
SLOW_PREPARE = """
import sys, time
from handclip.data.split import prepare_dataset, write

link = write._Linker.__call__
def slow(self, src, dst):
    time.sleep(0.02)
    link(self, src, dst)
write._Linker.__call__ = slow
prepare_dataset(sys.argv[1], sys.argv[2], runs=2)
"""


def test_killed_prepare_leaves_a_partial_folder_that_the_next_run_removes(raw, tmp_path, caplog):
    out = tmp_path / "splits"
    run = subprocess.Popen([sys.executable, "-c", SLOW_PREPARE, str(raw), str(out)], env=cli_env())
    try:
        partial = _wait_for(lambda: list(tmp_path.glob(".splits.partial-*")), 60, "the partial folder")[0]
        _wait_for(lambda: any(partial.rglob("*.jpg")), 30, "images in the partial folder")
        run.send_signal(signal.SIGKILL)
    finally:
        run.kill()
        run.wait(timeout=30)
    assert partial.is_dir() and not out.exists()

    with caplog.at_level(logging.INFO):
        prepare_dataset(raw, out, runs=2)
    assert not partial.exists() and (out / "split_info.json").is_file()
    assert f"removed {partial}, left by an interrupted prepare run" in caplog.text
    assert list(tmp_path.iterdir()) == [out]


def test_a_partial_folder_in_use_is_left_alone(raw, tmp_path, caplog):
    from handclip.utils.locks import try_lock

    live = tmp_path / ".splits.partial-live"
    live.mkdir()
    with try_lock(live) as lock:
        assert lock.held
        prepare_dataset(raw, tmp_path / "splits", runs=2)
        assert live.is_dir() and "being written by another prepare run" in caplog.text


def test_an_interrupted_replacement_is_undone(raw, tmp_path, caplog):
    """Killed between moving the old output aside and moving the new one in: the old one is put back."""
    out = tmp_path / "splits"
    prepare_dataset(raw, out, runs=2)
    moved = tmp_path / ".splits.old-x1y2"
    out.rename(moved)
    with pytest.raises(HandCLIPError, match="not empty"):
        prepare_dataset(raw, out, runs=3)
    assert (out / "split_info.json").is_file() and not moved.exists()
    assert json.loads((out / "split_info.json").read_text())["runs"] == 2
    assert f"restored {out} from {moved}" in caplog.text


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_prepared_output_root_follows_the_umask(raw, tmp_path, umask):
    previous = os.umask(umask)
    try:
        prepare_dataset(raw, tmp_path / "splits", runs=2)
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "splits").stat().st_mode) == 0o777 & ~umask


# -- 8. read-only output, cache or checkpoint folder -------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_layout(tmp_path_factory.mktemp("layout"), hands=("dorsal_right", "palmar_left"), n_train_ids=4)


@pytest.mark.parametrize("setting, override, what", [
    ("paths.output_dir", "paths.output_root={ro}/outputs", "output folder"),
    ("data.cache_dir", "paths.cache_dir={ro}/cache", "image cache folder"),
    ("callbacks.last_checkpoint.dirpath", "callbacks.last_checkpoint.dirpath={ro}/ckpt", "checkpoint folder"),
])
def test_unwritable_folder_is_refused_before_any_work(data, tmp_path, read_only, monkeypatch, setting, override,
                                                      what):
    from handclip import train as train_mod

    monkeypatch.setattr(train_mod, "_fit", lambda *a: pytest.fail("work started"))
    cfg = tiny_cfg(data, tmp_path / "out", override.format(ro=read_only))
    with pytest.raises(HandCLIPError, match=rf"{what} \({re.escape(setting)}\) '{read_only}/.*' is not writable.*"
                                            "Read-only file system"):
        train_mod.train(cfg)
    assert not (tmp_path / "out" / "train").exists()


@pytest.mark.slow  # the CLI in a new process; in-process: test_unwritable_folder_is_refused_before_any_work
def test_cli_read_only_output_root_gives_one_line(data, tmp_path, read_only):
    result = run_module("handclip.train", "experiment=demo", f"paths.data_dir={data}",
                        f"paths.output_root={read_only}/outputs", f"paths.cache_dir={tmp_path / 'cache'}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert _error_lines(result.stderr) == [
        f"error: output folder (paths.output_dir) '{read_only}/outputs/train/dorsal_right' is not writable (its "
        f"nearest existing parent '{read_only}'): Read-only file system; make it writable or choose another folder"]
    assert "Traceback" not in result.stderr and not (tmp_path / "cache").exists()


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_writability_check_leaves_nothing_behind(tmp_path):
    from handclip.utils.files import check_writable

    check_writable(tmp_path / "a" / "b", "output folder")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(HandCLIPError, match=r"output folder '.*/file/sub' cannot be created: '.*/file' is a file"):
        check_writable(tmp_path / "file" / "sub", "output folder")


# -- 9. ckpt_path=auto and sweeps that go on ---------------------------------------------------
def test_ckpt_path_auto(tmp_path):
    run = tmp_path / "train" / "dorsal_right"
    assert resolve_ckpt_path("auto", run, 5) is None  # no folder: start afresh
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("an attempt that wrote no checkpoint\n")
    assert resolve_ckpt_path("auto", run, 5) is None
    last = fake_checkpoint(run / "checkpoints" / "last.ckpt", epochs=3)
    assert resolve_ckpt_path("auto", run, 5) == last.resolve()
    with pytest.raises(RunComplete, match=r"already complete .*trained 3 epoch\(s\), trainer.max_epochs=3"):
        resolve_ckpt_path("auto", run, 3)
    with pytest.raises(RunComplete):
        resolve_ckpt_path("auto", run, 2)  # more epochs than asked for: complete as well
    last.rename(run / "checkpoints" / "best.ckpt")
    with pytest.raises(HandCLIPError, match="holds best.ckpt but no last.ckpt to resume from"):
        resolve_ckpt_path("auto", run, 5)


def test_make_train_uses_ckpt_path_auto():
    target = re.search(r"^train:.*\n\t(.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert target and "ckpt_path=auto" in target.group(1) and "-m hand=$(HANDS)" in target.group(1)


@pytest.mark.slow
def test_failed_sweep_goes_on_and_completes_when_run_again(tmp_path):
    data = make_layout(tmp_path / "data", hands=("dorsal_right", "palmar_left"), n_train_ids=4)
    palmar_train = data / hand_dir_name("palmar_left") / "train"
    shutil.move(palmar_train, tmp_path / "palmar_train")  # palmar_left cannot train
    common = ["experiment=demo", f"paths.data_dir={data}", f"paths.output_root={tmp_path / 'out'}",
              f"paths.cache_dir={tmp_path / 'cache'}", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
              "trainer.enable_model_summary=false", "data.progress=false", "ckpt_path=auto"]
    first = run_module("handclip.train", "-m", "hand=palmar_left,dorsal_right", *common)
    assert first.returncode == 2, first.stderr[-3000:]
    assert re.search(r"^error: \[hand=palmar_left\] split folder .*train' not found", first.stderr, re.M)
    assert "sweep summary: 1 of 2 job(s) finished\n  hand=palmar_left: FAILED: split folder" in first.stderr
    assert "\n  hand=dorsal_right: ok\n" in first.stderr and "Traceback" not in first.stderr
    done = tmp_path / "out" / "train" / "dorsal_right" / "checkpoints" / "last.ckpt"
    finished = done.stat().st_mtime_ns

    shutil.move(tmp_path / "palmar_train", palmar_train)
    again = run_module("handclip.train", "-m", "hand=palmar_left,dorsal_right", *common)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "dorsal_right: already complete" in again.stdout + again.stderr
    assert done.stat().st_mtime_ns == finished
    assert (tmp_path / "out" / "train" / "palmar_left" / "checkpoints" / "best.ckpt").is_file()


# -- 10. runs that stopped without a checkpoint ------------------------------------------------
@pytest.mark.parametrize("epochs", [0, -1])
def test_max_epochs_below_one_is_a_config_error(data, tmp_path, epochs):
    with pytest.raises(HandCLIPError, match=rf"trainer.max_epochs must be a whole number of at least 1, got {epochs}"):
        train(tiny_cfg(data, tmp_path, f"trainer.max_epochs={epochs}"))
    assert not (tmp_path / "train").exists()


def test_folder_of_a_run_stopped_without_checkpoint_is_reused(data, tmp_path, monkeypatch, caplog):
    original = HandCLIPModule.forward
    with monkeypatch.context() as patch:
        patch.setattr(HandCLIPModule, "forward", lambda self, images: original(self, images) * float("nan"))
        with pytest.raises(HandCLIPError, match="loss became nan at global step 0") as stopped:
            train(tiny_cfg(data, tmp_path, "trainer.max_epochs=2"))
    assert "trainer.precision=32-true" not in str(stopped.value)  # 13: fp32 already
    run_dir = tmp_path / "train" / "dorsal_right"
    assert not list(run_dir.rglob("*.ckpt")) and (run_dir / "config.yaml").is_file()

    with caplog.at_level(logging.INFO):
        train(tiny_cfg(data, tmp_path, "trainer.max_epochs=1"))
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert len(list(run_dir.glob("config.no-checkpoint-*.yaml"))) == 1 and (run_dir / "config.yaml").is_file()
    assert sorted(p.name for p in (run_dir / "logs").iterdir()) == ["version_0", "version_1"]
    # 13: the best score is logged as a number
    assert re.search(r"best checkpoint: .*best.ckpt \(val/rank1=\d\.\d{4}\)", caplog.text), caplog.text


def test_nan_hint_suggests_fp32_only_when_not_in_fp32():
    module = HandCLIPModule(classes=["a", "b"], hand="dorsal_right", model_name="HandCLIP-Tiny", pretrained=None)
    module.forward = lambda images: torch.full((len(images), 2), float("nan"))
    batch = (torch.zeros(2, 3, 64, 64, dtype=torch.uint8), torch.tensor([0, 1]))
    for precision, hinted in (("bf16-mixed", True), ("16-mixed", True), ("32-true", False), ("32", False)):
        module._trainer = None
        module.training_step(batch, 3)  # the loss is checked later, without a host sync per step
        module._trainer = SimpleNamespace(precision=precision)
        with pytest.raises(HandCLIPError, match=r"at global step 0 \(epoch 0, batch 3\)") as stopped:
            module.on_validation_start()
        assert ("trainer.precision=32-true" in str(stopped.value)) == hinted, precision


# -- 11. errors raised while Hydra instantiates objects ----------------------------------------
def test_errors_wrapped_by_hydra_instantiate_give_one_line(capsys):
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    @exit_on_error
    def entry():
        instantiate({"_target_": "handclip.models.module.HandCLIPModule", "classes": ["a", "b"],
                     "hand": "dorsal_right", "model_name": "HandCLIP-Tiny", "pretrained": None, "lr": -1})

    with pytest.raises(InstantiationException):
        entry.__wrapped__()  # what Hydra raises
    with pytest.raises(SystemExit) as stopped:
        entry()
    assert stopped.value.code == 2
    assert capsys.readouterr().err == "error: model.lr must be a positive number, got -1\n"


@pytest.mark.parametrize(("module", "args", "message"), [
    ("handclip.train", ["hand=dorsal_up"], "error: unknown hand type 'dorsal_up'; expected one of: dorsal_right, "
                                           "dorsal_left, palmar_right, palmar_left"),
    ("handclip.train", ["-m", "hand=dorsal_right,palmr_left"], "error: unknown hand type 'palmr_left'"),
    ("handclip.eval", ["trainer=dpp"], "error: trainer=dpp: no such trainer config; expected one of: cpu, ddp, "
                                       "default, gpu"),
    ("handclip.eval", ["metrics.rank=[1]"], "error: metrics.rank=[1]: no such key in the eval config; did you mean "
                                            "metrics.ranks? (a new key is added with +metrics.rank=[1])"),
])
def test_unknown_config_option_gives_one_line(tmp_path, module, args, message):
    """A config group option that does not exist (Hydra alone: a multi-line report, exit status 1)."""
    result = run_module(module, *args, f"paths.output_root={tmp_path / 'out'}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(message) and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()  # stopped before anything was written


@pytest.mark.parametrize(("module", "mistake", "message"), [
    ("handclip.train", "trainer=dpp", "error: trainer=dpp: no such trainer config"),
    ("handclip.eval", "trainer=dpp", "error: trainer=dpp: no such trainer config"),
    ("handclip.identify", "top_kk=3", "error: top_kk=3: no such key in the identify config; did you mean top_k?"),
    ("handclip.export", "fromat=onnx", "error: fromat=onnx: no such key in the export config; did you mean format?"),
])
def test_a_mistyped_option_is_answered_before_torch_loads(tmp_path, module, mistake, message):
    """The command line is checked before torch, Lightning and open_clip are imported (seconds each)."""
    probe = ("import runpy, sys\n"
             "try:\n"
             f"    runpy.run_module({module!r}, run_name='__main__')\n"
             "except SystemExit as stop:\n"
             "    print(stop.code, [m for m in ('torch', 'pytorch_lightning', 'open_clip') if m in sys.modules])\n")
    result = subprocess.run([sys.executable, "-c", probe, mistake], cwd=tmp_path, env=cli_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["2", "[]"], result.stderr[-2000:]
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1


def test_group_options_are_checked_against_the_config_folders():
    from handclip.command_line import check_group_options

    check_group_options(["hand=dorsal_right,palmar_left", "trainer=ddp", "experiment=demo", "model=null",
                         "trainer.max_epochs=3", "hand=glob(*)", "launcher=slurm", "+callbacks.x._target_=y"])
    check_group_options(["--config-dir=/extra", "hand=my_own_hand"])  # extra configs: left to Hydra
    with pytest.raises(HandCLIPError, match="model=vit_b23: no such model config; expected one of: rn50, tiny, "
                                            "tiny_rn50, tiny_vit_b16, tiny_vit_l14, vit_b16, vit_b32, vit_l14$"):
        check_group_options(["model=vit_b23"])


def test_override_keys_are_checked_against_the_composed_config():
    from handclip.command_line import check_override_keys

    # keys of the config once the command line's group choices are composed (trainer=ddp adds num_nodes)
    check_override_keys("train", ["-m", "trainer=ddp,cpu", "trainer.num_nodes=2", "trainer.max_epochs=1,2",
                                  "experiment=demo", "model.pretrained=null", "data.batch_size=4", "hand=glob(*)",
                                  "callbacks.last_checkpoint.dirpath=/x", "--cfg", "job"])
    check_override_keys("eval", ["metrics.ranks.2=20", "verification.fmr_levels=[0.1]"])
    # appends, deletions, Hydra's own settings and other configs: Hydra's to judge
    check_override_keys("train", ["+new=1", "++trainer.new=2", "~logger", "hydra.run.dir=/x", "hydra/launcher=basic"])
    check_override_keys("train", ["-cn", "mine", "its_own_key=1"])
    with pytest.raises(HandCLIPError, match=r"^trainer.num_nodes=2: no such key in the train config \(a new key is "
                                            r"added with \+trainer.num_nodes=2\)$"):
        check_override_keys("train", ["trainer.num_nodes=2"])
    for typo, meant in [("trainer.max_epoch", "trainer.max_epochs"), ("trainr.max_epochs", "trainer.max_epochs"),
                        ("sed", "seed")]:
        with pytest.raises(HandCLIPError, match=rf"^{typo}=3: no such key in the train config; did you mean {meant}\?"):
            check_override_keys("train", [f"{typo}=3"])
    with pytest.raises(HandCLIPError, match=r"^metrics.ranks.3=1: no such key in the eval config \(a new key"):
        check_override_keys("eval", ["metrics.ranks.3=1"])
    with pytest.raises(HandCLIPError, match=r"^bogus=1: no such key in the identify config \("):
        check_override_keys("identify", ["top_k=3", "bogus=1"])


def test_other_errors_keep_their_traceback():
    @exit_on_error
    def entry():
        raise ValueError("a bug, not an input error")

    with pytest.raises(ValueError, match="a bug"):
        entry()


@pytest.mark.slow
def test_cli_train_without_weights_offline_gives_the_readme_message(data, tmp_path):
    result = run_module("handclip.train", "experiment=demo", "model=vit_b32", f"paths.data_dir={data}",
                        f"paths.output_root={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}",
                        "data.progress=false", HF_HUB_OFFLINE="1")
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = _error_lines(result.stderr)
    assert "could not load pretrained weights 'openai'" in line and "model.pretrained=/path/to/file" in line
    assert "Traceback" not in result.stderr and "Error in call to target" not in result.stderr


# -- 12. raw tracebacks ------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"lr": -1e-5}, "model.lr must be a positive number, got -1e-05"),
    ({"lr": 0}, "model.lr must be a positive number, got 0"),
    ({"lr": "fast"}, "model.lr must be a positive number, got 'fast'"),
    ({"weight_decay": -0.01}, "model.weight_decay must be a non-negative number, got -0.01"),
    ({"weight_decay": float("nan")}, "model.weight_decay must be a non-negative number, got nan"),
])
def test_bad_optimiser_settings(kwargs, message):
    with pytest.raises(HandCLIPError, match=f"^{re.escape(message)}$"):
        HandCLIPModule(classes=["a", "b"], hand="dorsal_right", model_name="HandCLIP-Tiny", pretrained=None, **kwargs)


@pytest.mark.parametrize("setting", ["num_workers", "cache_workers"])
def test_negative_worker_counts(data, setting):
    from handclip.data.datamodule import HandDataModule

    with pytest.raises(HandCLIPError, match=rf"data.{setting} must be a whole number >= 0 .*got -1"):
        HandDataModule(str(data), "dorsal_right", tiny_preprocess(), cache=False, **{setting: -1})


@pytest.fixture(scope="module")
def tiny_clip_file(tmp_path_factory) -> Path:
    from handclip.models.clip import create_clip

    path = tmp_path_factory.mktemp("weights") / "tiny_clip.pt"
    torch.save(create_clip("HandCLIP-Tiny", None).state_dict(), path)
    return path


def _weights_error(model_name: str, weights: Path) -> str:
    from handclip.models.clip import create_clip

    with pytest.raises(HandCLIPError) as refused:
        create_clip(model_name, str(weights))
    message = error_message(refused.value)
    assert "\n" not in message and len(message) < 500, message
    return message


def test_pretrained_file_that_is_empty_or_not_weights(tmp_path, tiny_clip_file):
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    assert f"pretrained weights file '{empty}' is empty" in _weights_error("HandCLIP-Tiny", empty)
    text = tmp_path / "notes.bin"
    text.write_text("not weights")
    assert f"'{text}' is not a PyTorch or safetensors weights file" in _weights_error("HandCLIP-Tiny", text)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(tiny_clip_file.read_bytes()[:4096])
    assert "not a PyTorch or safetensors weights file, or a damaged one" in _weights_error("HandCLIP-Tiny", truncated)

    from handclip.models.clip import create_clip

    assert create_clip("HandCLIP-Tiny", str(tiny_clip_file)) is not None  # the file they were cut from loads


def test_pretrained_file_of_another_architecture_names_it(tiny_clip_file):
    message = _weights_error("ViT-B-32-quickgelu", tiny_clip_file)
    assert message == (
        f"pretrained weights file '{tiny_clip_file}' holds a ViT image tower with patch 8, width 128, 3 layers, 64 px "
        "input, but ViT-B-32-quickgelu has a ViT image tower with patch 32, width 768, 12 layers, 224 px input; it "
        "fits HandCLIP-Tiny: set model.model_name to one of them")


def test_training_checkpoint_passed_as_pretrained_weights(tmp_path, tiny_clip_file):
    from handclip.models.clip import create_clip

    module = HandCLIPModule(classes=["a", "b"], hand="palmar_left", model_name="HandCLIP-Tiny", pretrained=None)
    ckpt = tmp_path / "best.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, ckpt)
    with pytest.raises(HandCLIPError, match=r"is a HandCLIP training checkpoint \(model 'HandCLIP-Tiny', hand "
                                            r"'palmar_left'\).*handclip.eval ckpt_path="):
        create_clip("HandCLIP-Tiny", str(ckpt))


def test_checkpoint_whose_weights_are_another_model(tmp_path):
    from handclip.models.checkpoint import load_module

    module = HandCLIPModule(classes=["a", "b"], hand="dorsal_right", model_name="HandCLIP-Tiny", pretrained=None)
    ckpt = tmp_path / "best.ckpt"
    torch.save({"state_dict": module.state_dict(),
                "hyper_parameters": {**module.hparams, "model_name": "ViT-B-32-quickgelu"}}, ckpt)
    with pytest.raises(HandCLIPError) as refused:
        load_module(ckpt)
    assert error_message(refused.value) == (
        f"checkpoint '{ckpt}' says it holds model 'ViT-B-32-quickgelu', but its weights are a ViT image tower with "
        "patch 8, width 128, 3 layers, 64 px input; it was altered or written by another program")


def test_bad_image_in_a_dataloader_worker_gives_one_line(tmp_path, capsys):
    """cache=false with DataLoader workers: torch folds the worker's traceback into the message; one line is printed."""
    from torch.utils.data import DataLoader

    from handclip.data.datasets import ImageDataset

    good = [write_image(tmp_path / f"{i}.png", seed=i) for i in range(3)]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not a jpeg")
    dataset = ImageDataset([*good, bad], [0, 1, 2, 3], ImageLoader(tiny_preprocess()))
    batches = iter(DataLoader(dataset, batch_size=1, num_workers=2))

    @exit_on_error
    def entry():
        for _ in batches:
            pass

    try:
        with pytest.raises(SystemExit) as stopped:
            entry()
    finally:
        # Stop the workers now, as the iterator's own __del__ does. Left to a later garbage collection (the
        # exception's frames keep the iterator in a cycle), torch's iterator loses its queues first and then
        # waits 5 s for each worker: 10 s spent in whichever test comes next.
        batches._shutdown_workers()
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: cannot read image '{bad}': "), err


@pytest.mark.parametrize("command", ["prepare", "synth"])
def test_read_only_out_of_prepare_and_synth(raw, read_only, command, capsys):
    from handclip import prepare, synth

    args = ["--out", str(read_only / "out")] + (["--raw", str(raw)] if command == "prepare" else ["--subjects", "2"])
    with pytest.raises(SystemExit) as stopped:
        (prepare if command == "prepare" else synth).main(args)
    assert stopped.value.code == 2
    assert _error_lines(capsys.readouterr().err) == [
        f"error: output folder (--out) '{read_only}/out' is not writable (its nearest existing parent '{read_only}'): "
        "Read-only file system; make it writable or choose another folder"]


def _wait_in_child(started, finish) -> None:
    started.set()
    finish.wait(30)


def test_a_forked_child_does_not_keep_a_lock(tmp_path):
    """A DataLoader or decode worker forked while a run holds its folder's lock does not hold it after the run."""
    import multiprocessing

    from handclip.utils.locks import try_lock

    lock = try_lock(tmp_path / ".lock")
    fork = multiprocessing.get_context("fork")
    started, finish = fork.Event(), fork.Event()
    child = fork.Process(target=_wait_in_child, args=(started, finish))
    child.start()
    try:
        assert started.wait(30)  # the child runs (its at-fork handlers are done)
        assert try_lock(tmp_path / ".lock") is None  # held by this process
        lock.release()
        again = try_lock(tmp_path / ".lock")
        assert again is not None and again.held, "the child kept the lock"
        again.release()
    finally:
        finish.set()
        child.join(30)


def test_eval_refuses_an_unwritable_output_folder(data, tmp_path, read_only):
    from conftest import eval_cfg

    from handclip.eval import evaluate

    with pytest.raises(HandCLIPError, match=rf"output folder \(paths.output_dir\) '{read_only}/out/eval/.*' is not "
                                            "writable"):
        evaluate(eval_cfg(data, read_only / "out", f"paths.cache_dir={tmp_path / 'cache'}"))
    assert not (tmp_path / "cache").exists()


def test_other_ranks_neither_claim_nor_write_the_run_folder(tmp_path, monkeypatch):
    """Processes of rank > 0 of a multi-process run share rank 0's folder: no lock taken, no config written."""
    from omegaconf import OmegaConf
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    from handclip.run_folder import LOCK_NAME, claim_run_folder, save_config
    from handclip.utils.locks import try_lock

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("rank 0's\n")
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    with try_lock(run / LOCK_NAME), claim_run_folder(run):  # rank 0 holds it
        save_config(OmegaConf.create({"a": 1}), run, resumed=False)
    assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME, "config.yaml"]
    assert (run / "config.yaml").read_text() == "rank 0's\n"
