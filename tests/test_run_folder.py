"""The run/resume policy of a run folder, unit by unit (no training): which checkpoint a run resumes, what it
refuses, where its config goes, and what a failed start leaves behind. The same rules end to end: test_train.py,
test_faults.py."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch
from conftest import fake_checkpoint
from omegaconf import OmegaConf

from handclip.errors import HandCLIPError
from handclip.run_folder import (
    LOCK_NAME,
    RunComplete,
    check_max_epochs,
    check_resume_compatible,
    claim_run_folder,
    folders_written,
    holds_run,
    resolve_ckpt_path,
    save_config,
    trained_checkpoint,
)

HPARAMS = {"classes": ["001", "002", "003"], "hand": "dorsal_right", "model_name": "HandCLIP-Tiny"}


@pytest.fixture
def run(tmp_path: Path) -> Path:
    return tmp_path / "outputs" / "train" / "dorsal_right"


def test_where_a_trained_hand_leaves_its_best_checkpoint(tmp_path):
    expected = tmp_path / "train" / "palmar_left" / "checkpoints" / "best.ckpt"
    assert trained_checkpoint(tmp_path, "palmar_left") == expected


def test_a_folder_holds_a_run_once_a_checkpoint_is_written(run):
    assert not holds_run(run)
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("a: 1\n")
    (run / "checkpoints" / "notes.txt").write_text("")
    assert not holds_run(run)  # a config, logs or other files alone: a run that wrote no checkpoint
    fake_checkpoint(run / "checkpoints" / "best.ckpt", resumable=False)
    assert holds_run(run)


def test_a_fresh_run_starts_in_an_empty_folder_and_refuses_a_used_one(run):
    assert resolve_ckpt_path(None, run) is None
    fake_checkpoint(run / "checkpoints" / "last.ckpt")
    fake_checkpoint(run / "checkpoints" / "best.ckpt", resumable=False)
    with pytest.raises(HandCLIPError) as refused:
        resolve_ckpt_path(None, run)
    message = str(refused.value)
    assert message.startswith(f"{run} already holds a run (best.ckpt, last.ckpt). Resume it with ckpt_path=last")
    assert "ckpt_path=auto" in message and "paths.output_root=DIR" in message
    # the other processes of a multi-process run: rank 0 has checked, and may have written already
    assert resolve_ckpt_path(None, run, rank_zero=False) is None


def test_last_resumes_the_folders_last_checkpoint(run):
    with pytest.raises(HandCLIPError, match=r"checkpoint '.*/dorsal_right/checkpoints/last.ckpt' to resume from not "
                                            "found"):
        resolve_ckpt_path("last", run)
    last = fake_checkpoint(run / "checkpoints" / "last.ckpt")
    assert resolve_ckpt_path("last", run) == last.resolve()


def test_an_explicit_checkpoint_resumes_in_its_own_folder_or_an_empty_one(run, tmp_path):
    own = fake_checkpoint(run / "checkpoints" / "epoch3.ckpt")
    assert resolve_ckpt_path(str(own), run) == own.resolve()
    other = fake_checkpoint(tmp_path / "elsewhere" / "checkpoints" / "last.ckpt")
    with pytest.raises(HandCLIPError, match=f"{run} already holds another run; resuming {other} there would mix"):
        resolve_ckpt_path(str(other), run)
    empty = tmp_path / "outputs" / "train" / "palmar_left"
    assert resolve_ckpt_path(str(other), empty) == other.resolve()  # continued in an empty folder
    with pytest.raises(HandCLIPError, match=r"checkpoint '.*nowhere.ckpt' to resume from not found"):
        resolve_ckpt_path(str(tmp_path / "nowhere.ckpt"), empty)


def test_resume_needs_the_same_model_hand_and_identities(tmp_path):
    ckpt = fake_checkpoint(tmp_path / "last.ckpt")
    check_resume_compatible(ckpt, dict(HPARAMS))
    for key, value in (("model_name", "ViT-B-32-quickgelu"), ("hand", "palmar_left")):
        with pytest.raises(HandCLIPError, match=f"was trained with {key}='{HPARAMS[key]}', but this run uses "
                                                f"{key}='{value}'"):
            check_resume_compatible(ckpt, {**HPARAMS, key: value})
    with pytest.raises(HandCLIPError, match="trained on 3 identities that differ from the 4 training identities"):
        check_resume_compatible(ckpt, {**HPARAMS, "classes": ["001", "002", "003", "004"]})
    with pytest.raises(HandCLIPError, match="trained on 3 identities that differ from the 3 training"):
        check_resume_compatible(ckpt, {**HPARAMS, "classes": ["001", "002", "004"]})
    best = fake_checkpoint(tmp_path / "best.ckpt", resumable=False)
    with pytest.raises(HandCLIPError, match="holds weights only.*resume from last.ckpt with ckpt_path=last"):
        check_resume_compatible(best, dict(HPARAMS))


def test_config_is_saved_beside_the_run_and_never_over_an_earlier_one(run):
    cfg = OmegaConf.create({"seed": 1, "paths": {"x": "${seed}"}})
    first = save_config(cfg, run, resumed=False)
    assert first == run / "config.yaml" and OmegaConf.load(first) == {"seed": 1, "paths": {"x": 1}}  # resolved
    resumed = save_config(OmegaConf.create({"seed": 2}), run, resumed=True)
    assert resumed.name.startswith("config.resumed-") and resumed.suffix == ".yaml"
    assert OmegaConf.load(first).seed == 1 and OmegaConf.load(resumed).seed == 2  # the first one kept
    # a new attempt in a folder whose run wrote no checkpoint keeps the earlier config aside
    again = save_config(OmegaConf.create({"seed": 3}), run, resumed=False)
    kept = sorted(run.glob("config.no-checkpoint-*.yaml"))
    assert again == first and OmegaConf.load(again).seed == 3
    assert len(kept) == 1 and OmegaConf.load(kept[0]).seed == 1


def test_a_run_that_fails_to_start_removes_only_the_folders_it_made(tmp_path):
    root = tmp_path / "outputs"
    run = root / "train" / "dorsal_right"
    with pytest.raises(RuntimeError), claim_run_folder(run):
        assert (run / LOCK_NAME).exists()
        raise RuntimeError("stopped before writing anything")
    assert not root.exists()  # every folder it created, and nothing above them
    assert tmp_path.exists()
    (run / "logs").mkdir(parents=True)
    with pytest.raises(RuntimeError), claim_run_folder(run):
        raise RuntimeError("stopped")
    assert (run / "logs").is_dir()  # the folder existed before: kept as it was
    fresh = run / "nested" / "deeper"
    with pytest.raises(RuntimeError), claim_run_folder(fresh):
        (fresh / "train.log").write_text("something was written")
        raise RuntimeError("stopped after writing")
    assert (fresh / "train.log").exists()  # what a run wrote is never removed


def test_every_refusal_is_one_complete_line(run, tmp_path):
    """The whole text of each message: what users read (and search for) is part of the policy."""
    fake_checkpoint(run / "checkpoints" / "best.ckpt", resumable=False)
    with pytest.raises(HandCLIPError) as fresh:
        resolve_ckpt_path(None, run)
    assert str(fresh.value) == (
        f"{run} already holds a run (best.ckpt). Resume it with ckpt_path=last (or ckpt_path=auto, which also "
        "skips a finished run), start elsewhere with paths.output_root=DIR, or move that folder away.")
    with pytest.raises(HandCLIPError) as auto:
        resolve_ckpt_path("auto", run, max_epochs=5)
    assert str(auto.value) == (
        f"{run} holds best.ckpt but no last.ckpt to resume from; resume a checkpoint with ckpt_path=PATH, or move "
        "that folder away to start afresh")
    other = fake_checkpoint(tmp_path / "elsewhere" / "last.ckpt")
    with pytest.raises(HandCLIPError) as mixed:
        resolve_ckpt_path(str(other), run)
    assert str(mixed.value) == (
        f"{run} already holds another run; resuming {other.resolve()} there would mix the two runs. Resume a "
        "checkpoint in its own run folder, or continue it in an empty one with paths.output_root=DIR.")
    last = fake_checkpoint(run / "checkpoints" / "last.ckpt", epochs=3)
    with pytest.raises(RunComplete) as complete:
        resolve_ckpt_path("auto", run, max_epochs=3)
    assert str(complete.value) == (
        f"{run}: already complete ({last} has trained 3 epoch(s), trainer.max_epochs=3); nothing to do")
    assert resolve_ckpt_path("auto", run, max_epochs=4) == last.resolve()
    assert resolve_ckpt_path("auto", run) == last.resolve()  # no max_epochs: never complete

    weights = fake_checkpoint(tmp_path / "w" / "best.ckpt", resumable=False, **HPARAMS)
    with pytest.raises(HandCLIPError) as weights_only:
        check_resume_compatible(weights, HPARAMS)
    assert str(weights_only.value) == (
        f"checkpoint {weights} holds weights only, without the optimizer and loop state a run resumes from "
        "(best.ckpt is written that way); resume from last.ckpt with ckpt_path=last")
    other_model = fake_checkpoint(tmp_path / "m" / "last.ckpt", **{**HPARAMS, "model_name": "ViT-B-32-quickgelu"})
    with pytest.raises(HandCLIPError) as model:
        check_resume_compatible(other_model, HPARAMS)
    assert str(model.value) == (
        f"checkpoint {other_model} was trained with model_name='ViT-B-32-quickgelu', but this run uses "
        "model_name='HandCLIP-Tiny'; resume with the same config or start a new run")
    fewer = fake_checkpoint(tmp_path / "c" / "last.ckpt", **{**HPARAMS, "classes": ["001", "002"]})
    with pytest.raises(HandCLIPError) as classes:
        check_resume_compatible(fewer, HPARAMS)
    assert str(classes.value) == (
        f"checkpoint {fewer} was trained on 2 identities that differ from the 3 training identities of this data; "
        "resume on the same data")


def test_a_live_run_holds_its_folder(run):
    with claim_run_folder(run):
        with pytest.raises(HandCLIPError) as busy, claim_run_folder(run):
            pass
    assert str(busy.value) == (
        f"{run} is in use by another training run that is still running; wait for it to end, or train elsewhere "
        "with paths.output_root=DIR")
    with claim_run_folder(run):  # released when the first run ends
        pass


def test_saved_config_names_carry_a_sortable_utc_time(run):
    resumed = save_config(OmegaConf.create({"seed": 1}), run, resumed=True)
    assert re.fullmatch(r"config\.resumed-\d{8}T\d{12}Z\.yaml", resumed.name), resumed.name
    save_config(OmegaConf.create({"seed": 2}), run, resumed=False)
    save_config(OmegaConf.create({"seed": 3}), run, resumed=False)
    (kept,) = run.glob("config.no-checkpoint-*.yaml")
    assert re.fullmatch(r"config\.no-checkpoint-\d{8}T\d{12}Z\.yaml", kept.name), kept.name
    stamp = kept.name.removeprefix("config.no-checkpoint-").removesuffix(".yaml")
    now = datetime.now(timezone.utc)
    assert abs((now - datetime.strptime(stamp, "%Y%m%dT%H%M%S%fZ").replace(tzinfo=timezone.utc)).total_seconds()) < 60


def test_max_epochs_is_a_whole_number_of_at_least_one():
    assert check_max_epochs(3) == 3
    for bad in (0, -2, True, 2.0, "5", None):
        with pytest.raises(HandCLIPError) as refused:
            check_max_epochs(bad)
        assert str(refused.value) == f"trainer.max_epochs must be a whole number of at least 1, got {bad!r}"


def test_the_folders_a_run_writes_to_are_named_by_their_settings(tmp_path):
    cfg = OmegaConf.create({
        "paths": {"output_dir": str(tmp_path / "run")},
        "callbacks": {"best": {"dirpath": str(tmp_path / "ckpt")}, "bar": {"refresh_rate": 10}, "off": None},
        "logger": {"csv": {"save_dir": str(tmp_path / "logs")}, "none": {"name": "x"}, "off": None},
        "data": {"cache": True, "cache_dir": str(tmp_path / "cache")}})
    assert folders_written(cfg) == {
        "output folder (paths.output_dir)": str(tmp_path / "run"),
        "checkpoint folder (callbacks.best.dirpath)": str(tmp_path / "ckpt"),
        "log folder (logger.csv.save_dir)": str(tmp_path / "logs"),
        "image cache folder (data.cache_dir)": str(tmp_path / "cache")}
    cfg.data.cache = False  # the cache folder is not written without the cache
    assert "image cache folder (data.cache_dir)" not in folders_written(cfg)
    bare = OmegaConf.create({"paths": {"output_dir": "o"}})
    assert list(folders_written(bare)) == ["output folder (paths.output_dir)"]


def test_resume_of_a_checkpoint_without_its_identities_is_refused(tmp_path):
    ckpt = fake_checkpoint(tmp_path / "last.ckpt")
    saved = torch.load(ckpt, weights_only=True)
    del saved["hyper_parameters"]["classes"]
    torch.save(saved, ckpt)
    with pytest.raises(HandCLIPError, match=r"^checkpoint '.*last\.ckpt' lacks classes: not a HandCLIP checkpoint$"):
        check_resume_compatible(ckpt, HPARAMS)


def test_saved_config_is_resolved_text(run):
    path = save_config(OmegaConf.create({"seed": 4, "paths": {"x": "${seed}"}}), run, resumed=False)
    assert path.read_text() == "seed: 4\npaths:\n  x: 4\n"
