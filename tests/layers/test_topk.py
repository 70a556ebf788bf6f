"""Tests of muse_tf.layers.topk.masked_top_k."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from muse_tf.layers.topk import PREFILTER_BLOCK, PREFILTER_MIN_BLOCKS, masked_top_k

from .harness import assert_nested_close
from .reference import top_k_reference


def _run(scores, mask, k):
    return masked_top_k(tf.constant(scores, tf.float32), tf.constant(mask), k)


def test_hand_computed_row_with_padding_and_tie():
    scores = np.array([[0.5, 0.9, 0.5, 0.7, 0.99, 0.0]], np.float32)
    mask = np.array([[True, True, True, True, False, False]])
    out = _run(scores, mask, 3)
    # 0.99 is padding; the tie 0.5 @ 0 vs 0.5 @ 2 goes to the lower position.
    assert out["indices"].numpy().tolist() == [[1, 3, 0]]
    np.testing.assert_allclose(out["scores"].numpy(), [[0.9, 0.7, 0.5]])
    assert out["mask"].numpy().tolist() == [[True, True, True]]
    assert out["indices"].dtype == tf.int32 and out["scores"].dtype == tf.float32


def test_fewer_valid_than_k_fills_harmless_slots():
    scores = np.array([[3.0, -2.0, 5.0, 1.0], [1.0, 1.0, 1.0, 1.0]], np.float32)
    mask = np.array([[False, True, False, True], [False, False, False, False]])
    out = _run(scores, mask, 3)
    assert out["indices"].numpy().tolist() == [[3, 1, 0], [0, 0, 0]]
    np.testing.assert_allclose(out["scores"].numpy(), [[1.0, -2.0, 0.0], [0.0, 0.0, 0.0]])
    assert out["mask"].numpy().tolist() == [[True, True, False], [False, False, False]]


def test_sequence_shorter_than_k():
    out = _run(np.array([[0.1, 0.3]], np.float32), np.array([[True, True]]), 4)
    assert out["indices"].numpy().tolist() == [[1, 0, 0, 0]]
    assert out["mask"].numpy().tolist() == [[True, True, False, False]]
    np.testing.assert_allclose(out["scores"].numpy(), [[0.3, 0.1, 0.0, 0.0]])


def test_nan_and_inf_at_masked_positions_are_ignored():
    scores = np.array([[np.nan, 0.2, np.inf, -0.4]], np.float32)
    mask = np.array([[False, True, False, True]])
    out = _run(scores, mask, 3)
    assert out["indices"].numpy().tolist() == [[1, 3, 0]]
    np.testing.assert_allclose(out["scores"].numpy(), [[0.2, -0.4, 0.0]])


@pytest.mark.parametrize("length,k", [(7, 3), (40, 10), (5, 8)])
def test_matches_numpy_reference_with_many_ties(length, k):
    rng = np.random.default_rng(length)
    # Scores drawn from 4 values force ties; some rows are entirely masked.
    scores = rng.integers(0, 4, size=(6, length)).astype(np.float32)
    mask = rng.random((6, length)) < 0.6
    mask[0] = False
    out = _run(scores, mask, k)
    assert_nested_close({key: v.numpy() for key, v in out.items()},
                        top_k_reference(scores, mask, k))


@pytest.mark.parametrize("length,k,levels", [
    (PREFILTER_MIN_BLOCKS * 5 * PREFILTER_BLOCK, 5, 3),      # the smallest prefiltered L
    (20_011, 50, 4),                                         # not a multiple of the block
    (20_011, 50, 0),                                         # continuous scores, no ties
])
def test_long_histories_go_through_the_block_prefilter_with_the_same_result(length, k, levels):
    rng = np.random.default_rng(length + levels)
    scores = (rng.integers(0, levels, size=(5, length)).astype(np.float32) if levels
              else rng.standard_normal((5, length)).astype(np.float32))
    mask = rng.random((5, length)) < 0.7
    mask[0] = False                                       # nothing valid
    mask[1] = False
    mask[1, [3, length - 1]] = True                       # fewer valid than k, one at the end
    scores[2, -PREFILTER_BLOCK:] = 10.0                   # the best all in the last block
    out = _run(scores, mask, k)
    assert_nested_close({key: v.numpy() for key, v in out.items()},
                        top_k_reference(scores, mask, k))
    graph = tf.function(lambda s, m: masked_top_k(s, m, k)).get_concrete_function(
        tf.TensorSpec([None, length], tf.float32), tf.TensorSpec([None, length], tf.bool))
    widths = [op.inputs[0].shape[-1] for op in graph.graph.get_operations()
              if op.type == "TopKV2"]  # tf.sort of the kept blocks is a TopKV2 too
    assert widths and max(widths) <= max(-(-length // PREFILTER_BLOCK), k * PREFILTER_BLOCK)


def test_prefiltered_top_k_passes_the_gradient_to_the_selected_scores():
    length, k = PREFILTER_MIN_BLOCKS * 3 * PREFILTER_BLOCK, 3
    scores = tf.Variable(np.random.default_rng(0).standard_normal((2, length)), dtype=tf.float32)
    with tf.GradientTape() as tape:
        out = masked_top_k(scores, tf.ones([2, length], tf.bool), k)
        total = tf.reduce_sum(out["scores"])
    grad = tf.convert_to_tensor(tape.gradient(total, scores)).numpy()
    expected = np.zeros_like(grad)
    np.put_along_axis(expected, out["indices"].numpy(), 1.0, axis=1)
    np.testing.assert_array_equal(grad, expected)


def test_unknown_length_inside_tf_function():
    fn = tf.function(lambda s, m: masked_top_k(s, m, 3), input_signature=[
        tf.TensorSpec([None, None], tf.float32), tf.TensorSpec([None, None], tf.bool)])
    scores = np.array([[0.2, 0.8]], np.float32)
    out = fn(tf.constant(scores), tf.constant([[True, True]]))
    assert out["indices"].numpy().tolist() == [[1, 0, 0]]
    assert out["mask"].numpy().tolist() == [[True, True, False]]
    long = np.arange(10, dtype=np.float32)[None]
    out = fn(tf.constant(long), tf.constant(np.ones((1, 10), bool)))
    assert out["indices"].numpy().tolist() == [[9, 8, 7]]


def test_errors_name_argument_and_shape():
    with pytest.raises(ValueError, match=r"`scores` must have rank 2.*shape \(2, 3, 4\)"):
        masked_top_k(tf.zeros([2, 3, 4]), tf.ones([2, 3], tf.bool), 2)
    with pytest.raises(ValueError, match=r"`mask` must be bool, got dtype int32"):
        masked_top_k(tf.zeros([2, 3]), tf.ones([2, 3], tf.int32), 2)
    with pytest.raises(ValueError, match=r"sequence length size of `scores` \(shape \(2, 3\)\) "
                                         r"is 3 but that of `mask` \(shape \(2, 4\)\) is 4"):
        masked_top_k(tf.zeros([2, 3]), tf.ones([2, 4], tf.bool), 2)
    with pytest.raises(ValueError, match=r"`k` must be a positive int, got 0"):
        masked_top_k(tf.zeros([2, 3]), tf.ones([2, 3], tf.bool), 0)
    with pytest.raises(ValueError, match=r"`scores` must be a floating-point tensor, got "
                                         r"dtype int32"):
        masked_top_k(tf.zeros([2, 3], tf.int32), tf.ones([2, 3], tf.bool), 1)
