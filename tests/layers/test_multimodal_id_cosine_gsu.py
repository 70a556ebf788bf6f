"""Tests of muse_tf.layers.multimodal_id_cosine_gsu.MultimodalIdCosineGSU."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from muse_tf.layers import MultimodalIdCosineGSU
from muse_tf.layers.search_unit import ID, MM

from .harness import assert_round_trips
from .reference import top_k_reference, unit_rows


def _call(layer, target, history, target_id, history_id, mask):
    return layer({MM: target, ID: target_id}, {MM: history, ID: history_id}, mask=mask)


def test_hand_computed_sum_of_cosines():
    target = np.array([[1.0, 0.0]], np.float32)
    history = np.array([[[0.6, 0.8], [0.0, 1.0], [0.8, 0.6], [1.0, 0.0]]], np.float32)
    target_id = np.array([[3.0, 4.0]], np.float32)
    history_id = np.array([[[6.0, 8.0],     # ID cosine 1
                            [-4.0, 3.0],    # ID cosine 0
                            [0.0, 0.0],     # zero ID embedding: cosine 0, not NaN
                            [3.0, 4.0]]],   # padding
                          np.float32)
    mask = np.array([[True, True, True, False]])
    out = _call(MultimodalIdCosineGSU(top_k=3), target, history, target_id, history_id, mask)
    # 0.6 + 1 = 1.6; 0 + 0 = 0; 0.8 + 0 = 0.8.
    assert out["indices"].numpy().tolist() == [[0, 2, 1]]
    np.testing.assert_allclose(out["scores"].numpy(), [[1.6, 0.8, 0.0]], atol=1e-6)


def test_id_weight_and_numpy_reference():
    rng = np.random.default_rng(6)
    target, history = unit_rows(rng, (3, 8)), unit_rows(rng, (3, 50, 8))
    target_id = rng.standard_normal((3, 5)).astype(np.float32) * 4
    history_id = rng.standard_normal((3, 50, 5)).astype(np.float32) * 4
    mask = rng.random((3, 50)) < 0.6
    out = _call(MultimodalIdCosineGSU(top_k=6, id_weight=0.5), target, history, target_id,
                history_id, mask)
    t_id = target_id / np.linalg.norm(target_id, axis=-1, keepdims=True)
    h_id = history_id / np.linalg.norm(history_id, axis=-1, keepdims=True)
    scores = (np.einsum("bd,bld->bl", target.astype(np.float64), history)
              + 0.5 * np.einsum("bd,bld->bl", t_id, h_id))
    expected = top_k_reference(scores, mask, 6)
    np.testing.assert_array_equal(out["indices"].numpy(), expected["indices"])
    np.testing.assert_allclose(out["scores"].numpy(), expected["scores"], atol=1e-5)


def test_error_names_id_argument():
    layer = MultimodalIdCosineGSU(top_k=1)
    with pytest.raises(ValueError, match=r"MultimodalIdCosineGSU: the embedding size of "
                                         r"`target\['id'\]` \(shape \(1, 3\)\) is 3 but that "
                                         r"of `history\['id'\]` \(shape \(1, 4, 5\)\) is 5"):
        _call(layer, tf.zeros([1, 2]), tf.zeros([1, 4, 2]), tf.zeros([1, 3]),
              tf.zeros([1, 4, 5]), tf.ones([1, 4], tf.bool))
    with pytest.raises(ValueError, match=r"sequence length size of `mask` \(shape \(1, 4\)\) is "
                                         r"4 but that of `history\['mm'\]` \(shape "
                                         r"\(1, 6, 2\)\) is 6"):
        _call(layer, tf.zeros([1, 2]), tf.zeros([1, 6, 2]), tf.zeros([1, 3]),
              tf.zeros([1, 6, 3]), tf.ones([1, 4], tf.bool))
    with pytest.raises(ValueError, match=r"the batch size of `history\['id'\]` \(shape "
                                         r"\(2, 4, 3\)\) is 2 but that of `history\['mm'\]` "
                                         r"\(shape \(1, 4, 2\)\) is 1"):
        _call(layer, tf.zeros([1, 2]), tf.zeros([1, 4, 2]), tf.zeros([1, 3]),
              tf.zeros([2, 4, 3]), tf.ones([1, 4], tf.bool))
    with pytest.raises(ValueError, match=r"MultimodalIdCosineGSU: `history` lacks \['id'\]; it "
                                         r"needs \['mm', 'id'\], got \['mm'\]"):
        layer({MM: tf.zeros([1, 2]), ID: tf.zeros([1, 3])}, {MM: tf.zeros([1, 4, 2])},
              mask=tf.ones([1, 4], tf.bool))


def test_history_sequence_lengths_must_agree():
    with pytest.raises(ValueError, match=r"`history\['id'\]`.*`history\['mm'\]`"):
        _call(MultimodalIdCosineGSU(top_k=1), tf.zeros([1, 2]), tf.zeros([1, 4, 2]),
              tf.zeros([1, 3]), tf.zeros([1, 6, 3]), tf.ones([1, 4], tf.bool))


def test_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    args = ({MM: unit_rows(rng, (2, 4)), ID: rng.standard_normal((2, 3)).astype(np.float32)},
            {MM: unit_rows(rng, (2, 6, 4)),
             ID: rng.standard_normal((2, 6, 3)).astype(np.float32)})
    mask = np.array([[True] * 6, [True, False, True, False, False, False]])
    assert_round_trips(MultimodalIdCosineGSU(top_k=3, id_weight=2.0), args, {"mask": mask},
                       tmp_path)
