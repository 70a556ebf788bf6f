"""Tests of muse_tf.layers.co_multimodal_gsu.CoMultimodalGSU (MISS: Co-GSU + MM-GSU)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from muse_tf.embeddings.arrays import normalise_rows
from muse_tf.embeddings.multimodal_table import FrozenMultimodalTable
from muse_tf.layers import CoMultimodalGSU
from muse_tf.layers.co_multimodal_gsu import selected_positions
from muse_tf.layers.search_unit import ID, MM, ROWS

from .harness import (
    assert_config_round_trip,
    assert_nested_close,
    assert_round_trips,
    assert_saved_model_round_trip,
)
from .reference import top_k_reference, unit_rows


def _out(layer, target, history, mask):
    return {k: v.numpy() for k, v in layer(target, history, mask=mask).items()}


def _co_mm_reference(id_scores, cosines, co_mask, mm_mask, k, k_co):
    """Co = top-K_co of the ID inner products; MM = top-(K - K_co) cosines among the
    behaviours Co did not select; outputs Co slots then MM slots."""
    co = top_k_reference(id_scores, co_mask, k_co)
    taken = np.zeros_like(co_mask)
    for b in range(len(co_mask)):
        taken[b, co["indices"][b][co["mask"][b]]] = True
    mm = top_k_reference(cosines, mm_mask & ~taken, k - k_co)
    return {key: np.concatenate([co[key], mm[key]], axis=-1) for key in co}


def _random_case(seed, batch=3, length=40, id_dim=6, mm_dim=8):
    rng = np.random.default_rng(seed)
    target = {ID: rng.standard_normal((batch, id_dim)).astype(np.float32),
              MM: unit_rows(rng, (batch, mm_dim))}
    history = {ID: rng.standard_normal((batch, length, id_dim)).astype(np.float32),
               MM: unit_rows(rng, (batch, length, mm_dim))}
    mask = rng.random((batch, length)) < 0.75
    return rng, target, history, mask


def _scores(target, history):
    id_scores = np.einsum("bd,bld->bl", target[ID].astype(np.float64), history[ID])
    cosines = np.einsum("bd,bld->bl", target[MM].astype(np.float64), history[MM])
    return id_scores, cosines


def test_hand_computed_overlap_is_selected_once_and_mm_takes_the_next_best():
    target = {ID: np.array([[1.0, 0.0]], np.float32), MM: np.array([[1.0, 0.0]], np.float32)}
    history = {
        #                   <e_t, e_i>
        ID: np.array([[[5.0, 0.0],    # 5: Co's best
                       [1.0, 0.0],    # 1
                       [4.0, 0.0],    # 4: Co's second
                       [0.0, 0.0],    # 0
                       [3.0, 0.0],    # 3
                       [9.0, 0.0]]],  # padding
                     np.float32),
        #                   cos(m_t, m_i)
        MM: np.array([[[1.0, 0.0],    # 1.0: MM's best too, but already Co's
                       [0.8, 0.6],    # 0.8: MM's best among the rest
                       [0.0, 1.0],    # 0.0
                       [0.6, 0.8],    # 0.6: MM's second among the rest
                       [-0.6, 0.8],   # -0.6
                       [1.0, 0.0]]],  # padding
                     np.float32),
    }
    mask = np.array([[True, True, True, True, True, False]])
    out = _out(CoMultimodalGSU(top_k=4, co_top_k=2), target, history, mask)
    # Co slots [0, 2] (ID scores 5, 4), then MM slots [1, 3] (cosines 0.8, 0.6); without
    # de-duplication MM would have returned position 0 a second time.
    assert out["indices"].tolist() == [[0, 2, 1, 3]]
    np.testing.assert_allclose(out["scores"], [[5.0, 4.0, 0.8, 0.6]], atol=1e-7)
    assert out["mask"].tolist() == [[True, True, True, True]]


@pytest.mark.parametrize("k,k_co", [(10, 5), (7, 2), (6, 5), (9, 1)])
def test_matches_numpy_reference(k, k_co):
    _, target, history, mask = _random_case(seed=k * 10 + k_co)
    mask[1, 5:] = False  # 5 valid: fewer than K
    out = _out(CoMultimodalGSU(top_k=k, co_top_k=k_co), target, history, mask)
    id_scores, cosines = _scores(target, history)
    expected = _co_mm_reference(id_scores, cosines, mask, mask, k, k_co)
    np.testing.assert_array_equal(out["indices"], expected["indices"])
    np.testing.assert_array_equal(out["mask"], expected["mask"])
    np.testing.assert_allclose(out["scores"], expected["scores"], rtol=1e-5, atol=1e-5)
    for b in range(len(mask)):  # never the same behaviour twice
        chosen = out["indices"][b][out["mask"][b]]
        assert len(set(chosen.tolist())) == len(chosen)


def test_default_split_is_half():
    assert CoMultimodalGSU(top_k=10).co_top_k == 5
    assert CoMultimodalGSU(top_k=5).co_top_k == 2
    layer = CoMultimodalGSU(top_k=5)
    assert (layer.co_gsu.top_k, layer.mm_gsu.top_k) == (2, 3)
    assert layer.target_keys == (ID, MM) and layer.history_keys == (ID, MM)


def test_fewer_valid_behaviours_than_k():
    rng = np.random.default_rng(20)
    target = {ID: rng.standard_normal((2, 3)).astype(np.float32), MM: unit_rows(rng, (2, 4))}
    history = {ID: rng.standard_normal((2, 6, 3)).astype(np.float32),
               MM: unit_rows(rng, (2, 6, 4))}
    # Row 0: 3 valid behaviours for K = 4 (Co takes 2, MM the 1 left); row 1: 1 valid
    # behaviour, fewer than K_co (Co takes it, MM has nothing left).
    mask = np.array([[False, True, False, True, True, False],
                     [False, False, False, False, True, False]])
    out = _out(CoMultimodalGSU(top_k=4, co_top_k=2), target, history, mask)
    id_scores, cosines = _scores(target, history)
    expected = _co_mm_reference(id_scores, cosines, mask, mask, 4, 2)
    assert_nested_close(out, expected, rtol=1e-5, atol=1e-6)
    assert out["mask"].tolist() == [[True, True, True, False], [True, False, False, False]]
    assert sorted(out["indices"][0, :3].tolist()) == [1, 3, 4]
    assert out["indices"][1].tolist() == [4, 0, 0, 0]
    assert out["scores"][1, 1:].tolist() == [0.0, 0.0, 0.0]


def test_all_masked_row_is_empty():
    _, target, history, mask = _random_case(seed=21, batch=2, length=5)
    mask[0] = False
    out = _out(CoMultimodalGSU(top_k=4, co_top_k=1), target, history, mask)
    assert out["mask"][0].tolist() == [False] * 4
    assert out["indices"][0].tolist() == [0] * 4
    assert out["scores"][0].tolist() == [0.0] * 4
    assert out["mask"][1].sum() == min(4, mask[1].sum())


def test_candidate_axis_equals_per_candidate_searches():
    rng, _, history, mask = _random_case(seed=22, batch=2, length=30)
    candidates = 3
    targets = {ID: rng.standard_normal((2, candidates, 6)).astype(np.float32),
               MM: unit_rows(rng, (2, candidates, 8))}
    layer = CoMultimodalGSU(top_k=6, co_top_k=3)
    together = _out(layer, targets, history, mask)
    assert together["indices"].shape == (2, candidates, 6)
    for c in range(candidates):
        single = {ID: targets[ID][:, c], MM: targets[MM][:, c]}
        alone = _out(layer, single, history, mask)
        for key in ("indices", "mask"):
            np.testing.assert_array_equal(together[key][:, c], alone[key])
        np.testing.assert_allclose(together["scores"][:, c], alone["scores"], rtol=1e-5,
                                   atol=1e-6)
        id_scores, cosines = _scores(single, history)
        expected = _co_mm_reference(id_scores, cosines, mask, mask, 6, 3)
        np.testing.assert_array_equal(together["indices"][:, c], expected["indices"])


def test_selected_positions_ignores_unselected_slots():
    indices = tf.constant([[[2, 0, 0]], [[1, 3, 0]]], tf.int32)       # [2, 1, 3]
    selected = tf.constant([[[True, False, False]], [[True, True, False]]])
    hits = selected_positions(indices, selected, tf.constant(4)).numpy()
    assert hits.tolist() == [[[False, False, True, False]], [[False, True, False, True]]]


# --- with the frozen multimodal table -------------------------------------------------

def _table_case(seed=23, batch=2, length=25, num_rows=20, dim=4):
    rng = np.random.default_rng(seed)
    array = unit_rows(rng, (num_rows, dim))
    array[[0, 1, 4, 9]] = 0.0  # padding, OOV and two items without an embedding
    rows = rng.integers(0, num_rows, size=(batch, length)).astype(np.int32)
    rows[:, :3] = [4, 9, 1]
    target = {ID: rng.standard_normal((batch, 3)).astype(np.float32),
              MM: unit_rows(rng, (batch, dim))}
    history_id = rng.standard_normal((batch, length, 3)).astype(np.float32)
    # Behaviours without an embedding are Co's best: <e_t, e_i> = 30, 20, 10 times |e_t|^2.
    history_id[:, :3] = target[ID][:, None, :] * np.array([30.0, 20.0, 10.0], np.float32)[
        None, :, None]
    mask = rng.random((batch, length)) < 0.8
    mask[:, :3] = True
    return array, target, rows, history_id, mask


def _table(array):
    return FrozenMultimodalTable(array.shape[0], array.shape[1], storage_dtype="float32",
                                 initial_table=array)


def _int8_table(array):
    """int8 codes of the float32 ``array``'s directions (|c| <= 127) and the table of them;
    returns the unit vectors the codes stand for too."""
    scale = np.max(np.abs(array), axis=1, keepdims=True)
    codes = np.round(np.divide(127 * array, scale, out=np.zeros_like(array),
                               where=scale > 0)).astype(np.int8)
    table = FrozenMultimodalTable(array.shape[0], array.shape[1], initial_table=codes)
    return table, normalise_rows(codes)


@pytest.mark.parametrize("storage", ["float32", "int8"])
def test_table_mode_matches_numpy_reference_and_vector_mode(storage):
    array, target, rows, history_id, mask = _table_case()
    if storage == "int8":
        table, array = _int8_table(array)
    else:
        table = _table(array)
    assert table.storage_dtype == storage
    layer = CoMultimodalGSU(top_k=8, co_top_k=3, table=table)
    assert layer.history_keys == (ID, ROWS)
    out = _out(layer, target, {ID: history_id, ROWS: rows}, mask)
    present = (np.abs(array).sum(axis=-1) > 0)[rows]
    id_scores = np.einsum("bd,bld->bl", target[ID].astype(np.float64), history_id)
    cosines = np.einsum("bd,bld->bl", target[MM].astype(np.float64), array[rows])
    # Co-GSU (IDs) may take a behaviour without a multimodal embedding; MM-GSU never does.
    expected = _co_mm_reference(id_scores, cosines, mask, mask & present, 8, 3)
    np.testing.assert_array_equal(out["indices"], expected["indices"])
    np.testing.assert_array_equal(out["mask"], expected["mask"])
    np.testing.assert_allclose(out["scores"], expected["scores"], rtol=1e-5, atol=1e-5)
    assert out["indices"][:, :3].tolist() == [[0, 1, 2], [0, 1, 2]]
    assert not np.isin(out["indices"][:, 3:], [0, 1, 2]).any()

    # Vector mode on the gathered vectors: the same selection, except that there the caller
    # folds "has an embedding" into the mask, which Co-GSU then also obeys. With every row
    # present, both modes agree exactly.
    full = unit_rows(np.random.default_rng(24), array.shape)
    from_table = _out(CoMultimodalGSU(top_k=8, co_top_k=3, table=_table(full)), target,
                      {ID: history_id, ROWS: rows}, mask)
    from_vectors = _out(CoMultimodalGSU(top_k=8, co_top_k=3), target,
                        {ID: history_id, MM: full[rows]}, mask)
    assert_nested_close(from_table, from_vectors, rtol=1e-5, atol=1e-6)


def test_errors():
    with pytest.raises(ValueError, match=r"CoMultimodalGSU: co_top_k=4 must be < top_k=4 \(both "
                                         r"searches keep at least one behaviour\)"):
        CoMultimodalGSU(top_k=4, co_top_k=4)
    with pytest.raises(ValueError, match=r"CoMultimodalGSU: co_top_k=6 must be < top_k=4"):
        CoMultimodalGSU(top_k=4, co_top_k=6)
    with pytest.raises(ValueError, match=r"CoMultimodalGSU: `co_top_k` must be a positive int, "
                                         r"got 0"):
        CoMultimodalGSU(top_k=4, co_top_k=0)
    with pytest.raises(ValueError, match=r"CoMultimodalGSU: `top_k` must be a positive int, "
                                         r"got 0"):
        CoMultimodalGSU(top_k=0)
    with pytest.raises(ValueError, match=r"MultimodalGSU: `table` must be a "
                                         r"FrozenMultimodalTable or None"):
        CoMultimodalGSU(top_k=4, table="table")
    layer = CoMultimodalGSU(top_k=4)
    with pytest.raises(ValueError, match=r"CoMultimodalGSU: `target` lacks \['mm'\]; it needs "
                                         r"\['id', 'mm'\], got \['id'\]"):
        layer({ID: tf.zeros([1, 3])}, {ID: tf.zeros([1, 5, 3]), MM: tf.zeros([1, 5, 2])},
              mask=tf.ones([1, 5], tf.bool))
    with pytest.raises(ValueError, match=r"CoMultimodalGSU: `history` lacks \['id'\]; it needs "
                                         r"\['id', 'mm'\], got \['mm'\]"):
        layer({ID: tf.zeros([1, 3]), MM: tf.zeros([1, 2])}, {MM: tf.zeros([1, 5, 2])},
              mask=tf.ones([1, 5], tf.bool))
    with pytest.raises(ValueError, match=r"the embedding size of `target\['mm'\]` \(shape "
                                         r"\(1, 3\)\) is 3 but that of `history\['mm'\]` \(shape "
                                         r"\(1, 5, 2\)\) is 2"):
        layer({ID: tf.zeros([1, 3]), MM: tf.zeros([1, 3])},
              {ID: tf.zeros([1, 5, 3]), MM: tf.zeros([1, 5, 2])}, mask=tf.ones([1, 5], tf.bool))
    with pytest.raises(ValueError, match=r"sequence length size of `mask` \(shape \(1, 4\)\) is 4 "
                                         r"but that of `history\['id'\]` \(shape \(1, 5, 3\)\)"):
        layer({ID: tf.zeros([1, 3]), MM: tf.zeros([1, 2])},
              {ID: tf.zeros([1, 5, 3]), MM: tf.zeros([1, 5, 2])}, mask=tf.ones([1, 4], tf.bool))
    with pytest.raises(NotImplementedError, match=r"selects in two steps; use call\(\)"):
        layer.relevance({}, {}, tf.ones([1, 1], tf.bool))


def test_round_trips(tmp_path):
    _, target, history, mask = _random_case(seed=25, batch=2, length=7, id_dim=3, mm_dim=4)
    layer = CoMultimodalGSU(top_k=4, co_top_k=1)
    config = layer.get_config()
    assert (config["top_k"], config["co_top_k"], config["table"]) == (4, 1, None)
    assert_round_trips(layer, (target, history), {"mask": mask}, tmp_path)


def test_table_round_trips(tmp_path):
    array, target, rows, history_id, mask = _table_case(length=8)
    args = (target, {ID: history_id, ROWS: rows})
    table = _table(array)
    layer = CoMultimodalGSU(top_k=5, co_top_k=2, table=table)
    config = layer.get_config()
    assert config["table"] == tf.keras.layers.serialize(table)
    clone = CoMultimodalGSU.from_config(config)
    assert clone.mm_gsu.table.get_config() == table.get_config()
    assert clone.history_keys == (ID, ROWS)
    assert_config_round_trip(layer, args, {"mask": mask})  # vectors copied by set_weights
    assert_saved_model_round_trip(CoMultimodalGSU(top_k=5, co_top_k=2, table=_table(array)),
                                  args, {"mask": mask}, tmp_path)
