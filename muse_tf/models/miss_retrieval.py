"""MISS tree retrieval (arXiv 2508.14515): a (user, tree node) scorer and its beam-search index.

MISS retrieves items by walking a multimodal index tree (:class:`~muse_tf.index.tree.IndexTree`)
top-down with a learned (user, node) scorer. This module holds:

* :class:`MissNodeScorer`: the scorer. For a user and ``M`` tree nodes at once::

      e_n  = E_node[n]                  learned node embedding, levels 0 .. S    [B, M, 2E]
           = mean_{i under n} e_i       below S: its items' ID embeddings (item ⊕ category;
                                        a leaf: its item's own)
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

  Node tables at catalogue scale (TAOBAO-MM: 35.4M items, depth 26, 2**27 - 1 node ids): one
  learned row and one float32 vector per node would be 17 GB (+ optimizer slots) and 68 GB.
  Learned rows exist for levels ``0 .. S`` only (:func:`learned_levels`: every level while
  the tree has at most :data:`MAX_LEARNED_NODES` nodes, else ``S = 21``); ``v_n`` is stored
  for levels ``0 .. T`` (:attr:`MissNodeScorer.stored_multimodal_depth`; every level when every
  level is learned, else the tree's stored means, :attr:`IndexTree.stored_depth`); deeper
  nodes are computed in TF ops from their at most ``2**(L - S - 1)`` resp. ``2**(L - T - 1)``
  leaf slots, through one int32 ``[2**L]`` leaf slot -> item row table (0 at padding slots)
  and, for ``e_n``, each item row's category row. Gradients reach the item and category
  embeddings through those means. Small trees keep every row learned and stored: the same
  variables and numbers as a fully tabulated scorer.
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
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs

from muse_tf import schema
from muse_tf.config import ModelConfig
from muse_tf.embeddings import MultimodalCodes, Vocabulary
from muse_tf.embeddings.arrays import normalise_rows
from muse_tf.embeddings.feature_embeddings import VALID, FeatureEmbeddings
from muse_tf.embeddings.id_lookup import NUM_RESERVED_ROWS, OOV_ROW, PADDING_ROW
from muse_tf.embeddings.multimodal_table import _write_rows as write_rows
from muse_tf.embeddings.sorted_ids import SortedIds, host_variable
from muse_tf.index.beam_search import BeamSearchResult, TreeTensors, tree_beam_search
from muse_tf.index.tree import IndexTree
from muse_tf.layers import CoMultimodalGSU, MLPTower, TargetAttention
from muse_tf.layers.co_multimodal_gsu import SEARCH_KEYS
from muse_tf.layers.search_unit import ID, MM, ROWS
from muse_tf.layers.topk import INDICES, MASK, SCORES
from muse_tf.training.step import TwoOptimizerModel

__all__ = [
    "AUTO_LEARNED_LEVELS",
    "MAX_LEARNED_NODES",
    "NODE_IDS",
    "NODE_LABELS",
    "QUERY_FEATURES",
    "MissNodeScorer",
    "MissTreeIndex",
    "TrainingNodes",
    "learned_levels",
]

#: Input keys of the scorer beside the schema features: node ids int32 [B, M] and, for the
#: loss, 0/1 labels float32 [B, M].
NODE_IDS = "node_ids"
NODE_LABELS = "node_labels"

#: Raw features a retrieval query needs (user side + padded history + its length).
QUERY_FEATURES: tuple[str, ...] = schema.QUERY_FEATURES

#: ``learned_node_levels`` (``retrieval.learned_node_levels``) that sizes the learned levels
#: by the tree (:func:`learned_levels`).
AUTO_LEARNED_LEVELS = -1
#: The most learned node rows the automatic rule allows: 2**22 (4.2M rows, 537 MB at 2E = 32
#: floats, three times that with Adam's slots).
MAX_LEARNED_NODES = 1 << 22
#: Rows written per step when the node tables are filled (4 MB of ids, 32 MB of D = 128
#: vectors).
_FILL_ROWS = 1 << 16


def learned_levels(depth: int, learned_node_levels: int = AUTO_LEARNED_LEVELS) -> int:
    """``S``: the deepest tree level whose nodes get a learned embedding row.

    Args:
      depth: ``L`` of the tree.
      learned_node_levels: :data:`AUTO_LEARNED_LEVELS` (-1): ``L`` when the whole tree has at
        most :data:`MAX_LEARNED_NODES` nodes (``L <= 21``), else the deepest ``S`` with
        ``2**(S + 1) - 1 <= MAX_LEARNED_NODES`` (21); otherwise ``min(value, L)``.

    Returns:
      ``S`` in ``[0, L]``.
    """
    if (isinstance(learned_node_levels, bool)
            or not isinstance(learned_node_levels, int | np.integer)
            or learned_node_levels < AUTO_LEARNED_LEVELS):
        raise ValueError(f"learned_node_levels must be an int >= 0, or {AUTO_LEARNED_LEVELS} "
                         f"(auto), got {learned_node_levels!r}")
    if learned_node_levels == AUTO_LEARNED_LEVELS:
        if (2 << depth) - 1 <= MAX_LEARNED_NODES:
            return int(depth)
        return (MAX_LEARNED_NODES + 1).bit_length() - 2
    return int(min(learned_node_levels, depth))


def _fill_rows(variable: tf.Variable, rows: Callable[[int, int], np.ndarray]) -> None:
    """Writes ``rows(a, b)`` into ``variable[a:b]`` for every :data:`_FILL_ROWS` block, in
    place (eagerly): no constant initializer, so no graph ever holds the table (2 GB proto
    limit) and the values are formed one block at a time."""
    total = int(variable.shape[0])
    for begin in range(0, total, _FILL_ROWS):
        end = min(begin + _FILL_ROWS, total)
        write_rows(variable, begin, np.asarray(rows(begin, end)))  # scatter_update, in place


class TrainingNodes:
    """TDM-style (node, label) training targets of clicked items, in TF ops.

    For each item: its ancestors at levels ``1 .. depth`` (the root is left out: it is every
    item's ancestor and carries no signal) are positives, and ``negatives_per_level`` nodes
    drawn uniformly, with replacement, from the other item-holding nodes of the same level are
    negatives (the distribution of :meth:`IndexTree.ancestors` +
    :meth:`IndexTree.sample_negatives`). Stateless random ops: the same ``(item ids, seed)``
    always give the same nodes, so a tf.data pipeline that maps it over
    ``(batch, step counter)`` is deterministic. The per-item arrays and the ascending ids
    (searched for an id's position) are host-side variables, not constants of the
    pipeline's graph.

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
        # Per-item arrays (3 * 142 MB at 35.4M items) live in host variables: a constant
        # captured by the pipeline's map function would be serialised with the dataset
        # graph whenever tf.data rewrites it (2 GB proto limit). int32 holds node ids of
        # depth <= 30 and ranks < 2**31.
        self._item_leaf = host_variable(tree.item_leaf.astype(np.int32), "item_leaf")
        self._leaf_rank = host_variable(
            np.searchsorted(valid_leaves, tree.item_leaf).astype(np.int32), "leaf_rank")
        self._valid_leaves = host_variable(valid_leaves.astype(np.int32), "valid_leaves")
        # id -> position by binary search over the ascending ids (8 bytes an item: 283 MB at
        # 35.4M; a hash table of the same 35.4M ids held 1.71 GB, measured).
        self._item_ids = SortedIds(np.asarray(tree.item_ids, np.int64), "item_ids")

    def _positions(self, item_ids: tf.Tensor) -> tf.Tensor:
        """int64 (shape of ``item_ids``): each id's position in the tree's ids, -1 if absent."""
        return self._item_ids.positions(item_ids)

    def contains(self, item_ids: tf.Tensor) -> tf.Tensor:
        """bool (shape of ``item_ids``): which raw item ids the tree holds."""
        return self._positions(item_ids) >= 0

    def __call__(self, item_ids: tf.Tensor, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        ids = tf.reshape(tf.convert_to_tensor(item_ids, tf.int64), [-1])
        positions = self._positions(ids)
        check = tf.debugging.assert_non_negative(
            positions, message="TrainingNodes: item ids not in the tree (filter clicks on "
                               "TrainingNodes.contains first)")
        with tf.control_dependencies([check]):
            positions = tf.identity(positions)
        leaf = tf.cast(tf.gather(self._item_leaf, positions), tf.int64)         # [Q]
        shifts = self.depth - self._levels
        positives = tf.bitwise.right_shift(leaf[:, None] + 1, shifts[None, :]) - 1  # [Q, depth]
        # Rank of the positive among its level's candidates; draw among the others.
        rank = tf.concat([positives[:, :-1] - self._first[None, :-1],
                          tf.cast(tf.gather(self._leaf_rank, positions), tf.int64)[:, None]],
                         axis=1)
        n = self.negatives_per_level
        uniform = tf.random.stateless_uniform(tf.stack([tf.size(ids), self.depth, n]),
                                              seed=seed, dtype=tf.float64)
        others = self._size - 1                                                 # [depth]
        draws = tf.cast(tf.floor(uniform * tf.cast(others, tf.float64)[None, :, None]),
                        tf.int64)
        draws = tf.minimum(draws, others[None, :, None] - 1)
        draws += tf.cast(draws >= rank[..., None], tf.int64)                   # [Q, depth, n]
        inner = self._first[None, :-1, None] + draws[:, :-1]
        leaves = tf.cast(tf.gather(self._valid_leaves, draws[:, -1:]), tf.int64)
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

    Node tables (:meth:`node_features`; ``L`` = depth, ``S`` = :attr:`learned_node_levels`,
    ``T`` = :attr:`stored_multimodal_depth`):

    * ``node_embedding``: learned rows ``[2**(S + 1) - 1, 2E]`` for levels ``0 .. S``; a
      node below ``S`` is the masked mean of the ID embeddings (item ⊕ category, as the
      history's) of the items in its ``2**(L - l)`` leaf slots (a leaf: its item's own);
    * ``node_multimodal``: float32 ``[2**(T + 1) - 1, D]``, the tree's node vectors of
      levels ``0 .. T``, re-normalised (the MM-GSU similarity is a cosine), written in
      chunks (never a graph constant); a deeper node's is ``normalise(sum of its items'
      unit vectors c_r rho_r)`` from the frozen multimodal table, the direction of
      :meth:`IndexTree.vectors_of`;
    * with ``S < L`` or ``T < L``: ``leaf_item_rows`` int32 ``[2**L]`` (the item row of each
      leaf slot, 0 at padding slots: the validity mask) and, with ``S < L``,
      ``item_category_rows`` int32 ``[item rows]`` (category row of each item row; the OOV
      row where unknown).

    Trained by ``fit`` with two optimizers (:meth:`embedding_variables`: the ID and node
    embeddings). :meth:`get_config` / :meth:`from_config` rebuild it; the frozen multimodal
    table and the node tables are weights (zeros in a rebuilt scorer until its weights are
    loaded).

    Args:
      config: the model section of the experiment: ``id_embedding_dim`` (E), ``top_k`` (K,
        split ``K // 2`` Co-GSU + the rest MM-GSU as the ranking model's ``miss`` GSU),
        ``short_term_len``, ``num_heads``/``head_dim`` of the ESU, ``tower_units``,
        ``tower_activation``, ``dropout``, ``use_user_attributes``.
      vocabularies: model-side vocabularies (or their dict form).
      node_vectors: ``[num_nodes, D]`` every node's vector (:attr:`IndexTree.node_vectors`)
        of a tree whose levels are all learned; prefer ``tree``, which needs no dense array.
      mm_table: the ``[item rows, D]`` frozen multimodal table to load (``ItemTables.mm_table``:
        int8 codes by reference; see :class:`~muse_tf.embeddings.FrozenMultimodalTable`), or
        ``None`` to restore it. Stored as ``config.mm_storage_dtype``.
      mm_dim: D.
      num_nodes: ``2**(L + 1) - 1``, to restore the scorer from weights (neither
        ``node_vectors`` nor ``tree``).
      tree: the index tree: the node tables are filled from it (its stored means,
        :meth:`IndexTree.vectors_of`, its leaves' items).
      learned_node_levels: ``S`` (:func:`learned_levels`: -1 = auto, or at most the depth).
      stored_multimodal_depth: ``T`` in ``[-1, L]``; default ``L`` when every level is
        learned, else the tree's :attr:`~IndexTree.stored_depth`.
      item_categories: ``(item ids, category ids)``: each item's raw category id (e.g.
        :func:`~muse_tf.training.retrieval_data.item_categories`), read when ``S < L``;
        items not in it get the OOV category row.
      release_item_codes: called (once) as soon as nothing the constructor still does reads
        the item codes of ``mm_table`` or ``tree``: after the frozen table is loaded when
        the node tables read only the tree's stored rows (``T <=``
        :attr:`IndexTree.stored_depth`), else after the node tables are filled. The caller
        drops its host copy there (4.5 GB at 35.4M items), before the node tables and the
        optimiser slots take their memory. Not part of the config.
    """

    def __init__(self, config: ModelConfig, vocabularies: Mapping[str, Vocabulary | dict],
                 node_vectors: np.ndarray | None = None,
                 mm_table: MultimodalCodes | np.ndarray | None = None,
                 mm_dim: int = schema.MM_EMBEDDING_DIM, num_nodes: int | None = None, *,
                 tree: IndexTree | None = None,
                 learned_node_levels: int = AUTO_LEARNED_LEVELS,
                 stored_multimodal_depth: int | None = None,
                 item_categories: tuple[np.ndarray, np.ndarray] | None = None,
                 release_item_codes: Callable[[], None] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if config.top_k < 2:
            raise ValueError(f"MISS needs model.top_k >= 2 (K/2 behaviours per GSU), got "
                             f"{config.top_k}")
        if node_vectors is not None and tree is not None:
            raise ValueError("MissNodeScorer takes node_vectors or tree, not both")
        if node_vectors is not None:
            node_vectors = np.asarray(node_vectors)
            if node_vectors.ndim != 2 or node_vectors.shape[1] != mm_dim:
                raise ValueError(f"node_vectors must be [num_nodes, mm_dim={mm_dim}], got shape "
                                 f"{node_vectors.shape}")
            rows = int(node_vectors.shape[0])
        elif tree is not None:
            if tree.dim != mm_dim:
                raise ValueError(f"the tree's vectors have dim {tree.dim}, mm_dim={mm_dim}")
            rows = tree.num_nodes
        elif isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
            raise ValueError(f"MissNodeScorer needs node_vectors, a tree or a positive "
                             f"num_nodes, got num_nodes={num_nodes!r}")
        else:
            rows = num_nodes
        if num_nodes is not None and num_nodes != rows:
            raise ValueError(f"num_nodes={num_nodes} but the tree has {rows} nodes")
        if rows & (rows + 1):
            raise ValueError(f"num_nodes={rows} is not 2**(depth + 1) - 1 (a perfect binary tree "
                             "in heap order)")
        self.config = config
        self.num_nodes = rows
        self.depth = (rows + 1).bit_length() - 2
        self.mm_dim = int(mm_dim)
        self.learned_node_levels = learned_levels(self.depth, learned_node_levels)
        if stored_multimodal_depth is None:
            if self.learned_node_levels == self.depth:
                stored_multimodal_depth = self.depth
            elif tree is None:
                raise ValueError("MissNodeScorer: learned_node_levels < depth needs the tree "
                                 "(tree=...) or stored_multimodal_depth")
            else:
                stored_multimodal_depth = tree.stored_depth
        if (isinstance(stored_multimodal_depth, bool)
                or not isinstance(stored_multimodal_depth, int | np.integer)
                or not -1 <= stored_multimodal_depth <= self.depth):
            raise ValueError(f"stored_multimodal_depth must be an int in [-1, depth="
                             f"{self.depth}], got {stored_multimodal_depth!r}")
        self.stored_multimodal_depth = int(stored_multimodal_depth)
        if node_vectors is not None and self.needs_leaves:
            raise ValueError(f"node_vectors fill every level; learned_node_levels="
                             f"{self.learned_node_levels} and stored_multimodal_depth="
                             f"{self.stored_multimodal_depth} below depth {self.depth} need "
                             "the tree (tree=...)")
        self.features = FeatureEmbeddings(
            vocabularies, config.id_embedding_dim, mm_dim=mm_dim,
            short_term_len=config.short_term_len,
            use_user_attributes=config.use_user_attributes, mm_table=mm_table,
            mm_storage_dtype=config.mm_storage_dtype, name="features")
        del mm_table  # the frozen table holds the codes now
        release_early = tree is None or self.stored_multimodal_depth <= tree.stored_depth
        if release_item_codes is not None and release_early:
            release_item_codes()
        node_dim = self.features.behaviour_dim
        self.node_embedding = tf.keras.layers.Embedding(
            (2 << self.learned_node_levels) - 1, node_dim, name="node_embedding",
            embeddings_initializer=tf.keras.initializers.RandomNormal(stddev=0.05))
        with tf.name_scope(self.node_embedding.name):
            self.node_embedding.build(tf.TensorShape([None]))
        self.node_mm = self.add_weight(
            name="node_multimodal", shape=((1 << (self.stored_multimodal_depth + 1)) - 1, mm_dim),
            dtype=tf.float32, initializer="zeros", trainable=False)
        self.leaf_rows = self.item_category_rows = None
        if self.needs_leaves:
            self.leaf_rows = self.add_weight(
                name="leaf_item_rows", shape=(1 << self.depth,), dtype=tf.int32,
                initializer="zeros", trainable=False)
        if self.learned_node_levels < self.depth:
            self.item_category_rows = self.add_weight(
                name="item_category_rows", shape=(self.features.item_lookup.num_rows,),
                dtype=tf.int32, initializer="zeros", trainable=False)
        if node_vectors is not None:
            _fill_rows(self.node_mm, lambda a, b: normalise_rows(node_vectors[a:b]))
        if tree is not None:
            self._load_tree(tree, item_categories)
        if release_item_codes is not None and not release_early:
            release_item_codes()
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

    @property
    def needs_leaves(self) -> bool:
        """Whether some level is computed from its leaves' items (``S < L`` or ``T < L``)."""
        return min(self.learned_node_levels, self.stored_multimodal_depth) < self.depth

    def _load_tree(self, tree: IndexTree,
                   item_categories: tuple[np.ndarray, np.ndarray] | None) -> None:
        """Fills the node tables from ``tree``, :data:`_FILL_ROWS` rows at a time (eagerly)."""
        _fill_rows(self.node_mm, lambda a, b: normalise_rows(tree.vectors_of(np.arange(a, b))))
        lookup = self.features.item_lookup
        if self.leaf_rows is not None:
            # Item id 0 (padding slots) looks up the padding row 0.
            _fill_rows(self.leaf_rows, lambda a, b: lookup.lookup_all(
                tf.constant(tree.leaf_item_ids[a:b], tf.int64)).numpy())
        if self.item_category_rows is not None:
            categories = np.full(lookup.num_rows, OOV_ROW, np.int32)
            categories[PADDING_ROW] = PADDING_ROW
            if item_categories is not None:
                item_ids, category_ids = (np.asarray(x, np.int64) for x in item_categories)
                if item_ids.ndim != 1 or item_ids.shape != category_ids.shape:
                    raise ValueError(f"item_categories must be two [N] arrays (item ids, "
                                     f"category ids), got shapes {item_ids.shape} and "
                                     f"{category_ids.shape}")
                for begin in range(0, len(item_ids), _FILL_ROWS):
                    rows = lookup.lookup_all(tf.constant(item_ids[begin:begin + _FILL_ROWS]))
                    rows = rows.numpy()
                    known = rows >= NUM_RESERVED_ROWS  # not padding, not out of vocabulary
                    categories[rows[known]] = self.features.lookup(
                        schema.ITEM_CATEGORY.vocabulary,
                        tf.constant(category_ids[begin:begin + _FILL_ROWS][known])).numpy()
            _fill_rows(self.item_category_rows, lambda a, b: categories[a:b])

    # ------------------------------------------------------------------ config
    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "model_config": dataclasses.asdict(self.config),
                "vocabularies": self.features.get_config()["vocabularies"],
                "num_nodes": self.num_nodes, "mm_dim": self.mm_dim,
                "learned_node_levels": self.learned_node_levels,
                "stored_multimodal_depth": self.stored_multimodal_depth}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MissNodeScorer:
        config = dict(config)
        model_config = ModelConfig(**config.pop("model_config"))
        return cls(model_config, config.pop("vocabularies"), **config)

    # ------------------------------------------------------------------ nodes
    def node_features(self, node_ids: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """``(e_n, v_n)`` of node ids int ``[...]``: float32 ``[..., 2E]`` and ``[..., D]``
        (class docstring: table rows down to ``S`` / ``T``, computed from the leaves below)."""
        node_ids = tf.cast(node_ids, tf.int32)
        if not self.needs_leaves:  # every row tabulated: two gathers
            return self.node_embedding(node_ids), tf.gather(self.node_mm, node_ids)
        flat = tf.reshape(node_ids, [-1])
        embedding = self._by_level(flat, self.learned_node_levels, self.node_embedding,
                                   self._mean_item_embedding)
        multimodal = self._by_level(flat, self.stored_multimodal_depth,
                                    lambda nodes: tf.gather(self.node_mm, nodes),
                                    self._item_direction)

        def unflatten(values: tf.Tensor) -> tf.Tensor:
            shape = tf.concat([tf.shape(node_ids), tf.shape(values)[1:]], axis=0)
            out = tf.reshape(values, shape)
            out.set_shape(node_ids.shape.concatenate(values.shape[1:]))
            return out

        return unflatten(embedding), unflatten(multimodal)

    def _by_level(self, nodes: tf.Tensor, table_depth: int,
                  from_table: Callable[[tf.Tensor], tf.Tensor],
                  from_items: Callable[[tf.Tensor], tf.Tensor]) -> tf.Tensor:
        """``[n, F]`` for node ids int32 ``[n]``: ``from_table(ids)`` at levels ``0 ..
        table_depth``, ``from_items(item rows int32 [n_l, 2**(L - l)])`` of the leaf slots of
        each deeper level ``l`` (static widths; the nodes are partitioned by level)."""
        depth = self.depth
        # Part 0: the table's levels (none when table_depth = -1); part k: level
        # table_depth + k.
        parts = depth - table_depth + 1
        bucket = tf.add_n([tf.zeros_like(nodes)] + [
            tf.cast(nodes >= (1 << level) - 1, tf.int32)
            for level in range(table_depth + 1, depth + 1)])
        positions = tf.dynamic_partition(tf.range(tf.size(nodes)), bucket, parts)
        groups = tf.dynamic_partition(nodes, bucket, parts)
        values = [from_table(groups[0])]
        for part in range(1, parts):
            span = 1 << (depth - table_depth - part)
            first = (groups[part] + 1) * span - (1 << depth)    # its first leaf slot
            slots = first[:, tf.newaxis] + tf.range(span)[tf.newaxis, :]
            values.append(from_items(tf.gather(self.leaf_rows, slots)))
        return tf.dynamic_stitch(positions, values)

    def _mean_item_embedding(self, rows: tf.Tensor) -> tf.Tensor:
        """Masked mean ``[n, 2E]`` of the ID embeddings (item ⊕ category) of item rows
        ``[n, span]`` (row 0: a padding slot, left out)."""
        embedded = self.features.behaviour_embedding(
            rows, tf.gather(self.item_category_rows, rows))                  # [n, span, 2E]
        valid = tf.cast(rows > PADDING_ROW, embedded.dtype)[..., tf.newaxis]
        counts = tf.maximum(tf.reduce_sum(valid, axis=1), 1.0)
        return tf.reduce_sum(embedded * valid, axis=1) / counts

    def _item_direction(self, rows: tf.Tensor) -> tf.Tensor:
        """``normalise(sum of the unit multimodal vectors)`` ``[n, D]`` of item rows
        ``[n, span]`` (padding rows are zero vectors: nothing to mask)."""
        return tf.math.l2_normalize(tf.reduce_sum(self.features.mm_table(rows), axis=1), axis=-1)

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
        node_emb, node_mm = self.node_features(node_ids)                   # [B, M, 2E / D]
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
