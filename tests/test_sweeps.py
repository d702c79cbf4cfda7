"""Sweeps as Hydra users know them: a job per folder when a sweep varies more than the hand type, every run
evaluated and named by what it changed, evaluations that never replace another's files, and an Optuna search."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import eval_cfg, make_layout, quiet_overrides, run_module
from omegaconf import OmegaConf

from handclip.config import sweep_job_name
from handclip.errors import HandCLIPError
from handclip.evaluation.report import FINE_TUNED, ZERO_SHOT, check_report_target, fine_tuned_label, report_name
from handclip.run_folder import run_name, trained_runs

QUIET = ("trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.max_epochs=1",
         "data.batch_size=4")


def test_a_sweep_job_is_named_by_its_swept_keys_only():
    overrides = ["experiment=demo", "model.lr=0.0003", "hand=dorsal_right", "seed=2", "trainer.max_epochs=3"]
    assert sweep_job_name(overrides, {"model.lr", "seed", "hand"}) == "model.lr=0.0003,seed=2"  # sorted
    assert sweep_job_name(overrides, {"hand"}) == ""  # a sweep over hand types keeps <task>/<hand>
    # where things go and how fast they run never name a folder
    noise = ["paths.output_root=/x", "data.num_workers=2", "ckpt_path=auto", "hand.name=palmar_left"]
    assert sweep_job_name(noise, {"paths.output_root", "data.num_workers", "ckpt_path", "hand.name"}) == ""
    assert sweep_job_name(["model.pretrained=/w/a b.bin"], {"model.pretrained"}) == "model.pretrained=_w_a_b.bin"
    assert sweep_job_name(["+trainer.gradient_clip_val=1.0"], {"trainer.gradient_clip_val"}) == \
        "trainer.gradient_clip_val=1.0"


def test_runs_of_a_hand_type_and_the_run_of_a_checkpoint(tmp_path):
    train = tmp_path / "train"
    for folder in ("dorsal_right", "seed=2/dorsal_right", "model.lr=0.0001/dorsal_right", "seed=2/palmar_left"):
        (train / folder / "checkpoints").mkdir(parents=True)
        (train / folder / "checkpoints" / "best.ckpt").write_bytes(b"x")
    (train / "seed=3" / "dorsal_right").mkdir(parents=True)  # no checkpoint: not a run to score
    runs = trained_runs(tmp_path, "dorsal_right")
    assert [name for name, _ in runs] == ["", "model.lr=0.0001", "seed=2"]
    assert runs[2][1] == train / "seed=2" / "dorsal_right" / "checkpoints" / "best.ckpt"
    assert trained_runs(tmp_path / "none", "dorsal_right") == [("", tmp_path / "none" / "train" / "dorsal_right" /
                                                                "checkpoints" / "best.ckpt")]
    assert run_name(train / "dorsal_right" / "checkpoints" / "best.ckpt", tmp_path) == ""
    assert run_name(train / "seed=2" / "dorsal_right" / "checkpoints" / "last.ckpt", tmp_path) == "seed=2"
    assert run_name(tmp_path / "elsewhere" / "checkpoints" / "best.ckpt", tmp_path) is None
    assert run_name(train / "a" / "b" / "dorsal_right" / "checkpoints" / "best.ckpt", tmp_path) is None


def test_every_checkpoint_gets_its_own_report_name(tmp_path):
    best = Path("/o/train/dorsal_right/checkpoints/best.ckpt")
    assert report_name("dorsal_right", None, None) == "dorsal_right_zeroshot"
    assert report_name("dorsal_right", best, "") == "dorsal_right_finetuned"  # unchanged for the plain run
    assert report_name("dorsal_right", best, "seed=2") == "dorsal_right_finetuned_seed=2"
    assert report_name("dorsal_right", best.with_name("last.ckpt"), "") == "dorsal_right_finetuned_last"
    a = report_name("dorsal_right", Path("/a/run/checkpoints/best.ckpt"), None)
    b = report_name("dorsal_right", Path("/b/run/checkpoints/best.ckpt"), None)
    assert a.startswith("dorsal_right_finetuned_run-") and b.startswith("dorsal_right_finetuned_run-") and a != b
    assert fine_tuned_label("") == FINE_TUNED and fine_tuned_label("seed=2") == "HandCLIP (seed=2)"


def test_an_evaluation_never_replaces_another_ones_files(tmp_path):
    mine = [{"hand": "dorsal_right", "checkpoint": "/a/best.ckpt", "model_name": "m", "pretrained": None}]
    other = [{**mine[0], "checkpoint": "/b/best.ckpt"}]
    check_report_target(tmp_path, "x", mine, overwrite=False)  # nothing there yet
    (tmp_path / "x.json").write_text(json.dumps({"entries": mine, "config": {}}))
    check_report_target(tmp_path, "x", mine, overwrite=False)  # the same evaluation again: replaced
    with pytest.raises(HandCLIPError, match=r"x.json holds another evaluation \(/a/best.ckpt\); choose another "
                                            r"name=..., or pass overwrite=true"):
        check_report_target(tmp_path, "x", other, overwrite=False)
    check_report_target(tmp_path, "x", other, overwrite=True)
    (tmp_path / "y.json").write_text("{not json")
    with pytest.raises(HandCLIPError, match="holds another evaluation"):
        check_report_target(tmp_path, "y", other, overwrite=False)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A two-value lr sweep and a two-value seed sweep on the demo recipe, each a `python -m` multirun."""
    root = tmp_path_factory.mktemp("sweeps")
    data = make_layout(root / "data", hands=("dorsal_right",), n_train_ids=4)
    out = root / "out"
    common = ["experiment=demo", "hand=dorsal_right", f"paths.data_dir={data}", *quiet_overrides(out), *QUIET]
    results = [run_module("handclip.train", "-m", *common, sweep) for sweep in ("model.lr=3e-4,1e-4", "seed=1,2")]
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    return data, out, results


@pytest.mark.slow
def test_lr_and_seed_sweeps_give_a_run_folder_per_job(swept):
    _, out, results = swept
    train = out / "train"
    for name, override in [("model.lr=0.0003", "model.lr=0.0003"), ("model.lr=0.0001", "model.lr=0.0001"),
                           ("seed=1", "seed=1"), ("seed=2", "seed=2")]:
        run = train / name / "dorsal_right"
        assert (run / "checkpoints" / "best.ckpt").is_file(), sorted(train.rglob("*"))
        assert override in OmegaConf.load(run / ".hydra" / "overrides.yaml")
        saved = OmegaConf.to_container(OmegaConf.load(run / ".hydra" / "config.yaml"), resolve=False)
        assert saved["paths"]["output_dir"].startswith("${")  # as composed, unresolved
        assert (run / "train.log").is_file() and (run / "config.yaml").is_file()
    assert not (train / "dorsal_right").exists()  # no job trained into the plain run's folder
    assert "sweep summary: 2 of 2 job(s) finished\n  model.lr=0.0003: ok\n  model.lr=0.0001: ok" in results[0].stderr


@pytest.mark.slow
def test_make_eval_scores_every_run_and_names_each_by_what_it_changed(swept):
    from handclip.eval import evaluate

    data, out, _ = swept
    entries = evaluate(eval_cfg(data, out, "all=true", "verification.enabled=false"))["entries"]
    models = [e["model"] for e in entries]
    assert models == [ZERO_SHOT, FINE_TUNED, "HandCLIP (model.lr=0.0001)", "HandCLIP (model.lr=0.0003)",
                      "HandCLIP (seed=1)", "HandCLIP (seed=2)"]
    assert entries[1]["status"] == "no checkpoint"
    assert all(e["status"] == "ok" and e["checkpoint"].endswith(f"{e['run']}/dorsal_right/checkpoints/best.ckpt")
               for e in entries[2:])
    table = (out / "eval" / "comparison.md").read_text()
    assert "| dorsal_right | HandCLIP (seed=2) |" in table


@pytest.mark.slow
def test_two_evaluations_of_one_hand_type_keep_both_results(swept):
    from handclip.eval import evaluate

    data, out, _ = swept
    first, second = (out / "train" / f"seed={s}" / "dorsal_right" / "checkpoints" / "best.ckpt" for s in (1, 2))
    for ckpt in (first, second):  # "=" in a path: quoted for Hydra (its one-line error says so)
        evaluate(eval_cfg(data, out, f"ckpt_path='{ckpt}'", "verification.enabled=false"))
    for name, ckpt in (("seed=1", first), ("seed=2", second)):
        report = json.loads((out / "eval" / f"dorsal_right_finetuned_{name}.json").read_text())
        assert report["entries"][0]["checkpoint"] == str(ckpt)
    evaluate(eval_cfg(data, out, f"ckpt_path='{first}'", "name=mine", "verification.enabled=false"))
    with pytest.raises(HandCLIPError, match="mine.json holds another evaluation"):
        evaluate(eval_cfg(data, out, f"ckpt_path='{second}'", "name=mine", "verification.enabled=false"))
    evaluate(eval_cfg(data, out, f"ckpt_path='{second}'", "name=mine", "overwrite=true",
                      "verification.enabled=false"))
    assert json.loads((out / "eval" / "mine.json").read_text())["entries"][0]["checkpoint"] == str(second)


@pytest.mark.slow
def test_optuna_search_runs_its_trials_and_writes_its_summary(tmp_path):
    """hparams_search=optuna: each trial returns its best val/rank1; the summary names the best of them."""
    from handclip.run_folder import best_figures

    data = make_layout(tmp_path / "data", hands=("dorsal_right",), n_train_ids=4)
    out = tmp_path / "out"
    result = run_module("handclip.train", "hparams_search=optuna", "experiment=demo", "hydra.sweeper.n_trials=2",
                        f"paths.data_dir={data}", *quiet_overrides(out), *QUIET[:3])
    assert result.returncode == 0, result.stderr[-3000:]
    (search,) = (out / "search" / "dorsal_right").iterdir()
    summary = OmegaConf.load(search / "optimization_results.yaml")
    trials = sorted(search.glob("*/dorsal_right"))
    assert len(trials) == 2 and all(p.parent.name.startswith("data.batch_size=") for p in trials)
    scores = [best_figures(p)["best/val/rank1"] for p in trials]
    assert summary.name == "optuna" and summary.best_value == max(scores)
    assert set(summary.best_params) == {"model.lr", "model.weight_decay", "data.batch_size"}
    assert not (out / "train").exists()  # a search never writes where make eval looks for runs


def test_a_search_without_the_optuna_sweeper_installed_is_one_line(tmp_path):
    """hparams_search=optuna needs the `search` extra: one line naming it, before torch loads."""
    import subprocess
    import sys

    from conftest import cli_env

    probe = ("import runpy, sys\n"
             "sys.modules['optuna'] = None; sys.modules['hydra_plugins.hydra_optuna_sweeper'] = None\n"
             "sys.argv = ['handclip.train', *sys.argv[1:]]\n"
             "try:\n"
             "    runpy.run_module('handclip.train', run_name='__main__', alter_sys=True)\n"
             "except SystemExit as stop:\n"
             "    print(stop.code, 'torch' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", probe, "hparams_search=optuna", f"paths.output_root={tmp_path}"],
                            env=cli_env(), capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["2", "False"], result.stderr[-2000:]
    assert result.stderr.startswith("error: hparams_search=optuna needs Hydra's Optuna sweeper, which is not "
                                    "installed (hydra_plugins.hydra_optuna_sweeper, optuna not found); install the "
                                    "optional extra: pip install -e \".[search]\"")
    assert result.stderr.count("\n") == 1 and not any(tmp_path.iterdir())
