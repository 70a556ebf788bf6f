"""Tests of muse_tf.layers.co_multimodal_gsu.CoMultimodalGSU (MISS: Co-GSU + MM-GSU)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from muse_tf.embeddings.arrays import normalise_rows
from muse_tf.embeddings.multimodal_table import FrozenMultimodalTable
from muse_tf.layers import CoMultimodalGSU
from muse_tf.layers.co_multimodal_gsu import (
    exclude_selected,
    masked_keys,
    ranked_top_k,
    selected_positions,
)
from muse_tf.layers.search_unit import ID, MM, ROWS
from muse_tf.layers.topk import masked_top_k

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


# --- many targets: encode_history once, search per set of targets --------------------

def _search(layer, target, history, mask):
    keys = layer.encode_history(history, mask)
    return {k: v.numpy() for k, v in layer.search(target, keys).items()}


def _assert_same_selection(got, expected, atol=1e-6):
    np.testing.assert_array_equal(got["indices"], expected["indices"])
    np.testing.assert_array_equal(got["mask"], expected["mask"])
    np.testing.assert_allclose(got["scores"], expected["scores"], rtol=1e-5, atol=atol)


def test_masked_keys_and_ranked_top_k_by_hand():
    vectors = tf.constant([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])
    keys = masked_keys(vectors, tf.constant([[True, False, True]])).numpy()
    np.testing.assert_array_equal(keys, [[[1, 2, 0], [3, 4, -np.inf], [5, 6, 0]]])
    # [t, 1] . keys = the score, or -inf for the masked behaviour.
    scores = tf.matmul(tf.constant([[[1.0, 1.0, 1.0]]]), keys, transpose_b=True)
    np.testing.assert_array_equal(scores.numpy(), [[[3.0, -np.inf, 11.0]]])
    out = {k: v.numpy() for k, v in ranked_top_k(scores, 4).items()}  # k > L: padded
    assert out["indices"].tolist() == [[[2, 0, 0, 0]]]
    assert out["scores"].tolist() == [[[11.0, 3.0, 0.0, 0.0]]]
    assert out["mask"].tolist() == [[[True, True, False, False]]]


def test_ranked_top_k_equals_masked_top_k_with_ties():
    rng = np.random.default_rng(30)
    scores = np.round(rng.standard_normal((40, 50)), 1).astype(np.float32)  # many ties
    mask = rng.random((40, 50)) < 0.7
    mask[3] = False
    mask[4, 3:] = False
    expected = masked_top_k(scores, mask, 9)
    got = ranked_top_k(tf.where(mask, scores, -np.inf), 9)
    for key in ("indices", "scores", "mask"):
        np.testing.assert_array_equal(got[key].numpy(), expected[key].numpy(), err_msg=key)


def test_exclude_selected_ignores_unused_slots():
    ranked = tf.constant([[[1.0, 2.0, 3.0, -np.inf]], [[4.0, 5.0, 6.0, 7.0]]])   # [2, 1, 4]
    selection = {"indices": tf.constant([[[2, 0, 0]], [[1, 3, 0]]]),
                 "mask": tf.constant([[[True, False, False]], [[True, True, False]]])}
    out = exclude_selected(ranked, selection).numpy()
    np.testing.assert_array_equal(out, [[[1, 2, -np.inf, -np.inf]],
                                        [[4, -np.inf, 6, -np.inf]]])


@pytest.mark.parametrize("k,k_co", [(10, 5), (7, 2), (6, 5), (9, 1)])
@pytest.mark.parametrize("candidates", [None, 4])
def test_search_matches_call_and_numpy_reference(k, k_co, candidates):
    rng, target, history, mask = _random_case(seed=k * 10 + k_co + (candidates or 0))
    mask[1, 5:] = False  # 5 valid: fewer than K
    mask[2, :3] = False
    history[ID][0, 10:20] = history[ID][0, :10]   # repeated behaviours: tied scores
    history[MM][0, 10:20] = history[MM][0, :10]
    if candidates:
        target = {ID: rng.standard_normal((3, candidates, 6)).astype(np.float32),
                  MM: unit_rows(rng, (3, candidates, 8))}
        target[MM][1, 0] = 0.0  # no target vector: every cosine ties at 0
    layer = CoMultimodalGSU(top_k=k, co_top_k=k_co)
    got = _search(layer, target, history, mask)
    _assert_same_selection(got, _out(layer, target, history, mask))
    for c in range(candidates or 1):
        single = ({key: value[:, c] for key, value in target.items()} if candidates
                  else target)
        expected = _co_mm_reference(*_scores(single, history), mask, mask, k, k_co)
        _assert_same_selection({key: v[:, c] if candidates else v for key, v in got.items()},
                               expected, atol=1e-5)


@pytest.mark.parametrize("storage", ["float32", "int8"])
def test_search_with_a_table_matches_call(storage):
    array, target, rows, history_id, mask = _table_case(length=40)
    table, _ = _int8_table(array) if storage == "int8" else (_table(array), None)
    rng = np.random.default_rng(31)
    targets = {ID: rng.standard_normal((2, 5, 3)).astype(np.float32),
               MM: unit_rows(rng, (2, 5, array.shape[1]))}
    targets[MM][0, 2] = 0.0
    mask[1, 6:] = False
    layer = CoMultimodalGSU(top_k=8, co_top_k=3, table=table)
    history = {ID: history_id, ROWS: rows}
    keys = layer.encode_history(history, mask)
    assert keys["co_keys"].shape == (2, 40, 4) and keys["mm_keys"].shape == (2, 40, 5)
    # Behaviours without a multimodal embedding can be Co-GSU's, never MM-GSU's.
    present = table.has_embedding(rows).numpy()
    assert np.all(np.isneginf(keys["mm_keys"].numpy()[..., -1]) == ~(mask & present))
    for given in (target, targets):
        got = {k: v.numpy() for k, v in layer.search(given, keys).items()}
        _assert_same_selection(got, _out(layer, given, history, mask), atol=1e-5)


def test_search_gradients_equal_calls():
    _, target, history, mask = _random_case(seed=32, length=30)
    layer = CoMultimodalGSU(top_k=6, co_top_k=3)
    tensors = {"target_id": tf.constant(target[ID]), "history_id": tf.constant(history[ID])}

    def gradients(searched: bool) -> list[np.ndarray]:
        with tf.GradientTape() as tape:
            tape.watch(list(tensors.values()))
            t = {ID: tensors["target_id"], MM: target[MM]}
            h = {ID: tensors["history_id"], MM: history[MM]}
            out = (layer.search(t, layer.encode_history(h, mask)) if searched
                   else layer(t, h, mask=mask))
            loss = tf.reduce_sum(out["scores"] * tf.range(6, dtype=tf.float32))
        return [g.numpy() for g in tape.gradient(loss, list(tensors.values()))]

    for got, expected in zip(gradients(True), gradients(False), strict=True):
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_search_errors():
    layer = CoMultimodalGSU(top_k=4)
    history = {ID: tf.zeros([1, 5, 3]), MM: tf.zeros([1, 5, 2])}
    mask = tf.ones([1, 5], tf.bool)
    keys = layer.encode_history(history, mask)
    target = {ID: tf.zeros([1, 3]), MM: tf.zeros([1, 2])}
    with pytest.raises(ValueError, match=r"CoMultimodalGSU: `history` must be a dict with keys "
                                         r"\['id', 'mm'\], got \['id'\]"):
        layer.encode_history({ID: history[ID]}, mask)
    with pytest.raises(ValueError, match=r"sequence length size of `mask`"):
        layer.encode_history(history, tf.ones([1, 4], tf.bool))
    with pytest.raises(ValueError, match=r"`keys` must be a dict with keys \['co_keys', "
                                         r"'mm_keys'\], got \['id', 'mm'\]"):
        layer.search(target, history)
    with pytest.raises(ValueError, match=r"`target\['mm'\]` has shape \(1, 3\) but "
                                         r"`keys\['mm_keys'\]` has shape \(1, 5, 3\): keys are "
                                         r"the target's size \+ 1"):
        layer.search({ID: target[ID], MM: tf.zeros([1, 3])}, keys)
    with pytest.raises(ValueError, match=r"both have a candidate axis or neither"):
        layer.search({ID: target[ID], MM: tf.zeros([1, 4, 2])}, keys)
