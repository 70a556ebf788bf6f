"""FrozenMultimodalTable's int8 storage: the same cosines and top-K as the float32 path (within
the documented bound), chunked loading, the code mapping of the vocabulary, and save -> reload
without a graph constant of the table."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import muse_tf  # noqa: F401
from muse_tf.embeddings import (
    FrozenMultimodalTable,
    MultimodalCodes,
    multimodal_codes,
    normalised_mm_matrix,
)
from muse_tf.embeddings.arrays import code_inverse_norms, normalise_rows, sorted_positions
from muse_tf.layers import MultimodalGSU
from muse_tf.layers.search_unit import MM, ROWS

D = 128
#: The class docstring's bound on |int8 cosine - float32 cosine| for unit queries.
BOUND = 2 * (D + 2) * 2.0 ** -24


def _catalogue(rng: np.random.Generator, num_items: int, dim: int = D):
    """Shuffled unique item ids, int8 codes (every 17th all zero) and a vocabulary holding
    the items in another order plus ids that have no embedding."""
    mm_ids = rng.permutation(num_items).astype(np.int64) * 5 + 3
    codes = rng.integers(-128, 128, (num_items, dim)).astype(np.int8)
    codes[::17] = 0
    vocab_ids = np.concatenate([mm_ids[rng.permutation(num_items)],
                                np.array([4, 9, 14], np.int64)])
    vocab_ids = vocab_ids[rng.permutation(len(vocab_ids))]
    return mm_ids, codes, vocab_ids


def _tables(num_items: int = 600, seed: int = 0):
    rng = np.random.default_rng(seed)
    mm_ids, codes, vocab_ids = _catalogue(rng, num_items)
    source = multimodal_codes(vocab_ids, mm_ids, codes)
    int8 = FrozenMultimodalTable(source.num_rows, D, initial_table=source)
    float32 = FrozenMultimodalTable(source.num_rows, D, storage_dtype="float32",
                                    initial_table=normalised_mm_matrix(vocab_ids, mm_ids, codes))
    return rng, source, int8, float32


def test_multimodal_codes_maps_vocabulary_rows_to_codes():
    mm_ids = np.array([30, 10, 20, 40], np.int64)
    codes = np.arange(8, dtype=np.int8).reshape(4, 2)
    source = multimodal_codes(np.array([20, 99, 30, 40], np.int64), mm_ids, codes)
    assert source.codes is codes  # by reference: no copy of the catalogue
    np.testing.assert_array_equal(source.code_index, [-1, -1, 2, -1, 0, 3])
    np.testing.assert_array_equal(source.rows(1, 5), [[0, 0], [4, 5], [0, 0], [0, 1]])
    ascending = multimodal_codes(np.array([20, 99, 30]), np.array([10, 20, 30]), codes[:3])
    np.testing.assert_array_equal(ascending.code_index, [-1, -1, 1, -1, 2])
    empty = multimodal_codes(np.array([5]), np.zeros([0], np.int64), np.zeros([0, 2], np.int8))
    assert empty.shape == (3, 2) and np.all(empty.code_index == -1)
    with pytest.raises(ValueError, match="mm_vectors must be the int8 SCL codes, got dtype "
                                         "float32"):
        multimodal_codes(np.array([10]), mm_ids, codes.astype(np.float32))
    with pytest.raises(ValueError, match=r"code_index holds values in \[-1, 4\], outside "
                                         r"\[-1, 4\)"):
        MultimodalCodes(codes, np.array([-1, 4]))


def test_sorted_positions_of_many_ids_equal_those_of_few():
    rng = np.random.default_rng(3)
    sorted_ids = np.sort(rng.choice(10**9, 5000, replace=False))
    ids = rng.choice(np.concatenate([sorted_ids, rng.integers(0, 10**9, 5000)]), (300, 400))
    positions, found = sorted_positions(sorted_ids, ids)  # > 65536 ids: the sorted path
    assert ids.size > 65536 and 0 < found.mean() < 1
    for row in (0, 123, 299):
        few_positions, few_found = sorted_positions(sorted_ids, ids[row])
        np.testing.assert_array_equal(found[row], few_found)
        np.testing.assert_array_equal(positions[row], few_positions)
    np.testing.assert_array_equal(sorted_ids[positions[found]], ids[found])


def test_code_inverse_norms_are_exact_up_to_float32_rounding():
    codes = np.random.default_rng(4).integers(-128, 128, (70_000, 16)).astype(np.int8)
    codes[5] = 0
    codes[6] = -128
    exact = np.sqrt(np.sum(codes.astype(np.float64) ** 2, axis=1))
    inverse = code_inverse_norms(codes)
    assert inverse.dtype == np.float32 and inverse[5] == 0
    keep = exact > 0
    np.testing.assert_allclose(inverse[keep] * exact[keep], 1.0, rtol=2.0 ** -24, atol=0)
    assert inverse[6] == np.float32(1 / np.sqrt(16 * 128**2))


def test_int8_table_holds_codes_inverse_norms_and_the_present_mask():
    _, source, int8, float32 = _tables()
    assert int8.quantised and not float32.quantised
    assert [w.name for w in int8.weights] == ["vectors:0", "inverse_norm:0", "present:0"]
    assert [w.name for w in float32.weights] == ["vectors:0", "present:0"]
    assert int8.stored_values().dtype == np.int8 and not int8.trainable_weights
    np.testing.assert_array_equal(int8.stored_values(), source.rows(0, source.num_rows))
    present = int8.present.numpy() > 0.5
    np.testing.assert_array_equal(present, float32.present.numpy() > 0.5)
    np.testing.assert_array_equal(present, int8.inverse_norm.numpy() > 0)
    # padding, OOV, the three ids without an embedding and the all-zero codes
    assert not present[:2].any() and (~present).sum() == 2 + 3 + len(range(0, 600, 17))
    rows = np.arange(source.num_rows)
    unit = int8(rows).numpy()
    assert unit.dtype == np.float32
    np.testing.assert_allclose(unit, float32(rows).numpy(), atol=2 * 2.0 ** -24, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(unit[present], axis=1), 1.0, atol=1e-6)
    assert not unit[~present].any()


@pytest.mark.parametrize("candidates", [None, 3])
@pytest.mark.parametrize("chunk_bytes", [None, 4096])
def test_int8_and_float32_paths_give_the_same_top_k(candidates, chunk_bytes):
    rng, source, int8, float32 = _tables()
    if chunk_bytes:
        int8.chunk_bytes = float32.chunk_bytes = chunk_bytes  # several blocks a history
    batch, length, k = 4, 300, 20
    rows = rng.integers(0, source.num_rows, (batch, length)).astype(np.int32)
    missing = np.flatnonzero(int8.present.numpy() == 0)
    rows[:, :6] = missing[:6]  # padding, OOV, items without or with an all-zero vector
    mask = rng.random((batch, length)) < 0.9
    # Float64 cosines decide the top-K; targets are drawn so that distinct rows' cosines in
    # each top-(K+1) are further apart than the bound (a row repeated in a history ties with
    # itself in both paths, broken by position): then the top-K and its order are determined
    # and both paths must find them exactly.
    unit = normalise_rows(source.rows(0, source.num_rows)).astype(np.float64)
    selectable = mask & (np.abs(unit[rows]).sum(-1) > 0)
    num_candidates = 1 if candidates is None else candidates
    target_rows = np.zeros((batch, num_candidates), np.int64)
    for b in range(batch):
        distinct = unit[np.unique(rows[b][selectable[b]])]
        for c in range(num_candidates):
            while True:
                target_rows[b, c] = rng.integers(2, source.num_rows)
                top = np.sort(distinct @ unit[target_rows[b, c]])[::-1][: k + 1]
                if np.all(-np.diff(top) > 2 * BOUND):
                    break
    target_rows[0, 0] = 0  # a target without an embedding: newest-first fallback
    if candidates is None:
        target_rows = target_rows[:, 0]
    outputs = {}
    for name, table in (("int8", int8), ("float32", float32)):
        gsu = MultimodalGSU(top_k=k, table=table)
        out = gsu({MM: table(target_rows)}, {ROWS: rows}, mask=mask)
        outputs[name] = {key: v.numpy() for key, v in out.items()}
        outputs[name]["cosines"] = table.similarity(table(target_rows), rows).numpy()
    int8_out, float_out = outputs["int8"], outputs["float32"]
    exact = np.einsum("bcd,bld->bcl", unit[target_rows].reshape(batch, -1, D), unit[rows])
    for key in ("indices", "mask"):
        np.testing.assert_array_equal(int8_out[key], float_out[key])
    assert int8_out["mask"].all()
    assert np.abs(int8_out["cosines"] - float_out["cosines"]).max() <= BOUND
    np.testing.assert_allclose(int8_out["scores"], float_out["scores"], atol=BOUND, rtol=0)
    assert np.abs(int8_out["cosines"].reshape(exact.shape) - exact).max() <= BOUND / 2


@pytest.mark.parametrize("storage", ["int8", "float32", "float16"])
def test_chunked_load_equals_one_shot_load(storage):
    _, source, _, _ = _tables(num_items=300, seed=1)
    one_shot = FrozenMultimodalTable(source.num_rows, D, storage_dtype=storage)
    one_shot.load(source, chunk_rows=source.num_rows)
    by_row = source.rows(0, source.num_rows)
    for chunk_rows in (1, 7, 64):
        chunked = FrozenMultimodalTable(source.num_rows, D, storage_dtype=storage)
        chunked.load(source, chunk_rows=chunk_rows)
        from_array = FrozenMultimodalTable(source.num_rows, D, storage_dtype=storage)
        from_array.load(by_row, chunk_rows=chunk_rows)
        for a, b, c in zip(one_shot.weights, chunked.weights, from_array.weights, strict=True):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
            np.testing.assert_array_equal(a.numpy(), c.numpy())
    assert np.any(one_shot.stored_values())
    if storage == "float32":  # the float table from codes is normalised_mm_matrix's, exactly
        np.testing.assert_array_equal(one_shot.stored_values(), normalise_rows(by_row))


def test_table_checks_name_the_bad_value():
    codes = np.zeros((4, 2), np.int8)
    with pytest.raises(ValueError, match=r"mm: initial_table has shape \(4, 2\), expected "
                                         r"\[num_rows=5, dim=2\]"):
        FrozenMultimodalTable(5, 2, initial_table=codes, name="mm")
    with pytest.raises(ValueError, match="a float64 initial_table cannot be stored as int8"):
        FrozenMultimodalTable(4, 2, initial_table=codes.astype(np.float64))
    with pytest.raises(ValueError, match="must hold int8 codes or float unit vectors, got "
                                         "dtype int32"):
        FrozenMultimodalTable(4, 2, initial_table=codes.astype(np.int32))
    with pytest.raises(ValueError, match=r"storage_dtype must be one of \('int8', 'float32', "
                                         r"'float16'\), got 'int4'"):
        FrozenMultimodalTable(4, 2, storage_dtype="int4")
    table = FrozenMultimodalTable(4, 2)
    with pytest.raises(RuntimeError, match="load runs eagerly"):
        tf.function(lambda: table.load(codes))()
    with pytest.raises(ValueError, match="chunk_rows must be >= 1, got -3"):
        table.load(codes, chunk_rows=-3)


def _graph_constant_bytes(path: str) -> int:
    """The largest Const tensor in a SavedModel's graph and function library."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    largest = 0
    for meta_graph in proto.meta_graphs:
        graph = meta_graph.graph_def
        nodes = [*graph.node, *(n for fn in graph.library.function for n in fn.node_def)]
        for node in nodes:
            if node.op == "Const":
                value = node.attr["value"].tensor
                largest = max(largest, len(value.tensor_content),
                              len(value.int_val) + len(value.float_val))
    return largest


def test_saved_model_and_checkpoint_reload_the_int8_table_as_weights(tmp_path):
    rng, source, int8, _ = _tables(num_items=20_000, seed=2)
    table_bytes = source.num_rows * D
    gsu = MultimodalGSU(top_k=10, table=int8)
    rows = rng.integers(0, source.num_rows, (3, 50)).astype(np.int32)
    mask = np.ones((3, 50), bool)
    target_rows = rng.integers(2, source.num_rows, (3,)).astype(np.int32)

    class Serve(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gsu = gsu

        @tf.function(input_signature=[tf.TensorSpec([None], tf.int32),
                                      tf.TensorSpec([None, None], tf.int32),
                                      tf.TensorSpec([None, None], tf.bool)])
        def __call__(self, target_rows, rows, mask):
            out = self.gsu({MM: self.gsu.table(target_rows)}, {ROWS: rows}, mask=mask)
            return {**out, "vectors": self.gsu.table(target_rows)}

    module = Serve()
    expected = {k: v.numpy() for k, v in module(target_rows, rows, mask).items()}
    path = str(tmp_path / "saved")
    tf.saved_model.save(module, path)
    # The table lives in variables/, not in the graph (no constant initializer).
    assert os.path.getsize(os.path.join(path, "saved_model.pb")) < table_bytes / 10
    assert _graph_constant_bytes(path) < 4096
    reloaded = tf.saved_model.load(path)
    got = {k: v.numpy() for k, v in reloaded(target_rows, rows, mask).items()}
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value)
    assert expected["mask"].all()

    # A table rebuilt from its config starts at zeros and gets the weights back.
    checkpoint = tf.train.Checkpoint(table=int8).save(str(tmp_path / "ckpt"))
    clone = FrozenMultimodalTable.from_config(int8.get_config())
    assert clone.storage_dtype == "int8" and not np.any(clone.stored_values())
    tf.train.Checkpoint(table=clone).restore(checkpoint).assert_existing_objects_matched()
    for a, b in zip(int8.weights, clone.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(clone.similarity(clone(target_rows), rows).numpy(),
                                  int8.similarity(int8(target_rows), rows).numpy())


_MIRRORED_SCRIPT = """
import os
os.environ["TF_USE_LEGACY_KERAS"] = "1"
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from muse_tf.embeddings import FrozenMultimodalTable, MultimodalCodes
codes = np.random.default_rng(0).integers(-128, 128, (50, 8)).astype(np.int8)
source = MultimodalCodes(codes, np.arange(-1, 60) % 51 - 1)
single = FrozenMultimodalTable(source.num_rows, 8, initial_table=source)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    mirrored = FrozenMultimodalTable(source.num_rows, 8, initial_table=source)
    mirrored.load(source, chunk_rows=7)
replicas = 0
for weight, expected in zip(mirrored.weights, single.weights, strict=True):
    for component in strategy.experimental_local_results(weight):
        np.testing.assert_array_equal(component.numpy(), expected.numpy())
        replicas += 1
assert np.any(single.stored_values()) and replicas == 6, replicas
print("REPLICAS_OK")
"""


def test_load_writes_every_replica_of_a_mirrored_table():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run([sys.executable, "-c", _MIRRORED_SCRIPT], env=env, timeout=300,
                          capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert "REPLICAS_OK" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
