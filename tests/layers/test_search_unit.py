"""Tests of muse_tf.layers.search_unit (the GSU base class, its dict contract, inner product)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from muse_tf.layers.search_unit import (
    CATEGORY,
    ID,
    MM,
    ROWS,
    GeneralSearchUnit,
    broadcast_mask,
    inner_product,
    select_top_k,
)

from .reference import top_k_reference


class _SumGSU(GeneralSearchUnit):
    """Scores each behaviour by the sum of its ID features (a test-only subclass)."""

    target_keys = (ID,)
    history_keys = (ID,)

    def relevance(self, target, history, mask):
        del target
        return tf.reduce_sum(history[ID], axis=-1), mask


def _sum_gsu_inputs(target_shape, history_shape, history_dtype=tf.float32):
    return {ID: tf.zeros(target_shape)}, {ID: tf.zeros(history_shape, history_dtype)}


def test_dict_keys_are_the_documented_names():
    assert (ID, MM, ROWS, CATEGORY) == ("id", "mm", "rows", "category")


def test_inner_product_exact():
    target = np.array([[1.0, 2.0]], np.float32)
    history = np.array([[[3.0, 4.0], [-1.0, 0.5], [0.0, 0.0]]], np.float32)
    np.testing.assert_allclose(inner_product(target, history).numpy(), [[11.0, 0.0, 0.0]])


def test_inner_product_with_candidate_axis_exact():
    target = np.array([[[1.0, 2.0], [0.0, -1.0]]], np.float32)          # [B=1, C=2, D=2]
    history = np.array([[[3.0, 4.0], [-1.0, 0.5], [0.0, 0.0]]], np.float32)
    np.testing.assert_allclose(inner_product(target, history).numpy(),
                               [[[11.0, 0.0, 0.0], [-4.0, -0.5, 0.0]]])


def test_subclass_gets_top_k_and_checks():
    layer = _SumGSU(top_k=2)
    history = np.array([[[1.0, 1.0], [5.0, 0.0], [9.0, 9.0]]], np.float32)
    out = layer({ID: np.zeros([1, 2], np.float32)}, {ID: history},
                mask=np.array([[True, True, False]]))
    assert out["indices"].numpy().tolist() == [[1, 0]]
    np.testing.assert_allclose(out["scores"].numpy(), [[5.0, 2.0]])
    assert out["mask"].numpy().tolist() == [[True, True]]
    assert layer.get_config()["top_k"] == 2


def test_only_declared_keys_are_read():
    # Extra entries (here of nonsense shapes and dtypes) are ignored, not checked or cast.
    history = np.array([[[1.0, 1.0], [5.0, 0.0], [9.0, 9.0]]], np.float32)
    out = _SumGSU(top_k=1)({ID: np.zeros([1, 2], np.float32), MM: "unused"},
                           {ID: history, ROWS: np.zeros([7], np.float64), CATEGORY: None},
                           mask=np.array([[True, True, True]]))
    assert out["indices"].numpy().tolist() == [[2]]


@pytest.mark.parametrize(
    "target_shape,history_shape,mask_shape,message",
    [
        ((2, 4), (2, 4), (2, 3),
         r"_SumGSU: `history\['id'\]` must have rank 3 \[batch, seq_len, dim\], "
         r"got rank 2 with shape \(2, 4\)"),
        ((2, 4, 1, 1), (2, 3, 4), (2, 3),
         r"_SumGSU: `target\['id'\]` must be \[batch, dim\] or \[batch, candidates, dim\], "
         r"got rank 4 with shape \(2, 4, 1, 1\)"),
        ((2,), (2, 3, 4), (2, 3),
         r"`target\['id'\]` must be \[batch, dim\] or \[batch, candidates, dim\], "
         r"got rank 1 with shape \(2,\)"),
        ((2, 5), (2, 3, 4), (2, 3),
         r"the embedding size of `target\['id'\]` \(shape \(2, 5\)\) is 5 but "
         r"that of `history\['id'\]` \(shape \(2, 3, 4\)\) is 4"),
        ((2, 2, 5), (2, 3, 4), (2, 3),
         r"the embedding size of `target\['id'\]` \(shape \(2, 2, 5\)\) is 5 but "
         r"that of `history\['id'\]` \(shape \(2, 3, 4\)\) is 4"),
        ((3, 4), (2, 3, 4), (2, 3),
         r"the batch size of `target\['id'\]` \(shape \(3, 4\)\) is 3 but that of "
         r"`history\['id'\]` \(shape \(2, 3, 4\)\) is 2"),
        ((2, 4), (2, 3, 4), (2, 7),
         r"sequence length size of `mask` \(shape \(2, 7\)\) is 7 but "
         r"that of `history\['id'\]` \(shape \(2, 3, 4\)\) is 3"),
        ((2, 4), (2, 3, 4), (5, 3),
         r"the batch size of `mask` \(shape \(5, 3\)\) is 5 but "
         r"that of `history\['id'\]` \(shape \(2, 3, 4\)\) is 2"),
    ],
)
def test_shape_errors_name_key_and_shape(target_shape, history_shape, mask_shape, message):
    target, history = _sum_gsu_inputs(target_shape, history_shape)
    with pytest.raises(ValueError, match=message):
        _SumGSU(top_k=2)(target, history, mask=tf.ones(mask_shape, tf.bool))


def test_missing_mask_bad_top_k_and_bad_dtype():
    target, history = _sum_gsu_inputs((2, 4), (2, 3, 4))
    with pytest.raises(ValueError, match=r"_SumGSU: `mask` is required \(bool \[batch, seq_len\]"
                                         r", True = a real entry of `history\['id'\]`\)"):
        _SumGSU(top_k=2)(target, history)
    with pytest.raises(ValueError, match=r"_SumGSU: `mask` must be a bool tensor, got dtype "
                                         r"int32 with shape \(2, 3\)"):
        _SumGSU(top_k=2)(target, history, mask=tf.ones([2, 3], tf.int32))
    with pytest.raises(ValueError, match=r"_SumGSU: `top_k` must be a positive int, got -3"):
        _SumGSU(top_k=-3)
    target, history = _sum_gsu_inputs((2, 4), (2, 3, 4), tf.int64)
    with pytest.raises(ValueError, match=r"`history\['id'\]` must be a floating-point tensor, "
                                         r"got dtype int64 with shape \(2, 3, 4\)"):
        _SumGSU(top_k=1)(target, history, mask=tf.ones([2, 3], tf.bool))
    with pytest.raises(ValueError, match=r"`target\['id'\]` must be a floating-point tensor, "
                                         r"got dtype int32 with shape \(2, 4\)"):
        _SumGSU(top_k=1)({ID: tf.zeros([2, 4], tf.int32)}, {ID: tf.zeros([2, 3, 4])},
                         mask=tf.ones([2, 3], tf.bool))


def test_non_dict_and_missing_key_errors_name_the_keys():
    history = {ID: tf.zeros([2, 3, 4])}
    mask = tf.ones([2, 3], tf.bool)
    with pytest.raises(ValueError, match=r"_SumGSU: `target` must be a dict with keys \['id'\], "
                                         r"got EagerTensor"):
        _SumGSU(top_k=1)(tf.zeros([2, 4]), history, mask=mask)
    with pytest.raises(ValueError, match=r"_SumGSU: `history` lacks \['id'\]; it needs \['id'\], "
                                         r"got \['category', 'mm'\]"):
        _SumGSU(top_k=1)({ID: tf.zeros([2, 4])}, {MM: tf.zeros([2, 3, 4]), CATEGORY: None},
                         mask=mask)


def test_float_inputs_are_cast_to_the_compute_dtype():
    history = np.array([[[1.0, 1.0], [5.0, 0.0], [9.0, 9.0]]], np.float64)
    out = _SumGSU(top_k=2)({ID: np.zeros([1, 2], np.float64)}, {ID: history},
                           mask=np.array([[True, False, True]]))
    assert out["scores"].dtype == tf.float32
    assert out["indices"].numpy().tolist() == [[2, 0]]
    np.testing.assert_allclose(out["scores"].numpy(), [[18.0, 2.0]])


# --- select_top_k / broadcast_mask with a candidate axis ---------------------------------

def test_select_top_k_with_shared_and_per_candidate_masks_matches_numpy():
    rng = np.random.default_rng(8)
    scores = rng.standard_normal((2, 3, 7)).astype(np.float32)
    shared = rng.random((2, 7)) < 0.6
    per_candidate = rng.random((2, 3, 7)) < 0.6
    for mask in (shared, per_candidate):
        out = select_top_k(tf.constant(scores), tf.constant(mask), 4)
        full = np.broadcast_to(mask[:, None, :], scores.shape) if mask.ndim == 2 else mask
        for c in range(3):
            expected = top_k_reference(scores[:, c], full[:, c], 4)
            for key in ("indices", "mask"):
                np.testing.assert_array_equal(out[key][:, c].numpy(), expected[key])
            np.testing.assert_allclose(out["scores"][:, c].numpy(), expected["scores"])
        assert out["indices"].shape == (2, 3, 4)


def test_broadcast_mask_adds_the_candidate_axis_only_when_needed():
    mask = tf.constant([[True, False, True]])
    assert broadcast_mask(mask, tf.zeros([1, 3])) is mask
    wide = broadcast_mask(mask, tf.zeros([1, 2, 3])).numpy()
    assert wide.tolist() == [[[True, False, True], [True, False, True]]]
    per_candidate = tf.constant([[[True, False, False], [False, True, True]]])
    assert broadcast_mask(per_candidate, tf.zeros([1, 2, 3])) is per_candidate


# --- candidate axis: C targets against one history equal C separate searches -------------

@pytest.mark.parametrize("layer_name", ["multimodal", "id", "projected", "category",
                                        "multimodal_id", "attention", "co_multimodal"])
def test_candidate_axis_equals_separate_searches(layer_name):
    from muse_tf.layers import (
        AttentionGSU,
        CategoryGSU,
        CoMultimodalGSU,
        IdEmbeddingGSU,
        MultimodalGSU,
        MultimodalIdCosineGSU,
        ProjectedMultimodalGSU,
    )

    rng = np.random.default_rng(3)
    batch, candidates, length, dim, k = 2, 3, 9, 4, 4
    history = rng.normal(size=(batch, length, dim)).astype(np.float32)
    history /= np.linalg.norm(history, axis=-1, keepdims=True)
    history_id = rng.normal(size=(batch, length, 3)).astype(np.float32)
    targets = rng.normal(size=(batch, candidates, dim)).astype(np.float32)
    targets /= np.linalg.norm(targets, axis=-1, keepdims=True)
    target_ids = rng.normal(size=(batch, candidates, 3)).astype(np.float32)
    mask = rng.random((batch, length)) > 0.3
    categories = rng.integers(1, 3, size=(batch, length)).astype(np.int64)
    target_categories = rng.integers(1, 3, size=(batch, candidates)).astype(np.int64)
    history_dict = {MM: history, ID: history_id, CATEGORY: categories}
    layer = {"multimodal": MultimodalGSU(k), "id": IdEmbeddingGSU(k),
             "projected": ProjectedMultimodalGSU(k, projection_units=(5,)),
             "category": CategoryGSU(k), "multimodal_id": MultimodalIdCosineGSU(k),
             "attention": AttentionGSU(k, num_heads=2, head_dim=3),
             "co_multimodal": CoMultimodalGSU(k, co_top_k=1)}[layer_name]

    def run(c):
        pick = slice(None) if c is None else c
        target = {MM: targets[:, pick], ID: target_ids[:, pick],
                  CATEGORY: target_categories[:, pick]}
        return layer(target, history_dict, mask)

    together = run(None)
    assert together["indices"].shape == (batch, candidates, k)
    assert together["mask"].numpy().any()
    for c in range(candidates):
        alone = run(c)
        for key in ("indices", "mask"):
            np.testing.assert_array_equal(together[key][:, c].numpy(), alone[key].numpy())
        np.testing.assert_allclose(together["scores"][:, c].numpy(), alone["scores"].numpy(),
                                   rtol=1e-5, atol=1e-6)
