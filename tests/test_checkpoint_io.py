"""Writing checkpoints: atomic in their folder, a full disk or a kill never damages the previous checkpoint,
background writes, and the cadence of last.ckpt (by training time, by epochs, and at the end)."""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import cli_env, make_layout, run_module, tiny_cfg, tmpfs

from handclip.errors import HandCLIPError
from handclip.models.checkpoint import load_module, read_checkpoint_meta
from handclip.train import train
from handclip.training import callbacks as callbacks_mod
from handclip.training import checkpoint_io as io_mod
from handclip.training.callbacks import LastCheckpoint
from handclip.training.checkpoint_io import AtomicCheckpointIO, BackgroundCheckpointIO


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_layout(tmp_path_factory.mktemp("layout"), n_train_ids=4, per_id=4)


def temporaries(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.tmp"))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.ckpt"))}


# -- the atomic writer -------------------------------------------------------------------------
def test_atomic_write_replaces_the_file_with_ordinary_permissions(tmp_path):
    io = AtomicCheckpointIO()
    target = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"w": torch.zeros(3)}, target)
    io.save_checkpoint({"w": torch.ones(3)}, target)
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.ones(3))
    assert not temporaries(tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600


class FailingFile:
    """A file whose writes fail with ENOSPC once ``budget`` bytes were written (as on a full disk)."""

    def __init__(self, f, budget: int):
        self.f, self.budget = f, budget

    def write(self, data) -> int:
        if self.budget <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.budget -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_disk_full_names_the_folder_and_the_space_needed(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"w": torch.zeros(1000)}, target)
    before = target.read_bytes()
    monkeypatch.setattr(io_mod, "open", lambda path, mode: FailingFile(open(path, mode), 100), raising=False)
    with pytest.raises(HandCLIPError) as err:
        io.save_checkpoint({"w": torch.ones(500_000)}, target)  # 2 MB
    message = str(err.value)
    assert f"no space left in {tmp_path} to write last.ckpt" in message and "about 2 MB free" in message
    assert "last.ckpt in it is unchanged" in message and "ckpt_path=last" in message and "\n" not in message
    assert target.read_bytes() == before and not temporaries(tmp_path)


def test_other_write_errors_pass_through(tmp_path, monkeypatch):
    def broken(path, mode):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(io_mod, "open", broken, raising=False)
    with pytest.raises(PermissionError):
        AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(1)}, tmp_path / "x.ckpt")
    assert not temporaries(tmp_path)


SLOW_WRITER = """
import sys, time, torch
from handclip.training import checkpoint_io as io_mod
class Slow:
    def __init__(self, f): self.f = f
    def write(self, data):
        n = self.f.write(data); self.f.flush(); print("writing", flush=True); time.sleep(60); return n
    def __getattr__(self, name): return getattr(self.f, name)
    def __enter__(self): return self
    def __exit__(self, *exc): self.f.close()
io_mod.open = lambda path, mode: Slow(open(path, mode))
io_mod.AtomicCheckpointIO().save_checkpoint({"w": torch.ones(10)}, sys.argv[1])
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)])
def test_a_write_killed_midway_leaves_the_previous_checkpoint_and_the_next_write_cleans_up(tmp_path, sig):
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(10)}, target)
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(target)], env=cli_env(), stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        proc.send_signal(sig)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.zeros(10))
    (stale,) = temporaries(tmp_path)  # a kill leaves the partial file: nothing in the process can remove it
    assert stale.name.startswith(".last.ckpt.")
    AtomicCheckpointIO().save_checkpoint({"w": torch.ones(10)}, tmp_path / "best.ckpt")
    assert not temporaries(tmp_path)
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.zeros(10))


# -- background writes -------------------------------------------------------------------------
class RecordingIO(AtomicCheckpointIO):
    def __init__(self, delay: float = 0.0, fail: bool = False):
        super().__init__()
        self.delay, self.fail = delay, fail
        self.calls: list[tuple[float, float, float]] = []

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        start = time.perf_counter()
        time.sleep(self.delay)
        if self.fail:
            raise HandCLIPError(f"no space left in {Path(path).parent}")
        super().save_checkpoint(checkpoint, path)
        self.calls.append((start, time.perf_counter(), float(checkpoint["w"][0])))


def test_background_writes_copy_the_tensors_and_keep_one_write_in_flight(tmp_path):
    inner = RecordingIO(delay=0.2)
    io = BackgroundCheckpointIO(inner)
    weights = torch.zeros(4)
    returned = []
    for step in range(3):
        weights.fill_(step)
        io.save_checkpoint({"w": weights}, tmp_path / "last.ckpt")
        returned.append(time.perf_counter())
        weights.fill_(-1)  # the training thread goes on changing the weights
    assert threading.active_count() >= 2
    io.teardown()
    assert [value for _, _, value in inner.calls] == [0.0, 1.0, 2.0]  # each write saw its point-in-time copy
    for (_, end, _), (start, _, _), back in zip(inner.calls, inner.calls[1:], returned[1:]):
        assert end <= start and end <= back  # the next save waited for the write in flight
    assert returned[0] < inner.calls[0][1]  # ... but the first returned before its write was done
    assert float(torch.load(tmp_path / "last.ckpt", weights_only=True)["w"][0]) == 2.0


def test_a_failed_background_write_stops_the_next_save_once(tmp_path, caplog):
    inner = RecordingIO(fail=True)
    io = BackgroundCheckpointIO(inner)
    io.save_checkpoint({"w": torch.zeros(1)}, tmp_path / "best.ckpt")
    with pytest.raises(HandCLIPError, match="no space left"):
        io.save_checkpoint({"w": torch.zeros(1)}, tmp_path / "last.ckpt")
    io.teardown()  # raised once: not again
    # at teardown: raised, unless the run is already stopping on another error (then logged)
    io.save_checkpoint({"w": torch.zeros(1)}, tmp_path / "best.ckpt")
    with pytest.raises(HandCLIPError):
        io.teardown()
    io.save_checkpoint({"w": torch.zeros(1)}, tmp_path / "best.ckpt")
    with caplog.at_level(logging.ERROR), pytest.raises(ValueError, match="first"):
        try:
            raise ValueError("first")
        except ValueError:  # as Lightning tears down while it handles an error
            io.teardown()
            raise
    assert "checkpoint write failed as well" in caplog.text
    assert not list(tmp_path.iterdir())


# -- a full disk during training ---------------------------------------------------------------
@pytest.mark.parametrize("background", [True, False])
def test_disk_full_during_training_keeps_the_previous_checkpoints(data, tmp_path, monkeypatch, background):
    """The third checkpoint write (the first of the second epoch) hits a full disk: the run stops with the
    message, and best.ckpt and last.ckpt of the first epoch stay as they were, loadable and resumable."""
    opened = []
    seen: dict[str, dict[str, bytes]] = {}

    def filling(path, mode):
        path = Path(path)
        opened.append(path)
        if len(opened) == 3:
            seen["before"] = snapshot(path.parent)
            return FailingFile(open(path, mode), 4096)
        return open(path, mode)

    monkeypatch.setattr(io_mod, "open", filling, raising=False)
    cfg = tiny_cfg(data, tmp_path, "trainer.max_epochs=3", "callbacks.last_checkpoint.every_n_epochs=1",
                   f"trainer.plugins.0.background={str(background).lower()}")
    folder = Path(cfg.paths.output_dir) / "checkpoints"
    with pytest.raises(HandCLIPError, match=f"no space left in {folder} to write (best|last).ckpt.*MB free"):
        train(cfg)
    assert sorted(seen["before"]) == ["best.ckpt", "last.ckpt"]
    assert snapshot(folder) == seen["before"] and not temporaries(tmp_path)
    assert len(opened) == 3  # nothing was written after the failure
    assert load_module(folder / "best.ckpt").classes == load_module(folder / "last.ckpt").classes
    assert read_checkpoint_meta(folder / "last.ckpt")["resumable"] and read_checkpoint_meta(folder / "last.ckpt")[
        "epoch"] == 0


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs that holds a tiny run's best.ckpt and last.ckpt once, but not one more checkpoint beside them."""
    from handclip.models.module import HandCLIPModule

    module = HandCLIPModule([f"{i:07d}" for i in range(4)], "dorsal_right", model_name="HandCLIP-Tiny", pretrained=None)
    weights = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    mount = tmp_path / "disk"
    mount.mkdir()
    size_kb = (4 * weights + 1_500_000) // 1024  # best (1x) + last (3x: weights and two AdamW moments) + logs
    with tmpfs(mount, f"{size_kb}k"):
        yield mount


@pytest.mark.slow  # the CLI in a new process; in-process: test_disk_full_during_training_keeps_the_previous_checkpoints
def test_a_real_full_disk_stops_the_cli_with_one_line(data, tmp_path, small_disk):
    result = run_module("handclip.train", "experiment=demo", f"paths.data_dir={data}",
                        f"paths.output_root={small_disk}", f"paths.cache_dir={tmp_path / 'cache'}",
                        "data.progress=false", "trainer.enable_progress_bar=false", "trainer.max_epochs=4",
                        "callbacks.last_checkpoint.every_n_epochs=1")
    folder = small_disk / "train" / "dorsal_right" / "checkpoints"
    assert result.returncode == 2, result.stderr[-3000:]
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"error: no space left in {folder} to write"), last_line
    assert "MB free" in last_line and "Traceback" not in result.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["best.ckpt", "last.ckpt"]  # no temporary left
    assert read_checkpoint_meta(folder / "last.ckpt")["resumable"]
    load_module(folder / "best.ckpt")


# -- when last.ckpt and best.ckpt are written --------------------------------------------------
@pytest.mark.parametrize(("every_minutes", "every_n_epochs", "epochs", "minutes_per_epoch", "expected"), [
    (5, None, 7, 2, [2, 5, 6]),        # due after 6 and 12 minutes, and at the end
    (5, None, 3, 0.1, [2]),            # a short run writes it once, at the end
    (None, 2, 5, 2, [1, 3, 4]),        # every 2 epochs, and at the end
    (None, None, 3, 2, [2]),           # only at the end
])
def test_last_checkpoint_cadence(data, tmp_path, monkeypatch, every_minutes, every_n_epochs, epochs,
                                 minutes_per_epoch, expected):
    from handclip.models.module import HandCLIPModule

    clock = [0.0]
    monkeypatch.setattr(callbacks_mod, "_clock", lambda: clock[0])

    def epoch_start(self):  # the clock reads the end of this epoch while it runs
        clock[0] = 60 * minutes_per_epoch * (self.current_epoch + 1)

    monkeypatch.setattr(HandCLIPModule, "on_train_epoch_start", epoch_start, raising=False)
    writes: dict[str, list[int]] = {"last": [], "best": []}
    save = pl.Trainer.save_checkpoint

    def record(trainer, filepath, *args, **kwargs):  # both callbacks write through the trainer's public method
        writes[Path(filepath).stem].append(trainer.current_epoch)
        save(trainer, filepath, *args, **kwargs)

    monkeypatch.setattr(pl.Trainer, "save_checkpoint", record)
    minutes = "null" if every_minutes is None else every_minutes
    cfg = tiny_cfg(data, tmp_path, f"trainer.max_epochs={epochs}", f"callbacks.last_checkpoint.every_minutes={minutes}",
                   f"callbacks.last_checkpoint.every_n_epochs={every_n_epochs or 'null'}")
    train(cfg)
    assert writes["last"] == expected
    assert writes["best"] and writes["best"] == sorted(set(writes["best"]))  # at most once per epoch
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == epochs - 1


@pytest.mark.parametrize("kwargs", [{"every_minutes": -1}, {"every_n_epochs": 0}, {"save_weights_only": True}])
def test_bad_cadence_is_an_input_error(tmp_path, kwargs):
    # (train() gets it wrapped by Hydra's InstantiationException; unwrapping those is issue 10's)
    with pytest.raises(HandCLIPError, match="last"):
        LastCheckpoint(dirpath=str(tmp_path), **kwargs)
