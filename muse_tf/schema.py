"""The one schema: every TAOBAO-MM feature defined once.

Everything else derives from the tuples below: the Beam reader's column lists and its
``SequenceExample`` encoder (``muse_tf.data.records``), the tf.data parse spec
(:func:`context_parse_spec`, :func:`sequence_parse_spec`), the model's input dict and the
serving signature. Adding a feature is one edit here.

Record layout (one ``tf.train.SequenceExample`` per impression):

* context: the label, the user id and attributes, the target item id and attributes;
* feature lists: the lifelong behaviour item ids and categories, oldest first, newest
  last, exactly as in TAOBAO-MM. The short-term sequence is the newest
  :data:`SHORT_TERM_LEN` of them.

Ids stay the dataset's raw signed 64-bit hashes in records (0 = missing/padding); mapping to
embedding rows happens inside the model through the vocabularies Beam writes, so a served
model takes the same raw ids a production log has.

Fixed-shape tensors (reader output, model input, serving signature) are **right-padded**:
row ``b`` of a sequence holds its values at positions ``0 .. length[b]-1`` (oldest first,
newest at ``length[b]-1``) and ``0`` after them. Lengths travel beside them as
:data:`HISTORY_LENGTH`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

SCHEMA_VERSION = 1

CONTEXT = "context"
SEQUENCE = "sequence"

# Source tables of the TAOBAO-MM release.
SAMPLES = "samples"
USER_FEATURES = "user_features"
ITEM_FEATURES = "item_features"
EMBEDDINGS = "scl_embedding"

#: Maximum lifelong history length of TAOBAO-MM (the ``150_2_180`` lists hold up to 1,000).
MAX_HISTORY_LEN = 1000
#: Length of the short-term (newest) behaviour sequence used by every ranking model.
SHORT_TERM_LEN = 50
#: Dimension of the SCL multimodal item embedding (``205_c``, int8).
MM_EMBEDDING_DIM = 128


@dataclasses.dataclass(frozen=True)
class Feature:
    """One feature of the data set.

    Attributes:
      key: the TAOBAO-MM column name / field id (``"205"``, ``"150_2_180"``, ...).
      name: the readable name used in records, tensors and serving signatures.
      kind: :data:`CONTEXT` (one value per impression) or :data:`SEQUENCE` (a
        behaviour list, oldest first).
      table: the source table the column is read from.
      dtype: the tensor dtype name in records and tensors.
      vocabulary: name of the id vocabulary the values map through (features that share a
        vocabulary share embedding rows, e.g. target and behaviour item ids); ``None`` for
        values that are not ids.
      max_len: the maximum length of a sequence feature (0 for context features).
      description: what the field holds.
    """

    key: str
    name: str
    kind: str
    table: str
    dtype: str = "int64"
    vocabulary: str | None = None
    max_len: int = 0
    description: str = ""

    @property
    def is_sequence(self) -> bool:
        return self.kind == SEQUENCE


LABEL = Feature(
    "label_0", "label", CONTEXT, SAMPLES, vocabulary=None,
    description="click label; stored in TAOBAO-MM as a one-hot list<int8> of 2 "
    "([1,0] not clicked, [0,1] clicked), in records as 0/1",
)
USER_ID = Feature("129_1", "user_id", CONTEXT, SAMPLES, vocabulary="user",
                  description="hashed user id; join key of samples and user features")
USER_ATTRIBUTES = tuple(
    Feature(f"130_{i}", f"user_attr_{i}", CONTEXT, USER_FEATURES, vocabulary=f"user_attr_{i}",
            description="hashed user attribute (age, gender, city, ...)")
    for i in range(1, 6)
)
ITEM_ID = Feature("205", "item_id", CONTEXT, SAMPLES, vocabulary="item",
                  description="hashed target item id; join key of samples and item features")
ITEM_CATEGORY = Feature("206", "item_category", CONTEXT, ITEM_FEATURES, vocabulary="category",
                        description="hashed category of the target item")
ITEM_ATTRIBUTES = (
    Feature("213", "item_attr_1", CONTEXT, ITEM_FEATURES, vocabulary="item_attr_1",
            description="hashed item attribute"),
    Feature("214", "item_attr_2", CONTEXT, ITEM_FEATURES, vocabulary="item_attr_2",
            description="hashed item attribute"),
)
HISTORY_ITEM_ID = Feature(
    "150_2_180", "hist_item_id", SEQUENCE, USER_FEATURES, vocabulary="item",
    max_len=MAX_HISTORY_LEN,
    description="lifelong behaviour item ids, oldest first, newest last")
HISTORY_CATEGORY = Feature(
    "151_2_180", "hist_category", SEQUENCE, USER_FEATURES, vocabulary="category",
    max_len=MAX_HISTORY_LEN,
    description="categories of the behaviour items, aligned with hist_item_id")

CONTEXT_FEATURES: tuple[Feature, ...] = (
    LABEL, USER_ID, *USER_ATTRIBUTES, ITEM_ID, ITEM_CATEGORY, *ITEM_ATTRIBUTES)
SEQUENCE_FEATURES: tuple[Feature, ...] = (HISTORY_ITEM_ID, HISTORY_CATEGORY)
FEATURES: tuple[Feature, ...] = CONTEXT_FEATURES + SEQUENCE_FEATURES

#: Tensor name of the history length that travels beside the padded sequences.
HISTORY_LENGTH = "hist_len"

#: The multimodal embedding table: item id column and int8 vector column.
EMBEDDING_ITEM_KEY = "205"
EMBEDDING_VECTOR_KEY = "205_c"

#: Model input features (everything but the label), in schema order.
INPUT_FEATURES: tuple[Feature, ...] = tuple(f for f in FEATURES if f is not LABEL)
#: Features describing the candidate item (target side of a ranking request).
ITEM_SIDE_FEATURES: tuple[Feature, ...] = (ITEM_ID, ITEM_CATEGORY, *ITEM_ATTRIBUTES)
#: Features describing the user (one row per user in a ranking request).
USER_SIDE_FEATURES: tuple[Feature, ...] = (USER_ID, *USER_ATTRIBUTES)
#: Tensor names of a retrieval query / the user block of a ranking request: the user
#: features, the padded history and its length.
QUERY_FEATURES: tuple[str, ...] = (
    *(f.name for f in USER_SIDE_FEATURES), *(f.name for f in SEQUENCE_FEATURES), HISTORY_LENGTH)
#: Tensor name of the candidate count of a ranking request (candidates are right-padded).
NUM_CANDIDATES = "num_candidates"
#: dtype of the length tensors (``hist_len``, ``num_candidates``) everywhere: reader, model
#: inputs and serving signatures.
LENGTH_DTYPE = "int32"


def by_name(name: str) -> Feature:
    """The feature with readable name ``name``; raises ``KeyError`` naming it."""
    for feature in FEATURES:
        if feature.name == name:
            return feature
    raise KeyError(f"no feature named {name!r} in the schema; known: "
                   f"{[f.name for f in FEATURES]}")


def columns(table: str) -> list[str]:
    """TAOBAO-MM columns to read from ``table``, join keys included, in schema order."""
    keys = [f.key for f in FEATURES if f.table == table]
    if table == USER_FEATURES:
        keys = [USER_ID.key, *keys]
    elif table == ITEM_FEATURES:
        keys = [ITEM_ID.key, *keys]
    elif table == EMBEDDINGS:
        keys = [EMBEDDING_ITEM_KEY, EMBEDDING_VECTOR_KEY]
    elif table != SAMPLES:
        raise ValueError(f"unknown table {table!r}")
    return keys


def vocabularies() -> dict[str, tuple[Feature, ...]]:
    """Vocabulary name -> the features whose ids it maps, in schema order."""
    out: dict[str, list[Feature]] = {}
    for feature in FEATURES:
        if feature.vocabulary is not None:
            out.setdefault(feature.vocabulary, []).append(feature)
    return {name: tuple(feats) for name, feats in out.items()}


def context_parse_spec() -> dict[str, Any]:
    """``tf.io`` context spec for :func:`tf.io.parse_sequence_example`."""
    import tensorflow as tf

    return {f.name: tf.io.FixedLenFeature([], tf.dtypes.as_dtype(f.dtype))
            for f in CONTEXT_FEATURES}


def sequence_parse_spec() -> dict[str, Any]:
    """``tf.io`` feature-list spec for :func:`tf.io.parse_sequence_example`."""
    import tensorflow as tf

    return {f.name: tf.io.FixedLenSequenceFeature([], tf.dtypes.as_dtype(f.dtype))
            for f in SEQUENCE_FEATURES}


def as_dict() -> dict[str, Any]:
    """A JSON-able description of the schema, written into ``metadata.json``."""
    return {
        "version": SCHEMA_VERSION,
        "features": [dataclasses.asdict(f) for f in FEATURES],
        "history_length": HISTORY_LENGTH,
        "short_term_len": SHORT_TERM_LEN,
        "mm_embedding_dim": MM_EMBEDDING_DIM,
        "padding": "right",
    }
