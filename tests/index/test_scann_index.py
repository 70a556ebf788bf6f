"""Tests for muse_tf.index.scann_index: ScaNN against a NumPy brute force (float32 and int8
re-ordering), the catalogue-scaled parameters, the state loaded from ScaNN's own searcher,
padding of short results, save/reload, the benchmark, the missing-ScaNN error, and the
catalogue checks of muse_tf.index.brute_force."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import tensorflow as tf
from scann import scann_ops
from tensorflow.core.protobuf import saved_model_pb2

from muse_tf.index.brute_force import brute_force_index, check_catalogue, numpy_top_k
from muse_tf.index.scann_index import (
    FLOAT32_REORDER_MAX_BYTES,
    SCANN_NAMESPACE,
    ScannIndex,
    clustered_catalogue,
    load_state,
    reorder_dtype_for,
    reordering_candidates,
    require_scann,
    scaled_tree,
    scann_index,
    scann_save_options,
    scann_vs_brute_force,
    tree_training_sample,
)

NUM_ITEMS, DIM, K = 3000, 16, 20


@pytest.fixture(scope="module")
def catalogue():
    items, queries = clustered_catalogue(NUM_ITEMS, DIM, 64, seed=1, items_per_cluster=100)
    ids = np.arange(NUM_ITEMS, dtype=np.int64) * 7 + 1000
    return items, queries, ids


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(x, y)) / a.shape[1] for x, y in zip(a, b,
                                                                             strict=True)]))


def test_clustered_catalogue_is_unit_norm_and_deterministic():
    items, queries = clustered_catalogue(500, 8, 10, seed=3, items_per_cluster=50)
    assert items.shape == (500, 8) and queries.shape == (10, 8)
    np.testing.assert_allclose(np.linalg.norm(items, axis=1), 1.0, atol=1e-5)
    again, _ = clustered_catalogue(500, 8, 10, seed=3, items_per_cluster=50)
    np.testing.assert_array_equal(items, again)


def test_numpy_top_k_on_a_hand_made_case():
    candidates = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    scores, ids = numpy_top_k(np.array([[1.0, 0.1]]), candidates, 2, np.array([10, 11, 12]))
    np.testing.assert_array_equal(ids, [[10, 12]])
    np.testing.assert_allclose(scores, [[1.0, 0.77]])


def test_brute_force_index_equals_numpy(catalogue):
    items, queries, ids = catalogue
    index = brute_force_index(items, ids, K)
    scores, found = index(tf.constant(queries))
    expected_scores, expected_ids = numpy_top_k(queries, items, K, ids)
    np.testing.assert_array_equal(found.numpy(), expected_ids)
    np.testing.assert_allclose(scores.numpy(), expected_scores, rtol=1e-5, atol=1e-5)
    # k is clipped to the catalogue size.
    assert brute_force_index(items[:5], ids[:5], K)(tf.constant(queries))[1].shape == (64, 5)


def test_scann_overlaps_numpy_brute_force(catalogue):
    items, queries, ids = catalogue
    _, expected = numpy_top_k(queries, items, K, ids)
    index = scann_index(items, ids, K, num_leaves=60, num_leaves_to_search=20,
                        num_reordering_candidates=200)
    scores, found = index(tf.constant(queries))
    assert found.shape == (64, K) and found.dtype == tf.int64
    assert overlap(found.numpy(), expected) >= 0.95
    # Scores are the exact dot products of the returned items (re-ordering is exact).
    position = {int(i): n for n, i in enumerate(ids)}
    rows = np.vectorize(position.get)(found.numpy())
    exact = np.einsum("qd,qkd->qk", queries, items[rows])
    np.testing.assert_allclose(scores.numpy(), exact, rtol=1e-4, atol=1e-4)
    assert np.all(np.diff(scores.numpy(), axis=1) <= 1e-6)


def test_int8_reordering_keeps_the_overlap_in_a_quarter_of_the_memory(catalogue):
    items, queries, ids = catalogue
    _, expected = numpy_top_k(queries, items, K, ids)
    index = scann_index(items, ids, K, num_leaves=60, num_leaves_to_search=20,
                        num_reordering_candidates=200, reorder_dtype="int8")
    assert index.reorder_dtype == "int8"
    assert overlap(index(tf.constant(queries))[1].numpy(), expected) >= 0.95
    state = index._serialized_searcher
    # Index memory N * (4 + D / 2 + D) bytes: leaf ids, hashing codes, int8 vectors.
    assert state.int8_dataset.shape == (NUM_ITEMS, DIM) and state.int8_dataset.dtype == tf.int8
    assert state.dataset.shape == ()  # no float32 copy kept
    assert state.hashed_dataset.shape == (NUM_ITEMS, DIM // 2)
    assert state.datapoint_to_token.shape == (NUM_ITEMS,)


def test_the_loaded_state_answers_as_scanns_own_searcher(catalogue, tmp_path):
    items, queries, _ = catalogue
    for dtype in ("float32", "int8"):
        layer = ScannIndex(k=K, num_leaves=40, num_leaves_to_search=8,
                           num_reordering_candidates=100, training_sample_size=NUM_ITEMS,
                           reorder_dtype=dtype)
        searcher = layer.build_searcher(items)
        own, distances = searcher.search_batched(queries, final_num_neighbors=K)
        (tmp_path / dtype).mkdir()
        searcher.serialize(str(tmp_path / dtype))
        state = load_state(str(tmp_path / dtype))
        result = scann_ops.searcher_from_module(state).search_batched(
            tf.constant(queries), final_num_neighbors=K)
        np.testing.assert_array_equal(result.indices.numpy(), own)
        np.testing.assert_allclose(result.distances.numpy(), distances, rtol=1e-6)


def test_scaled_tree_keeps_the_configured_tree_then_grows_as_the_square_root():
    assert scaled_tree(40) == (2, 2)           # clipped to N // 16, as always
    assert scaled_tree(320) == (20, 10)
    assert scaled_tree(3000) == (100, 10)
    assert scaled_tree(10_000) == (100, 10)    # the configured tree up to 100 ** 2 items
    assert scaled_tree(10_001) == (101, 11)
    assert scaled_tree(1_000_000) == (1000, 100)
    assert scaled_tree(4_000_000) == (2000, 200)
    assert scaled_tree(35_400_000) == (5950, 595)
    assert scaled_tree(35_400_000, 8000, 400) == (8000, 400)  # a larger tree is kept
    assert scaled_tree(1_000_000, 100, 1) == (1000, 10)       # the configured share
    with pytest.raises(ValueError, match="num_leaves must be a positive int"):
        scaled_tree(100, 0)


def test_training_sample_reordering_and_dtype_scale_with_the_catalogue():
    assert tree_training_sample(3000, 100) == 3000            # the whole small catalogue
    assert tree_training_sample(1_000_000, 1000) == 100_000   # ScaNN's default
    assert tree_training_sample(35_400_000, 5950) == 380_800  # 64 points per leaf
    assert reordering_candidates(3000, 10) == 100
    assert reordering_candidates(1_000_000, 200) == 800       # today's max(4k, 100)
    assert reordering_candidates(1_000_001, 200) == 2000
    largest_float32 = FLOAT32_REORDER_MAX_BYTES // (4 * 32)
    assert reorder_dtype_for(largest_float32, 32) == "float32"
    assert reorder_dtype_for(largest_float32 + 1, 32) == "int8"
    assert reorder_dtype_for(35_400_000, 32) == "int8"


def test_scann_index_defaults_are_the_scaled_ones(catalogue):
    items, queries, ids = catalogue
    index = scann_index(items, ids, K, num_reordering_candidates=200)
    assert index.describe() == {
        "num_leaves": 100, "num_leaves_to_search": 10, "num_reordering_candidates": 200,
        "reorder_dtype": "float32", "training_sample_size": NUM_ITEMS,
        "dimensions_per_block": 2}
    assert index(tf.constant(queries))[1].shape == (64, K)


def test_a_shared_catalogue_builds_from_its_variable_or_its_read_only_array(catalogue):
    from muse_tf.index.brute_force import aligned_empty, brute_force_index

    items, queries, ids = catalogue
    shared = aligned_empty(items.shape, np.float32)
    shared[:] = items
    exact = brute_force_index(shared, ids, K)  # shares the array and makes it read-only
    index = scann_index(exact.candidates, ids, K, num_leaves=60, num_leaves_to_search=20,
                        num_reordering_candidates=200)
    _, expected = numpy_top_k(queries, items, K, ids)
    assert overlap(index(tf.constant(queries))[1].numpy(), expected) >= 0.95
    read_only = scann_index(shared, ids, K, num_leaves=60, num_leaves_to_search=20,
                            num_reordering_candidates=200)
    # ScaNN trains on several threads, so two builds need not agree exactly: each is held to
    # the same recall against the exact top-k instead.
    assert overlap(read_only(tf.constant(queries))[1].numpy(), expected) >= 0.95


def test_scann_searching_every_leaf_with_full_reordering_is_exact(catalogue):
    items, queries, ids = catalogue
    _, expected = numpy_top_k(queries, items, K, ids)
    index = scann_index(items, ids, K, num_leaves=20, num_leaves_to_search=20,
                        num_reordering_candidates=NUM_ITEMS)
    np.testing.assert_array_equal(index(tf.constant(queries))[1].numpy(), expected)


def test_scann_pads_results_it_cannot_fill(catalogue):
    items, queries, ids = catalogue
    index = scann_index(items[:320], ids[:320], 50, num_leaves=20, num_leaves_to_search=1)
    assert (index.num_leaves, index.num_leaves_to_search) == (20, 1)
    scores, found = index(tf.constant(queries))
    scores, found = scores.numpy(), found.numpy()
    assert found.shape == scores.shape == (64, 50)
    missing = found == 0
    assert missing.any(), "one searched leaf of ~16 items cannot fill 50 slots"
    assert np.all(np.isneginf(scores[missing])) and np.all(np.isfinite(scores[~missing]))
    assert np.all(np.isin(found[~missing], ids[:320]))
    # Filled slots come first, and no item is returned twice.
    assert np.all(np.diff(missing.astype(int), axis=1) >= 0)
    for row, hit in zip(found, ~missing, strict=True):
        assert len(set(row[hit].tolist())) == hit.sum()


def test_scann_tree_is_fitted_to_a_small_catalogue(catalogue):
    items, queries, ids = catalogue
    index = scann_index(items[:40], ids[:40], 100, num_leaves=100, num_leaves_to_search=10)
    assert (index.num_leaves, index.num_leaves_to_search) == (2, 2)
    assert index(tf.constant(queries))[1].shape == (64, 40)


def test_scann_export_saves_with_the_scann_namespace_and_reloads(catalogue, tmp_path):
    items, queries, ids = catalogue
    index = scann_index(items, ids, K, num_leaves=30, num_leaves_to_search=5,
                        num_reordering_candidates=60)
    expected = index(tf.constant(queries))[1].numpy()
    assert scann_save_options().namespace_whitelist == [SCANN_NAMESPACE]

    module = tf.Module()
    module.index = index
    module.search = tf.function(lambda q: index(q, k=K)[1],
                                input_signature=[tf.TensorSpec([None, DIM], tf.float32)])
    tf.saved_model.save(module, str(tmp_path / "scann"), options=scann_save_options())
    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((tmp_path / "scann" / "saved_model.pb").read_bytes())
    graph = saved.meta_graphs[0].graph_def
    ops = {n.op for f in graph.library.function for n in f.node_def}
    assert {"Scann>ScannSearchBatched", "Scann>TensorsToScann"} <= ops
    loaded = tf.saved_model.load(str(tmp_path / "scann"))
    np.testing.assert_array_equal(loaded.search(tf.constant(queries)).numpy(), expected)


def test_benchmark_reports_overlap_and_speed():
    result = scann_vs_brute_force(num_items=8000, dim=16, queries=200, k=20, num_leaves=20,
                                  num_leaves_to_search=10, num_reordering_candidates=200,
                                  batch_size=50)
    assert result["overlap"] >= 0.95
    assert result["brute_force_qps"] > 0 and result["scann_qps"] > 0
    assert result["speedup"] == pytest.approx(result["scann_qps"] / result["brute_force_qps"])
    assert {"num_items", "k", "scann_build_seconds", "brute_force_build_seconds",
            "training_sample_size", "reorder_dtype"} <= set(result)
    assert result["catalogue_bytes"] == 8000 * 16 * 4
    assert result["peak_rss_bytes"] >= result["catalogue_bytes"]
    assert result["scann_build_peak_extra_bytes"] >= 0


def test_missing_scann_gives_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "scann", None)  # makes `import scann` raise ImportError
    with pytest.raises(ImportError, match=r"pip install scann.*brute-force"):
        require_scann()
    with pytest.raises(ImportError, match="pip install scann"):
        scann_index(np.eye(4, dtype=np.float32), np.arange(4), 2)


@pytest.mark.parametrize(
    ("candidates", "identifiers", "k", "match"),
    [
        (np.zeros((3,), np.float32), np.arange(3), 1, "float \\[N, D\\]"),
        (np.zeros((3, 2), np.int64), np.arange(3), 1, "float \\[N, D\\]"),
        (np.zeros((3, 2), np.float32), np.arange(4), 1, "identifiers must be \\[N=3\\]"),
        (np.zeros((0, 2), np.float32), np.arange(0), 1, "catalogue is empty"),
        (np.zeros((3, 2), np.float32), np.arange(3), 0, "k must be an int >= 1"),
    ],
)
def test_catalogue_checks_name_the_problem(candidates, identifiers, k, match):
    with pytest.raises(ValueError, match=match):
        check_catalogue(candidates, identifiers, k)
