"""The command line of HandCLIP's Hydra commands, checked before Hydra (and torch) runs, and the entry-point wrapper.

:func:`hydra_entry` turns ``task(cfg)`` into a command: optional extras a launcher or sweeper needs, group options,
keys, types and ranges (:mod:`handclip.schema`) are checked first, each mistake one ``error:`` line (exit status 2)
instead of Hydra's multi-line report; input errors of the task itself become one line too.
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable

from omegaconf import DictConfig, OmegaConf

from handclip.config import compose, config_dir, register_resolvers
from handclip.errors import HandCLIPError, exit_on_error

#: Launcher presets (``launcher=...`` or ``hydra/launcher=...``) and the optional extra they need.
LAUNCHER_EXTRAS = {"slurm": "cluster", "local": "cluster", "submitit_slurm": "cluster", "submitit_local": "cluster"}
_LAUNCHER_MODULES = ("hydra_plugins.hydra_submitit_launcher", "submitit")
#: Group options that need a Hydra plugin: (group pattern, option) -> (what, extra, modules, pip package).
_OPTUNA = ("Hydra's Optuna sweeper", "search", ("hydra_plugins.hydra_optuna_sweeper", "optuna"), "hydra-optuna-sweeper")
PLUGIN_OPTIONS = {
    **{(r"(?:hydra/)?launcher", name): ("Hydra's submitit launcher", extra, _LAUNCHER_MODULES,
                                        "hydra-submitit-launcher") for name, extra in LAUNCHER_EXTRAS.items()},
    ("hparams_search", "optuna"): _OPTUNA,
    ("hydra/sweeper", "optuna"): _OPTUNA,
}


def check_launcher_installed(argv: list[str]) -> None:
    """A launcher or sweeper preset named on the command line needs its optional extra: say how to install it."""
    import importlib.util
    import re

    for token in argv:
        for (group, option), (what, extra, modules, package) in PLUGIN_OPTIONS.items():
            if not re.fullmatch(rf"[+~]*{group}={option}", token):
                continue
            missing = [m for m in modules if _find_spec(importlib.util, m) is None]
            if missing:
                raise HandCLIPError(
                    f"{token} needs {what}, which is not installed ({', '.join(missing)} not found); install the "
                    f"optional extra: pip install -e \".[{extra}]\" (or pip install {package})"
                )


def _find_spec(util, name: str):
    try:
        return util.find_spec(name)
    except (ImportError, ValueError):  # a parent package missing, or a module hidden in sys.modules
        return None


def check_group_options(argv: list[str]) -> None:
    """``group=option`` on the command line naming no config of that group (``hand=dorsal_up``): one line
    listing the options, instead of Hydra's multi-line report with exit status 1. Sweeps (``hand=a,b``) are
    checked option by option; glob(), range() and interpolations are left to Hydra, as is everything when
    extra config folders are given."""
    import re

    from handclip.hands import check_hand

    if any(t.startswith(("--config-dir", "-cd", "hydra.searchpath", "+hydra.searchpath")) for t in argv):
        return
    root = config_dir()
    for token in argv:
        match = re.fullmatch(r"\+{0,2}(\w+)=([\w.,-]+)", token)
        if not match or not (root / match.group(1)).is_dir():
            continue
        group, options = match.groups()
        known = sorted(p.stem for p in (root / group).glob("*.yaml"))
        for option in options.split(","):
            if option in known or option == "null":
                continue
            if group == "hand":
                check_hand(option)  # the hand types' own message
            raise HandCLIPError(f"{group}={option}: no such {group} config; expected one of: {', '.join(known)}")


#: Characters of Hydra's override grammar (quotes, sweeps, lists, functions, interpolations): never quoted for the user.
_GRAMMAR = set("'\"\\,[]{}()$")


def quote_non_ascii(argv: list[str]) -> list[str]:
    """``key=value`` with characters beyond ASCII (``name=José``, ``gallery=/data/Données``), which Hydra's override
    grammar reads only inside quotes, as ``key='value'``. A value that also holds grammar characters (``,``, quotes,
    brackets, ``$``) is left as it is: :func:`_parse_overrides` then says how to quote it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser, out = None, []
    for token in argv:
        match = re.fullmatch(r"([+~]{0,2}[\w.@/-]+)=(.*)", token, re.S)
        if match and not match.group(2).isascii():
            key, value = match.groups()
            parser = parser or OverridesParser.create()
            try:
                parser.parse_override(token)
            except Exception:  # noqa: BLE001 - Hydra's grammar error: not a valid unquoted value
                if not _GRAMMAR & set(value):
                    token = f"{key}='{value}'"
        out.append(token)
    return out


def _parse_overrides(argv: list[str]) -> list:
    """The command line's ``key=value`` overrides, parsed as Hydra parses them (flags and their values left out).

    A value Hydra cannot parse (non-ASCII letters or spaces unquoted, an unclosed bracket) is one line with
    what to do instead of Hydra's multi-line report."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser, parsed, after_flag = OverridesParser.create(), [], False
    for token in argv:
        if after_flag or token.startswith("-"):
            # flags that take a value as the next word: --cfg job, --package PKG, --info WHAT
            after_flag = token in ("--cfg", "-c", "--package", "-p", "--info", "--experimental-rerun")
            continue
        if "=" not in token and not token.startswith("~"):
            continue
        try:
            parsed.append(parser.parse_override(token))
        except HydraException as err:
            reason = str(err).splitlines()[0]
            raise HandCLIPError(f"{token}: Hydra cannot read this override ({reason}); put the value in quotes, "
                                f"e.g. {_quoted(token)} (in the shell: '{_quoted(token)}')") from None
    return parsed


def _quoted(token: str) -> str:
    key, _, value = token.partition("=")
    return f'{key}="{value}"'


def _first_value(override) -> str | None:
    """The override as one value (a sweep's first), in command-line form; None when it cannot be one (glob,
    interval: a sweeper's to expand)."""
    from hydra.core.override_parser.types import OverrideType, ValueType

    prefix = {OverrideType.ADD: "+", OverrideType.FORCE_ADD: "++"}.get(override.type, "")
    key = override.get_key_element().lstrip("+~")
    if override.is_delete():
        return override.input_line
    if not override.is_sweep_override():
        return override.input_line
    if override.value_type in (ValueType.GLOB_CHOICE_SWEEP, ValueType.INTERVAL_SWEEP):
        return None
    first = next(iter(override.sweep_string_iterator()), None)
    return None if first is None else f"{prefix}{key}={first}"


def _sweep_alternatives(override) -> list[str]:
    """The other values of a simple, choice or range sweep, each in command-line form."""
    from hydra.core.override_parser.types import OverrideType, ValueType

    if not override.is_sweep_override() or override.value_type in (ValueType.GLOB_CHOICE_SWEEP,
                                                                     ValueType.INTERVAL_SWEEP):
        return []
    prefix = {OverrideType.ADD: "+", OverrideType.FORCE_ADD: "++"}.get(override.type, "")
    key = override.get_key_element().lstrip("+~")
    return [f"{prefix}{key}={value}" for value in list(override.sweep_string_iterator())[1:]]


def check_override_keys(config_name: str, argv: list[str]) -> None:
    """The command line against the config's typed schema (:mod:`handclip.schema`), before torch loads.

    One line, instead of Hydra's multi-line report, for a key that does not exist (``trainer.max_epoch=3``: the
    closest key, and how to add a new one), a value of the wrong type (``data.batch_size=abc``: the key, the value,
    the type expected), a value out of range (``model.lr=0``) and an override Hydra cannot parse. The config is
    composed as the command line asks (a sweep's values one by one; glob() and interval() are left to the
    sweeper). Hydra's own settings and runs with other config names or folders are left to Hydra, as is a config
    that does not compose for another reason.
    """
    from hydra.errors import ConfigCompositionException

    from handclip.schema_ranges import check_values

    if any(t.startswith(("--config-dir", "-cd", "--config-name", "-cn", "--config-path", "-cp")) for t in argv):
        return
    overrides = [o for o in _parse_overrides(argv)
                 if o.get_key_element().lstrip("+~").split(".")[0].split("/")[0] != "hydra"]
    if not overrides:
        return
    first = [_first_value(o) for o in overrides]
    base = [f for f in first if f is not None]
    variants = [base]
    for n, override in enumerate(overrides):
        if first[n] is not None and not (config_dir() / override.key_or_group).is_dir():
            variants += [[alt if f == first[n] else f for f in base] for alt in _sweep_alternatives(override)]
    for chosen in variants:
        try:
            cfg = compose(config_name, chosen)
        except ConfigCompositionException as err:
            _explain_composition_error(config_name, err, overrides)
            return  # not a key or type problem: Hydra's own report says what does not compose
        check_values(cfg)


def _explain_composition_error(config_name: str, err: Exception, overrides: list) -> None:
    """Raise the one-line HandCLIPError for a missing key or a value of the wrong type; return otherwise."""
    from omegaconf.errors import ConfigAttributeError, ConfigIndexError, ConfigKeyError, ValidationError

    cause = err.__cause__
    added = next((o for o in overrides if o.is_add() and str(err).startswith("Could not append to config. An item is "
                                                                            f"already at '{o.key_or_group}'")), None)
    if added is not None:
        plain = added.input_line.lstrip("+")
        raise HandCLIPError(f"{added.input_line}: {added.key_or_group} is a key of the {config_name} config already; "
                            f"set it without '+': {plain}")
    if isinstance(cause, ValidationError):
        key = str(cause.full_key)
        given = next((f"{key}={cause.value}" if o.is_sweep_override() else o.input_line.lstrip("+")
                      for o in overrides if o.get_key_element().lstrip("+~") == key), None)
        expected = _expected_type(cause)
        where = given if given is not None else f"{key}={cause.value!r} (set in a config file)"
        raise HandCLIPError(f"{where}: expected {expected}, got {cause.value!r}") from None
    if isinstance(cause, (ConfigAttributeError, ConfigIndexError, ConfigKeyError)):
        choices = [f for o in overrides if (config_dir() / o.key_or_group).is_dir() and not o.is_delete()
                   for f in [_first_value(o)] if f is not None]
        tree = OmegaConf.to_container(compose(config_name, choices), resolve=False)
        for override in overrides:
            key = override.get_key_element()
            if key.startswith(("+", "~")) or (config_dir() / key).is_dir() or _has_key(tree, key.split(".")):
                continue
            hint = "".join(f"; did you mean {close}?" for close in _closest_key(tree, key)[:1])
            line = override.input_line
            raise HandCLIPError(f"{line}: no such key in the {config_name} config{hint} (a new key is added "
                                f"with +{line})")


#: OmegaConf's names of the types in its conversion errors -> what the message says.
_TYPE_WORDS = {"Integer": "a whole number (int)", "Float": "a number (float)", "Boolean": "true or false (bool)",
               "bool": "true or false (bool)", "String": "a string"}


def _expected_type(cause) -> str:
    import re

    match = (re.search(r"could not be converted to (\w+)", cause.msg) or re.search(r"is not a valid (\w+)", cause.msg)
             or re.search(r"Invalid type assigned: \S+ is not a subclass of (\w+)", cause.msg))
    if match:
        return _TYPE_WORDS.get(match.group(1), match.group(1))
    return cause.msg.splitlines()[0]


def _has_key(node, parts: list[str]) -> bool:
    for part in parts:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return True


def _closest_key(tree: dict, key: str) -> list[str]:
    """The likely intended key: a sibling with a similar name (``trainer.max_epoch``), else a key as deep with a
    similar path (``trainr.max_epochs``)."""
    import difflib

    parent, _, leaf = key.rpartition(".")
    node = tree
    for part in parent.split(".") if parent else []:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        return [f"{parent}.{m}" if parent else m for m in difflib.get_close_matches(leaf, [str(k) for k in node], 1)]
    return difflib.get_close_matches(key, [k for k in _dotted_keys(tree) if k.count(".") == key.count(".")], 1)


def _dotted_keys(node, prefix: str = ""):
    if isinstance(node, dict):
        for key, child in node.items():
            yield f"{prefix}{key}"
            yield from _dotted_keys(child, f"{prefix}{key}.")


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def hydra_entry(config_name: str) -> Callable[[Callable[[DictConfig], object]], Callable[[], None]]:
    """Turn ``task(cfg)`` into a Hydra command-line entry point on HandCLIP's configs, with one-line errors.

    A single run turns an input error into one ``error:`` line and exit status 2. In a multirun the error
    is left to Hydra, which records the job as failed and goes on with the next one (the sweep's summary
    comes from the ``SweepSummary`` callback of ``configs/hydra/default.yaml``).
    """
    import hydra

    register_resolvers()

    def wrap(task: Callable[[DictConfig], object]) -> Callable[[], None]:
        one_line = exit_on_error(task)

        @functools.wraps(task)
        def job(cfg: DictConfig) -> object:
            return task(cfg) if _in_multirun() else one_line(cfg)

        main = hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=config_name)(job)

        @functools.wraps(main)
        def entry() -> None:
            sys.argv[1:] = quote_non_ascii(sys.argv[1:])
            exit_on_error(check_launcher_installed)(sys.argv[1:])  # before Hydra composes the launcher
            exit_on_error(check_group_options)(sys.argv[1:])
            exit_on_error(check_override_keys)(config_name, sys.argv[1:])
            main()

        return entry

    return wrap
