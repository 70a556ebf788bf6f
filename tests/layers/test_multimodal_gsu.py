"""Tests of muse_tf.layers.multimodal_gsu.MultimodalGSU."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from muse_tf.embeddings.arrays import normalise_rows
from muse_tf.embeddings.multimodal_table import FrozenMultimodalTable
from muse_tf.layers import MultimodalGSU
from muse_tf.layers.search_unit import MM, ROWS

from .harness import (
    assert_config_round_trip,
    assert_nested_close,
    assert_round_trips,
    assert_saved_model_round_trip,
)
from .reference import assert_top_k_matches, top_k_reference, unit_rows


def _out(layer, target, history, mask):
    """Vector mode: ``target`` ``[B, (C,) D]``, ``history`` ``[B, L, D]`` normalised vectors."""
    return {k: v.numpy() for k, v in layer({MM: target}, {MM: history}, mask=mask).items()}


def _table_out(layer, target, rows, mask):
    """Table mode: ``rows`` int32 ``[B, L]`` rows of the layer's table."""
    return {k: v.numpy() for k, v in layer({MM: target}, {ROWS: rows}, mask=mask).items()}


def test_hand_computed_cosine_top_k_with_tie_padding_and_missing_embedding():
    target = np.array([[1.0, 0.0]], np.float32)
    history = np.array([[[0.6, 0.8],     # cos 0.6
                         [0.0, 1.0],     # cos 0.0
                         [-1.0, 0.0],    # cos -1.0
                         [0.8, 0.6],     # cos 0.8
                         [0.8, -0.6],    # cos 0.8 (tie with position 3)
                         [0.0, 0.0],     # no multimodal embedding: masked by the caller
                         [1.0, 0.0]]],   # padding: cos 1.0 but masked
                       np.float32)
    mask = np.array([[True, True, True, True, True, False, False]])
    out = _out(MultimodalGSU(top_k=3), target, history, mask)
    assert out["indices"].tolist() == [[3, 4, 0]]  # tie: lower position first
    np.testing.assert_allclose(out["scores"], [[0.8, 0.8, 0.6]], atol=1e-7)
    assert out["mask"].tolist() == [[True, True, True]]


def test_fewer_valid_than_k_and_all_masked_row():
    target = np.array([[0.0, 1.0], [1.0, 0.0]], np.float32)
    history = np.array([[[0.0, 1.0], [1.0, 0.0], [0.0, -1.0]],
                        [[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]], np.float32)
    mask = np.array([[False, True, True], [False, False, False]])
    out = _out(MultimodalGSU(top_k=4), target, history, mask)
    assert out["indices"].tolist() == [[1, 2, 0, 0], [0, 0, 0, 0]]
    np.testing.assert_allclose(out["scores"], [[0.0, -1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert out["mask"].tolist() == [[True, True, False, False], [False, False, False, False]]


def test_nan_embedding_under_mask_is_never_selected():
    target = np.array([[1.0, 0.0]], np.float32)
    history = np.array([[[np.nan, np.nan], [0.6, 0.8], [-0.6, 0.8]]], np.float32)
    out = _out(MultimodalGSU(top_k=2), target, history, np.array([[False, True, True]]))
    assert out["indices"].tolist() == [[1, 2]]
    np.testing.assert_allclose(out["scores"], [[0.6, -0.6]], atol=1e-7)


def test_exact_ties_match_numpy_reference():
    # Unit vectors with entries ±0.5 (and 0s) give exactly representable cosines in
    # {-1, -0.5, 0, 0.5, 1}: many exact ties, no rounding.
    rng = np.random.default_rng(1)
    signs = rng.choice([-0.5, 0.5], size=(4, 30, 4)).astype(np.float32)
    target = rng.choice([-0.5, 0.5], size=(4, 4)).astype(np.float32)
    mask = rng.random((4, 30)) < 0.7
    mask[2, :] = False
    mask[3, 3:] = False
    out = _out(MultimodalGSU(top_k=8), target, signs, mask)
    scores = np.einsum("bd,bld->bl", target, signs)
    assert_nested_close(out, top_k_reference(scores, mask, 8))


@pytest.mark.parametrize("batch,length,dim,k", [(3, 1000, 16, 50), (2, 100_000, 8, 50)])
def test_random_unit_vectors_match_numpy_reference(batch, length, dim, k):
    rng = np.random.default_rng(length)
    target = unit_rows(rng, (batch, dim))
    history = unit_rows(rng, (batch, length, dim))
    mask = rng.random((batch, length)) < 0.8
    out = _out(MultimodalGSU(top_k=k), target, history, mask)
    scores = np.einsum("bd,bld->bl", target.astype(np.float64), history)
    expected = top_k_reference(scores, mask, k)
    np.testing.assert_array_equal(out["indices"], expected["indices"])
    np.testing.assert_allclose(out["scores"], expected["scores"], atol=1e-6)
    assert out["mask"].all()


def test_default_k_is_the_papers_50():
    assert MultimodalGSU().top_k == 50


def test_graph_is_one_matmul_and_one_top_k():
    layer = MultimodalGSU(top_k=5)
    fn = tf.function(lambda t, h, m: layer({MM: t}, {MM: h}, mask=m)).get_concrete_function(
        tf.TensorSpec([None, 8]), tf.TensorSpec([None, 1000, 8]),
        tf.TensorSpec([None, 1000], tf.bool))
    ops = [op.type for op in fn.graph.get_operations()]
    assert ops.count("TopKV2") == 1
    assert not {"While", "StatelessWhile", "Sort"} & set(ops)


def test_errors_name_argument_and_shape():
    layer = MultimodalGSU(top_k=2)
    with pytest.raises(ValueError, match=r"MultimodalGSU: `history\['mm'\]` must have rank 3 "
                                         r"\[batch, seq_len, dim\], got rank 2 with shape "
                                         r"\(2, 4\)"):
        layer({MM: tf.zeros([2, 4])}, {MM: tf.zeros([2, 4])}, mask=tf.ones([2, 4], tf.bool))
    with pytest.raises(ValueError, match=r"embedding size of `target\['mm'\]` \(shape \(2, 3\)\) "
                                         r"is 3 but that of `history\['mm'\]` \(shape "
                                         r"\(2, 5, 4\)\) is 4"):
        layer({MM: tf.zeros([2, 3])}, {MM: tf.zeros([2, 5, 4])}, mask=tf.ones([2, 5], tf.bool))
    with pytest.raises(ValueError, match=r"MultimodalGSU: `history` lacks \['mm'\]; it needs "
                                         r"\['mm'\], got \['rows'\]"):
        layer({MM: tf.zeros([2, 4])}, {ROWS: tf.zeros([2, 5], tf.int32)},
              mask=tf.ones([2, 5], tf.bool))


def test_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    args = ({MM: unit_rows(rng, (2, 4))}, {MM: unit_rows(rng, (2, 6, 4))})
    mask = np.array([[True] * 6, [True, False, True, False, False, False]])
    assert_round_trips(MultimodalGSU(top_k=3), args, {"mask": mask}, tmp_path)
    assert MultimodalGSU(top_k=3).get_config()["table"] is None


# --- table mode: history["rows"] of a FrozenMultimodalTable ------------------------------

def _table_array(rng, num_rows, dim, missing=(0, 1)):
    """Normalised ``[num_rows, dim]`` vectors; the ``missing`` rows (padding, OOV, items
    without an embedding) are all zero."""
    array = unit_rows(rng, (num_rows, dim))
    array[list(missing)] = 0.0
    return array


def _table(array, **kwargs):
    """A float table of the unit vectors ``array`` (float32 unless told)."""
    kwargs.setdefault("storage_dtype", "float32")
    return FrozenMultimodalTable(array.shape[0], array.shape[1], initial_table=array, **kwargs)


def _int8_table(rng, num_rows, dim, missing=(0, 1)):
    """An int8 table (the default storage) of random codes, the ``missing`` rows zero, and
    the unit vectors the codes stand for."""
    codes = rng.integers(-128, 128, size=(num_rows, dim)).astype(np.int8)
    codes[list(missing)] = 0
    table = FrozenMultimodalTable(num_rows, dim, initial_table=codes)
    return table, normalise_rows(codes)


def _table_reference(target, array, rows, mask, k):
    """NumPy top-K of ``<target, array[rows]>`` over the rows that have an embedding."""
    present = np.abs(array).sum(axis=-1) > 0
    scores = np.einsum("bd,bld->bl", target.astype(np.float64), array[rows])
    return top_k_reference(scores, mask & present[rows], k)


def test_table_hand_computed_rows_without_embedding_are_never_selected():
    array = np.array([[0.0, 0.0],      # row 0: padding
                      [0.0, 0.0],      # row 1: out of vocabulary
                      [-0.6, 0.8],     # cos -0.6
                      [-1.0, 0.0],     # cos -1.0
                      [-0.8, 0.6],     # cos -0.8
                      [0.0, 0.0]],     # row 5: an item without an embedding (cos 0 > all)
                     np.float32)
    layer = MultimodalGSU(top_k=4, table=_table(array))
    assert layer.history_keys == (ROWS,)
    target = np.array([[1.0, 0.0]], np.float32)
    rows = np.array([[5, 2, 1, 3, 4, 0]], np.int32)
    mask = np.array([[True, True, True, True, True, False]])
    out = _table_out(layer, target, rows, mask)
    assert out["indices"].tolist() == [[1, 4, 3, 0]]
    np.testing.assert_allclose(out["scores"], [[-0.6, -0.8, -1.0, 0.0]], atol=1e-7)
    assert out["mask"].tolist() == [[True, True, True, False]]


@pytest.mark.parametrize("storage", ["float32", "int8"])
@pytest.mark.parametrize("chunk_bytes", [None, 100, 1])
def test_table_top_k_matches_numpy_reference(chunk_bytes, storage):
    # chunk_bytes 100 (3 positions a block, the last one padded) and 1 (one position a
    # block) walk the history in several blocks.
    rng = np.random.default_rng(11)
    batch, length, num_rows, dim, k = 2, 20, 30, 4, 6
    missing = (0, 1, 7, 12, 13)
    if storage == "int8":
        table, array = _int8_table(rng, num_rows, dim, missing)
    else:
        array = _table_array(rng, num_rows, dim, missing=missing)
        table = _table(array)
    assert table.storage_dtype == storage
    if chunk_bytes is not None:
        table.chunk_bytes = chunk_bytes
    target = unit_rows(rng, (batch, dim))
    rows = rng.integers(0, num_rows, size=(batch, length)).astype(np.int32)
    rows[:, :4] = [7, 12, 13, 1]  # every row holds behaviours without an embedding
    mask = rng.random((batch, length)) < 0.8
    mask[:, :4] = True
    out = _table_out(MultimodalGSU(top_k=k, table=table), target, rows, mask)
    expected = _table_reference(target, array, rows, mask, k)
    np.testing.assert_array_equal(out["indices"], expected["indices"])
    np.testing.assert_array_equal(out["mask"], expected["mask"])
    np.testing.assert_allclose(out["scores"], expected["scores"], atol=1e-6)
    assert not np.isin(out["indices"][out["mask"]], np.arange(4)).any()


@pytest.mark.parametrize("storage", ["float32", "int8"])
@pytest.mark.parametrize("candidates", [None, 3])
@pytest.mark.parametrize("block_bytes,static_length", [
    (None, True),           # every user in one block
    (3 * 20 * 4 * 4, True),  # 3 whole histories a block: 7 users in 3 blocks, the last padded
    (1, True),              # no history fits: the table's own position blocks
    (3 * 20 * 4 * 4, False),  # history length only known when run
    (1, False),
])
def test_table_similarity_is_the_tables_bit_for_bit(storage, candidates, block_bytes,
                                                    static_length):
    rng = np.random.default_rng(18)
    batch, length, num_rows, dim = 7, 20, 30, 4
    if storage == "int8":
        table, _ = _int8_table(rng, num_rows, dim, missing=(0, 1, 9))
    else:
        table = _table(_table_array(rng, num_rows, dim, missing=(0, 1, 9)))
    table.chunk_bytes = 100  # several position blocks on the table's path
    layer = MultimodalGSU(top_k=3, table=table)
    if block_bytes is not None:
        layer.block_bytes = block_bytes
    queries = unit_rows(rng, (batch, dim) if candidates is None else (batch, candidates, dim))
    rows = rng.integers(0, num_rows, size=(batch, length)).astype(np.int32)
    similarity = tf.function(layer.table_similarity, input_signature=[
        tf.TensorSpec([None, *queries.shape[1:]]),
        tf.TensorSpec([None, length if static_length else None], tf.int32)])
    got = similarity(queries, rows).numpy()
    np.testing.assert_array_equal(got, table.similarity(queries, rows).numpy())
    shape = (length,) if candidates is None else (candidates, length)
    assert got.shape == (batch, *shape)
    assert similarity(queries[:0], rows[:0]).numpy().shape == (0, *shape)


def test_table_search_walks_whole_histories_of_several_users_a_block():
    table = _table(np.eye(8, 4, dtype=np.float32))
    layer = MultimodalGSU(top_k=5, table=table)
    fn = tf.function(lambda t, r, m: layer({MM: t}, {ROWS: r}, mask=m)).get_concrete_function(
        tf.TensorSpec([None, 4]), tf.TensorSpec([None, 1000], tf.int32),
        tf.TensorSpec([None, 1000], tf.bool))
    ops = [op.type for op in fn.graph.get_operations()]
    # One loop over blocks of users (no cond: the history length is static), one top-K.
    assert ops.count("While") + ops.count("StatelessWhile") == 1
    assert "If" not in ops and "StatelessIf" not in ops
    assert ops.count("TopKV2") == 1
    assert layer.block_bytes // (1000 * 4 * 4) > 1


def test_table_fewer_rows_with_embedding_than_k():
    rng = np.random.default_rng(12)
    array = _table_array(rng, 6, 3, missing=(0, 1, 2))
    target = unit_rows(rng, (1, 3))
    rows = np.array([[2, 4, 0, 1, 5, 3]], np.int32)
    mask = np.array([[True, True, True, True, True, False]])
    out = _table_out(MultimodalGSU(top_k=4, table=_table(array)), target, rows, mask)
    assert_nested_close(out, _table_reference(target, array, rows, mask, 4), atol=1e-6)
    assert out["mask"].tolist() == [[True, True, False, False]]
    assert sorted(out["indices"][0, :2].tolist()) == [1, 4]


def test_table_mode_equals_vector_mode_on_gathered_vectors():
    rng = np.random.default_rng(13)
    batch, length, num_rows, dim, k = 3, 40, 25, 8, 7
    array = _table_array(rng, num_rows, dim, missing=(0, 1, 3, 4))
    target = unit_rows(rng, (batch, dim))
    rows = rng.integers(0, num_rows, size=(batch, length)).astype(np.int32)
    mask = rng.random((batch, length)) < 0.7
    from_table = _table_out(MultimodalGSU(top_k=k, table=_table(array)), target, rows, mask)
    present = np.abs(array).sum(axis=-1) > 0
    from_vectors = _out(MultimodalGSU(top_k=k), target, array[rows], mask & present[rows])
    assert_nested_close(from_table, from_vectors, atol=1e-6)


def test_table_candidate_axis_equals_single_searches():
    rng = np.random.default_rng(14)
    batch, candidates, length, num_rows, dim, k = 2, 3, 15, 20, 4, 5
    array = _table_array(rng, num_rows, dim, missing=(0, 1, 6))
    table = _table(array)
    table.chunk_bytes = 100  # several blocks
    layer = MultimodalGSU(top_k=k, table=table)
    targets = unit_rows(rng, (batch, candidates, dim))
    rows = rng.integers(0, num_rows, size=(batch, length)).astype(np.int32)
    mask = rng.random((batch, length)) < 0.8
    together = _table_out(layer, targets, rows, mask)
    assert together["indices"].shape == (batch, candidates, k)
    present = np.abs(array).sum(axis=-1) > 0
    # The history repeats rows (20 rows, 15 positions): those positions tie only up to the
    # rounding of their products, so picks are compared as a top-K up to near-ties.
    for c in range(candidates):
        alone = _table_out(layer, targets[:, c], rows, mask)
        scores = np.einsum("bd,bld->bl", targets[:, c].astype(np.float64), array[rows])
        for out in ({key: v[:, c] for key, v in together.items()}, alone):
            assert_top_k_matches(out, scores, mask & present[rows], k, atol=1e-6)


def test_table_float16_storage_matches_rounded_vectors():
    rng = np.random.default_rng(15)
    array = _table_array(rng, 12, 4, missing=(0, 1, 5))
    target = unit_rows(rng, (2, 4))
    rows = rng.integers(0, 12, size=(2, 10)).astype(np.int32)
    mask = np.ones((2, 10), bool)
    layer = MultimodalGSU(top_k=4, table=_table(array, storage_dtype="float16"))
    out = _table_out(layer, target, rows, mask)
    rounded = array.astype(np.float16).astype(np.float32)
    assert_nested_close(out, _table_reference(target, rounded, rows, mask, 4), atol=1e-6)


def test_table_errors():
    with pytest.raises(ValueError, match=r"MultimodalGSU: `table` must be a "
                                         r"FrozenMultimodalTable or None, got ndarray"):
        MultimodalGSU(top_k=2, table=np.zeros([4, 2], np.float32))
    layer = MultimodalGSU(top_k=2, table=_table(np.eye(4, 2, dtype=np.float32)))
    with pytest.raises(ValueError, match=r"MultimodalGSU: `history` lacks \['rows'\]; it needs "
                                         r"\['rows'\], got \['mm'\]"):
        layer({MM: tf.zeros([1, 2])}, {MM: tf.zeros([1, 3, 2])}, mask=tf.ones([1, 3], tf.bool))
    with pytest.raises(ValueError, match=r"MultimodalGSU: `history\['rows'\]` must have rank 2 "
                                         r"\[batch, seq_len\], got rank 3 with shape "
                                         r"\(1, 3, 1\)"):
        layer({MM: tf.zeros([1, 2])}, {ROWS: tf.zeros([1, 3, 1], tf.int32)},
              mask=tf.ones([1, 3], tf.bool))
    with pytest.raises(ValueError, match=r"the batch size of `target\['mm'\]` \(shape \(2, 2\)\) "
                                         r"is 2 but that of `history\['rows'\]` \(shape "
                                         r"\(1, 3\)\) is 1"):
        layer({MM: tf.zeros([2, 2])}, {ROWS: tf.zeros([1, 3], tf.int32)},
              mask=tf.ones([1, 3], tf.bool))
    with pytest.raises(ValueError, match=r"sequence length size of `mask` \(shape \(1, 4\)\) is "
                                         r"4 but that of `history\['rows'\]`"):
        layer({MM: tf.zeros([1, 2])}, {ROWS: tf.zeros([1, 3], tf.int32)},
              mask=tf.ones([1, 4], tf.bool))


def _table_round_trip_case():
    rng = np.random.default_rng(16)
    array = _table_array(rng, 10, 4, missing=(0, 1, 4))
    rows = np.array([[2, 4, 9, 3, 0, 8], [5, 6, 7, 1, 2, 3]], np.int32)
    mask = np.array([[True] * 6, [True, False, True, True, False, False]])
    return array, ({MM: unit_rows(rng, (2, 4))}, {ROWS: rows}), mask


def test_table_config_round_trip_keeps_the_table_config():
    array, args, mask = _table_round_trip_case()
    table = _table(array, storage_dtype="float16", name="mm_table")
    layer = MultimodalGSU(top_k=3, table=table)
    config = layer.get_config()
    assert config["table"] == tf.keras.layers.serialize(table)
    clone = MultimodalGSU.from_config(config)
    assert isinstance(clone.table, FrozenMultimodalTable) and clone.table is not table
    assert clone.table.get_config() == table.get_config()
    assert (clone.table.num_rows, clone.table.dim, clone.table.storage_dtype) == \
        (10, 4, "float16")
    assert clone.history_keys == (ROWS,)
    # The vectors are weights (not config): the harness copies them with set_weights.
    assert {w.name.split("/")[-1] for w in layer.weights} == {"vectors:0", "present:0"}
    # Non-trivial: row 1 of the batch has 3 valid positions, one of them (table row 1) empty.
    assert layer(*args, mask=mask)["mask"].numpy().tolist() == [[True] * 3, [True, True, False]]
    assert_config_round_trip(layer, args, {"mask": mask})


def test_table_saved_model_round_trip(tmp_path):
    array, args, mask = _table_round_trip_case()
    layer = MultimodalGSU(top_k=3, table=_table(array))
    assert_saved_model_round_trip(layer, args, {"mask": mask}, tmp_path)


def test_int8_table_round_trips(tmp_path):
    _, args, mask = _table_round_trip_case()
    table, _ = _int8_table(np.random.default_rng(17), 10, 4, missing=(0, 1, 4))
    layer = MultimodalGSU(top_k=3, table=table)
    assert {w.name.split("/")[-1] for w in layer.weights} == {"vectors:0", "inverse_norm:0",
                                                              "present:0"}
    assert layer(*args, mask=mask)["mask"].numpy().tolist() == [[True] * 3, [True, True, False]]
    assert_config_round_trip(layer, args, {"mask": mask})
    assert MultimodalGSU.from_config(layer.get_config()).table.storage_dtype == "int8"
    assert_saved_model_round_trip(layer, args, {"mask": mask}, tmp_path)


# --- checks added after the layer review ------------------------------------------------

def test_table_dim_mismatch_names_the_target():
    layer = MultimodalGSU(top_k=2, table=_table(np.eye(5, 4, dtype=np.float32)))
    with pytest.raises(ValueError, match=r"`target\['mm'\]`"):
        layer({MM: tf.zeros([1, 3])}, {ROWS: tf.zeros([1, 4], tf.int32)},
              mask=tf.ones([1, 4], tf.bool))


def test_table_mode_under_mixed_precision():
    array = np.array([[0.0, 0.0], [0.0, 0.0], [0.6, 0.8], [1.0, 0.0]], np.float32)
    layer = MultimodalGSU(top_k=2, table=_table(array), dtype="mixed_float16")
    out = _table_out(layer, np.array([[1.0, 0.0]], np.float32),
                     np.array([[2, 3, 1]], np.int32), np.ones((1, 3), bool))
    assert out["indices"].tolist() == [[1, 0]]
    np.testing.assert_allclose(out["scores"], [[1.0, 0.6]], atol=1e-3)
