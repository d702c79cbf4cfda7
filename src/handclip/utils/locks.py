"""Advisory locks that tell a live writer from a dead one, and child processes that die with their parent.

A lock is ``flock(2)`` on a file: the operating system releases it when the process holding it ends, however
it ends (``kill -9`` included). A folder that a live process writes into is locked by it; what a dead process
left behind (temporary files, half-built folders, a run folder without a checkpoint) is recognised as such and
can be cleaned up or reused. Where the file system does not support locks (some network file systems),
:attr:`Lock.held` is False and callers decide conservatively.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

#: errno values meaning "this file system cannot lock", not "somebody holds the lock".
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EBADF, errno.EINVAL}


#: Lock files open in this process. A forked child closes its copies at once: a lock belongs to its open
#: file, which a child shares, so a child (a DataLoader or decode worker) would otherwise keep it held.
_OPEN: set[int] = set()


def _close_in_child() -> None:
    for fd in _OPEN:
        with contextlib.suppress(OSError):
            os.close(fd)
    _OPEN.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


class Lock:
    """An open lock file; ``held`` is False when the file system could not lock it. Close to release."""

    def __init__(self, fd: int, held: bool):
        self.fd, self.held = fd, held
        self.remove: Path | None = None
        """A lock file removed on release (:func:`claim`)."""
        _OPEN.add(fd)

    def release(self) -> None:
        if self.fd in _OPEN:  # not in a forked child, which closed its copy already
            _OPEN.discard(self.fd)
            if self.remove is not None:  # removed while still locked: see claim()
                with contextlib.suppress(OSError):
                    self.remove.unlink()
            os.close(self.fd)  # releases the flock
        self.fd = -1

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _lock(path: Path, shared: bool, blocking: bool) -> Lock | None:
    fd = os.open(path, os.O_RDONLY) if path.is_dir() else os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    if fcntl is None:  # pragma: no cover - Windows
        return Lock(fd, held=False)
    mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if blocking else fcntl.LOCK_NB)
    try:
        fcntl.flock(fd, mode)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError as err:
        if err.errno not in _UNSUPPORTED:
            os.close(fd)
            raise
        return Lock(fd, held=False)
    return Lock(fd, held=True)


def try_lock(path: str | Path) -> Lock | None:
    """Lock ``path`` (a folder, or a file created if missing) exclusively without waiting; None when another
    process holds it."""
    return _lock(Path(path), shared=False, blocking=False)


def claim(path: str | Path, wait: bool = False) -> Lock | None:
    """Lock the file ``path`` (created) exclusively, waiting for its holder with ``wait``, else None when another
    process holds it; the file is removed when the lock is released, so a claim leaves nothing behind.

    A process that opened the file just before its holder removed it would lock a file no longer at ``path``;
    the lock is taken again until the file locked is the one at ``path``.
    """
    path = Path(path)
    while True:
        lock = _lock(path, shared=False, blocking=wait)
        if lock is None:
            return None
        if not lock.held:
            return lock
        try:
            current = os.fstat(lock.fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            current = False
        if current:
            lock.remove = path
            return lock
        lock.release()


@contextlib.contextmanager
def exclusive_lock(path: str | Path) -> Iterator[Lock]:
    """Hold an exclusive lock on ``path`` (created if missing), waiting for other holders to finish."""
    lock = _lock(Path(path), shared=False, blocking=True)
    assert lock is not None
    with lock:
        yield lock


@contextlib.contextmanager
def shared_lock(path: str | Path) -> Iterator[Lock]:
    """Hold a shared lock on ``path`` (created if missing), waiting for an exclusive holder to finish."""
    lock = _lock(Path(path), shared=True, blocking=True)
    assert lock is not None
    with lock:
        yield lock


def die_with_parent() -> None:
    """Make this (child) process end when its parent ends, also when the parent is killed with SIGKILL.

    For pool initializers: on Linux the kernel sends SIGKILL at once (``PR_SET_PDEATHSIG``); everywhere a
    daemon thread waits on the parent's sentinel (closed when the parent ends) and exits. A worker
    blocked writing results to a pipe that nobody reads any more would otherwise live for ever.
    """
    parent = multiprocessing.parent_process()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    if parent is None:
        return
    if not parent.is_alive():  # the parent died before this process could register
        os._exit(1)

    def watch() -> None:
        parent.join()
        os._exit(1)

    threading.Thread(target=watch, name="handclip-parent-watch", daemon=True).start()
