"""The run spec: the Hydra config read exactly once, into frozen dataclasses, and validated.

:func:`from_config` is the only function in fedkws that reads a ``DictConfig``.
It checks every value, collects every problem of a config and raises one
:class:`~fedkws.errors.ConfigError` listing them all (one line each, naming
the key, the value and what is allowed), before anything is written to disk.
Everything below (recipes, core, Flower adapters) takes these dataclasses or
plain arguments.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedkws import CONF_DIR
from fedkws.core.aggregation import BN_SYNC_MODES, EVAL_MODES, keeps_client_state
from fedkws.core.models import MODEL_NAMES, NORM_KINDS
from fedkws.data.augment import AUGMENT_DOMAINS, AugmentConfig
from fedkws.data.cache import DataConfig
from fedkws.data.features import FEATURE_KINDS, FeatureConfig
from fedkws.errors import ConfigError
from fedkws.tracking import LOGGER_MODES

# strategy=<name> -> the class of flwr.serverapp.strategy it stands for; ``flower`` names any
# class (strategy.class_name), ``central`` is the no-federation baseline, ``cyclic`` has no
# server rule (the model visits the clients in turn, no averaging). One file each in
# conf/strategy/.
NAMED_STRATEGIES = {
    "fedavg": "FedAvg",
    "fedavgm": "FedAvgM",
    "fedprox": "FedProx",
    "fedadam": "FedAdam",
    "fedyogi": "FedYogi",
    "fedadagrad": "FedAdagrad",
    "fedmedian": "FedMedian",
    "fedtrimmedavg": "FedTrimmedAvg",
    "krum": "Krum",
    "multikrum": "MultiKrum",
    "qfedavg": "QFedAvg",
}
STRATEGIES = (*NAMED_STRATEGIES, "flower", "central", "cyclic")
CYCLIC_VISITS = ("epoch", "batch")
PARTITION_SCHEMES = ("iid", "dirichlet", "pathological", "speaker")
PROTOCOLS = ("12class", "35class")
AMP_MODES = ("none", "bf16", "fp16")
DEVICE_FORMS = "must be auto, cpu, cuda or cuda:N"
# Modules whose CUDA backward has no deterministic implementation in PyTorch: with
# torch.use_deterministic_algorithms(True) they raise at the first backward pass.
NONDETERMINISTIC_CUDA_BACKWARD = (
    "AdaptiveAvgPool2d", "AdaptiveAvgPool3d", "AdaptiveMaxPool2d", "AvgPool3d", "MaxPool3d",
    "FractionalMaxPool2d", "FractionalMaxPool3d", "ReflectionPad1d", "ReflectionPad2d",
    "ReflectionPad3d",
)  # fmt: skip


@dataclass(frozen=True)
class DatasetSpec:
    """Where the examples come from and how they are labelled and split."""

    name: str
    data: DataConfig
    generate: tuple[tuple[str, Any], ...] | None = None  # synthetic corpus parameters
    download: tuple[tuple[str, Any], ...] | None = None  # real archive: version, url, sha256


@dataclass(frozen=True)
class ModelSpec:
    """Arguments of :func:`fedkws.core.models.build_model` except ``num_classes``."""

    name: str
    norm: str
    groups: int
    kwargs: tuple[tuple[str, Any], ...] = ()

    def build_args(self, num_classes: int) -> dict[str, Any]:
        """Keyword arguments of ``build_model`` for ``num_classes`` outputs."""
        return {
            "name": self.name,
            "num_classes": num_classes,
            "norm": self.norm,
            "groups": self.groups,
            **dict(self.kwargs),
        }


@dataclass(frozen=True)
class OptimizerSpec:
    """The client (and centralised) optimiser: a class path and its keyword arguments."""

    target: str
    kwargs: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class TrainSpec:
    """Rounds, epochs and batch sizes."""

    rounds: int = 10
    local_epochs: int = 1
    batch_size: int = 32
    eval_batch_size: int = 256
    stop_after_round: int | None = None
    amp: str = "none"  # mixed precision of the training forward pass: none | bf16 | fp16
    deterministic: bool = False  # torch.use_deterministic_algorithms(True), cuDNN benchmark off


@dataclass(frozen=True)
class PartitionSpec:
    """How the training split is divided among clients."""

    scheme: str = "iid"
    num_clients: int = 4
    alpha: float = 0.5
    classes_per_client: int = 2
    speakers_per_client: int = 1
    min_partition_size: int = 10
    local_test_fraction: float = 0.2
    names: tuple[str, ...] = ()
    channels: int = 0  # feature shift: K recording channels, client k hears channel k mod K


@dataclass(frozen=True)
class StrategySpec:
    """The server rule: a Flower strategy class and its constructor arguments.

    ``central``: no federation. ``cyclic``: no server rule; within a round the
    model visits the sampled clients in partition-id order, each trains it and
    hands it on (``visit``: ``epoch``, its local epochs; ``batch``, one batch, the
    clients taking turns until each has gone through its epochs). Client
    sampling is fedkws's own (``fraction_train``, ``min_train_clients``), never
    the strategy's.
    """

    name: str = "fedavg"
    class_name: str = "FedAvg"  # a class of flwr.serverapp.strategy
    fraction_train: float = 1.0
    min_train_clients: int = 1
    kwargs: tuple[tuple[str, Any], ...] = ()  # the class's constructor arguments
    visit: str = "epoch"  # cyclic: what one visit of a client is (epoch | batch)

    @property
    def central(self) -> bool:
        """Whether this is the centralised baseline."""
        return self.name == "central"

    @property
    def cyclic(self) -> bool:
        """Whether the model visits the clients in turn instead of being averaged."""
        return self.name == "cyclic"

    @property
    def prox_mu(self) -> float:
        """The clients' proximal weight: FedProx's ``proximal_mu`` (0 for other classes)."""
        return float(dict(self.kwargs).get("proximal_mu", 0.0))


FREEZE_STATS = ("exact", "aggregated")


@dataclass(frozen=True)
class BNSpec:
    """What crosses the wire of the BatchNorm state and how the model is evaluated."""

    sync: str = "full"
    eval_modes: tuple[str, ...] = ("eval", "train")
    recalibrate_every: int = 1
    freeze_after: int = 2  # FixBN: rounds of ordinary federated BatchNorm before the freeze
    # FixBN: which statistics are frozen: "exact" (pooled over the clients' data) or
    # "aggregated" (the FedAvg-averaged running statistics, as Zhong et al. 2023).
    freeze_stats: str = "exact"


@dataclass(frozen=True)
class FederationSpec:
    """Flower simulation settings."""

    backend: str = "ray"  # "inprocess": every client in the driver, no Ray (debugging, tests)
    num_cpus: float = 1
    num_gpus: float = 0.0
    federated_eval: bool = False
    ray_init_args: tuple[tuple[str, Any], ...] = ()
    ray_address: str | None = None  # attach to this running Ray instance instead of starting one
    sweep_ray: bool = True  # a multirun starts one local Ray head for all its jobs
    actors: int | None = None  # Ray actors of one simulation; None: as many as fit the instance
    # SuperNodes of the simulation; None: one per client. Fewer: each serves many clients
    # (thousands of speaker clients without thousands of nodes). "auto": one per client
    # up to AUTO_SUPERNODES clients, that many beyond (see fedkws.fl.server_app.node_count).
    supernodes: int | str | None = dataclasses.field(
        default="auto", metadata={"allowed": "must be an integer >= 1, auto, or null"}
    )


@dataclass(frozen=True)
class LoggerSpec:
    """The W&B mirror."""

    mode: str = "offline"
    project: str = "fedkws"
    entity: str | None = None
    tags: tuple[str, ...] = ()
    init_timeout: float = 30.0  # seconds to reach the W&B server before falling back to offline


@dataclass(frozen=True)
class RunSpec:
    """Everything one run needs, validated."""

    name: str
    seed: int
    cache_dir: str
    progress: bool
    resume: bool
    plots: bool
    dataset: DatasetSpec
    features: FeatureConfig
    augment: AugmentConfig
    model: ModelSpec
    optimizer: OptimizerSpec
    train: TrainSpec
    partition: PartitionSpec
    strategy: StrategySpec
    bn: BNSpec
    federation: FederationSpec
    logger: LoggerSpec
    device: str = "cpu"  # `device` resolved: "cpu" or "cuda:N" (the driver's)
    resolved: dict[str, Any] = field(default_factory=dict, compare=False)  # for results.json

    @property
    def client_device(self) -> str:
        """Where the federated clients run.

        In process: the driver's device. Under Ray: ``cuda`` (index 0 of the
        ``CUDA_VISIBLE_DEVICES`` Ray gives the actor, i.e. the GPU it assigned)
        when clients reserve GPUs (``federation.client_resources.num_gpus``),
        else the CPU: a client that reserved no GPU never uses one.
        """
        if self.device == "cpu" or self.federation.backend == "inprocess":
            return self.device
        return "cuda" if self.federation.num_gpus > 0 else "cpu"

    @property
    def training_device(self) -> str:
        """Where training runs: the driver's device (centralised) or the clients'."""
        return self.device if self.strategy.central else self.client_device

    def comparable(self) -> dict[str, Any]:
        """The resolved config minus what may change between a run and its resume.

        The device may change: checkpoints hold CPU tensors, so a run resumes on any device.
        """
        return comparable(self.resolved)


# What a resume may change: how far it goes, what it shows, and where it runs (the device;
# the Ray instance it attaches to, which a sweep starts anew; how many actors serve it).
MAY_CHANGE = {
    "": ("resume", "progress", "plots", "device"),
    "train": ("rounds", "stop_after_round"),
    "federation": ("ray_address", "sweep_ray", "actors", "supernodes"),
}


def may_change() -> str:
    """The keys of MAY_CHANGE as a reader writes them (for the resume refusal)."""
    names = [
        f"{group}.{key}" if group else key for group, keys in MAY_CHANGE.items() for key in keys
    ]
    return ", ".join(name for name in names if name != "resume")


def comparable(resolved: Mapping[str, Any]) -> dict[str, Any]:
    """A resolved config (or a checkpoint's record of one) without the keys in MAY_CHANGE."""
    out = {k: v for k, v in resolved.items() if k not in MAY_CHANGE[""]}
    for group, keys in MAY_CHANGE.items():
        if group and isinstance(out.get(group), Mapping):
            out[group] = {k: v for k, v in out[group].items() if k not in keys}
    return out


# --------------------------------------------------------------------------- reading


class _Problems:
    """Collects every problem of a config; raises them together."""

    def __init__(self, unread_ok: bool = False) -> None:
        self.lines: list[str] = []
        self.unread_ok = unread_ok  # keys nothing reads are no problem (see from_config)

    def add(self, key: str, value: Any, allowed: str) -> None:
        self.lines.append(f"{key}={value!r}: {allowed}")

    def check(self, ok: bool, key: str, value: Any, allowed: str) -> None:
        if not ok:
            self.add(key, value, allowed)

    def raise_if_any(self) -> None:
        if self.lines:
            raise ConfigError("\n".join(self.lines))


def _plain(node: Any) -> Any:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not OmegaConf.is_config(node):
        return node
    try:
        return OmegaConf.to_container(node, resolve=True)
    except OmegaConfBaseException as err:  # `${oc.env:NOPE}`, `${nope}`: a value Hydra kept
        key = getattr(err, "full_key", None) or "the config"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{key}: cannot be resolved ({reason})") from None


# The config groups every run reads: each must be a mapping (one of its options), not null.
GROUPS = ("dataset", "features", "augment", "model", "optimizer", "train", "partition",
          "strategy", "bn", "federation", "logger")  # fmt: skip
# The config's other top-level keys (conf/config.yaml).
TOP_KEYS = ("name", "seed", "data_dir", "cache_dir", "progress", "plots", "resume", "device",
            "norm")  # fmt: skip
# federation's keys (conf/config.yaml).
FEDERATION_KEYS = ("client_resources", "federated_eval", "backend", "ray_address", "sweep_ray",
                   "actors", "supernodes", "ray_init_args")  # fmt: skip


def _pairs(mapping: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...]:
    return tuple(
        (k, tuple(v) if isinstance(v, list) else v) for k, v in sorted((mapping or {}).items())
    )


def _unread(
    problems: _Problems, group: str, values: Mapping[str, Any], keys: Iterable[str]
) -> None:
    """A problem for each key of ``values`` not among ``keys``: a value nothing would read.

    Such a key comes from ``+group.key=value`` (a misspelt key that Hydra's hint made
    into a new one); its value would be ignored without a word.
    """
    if problems.unread_ok:
        return
    keys = sorted(keys)
    for key in values:
        if key not in keys:
            where = f"not a key of {group or 'the config'} ({', '.join(keys)})"
            problems.add(f"{group}.{key}" if group else key, values[key], where)


def _typed(cls: type, values: Mapping[str, Any], problems: _Problems, group: str) -> Any:
    """``cls(**values)`` for the fields ``cls`` has, each converted to the field's type.

    A key of ``values`` that is not a field is a problem (:func:`_unread`).
    """
    _unread(problems, group, values, [f.name for f in dataclasses.fields(cls)])
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        value = values[f.name]
        convert = _CONVERTERS.get(str(f.type))
        try:
            kwargs[f.name] = convert(value) if convert else value
        except (TypeError, ValueError):
            problems.add(f"{group}.{f.name}", value, f.metadata.get("allowed", f"must be {f.type}"))
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:  # the class's own check (it names the key, or not)
        message = str(err)
        problems.lines.append(message if message.startswith(group) else f"{group}: {message}")
        return None


def _whole(value: Any) -> int:
    """An integer: 2, "2" or 2.0, never 2.5 (int() would quietly make it 2) or true."""
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(value)
    return int(value)


def _opt_int(value: Any) -> int | None:
    return None if value is None else _whole(value)


def _opt_int_or_auto(value: Any) -> int | str | None:
    return "auto" if value == "auto" else _opt_int(value)


def _float_pair(value: Any) -> tuple[float, float]:
    low, high = value
    return float(low), float(high)


def _opt_float_pair(value: Any) -> tuple[float, float] | None:
    return None if value is None else _float_pair(value)


def _strict_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(value)
    return value


def _str_tuple(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):  # a single name, not its characters
        return (value,)
    return tuple(str(v) for v in (value or ()))


_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "int": _whole,
    "float": float,
    "str": str,
    "bool": _strict_bool,
    "int | None": _opt_int,
    "int | str | None": _opt_int_or_auto,
    "tuple[float, float]": _float_pair,
    "tuple[float, float] | None": _opt_float_pair,
    "tuple[str, ...]": _str_tuple,
}


def _top(p: _Problems, key: str, value: Any, convert: Callable[[Any], Any], allowed: str) -> Any:
    """A top-level value converted, or a problem recorded."""
    try:
        return convert(value)
    except (TypeError, ValueError):
        p.add(key, value, allowed)
        return None


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def from_config(cfg: Any, *, stored: bool = False) -> RunSpec:
    """Read and validate a composed fedkws config (a ``DictConfig`` or a plain dict).

    A key that nothing reads is a problem, unless the config is ``stored``: read back
    from a run's results.json, which holds what fedkws wrote beside the config
    (``device_resolved``) and perhaps keys an older version read.

    Raises
    ------
    ConfigError
        Listing every invalid value, one per line.
    """
    raw = _plain(cfg)
    p = _Problems(unread_ok=stored)
    for group in GROUPS:
        value = raw.get(group)
        options = Path(CONF_DIR, group).is_dir()  # train, federation: keys of config.yaml
        why = f"one of its options (conf/{group}/)" if options else "a mapping of its keys"
        p.check(isinstance(value, dict), group, value, f"must be {why}, not null or a value")
    p.raise_if_any()
    _unread(p, "", {k: v for k, v in raw.items() if k != "hydra"}, (*GROUPS, *TOP_KEYS))
    _unread(p, "norm", raw.get("norm") or {}, ("kind", "groups"))
    spec = RunSpec(
        name=str(raw["name"]),
        seed=_top(p, "seed", raw.get("seed", 0), _whole, "must be an integer"),
        cache_dir=str(raw["cache_dir"]),
        progress=_top(p, "progress", raw.get("progress", True), _strict_bool, "true or false"),
        resume=_top(p, "resume", raw.get("resume", False), _strict_bool, "true or false"),
        plots=_top(p, "plots", raw.get("plots", True), _strict_bool, "true or false"),
        dataset=_dataset(raw["dataset"], p),
        features=_typed(FeatureConfig, raw["features"], p, "features"),
        augment=_typed(AugmentConfig, raw["augment"], p, "augment"),
        model=_model(raw["model"], raw["norm"], p),
        optimizer=_optimizer(raw["optimizer"], p),
        train=_typed(TrainSpec, raw["train"], p, "train"),
        partition=_typed(PartitionSpec, raw["partition"], p, "partition"),
        strategy=_strategy(raw["strategy"], p),
        bn=_typed(BNSpec, raw["bn"], p, "bn"),
        federation=_federation(raw["federation"], p),
        logger=_typed(LoggerSpec, raw["logger"], p, "logger"),
        device=resolve_device(raw.get("device", "auto"), devices := _Problems()),
        resolved=raw,
    )
    if not p.lines:  # the checks below need every group read
        validate(spec, p)
    p.lines += devices.lines  # said with the config's other mistakes, not alone
    p.raise_if_any()
    if spec.strategy.cyclic and spec.federation.supernodes == "auto":
        # A cyclic client carries its state between visits in its own SuperNode.
        spec = dataclasses.replace(
            spec, federation=dataclasses.replace(spec.federation, supernodes=None)
        )
    return spec


def resolve_device(value: Any, p: _Problems) -> str:
    """``device`` (auto, cpu, cuda, cuda:N) as ``cpu`` or ``cuda:N``; a problem if it cannot be.

    ``auto`` is ``cuda:0`` when CUDA is available, else ``cpu``. Initialises no CUDA context.
    """
    text = value.strip().lower() if isinstance(value, str) else ""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        p.add("device", value, DEVICE_FORMS)
        return "cpu"
    import torch

    available = torch.cuda.is_available()
    if text == "cpu" or (text == "auto" and not available):
        return "cpu"
    if not available:
        p.add("device", value, "CUDA is not available on this machine (device=auto or cpu)")
        return "cpu"
    index, count = int(text.partition(":")[2] or 0), torch.cuda.device_count()
    if index >= count:
        p.add(
            "device", value, f"this machine has {count} CUDA device(s): cuda:0 to cuda:{count - 1}"
        )
    return f"cuda:{index}"


def _dataset(raw: Mapping[str, Any], p: _Problems) -> DatasetSpec:
    fields = {f.name for f in dataclasses.fields(DataConfig)} - {"seed"}  # seed: split_seed
    _unread(p, "dataset", raw, fields | {"name", "split_seed", "generate", "download"})
    data = _typed(
        DataConfig,
        {k: v for k, v in raw.items() if k in fields}
        | {"seed": raw.get("split_seed", 0), "root": str(raw.get("root", ""))},
        p,
        "dataset",
    )
    generate = raw.get("generate")
    download = raw.get("download")
    if isinstance(generate, Mapping):
        from fedkws.data.synth import DEFAULT_GENERATE  # the block's every key

        _unread(p, "dataset.generate", generate, DEFAULT_GENERATE)
    elif isinstance(download, Mapping):
        _unread(p, "dataset.download", download, ("version", "url", "sha256"))
    return DatasetSpec(
        name=str(raw.get("name", "")),
        data=data,
        generate=None if generate is None else _pairs(generate),
        download=None if download is None else _pairs(download),
    )


def _model(raw: Mapping[str, Any], norm: Mapping[str, Any], p: _Problems) -> ModelSpec:
    kwargs = {k: v for k, v in raw.items() if k != "name"}
    groups = norm.get("groups", 8)
    if not (_is_whole(groups) and groups >= 1):  # 2.5 is no group count (int() made it 2)
        p.add("norm.groups", groups, "must be an integer >= 1")
        groups = 8
    return ModelSpec(
        name=str(raw.get("name")),
        norm=str(norm.get("kind")),
        groups=groups,
        kwargs=_pairs(kwargs),
    )


def _optimizer(raw: Mapping[str, Any], p: _Problems) -> OptimizerSpec:
    kwargs = {k: v for k, v in raw.items() if not k.startswith("_")}
    return OptimizerSpec(target=str(raw.get("_target_")), kwargs=_pairs(kwargs))


def _strategy(raw: Mapping[str, Any], p: _Problems) -> StrategySpec:
    values = {k: v for k, v in raw.items() if k != "kwargs"}
    spec = _typed(StrategySpec, values, p, "strategy")
    kwargs = raw.get("kwargs") or {}
    if not isinstance(kwargs, Mapping):
        p.add("strategy.kwargs", kwargs, "must be a mapping of constructor arguments")
        kwargs = {}
    if spec is None:
        return StrategySpec()
    return dataclasses.replace(spec, kwargs=_pairs(kwargs))


def _federation(raw: Mapping[str, Any], p: _Problems) -> FederationSpec:
    _unread(p, "federation", raw, FEDERATION_KEYS)
    resources = dict(raw.get("client_resources") or {})
    _unread(p, "federation.client_resources", resources, ("num_cpus", "num_gpus"))
    values = {
        "num_cpus": resources.get("num_cpus", 1),
        "num_gpus": resources.get("num_gpus", 0.0),
        "federated_eval": raw.get("federated_eval", False),
        "backend": raw.get("backend", "ray"),
        "ray_address": str(raw["ray_address"]) if raw.get("ray_address") else None,
        "sweep_ray": raw.get("sweep_ray", True),
        "actors": raw.get("actors"),
        "supernodes": raw.get("supernodes"),
    }
    spec = _typed(FederationSpec, values, p, "federation")
    if spec is None:
        return FederationSpec()
    return dataclasses.replace(spec, ray_init_args=_pairs(raw.get("ray_init_args")))


# --------------------------------------------------------------------------- validation


def validate(spec: RunSpec, p: _Problems) -> None:
    """Every cross-field and range check; problems are added to ``p``."""
    p.check(spec.seed >= 0, "seed", spec.seed, "must be an integer >= 0")  # NumPy's generators
    for check in (_check_data, _check_model, _check_train, _check_partition):
        check(spec, p)
    for check in (_check_strategy, _check_bn, _check_federation, _check_logger, _check_device):
        check(spec, p)


def _one_of(p: _Problems, key: str, value: Any, allowed: tuple[str, ...]) -> None:
    p.check(value in allowed, key, value, f"must be one of {', '.join(allowed)}")


def _check_data(spec: RunSpec, p: _Problems) -> None:
    data = spec.dataset.data
    _one_of(p, "dataset.protocol", data.protocol, PROTOCOLS)
    _one_of(p, "features.kind", spec.features.kind, FEATURE_KINDS)
    for key in ("silence_percentage", "unknown_percentage"):
        value = getattr(data, key)
        p.check(0 <= value <= 100, f"dataset.{key}", value, "must be in [0, 100]")
    for key in ("validation_percentage", "testing_percentage"):
        value = getattr(data, key)
        p.check(0 < value < 100, f"dataset.{key}", value, "must be in (0, 100)")
    aug = spec.augment
    for key in ("noise_prob", "speed_prob"):
        value = getattr(aug, key)
        p.check(0 <= value <= 1, f"augment.{key}", value, "must be a probability in [0, 1]")
    for key in ("time_masks", "time_mask_frames", "freq_masks", "freq_mask_bins"):
        value = getattr(aug, key)
        p.check(value >= 0, f"augment.{key}", value, "must be >= 0")
    p.check(aug.time_shift_ms >= 0, "augment.time_shift_ms", aug.time_shift_ms, "must be >= 0")
    _check_range(p, "augment.speed_range", aug.speed_range, "factors > 0", lambda v: v > 0)
    _check_range(p, "augment.noise_volume", aug.noise_volume, "volumes >= 0", lambda v: v >= 0)
    if aug.noise_snr_db is not None:
        _check_range(p, "augment.noise_snr_db", aug.noise_snr_db, "numbers", lambda v: True)
    _one_of(p, "augment.domain", aug.domain, AUGMENT_DOMAINS)
    if aug.domain == "mel" and aug.changes_audio:
        p.check(
            spec.features.kind == "logmel", "augment.domain", aug.domain,
            "works on log-mel features, and features.kind=mfcc caches none: use "
            "features=logmel, or augment.domain=wave",
        )  # fmt: skip
        hop = spec.features.hop_ms
        p.check(
            aug.time_shift_ms == 0 or aug.time_shift_ms >= hop / 2,
            "augment.time_shift_ms", aug.time_shift_ms,
            f"shifts whole frames with augment.domain=mel: at least half a hop ({hop / 2:g} ms)",
        )  # fmt: skip
        p.check(
            aug.speed_prob == 0, "augment.speed_prob", aug.speed_prob,
            "has no mel-domain form: 0 with augment.domain=mel, or augment.domain=wave",
        )  # fmt: skip
    _check_features(spec, p)
    if spec.dataset.generate is not None:
        _check_generate(dict(spec.dataset.generate), p)
    elif spec.dataset.download is not None:
        _check_download(dict(spec.dataset.download), p)


def _check_download(download: dict[str, Any], p: _Problems) -> None:
    """The real archive's version, URL and checksum, before anything is downloaded."""
    from fedkws.data.download import ARCHIVES, as_sha256

    version = download.get("version", "v0.02")
    _one_of(p, "dataset.download.version", version, tuple(sorted(ARCHIVES)))
    url = download.get("url")
    ok = url is None or (isinstance(url, str) and url.strip() != "")
    p.check(ok, "dataset.download.url", url, "must be null (the official archive) or a URL")
    digest = download.get("sha256")
    ok = digest is None or as_sha256(digest) is not None
    p.check(ok, "dataset.download.sha256", digest, "must be null or 64 hexadecimal digits")


def _is_whole(value: Any) -> bool:
    """An int, not a bool (true is 1 to Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """An int or a float, not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_features(spec: RunSpec, p: _Problems) -> None:
    features = spec.features
    names = ("n_mels", "n_fft", "n_mfcc") if features.kind == "mfcc" else ("n_mels", "n_fft")
    for name in names:
        value = getattr(features, name)
        p.check(
            _is_whole(value) and value >= 1, f"features.{name}", value, "must be an integer >= 1"
        )


def _check_generate(gen: dict[str, Any], p: _Problems) -> None:
    """The synthetic corpus's sizes, before anything is generated (whole numbers, in range)."""
    from fedkws.data.speech_commands import OTHER_WORDS_V2

    key = "dataset.generate."
    speakers = gen.get("speakers")
    ok = _is_whole(speakers) and speakers >= 3
    why = "must be an integer >= 3 (a speaker each for training, validation and testing)"
    p.check(ok, key + "speakers", speakers, why)
    for name, low in (("utterances", 1), ("seed", 0)):
        value = gen.get(name)
        ok = _is_whole(value) and value >= low
        p.check(ok, key + name, value, f"must be an integer >= {low}")
    noise = gen.get("noise_seconds", 1.0)
    ok = _is_number(noise) and 1 <= noise < math.inf
    p.check(ok, key + "noise_seconds", noise, "must be a number of seconds >= 1")
    held = gen.get("held_out_speakers")
    ok = held is None or (_is_whole(held) and held >= 1)
    p.check(
        ok,
        key + "held_out_speakers",
        held,
        "must be null (10 % of the speakers) or an integer >= 1",
    )
    others = len(OTHER_WORDS_V2)
    unknown = gen.get("unknown_words")
    ok = unknown is None or (_is_whole(unknown) and 0 <= unknown <= others)
    why = f"must be null (all {others} other words) or an integer in [0, {others}]"
    p.check(ok, key + "unknown_words", unknown, why)


def _check_model(spec: RunSpec, p: _Problems) -> None:
    _one_of(p, "model.name", spec.model.name, MODEL_NAMES)
    _one_of(p, "norm.kind", spec.model.norm, NORM_KINDS)
    kwargs = dict(spec.model.kwargs)
    layout = kwargs.get("channels_last", False)
    p.check(isinstance(layout, bool), "model.channels_last", layout, "must be true or false")
    if (
        _model_sizes_ok(spec.model.name, kwargs, p)
        and spec.model.name in MODEL_NAMES
        and (spec.model.norm in NORM_KINDS)
    ):
        from fedkws.core.models import build_model

        try:
            build_model(**spec.model.build_args(2))
        except (TypeError, ValueError) as err:
            p.add("model", kwargs, f"cannot build {spec.model.name}: {err}")
    _check_optimizer(spec, p)


def _model_sizes_ok(name: str, kwargs: dict[str, Any], p: _Problems) -> bool:
    """The model's sizes (channels, width, depth), each named when it is wrong."""
    from fedkws.core.models import RESNET_DEPTHS

    ok = True
    channels = kwargs.get("channels")
    whole = isinstance(channels, tuple | list) and all(_is_whole(c) and c >= 1 for c in channels)
    if channels is not None and not (whole and channels):
        p.add("model.channels", list(channels) if isinstance(channels, tuple) else channels,
              "must be a list of integers >= 1")  # fmt: skip
        ok = False
    for key in ("width", "depth"):
        if key in kwargs and not (_is_whole(kwargs[key]) and kwargs[key] >= 1):
            p.add(f"model.{key}", kwargs[key], "must be an integer >= 1")
            ok = False
    depth = kwargs.get("depth")
    if ok and name == "resnet" and depth is not None and depth not in RESNET_DEPTHS:
        depths = ", ".join(map(str, sorted(RESNET_DEPTHS)))
        p.add("model.depth", depth, f"must be one of {depths}")
        ok = False
    return ok


def _check_range(p: _Problems, key: str, pair: Any, what: str, ok: Callable[[float], bool]):
    """``[low, high]``: two finite ``what`` (each passing ``ok``), low <= high."""
    good = len(pair) == 2 and all(math.isfinite(v) and ok(v) for v in pair) and pair[0] <= pair[1]
    p.check(good, key, list(pair), f"must be [low, high]: finite {what}, low <= high")


def _check_optimizer(spec: RunSpec, p: _Problems) -> None:
    import torch

    try:
        module, _, name = spec.optimizer.target.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        p.add("optimizer._target_", spec.optimizer.target, "must name an optimiser class")
        return
    opt = dict(spec.optimizer.kwargs)
    before = len(p.lines)
    if "lr" in opt:
        lr = _number(opt["lr"])
        ok = lr is not None and math.isfinite(lr) and lr > 0
        p.check(ok, "optimizer.lr", opt["lr"], "must be a finite number > 0")
    if "weight_decay" in opt:
        wd = _number(opt["weight_decay"])
        ok = wd is not None and math.isfinite(wd) and wd >= 0
        p.check(ok, "optimizer.weight_decay", opt["weight_decay"], "must be a finite number >= 0")
    if len(p.lines) == before:  # the class's own checks: an unknown or invalid argument
        try:
            cls([torch.nn.Parameter(torch.zeros(1))], **opt)
        except Exception as err:  # noqa: BLE001 - whatever the class raises is its refusal
            p.add("optimizer", opt, f"{name} refuses these arguments: {err}")


def _check_train(spec: RunSpec, p: _Problems) -> None:
    t = spec.train
    for key in ("rounds", "local_epochs", "batch_size", "eval_batch_size"):
        p.check(getattr(t, key) >= 1, f"train.{key}", getattr(t, key), "must be >= 1")
    stop = t.stop_after_round
    p.check(stop is None or stop >= 1, "train.stop_after_round", stop, "must be null or >= 1")


def _check_partition(spec: RunSpec, p: _Problems) -> None:
    part = spec.partition
    _one_of(p, "partition.scheme", part.scheme, PARTITION_SCHEMES)
    p.check(part.num_clients >= 1, "partition.num_clients", part.num_clients, "must be >= 1")
    p.check(0 < part.alpha < math.inf, "partition.alpha", part.alpha, "must be > 0 and finite")
    frac = part.local_test_fraction
    p.check(0 <= frac < 1, "partition.local_test_fraction", frac, "must be in [0, 1)")
    for key in ("classes_per_client", "speakers_per_client"):
        p.check(getattr(part, key) >= 1, f"partition.{key}", getattr(part, key), "must be >= 1")
    p.check(part.channels >= 0, "partition.channels", part.channels, "must be >= 0 (0: no shift)")
    p.check(
        part.min_partition_size >= 0,
        "partition.min_partition_size",
        part.min_partition_size,
        "must be >= 0",
    )
    if part.names and part.scheme != "speaker":
        p.check(
            len(part.names) == part.num_clients,
            "partition.names",
            list(part.names),
            f"must name each of the {part.num_clients} clients (partition.num_clients)",
        )
    if part.names:  # results.json, the plots and W&B tell the clients apart by name
        p.check(len(set(part.names)) == len(part.names), "partition.names", list(part.names),
                "must be different names")  # fmt: skip


def _check_strategy(spec: RunSpec, p: _Problems) -> None:
    s = spec.strategy
    _one_of(p, "strategy.name", s.name, STRATEGIES)
    _one_of(p, "strategy.visit", s.visit, CYCLIC_VISITS)
    p.check(
        0 < s.fraction_train <= 1, "strategy.fraction_train", s.fraction_train, "must be in (0, 1]"
    )
    p.check(
        s.min_train_clients >= 1, "strategy.min_train_clients", s.min_train_clients, "must be >= 1"
    )
    expected = NAMED_STRATEGIES.get(s.name)
    if expected is not None and s.class_name != expected:
        p.add(
            "strategy.class_name",
            s.class_name,
            f"strategy={s.name} is {expected} (any other class: strategy=flower "
            f"strategy.class_name={s.class_name})",
        )
    elif s.name in STRATEGIES and not s.central:
        from fedkws.fl.strategy import kwargs_problems

        p.lines.extend(kwargs_problems(s.class_name, dict(s.kwargs)))
    mu = dict(s.kwargs).get("proximal_mu", 0.0)
    ok = _is_number(mu) and mu >= 0
    if not any(line.startswith("strategy.kwargs.proximal_mu=") for line in p.lines):
        p.check(ok, "strategy.kwargs.proximal_mu", mu, "must be a number >= 0")
    clients = spec.partition.num_clients  # < 1: its own line already
    if spec.partition.scheme != "speaker" and s.min_train_clients > clients >= 1:
        p.add(
            "strategy.min_train_clients",
            s.min_train_clients,
            f"must be <= partition.num_clients ({spec.partition.num_clients})",
        )


def _check_bn(spec: RunSpec, p: _Problems) -> None:
    bn = spec.bn
    _one_of(p, "bn.sync", bn.sync, BN_SYNC_MODES)
    p.check(bool(bn.eval_modes), "bn.eval_modes", list(bn.eval_modes), "must not be empty")
    for mode in bn.eval_modes:
        _one_of(p, "bn.eval_modes", mode, EVAL_MODES)
    own_bn = keeps_client_state(bn.sync) and not spec.strategy.central
    if (
        bn.eval_modes
        and set(bn.eval_modes) <= {"recalibrated"}
        and (own_bn or spec.model.norm != "batch")
    ):  # nothing left to evaluate: the run would end with no accuracy at all
        why = f"bn.sync={bn.sync}" if own_bn else f"norm={spec.model.norm} (no BatchNorm)"
        allowed = f"recalibration does not apply to {why}, and no other mode is asked: add eval"
        p.add("bn.eval_modes", list(bn.eval_modes), allowed)
    p.check(bn.recalibrate_every >= 1, "bn.recalibrate_every", bn.recalibrate_every, "must be >= 1")
    p.check(bn.freeze_after >= 1, "bn.freeze_after", bn.freeze_after, "must be >= 1 (warm-up)")
    p.check(bn.freeze_stats in FREEZE_STATS, "bn.freeze_stats", bn.freeze_stats,
            f"one of {', '.join(FREEZE_STATS)}")  # fmt: skip
    if bn.sync == "fixbn" and (spec.strategy.central or spec.model.norm != "batch"):
        p.add("bn.sync", bn.sync, "FixBN needs a federated model with BatchNorm (norm=batch)")
    given = spec.resolved.get("bn") if isinstance(spec.resolved.get("bn"), Mapping) else {}
    for key in ("freeze_after", "freeze_stats"):  # added with +bn.<key> to another bn preset
        if bn.sync != "fixbn" and key in given:
            p.add(f"bn.{key}", given[key], f"applies to bn=fixbn only (bn.sync={bn.sync})")
    if own_bn and spec.model.norm != "batch":
        method = {"local": "FedBN", "silo": "SiloBN"}.get(bn.sync, f"bn.sync={bn.sync}")
        p.add(
            "bn.sync",
            bn.sync,
            f"{method} needs a model with BatchNorm (norm=batch, not {spec.model.norm})",
        )


def _check_federation(spec: RunSpec, p: _Problems) -> None:
    fed = spec.federation
    _one_of(p, "federation.backend", fed.backend, ("ray", "inprocess"))
    p.check(fed.num_cpus > 0, "federation.client_resources.num_cpus", fed.num_cpus, "must be > 0")
    p.check(fed.num_gpus >= 0, "federation.client_resources.num_gpus", fed.num_gpus, "must be >= 0")
    if fed.num_gpus > 0 and fed.backend == "ray":
        import torch

        p.check(
            torch.cuda.is_available(),
            "federation.client_resources.num_gpus",
            fed.num_gpus,
            "must be 0 on a machine without CUDA (Ray could never place a client)",
        )
        p.check(
            not torch.cuda.is_available() or spec.device != "cpu",
            "federation.client_resources.num_gpus",
            fed.num_gpus,
            "must be 0 with device=cpu (clients would reserve GPUs and not use them)",
        )
    p.check(fed.actors is None or fed.actors >= 1, "federation.actors", fed.actors,
            "must be >= 1, or null for as many as fit")  # fmt: skip
    p.check(fed.supernodes in (None, "auto") or fed.supernodes >= 1, "federation.supernodes",
            fed.supernodes, "must be >= 1, auto, or null for one per client")  # fmt: skip
    p.check(fed.supernodes in (None, "auto") or not spec.strategy.cyclic,
            "federation.supernodes", fed.supernodes, "must be auto or null with strategy=cyclic "
            "(a client carries its state between visits in its own SuperNode)")  # fmt: skip
    ray_cpus = dict(fed.ray_init_args).get("num_cpus")
    if ray_cpus is not None and _number(ray_cpus) is None:
        p.add("federation.ray_init_args.num_cpus", ray_cpus, "must be a number")
    elif ray_cpus is not None and fed.num_cpus > float(ray_cpus):
        p.add(
            "federation.client_resources.num_cpus",
            fed.num_cpus,
            f"must be <= federation.ray_init_args.num_cpus ({ray_cpus}): "
            "Ray could never place a client",
        )


def _check_logger(spec: RunSpec, p: _Problems) -> None:
    """W&B's own rules, before the run (W&B would refuse them after setup, as a traceback)."""
    log = spec.logger
    _one_of(p, "logger.mode", log.mode, LOGGER_MODES)
    if log.mode != "disabled":  # what W&B itself would refuse after the run's setup
        forbidden = "/\\#?%:"  # W&B's own list
        ok = 0 < len(log.project) <= 128 and not set(forbidden) & set(log.project)
        why = f"must be a W&B project name: 1 to 128 characters, none of {' '.join(forbidden)}"
        p.check(ok, "logger.project", log.project, why)
        too_long = [t for t in log.tags if not 1 <= len(str(t)) <= 64]
        p.check(not too_long, "logger.tags", list(log.tags), "each tag must be 1 to 64 characters")
        timeout = _number(log.init_timeout)
        p.check(timeout is not None and timeout > 0, "logger.init_timeout", log.init_timeout,
                "must be a number of seconds > 0")  # fmt: skip
    parts = spec.name.split("/")
    name_ok = bool(spec.name.strip()) and not spec.name.startswith("/") and ".." not in parts
    p.check(name_ok, "name", spec.name, "must be a relative folder name, not empty, without ..")


def _check_device(spec: RunSpec, p: _Problems) -> None:
    """Mixed precision and determinism against the devices the run uses."""
    t = spec.train
    _one_of(p, "train.amp", t.amp, AMP_MODES)
    training = spec.training_device
    if t.amp == "fp16" and not training.startswith("cuda"):
        why = (
            "" if spec.device == "cpu" else " (clients reserve no GPU: client_resources.num_gpus=0)"
        )
        p.add(
            "train.amp",
            t.amp,
            f"float16 autocast with loss scaling is for CUDA training, and training runs on "
            f"the CPU{why}; use train.amp=bf16 or none",
        )
    if t.deterministic and training.startswith("cuda") and spec.model.name in MODEL_NAMES:
        from fedkws.core.models import build_model

        try:
            model = build_model(**spec.model.build_args(2))
        except (TypeError, ValueError):
            return  # reported by _check_model
        kinds = sorted(
            {type(m).__name__ for m in model.modules()} & set(NONDETERMINISTIC_CUDA_BACKWARD)
        )
        if kinds:
            p.add(
                "train.deterministic",
                t.deterministic,
                f"model={spec.model.name} uses {', '.join(kinds)}, whose CUDA backward has no "
                "deterministic implementation in PyTorch (use another model, or device=cpu)",
            )
