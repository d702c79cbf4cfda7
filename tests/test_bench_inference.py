"""bench.parts=[inference]: every backend measured with its agreement, the CPU and its flags recorded,
fp32_peak_fraction from the stated formula, ratios from the measured figures, goals, and its own result file."""

from __future__ import annotations

import json

import pytest

from handclip.bench.inference import fp32_peak_gflops
from handclip.bench.report import evaluate_goals
from handclip.bench.run import run_benchmark
from handclip.config import compose


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench_inference")
    cfg = compose("bench", ["bench.quick=true", "bench.threads=1", "bench.parts=[inference]", "bench.device=cpu",
                            f"bench.out_dir={tmp / 'out'}", f"bench.scratch_dir={tmp / 'scratch'}",
                            "bench.quick_settings.inference.photos=8", "bench.quick_settings.inference.images=16"])
    return run_benchmark(cfg, say=lambda _: None)


def test_its_own_result_file(result):
    assert result["path"].endswith("-inference-quick.json")
    assert json.loads(open(result["path"]).read())["inference"]["model_name"] == "HandCLIP-Tiny"


def test_every_backend_is_measured_or_says_why_not(result):
    inf = result["inference"]
    assert set(inf["backends"]) == {"torch", "torch-bf16", "onnx", "onnx-int8"}
    for entry in inf["backends"].values():
        if "skipped" in entry or "refused" in entry:
            continue
        assert entry["images_per_s_b64"] > 0 and entry["latency_b1_p95_ms"] >= entry["latency_b1_p50_ms"] > 0
        agree = entry["agreement"]
        assert -1 <= agree["cosine_min"] <= agree["cosine_mean"] <= 1 + 1e-12 and agree["images"] == 16
        assert 0 <= agree["top1_same_share"] <= 1 and agree["queries"] + agree["gallery"] == 8
        assert entry["meets_agreement"] == (agree["cosine_min"] >= agree["goal_cosine_min"])
    assert inf["backends"]["torch"]["agreement"]["top1_same_share"] == 1.0
    assert inf["backends"]["onnx"]["agreement"]["cosine_min"] >= 0.9999


def test_ratios_peak_fraction_and_goals_come_from_the_measured_figures(result):
    inf = result["inference"]
    backends = inf["backends"]
    best = inf["best_backend"]
    assert backends[best]["meets_agreement"]
    assert inf["best_vs_torch_b64"] == pytest.approx(backends[best]["images_per_s_b64"]
                                                      / backends["torch"]["images_per_s_b64"])
    assert backends[best]["images_per_s_b64"] == max(e["images_per_s_b64"] for e in backends.values()
                                                     if e.get("meets_agreement"))
    peak = inf["fp32_peak"]
    if peak["gflops"]:
        assert peak["gflops"] == pytest.approx(peak["cores"] * peak["clock_ghz"] * peak["flops_per_cycle_per_core"],
                                               rel=1e-3)
        torch_entry = backends["torch"]
        assert torch_entry["fp32_peak_fraction"] == pytest.approx(
            torch_entry["images_per_s_b64"] * inf["gflops_per_image"] / peak["gflops"])
    assert inf["cpu"]["model_name"] and isinstance(inf["cpu"]["flags"], list)
    assert inf["text_tower"]["whole_model_params"] > inf["text_tower"]["image_tower_params"] > 0
    assert inf["identify"]["photos"] == 8 and inf["identify_photos_per_s"] > 0
    assert inf["auto_picks"] in backends
    goals = result["goals"]
    assert goals["inference.best_vs_torch_b64"]["met"] == (inf["best_vs_torch_b64"] >= 2.0)
    assert goals["inference.best_latency_b1_p50_ms"]["met"] == (inf["best_latency_b1_p50_ms"] <= 40.0)


def test_inference_goals_at_their_boundaries():
    for figure, value, met in (("best_vs_torch_b64", 2.0, True), ("best_vs_torch_b64", 1.99, False),
                               ("best_latency_b1_p50_ms", 40.0, True), ("best_latency_b1_p50_ms", 40.01, False),
                               ("identify_photos_per_s", 40.0, True), ("identify_photos_per_s", 39.9, False)):
        assert evaluate_goals({"inference": {figure: value}}, None)[f"inference.{figure}"]["met"] is met


def test_peak_formula_states_how(monkeypatch):
    from handclip.bench import inference

    monkeypatch.setattr(inference, "cpu_flags", lambda: {"avx2", "fma"})
    peak = fp32_peak_gflops(2)
    if peak["gflops"] is not None:
        assert peak["flops_per_cycle_per_core"] == 32 and "8 fp32 lanes" in peak["how"]
