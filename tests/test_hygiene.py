"""Code hygiene: no private attributes of Lightning or Hydra in the source (and the public behaviour used instead),
warnings filtered by name only, one slug helper."""

from __future__ import annotations

import re

import pytest
from conftest import ROOT

from handclip.utils.files import slug

SRC = ROOT / "src" / "handclip"


#: Private members that Lightning's base classes give our subclasses (LightningModule, ModelCheckpoint, ...).
INHERITED_PRIVATE = re.compile(r"self\._(trainer|fabric|last_time_checked|last_global_step_saved|"
                               r"should_skip_saving_checkpoint|save_none_monitor_checkpoint|monitor_candidates|"
                               r"save_checkpoint|remove_checkpoint|ensure_setup)\b")

ALLOWED_OWNERS = {"self", "cls", "os", "sys", "torch"}


def test_no_private_attributes_of_lightning_or_hydra():
    """``x._name`` of another library's object breaks silently when it is renamed: the source uses public API.
    Allowed: our own objects' private members (``self._jobs``), ``os._exit``, ``sys._getframe`` and torch's
    documented ``torch._dynamo``."""
    found = []
    for path in SRC.rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            owners = {m.group(1) for m in re.finditer(r"(\w+)\._[a-z]\w*", code)} - ALLOWED_OWNERS
            imports_private = re.search(r"\b(from|import) (pytorch_lightning|lightning_fabric|hydra)\S*\._", code)
            base_private = re.search(r"super\(\)\._[a-z]", code)  # a base class's private method
            if owners or INHERITED_PRIVATE.search(code) or imports_private or base_private or "_internal" in code:
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert found == []


def test_the_public_behaviour_used_instead_of_private_attributes():
    """What the source relies on in place of private attributes: if a Lightning or Hydra upgrade changes it, this
    test names it."""
    import pytorch_lightning as pl
    from hydra.core.utils import JobReturn, JobStatus

    from handclip.hydra_callbacks import _failure
    from handclip.models.module import HandCLIPModule

    # hydra_callbacks.SweepSummary: a failed job's exception comes from JobReturn.return_value, which raises it
    failed = JobReturn(status=JobStatus.FAILED)
    failed.return_value = ValueError("bad input")
    err = _failure(failed)
    assert isinstance(err, ValueError) and str(err) == "bad input"
    # models.module: outside a Trainer, LightningModule.trainer raises RuntimeError (the module then has none)
    with pytest.raises(RuntimeError, match="not attached"):
        pl.LightningModule().trainer  # noqa: B018
    assert HandCLIPModule._attached_trainer(pl.LightningModule()) is None


def test_warnings_are_filtered_by_name_only():
    """pytest's filters and the source's warnings.filterwarnings name a message or a module, never a whole
    category."""
    text = (ROOT / "pyproject.toml").read_text()
    filters = re.search(r"filterwarnings = \[(.*?)\]", text, re.S).group(1)
    entries = re.findall(r'"([^"]*)"', filters)
    assert entries
    for entry in entries:
        action, message, *rest = entry.split(":")
        module = rest[1] if len(rest) > 1 else ""
        assert message or module, f"{entry!r} filters a whole category"
    for path in SRC.rglob("*.py"):
        for call in re.findall(r"warnings\.filterwarnings\((.*?)\)\n", path.read_text(), re.S):
            assert "message=" in call or "module=" in call, f"{path.name}: filterwarnings({call})"


def test_one_slug_helper():
    assert slug("case 42/ä") == "case_42"
    assert slug("__a b__") == "a_b"
    assert slug("???", default="query") == "query"
    assert slug("Intel Xeon (2 cores)", allowed="a-z0-9", sep="-", lower=True) == "intel-xeon-2-cores"
    definitions = [f"{p.relative_to(ROOT)}" for p in SRC.rglob("*.py")
                   if re.search(r"def _?slug\b|re\.sub\(r?\"\[\^A-Za-z0-9", p.read_text())]
    assert definitions == ["src/handclip/utils/files.py"]
