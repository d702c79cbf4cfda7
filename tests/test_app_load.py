"""HandCLIP Studio under load, on loopback only, bounded in count and time: concurrent clients whose every answer
is checked against its own photo, and enrolment racing identify (handclip.bench.load, handclip.bench.app)."""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest

from handclip.bench.load import percentile, run_load


@pytest.mark.parametrize("n", [1, 2, 7, 200])
def test_percentiles_match_numpy(n):
    values = sorted(random.Random(n).uniform(0, 5) for _ in range(n))
    for q in (0, 50, 95, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert percentile([], 50) is None


def test_every_request_is_sent_once_and_checked_against_its_own_answer():
    seen, lock = [], threading.Lock()

    def send(client, request):
        with lock:
            seen.append((client["id"], request))
        return request * 10

    made = []
    connect = lambda: made.append(1) or {"id": len(made)}
    run = run_load(connect, list(range(200)), clients=20, send=send, check=lambda r, a: None if a == r * 10 else "x")
    assert len(made) == 20  # a client each
    assert sorted(r for _, r in seen) == list(range(200))
    assert run.summary()["requests"] == run.answered == run.right == 200 and run.errors() == []
    per_client = {}
    for o in run.outcomes:
        per_client.setdefault(o.client, []).append(o.request)
    assert all(len(v) == 10 for v in per_client.values()) and len(per_client) == 20


def test_answers_mixed_up_between_clients_are_caught():
    """A server that hands out the latest answer instead of each request's own (a shared slot, no lock)."""
    slot = {}

    def racy_send(client, request):
        slot["answer"] = request
        time.sleep(0.002)
        return slot["answer"]

    run = run_load(dict, list(range(100)), clients=10, send=racy_send,
                   check=lambda r, a: None if a == r else f"answer for request {a}")
    summary = run.summary()
    assert summary["answered"] == 100 and summary["wrong"] > 0 and summary["right"] == 100 - summary["wrong"]
    assert summary["errors"][0].startswith("request ") and "answer for request" in summary["errors"][0]


def test_failures_and_unreadable_answers_are_counted_not_raised():
    def send(client, request):
        if request % 3 == 0:
            raise ConnectionError("refused")
        return None if request % 3 == 1 else {"ok": request}

    run = run_load(dict, list(range(30)), clients=3, send=send, check=lambda r, a: None if a["ok"] == r else "x")
    assert run.answered == 20 and run.right == 10  # 10 raised (unanswered), 10 unreadable, 10 right
    assert sum("ConnectionError: refused" in (o.error or "") for o in run.outcomes) == 10
    assert sum("unreadable answer" in (o.error or "") for o in run.outcomes) == 10


def test_the_run_is_bounded_in_time():
    run = run_load(dict, list(range(40)), clients=4, send=lambda c, r: time.sleep(0.2) or r,
                   check=lambda r, a: None, timeout_s=0.3)
    assert run.wall_s < 2
    assert 4 <= run.answered < 40
    assert all("not sent" in o.error for o in run.outcomes if o.latency_s is None)


def test_a_client_that_cannot_connect_loses_only_its_own_requests():
    made = []

    def connect():
        made.append(1)
        if len(made) == 2:
            raise OSError("no route")
        return {}

    run = run_load(connect, list(range(12)), clients=3, send=lambda c, r: r, check=lambda r, a: None)
    assert run.right == 8
    assert sum("could not connect: OSError: no route" in (o.error or "") for o in run.outcomes) == 4
