"""Tests of muse_tf.layers.id_embedding_gsu.IdEmbeddingGSU (SIM-soft)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from muse_tf.layers import IdEmbeddingGSU
from muse_tf.layers.search_unit import ID, MM

from .harness import assert_round_trips
from .reference import top_k_reference


def test_hand_computed_inner_products():
    target = np.array([[1.0, 2.0]], np.float32)
    history = np.array([[[3.0, 4.0], [-1.0, 0.0], [2.0, 2.0], [50.0, 50.0]]], np.float32)
    mask = np.array([[True, True, True, False]])
    out = IdEmbeddingGSU(top_k=2)({ID: target}, {ID: history}, mask=mask)
    assert out["indices"].numpy().tolist() == [[0, 2]]
    np.testing.assert_allclose(out["scores"].numpy(), [[11.0, 6.0]])
    assert out["mask"].numpy().tolist() == [[True, True]]


def test_not_normalised_matches_numpy_reference():
    rng = np.random.default_rng(5)
    target = (rng.standard_normal((4, 6)) * 3).astype(np.float32)
    history = (rng.standard_normal((4, 300, 6)) * 3).astype(np.float32)
    mask = rng.random((4, 300)) < 0.5
    mask[1, 2:] = False
    out = IdEmbeddingGSU(top_k=10)({ID: target}, {ID: history}, mask=mask)
    expected = top_k_reference(np.einsum("bd,bld->bl", target.astype(np.float64), history),
                               mask, 10)
    np.testing.assert_array_equal(out["indices"].numpy(), expected["indices"])
    np.testing.assert_array_equal(out["mask"].numpy(), expected["mask"])
    np.testing.assert_allclose(out["scores"].numpy(), expected["scores"], rtol=1e-5, atol=1e-5)


def test_error_names_argument():
    with pytest.raises(ValueError, match=r"IdEmbeddingGSU: `mask` must be a bool tensor, got "
                                         r"dtype int32"):
        IdEmbeddingGSU(top_k=1)({ID: tf.zeros([1, 2])}, {ID: tf.zeros([1, 3, 2])},
                                mask=tf.ones([1, 3], tf.int32))
    with pytest.raises(ValueError, match=r"IdEmbeddingGSU: `target` lacks \['id'\]; it needs "
                                         r"\['id'\], got \['mm'\]"):
        IdEmbeddingGSU(top_k=1)({MM: tf.zeros([1, 2])}, {ID: tf.zeros([1, 3, 2])},
                                mask=tf.ones([1, 3], tf.bool))
    with pytest.raises(ValueError, match=r"IdEmbeddingGSU: the embedding size of "
                                         r"`target\['id'\]` \(shape \(1, 4\)\) is 4 but that "
                                         r"of `history\['id'\]` \(shape \(1, 3, 2\)\) is 2"):
        IdEmbeddingGSU(top_k=1)({ID: tf.zeros([1, 4])}, {ID: tf.zeros([1, 3, 2])},
                                mask=tf.ones([1, 3], tf.bool))


def test_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    args = ({ID: rng.standard_normal((2, 3)).astype(np.float32)},
            {ID: rng.standard_normal((2, 5, 3)).astype(np.float32)})
    mask = np.array([[True] * 5, [False, True, False, False, False]])
    assert_round_trips(IdEmbeddingGSU(top_k=2), args, {"mask": mask}, tmp_path)
