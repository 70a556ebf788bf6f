"""The layers in the official MUSE code's configuration (alimama-tech/MUSE), on tiny
hand-computed cases: SimTier's ceil binning, SA-TA's SiLU projections and initial gates,
LayerNorm-Dice, SIM-soft's cosine and the multimodal search's fallback for a target without
a multimodal vector."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from muse_tf.layers import (
    Dice,
    IdEmbeddingGSU,
    MLPTower,
    MultimodalGSU,
    SemanticAwareTargetAttention,
    SimTier,
    TargetAttention,
)
from muse_tf.layers.attention_logits import MultiHeadAttentionLogits
from muse_tf.layers.sim_tier import SELF_MATCH_TOLERANCE

from .harness import assert_round_trips
from .reference import softmax_reference


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


# ----------------------------------------------------------------------------- SimTier


def test_ceil_binning_at_the_tier_edges_matches_the_official_formula():
    layer = SimTier(num_tiers=20, tier_dim=1, binning="ceil")
    assert layer.tier_count == 22
    sims = np.array([-1.0, -0.95, -0.9, -0.1, 0.0, 0.05, 0.1, 0.3, 0.9, 0.95, 0.9999,
                     -1.2], np.float32)
    # Hand-computed: ceil(10 s) + 10 (float32), an edge goes to the lower tier; -1 alone in
    # tier 0, values below -1 clipped to tier 0.
    expected = [0, 1, 1, 9, 10, 11, 11, 13, 19, 20, 20, 0]
    counts = layer.tier_counts(tf.constant(sims[:, None]), tf.ones([len(sims), 1], bool))
    np.testing.assert_array_equal(np.argmax(counts.numpy(), axis=1), expected)
    official = np.ceil(sims * np.float32(1 / np.float32(0.1))).astype(int) + 10
    np.testing.assert_array_equal(np.clip(official, 0, 21), expected)


def test_ceil_binning_puts_every_rounding_of_a_self_match_in_the_last_tier():
    """The official formula sends 1 + ε to tier 21 but 1 - ε and 1.0 to tier 20, so a
    self-match's tier would follow the rounding of one dot product; here all go to 21, and
    a cosine just outside the tolerance stays in tier 20."""
    layer = SimTier(num_tiers=20, tier_dim=1, binning="ceil")
    ulp = np.float32(2.0**-24)
    sims = np.array([1 - 4 * ulp, 1 - ulp, 1.0, 1 + 2 * ulp, 1.5,
                     1 - 2 * SELF_MATCH_TOLERANCE], np.float32)
    counts = layer.tier_counts(tf.constant(sims[:, None]), tf.ones([len(sims), 1], bool))
    np.testing.assert_array_equal(np.argmax(counts.numpy(), axis=1), [21, 21, 21, 21, 21, 20])


def test_ceil_binning_output_is_log1p_count_times_one_weight_per_tier():
    layer = SimTier(num_tiers=20, tier_dim=1, binning="ceil",
                    embeddings_initializer=tf.keras.initializers.RandomUniform(0.0, 1.0))
    sims = np.array([[0.25, 0.22, 0.9, -0.5, 0.7]], np.float32)
    mask = np.array([[True, True, True, True, False]])
    out = layer(sims, mask).numpy()
    weights = layer.tier_embeddings.numpy()[:, 0]
    assert np.all((weights >= 0) & (weights < 1))  # the official U(0, 1) start
    expected = np.zeros(22, np.float32)
    expected[13] = np.log(3.0) * weights[13]   # 0.25 and 0.22: (0.2, 0.3]
    expected[19] = np.log(2.0) * weights[19]   # 0.9: (0.8, 0.9]
    expected[5] = np.log(2.0) * weights[5]     # -0.5: (-0.6, -0.5]; the masked 0.7 is not
    np.testing.assert_allclose(out[0], expected, rtol=1e-6)


def test_ceil_binning_needs_an_even_number_of_tiers():
    with pytest.raises(ValueError, match="even `num_tiers`"):
        SimTier(num_tiers=5, tier_dim=1, binning="ceil")


# ----------------------------------------------------------------------------- SA-TA


def _official_sa_ta() -> SemanticAwareTargetAttention:
    return SemanticAwareTargetAttention(
        num_heads=1, head_dim=3, use_bias=True, activation="silu", scaled=False,
        bias_initializer=tf.keras.initializers.Constant(0.1), id_gate_init=1.0,
        similarity_gate_init=1.0, interaction_gate_init=1.0, semantic_temperature_init=0.1)


def test_official_sa_ta_starts_with_effective_gates_1_10_10():
    layer = _official_sa_ta()
    layer(np.zeros([1, 4], np.float32), np.zeros([1, 2, 4], np.float32),
          np.zeros([1, 2], np.float32), np.ones([1, 2], bool))
    np.testing.assert_allclose(layer.effective_gates().numpy()[:, 0], [1.0, 10.0, 10.0],
                               rtol=1e-6)


def test_official_sa_ta_matches_numpy():
    rng = np.random.default_rng(3)
    layer = _official_sa_ta()
    query = rng.normal(size=(2, 4)).astype(np.float32)
    keys = rng.normal(size=(2, 5, 4)).astype(np.float32)
    sims = rng.uniform(-1, 1, size=(2, 5)).astype(np.float32)
    mask = np.array([[True, True, True, False, True], [True, False, False, False, False]])
    out = layer(query, keys, sims, mask).numpy()
    logits = layer.logits_layer
    w_q, b_q = logits.query_kernel.numpy()[:, 0], logits.query_bias.numpy()[0]
    w_k, b_k = logits.key_kernel.numpy()[:, 0], logits.key_bias.numpy()[0]
    w_v, b_v = layer.value_kernel.numpy()[:, 0], layer.value_bias.numpy()[0]
    np.testing.assert_allclose(b_q, 0.1)
    q = _silu(query @ w_q + b_q)                                   # [B, d]
    k = _silu(np.where(mask[..., None], keys, 0) @ w_k + b_k)      # [B, K, d]
    v = _silu(np.where(mask[..., None], keys, 0) @ w_v + b_v)
    a = np.einsum("bd,bkd->bk", q, k)                              # unscaled
    r = np.where(mask, sims, 0) / 0.1
    z = a + r + a * r
    expected = np.einsum("bk,bkd->bd", softmax_reference(z, mask), v)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_multi_head_silu_target_attention_matches_numpy():
    rng = np.random.default_rng(6)
    layer = TargetAttention(3, 2, use_bias=True, activation="silu", scaled=False,
                            bias_initializer=tf.keras.initializers.Constant(0.1))
    query = rng.normal(size=(4, 5)).astype(np.float32)
    keys = rng.normal(size=(4, 6, 3)).astype(np.float32)
    mask = rng.random((4, 6)) < 0.7
    mask[1] = False
    out = layer(query, keys, mask=mask).numpy()
    logits = layer.logits_layer
    kept = np.where(mask[..., None], keys, 0)
    expected = []
    for h in range(3):
        q = _silu(query @ logits.query_kernel.numpy()[:, h] + logits.query_bias.numpy()[h])
        k = _silu(kept @ logits.key_kernel.numpy()[:, h] + logits.key_bias.numpy()[h])
        v = _silu(kept @ layer.value_kernel.numpy()[:, h] + layer.value_bias.numpy()[h])
        weights = softmax_reference(np.einsum("bd,bkd->bk", q, k), mask)
        expected.append(np.einsum("bk,bkd->bd", weights, v))
    np.testing.assert_allclose(out, np.concatenate(expected, axis=-1), rtol=1e-5, atol=1e-6)
    assert not out[1].any()


def test_projected_logits_candidates_equal_one_query_at_a_time():
    rng = np.random.default_rng(5)
    layer = MultiHeadAttentionLogits(2, 3, use_bias=True, activation="silu", scaled=False)
    query = rng.normal(size=(2, 3, 4)).astype(np.float32)
    keys = rng.normal(size=(2, 6, 4)).astype(np.float32)
    layer.build(tf.TensorShape([None, 4]))
    together = layer.candidate_mean_logits(tf.constant(query), tf.constant(keys)).numpy()
    for c in range(3):
        alone = layer.head_mean_logits(tf.constant(query[:, c]), tf.constant(keys)).numpy()
        np.testing.assert_allclose(together[:, c], alone, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="no key-space query"):
        layer.key_space_query(tf.constant(query[:, 0]), tf.constant(keys))


def test_official_target_attention_round_trips(tmp_path):
    rng = np.random.default_rng(1)
    layer = TargetAttention(1, 4, use_bias=True, scaled=False)
    assert_round_trips(layer, [rng.normal(size=(2, 4)).astype(np.float32),
                               rng.normal(size=(2, 3, 4)).astype(np.float32)],
                       {"mask": np.array([[True, True, False], [False, False, False]])},
                       tmp_path)


def test_official_sa_ta_round_trips(tmp_path):
    rng = np.random.default_rng(2)
    assert_round_trips(_official_sa_ta(),
                       [rng.normal(size=(2, 4)).astype(np.float32),
                        rng.normal(size=(2, 3, 4)).astype(np.float32),
                        rng.uniform(-1, 1, size=(2, 3)).astype(np.float32),
                        np.array([[True, True, False], [True, False, False]])], {}, tmp_path)


# ----------------------------------------------------------------------------- tower


def test_layer_norm_dice_matches_numpy_and_is_the_same_in_training_and_inference():
    x = np.array([[1.0, 2.0, 4.0], [-1.0, 0.0, 3.0]], np.float32)
    layer = Dice(normalization="layer", epsilon=1e-12,
                 alpha_initializer=tf.keras.initializers.Constant(-0.25))
    mean, var = x.mean(1, keepdims=True), x.var(1, keepdims=True)
    p = 1.0 / (1.0 + np.exp(-(x - mean) / np.sqrt(var + 1e-12)))
    expected = p * x + (1 - p) * -0.25 * x
    np.testing.assert_allclose(layer(x, training=True).numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(layer(x, training=False).numpy(), expected, rtol=1e-5)


def test_official_tower_round_trips(tmp_path):
    tower = MLPTower([8, 4], dice_normalization="layer", dice_alpha=-0.25,
                     bias_initializer=tf.keras.initializers.Constant(0.1),
                     kernel_initializer=tf.keras.initializers.VarianceScaling(
                         1.0, "fan_in", "untruncated_normal"))
    x = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
    tower(x)
    np.testing.assert_allclose(tower.hidden_layers[0].bias.numpy(), 0.1)
    np.testing.assert_allclose(tower.hidden_layers[1].alpha.numpy(), -0.25)
    assert_round_trips(tower, [x], {}, tmp_path)


# ----------------------------------------------------------------------------- searches


def test_sim_soft_cosine_ranks_by_angle_not_norm():
    target = np.array([[1.0, 0.0]], np.float32)
    history = np.array([[[10.0, 10.0], [0.5, 0.0], [0.0, 0.0], [3.0, -0.1]]], np.float32)
    mask = np.ones([1, 4], bool)
    cosine = IdEmbeddingGSU(2, similarity="cosine")({"id": target}, {"id": history}, mask)
    np.testing.assert_array_equal(cosine["indices"].numpy(), [[1, 3]])
    np.testing.assert_allclose(cosine["scores"].numpy()[0],
                               [1.0, 3.0 / np.hypot(3.0, 0.1)], rtol=1e-6)
    inner = IdEmbeddingGSU(2)({"id": target}, {"id": history}, mask)
    np.testing.assert_array_equal(inner["indices"].numpy(), [[0, 3]])


def test_target_without_a_multimodal_vector_selects_the_newest_behaviours():
    rng = np.random.default_rng(4)
    history = rng.normal(size=(2, 6, 3)).astype(np.float32)
    history /= np.linalg.norm(history, axis=-1, keepdims=True)
    target = np.stack([history[0, 2], np.zeros(3, np.float32)])  # row 1: no vector
    mask = np.array([[True] * 6, [True, True, True, True, False, False]])  # row 1: length 4
    out = MultimodalGSU(3)({"mm": target}, {"mm": history}, mask)
    # Row 1: the newest 3 of its 4 behaviours, newest first, scores (cosines) 0.
    np.testing.assert_array_equal(out["indices"].numpy()[1], [3, 2, 1])
    np.testing.assert_array_equal(out["scores"].numpy()[1], [0.0, 0.0, 0.0])
    assert out["mask"].numpy()[1].all()
    # Row 0 is the ordinary cosine top-K (itself first).
    cosines = history[0] @ target[0]
    np.testing.assert_array_equal(out["indices"].numpy()[0], np.argsort(-cosines)[:3])
    np.testing.assert_allclose(out["scores"].numpy()[0], np.sort(cosines)[::-1][:3],
                               rtol=1e-5)


def test_linear_attention_with_biases_matches_per_key_numpy():
    # The official short-term attention: W x + b projections, unscaled; computed through the
    # key-space shortcut, checked against projecting every key.
    rng = np.random.default_rng(8)
    layer = TargetAttention(2, 3, use_bias=True, scaled=False,
                            bias_initializer=tf.keras.initializers.RandomNormal(seed=1))
    query = rng.normal(size=(2, 4)).astype(np.float32)
    keys = rng.normal(size=(2, 5, 4)).astype(np.float32)
    mask = np.array([[True, True, False, True, True], [False] * 5])
    out = layer(query, keys, mask).numpy()
    logits = layer.logits_layer
    q = np.einsum("e,ehd->hd", query[0], logits.query_kernel.numpy()) + logits.query_bias.numpy()
    k = np.einsum("ke,ehd->khd", keys[0], logits.key_kernel.numpy()) + logits.key_bias.numpy()
    v = np.einsum("ke,ehd->khd", keys[0], layer.value_kernel.numpy()) + layer.value_bias.numpy()
    a = np.einsum("hd,khd->hk", q, k)
    w = softmax_reference(a, np.broadcast_to(mask[0], a.shape))
    expected = np.einsum("hk,khd->hd", w, v).reshape(-1)
    np.testing.assert_allclose(out[0], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out[1], 0.0)  # no valid behaviour: zeros, bias included
    mean = logits.head_mean_logits(tf.constant(query), tf.constant(keys)).numpy()
    np.testing.assert_allclose(mean[0], a.mean(axis=0), rtol=1e-5, atol=1e-5)
