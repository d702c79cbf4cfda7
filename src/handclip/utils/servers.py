"""A local web server in a child process: started on a free loopback port, waited for, ended with its children.

Used by the browser and load tests and by the app benchmark (``python -m handclip.app`` in a process of its own,
as a user runs it). The child leads a process group of its own and dies with its parent (``PR_SET_PDEATHSIG``):
leaving the block, an exception, or the parent's death end the server and whatever it started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from handclip.errors import HandCLIPError
from handclip.utils.locks import die_with_parent

#: Addresses a test or benchmark server may listen on: nothing leaves the machine.
LOOPBACK = ("127.0.0.1", "::1", "localhost")


@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT/
    port: int
    process: subprocess.Popen
    log: Path  # the server's stdout and stderr

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (the server may still lose it to another process: :func:`local_server`
    then tries another)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def answers(url: str, timeout: float = 2.0) -> bool:
    """Whether ``url`` answers a GET with a status below 500."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status < 500
    except urllib.error.HTTPError as e:
        return e.code < 500
    except (OSError, ValueError):
        return False


def stop(process: subprocess.Popen, grace: float = 10.0) -> None:
    """End ``process`` and its process group: SIGTERM, then SIGKILL after ``grace`` seconds."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError, PermissionError):  # also what it started and left behind
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@contextlib.contextmanager
def local_server(command: Callable[[int], list[str]], log: Path, *, host: str = "127.0.0.1",
                 env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 240.0,
                 path: str = "/", attempts: int = 3) -> Iterator[Server]:
    """Run ``command(port)`` on a free ``port`` of ``host`` (loopback only) until the block ends.

    Waits until ``http://host:port{path}`` answers (at most ``timeout`` seconds); a server that exits first is
    an error naming its exit status and the end of its log, except a port taken meanwhile: then another port
    is tried (``attempts`` in all).
    """
    if host not in LOOPBACK:
        raise HandCLIPError(f"local_server: host {host!r} is not a loopback address ({', '.join(LOOPBACK)})")
    log.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, attempts + 1):
        port = free_port(host)
        name = f"[{host}]" if ":" in host else host
        with open(log, "ab") as out:
            process = subprocess.Popen(command(port), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=env, cwd=cwd, start_new_session=True, preexec_fn=die_with_parent)
        server = Server(f"http://{name}:{port}/", port, process, log)
        try:
            _wait(server, path, timeout)
        except _PortTaken:
            stop(process)
            if attempt == attempts:
                raise HandCLIPError(f"the server found its port taken {attempts} times: {server.log_tail(5)}") from None
            continue
        except BaseException:
            stop(process)
            raise
        try:
            yield server
        finally:
            stop(process)
        return


class _PortTaken(Exception):
    pass


def _wait(server: Server, path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    url = server.url.rstrip("/") + path
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            tail = server.log_tail()
            if "address already in use" in tail.lower() or "cannot find empty port" in tail.lower():
                raise _PortTaken
            raise HandCLIPError(f"the server exited with status {server.process.returncode} before answering "
                                f"{url}; its log ({server.log}) ends:\n{tail}")
        if answers(url):
            return
        time.sleep(0.25)
    raise HandCLIPError(f"the server did not answer {url} within {timeout:.0f} s; its log ({server.log}) ends:\n"
                        f"{server.log_tail()}")
