"""Decision modes end to end: identify with gallery_mode=mean and query_mode=case against the definitions (from the
embeddings the index stores and the API computes), the calibration per mode that training writes, the templates
the index keeps, the refusals, the Python API, and eval's mean-template rows."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import eval_cfg, make_layout, run_module, tiny_cfg
from PIL import Image
from reference import brute_force_metrics
from test_templates import ref_ranking, ref_template

import handclip
from handclip.config import compose
from handclip.data import datamodule
from handclip.errors import HandCLIPError
from handclip.eval import evaluate
from handclip.evaluation.calibration import DECISION_MODES, sidecar_path
from handclip.evaluation.runs import score_runs
from handclip.identify import identify

HAND_DIR = "train_val_test_split_dorsal_r"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 1-epoch tiny model (its calibration written by training); a gallery of 2-3 photos per test identity;
    cases of the other photos (one case per identity, named like it, and a case of someone unknown)."""
    base = tmp_path_factory.mktemp("modes")
    data = make_layout(base / "data", n_train_ids=6, n_test_ids=5, per_id=5, runs=1)
    train(tiny_cfg(data, base / "out", "trainer.max_epochs=1"))
    for n, ident in enumerate(sorted((data / HAND_DIR / "test").iterdir())):
        images = sorted(ident.iterdir())
        cut = 2 + n % 2  # 2 or 3 gallery photos per person
        for i, image in enumerate(images):
            target = base / ("gallery" if i < cut else "cases") / ident.name / image.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(image, target)
    stranger = base / "cases" / "stranger"  # a training identity: not in the gallery
    stranger.mkdir()
    for image in sorted((data / HAND_DIR / "train" / "0000000").iterdir())[:3]:
        shutil.copy2(image, stranger / image.name)
    ckpt = base / "out" / "train" / "dorsal_right" / "checkpoints" / "best.ckpt"
    return {"base": base, "ckpt": ckpt, "gallery": base / "gallery", "cases": base / "cases"}


def train(cfg):
    from handclip.train import train as run

    return run(cfg)


def cfg(world, out: Path, *extra: str, query: Path | None = None, dtype: str = "float32"):
    return compose("identify", ["experiment=demo", f"paths.output_root={out}", "progress=false", "num_workers=0",
                                f"gallery={world['gallery']}", f"query={query or world['cases']}",
                                f"ckpt_path={world['ckpt']}", f"index_dtype={dtype}", *extra])


def stored(result) -> tuple[np.ndarray, list[str], list[str]]:
    """The index's rows (float64), their files and identities."""
    index = Path(result["gallery"]["index"])
    entries = json.loads((index / "entries.json").read_text())
    root = Path(result["gallery"]["folder"])
    return (np.load(index / "embeddings.npy").astype(np.float64), [str(root / e[0]) for e in entries],
            [e[1] for e in entries])


def check_against_definition(result, world, gallery_mode, case_mode):
    rows, files, identities = stored(result)
    names = sorted(set(identities))
    labels = [names.index(i) for i in identities]
    model = handclip.load(world["ckpt"])
    for record in result["queries"]:
        photos = record.get("photos", [record["query"]])
        probe = model.embed(photos).double().numpy()
        expected = ref_ranking(list(probe), rows, labels, gallery_mode, case_mode, k=len(record["top"]))
        assert [t["identity"] for t in record["top"]] == [names[p] for p, _, _ in expected]
        assert [t["file"] for t in record["top"]] == [files[r] for _, _, r in expected]
        assert [t["score"] for t in record["top"]] == pytest.approx([s for _, s, _ in expected], abs=1e-5)


@pytest.mark.parametrize("case_mode", ["mean", "max"])
def test_cases_one_decision_each_equal_the_definition_with_their_own_threshold(world, tmp_path, case_mode):
    result = identify(cfg(world, tmp_path, "query_mode=case", f"case_mode={case_mode}", "top_k=4"))
    calibration = json.loads(sidecar_path(world["ckpt"]).read_text())  # written by training, every mode in it
    assert set(calibration["modes"]) == set(DECISION_MODES)
    mode = f"max+case_{case_mode}"
    assert result["mode"] == {"gallery_mode": "max", "query_mode": "case", "case_mode": case_mode,
                              "decision_mode": mode}
    threshold = calibration["modes"][mode]["threshold"]
    assert result["threshold"]["threshold"] == threshold
    cases = sorted(p for p in world["cases"].iterdir())
    assert [r["query"] for r in result["queries"]] == [str(c) for c in cases]
    for record, case in zip(result["queries"], cases):
        assert record["photos"] == [str(p) for p in sorted(case.iterdir())]
        assert record["true_identity"] == (None if case.name == "stranger" else case.name)
        assert record["decision"] == (record["top"][0]["identity"] if record["score"] >= threshold else "unknown")
    check_against_definition(result, world, "max", case_mode)
    out = Path(result["files"]["json"]).parent
    assert len((out / "results.csv").read_text().splitlines()) == 1 + len(cases) * 4
    pictures = sorted((out / "rankings").glob("*.png"))
    assert len(pictures) == len(cases)
    with Image.open(pictures[0]) as img:  # up to 4 case photos, then the 4 persons
        assert img.width >= (min(4, len(result["queries"][0]["photos"])) + 4) * 150


def test_mean_templates_equal_the_definition_and_have_their_own_threshold(world, tmp_path):
    queries = tmp_path / "queries"
    for case in sorted(world["cases"].iterdir())[:2]:
        shutil.copytree(case, queries / case.name)
    result = identify(cfg(world, tmp_path, "gallery_mode=mean", "top_k=5", query=queries))
    calibration = json.loads(sidecar_path(world["ckpt"]).read_text())
    assert result["threshold"]["threshold"] == calibration["modes"]["mean"]["threshold"]
    assert result["mode"]["decision_mode"] == "mean" and len(result["queries"]) == 3 + 2  # one decision per photo
    check_against_definition(result, world, "mean", None)
    both = identify(cfg(world, tmp_path, "gallery_mode=mean", "query_mode=case", "case_mode=max", "name=both"))
    check_against_definition(both, world, "mean", "max")
    assert both["threshold"]["threshold"] == calibration["modes"]["mean+case_max"]["threshold"]


def test_index_templates_follow_added_and_removed_photos(world, tmp_path):
    gallery = tmp_path / "gallery"
    shutil.copytree(world["gallery"], gallery)
    w = {**world, "gallery": gallery}

    def templates(result):
        index = Path(result["gallery"]["index"])
        rows, _, identities = stored(result)
        names = sorted(set(identities))
        scratch = [ref_template([r for r, i in zip(rows, identities) if i == n]) for n in names]
        kept = np.load(index / "templates.npy")
        assert kept.shape == (len(names), rows.shape[1]) and kept.dtype == np.float32
        assert kept == pytest.approx(np.array(scratch), abs=1e-6)  # equal to a from-scratch mean
        return dict(zip(names, kept))

    before = templates(identify(cfg(w, tmp_path, "name=a", "pictures=false", "threshold=0.5")))
    people = sorted(before)
    extra = sorted((world["cases"] / people[0]).iterdir())[0]
    shutil.copy2(extra, gallery / people[0] / "added.png")
    sorted((gallery / people[1]).iterdir())[0].unlink()
    updated = identify(cfg(w, tmp_path, "name=b", "pictures=false", "threshold=0.5"))
    assert updated["gallery"]["index_status"]["status"] == "updated"
    after = templates(updated)
    assert [p for p in people if not np.array_equal(before[p], after[p])] == people[:2]  # exactly those two
    # an index written before templates existed is reused as it is (also on read-only media): its templates are
    # computed from its rows, and the results equal those from stored templates
    index = Path(updated["gallery"]["index"])
    meta = json.loads((index / "meta.json").read_text())
    del meta["sha256"]["templates.npy"]
    (index / "meta.json").write_text(json.dumps(meta))
    (index / "templates.npy").unlink()
    stored_run = identify(cfg(w, tmp_path, "name=c", "pictures=false", "threshold=0.5", "gallery_mode=mean",
                              f"index={tmp_path / 'fresh'}"))
    again = identify(cfg(w, tmp_path, "name=d", "pictures=false", "threshold=0.5", "gallery_mode=mean"))
    assert again["gallery"]["index_status"]["status"] == "reused" and not (index / "templates.npy").exists()
    for a, b in zip(again["queries"], stored_run["queries"]):
        assert [(t["identity"], t["file"]) for t in a["top"]] == [(t["identity"], t["file"]) for t in b["top"]]
        assert [t["score"] for t in a["top"]] == pytest.approx([t["score"] for t in b["top"]], abs=1e-5)


def test_a_calibration_without_the_mode_is_refused_and_max_still_works(world, tmp_path):
    old = {k: v for k, v in json.loads(sidecar_path(world["ckpt"]).read_text()).items() if k != "modes"}
    path = tmp_path / "old.calibration.json"
    path.write_text(json.dumps(old))
    plain = identify(cfg(world, tmp_path, f"calibration={path}", "pictures=false", "name=plain"))
    assert plain["threshold"]["threshold"] == old["threshold"] and plain["mode"]["decision_mode"] == "max"
    for mode in (["gallery_mode=mean"], ["query_mode=case"], ["query_mode=case", "case_mode=max"]):
        with pytest.raises(HandCLIPError, match=r"no threshold for decision mode .*python -m handclip\.eval.*"
                                                r"threshold=VALUE"):
            identify(cfg(world, tmp_path, f"calibration={path}", "name=x", *mode))
    given = identify(cfg(world, tmp_path, f"calibration={path}", "gallery_mode=mean", "threshold=0.25", "name=g",
                         "pictures=false"))
    assert given["threshold"] == {"threshold": 0.25, "source": "threshold= (given)"}


def test_case_folders_that_break_the_rules_are_refused_before_the_gallery(world, tmp_path):
    def refused(query: Path, match: str):
        index = tmp_path / f"index-{query.name}"
        with pytest.raises(HandCLIPError, match=match):
            identify(cfg(world, tmp_path, "query_mode=case", f"index={index}", "name=x", query=query))
        assert not index.exists()  # the gallery was not embedded

    loose = tmp_path / "loose"
    shutil.copytree(world["cases"], loose)
    shutil.copy2(next((world["cases"] / "stranger").iterdir()), loose / "stray.png")
    refused(loose, r"photos outside any case folder \(stray\.png\)")
    broken = tmp_path / "broken"
    shutil.copytree(world["cases"], broken)
    (broken / "zz_case").mkdir()
    (broken / "zz_case" / "a.png").write_bytes(b"not a png")
    (broken / "zz_case" / "b.jpg").write_bytes(b"")
    refused(broken, r"case folder .*zz_case' \(2 photo\(s\)\) has no readable photo; the gallery was not embedded")
    empty = tmp_path / "empty"
    (empty / "case1").mkdir(parents=True)
    (empty / "case1" / "notes.txt").write_text("x")
    refused(empty, r"case folder .*case1' holds no images")
    refused(sorted((world["cases"] / "stranger").iterdir())[0], "query_mode=case needs query=FOLDER")
    from handclip.command_line import check_override_keys

    for key in ("gallery_mode=median", "query_mode=all", "case_mode=min"):
        with pytest.raises(HandCLIPError, match=f"{key.split('=')[0]}.*expected one of"):
            check_override_keys("identify", [key])
    with pytest.raises(HandCLIPError, match="gallery_mode.*expected one of max, mean"):
        check_override_keys("eval", ["gallery_mode=median"])


def test_cli_a_case_without_a_readable_photo_is_one_error_line(world, tmp_path):
    cases = tmp_path / "cases"
    shutil.copytree(world["cases"], cases)
    (cases / "bad").mkdir()
    (cases / "bad" / "a.png").write_bytes(b"not a png")
    result = run_module("handclip.identify", "experiment=demo", f"paths.output_root={tmp_path}",
                        f"ckpt_path={world['ckpt']}", f"gallery={world['gallery']}", f"query={cases}",
                        "query_mode=case", "progress=false")
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: case folder ") and "has no readable photo" in last
    assert "Traceback" not in result.stderr and not (tmp_path / "identify" / "index").exists()


def test_the_api_offers_the_modes(world, tmp_path):
    model = handclip.load(world["ckpt"])
    records = model.identify(world["cases"], world["gallery"], top_k=3, query_mode="case", case_mode="max",
                             gallery_mode="mean", index=tmp_path / "index")
    cli = identify(cfg(world, tmp_path, "query_mode=case", "case_mode=max", "gallery_mode=mean", "top_k=3",
                       f"index={tmp_path / 'index'}", "pictures=false", dtype="float16"))
    assert records == cli["queries"]
    assert model.threshold(gallery_mode="mean") == json.loads(sidecar_path(world["ckpt"]).read_text())["modes"][
        "mean"]["threshold"]


# -- eval ------------------------------------------------------------------------------------------
def test_eval_mean_template_runs_equal_the_definition():
    rng = np.random.default_rng(4)
    identities = [f"p{i % 5}" for i in range(30)]
    features = torch.as_tensor(rng.normal(size=(30, 8)), dtype=torch.float32)
    features[7] = features[2]  # a duplicated photo
    runs = [{"name": "run0", "gallery_name": "gallery0", "query": list(range(10)), "gallery": list(range(10, 30))},
            {"name": "run1", "gallery_name": "gallery1", "query": list(range(20, 30)), "gallery": list(range(20))}]
    test = datamodule.TestImages(paths=[Path(f"{i}.png") for i in range(30)], identities=identities, runs=runs)
    scored = score_runs(features, test, gallery_mode="mean")
    labels = [int(i[1:]) for i in identities]
    for run, got in zip(runs, scored):
        persons = sorted({labels[g] for g in run["gallery"]})
        templates = [ref_template([features[g].double().numpy() for g in run["gallery"] if labels[g] == p])
                     for p in persons]
        expected = brute_force_metrics(features[run["query"]].numpy(), [labels[q] for q in run["query"]],
                                       np.array(templates), persons)
        assert got["gallery_size"] == len(persons) == 5
        for key in ("rank1", "rank5", "mAP"):
            assert got[key] == pytest.approx(expected[key], abs=1e-6)
    plain = score_runs(features, test)
    assert any(abs(a["mAP"] - b["mAP"]) > 1e-3 for a, b in zip(plain, scored))  # several photos: it differs


def test_eval_adds_mean_template_rows(world, tmp_path):
    data = make_layout(tmp_path / "data", n_train_ids=4, n_test_ids=4, per_id=3, runs=2)
    result = evaluate(eval_cfg(data, tmp_path / "out", "hand=dorsal_right", "gallery_mode=mean"))
    models = [e["model"] for e in result["entries"]]
    assert models == ["zero-shot CLIP", "zero-shot CLIP + mean templates"]
    plain, templated = result["entries"]
    # one gallery photo per person in each run (the 11k protocol's shape): the template is that photo
    assert templated["summary"]["rank1"] == pytest.approx(plain["summary"]["rank1"])
    assert templated["summary"]["mAP"] == pytest.approx(plain["summary"]["mAP"], abs=1e-6)
    md = Path(result["files"]["md"]).read_text() if "md" in result["files"] else ""
    assert "zero-shot CLIP + mean templates" in md
    calibration = json.loads((tmp_path / "out" / "eval" / "dorsal_right_zeroshot.calibration.json").read_text())
    assert set(calibration["modes"]) == set(DECISION_MODES)
