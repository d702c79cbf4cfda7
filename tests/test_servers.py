"""The server process of the browser and load tests (handclip.utils.servers): on loopback, waited for, and
gone with everything it started when the block ends, however it ends."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from handclip.errors import HandCLIPError
from handclip.utils.servers import answers, free_port, local_server


def http_server(folder: Path, grandchild_pid: Path | None = None):
    """python -m http.server on the given port; with ``grandchild_pid``, it first starts a sleeping child of its
    own (its pid written there) that only the process group's end reaches."""
    def command(port: int) -> list[str]:
        serve = f"{sys.executable} -m http.server --bind 127.0.0.1 --directory {folder} {port}"
        if grandchild_pid is None:
            return serve.split()
        return ["sh", "-c", f"sleep 600 & echo $! > {grandchild_pid}; exec {serve}"]
    return command


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie has ended: only its exit status is left
        return stat.read().split(")")[-1].split()[0] != "Z"


def gone_soon(pid: int, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


def test_the_server_answers_on_loopback_and_ends_with_its_children(tmp_path):
    (tmp_path / "index.html").write_text("hello")
    pid_file = tmp_path / "child.pid"
    with local_server(http_server(tmp_path, pid_file), tmp_path / "server.log", timeout=30) as server:
        assert server.url == f"http://127.0.0.1:{server.port}/"
        assert answers(server.url + "index.html")
        child = int(pid_file.read_text())
        assert alive(server.process.pid) and alive(child)
    assert server.process.poll() is not None
    assert gone_soon(child)
    assert not answers(server.url, timeout=0.5)


def test_an_exception_in_the_block_ends_the_server(tmp_path):
    with pytest.raises(RuntimeError, match="test failed"):
        with local_server(http_server(tmp_path), tmp_path / "server.log", timeout=30) as server:
            raise RuntimeError("test failed")
    assert server.process.poll() is not None


def test_a_server_that_exits_is_named_with_its_log(tmp_path):
    crash = lambda port: [sys.executable, "-c", "import sys; print('error: no gallery here'); sys.exit(2)"]
    with pytest.raises(HandCLIPError, match=r"exited with status 2 before answering[\s\S]*error: no gallery here"):
        with local_server(crash, tmp_path / "server.log", timeout=30):
            pass


def test_a_server_that_never_answers_is_stopped_at_the_timeout(tmp_path):
    pid_file = tmp_path / "pid"
    silent = lambda port: ["sh", "-c", f"echo $$ > {pid_file}; exec sleep 600"]
    with pytest.raises(HandCLIPError, match=r"did not answer http://127\.0\.0\.1:\d+/ within 1 s"):
        with local_server(silent, tmp_path / "server.log", timeout=1):
            pass
    assert gone_soon(int(pid_file.read_text()))


def test_a_port_taken_meanwhile_is_tried_again_on_another(tmp_path):
    ports = []

    def command(port: int) -> list[str]:
        ports.append(port)
        if len(ports) == 1:  # as gradio says when its port was taken between free_port() and the bind
            return [sys.executable, "-c", "raise SystemExit('OSError: Cannot find empty port in range')"]
        return http_server(tmp_path)(port)

    with local_server(command, tmp_path / "server.log", timeout=30) as server:
        assert answers(server.url)
    assert len(ports) == 2 and server.port == ports[1]


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "example.org"])
def test_only_loopback_addresses_are_served(tmp_path, host):
    with pytest.raises(HandCLIPError, match=f"host '{host}' is not a loopback address"):
        with local_server(http_server(tmp_path), tmp_path / "server.log", host=host):
            pass
    assert not (tmp_path / "server.log").exists()


def test_free_port_is_free():
    import socket

    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # nobody holds it
