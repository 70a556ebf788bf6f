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
#: ModelConfig fields with a fixed set of values.
MODEL_CHOICES = {
    "embedding_init": ("truncated_normal", "normal"),
    "id_gsu_similarity": ("cosine", "inner_product"),
    "attention": ("official", "scaled"),
    "simtier_binning": ("ceil", "floor"),
    "tower_style": ("official", "batch"),
    "mm_storage_dtype": ("int8", "float32", "float16"),
}


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
    """Ranking model structure (MUSE paper, section 3). Defaults follow the official MUSE
    code (alimama-tech/MUSE); the first muse_tf choices are the ``muse_v1`` experiment."""

    id_embedding_dim: int = 16
    short_term_len: int = 50
    use_user_attributes: bool = True
    use_item_attributes: bool = True
    use_user_id: bool = True     # official: the user-id embedding is a tower input
    # The frozen multimodal table: int8 SCL codes + a per-row inverse norm (4.5 GB for
    # TAOBAO-MM's 35.4M items) or float32 / float16 unit vectors (4x / 2x the bytes).
    mm_storage_dtype: str = "int8"
    # [] = official: E for user_attr_1..2 (130_1, 130_2), E/2 for user_attr_3..5.
    user_attribute_dims: list[int] = dataclasses.field(default_factory=list)
    embedding_init: str = "truncated_normal"   # truncated_normal (official) | normal
    embedding_init_std: float = 0.001          # official 0.001; muse_v1: normal, 0.05
    gsu: str = "multimodal"      # a name of muse_tf.models.search_units.SEARCH_UNITS, or "none"
    top_k: int = 50
    id_gsu_similarity: str = "cosine"  # SIM-soft (gsu "id"): cosine (official) | inner_product
    esu: list[str] = dataclasses.field(default_factory=lambda: ["sa_ta", "simtier"])
    # official: Linear+bias projections (SiLU in SA-TA), unscaled dot, one head of 2E;
    # scaled: no bias/activation, logits / sqrt(head_dim) (muse_v1: 2 heads of 16).
    attention: str = "official"
    num_heads: int = 1
    head_dim: int = 32
    # SA-TA: initial (g1, g2, g3) and the learned temperature τ on R (0 = none). Official:
    # (1, 1, 1) and τ = 0.1, i.e. effective initial gates (1, 10, 10).
    sa_ta_gates: list[float] = dataclasses.field(default_factory=lambda: [1.0, 1.0, 1.0])
    sa_ta_temperature: float = 0.1
    # SimTier: official ceil binning into tiers of width 2/num_tiers = 0.1, one weight each,
    # on the retrieved K and (short_term_simtier) the newest short_term_len behaviours.
    simtier_binning: str = "ceil"   # ceil (official) | floor (muse_v1: 10 tiers × 8-d)
    num_tiers: int = 20
    tier_dim: int = 1
    short_term_simtier: bool = True
    retrieved_mean: bool = True  # official: mean ID embedding of the K retrieved, in the tower
    gsu_projection_dim: int = 32
    tower_units: list[int] = dataclasses.field(default_factory=lambda: [256, 128, 64])
    tower_activation: str = "dice"
    tower_style: str = "official"   # official: LayerNorm-Dice, α=-0.25, N(0,1/fan_in), b=0.1
    #                                 batch: BatchNorm-Dice, α=0, Glorot, b=0 (muse_v1)
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
    # Two-tower in-batch softmax: logits <u, v> / temperature, minus log q(item) (the item's
    # share of the training clicks) when logq_correction (Yi et al., RecSys 2019).
    temperature: float = 0.2
    logq_correction: bool = True
    # MISS: tree levels 0 .. S whose nodes get a learned embedding row; deeper nodes use
    # their items' ID embeddings (a leaf its item's, an inner node their mean). -1 = auto:
    # every level while the tree has at most 2**22 nodes, else the deepest S with
    # 2**(S + 1) - 1 <= 2**22 (S = 21); a value above the tree's depth means every level.
    learned_node_levels: int = -1


@dataclasses.dataclass
class TrainConfig:
    """Optimisation: separate optimizers and learning rates for embeddings and dense layers
    (official: SparseAdam for the ID embeddings, AdamW with weight decay 0.01 for the rest)."""

    # Ranking: the most data epochs (early stopping on validation GAUC usually ends sooner;
    # 20 lets a ~60K-impression set converge, a 99M-sample set stops after about one);
    # with validation_share=0, exactly this many (the official setting: 1). Retrieval: exactly.
    epochs: int = 20
    embedding_learning_rate: float = 2e-3
    dense_learning_rate: float = 2e-4
    embedding_optimizer: str = "lazy_adam"  # lazy_adam (official: SparseAdam) | adam
    dense_weight_decay: float = 0.01        # AdamW's decoupled decay; 0 = plain Adam
    steps_per_execution: int = 1
    max_train_steps: int = 0     # ranking: cap on the train steps in all; retrieval: per
    #                              epoch; 0 = whole epochs
    # Ranking: this share of the train split is held out for validation and early stopping
    # (a hash seeded by data.seed); 0 = no validation, exactly train.epochs epochs.
    validation_share: float = 0.1
    # What is held out: "impression" (a share of every user's impressions, by a hash of
    # user_id and item_id: every user is trained on, as the test split's users are) or
    # "user" (a share of the users, never trained on).
    validation_split: str = "impression"
    patience: int = 2            # validations without a better GAUC before stopping
    # Validate every this many train examples, or once per data epoch if sooner; 0 = per
    # epoch.
    validation_every_examples: int = 2_000_000
    max_eval_steps: int = 0      # batches of the test (and validation) split; 0 = all
    strategy: str = "default"    # default | mirrored | multi_worker
    # A killed run started again with the same command continues from its last backup
    # (model_dir/backup: weights, optimizer slots, step, data position, callback state),
    # taken every backup_every_seconds of training (0: at period ends only) and at the end
    # of every period.
    resume: bool = True
    backup_every_seconds: float = 600.0
    export: bool = True
    # Most users one request to an export may hold (its signature rejects more); keep it at
    # least TF Serving batching's max_batch_size (serving/batching_parameters.txt: 128).
    export_max_batch_size: int = 128
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
        for field_name, choices in MODEL_CHOICES.items():
            if getattr(model, field_name) not in choices:
                raise ValueError(f"model.{field_name}={getattr(model, field_name)!r} is not one "
                                 f"of {choices}")
        if model.simtier_binning == "ceil" and model.num_tiers % 2:
            raise ValueError(f"model.num_tiers={model.num_tiers} must be even with "
                             "model.simtier_binning='ceil' (tiers centred on 0)")
        if len(model.sa_ta_gates) != 3:
            raise ValueError(f"model.sa_ta_gates={model.sa_ta_gates}: three initial gates "
                             "(g1, g2, g3)")
        if model.sa_ta_temperature < 0 or model.embedding_init_std <= 0:
            raise ValueError(f"model.sa_ta_temperature={model.sa_ta_temperature} must be >= 0 "
                             f"and model.embedding_init_std={model.embedding_init_std} > 0")
        if model.user_attribute_dims and (len(model.user_attribute_dims) != 5
                                          or min(model.user_attribute_dims) <= 0):
            raise ValueError(f"model.user_attribute_dims={model.user_attribute_dims}: [] or "
                             "five positive sizes (user_attr_1..5)")
        for field_name in ("batch_size", "eval_batch_size", "shuffle_buffer"):
            if getattr(self.data, field_name) <= 0:
                raise ValueError(f"data.{field_name}={getattr(self.data, field_name)} must be "
                                 "> 0")
        for field_name in ("max_seq_len", "min_count"):
            if getattr(self.data, field_name) < 0:
                raise ValueError(f"data.{field_name}={getattr(self.data, field_name)} must be "
                                 ">= 0")
        if not 0 <= self.data.seed < 2**32:
            raise ValueError(f"data.seed={self.data.seed} must be in [0, 2**32)")
        for field_name in ("embedding_learning_rate", "dense_learning_rate"):
            if not getattr(self.train, field_name) > 0:
                raise ValueError(f"train.{field_name}={getattr(self.train, field_name)!r} "
                                 "must be > 0")
        if self.train.steps_per_execution < 1 or self.train.verbose not in (0, 1, 2):
            raise ValueError(f"train.steps_per_execution={self.train.steps_per_execution} must "
                             f"be >= 1 and train.verbose={self.train.verbose} one of 0, 1, 2")
        if not 0.0 <= model.dropout < 1.0:
            raise ValueError(f"model.dropout={model.dropout!r} must be in [0, 1)")
        if model.gsu_projection_dim <= 0 or any(units <= 0 for units in model.tower_units):
            raise ValueError(f"model.gsu_projection_dim={model.gsu_projection_dim} and every "
                             f"model.tower_units={model.tower_units} must be > 0")
        for field_name in ("beam_width", "negatives_per_level", "top_n", "tower_dim",
                           "scann_leaves", "scann_leaves_to_search"):
            if getattr(self.retrieval, field_name) <= 0:
                raise ValueError(f"retrieval.{field_name}="
                                 f"{getattr(self.retrieval, field_name)} must be > 0")
        if self.train.strategy not in ("default", "mirrored", "multi_worker"):
            raise ValueError(f"train.strategy={self.train.strategy!r} is not one of "
                             "default, mirrored, multi_worker")
        if self.train.validation_split not in ("impression", "user"):
            raise ValueError(f"train.validation_split={self.train.validation_split!r} is not "
                             "one of impression, user")
        if self.train.export_max_batch_size < 1:
            raise ValueError(f"train.export_max_batch_size={self.train.export_max_batch_size} "
                             "must be >= 1 (users per request to an export)")
        if not 0.0 <= self.train.validation_share < 1.0:
            raise ValueError(f"train.validation_share={self.train.validation_share!r} must be "
                             "in [0, 1) (0 = no validation split, fixed epochs)")
        for field_name in ("epochs", "patience", "validation_every_examples",
                           "max_train_steps", "max_eval_steps", "backup_every_seconds"):
            if getattr(self.train, field_name) < 0:
                raise ValueError(f"train.{field_name}={getattr(self.train, field_name)} must be "
                                 ">= 0")
        if not self.retrieval.temperature > 0:
            raise ValueError(f"retrieval.temperature={self.retrieval.temperature} must be > 0")
        if self.retrieval.learned_node_levels < -1:
            raise ValueError(f"retrieval.learned_node_levels={self.retrieval.learned_node_levels}"
                             " must be >= 0, or -1 (auto)")
        if self.train.embedding_optimizer not in ("lazy_adam", "adam"):
            raise ValueError(f"train.embedding_optimizer={self.train.embedding_optimizer!r} "
                             "is not one of lazy_adam, adam")
        if not self.train.dense_weight_decay >= 0:
            raise ValueError(f"train.dense_weight_decay={self.train.dense_weight_decay!r} "
                             "must be >= 0")
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


# Main models and baselines (MUSE paper, Table 4). As in the official code, every baseline
# keeps MUSE's ESU (SA-TA + SimTier over what its search selects), the short-term path (with
# its multimodal SimTier) and the tower, and changes only the long-term search.
register("muse", "MUSE: multimodal GSU + SA-TA + SimTier (the default; official settings)")
register("din", "DIN (official-code style): no lifelong search; short-term TA + SimTier",
         model={"gsu": "none"})
register("sim_hard", "SIM-hard (official-code style): category-match GSU + SA-TA + SimTier",
         model={"gsu": "category"})
register("sim_soft", "SIM-soft (official-code style): cosine of ID embeddings + SA-TA + SimTier",
         model={"gsu": "id"})
register("twin", "TWIN: the ESU's attention score as the GSU + SA-TA + SimTier",
         model={"gsu": "attention"})
register("miss", "MISS as a ranker: Co-GSU (ID) + MM-GSU (multimodal) + SA-TA + SimTier",
         model={"gsu": "miss"})
# The original papers' baselines: ID target attention as the ESU and no multimodal features
# outside their search (no SimTier anywhere, SIM-soft by inner product as in SIM).
_ORIGINAL = {"esu": ["ta"], "short_term_simtier": False}
register("din_ta", "DIN (original): target attention over the newest behaviours only",
         model={"gsu": "none", **_ORIGINAL})
register("sim_hard_ta", "SIM-hard (original): category-match GSU + target attention",
         model={"gsu": "category", **_ORIGINAL})
register("sim_soft_ta", "SIM-soft (original): ID-embedding inner-product GSU + target attention",
         model={"gsu": "id", "id_gsu_similarity": "inner_product", **_ORIGINAL})
register("twin_ta", "TWIN (original): target-attention score as the GSU + target attention",
         model={"gsu": "attention", **_ORIGINAL})
register("miss_ta", "MISS as a ranker (original): Co-GSU + MM-GSU, ID target attention",
         model={"gsu": "miss", **_ORIGINAL})
# The first muse_tf configuration of MUSE, before it followed the official code.
MUSE_V1 = {"use_user_id": False, "user_attribute_dims": [16] * 5, "embedding_init": "normal",
           "embedding_init_std": 0.05, "attention": "scaled", "num_heads": 2, "head_dim": 16,
           "sa_ta_gates": [1.0, 1.0, 0.0], "sa_ta_temperature": 0.0,
           "simtier_binning": "floor", "num_tiers": 10, "tier_dim": 8,
           "short_term_simtier": False, "retrieved_mean": False, "tower_units": [200, 80],
           "tower_style": "batch"}
register("muse_v1", "MUSE as first built here: 2-head scaled SA-TA gates (1,1,0), SimTier "
         "10 tiers × 8-d on the retrieved only, tower 200-80 BatchNorm-Dice", model=MUSE_V1)
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
# Their model sizes are the ones these figures were measured with.
_RETRIEVAL_MODEL = {"num_heads": 2, "head_dim": 16, "tower_units": [200, 80]}
register("miss_retrieval", "MISS retrieval: multimodal index tree, Co-GSU + MM-GSU node scorer, "
         "beam search", task="miss_retrieval", model=_RETRIEVAL_MODEL,
         train={"epochs": 4, "dense_learning_rate": 1e-3})
register("two_tower", "Two-tower retrieval (TFRS Retrieval task), brute-force and ScaNN top-k",
         task="two_tower", model=_RETRIEVAL_MODEL,
         train={"epochs": 4, "dense_learning_rate": 1e-3})

#: Ablation groups for ``python -m muse_tf.experiments``.
ABLATIONS = {
    "table1": ["ablation_gsu_id", "ablation_gsu_multimodal"],
    "table2": ["ablation_gsu_cosine", "ablation_gsu_projected", "ablation_gsu_plus_id"],
    "table3": ["ablation_esu_ta", "ablation_esu_simtier", "ablation_esu_ta_simtier",
               "ablation_esu_sata", "ablation_esu_sata_simtier"],
}
