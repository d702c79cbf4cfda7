"""A gallery index: every gallery image embedded once, kept on disk and reused while nothing changed.

Layout of an index folder::

    meta.json         format, the model (what it is and the fingerprint of its weights and preprocessing),
                      the gallery folder, count, width, dtype, unreadable files
    entries.json      one [relative path, identity, size, mtime_ns] per row
    embeddings.npy    (N, D) L2-normalised embeddings (float16 by default), memory-mapped when read
    templates.npy     (I, D) in the embeddings' dtype: each identity's mean template (the L2-normalised mean of
                      its stored rows, :func:`handclip.metrics.templates.mean_templates`), identities in sorted
                      order, memory-mapped when read; recomputed whenever rows are added or removed (a
                      person's template depends on their rows only)
    (meta.json also holds the SHA-256 of entries.json, embeddings.npy and templates.npy, checked whenever the
    index is read)

Opening an index for a gallery and a model:

* same model, same weights, same files (path, size, modification time): reused, nothing decoded or embedded
  (an index written before templates existed is reused too: its templates are computed when asked for, and
  written with its next update);
* files added, changed or removed: only those are embedded, the rest is copied ("updated", and said so);
* same model but other weights (a retrained checkpoint at the same path), or another dtype: rebuilt, said so;
* made by another model or for another gallery folder: refused, unless ``overwrite`` (then rebuilt);
* a folder that is not an index: refused (never replaced);
* files that do not match the checksums in meta.json (changed on disk, even at the same size), or an index of an
  earlier format: rebuilt, said so.

A new or updated index is written to a partial folder beside it (``.<index>.partial-*``) and swapped in whole,
while the run holds the index's claim (``.<index>.lock``): another run waits for it, then reuses what it wrote,
and a partial folder left by a killed run is removed by the next.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from handclip import __version__
from handclip.errors import HandCLIPError
from handclip.identify.images import embed_files, report_failures
from handclip.identify.sources import GalleryFile
from handclip.metrics.templates import mean_templates
from handclip.models.encoder import ImageEncoder
from handclip.utils.files import atomic_write, check_writable, claimed, partial_folder, swap_in

log = logging.getLogger(__name__)

INDEX_FORMAT = 2
#: The files whose SHA-256 meta.json records (and templates.npy, when the index has it).
_CHECKED = ("entries.json", "embeddings.npy")
_TEMPLATES = "templates.npy"
_MARK = "handclip_gallery_index"
#: Keys of the model key that name how the same model ran (backend, decoding), not which model it is.
INFERENCE_SETTINGS = {"backend", "decode"}
DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclass
class GalleryIndex:
    """An opened index: embeddings (memory-mapped), and per row its file and identity."""

    path: Path
    embeddings: torch.Tensor
    files: list[str]
    identities: list[str]
    meta: dict
    status: dict = field(default_factory=dict)
    """What opening it took: ``status`` (reused, built, updated, rebuilt), ``reason``, ``embedded``, ``decoded``."""
    templates: torch.Tensor | None = None
    """(I, D) mean template of each identity (the index's dtype), in the order of :meth:`labels`' names (None: an
    index written before templates existed; :meth:`mean_templates` computes them)."""

    def labels(self) -> tuple[torch.Tensor, list[str]]:
        """(integer label per row, identity names by label), names sorted."""
        names = sorted(set(self.identities))
        number = {n: i for i, n in enumerate(names)}
        return torch.tensor([number[i] for i in self.identities], dtype=torch.long), names

    def mean_templates(self) -> torch.Tensor:
        """(I, D) the identities' mean templates: as stored, or computed from the rows (an older index)."""
        if self.templates is None:
            self.templates = mean_templates(self.embeddings, self.labels()[0])[0]
        return self.templates


@dataclass(frozen=True)
class ModelInfo:
    """What the index is built with: a description that names the model (and the backend and the decoding when they
    are not the defaults), and its fingerprint."""

    key: dict
    fingerprint: str

    @property
    def decode(self) -> str:
        """How its images are decoded: ``full`` or ``draft`` (the key names it, so the index is kept apart)."""
        return self.key.get("decode", "full")


def _entry(f: GalleryFile) -> list:
    """[relative path, identity, size, mtime_ns]; a link that leads nowhere has size -1 and the link's own time
    (its decoding fails and names it; it is tried again once it leads to a file)."""
    try:
        st = f.path.stat()
    except OSError:
        try:
            return [f.rel, f.identity, -1, f.path.lstat().st_mtime_ns]
        except OSError as err:
            raise HandCLIPError(f"cannot read gallery image {str(f.path)!r}: {err.strerror or err}") from None
    return [f.rel, f.identity, st.st_size, st.st_mtime_ns]


def check_index_path(path: Path) -> None:
    """Refuse, before any work, an index path that holds something else, or where a new index cannot be written
    (an existing index in a read-only folder may still be used)."""
    path = Path(path).expanduser().absolute()
    if path.exists() and (not path.is_dir() or not _is_index(path)):
        raise HandCLIPError(f"index path {str(path)!r} exists and is not a HandCLIP gallery index; choose another "
                            "index=PATH (it is never replaced)")
    if not path.exists():
        check_writable(path.parent, "gallery index folder (index=)")


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _read(path: Path) -> tuple[dict, list[list], np.ndarray, np.ndarray | None] | str:
    """(meta, entries, memory map, templates or None) of a complete index, or why it cannot be used (a part
    unreadable, corrupted or inconsistent)."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        if meta.get(_MARK) != INDEX_FORMAT:
            return f"it has format {meta.get(_MARK)!r} (this version reads {INDEX_FORMAT})"
        names = [*_CHECKED, *([_TEMPLATES] if _TEMPLATES in meta["sha256"] else [])]
        changed = [name for name in names if _sha256(path / name) != meta["sha256"][name]]
        if changed:
            return f"{' and '.join(changed)} changed on disk since it was written (corrupted)"
        entries = json.loads((path / "entries.json").read_text())
        emb = np.load(path / "embeddings.npy", mmap_mode="c")  # copy-on-write: writable for torch, file untouched
        ok = (emb.shape == (meta["count"], meta["dim"]) and len(entries) == meta["count"]
              and str(emb.dtype) == meta["dtype"])
        templates = np.load(path / _TEMPLATES, mmap_mode="c") if _TEMPLATES in names else None
        if templates is not None:
            ok = ok and templates.shape == (len({e[1] for e in entries}), meta["dim"]) and templates.dtype == emb.dtype
        return (meta, entries, emb, templates) if ok else "its parts do not agree"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"it is incomplete or unreadable ({type(err).__name__}: {err})"


def _is_index(path: Path) -> bool:
    try:
        return _MARK in json.loads((path / "meta.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def _why_rebuild(meta: dict, model: ModelInfo, gallery: Path, dtype: str, overwrite: bool, path: Path) -> str | None:
    """None when the index may be updated in place; a reason to rebuild it; or an error when it is foreign."""
    if meta["model"]["key"] != model.key or meta["gallery"] != str(gallery):
        old, new = meta["model"]["key"], model.key
        differs = {k for k in {*old, *new} if old.get(k) != new.get(k)}
        how = "with other inference settings" if differs <= INFERENCE_SETTINGS else "by another model"
        what = (f"{how} ({json.dumps(old)}; this run uses {json.dumps(new)})" if differs
                else f"for another gallery ({meta['gallery']})")
        if not overwrite:
            raise HandCLIPError(f"index {str(path)!r} was made {what}; pass index=ANOTHER_PATH, or overwrite=true to "
                                "replace it")
        return f"it was made {what} (overwrite=true)"
    if meta["model"]["fingerprint"] != model.fingerprint:
        return "the model's weights or preprocessing changed since it was built"
    if meta["dtype"] != dtype:
        return f"it stores {meta['dtype']}, {dtype} was asked for"
    return None


def _key(e: list) -> tuple:
    """What identifies a gallery file's content: (relative path, size, mtime_ns)."""
    return (e[0], e[2], e[3])


def open_index(path: str | Path, gallery: Path, files: list[GalleryFile], encoder: ImageEncoder, model: ModelInfo,
               device: torch.device, dtype: str = "float16", overwrite: bool = False, batch_size: int = 64,
               num_workers: int | None = None, progress: bool = True) -> GalleryIndex:
    """The index of ``files`` (a scan of ``gallery``) at ``path``: reused, updated or built (see the module).

    Opened under the index's claim, waiting for a run that holds it; an index in a folder that cannot be written
    (read-only media) is used as it is, and refused before any embedding when it would need updating."""
    if dtype not in DTYPES:
        raise HandCLIPError(f"index_dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    path = Path(path).expanduser().resolve()
    args = (path, gallery, files, encoder, model, device, dtype, overwrite, batch_size, num_workers, progress)
    if path.is_dir() and not os.access(path.parent, os.W_OK):
        return _open_index(*args)
    with claimed(path, "identify", wait=True):
        return _open_index(*args)


def _open_index(path: Path, gallery: Path, files: list[GalleryFile], encoder: ImageEncoder, model: ModelInfo,
                device: torch.device, dtype: str, overwrite: bool, batch_size: int, num_workers: int | None,
                progress: bool) -> GalleryIndex:
    entries = [_entry(f) for f in files]
    existed = path.exists()
    old, reason = None, None
    check_index_path(path)
    if path.exists():
        old = _read(path)
        if isinstance(old, str):
            old, reason = None, old
        else:
            reason = _why_rebuild(old[0], model, gallery, dtype, overwrite, path)
    current = {_key(e) for e in entries}
    reusable: dict[tuple, int] = {}  # key -> row of the old index
    skipped_before: dict[tuple, str] = {}  # unreadable files of the old index, not tried again while unchanged
    if old is not None and reason is None:
        reusable = {_key(e): row for row, e in enumerate(old[1])}
        skipped_before = {(s[0], s[1], s[2]): s[3] for s in old[0].get("skipped", []) if (s[0], s[1], s[2]) in current}
        readable = [e for e in entries if _key(e) not in skipped_before]
        if old[1] == readable and len(skipped_before) == len(old[0].get("skipped", [])):
            if skipped_before:
                log.warning("%d gallery file(s) that could not be read are still left out: %s", len(skipped_before),
                            "; ".join(skipped_before.values()))
            return _opened(path, old, {"status": "reused", "embedded": 0, "decoded": 0, "rows": len(old[1])})
    if reason:
        log.warning("rebuilding the gallery index %s: %s", path, reason)
    check_writable(path.parent, "gallery index folder (index=)")  # before embedding anything
    todo = [i for i, e in enumerate(entries) if _key(e) not in reusable and _key(e) not in skipped_before]
    embedded = embed_files(encoder, [files[i].path for i in todo], device, batch_size, num_workers, progress,
                           desc="gallery: embedding", decode=model.decode)
    failed = {todo[i]: msg for i, msg in embedded.failed}
    report_failures([(files[i].path, msg) for i, msg in failed.items()], "gallery")
    new_row = {todo[r]: n for n, r in enumerate(embedded.rows)}  # entry -> row of the new embeddings
    kept = [i for i, e in enumerate(entries) if i in new_row or _key(e) in reusable]
    if len({entries[i][1] for i in kept}) < 2:
        raise HandCLIPError(f"gallery {str(gallery)!r}: fewer than 2 identities have a readable image")
    skipped = [[*_key(entries[i]), failed[i]] for i in sorted(failed)]
    skipped += [[*k, msg] for k, msg in skipped_before.items()]
    meta = {_MARK: INDEX_FORMAT, "model": {"key": model.key, "fingerprint": model.fingerprint},
            "gallery": str(gallery), "count": len(kept), "dim": encoder.output_dim, "dtype": dtype,
            "skipped": skipped, "built": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "handclip_version": __version__}
    sources = [("new", new_row[i]) if i in new_row else ("old", reusable[_key(entries[i])]) for i in kept]
    _write(path, meta, [entries[i] for i in kept], sources, embedded.embeddings.numpy(),
           None if old is None else old[2])
    reused = sum(1 for kind, _ in sources if kind == "old")
    status = {"status": "built" if not existed else ("rebuilt" if reason else "updated"), "reason": reason,
              "embedded": len(embedded.rows), "decoded": embedded.decoded, "reused_rows": reused,
              "removed_rows": 0 if old is None or reason else len(old[1]) - reused, "rows": len(kept)}
    if status["status"] == "updated":
        log.warning("gallery index %s updated: %d image(s) embedded, %d reused, %d removed", path, status["embedded"],
                    reused, status["removed_rows"])
    return _opened(path, _read(path), status)


def _write(path: Path, meta: dict, entries: list, sources: list[tuple[str, int]], new: np.ndarray,
           old: np.ndarray | None, block: int = 65536) -> None:
    """Write the index to a temporary folder beside ``path`` and swap it in; rows are copied block by block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_folder(path)
    try:
        out = np.lib.format.open_memmap(tmp / "embeddings.npy", mode="w+", dtype=DTYPES[meta["dtype"]],
                                        shape=(len(entries), meta["dim"]))
        for start in range(0, len(sources), block):
            part = sources[start:start + block]
            for kind, array in (("new", new), ("old", old)):
                dst = np.array([start + j for j, (k, _) in enumerate(part) if k == kind], dtype=np.int64)
                if dst.size:
                    out[dst] = array[np.array([r for k, r in part if k == kind], dtype=np.int64)]
        out.flush()
        _write_templates(tmp / _TEMPLATES, out, [e[1] for e in entries], meta["dtype"], block)
        del out
        atomic_write(tmp / "entries.json", json.dumps(entries))
        meta = {**meta, "sha256": {name: _sha256(tmp / name) for name in (*_CHECKED, _TEMPLATES)}}
        atomic_write(tmp / "meta.json", json.dumps(meta, indent=2) + "\n")  # last: marks the folder complete
        swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_templates(path: Path, rows: np.ndarray, identities: list[str], dtype: str, block: int) -> None:
    """The identities' mean templates (sorted names) into ``path``, ``block`` identities at a time (a flat gallery
    has one identity per row: memory stays bounded)."""
    names = sorted(set(identities))
    number = {n: i for i, n in enumerate(names)}
    labels = np.array([number[i] for i in identities], dtype=np.int64)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=DTYPES[dtype], shape=(len(names), rows.shape[1]))
    for start in range(0, len(names), block):
        chosen = np.nonzero((labels >= start) & (labels < start + block))[0]  # in row order
        templates, _ = mean_templates(torch.from_numpy(np.asarray(rows[chosen])), torch.from_numpy(labels[chosen]))
        out[start:start + templates.shape[0]] = templates.numpy()
    out.flush()
    del out


def _opened(path: Path, read: tuple | str, status: dict) -> GalleryIndex:
    if isinstance(read, str):  # pragma: no cover - only when the disk fails between writing and reading back
        raise HandCLIPError(f"gallery index {str(path)!r} could not be read back after writing it: {read}")
    meta, entries, emb, templates = read
    return GalleryIndex(path=path, embeddings=torch.from_numpy(emb), files=[e[0] for e in entries],
                        identities=[e[1] for e in entries], meta=meta, status=status,
                        templates=None if templates is None else torch.from_numpy(templates))
