"""Typed experiment configs, YAML/``key=value`` overrides and the registry of named experiments.

Every ranking variant (MUSE, DIN, SIM-hard, SIM-soft, TWIN, MISS-as-ranker and the paper's
ablations) is one :class:`ExperimentConfig` of the same model: only the long-term GSU and the
ESU parts differ, so embeddings, the short-term path, the user/target features and the tower are
shared and comparisons are fair (as in the MUSE paper, section 4).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Callable, Iterable
from typing import Any

import yaml

#: Exact search units (ESU) over the retrieved behaviours; any non-empty combination.
ESU_CHOICES = ("ta", "sa_ta", "simtier")
TASK_CHOICES = ("ranking", "miss_retrieval", "two_tower")


@dataclasses.dataclass
class DataConfig:
    """Where the Beam output lives and how it is read."""

    data_dir: str = ""           # a Beam output directory; "" = the built-in demo data set
    max_seq_len: int = 0         # 0 = the data set's max_seq_len from metadata.json
    batch_size: int = 256
    eval_batch_size: int = 1024
    shuffle_buffer: int = 8192
    min_count: int = 1           # ids seen fewer times in train map to the OOV row
    seed: int = 7


@dataclasses.dataclass
class ModelConfig:
    """Ranking model structure (MUSE paper, section 3)."""

    id_embedding_dim: int = 16
    short_term_len: int = 50
    use_user_attributes: bool = True
    use_item_attributes: bool = True
    gsu: str = "multimodal"      # a name of muse_tf.models.search_units.SEARCH_UNITS, or "none"
    top_k: int = 50
    esu: list[str] = dataclasses.field(default_factory=lambda: ["sa_ta", "simtier"])
    num_heads: int = 2
    head_dim: int = 16
    num_tiers: int = 10
    tier_dim: int = 8
    gsu_projection_dim: int = 32
    tower_units: list[int] = dataclasses.field(default_factory=lambda: [200, 80])
    tower_activation: str = "dice"
    dropout: float = 0.0


@dataclasses.dataclass
class RetrievalConfig:
    """MISS tree retrieval and the two-tower baseline."""

    beam_width: int = 100
    negatives_per_level: int = 4
    top_n: int = 200
    tower_dim: int = 32
    scann_leaves: int = 100
    scann_leaves_to_search: int = 10


@dataclasses.dataclass
class TrainConfig:
    """Optimisation: Adam with separate learning rates for embeddings and dense layers."""

    epochs: int = 1
    embedding_learning_rate: float = 2e-3
    dense_learning_rate: float = 2e-4
    steps_per_execution: int = 1
    max_train_steps: int = 0     # 0 = whole epochs
    max_eval_steps: int = 0      # 0 = whole test split
    strategy: str = "default"    # default | mirrored | multi_worker
    export: bool = True
    verbose: int = 1


@dataclasses.dataclass
class ExperimentConfig:
    name: str = "muse"
    task: str = "ranking"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    retrieval: RetrievalConfig = dataclasses.field(default_factory=RetrievalConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def validate(self) -> ExperimentConfig:
        if self.task not in TASK_CHOICES:
            raise ValueError(f"task={self.task!r} is not one of {TASK_CHOICES}")
        model = self.model
        # The searches are the registry's names (one place to add one); imported here so
        # that reading a config does not load TensorFlow.
        from muse_tf.models.search_units import search_names

        if model.gsu not in search_names():
            raise ValueError(f"model.gsu={model.gsu!r} is not one of {search_names()}")
        if model.gsu == "attention" and not {"ta", "sa_ta"} & set(model.esu):
            raise ValueError("model.gsu='attention' (TWIN) scores with the ESU's target "
                             f"attention: model.esu must hold 'ta' or 'sa_ta', got {model.esu}")
        bad = [part for part in model.esu if part not in ESU_CHOICES]
        if bad or not model.esu:
            raise ValueError(f"model.esu={model.esu!r}: a non-empty list of {ESU_CHOICES}")
        if "ta" in model.esu and "sa_ta" in model.esu:
            raise ValueError("model.esu may hold 'ta' or 'sa_ta', not both")
        for field_name in ("top_k", "short_term_len", "id_embedding_dim", "num_heads",
                           "head_dim", "num_tiers", "tier_dim"):
            if getattr(model, field_name) <= 0:
                raise ValueError(f"model.{field_name}={getattr(model, field_name)} must be > 0")
        for field_name in ("batch_size", "eval_batch_size"):
            if getattr(self.data, field_name) <= 0:
                raise ValueError(f"data.{field_name}={getattr(self.data, field_name)} must be "
                                 "> 0")
        if self.train.strategy not in ("default", "mirrored", "multi_worker"):
            raise ValueError(f"train.strategy={self.train.strategy!r} is not one of "
                             "default, mirrored, multi_worker")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, annotation: Any, path: str) -> Any:
    """Convert a YAML/CLI value to the field's declared type, naming the field on error."""
    origin = typing.get_origin(annotation)
    try:
        if dataclasses.is_dataclass(annotation):
            if not isinstance(value, dict):
                raise TypeError(f"expected a mapping, got {value!r}")
            return value
        if origin is list:
            (item_type,) = typing.get_args(annotation)
            if isinstance(value, str):
                value = [v for v in value.split(",") if v != ""]
            return [_coerce(v, item_type, path) for v in value]
        if annotation is bool:
            if isinstance(value, str):
                lowered = value.lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(f"not a boolean: {value!r}")
                return lowered in ("true", "1", "yes")
            return bool(value)
        if annotation is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(f"not an integer: {value!r}")
            return int(value)
        if annotation is float:
            return float(value)
        if annotation is str:
            return str(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"config field {path}: {err}") from None
    return value


def apply_overrides(config: ExperimentConfig, overrides: dict[str, Any],
                    prefix: str = "") -> ExperimentConfig:
    """Apply a nested mapping of overrides (e.g. from YAML) in place; unknown keys are errors."""
    _apply(config, overrides, prefix)
    return config


def _apply(target: Any, overrides: dict[str, Any], prefix: str) -> None:
    types = _field_types(type(target))
    for key, value in overrides.items():
        path = f"{prefix}{key}"
        if key not in types:
            raise KeyError(f"unknown config field {path!r}; known at this level: {sorted(types)}")
        annotation = types[key]
        if dataclasses.is_dataclass(annotation):
            _coerce(value, annotation, path)
            _apply(getattr(target, key), value, f"{path}.")
        else:
            setattr(target, key, _coerce(value, annotation, path))


def parse_set(assignments: Iterable[str]) -> dict[str, Any]:
    """``["model.top_k=20", "train.epochs=2"]`` -> nested dict (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for assignment in assignments:
        if "=" not in assignment:
            raise ValueError(f"--set expects key=value, got {assignment!r}")
        key, raw = assignment.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def load_yaml(path: str) -> dict[str, Any]:
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping, got {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------- registry

_REGISTRY: dict[str, Callable[[], ExperimentConfig]] = {}
_DESCRIPTIONS: dict[str, str] = {}


def register(name: str, description: str, **fields: Any) -> None:
    """Register a named experiment as overrides of the defaults (``model={...}`` etc.)."""
    if name in _REGISTRY:
        raise ValueError(f"experiment {name!r} registered twice")

    def factory() -> ExperimentConfig:
        config = ExperimentConfig(name=name)
        apply_overrides(config, json.loads(json.dumps(fields)))
        return config.validate()

    _REGISTRY[name] = factory
    _DESCRIPTIONS[name] = description


def experiments() -> dict[str, str]:
    """Registered experiment names -> one-line descriptions."""
    return dict(_DESCRIPTIONS)


def get_experiment(name: str) -> ExperimentConfig:
    if name not in _REGISTRY:
        raise KeyError(f"unknown experiment {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]()


def resolve(name: str, config_file: str | None = None,
            assignments: Iterable[str] = ()) -> ExperimentConfig:
    """Registry entry, then YAML file overrides, then ``--set`` overrides; validated."""
    config = get_experiment(name)
    if config_file:
        overrides = load_yaml(config_file)
        overrides.pop("experiment", None)
        apply_overrides(config, overrides)
    apply_overrides(config, parse_set(assignments))
    return config.validate()


# Main models and baselines (MUSE paper, Table 4).
register("muse", "MUSE: multimodal GSU + SA-TA + SimTier (the default)")
register("din", "DIN: target attention over the newest behaviours only, no lifelong search",
         model={"gsu": "none", "esu": ["ta"]})
register("sim_hard", "SIM-hard: category-match GSU + target attention",
         model={"gsu": "category", "esu": ["ta"]})
register("sim_soft", "SIM-soft: ID-embedding inner-product GSU + target attention",
         model={"gsu": "id", "esu": ["ta"]})
register("twin", "TWIN: target-attention score as the GSU + target attention",
         model={"gsu": "attention", "esu": ["ta"]})
register("miss", "MISS as a ranker: Co-GSU (ID) + MM-GSU (multimodal), ID-only target attention",
         model={"gsu": "miss", "esu": ["ta"]})
# Table 1: which embedding the GSU searches with (ESU fixed to ID target attention).
register("ablation_gsu_id", "Table 1: GSU by ID embedding (ESU: TA)",
         model={"gsu": "id", "esu": ["ta"]})
register("ablation_gsu_multimodal", "Table 1: GSU by multimodal embedding (ESU: TA)",
         model={"gsu": "multimodal", "esu": ["ta"]})
# Table 2: the multimodal GSU's similarity.
register("ablation_gsu_cosine", "Table 2: multimodal cosine GSU (ESU: SA-TA + SimTier)",
         model={"gsu": "multimodal"})
register("ablation_gsu_projected", "Table 2: learned projection before the similarity",
         model={"gsu": "projected_multimodal"})
register("ablation_gsu_plus_id", "Table 2: multimodal cosine + ID cosine",
         model={"gsu": "multimodal_plus_id"})
# Table 3: ESU over the multimodal GSU's selection.
register("ablation_esu_ta", "Table 3: ESU = ID target attention", model={"esu": ["ta"]})
register("ablation_esu_simtier", "Table 3: ESU = SimTier", model={"esu": ["simtier"]})
register("ablation_esu_ta_simtier", "Table 3: ESU = TA + SimTier",
         model={"esu": ["ta", "simtier"]})
register("ablation_esu_sata", "Table 3: ESU = SA-TA", model={"esu": ["sa_ta"]})
register("ablation_esu_sata_simtier", "Table 3: ESU = SA-TA + SimTier (= muse)",
         model={"esu": ["sa_ta", "simtier"]})

# Retrieval (MISS paper) and its two-tower baseline.
# One epoch at the ranking learning rates leaves both retrieval models under-trained on the
# demo data (MISS recall@100 0.21 vs popularity 0.17); 4 epochs at 1e-3 were measured to work.
register("miss_retrieval", "MISS retrieval: multimodal index tree, Co-GSU + MM-GSU node scorer, "
         "beam search", task="miss_retrieval",
         train={"epochs": 4, "dense_learning_rate": 1e-3})
register("two_tower", "Two-tower retrieval (TFRS Retrieval task), brute-force and ScaNN top-k",
         task="two_tower", train={"epochs": 4, "dense_learning_rate": 1e-3})

#: Ablation groups for ``python -m muse_tf.experiments``.
ABLATIONS = {
    "table1": ["ablation_gsu_id", "ablation_gsu_multimodal"],
    "table2": ["ablation_gsu_cosine", "ablation_gsu_projected", "ablation_gsu_plus_id"],
    "table3": ["ablation_esu_ta", "ablation_esu_simtier", "ablation_esu_ta_simtier",
               "ablation_esu_sata", "ablation_esu_sata_simtier"],
}
