"""identify and export under faults and bad input (issue 25): odd images and file names, links that lead nowhere,
unwritable or claimed outputs, killed runs, corrupted indexes, overwrite=true. Zero-shot tiny model, threshold
given: no training needed."""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_env, write_image
from PIL import Image

from handclip.command_line import check_override_keys, quote_non_ascii
from handclip.config import compose
from handclip.data.images import load_rgb, to_rgb
from handclip.errors import HandCLIPError
from handclip.evaluation.pictures import thumbnail
from handclip.export import export
from handclip.identify import identify
from handclip.identify import run as run_mod
from handclip.identify.embeddings_export import load_embeddings
from handclip.identify.results import write_results
from handclip.identify.sources import resolve_queries, scan_gallery
from handclip.utils.files import printable, publish, temp_path
from handclip.utils.locks import claim


def make_world(base: Path) -> dict:
    """3 identities x 2 gallery images, one query of each of 2 identities."""
    for i in range(3):
        for k in range(2):
            write_image(base / "gallery" / f"p{i}" / f"g{k}.png", seed=k, identity=i)
    for i in range(2):
        write_image(base / "queries" / f"p{i}" / "q.png", seed=7, identity=i)
    return {"base": base, "gallery": base / "gallery", "queries": base / "queries", "out": base / "out"}


@pytest.fixture
def world(tmp_path) -> dict:
    return make_world(tmp_path)


def cfg(w: dict, *extra: str):
    return compose("identify", ["experiment=demo", f"paths.output_root={w['out']}", "progress=false", "num_workers=0",
                                f"gallery={w['gallery']}", f"query={w['queries']}", "threshold=0.5", *extra])


@pytest.fixture
def embeds(monkeypatch) -> list:
    """The number of files each embedding pass of identify was given, in order."""
    calls: list[int] = []
    for module in ("handclip.identify.run", "handclip.identify.index"):
        real = __import__(module, fromlist=["embed_files"]).embed_files
        monkeypatch.setattr(f"{module}.embed_files", lambda enc, paths, *a, _real=real, **k:
                            calls.append(len(paths)) or _real(enc, paths, *a, **k))
    return calls


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*"))


# -- 1. decoding: every mode Pillow opens -----------------------------------------------------
def _gray(mode: str, level: int = 124) -> Image.Image:
    """An 8 x 8 image of ``mode`` whose brightness is ``level`` of 255."""
    arrays = {"I;16": "<u2", "I;16L": "<u2", "I;16B": ">u2", "I;16N": "=u2", "I": "=i4"}
    if mode in arrays:
        return Image.frombytes(mode, (8, 8), np.full((8, 8), level * 257, dtype=arrays[mode]).tobytes())
    if mode == "F":
        return Image.frombytes(mode, (8, 8), np.full((8, 8), level / 255, dtype="=f4").tobytes())
    return Image.new("RGB", (8, 8), (level, level, level)).convert(mode)


@pytest.mark.parametrize("mode", sorted(Image.MODES))
def test_every_image_mode_decodes_to_its_brightness(mode):
    img = _gray(mode)
    assert img.mode == mode
    rgb = np.asarray(to_rgb(img, "x.png"), dtype=np.float64)
    assert rgb.shape == (8, 8, 3)
    assert abs(rgb.mean() - 124) <= (4 if mode == "1" else 1)  # "1" dithers to black and white


@pytest.mark.parametrize("fmt", ["png", "tiff"])
def test_16_bit_grayscale_photos_are_scaled_not_white(tmp_path, fmt):
    values = (np.arange(48 * 64).reshape(48, 64) * 21).astype(np.uint16)
    path = tmp_path / f"gray16.{fmt}"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I;16")
    expected = np.rint(values / 257.0)
    assert np.array_equal(np.asarray(load_rgb(path))[..., 0], expected)
    assert abs(np.asarray(thumbnail(path, 64)).mean() - expected.mean()) < 2  # the pictures' decoder too


@pytest.mark.parametrize(("mode", "values"), [("F", [0.0, 2.5]), ("F", [0.0, float("nan")]), ("I", [-5, 10]),
                                              ("I", [0, 70000])])
def test_values_without_a_brightness_scale_name_the_file(mode, values):
    img = Image.frombytes(mode, (2, 1), np.array(values, dtype="=f4" if mode == "F" else "=i4").tobytes())
    with pytest.raises(HandCLIPError, match=r"image 'odd.tif' is a .* \(mode " + mode):
        to_rgb(img, "odd.tif")


def test_values_at_the_bounds_are_read():
    assert np.asarray(to_rgb(Image.frombytes("I", (2, 1), np.array([0, 65535], "=i4").tobytes()), "x"))[0, 1, 0] == 255
    assert np.asarray(to_rgb(Image.frombytes("F", (2, 1), np.array([0, 1], "=f4").tobytes()), "x"))[0, 1, 0] == 255


# -- 2. links that lead nowhere ---------------------------------------------------------------
def test_broken_and_looping_links_are_named_and_counted(world, capsys):
    (world["gallery"] / "p1" / "broken.png").symlink_to(world["base"] / "nowhere.png")
    (world["gallery"] / "p2" / "loop.png").symlink_to(world["gallery"] / "p2" / "loop.png")
    (world["queries"] / "p0" / "gone.jpg").symlink_to(world["base"] / "gone.jpg")
    assert {f.rel for f in scan_gallery(world["gallery"])} >= {"p1/broken.png", "p2/loop.png"}
    assert world["queries"] / "p0" / "gone.jpg" in resolve_queries(str(world["queries"] / "*" / "*.jpg"))
    result = identify(cfg(world, "pictures=false"))
    assert sorted(s[0] for s in result["gallery"]["unreadable"]) == ["p1/broken.png", "p2/loop.png"]
    assert "Too many levels of symbolic links" in json.dumps(result["gallery"]["unreadable"])
    assert [s["query"] for s in result["skipped_queries"]] == [str(world["queries"] / "p0" / "gone.jpg")]
    assert result["gallery"]["images"] == 6 and len(result["queries"]) == 2
    (world["base"] / "nowhere.png").write_bytes((world["gallery"] / "p0" / "g0.png").read_bytes())
    again = identify(cfg(world, "pictures=false", "overwrite=true"))  # the link now leads to an image: read
    assert [s[0] for s in again["gallery"]["unreadable"]] == ["p2/loop.png"] and again["gallery"]["images"] == 7


# -- 3. any character in a file name ----------------------------------------------------------
def test_file_names_with_newlines_and_bytes_that_are_not_utf8(world, capsys):
    odd_query = world["queries"] / "p0" / "new\nline.png"
    write_image(odd_query, seed=5, identity=0)
    write_image(world["gallery"] / "p1" / os.fsdecode(b"caf\xe9.png"), seed=3, identity=1)
    result = identify(cfg(world))
    assert result["gallery"]["images"] == 7 and str(odd_query) in [r["query"] for r in result["queries"]]
    out = world["out"] / "identify" / "queries-vs-gallery"
    assert len(list((out / "rankings").glob("*.png"))) == 3
    strict = json.loads((out / "results.json").read_text(), parse_constant=lambda c: pytest.fail(f"JSON holds {c}"))
    assert str(odd_query) in [r["query"] for r in strict["queries"]]
    assert b"caf\xe9.png" in (out / "results.csv").read_bytes()  # the name's own bytes
    printed = capsys.readouterr().out
    assert "p0/new\\nline.png: " in printed
    assert printable("a\nb\udce9\tc") == "a\\nb\\udce9\\tc" and printable("José 1.png") == "José 1.png"


# -- 4. characters beyond ASCII on the command line -------------------------------------------
def test_values_beyond_ascii_are_quoted_for_hydra():
    assert quote_non_ascii(["name=José", "gallery=/d/Données/g", "top_k=3", "+x=é", "name='Zoë'"]) == [
        "name='José'", "gallery='/d/Données/g'", "top_k=3", "+x='é'", "name='Zoë'"]
    assert quote_non_ascii(["name=Jo,sé"]) == ["name=Jo,sé"]  # a sweep? left to the check that says how to quote


@pytest.mark.slow  # a new Python process (~8-10 s)
def test_cli_with_a_folder_and_name_beyond_ascii(tmp_path):
    w = make_world(tmp_path / "Données")
    args = ["experiment=demo", f"paths.output_root={w['out']}", f"gallery={w['gallery']}", f"query={w['queries']}",
            "threshold=0.5", "name=José", "progress=false", "pictures=false"]
    done = subprocess.run([sys.executable, "-m", "handclip.identify", *args], env=cli_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (w["out"] / "identify" / "Jos" / "results.json").is_file()


# -- 5. outputs that cannot be written: refused before any work -------------------------------
@pytest.mark.parametrize("where", ["index", "output_root", "export"])
def test_a_file_in_the_way_is_refused_before_any_work(world, embeds, monkeypatch, where):
    blocker = world["base"] / "a_file"
    blocker.write_text("x")
    if where != "index":  # the index's path depends on the model
        monkeypatch.setattr(run_mod, "load_model", lambda *a: pytest.fail("loaded the model"))
    with pytest.raises(HandCLIPError, match=r"cannot be created: '.*a_file' is a file"):
        if where == "export":
            export(compose("export", ["experiment=demo", "format=embeddings", f"images={world['gallery']}",
                                      f"out={blocker / 'e.npz'}"]))
        elif where == "index":
            identify(cfg(world, f"index={blocker / 'index'}"))
        else:
            identify(compose("identify", ["experiment=demo", f"paths.output_root={blocker / 'out'}",
                                          f"gallery={world['gallery']}", f"query={world['queries']}", "threshold=0.5"]))
    assert embeds == []


@pytest.mark.parametrize("where", ["index", "export"])
def test_a_read_only_folder_is_refused_before_any_work(world, read_only, embeds, where):
    with pytest.raises(HandCLIPError, match=r"is not writable"):
        if where == "export":
            export(compose("export", ["experiment=demo", "format=embeddings", f"images={world['gallery']}",
                                      f"out={read_only / 'e.npz'}"]))
        else:
            identify(cfg(world, f"index={read_only / 'index'}"))
    assert embeds == []


def test_results_and_index_folders_follow_the_umask(world, umask=0o027):  # mkdtemp would give 0o700
    previous = os.umask(umask)
    try:
        identify(cfg(world, f"index={world['base'] / 'index'}"))
    finally:
        os.umask(previous)
    out = world["out"] / "identify" / "queries-vs-gallery"
    for folder in (out, out / "rankings", world["base"] / "index"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask, folder


# -- 6. two runs at once ----------------------------------------------------------------------
def test_a_claimed_name_is_refused_before_any_work(world, embeds):
    out = world["out"] / "identify" / "queries-vs-gallery"
    out.parent.mkdir(parents=True)
    with claim(out.parent / ".queries-vs-gallery.lock") as lock:
        assert lock.held
        with pytest.raises(HandCLIPError, match=r"is being written by another identify run that is still running"):
            identify(cfg(world))
    assert embeds == [] and not out.exists()
    identify(cfg(world, "pictures=false"))  # once released
    assert hidden(world["out"]) == []  # the claim's lock file goes with it


def test_claims_leave_no_lock_file_and_exclude_each_other(tmp_path):
    path = tmp_path / ".x.lock"
    first = claim(path)
    assert first is not None and claim(path) is None
    first.release()
    assert not path.exists()
    again = claim(path)
    assert again is not None and again.held
    again.release()


def test_a_file_that_appeared_meanwhile_is_not_replaced(tmp_path):
    out = tmp_path / "e.npz"
    tmp = temp_path(tmp_path, out.name)
    tmp.write_text("mine")
    out.write_text("theirs")
    with pytest.raises(HandCLIPError, match="was written by another run meanwhile; it is kept"):
        publish(tmp, out, overwrite=False)
    assert out.read_text() == "theirs"
    publish(tmp, out, overwrite=True)
    assert out.read_text() == "mine" and not tmp.exists()


@pytest.mark.slow  # two new Python processes at once (~15 s)
def test_two_runs_with_the_same_name_at_once(world):
    args = ["experiment=demo", f"paths.output_root={world['out']}", f"gallery={world['gallery']}",
            f"query={world['queries']}", "threshold=0.5", "name=same", "progress=false"]
    runs = [subprocess.Popen([sys.executable, "-c", SLOW_RESULTS, *args], env=cli_env(), stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    errors = [r.communicate(timeout=300)[1] for r in runs]
    codes = sorted(r.returncode for r in runs)
    assert codes == [0, 2], errors
    refused = errors[[r.returncode for r in runs].index(2)]
    assert refused.strip().splitlines()[-1].startswith("error: ") and "another identify run" in refused
    results = json.loads((world["out"] / "identify" / "same" / "results.json").read_text())
    assert len(results["queries"]) == 2 and hidden(world["out"]) == []


@pytest.mark.slow  # two new Python processes at once (~15 s)
def test_two_runs_building_the_same_index_at_once(world):
    runs = [subprocess.Popen([sys.executable, "-c", SLOW_INDEX, "experiment=demo", f"paths.output_root={world['out']}",
                              f"gallery={world['gallery']}", f"query={world['queries']}", "threshold=0.5",
                              f"name=run{n}", "progress=false", "pictures=false"], env=cli_env(),
                             stderr=subprocess.PIPE, text=True) for n in range(2)]
    errors = [r.communicate(timeout=300)[1] for r in runs]
    assert [r.returncode for r in runs] == [0, 0], errors
    statuses = sorted(json.loads((world["out"] / "identify" / f"run{n}" / "results.json").read_text())
                      ["gallery"]["index_status"]["status"] for n in range(2))
    assert statuses == ["built", "reused"] and hidden(world["out"]) == []


# -- 7. killed runs: what they leave is removed by the next run -------------------------------
def test_leftovers_of_killed_runs_are_removed(world, caplog):
    index = world["base"] / "index"
    identify(cfg(world, f"index={index}", "name=first", "pictures=false"))
    out = world["out"] / "identify" / "second"
    # (an .old- folder beside a missing output is put back instead: tests/test_faults.py, prepare)
    for folder in (out.parent / ".second.partial-dead", world["base"] / ".index.partial-x",
                   world["base"] / ".index.old-y"):
        (folder / "rankings").mkdir(parents=True)
    (out.parent / ".second.lock").write_text("")  # a killed run's claim
    export_tmp = world["base"] / ".e.npz.abc123.tmp"
    export_tmp.write_text("half")
    with caplog.at_level(logging.INFO):
        identify(cfg(world, f"index={index}", "name=second"))
    assert (out / "results.json").is_file() and (index / "meta.json").is_file()
    assert hidden(world["out"]) == [] and [p for p in hidden(world["base"]) if p.startswith(".index")] == []
    assert "left by an interrupted identify run" in caplog.text
    export(compose("export", ["experiment=demo", "format=embeddings", f"images={world['gallery']}",
                              f"out={world['base'] / 'e.npz'}", "progress=false"]))
    assert not export_tmp.exists() and (world["base"] / "e.npz").is_file()


#: identify with each write slowed (so that it can be killed mid-write), after a line "writing" on stdout.
SLOW = """
import sys, time
import handclip.identify.index as index, handclip.identify.results as results
import handclip.identify.embeddings_export as emb
def slow(module, name):
    real = getattr(module, name)
    def wrapper(*a, **k):
        print("writing", flush=True)
        time.sleep({sleep})
        return real(*a, **k)
    setattr(module, name, wrapper)
slow(index, "atomic_write"); slow(results, "atomic_write"); slow(emb.np, "savez")
sys.argv = ["handclip"] + sys.argv[1:]
if sys.argv[1] == "export":
    from handclip.export import main
    sys.argv.pop(1)
else:
    from handclip.identify.__main__ import main
main()
"""
SLOW_RESULTS = SLOW.replace("{sleep}", "2")
SLOW_INDEX = SLOW.replace("{sleep}", "1")


@pytest.mark.slow  # a new Python process per write (~10 s each)
@pytest.mark.parametrize(("write", "sig"), [("index", signal.SIGKILL), ("results", signal.SIGKILL),
                                            ("results", signal.SIGTERM), ("export", signal.SIGKILL)])
def test_a_run_killed_at_each_write_leaves_nothing_the_next_run_keeps(world, write, sig):
    index = world["base"] / "index"
    if write == "results":
        identify(cfg(world, f"index={index}", "pictures=false", "name=first"))  # the index exists: results written next
    args = (["export", "experiment=demo", "format=embeddings", f"images={world['gallery']}",
             f"out={world['base'] / 'e.npz'}"] if write == "export" else
            ["experiment=demo", f"paths.output_root={world['out']}", f"gallery={world['gallery']}",
             f"query={world['queries']}", "threshold=0.5", f"index={index}", "pictures=false"])
    run = subprocess.Popen([sys.executable, "-c", SLOW.replace("{sleep}", "60"), *args, "progress=false"],
                           env=cli_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert any(line.strip() == "writing" for line in iter(run.stdout.readline, "")), "ended before writing"
        time.sleep(0.3)
        left = hidden(world["base"])
        run.send_signal(sig)
        run.wait(timeout=30)
    finally:
        run.kill()
        run.wait(timeout=30)
    assert any("partial" in n or n.endswith(".tmp") for n in left), left
    if write == "export":
        identify_or_export = export(compose("export", ["experiment=demo", "format=embeddings", "progress=false",
                                                       f"images={world['gallery']}", f"out={world['base'] / 'e.npz'}"]))
        assert load_embeddings(identify_or_export["path"])["embeddings"].shape[0] == 6
    else:
        result = identify(cfg(world, f"index={index}", "pictures=false"))
        assert result["gallery"]["images"] == 6 and len(result["queries"]) == 2
    assert [n for n in hidden(world["base"]) if "partial" in n or n.endswith((".tmp", ".lock")) or ".old-" in n] == []


# -- 8. a query that cannot be decoded --------------------------------------------------------
def test_an_unreadable_query_is_refused_before_the_gallery_is_embedded(world, embeds):
    bad = world["base"] / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(HandCLIPError, match=r"none of the 1 query image\(s\) could be read \(the gallery was not"):
        identify(cfg(world, f"query={bad}"))
    assert embeds == [1] and not world["out"].exists()  # nothing written, no folder made


def test_export_checks_its_images_before_loading_the_model(world, monkeypatch):
    monkeypatch.setattr(run_mod, "load_model", lambda *a: pytest.fail("loaded the model"))
    (world["base"] / "empty").mkdir()
    with pytest.raises(HandCLIPError, match=r"image folder '.*empty' holds no images"):
        export(compose("export", ["experiment=demo", "format=embeddings", f"images={world['base'] / 'empty'}",
                                  f"out={world['base'] / 'e.npz'}"]))


# -- 10. overwrite=true replaces only what identify wrote -------------------------------------
def test_overwrite_keeps_a_users_file_in_rankings(world):
    identify(cfg(world))
    rankings = world["out"] / "identify" / "queries-vs-gallery" / "rankings"
    assert len(list(rankings.glob("*.png"))) == 2
    mine = rankings / "my_notes.txt"
    mine.write_text("mine")
    with pytest.raises(HandCLIPError, match=r"holds files identify did not write \(rankings/my_notes.txt\)"):
        identify(cfg(world, "overwrite=true"))
    assert mine.read_text() == "mine"
    mine.unlink()
    (rankings / "00000_q.png").rename(rankings / "00000_q_renamed.png")  # a name results.json does not list
    with pytest.raises(HandCLIPError, match=r"rankings/00000_q_renamed.png"):
        identify(cfg(world, "overwrite=true"))
    (rankings / "00000_q_renamed.png").rename(rankings / "00000_q.png")
    identify(cfg(world, "overwrite=true"))  # only its own pictures: replaced
    assert len(list(rankings.glob("*.png"))) == 2


# -- 11. an index corrupted at the same size --------------------------------------------------
def test_a_corrupted_index_is_rebuilt(world, caplog):
    index = world["base"] / "index"
    first = identify(cfg(world, f"index={index}", "index_dtype=float32", "pictures=false", "name=a"))
    emb = index / "embeddings.npy"
    size = emb.stat().st_size
    with open(emb, "r+b") as f:
        f.seek(size - 64)
        f.write(b"\xff" * 64)  # NaN rows, same size
    assert emb.stat().st_size == size
    again = identify(cfg(world, f"index={index}", "index_dtype=float32", "pictures=false", "name=b"))
    assert again["gallery"]["index_status"]["status"] == "rebuilt"
    assert "embeddings.npy changed on disk since it was written (corrupted)" in caplog.text
    assert [r["top"] for r in again["queries"]] == [r["top"] for r in first["queries"]]
    assert all(np.isfinite(t["score"]) for r in again["queries"] for t in r["top"])


# -- 9. numbers: typed, finite, in range (the schema's ranges), one line before any work ------
@pytest.mark.parametrize(("override", "message"), [
    ("threshold=abc", r"threshold=abc: expected a number"), ("top_k=abc", r"top_k=abc: expected .*int"),
    ("target_fmr=0", r"target_fmr=0(\.0)?: expected .*between 0 and 1"),
    ("target_fmr=nan", r"target_fmr=nan: expected .*between 0 and 1"),
    ("threshold=nan", r"threshold=nan: expected a finite number"), ("threshold=-inf", r"threshold=-inf: expected"),
    ("top_k=0", r"top_k=0: expected a number >= 1"), ("batch_size=0", r"batch_size=0: expected a number >= 1"),
    ("index_dtype=float8", r"index_dtype=float8: expected one of float16, float32"),
])
def test_wrong_numbers_are_one_line_naming_the_key(override, message):
    with pytest.raises(HandCLIPError, match=message):
        check_override_keys("identify", ["experiment=demo", "gallery=g", "query=q", override])


def test_numbers_at_their_bounds_are_accepted():
    check_override_keys("identify", ["top_k=1", "target_fmr=1e-9", "target_fmr=0.999999", "threshold=-1",
                                     "batch_size=1", "index_dtype=float32"])


@pytest.mark.parametrize("override", ["threshold=nan", "top_k=abc"])
def test_cli_wrong_number_exit_status_2(tmp_path, override):  # ~1.3 s: checked before torch loads
    args = ["experiment=demo", f"paths.output_root={tmp_path}", "gallery=g", "query=q", override]
    done = subprocess.run([sys.executable, "-m", "handclip.identify", *args], env=cli_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"error: {override}: " + done.stderr.split(f"{override}: ", 1)[1].strip()]
    assert not (tmp_path / "identify").exists()


def test_results_json_is_strict_json(world):
    """results.json of a run: test_file_names_with_newlines_and_bytes_that_are_not_utf8; NaN is never written."""
    bad = {"queries": [], "skipped_queries": [], "threshold": {"threshold": float("nan"), "source": "x"}}
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        write_results(bad, world["out"] / "nan", pictures=False)
    assert not (world["out"] / "nan").exists() and hidden(world["out"]) == []


@pytest.fixture
def read_only_view(tmp_path):
    """(a folder, a read-only view of it): a read-only bind mount, skipped where mounting is refused."""
    folder, view = tmp_path / "rw", tmp_path / "ro_view"
    folder.mkdir()
    view.mkdir()
    done = subprocess.run(["mount", "--bind", str(folder), str(view)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {done.stderr.strip()}")
    try:
        done = subprocess.run(["mount", "-o", "remount,ro,bind", str(view)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot make a bind mount read-only here: {done.stderr.strip()}")
        yield folder, view
    finally:
        subprocess.run(["umount", str(view)], check=True)


def test_an_index_on_read_only_media_is_used_and_never_written(world, read_only_view, embeds):
    folder, view = read_only_view
    identify(cfg(world, f"index={folder / 'index'}", "pictures=false", "name=a"))
    embeds.clear()
    result = identify(cfg(world, f"index={view / 'index'}", "pictures=false", "name=b"))
    assert result["gallery"]["index_status"]["status"] == "reused" and embeds == [2]
    write_image(world["gallery"] / "p0" / "new.png", seed=9, identity=0)  # the index would need updating
    embeds.clear()
    with pytest.raises(HandCLIPError, match=r"gallery index folder \(index=\) '.*ro_view' is not writable"):
        identify(cfg(world, f"index={view / 'index'}", "pictures=false", "name=c"))
    assert embeds == [2]  # the queries only: refused before the gallery is embedded
