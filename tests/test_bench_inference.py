"""bench.parts=[inference]: every backend measured with its agreement (on the demo's identify photos, full and draft
decoding), the CPU and its flags recorded, fp32_peak_fraction from the stated formula, ratios from the measured
figures, auto's choice, identify end to end on a temporary gallery (removed, also on Ctrl-C), goals, and its own
result file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_checkpoint, write_image

from handclip.bench import gallery as bench_gallery
from handclip.bench.agreement import on_photos, on_trained_model, top1_margins
from handclip.bench.gallery import PREFIX, identify_gallery
from handclip.bench.inference import draft_verdict, fp32_peak_gflops, identify_backends
from handclip.bench.report import evaluate_goals
from handclip.bench.run import run_benchmark
from handclip.config import compose
from handclip.errors import HandCLIPError
from handclip.identify.index import ModelInfo
from handclip.models.backends import TorchEmbedder
from handclip.models.encoder import zero_shot_encoder


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench_inference")
    trained = tiny_checkpoint(tmp / "trained.ckpt", "dorsal_right", seed=3)
    cfg = compose("bench", ["bench.quick=true", "bench.threads=1", "bench.parts=[inference]", "bench.device=cpu",
                            f"bench.out_dir={tmp / 'out'}", f"bench.scratch_dir={tmp / 'scratch'}",
                            "bench.quick_settings.inference.images=16",
                            "bench.quick_settings.inference.gallery_size=30",
                            f"bench.inference.trained_ckpt={trained}"])
    result = run_benchmark(cfg, say=lambda _: None)
    result["scratch"] = tmp / "scratch"
    return result


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
        for measured in (agree, entry["draft_agreement"]):  # the demo's 9 queries against its 4 gallery photos
            assert 0 <= measured["top1_same_share"] <= 1 and (measured["queries"], measured["gallery"]) == (9, 4)
            assert -1 <= measured["photos_cosine_min"] <= measured["photos_cosine_mean"] <= 1 + 1e-12
        assert entry["meets_agreement"] == (agree["cosine_min"] >= agree["goal_cosine_min"])
    assert inf["backends"]["torch"]["agreement"]["top1_same_share"] == 1.0
    assert inf["backends"]["onnx"]["agreement"]["cosine_min"] >= 0.9999
    assert inf["agreement_photos"].startswith("make demo's identify photos (dorsal_r query0 against gallery0: 9 "
                                              "queries, 4 gallery photos) of its synthetic hands (8 subjects")


def test_draft_decoding_is_measured_on_the_demo_photos(result):
    decode = result["inference"]["decode"]
    assert decode["photo_size"] == [640, 480] and decode["photos"] == 13
    assert decode["draft_min_side"] == 128 and decode["draft_size"] == [320, 240]  # 1/2 keeps 240 >= 128
    assert decode["full_ms_per_photo"] > 0 and decode["draft_ms_per_photo"] > 0


def test_identify_end_to_end_on_a_temporary_gallery(result):
    inf = result["inference"]
    gallery = inf["identify"]
    labels = {f"{b}-{d}" for b in ("torch", inf["best_backend"]) for d in ("full", "draft")}
    assert set(gallery["runs"]) == labels
    for label, run in gallery["runs"].items():
        assert run["photos_decoded"] == 30 + 9 and run["seconds"] == pytest.approx(39 / run["photos_per_s"], abs=0.006)
        assert f"{run['backend']}-{run['decode']}" == label
    decoding = inf["backends"]["torch"]["draft_agreement"]  # the decoding alone: torch draft against torch full
    draft_ok = decoding["photos_cosine_min"] >= 0.99 and decoding["top1_same_share"] >= 0.99
    assert gallery["draft_meets_goal"] == draft_ok == gallery["draft_verdict"]["met"]
    allowed = [f"{inf['best_backend']}-full"] + ([f"{inf['best_backend']}-draft"] if draft_ok else [])
    assert inf["identify_photos_per_s"] == max(gallery["runs"][label]["photos_per_s"] for label in allowed)
    assert inf["identify_photos_per_s"] == gallery["runs"][inf["identify_best"]]["photos_per_s"]
    assert not list(result["scratch"].glob(f"{PREFIX}*"))  # the gallery is removed afterwards


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
    times = inf["auto"]["seconds_per_image"]
    assert inf["auto_picks"] == min(times, key=times.get) and set(times) <= set(backends)
    goals = result["goals"]
    assert goals["inference.best_vs_torch_b64"]["met"] == (inf["best_vs_torch_b64"] >= 2.0)
    assert goals["inference.best_latency_b1_p50_ms"]["met"] == (inf["best_latency_b1_p50_ms"] <= 40.0)


def test_top1_figures_on_the_benchmarks_model_and_on_a_trained_one(result):
    inf = result["inference"]
    meets = [e for e in inf["backends"].values() if e.get("meets_agreement")]
    assert inf["top1_same_min"] == min(e["agreement"]["top1_same_share"] for e in meets)
    assert inf["top1_margin"]["min"] <= inf["top1_margin"]["p05"] <= inf["top1_margin"]["median"]
    assert inf["backends"]["torch"]["agreement"]["score_change_max"] == 0.0
    trained = inf["trained"]
    assert trained["model_name"] == "HandCLIP-Tiny" and trained["checkpoint"].endswith("trained.ckpt")
    measured = {k: v for k, v in trained["backends"].items() if "full" in v}
    assert {"torch", "onnx", "onnx-int8"} <= set(measured)
    assert measured["torch"]["full"]["top1_same_share"] == 1.0 and measured["torch"]["full"]["score_change_max"] == 0
    assert trained["top1_same_min"] == min(v["full"]["top1_same_share"] for v in measured.values())
    assert result["goals"]["inference.trained.top1_same_min"]["met"] == (trained["top1_same_min"] >= 0.99)
    assert on_trained_model(str(Path(trained["checkpoint"]).with_name("missing.ckpt")), ["torch"], {}, Path("."),
                            4, print) == {"skipped": f"no trained model at {Path(trained['checkpoint']).parent}"
                                                     f"/missing.ckpt (run `make demo` first)"}


def test_top1_agreement_and_margins_against_plain_loops():
    gen = torch.Generator().manual_seed(0)
    for trial in range(5):
        queries, gallery = 6, 5
        reference = torch.randn(queries + gallery, 8, generator=gen)
        other = reference + 0.3 * trial * torch.randn(reference.shape, generator=gen)
        identities = ["a", "b", "a", "c", "b"]

        def scores(e):
            unit = [[x / sum(v * v for v in row) ** 0.5 for x in row] for row in e.double().tolist()]
            return [[sum(a * b for a, b in zip(unit[q], unit[queries + g])) for g in range(gallery)]
                    for q in range(queries)]

        want, got = scores(reference), scores(other)
        best = [max(range(gallery), key=lambda g, row=row: row[g]) for row in want]
        same = sum(identities[best[q]] == identities[max(range(gallery), key=lambda g: got[q][g])]
                   for q in range(queries)) / queries
        figures = on_photos(reference, other, queries, identities)
        assert figures["top1_same_share"] == same
        assert figures["score_change_max"] == pytest.approx(max(abs(got[q][g] - want[q][g]) for q in range(queries)
                                                                for g in range(gallery)), abs=1e-12)
        gaps = sorted(sorted(row)[-1] - sorted(row)[-2] for row in want)
        assert top1_margins(reference, queries)["min"] == pytest.approx(gaps[0], abs=1e-12)


def test_identify_backends_name_the_best_or_a_measured_one():
    measured = {"torch": object(), "onnx-int8": object()}
    assert identify_backends(["torch", "best"], "onnx-int8", measured) == ["torch", "onnx-int8"]
    assert identify_backends(["best"], "onnx-int8", measured) == ["onnx-int8"]
    with pytest.raises(HandCLIPError, match=r"^bench.inference.identify_backends: 'onnx' was not measured in this run; "
                                            r"choose among best, torch, onnx-int8$"):
        identify_backends(["best", "onnx"], "onnx-int8", measured)
    # a name that is no backend at all is refused before anything is measured
    cfg = compose("bench", ["bench.quick=true", "bench.parts=[inference]", "bench.device=cpu",
                            "bench.inference.identify_backends=[best,fast]"])
    with pytest.raises(HandCLIPError, match=r"^bench.inference.identify_backends: 'fast' was not measured"):
        run_benchmark(cfg, say=lambda _: None)


def test_draft_verdict_at_its_boundaries():
    assert draft_verdict({"photos_cosine_min": 0.99, "top1_same_share": 0.99})["met"] is True
    assert draft_verdict({"photos_cosine_min": 0.9899, "top1_same_share": 1.0})["met"] is False
    assert draft_verdict({"photos_cosine_min": 1.0, "top1_same_share": 0.9899})["met"] is False


def test_inference_goals_at_their_boundaries():
    for figure, value, met in (("top1_same_min", 0.99, True), ("top1_same_min", 0.9899, False),
                               ("trained.top1_same_min", 0.99, True), ("trained.top1_same_min", 0.98, False),
                               ("best_vs_torch_b64", 2.0, True), ("best_vs_torch_b64", 1.99, False),
                               ("best_latency_b1_p50_ms", 40.0, True), ("best_latency_b1_p50_ms", 40.01, False),
                               ("identify_photos_per_s", 40.0, True), ("identify_photos_per_s", 39.9, False)):
        node = value
        for part in reversed(f"inference.{figure}".split(".")):
            node = {part: node}
        assert evaluate_goals(node, None)[f"inference.{figure}"]["met"] is met


def test_peak_formula_states_how(monkeypatch):
    from handclip.bench import inference

    monkeypatch.setattr(inference, "cpu_flags", lambda: {"avx2", "fma"})
    peak = fp32_peak_gflops(2)
    if peak["gflops"] is not None:
        assert peak["flops_per_cycle_per_core"] == 32 and "8 fp32 lanes" in peak["how"]


def test_an_interrupted_gallery_run_leaves_no_gallery(tmp_path, monkeypatch):
    photos = [write_image(tmp_path / "photos" / f"{n}.jpg", seed=n) for n in range(3)]
    seen = []

    def interrupted(cfg, loaded, out_dir):
        seen.extend(Path(cfg.gallery).rglob("*.jpg"))
        raise KeyboardInterrupt  # Ctrl-C while the gallery is embedded

    monkeypatch.setattr(bench_gallery, "identify", interrupted)
    settings = {"gallery_size": 7, "gallery_per_identity": 2, "photo_size": [40, 30], "batch_size": 4}
    with pytest.raises(KeyboardInterrupt):
        identify_gallery({"torch-full": (TorchEmbedder(zero_shot_encoder("HandCLIP-Tiny", None), torch.device("cpu")),
                                         "full")}, ModelInfo(key={}, fingerprint="x"), photos, photos[:1],
                         tmp_path / "scratch", settings, lambda _: None)
    assert len(seen) == 7 and not seen[0].exists()
    assert not list((tmp_path / "scratch").iterdir())
