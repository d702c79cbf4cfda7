"""The 11k Hands protocol builder: split rules, reproducibility, output safety, input errors."""

from __future__ import annotations

import csv
import errno
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from handclip import prepare
from handclip.data import split as protocol
from handclip.data.split import prepare_dataset
from handclip.data.synthetic import generate_dataset
from handclip.errors import HandCLIPError
from handclip.hands import ELEVEN_K_HANDS, hand_dir_name
from handclip.hands import HAND_TYPES as ALL_HAND_TYPES
from handclip.hands import PUBLISHED_THRESHOLDS as DEFAULT_THRESHOLDS

#: The 11k protocol writes these four (HD's own: tests/test_prepare_hd.py).
HAND_TYPES = {hand: ALL_HAND_TYPES[hand] for hand in ELEVEN_K_HANDS}

RUNS = 3


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prep") / "raw"
    generate_dataset(out, subjects=12, images_per_aspect=3, seed=1, size=(64, 48), workers=1)
    return out


@pytest.fixture(scope="module")
def prepared(raw: Path, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("prepared") / "out"
    return out, prepare_dataset(raw, out, seed=0, runs=RUNS)


def _rows(raw_dir: Path) -> list[dict[str, str]]:
    with open(raw_dir / "HandInfo.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _write_rows(raw_dir: Path, rows: list[dict[str, str]]) -> None:
    with open(raw_dir / "HandInfo.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _copy_raw(raw: Path, dst: Path) -> Path:
    shutil.copytree(raw, dst)
    return dst


def _split(out: Path, hand: str, split: str) -> dict[str, set[str]]:
    root = out / hand_dir_name(hand) / split
    return {d.name: {f.name for f in d.iterdir()} for d in root.iterdir()} if root.is_dir() else {}


def _listing(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*"))


def _aspect(hand: str) -> str:
    return hand.replace("_", " ")


def test_accessory_images_excluded(raw: Path, prepared: tuple[Path, dict]) -> None:
    out, info = prepared
    accessory = {r["imageName"] for r in _rows(raw) if r["accessories"] == "1"}
    assert accessory
    written = {p.name for p in out.rglob("*.jpg")}
    assert written and not (written & accessory)
    assert info["excluded_accessory_images"] == len(accessory)


def test_identities_follow_thresholds(raw: Path, prepared: tuple[Path, dict]) -> None:
    out, _ = prepared
    rows = [r for r in _rows(raw) if r["accessories"] == "0"]
    for hand, threshold in ((h, DEFAULT_THRESHOLDS[h]) for h in HAND_TYPES):
        ids = {r["id"] for r in rows if r["aspectOfHand"] == _aspect(hand)}
        train_all, test = set(_split(out, hand, "train_all")), set(_split(out, hand, "test"))
        assert train_all == {i for i in ids if int(i) <= threshold}
        assert test == {i for i in ids if int(i) > threshold}
        assert train_all and test and not (train_all & test)


def test_train_val_partition_train_all(prepared: tuple[Path, dict]) -> None:
    out, info = prepared
    for hand in HAND_TYPES:
        train_all, train, val = (_split(out, hand, s) for s in ("train_all", "train", "val"))
        single = set(info["hands"][hand]["single_image_train_identities"])
        for identity, images in train_all.items():
            assert train[identity] | val.get(identity, set()) == images
            assert not (train[identity] & val.get(identity, set()))
            assert len(val.get(identity, set())) == (0 if identity in single else 1)


def test_query_gallery_partition_test(prepared: tuple[Path, dict]) -> None:
    out, info = prepared
    for hand in HAND_TYPES:
        test = _split(out, hand, "test")
        for run in range(RUNS):
            query, gallery = _split(out, hand, f"query{run}"), _split(out, hand, f"gallery{run}")
            assert set(gallery) == set(test)
            for identity, images in test.items():
                assert len(gallery[identity]) == 1
                assert query.get(identity, set()) | gallery[identity] == images
                assert not (query.get(identity, set()) & gallery[identity])
        assert not (out / hand_dir_name(hand) / f"query{RUNS}").exists()
        counts = info["hands"][hand]["counts"]
        assert counts["gallery0"]["identities"] == counts["test"]["identities"] == len(test)


def test_images_hard_linked(raw: Path, prepared: tuple[Path, dict]) -> None:
    out, _ = prepared
    image = next(out.rglob("*.jpg"))
    assert os.path.samefile(image, raw / "Hands" / image.name)


def test_copies_when_links_fail(raw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_link(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    out = tmp_path / "out"
    prepare_dataset(raw, out, runs=1)
    image = next(out.rglob("*.jpg"))
    assert not os.path.samefile(image, raw / "Hands" / image.name)
    assert image.read_bytes() == (raw / "Hands" / image.name).read_bytes()


def test_same_seed_same_split_other_seed_differs(raw: Path, prepared: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = prepared
    again, other = tmp_path / "again", tmp_path / "other"
    prepare_dataset(raw, again, seed=0, runs=RUNS)
    prepare_dataset(raw, other, seed=1, runs=RUNS)
    assert _listing(again) == _listing(out)
    assert (again / "split_info.json").read_bytes() == (out / "split_info.json").read_bytes()
    assert _listing(other) != _listing(out)


def test_split_half(raw: Path, tmp_path: Path) -> None:
    info = prepare_dataset(raw, tmp_path / "half", split="half", runs=1)
    assert info["split"] == "half" and info["thresholds"] is None
    rows = [r for r in _rows(raw) if r["accessories"] == "0"]
    for hand in HAND_TYPES:
        ids = sorted({r["id"] for r in rows if r["aspectOfHand"] == _aspect(hand)}, key=int)
        n_train = (len(ids) + 1) // 2
        assert set(_split(tmp_path / "half", hand, "train_all")) == set(ids[:n_train])
        assert set(_split(tmp_path / "half", hand, "test")) == set(ids[n_train:])


def test_custom_thresholds(raw: Path, tmp_path: Path) -> None:
    ids = sorted({int(r["id"]) for r in _rows(raw)})
    cut = ids[2]
    info = prepare_dataset(raw, tmp_path / "t", thresholds={"dorsal_r": cut}, runs=1)
    assert info["thresholds"]["dorsal_right"] == cut
    assert {int(i) for i in _split(tmp_path / "t", "dorsal_right", "train_all")} <= set(ids[:3])
    with pytest.raises(HandCLIPError, match="unknown hand type"):
        prepare_dataset(raw, tmp_path / "u", thresholds={"dorsal": 5})
    with pytest.raises(HandCLIPError, match="no test identities"):
        prepare_dataset(raw, tmp_path / "v", thresholds={"dorsal_right": 10**6})
    assert not (tmp_path / "u").exists() and not (tmp_path / "v").exists()


def test_single_image_identities_reported(raw: Path, tmp_path: Path) -> None:
    src = _copy_raw(raw, tmp_path / "raw")
    rows = _rows(src)
    dorsal = [r for r in rows if r["aspectOfHand"] == "dorsal right"]
    train_id = min(r["id"] for r in dorsal)
    test_id = max(r["id"] for r in dorsal)
    for identity in (train_id, test_id):
        mine = [r for r in dorsal if r["id"] == identity]
        for r in mine:
            r["accessories"] = "1"
        mine[0]["accessories"] = "0"
    _write_rows(src, rows)
    out = tmp_path / "out"
    info = prepare_dataset(src, out, runs=2)
    hand = info["hands"]["dorsal_right"]
    assert train_id in hand["single_image_train_identities"]
    assert test_id in hand["single_image_test_identities"]
    assert any(train_id in note for note in info["notes"]) and any(test_id in note for note in info["notes"])
    assert train_id not in _split(out, "dorsal_right", "val")
    assert len(_split(out, "dorsal_right", "train")[train_id]) == 1
    assert test_id not in _split(out, "dorsal_right", "query0")
    assert len(_split(out, "dorsal_right", "gallery0")[test_id]) == 1


def test_cross_aspect_galleries(raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "cross"
    prepare_dataset(raw, out, runs=2, cross_aspect=True)
    for hand in HAND_TYPES:
        merged = _split(out, hand, "gallery1_all")
        expected = {
            f"{identity}_{suffix}": images
            for other, suffix in HAND_TYPES.items()
            for identity, images in _split(out, other, "gallery1").items()
        }
        assert merged == expected
        assert not (out / hand_dir_name(hand) / "gallery2_all").exists()


def test_refuses_non_empty_out_and_force_replaces(raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    old = out / "train_val_test_split_dorsal_r" / "old.txt"  # an earlier prepare output
    old.parent.mkdir(parents=True)
    old.write_text("old")
    with pytest.raises(HandCLIPError, match="not empty.*--overwrite"):
        prepare_dataset(raw, out, runs=1)
    assert old.exists()
    prepare_dataset(raw, out, runs=1, overwrite=True)
    assert not old.exists()
    assert (out / "split_info.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary siblings left


def test_failure_keeps_old_output(raw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    (out / "train_val_test_split_dorsal_r").mkdir(parents=True)
    (out / "train_val_test_split_dorsal_r" / "old.txt").write_text("old")

    def broken(*args, **kwargs):
        raise HandCLIPError("the prepared split failed its self-check: simulated")

    monkeypatch.setattr(protocol, "verify_output", broken)
    with pytest.raises(HandCLIPError, match="self-check"):
        prepare_dataset(raw, out, runs=1, overwrite=True)
    assert _listing(tmp_path) == ["out", "out/train_val_test_split_dorsal_r",
                                  "out/train_val_test_split_dorsal_r/old.txt"]


def test_refuses_out_containing_raw(raw: Path) -> None:
    with pytest.raises(HandCLIPError, match="contains the raw data"):
        prepare_dataset(raw, raw.parent, overwrite=True)
    assert (raw / "HandInfo.csv").is_file()


def test_missing_csv(tmp_path: Path) -> None:
    (tmp_path / "raw" / "Hands").mkdir(parents=True)
    out = tmp_path / "new" / "out"
    with pytest.raises(HandCLIPError, match="HandInfo.csv not found"):
        prepare_dataset(tmp_path / "raw", out)
    assert not (tmp_path / "new").exists()


def test_missing_images(raw: Path, tmp_path: Path) -> None:
    src = _copy_raw(raw, tmp_path / "raw")
    rows = _rows(src)
    for r in rows[3:10]:
        (src / "Hands" / r["imageName"]).unlink()
    out = tmp_path / "new" / "out"
    with pytest.raises(HandCLIPError, match=r"7 image\(s\) .* missing .*" + rows[3]["imageName"] + r".*and 2 more"):
        prepare_dataset(src, out)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("id", "12a", "line 6: bad id '12a'"),
        ("aspectOfHand", "dorsal middle", "line 6: unknown aspectOfHand 'dorsal middle'"),
        ("accessories", "2", "line 6: accessories must be 0 or 1, got '2'"),
    ],
)
def test_malformed_row(raw: Path, tmp_path: Path, column: str, value: str, message: str) -> None:
    src = _copy_raw(raw, tmp_path / "raw")
    rows = _rows(src)
    rows[4][column] = value  # data row 5 = line 6 (line 1 is the header)
    _write_rows(src, rows)
    out = tmp_path / "new" / "out"
    with pytest.raises(HandCLIPError, match=message):
        prepare_dataset(src, out)
    assert not (tmp_path / "new").exists()


def test_short_row_and_missing_column(raw: Path, tmp_path: Path) -> None:
    src = _copy_raw(raw, tmp_path / "raw")
    lines = (src / "HandInfo.csv").read_text().splitlines()
    (src / "HandInfo.csv").write_text("\n".join(lines[:3] + [lines[3].rsplit(",", 2)[0]] + lines[4:]) + "\n")
    with pytest.raises(HandCLIPError, match="line 4: expected 9 columns, found 7"):
        prepare_dataset(src, tmp_path / "out")
    header = lines[0].replace("accessories,", "")
    (src / "HandInfo.csv").write_text("\n".join([header] + lines[1:]) + "\n")
    with pytest.raises(HandCLIPError, match="line 1: missing column.*accessories"):
        prepare_dataset(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli(raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert prepare.main(["--raw", str(raw), "--out", str(out), "--runs", "2", "--seed", "3",
                         "--thresholds", "dorsal_right=1050,palmar_l=1042"]) == 0
    printed = capsys.readouterr().out
    assert all(hand in printed for hand in HAND_TYPES)
    info = json.loads((out / "split_info.json").read_text())
    assert info["seed"] == 3 and info["runs"] == 2
    for argv in (["--raw", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")],
                 ["--raw", str(raw), "--out", str(out)],
                 ["--raw", str(raw), "--out", str(tmp_path / "y"), "--thresholds", "dorsal_right=abc"]):
        with pytest.raises(SystemExit) as exc:
            prepare.main(argv)
        assert exc.value.code == 2
        assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_force_refuses_a_folder_that_is_not_a_prepare_output(tmp_path, raw):
    out = tmp_path / "mixed"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(HandCLIPError, match="precious.txt"):
        prepare_dataset(raw, out, runs=1, overwrite=True)
    assert (out / "precious.txt").read_text() == "keep me"


# -- the published protocol, written out: ids on both sides of every threshold --------------------
#: 11k Hands (Afifi 2019): identities with id <= threshold train, the others test.
PUBLISHED = {
    "dorsal_right": {"train_all": {"0001049", "0001050"}, "test": {"0001051", "0001052"}},  # threshold 1050
    "dorsal_left": {"train_all": {"0001036", "0001037"}, "test": {"0001038", "0001039"}},  # 1037
    "palmar_right": {"train_all": {"0001050", "0001051"}, "test": {"0001052", "0001053"}},  # 1051
    "palmar_left": {"train_all": {"0001041", "0001042"}, "test": {"0001043", "0001044"}},  # 1042
}
#: How many photos each (hand, id) gets in the hand-made raw folder below.
TWO_IMAGES = ("dorsal_right", "0001049")  # a training identity with exactly two usable photos
FIVE_IMAGES = 5


def _boundary_raw(root: Path) -> Path:
    """A raw 11k folder written by hand: for each hand, ids threshold-1 and threshold (train) and
    threshold+1, threshold+2 (test), five photos each, except TWO_IMAGES which has two."""
    hands_dir = root / "Hands"
    hands_dir.mkdir(parents=True)
    photo = hands_dir / "_source.jpg"
    from PIL import Image

    Image.new("RGB", (8, 8), (120, 80, 60)).save(photo)
    lines = ["id,age,gender,skinColor,accessories,nailPolish,aspectOfHand,imageName,irregularities"]
    n = 0
    for hand, sides in PUBLISHED.items():
        for identity in sorted(sides["train_all"] | sides["test"]):
            for _ in range(2 if (hand, identity) == TWO_IMAGES else FIVE_IMAGES):
                name = f"Hand_{n:07d}.jpg"
                shutil.copyfile(photo, hands_dir / name)
                lines.append(f'"{identity}",30,male,fair,0,0,{hand.replace("_", " ")},{name},0')
                n += 1
    photo.unlink()
    (root / "HandInfo.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def boundary(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("boundary")
    raw = _boundary_raw(base / "raw")
    out = base / "out"
    prepare_dataset(raw, out, seed=0, runs=2)
    return raw, out


def test_published_thresholds_on_both_sides_of_each_boundary(boundary) -> None:
    _, out = boundary
    for hand, sides in PUBLISHED.items():
        assert set(_split(out, hand, "train_all")) == sides["train_all"], hand
        assert set(_split(out, hand, "test")) == sides["test"], hand


def test_two_image_identity_gets_one_val_image(boundary) -> None:
    _, out = boundary
    hand, identity = TWO_IMAGES
    assert len(_split(out, hand, "val")[identity]) == 1
    assert len(_split(out, hand, "train")[identity]) == 1
    info = json.loads((out / "split_info.json").read_text())
    assert info["hands"][hand]["single_image_train_identities"] == []
    for hand in PUBLISHED:  # every training identity has a val image and the rest in train
        val, train = _split(out, hand, "val"), _split(out, hand, "train")
        assert set(val) == PUBLISHED[hand]["train_all"]
        assert all(len(val[i]) == 1 and len(train[i]) == (1 if (hand, i) == TWO_IMAGES else 4) for i in val)


def test_val_image_is_drawn_at_random_by_the_seed(boundary, tmp_path) -> None:
    """Over seeds, every training identity's val image is sometimes not its first photo, and seeds differ."""
    raw, _ = boundary
    picks: dict[tuple[str, str], set[str]] = {}
    firsts: dict[tuple[str, str], str] = {}
    for seed in range(6):
        out = tmp_path / f"s{seed}"
        prepare_dataset(raw, out, seed=seed, runs=1)
        for hand in PUBLISHED:
            for identity, images in _split(out, hand, "val").items():
                picks.setdefault((hand, identity), set()).update(images)
                firsts[(hand, identity)] = min(_split(out, hand, "train_all")[identity])
    assert all(len(chosen) >= 2 for key, chosen in picks.items() if key != TWO_IMAGES)
    assert any(firsts[key] not in chosen for key, chosen in picks.items())
    assert picks[TWO_IMAGES] == set(_split(tmp_path / "s0", *TWO_IMAGES[:1], "train_all")[TWO_IMAGES[1]])


def test_gallery_image_is_drawn_at_random_per_run(boundary) -> None:
    _, out = boundary
    for hand, sides in PUBLISHED.items():
        for identity in sides["test"]:
            galleries = {next(iter(_split(out, hand, f"gallery{r}")[identity])) for r in range(2)}
            test = _split(out, hand, "test")[identity]
            assert galleries <= test and len(test) == FIVE_IMAGES


def test_self_check_catches_a_bad_split(raw: Path, tmp_path: Path) -> None:
    """verify_output rejects written files that differ from the plan, and plans that break the protocol."""
    records = protocol.read_hand_info(raw)
    plans = protocol.plan_dataset(records, seed=0, runs=2)
    out = tmp_path / "ok"
    protocol.write_plans(plans, raw / "Hands", out)
    protocol.verify_output(out, plans, 2)  # a correct split passes

    hand_dir = out / hand_dir_name("dorsal_right")
    stray = next((hand_dir / "val").rglob("*.jpg"))
    shutil.move(stray, hand_dir / "train" / stray.parent.name / stray.name)
    with pytest.raises(HandCLIPError, match="self-check.*planned file"):
        protocol.verify_output(out, plans, 2)

    import copy

    def broken(change) -> None:
        bad = copy.deepcopy(plans)
        change(bad["palmar_left"].splits)
        root = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
        protocol.write_plans(bad, raw / "Hands", root)
        with pytest.raises(HandCLIPError, match="self-check"):
            protocol.verify_output(root, bad, 2)

    test_id = next(iter(plans["palmar_left"].splits["test"]))
    train_id = next(iter(plans["palmar_left"].splits["train_all"]))
    broken(lambda s: s["train_all"].update({test_id: s["test"][test_id]}))  # an identity on both sides
    broken(lambda s: s["val"][train_id].append(s["train"][train_id].pop()))  # two val images
    broken(lambda s: s["gallery1"][test_id].append(s["query1"][test_id].pop()))  # two gallery images
    broken(lambda s: s["query0"].pop(test_id))  # query images lost


def test_prepare_runs_the_self_check(raw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that goes wrong is caught before the output is moved into place."""
    real = protocol.write_plans

    def dropping(plans, images_dir, root):
        linker = real(plans, images_dir, root)
        next(root.rglob("*.jpg")).unlink()
        return linker

    monkeypatch.setattr(protocol, "write_plans", dropping)
    with pytest.raises(HandCLIPError, match="self-check"):
        prepare_dataset(raw, tmp_path / "out", runs=1)
    assert not (tmp_path / "out").exists()


def test_thresholds_from_the_command_line() -> None:
    from handclip.data.split.plan import parse_thresholds

    assert parse_thresholds(" dorsal_right=1050, palmar_l = 1042 ,") == {"dorsal_right": 1050, "palmar_l": 1042}
    assert parse_thresholds("") == {}
    assert parse_thresholds("dorsal_right=0") == {"dorsal_right": 0}  # every identity on the test side
    from handclip.data.split.plan import resolve_thresholds

    for bad in (-1, True, 1.5, "7"):
        with pytest.raises(HandCLIPError, match=f"^threshold for palmar_left must be a non-negative integer id, got "
                                                f"{bad!r}$".replace("(", r"\(").replace(".", r"\.")):
            resolve_thresholds({"palmar_l": bad})
    with pytest.raises(HandCLIPError, match=r"expected one of dorsal_right, dorsal_left, palmar_right, palmar_left, hd "
                                            r"\(or dorsal_r, dorsal_l, palmar_r, palmar_l\)$"):
        resolve_thresholds({"dorsal": 5})
    for bad in ("dorsal_right", "dorsal_right=", "dorsal_right=10=50", "dorsal_right=-5", "dorsal_right=1e3"):
        with pytest.raises(HandCLIPError, match=f"^bad threshold '{bad}'; expected HAND=ID, e.g. dorsal_right=1050$"):
            parse_thresholds(bad)
    with pytest.raises(HandCLIPError, match="^unknown hand type 'dorsal_up' in thresholds"):
        parse_thresholds("dorsal_up=1000")


def test_one_hand_planned_from_hand_written_records() -> None:
    """plan_hand on records written here: ids in numeric order, accessories excluded and counted, an identity
    with only accessory photos dropped, single-image test ids in no query, and a side left empty refused."""
    from handclip.data.split.plan import check_split_sides, plan_hand
    from handclip.data.split.raw import Record

    rows = [("0000010", "a", False), ("0000010", "b", False), ("0000009", "c", False), ("0000009", "d", True),
            ("0000100", "e", False), ("0000100", "f", False), ("0000100", "g", False), ("0000050", "h", True)]
    records = [Record(line=n, identity=i, hand="dorsal_right", image=f"{img}.jpg", accessories=acc)
               for n, (i, img, acc) in enumerate(rows, start=2)]
    plan = plan_hand("dorsal_right", records, seed=0, runs=2, split="threshold", threshold=10)
    assert plan.train_ids == ["0000009", "0000010"] and plan.test_ids == ["0000100"]
    assert plan_hand("dorsal_right", records, seed=0, runs=1, split="threshold", threshold=0).train_ids == []
    assert plan.excluded_images == 2 and plan.no_usable_images == ["0000050"]
    assert plan.single_image_train == ["0000009"] and plan.splits["train"]["0000009"] == ["c.jpg"]
    assert "0000009" not in plan.splits["val"]
    for run in range(2):
        (gallery,) = plan.splits[f"gallery{run}"]["0000100"]
        assert sorted(plan.splits[f"query{run}"]["0000100"] + [gallery]) == ["e.jpg", "f.jpg", "g.jpg"]
    single = plan_hand("dorsal_right", records[:4], seed=0, runs=1, split="threshold", threshold=9)
    assert single.test_ids == ["0000010"] and "0000010" in single.splits["query0"]  # two images: one query
    lone = [Record(line=2, identity="0000200", hand="dorsal_right", image="z.jpg", accessories=False)]
    one_test = plan_hand("dorsal_right", records + lone, seed=0, runs=1, split="threshold", threshold=10)
    assert one_test.single_image_test == ["0000200"] and "0000200" not in one_test.splits["query0"]
    with pytest.raises(HandCLIPError, match=r"^dorsal_right: no test identities with threshold 1000 \(identities "
                                            r"0000009, 0000010, 0000100\.\.\.\); adjust --thresholds or use "
                                            r"--split half$"):
        check_split_sides(plan_hand("dorsal_right", records, seed=0, runs=1, split="threshold", threshold=1000),
                          "threshold", 1000)
    with pytest.raises(HandCLIPError, match=r"^dorsal_right: no train identities with threshold 5 "):
        check_split_sides(plan_hand("dorsal_right", records, seed=0, runs=1, split="threshold", threshold=5),
                          "threshold", 5)
    with pytest.raises(HandCLIPError, match=r"^dorsal_right: no test identities with --split half \(identities "
                                            r"0000010\.\.\.\)"):
        check_split_sides(plan_hand("dorsal_right", records[:2], seed=0, runs=1, split="half", threshold=0),
                          "half", 0)


def test_whole_dataset_plan_from_hand_written_records() -> None:
    """plan_dataset on records written here: every hand type present is planned (also after a missing one), the
    split mode and thresholds reach each hand, cross-aspect galleries only when asked, bad settings refused."""
    from handclip.data.split.raw import Record

    def records_for(hand, ids):
        return [Record(line=n, identity=i, hand=hand, image=f"{hand}-{i}-{k}.jpg", accessories=False)
                for n, (i, k) in enumerate(((i, k) for i in ids for k in range(3)), start=2)]

    ids = ["0000001", "0000002", "0000003", "0000004"]  # all below every published threshold
    records = records_for("dorsal_right", ids) + records_for("palmar_left", ids)  # dorsal_left and palmar_right absent
    plans = protocol.plan_dataset(records, seed=0, runs=2, split="half")
    assert list(plans) == ["dorsal_right", "palmar_left"]
    assert all(p.train_ids == ids[:2] and p.test_ids == ids[2:] for p in plans.values())
    assert not any(name.startswith("gallery") and name.endswith("_all") for p in plans.values() for name in p.splits)
    with_all = protocol.plan_dataset(records, seed=0, runs=2, split="half", cross_aspect=True)
    assert "gallery1_all" in with_all["palmar_left"].splits
    with pytest.raises(HandCLIPError, match=r"^dorsal_right: no test identities with threshold 1050 "):
        protocol.plan_dataset(records, seed=0, runs=2)  # threshold: every id is a training id
    assert protocol.plan_dataset(records, runs=1, thresholds={"dorsal_right": 2, "palmar_left": 3})[
        "palmar_left"].test_ids == ["0000004"]
    with pytest.raises(HandCLIPError, match=r"^unknown split 'halves'; expected one of threshold, half$"):
        protocol.plan_dataset(records, split="halves")
    for runs in (0, True, 1.5, "2"):
        with pytest.raises(HandCLIPError, match=rf"^runs must be a positive integer, got {re.escape(repr(runs))}$"):
            protocol.plan_dataset(records, runs=runs)
