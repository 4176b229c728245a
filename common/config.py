"""Typed, frozen configuration loaded from YAML.

One ``Config`` describes a whole experiment: where the raw data is, which features to use, how
Spark prepares it and how Ray trains on it. Both halves of the system receive the same typed
object, never a raw dict.

Rules enforced here, so that a typo fails before a cluster is started:

* unknown keys are an error that names the full dotted key;
* every value is checked against its declared type (``int``, ``float``, ``bool``, ``str``,
  ``Literal[...]``, ``Optional``, tuples and string-keyed mappings);
* cross-field checks live in each dataclass's ``__post_init__``.

``--set a.b=c`` overrides are parsed as YAML scalars (``3`` is an int, ``true`` a bool,
``[1, 2]`` a list) and applied before type checking.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence

import yaml

FEATURE_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")

# Column names the encoded tables reserve for themselves; a user feature cannot take them.
RESERVED_COLUMNS = frozenset(
    {"user_id", "item_id", "item_index", "timestamp", "history", "cold", "split", "reason"}
)


class ConfigError(ValueError):
    """A configuration that cannot be used. The message names the key and the fix."""


# ---------------------------------------------------------------------------------------------
# Dataset sources
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TableFormat:
    """How to read one user table. ``csv`` options are ignored for Parquet."""

    path: str = ""
    format: Literal["parquet", "csv"] = "parquet"
    sep: str = ","
    header: bool = True

    def __post_init__(self) -> None:
        if len(self.sep) != 1:
            raise ConfigError(f"csv sep must be one character, got {self.sep!r}")


@dataclass(frozen=True)
class InteractionsSource(TableFormat):
    """The click log: one row per (user, item, time) event."""

    user: str = "user_id"
    item: str = "item_id"
    time: str = "timestamp"


@dataclass(frozen=True)
class EntitySource(TableFormat):
    """A side table keyed by ``id`` (the item catalogue or the user table)."""

    id: str = "id"


@dataclass(frozen=True)
class SyntheticConfig:
    """The built-in generator (``dataset.kind: synthetic``); see ``spark_jobs/synthetic.py``."""

    num_users: int = 2000
    num_items: int = 1000
    num_interactions: int = 40000
    num_categories: int = 10
    zipf_exponent: float = 1.1
    # Catalogue items that the click generator never emits: the cold-start case SSL exists for.
    never_clicked_fraction: float = 0.05
    # Probability that a click follows the user's preferred category rather than global popularity.
    preference_strength: float = 0.8
    # Clickable items that are "new": all their clicks fall in the last ``new_item_window`` of the
    # timeline, so a time split puts them in eval only (cold items, never seen in train).
    new_item_fraction: float = 0.05
    new_item_window: float = 0.05
    seed: int = 7
    num_partitions: int = 4

    def __post_init__(self) -> None:
        for name in ("num_users", "num_items", "num_interactions", "num_categories", "num_partitions"):
            if getattr(self, name) < 1:
                raise ConfigError(f"dataset.synthetic.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_categories > self.num_items:
            raise ConfigError(
                f"dataset.synthetic.num_categories ({self.num_categories}) must not exceed "
                f"num_items ({self.num_items})"
            )
        if not 0.0 <= self.never_clicked_fraction < 1.0:
            raise ConfigError("dataset.synthetic.never_clicked_fraction must be in [0, 1)")
        if not 0.0 <= self.preference_strength <= 1.0:
            raise ConfigError("dataset.synthetic.preference_strength must be in [0, 1]")
        if not 0.0 <= self.new_item_fraction < 1.0:
            raise ConfigError("dataset.synthetic.new_item_fraction must be in [0, 1)")
        if not 0.0 < self.new_item_window <= 1.0:
            raise ConfigError("dataset.synthetic.new_item_window must be in (0, 1]")
        if self.zipf_exponent <= 0:
            raise ConfigError("dataset.synthetic.zipf_exponent must be > 0")


DatasetKind = Literal["synthetic", "movielens-100k", "movielens-latest-small", "tables"]


@dataclass(frozen=True)
class DatasetConfig:
    kind: DatasetKind = "synthetic"
    # MovieLens only: download the GroupLens archive when ``paths.raw`` holds no files.
    download: bool = False
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    interactions: InteractionsSource = field(default_factory=InteractionsSource)
    items: EntitySource = field(default_factory=EntitySource)
    users: Optional[EntitySource] = None

    def __post_init__(self) -> None:
        if self.kind == "tables":
            if not self.interactions.path:
                raise ConfigError("dataset.kind is 'tables' but dataset.interactions.path is empty")
            if not self.items.path:
                raise ConfigError("dataset.kind is 'tables' but dataset.items.path is empty")
            if self.users is not None and not self.users.path:
                raise ConfigError("dataset.users is given but dataset.users.path is empty")


# ---------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureDecl:
    """One declared input feature.

    * ``categorical``: one value per row.
    * ``multi``: several values per row, from a list column or a string split on ``sep``.
    * ``bucketized``: a numeric column cut at ``boundaries`` (left-closed buckets), then
      treated as categorical.

    YAML accepts the short form ``genres: multi`` as well as ``genres: {type: multi, sep: "|"}``.
    """

    type: Literal["categorical", "multi", "bucketized"] = "categorical"
    sep: str = "|"
    boundaries: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.type == "bucketized":
            if not self.boundaries:
                raise ConfigError("a bucketized feature needs a non-empty 'boundaries' list")
            if list(self.boundaries) != sorted(set(self.boundaries)):
                raise ConfigError(
                    f"bucketized boundaries must be strictly increasing, got {list(self.boundaries)}"
                )
        elif self.boundaries:
            raise ConfigError(f"'boundaries' only applies to bucketized features, not {self.type}")
        if not self.sep:
            raise ConfigError("a multi feature's 'sep' must not be empty")


@dataclass(frozen=True)
class FeaturesConfig:
    """Item and user features by name. The item id and user id are always features as well
    (named ``item_id`` and ``user_id``) and need not be declared."""

    item: Mapping[str, FeatureDecl] = field(default_factory=dict)
    user: Mapping[str, FeatureDecl] = field(default_factory=dict)

    def __post_init__(self) -> None:
        both = sorted(set(self.item) & set(self.user))
        if both:
            raise ConfigError(
                f"features {both} are declared under both features.item and features.user; feature "
                f"names must be unique (they name vocab/<feature>/ tables), rename one side"
            )
        for side, feats in (("item", self.item), ("user", self.user)):
            for name in feats:
                if not FEATURE_NAME_RE.match(name):
                    raise ConfigError(
                        f"features.{side}.{name}: feature names must match {FEATURE_NAME_RE.pattern}"
                    )
                if name in RESERVED_COLUMNS:
                    raise ConfigError(
                        f"features.{side}.{name}: '{name}' is reserved; the {side} id is always a "
                        f"feature, remove it from features.{side} or rename the column"
                    )


# ---------------------------------------------------------------------------------------------
# Paths, Spark, preparation
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PathsConfig:
    # Raw input: MovieLens folder (or download target), or where the synthetic job writes raw tables.
    raw: str = "data/raw"
    # Output of the Spark preparation (Parquet tables + manifest.json).
    prepared: str = "data/prepared"
    # Where training runs (checkpoints, metrics, exports) go.
    runs: str = "runs"


@dataclass(frozen=True)
class SparkConfig:
    master: str = "local[*]"
    app_name: str = "ssl4rec"
    shuffle_partitions: int = 8
    driver_memory: str = "2g"
    # Extra ``spark.*`` settings passed through to the session builder.
    conf: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.shuffle_partitions < 1:
            raise ConfigError("spark.shuffle_partitions must be >= 1")


@dataclass(frozen=True)
class SplitConfig:
    """``time``: one global boundary, the ``eval_fraction`` quantile of event time; events at or
    after it are eval. ``leave_last``: each user's last ``leave_last_n`` events are eval.

    ``holdout``: ``eval`` writes the eval split to ``eval/``. ``validation`` withholds the eval
    split entirely (it is never read past the split) and splits the remaining train events again
    by the same rule: ``train/`` is the inner train part and ``eval/`` the validation part, for
    choosing hyper-parameters without touching the eval split."""

    kind: Literal["time", "leave_last"] = "time"
    eval_fraction: float = 0.1
    leave_last_n: int = 1
    holdout: Literal["eval", "validation"] = "eval"

    def __post_init__(self) -> None:
        if not 0.0 < self.eval_fraction < 1.0:
            raise ConfigError(f"prepare.split.eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if self.leave_last_n < 1:
            raise ConfigError(f"prepare.split.leave_last_n must be >= 1, got {self.leave_last_n}")


@dataclass(frozen=True)
class PrepareConfig:
    # Values seen fewer times than this map to the out-of-vocabulary index 1. Ids are exempt:
    # every catalogue item keeps its own index.
    vocab_min_count: int = 1
    # The user-history feature: the last N items clicked strictly before the event.
    history_length: int = 20
    split: SplitConfig = field(default_factory=SplitConfig)
    # Population over which feature mutual information is measured.
    mi_population: Literal["catalogue", "train_events"] = "catalogue"
    # How the MI job counts: a vectorised Arrow function per partition (executors need numpy and
    # pyarrow), or Spark built-ins only (slower).
    mi_engine: Literal["arrow", "sql"] = "arrow"
    # Sampling probability given to catalogue items with no train events, as a fraction of one
    # event: p_floor = popularity_floor_events / total_train_events.
    popularity_floor_events: float = 0.5

    def __post_init__(self) -> None:
        if self.vocab_min_count < 1:
            raise ConfigError("prepare.vocab_min_count must be >= 1")
        if self.history_length < 0:
            raise ConfigError("prepare.history_length must be >= 0")
        if not 0.0 < self.popularity_floor_events <= 1.0:
            raise ConfigError("prepare.popularity_floor_events must be in (0, 1]")


# ---------------------------------------------------------------------------------------------
# Model, SSL, training, evaluation
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    # Width of every feature embedding table.
    embedding_dim: int = 32
    # MLP after the concatenated feature embeddings; the last entry is the output dimension.
    tower_layers: tuple[int, ...] = (128, 64)

    def __post_init__(self) -> None:
        if self.embedding_dim < 1:
            raise ConfigError("model.embedding_dim must be >= 1")
        if not self.tower_layers or any(w < 1 for w in self.tower_layers):
            raise ConfigError(f"model.tower_layers must be positive widths, got {self.tower_layers}")


SSLMethod = Literal["none", "fd", "so", "rfm", "rfm_no_compl", "cfm"]


@dataclass(frozen=True)
class SSLConfig:
    """The self-supervised item task (Yao et al. 2021) and the paper's baselines.

    ``none``: main task only. ``fd``: feature dropout inside the main task. ``so``: spread-out
    regulariser. ``rfm``/``rfm_no_compl``/``cfm``: contrastive task with that masking.
    """

    method: SSLMethod = "none"
    alpha: float = 0.3
    tau: float = 0.1
    batch_size: int = 256
    # Multi-valued feature dropout applied to each view after masking.
    multi_value_dropout: bool = True
    dropout_rate: float = 0.1
    # Feature-dropout rate of the ``fd`` baseline.
    fd_rate: float = 0.1

    def __post_init__(self) -> None:
        if self.alpha < 0:
            raise ConfigError(f"ssl.alpha must be >= 0, got {self.alpha}")
        if self.tau <= 0:
            raise ConfigError(f"ssl.tau must be > 0, got {self.tau}")
        if self.batch_size < 2:
            raise ConfigError("ssl.batch_size must be >= 2: InfoNCE needs in-batch negatives")
        for name in ("dropout_rate", "fd_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"ssl.{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def uses_contrastive_task(self) -> bool:
        return self.method in ("rfm", "rfm_no_compl", "cfm")


CatalogueMode = Literal["auto", "replicated", "streaming"]
CATALOGUE_MODES: tuple[str, ...] = typing.get_args(CatalogueMode)


@dataclass(frozen=True)
class TrainConfig:
    num_workers: int = 2
    use_gpu: bool = False
    # bf16 autocast on GPU; ignored on CPU.
    bf16: bool = False
    # CPUs each train worker reserves; leave some for Ray Data's read tasks.
    cpus_per_worker: float = 1.0
    batch_size: int = 256
    epochs: int = 3
    lr: float = 0.005
    weight_decay: float = 0.0
    # Temperature of the main batch softmax.
    tau: float = 0.05
    logq_correction: bool = True
    remove_accidental_hits: bool = True
    global_negatives: bool = False
    seed: int = 0
    checkpoint_every_epochs: int = 1
    # Also checkpoint every N steps within an epoch (0 = only at epoch ends).
    checkpoint_every_steps: int = 0
    max_failures: int = 2
    # Train on this fraction of train/ events: a deterministic hash down-sample of the events
    # (the same events for every seed and method; the 10% sample is a subset of the 50% one).
    data_fraction: float = 1.0
    # Where train workers get item features from (``ray_train/streaming.py``): ``replicated`` loads
    # the whole encoded catalogue into every worker; ``streaming`` keeps it once in the cluster, in
    # shard actors, and denormalises the positives into the train rows; ``auto`` streams when the
    # replicated catalogue would exceed ``ray_train.streaming.REPLICATE_MAX_BYTES`` per worker.
    catalogue: CatalogueMode = "auto"

    def __post_init__(self) -> None:
        if self.catalogue not in CATALOGUE_MODES:
            raise ConfigError(
                f"train.catalogue must be one of {list(CATALOGUE_MODES)}, got {self.catalogue!r}"
            )
        if self.num_workers < 1:
            raise ConfigError("train.num_workers must be >= 1")
        if self.batch_size < 2:
            raise ConfigError("train.batch_size must be >= 2: the batch softmax needs negatives")
        if self.epochs < 1:
            raise ConfigError("train.epochs must be >= 1")
        if self.lr <= 0:
            raise ConfigError("train.lr must be > 0")
        if self.tau <= 0:
            raise ConfigError("train.tau must be > 0")
        if self.checkpoint_every_epochs < 1:
            raise ConfigError("train.checkpoint_every_epochs must be >= 1")
        if self.checkpoint_every_steps < 0:
            raise ConfigError("train.checkpoint_every_steps must be >= 0")
        if self.bf16 and not self.use_gpu:
            raise ConfigError("train.bf16 needs train.use_gpu: true (bf16 autocast is GPU-only here)")
        if not 0.0 < self.data_fraction <= 1.0:
            raise ConfigError(f"train.data_fraction must be in (0, 1], got {self.data_fraction}")


@dataclass(frozen=True)
class EvalConfig:
    ks: tuple[int, ...] = (10, 50, 100)
    # Head = the top ``head_fraction`` of catalogue items by train count; tail = the rest with
    # train events; cold = never in train.
    head_fraction: float = 0.1
    # Build an approximate index over the exported item embeddings and report its recall.
    ann_index: bool = True

    def __post_init__(self) -> None:
        if not self.ks or any(k < 1 for k in self.ks):
            raise ConfigError(f"eval.ks must be positive, got {self.ks}")
        if not 0.0 < self.head_fraction < 1.0:
            raise ConfigError("eval.head_fraction must be in (0, 1)")


# ---------------------------------------------------------------------------------------------
# The whole configuration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    spark: SparkConfig = field(default_factory=SparkConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.ssl.method == "cfm" and len(self.features.item) < 1:
            raise ConfigError(
                "ssl.method 'cfm' masks correlated item features, but features.item declares none "
                "besides the id; declare item features or use ssl.method: rfm"
            )

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def hash(self) -> str:
        """sha256 of the resolved config, stable across runs and key order."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def with_overrides(self, overrides: Sequence[str]) -> "Config":
        return from_dict(apply_overrides(self.to_dict(), overrides))


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML file (or the defaults when ``path`` is None) and apply ``--set`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist; pass a path such as conf/default.yaml")
        with p.open() as fh:
            loaded = yaml.safe_load(fh)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping at top level, got {type(loaded).__name__}")
        raw = loaded
    return from_dict(apply_overrides(raw, overrides))


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings to a nested dict; values are parsed as YAML scalars."""
    out = _deep_copy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        key, _, text = item.partition("=")
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        value = yaml.safe_load(text) if text.strip() else ""
        _set_dotted(out, key, value, f"override {item!r}")
    return out


def apply_values(raw: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """Set dotted keys (``{"ssl.alpha": 0.3}``) to already-typed values in a nested dict."""
    out = _deep_copy(raw)
    for key, value in values.items():
        _set_dotted(out, key, _deep_copy(value), f"key {key!r}")
    return out


def _set_dotted(node: dict[str, Any], key: str, value: Any, what: str) -> None:
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = {}
            node[part] = child
        elif not isinstance(child, dict):
            raise ConfigError(f"{what}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def from_dict(raw: Mapping[str, Any]) -> Config:
    return _build(Config, raw, "")


def build(cls: type, raw: Any, prefix: str = "") -> Any:
    """Any config dataclass from a nested dict, with the same strict checks as ``Config``
    (unknown keys, wrong types; ``prefix`` names the section in errors)."""
    return _build(cls, raw, prefix)


def _deep_copy(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {k: _deep_copy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_deep_copy(v) for v in x]
    return x


def _to_plain(x: Any) -> Any:
    if dataclasses.is_dataclass(x):
        return {f.name: _to_plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, Mapping):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_plain(v) for v in x]
    return x


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix or "<top level>"
    if cls is FeatureDecl and isinstance(raw, str):
        raw = {"type": raw}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        keys = ", ".join(f"{prefix + '.' if prefix else ''}{k}" for k in unknown)
        raise ConfigError(f"unknown config key(s): {keys}; known keys here: {sorted(names)}")
    kwargs = {}
    for name in names:
        if name in raw:
            kwargs[name] = _coerce(hints[name], raw[name], f"{prefix + '.' if prefix else ''}{name}")
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(inner[0], value, key)
        raise ConfigError(f"{key}: unsupported union type {tp}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        elem = args[0] if args else Any
        return tuple(_coerce(elem, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (collections.abc.Mapping, dict) or tp is dict:
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        # A plain dict (not MappingProxyType) so that the config pickles to Ray workers.
        return {str(k): _coerce(vt, v, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e30" (no dot) as a string; accept any float literal.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported config type {tp}")
