"""Tests of muse_tf.layers.attention_gsu.AttentionGSU (TWIN-style)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from muse_tf.layers import AttentionGSU, MultiHeadAttentionLogits, TargetAttention
from muse_tf.layers.search_unit import ID

from .harness import assert_config_round_trip, assert_round_trips
from .reference import multi_head_attention_reference, top_k_reference


def _call(layer, target, history, mask):
    return layer({ID: target}, {ID: history}, mask=mask)


def _set_kernels(layer, w_q, w_k):
    layer.logits_layer.query_kernel.assign(w_q)
    layer.logits_layer.key_kernel.assign(w_k)


def test_hand_computed_two_heads():
    # Head 1 scores q[0] * k[1], head 2 scores q[1] * k[0] (head_dim 1, so sqrt(d) = 1).
    w_q = np.array([[[1.0], [0.0]], [[0.0], [1.0]]], np.float32)  # [D=2, H=2, d=1]
    w_k = np.array([[[0.0], [1.0]], [[1.0], [0.0]]], np.float32)
    target = np.array([[2.0, 5.0]], np.float32)
    history = np.array([[[1.0, 3.0], [7.0, -1.0], [0.0, 0.5], [100.0, 100.0]]], np.float32)
    mask = np.array([[True, True, True, False]])
    layer = AttentionGSU(top_k=2, num_heads=2, head_dim=1)
    _call(layer, target, history, mask)
    _set_kernels(layer, w_q, w_k)
    out = _call(layer, target, history, mask)
    # head 1: 2 * [3, -1, 0.5] = [6, -2, 1]; head 2: 5 * [1, 7, 0] = [5, 35, 0]; mean:
    # [5.5, 16.5, 0.5]; position 3 is padding.
    assert out["indices"].numpy().tolist() == [[1, 0]]
    np.testing.assert_allclose(out["scores"].numpy(), [[16.5, 5.5]])


def test_head_mean_of_textbook_attention_matches_numpy():
    rng = np.random.default_rng(2)
    # Seeded kernels: the comparison is fixed, with no near-ties.
    layer = AttentionGSU(top_k=7, num_heads=3, head_dim=4,
                         kernel_initializer=tf.keras.initializers.GlorotUniform(seed=2))
    target = rng.standard_normal((3, 5)).astype(np.float32)
    history = rng.standard_normal((3, 60, 5)).astype(np.float32)
    mask = rng.random((3, 60)) < 0.6
    out = _call(layer, target, history, mask)
    w_q = layer.logits_layer.query_kernel.numpy()
    w_k = layer.logits_layer.key_kernel.numpy()
    assert not np.allclose(w_q, w_k)  # kernels start different
    scores = multi_head_attention_reference(target, history, w_q, w_k).mean(axis=1)
    expected = top_k_reference(scores, mask, 7)
    np.testing.assert_array_equal(out["indices"].numpy(), expected["indices"])
    np.testing.assert_allclose(out["scores"].numpy(), expected["scores"], rtol=1e-5, atol=1e-5)


def test_scores_are_differentiable_with_respect_to_the_projections():
    layer = AttentionGSU(top_k=2, num_heads=2, head_dim=3)
    target = tf.constant([[1.0, 0.5, -1.0]])
    history = tf.constant([[[0.2, 0.1, 0.0], [1.0, -1.0, 0.5], [0.3, 0.3, 0.3]]])
    mask = tf.constant([[True, True, True]])
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(_call(layer, target, history, mask)["scores"])
    grads = tape.gradient(loss, layer.trainable_weights)
    assert len(grads) == 2 and all(np.abs(g.numpy()).sum() > 0 for g in grads)


def test_large_history_runs():
    rng = np.random.default_rng(0)
    history = rng.standard_normal((2, 100_000, 8)).astype(np.float32)
    mask = np.ones((2, 100_000), bool)
    mask[:, ::2] = False
    out = _call(AttentionGSU(top_k=50), history[:, 0], history, mask)
    assert out["mask"].numpy().all()
    assert (out["indices"].numpy() % 2 == 1).all()


def test_error_names_argument_and_bad_head_count():
    with pytest.raises(ValueError, match=r"AttentionGSU: `num_heads` must be a positive int, "
                                         r"got 0"):
        AttentionGSU(top_k=2, num_heads=0)
    with pytest.raises(ValueError, match=r"AttentionGSU: `history\['id'\]` must have rank 3 "
                                         r"\[batch, seq_len, dim\], got rank 2 with shape "
                                         r"\(1, 4\)"):
        _call(AttentionGSU(top_k=2), tf.zeros([1, 4]), tf.zeros([1, 4]), tf.ones([1, 4], tf.bool))
    with pytest.raises(ValueError, match=r"AttentionGSU: the embedding size of `target\['id'\]` "
                                         r"\(shape \(1, 2, 3\)\) is 3 but that of "
                                         r"`history\['id'\]` \(shape \(1, 4, 5\)\) is 5"):
        _call(AttentionGSU(top_k=2), tf.zeros([1, 2, 3]), tf.zeros([1, 4, 5]),
              tf.ones([1, 4], tf.bool))
    with pytest.raises(ValueError, match=r"AttentionGSU: `logits_layer` must be a "
                                         r"MultiHeadAttentionLogits, got TargetAttention"):
        AttentionGSU(top_k=2, logits_layer=TargetAttention(2, 3))


def test_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    args = ({ID: rng.standard_normal((2, 4)).astype(np.float32)},
            {ID: rng.standard_normal((2, 6, 4)).astype(np.float32)})
    mask = np.array([[True] * 6, [True, False, True, False, False, False]])
    assert_round_trips(AttentionGSU(top_k=3, num_heads=2, head_dim=3), args, {"mask": mask},
                       tmp_path)


# --- candidate axis ------------------------------------------------------------------------

def test_candidate_axis_equals_single_searches_and_numpy():
    rng = np.random.default_rng(9)
    batch, candidates, length, dim, k = 2, 3, 25, 5, 6
    layer = AttentionGSU(top_k=k, num_heads=3, head_dim=2,
                         kernel_initializer=tf.keras.initializers.GlorotUniform(seed=9))
    targets = rng.standard_normal((batch, candidates, dim)).astype(np.float32)
    history = rng.standard_normal((batch, length, dim)).astype(np.float32)
    mask = rng.random((batch, length)) < 0.7
    together = _call(layer, targets, history, mask)
    assert together["indices"].shape == (batch, candidates, k)
    w_q = layer.logits_layer.query_kernel.numpy()
    w_k = layer.logits_layer.key_kernel.numpy()
    for c in range(candidates):
        alone = _call(layer, targets[:, c], history, mask)
        for key in ("indices", "mask"):
            np.testing.assert_array_equal(together[key][:, c].numpy(), alone[key].numpy())
        np.testing.assert_allclose(together["scores"][:, c].numpy(), alone["scores"].numpy(),
                                   rtol=1e-5, atol=1e-6)
        scores = multi_head_attention_reference(targets[:, c], history, w_q, w_k).mean(axis=1)
        expected = top_k_reference(scores, mask, k)
        np.testing.assert_array_equal(together["indices"][:, c].numpy(), expected["indices"])
        np.testing.assert_allclose(together["scores"][:, c].numpy(), expected["scores"],
                                   rtol=1e-5, atol=1e-5)


# --- TWIN: one set of logits weights shared with the ESU's TargetAttention ----------------

class _Twin(tf.keras.Model):
    """The search and the ESU in one model (what a TWIN ranking model holds)."""

    def __init__(self, gsu, att):
        super().__init__()
        self.gsu, self.att = gsu, att


def _twin_case(seed=7, batch=2, length=30, dim=5):
    rng = np.random.default_rng(seed)
    target = rng.standard_normal((batch, dim)).astype(np.float32)
    history = rng.standard_normal((batch, length, dim)).astype(np.float32)
    mask = rng.random((batch, length)) < 0.7
    return rng, target, history, mask


def _retrieved(history, selected):
    indices = selected["indices"].numpy()
    return np.take_along_axis(history, indices[..., None], axis=1), selected["mask"].numpy()


@pytest.mark.parametrize("gsu_first", [True, False])
def test_shares_one_set_of_logits_weights_with_target_attention(gsu_first):
    rng, target, history, mask = _twin_case()
    att = TargetAttention(2, 3)
    gsu = AttentionGSU(4, num_heads=7, head_dim=9, logits_layer=att.logits_layer)
    assert (gsu.num_heads, gsu.head_dim) == (2, 3)  # taken from the shared layer
    if gsu_first:
        selected = _call(gsu, target, history, mask)
        keys, key_mask = _retrieved(history, selected)
        att(target, keys, mask=key_mask)
    else:
        att(target, history[:, :4], mask=mask[:, :4])
        selected = _call(gsu, target, history, mask)
    logits = att.logits_layer
    assert gsu.logits_layer is logits
    assert gsu.weights[0] is logits.query_kernel and gsu.weights[1] is logits.key_kernel
    assert [id(w) for w in gsu.weights] == [id(logits.query_kernel), id(logits.key_kernel)]
    assert {id(w) for w in gsu.weights} < {id(w) for w in att.weights}
    assert len(att.weights) == 3  # W_q, W_k (shared) and W_v
    twin = _Twin(gsu, att)
    assert len(twin.weights) == len({id(w) for w in twin.weights}) == 3
    assert len(twin.trainable_weights) == 3

    # The GSU's scores are the head mean of the ESU's logits, over the whole history.
    w_q, w_k = logits.query_kernel.numpy(), logits.key_kernel.numpy()
    reference = multi_head_attention_reference(target, history, w_q, w_k)
    np.testing.assert_allclose(
        reference, att.attention_logits(tf.constant(target), tf.constant(history)).numpy(),
        rtol=1e-5, atol=1e-5)
    expected = top_k_reference(reference.mean(axis=1), mask, 4)
    np.testing.assert_array_equal(selected["indices"].numpy(), expected["indices"])
    np.testing.assert_array_equal(selected["mask"].numpy(), expected["mask"])
    np.testing.assert_allclose(selected["scores"].numpy(), expected["scores"],
                               rtol=1e-5, atol=1e-5)

    # Training the ESU's query kernel moves the search with it.
    new_w_q = rng.standard_normal(w_q.shape).astype(np.float32)
    att.logits_layer.query_kernel.assign(new_w_q)
    moved = _call(gsu, target, history, mask)
    assert not np.allclose(moved["scores"].numpy(), selected["scores"].numpy())
    reference = multi_head_attention_reference(target, history, new_w_q, w_k).mean(axis=1)
    expected = top_k_reference(reference, mask, 4)
    np.testing.assert_array_equal(moved["indices"].numpy(), expected["indices"])
    np.testing.assert_allclose(moved["scores"].numpy(), expected["scores"], rtol=1e-5,
                               atol=1e-5)


def test_shared_candidate_axis_equals_single_searches():
    rng, _, history, mask = _twin_case(seed=10)
    att = TargetAttention(2, 3, kernel_initializer=tf.keras.initializers.GlorotUniform(seed=1))
    gsu = AttentionGSU(5, logits_layer=att.logits_layer)
    targets = rng.standard_normal((2, 4, 5)).astype(np.float32)
    together = _call(gsu, targets, history, mask)
    att(targets[:, 0], history[:, :5], mask=mask[:, :5])
    w_q = att.logits_layer.query_kernel.numpy()
    w_k = att.logits_layer.key_kernel.numpy()
    for c in range(4):
        alone = _call(gsu, targets[:, c], history, mask)
        for key in ("indices", "mask"):
            np.testing.assert_array_equal(together[key][:, c].numpy(), alone[key].numpy())
        np.testing.assert_allclose(together["scores"][:, c].numpy(), alone["scores"].numpy(),
                                   rtol=1e-5, atol=1e-6)
        scores = multi_head_attention_reference(targets[:, c], history, w_q, w_k).mean(axis=1)
        np.testing.assert_array_equal(together["indices"][:, c].numpy(),
                                      top_k_reference(scores, mask, 5)["indices"])


def test_shared_scores_train_the_esu_weights():
    _, target, history, mask = _twin_case(seed=11)
    att = TargetAttention(2, 3)
    gsu = AttentionGSU(3, logits_layer=att.logits_layer)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(_call(gsu, target, history, mask)["scores"])
    grads = tape.gradient(loss, att.logits_layer.trainable_weights)
    assert len(grads) == 2 and all(np.abs(g.numpy()).sum() > 0 for g in grads)


def test_shared_layer_built_for_other_keys_is_an_error():
    att = TargetAttention(2, 3)
    att(tf.zeros([1, 5]), tf.zeros([1, 4, 6]), mask=tf.ones([1, 4], tf.bool))  # D_k = 6
    gsu = AttentionGSU(2, logits_layer=att.logits_layer)
    with pytest.raises(ValueError, match=r"MultiHeadAttentionLogits: built for keys of size 6, "
                                         r"got keys of size 5"):
        _call(gsu, tf.zeros([1, 5]), tf.zeros([1, 4, 5]), tf.ones([1, 4], tf.bool))


def test_shared_config_round_trip_rebuilds_an_owned_copy():
    _, target, history, mask = _twin_case(seed=12, length=8)
    att = TargetAttention(2, 3)
    gsu = AttentionGSU(3, logits_layer=att.logits_layer)
    args = ({ID: target}, {ID: history})
    assert_config_round_trip(gsu, args, {"mask": mask})
    config = gsu.get_config()
    assert config["logits_layer"] == tf.keras.layers.serialize(att.logits_layer)
    clone = AttentionGSU.from_config(config)
    assert isinstance(clone.logits_layer, MultiHeadAttentionLogits)
    assert clone.logits_layer is not att.logits_layer
    assert (clone.num_heads, clone.head_dim) == (2, 3)
    _call(clone, target, history, mask)
    assert not {id(w) for w in clone.weights} & {id(w) for w in att.weights}
