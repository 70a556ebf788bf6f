"""One feature-embedding layer: raw ids → ID embeddings, multimodal vectors and history masks.

Every model reads its features through it (the retrieval models today; the ranking model
shares the conventions), so a behaviour, a target and a candidate use the same rows::

    raw id ──IdLookup(vocabulary)──► row ──► trainable ID embedding  E    (id_embedding_<vocab>)
    item id ──IdLookup("item").lookup_all──► row ──► frozen multimodal vector  D  (+ has-one)
    behaviour      = item ⊕ category ID embedding                     [..., 2E]
    valid(b, i)    = i < hist_len[b] and hist_item_id[b, i] != 0

Rare items (vocabulary lines at or past ``num_embedded``) share the out-of-vocabulary ID row
but keep their own multimodal row: content generalises to the long tail (MUSE, Sec. 3.1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from muse_tf import schema
from muse_tf.embeddings.id_lookup import IdLookup
from muse_tf.embeddings.multimodal_table import FrozenMultimodalTable, MultimodalCodes
from muse_tf.embeddings.vocabulary import Vocabulary
from muse_tf.layers.attention_logits import fresh_initializer
from muse_tf.layers.masking import history_mask, masked_mean, newest_positions
from muse_tf.layers.search_unit import CATEGORY, ID, MM, ROWS

__all__ = ["CATEGORY_ROWS", "EMBEDDING_PREFIX", "HISTORY_PARTS", "LENGTHS", "MM_VALID", "VALID",
           "FeatureEmbeddings"]

#: Name prefix of the trainable ID-embedding layers (``id_embedding_<vocabulary>``).
EMBEDDING_PREFIX = "id_embedding_"
#: Optional parts of :meth:`FeatureEmbeddings.encode_history` (keys of the GSU contract,
#: :mod:`muse_tf.layers.search_unit`).
HISTORY_PARTS = (ID, MM)
#: Keys :meth:`FeatureEmbeddings.encode_history` always returns besides ``rows``/``category``.
VALID = "valid"
MM_VALID = "mm_valid"
LENGTHS = "lengths"
CATEGORY_ROWS = "category_rows"


def _check_positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"FeatureEmbeddings: `{name}` must be a positive int, got {value!r}")
    return int(value)


@tf.keras.utils.register_keras_serializable(package="muse_tf")
class FeatureEmbeddings(tf.keras.layers.Layer):
    """Raw ids → the embeddings a model reads (module docstring).

    Holds one :class:`IdLookup` and one trainable ``Embedding(num_embedded + 2, E_v)``
    (``embeddings_initializer``, by default ``RandomNormal(stddev=0.05)``; the official MUSE
    code: truncated normal, std 0.001; named ``id_embedding_<vocabulary>``; ``E_v`` = E or
    ``embedding_dims[v]``) per vocabulary it uses, and the :class:`FrozenMultimodalTable`
    indexed by full item rows. Always used: the item and category vocabularies; the user
    attributes with ``use_user_attributes``; the item attributes with
    ``use_item_attributes``; the user id with ``use_user_id``. No
    lookup table, embedding or vocabulary asset exists for the others.

    Methods (shapes: ``B`` batch, ``L`` history length, ``...`` any leading shape):

    * :meth:`encode_history` (= :meth:`call`): the padded history → rows, masks and the
      requested parts (``"id"`` ``[B, L, 2E]``, ``"mm"`` ``[B, L, D]``);
    * :meth:`behaviour_embedding`: item ⊕ category ID embedding ``[..., 2E]`` from rows;
    * :meth:`short_term_mean`: masked mean over the newest ``short_term_len`` behaviours;
    * :meth:`item_embedding`: raw item ids → ID embedding, multimodal vector, has-one;
    * :meth:`user_attributes` ``[B, user_dim]``, :meth:`item_attributes` ``[..., 2E]``,
      :meth:`user_id_embedding` ``[B, E]``, :meth:`embed` (any used vocabulary);
    * :meth:`embedding_variables`: the trainable ID tables (their own optimizer).

    Args:
      vocabularies: model-side vocabularies (:func:`muse_tf.embeddings.build_vocabularies`),
        as :class:`Vocabulary` or their dict form; those not used are ignored.
      id_embedding_dim: E.
      mm_dim: D, the multimodal embedding size.
      short_term_len: behaviours of :meth:`short_term_mean`.
      use_user_attributes: embed ``user_attr_1..5`` (:meth:`user_attributes`).
      use_item_attributes: embed ``item_attr_1..2`` (:meth:`item_attributes`).
      use_user_id: embed ``user_id`` (:meth:`user_id_embedding`).
      mm_table: optional ``[item rows, D]`` table to load into the frozen table: the int8
        codes by reference (:func:`muse_tf.embeddings.multimodal_codes`, what the models are
        built from), int8 codes by row, or (float storage) L2-normalised float vectors
        (:func:`muse_tf.embeddings.normalised_mm_matrix`); zeros until weights are restored.
      mm_storage_dtype: the frozen table's storage (``int8`` codes + inverse norms, or
        ``float32`` / ``float16`` unit vectors; :class:`FrozenMultimodalTable`).
      embeddings_initializer: initializer of every ID-embedding table.
      embedding_dims: per-vocabulary sizes overriding E (the official code embeds three user
        attributes at E/2); the item and category vocabularies always use E.
    """

    def __init__(self, vocabularies: Mapping[str, Vocabulary | Mapping[str, Any]],
                 id_embedding_dim: int, mm_dim: int = schema.MM_EMBEDDING_DIM,
                 short_term_len: int = schema.SHORT_TERM_LEN, use_user_attributes: bool = True,
                 use_item_attributes: bool = False, use_user_id: bool = False,
                 mm_table: MultimodalCodes | np.ndarray | None = None,
                 mm_storage_dtype: str = "int8",
                 embeddings_initializer: Any = None,
                 embedding_dims: Mapping[str, int] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.id_embedding_dim = _check_positive("id_embedding_dim", id_embedding_dim)
        self.mm_dim = _check_positive("mm_dim", mm_dim)
        self.short_term_len = _check_positive("short_term_len", short_term_len)
        self.use_user_attributes = bool(use_user_attributes)
        self.use_item_attributes = bool(use_item_attributes)
        self.use_user_id = bool(use_user_id)
        used = [schema.ITEM_ID.vocabulary, schema.ITEM_CATEGORY.vocabulary]
        if self.use_user_attributes:
            used += [f.vocabulary for f in schema.USER_ATTRIBUTES]
        if self.use_item_attributes:
            used += [f.vocabulary for f in schema.ITEM_ATTRIBUTES]
        if self.use_user_id:
            used.append(schema.USER_ID.vocabulary)
        missing = [name for name in used if name not in vocabularies]
        if missing:
            raise ValueError(f"FeatureEmbeddings: vocabularies missing for {missing} (given: "
                             f"{sorted(vocabularies)})")
        self.vocabularies = {name: Vocabulary.of(vocabularies[name]) for name in used}
        self.embedding_dims = {str(k): _check_positive(f"embedding_dims[{k!r}]", v)
                               for k, v in dict(embedding_dims or {}).items()}
        fixed = {schema.ITEM_ID.vocabulary, schema.ITEM_CATEGORY.vocabulary}
        bad = sorted(set(self.embedding_dims) & fixed)
        if bad:
            raise ValueError(f"FeatureEmbeddings: embedding_dims may not resize {bad} (behaviours "
                             "and targets share E)")
        self.embeddings_initializer = tf.keras.initializers.get(
            embeddings_initializer or {"class_name": "RandomNormal",
                                       "config": {"stddev": 0.05}})
        self.lookups = {name: IdLookup(v.path, v.vocab_size, v.num_embedded,
                                       name=f"lookup_{name}")
                        for name, v in self.vocabularies.items()}
        self.embeddings = {
            name: tf.keras.layers.Embedding(
                lookup.num_embedded_rows, self.dim_of(name),
                name=f"{EMBEDDING_PREFIX}{name}",
                embeddings_initializer=fresh_initializer(self.embeddings_initializer, i))
            for i, (name, lookup) in enumerate(self.lookups.items())
        }
        for layer in self.embeddings.values():  # every table exists before the first step
            with tf.name_scope(layer.name):
                layer.build(tf.TensorShape([None]))
        self.mm_table = FrozenMultimodalTable(self.item_lookup.num_rows, self.mm_dim,
                                              storage_dtype=mm_storage_dtype,
                                              initial_table=mm_table, name="multimodal_table")
        # Models call the methods below rather than __call__; every weight exists now.
        self.built = True

    # ------------------------------------------------------------------ sizes
    @property
    def item_lookup(self) -> IdLookup:
        return self.lookups[schema.ITEM_ID.vocabulary]

    @property
    def behaviour_dim(self) -> int:
        """``2E``: size of a behaviour's item ⊕ category ID embedding."""
        return 2 * self.id_embedding_dim

    def dim_of(self, vocabulary: str) -> int:
        """The ID-embedding size of ``vocabulary``."""
        return self.embedding_dims.get(vocabulary, self.id_embedding_dim)

    @property
    def user_dim(self) -> int:
        """Size of :meth:`user_attributes` (0 without ``use_user_attributes``)."""
        return sum(self.dim_of(f.vocabulary) for f in schema.USER_ATTRIBUTES) \
            * self.use_user_attributes

    @property
    def item_attribute_dim(self) -> int:
        """Size of :meth:`item_attributes` (0 without ``use_item_attributes``)."""
        return sum(self.dim_of(f.vocabulary) for f in schema.ITEM_ATTRIBUTES) \
            * self.use_item_attributes

    # ------------------------------------------------------------------ lookups
    def _lookup_layer(self, vocabulary: str) -> IdLookup:
        if vocabulary not in self.lookups:
            raise ValueError(f"FeatureEmbeddings: vocabulary {vocabulary!r} is not used by this "
                             f"layer (used: {sorted(self.lookups)}; see the use_* options)")
        return self.lookups[vocabulary]

    def lookup(self, vocabulary: str, ids: tf.Tensor) -> tf.Tensor:
        """Raw int64 ids ``[...]`` → int32 rows ``[...]`` of the trainable ID embedding of
        ``vocabulary`` (0 = padding, 1 = out of vocabulary or rare)."""
        return self._lookup_layer(vocabulary)(ids)

    def embed(self, vocabulary: str, ids: tf.Tensor) -> tf.Tensor:
        """Raw int64 ids ``[...]`` → trainable ID embeddings ``[..., E]``."""
        rows = self.lookup(vocabulary, ids)
        return self.embeddings[vocabulary](rows)

    def behaviour_embedding(self, item_rows: tf.Tensor, category_rows: tf.Tensor) -> tf.Tensor:
        """Item ⊕ category ID embedding ``[..., 2E]`` from rows: ``item_rows`` from
        :meth:`IdLookup.lookup_all` (rare items fall back to the OOV ID row here),
        ``category_rows`` from :meth:`lookup`."""
        item = self.embeddings[schema.ITEM_ID.vocabulary](
            self.item_lookup.embedded_rows(item_rows))
        category = self.embeddings[schema.ITEM_CATEGORY.vocabulary](category_rows)
        return tf.concat([item, category], axis=-1)

    # ------------------------------------------------------------------ history
    def encode_history(self, features: Mapping[str, tf.Tensor],
                       parts: Sequence[str] = HISTORY_PARTS) -> dict[str, tf.Tensor]:
        """The padded history of a batch, encoded.

        Args:
          features: ``hist_item_id``, ``hist_category`` int64 ``[B, L]`` (right-padded) and
            ``hist_len`` int ``[B]`` (clipped to ``L``); other keys are ignored.
          parts: which of ``"id"`` and ``"mm"`` to compute (a search over multimodal rows
            needs neither ``[B, L, ...]`` tensor).

        Returns:
          Always ``"rows"`` int32 ``[B, L]`` (full item rows, the frozen table's index),
          ``"category_rows"`` int32 ``[B, L]``, ``"category"`` int64 ``[B, L]`` (raw ids),
          ``"valid"`` bool ``[B, L]`` and ``"lengths"`` int32 ``[B]``; with ``"id"`` in
          ``parts``: ``"id"`` float32 ``[B, L, 2E]``; with ``"mm"``: ``"mm"`` float32
          ``[B, L, D]`` and ``"mm_valid"`` bool ``[B, L]`` (valid and the item has a
          multimodal embedding).
        """
        unknown = sorted(set(parts) - set(HISTORY_PARTS))
        if unknown:
            raise ValueError(f"FeatureEmbeddings.encode_history: unknown parts {unknown}; "
                             f"known: {list(HISTORY_PARTS)}")
        items = tf.convert_to_tensor(features[schema.HISTORY_ITEM_ID.name])
        categories = tf.convert_to_tensor(features[schema.HISTORY_CATEGORY.name])
        if items.shape.rank != 2 or categories.shape.rank != 2:
            raise ValueError(
                f"FeatureEmbeddings: {schema.HISTORY_ITEM_ID.name} and "
                f"{schema.HISTORY_CATEGORY.name} must be [batch, seq_len], got shapes "
                f"{items.shape} and {categories.shape}")
        lengths = tf.convert_to_tensor(features[schema.HISTORY_LENGTH])
        if lengths.shape.rank != 1:
            raise ValueError(f"FeatureEmbeddings: {schema.HISTORY_LENGTH} must be [batch], got "
                             f"shape {lengths.shape}")
        lengths = tf.minimum(tf.cast(lengths, tf.int32), tf.shape(items)[1])
        valid = history_mask(items, lengths)
        rows = self.item_lookup.lookup_all(items)
        category_rows = self.lookup(schema.ITEM_CATEGORY.vocabulary, categories)
        out = {ROWS: rows, CATEGORY_ROWS: category_rows, CATEGORY: categories, VALID: valid,
               LENGTHS: lengths}
        if ID in parts:
            out[ID] = self.behaviour_embedding(rows, category_rows)
        if MM in parts:
            out[MM] = self.mm_table(rows)
            out[MM_VALID] = valid & self.mm_table.has_embedding(rows)
        return out

    def call(self, features: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return self.encode_history(features)

    def short_term_mean(self, history: Mapping[str, tf.Tensor]) -> tf.Tensor:
        """Masked mean ID embedding of the newest ``short_term_len`` behaviours of an
        :meth:`encode_history` result (with ``"id"``): ``[B, 2E]``, zeros for an empty
        history."""
        if ID not in history:
            raise ValueError("FeatureEmbeddings.short_term_mean needs the history's 'id' part "
                             "(encode_history(features, parts=('id', ...)))")
        positions, in_range = newest_positions(history[LENGTHS], self.short_term_len)
        mask = in_range & tf.gather(history[VALID], positions, batch_dims=1)
        return masked_mean(tf.gather(history[ID], positions, batch_dims=1), mask)

    # ------------------------------------------------------------------ items and users
    def item_embedding(self, item_ids: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """Raw item ids ``[...]`` → (item ID embedding ``[..., E]``, multimodal vector
        ``[..., D]``, has-embedding bool ``[...]``)."""
        rows = self.item_lookup.lookup_all(item_ids)
        id_vectors = self.embeddings[schema.ITEM_ID.vocabulary](
            self.item_lookup.embedded_rows(rows))
        return id_vectors, self.mm_table(rows), self.mm_table.has_embedding(rows)

    def user_attributes(self, features: Mapping[str, tf.Tensor]) -> tf.Tensor:
        """User attribute ID embeddings, concatenated in schema order: ``[B, user_dim]``
        (``[B, 0]`` without ``use_user_attributes``)."""
        if not self.use_user_attributes:
            batch = tf.shape(features[schema.HISTORY_LENGTH])[0]
            return tf.zeros(tf.stack([batch, 0]), tf.float32)
        return tf.concat([self.embed(f.vocabulary, features[f.name])
                          for f in schema.USER_ATTRIBUTES], axis=-1)

    def item_attributes(self, features_or_candidates: Mapping[str, tf.Tensor]) -> tf.Tensor:
        """Item attribute ID embeddings of a batch (``item_attr_*`` ``[B]``) or of candidates
        (``[B, C]``), concatenated in schema order: ``[..., 2E]`` (``[..., 0]`` without
        ``use_item_attributes``)."""
        if not self.use_item_attributes:
            ids = tf.convert_to_tensor(features_or_candidates[schema.ITEM_ID.name])
            return tf.zeros(tf.concat([tf.shape(ids), [0]], axis=0), tf.float32)
        return tf.concat([self.embed(f.vocabulary, features_or_candidates[f.name])
                          for f in schema.ITEM_ATTRIBUTES], axis=-1)

    def user_id_embedding(self, features: Mapping[str, tf.Tensor]) -> tf.Tensor:
        """The user-id ID embedding ``[B, E]`` (needs ``use_user_id``)."""
        if not self.use_user_id:
            raise ValueError("FeatureEmbeddings: user_id_embedding needs use_user_id=True")
        return self.embed(schema.USER_ID.vocabulary, features[schema.USER_ID.name])

    def embedding_variables(self) -> list[tf.Variable]:
        """The trainable ID-embedding tables (trained with their own learning rate)."""
        return [v for layer in self.embeddings.values() for v in layer.trainable_variables]

    def get_config(self) -> dict[str, Any]:
        # The frozen table is a weight: it travels in checkpoints, not in the config.
        return {**super().get_config(),
                "vocabularies": {n: dataclasses.asdict(v) for n, v in self.vocabularies.items()},
                "id_embedding_dim": self.id_embedding_dim, "mm_dim": self.mm_dim,
                "mm_storage_dtype": self.mm_table.storage_dtype,
                "short_term_len": self.short_term_len,
                "use_user_attributes": self.use_user_attributes,
                "use_item_attributes": self.use_item_attributes,
                "use_user_id": self.use_user_id,
                "embeddings_initializer":
                    tf.keras.initializers.serialize(self.embeddings_initializer),
                "embedding_dims": dict(self.embedding_dims)}
