"""Writing checkpoints: atomic in their own folder, optionally in a background thread, and a full disk said plainly.

Lightning's ``TorchCheckpointIO`` serialises a checkpoint into memory and lets fsspec stage it in ``$TMPDIR`` and
move it over the target, which is a copy whenever ``$TMPDIR`` is on another file system: a full disk (or a kill)
during that copy leaves a truncated ``last.ckpt``. Here a
checkpoint is written to a temporary file ``.<name>.*.tmp`` in the checkpoint folder, flushed to disk and renamed
over the target: readers see the previous file or the new one, never a part. When the disk fills, the temporary file
is removed, the previous checkpoint stays as it was and the run stops with a :class:`HandCLIPError` naming the
folder and the space needed. Temporary files left by a killed run are removed by the next write into the folder.

:class:`BackgroundCheckpointIO` does what Lightning's ``AsyncCheckpointIO`` does (a point-in-time copy of the tensors on
the training thread, the file written in a worker thread) with its own executor, a bounded queue and errors raised
once.
"""

from __future__ import annotations

import logging
import os
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from pytorch_lightning.plugins.io import CheckpointIO, TorchCheckpointIO

from handclip.errors import HandCLIPError
from handclip.utils.files import free_bytes, is_disk_full, temp_path

log = logging.getLogger(__name__)

MB = 1e6


def checkpoint_nbytes(checkpoint: Any) -> int:
    """Bytes of the tensor data in a checkpoint (each storage once): about the size of the file."""
    seen: dict[int, int] = {}

    def visit(node: Any) -> None:
        if isinstance(node, torch.Tensor):
            storage = node.untyped_storage()
            seen[storage.data_ptr() or id(storage)] = storage.nbytes()
        elif isinstance(node, dict):
            for value in node.values():
                visit(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                visit(value)

    visit(checkpoint)
    return sum(seen.values())


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (where the platform allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def disk_full_message(path: Path, needed: int, free: int | None) -> str:
    folder = path.parent
    kept = sorted(p.name for p in folder.glob("*.ckpt"))
    free_text = f"{free / MB:,.0f} MB free" if free is not None else "free space unknown"
    kept_text = f"{', '.join(kept)} in it {'is' if len(kept) == 1 else 'are'} unchanged" if kept else "nothing was lost"
    return (
        f"no space left in {folder} to write {path.name}: it needs about {needed / MB:,.0f} MB free ({free_text}) "
        f"while the previous file is kept; {kept_text}. Free space there (or train elsewhere with "
        "paths.output_root=DIR) and continue with ckpt_path=last."
    )


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file in the checkpoint's folder, ``fsync``, then ``os.replace`` over the target.

    ``durable=False`` skips the ``fsync`` calls (faster, but a power cut may lose the newest checkpoint).
    """

    def __init__(self, durable: bool = True):
        super().__init__()
        self.durable = durable
        self._checked: set[Path] = set()

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        path = Path(path)
        folder = path.parent
        folder.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temporaries(folder)
        tmp = temp_path(folder, path.name)
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                if self.durable:
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as err:
            tmp.unlink(missing_ok=True)
            if isinstance(err, (OSError, RuntimeError)) and is_disk_full(err):
                needed = checkpoint_nbytes(checkpoint)
                raise HandCLIPError(disk_full_message(path, needed, free_bytes(folder))) from err
            raise
        if self.durable:
            _fsync_folder(folder)

    def _remove_stale_temporaries(self, folder: Path) -> None:
        """Temporary checkpoint files of an earlier, killed process (once per folder: this one writes serially)."""
        key = folder.resolve()
        if key in self._checked:
            return
        self._checked.add(key)
        for stale in sorted(folder.glob(".*.ckpt.*.tmp")):
            log.warning("removing %s, a partly written checkpoint left by an interrupted run", stale)
            stale.unlink(missing_ok=True)


class BackgroundCheckpointIO(CheckpointIO):
    """Checkpoints written by a worker thread of its own, at most one write in flight, a failed write raised once.

    What Lightning's ``AsyncCheckpointIO`` does, on Lightning's public ``CheckpointIO`` interface (this class owns its
    executor instead of reaching into that one's). The training thread pays for a point-in-time copy of the tensors;
    the file is written by the worker thread. A new write first waits for the one in flight, so at most one extra copy
    of a checkpoint is held however slow the disk. A write that failed stops the run at the next checkpoint or at the
    end of training (teardown waits for the last write); while the run is already stopping on another error it is
    logged instead, so that the first error is the one reported.
    """

    def __init__(self, checkpoint_io: CheckpointIO) -> None:
        self.checkpoint_io = checkpoint_io
        # made on the first write and shut down by teardown (which also runs between trainer.fit and trainer.test)
        self._executor: ThreadPoolExecutor | None = None
        self._in_flight: Future | None = None
        self._error: BaseException | None = None

    def wait(self) -> None:
        """Block until the write in flight, if any, has finished; raise its error (once)."""
        if self._in_flight is not None:
            self._in_flight.result()
            self._in_flight = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        self.wait()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="handclip-checkpoint")
        copy = apply_to_collection(checkpoint, torch.Tensor, lambda t: t.detach().clone())
        self._in_flight = self._executor.submit(self._write, copy, path, storage_options)

    def _write(self, checkpoint: dict[str, Any], path, storage_options: Any | None) -> None:
        try:
            self.checkpoint_io.save_checkpoint(checkpoint, path, storage_options=storage_options)
        except BaseException as err:  # raised on the training thread by wait()
            self._error = err

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        self.wait()  # a checkpoint this run is still writing is read once it is complete
        return self.checkpoint_io.load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def remove_checkpoint(self, path) -> None:
        self.checkpoint_io.remove_checkpoint(path)

    def teardown(self) -> None:
        stopping_on = sys.exc_info()[1]  # teardown also runs while the trainer handles another error
        try:
            self.wait()
        except BaseException as err:
            if stopping_on is None:
                raise
            log.error("a checkpoint write failed as well: %s", err)
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            self.checkpoint_io.teardown()


def checkpoint_io(background: bool = True, durable: bool = True):
    """The checkpoint writer of a HandCLIP run (``trainer.plugins``): atomic in the folder, in the background or not."""
    io = AtomicCheckpointIO(durable=durable)
    return BackgroundCheckpointIO(io) if background else io
