"""MISS tree retrieval (arXiv 2508.14515): a (user, tree node) scorer and its beam-search index.

MISS retrieves items by walking a multimodal index tree (:class:`~muse_tf.index.tree.IndexTree`)
top-down with a learned (user, node) scorer. This module holds:

* :class:`MissNodeScorer`: the scorer. For a user and ``M`` tree nodes at once::

      e_n  = E_node[n]                                 learned node embedding   [B, M, 2E]
      v_n  = normalise(mean of the node's leaves' normalised SCL vectors)        [B, M, D]
      GSU:    CoMultimodalGSU: top-K/2 behaviours by <e_n, e_i> (ID embedding item ⊕
              category), then top-K/2 others by cos(v_n, m_i) (frozen SCL vectors)
      ESU:    o_n = TA(query = e_n, keys = ID embeddings of the K selected behaviours)
      logit(u, n) = MLP([e_n, o_n, e_n ⊙ s_u, GSU scores, s_u, user attributes])

  with ``s_u`` the masked mean ID embedding of the newest ``short_term_len`` behaviours. The
  node axis is explicit: histories are encoded once per user (:meth:`encode_user`: the ID
  embeddings, ``s_u``, the user attributes and the GSU's search keys, i.e. the ID embeddings
  and the dequantised unit SCL vectors with the behaviour mask folded in as a ``0 / -inf``
  column, :meth:`CoMultimodalGSU.encode_history`), and each search is then one ``[B, M, L]``
  matrix product with the top-K over the last axis; the history is never tiled ``M`` times
  nor re-read from the multimodal table per call. Features come from one
  :class:`~muse_tf.embeddings.feature_embeddings.FeatureEmbeddings` (as the two-tower's).
* :class:`TrainingNodes`: TDM-style training targets of clicked items in TF ops (they run
  inside the tf.data pipeline): positives = ancestors at levels ``1 .. depth``, negatives =
  random nodes of the same level;
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
from muse_tf.embeddings import MultimodalCodes, Vocabulary
from muse_tf.embeddings.arrays import normalise_rows
from muse_tf.embeddings.feature_embeddings import VALID, FeatureEmbeddings
from muse_tf.index.beam_search import BeamSearchResult, TreeTensors, tree_beam_search
from muse_tf.index.tree import IndexTree
from muse_tf.layers import CoMultimodalGSU, MLPTower, TargetAttention
from muse_tf.layers.co_multimodal_gsu import SEARCH_KEYS
from muse_tf.layers.search_unit import ID, MM, ROWS
from muse_tf.layers.topk import INDICES, MASK, SCORES
from muse_tf.training.step import TwoOptimizerModel

__all__ = [
    "NODE_IDS",
    "NODE_LABELS",
    "QUERY_FEATURES",
    "MissNodeScorer",
    "MissTreeIndex",
    "TrainingNodes",
]

#: Input keys of the scorer beside the schema features: node ids int32 [B, M] and, for the
#: loss, 0/1 labels float32 [B, M].
NODE_IDS = "node_ids"
NODE_LABELS = "node_labels"

#: Raw features a retrieval query needs (user side + padded history + its length).
QUERY_FEATURES: tuple[str, ...] = schema.QUERY_FEATURES


class TrainingNodes:
    """TDM-style (node, label) training targets of clicked items, in TF ops.

    For each item: its ancestors at levels ``1 .. depth`` (the root is left out: it is every
    item's ancestor and carries no signal) are positives, and ``negatives_per_level`` nodes
    drawn uniformly, with replacement, from the other item-holding nodes of the same level are
    negatives (the distribution of :meth:`IndexTree.ancestors` +
    :meth:`IndexTree.sample_negatives`). Stateless random ops: the same ``(item ids, seed)``
    always give the same nodes, so a tf.data pipeline that maps it over
    ``(batch, step counter)`` is deterministic.

    Call: ``(item_ids int64 [Q], seed int [2]) -> (nodes int32 [Q, W], labels float32 [Q,
    W])`` with ``W = depth * (1 + negatives_per_level)``; level ``l`` occupies columns
    ``(l - 1) * (1 + n) .. l * (1 + n) - 1``, positive first. Every id must be in the tree
    (:meth:`contains`; an unknown id fails an assertion).

    Args:
      tree: the index tree (``depth >= 1``).
      negatives_per_level: negatives per positive node (>= 1).
    """

    def __init__(self, tree: IndexTree, negatives_per_level: int) -> None:
        if tree.depth < 1:
            raise ValueError(f"the tree holds {tree.num_items} item(s) (depth 0): nothing to "
                             "learn; MISS needs at least two items with a multimodal embedding")
        if (isinstance(negatives_per_level, bool)
                or not isinstance(negatives_per_level, int | np.integer)
                or negatives_per_level < 1):
            raise ValueError(f"retrieval.negatives_per_level must be an int >= 1, got "
                             f"{negatives_per_level!r}")
        self.depth = int(tree.depth)
        self.negatives_per_level = int(negatives_per_level)
        self.width = self.depth * (1 + self.negatives_per_level)
        valid_leaves = np.asarray(tree.valid_leaf_nodes, np.int64)   # ascending
        levels = np.arange(1, self.depth + 1, dtype=np.int64)
        self._levels = tf.constant(levels)
        self._first = tf.constant((1 << levels) - 1)
        # Candidates per level: every node above the leaves, the items at the leaf level.
        self._size = tf.constant(np.where(levels < self.depth, 1 << levels, tree.num_items))
        self._item_leaf = tf.constant(np.asarray(tree.item_leaf, np.int64))
        self._leaf_rank = tf.constant(np.searchsorted(valid_leaves, tree.item_leaf))
        self._valid_leaves = tf.constant(valid_leaves)
        self._positions = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                tf.constant(np.asarray(tree.item_ids, np.int64)),
                tf.range(tree.num_items, dtype=tf.int64)), default_value=-1)

    def contains(self, item_ids: tf.Tensor) -> tf.Tensor:
        """bool (shape of ``item_ids``): which raw item ids the tree holds."""
        return self._positions.lookup(tf.convert_to_tensor(item_ids, tf.int64)) >= 0

    def __call__(self, item_ids: tf.Tensor, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        ids = tf.reshape(tf.convert_to_tensor(item_ids, tf.int64), [-1])
        positions = self._positions.lookup(ids)
        check = tf.debugging.assert_non_negative(
            positions, message="TrainingNodes: item ids not in the tree (filter clicks on "
                               "TrainingNodes.contains first)")
        with tf.control_dependencies([check]):
            positions = tf.identity(positions)
        leaf = tf.gather(self._item_leaf, positions)                            # [Q]
        shifts = self.depth - self._levels
        positives = tf.bitwise.right_shift(leaf[:, None] + 1, shifts[None, :]) - 1  # [Q, depth]
        # Rank of the positive among its level's candidates; draw among the others.
        rank = tf.concat([positives[:, :-1] - self._first[None, :-1],
                          tf.gather(self._leaf_rank, positions)[:, None]], axis=1)
        n = self.negatives_per_level
        uniform = tf.random.stateless_uniform(tf.stack([tf.size(ids), self.depth, n]),
                                              seed=seed, dtype=tf.float64)
        others = self._size - 1                                                 # [depth]
        draws = tf.cast(tf.floor(uniform * tf.cast(others, tf.float64)[None, :, None]),
                        tf.int64)
        draws = tf.minimum(draws, others[None, :, None] - 1)
        draws += tf.cast(draws >= rank[..., None], tf.int64)                   # [Q, depth, n]
        inner = self._first[None, :-1, None] + draws[:, :-1]
        leaves = tf.gather(self._valid_leaves, draws[:, -1:])
        nodes = tf.concat([positives[..., None], tf.concat([inner, leaves], axis=1)], axis=-1)
        labels = tf.tile(tf.one_hot([0], 1 + n, dtype=tf.float32), [self.depth, 1])
        labels = tf.broadcast_to(tf.reshape(labels, [1, self.width]),
                                 tf.stack([tf.size(ids), self.width]))
        return tf.cast(tf.reshape(nodes, [-1, self.width]), tf.int32), labels


@tf.keras.utils.register_keras_serializable(package="muse_tf")
class MissNodeScorer(TwoOptimizerModel):
    """The MISS (user, tree node) scorer (module docstring; MISS paper, Sec. 3.3).

    Inputs of :meth:`call`: the reader's features (only the :data:`QUERY_FEATURES` are read)
    and ``node_ids`` int32 ``[B, M]``. Output: logits float32 ``[B, M]`` (higher = the user is
    more likely to want an item under the node). :meth:`compute_loss` adds ``node_labels``
    float32 ``[B, M]`` (1 = ancestor of the clicked item) and returns the binary cross-entropy
    **averaged over the global batch's (user, node) pairs**: this replica's summed loss over
    ``global batch * M`` (:class:`~muse_tf.training.step.TwoOptimizerModel`'s convention; on
    one device the mean over the batch's ``B * M`` pairs). Logged metric: ``auc`` over the
    (user, node) pairs.

    Trained by ``fit`` with two optimizers (:meth:`embedding_variables`: the ID and node
    embeddings). :meth:`get_config` / :meth:`from_config` rebuild it; the frozen multimodal
    table and the node vectors are weights (zeros in a rebuilt scorer until its weights are
    loaded).

    Args:
      config: the model section of the experiment: ``id_embedding_dim`` (E), ``top_k`` (K,
        split ``K // 2`` Co-GSU + the rest MM-GSU as the ranking model's ``miss`` GSU),
        ``short_term_len``, ``num_heads``/``head_dim`` of the ESU, ``tower_units``,
        ``tower_activation``, ``dropout``, ``use_user_attributes``.
      vocabularies: model-side vocabularies (or their dict form).
      node_vectors: ``[num_nodes, D]`` tree node vectors (:attr:`IndexTree.node_vectors`: the
        mean of each node's leaves' normalised embeddings); re-normalised here so the MM-GSU
        similarity is a cosine. ``None`` to restore them from weights (give ``num_nodes``).
      mm_table: the ``[item rows, D]`` frozen multimodal table to load (``ItemTables.mm_table``:
        int8 codes by reference; see :class:`~muse_tf.embeddings.FrozenMultimodalTable`), or
        ``None`` to restore it. Stored as ``config.mm_storage_dtype``.
      mm_dim: D.
      num_nodes: node rows when ``node_vectors`` is None.
    """

    def __init__(self, config: ModelConfig, vocabularies: Mapping[str, Vocabulary | dict],
                 node_vectors: np.ndarray | None = None,
                 mm_table: MultimodalCodes | np.ndarray | None = None,
                 mm_dim: int = schema.MM_EMBEDDING_DIM, num_nodes: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if config.top_k < 2:
            raise ValueError(f"MISS needs model.top_k >= 2 (K/2 behaviours per GSU), got "
                             f"{config.top_k}")
        if node_vectors is not None:
            node_vectors = np.asarray(node_vectors)
            if node_vectors.ndim != 2 or node_vectors.shape[1] != mm_dim:
                raise ValueError(f"node_vectors must be [num_nodes, mm_dim={mm_dim}], got shape "
                                 f"{node_vectors.shape}")
            if num_nodes is not None and num_nodes != node_vectors.shape[0]:
                raise ValueError(f"num_nodes={num_nodes} but node_vectors has "
                                 f"{node_vectors.shape[0]} rows")
            num_nodes = int(node_vectors.shape[0])
        elif isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
            raise ValueError(f"MissNodeScorer needs node_vectors or a positive num_nodes, got "
                             f"num_nodes={num_nodes!r}")
        self.config = config
        self.num_nodes = int(num_nodes)
        self.mm_dim = int(mm_dim)
        self.features = FeatureEmbeddings(
            vocabularies, config.id_embedding_dim, mm_dim=mm_dim,
            short_term_len=config.short_term_len,
            use_user_attributes=config.use_user_attributes, mm_table=mm_table,
            mm_storage_dtype=config.mm_storage_dtype, name="features")
        node_dim = self.features.behaviour_dim
        self.node_embedding = tf.keras.layers.Embedding(
            self.num_nodes, node_dim, name="node_embedding",
            embeddings_initializer=tf.keras.initializers.RandomNormal(stddev=0.05))
        with tf.name_scope(self.node_embedding.name):
            self.node_embedding.build(tf.TensorShape([None]))
        initial = ("zeros" if node_vectors is None
                   else tf.constant_initializer(normalise_rows(node_vectors)))
        self.node_mm = self.add_weight(
            name="node_multimodal", shape=(self.num_nodes, mm_dim), dtype=tf.float32,
            initializer=initial, trainable=False)
        self.gsu = CoMultimodalGSU(config.top_k, table=self.features.mm_table, name="gsu_miss")
        self.attention = TargetAttention(config.num_heads, config.head_dim,
                                         key_dim=node_dim, name="esu_target_attention")
        self.tower = MLPTower(config.tower_units, activation=config.tower_activation,
                              dropout=config.dropout, name="tower")
        # SUM reduction, divided by the global number of pairs in compute_loss.
        self.task = tfrs.tasks.Ranking(
            loss=tf.keras.losses.BinaryCrossentropy(
                from_logits=True, reduction=tf.keras.losses.Reduction.SUM),
            metrics=[tf.keras.metrics.AUC(from_logits=True, name="auc")])

    # ------------------------------------------------------------------ config
    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "model_config": dataclasses.asdict(self.config),
                "vocabularies": self.features.get_config()["vocabularies"],
                "num_nodes": self.num_nodes, "mm_dim": self.mm_dim}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MissNodeScorer:
        config = dict(config)
        model_config = ModelConfig(**config.pop("model_config"))
        return cls(model_config, config.pop("vocabularies"), **config)

    # ------------------------------------------------------------------ forward
    def encode_user(self, features: Mapping[str, tf.Tensor],
                    search_keys: bool = True) -> dict[str, tf.Tensor]:
        """Node-independent user tensors, computed once per user (not once per node).

        Always the history's ``rows``, ``valid`` and ID embeddings ``[B, L, 2E]``, ``short``
        (``s_u``, ``[B, 2E]``) and ``attributes`` ``[B, user_dim]``. With ``search_keys``
        also the GSU's ``co_keys`` ``[B, L, 2E + 1]`` and ``mm_keys`` ``[B, L, D + 1]``
        (:meth:`CoMultimodalGSU.encode_history`), which :meth:`score_nodes` then searches
        with two matrix products; without them it streams the int8 multimodal table in every
        call (:meth:`CoMultimodalGSU.call`: the same selection up to float rounding, no
        ``[B, L, D]`` float tensor, but the table is re-read for every set of nodes).
        """
        user = self.features.encode_history(features, parts=(ID,))
        user["short"] = self.features.short_term_mean(user)                 # [B, 2E]
        user["attributes"] = self.features.user_attributes(features)        # [B, 5E]
        if search_keys:
            user.update(self.gsu.encode_history({ID: user[ID], ROWS: user[ROWS]}, user[VALID]))
        return user

    def score_nodes(self, user: Mapping[str, tf.Tensor], node_ids: tf.Tensor,
                    training: bool = False) -> tf.Tensor:
        """Logits ``[B, M]`` of the user tensors of :meth:`encode_user` for ``node_ids``
        int ``[B, M]`` (the GSU searches the user's search keys when :meth:`encode_user` made
        them, else streams the multimodal table)."""
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
        target = {ID: node_emb, MM: node_mm}
        if all(key in user for key in SEARCH_KEYS):
            selection = self.gsu.search(target, user)                       # [B, M, K]
        else:
            selection = self.gsu(target, {ID: user[ID], ROWS: user[ROWS]}, user[VALID])
        keys = tf.gather(user[ID], selection[INDICES], batch_dims=1)        # [B, M, K, 2E]

        num_nodes = tf.shape(node_ids)[1]
        batch = tf.shape(node_ids)[0]
        top_k = self.config.top_k
        node_dim = self.features.behaviour_dim
        flat_query = tf.reshape(node_emb, [-1, node_dim])
        esu = self.attention(flat_query, tf.reshape(keys, [-1, top_k, node_dim]),
                             tf.reshape(selection[MASK], [-1, top_k]))      # [B*M, H*d]

        def per_node_user(tensor: tf.Tensor) -> tf.Tensor:
            # [B, F] -> [B*M, F] by broadcasting; only the small user vectors are repeated.
            return tf.reshape(tf.repeat(tensor[:, tf.newaxis, :], num_nodes, axis=1),
                              [-1, tensor.shape[-1]])

        short = per_node_user(user["short"])
        parts = [flat_query, esu, flat_query * short,
                 tf.reshape(selection[SCORES], [-1, top_k]), short]
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
        loss = self.task(labels=tf.reshape(labels, [-1, 1]),
                         predictions=tf.reshape(logits, [-1, 1]), training=training)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        pairs = tf.cast(tf.size(labels) * replicas, loss.dtype)
        return loss / tf.maximum(pairs, 1.0)

    def embedding_variables(self) -> list[tf.Variable]:
        """ID and node embeddings (their own learning rate, as the ranking model)."""
        return [*self.features.embedding_variables(), *self.node_embedding.trainable_variables]


class MissTreeIndex(tf.Module):
    """Layer-wise beam search of a trained :class:`MissNodeScorer` over its index tree.

    Same query interface as the TFRS top-k layers: ``call(features, k) -> (scores, item_ids)``
    (float32 / int64 ``[B, k]``, best first). The user is encoded once, its GSU search keys
    included (:meth:`MissNodeScorer.encode_user`); each searched level scores its ``M``
    candidate nodes with one :meth:`MissNodeScorer.score_nodes` call (``M = 2**start_level``
    at the first level, ``2 * beam_width`` below it): per level and search one ``[B, M, L]``
    matrix product and one top-K, plus one scatter that keeps MM-GSU off Co-GSU's picks.

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
