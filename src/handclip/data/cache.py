"""Decode-once cache of preprocessed ``uint8`` crops.

Without augmentation, open_clip's eval preprocessing (resize + center crop) is a pure function of the image
file, so each image is decoded once and its crop is stored on disk. Layout under ``cache_dir``::

    v{FORMAT}-{settings hash}/        one directory per preprocessing settings (asdict(cfg) + format)
        {path-list hash}.npy          uint8 array (N, 3, H, W), row i = loader(paths[i])
        {path-list hash}.json         manifest: settings, shape, data size and one
                                      [resolved path, size, mtime_ns] entry per row

A manifest is valid only if it matches its ``.npy`` (shape, byte size, settings). A row is reused when its
entry (resolved path, size, mtime_ns) is unchanged, from the cache of the same path list or, failing that,
from any other cache with the same settings (so adding, removing or modifying one file re-decodes only what
changed). Files are written to a temporary file in the same directory and renamed with :func:`os.replace`;
the old manifest is removed before its ``.npy`` is replaced and the new manifest is written last, so an
interrupted build never leaves a pair that is read as valid. Existing ``.npy`` files are never written in
place, so tensors returned earlier (memory maps) stay intact.

A build holds a shared lock on ``.lock`` in its directory; temporary files found there while nobody holds
it were left by a killed build and are removed. Decode workers end with the process that started them,
also when it is killed with SIGKILL.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import warnings
from collections import deque
from collections.abc import Generator, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from handclip.data.cache_keys import Entry, file_entry, folder_name, list_key, settings_of
from handclip.data.images import ImageLoader
from handclip.errors import HandCLIPError
from handclip.utils.devices import usable_cpus
from handclip.utils.files import atomic_write, free_bytes, fsync_file, is_disk_full, temp_path
from handclip.utils.locks import die_with_parent, shared_lock, try_lock

log = logging.getLogger(__name__)

#: Bump when the storage layout or the meaning of a row changes: old caches are then ignored.
#: 2: rows are decoded upright by the EXIF orientation tag (version 1 ignored it).
#: 3: 16-bit and floating-point grayscale images are scaled to 8 bits (version 2 made them white).
FORMAT_VERSION = 3

#: Lock file of a cache directory, held (shared) by every build that writes there.
LOCK_NAME = ".lock"



class CacheWarning(UserWarning):
    """A cache file was unreadable or inconsistent and is rebuilt."""


def cached_crops(
    paths: Sequence[Path],
    loader: ImageLoader,
    cache_dir: str | Path,
    *,
    num_workers: int | None = None,
    progress: bool = True,
    desc: str = "images",
) -> torch.Tensor:
    """Return the uint8 crops ``(N, 3, H, W)`` of ``paths`` (row i is ``loader(paths[i])``), via a disk cache.

    Rows of files whose (resolved path, size, mtime) and preprocessing settings are unchanged are read from
    the cache; the others are decoded with ``num_workers`` processes (default: the usable cores; 0 or 1
    decodes in this process). The result is a copy-on-write memory map of the cache file: it can be indexed
    (also from DataLoader workers) without loading the whole array into memory.

    Raises :class:`HandCLIPError` naming the file if an image is missing or cannot be decoded.
    """
    settings = settings_of(loader)
    row_shape = tuple(int(s) for s in loader.cfg.input_size)
    entries = [file_entry(p) for p in paths]
    if not entries:
        return torch.empty((0, *row_shape), dtype=torch.uint8)

    directory = Path(cache_dir) / folder_name(FORMAT_VERSION, settings)
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(directory)
    key = list_key(entries)
    manifest_path = directory / f"{key}.json"

    primary = _open_cache(manifest_path, settings, row_shape)
    if primary is not None and primary[0] == entries:
        return torch.from_numpy(primary[1])

    # Which rows can be copied from existing caches (this path list first, then the others).
    wanted = set(entries)
    sources: dict[Entry, tuple[np.ndarray, int]] = {}
    caches = [primary] if primary is not None else []
    for cache in itertools.chain(caches, _other_caches(directory, manifest_path, settings, row_shape)):
        for row, entry in enumerate(cache[0]):
            if entry in wanted and entry not in sources:
                sources[entry] = (cache[1], row)
        if len(sources) == len(wanted):
            break

    log.info("%s: decoding %d of %d images into the crop cache %s", desc, len(set(entries) - set(sources)),
             len(entries), directory)
    with shared_lock(directory / LOCK_NAME):
        _build(directory, key, entries, sources, loader, settings, row_shape, num_workers, progress, desc)
    cache = _open_cache(manifest_path, settings, row_shape)
    if cache is None or cache[0] != entries:  # pragma: no cover - only on a concurrent writer or a disk fault
        raise RuntimeError(f"image cache {manifest_path} could not be read back after writing it")
    return torch.from_numpy(cache[1])


# -------------------------------------------------------------------------------------------- reading


def _open_cache(
    manifest_path: Path, settings: Any, row_shape: tuple[int, ...]
) -> tuple[list[Entry], np.ndarray] | None:
    """(entries, memory map) of a cache, or None if it is missing or invalid (invalid: warn + delete).

    The map is private copy-on-write (``mmap_mode="c"``): writable, so torch accepts it without a warning,
    while writes never reach the file.
    """
    if not manifest_path.exists():
        return None
    data_path = manifest_path.with_suffix(".npy")
    try:
        manifest = json.loads(manifest_path.read_text())
        if not isinstance(manifest, dict):
            raise ValueError("manifest is not a JSON object")
        if manifest.get("format") != FORMAT_VERSION or manifest.get("settings") != settings:
            raise ValueError("manifest written for other preprocessing settings")
        entries = [(str(p), int(s), int(m)) for p, s, m in manifest["entries"]]
        shape = (len(entries), *row_shape)
        if tuple(manifest["shape"]) != shape:
            raise ValueError(f"manifest shape {manifest['shape']} != expected {list(shape)}")
        size = data_path.stat().st_size
        if size != manifest["data_bytes"]:
            raise ValueError(f"{data_path.name} has {size} bytes, manifest says {manifest['data_bytes']}")
        array = np.load(data_path, mmap_mode="c", allow_pickle=False)
        if array.dtype != np.uint8 or array.shape != shape:
            raise ValueError(f"{data_path.name} holds {array.dtype} {array.shape}, expected uint8 {shape}")
    except (OSError, ValueError, TypeError, KeyError) as err:  # json.JSONDecodeError is a ValueError
        warnings.warn(
            f"image cache {manifest_path} / {data_path.name} is corrupt or incomplete ({err}); rebuilding it",
            CacheWarning,
            stacklevel=2,
        )
        _remove(manifest_path, data_path)
        return None
    return entries, array


def _other_caches(
    directory: Path, skip: Path, settings: Any, row_shape: tuple[int, ...]
) -> Iterator[tuple[list[Entry], np.ndarray]]:
    for manifest_path in sorted(directory.glob("*.json")):
        if manifest_path != skip:
            cache = _open_cache(manifest_path, settings, row_shape)
            if cache is not None:
                yield cache


# ------------------------------------------------------------------------------------------- building

_worker_loader: ImageLoader | None = None


def _init_worker(loader: ImageLoader) -> None:
    global _worker_loader
    die_with_parent()
    _worker_loader = loader


def _decode_chunk_in_worker(paths: list[str]) -> list[np.ndarray]:
    assert _worker_loader is not None
    # plain arrays: pickled through the pipe, no shared-memory handles
    return [_worker_loader(path).numpy() for path in paths]


def _decode_all(
    paths: list[str], loader: ImageLoader, num_workers: int | None, progress: bool, desc: str
) -> Generator[np.ndarray, None, None]:
    """Crops of ``paths`` in order, decoded in-process or by a process pool.

    Only a few chunks are in flight at a time, so an error (or the consumer stopping) cancels the
    rest cleanly: a ``multiprocessing.Pool`` terminated with a full task pipe can hang for ever.
    """
    workers = min(usable_cpus() if num_workers is None else num_workers, len(paths))
    bar = tqdm(total=len(paths), desc=f"decoding {desc}", unit="img", disable=not progress)
    try:
        if workers <= 1:
            for path in paths:
                yield loader(path).numpy()
                bar.update()
        else:
            size = max(1, min(64, len(paths) // (workers * 8)))
            chunks = iter([paths[i:i + size] for i in range(0, len(paths), size)])
            with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(loader,)) as pool:
                pending = deque(pool.submit(_decode_chunk_in_worker, c) for c in itertools.islice(chunks, 2 * workers))
                try:
                    while pending:
                        crops = pending.popleft().result()
                        following = next(chunks, None)
                        if following is not None:
                            pending.append(pool.submit(_decode_chunk_in_worker, following))
                        for crop in crops:
                            yield crop
                            bar.update()
                except BaseException:
                    for future in pending:
                        future.cancel()
                    raise
    finally:
        bar.close()


def _build(
    directory: Path,
    key: str,
    entries: list[Entry],
    sources: dict[Entry, tuple[np.ndarray, int]],
    loader: ImageLoader,
    settings: Any,
    row_shape: tuple[int, ...],
    num_workers: int | None,
    progress: bool,
    desc: str,
) -> None:
    """Write ``{key}.npy`` (reused + newly decoded rows) then ``{key}.json``, each atomically."""
    rows_of: dict[Entry, list[int]] = {}
    for row, entry in enumerate(entries):
        rows_of.setdefault(entry, []).append(row)
    missing = [entry for entry in rows_of if entry not in sources]

    shape = (len(entries), *row_shape)
    data_path = directory / f"{key}.npy"
    manifest_path = directory / f"{key}.json"
    data_tmp = temp_path(directory, data_path.name)
    try:
        out = np.lib.format.open_memmap(data_tmp, mode="w+", dtype=np.uint8, shape=shape)
        _reserve(data_tmp, directory, len(entries))
        for entry, rows in rows_of.items():
            if entry in sources:
                array, src_row = sources[entry]
                out[rows] = array[src_row]
        crops = _decode_all([e[0] for e in missing], loader, num_workers, progress, desc)
        with contextlib.closing(crops):  # stops the pool and the progress bar at once, also on errors
            for entry, crop in zip(missing, crops):
                if crop.dtype != np.uint8 or crop.shape != row_shape:
                    raise RuntimeError(f"loader gave {crop.dtype} {crop.shape} for {entry[0]!r}, not uint8 {row_shape}")
                out[rows_of[entry]] = crop
        out.flush()
        del out
        fsync_file(data_tmp)
        manifest = {
            "format": FORMAT_VERSION,
            "settings": settings,
            "shape": list(shape),
            "data_bytes": data_tmp.stat().st_size,
            "entries": [list(e) for e in entries],
        }
        # The old manifest goes first: at no time does a manifest describe a .npy it was not written for.
        manifest_path.unlink(missing_ok=True)
        os.replace(data_tmp, data_path)
        atomic_write(manifest_path, json.dumps(manifest))
    finally:
        data_tmp.unlink(missing_ok=True)


def _reserve(path: Path, directory: Path, images: int) -> None:
    """Allocate every block of the memory-mapped ``path`` now: on a full disk, writing a page of a sparse mapping
    kills the process (SIGBUS) with no message; reserving first gives one clear error instead."""
    size = path.stat().st_size
    try:
        with open(path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, size)
    except OSError as err:
        if not is_disk_full(err):
            raise
        free = free_bytes(directory)
        free_text = f"{free / 1e6:,.0f} MB free" if free is not None else "free space unknown"
        raise HandCLIPError(
            f"no space left in {directory} for the crop cache of {images} images: it needs {size / 1e6:,.0f} MB "
            f"({free_text}); nothing was lost. Free space there, or put the cache elsewhere with data.cache_dir=DIR "
            "(data.cache=false decodes the images every epoch instead)") from None


def _remove_stale_temporaries(directory: Path) -> None:
    """Remove the temporary files of builds that were killed (found while no build holds the lock)."""
    if not any(directory.glob(".*.tmp")):
        return
    lock = try_lock(directory / LOCK_NAME)
    if lock is None:
        return  # a build is running: its temporary files are not stale
    with lock:
        if not lock.held:
            return  # this file system cannot tell; leave them
        stale = sorted(directory.glob(".*.tmp"))
        _remove(*stale)
        log.info("removed %d temporary file(s) left in %s by an interrupted cache build", len(stale), directory)


def _remove(*paths: Path) -> None:
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass
