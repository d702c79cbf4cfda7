"""Config groups users of lightning-hydra-template expect: debug runs, callbacks=none, logger presets (MLflow,
W&B offline, many), the run's own summary figures reaching the loggers, and curves.png in every run folder."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cli_env, column, eval_cfg, make_layout, read_metrics, run_module, tiny_cfg
from PIL import Image

from handclip.config import compose
from handclip.errors import HandCLIPError
from handclip.eval import evaluate
from handclip.train import train
from handclip.training import trackers
from handclip.utils.locks import try_lock

HAND = "dorsal_right"
DEBUG_OPTIONS = ("default", "fdr", "overfit", "profiler", "limit")
#: What the trackers must not do in a test: reach the network, or write into the home folder.
OFFLINE = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off", "DO_NOT_TRACK": "true",
           "MLFLOW_DISABLE_TELEMETRY": "true"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    # 24 training images: 6 batches of 4, so that debug=limit's 3 batches are fewer than an epoch
    return make_layout(tmp_path_factory.mktemp("layout"), n_train_ids=6, per_id=5)


def _png(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def _metrics_csv(run_dir: Path) -> list[dict]:
    (path,) = run_dir.glob("logs/version_*/metrics.csv")
    with open(path) as fh:
        return list(csv.DictReader(fh))


# -- composing ---------------------------------------------------------------------------------
@pytest.mark.parametrize("option", DEBUG_OPTIONS)
def test_debug_options_compose_into_their_own_folders(option, tmp_path):
    real = compose("train", ["experiment=demo", f"paths.output_root={tmp_path}"])
    cfg = compose("train", ["experiment=demo", f"debug={option}", f"paths.output_root={tmp_path}"])
    out = Path(cfg.paths.output_dir)
    assert Path(real.paths.output_dir) == tmp_path / "train" / HAND
    assert out.parent == tmp_path / "debug" / HAND and len(out.name) == len("2026-12-03_09-10-11")
    assert cfg.task_name == "debug" and cfg.trainer.accelerator == "cpu" and cfg.trainer.enable_progress_bar is False
    # the real recipe keeps Lightning's defaults for every debugging argument
    assert (real.trainer.fast_dev_run, real.trainer.overfit_batches, real.trainer.limit_train_batches,
            real.trainer.profiler, real.trainer.detect_anomaly) == (False, 0.0, None, None, False)
    expected = {
        "default": {"max_epochs": 1, "detect_anomaly": True},
        "fdr": {"fast_dev_run": True, "detect_anomaly": True},
        "overfit": {"overfit_batches": 3, "max_epochs": 20},
        "profiler": {"max_epochs": 1, "detect_anomaly": False},
        "limit": {"limit_train_batches": 3, "limit_val_batches": 2, "max_epochs": 3},
    }[option]
    assert {k: cfg.trainer[k] for k in expected} == expected
    if option == "profiler":
        assert cfg.trainer.profiler._target_.endswith("SimpleProfiler") and cfg.trainer.profiler.dirpath == str(out)


@pytest.mark.parametrize("preset", ["mlflow", "wandb", "many"])
def test_logger_presets_write_under_the_run_folder(preset, tmp_path):
    cfg = compose("train", [f"logger={preset}", f"paths.output_root={tmp_path}"])
    out = cfg.paths.output_dir
    expected = {"mlflow": {"csv", "mlflow"}, "wandb": {"csv", "wandb"}, "many": {"csv", "mlflow", "wandb"}}[preset]
    assert set(cfg.logger) == expected
    assert cfg.logger.csv.save_dir == out
    if "mlflow" in expected:
        assert cfg.logger.mlflow.tracking_uri == f"file:{out}/mlruns"
    if "wandb" in expected:
        assert cfg.logger.wandb.save_dir == out and cfg.logger.wandb.offline is True


def test_eval_takes_a_logger_none_by_default():
    assert compose("eval").logger is None
    assert set(compose("eval", ["logger=mlflow"]).logger) == {"csv", "mlflow"}


# -- a missing tracker package -----------------------------------------------------------------
@pytest.mark.parametrize("preset", ["mlflow", "wandb", "tensorboard"])
def test_a_missing_logger_package_names_its_extra(preset, data, tmp_path, monkeypatch):
    monkeypatch.setattr(trackers, "_installed", lambda module: module not in ("mlflow", "wandb", "tensorboard",
                                                                             "tensorboardX"))
    cfg = tiny_cfg(data, tmp_path, f"logger={preset}")
    extra = rf'install the optional extra: pip install -e "\.\[{preset}\]"'
    with pytest.raises(HandCLIPError, match=rf"^logger\.{preset} \(\w+Logger\) needs the {preset} package, which is "
                                            rf"not installed; {extra}"):
        train(cfg)
    assert not (tmp_path / "train").exists()  # refused before anything was written
    with pytest.raises(HandCLIPError, match=extra):
        evaluate(eval_cfg(data, tmp_path, f"logger={preset}"))


# -- debug runs --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def limited(data, tmp_path_factory):
    """debug=limit (3 epochs of 3 batches) while a real run of the same hand type holds its folder."""
    out = tmp_path_factory.mktemp("limit")
    cfg = tiny_cfg(data, out, "debug=limit", "data.batch_size=4", "seed=3")
    real = out / "train" / HAND
    real.mkdir(parents=True)
    lock = try_lock(real / ".lock")
    with lock:  # a real training of this hand type is running
        metrics = train(cfg)
    return {"cfg": cfg, "run_dir": Path(cfg.paths.output_dir), "real": real, "metrics": metrics}


def test_debug_limit_trains_a_few_batches_beside_a_real_run(limited):
    run_dir = limited["run_dir"]
    assert run_dir.parent == limited["real"].parents[1] / "debug" / HAND
    assert [p.name for p in limited["real"].iterdir()] == [".lock"]  # the real run's folder is untouched
    assert (run_dir / "checkpoints" / "best.ckpt").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    rows = read_metrics(run_dir)
    assert len(column(rows, "val/rank1")) == 3
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 3 * 3  # 3 epochs of 3 training batches (an epoch has 6)


def test_curves_come_from_the_runs_own_figures(limited):
    """The history behind curves.png (kept in last.ckpt) holds, epoch by epoch, what the CSV logger wrote."""
    run_dir = limited["run_dir"]
    width, height = _png(run_dir / "curves.png")
    assert width > 2 * height
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    epochs = last["callbacks"]["RunHistory"]["epochs"]
    assert sorted(epochs) == [0, 1, 2]
    rows = read_metrics(run_dir)
    for key in ("train/loss_epoch", "train/acc", "val/loss", "val/acc", "val/rank1"):
        assert [epochs[e][key] for e in range(3)] == pytest.approx(column(rows, key)), key


def test_threshold_final_and_best_figures_reach_the_logger(limited):
    run_dir = limited["run_dir"]
    rows = _metrics_csv(run_dir)
    summary = {k: float(v) for row in rows for k, v in row.items() if v and k.split("/")[0] in ("calibration", "final",
                                                                                              "best")}
    calibration = json.loads((run_dir / "checkpoints" / "best.calibration.json").read_text())
    assert summary["calibration/threshold"] == pytest.approx(calibration["threshold"])
    assert summary["calibration/target_fmr"] == 0.01
    rank1 = column(read_metrics(run_dir), "val/rank1")
    assert summary["final/val/rank1"] == pytest.approx(rank1[-1]) and summary["final/epoch"] == 3
    assert summary["final/train/loss"] == pytest.approx(column(read_metrics(run_dir), "train/loss_epoch")[-1])
    assert summary["best/val/rank1"] == pytest.approx(max(rank1))
    assert summary["best/epoch"] == rank1.index(max(rank1)) + 1
    # every row names its epoch, as Lightning's own rows do: the summary ones the last epoch trained (from 0)
    assert all(row["epoch"] for row in rows)
    assert {row["epoch"] for row in rows if row.get("final/val/rank1") or row.get("calibration/threshold")} == {"2"}
    best = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    assert best["epoch"] + 1 == summary["best/epoch"]


def test_eval_sends_its_test_summary_to_the_logger(limited, data, monkeypatch):
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    out = limited["run_dir"].parents[2]
    ckpt = limited["run_dir"] / "checkpoints" / "best.ckpt"
    result = evaluate(eval_cfg(data, out, f"ckpt_path={ckpt}", "logger=mlflow"))
    (entry,) = result["entries"]
    import mlflow

    client = mlflow.MlflowClient(f"file:{out / 'eval' / HAND / 'mlruns'}")
    (run,) = client.search_runs([client.get_experiment_by_name("handclip").experiment_id])
    logged = run.data.metrics
    prefix = f"test/{HAND}/finetuned"
    assert logged[f"{prefix}/rank1"] == pytest.approx(entry["summary"]["rank1"]["mean"])
    assert logged[f"{prefix}/mAP"] == pytest.approx(entry["summary"]["mAP"]["mean"])
    verification = entry["verification"]["summary"]
    assert logged[f"{prefix}/eer"] == pytest.approx(verification["eer"]["mean"])
    assert logged[f"{prefix}/tar_at_fmr_1pct"] == pytest.approx(verification["tar@fmr=1%"]["mean"])
    assert logged[f"{prefix}/threshold"] == pytest.approx(entry["verification"]["calibration"]["threshold"])
    assert run.data.params["ckpt_path"] == str(ckpt) and run.info.status == "FINISHED"


def test_debug_profiler_with_no_callbacks_and_no_logger(data, tmp_path):
    """debug=profiler writes its report into the run folder; callbacks=none trains without any checkpoint;
    with no logger at all, curves.png is still drawn."""
    cfg = tiny_cfg(data, tmp_path, "debug=profiler", "callbacks=none", "~logger")
    metrics = train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    assert 0.0 <= metrics["val/rank1"] <= 1.0
    report = (run_dir / "fit-profiler.txt").read_text()
    assert "run_training_epoch" in report and "Total time" in report
    assert not list(tmp_path.rglob("*.ckpt")) and not (run_dir / "logs").exists()
    _png(run_dir / "curves.png")


@pytest.mark.slow
def test_debug_overfit_learns_its_few_batches(data, tmp_path):
    """The same 3 batches every epoch (an epoch of the data has 6), on which the training loss falls."""
    cfg = tiny_cfg(data, tmp_path, "debug=overfit", "trainer.max_epochs=5", "model.lr=1e-3", "data.batch_size=4",
                   "seed=5")
    train(cfg)
    losses = column(read_metrics(Path(cfg.paths.output_dir)), "train/loss_epoch")
    assert len(losses) == 5 and losses[-1] < 0.8 * losses[0]
    last = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 5 * 3


# -- trackers, offline -------------------------------------------------------------------------
@pytest.mark.slow
def test_many_loggers_offline_write_their_files(data, tmp_path, monkeypatch):
    """logger=many from the command line, offline: MLflow's store and W&B's offline run in the run folder, each
    with the per-epoch figures, the calibrated threshold and the final figures."""
    env = {**OFFLINE, "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"), "WANDB_CONFIG_DIR": str(tmp_path / "wandb-cfg"),
           "WANDB_DATA_DIR": str(tmp_path / "wandb-data")}
    done = run_module("handclip.train", "experiment=demo", f"paths.data_dir={data}", f"paths.output_root={tmp_path}",
                      f"paths.cache_dir={tmp_path / 'cache'}", "data.progress=false", "trainer.max_epochs=2",
                      "trainer.enable_progress_bar=false", "logger=many", **env)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "train" / HAND
    threshold = json.loads((run_dir / "checkpoints" / "best.calibration.json").read_text())["threshold"]
    rank1 = column(read_metrics(run_dir), "val/rank1")
    assert len(rank1) == 2
    import mlflow

    # MLflow 3 reads a file store only when allowed, as the preset allows it in the training process (whether an
    # earlier test of this worker imported handclip.training.trackers must not matter)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.MlflowClient(f"file:{run_dir / 'mlruns'}")
    (run,) = client.search_runs([client.get_experiment_by_name("handclip").experiment_id])
    assert [m.value for m in client.get_metric_history(run.info.run_id, "val/rank1")] == pytest.approx(rank1)
    assert run.data.metrics["calibration/threshold"] == pytest.approx(threshold)
    assert run.data.metrics["best/val/rank1"] == pytest.approx(max(rank1))
    assert run.data.params["lr"] == "0.0003"  # the model's hyperparameters, as Lightning logs them
    (wandb_run,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    recorded = wandb_run.read_bytes()
    for key in (b"val/rank1", b"calibration/threshold", b"final/val/rank1", b"best/val/rank1"):
        assert key in recorded, key
    _png(run_dir / "curves.png")


@pytest.mark.slow
def test_tracker_packages_load_only_when_a_preset_asks_for_them():
    """Installed for the tests, MLflow costs nothing to runs (and tests) that do not use it. (W&B is imported by timm,
    which open_clip imports, whenever it is installed: ~0.3 s per process, see tests/README.md.)"""
    code = ("import sys, pytorch_lightning, handclip.train, handclip.eval, handclip.training.history; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'mlflow', 'tensorboard'}))")
    done = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
