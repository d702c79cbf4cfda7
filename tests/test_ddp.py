"""Scaling out: DDP on two CPU processes (gloo), resume, DDP inside a -m sweep, the submitit launchers, and errors.

The end-to-end runs go through ``python -m handclip.train`` in a subprocess, as users run them: Lightning
starts the second process by re-running that command.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from conftest import FIVE_METRICS, ROOT, column, make_layout, quiet_overrides, read_metrics, run_module, tiny_preprocess
from ddp_probe import digest
from reference import brute_force_rank1
from torch.utils.data import DistributedSampler

from handclip.command_line import check_launcher_installed
from handclip.config import compose, job_devices, precision_for
from handclip.data.datamodule import HandDataModule
from handclip.data.datasets import DeviceBatchLoader, IndexedDataset, TensorImageDataset
from handclip.data.sampling import EveryImageOnceBatchSampler
from handclip.errors import HandCLIPError
from handclip.launch import check_relaunch, job_argv
from handclip.models.checkpoint import load_module
from handclip.utils.devices import check_trainer_devices

#: 7 identities x 5 training images: 35, odd, so the last global batch is split unevenly; 7 val images,
#: so a DistributedSampler pads val (and the 35-image gallery) with a duplicate.
N_IDS, PER_ID = 7, 6
DDP = ("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2")
RECIPE = ("seed=7", "model.lr=1e-3", "data.batch_size=4", "data.eval_batch_size=3",
          "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false")


# -- the batch sampler: every image once per epoch across processes ------------------------------
def _epoch(n: int, batch: int, world: int, epoch: int, shuffle: bool = True) -> list[list[list[int]]]:
    """Per rank, the batches of one epoch, with the DistributedSampler Lightning would inject."""
    ranks = []
    for rank in range(world):
        sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=shuffle, seed=3)
        sampler.set_epoch(epoch)
        batches = EveryImageOnceBatchSampler(sampler, batch)
        ranks.append(list(batches))
        assert len(batches) == len(ranks[-1])
    return ranks


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 9, 17, 33, 35, 64, 65, 100])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("batch", [1, 4, 8])
def test_every_image_once_per_epoch_across_processes(n, world, batch):
    if n < world:
        with pytest.raises(ValueError, match="cannot be shared"):
            _epoch(n, batch, world, 0)
        return
    ranks = _epoch(n, batch, world, 0)
    seen = [i for batches in ranks for b in batches for i in b]
    assert sorted(seen) == list(range(n))  # each index exactly once, none padded
    assert len({len(batches) for batches in ranks}) == 1  # every process takes the same number of steps
    assert all(1 <= len(b) <= batch + 1 for batches in ranks for b in batches)  # never an empty batch
    for step in zip(*ranks):  # within a step the processes' batches differ by at most one image
        assert max(map(len, step)) - min(map(len, step)) <= 1
    merged = n > world * batch and 0 < n % (world * batch) < world  # a too-small last window joined the previous
    assert all(len(b) <= batch for batches in ranks for b in batches) or merged


def test_epochs_are_shuffled_with_the_samplers_seed_and_epoch():
    first, again, second = _epoch(40, 4, 2, 0), _epoch(40, 4, 2, 0), _epoch(40, 4, 2, 1)
    assert first == again and first != second
    assert [i for b in _epoch(10, 4, 2, 0, shuffle=False)[0] for i in b] == [0, 2, 4, 6, 8]
    plain = EveryImageOnceBatchSampler(range(10), 4)  # no distributed sampler: a plain BatchSampler
    assert list(plain) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]] and len(plain) == 3


def test_indexed_batches_and_device_loader_with_a_sampler():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 2, 2).contiguous()
    dataset = TensorImageDataset(images, list(range(10)))
    x, y, i = IndexedDataset(dataset).__getitems__([7, 2])
    assert y.tolist() == [7, 2] and i.tolist() == [7, 2] and torch.equal(x, images[[7, 2]])
    assert IndexedDataset(dataset)[4][1:] == (torch.tensor(4), 4)
    sampler = DistributedSampler(dataset, num_replicas=2, rank=1, shuffle=False)
    from torch.utils.data import BatchSampler

    loader = DeviceBatchLoader(images, dataset.labels, batch_sampler=BatchSampler(sampler, 2, False), with_index=True)
    batches = list(loader)
    assert len(loader) == len(batches) == 3
    assert torch.cat([i for _, _, i in batches]).tolist() == [1, 3, 5, 7, 9]
    assert all(torch.equal(x[:, 0, 0, 0].long(), y) for x, y, _ in batches)


# -- configs -----------------------------------------------------------------------------------
def _hydra_cfg(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from handclip.config import config_dir, register_resolvers

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose("train", overrides=overrides, return_hydra_config=True)


def test_ddp_config_and_its_precision(monkeypatch):
    cfg = compose("train", ["trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"])
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.devices == 4 and cfg.trainer.num_nodes == 2
    assert cfg.trainer.use_distributed_sampler is True
    assert compose("train", ["trainer=ddp", "trainer.accelerator=cpu"]).trainer.precision == "32-true"
    assert compose("train", ["trainer=ddp", "trainer.accelerator=gpu"]).trainer.precision == "bf16-mixed"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert precision_for("auto") == "bf16-mixed" and precision_for("cpu") == "32-true"
    # the fixed defaults are untouched
    default = compose("train")
    assert default.trainer.precision == "32-true" and default.data.batch_size == 64 and default.ckpt_path is None


def test_slurm_preset_ties_gpus_and_tasks_to_the_trainer():
    cfg = _hydra_cfg(["launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2",
                      "hydra.launcher.partition=gpu"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "gpu"
    assert launcher.gpus_per_node == 4 and launcher.tasks_per_node == 4 and launcher.nodes == 2
    assert launcher.timeout_min > 0 and launcher.max_num_timeout > 0
    assert cfg.ckpt_path == "auto"  # requeued jobs continue from their last.ckpt
    assert cfg.hydra.launcher.submitit_folder.startswith(str(Path(cfg.paths.output_root) / "train"))
    one_gpu = _hydra_cfg(["launcher=slurm", "trainer=gpu"]).hydra.launcher  # trainer=gpu has no num_nodes
    assert (one_gpu.gpus_per_node, one_gpu.tasks_per_node, one_gpu.nodes) == (1, 1, 1)


def test_local_preset_gives_each_job_one_device(monkeypatch):
    cfg = _hydra_cfg(["launcher=local"])
    assert cfg.hydra.launcher._target_.endswith("LocalLauncher") and cfg.hydra.launcher.tasks_per_node == 1
    assert cfg.trainer.devices == (1 if not torch.cuda.is_available() else [0])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert job_devices("auto") == [0] and job_devices("gpu") == [0] and job_devices("cpu") == 1


# -- errors ------------------------------------------------------------------------------------
def test_more_devices_than_the_machine_has(monkeypatch):
    too_many = os.cpu_count() * 4
    with pytest.raises(HandCLIPError, match=rf"trainer.devices={too_many} asks for {too_many} training processes"):
        check_trainer_devices("cpu", too_many)
    check_trainer_devices("cpu", 1)
    with pytest.raises(HandCLIPError, match="number of processes"):
        check_trainer_devices("cpu", [0, 1])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(HandCLIPError, match="trainer.accelerator=gpu but no CUDA GPU is available"):
        check_trainer_devices("gpu", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_trainer_devices("gpu", 2)
    check_trainer_devices("auto", "0,1")
    with pytest.raises(HandCLIPError, match=r"trainer.devices=4 but this machine has 2 GPU\(s\)"):
        check_trainer_devices("gpu", 4)
    with pytest.raises(HandCLIPError, match=r"names GPU\(s\) \[3\].*has 2 GPU"):
        check_trainer_devices("cuda", [0, 3])


def test_training_refuses_more_cpu_processes_than_cores(tmp_path):
    from conftest import tiny_cfg

    from handclip.train import train

    with pytest.raises(HandCLIPError, match=r"trainer.devices=999 asks for 999 training processes on the CPU"):
        train(tiny_cfg(tmp_path / "no-data-needed", tmp_path, *DDP[:2], "trainer.devices=999"))
    assert not (tmp_path / "train").exists()


HIDE_SUBMITIT = (
    "import runpy, sys\n"
    "sys.modules['submitit'] = None; sys.modules['hydra_plugins.hydra_submitit_launcher'] = None\n"
    "sys.argv = ['handclip.train', *sys.argv[1:]]\n"
    "runpy.run_module('handclip.train', run_name='__main__', alter_sys=True)\n"
)


@pytest.mark.slow  # a new Python process per preset (~8-11 s here)
@pytest.mark.parametrize("preset", ["launcher=slurm", "launcher=local", "hydra/launcher=submitit_local"])
def test_launcher_preset_without_the_extra(preset, tmp_path):
    from conftest import cli_env

    result = subprocess.run([sys.executable, "-c", HIDE_SUBMITIT, "-m", preset, "hand=dorsal_right",
                             f"paths.output_root={tmp_path}"], env=cli_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [lines[-1]] and lines[0].startswith(f"error: {preset} needs Hydra's submitit launcher")
    assert 'pip install -e ".[cluster]"' in lines[0]
    assert not (tmp_path / "train").exists()


def test_launcher_check_passes_when_installed_and_ignores_other_arguments():
    check_launcher_installed(["-m", "launcher=slurm", "hydra/launcher=submitit_local", "hand=glob(*)"])
    check_launcher_installed(["launcher_note=slurm", "hydra/launcher=basic", "x=launcher=slurm"])


def test_a_submitit_local_job_cannot_start_ddp_processes(monkeypatch):
    import __main__

    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False)
    monkeypatch.setattr(__main__, "__spec__", SimpleNamespace(name="submitit.core._submit"), raising=False)
    with pytest.raises(HandCLIPError, match="trainer.devices=2 needs 2 processes.*launcher=local"):
        check_relaunch(trainer)
    monkeypatch.setattr(__main__, "__spec__", SimpleNamespace(name="handclip.train"))
    check_relaunch(trainer)


def test_the_command_line_of_one_sweep_job():
    argv = ["/x/handclip/train.py", "-m", "hand=dorsal_right,palmar_left", "-cn", "train", "--config-dir=/extra",
            "trainer=ddp", "--multirun"]
    assert job_argv(argv, ["hand=palmar_left", "trainer=ddp"]) == [
        "/x/handclip/train.py", "-cn", "train", "--config-dir=/extra", "hand=palmar_left", "trainer=ddp"]


# -- two gloo processes ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_layout(tmp_path_factory.mktemp("layout"), hands=("dorsal_right", "palmar_left"), n_train_ids=N_IDS,
                       per_id=PER_ID)


def train_cli(data: Path, out: Path, *extra: str, timeout: int = 600, multirun: bool = False):
    """``python -m handclip.train [-m]`` on the tiny model with tests/ importable (for the probe callback)."""
    args = [*(["-m"] if multirun else []), "experiment=demo", f"paths.data_dir={data}", *quiet_overrides(out), *RECIPE,
            "+callbacks.probe._target_=ddp_probe.SeenImages", f"+callbacks.probe.out={out / 'probe'}", *extra]
    path = os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])
    result = run_module("handclip.train", *args, timeout=timeout, PYTHONPATH=path)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-5000:])
    return result


def training_digests(data: Path, hand: str = "dorsal_right") -> Counter:
    dm = HandDataModule(str(data), hand, tiny_preprocess(), cache=False)
    dm.setup()
    return Counter(digest(image) for image, _ in dm.train_set)


def seen_per_epoch(probe: Path) -> dict[int, list[list[str]]]:
    """{epoch: [digests seen by rank 0, by rank 1, ...]}."""
    ranks = [json.loads(p.read_text()) for p in sorted(probe.glob("seen-rank*.json"))]
    assert [r["world_size"] for r in ranks] == [len(ranks)] * len(ranks)
    epochs = sorted({int(e) for r in ranks for e in r["epochs"]})
    return {e: [r["epochs"].get(str(e), []) for r in ranks] for e in epochs}


@pytest.fixture(scope="module")
def ddp_runs(data, tmp_path_factory):
    """Two epochs on two gloo processes, through a DataLoader (Lightning's sampler) or device batches;
    each run once, on first use."""
    runs: dict[str, dict] = {}

    def run(loader: str) -> dict:
        if loader not in runs:
            out = tmp_path_factory.mktemp(f"ddp-{loader}")
            device_batches = "true" if loader == "device_batches" else "false"
            result = train_cli(data, out, *DDP, "trainer.max_epochs=2", f"data.device_batches={device_batches}")
            runs[loader] = {"out": out, "run_dir": out / "train" / "dorsal_right", "loader": loader,
                            "log": result.stdout + result.stderr}
        return runs[loader]

    return run


LOADERS = ["dataloader", "device_batches"]


@pytest.mark.slow
@pytest.mark.parametrize("loader", LOADERS)
def test_ddp_run_writes_one_run_folder(loader, ddp_runs):
    ddp_run = ddp_runs(loader)
    run_dir = ddp_run["run_dir"]
    assert sorted(p.name for p in (ddp_run["out"] / "train").iterdir()) == ["dorsal_right"]
    # .lock: rank 0's hold on the folder while the run lives (tests/test_faults.py)
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", ".lock", "checkpoints", "config.yaml", "curves.png",
                                                         "logs", "train.log"]
    assert sorted(p.name for p in (run_dir / ".hydra").iterdir()) == ["config.yaml", "overrides.yaml"]  # rank 0 only
    # the open-set threshold is calibrated once, by rank 0, on the whole val set
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "best.calibration.json", "best.ckpt", "last.ckpt"]
    calibration = json.loads((run_dir / "checkpoints" / "best.calibration.json").read_text())
    assert calibration["computed_from"]["val_images"] == N_IDS and calibration["computed_from"]["train_images"] == (
        N_IDS * (PER_ID - 1))
    assert sorted(p.name for p in (run_dir / "logs").iterdir()) == ["version_0"]
    rows = read_metrics(run_dir)
    for key in FIVE_METRICS:
        assert len(column(rows, key)) == 2, key
    assert "2 processes (1 node(s) x 2 device(s)) x data.batch_size 4 = global batch 8" in ddp_run["log"]
    assert (run_dir / "train.log").read_text().count("global batch 8") == 1  # written by rank 0 only


@pytest.mark.slow
@pytest.mark.parametrize("loader", LOADERS)
def test_ddp_builds_the_crop_cache_once(loader, ddp_runs):
    """One process decodes each split (prepare_data); the other waits and opens the cache."""
    ddp_run = ddp_runs(loader)
    decoded = [line for line in ddp_run["log"].splitlines() if "into the crop cache" in line]
    assert len(decoded) == 2, decoded
    assert any("dorsal_right/train: decoding 35 of 35" in line for line in decoded)
    assert any("dorsal_right/val: decoding 7 of 7" in line for line in decoded)


@pytest.mark.slow
@pytest.mark.parametrize("loader", LOADERS)
def test_ddp_shows_every_training_image_once_per_epoch(loader, ddp_runs, data):
    ddp_run = ddp_runs(loader)
    expected = training_digests(data)
    assert sum(expected.values()) == N_IDS * (PER_ID - 1) and max(expected.values()) == 1
    epochs = seen_per_epoch(ddp_run["out"] / "probe")
    assert sorted(epochs) == [0, 1]
    for epoch, ranks in epochs.items():
        assert len(ranks) == 2 and all(ranks), f"epoch {epoch}: a process saw no image"
        assert Counter(d for rank in ranks for d in rank) == expected, f"epoch {epoch} ({ddp_run['loader']})"
        assert abs(len(ranks[0]) - len(ranks[1])) <= 1
    assert epochs[0][0] != epochs[1][0]  # a new order every epoch (Lightning sets the sampler's epoch)


@pytest.mark.slow
@pytest.mark.parametrize("loader", LOADERS)
def test_ddp_val_figures_equal_one_process_on_the_same_weights(loader, ddp_runs, data):
    """val/loss, val/acc and val/rank1 of the last epoch = one process validating last.ckpt's weights."""
    ddp_run = ddp_runs(loader)
    rows = read_metrics(ddp_run["run_dir"])
    logged = {key: column(rows, key)[-1] for key in ("val/loss", "val/acc", "val/rank1")}
    module = load_module(ddp_run["run_dir"] / "checkpoints" / "last.ckpt")
    dm = HandDataModule(str(data), "dorsal_right", tiny_preprocess(), cache=False, eval_batch_size=3)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    single = trainer.validate(module, datamodule=dm, verbose=False)[0]
    assert logged["val/rank1"] == single["val/rank1"]  # exactly
    assert logged["val/acc"] == single["val/acc"]
    assert logged["val/loss"] == pytest.approx(single["val/loss"], abs=1e-6)
    with torch.no_grad():
        val = [(module.encoder.embed(x.unsqueeze(0))[0], int(y)) for x, y in dm.val_set]
        gallery = [(module.encoder.embed(x.unsqueeze(0))[0], int(y)) for x, y in dm.train_set]
    assert logged["val/rank1"] == pytest.approx(brute_force_rank1(
        [v for v, _ in val], [y for _, y in val], [g for g, _ in gallery], [y for _, y in gallery]), abs=1e-6)


@pytest.mark.slow
def test_ddp_resume_continues_the_epoch_count(ddp_runs, data, tmp_path):
    ddp_run = ddp_runs("dataloader")
    out = tmp_path / "resumed"
    shutil.copytree(ddp_run["out"] / "train", out / "train")
    train_cli(data, out, *DDP, "trainer.max_epochs=3", "ckpt_path=last")
    run_dir = out / "train" / "dorsal_right"
    rows = read_metrics(run_dir, version=1)
    assert sorted({int(r["epoch"]) for r in rows}) == [2]
    assert len(column(rows, "val/rank1")) == 1
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 2
    assert len(list(run_dir.glob("config.resumed-*.yaml"))) == 1 and (run_dir / "config.yaml").is_file()
    assert sorted(p.name for p in (run_dir / "logs").iterdir()) == ["version_0", "version_1"]
    assert Counter(d for rank in seen_per_epoch(out / "probe")[2] for d in rank) == training_digests(data)


@pytest.mark.slow
def test_ddp_inside_a_multirun_runs_each_job_once(data, tmp_path):
    """-m with two hand types: Lightning's second process runs its own job, not the whole sweep again."""
    result = train_cli(data, tmp_path, *DDP, "trainer.max_epochs=1", "hand=dorsal_right,palmar_left", multirun=True)
    for hand in ("dorsal_right", "palmar_left"):
        run_dir = tmp_path / "train" / hand
        assert (run_dir / "checkpoints" / "best.ckpt").is_file(), hand
        assert sorted(p.name for p in (run_dir / "logs").iterdir()) == ["version_0"], hand
        assert len(column(read_metrics(run_dir), "val/rank1")) == 1
    log = result.stdout + result.stderr
    assert sum("into the crop cache" in line for line in log.splitlines()) == 4  # 2 splits x 2 hands, once each
    assert log.count("DDP processes of this sweep job run:") == 2


@pytest.mark.slow
def test_two_hand_multirun_through_submitit_local(data, tmp_path):
    train_cli(data, tmp_path, "launcher=local", "hand=dorsal_right,palmar_left", "trainer.max_epochs=1",
              timeout=900, multirun=True)
    for hand in ("dorsal_right", "palmar_left"):
        run_dir = tmp_path / "train" / hand
        assert (run_dir / "checkpoints" / "best.ckpt").is_file(), hand
        assert (run_dir / "config.yaml").is_file() and len(column(read_metrics(run_dir), "val/rank1")) == 1
    assert (tmp_path / "train" / ".submitit").is_dir()  # submitit's per-job logs
