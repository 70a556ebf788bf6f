"""MISS tree retrieval (arXiv 2508.14515): a (user, tree node) scorer and its beam-search index.

MISS retrieves items by walking a multimodal index tree (:class:`~muse_tf.index.tree.IndexTree`)
top-down with a learned (user, node) scorer. This module holds:

* :class:`RetrievalFeatures`: raw ids → ID embeddings, the frozen multimodal vectors and the
  history masks, shared by MISS and the two-tower baseline (the same history features, so the
  comparison is fair);
* :class:`MissNodeScorer`: the scorer. For a user and ``M`` tree nodes at once::

      e_n  = E_node[n]                                 learned node embedding   [B, M, 2E]
      v_n  = normalise(mean of the node's leaves' normalised SCL vectors)        [B, M, D]
      Co-GSU: top-K/2 behaviours by  <e_n, e_i>        (ID embedding item ⊕ category)
      MM-GSU: top-K/2 behaviours by  cos(v_n, m_i)     (frozen SCL vectors, items with one)
      ESU:    o_n = TA(query = e_n, keys = ID embeddings of the K selected behaviours)
      logit(u, n) = MLP([e_n, o_n, e_n ⊙ s_u, GSU scores, user attributes, s_u])

  with ``s_u`` the masked mean ID embedding of the newest ``short_term_len`` behaviours. The
  node axis is explicit: histories are encoded once per user (:meth:`encode_user`) and every
  similarity is one ``einsum('bmd,bld->bml')`` with the top-K over the last axis; the history is
  never tiled ``M`` times.
* :func:`training_nodes`: TDM-style training targets for clicked items (positives = ancestors
  at levels ``1 .. depth``, negatives = random nodes of the same level);
* :class:`MissTreeIndex`: the layer-wise beam search (:func:`~muse_tf.index.beam_search.
  tree_beam_search`) over a trained scorer: ``call(features, k) -> (scores, item_ids)``, the
  query interface of the TFRS top-k layers. Stock TensorFlow ops only, so it exports for TF
  Serving (:mod:`muse_tf.export.retrieval`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs

from muse_tf import schema
from muse_tf.config import ModelConfig
from muse_tf.embeddings import FrozenMultimodalTable, IdLookup, Vocabulary
from muse_tf.embeddings.arrays import in_sorted, normalise_rows
from muse_tf.index.beam_search import BeamSearchResult, TreeTensors, tree_beam_search
from muse_tf.index.tree import IndexTree
from muse_tf.layers import IdEmbeddingGSU, MLPTower, MultimodalGSU, TargetAttention
from muse_tf.layers.masking import history_mask, masked_mean, newest_positions

__all__ = [
    "NODE_IDS",
    "NODE_LABELS",
    "QUERY_FEATURES",
    "MissNodeScorer",
    "MissTreeIndex",
    "RetrievalFeatures",
    "in_index",
    "masked_mean",
    "normalise_rows",
    "training_nodes",
]

#: Input keys of the scorer beside the schema features: node ids int32 [B, M] and, for the
#: loss, 0/1 labels float32 [B, M].
NODE_IDS = "node_ids"
NODE_LABELS = "node_labels"

#: Raw features a retrieval query needs (user side + padded history + its length).
QUERY_FEATURES: tuple[str, ...] = schema.QUERY_FEATURES


#: Kept for callers of the first version: membership in a sorted id array.
in_index = in_sorted


def training_nodes(
    tree: IndexTree, item_ids: np.ndarray, negatives_per_level: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """TDM-style (node, label) targets of clicked items for the MISS scorer.

    For each item: its ancestors at levels ``1 .. depth`` (the root is left out: it is every
    item's ancestor and carries no signal) are positives, and ``negatives_per_level`` nodes
    drawn uniformly, with replacement, from the other item-holding nodes of the same level
    (:meth:`IndexTree.sample_negatives`) are negatives.

    Args:
      tree: the index tree (``depth >= 1``).
      item_ids: int ``[Q]`` clicked item ids, all in the tree (see :func:`in_index`).
      negatives_per_level: negatives per positive node (>= 1).
      rng: NumPy random generator.

    Returns:
      ``(nodes, labels)``: int32 and float32 ``[Q, depth * (1 + negatives_per_level)]``; level
      ``l`` occupies columns ``(l - 1) * (1 + n) .. l * (1 + n) - 1``, positive first.
    """
    if tree.depth < 1:
        raise ValueError(f"the tree holds {tree.num_items} item(s) (depth 0): nothing to learn; "
                         "MISS needs at least two items with a multimodal embedding")
    item_ids = np.asarray(item_ids, dtype=np.int64).reshape(-1)
    positives = tree.ancestors(item_ids)                              # [Q, depth]
    negatives = tree.sample_negatives(positives, negatives_per_level, rng)  # [Q, depth, n]
    nodes = np.concatenate([positives[..., None], negatives], axis=-1)
    labels = np.zeros(nodes.shape, np.float32)
    labels[..., 0] = 1.0
    width = tree.depth * (1 + negatives_per_level)
    return (nodes.reshape(len(item_ids), width).astype(np.int32),
            labels.reshape(len(item_ids), width))


def _vocab_config(vocabulary: Vocabulary | Mapping[str, Any]) -> Vocabulary:
    if isinstance(vocabulary, Vocabulary):
        return vocabulary
    return Vocabulary(**dict(vocabulary))


@tf.keras.utils.register_keras_serializable(package="muse_tf")
class RetrievalFeatures(tf.keras.layers.Layer):
    """Raw ids → the embeddings both retrieval models read (MISS scorer and two-tower).

    Mirrors the ranking model's conventions: ``IdLookup`` per vocabulary (raw int64 ids, the
    vocabulary files travel as SavedModel assets), trainable ID embeddings of size
    ``E = id_embedding_dim`` (a behaviour is ``item ⊕ category``, ``2E``), the frozen
    L2-normalised multimodal (SCL) table, and the history mask ``position < hist_len and
    id != 0``.

    :meth:`call` (= :meth:`encode_history`) maps ``{hist_item_id, hist_category: int64 [B, L],
    hist_len: int32 [B]}`` to ``{"id": [B, L, 2E], "mm": [B, L, D], "valid": bool [B, L],
    "mm_valid": bool [B, L], "lengths": int32 [B]}`` (``mm_valid``: valid and the item has a
    multimodal embedding).

    Args:
      vocabularies: model-side vocabularies (:func:`muse_tf.embeddings.build_vocabularies`),
        as :class:`Vocabulary` or their dict form.
      id_embedding_dim: E.
      mm_dim: D, the multimodal embedding size.
      short_term_len: behaviours of the short-term summary :meth:`short_term_mean`.
      use_user_attributes: whether :meth:`user_attributes` embeds ``user_attr_1..5``.
      mm_table: optional ``[item rows, D]`` normalised table
        (:func:`muse_tf.embeddings.normalised_mm_matrix`); zeros until weights are restored.
    """

    def __init__(self, vocabularies: Mapping[str, Vocabulary | Mapping[str, Any]],
                 id_embedding_dim: int, mm_dim: int = schema.MM_EMBEDDING_DIM,
                 short_term_len: int = schema.SHORT_TERM_LEN, use_user_attributes: bool = True,
                 mm_table: np.ndarray | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        vocabs = {name: _vocab_config(v) for name, v in vocabularies.items()}
        missing = sorted(set(schema.vocabularies()) - set(vocabs))
        if missing:
            raise ValueError(f"RetrievalFeatures: vocabularies missing for {missing}")
        for name, value in (("id_embedding_dim", id_embedding_dim), ("mm_dim", mm_dim),
                            ("short_term_len", short_term_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RetrievalFeatures: `{name}` must be a positive int, "
                                 f"got {value!r}")
        self.vocabularies = vocabs
        self.id_embedding_dim = id_embedding_dim
        self.mm_dim = mm_dim
        self.short_term_len = short_term_len
        self.use_user_attributes = bool(use_user_attributes)
        # Only the vocabularies a retrieval query reads (not user ids or item attributes: no
        # lookup table, embedding or vocabulary asset for them).
        used = [schema.ITEM_ID.vocabulary, schema.ITEM_CATEGORY.vocabulary]
        if self.use_user_attributes:
            used += [f.vocabulary for f in schema.USER_ATTRIBUTES]
        self.lookups = {name: IdLookup(vocabs[name].path, vocabs[name].vocab_size,
                                       vocabs[name].num_embedded, name=f"lookup_{name}")
                        for name in used}
        self.embeddings = {
            name: tf.keras.layers.Embedding(
                lookup.num_embedded_rows, id_embedding_dim, name=f"id_embedding_{name}",
                embeddings_initializer=tf.keras.initializers.RandomNormal(stddev=0.05))
            for name, lookup in self.lookups.items()
        }
        self.mm_table = FrozenMultimodalTable(self.item_lookup.num_rows, mm_dim,
                                              initial_table=mm_table, name="multimodal_table")
        # Every weight exists now (the embeddings build on first use); callers use the methods
        # below rather than __call__, so mark the layer built for SavedModel serialization.
        self.built = True

    @property
    def item_lookup(self) -> IdLookup:
        return self.lookups[schema.ITEM_ID.vocabulary]

    @property
    def behaviour_dim(self) -> int:
        """``2E``: size of a behaviour's item ⊕ category ID embedding."""
        return 2 * self.id_embedding_dim

    @property
    def user_dim(self) -> int:
        """Size of :meth:`user_attributes`."""
        return len(schema.USER_ATTRIBUTES) * self.id_embedding_dim * self.use_user_attributes

    def _embed(self, vocabulary: str, rows: tf.Tensor) -> tf.Tensor:
        return self.embeddings[vocabulary](rows)

    def behaviour_embedding(self, item_rows: tf.Tensor, category_rows: tf.Tensor) -> tf.Tensor:
        """Item ⊕ category ID embedding ``[..., 2E]`` from lookup rows (``item_rows`` from
        :meth:`IdLookup.lookup_all`; rare items fall back to the OOV ID row here)."""
        return tf.concat([
            self._embed(schema.ITEM_ID.vocabulary, self.item_lookup.embedded_rows(item_rows)),
            self._embed(schema.ITEM_CATEGORY.vocabulary, category_rows)], axis=-1)

    def encode_history(self, features: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        items = tf.convert_to_tensor(features[schema.HISTORY_ITEM_ID.name])
        categories = tf.convert_to_tensor(features[schema.HISTORY_CATEGORY.name])
        if items.shape.rank != 2 or categories.shape.rank != 2:
            raise ValueError(
                f"RetrievalFeatures: {schema.HISTORY_ITEM_ID.name} and "
                f"{schema.HISTORY_CATEGORY.name} must be [batch, seq_len], got shapes "
                f"{items.shape} and {categories.shape}")
        lengths = tf.convert_to_tensor(features[schema.HISTORY_LENGTH])
        if lengths.shape.rank != 1:
            raise ValueError(f"RetrievalFeatures: {schema.HISTORY_LENGTH} must be [batch], got "
                             f"shape {lengths.shape}")
        lengths = tf.minimum(tf.cast(lengths, tf.int32), tf.shape(items)[1])
        valid = history_mask(items, lengths)
        rows = self.item_lookup.lookup_all(items)
        category_rows = self.lookups[schema.ITEM_CATEGORY.vocabulary](categories)
        return {
            "rows": rows,
            "id": self.behaviour_embedding(rows, category_rows),
            "mm": self.mm_table(rows),
            "valid": valid,
            "mm_valid": valid & self.mm_table.has_embedding(rows),
            "lengths": lengths,
        }

    def call(self, features: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return self.encode_history(features)

    def user_attributes(self, features: Mapping[str, tf.Tensor]) -> tf.Tensor:
        """User attribute ID embeddings, concatenated: ``[B, 5E]`` (``[B, 0]`` when unused)."""
        if not self.use_user_attributes:
            batch = tf.shape(features[schema.HISTORY_LENGTH])[0]
            return tf.zeros(tf.stack([batch, 0]), tf.float32)
        parts = [self._embed(f.vocabulary, self.lookups[f.vocabulary](features[f.name]))
                 for f in schema.USER_ATTRIBUTES]
        return tf.concat(parts, axis=-1)

    def short_term_mean(self, history: Mapping[str, tf.Tensor]) -> tf.Tensor:
        """Masked mean ID embedding of the newest ``short_term_len`` behaviours: ``[B, 2E]``
        (zeros for an empty history)."""
        positions, in_range = newest_positions(history["lengths"], self.short_term_len)
        mask = in_range & tf.gather(history["valid"], positions, batch_dims=1)
        vectors = tf.gather(history["id"], positions, batch_dims=1)
        return masked_mean(vectors, mask)

    def item_embedding(self, item_ids: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """Raw item ids ``[...]`` → (item ID embedding ``[..., E]``, multimodal vector
        ``[..., D]``, has-embedding bool ``[...]``)."""
        rows = self.item_lookup.lookup_all(item_ids)
        id_vectors = self._embed(schema.ITEM_ID.vocabulary, self.item_lookup.embedded_rows(rows))
        return id_vectors, self.mm_table(rows), self.mm_table.has_embedding(rows)

    def embedding_variables(self) -> list[tf.Variable]:
        """Trainable ID-embedding tables (trained with their own learning rate)."""
        return [v for layer in self.embeddings.values() for v in layer.trainable_variables]

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(),
                "vocabularies": {n: dataclasses.asdict(v) for n, v in self.vocabularies.items()},
                "id_embedding_dim": self.id_embedding_dim, "mm_dim": self.mm_dim,
                "short_term_len": self.short_term_len,
                "use_user_attributes": self.use_user_attributes}


class MissNodeScorer(tfrs.models.Model):
    """The MISS (user, tree node) scorer (module docstring; MISS paper, Sec. 3.3).

    Inputs of :meth:`call`: the reader's features (only the :data:`QUERY_FEATURES` are read)
    and ``node_ids`` int32 ``[B, M]``. Output: logits float32 ``[B, M]`` (higher = the user is
    more likely to want an item under the node). :meth:`compute_loss` adds ``node_labels``
    float32 ``[B, M]`` (1 = ancestor of the clicked item) and returns the binary cross-entropy
    averaged over all ``B * M`` (user, node) pairs (:class:`tfrs.tasks.Ranking`).

    Args:
      config: the model section of the experiment: ``id_embedding_dim`` (E), ``top_k`` (K,
        split ``K // 2`` Co-GSU + the rest MM-GSU as the ranking model's ``miss`` GSU),
        ``short_term_len``, ``num_heads``/``head_dim`` of the ESU, ``tower_units``,
        ``tower_activation``, ``dropout``, ``use_user_attributes``.
      vocabularies: model-side vocabularies.
      node_vectors: ``[num_nodes, D]`` tree node vectors (:attr:`IndexTree.node_vectors`: the
        mean of each node's leaves' normalised embeddings); re-normalised here so the MM-GSU
        similarity is a cosine.
      mm_table: ``[item rows, D]`` normalised multimodal table, or ``None`` to restore.
      mm_dim: D.
    """

    def __init__(self, config: ModelConfig, vocabularies: Mapping[str, Vocabulary],
                 node_vectors: np.ndarray, mm_table: np.ndarray | None = None,
                 mm_dim: int = schema.MM_EMBEDDING_DIM, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if config.top_k < 2:
            raise ValueError(f"MISS needs model.top_k >= 2 (K/2 behaviours per GSU), got "
                             f"{config.top_k}")
        node_vectors = np.asarray(node_vectors)
        if node_vectors.ndim != 2 or node_vectors.shape[1] != mm_dim:
            raise ValueError(f"node_vectors must be [num_nodes, mm_dim={mm_dim}], got shape "
                             f"{node_vectors.shape}")
        self.config = config
        self.num_nodes = int(node_vectors.shape[0])
        self.features = RetrievalFeatures(
            vocabularies, config.id_embedding_dim, mm_dim=mm_dim,
            short_term_len=config.short_term_len,
            use_user_attributes=config.use_user_attributes, mm_table=mm_table,
            name="features")
        node_dim = self.features.behaviour_dim
        self.node_embedding = tf.keras.layers.Embedding(
            self.num_nodes, node_dim, name="node_embedding",
            embeddings_initializer=tf.keras.initializers.RandomNormal(stddev=0.05))
        normalised = normalise_rows(node_vectors)
        self.node_mm = self.add_weight(
            name="node_multimodal", shape=normalised.shape, dtype=tf.float32,
            initializer=tf.constant_initializer(normalised), trainable=False)
        co_k = config.top_k // 2
        self.co_gsu = IdEmbeddingGSU(co_k, name="co_gsu")
        self.mm_gsu = MultimodalGSU(config.top_k - co_k, name="mm_gsu")
        self.attention = TargetAttention(config.num_heads, config.head_dim,
                                         key_dim=node_dim, name="esu_target_attention")
        self.tower = MLPTower(config.tower_units, activation=config.tower_activation,
                              dropout=config.dropout, name="tower")
        self.task = tfrs.tasks.Ranking(
            loss=tf.keras.losses.BinaryCrossentropy(from_logits=True),
            metrics=[tf.keras.metrics.AUC(from_logits=True, name="auc")])

    # ------------------------------------------------------------------ forward
    def encode_user(self, features: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """Node-independent user tensors, computed once per user (not once per node)."""
        user = self.features.encode_history(features)
        user["short"] = self.features.short_term_mean(user)                 # [B, 2E]
        user["attributes"] = self.features.user_attributes(features)        # [B, 5E]
        return user

    def score_nodes(self, user: Mapping[str, tf.Tensor], node_ids: tf.Tensor,
                    training: bool = False) -> tf.Tensor:
        """Logits ``[B, M]`` of the user tensors of :meth:`encode_user` for ``node_ids``
        int ``[B, M]``."""
        node_ids = tf.convert_to_tensor(node_ids)
        if node_ids.shape.rank != 2:
            raise ValueError(f"MissNodeScorer: {NODE_IDS} must be [batch, nodes], got shape "
                             f"{node_ids.shape}")
        node_ids = tf.cast(node_ids, tf.int32)
        tf.debugging.assert_less(node_ids, self.num_nodes,
                                 message=f"{NODE_IDS} must be < num_nodes={self.num_nodes}")
        tf.debugging.assert_non_negative(node_ids, message=f"{NODE_IDS} must be >= 0")
        node_emb = self.node_embedding(node_ids)                            # [B, M, 2E]
        node_mm = tf.gather(self.node_mm, node_ids)                         # [B, M, D]
        co = self.co_gsu(node_emb, user["id"], user["valid"])               # [B, M, Kc]
        mm = self.mm_gsu(node_mm, user["mm"], user["mm_valid"])             # [B, M, Km]
        indices = tf.concat([co["indices"], mm["indices"]], axis=-1)        # [B, M, K]
        selected = tf.concat([co["mask"], mm["mask"]], axis=-1)
        keys = tf.gather(user["id"], indices, batch_dims=1)                 # [B, M, K, 2E]

        num_nodes = tf.shape(node_ids)[1]
        batch = tf.shape(node_ids)[0]
        top_k = self.config.top_k
        node_dim = self.features.behaviour_dim
        flat_query = tf.reshape(node_emb, [-1, node_dim])
        esu = self.attention(flat_query, tf.reshape(keys, [-1, top_k, node_dim]),
                             tf.reshape(selected, [-1, top_k]))             # [B*M, H*d]

        def per_node_user(tensor: tf.Tensor) -> tf.Tensor:
            # [B, F] -> [B*M, F] by broadcasting; only the small user vectors are repeated.
            return tf.reshape(tf.repeat(tensor[:, tf.newaxis, :], num_nodes, axis=1),
                              [-1, tensor.shape[-1]])

        short = per_node_user(user["short"])
        parts = [flat_query, esu, flat_query * short,
                 tf.reshape(co["scores"], [-1, co["scores"].shape[-1]]),
                 tf.reshape(mm["scores"], [-1, mm["scores"].shape[-1]]), short]
        if self.features.user_dim:
            parts.append(per_node_user(user["attributes"]))
        logits = self.tower(tf.concat(parts, axis=-1), training=training)  # [B*M, 1]
        return tf.reshape(logits, tf.stack([batch, num_nodes]))

    def call(self, inputs: Mapping[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        if NODE_IDS not in inputs:
            raise ValueError(f"MissNodeScorer: inputs need {NODE_IDS!r} (int32 [batch, nodes]); "
                             f"got keys {sorted(inputs)}")
        return self.score_nodes(self.encode_user(inputs), inputs[NODE_IDS], training=training)

    # ------------------------------------------------------------------ training
    def compute_loss(self, inputs: Mapping[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        if NODE_LABELS not in inputs:
            raise ValueError(f"MissNodeScorer.compute_loss: inputs need {NODE_LABELS!r} "
                             f"(float32 [batch, nodes]); got keys {sorted(inputs)}")
        logits = self(inputs, training=training)
        labels = tf.cast(inputs[NODE_LABELS], tf.float32)
        return self.task(labels=tf.reshape(labels, [-1, 1]),
                         predictions=tf.reshape(logits, [-1, 1]), training=training)

    def embedding_variables(self) -> list[tf.Variable]:
        """ID and node embeddings (their own learning rate, as the ranking model)."""
        return [*self.features.embedding_variables(), *self.node_embedding.trainable_variables]


class MissTreeIndex(tf.Module):
    """Layer-wise beam search of a trained :class:`MissNodeScorer` over its index tree.

    Same query interface as the TFRS top-k layers: ``call(features, k) -> (scores, item_ids)``
    (float32 / int64 ``[B, k]``, best first). The user is encoded once; each searched level
    scores its ``M`` candidate nodes with one :meth:`MissNodeScorer.score_nodes` call
    (``M = 2**start_level`` at the first level, ``2 * beam_width`` below it).

    Args:
      scorer: the trained scorer (its node tables index ``tree``'s nodes).
      tree: the index tree the scorer was trained on.
      beam_width: nodes kept per level.
      top_n: items returned by default (``k`` of :meth:`call` may not exceed it).
      start_level: first level scored in full (default: the first with more than
        ``beam_width`` nodes, see :func:`tree_beam_search`).
    """

    def __init__(self, scorer: MissNodeScorer, tree: IndexTree, beam_width: int, top_n: int,
                 start_level: int | None = None, name: str = "miss_tree_index") -> None:
        super().__init__(name=name)
        if scorer.num_nodes != tree.num_nodes:
            raise ValueError(f"the scorer has {scorer.num_nodes} node rows but the tree has "
                             f"{tree.num_nodes} nodes: it was trained on another tree")
        self.scorer = scorer
        self.tree_tensors = TreeTensors.from_tree(tree, include_vectors=False)
        self.beam_width = int(beam_width)
        self.top_n = int(top_n)
        self.start_level = start_level
        self.depth = tree.depth

    @property
    def levels(self) -> tuple[int, ...]:
        """The tree levels the beam search scores, ``start_level .. depth`` (static)."""
        start = self.start_level
        if start is None:
            start = next((level for level in range(self.depth + 1)
                          if self.tree_tensors.num_valid_nodes(level) > self.beam_width),
                         self.depth)
        return tuple(range(start, self.depth + 1))

    def search(self, features: Mapping[str, tf.Tensor],
               top_n: int | None = None) -> BeamSearchResult:
        """The full beam-search result (kept nodes per level included)."""
        user = self.scorer.encode_user(features)
        batch = tf.shape(features[schema.HISTORY_LENGTH])[0]
        return tree_beam_search(
            lambda nodes: self.scorer.score_nodes(user, nodes, training=False),
            self.tree_tensors, self.beam_width, top_n or self.top_n, self.start_level,
            batch_size=batch)

    def call(self, features: Mapping[str, tf.Tensor],
             k: int | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        k = self.top_n if k is None else int(k)
        if not 1 <= k <= self.top_n:
            raise ValueError(f"k={k} must be in [1, top_n={self.top_n}]")
        result = self.search(features, self.top_n)
        return result.scores[:, :k], result.item_ids[:, :k]

    def __call__(self, features: Mapping[str, tf.Tensor],
                 k: int | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        return self.call(features, k)
