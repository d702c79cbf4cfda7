"""Routing photos by hand type and fusing hand types in identify (issue 21, item 3): the hand-type classifier (its
probe, its val accuracy, its refusal at the exact confidence boundary), fused identify against an independent
computation, the routing by folder / given / predicted hand type, and the refusals."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import CASES, ENROLLED, calibrated_models, run_module

from handclip.config import compose
from handclip.errors import HandCLIPError
from handclip.hands import ELEVEN_K_HANDS, hand_dir_name
from handclip.identify import identify
from handclip.identify.hand_classifier import HandClassifier, fit_probe, load_classifier
from handclip.identify.hand_training import train_hand_classifier


def fused_cfg(world, out: Path, *extra: str, query=None, default_models: bool = False, root: Path | None = None):
    """Fused identify on the world's gallery, results in ``out``; the hand models given as models.<hand>=, or
    found where training writes them under ``root`` (``default_models``: the world's output root)."""
    if default_models or root:
        where = [f"paths.output_root={root or world['out']}", f"name={out.name}"]
    else:
        where = [f"paths.output_root={out.parent}", f"name={out.name}",
                 *(f"models.{h}={p}" for h, p in world["models"].items())]
    where.append(f"hand_classifier.path={world['out'] / 'train' / 'hand_type' / 'hand_type.json'}")
    return compose("identify", [
        "experiment=demo", *where, f"gallery={world['gallery']}", f"query={query or world['cases']}",
        "fusion=mean", "threshold=0.5", "index_dtype=float32", "top_k=5", "progress=false", "num_workers=0",
        "pictures=false", f"index={out.parent / (out.name + '-index')}", *extra])


# -- the classifier -------------------------------------------------------------------------------
def test_probe_fits_separable_embeddings_at_its_optimum():
    gen = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(4, 16, generator=gen), dim=1)
    labels = torch.arange(4).repeat_interleave(30)
    x = torch.nn.functional.normalize(centres[labels] + 0.15 * torch.randn(120, 16, generator=gen), dim=1)
    w, b = fit_probe(x[::2], labels[::2], 4, weight_decay=1e-2)
    clf = HandClassifier(w, b, list(ELEVEN_K_HANDS), {}, 0.5, {})
    assert [h for h, _ in clf.predict(x[1::2])] == [ELEVEN_K_HANDS[int(y)] for y in labels[1::2]]  # val: 100 %
    # first-order optimality of the penalised objective in the standardised features (written out here)
    xs = x[::2].double()
    mean, std = xs.mean(0), xs.std(0, correction=0)
    w_std = (w.double() * std).requires_grad_(True)
    b_std = (b.double() + w.double() @ mean).requires_grad_(True)
    loss = torch.nn.functional.cross_entropy((xs - mean) / std @ w_std.T + b_std, labels[::2]) \
        + 0.5 * 1e-2 * w_std.pow(2).sum()
    loss.backward()
    assert float(w_std.grad.abs().max()) < 1e-4 and float(b_std.grad.abs().max()) < 1e-4


def test_confidence_boundary_is_inclusive():
    zero = HandClassifier(torch.zeros(4, 8), torch.zeros(4), list(ELEVEN_K_HANDS), {}, 0.25, {})
    (hand, prob), = zero.predict(torch.ones(1, 8))
    assert (hand, prob) == ("dorsal_right", 0.25)  # four equal logits: exactly 1/4, the first class of equals
    assert zero.confident(prob)
    zero.min_confidence = math.nextafter(0.25, 1.0)
    assert not zero.confident(prob)


def test_classifier_trained_on_distinguishable_hand_types(world):
    clf = load_classifier(world["out"] / "train" / "hand_type" / "hand_type.json")
    assert clf.classes == list(ELEVEN_K_HANDS)
    assert clf.figures["val_accuracy"] == 1.0 and clf.figures["val_images"] == 20  # stated: all 20 val photos
    assert clf.figures["train_images"] == 40 and clf.min_confidence == 0.9
    assert clf.model["key"] == {"zero_shot": "HandCLIP-Tiny", "pretrained": None}
    from handclip.identify.hand_classifier import classifier_cfg
    from handclip.identify.run import load_model

    _, model, _ = load_model(classifier_cfg(compose("identify", ["experiment=demo"]), clf))
    assert model.fingerprint == clf.model["fingerprint"]


def test_training_refuses_an_existing_file_and_too_few_hand_types(world, tmp_path):
    def train(data, *extra):
        return train_hand_classifier(compose("identify", [
            "experiment=demo", "task=train_hand_type", f"paths.data_dir={data}", f"paths.output_root={tmp_path}",
            "progress=false", "num_workers=0", *extra]))

    existing = world["out"] / "train" / "hand_type" / "hand_type.json"
    with pytest.raises(HandCLIPError, match="exists; pass overwrite=true"):
        train(world["data"], f"hand_classifier.path={existing}")
    one = tmp_path / "one"
    shutil.copytree(world["data"] / hand_dir_name("dorsal_right"), one / hand_dir_name("dorsal_right"))
    with pytest.raises(HandCLIPError, match="needs the 11k layout of at least 2 hand types .* found dorsal_right$"):
        train(one)


# -- fused identify against an independent computation --------------------------------------------
def reference(world, probes: dict[str, list[tuple[Path, str]]], fusion: str) -> dict[str, list[tuple]]:
    """Per probe: [(person, fused score, hand types used)] best first, from each hand model's own embeddings and
    plain loops: a person scores per hand type as the best (probe photo, gallery photo) cosine."""
    import handclip

    emb = {}
    for hand, ckpt in world["models"].items():
        model = handclip.load(ckpt)
        paths = sorted(world["gallery"].glob(f"*/{hand}/*.png")) + [p for ps in probes.values() for p, h in ps
                                                                    if h == hand]
        if paths:
            emb.update({(p, hand): v for p, v in zip(paths, model.embed(paths).double().numpy())})
    out = {}
    for name, photos in probes.items():
        rows = []
        for person, hands in ENROLLED.items():
            per_hand = {}
            for photo, hand in photos:
                if hand not in hands:
                    continue
                for g in sorted((world["gallery"] / person / hand).glob("*.png")):
                    s = float(emb[(photo, hand)] @ emb[(g, hand)])
                    per_hand[hand] = max(per_hand.get(hand, -math.inf), s)
            if per_hand:
                vals = list(per_hand.values())
                rows.append((person, sum(vals) / len(vals) if fusion == "mean" else max(vals), sorted(per_hand)))
        out[name] = sorted(rows, key=lambda r: (-r[1], r[0]))
    return out


def case_photos(world) -> dict[str, list[tuple[Path, str]]]:
    return {str(world["cases"] / c): [(world["cases"] / c / h / f"{c}.png", h) for h in hands]
            for c, (_, hands) in CASES.items()}


@pytest.mark.parametrize("fusion", ["mean", "max"])
def test_fused_scores_and_rankings_equal_the_reference(world, tmp_path, fusion):
    result = identify(fused_cfg(world, tmp_path / "fused", f"fusion={fusion}", f"pictures={fusion == 'mean'}",
                                default_models=fusion == "mean"))
    if fusion == "mean":  # a case's ranking picture shows its first photo as the query
        assert len(list(result["files"]["rankings"].glob("*.png"))) == len(CASES)
    expected = reference(world, case_photos(world), fusion)
    assert [r["query"] for r in result["queries"]] == sorted(expected)
    for record in result["queries"]:
        ref = expected[record["query"]]
        assert [t["identity"] for t in record["top"]] == [r[0] for r in ref]
        assert [t["score"] for t in record["top"]] == pytest.approx([r[1] for r in ref], abs=1e-6)
        hands_order = [h for h in ELEVEN_K_HANDS]
        assert [sorted(t["hand_types"], key=hands_order.index) for t in record["top"]] == \
            [sorted(r[2], key=hands_order.index) for r in ref]
        assert [t["hand_types_used"] for t in record["top"]] == [len(r[2]) for r in ref]
        assert record["hand_types_used"] == len(ref[0][2])
        assert {p["source"] for p in record["routing"]} == {"folder"}
        assert sorted(record["photos"]) == sorted(str(p) for p, _ in case_photos(world)[record["query"]])
        name = Path(record["query"]).name
        assert record["true_identity"] == (name if name in ENROLLED else None)
        assert record["accepted"] == (ref[0][1] >= 0.5)


def test_calibrated_thresholds_fused_for_two_or_more_hand_types_else_the_models_own(world, tmp_path):
    per_hand = {"dorsal_right": 0.3, "dorsal_left": 2.0, "palmar_right": 0.1, "palmar_left": 2.0}
    root = calibrated_models(world, tmp_path / "out", fused=-1.0, per_hand=per_hand)
    seen = set()
    for fusion in ("mean", "max"):
        result = identify(fused_cfg(world, tmp_path / fusion, "threshold=null", f"fusion={fusion}", root=root))
        assert result["threshold"]["threshold"] == -1.0
        assert {h: t["threshold"] for h, t in result["thresholds_per_hand_type"].items()} == \
            {h: per_hand[h] for h in ("dorsal_left", "dorsal_right", "palmar_left")}
        for record in result["queries"]:
            used = record["top"][0]["hand_types"]
            expected = -1.0 if len(used) >= 2 else per_hand[used[0]]
            assert record["threshold"] == expected and record["accepted"] == (record["score"] >= expected)
            seen.add(len(used) >= 2)
    assert seen == {True, False}  # both rules decide here (a best person sharing one hand type, and more)
    lone = identify(fused_cfg(world, tmp_path / "lone", "threshold=null", root=root,
                              query=world["cases"] / "ann" / "dorsal_right" / "ann.png"))
    record, = lone["queries"]
    assert record["threshold"] == 0.3 and record["threshold_source"].endswith("best.calibration.json")
    assert record["accepted"] == (record["score"] >= 0.3)


def test_a_fused_calibration_of_other_models_is_refused(world, tmp_path):
    root = calibrated_models(world, tmp_path / "out", fused=0.5, per_hand=dict.fromkeys(ELEVEN_K_HANDS, 0.5),
                             fingerprints={"palmar_right": "0" * 20})
    with pytest.raises(HandCLIPError, match="was computed for another palmar_right model"):
        identify(fused_cfg(world, tmp_path / "run", "threshold=null", root=root))


def test_python_api_fused_identify_equals_the_reference(world, tmp_path):
    import handclip

    records = handclip.identify_fused(world["cases"], world["gallery"], threshold=0.5, fusion="max",
                                      models=world["models"], index=tmp_path / "index", top_k=2)
    expected = reference(world, case_photos(world), "max")
    assert [r["query"] for r in records] == sorted(expected)
    for record in records:
        ref = expected[record["query"]][:2]
        assert [t["identity"] for t in record["top"]] == [r[0] for r in ref]
        # the default float16 index: within ~5e-5 of float32 scores (README "The gallery index")
        assert [t["score"] for t in record["top"]] == pytest.approx([r[1] for r in ref], abs=1e-4)
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == sorted(
        {h for _, hands in CASES.values() for h in hands})  # one index per hand type of the query


def test_given_and_predicted_hand_types_route_single_photos(world, tmp_path):
    loose = tmp_path / "loose"
    loose.mkdir()
    photo = Path(shutil.copy2(world["cases"] / "dan" / "palmar_left" / "dan.png", loose / "dan.png"))
    gallery = tmp_path / "gallery"  # query_hand= asks every gallery person to have photos of it
    for person, hands in ENROLLED.items():
        if "palmar_left" in hands:
            shutil.copytree(world["gallery"] / person, gallery / person)
    for how, extra in (("given", ["query_hand=palmar_left", f"gallery={gallery}"]), ("predicted", [])):
        result = identify(fused_cfg(world, tmp_path / how, *extra, query=loose))
        record, = result["queries"]
        assert record["routing"][0]["source"] == how and record["hand_types"] == ["palmar_left"]
        assert "photos" not in record  # a lone photo is its own query
        ref = reference(world | ({"gallery": gallery} if how == "given" else {}), {"p": [(photo, "palmar_left")]},
                        "mean")["p"]
        if how == "given":
            assert sorted(r[0] for r in ref) == ["ann", "bob", "dan"]
        assert [t["identity"] for t in record["top"]] == [r[0] for r in ref]
        assert [t["score"] for t in record["top"]] == pytest.approx([r[1] for r in ref], abs=1e-6)
        assert [t["hand_types_used"] for t in record["top"]] == [1] * len(ref)
    assert record["routing"][0]["probability"] >= 0.9
    assert result["hand_classifier"]["photos"] == 1


def test_prediction_at_the_confidence_level_is_used_and_just_above_it_refused(world, tmp_path):
    photo = tmp_path / "q" / "x.png"
    photo.parent.mkdir()
    shutil.copy2(world["cases"] / "ann" / "dorsal_right" / "ann.png", photo)
    first = identify(fused_cfg(world, tmp_path / "first", query=photo.parent))
    prob = first["queries"][0]["routing"][0]["probability"]
    again = identify(fused_cfg(world, tmp_path / "at", f"hand_classifier.min_confidence={prob!r}",
                               query=photo.parent))
    assert again["queries"][0]["routing"][0]["probability"] == prob
    with pytest.raises(HandCLIPError, match=r"hand type of 1 photo\(s\) is uncertain .*x\.png.*query_hand="):
        identify(fused_cfg(world, tmp_path / "above", f"hand_classifier.min_confidence={math.nextafter(prob, 1)!r}",
                           query=photo.parent))
    assert not (tmp_path / "identify" / "above").exists()


# -- refusals -------------------------------------------------------------------------------------
def _no_embedding(monkeypatch):
    import handclip.identify.fusion as fusion

    def refuse(*_, **__):
        raise AssertionError("embedded before the input was checked")

    monkeypatch.setattr(fusion, "embed_files", refuse)


@pytest.mark.parametrize("setup, message", [
    ("query_hand", r"gallery person\(s\) cat, eve have no palmar_left photos \(query_hand=palmar_left\)"),
    ("no_model", r"fusion needs a model for hand type palmar_left \(in the query\): models.palmar_left="),
    ("gallery_folder", r"unknown hand-type folder .*ann/dorsal_rigth.* in gallery person 'ann'"),
    ("query_folder", r"unknown hand-type folder .*stranger/palmar.* in case folder"),
    ("lonely", r"has palmar_left photos but only gallery person 'ann' has any"),
    ("no_threshold", r"fusion=mean has no calibrated threshold: .*fusion.calibration.json' not found; compute it "
                     r"with `python -m handclip.eval all=true cross_hand=true`"),
    ("gallery_mode", r"gallery_mode=mean is not available with fusion="),
    ("one_model", r"ckpt_path= is for one model; with fusion= give models.<hand>=CKPT per hand type"),
    ("no_classifier", r"hand-type classifier .*nothing.json.* not found; train it with `python -m handclip.identify "
                      r"task=train_hand_type`"),
])
def test_bad_input_is_refused_before_any_work(world, tmp_path, monkeypatch, setup, message):
    extra, query = [], None
    gallery = tmp_path / "gallery"
    shutil.copytree(world["gallery"], gallery)
    cases = tmp_path / "cases"
    shutil.copytree(world["cases"], cases)
    extra.append(f"gallery={gallery}")
    query = cases
    if setup == "query_hand":
        query = world["cases"] / "ann" / "palmar_left" / "ann.png"
        extra.append("query_hand=palmar_left")
    elif setup == "no_model":
        extra.append(f"models.palmar_left={tmp_path / 'missing.ckpt'}")
    elif setup == "gallery_folder":
        shutil.copytree(gallery / "ann" / "dorsal_right", gallery / "ann" / "dorsal_rigth")
    elif setup == "query_folder":
        shutil.copytree(cases / "stranger" / "dorsal_left", cases / "stranger" / "palmar")
    elif setup == "lonely":
        for person in ("bob", "dan"):
            shutil.rmtree(gallery / person / "palmar_left")
    elif setup == "no_threshold":
        extra.append("threshold=null")
    elif setup == "gallery_mode":
        extra.append("gallery_mode=mean")
    elif setup == "one_model":
        extra.append(f"ckpt_path={world['models']['dorsal_right']}")
    else:
        query = tmp_path / "loose"
        query.mkdir()
        shutil.copy2(world["cases"] / "ann" / "dorsal_right" / "ann.png", query / "a.png")
        extra.append(f"hand_classifier.path={tmp_path / 'nothing.json'}")
    _no_embedding(monkeypatch)
    with pytest.raises(HandCLIPError, match=message):
        identify(fused_cfg(world, tmp_path / "run", *extra, query=query))
    assert not (tmp_path / "identify" / "run").exists() and not (tmp_path / "run-index").exists()


def test_cli_refusal_is_one_error_line(world, tmp_path):
    done = run_module("handclip.identify", "experiment=demo", f"paths.output_root={tmp_path}", "fusion=max",
                      f"gallery={world['gallery']}", f"query={world['cases']}", "threshold=0.5",
                      f"models.dorsal_left={tmp_path / 'none.ckpt'}")
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: fusion needs a model for hand type dorsal_left") and \
        done.stderr.count("\n") == 1
