"""IdLookup, FrozenMultimodalTable and the model-side vocabularies."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

import muse_tf  # noqa: F401
from muse_tf import schema
from muse_tf.data import layout
from muse_tf.embeddings import (
    FrozenMultimodalTable,
    IdLookup,
    build_vocabularies,
    normalised_mm_matrix,
)
from muse_tf.embeddings.arrays import normalise_rows
from muse_tf.embeddings.vocabulary import read_vocabulary_ids

BIG = np.iinfo(np.int64).max
SMALL = np.iinfo(np.int64).min


def _write_vocab(path, rows):
    with open(path, "w") as f:
        f.writelines(f"{i}\t{c}\n" for i, c in rows)


def test_id_lookup_rows(tmp_path):
    path = str(tmp_path / "v.tsv")
    _write_vocab(path, [(-5, 9), (BIG, 4), (SMALL + 1, 2), (77, 1)])
    lookup = IdLookup(path, vocab_size=4, num_embedded=2)
    ids = tf.constant([[-5, BIG, SMALL + 1, 77, 0, 12345]], tf.int64)
    np.testing.assert_array_equal(lookup.lookup_all(ids).numpy(), [[2, 3, 4, 5, 0, 1]])
    # Lines past num_embedded (rare ids) share the OOV row of the trainable embedding.
    np.testing.assert_array_equal(lookup(ids).numpy(), [[2, 3, 1, 1, 0, 1]])
    assert lookup.num_rows == 6 and lookup.num_embedded_rows == 4
    clone = IdLookup.from_config(lookup.get_config())
    np.testing.assert_array_equal(clone(ids).numpy(), lookup(ids).numpy())


def test_id_lookup_rejects_non_int64(tmp_path):
    path = str(tmp_path / "v.tsv")
    _write_vocab(path, [(1, 1)])
    with pytest.raises(TypeError, match="int64"):
        IdLookup(path, 1).lookup_all(tf.constant([1], tf.int32))
    with pytest.raises(ValueError, match="num_embedded=3"):
        IdLookup(path, 1, num_embedded=3)


def test_normalised_mm_matrix_normalises_once_and_zeroes_missing():
    mm_ids = np.array([30, 10, 20], np.int64)
    vectors = np.array([[3, 4], [0, 5], [0, 0]], np.int8)
    table = normalised_mm_matrix(np.array([10, 99, 30, 20], np.int64), mm_ids, vectors)
    expected = np.array([[0, 0], [0, 0], [0, 1], [0, 0], [0.6, 0.8], [0, 0]], np.float32)
    np.testing.assert_allclose(table, expected, atol=1e-7)


@pytest.mark.parametrize("storage", ["int8", "float32"])
def test_frozen_table_gathers_and_masks(storage):
    table = np.array([[0, 0], [0, 0], [0.6, 0.8], [0, 0]], np.float32)
    codes = np.array([[0, 0], [0, 0], [-3, -4], [0, 0]], np.int8)  # int8: any scale/sign
    unit = table * np.array([[1], [1], [-1], [1]], np.float32)
    layer = FrozenMultimodalTable(4, 2, storage_dtype=storage,
                                  initial_table=codes if storage == "int8" else unit)
    rows = tf.constant([[2, 3, 0]])
    np.testing.assert_allclose(layer(rows).numpy(), unit[[[2, 3, 0]]], atol=1e-7)
    np.testing.assert_array_equal(layer.has_embedding(rows).numpy(), [[True, False, False]])
    assert not layer.trainable_weights
    with pytest.raises(ValueError, match=r"\[num_rows=5, dim=2\]"):
        FrozenMultimodalTable(5, 2, storage_dtype=storage, initial_table=unit)


def test_frozen_table_float16_storage():
    table = np.array([[0, 0], [0, 0], [0.6, 0.8]], np.float32)
    layer = FrozenMultimodalTable(3, 2, storage_dtype="float16", initial_table=table)
    out = layer(tf.constant([2]))
    assert out.dtype == tf.float32
    np.testing.assert_allclose(out.numpy(), [[0.6, 0.8]], atol=1e-3)


def test_build_vocabularies_appends_multimodal_only_items(tmp_path):
    data_dir = tmp_path / "data"
    os.makedirs(data_dir / layout.VOCAB_DIR)
    for name in schema.vocabularies():
        _write_vocab(layout.vocab_path(str(data_dir), name), [(11, 5), (12, 1)])
    with open(layout.metadata_path(str(data_dir)), "w") as f:
        json.dump({"schema": schema.as_dict()}, f)
    vocabs = build_vocabularies(str(data_dir), str(tmp_path / "model_vocab"), min_count=2,
                                mm_item_ids=np.array([12, 13, 0], np.int64))
    item = vocabs[schema.ITEM_ID.vocabulary]
    np.testing.assert_array_equal(read_vocabulary_ids(item), [11, 12, 13])
    assert (item.vocab_size, item.num_embedded) == (3, 1)
    category = vocabs[schema.ITEM_CATEGORY.vocabulary]
    assert (category.vocab_size, category.num_embedded) == (2, 1)


def test_multimodal_only_items_are_numpys_set_difference_in_ascending_order(tmp_path):
    rng = np.random.default_rng(3)
    data_dir = tmp_path / "data"
    os.makedirs(data_dir / layout.VOCAB_DIR)
    vocab_ids = rng.permutation(np.arange(1, 3000, 3, dtype=np.int64))  # count order, unsorted
    for name in schema.vocabularies():
        _write_vocab(layout.vocab_path(str(data_dir), name), [(int(i), 1) for i in vocab_ids])
    with open(layout.metadata_path(str(data_dir)), "w") as f:
        json.dump({"schema": schema.as_dict()}, f)
    mm_ids = rng.permutation(np.arange(0, 4000, 2, dtype=np.int64))  # holds the missing id 0
    vocabs = build_vocabularies(str(data_dir), str(tmp_path / "model_vocab"),
                                mm_item_ids=mm_ids)
    expected = np.concatenate([vocab_ids, np.setdiff1d(mm_ids[mm_ids != 0], vocab_ids)])
    np.testing.assert_array_equal(read_vocabulary_ids(vocabs[schema.ITEM_ID.vocabulary]),
                                  expected)


@pytest.mark.parametrize("chunk_bytes", [64, 1000, 1 << 20])
@pytest.mark.parametrize("with_candidates", [False, True])
@pytest.mark.parametrize("storage", ["int8", "float32"])
def test_similarity_equals_gather_then_dot(chunk_bytes, with_candidates, storage):
    rng = np.random.default_rng(1)
    codes = rng.integers(-128, 128, (30, 8)).astype(np.int8)
    table = normalise_rows(codes)
    layer = FrozenMultimodalTable(30, 8, storage_dtype=storage,
                                  initial_table=codes if storage == "int8" else table)
    layer.chunk_bytes = chunk_bytes  # 64 bytes: one position per block; odd sizes pad
    rows = rng.integers(0, 30, size=(3, 13)).astype(np.int32)
    queries = rng.normal(size=(3, 4, 8) if with_candidates else (3, 8)).astype(np.float32)
    got = layer.similarity(tf.constant(queries), tf.constant(rows)).numpy()
    gathered = table[rows]                                     # [3, 13, 8]
    expected = (np.einsum("bcd,bld->bcl", queries, gathered) if with_candidates
                else np.einsum("bd,bld->bl", queries, gathered))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="similarity takes queries"):
        layer.similarity(tf.zeros([3]), tf.constant(rows))


@pytest.mark.parametrize("table", ["file", "dense"])
def test_both_table_kinds_give_the_same_rows(tmp_path, table):
    path = str(tmp_path / "v.tsv")
    _write_vocab(path, [(-5, 9), (BIG, 4), (SMALL + 1, 2), (77, 1)])
    lookup = IdLookup(path, vocab_size=3, num_embedded=2, table=table)
    assert lookup.table_kind == table
    ids = tf.constant([[-5, BIG, SMALL + 1, 77, 0, 12345]], tf.int64)
    # vocab_size=3: the fourth line (77) is not read.
    np.testing.assert_array_equal(lookup.lookup_all(ids).numpy(), [[2, 3, 4, 1, 0, 1]])
    np.testing.assert_array_equal(lookup(ids).numpy(), [[2, 3, 1, 1, 0, 1]])
    assert IdLookup.from_config(lookup.get_config()).table_kind == table


def test_auto_table_is_dense_for_long_vocabularies(tmp_path, monkeypatch):
    from muse_tf.embeddings import id_lookup

    path = str(tmp_path / "v.tsv")
    _write_vocab(path, [(i, 1) for i in range(1, 6)])
    assert IdLookup(path, 5).table_kind == "file"
    monkeypatch.setattr(id_lookup, "DENSE_TABLE_MIN_ROWS", 5)
    assert IdLookup(path, 5).table_kind == "dense"
    assert IdLookup(path, 4).table_kind == "file"


def test_dense_table_refuses_its_reserved_keys(tmp_path):
    from muse_tf.embeddings.id_lookup import DENSE_DELETED_KEY

    path = str(tmp_path / "v.tsv")
    _write_vocab(path, [(3, 1), (DENSE_DELETED_KEY, 1)])
    with pytest.raises(ValueError, match=rf"holds id {DENSE_DELETED_KEY} \(line 2\)"):
        IdLookup(path, 2, table="dense")
    assert IdLookup(path, 2, table="file").lookup_all(
        tf.constant([DENSE_DELETED_KEY], tf.int64)).numpy().tolist() == [3]


def test_dense_table_is_restored_from_a_checkpoint_and_a_saved_model(tmp_path):
    path = str(tmp_path / "v.tsv")
    ids = np.random.default_rng(0).choice(10**12, 3000, replace=False) + 1
    _write_vocab(path, [(i, 1) for i in ids.tolist()])
    lookup = IdLookup(path, len(ids), table="dense")
    query = tf.constant(np.concatenate([ids[::7], [0, -1]]), tf.int64)
    expected = lookup.lookup_all(query).numpy()
    np.testing.assert_array_equal(expected[:-2], 2 + np.arange(0, len(ids), 7))
    checkpoint = tf.train.Checkpoint(lookup=lookup).save(str(tmp_path / "ckpt" / "c"))

    class Model(tf.Module):
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        @tf.function(input_signature=[tf.TensorSpec([None], tf.int64)])
        def rows(self, x):
            return self.layer.lookup_all(x)

    tf.saved_model.save(Model(lookup), str(tmp_path / "saved"))
    # Another vocabulary file under the same name: what is restored must win.
    _write_vocab(path, [(i, 1) for i in ids[::-1].tolist()])
    other = IdLookup(path, len(ids), table="dense")
    assert not np.array_equal(other.lookup_all(query).numpy(), expected)
    tf.train.Checkpoint(lookup=other).restore(checkpoint).assert_consumed()
    np.testing.assert_array_equal(other.lookup_all(query).numpy(), expected)
    os.remove(path)  # the SavedModel needs no vocabulary file
    loaded = tf.saved_model.load(str(tmp_path / "saved"))
    np.testing.assert_array_equal(loaded.rows(query).numpy(), expected)
