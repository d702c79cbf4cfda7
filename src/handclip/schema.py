"""Typed schemas of the configs (Hydra structured configs): every key of every command, its type and its range.

The YAML files in ``configs/`` keep the values and their comments; these dataclasses say what each key is. They
are registered in Hydra's ConfigStore (:func:`register_schemas`) and named first in each command's defaults list
(``train_schema``, ...), so OmegaConf checks every value as the config is composed: ``data.batch_size=abc``
or ``trainer.max_epochs=1.5`` is refused with the key, the value and the type expected. What a type cannot say
(a learning rate above 0, a hand type that exists) is the field's ``metadata`` (:func:`at_least`, :func:`above`,
:func:`between`, :func:`checked_by`), checked in one place, :func:`handclip.schema_ranges.check_values`. Both run
before torch loads (see :func:`handclip.config.check_command_line`).

Adding a config key means adding it here too: a key the schema does not know is refused when the config is
composed (``+key=value`` adds one on the command line, untyped).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

from handclip.errors import HandCLIPError
from handclip.hands import check_eleven_k_hands, check_hand


def at_least(low: float, default: Any = MISSING) -> Any:
    """A number >= ``low``."""
    return field(default=default, metadata={"low": low, "rule": f">= {low:g}"})


def above(low: float, default: Any = MISSING) -> Any:
    """A number > ``low``."""
    return field(default=default, metadata={"low": low, "open": True, "rule": f"> {low:g}"})


def between(low: float, high: float, default: Any = MISSING) -> Any:
    """A number strictly between ``low`` and ``high``."""
    return field(default=default, metadata={"low": low, "high": high, "open": True,
                                            "rule": f"between {low:g} and {high:g} (both excluded)"})


def within(low: float, high: float, default: Any = MISSING) -> Any:
    """A number from ``low`` to ``high``, both included."""
    return field(default=default, metadata={"low": low, "high": high, "rule": f"from {low:g} to {high:g}"})


def finite(default: Any = MISSING) -> Any:
    """A finite number (not nan or inf)."""
    return field(default=default, metadata={"rule": "a finite number"})


def one_of(*choices: str, default: Any = MISSING) -> Any:
    """One of the strings ``choices``."""

    def check(value: Any) -> None:
        if value not in choices:
            raise HandCLIPError(f"expected one of {', '.join(choices)}")

    return checked_by(check, default)


def checked_by(check: Callable[[Any], Any], default: Any = MISSING) -> Any:
    """A value ``check(value)`` accepts (it raises HandCLIPError with its own message otherwise)."""
    return field(default=default, metadata={"check": check})


def _in_unit_interval(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise HandCLIPError("expected a number in [0, 1)")


#: The inference backends (:mod:`handclip.models.backends`), and ``auto``.
INFERENCE_BACKENDS = ("torch", "torch-bf16", "onnx", "onnx-int8")
BACKEND_CHOICES = (*INFERENCE_BACKENDS, "auto")


def check_backend(name: str) -> str:
    """``name`` if it is one of :data:`BACKEND_CHOICES`, else one error line listing them."""
    if name not in BACKEND_CHOICES:
        raise HandCLIPError(f"backend={name!r}: choose one of {', '.join(BACKEND_CHOICES)}")
    return name


# -- the groups ---------------------------------------------------------------------------------------------------
@dataclass
class HandConfig:
    name: str = checked_by(check_hand)


@dataclass
class AnyHandConfig:
    """The ``hand`` of a command not tied to one hand type (identify, bench): a name for its folders."""

    name: str = MISSING


@dataclass
class PathsConfig:
    root_dir: str = MISSING
    data_dir: str = MISSING
    output_root: str = MISSING
    output_dir: str = MISSING
    cache_dir: str = MISSING


@dataclass
class DataConfig:
    _target_: str = MISSING
    root: str = MISSING
    hand: str = MISSING
    batch_size: int = at_least(1)
    eval_batch_size: int = at_least(1)
    num_workers: int = at_least(0)
    pin_memory: bool = MISSING
    cache: bool = MISSING
    cache_dir: Optional[str] = MISSING
    cache_workers: Optional[int] = at_least(0)
    # true, false or auto
    device_batches: Any = MISSING
    progress: bool = MISSING
    # recipe options (README, "Recipes"): identity-balanced P x K batches
    sampler: str = one_of("random", "pk", default="random")
    pk_identities: int = at_least(1, default=16)
    pk_images: int = at_least(1, default=4)


@dataclass
class ModelConfig:
    _target_: str = MISSING
    model_name: str = MISSING
    pretrained: Optional[str] = MISSING
    cache_dir: Optional[str] = MISSING
    lr: float = above(0)
    weight_decay: float = at_least(0)
    compile: bool = MISSING
    # recipe options (README, "Recipes"), all off by default
    neck: str = one_of("none", "bnneck", default="none")
    neck_feature: str = one_of("before", "after", default="before")
    label_smoothing: float = checked_by(_in_unit_interval, default=0.0)
    triplet_margin: Optional[float] = at_least(0, default=None)
    triplet_weight: float = at_least(0, default=1.0)
    triplet_soft: bool = False
    warmup_epochs: float = at_least(0, default=0.0)
    head_lr: Optional[float] = above(0, default=None)


@dataclass
class EvalOptionsConfig:
    """``eval.*``: test-time settings of every embedding (train: kept in the checkpoint; eval, identify, export:
    null keeps the checkpoint's own)."""

    tta: Optional[str] = one_of("none", "flip", default=None)


@dataclass
class TrainerConfig:
    """pytorch_lightning.Trainer's arguments that HandCLIP's configs set (others: ``+trainer.<argument>=...``).

    The debugging arguments (fast_dev_run ... detect_anomaly) default to Lightning's own defaults."""

    _target_: str = MISSING
    default_root_dir: str = MISSING
    max_epochs: int = at_least(1)
    accelerator: str = MISSING
    # a number, a list of device indices, or auto
    devices: Any = MISSING
    precision: str = MISSING
    check_val_every_n_epoch: Optional[int] = at_least(1)
    log_every_n_steps: int = at_least(1)
    num_sanity_val_steps: int = MISSING
    # true, false or warn
    deterministic: Any = MISSING
    enable_progress_bar: bool = MISSING
    enable_model_summary: bool = MISSING
    plugins: Optional[list[Any]] = None
    # true/false or a number of batches
    fast_dev_run: Any = False
    # a share (float) or a number (int) of batches
    overfit_batches: Any = 0.0
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    # simple, advanced, pytorch, null, or a profiler to instantiate (_target_: ..., as debug=profiler does)
    profiler: Any = None
    detect_anomaly: bool = False


@dataclass
class DDPTrainerConfig(TrainerConfig):
    """``trainer=ddp``: Lightning's DDP (one process per device)."""

    strategy: str = MISSING
    num_nodes: int = at_least(1)
    use_distributed_sampler: bool = MISSING


@dataclass
class MetricsConfig:
    ranks: list[int] = MISSING
    ap: str = MISSING
    cross_aspect: bool = MISSING


@dataclass
class VerificationConfig:
    enabled: bool = MISSING
    fmr_levels: list[float] = MISSING
    target_fmr: float = between(0, 1)
    cmc_max_rank: int = at_least(1)
    examples: int = at_least(0)
    top_k: int = at_least(1)
    pictures: bool = MISSING


@dataclass
class RerankConfig:
    """``rerank=kreciprocal|aqe`` of eval (configs/rerank/)."""

    method: str = MISSING
    k1: int = at_least(1, 20)
    k2: int = at_least(1, 6)
    lambda_value: float = within(0, 1, 0.3)
    k: int = at_least(0, 5)
    alpha: float = at_least(0, 3.0)
    float16: bool = False


@dataclass
class CrossHandConfig:
    """``cross_hand_protocol.*`` of eval: HandCLIP's own person-across-hand-types protocol (``cross_hand=true``)."""

    runs: int = at_least(1, 10)
    models: str = one_of("auto", "finetuned", "zeroshot", default="auto")
    hands: Optional[list[str]] = checked_by(check_eleven_k_hands, default=None)


@dataclass
class OnnxConfig:
    opset: int = at_least(7)
    check: bool = MISSING
    check_images: int = at_least(1)
    tolerance: float = above(0)


# -- the commands -------------------------------------------------------------------------------------------------
@dataclass
class _Command:
    task_name: str = MISSING
    seed: int = MISSING
    paths: PathsConfig = field(default_factory=PathsConfig)


@dataclass
class _ModelCommand(_Command):
    hand: HandConfig = field(default_factory=HandConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalOptionsConfig = field(default_factory=EvalOptionsConfig)


@dataclass
class TrainSchema(_ModelCommand):
    ckpt_path: Optional[str] = MISSING
    callbacks: Optional[dict[str, Any]] = None
    logger: Optional[dict[str, Any]] = None


@dataclass
class EvalSchema(_ModelCommand):
    ckpt_path: Optional[str] = MISSING
    all: bool = MISSING
    name: Optional[str] = MISSING
    overwrite: bool = MISSING
    allow_hand_mismatch: bool = MISSING
    gallery_mode: str = one_of("max", "mean", default="max")
    device: str = MISSING
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    verification: VerificationConfig = field(default_factory=VerificationConfig)
    rerank: Optional[RerankConfig] = None
    cross_hand: bool = False
    cross_hand_protocol: CrossHandConfig = field(default_factory=CrossHandConfig)
    # the test summary also goes to these loggers (configs/logger), if any
    logger: Optional[dict[str, Any]] = None


@dataclass
class HandClassifierConfig:  # identify's hand_classifier.*: the hand-type classifier's file and settings
    path: str = MISSING
    min_confidence: Optional[float] = within(0, 1)
    weight_decay: float = at_least(0)


def _check_models(models: Any) -> None:
    for hand in models:
        check_hand(hand)


@dataclass
class IdentifySchema(_ModelCommand):
    hand: AnyHandConfig = field(default_factory=AnyHandConfig)  # type: ignore[assignment]
    ckpt_path: Optional[str] = MISSING
    gallery: Optional[str] = MISSING
    query: Optional[str] = MISSING
    top_k: int = at_least(1)
    gallery_mode: str = one_of("max", "mean", default="max")
    query_mode: str = one_of("each", "case", default="each")
    case_mode: str = one_of("mean", "max", default="mean")
    threshold: Optional[float] = finite()
    calibration: Optional[str] = MISSING
    target_fmr: Optional[float] = between(0, 1)
    name: Optional[str] = MISSING
    overwrite: bool = MISSING
    index: Optional[str] = MISSING
    index_dtype: str = one_of("float16", "float32")
    pictures: bool = MISSING
    print_limit: int = at_least(0)
    device: str = MISSING
    backend: str = checked_by(check_backend)
    backend_cache: Optional[str] = MISSING
    decode: str = one_of("full", "draft")
    batch_size: int = at_least(1)
    num_workers: Optional[int] = at_least(0)
    progress: bool = MISSING
    task: str = one_of("identify", "train_hand_type")
    fusion: Optional[str] = one_of("mean", "max")
    models: dict[str, Optional[str]] = checked_by(_check_models)
    query_hand: Optional[str] = checked_by(check_hand)
    hand_classifier: HandClassifierConfig = field(default_factory=lambda: HandClassifierConfig())


@dataclass
class ExportSchema(_ModelCommand):
    format: str = MISSING
    ckpt_path: Optional[str] = MISSING
    out: Optional[str] = MISSING
    overwrite: bool = MISSING
    pretrained: Optional[str] = MISSING
    cache_dir: Optional[str] = MISSING
    images: Optional[str] = MISSING
    device: str = MISSING
    backend: str = checked_by(check_backend)
    backend_cache: Optional[str] = MISSING
    decode: str = one_of("full", "draft")
    batch_size: int = at_least(1)
    num_workers: Optional[int] = at_least(0)
    progress: bool = MISSING
    onnx: OnnxConfig = field(default_factory=OnnxConfig)


@dataclass
class AppSchema(_ModelCommand):
    hand: AnyHandConfig = field(default_factory=AnyHandConfig)  # type: ignore[assignment]
    host: str = MISSING
    port: int = within(1, 65535)
    auth: Optional[str] = MISSING
    models_root: str = MISSING
    galleries: list[str] = field(default_factory=list)
    out: str = MISSING
    top_k: int = within(1, 50)
    target_fmr: Optional[float] = between(0, 1)
    max_file_mb: float = above(0)
    max_files: int = at_least(1)
    max_batch_files: int = at_least(1)
    device: str = MISSING
    backend: str = checked_by(check_backend)


#: ConfigStore name -> schema. A command's YAML names its schema first in its defaults list.
SCHEMAS = {"train_schema": TrainSchema, "eval_schema": EvalSchema, "identify_schema": IdentifySchema,
           "export_schema": ExportSchema, "app_schema": AppSchema}
#: Schemas of group options that add keys, stored under ``schema/<group>`` (``- /schema/trainer/ddp@_here_``).
GROUP_SCHEMAS = {("schema/trainer", "ddp"): DDPTrainerConfig}


def register_schemas() -> None:
    """Store the schemas in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name, node in SCHEMAS.items():
        store.store(name=name, node=node)
    for (group, name), node in GROUP_SCHEMAS.items():
        store.store(group=group, name=name, node=node)
