"""The HD protocol builder (python -m handclip.prepare --dataset hd): ids from file names, the published threshold,
distractors in every gallery, the published counts, errors; and HD trained and evaluated like an 11k hand type."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import eval_cfg, quiet_overrides
from reference import brute_force_metrics

from handclip import prepare, synth
from handclip.data.split import plan_hd, prepare_dataset
from handclip.data.split.hd import HDImages
from handclip.data.split.raw import Record
from handclip.errors import HandCLIPError
from handclip.hands import PUBLISHED_THRESHOLDS, hand_dir_name

HD = hand_dir_name("hd")


def write_hd(raw: Path, main: dict[int, int], distractors: dict[int, int], extra: tuple[str, ...] = ()) -> Path:
    """An HD download of empty files (prepare never decodes): ``<id>_<n>.jpg`` per id and count, as in the real one."""
    for folder, counts in (("1-501", main), ("502-712", distractors)):
        (raw / "Original Images" / folder).mkdir(parents=True, exist_ok=True)
        for identity, n in counts.items():
            for k in range(1, n + 1):
                (raw / "Original Images" / folder / f"{identity}_{k}.jpg").write_bytes(b"")
    for rel in extra:
        (raw / "Original Images" / rel).write_bytes(b"")
    return raw


def tree(out: Path, split: str) -> dict[str, set[str]]:
    root = out / HD / split
    return {d.name: {f.name for f in d.iterdir()} for d in root.iterdir()} if root.is_dir() else {}


def test_the_published_threshold_at_id_minus_one_id_and_plus_one(tmp_path):
    assert PUBLISHED_THRESHOLDS["hd"] == 447  # MBA-Net's split script: id <= 447 trains
    raw = write_hd(tmp_path / "raw", {446: 3, 447: 3, 448: 3}, {502: 2})
    prepare_dataset(raw, tmp_path / "out", dataset="hd", runs=2)
    assert set(tree(tmp_path / "out", "train_all")) == {"0446", "0447"}
    assert set(tree(tmp_path / "out", "test")) == {"0448"}
    prepare_dataset(raw, tmp_path / "low", dataset="hd", runs=1, thresholds={"hd": 446})
    assert set(tree(tmp_path / "low", "train_all")) == {"0446"}
    assert set(tree(tmp_path / "low", "test")) == {"0447", "0448"}
    with pytest.raises(HandCLIPError, match=r"^hd: no test identities with threshold 448 "):
        prepare_dataset(raw, tmp_path / "high", dataset="hd", runs=1, thresholds={"hd": 448})
    assert not (tmp_path / "high").exists()


def test_identity_comes_from_the_file_name_never_the_listing_order(tmp_path):
    # listed by name, 10_* comes before 9_*; folder order would swap identities 9 and 10 (and 100, 500)
    raw = write_hd(tmp_path / "raw", {10: 2, 100: 3, 9: 4, 500: 2, 449: 3}, {600: 2})
    prepare_dataset(raw, tmp_path / "out", dataset="hd", runs=3)
    out = tmp_path / "out"
    assert tree(out, "train_all") == {"0009": {f"9_{k}.jpg" for k in (1, 2, 3, 4)}, "0010": {"10_1.jpg", "10_2.jpg"},
                                      "0100": {"100_1.jpg", "100_2.jpg", "100_3.jpg"}}
    assert tree(out, "test") == {"0449": {"449_1.jpg", "449_2.jpg", "449_3.jpg"}, "0500": {"500_1.jpg", "500_2.jpg"}}
    for split in ("train", "val", "query0", "gallery1"):
        for identity, images in tree(out, split).items():
            owner = identity.removeprefix("distractor_")
            assert all(int(name.split("_")[0]) == int(owner) for name in images), (split, identity)
    assert all(len(v) == 1 for v in tree(out, "val").values()) and set(tree(out, "val")) == set(tree(out, "train_all"))


def test_every_gallery_holds_all_distractors_under_labels_no_query_has(tmp_path):
    # 448 has images in both folders: the 502-712 ones stay distractors, under another label (and a note says so)
    raw = write_hd(tmp_path / "raw", {3: 3, 448: 3, 460: 2}, {502: 2, 712: 3, 713: 1})
    (raw / "Original Images" / "502-712" / "448_9.jpg").write_bytes(b"")
    info = prepare_dataset(raw, tmp_path / "out", dataset="hd", runs=4, seed=5)
    out = tmp_path / "out"
    distractors = {"distractor_0502": {"502_1.jpg", "502_2.jpg"}, "distractor_0713": {"713_1.jpg"},
                   "distractor_0712": {"712_1.jpg", "712_2.jpg", "712_3.jpg"}, "distractor_0448": {"448_9.jpg"}}
    for run in range(4):
        gallery, query = tree(out, f"gallery{run}"), tree(out, f"query{run}")
        assert {i: v for i, v in gallery.items() if i.startswith("distractor_")} == distractors
        assert set(gallery) - set(distractors) == {"0448", "0460"} == set(query)
        assert all(len(gallery[i]) == 1 and gallery[i] | query[i] == tree(out, "test")[i] for i in query)
        assert not set(query) & set(distractors)
    assert not any(i.startswith("distractor_") for s in ("train_all", "train", "val", "test") for i in tree(out, s))
    assert info["hands"]["hd"]["distractors"] == {"identities": 4, "images": 7}
    assert info["hands"]["hd"]["counts"]["gallery0"] == {"identities": 6, "images": 9}
    assert any("1-501 and 502-712" in note and "0448" in note for note in info["notes"])
    assert json.loads((out / "split_info.json").read_text()) == info


def _published_records() -> HDImages:
    """HD-shaped records with the published totals: 251 training ids with 2,407 images (148 x 10 + 103 x 9), 251 test
    ids with 2,243 (235 x 9 + 16 x 8), 213 distractor ids with 1,342 (64 x 7 + 149 x 6). The real per-identity counts
    and id numbers are not public here: these are constructed to those totals."""
    def records(ids, counts):
        return [Record(0, f"{i:04d}", "hd", f"{i}_{k}.jpg", False) for i, n in zip(ids, counts) for k in range(n)]

    train_ids = [i for i in range(1, 448) if i % 16 not in (1, 3, 5, 7, 9, 11, 13)][:251]
    main = records(train_ids, [10] * 148 + [9] * 103) + records(range(448, 699), [9] * 235 + [8] * 16)
    return HDImages(main, records(range(1502, 1715), [7] * 64 + [6] * 149), {})


def test_the_published_counts_in_every_run():
    images = _published_records()
    plan = plan_hd(images, seed=0, runs=10, threshold=447)["hd"]
    counts = {split: (len(ids), sum(map(len, ids.values()))) for split, ids in plan.splits.items()}
    assert counts["train"] == (251, 2156) and counts["val"] == (251, 251) and counts["test"] == (251, 2243)
    for run in range(10):
        assert counts[f"gallery{run}"] == (464, 1593) and counts[f"query{run}"] == (251, 1992)
    galleries = [frozenset(img for v in plan.splits[f"gallery{r}"].values() for img in v) for r in range(10)]
    assert len(set(galleries)) == 10  # ten different Monte Carlo draws


def test_split_info_reports_the_published_counts(tmp_path):
    images = _published_records()
    main = {int(r.identity): 0 for r in images.main}
    for r in images.main:
        main[int(r.identity)] += 1
    dis = {int(r.identity): 0 for r in images.distractors}
    for r in images.distractors:
        dis[int(r.identity)] += 1
    raw = write_hd(tmp_path / "raw", main, dis)
    info = prepare_dataset(raw / "Original Images", tmp_path / "out", dataset="hd", runs=2)
    counts = info["hands"]["hd"]["counts"]
    assert counts["train"] == {"identities": 251, "images": 2156}
    assert counts["val"] == {"identities": 251, "images": 251}
    assert counts["test"] == {"identities": 251, "images": 2243}
    for run in (0, 1):
        assert counts[f"gallery{run}"] == {"identities": 464, "images": 1593}
        assert counts[f"query{run}"] == {"identities": 251, "images": 1992}
    assert info["dataset"] == "hd" and info["thresholds"] == {"hd": 447} and info["raw_images"] == 5992


def test_same_seed_same_split(tmp_path):
    raw = write_hd(tmp_path / "raw", {i: 4 for i in (5, 40, 300, 450, 470, 490)}, {520: 3})
    one = prepare_dataset(raw, tmp_path / "a", dataset="hd", runs=3, seed=1)
    two = prepare_dataset(raw, tmp_path / "b", dataset="hd", runs=3, seed=1)
    other = prepare_dataset(raw, tmp_path / "c", dataset="hd", runs=3, seed=2)
    assert one == two and one["hands"]["hd"]["listing_sha256"] != other["hands"]["hd"]["listing_sha256"]


def test_split_half_ignores_the_threshold_but_keeps_the_distractors(tmp_path):
    raw = write_hd(tmp_path / "raw", {1: 2, 2: 2, 3: 2, 4: 2, 5: 2}, {520: 2})
    info = prepare_dataset(raw, tmp_path / "out", dataset="hd", runs=1, split="half")
    assert set(tree(tmp_path / "out", "train_all")) == {"0001", "0002", "0003"}
    assert set(tree(tmp_path / "out", "gallery0")) == {"0004", "0005", "distractor_0520"}
    assert info["thresholds"] is None and info["protocol"].startswith("HD: sorted identities of 1-501 split in half")


def test_bad_input_is_one_error_line(tmp_path, capsys):
    raw = write_hd(tmp_path / "raw", {1: 2, 460: 2}, {600: 2}, extra=("1-501/IMG0007.jpg", "1-501/Thumbs.db"))
    cases = [
        (["--raw", str(raw)], r"1 image\(s\) in .*1-501 do not name their identity: IMG0007\.jpg; expected <id>_<n>"),
        (["--raw", str(tmp_path)], r"holds no 1-501/ folder .*Original Images/1-501/<id>_<n>\.jpg"),
        (["--raw", str(raw), "--cross-aspect"], r"--cross-aspect needs the four 11k hand types"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exc:
            prepare.main(["--dataset", "hd", *argv, "--out", str(tmp_path / "out")])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and len(err.splitlines()) == 1
        assert re.search(message, err), err
    (raw / "Original Images" / "1-501" / "IMG0007.jpg").unlink()
    (raw / "Original Images" / "502-712" / "1_2.jpg").write_bytes(b"")  # the same file name in both folders
    with pytest.raises(HandCLIPError, match=r"image name '1_2\.jpg' is in both .*1-501 and .*502-712"):
        prepare_dataset(raw, tmp_path / "out", dataset="hd")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_synthetic_hd_prepared_trained_and_evaluated(tmp_path, capsys):
    """synth --dataset hd -> prepare --dataset hd -> a short training of hand=hd -> eval: the comparison has hd rows,
    each run's figures those of a brute-force ranking of its query folder against its gallery, distractors included."""
    from handclip.config import compose
    from handclip.data.datamodule import HandDataModule
    from handclip.data.layout import discover_hand, list_split
    from handclip.eval import evaluate
    from handclip.models.checkpoint import load_module
    from handclip.train import train

    raw, data, out = tmp_path / "raw", tmp_path / "data", tmp_path / "out"
    assert synth.main(["--dataset", "hd", "--out", str(raw), "--subjects", "16", "--images-per-aspect", "3",
                       "--size", "64x48", "--workers", "1"]) == 0
    assert prepare.main(["--dataset", "hd", "--raw", str(raw), "--out", str(data), "--runs", "2"]) == 0
    info = json.loads((data / "split_info.json").read_text())["hands"]["hd"]
    assert info["distractors"]["identities"] == 5 and info["counts"]["train_all"]["identities"] == 6
    train(compose("train", ["experiment=demo", "hand=hd", f"paths.data_dir={data}", *quiet_overrides(out),
                            "trainer.max_epochs=1", "trainer.enable_progress_bar=false"]))
    ckpt = out / "train" / "hd" / "checkpoints" / "best.ckpt"
    result = evaluate(eval_cfg(data, out, "all=true"))
    rows = [(e["hand"], e["model"], e["status"]) for e in result["entries"]]
    assert rows == [("hd", "zero-shot CLIP", "ok"), ("hd", "HandCLIP (fine-tuned)", "ok")]
    assert "| hd | HandCLIP (fine-tuned) |" in capsys.readouterr().out
    tuned = result["entries"][1]
    encoder = load_module(ckpt).encoder.eval()
    dm = HandDataModule(str(data), "hd", encoder.preprocess, cache=False, progress=False)
    for run, (query, gallery) in zip(tuned["runs"], discover_hand(data, "hd").runs):
        feats, labels = {}, {}
        for split in (query, gallery):
            samples = list_split(data, "hd", split)
            with torch.no_grad():
                feats[split] = torch.cat([encoder.embed(dm.loader(s.path).unsqueeze(0)) for s in samples])
            labels[split] = [s.identity for s in samples]
        names = sorted(set(labels[query]) | set(labels[gallery]))
        as_int = {n: i for i, n in enumerate(names)}
        ref = brute_force_metrics(feats[query], [as_int[n] for n in labels[query]], feats[gallery],
                                  [as_int[n] for n in labels[gallery]])
        assert run["gallery_size"] == len(labels[gallery]) == info["counts"]["gallery0"]["images"]
        assert run["rank1"] == pytest.approx(ref["rank1"], abs=1e-6)
        assert run["mAP"] == pytest.approx(ref["mAP"], abs=1e-6)


def test_the_self_check_catches_broken_distractors(tmp_path):
    """verify_output rejects an HD split whose galleries lose a distractor image, or whose query holds one."""
    import copy

    from handclip.data.split import read_hd, verify_output, write_plans

    raw = write_hd(tmp_path / "raw", {1: 2, 2: 2, 460: 3, 470: 2}, {502: 2, 600: 1})
    images = read_hd(raw)
    plans = plan_hd(images, seed=0, runs=2, threshold=447)
    write_plans(plans, images.sources, tmp_path / "ok")
    verify_output(tmp_path / "ok", plans, 2)  # a correct split passes

    def broken(change, message):
        bad = copy.deepcopy(plans)
        change(bad["hd"].splits)
        root = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
        write_plans(bad, images.sources, root)
        with pytest.raises(HandCLIPError, match=f"self-check.*{message}"):
            verify_output(root, bad, 2)

    broken(lambda s: s["gallery1"]["distractor_0502"].pop(), "gallery1 does not hold every distractor image")
    broken(lambda s: s["gallery0"].pop("distractor_0600"), "gallery0 identities differ")
    broken(lambda s: s["query1"].update({"distractor_0600": ["600_1.jpg"]}), "query1 holds distractor identities")
