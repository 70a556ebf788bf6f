"""Tests for muse_tf.index.brute_force: the chunked exact top-k against NumPy (ids, order, ties
across chunk boundaries), against TFRS's BruteForce on one chunk, its bounded memory, the
candidates shared (not copied) as a variable, and the export holding them as variables."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_recommenders as tfrs
from tensorflow.core.protobuf import saved_model_pb2

from muse_tf.index.brute_force import (
    ALIGNMENT,
    ChunkedBruteForce,
    aligned_empty,
    brute_force_index,
    chunked_top_k,
    numpy_top_k,
    shared_variable,
)
from muse_tf.profiling import reset_peak_rss, rss_bytes

NUM_ITEMS, DIM, NUM_QUERIES, K = 3000, 16, 64, 20


@pytest.fixture(scope="module")
def catalogue() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    items = rng.standard_normal((NUM_ITEMS, DIM)).astype(np.float32)
    queries = rng.standard_normal((NUM_QUERIES, DIM)).astype(np.float32)
    ids = np.arange(NUM_ITEMS, dtype=np.int64) * 3 + 11
    return items, queries, ids


@pytest.mark.parametrize(
    "chunk_rows",
    [NUM_ITEMS,  # one chunk
     112,        # 27 chunks, the last one of 88 rows
     K,          # the smallest chunk: k rows, rounded up to 32
     1000])      # 1008-row chunks, the last one of 984
def test_chunked_top_k_equals_numpy(catalogue, chunk_rows):
    items, queries, ids = catalogue
    index = brute_force_index(items.copy(), ids, K, max_chunk_scores=NUM_QUERIES * chunk_rows)
    scores, found = index(tf.constant(queries))
    expected_scores, expected_ids = numpy_top_k(queries, items, K, ids)
    np.testing.assert_array_equal(found.numpy(), expected_ids)
    np.testing.assert_allclose(scores.numpy(), expected_scores, rtol=1e-5, atol=1e-5)


def test_a_last_chunk_shorter_than_k_is_merged():
    rng = np.random.default_rng(3)
    items = rng.standard_normal((70, 4)).astype(np.float32)
    queries = rng.standard_normal((5, 4)).astype(np.float32)
    # 32-row chunks: 32 + 32 + 6, and k = 20 > 6.
    scores, indices = chunked_top_k(tf.constant(queries), tf.constant(items), 20,
                                    max_chunk_scores=5 * 32)
    expected_scores, expected = numpy_top_k(queries, items, 20)
    np.testing.assert_array_equal(indices.numpy(), expected)
    np.testing.assert_allclose(scores.numpy(), expected_scores, rtol=1e-5, atol=1e-6)


def test_ties_are_ordered_by_catalogue_position_across_chunks():
    # Small integer vectors: every dot product is exact in float32, and each score occurs
    # for many candidates spread over all chunks (16 rows each).
    rng = np.random.default_rng(11)
    patterns = rng.integers(-2, 3, (4, 6)).astype(np.float32)
    items = patterns[rng.integers(0, 4, 200)]
    queries = rng.integers(-2, 3, (9, 6)).astype(np.float32)
    ids = rng.permutation(200).astype(np.int64) + 1
    for k in (1, 37, 200):
        index = brute_force_index(items.copy(), ids, k, max_chunk_scores=9 * 16)
        scores, found = index(tf.constant(queries))
        expected_scores, expected_ids = numpy_top_k(queries, items, k, ids)
        np.testing.assert_array_equal(found.numpy(), expected_ids)
        np.testing.assert_array_equal(scores.numpy(), expected_scores)


def test_one_chunk_is_tfrs_brute_force(catalogue):
    items, queries, ids = catalogue
    ours = brute_force_index(items.copy(), ids, K)(tf.constant(queries))
    tfrs_layer = tfrs.layers.factorized_top_k.BruteForce(k=K)
    theirs = tfrs_layer.index(tf.constant(items), tf.constant(ids))(tf.constant(queries))
    np.testing.assert_array_equal(ours[1].numpy(), theirs[1].numpy())
    np.testing.assert_array_equal(ours[0].numpy(), theirs[0].numpy())


def test_chunking_does_not_change_the_result(catalogue):
    items, queries, ids = catalogue
    whole = brute_force_index(items.copy(), ids, 50)(tf.constant(queries))
    chunked = brute_force_index(items.copy(), ids, 50, max_chunk_scores=NUM_QUERIES * 64)
    scores, found = chunked(tf.constant(queries))
    np.testing.assert_array_equal(found.numpy(), whole[1].numpy())
    np.testing.assert_allclose(scores.numpy(), whole[0].numpy(), rtol=1e-6, atol=1e-6)


def test_k_above_the_catalogue_is_clipped_and_traced_search_matches(catalogue):
    items, queries, ids = catalogue
    index = brute_force_index(items[:7].copy(), ids[:7], 100)
    assert index(tf.constant(queries))[1].shape == (NUM_QUERIES, 7)
    search = tf.function(lambda q: index(q, k=5), autograph=False,
                         input_signature=[tf.TensorSpec([None, DIM], tf.float32)])
    np.testing.assert_array_equal(search(tf.constant(queries))[1].numpy(),
                                  numpy_top_k(queries, items[:7], 5, ids[:7])[1])
    assert search(tf.zeros([0, DIM]))[1].shape == (0, 5)


def test_a_search_never_holds_the_whole_score_matrix():
    # 1M candidates and 512 queries: the [B, N] float32 scores would take 2 GiB; chunks of
    # the default 2^25 scores take 128 MiB.
    rng = np.random.default_rng(5)
    items = aligned_empty((1 << 20, 8), np.float32)
    items[:] = rng.standard_normal(items.shape, dtype=np.float32)
    queries = tf.constant(rng.standard_normal((512, 8), dtype=np.float32))
    index = brute_force_index(items, np.arange(len(items)), 10)
    search = tf.function(lambda q: index(q), autograph=False)
    search(queries[:4])  # traces
    before = rss_bytes()
    if not reset_peak_rss() or before == 0:
        pytest.skip("this system does not report a resettable peak RSS")
    found = search(queries)[1].numpy()
    assert rss_bytes("VmHWM") - before < 2**30
    np.testing.assert_array_equal(found[:3], numpy_top_k(queries.numpy()[:3], items, 10)[1])


def test_an_aligned_array_is_shared_not_copied(catalogue):
    items, _, ids = catalogue
    candidates = aligned_empty(items.shape, np.float32)
    assert candidates.ctypes.data % ALIGNMENT == 0 and candidates.flags.c_contiguous
    candidates[:] = items
    own_ids = ids.copy()
    index = brute_force_index(candidates, own_ids, K)
    assert isinstance(index.candidates, tf.Variable) and not index.candidates.trainable
    assert np.shares_memory(np.asarray(index.candidates.value()), candidates)
    # The shared array is read-only now; the identifiers were copied and stay writeable.
    assert not candidates.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        candidates[0, 0] = 1.0
    own_ids[0] = -1
    assert int(index.identifiers.numpy()[0]) == ids[0]
    # A search reads the variable without switching it to copy-on-read: still shared.
    index(tf.constant(items[:2]))
    assert np.shares_memory(np.asarray(index.candidates.value()), candidates)


def test_other_arrays_are_copied_once_into_an_aligned_buffer():
    base = np.zeros(4 * 5 + 1, np.float32)
    unaligned = base[1:].reshape(4, 5)
    unaligned[:] = np.arange(20, dtype=np.float32).reshape(4, 5)
    variable = shared_variable(unaligned, "values")
    np.testing.assert_array_equal(variable.numpy(), unaligned)
    assert not np.shares_memory(np.asarray(variable.value()), base)
    assert unaligned.flags.writeable
    strided = np.arange(40, dtype=np.float32).reshape(4, 10)[:, ::2]
    np.testing.assert_array_equal(shared_variable(strided, "strided").numpy(), strided)


def test_the_export_holds_the_candidates_as_variables(catalogue, tmp_path):
    items, queries, _ = catalogue
    many = np.tile(items, (10, 1))  # 30000 x 16 float32: 1.9 MB of candidates
    index = brute_force_index(many, np.arange(len(many), dtype=np.int64), K,
                              max_chunk_scores=NUM_QUERIES * 4096)
    module = tf.Module()
    module.index = index
    module.search = tf.function(lambda q: index(q, k=K),
                                input_signature=[tf.TensorSpec([None, DIM], tf.float32)])
    expected = module.search(tf.constant(queries))
    tf.saved_model.save(module, str(tmp_path / "brute_force"))
    proto = (tmp_path / "brute_force" / "saved_model.pb").read_bytes()
    assert len(proto) < many.nbytes // 10
    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString(proto)
    graph = saved.meta_graphs[0].graph_def
    nodes = list(graph.node) + [n for f in graph.library.function for n in f.node_def]
    assert {"While", "StatelessWhile"} & {n.op for n in nodes}
    loaded = tf.saved_model.load(str(tmp_path / "brute_force"))
    scores, found = loaded.search(tf.constant(queries))
    np.testing.assert_array_equal(found.numpy(), expected[1].numpy())
    np.testing.assert_array_equal(scores.numpy(), expected[0].numpy())


def test_bad_arguments_are_named(catalogue):
    items, queries, ids = catalogue
    with pytest.raises(ValueError, match="max_chunk_scores must be a positive int"):
        ChunkedBruteForce(max_chunk_scores=0)
    with pytest.raises(ValueError, match="`index` method must be called first"):
        ChunkedBruteForce()(tf.constant(queries))
    index = brute_force_index(items.copy(), ids, K)
    with pytest.raises(ValueError, match=r"queries must be \[B, D\]"):
        index(tf.constant(queries[0]))
