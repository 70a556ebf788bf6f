"""Evaluation metrics: AUC, GAUC, logloss (ranking) and recall@N, hierarchical recall (retrieval).

Ranking metrics (MUSE, arXiv 2512.07216, Sec. 5: AUC and GAUC on TAOBAO-MM):

* :func:`auc` -- ROC AUC from average ranks (the Mann-Whitney statistic), so tied scores count
  one half per positive/negative pair, exactly like the pairwise definition

  ``AUC = (1 / (P * N)) * sum_{i in pos} sum_{j in neg} ([s_i > s_j] + 0.5 [s_i = s_j])``.

* :func:`gauc` -- group (user) AUC: ``GAUC = sum_u n_u AUC_u / sum_u n_u`` over the users ``u``
  that have both a positive and a negative sample, ``n_u`` being the user's number of samples.
  Users whose samples are all one class have no AUC and are skipped; the weights are
  renormalised over the kept users.
* :func:`gauc_batch` -- the official MUSE code's GAUC: the same per-user AUC, but users are
  grouped only within consecutive batches of ``batch_size`` (1,000) unshuffled samples, so a
  user whose samples fall into two batches counts as two groups (and a group with one class in
  its batch is skipped). Reported beside the exact :func:`gauc`, which stays the headline.
* :func:`logloss` -- mean binary cross-entropy with clipped probabilities.
* :func:`gauc_tf` -- the same GAUC in TensorFlow ops.
* :class:`GAUC` -- a streaming ``tf.keras.metrics.Metric`` computing the same value as
  :func:`gauc` over everything seen since the last reset (works inside ``model.evaluate``).

Retrieval metrics (MISS, arXiv 2508.14515, Sec. 4):

* :func:`recall_at_n` -- share of queries whose target item is among the top ``n`` retrieved.
* :func:`hierarchical_recall` -- per tree level, share of queries whose positive item's
  ancestor at that level was kept by the beam search.

Everything except :func:`gauc_tf` and :class:`GAUC` is pure NumPy and vectorised (no Python
loop over users or queries).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

__all__ = [
    "GAUC",
    "auc",
    "gauc",
    "gauc_batch",
    "gauc_tf",
    "hierarchical_recall",
    "logloss",
    "recall_at_n",
]


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def _as_1d(values: object, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D (or [n, 1]); got shape {array.shape}.")
    return array


def _binary_labels(labels: object, name: str = "labels") -> np.ndarray:
    array = _as_1d(labels, name)
    if array.dtype == np.bool_:
        return array.astype(np.float64)
    if not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{name} must be numeric 0/1 or bool; got dtype {array.dtype}.")
    bad = (array != 0) & (array != 1)
    if np.any(bad):
        raise ValueError(
            f"{name} must be 0 or 1; got {array[bad][:5].tolist()} "
            f"(at positions {np.flatnonzero(bad)[:5].tolist()})."
        )
    return array.astype(np.float64)


def _finite_scores(scores: object, name: str, size: int) -> np.ndarray:
    array = _as_1d(scores, name)
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise ValueError(f"{name} must be real numbers; got dtype {array.dtype}.")
    if array.shape[0] != size:
        raise ValueError(f"{name} has {array.shape[0]} values but labels has {size}.")
    bad = ~np.isfinite(array)
    if np.any(bad):
        raise ValueError(
            f"{name} must be finite; got {array[bad][:5].tolist()} "
            f"(at positions {np.flatnonzero(bad)[:5].tolist()})."
        )
    return array


# --------------------------------------------------------------------------------------------
# Ranking metrics
# --------------------------------------------------------------------------------------------


def _grouped_average_ranks(new_group: np.ndarray, rank_1based: np.ndarray) -> np.ndarray:
    """Average of ``rank_1based`` over the runs (tie groups) that start where ``new_group``."""
    group = np.cumsum(new_group) - 1
    sums = np.bincount(group, weights=rank_1based)
    counts = np.bincount(group)
    return (sums / counts)[group]


def auc(labels: object, scores: object) -> float:
    """ROC AUC with ties counted as one half (average ranks).

    Args:
      labels: ``[n]`` (or ``[n, 1]``) 0/1 or bool.
      scores: ``[n]`` finite real scores (probabilities or logits: only their order matters).

    Returns:
      The AUC as a Python float, or ``nan`` when ``labels`` holds a single class (AUC is
      undefined then; :func:`gauc` skips such users for the same reason).

    Raises:
      ValueError: empty input, labels other than 0/1, non-finite scores or a length mismatch.
    """
    y = _binary_labels(labels)
    if y.shape[0] == 0:
        raise ValueError("auc needs at least one sample; got empty labels.")
    s = _finite_scores(scores, "scores", y.shape[0])
    num_pos = float(y.sum())
    num_neg = float(y.shape[0] - num_pos)
    if num_pos == 0 or num_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="stable")
    s_sorted = s[order]
    new_group = np.empty(s_sorted.shape[0], dtype=bool)
    new_group[0] = True
    new_group[1:] = s_sorted[1:] != s_sorted[:-1]
    ranks = _grouped_average_ranks(new_group, np.arange(1, s.shape[0] + 1, dtype=np.float64))
    rank_sum = float(np.dot(ranks, y[order]))
    return (rank_sum - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg)


def _per_user_auc(
    user_ids: np.ndarray, labels: np.ndarray, scores: np.ndarray,
    batch_ids: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-group (AUC, sample count, kept mask). A group is a user, or with ``batch_ids`` a
    (batch, user) pair; groups in ascending (batch, user) order."""
    if batch_ids is None:
        order = np.lexsort((scores, user_ids))  # by user, then score
    else:
        order = np.lexsort((scores, user_ids, batch_ids))  # by batch, user, then score
    users = user_ids[order]
    s = scores[order]
    y = labels[order]
    n = users.shape[0]
    new_user = np.empty(n, dtype=bool)
    new_user[0] = True
    new_user[1:] = users[1:] != users[:-1]
    if batch_ids is not None:
        batches = batch_ids[order]
        new_user[1:] |= batches[1:] != batches[:-1]
    user = np.cumsum(new_user) - 1
    user_start = np.flatnonzero(new_user)
    within_rank = np.arange(n, dtype=np.float64) - user_start[user] + 1.0
    new_group = new_user.copy()
    new_group[1:] |= s[1:] != s[:-1]
    ranks = _grouped_average_ranks(new_group, within_rank)
    counts = np.bincount(user).astype(np.float64)
    num_pos = np.bincount(user, weights=y)
    num_neg = counts - num_pos
    rank_sum = np.bincount(user, weights=ranks * y)
    kept = (num_pos > 0) & (num_neg > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        user_auc = (rank_sum - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg)
    return user_auc, counts, kept


def gauc(user_ids: object, labels: object, scores: object) -> float:
    """Group AUC: per-user AUC weighted by the user's number of samples.

    ``GAUC = sum_u n_u AUC_u / sum_u n_u`` over users with at least one positive and one
    negative sample (others are skipped and the weights renormalised over the kept users).
    Sorts once by (user, score) with ``np.lexsort``; no Python loop over users.

    Args:
      user_ids: ``[n]`` user keys (any sortable dtype: raw int64 hashes, strings, ...).
      labels: ``[n]`` 0/1 or bool.
      scores: ``[n]`` finite real scores.

    Returns:
      GAUC as a Python float; ``nan`` when no user has both classes.
    """
    users, y, s = _grouped_inputs("gauc", user_ids, labels, scores)
    return _weighted_auc(*_per_user_auc(users, y, s))


def _grouped_inputs(name: str, user_ids: object, labels: object,
                    scores: object) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Checked ``(users, labels, scores)`` of a grouped AUC; errors name the argument."""
    y = _binary_labels(labels)
    if y.shape[0] == 0:
        raise ValueError(f"{name} needs at least one sample; got empty labels.")
    s = _finite_scores(scores, "scores", y.shape[0])
    users = _as_1d(user_ids, "user_ids")
    if users.shape[0] != y.shape[0]:
        raise ValueError(f"user_ids has {users.shape[0]} values but labels has {y.shape[0]}.")
    return users, y, s


def _weighted_auc(group_auc: np.ndarray, counts: np.ndarray, kept: np.ndarray) -> float:
    """``Σ n_g AUC_g / Σ n_g`` over the kept groups; ``nan`` when none is kept."""
    if not np.any(kept):
        return float("nan")
    return float(np.dot(group_auc[kept], counts[kept]) / counts[kept].sum())


def gauc_batch(user_ids: object, labels: object, scores: object,
               batch_size: int = 1000) -> float:
    """GAUC as the official MUSE evaluation computes it: per batch of ``batch_size`` samples.

    The samples are cut, in the given order (the unshuffled test split), into consecutive
    batches of ``batch_size`` (the last one may be smaller). Within each batch the samples are
    grouped by user; a (batch, user) group with both classes contributes its AUC weighted by
    its number of samples ``n``, other groups are skipped:
    ``sum over batches and users of n * AUC / sum of n``. It equals :func:`gauc` when every
    user's samples lie in one batch; otherwise a user split over two batches counts twice,
    and one whose halves each hold a single class is skipped although it has both classes.
    Vectorised like :func:`gauc` (one ``np.lexsort`` by batch, user and score).

    Args:
      user_ids: ``[n]`` user keys, in evaluation order.
      labels: ``[n]`` 0/1 or bool.
      scores: ``[n]`` finite real scores.
      batch_size: samples per batch (the official code's test batch: 1,000).

    Returns:
      The batch-wise GAUC as a Python float; ``nan`` when no group has both classes.
    """
    if not isinstance(batch_size, int | np.integer) or isinstance(batch_size, bool) \
            or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}.")
    users, y, s = _grouped_inputs("gauc_batch", user_ids, labels, scores)
    batch_ids = np.arange(y.shape[0], dtype=np.int64) // int(batch_size)
    return _weighted_auc(*_per_user_auc(users, y, s, batch_ids))


def logloss(labels: object, probs: object, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy ``-mean(y log p + (1 - y) log(1 - p))``.

    Args:
      labels: ``[n]`` targets in ``[0, 1]`` (0/1 labels, or soft labels).
      probs: ``[n]`` predicted probabilities in ``[0, 1]``; clipped to ``[eps, 1 - eps]`` so a
        confident mistake costs ``-log(eps)`` instead of infinity.
      eps: clipping margin, in ``(0, 0.5)``.
    """
    if not 0.0 < eps < 0.5:
        raise ValueError(f"eps must be in (0, 0.5); got {eps}.")
    y = _as_1d(labels, "labels").astype(np.float64)
    if y.shape[0] == 0:
        raise ValueError("logloss needs at least one sample; got empty labels.")
    bad = ~((y >= 0) & (y <= 1))
    if np.any(bad):
        raise ValueError(f"labels must be in [0, 1]; got {y[bad][:5].tolist()}.")
    p = _finite_scores(probs, "probs", y.shape[0]).astype(np.float64)
    bad = (p < 0) | (p > 1)
    if np.any(bad):
        raise ValueError(f"probs must be in [0, 1]; got {p[bad][:5].tolist()}.")
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


# --------------------------------------------------------------------------------------------
# Streaming GAUC (Keras)
# --------------------------------------------------------------------------------------------


def gauc_tf(user_ids: tf.Tensor, labels: tf.Tensor, scores: tf.Tensor) -> tf.Tensor:
    """:func:`gauc` in TensorFlow ops (float64 scalar; ``nan`` when no user has both classes).

    Args:
      user_ids: ``[n]`` int user keys.
      labels: ``[n]`` 0/1.
      scores: ``[n]`` real scores.
    """
    user_ids = tf.reshape(user_ids, [-1])
    labels = tf.cast(tf.reshape(labels, [-1]), tf.float64)
    scores = tf.cast(tf.reshape(scores, [-1]), tf.float64)
    # Dense user index (in order of first appearance); only grouping matters, not user order.
    user_index = tf.unique(user_ids, out_idx=tf.int32).idx
    # Two stable sorts = one sort by (user, score).
    by_score = tf.argsort(scores, stable=True)
    by_user = tf.argsort(tf.gather(user_index, by_score), stable=True)
    order = tf.gather(by_score, by_user)
    users = tf.gather(user_index, order)
    s = tf.gather(scores, order)
    y = tf.gather(labels, order)
    n = tf.shape(users)[0]
    first = tf.ones([1], dtype=tf.bool)
    new_user = tf.concat([first, tf.not_equal(users[1:], users[:-1])], axis=0)
    new_group = tf.logical_or(new_user, tf.concat([first, tf.not_equal(s[1:], s[:-1])], axis=0))
    user = tf.cumsum(tf.cast(new_user, tf.int32)) - 1
    group = tf.cumsum(tf.cast(new_group, tf.int32)) - 1
    position = tf.range(n, dtype=tf.int32)
    user_start = tf.math.segment_min(position, user)
    within_rank = tf.cast(position - tf.gather(user_start, user), tf.float64) + 1.0
    ranks = tf.gather(tf.math.segment_mean(within_rank, group), group)
    counts = tf.math.segment_sum(tf.ones_like(y), user)
    num_pos = tf.math.segment_sum(y, user)
    num_neg = counts - num_pos
    rank_sum = tf.math.segment_sum(ranks * y, user)
    kept = tf.logical_and(num_pos > 0, num_neg > 0)
    user_auc = tf.math.divide_no_nan(rank_sum - num_pos * (num_pos + 1) / 2, num_pos * num_neg)
    weights = tf.where(kept, counts, tf.zeros_like(counts))
    return tf.reduce_sum(weights * user_auc) / tf.reduce_sum(weights)


@tf.keras.utils.register_keras_serializable(package="muse_tf")
class GAUC(tf.keras.metrics.Metric):
    """Streaming group AUC (same value as :func:`gauc`).

    ``GAUC = sum_u n_u AUC_u / sum_u n_u`` over users with both classes (MUSE, Sec. 5).
    GAUC does not decompose over batches, so this metric is accumulate-then-compute: every
    ``update_state`` writes the batch's ``(user, label, score)`` into three ``tf.Variable``
    buffers (shape ``[None]``, capacity doubled when full, so appending is amortised O(batch)),
    and ``result`` computes GAUC over the ``count`` samples held, with stock TensorFlow ops
    (:func:`gauc_tf`) in the graph ``model.evaluate`` builds. Memory: 16 bytes per sample
    seen since the last ``reset_state`` (up to twice that while the buffers grow).

    Because the user id is a feature and not part of ``(y_true, y_pred)``, the caller passes it
    explicitly: a model's ``compute_loss`` / ``test_step`` calls
    ``gauc.update_state(labels, predictions, user_ids=users)``; a metric held as a model
    attribute is reported (and reset) by ``model.evaluate``.

    Single-replica only: the buffers are appended to, which has no cross-replica reduction.

    Shapes: ``y_true`` ``[batch]`` or ``[batch, 1]`` 0/1; ``y_pred`` the same shape, scores;
    ``user_ids`` ``[batch]`` (or ``[batch, 1]``) int64.
    """

    def __init__(self, name: str = "gauc", dtype: tf.DType | str | None = None, **kwargs):
        super().__init__(name=name, dtype=dtype, **kwargs)
        self.count = tf.Variable(0, dtype=tf.int32, trainable=False, name="count")
        self.user_buffer = self._buffer(tf.int64, "user_ids")
        self.label_buffer = self._buffer(tf.float32, "labels")
        self.score_buffer = self._buffer(tf.float32, "scores")

    @staticmethod
    def _buffer(dtype: tf.DType, name: str) -> tf.Variable:
        return tf.Variable(
            tf.zeros([0], dtype), shape=tf.TensorShape([None]), trainable=False, name=name
        )

    def update_state(
        self,
        y_true: tf.Tensor,
        y_pred: tf.Tensor,
        sample_weight: tf.Tensor | None = None,
        user_ids: tf.Tensor | None = None,
    ) -> tf.Operation:
        if user_ids is None:
            raise ValueError(
                "GAUC.update_state needs user_ids (the [batch] user id of each sample); got None."
            )
        if sample_weight is not None:
            raise ValueError(
                "GAUC does not support sample_weight (a weighted GAUC is not defined here); "
                "drop padded rows before update_state instead."
            )
        labels = tf.reshape(tf.cast(y_true, tf.float32), [-1])
        scores = tf.reshape(tf.cast(y_pred, tf.float32), [-1])
        users = tf.reshape(tf.cast(user_ids, tf.int64), [-1])
        tf.debugging.assert_equal(
            tf.size(scores), tf.size(labels),
            message="GAUC: y_pred and y_true have different numbers of values",
        )
        tf.debugging.assert_equal(
            tf.size(users), tf.size(labels),
            message="GAUC: user_ids and y_true have different numbers of values",
        )
        buffers = ((self.user_buffer, users), (self.label_buffer, labels),
                   (self.score_buffer, scores))
        count = self.count.read_value()
        needed = count + tf.size(labels)
        capacity = tf.shape(self.user_buffer)[0]

        def grow() -> tf.Tensor:
            new_capacity = tf.maximum(2 * capacity, needed)
            for buffer, _ in buffers:
                padding = tf.zeros([new_capacity - count], buffer.dtype)
                buffer.assign(tf.concat([buffer[:count], padding], axis=0))
            return new_capacity

        tf.cond(needed > capacity, grow, lambda: capacity)
        for buffer, values in buffers:
            buffer[count:needed].assign(values)
        return self.count.assign(needed)

    def result(self) -> tf.Tensor:
        count = self.count.read_value()
        return tf.cast(
            gauc_tf(self.user_buffer[:count], self.label_buffer[:count],
                    self.score_buffer[:count]),
            self.dtype,
        )

    def reset_state(self) -> None:
        self.count.assign(0)
        for buffer in (self.user_buffer, self.label_buffer, self.score_buffer):
            buffer.assign(tf.zeros([0], buffer.dtype))

    def get_config(self) -> dict:
        return super().get_config()


# --------------------------------------------------------------------------------------------
# Retrieval metrics
# --------------------------------------------------------------------------------------------


def recall_at_n(
    retrieved_ids: object, target_ids: object, ns: Sequence[int] = (50, 100, 200)
) -> dict[str, float]:
    """Share of queries whose target item is among the first ``n`` retrieved items.

    Args:
      retrieved_ids: ``[Q, N']`` item ids per query, best first (duplicates and padding ids are
        harmless: only membership of the target in the first ``n`` columns counts).
      target_ids: ``[Q]`` (or ``[Q, 1]``) the target item id of each query.
      ns: the cut-offs; each must satisfy ``1 <= n <= N'``.

    Returns:
      ``{"recall@n": share}`` for each ``n`` in ``ns``, shares in ``[0, 1]``.
    """
    retrieved = np.asarray(retrieved_ids)
    if retrieved.ndim != 2:
        raise ValueError(f"retrieved_ids must be [Q, N']; got shape {retrieved.shape}.")
    targets = _as_1d(target_ids, "target_ids")
    if targets.shape[0] != retrieved.shape[0]:
        raise ValueError(
            f"target_ids has {targets.shape[0]} queries but retrieved_ids has "
            f"{retrieved.shape[0]}."
        )
    if retrieved.shape[0] == 0:
        raise ValueError("recall_at_n needs at least one query; got Q = 0.")
    width = retrieved.shape[1]
    for n in ns:
        if not 1 <= int(n) <= width:
            raise ValueError(f"recall cut-off n={n} must be in [1, {width}] (retrieved width).")
    hits = retrieved == targets[:, None]
    # Position of the first hit (width when absent), then one comparison per cut-off.
    first_hit = np.where(hits.any(axis=1), hits.argmax(axis=1), width)
    return {f"recall@{int(n)}": float(np.mean(first_hit < int(n))) for n in ns}


def hierarchical_recall(
    kept_nodes_per_level: Sequence[object], positive_nodes_per_level: object
) -> np.ndarray:
    """Per-level share of the positives' ancestors that the beam kept.

    Args:
      kept_nodes_per_level: a sequence of ``L'`` arrays; entry ``j`` is ``[Q, K_j]``, the node
        ids the beam search kept at its ``j``-th searched level for each query (e.g.
        ``BeamSearchResult.kept_nodes``; ``K_j`` may differ per level).
      positive_nodes_per_level: ``[Q, L']``; column ``j`` is the node id, at the same level as
        ``kept_nodes_per_level[j]``, of the ancestor of the query's positive item (e.g.
        ``tree.ancestors(targets, include_root=True)[:, result.levels]``).

    Returns:
      float64 ``[L']``: entry ``j`` is the share of queries whose column-``j`` positive node is
      among ``kept_nodes_per_level[j]`` of that query.
    """
    positives = np.asarray(positive_nodes_per_level)
    if positives.ndim != 2:
        raise ValueError(
            f"positive_nodes_per_level must be [Q, L']; got shape {positives.shape}."
        )
    num_queries, num_levels = positives.shape
    if len(kept_nodes_per_level) != num_levels:
        raise ValueError(
            f"kept_nodes_per_level has {len(kept_nodes_per_level)} levels but "
            f"positive_nodes_per_level has {num_levels} columns."
        )
    if num_queries == 0:
        raise ValueError("hierarchical_recall needs at least one query; got Q = 0.")
    recall = np.empty(num_levels, dtype=np.float64)
    for j, kept in enumerate(kept_nodes_per_level):
        kept = np.asarray(kept)
        if kept.ndim != 2 or kept.shape[0] != num_queries:
            raise ValueError(
                f"kept_nodes_per_level[{j}] must be [Q={num_queries}, K]; got shape {kept.shape}."
            )
        recall[j] = np.mean(np.any(kept == positives[:, j : j + 1], axis=1))
    return recall
