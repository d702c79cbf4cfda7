"""The ranges of the typed schemas (:mod:`handclip.schema`) checked: a value outside its field's range is refused
with one line naming the key, the value and what was expected (types are OmegaConf's to check)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import fields, is_dataclass
from typing import Any, get_args, get_type_hints

from omegaconf import DictConfig

from handclip.errors import HandCLIPError


def _ranged_fields(schema: type, cfg: DictConfig, prefix: str = "") -> Iterator[tuple[str, Any, dict]]:
    """(dotted key, value, metadata) of every field with a rule, walking nested schemas as the config has them.
    Only those values are read (resolved): an interpolation elsewhere may need torch (``${handclip_precision:}``)."""
    from omegaconf import OmegaConf

    hints = get_type_hints(schema)
    for spec in fields(schema):
        if spec.name not in cfg.keys():  # "in cfg" would resolve the value
            continue
        key = f"{prefix}{spec.name}"
        hint = next((a for a in get_args(hints[spec.name]) if a is not type(None)), hints[spec.name])  # Optional[X]
        if is_dataclass(hint):
            node_type = OmegaConf.get_type(cfg, spec.name)  # a subclass where a group option says so (ddp)
            if is_dataclass(node_type) and isinstance(cfg[spec.name], DictConfig):
                yield from _ranged_fields(node_type, cfg[spec.name], f"{key}.")
        elif spec.metadata:
            yield key, cfg[spec.name], dict(spec.metadata)


def _check_one(key: str, value: Any, rule: dict) -> None:
    if value is None:
        return
    if "check" in rule:
        try:
            rule["check"](value)
        except HandCLIPError as err:
            raise HandCLIPError(f"{key}={value}: {err}") from None
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise HandCLIPError(f"{key}={value}: expected {rule['rule']}")
    low, high, open_ = rule.get("low"), rule.get("high"), rule.get("open", False)
    too_low = low is not None and (value <= low if open_ else value < low)
    too_high = high is not None and (value >= high if open_ else value > high)
    if too_low or too_high:
        raise HandCLIPError(f"{key}={value}: expected a number {rule['rule']}")


def check_values(cfg: DictConfig) -> None:
    """Refuse, with one line naming the key, a value outside its field's range (types are OmegaConf's to check)."""
    from omegaconf import OmegaConf

    schema = OmegaConf.get_type(cfg)
    if not is_dataclass(schema):
        return
    for key, value, rule in _ranged_fields(schema, cfg):
        _check_one(key, value, rule)
