"""The benchmark: a quick end-to-end run (JSON written, keys present, ratios from the measured figures),
the full-run defaults, file naming (a quick run never replaces a full result) and the Hydra entry point."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import ROOT, run_module

from handclip.bench.run import (
    bench_settings,
    device_slug,
    evaluate_goals,
    format_table,
    resolve_device,
    result_path,
    run_benchmark,
    size_label,
    slugify,
)
from handclip.config import compose
from handclip.errors import HandCLIPError

TOP_LEVEL = ("device", "device_slug", "torch", "quick", "timestamp", "config", "host", "data", "train", "eval",
             "search", "memory", "goals", "total_s")


def positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One quick run (data, train, eval, search; other parts have their own tests), with a pretend full result."""
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "results"
    # One torch thread: the test then stays quick on a CPU shared with other jobs (see bench.threads).
    cfg = compose("bench", ["bench.quick=true", "bench.threads=1", f"bench.out_dir={out}",
                            f"bench.scratch_dir={tmp / 'scratch'}", "bench.parts=[data,train,eval,search]",
                            "bench.train.device_batches=true"])
    slug = device_slug(resolve_device(cfg.bench.device))
    full = out / f"{slug}.json"
    out.mkdir()
    full.write_text('{"pretend": "full run"}\n')
    messages: list[str] = []
    result = run_benchmark(cfg, say=messages.append)
    path = out / f"{slug}-data-train-eval-search-quick.json"  # not a full run's parts: a file of its own
    return {"cfg": cfg, "result": result, "path": path, "full": full, "messages": messages,
            "json": json.loads(path.read_text()) if path.exists() else None}


@pytest.mark.slow  # the quick benchmark run behind these tests takes ~15 s
def test_quick_run_writes_its_own_file_and_keeps_the_full_result(quick):
    assert quick["path"].is_file()
    assert quick["result"]["path"] == str(quick["path"])
    assert quick["full"].read_text() == '{"pretend": "full run"}\n'


@pytest.mark.slow  # the quick benchmark run behind these tests takes ~15 s
def test_quick_json_has_the_required_keys(quick):
    data = quick["json"]
    for key in TOP_LEVEL:
        assert key in data, key
    assert data["quick"] is True
    assert data["torch"] and data["device"] and data["timestamp"]
    for key in ("uncached_images_per_s", "cached_images_per_s", "cached_speedup", "cache_build_s"):
        assert positive(data["data"][key]), key
    for key in ("images_per_s", "bare_images_per_s", "vs_bare_loop", "tflops", "images_per_s_end_to_end"):
        assert positive(data["train"][key]), key
    assert 0 <= data["train"]["data_fraction"] <= 1
    assert data["train"]["model_name"] == "HandCLIP-Tiny"
    assert positive(data["eval"]["embed_images_per_s"])
    # the sizes used are recorded
    assert data["config"]["data"]["images"] == data["data"]["images"]
    assert data["config"]["eval"]["sizes"] == [500, 2000]
    assert data["config"]["threads"] == 1 and data["host"]["torch_threads"] == 1
    share = data["host"]["other_processes_cpu_share"]
    assert share is None or 0 <= share <= 1
    assert set(data["part_s"]) == {"data", "train", "eval", "search"}
    assert all(positive(v) for v in data["part_s"].values())


@pytest.mark.slow  # the quick benchmark run behind these tests takes ~15 s
def test_quick_ratios_are_computed_from_the_measured_figures(quick):
    data = quick["json"]
    d, t, e = data["data"], data["train"], data["eval"]
    assert d["cached_speedup"] == pytest.approx(d["cached_images_per_s"] / d["uncached_images_per_s"])
    assert d["uncached_images_per_s"] == pytest.approx(d["images"] / d["uncached_epoch"]["median_s"])
    assert d["cached_images_per_s"] == pytest.approx(d["images"] / d["cached_epoch"]["median_s"])
    assert t["vs_bare_loop"] == pytest.approx(t["images_per_s"] / t["bare_images_per_s"])
    assert t["images_per_s"] == pytest.approx(t["batch_size"] / t["lightning_step"]["median_s"])
    assert t["bare_images_per_s"] == pytest.approx(t["batch_size"] / t["bare_step"]["median_s"])
    assert t["tflops"] == pytest.approx(t["images_per_s"] * t["gflops_per_image"] / 1e3)
    assert len(t["lightning_step"]["times_s"]) == len(t["bare_step"]["times_s"]) == t["steps"]
    for label in ("500", "2k"):
        entry = e["metrics"][label]
        for kind in ("similarity", "metrics", "argsort"):
            assert positive(entry[kind]["median_s"]), (label, kind)
            assert len(entry[kind]["times_s"]) == 2
        median = {kind: entry[kind]["median_s"] for kind in ("metrics", "similarity", "argsort")}
        assert entry["metrics_vs_matmul"] == pytest.approx(median["metrics"] / median["similarity"])
        assert entry["speedup_vs_argsort"] == pytest.approx(entry["argsort"]["median_s"] / entry["metrics"]["median_s"])
        assert entry["agrees_with_argsort"] is True
        assert e[f"metrics_vs_matmul_{label}"] == entry["metrics_vs_matmul"]
        assert 0 <= entry["rank1"] <= 1 and 0 < entry["mAP"] <= 1


@pytest.mark.slow  # the quick benchmark run behind these tests takes ~15 s
def test_quick_goals_and_memory(quick):
    data = quick["json"]
    goals = data["goals"]
    assert set(goals) == {"data.cached_speedup", "train.vs_bare_loop", "eval.metrics_vs_matmul_2k",
                          "eval.speedup_vs_argsort_2k", "eval.metrics_peak_mem_delta_mb_2k", "search.queries_per_s",
                          "search.peak_mem_vs_index", "search.agrees_with_argsort", "search.reuse_embedded_images",
                          "search.reuse_decoded_images"}
    for figure, goal in goals.items():
        section, key = figure.split(".", 1)
        assert goal["value"] == data[section][key]
    assert goals["data.cached_speedup"]["target"] == 100
    assert goals["train.vs_bare_loop"]["target"] == 0.9
    for part in ("data", "train", "eval", "search"):
        assert data["memory"][part]
        for block in data["memory"][part].values():
            assert positive(block["peak_rss_mb"]) and block["peak_rss_delta_mb"] >= 0
    # the printed table names every goal
    table = format_table(data)
    assert all(figure in table for figure in goals)
    assert any("[3/4] eval" in m for m in quick["messages"])
    assert any("[4/4] search" in m for m in quick["messages"])


@pytest.mark.slow  # the quick benchmark run behind these tests takes ~15 s
def test_quick_search_figures(quick):
    """Search: queries/s from the measured batch time, memory over the index size, equal to the brute-force
    argsort, and an unchanged gallery index reopened without decoding or embedding anything."""
    s = quick["json"]["search"]
    assert (s["gallery"], s["queries"], s["dim"], s["dtype"]) == (20000, 32, 512, "float16")
    assert s["queries_per_s"] == pytest.approx(s["queries"] / s["batch"]["median_s"])
    assert len(s["batch"]["times_s"]) == 2
    assert s["index_mb"] == pytest.approx(20000 * 512 * 2 / 2**20, abs=0.2)  # the .npy header is tiny
    assert s["peak_mem_vs_index"] == pytest.approx(s["peak_rss_delta_mb"] / s["index_mb"], rel=0.02)
    assert s["agrees_with_argsort"] is True and s["checked_queries"] == 4
    assert s["index_build_embedded"] == s["reuse_images"] == 200
    assert (s["reuse_status"], s["reuse_decoded_images"], s["reuse_embedded_images"]) == ("reused", 0, 0)
    assert quick["json"]["goals"]["search.reuse_embedded_images"]["met"] is True


@pytest.mark.slow  # the quick benchmark run behind these tests takes ~15 s
def test_quick_train_times_crops_on_the_device(quick):
    """bench.train.device_batches (the default on CUDA): the Lightning step on batches sliced where the model is."""
    train = quick["result"]["train"]
    db = train["device_batches"]
    assert positive(db["images_per_s"]) and positive(db["images_per_s_end_to_end"]) and 0 <= db["data_fraction"] <= 1
    assert db["vs_bare_loop"] == pytest.approx(db["images_per_s"] / train["bare_images_per_s"])
    assert "compiled" not in train  # compile is off on the CPU by default
    assert "train: crops on the device" in format_table(quick["result"])


def test_a_tower_that_fails_to_compile_is_recorded_beside_the_eager_figures(tmp_path, monkeypatch):
    from handclip.bench import train as bench_train

    original = bench_train.build_module

    def no_compiler(*args, compile=False, **kwargs):
        if compile:
            raise RuntimeError("no C++ compiler here")
        return original(*args, **kwargs)

    monkeypatch.setattr(bench_train, "build_module", no_compiler)
    cfg = compose("bench", ["bench.quick=true", "bench.threads=1", "bench.parts=[train]", "bench.device=cpu",
                            f"bench.out_dir={tmp_path}", f"bench.scratch_dir={tmp_path / 'scratch'}",
                            "bench.train.compile=true"])
    result = run_benchmark(cfg, say=lambda message: None)
    assert result["train"]["compiled"] == {"error": "RuntimeError: no C++ compiler here"}
    assert positive(result["train"]["images_per_s"])
    assert "RuntimeError: no C++ compiler here" in format_table(result)


def test_gpu_goals_apply_to_cuda_runs_only():
    train = {"images_per_s": 9500.0, "vs_bare_loop": 0.95, "device_batches": {"data_fraction": 0.01,
             "vs_bare_loop": 0.97}, "compiled": {"vs_bare_loop": 0.85}}
    goals = evaluate_goals({"config": {"device": "cuda:0"}, "train": train}, None)
    assert {k: g["met"] for k, g in goals.items()} == {
        "train.vs_bare_loop": True, "train.images_per_s": False, "train.device_batches.data_fraction": True,
        "train.device_batches.vs_bare_loop": True, "train.compiled.vs_bare_loop": False}
    assert list(evaluate_goals({"config": {"device": "cpu"}, "train": train}, None)) == ["train.vs_bare_loop"]


def test_full_run_defaults():
    cfg = compose("bench")
    b = cfg.bench
    assert b.quick is False and b.device == "auto"
    assert Path(b.out_dir) == ROOT / "benchmarks" / "results"
    assert Path(b.scratch_dir) == ROOT / ".cache" / "bench"
    assert list(b.data.image_size) == [1600, 1200]
    assert b.train.model_name == "ViT-B-32-quickgelu" and b.train.gflops_per_image == 26.5
    assert list(b.eval.sizes) == [1000, 10000, 30000] and b.eval.goal_size == 10000
    assert {1000, 10000} <= set(b.eval.argsort_sizes)
    assert (b.search.gallery, b.search.dim, b.search.reuse_images) == (1000000, 512, 10000)


def test_names():
    assert size_label(1000) == "1k" and size_label(30000) == "30k" and size_label(2500) == "2.5k"
    assert size_label(500) == "500"
    assert slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert slugify("cpu: Intel(R) Xeon(R) Processor (2 cores)") == "cpu-intel-xeon-processor-2-cores"
    assert result_path(Path("r"), "x", quick=True) == Path("r/x-quick.json")
    assert result_path(Path("r"), "x", quick=False) == Path("r/x.json")
    full = ["checkpoints", "eval", "search", "data", "train"]  # a full run's parts, in any order
    assert result_path(Path("r"), "x", quick=False, parts=full) == Path("r/x.json")
    assert result_path(Path("r"), "x", quick=True, parts=full) == Path("r/x-quick.json")
    # a run of other parts never replaces the full result
    assert result_path(Path("r"), "x", quick=False, parts=["scaling"]) == Path("r/x-scaling.json")
    assert result_path(Path("r"), "x", quick=True, parts=["eval"]) == Path("r/x-eval-quick.json")


def test_goals_skip_parts_not_run():
    result = {"data": {"cached_speedup": 150.0}}
    goals = evaluate_goals(result, None)
    assert list(goals) == ["data.cached_speedup"] and goals["data.cached_speedup"]["met"] is True


@pytest.mark.parametrize(("figure", "value", "met"), [
    ("data.cached_speedup", 100.0, True), ("data.cached_speedup", 99.9, False),  # at least 100
    ("train.vs_bare_loop", 0.9, True), ("train.vs_bare_loop", 0.89, False),  # at least 0.9
    ("eval.metrics_vs_matmul_10k", 2.0, True), ("eval.metrics_vs_matmul_10k", 2.01, False),  # at most 2
    ("eval.speedup_vs_argsort_10k", 10.0, True), ("eval.speedup_vs_argsort_10k", 9.99, False),  # at least 10
])
def test_goal_targets_and_directions(figure, value, met):
    section, key = figure.split(".")
    goals = evaluate_goals({section: {key: value}}, None)
    assert goals[figure]["met"] is met and goals[figure]["value"] == value


def test_memory_goal_at_the_largest_size():
    settings = {"goal_size": 1000, "sizes": [1000, 30000]}
    result = {"eval": {"metrics": {"30k": {"full_similarity_matrix_mb": 3433.0}},
                       "metrics_peak_mem_delta_mb_30k": 1024.0}}
    assert evaluate_goals(result, settings)["eval.metrics_peak_mem_delta_mb_30k"]["met"] is True
    result["eval"]["metrics_peak_mem_delta_mb_30k"] = 1500.0
    assert evaluate_goals(result, settings)["eval.metrics_peak_mem_delta_mb_30k"]["met"] is False


@pytest.mark.slow
def test_command_line_entry_point(tmp_path):
    """python -m handclip.bench: writes the quick file, Hydra's folder stays under the scratch dir."""
    out, scratch, cwd = tmp_path / "out", tmp_path / "scratch", tmp_path / "cwd"
    cwd.mkdir()
    proc = run_module(
        "handclip.bench", "bench.quick=true", "bench.threads=1", "bench.parts=[eval]",
        f"bench.out_dir={out}", f"bench.scratch_dir={scratch}",
        "bench.quick_settings.eval.sizes=[300]", "bench.quick_settings.eval.argsort_sizes=[300]",
        "bench.quick_settings.eval.goal_size=300", "bench.quick_settings.eval.embed_images=8",
        "bench.quick_settings.eval.embed_batch_size=8", cwd=cwd, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    files = list(out.glob("*-quick.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert set(data["goals"]) == {"eval.metrics_vs_matmul_300", "eval.speedup_vs_argsort_300",
                                  "eval.metrics_peak_mem_delta_mb_300"}
    assert "goals:" in proc.stdout and "eval.speedup_vs_argsort_300" in proc.stdout
    assert list(cwd.iterdir()) == []  # no outputs/ or multirun/ where it was started
    assert (scratch / "hydra").is_dir()


def test_unknown_part_is_refused():
    with pytest.raises(HandCLIPError, match=r"bench.parts: unknown part\(s\) \['nope'\]; choose from"):
        bench_settings(compose("bench", ["bench.parts=[data,nope]"]))


@pytest.mark.slow  # a new Python process (~8 s); in-process: test_unknown_part_is_refused
def test_command_line_rejects_an_unknown_part(tmp_path):
    proc = run_module("handclip.bench", "bench.parts=[disk]", f"bench.out_dir={tmp_path}",
                      f"bench.scratch_dir={tmp_path / 's'}", cwd=tmp_path, timeout=300)
    assert proc.returncode == 2
    assert "unknown part" in proc.stderr


@pytest.mark.slow
def test_scaling_part_times_one_and_two_processes(tmp_path):
    """bench.parts=[scaling]: the training step on 1 and 2 gloo processes, in its own result file."""
    out = tmp_path / "out"
    cfg = compose("bench", ["bench.quick=true", "bench.parts=[scaling]", "bench.device=cpu", f"bench.out_dir={out}",
                            f"bench.scratch_dir={tmp_path / 'scratch'}"])
    messages: list[str] = []
    result = run_benchmark(cfg, say=messages.append)
    assert Path(result["path"]) == out / f"{device_slug(resolve_device('cpu'))}-scaling-quick.json"
    scaling = json.loads(Path(result["path"]).read_text())["scaling"]
    assert scaling["backend"] == "gloo" and scaling["model_name"] == "HandCLIP-Tiny"
    one, two = scaling["processes"]["1"], scaling["processes"]["2"]
    if scaling["cores"] < 2:
        assert "skipped" in two
        return
    assert positive(one["images_per_s"]) and positive(two["images_per_s"]) and two["global_batch"] == 16
    assert positive(one["startup_s"]) and positive(two["startup_s"])
    assert two["speedup_vs_1"] == pytest.approx(two["images_per_s"] / one["images_per_s"])
    assert two["efficiency_vs_linear"] == pytest.approx(two["speedup_vs_1"] / 2)
    assert 0.0 <= two["grad_sync_share"] < 1.0 and positive(two["allreduce_s"])
    assert two["grad_sync_share"] == pytest.approx(
        max(0.0, 1 - two["step_no_sync"]["median_s"] / two["step"]["median_s"]))
    assert "scaling.cuda_efficiency_2" not in result["goals"]  # a GPU goal: CPU processes share the cores
    assert any("scaling: 2 process(es)" in line for line in format_table(result).splitlines())
