"""Concurrent clients against a local server, every answer checked: the load harness of the app benchmark
(:mod:`handclip.bench.app`) and of ``tests/test_app_load.py``.

``clients`` threads, each with a client of its own, send their share of the requests one after the other; every
request is timed and its answer checked against what that request must get back. Nothing is retried: a request
that fails, times out or gets another request's answer is counted as such."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Outcome:
    """One request: which client sent it, when, how long it took, and what was wrong (None: a right answer)."""

    request: int
    client: int
    start_s: float
    latency_s: float | None = None
    error: str | None = None


@dataclass
class LoadRun:
    outcomes: list[Outcome] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def answered(self) -> int:
        return sum(o.latency_s is not None for o in self.outcomes)

    @property
    def right(self) -> int:
        return sum(o.latency_s is not None and o.error is None for o in self.outcomes)

    def errors(self, limit: int = 5) -> list[str]:
        return [f"request {o.request} (client {o.client}): {o.error}" for o in self.outcomes if o.error][:limit]

    def summary(self) -> dict[str, Any]:
        latencies = sorted(o.latency_s for o in self.outcomes if o.latency_s is not None)
        return {
            "requests": len(self.outcomes), "answered": self.answered, "right": self.right,
            "wrong": sum(o.error is not None for o in self.outcomes), "errors": self.errors(),
            "wall_s": round(self.wall_s, 2),
            "requests_per_s": round(self.answered / self.wall_s, 2) if self.wall_s > 0 else None,
            "latency_ms": {name: (round(1000 * q, 1) if q is not None else None)
                           for name, q in (("p50", percentile(latencies, 50)), ("p95", percentile(latencies, 95)),
                                           ("max", latencies[-1] if latencies else None))},
        }


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile of sorted ``values`` (linear between the closest ranks, as numpy's default)."""
    if not values:
        return None
    position = (len(values) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return values[low] + (values[high] - values[low]) * (position - low)


def run_load(connect: Callable[[], Any], requests: Sequence[Any], clients: int,
             send: Callable[[Any, Any], Any], check: Callable[[Any, Any], str | None],
             timeout_s: float = 600.0) -> LoadRun:
    """Send ``requests`` from ``clients`` concurrent clients (``connect()`` makes one; client ``c`` sends requests
    ``c, c + clients, ...`` in order) through ``send(client, request) -> answer``; ``check(request, answer)``
    names what is wrong with an answer (None: right). The whole run stops after ``timeout_s`` seconds: requests
    not sent by then count as unanswered."""
    run = LoadRun([Outcome(i, i % clients, math.nan) for i in range(len(requests))])
    started = time.perf_counter()
    deadline = started + timeout_s
    ready = threading.Barrier(clients)

    def client(c: int) -> None:
        try:
            handle = connect()
        except Exception as e:  # noqa: BLE001 - a client that cannot connect loses its requests, named
            for o in run.outcomes[c::clients]:
                o.error = f"could not connect: {type(e).__name__}: {e}"
            ready.abort()
            return
        try:
            ready.wait(timeout=max(1.0, deadline - time.perf_counter()))  # all clients start together
        except threading.BrokenBarrierError:
            pass
        for o in run.outcomes[c::clients]:
            if time.perf_counter() > deadline:
                o.error = f"not sent: the run's {timeout_s:.0f} s were over"
                continue
            o.start_s = time.perf_counter() - started
            try:
                answer = send(handle, requests[o.request])
            except Exception as e:  # noqa: BLE001 - a failed request is a figure, not the end of the run
                o.error = f"{type(e).__name__}: {e}"
                continue
            o.latency_s = time.perf_counter() - started - o.start_s
            try:
                o.error = check(requests[o.request], answer)
            except Exception as e:  # noqa: BLE001 - an answer the check cannot read is a wrong answer
                o.error = f"unreadable answer ({type(e).__name__}: {e}): {str(answer)[:200]}"

    with ThreadPoolExecutor(clients, thread_name_prefix="load-client") as pool:
        for future in [pool.submit(client, c) for c in range(clients)]:
            future.result()
    run.wall_s = time.perf_counter() - started
    return run
