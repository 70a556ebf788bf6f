"""Tests of muse_tf.layers.projected_multimodal_gsu.ProjectedMultimodalGSU."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from muse_tf.layers import ProjectedMultimodalGSU
from muse_tf.layers.search_unit import MM

from .harness import assert_round_trips
from .reference import top_k_reference, unit_rows


def _call(layer, target, history, mask):
    return layer({MM: target}, {MM: history}, mask=mask)


def test_hand_computed_linear_projection():
    layer = ProjectedMultimodalGSU(top_k=3, projection_units=(2,))
    target = np.array([[1.0, 0.0]], np.float32)
    history = np.array([[[0.6, 0.8], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]]], np.float32)
    mask = np.array([[True, True, True, False]])
    _call(layer, target, history, mask)
    layer.projection[0].set_weights([np.array([[1.0, 0.0], [0.0, 2.0]], np.float32),
                                     np.zeros(2, np.float32)])
    out = _call(layer, target, history, mask)
    # P(x) = (x0, 2 x1): cos((1, 0), (0.6, 1.6)) = 0.6 / sqrt(2.92); (0, 2) → 0; (1, 0) → 1.
    assert out["indices"].numpy().tolist() == [[2, 0, 1]]
    np.testing.assert_allclose(out["scores"].numpy(), [[1.0, 0.6 / np.sqrt(2.92), 0.0]],
                               atol=1e-6)


def test_two_layer_projection_matches_numpy():
    rng = np.random.default_rng(4)
    layer = ProjectedMultimodalGSU(top_k=5, projection_units=(16, 8))
    target = unit_rows(rng, (2, 4))
    history = unit_rows(rng, (2, 40, 4))
    mask = rng.random((2, 40)) < 0.7
    _call(layer, target, history, mask)
    # Fixed weights with positive biases: no projection collapses onto a shared direction,
    # so no two cosines are equal up to rounding.
    w1, b1 = rng.standard_normal((4, 16)), rng.uniform(0.1, 0.5, 16)
    w2, b2 = rng.standard_normal((16, 8)), rng.standard_normal(8)
    w1, b1, w2, b2 = (w.astype(np.float32) for w in (w1, b1, w2, b2))
    layer.projection[0].set_weights([w1, b1])
    layer.projection[1].set_weights([w2, b2])
    out = _call(layer, target, history, mask)

    def project(x):
        y = np.maximum(x.astype(np.float64) @ w1 + b1, 0.0) @ w2 + b2
        return y / np.linalg.norm(y, axis=-1, keepdims=True)

    scores = np.einsum("bd,bld->bl", project(target), project(history))
    expected = top_k_reference(scores, mask, 5)
    np.testing.assert_array_equal(out["indices"].numpy(), expected["indices"])
    np.testing.assert_allclose(out["scores"].numpy(), expected["scores"], atol=1e-5)


def test_zero_projection_has_cosine_zero():
    layer = ProjectedMultimodalGSU(top_k=2, projection_units=(2,))
    target = np.array([[1.0, 0.0]], np.float32)
    history = np.array([[[0.0, 1.0], [-0.6, 0.8]]], np.float32)
    mask = np.array([[True, True]])
    _call(layer, target, history, mask)
    # P(x) = (x0, 0): (0, 1) projects to zero → cosine 0, above the -1 of (-0.6, 0.8).
    layer.projection[0].set_weights([np.array([[1.0, 0.0], [0.0, 0.0]], np.float32),
                                     np.zeros(2, np.float32)])
    out = _call(layer, target, history, mask)
    assert out["indices"].numpy().tolist() == [[0, 1]]
    np.testing.assert_allclose(out["scores"].numpy(), [[0.0, -1.0]], atol=1e-6)


def test_bad_projection_units():
    with pytest.raises(ValueError, match=r"`projection_units` must be a non-empty sequence"):
        ProjectedMultimodalGSU(projection_units=())
    with pytest.raises(ValueError, match=r"`projection_units\[\]` must be a positive int, got 0"):
        ProjectedMultimodalGSU(projection_units=(4, 0))


def test_error_names_argument_and_shape():
    with pytest.raises(ValueError, match=r"ProjectedMultimodalGSU: the embedding size of "
                                         r"`target\['mm'\]` \(shape \(1, 3\)\) is 3 but that "
                                         r"of `history\['mm'\]` \(shape \(1, 2, 4\)\) is 4"):
        _call(ProjectedMultimodalGSU(top_k=1), tf.zeros([1, 3]), tf.zeros([1, 2, 4]),
              tf.ones([1, 2], tf.bool))
    with pytest.raises(ValueError, match=r"ProjectedMultimodalGSU: `history\['mm'\]` must have "
                                         r"rank 3 \[batch, seq_len, dim\], got rank 2"):
        _call(ProjectedMultimodalGSU(top_k=1), tf.zeros([1, 4]), tf.zeros([1, 4]),
              tf.ones([1, 4], tf.bool))


def test_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    args = ({MM: unit_rows(rng, (2, 4))}, {MM: unit_rows(rng, (2, 6, 4))})
    mask = np.array([[True] * 6, [True, False, True, False, False, False]])
    layer = ProjectedMultimodalGSU(top_k=3, projection_units=(5, 3), activation="tanh")
    assert_round_trips(layer, args, {"mask": mask}, tmp_path)
