"""The typed config schemas (handclip/schema.py): every key typed, values of the wrong type or out of range refused
with one line naming the key, the value and what was expected, before torch loads."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT, cli_env

from handclip.command_line import check_override_keys
from handclip.config import compose
from handclip.errors import HandCLIPError

GROUPS = sorted(p.name for p in (ROOT / "configs").iterdir() if p.is_dir() and p.name not in ("hydra",))


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "configs" / group).glob("*.yaml"))


@pytest.mark.parametrize("command", ["train", "eval", "identify", "export", "app"])
def test_every_option_of_every_group_composes_against_the_schema(command):
    """A YAML key the schema does not declare (or a value of the wrong type in a YAML file) fails to compose."""
    from omegaconf import OmegaConf

    from handclip.schema import SCHEMAS

    base = compose(command)
    assert OmegaConf.get_type(base) is SCHEMAS[f"{command}_schema"]
    defaults = (ROOT / "configs" / f"{command}.yaml").read_text()
    for group in GROUPS:
        if f"- {group}:" not in defaults and f"- optional {group}:" not in defaults:
            continue
        for option in options(group):
            cfg = compose(command, [f"{group}={option}"])
            assert cfg.task_name == ("debug" if group == "debug" else command)  # debug runs have folders of their own


@pytest.mark.parametrize(("command", "override", "message"), [
    ("train", "data.batch_size=abc", "data.batch_size=abc: expected a whole number (int), got 'abc'"),
    ("train", "trainer.max_epochs=1.5", "trainer.max_epochs=1.5: expected a whole number (int), got 1.5"),
    ("train", "model.lr=fast", "model.lr=fast: expected a number (float), got 'fast'"),
    ("train", "hand.name=3", "hand.name=3: unknown hand type '3'; expected one of: dorsal_right, dorsal_left, "
                             "palmar_right, palmar_left, hd"),
    ("train", "trainer.deterministic=true", None),
    ("train", "data.cache=maybe", "data.cache=maybe: expected true or false (bool), got 'maybe'"),
    ("eval", "verification.cmc_max_rank=ten", "verification.cmc_max_rank=ten: expected a whole number (int), "
                                              "got 'ten'"),
    ("identify", "threshold=abc", "threshold=abc: expected a number (float), got 'abc'"),
    ("identify", "top_k=abc", "top_k=abc: expected a whole number (int), got 'abc'"),
    ("export", "batch_size=2.5", "batch_size=2.5: expected a whole number (int), got 2.5"),
])
def test_a_value_of_the_wrong_type_is_one_line_naming_key_value_and_type(command, override, message):
    if message is None:
        check_override_keys(command, [override])
        return
    with pytest.raises(HandCLIPError) as err:
        check_override_keys(command, [override])
    assert str(err.value) == message


@pytest.mark.parametrize(("command", "refused", "accepted", "rule"), [
    ("train", "model.lr=0", "model.lr=1e-12", "model.lr=0.0: expected a number > 0"),
    ("train", "model.weight_decay=-0.001", "model.weight_decay=0", "model.weight_decay=-0.001: expected a number >= 0"),
    ("train", "data.batch_size=0", "data.batch_size=1", "data.batch_size=0: expected a number >= 1"),
    ("train", "trainer.max_epochs=0", "trainer.max_epochs=1", "trainer.max_epochs=0: expected a number >= 1"),
    ("train", "data.num_workers=-1", "data.num_workers=0", "data.num_workers=-1: expected a number >= 0"),
    ("eval", "verification.target_fmr=1", "verification.target_fmr=0.999",
     "verification.target_fmr=1.0: expected a number between 0 and 1 (both excluded)"),
    ("identify", "target_fmr=0", "target_fmr=0.0001", "target_fmr=0.0: expected a number between 0 and 1 (both "
                                                      "excluded)"),
    ("identify", "threshold=nan", "threshold=-1", "threshold=nan: expected a finite number"),
    ("identify", "threshold=inf", "threshold=1.0", "threshold=inf: expected a finite number"),
    ("identify", "top_k=0", "top_k=1", "top_k=0: expected a number >= 1"),
    ("export", "onnx.tolerance=0", "onnx.tolerance=1e-9", "onnx.tolerance=0.0: expected a number > 0"),
])
def test_ranges_are_checked_at_their_boundary(command, refused, accepted, rule):
    check_override_keys(command, [accepted])
    with pytest.raises(HandCLIPError) as err:
        check_override_keys(command, [refused])
    assert str(err.value) == rule


def test_every_value_of_a_sweep_is_checked():
    check_override_keys("train", ["-m", "model.lr=3e-4,1e-4", "seed=range(1,4)", "model.weight_decay=interval(0,1)"])
    with pytest.raises(HandCLIPError, match=r"^model.lr=0.0: expected a number > 0$"):
        check_override_keys("train", ["-m", "model.lr=3e-4,0"])
    with pytest.raises(HandCLIPError, match=r"^seed=x: expected a whole number \(int\), got 'x'$"):
        check_override_keys("train", ["-m", "seed=1,x"])


def test_debugging_arguments_are_keys_of_the_trainer_and_plus_says_so():
    cfg = compose("train", ["trainer.fast_dev_run=true", "trainer.limit_train_batches=0.1", "trainer.profiler=simple"])
    assert cfg.trainer.fast_dev_run is True and cfg.trainer.profiler == "simple"
    assert compose("train").trainer.fast_dev_run is False  # Lightning's own default
    with pytest.raises(HandCLIPError, match=r"^\+trainer.fast_dev_run=true: trainer.fast_dev_run is a key of the "
                                            r"train config already; set it without '\+': trainer.fast_dev_run=true$"):
        check_override_keys("train", ["+trainer.fast_dev_run=true"])
    # Lightning arguments HandCLIP does not declare are still added with +
    check_override_keys("train", ["+trainer.gradient_clip_val=1.0"])
    assert compose("train", ["+trainer.gradient_clip_val=1.0"]).trainer.gradient_clip_val == 1.0


def test_an_override_hydra_cannot_parse_says_to_quote_it():
    with pytest.raises(HandCLIPError) as err:
        check_override_keys("identify", ["name=José"])
    assert str(err.value).startswith("name=José: Hydra cannot read this override")
    assert "name=\"José\"" in str(err.value) and "\n" not in str(err.value)
    check_override_keys("identify", ["name=\"José\"", "gallery='/data/Données'"])


@pytest.mark.parametrize(("module", "override"), [
    ("handclip.train", "data.batch_size=abc"),
    ("handclip.train", "trainer.max_epochs=1.5"),
    ("handclip.train", "model.lr=fast"),
    ("handclip.train", "hand.name=3"),
    ("handclip.eval", "model.lr=fast"),
    ("handclip.identify", "threshold=nan"),
    ("handclip.export", "onnx.opset=x"),
])
def test_typed_errors_come_before_torch_loads(tmp_path, module, override):
    probe = ("import runpy, sys\n"
             "try:\n"
             f"    runpy.run_module({module!r}, run_name='__main__')\n"
             "except SystemExit as stop:\n"
             "    print(stop.code, [m for m in ('torch', 'pytorch_lightning', 'open_clip') if m in sys.modules])\n")
    result = subprocess.run([sys.executable, "-c", probe, override, f"paths.output_root={tmp_path / 'out'}"],
                            cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["2", "[]"], result.stderr[-2000:]
    assert result.stderr.startswith(f"error: {override.split('=')[0]}=") and result.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()
