"""python -m handclip.identify: results against brute force from exported embeddings, decisions, the gallery
index (reuse, update, refusal), pictures, and every bad input of the issue."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_layout, run_module, tiny_cfg, write_image
from PIL import Image

from handclip.config import compose
from handclip.errors import HandCLIPError
from handclip.evaluation.calibration import sidecar_path
from handclip.export import export
from handclip.identify import identify
from handclip.identify.embeddings_export import load_embeddings
from handclip.identify.images import default_workers
from handclip.train import train

HAND_DIR = "train_val_test_split_dorsal_r"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 2-epoch tiny model (with its calibration), and a gallery and queries made of the test identities."""
    base = tmp_path_factory.mktemp("identify")
    data = make_layout(base / "data", n_train_ids=6, n_test_ids=6, per_id=4, runs=1)
    train(tiny_cfg(data, base / "out", "trainer.max_epochs=2"))
    ckpt = base / "out" / "train" / "dorsal_right" / "checkpoints" / "best.ckpt"
    for ident_dir in sorted((data / HAND_DIR / "test").iterdir()):
        images = sorted(ident_dir.iterdir())
        for i, image in enumerate(images):
            target = base / ("gallery" if i < 2 else "queries") / ident_dir.name / image.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(image, target)
    return {"base": base, "ckpt": ckpt, "gallery": base / "gallery", "queries": base / "queries"}


def cfg(world, out: Path, *extra: str, ckpt: bool = True):
    args = ["experiment=demo", f"paths.output_root={out}", "progress=false", "num_workers=0",
            f"gallery={world['gallery']}", f"query={world['queries']}"]
    if ckpt:
        args.append(f"ckpt_path={world['ckpt']}")
    return compose("identify", args + list(extra))


def copy_gallery(world, tmp_path: Path) -> dict:
    gallery = tmp_path / "gallery"
    shutil.copytree(world["gallery"], gallery)
    return {**world, "gallery": gallery}


def test_top_k_and_scores_equal_brute_force_from_exported_embeddings(world, tmp_path):
    result = identify(cfg(world, tmp_path, "index_dtype=float32", "top_k=4"))
    exported = {}
    for name in ("gallery", "queries"):
        out = tmp_path / f"{name}.npz"
        export(compose("export", ["experiment=demo", "format=embeddings", f"ckpt_path={world['ckpt']}",
                                  f"images={world[name]}", f"out={out}", "progress=false", "num_workers=0"]))
        exported[name] = load_embeddings(out)
    gal, qry = exported["gallery"], exported["queries"]
    assert gal["meta"]["model"]["fingerprint"] == result["model"]["fingerprint"]
    assert len(result["queries"]) == len(qry["paths"]) == 12
    for record in result["queries"]:
        q = qry["embeddings"][qry["paths"].index(record["query"])].astype(np.float64)
        best: dict[str, tuple[float, str]] = {}  # identity -> (best score, its file): plain loops
        for g, path, ident in zip(gal["embeddings"].astype(np.float64), gal["paths"], gal["identities"]):
            s = float(q @ g)
            if ident not in best or s > best[ident][0]:
                best[ident] = (s, path)
        ranked = sorted(best.items(), key=lambda kv: -kv[1][0])[:4]
        assert [t["identity"] for t in record["top"]] == [ident for ident, _ in ranked]
        assert [t["score"] for t in record["top"]] == pytest.approx([s for _, (s, _) in ranked], abs=1e-5)
        assert [t["file"] for t in record["top"]] == [path for _, (_, path) in ranked]
        assert record["true_identity"] == Path(record["query"]).parent.name  # known from its folder name


def test_decisions_follow_the_calibrated_threshold(world, tmp_path):
    result = identify(cfg(world, tmp_path))
    calibration = json.loads(sidecar_path(world["ckpt"]).read_text())
    assert result["threshold"]["threshold"] == calibration["threshold"]
    assert result["threshold"]["source"] == str(sidecar_path(world["ckpt"]))
    for r in result["queries"]:
        expected = r["top"][0]["identity"] if r["top"][0]["score"] >= calibration["threshold"] else "unknown"
        assert r["decision"] == expected and r["correct"] == (expected == r["true_identity"])
    summary = json.loads((tmp_path / "identify" / "queries-vs-gallery" / "results.json").read_text())["summary"]
    assert summary["identified"] + summary["unknown"] == summary["queries"] == 12


def test_unknown_when_below_the_threshold_and_other_fmr_levels(world, tmp_path):
    high = identify(cfg(world, tmp_path, "threshold=1.01", "name=high"))
    assert {r["decision"] for r in high["queries"]} == {"unknown"}
    low = identify(cfg(world, tmp_path, "threshold=-1", "name=low", "pictures=false"))
    assert [r["decision"] for r in low["queries"]] == [r["top"][0]["identity"] for r in low["queries"]]
    loose = identify(cfg(world, tmp_path, "target_fmr=0.1", "name=loose", "pictures=false"))
    calibration = json.loads(sidecar_path(world["ckpt"]).read_text())
    level = next(row for row in calibration["levels"] if row["target_fmr"] == 0.1)
    assert loose["threshold"]["threshold"] == level["threshold"] <= calibration["threshold"]
    with pytest.raises(HandCLIPError, match="no threshold for FMR 0.05"):
        identify(cfg(world, tmp_path, "target_fmr=0.05", "name=x"))


def test_results_files_and_pictures(world, tmp_path):
    result = identify(cfg(world, tmp_path, "top_k=3"))
    out = tmp_path / "identify" / "queries-vs-gallery"
    assert result["files"] == {"json": out / "results.json", "csv": out / "results.csv", "rankings": out / "rankings"}
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 12 * 3 and rows[0].startswith("query,true_identity,decision")
    pictures = sorted((out / "rankings").glob("*.png"))
    assert len(pictures) == 12 and {Path(r["picture"]) for r in result["queries"]} == set(pictures)
    with Image.open(pictures[0]) as img:
        img.load()
        # query + 3 gallery images side by side, each with a 6-pixel border
        assert img.width >= 4 * 150 and img.height > 150
        colours = {img.getpixel((x, 40)) for x in range(img.width)}
    assert (34, 139, 34) in colours or (205, 38, 38) in colours  # green/red borders: the truth is known


def count_decodes(monkeypatch) -> list:
    import handclip.identify.images as images_mod

    seen = []
    real = images_mod.ImageLoader

    class Counting(real):
        def __call__(self, path):
            seen.append(Path(path))
            return super().__call__(path)

    monkeypatch.setattr(images_mod, "ImageLoader", Counting)
    return seen


def test_index_reuse_update_and_rebuild(world, tmp_path, monkeypatch):
    w = copy_gallery(world, tmp_path)
    first = identify(cfg(w, tmp_path, "name=a", "pictures=false"))
    status = first["gallery"]["index_status"]
    assert status["status"] == "built" and status["embedded"] == 12
    seen = count_decodes(monkeypatch)
    second = identify(cfg(w, tmp_path, "name=b", "pictures=false"))
    assert second["gallery"]["index_status"] == {"status": "reused", "embedded": 0, "decoded": 0, "rows": 12}
    assert all(p.is_relative_to(w["queries"]) for p in seen) and len(seen) == 12  # no gallery image decoded
    assert [r["top"] for r in second["queries"]] == [r["top"] for r in first["queries"]]
    # one file changed, one removed, one added: only the changed and the new one are embedded
    ids = sorted(p.name for p in w["gallery"].iterdir())
    changed = sorted((w["gallery"] / ids[0]).iterdir())[0]
    write_image(changed, seed=99, size=(48, 48), identity=7)
    sorted((w["gallery"] / ids[1]).iterdir())[0].unlink()
    write_image(w["gallery"] / "newcomer.png", seed=3, size=(48, 48), identity=8)
    seen.clear()
    third = identify(cfg(w, tmp_path, "name=c", "pictures=false"))
    status = third["gallery"]["index_status"]
    assert status["status"] == "updated"
    assert (status["embedded"], status["reused_rows"], status["removed_rows"]) == (2, 10, 2)
    assert sorted(p.name for p in seen if not p.is_relative_to(w["queries"])) == sorted([changed.name, "newcomer.png"])
    fresh = identify(cfg(w, tmp_path, "name=d", "pictures=false", f"index={tmp_path / 'fresh-index'}"))
    for updated, anew in zip(third["queries"], fresh["queries"]):  # as if built anew
        assert [t["file"] for t in updated["top"]] == [t["file"] for t in anew["top"]]
        assert [t["score"] for t in updated["top"]] == pytest.approx([t["score"] for t in anew["top"]], abs=2e-3)
    entries = json.loads((Path(third["gallery"]["index"]) / "entries.json").read_text())
    assert third["gallery"]["identities"] == 7 and ["newcomer.png", "newcomer"] == entries[-1][:2]


def test_index_of_another_model_is_refused(world, tmp_path):
    index = tmp_path / "my-index"
    identify(cfg(world, tmp_path, f"index={index}", "name=a", "pictures=false"))
    zero = ("threshold=0.5", f"index={index}", "pictures=false")
    with pytest.raises(HandCLIPError, match=r"my-index' was made by another model .*overwrite=true"):
        identify(cfg(world, tmp_path, *zero, "name=b", ckpt=False))
    rebuilt = identify(cfg(world, tmp_path, *zero, "name=c", "overwrite=true", ckpt=False))
    assert rebuilt["gallery"]["index_status"]["status"] == "rebuilt"
    # the same model (zero-shot tiny) with other weights: rebuilt, and said so
    other = identify(cfg(world, tmp_path, *zero, "name=d", "seed=7", ckpt=False))
    assert other["gallery"]["index_status"]["status"] == "rebuilt"
    assert "weights" in other["gallery"]["index_status"]["reason"]
    not_an_index = tmp_path / "photos"
    not_an_index.mkdir()
    (not_an_index / "keep.txt").write_text("mine")
    with pytest.raises(HandCLIPError, match="is not a HandCLIP gallery index"):
        identify(cfg(world, tmp_path, f"index={not_an_index}", "name=e", "overwrite=true"))
    assert (not_an_index / "keep.txt").read_text() == "mine"


def test_unreadable_queries_and_gallery_files_are_named_counted_and_skipped(world, tmp_path, caplog):
    w = copy_gallery(world, tmp_path)
    queries = tmp_path / "queries"
    shutil.copytree(world["queries"], queries)
    (queries / "0002000" / "broken.jpg").write_bytes(b"not a jpeg")
    (queries / "notes.txt").write_text("not an image: ignored")
    (w["gallery"] / "0002001" / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    w = {**w, "queries": queries}
    with caplog.at_level("WARNING"):
        result = identify(cfg(w, tmp_path, "pictures=false"))
    assert [s["query"] for s in result["skipped_queries"]] == [str(queries / "0002000" / "broken.jpg")]
    assert len(result["queries"]) == 12  # the rest processed
    assert "1 query file(s) could not be read" in caplog.text and "broken.jpg" in caplog.text
    assert "truncated.png" in caplog.text and result["gallery"]["images"] == 12
    assert [s[0] for s in result["gallery"]["unreadable"]] == ["0002001/truncated.png"]
    caplog.clear()
    with caplog.at_level("WARNING"):
        again = identify(cfg(w, tmp_path, "pictures=false", "overwrite=true"))
    assert again["gallery"]["index_status"]["status"] == "reused" and "truncated.png" in caplog.text


@pytest.mark.parametrize(("setup", "message"), [
    ("not_an_image", r"query '.*notes.txt' is not an image"),
    ("missing_query", r"query '.*nowhere' not found"),
    ("empty_glob", r"query pattern '.*\*.jpg' matches no image files"),
    ("empty_gallery", r"gallery '.*' holds no images"),
    ("one_image_gallery", r"holds 1 image\(s\) of a single identity .*at least 2"),
    ("no_threshold", r"has no calibrated open-set threshold \(best.calibration.json not found beside it.*"
                     r"python -m handclip.eval hand=dorsal_right ckpt_path=.*threshold=VALUE"),
    ("zero_shot_no_threshold", r"the zero-shot model has no calibrated open-set threshold.*calibration=FILE"),
    ("other_weights", r"was computed for other weights than this model's"),
    ("results_exist", r"already holds results .*overwrite=true"),
])
def test_bad_input(world, tmp_path, setup, message):
    extra, ckpt = [], True
    if setup == "not_an_image":
        (tmp_path / "notes.txt").write_text("hello")
        extra.append(f"query={tmp_path / 'notes.txt'}")
    elif setup == "missing_query":
        extra.append(f"query={tmp_path / 'nowhere'}")
    elif setup == "empty_glob":
        extra.append(f"query={tmp_path}/*.jpg")
    elif setup == "empty_gallery":
        (tmp_path / "g").mkdir()
        extra.append(f"gallery={tmp_path / 'g'}")
    elif setup == "one_image_gallery":
        write_image(tmp_path / "g" / "person" / "a.png", seed=1)
        extra.append(f"gallery={tmp_path / 'g'}")
    elif setup in ("no_threshold", "other_weights"):
        ckpt_copy = tmp_path / "best.ckpt"
        shutil.copy2(world["ckpt"], ckpt_copy)
        if setup == "other_weights":
            cal = json.loads(sidecar_path(world["ckpt"]).read_text())
            sidecar_path(ckpt_copy).write_text(json.dumps({**cal, "model_fingerprint": "f" * 20}))
        extra.append(f"ckpt_path={ckpt_copy}")
    elif setup == "zero_shot_no_threshold":
        ckpt = False
    elif setup == "results_exist":
        identify(cfg(world, tmp_path, "pictures=false"))
    with pytest.raises(HandCLIPError, match=message):
        identify(cfg(world, tmp_path, *extra, ckpt=ckpt))
    assert not (tmp_path / "identify" / "index").exists() or setup == "results_exist"  # refused before any work


@pytest.mark.slow  # a new Python process (~8-11 s here)
def test_cli_one_error_line_and_exit_status_2(world, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    result = run_module("handclip.identify", "experiment=demo", f"paths.output_root={tmp_path}",
                        f"ckpt_path={world['ckpt']}", f"gallery={world['gallery']}", f"query={tmp_path / 'notes.txt'}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: query ") and "Traceback" not in result.stderr


def test_a_score_exactly_at_the_threshold_is_accepted(world, tmp_path):
    """The README's rule, at its boundary: accepted when the top score is >= the threshold, equality included."""
    from handclip.identify.results import decide

    top = [{"rank": 1, "identity": "a", "score": 0.5, "file": "x"}]
    assert decide(Path("q.png"), None, top, 0.5)["decision"] == "a"
    assert decide(Path("q.png"), None, top, float(np.nextafter(0.5, 1)))["decision"] == "unknown"
    first = identify(cfg(world, tmp_path, "threshold=-1", "name=all", "pictures=false"))
    record = first["queries"][0]
    score = record["top"][0]["score"]  # a real score, as identify computed it
    at = identify(cfg(world, tmp_path, f"threshold={score!r}", "name=at", "pictures=false"))
    above = identify(cfg(world, tmp_path, f"threshold={float(np.nextafter(score, 2))!r}", "name=above",
                         "pictures=false"))
    assert at["threshold"]["threshold"] == score
    assert at["queries"][0]["decision"] == record["top"][0]["identity"] and at["queries"][0]["accepted"] is True
    assert above["queries"][0]["decision"] == "unknown" and above["queries"][0]["accepted"] is False


def test_a_gallery_photo_changed_without_changing_size_is_embedded_again(world, tmp_path, monkeypatch):
    """The index key holds the modification time, not only the size: a photo rewritten with other pixels and the
    same number of bytes (uncompressed PNG) is embedded again."""
    w = copy_gallery(world, tmp_path)
    photo = sorted(sorted(w["gallery"].iterdir())[0].iterdir())[0]
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(photo, format="PNG", compress_level=0)
    size = photo.stat().st_size
    first = identify(cfg(w, tmp_path, "name=a", "pictures=false", "index_dtype=float32"))
    before = photo.stat().st_mtime_ns
    Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(photo, format="PNG", compress_level=0)
    assert photo.stat().st_size == size  # same number of bytes, other pixels
    os.utime(photo, ns=(before + 2_000_000_000, before + 2_000_000_000))  # a later write, as a clock would give
    seen = count_decodes(monkeypatch)
    second = identify(cfg(w, tmp_path, "name=b", "pictures=false", "index_dtype=float32"))
    status = second["gallery"]["index_status"]
    assert status["status"] == "updated" and status["embedded"] == 1
    assert [p for p in seen if not p.is_relative_to(w["queries"])] == [photo]
    scores = lambda result: {t["file"]: t["score"] for r in result["queries"] for t in r["top"]}  # noqa: E731
    changed = {f for f in scores(first).keys() & scores(second).keys() if scores(first)[f] != scores(second)[f]}
    assert changed == {str(photo)}  # only the rewritten photo scores differently


def test_decoding_processes_only_beside_a_device_and_for_enough_files(monkeypatch):
    import torch

    from handclip.identify import images

    monkeypatch.setattr(images, "usable_cpus", lambda: 16)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert default_workers(10_000, 64, cpu, "draft") == 0  # cheap decoding beside a forward on every core
    assert default_workers(10_000, 64, cuda, "draft") == default_workers(10_000, 64, cpu) == 4
    assert default_workers(128, 64, cuda) == 4 and default_workers(127, 64, cuda) == 0  # at 2 batches exactly
    assert default_workers(127, 64, cpu) == 0
    monkeypatch.setattr(images, "usable_cpus", lambda: 2)
    assert default_workers(128, 64, cpu, "full") == 2
