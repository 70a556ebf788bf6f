"""Tests of muse_tf.layers.category_gsu.CategoryGSU (SIM-hard)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from muse_tf.layers import CategoryGSU
from muse_tf.layers.search_unit import CATEGORY

from .harness import assert_nested_close, assert_round_trips
from .reference import top_k_reference


def _call(layer, target, history, mask):
    return layer({CATEGORY: target}, {CATEGORY: history}, mask=mask)


def _out(layer, target, history, mask):
    return {k: v.numpy() for k, v in _call(layer, target, history, mask).items()}


def test_hand_computed_newest_first():
    target = np.array([7, 3], np.int64)
    # Right-padded, oldest first: row 0 has length 5, row 1 has length 3.
    history = np.array([[7, 3, 7, 7, 7, 0], [3, 3, 5, 3, 3, 3]], np.int64)
    mask = np.array([[True] * 5 + [False], [True, True, True, False, False, False]])
    out = _out(CategoryGSU(top_k=3), target, history, mask)
    assert out["indices"].tolist() == [[4, 3, 2], [1, 0, 0]]
    assert out["scores"].tolist() == [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]
    assert out["mask"].tolist() == [[True, True, True], [True, True, False]]


def test_padding_with_the_target_category_is_never_selected():
    target = np.array([0], np.int64)  # a missing target category matches the padding value
    history = np.array([[5, 0, 0, 0]], np.int64)
    mask = np.array([[True, True, False, False]])
    out = _out(CategoryGSU(top_k=3), target, history, mask)
    assert out["indices"].tolist() == [[1, 0, 0]]
    assert out["mask"].tolist() == [[True, False, False]]
    assert out["scores"].tolist() == [[1.0, 0.0, 0.0]]


def test_no_match_gives_empty_selection():
    out = _out(CategoryGSU(top_k=2), np.array([9], np.int64), np.array([[1, 2, 3]], np.int64),
               np.array([[True, True, True]]))
    assert out["mask"].tolist() == [[False, False]]
    assert out["indices"].tolist() == [[0, 0]]
    assert out["scores"].tolist() == [[0.0, 0.0]]


def test_hand_computed_candidate_axis():
    target = np.array([[7, 3, 9]], np.int64)  # three candidates against one history
    history = np.array([[7, 3, 7, 3, 3]], np.int64)
    mask = np.array([[True, True, True, True, False]])
    out = _out(CategoryGSU(top_k=2), target, history, mask)
    assert out["indices"].tolist() == [[[2, 0], [3, 1], [0, 0]]]
    assert out["scores"].tolist() == [[[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]]]
    assert out["mask"].tolist() == [[[True, True], [True, True], [False, False]]]


@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_matches_numpy_reference(dtype):
    rng = np.random.default_rng(3)
    history = rng.integers(1, 4, size=(5, 200)).astype(dtype)
    target = rng.integers(1, 4, size=(5,)).astype(dtype)
    mask = rng.random((5, 200)) < 0.7
    mask[4, 20:] = False
    out = _out(CategoryGSU(top_k=30), target, history, mask)
    match = (history == target[:, None]) & mask
    expected = top_k_reference(match.astype(np.float32), match, 30, newest_first_ties=True)
    assert_nested_close(out, expected)


def test_large_history():
    length = 100_000
    history = np.zeros((2, length), np.int64)
    history[0, [5, 70_000, 99_999]] = 42
    history[1, 1:] = 42
    mask = np.ones((2, length), bool)
    mask[1, 50_000:] = False
    out = _out(CategoryGSU(top_k=4), np.array([42, 42], np.int64), history, mask)
    assert out["indices"].tolist() == [[99_999, 70_000, 5, 0], [49_999, 49_998, 49_997, 49_996]]
    assert out["mask"].tolist() == [[True, True, True, False], [True] * 4]


def test_errors_name_argument_and_value():
    layer = CategoryGSU(top_k=2)
    with pytest.raises(ValueError, match=r"CategoryGSU: `history\['category'\]` must be an "
                                         r"integer id tensor, got dtype float32 with shape "
                                         r"\(1, 3\)"):
        _call(layer, tf.constant([1], tf.int64), tf.zeros([1, 3]), tf.ones([1, 3], tf.bool))
    with pytest.raises(ValueError, match=r"CategoryGSU: `target\['category'\]` must be an "
                                         r"integer id tensor, got dtype float32 with shape "
                                         r"\(1,\)"):
        _call(layer, tf.constant([1.0]), tf.zeros([1, 3], tf.int64), tf.ones([1, 3], tf.bool))
    with pytest.raises(ValueError, match=r"`target\['category'\]` \(int32\) and "
                                         r"`history\['category'\]` \(int64\) must share a "
                                         r"dtype"):
        _call(layer, tf.constant([1], tf.int32), tf.zeros([1, 3], tf.int64),
              tf.ones([1, 3], tf.bool))
    with pytest.raises(ValueError, match=r"`target\['category'\]` must be \[batch\] or "
                                         r"\[batch, candidates\], got rank 3 with shape "
                                         r"\(1, 1, 1\)"):
        _call(layer, tf.constant([[[1]]], tf.int64), tf.zeros([1, 3], tf.int64),
              tf.ones([1, 3], tf.bool))
    with pytest.raises(ValueError, match=r"the batch size of `target\['category'\]` \(shape "
                                         r"\(2,\)\) is 2 but that of `history\['category'\]`"):
        _call(layer, tf.constant([1, 2], tf.int64), tf.zeros([1, 3], tf.int64),
              tf.ones([1, 3], tf.bool))
    with pytest.raises(ValueError, match=r"`history\['category'\]` must have rank 2 "
                                         r"\[batch, seq_len\], got rank 3 with shape "
                                         r"\(1, 3, 1\)"):
        _call(layer, tf.constant([1], tf.int64), tf.zeros([1, 3, 1], tf.int64),
              tf.ones([1, 3], tf.bool))


def test_round_trips(tmp_path):
    args = ({CATEGORY: np.array([7, 3], np.int64)},
            {CATEGORY: np.array([[7, 3, 7, 7], [3, 1, 1, 1]], np.int64)})
    mask = np.array([[True] * 4, [True, True, False, False]])
    assert_round_trips(CategoryGSU(top_k=3), args, {"mask": mask}, tmp_path)
