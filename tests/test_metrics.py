"""Tests for muse_tf.metrics against plain-Python reference implementations."""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pytest
import tensorflow as tf

from muse_tf import metrics

# ------------------------------------------------------------------------------ references


def pairwise_auc(labels, scores) -> float:
    """Brute force: share of (positive, negative) pairs ordered right, ties one half."""
    pos = [s for y, s in zip(labels, scores, strict=True) if y == 1]
    neg = [s for y, s in zip(labels, scores, strict=True) if y == 0]
    if not pos or not neg:
        return math.nan
    total = 0.0
    for p in pos:
        for n in neg:
            total += 1.0 if p > n else 0.5 if p == n else 0.0
    return total / (len(pos) * len(neg))


def reference_gauc(users, labels, scores) -> float:
    """The plain loop: one group per user over all samples."""
    return reference_gauc_batch(users, labels, scores, max(len(labels), 1))


def random_case(rng, n, num_users, num_levels=5):
    """Scores drawn from a few levels, so ties are frequent (within and across users)."""
    users = rng.integers(-(2**62), 2**62, size=num_users)[rng.integers(0, num_users, n)]
    labels = rng.integers(0, 2, n)
    scores = rng.integers(0, num_levels, n) / num_levels + 0.1 * labels * rng.integers(0, 2, n)
    return users, labels, scores.astype(np.float64)


# ------------------------------------------------------------------------------ auc


def test_auc_tiny_exact():
    # pairs: (0.8 > 0.3), (0.8 > 0.5), (0.4 > 0.3), (0.4 < 0.5) -> 3 / 4
    assert metrics.auc([1, 0, 1, 0], [0.8, 0.3, 0.4, 0.5]) == pytest.approx(0.75)
    # one tie among four pairs: (0.5 = 0.5) counts one half -> 3.5 / 4
    assert metrics.auc([1, 1, 0, 0], [0.5, 0.9, 0.5, 0.1]) == pytest.approx(0.875)
    assert metrics.auc([0, 1], [0.2, 0.2]) == pytest.approx(0.5)
    assert metrics.auc([True, False], [0.1, 0.9]) == pytest.approx(0.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_matches_pairwise_reference_with_ties(seed):
    rng = np.random.default_rng(seed)
    _, labels, scores = random_case(rng, 300, 1)
    assert metrics.auc(labels, scores) == pytest.approx(pairwise_auc(labels, scores), abs=1e-12)
    # [n, 1] columns (Keras-shaped) are accepted.
    assert metrics.auc(labels[:, None], scores[:, None]) == pytest.approx(
        pairwise_auc(labels, scores), abs=1e-12
    )


def test_auc_single_class_is_nan():
    assert math.isnan(metrics.auc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert math.isnan(metrics.auc([0], [0.1]))


@pytest.mark.parametrize(
    ("labels", "scores", "match"),
    [
        ([0, 2], [0.1, 0.2], "must be 0 or 1"),
        ([0, 1], [0.1], "has 1 values but labels has 2"),
        ([0, 1], [0.1, np.nan], "must be finite"),
        ([], [], "at least one sample"),
        ([[0, 1], [1, 0]], [0.1, 0.2, 0.3, 0.4], "must be 1-D"),
    ],
)
def test_auc_bad_input(labels, scores, match):
    with pytest.raises(ValueError, match=match):
        metrics.auc(labels, scores)


# ------------------------------------------------------------------------------ gauc


def test_gauc_tiny_exact():
    users = [7, 7, 7, 7, 9, 9, 9, 5, 5]
    labels = [1, 0, 1, 0, 1, 0, 0, 1, 1]  # user 5 is all positive: skipped
    scores = [0.8, 0.3, 0.4, 0.5, 0.2, 0.2, 0.1, 0.1, 0.2]
    # user 7: 3/4 with 4 samples; user 9: (0.5 + 1) / 2 = 0.75 with 3 samples.
    assert metrics.gauc(users, labels, scores) == pytest.approx((4 * 0.75 + 3 * 0.75) / 7)
    labels[1] = 1  # user 7's only negative is now 0.5: (0.8 > 0.5) + 0 + 0 = 1 / 3
    expected = (4 * (1 / 3) + 3 * 0.75) / 7
    assert metrics.gauc(users, labels, scores) == pytest.approx(expected)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gauc_matches_reference_with_ties(seed):
    rng = np.random.default_rng(seed)
    users, labels, scores = random_case(rng, 2000, 60)
    assert metrics.gauc(users, labels, scores) == pytest.approx(
        reference_gauc(users, labels, scores), abs=1e-12
    )


def test_gauc_one_user_equals_auc_and_order_invariance():
    rng = np.random.default_rng(3)
    _, labels, scores = random_case(rng, 200, 1)
    users = np.full(200, 42)
    assert metrics.gauc(users, labels, scores) == pytest.approx(metrics.auc(labels, scores))
    users, labels, scores = random_case(rng, 500, 20)
    perm = rng.permutation(500)
    assert metrics.gauc(users[perm], labels[perm], scores[perm]) == pytest.approx(
        metrics.gauc(users, labels, scores), abs=1e-12
    )


def test_gauc_all_users_one_class_is_nan():
    assert math.isnan(metrics.gauc([1, 1, 2], [1, 1, 0], [0.3, 0.2, 0.1]))


def test_gauc_bad_input():
    with pytest.raises(ValueError, match="user_ids has 2 values but labels has 3"):
        metrics.gauc([1, 2], [0, 1, 0], [0.1, 0.2, 0.3])


def test_gauc_is_fast_on_a_million_samples():
    rng = np.random.default_rng(0)
    n = 1_000_000
    users = rng.integers(0, 100_000, n)
    labels = rng.integers(0, 2, n)
    scores = rng.random(n).astype(np.float32)
    start = time.perf_counter()
    value = metrics.gauc(users, labels, scores)
    elapsed = time.perf_counter() - start
    assert 0.45 < value < 0.55  # random scores
    assert elapsed < 10.0  # about 1 s on 2 cores; generous for a loaded machine


# ------------------------------------------------------------------------------ gauc_batch


def reference_gauc_batch(users, labels, scores, batch_size) -> float:
    """The official loop: per batch of ``batch_size`` samples, per user in the batch."""
    num = den = 0.0
    for start in range(0, len(labels), batch_size):
        groups: dict[int, list[tuple[int, float]]] = {}
        for u, y, s in zip(users[start:start + batch_size], labels[start:start + batch_size],
                           scores[start:start + batch_size], strict=True):
            groups.setdefault(int(u), []).append((int(y), float(s)))
        for rows in groups.values():
            value = pairwise_auc([r[0] for r in rows], [r[1] for r in rows])
            if not math.isnan(value):
                num += len(rows) * value
                den += len(rows)
    return num / den if den else math.nan


def test_gauc_batch_tiny_case_differs_from_the_global_gauc():
    # Two batches of 4. Batch 0: user 1 ranks right (AUC 1, n 2), user 2 wrong (AUC 0, n 2).
    # Batch 1: user 1 wrong (0.3 < 0.4: AUC 0, n 2); users 2 and 3 one sample each: skipped.
    users = [1, 1, 2, 2, 1, 1, 2, 3]
    labels = [1, 0, 1, 0, 1, 0, 1, 0]
    scores = [0.9, 0.1, 0.2, 0.8, 0.3, 0.4, 0.5, 0.6]
    assert metrics.gauc_batch(users, labels, scores, batch_size=4) == pytest.approx(
        (2 * 1 + 2 * 0 + 2 * 0) / 6)
    # Over the whole split: user 1 has positives {0.9, 0.3}, negatives {0.1, 0.4}: 3 of 4
    # pairs right (n 4); user 2 positives {0.2, 0.5}, negative {0.8}: 0 (n 3); user 3 skipped.
    assert metrics.gauc(users, labels, scores) == pytest.approx((4 * 0.75 + 3 * 0) / 7)
    # One batch holding everything is the global GAUC.
    assert metrics.gauc_batch(users, labels, scores, batch_size=8) == pytest.approx(3 / 7)
    assert metrics.gauc_batch(users, labels, scores) == pytest.approx(3 / 7)  # 1,000 default


@pytest.mark.parametrize("batch_size", [1, 7, 100, 5000])
def test_gauc_batch_matches_the_official_loop(batch_size):
    rng = np.random.default_rng(batch_size)
    users, labels, scores = random_case(rng, 1500, 40)
    expected = reference_gauc_batch(users, labels, scores, batch_size)
    value = metrics.gauc_batch(users, labels, scores, batch_size=batch_size)
    if math.isnan(expected):  # batch_size 1: no batch has two classes
        assert math.isnan(value)
    else:
        assert value == pytest.approx(expected, abs=1e-12)


def test_gauc_batch_bad_input():
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        metrics.gauc_batch([1], [1], [0.5], batch_size=0)
    with pytest.raises(ValueError, match="user_ids has 2 values but labels has 3"):
        metrics.gauc_batch([1, 2], [0, 1, 0], [0.1, 0.2, 0.3])


# ------------------------------------------------------------------------------ logloss


def test_logloss_exact_and_clipping():
    expected = -(math.log(0.9) + math.log(1 - 0.2)) / 2
    assert metrics.logloss([1, 0], [0.9, 0.2]) == pytest.approx(expected)
    assert metrics.logloss([1, 0], [0.0, 1.0], eps=1e-7) == pytest.approx(-math.log(1e-7))
    labels = np.array([1, 0, 1, 1])
    probs = np.array([0.7, 0.1, 0.4, 0.99])
    keras_value = tf.keras.losses.binary_crossentropy(labels[None].astype("float32"), probs[None])
    assert metrics.logloss(labels, probs) == pytest.approx(float(keras_value[0]), rel=1e-5)


@pytest.mark.parametrize(
    ("labels", "probs", "match"),
    [([0, 1], [0.5, 1.5], "probs must be in"), ([2, 1], [0.5, 0.5], "labels must be in")],
)
def test_logloss_bad_input(labels, probs, match):
    with pytest.raises(ValueError, match=match):
        metrics.logloss(labels, probs)


# ------------------------------------------------------------------------------ streaming GAUC


def test_gauc_tf_matches_numpy():
    rng = np.random.default_rng(5)
    users, labels, scores = random_case(rng, 1500, 40)
    value = metrics.gauc_tf(tf.constant(users), tf.constant(labels), tf.constant(scores))
    assert float(value) == pytest.approx(metrics.gauc(users, labels, scores), abs=1e-12)


def test_gauc_metric_accumulates_across_batches_and_resets():
    rng = np.random.default_rng(6)
    users, labels, scores = random_case(rng, 700, 30)
    scores = scores.astype(np.float32)
    metric = metrics.GAUC()
    for begin in range(0, 700, 128):
        sl = slice(begin, begin + 128)
        metric.update_state(labels[sl, None], scores[sl, None], user_ids=users[sl])
    assert float(metric.result()) == pytest.approx(metrics.gauc(users, labels, scores), abs=1e-6)
    metric.reset_state()
    metric.update_state(labels[:50], scores[:50], user_ids=users[:50])
    assert float(metric.result()) == pytest.approx(
        metrics.gauc(users[:50], labels[:50], scores[:50]), abs=1e-6
    )


def test_gauc_metric_buffers_grow_by_doubling_in_a_tf_function():
    rng = np.random.default_rng(8)
    users, labels, scores = random_case(rng, 400, 15)
    scores = scores.astype(np.float32)
    sizes = rng.integers(1, 9, size=200)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    bounds = bounds[bounds <= 400]
    metric = metrics.GAUC()

    @tf.function(reduce_retracing=True)
    def update(y, p, u):
        metric.update_state(y, p, user_ids=u)

    for begin, end in itertools.pairwise(bounds):
        update(labels[begin:end], scores[begin:end], users[begin:end])
    seen = int(bounds[-1])
    assert int(metric.count) == seen
    capacity = int(tf.shape(metric.user_buffer)[0])
    assert seen <= capacity < 2 * seen + 8  # doubled, not grown per batch nor unbounded
    np.testing.assert_array_equal(metric.user_buffer[:seen], users[:seen])
    assert float(metric.result()) == pytest.approx(
        metrics.gauc(users[:seen], labels[:seen], scores[:seen]), abs=1e-6
    )


def test_gauc_metric_requires_user_ids_and_round_trips_config():
    metric = metrics.GAUC(name="user_gauc")
    with pytest.raises(ValueError, match="needs user_ids"):
        metric.update_state([1, 0], [0.3, 0.2])
    with pytest.raises(ValueError, match="sample_weight"):
        metric.update_state([1, 0], [0.3, 0.2], sample_weight=[1.0, 1.0], user_ids=[1, 1])
    clone = tf.keras.metrics.deserialize(tf.keras.metrics.serialize(metric))
    assert isinstance(clone, metrics.GAUC) and clone.name == "user_gauc"


class _UserModel(tf.keras.Model):
    """A logistic model whose test_step feeds GAUC the batch's user ids."""

    def __init__(self):
        super().__init__()
        self.dense = tf.keras.layers.Dense(1, activation="sigmoid")
        self.gauc = metrics.GAUC()

    def call(self, inputs):
        return self.dense(inputs["x"])

    def test_step(self, data):
        features, labels = data
        predictions = self(features, training=False)
        self.gauc.update_state(labels, predictions, user_ids=features["user"])
        return {"gauc": self.gauc.result()}

    @property
    def metrics(self):
        return [self.gauc]


def test_gauc_metric_inside_model_evaluate():
    rng = np.random.default_rng(7)
    n = 600
    users = rng.integers(0, 25, n).astype(np.int64)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    labels = (x[:, 0] + rng.normal(size=n) > 0).astype(np.float32)
    model = _UserModel()
    model.compile()
    data = tf.data.Dataset.from_tensor_slices(({"x": x, "user": users}, labels)).batch(64)
    first = model.evaluate(data, return_dict=True, verbose=0)
    second = model.evaluate(data, return_dict=True, verbose=0)  # state reset between runs
    predictions = model.predict({"x": x, "user": users}, verbose=0)[:, 0]
    expected = metrics.gauc(users, labels, predictions)
    assert first["gauc"] == pytest.approx(expected, abs=1e-6)
    assert second["gauc"] == pytest.approx(expected, abs=1e-6)


# ------------------------------------------------------------------------------ retrieval


def test_recall_at_n_tiny():
    retrieved = np.array([[5, 7, 9, 11], [1, 2, 3, 4], [8, 6, 4, 2]])
    targets = np.array([9, 10, 8])
    got = metrics.recall_at_n(retrieved, targets, ns=(1, 2, 3, 4))
    assert got == {"recall@1": 1 / 3, "recall@2": 1 / 3, "recall@3": 2 / 3, "recall@4": 2 / 3}


def test_recall_at_n_bad_cutoff_and_shapes():
    retrieved = np.zeros((2, 3), dtype=np.int64)
    with pytest.raises(ValueError, match=r"n=4 must be in \[1, 3\]"):
        metrics.recall_at_n(retrieved, [1, 2], ns=(4,))
    with pytest.raises(ValueError, match="target_ids has 3 queries"):
        metrics.recall_at_n(retrieved, [1, 2, 3], ns=(1,))


def test_hierarchical_recall_tiny():
    kept = [
        np.array([[1, 2], [1, 2], [1, 2]]),  # level 1: both nodes kept
        np.array([[3, 4], [5, 6], [3, 6]]),  # level 2
        np.array([[7], [13], [8]]),  # level 3
    ]
    positives = np.array([[1, 3, 7], [2, 5, 11], [1, 4, 10]])
    recall = metrics.hierarchical_recall(kept, positives)
    np.testing.assert_allclose(recall, [1.0, 2 / 3, 1 / 3])


def test_hierarchical_recall_bad_input():
    with pytest.raises(ValueError, match="has 1 levels but"):
        metrics.hierarchical_recall([np.zeros((2, 2))], np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"kept_nodes_per_level\[0\] must be \[Q=2, K\]"):
        metrics.hierarchical_recall([np.zeros((3, 2))], np.zeros((2, 1)))
