"""Typed run configuration: loadable from YAML/TOML, overridable from the command line."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal, get_args

import tomllib
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from models.config import DEFAULT_MODEL, MetaMMFGraphConfig, ModelConfig
from models.registry import MODELS, AnyModelConfig, check_model_section, get_spec, unseen_items_problem
from training.synthetic import SyntheticConfig

log = logging.getLogger(__name__)


class DataConfig(BaseModel):
    """Where the data comes from: an MMRec directory, or the built-in synthetic generator."""

    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(None, description="MMRec data directory; None = built-in synthetic data")
    split_seed: int = Field(2024, description="seed of the 80/10/10 split when the .inter has no x_label")
    cold_users: Literal["error", "keep", "drop"] = Field(
        "error", description="valid/test users without train interactions: fail, keep them, or drop them"
    )
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    protocol: Literal["warm", "cold_items"] = Field(
        "warm",
        description="warm: the split as loaded; cold_items: hold out a share of items from training and rank "
        "them from content alone (training.coldstart)",
    )
    cold_item_ratio: float = Field(0.2, gt=0, lt=1, description="cold_items: share of items held out")
    cold_item_seed: int = Field(0, description="cold_items: seed of the held-out item draw")


Precision = Literal["fp32", "tf32", "bf16"]  # training.precision applies it


def check_precision(precision: str, device: str) -> None:
    """Raise ``ValueError`` for a precision that is unknown or that ``device`` cannot honour."""
    if precision not in get_args(Precision):
        raise ValueError(f"train.precision={precision!r} is not one of {', '.join(get_args(Precision))}")
    if precision == "tf32" and not device.startswith("cuda"):
        raise ValueError(f"train.precision=tf32 needs a CUDA device (train.device={device!r}); use fp32 or bf16")


class TrainConfig(BaseModel):
    """Optimisation, early stopping and evaluation settings."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(1000, ge=1)
    batch_size: int = Field(3000, ge=1)
    lr: float = Field(5e-3, gt=0)
    reg_weight: float = Field(3e-2, ge=0, description="L2 weight on batch representations")
    patience: int = Field(10, ge=1, description="evaluations without improvement before stopping")
    eval_every: int = Field(1, ge=1, description="validate every N epochs")
    monitor: str = Field("recall@20", description="validation metric for early stopping")
    negative_candidates: int = Field(
        1,
        ge=1,
        le=64,
        description="negatives drawn per training interaction and epoch; with more than one the model's "
        "highest-scored of them (embeddings at the start of the epoch) is used: dynamic negative sampling",
    )
    new_item_scale_rule: Literal["one_se", "best"] = Field(
        "one_se",
        description="how the new items' scale multiplier is picked on validation (models with content neighbours): "
        "'one_se' the largest multiplier within one standard error of the best (new items get the most exposure "
        "the validation metric cannot tell from the best), 'best' the best one",
    )
    ks: list[int] = Field(default_factory=lambda: [10, 20])
    seed: int = 2024
    device: str = "cpu"
    precision: Precision = Field(
        "fp32",
        description="fp32; tf32 (CUDA only: TF32 tensor-core matrix products); bf16 (autocast the loss's "
        "forward pass to bfloat16; parameters, optimiser and evaluation stay float32)",
    )
    threads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="torch threads on a CPU; default: $OMP_NUM_THREADS if set, else the CPUs this process may use "
        "(its affinity mask, capped by a cgroup CPU quota), not every core of the host",
    )
    eval_batch_size: int = Field(2048, ge=1, description="users per evaluation batch")
    max_seconds: float | None = Field(None, gt=0, description="stop training after this wall time")
    progress: bool = True
    neighbor_sampling: bool = Field(
        False,
        description="metammf_gcn only: each step propagates over a fanout-bounded sampled neighbourhood of "
        "the batch's users and items instead of the whole graph (evaluation stays full-graph)",
    )
    fanouts: list[int] | None = Field(
        None,
        description="with neighbor_sampling: neighbours sampled per node at hop 1, 2, ... (one per GCN layer, "
        "-1 = all); default 10 per layer",
    )

    @field_validator("fanouts")
    @classmethod
    def _positive_fanouts(cls, fanouts: list[int] | None) -> list[int] | None:
        if fanouts is not None and (not fanouts or any(f == 0 or f < -1 for f in fanouts)):
            raise ValueError("fanouts must be a non-empty list of positive integers (or -1 for all neighbours)")
        return fanouts

    @model_validator(mode="after")
    def _precision_fits_device(self) -> TrainConfig:
        check_precision(self.precision, self.device)
        return self

    def fanouts_for(self, gcn_layers: int) -> list[int]:
        """The fanout of every hop for a model with ``gcn_layers`` layers."""
        return list(self.fanouts) if self.fanouts is not None else [10] * gcn_layers


def check_neighbor_sampling(model: ModelConfig, train: TrainConfig) -> None:
    """Raise :class:`ConfigError` for neighbour-sampling settings that cannot work with ``model``."""
    if not train.neighbor_sampling:
        return
    if model.name != "metammf_gcn":
        raise ConfigError(
            f"train.neighbor_sampling=true needs model.name=metammf_gcn ({model.name} has no graph to sample)"
        )
    if model.item_graph_k:
        raise ConfigError(
            f"train.neighbor_sampling=true cannot compute the item-item content graph (model.item_graph_k="
            f"{model.item_graph_k}) on a sampled subgraph: set model.item_graph_k=0 or train on the full graph"
        )
    if getattr(model, "edge_pruning", 0.0):
        raise ConfigError(
            f"train.neighbor_sampling=true cannot prune the whole graph per epoch (model.edge_pruning="
            f"{model.edge_pruning}): set model.edge_pruning=0 or train on the full graph"
        )
    if train.fanouts is not None and len(train.fanouts) != model.gcn_layers:
        raise ConfigError(
            f"train.fanouts={train.fanouts} has {len(train.fanouts)} entries but model.gcn_layers="
            f"{model.gcn_layers}: give one fanout per GCN layer (hop 1 first)"
        )


class RunConfig(BaseModel):
    """Everything one training run needs; written next to its results."""

    model_config = ConfigDict(extra="forbid")

    data: DataConfig = Field(default_factory=DataConfig)
    model: AnyModelConfig = Field(default_factory=MetaMMFGraphConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @field_validator("model", mode="before")
    @classmethod
    def _known_model_and_settings(cls, model: Any) -> Any:
        return check_model_section(model) if isinstance(model, dict) else model

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        check_neighbor_sampling(self.model, self.train)
        problem = unseen_items_problem(self.model.name) if self.data.protocol == "cold_items" else None
        if problem:
            raise ValueError(f"{problem} (data.protocol=cold_items)")
        return self


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says which and why."""


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'YAML'}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (data, model, train)")
    return data


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply ``section.key=value`` (value parsed as YAML, so ``8``, ``true``, ``[10, 20]`` work)."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r}: expected dotted.key=value, e.g. train.lr=0.001")
    *parents, leaf = key.strip().split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
    node[leaf] = yaml.safe_load(raw)


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """The run config of file ``path`` with ``section.key=value`` overrides applied. An override that picks
    another model than the file's (``model.name=...``, ``--model``) keeps the file's model settings that model
    has and leaves the others out (logged), as the experiment suites do; a setting given as an override is
    always checked."""
    data = read_config_file(path) if path else {}
    file_model = dict(data.get("model") or {}) if isinstance(data.get("model"), dict) else {}
    for override in overrides or []:
        apply_override(data, override)
    _leave_out_settings_of_another_model(data, file_model, overrides or [], path)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        where = f" in {path}" if path else ""
        raise ConfigError(f"invalid configuration{where}:\n{_without_model_tags(str(exc))}") from None


def _leave_out_settings_of_another_model(
    data: dict[str, Any], file_model: dict[str, Any], overrides: list[str], path: str | Path | None
) -> None:
    model = data.get("model")
    if not isinstance(model, dict):
        return
    name, file_name = model.get("name", DEFAULT_MODEL), file_model.get("name", DEFAULT_MODEL)
    if name == file_name or name not in MODELS:
        return
    overridden = {o.partition("=")[0].strip().removeprefix("model.") for o in overrides if o.startswith("model.")}
    fields = get_spec(name).config.model_fields
    left_out = [key for key in file_model if key not in fields and key not in overridden]
    for key in left_out:
        model.pop(key, None)
    if left_out:
        log.info("%s: model %s has no setting %s: left out", path or "config", name, ", ".join(left_out))


def _without_model_tags(message: str) -> str:
    """Pydantic names a model setting ``model.<name>.<field>`` (the config class's tag): ``model.<field>`` is
    what a user writes in a config file or a ``--set``."""
    for name in MODELS:
        message = message.replace(f"\nmodel.{name}.", "\nmodel.")
    return message
