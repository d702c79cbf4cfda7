"""Writing files and folders so that a reader never sees half of them, and refusing to overwrite by accident."""

from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from handclip.errors import HandCLIPError
from handclip.utils.locks import claim, try_lock

log = logging.getLogger(__name__)

#: Errors that mean "the file system has no room for this file".
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def slug(text: str, *, allowed: str = "A-Za-z0-9._-", sep: str = "_", lower: bool = False, default: str = "") -> str:
    """``text`` as a file or folder name: each run of characters outside ``allowed`` (a regex character class body)
    becomes ``sep``, ``sep`` at either end is dropped, ``default`` when nothing is left (the one slug helper of
    HandCLIP: identify's result and index folders and ranking pictures, the benchmark's device names)."""
    text = text.lower() if lower else text
    return re.sub(f"[^{allowed}]+", sep, text).strip(sep) or default


def is_disk_full(err: BaseException) -> bool:
    """True when ``err`` or an error it was raised from is an out-of-space ``OSError``.

    ``torch.save`` reports a failed write of a Python file object as a ``RuntimeError`` raised while handling the
    file's ``OSError``, so the chain is followed.
    """
    seen = set()
    node: BaseException | None = err
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        if isinstance(node, OSError) and node.errno in DISK_FULL:
            return True
        node = node.__cause__ or node.__context__
    return False


def printable(text: str) -> str:
    """``text`` with what cannot be shown on one line escaped as Python does (a newline as ``\\n``, a byte of a
    file name that is not UTF-8 as ``\\udcff``): file names may hold any character but ``/`` and NUL."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def free_bytes(folder: Path) -> int | None:
    """Free bytes on the file system of ``folder`` (None when that cannot be read)."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _read_umask() -> int:
    try:  # Linux: read it without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: Mode of a new file under the process's umask (mkstemp alone would make every written file private, 0600).
FILE_MODE = 0o666 & ~_read_umask()


def temp_path(directory: Path, name: str) -> Path:
    """A new, empty temporary file ``.<name>.*.tmp`` in ``directory`` (same file system as the target), with the
    permissions a plainly created file would get."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)
    return Path(tmp)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, data: bytes | str, *, durable: bool = True) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    Readers see the old file or the new one, never a mix; an interrupted write leaves no temporary
    file behind. ``durable`` flushes the data to disk before the rename.
    """
    path = Path(path)
    # surrogateescape: a file name that is not UTF-8 (read by Python as lone surrogates) is written as its bytes
    payload = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
    tmp = temp_path(path.parent, path.name)
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def swap_in(new: Path, target: Path) -> None:
    """Move the finished folder ``new`` to ``target``; an existing ``target`` is replaced only once ``new``
    is in its place (on failure the old one is put back)."""
    if not target.exists():
        new.rename(target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    old.rmdir()
    target.rename(old)
    try:
        new.rename(target)
    except OSError:
        old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def partial_folder(out: Path) -> Path:
    """A new folder ``.<out>.partial-<random>`` beside ``out`` to build it in, with the mode a plainly made folder
    gets (``mkdtemp`` would make it private, 0700, and so the output once swapped in)."""
    while True:
        tmp = out.parent / f".{out.name}.partial-{secrets.token_hex(4)}"
        with contextlib.suppress(FileExistsError):
            tmp.mkdir()
            return tmp


def clean_leftovers(out: Path, what: str) -> None:
    """Undo what a killed ``what`` run left beside ``out``: its partial folders (``.<out>.partial-*``; one locked by
    a live run is left alone), its temporary files (``.<out>.*.tmp``: call this only while holding ``out``'s
    claim, under which they are written), and the previous output that an interrupted :func:`swap_in` had moved
    aside (``.<out>.old-*``: put back when ``out`` is missing, else removed)."""
    name = glob.escape(out.name)
    for old in sorted(out.parent.glob(f".{name}.old-*")):
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
            log.info("removed %s, the previous output left by an interrupted replacement of %s", old, out)
        else:
            old.rename(out)
            log.warning("restored %s from %s, where an interrupted replacement had left it", out, old)
    for partial in sorted(out.parent.glob(f".{name}.partial-*")):
        lock = try_lock(partial)
        if lock is None:
            log.warning("%s is being written by another %s run; leaving it alone", partial, what)
            continue
        with lock:
            shutil.rmtree(partial, ignore_errors=True)
        log.info("removed %s, left by an interrupted %s run", partial, what)
    for tmp in sorted(out.parent.glob(f".{name}.*.tmp")):
        tmp.unlink(missing_ok=True)
        log.info("removed %s, left by an interrupted %s run", tmp, what)


@contextlib.contextmanager
def claimed(out: Path, what: str, wait: bool = False) -> Iterator[None]:
    """Hold ``out`` (a file or folder to write) for this run through the lock file ``.<out>.lock`` beside it, and
    remove what killed runs left there. Another run is refused while this one holds it (``wait``: waits for it).
    The lock file goes with the claim; on a file system that cannot lock, ``out`` is written unclaimed."""
    missing = [p for p in out.parents if not p.exists()]  # made here, removed again when the run writes nothing
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = claim(out.parent / f".{out.name}.lock", wait=wait)
    if lock is None:
        raise HandCLIPError(f"{str(out)!r} is being written by another {what} run that is still running; wait for it "
                            "to end, or write elsewhere")
    try:
        with lock:
            if lock.held:
                clean_leftovers(out, what)
            yield
    except BaseException:
        for folder in missing:  # innermost first; stops at one that is not empty
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished file ``tmp`` to ``out``: replacing an existing ``out`` only with ``overwrite``, else
    refusing one that appeared since the run started (a hard link never replaces; where links are not
    supported, ``out`` is checked just before the rename)."""
    if overwrite:
        os.replace(tmp, out)
        return
    try:
        os.link(tmp, out)
    except FileExistsError:
        raise HandCLIPError(f"{str(out)!r} was written by another run meanwhile; it is kept (pass overwrite=true to "
                            "replace it, or choose another name)") from None
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.EXDEV):
            raise
        if out.exists():
            raise HandCLIPError(f"{str(out)!r} was written by another run meanwhile; it is kept") from None
        os.replace(tmp, out)
        return
    tmp.unlink()


def write_file(out: Path, overwrite: bool, write: Callable[[Path], None], what: str) -> Path:
    """Write ``out`` through ``write(temporary path)`` under ``out``'s claim, then :func:`publish` it: readers never
    see half a file, a killed run's temporary file is removed by the next run, and no other run's file is
    replaced without ``overwrite``."""
    with claimed(out, what):
        tmp = temp_path(out.parent, out.name)
        try:
            write(tmp)
            publish(tmp, out, overwrite)
        finally:
            tmp.unlink(missing_ok=True)
    return out


def check_output_folder(out: Path, overwrite: bool, replaced: str, owned: Callable[[str], bool] | None = None) -> None:
    """Refuse an output folder that holds something, unless ``overwrite``.

    ``replaced`` says what ``--overwrite`` replaces (for the message). With ``owned``, ``--overwrite`` is also
    refused when the folder holds entries that ``owned(name)`` does not recognise as an earlier output.
    """
    if out.exists() and not out.is_dir():
        raise HandCLIPError(f"output {str(out)!r} exists and is not a folder")
    if not (out.is_dir() and any(out.iterdir())):
        return
    if not overwrite:
        raise HandCLIPError(f"output folder {str(out)!r} is not empty; choose an empty or new folder, or pass "
                            f"--overwrite to replace {replaced}")
    if owned is not None:
        foreign = sorted(p.name for p in out.iterdir() if not owned(p.name))
        if foreign:
            raise HandCLIPError(
                f"--overwrite replaces only {replaced}, but {str(out)!r} also holds "
                f"{', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}; choose another output folder"
            )


def check_output_file(out: str | Path | None, overwrite: bool, suffixes: tuple[str, ...]) -> Path:
    """An output file name: given, with one of ``suffixes``, not a folder, and not an existing file unless
    ``overwrite``; an error naming it otherwise."""
    if not out:
        raise HandCLIPError(f"out=FILE is required (one of: {', '.join(suffixes)})")
    out = Path(str(out)).expanduser()
    if out.suffix.lower() not in suffixes:
        raise HandCLIPError(f"out={str(out)!r}: expected a file name ending in {' or '.join(suffixes)}")
    if out.is_dir():
        raise HandCLIPError(f"out={str(out)!r} is a folder; expected a file name")
    if out.exists() and not overwrite:
        raise HandCLIPError(f"{str(out)!r} exists; pass overwrite=true to replace it, or choose another out=FILE")
    check_writable(out.parent, "the folder of out=")
    return out


def check_writable(folder: str | Path, what: str) -> None:
    """Fail at once, naming ``folder`` and ``what`` it is for, when it cannot be created or written (read-only
    file system, no permission, a file in the way). Nothing is left behind by the check."""
    folder = Path(folder).expanduser().absolute()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise HandCLIPError(f"{what} {str(folder)!r} cannot be created: {str(existing)!r} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".handclip-write-check-", dir=existing))
    except OSError as err:
        where = "" if existing == folder else f" (its nearest existing parent {str(existing)!r})"
        raise HandCLIPError(f"{what} {str(folder)!r} is not writable{where}: {err.strerror or err}; make it "
                            "writable or choose another folder") from None
