"""The GPU code paths that can be exercised on a CPU: what would stall or slow a GPU, checked where it is decided.

* a training iteration reads nothing back from the device (a host sync on a GPU) except when the progress bar is
  redrawn, the logger writes, or the losses are checked for NaN (every NONFINITE_CHECK_EVERY steps);
* a resumed run keeps its own AdamW implementation (fused on CUDA) whatever device wrote the checkpoint;
* evaluation outside a Trainer slices cached crops on the device it embeds on, or copies from pinned memory;
* a compiled image tower compiles one training graph for full and short batches.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import make_layout, tiny_cfg
from torch.utils.data import DataLoader

from handclip.data.datamodule import HandDataModule
from handclip.data.datasets import DeviceBatchLoader
from handclip.evaluation.runs import evaluate_hand
from handclip.models import module as module_mod
from handclip.models.clip import preprocess_config
from handclip.models.encoder import zero_shot_encoder
from handclip.models.module import NONFINITE_CHECK_EVERY, HandCLIPModule
from handclip.train import train

#: Tensor methods that copy a value to the host: each one waits for the GPU to finish what was queued before.
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_layout(tmp_path_factory.mktemp("layout"), n_train_ids=6, per_id=5)


def test_training_iterations_read_nothing_back_between_refreshes(data, tmp_path, monkeypatch):
    """Iteration k runs from the module's on_train_batch_start of batch k to that of batch k+1: forward, loss,
    backward, AdamW, metrics, logging and the progress bar. Lightning's default bar and the per-step NaN check read
    the loss every iteration (two syncs per step on a GPU), torchmetrics' argument checks read the labels."""
    reads: dict[int, list[str]] = {}
    current = {"iteration": None}
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            if current["iteration"] is not None:
                reads.setdefault(current["iteration"], []).append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    bars = []

    def on_train_batch_start(self, batch, batch_idx):
        current["iteration"] = batch_idx
        bars.append(self.trainer.progress_bar_callback)

    monkeypatch.setattr(HandCLIPModule, "on_train_batch_start", on_train_batch_start, raising=False)
    # Fused AdamW, as on CUDA (the CPU's default AdamW reads its step counter, which lives on the host there)
    monkeypatch.setattr(module_mod, "adamw_implementation", lambda device: {"fused": True})
    monkeypatch.setattr(HandCLIPModule, "on_validation_start",
                        lambda self: (current.update(iteration=None), self.check_losses_finite()))
    refresh = 10
    cfg = tiny_cfg(data, tmp_path, "trainer.max_epochs=1", "data.batch_size=1", "trainer.enable_progress_bar=true",
                   f"callbacks.progress_bar.refresh_rate={refresh}", "trainer.log_every_n_steps=100")
    train(cfg)

    steps = 24  # 6 identities x 4 training images, batch 1
    assert bars[0].refresh_rate == refresh
    assert len(bars) == steps
    quiet = [k for k in range(steps - 1) if (k + 1) % refresh and (k + 1) % NONFINITE_CHECK_EVERY]
    assert quiet and all(k not in reads for k in quiet), {k: reads[k] for k in quiet if k in reads}
    # ... and the redraws do read the loss (the counter sees host reads)
    assert all(k in reads for k in range(refresh - 1, steps - 1, refresh)), reads


def test_nonfinite_loss_is_caught_within_the_check_interval(data, tmp_path, monkeypatch):
    """Without a per-step check the run still stops at the next check, naming the first bad step, and before any
    checkpoint of that epoch is written."""
    original = HandCLIPModule.forward
    monkeypatch.setattr(HandCLIPModule, "forward",
                        lambda self, images: original(self, images) * (float("nan") if self.global_step == 5 else 1))
    with pytest.raises(Exception, match=r"loss became nan at global step 5 \(epoch 0, batch 5\)"):
        train(tiny_cfg(data, tmp_path, "trainer.max_epochs=1", "data.batch_size=1"))
    assert not list((tmp_path / "train").rglob("*.ckpt"))


def test_resume_keeps_this_runs_adamw_implementation(data, tmp_path, monkeypatch):
    """A checkpoint written where AdamW was not fused (a CPU run) resumed where it is (CUDA): load_state_dict
    would restore fused=None with the saved groups. Fused AdamW also runs on the CPU, so the test forces it."""
    train(tiny_cfg(data, tmp_path, "trainer.max_epochs=1"))
    saved = torch.load(tmp_path / "train" / "dorsal_right" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["optimizer_states"][0]["param_groups"][0]["fused"] is None

    monkeypatch.setattr(module_mod, "adamw_implementation", lambda device: {"fused": True})
    resumed = {}

    def on_train_start(self):
        optimizer = self.trainer.optimizers[0]
        resumed["fused"] = {g["fused"] for g in optimizer.param_groups}
        resumed["step"] = {float(s["step"]) for s in optimizer.state.values()}

    monkeypatch.setattr(HandCLIPModule, "on_train_start", on_train_start, raising=False)
    train(tiny_cfg(data, tmp_path, "trainer.max_epochs=2", "ckpt_path=last"))
    steps_in_epoch_one = saved["global_step"]
    assert resumed == {"fused": {True}, "step": {float(steps_in_epoch_one)}}


def test_evaluation_batches_come_from_the_embedding_device(data, tmp_path):
    preprocess = preprocess_config("HandCLIP-Tiny", None)

    def datamodule(device_batches):
        return HandDataModule(str(data), "dorsal_right", preprocess, cache_dir=str(tmp_path / "cache"),
                              device_batches=device_batches, progress=False)

    sliced = datamodule(True)
    paths = sliced.test_images().paths
    assert isinstance(sliced.image_dataloader(paths, device="cpu"), DeviceBatchLoader)
    sliced.setup("fit")
    assert all(isinstance(loader, DeviceBatchLoader) for loader in sliced.whole_val_and_train_loaders("cpu"))
    copied = datamodule(False)
    to_gpu, here = copied.image_dataloader(paths, device="cuda"), copied.image_dataloader(paths)
    assert isinstance(to_gpu, DataLoader) and to_gpu.pin_memory and not here.pin_memory

    encoder = zero_shot_encoder("HandCLIP-Tiny", None)
    cpu = torch.device("cpu")
    a = evaluate_hand(encoder, datamodule(True), cpu, progress=False)
    b = evaluate_hand(encoder, datamodule(False), cpu, progress=False)
    assert a["summary"] == b["summary"] and not math.isnan(a["summary"]["rank1"]["mean"])


@pytest.mark.slow
def test_compiled_tower_compiles_one_training_graph_for_full_and_short_batches():
    from torch._dynamo.testing import CompileCounter

    module = HandCLIPModule(["a", "b", "c"], hand="dorsal_right", model_name="HandCLIP-Tiny", pretrained=None)
    counter = CompileCounter()
    module.encoder.compile_tower(backend=counter)
    for n in (8, 8, 3):  # full batches, then an epoch's short last batch
        module(torch.randint(0, 255, (n, 3, 64, 64), dtype=torch.uint8)).sum().backward()
    assert counter.frame_count == 1
    module.eval()
    with torch.no_grad():  # validation: one more graph, for every batch size
        for n in (16, 5):
            module.encoder.embed(torch.randint(0, 255, (n, 3, 64, 64), dtype=torch.uint8))
    assert counter.frame_count == 2
