"""The benchmark's checkpoint part: bytes and seconds per write, disk per hand type, share of a run (quick, tiny)."""

from __future__ import annotations

import json

import pytest

from handclip.bench.checkpoints import _projected
from handclip.bench.run import format_table, run_benchmark
from handclip.config import compose


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench-ckpt")
    cfg = compose("bench", ["bench.quick=true", "bench.threads=1", "bench.parts=[checkpoints]",
                            f"bench.out_dir={tmp / 'results'}", f"bench.scratch_dir={tmp / 'scratch'}"])
    out = run_benchmark(cfg, say=lambda message: None)
    return json.loads(open(out["path"]).read())


def test_bytes_per_write_and_disk_per_hand_type(result):
    c = result["checkpoints"]
    writes = c["writes"]
    assert set(writes) == {"lightning_default", "sync", "background"}
    best, last = writes["sync"]["best"]["bytes"], writes["sync"]["last"]["bytes"]
    # last.ckpt: the weights and AdamW's two moments of every trainable weight; best.ckpt: the weights alone
    assert 2.9 * best < last < 3.1 * best
    assert writes["background"]["last"]["bytes"] == pytest.approx(last, rel=0.01)
    assert writes["lightning_default"]["best"]["bytes"] == pytest.approx(last, rel=0.01)  # full, as 0.2.0 wrote it
    assert c["best_mb"] == best / 1e6 and c["last_mb"] == last / 1e6
    assert c["disk_per_hand_gb"] == pytest.approx((best + last) / 1e9)
    assert c["peak_disk_per_hand_gb"] == pytest.approx((best + 2 * last) / 1e9)
    assert c["disk_four_hands_gb"] == pytest.approx(4 * c["disk_per_hand_gb"])
    assert c["disk_per_hand_gb_0_1_0"] > c["disk_per_hand_gb_0_2_0"] > c["disk_per_hand_gb"]
    assert c["text_tower_mb"] > 0


def test_seconds_per_write(result):
    for mode, kinds in result["checkpoints"]["writes"].items():
        for kind, w in kinds.items():
            assert len(w["blocking_times_s"]) == len(w["done_times_s"]) == 2, (mode, kind)
            assert all(0 < b <= d for b, d in zip(w["blocking_times_s"], w["done_times_s"])), (mode, kind)
            if mode != "background":
                assert w["blocking_times_s"] == w["done_times_s"]


def test_share_of_a_run(result):
    c = result["checkpoints"]
    run = c["run"]["background"]
    assert run["epochs"] == 2 and run["last_writes"] == 1  # a short run writes last.ckpt once, at the end
    assert 1 <= run["best_writes"] <= 2
    assert run["writing_s"] == pytest.approx(sum(run["best_s"]) + sum(run["last_s"]) + run["wait_at_end_s"])
    assert 0 < run["writing_s"] < run["wall_s"] and c["run_share"] == run["writing_s"] / run["wall_s"]
    assert set(c["projected"]) == {"0.2.0", "sync", "background"}
    assert c["projected_share"] == c["projected"]["background"]["share"]
    goal = result["goals"]["checkpoints.run_share"]
    assert goal["value"] == c["run_share"] and goal["target"] == 0.05 and goal["op"] == "<="
    assert "checkpoints.run_share" in format_table(result) and "checkpoints: best / last MB" in format_table(result)


def test_projection_of_a_whole_run():
    # 50 epochs of 10 s: 500 s of training; last.ckpt every 5 minutes -> after 300 s, and at the end
    p = _projected(10.0, best_s=0.5, last_s=2.0, epochs=50, every_minutes=5)
    assert p["last_writes"] == 2 and p["best_writes"] == 50
    assert p["writing_s"] == 50 * 0.5 + 2 * 2.0 and p["share"] == pytest.approx(29 / 529)
    assert _projected(10.0, 0.5, 2.0, 50, None)["last_writes"] == 50  # every epoch, as 0.2.0
    assert _projected(1.0, 0.5, 2.0, 50, 5)["last_writes"] == 1  # a run shorter than the interval
