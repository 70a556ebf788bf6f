"""The ranking model: masks, candidate axis, padding invariance, checkpoint round trip."""

import os

import numpy as np
import pytest
import tensorflow as tf

import muse_tf  # noqa: F401
from muse_tf import config as config_lib
from muse_tf import schema
from muse_tf.data import reader
from muse_tf.layers.masking import history_mask, masked_mean, newest_positions
from muse_tf.models.factory import build_ranking_model

SMALL = ["model.top_k=4", "model.short_term_len=3", "model.num_tiers=4",
         "model.tower_units=[8]", "model.head_dim=4"]
GSU_EXPERIMENTS = ["muse", "din", "sim_hard", "sim_soft", "twin", "miss",
                   "ablation_gsu_projected", "ablation_gsu_plus_id", "ablation_esu_simtier",
                   "muse_v1", "din_ta", "sim_hard_ta", "twin_ta"]


def test_history_mask_and_newest_positions_exact():
    ids = tf.constant([[5, 6, 0, 0], [7, 0, 8, 9], [0, 0, 0, 0]], tf.int64)
    lengths = tf.constant([2, 4, 0])
    np.testing.assert_array_equal(history_mask(ids, lengths).numpy(),
                                  [[1, 1, 0, 0], [1, 0, 1, 1], [0, 0, 0, 0]])
    positions, in_range = newest_positions(lengths, 3)
    np.testing.assert_array_equal(positions.numpy(), [[0, 0, 1], [1, 2, 3], [0, 0, 0]])
    np.testing.assert_array_equal(in_range.numpy(), [[0, 1, 1], [1, 1, 1], [0, 0, 0]])


def test_masked_mean_exact():
    values = tf.constant([[[1.0], [3.0], [100.0]], [[7.0], [7.0], [7.0]]])
    mask = tf.constant([[True, True, False], [False, False, False]])
    np.testing.assert_allclose(masked_mean(values, mask).numpy(), [[2.0], [0.0]])


def _model_and_batch(name, data_dir, model_dir, batch_size=8):
    cfg = config_lib.resolve(name, assignments=SMALL)
    model = build_ranking_model(cfg, data_dir, model_dir)
    batch = next(iter(reader.make_dataset(data_dir, "train", batch_size, shuffle=False,
                                          deterministic=True)))
    return model, batch


@pytest.mark.parametrize("name", GSU_EXPERIMENTS)
def test_candidate_axis_equals_one_row_per_candidate(name, tiny_data_dir, tmp_path):
    model, batch = _model_and_batch(name, tiny_data_dir, str(tmp_path))
    model(batch)
    # Candidates of user row b: the targets of rows b, b+1, b+2 (cyclically).
    num = 3
    size = int(batch[schema.ITEM_ID.name].shape[0])
    pick = (np.arange(size)[:, None] + np.arange(num)[None, :]) % size
    candidates = {f.name: tf.gather(batch[f.name], pick) for f in schema.ITEM_SIDE_FEATURES}
    together = model.score_candidates(batch, candidates).numpy()
    assert together.shape == (size, num)
    for c in range(num):
        single = dict(batch)
        for f in schema.ITEM_SIDE_FEATURES:
            single[f.name] = candidates[f.name][:, c]
        np.testing.assert_allclose(together[:, c], model(single).numpy(), rtol=1e-5,
                                   atol=1e-6)


@pytest.mark.parametrize("name", ["muse", "sim_hard", "twin", "miss"])
def test_padding_never_changes_a_prediction(name, tiny_data_dir, tmp_path):
    model, batch = _model_and_batch(name, tiny_data_dir, str(tmp_path))
    before = model(batch).numpy()
    noisy = dict(batch)
    seq_len = int(batch[schema.HISTORY_ITEM_ID.name].shape[1])
    pad = np.arange(seq_len)[None, :] >= batch[schema.HISTORY_LENGTH].numpy()[:, None]
    rng = np.random.default_rng(0)
    for feature in schema.SEQUENCE_FEATURES:
        values = batch[feature.name].numpy().copy()
        # Replace padding by real ids from elsewhere in the batch.
        donors = batch[feature.name].numpy()[batch[feature.name].numpy() != 0]
        values[pad] = rng.choice(donors, size=int(pad.sum()))
        noisy[feature.name] = tf.constant(values)
    np.testing.assert_allclose(model(noisy).numpy(), before, rtol=1e-6, atol=1e-7)


def test_weights_round_trip_gives_the_same_predictions(tiny_data_dir, tmp_path):
    model, batch = _model_and_batch("muse", tiny_data_dir, str(tmp_path / "a"))
    model.compile_with_learning_rates(2e-3, 2e-4)
    model.build_for(batch)
    model.fit(tf.data.Dataset.from_tensors(batch).repeat(3), verbose=0)
    path = os.path.join(str(tmp_path), "ckpt", "weights")
    model.save_weights(path)
    clone, _ = _model_and_batch("muse", tiny_data_dir, str(tmp_path / "b"))
    clone(batch)
    clone.load_weights(path).expect_partial()
    np.testing.assert_allclose(clone(batch).numpy(), model(batch).numpy(), rtol=1e-6)


def test_training_updates_embeddings_and_dense_layers_with_their_own_optimizers(
        tiny_data_dir, tmp_path):
    model, batch = _model_and_batch("muse", tiny_data_dir, str(tmp_path))
    model.compile_with_learning_rates(2e-3, 2e-4)
    model.build_for(batch)
    embedding_vars = model.embedding_variables()
    assert embedding_vars and all("id_embedding_" in v.name for v in embedding_vars)
    before = {v.name: v.numpy().copy() for v in model.trainable_variables}
    model.fit(tf.data.Dataset.from_tensors(batch), verbose=0)
    changed = {v.name for v in model.trainable_variables
               if not np.array_equal(before[v.name], v.numpy())}
    assert any("id_embedding_item" in n for n in changed)
    assert any("tower" in n for n in changed)
    assert any("long_term_sa_ta" in n for n in changed)
    assert int(model.embedding_optimizer.iterations.numpy()) == 1
    assert int(model.optimizer.iterations.numpy()) == 1
    # The frozen multimodal table never changes.
    assert not model.mm_table.trainable_weights


def test_bad_history_rank_is_named(tiny_data_dir, tmp_path):
    model, batch = _model_and_batch("muse", tiny_data_dir, str(tmp_path))
    bad = dict(batch)
    bad[schema.HISTORY_ITEM_ID.name] = batch[schema.HISTORY_ITEM_ID.name][:, :, tf.newaxis]
    with pytest.raises(ValueError, match="hist_item_id must be \\[batch, seq_len\\]"):
        model(bad)


def _with_history(batch, rows, positions, values_by_feature):
    """A copy of ``batch`` with history positions ``positions`` of ``rows`` replaced."""
    out = dict(batch)
    for feature in schema.SEQUENCE_FEATURES:
        array = batch[feature.name].numpy().copy()
        for r in rows:
            array[r, positions] = values_by_feature[feature.name]
        out[feature.name] = tf.constant(array)
    return out


def test_missing_behaviours_inside_the_history_are_ignored(tiny_data_dir, tmp_path):
    """Id 0 inside ``hist_len`` means a missing behaviour: whatever category it carries, it
    changes nothing, while a real behaviour at the same place does change the score."""
    model, batch = _model_and_batch("muse", tiny_data_dir, str(tmp_path), 48)
    lengths = batch[schema.HISTORY_LENGTH].numpy()
    row = int(np.argmax(lengths))
    assert lengths[row] >= 6
    positions = [1, 3]
    hist = schema.HISTORY_ITEM_ID.name
    missing = dict(batch)
    for feature in schema.SEQUENCE_FEATURES:
        missing[feature.name] = batch[feature.name].numpy().copy()
    missing[hist][row, positions] = 0
    reference = model({k: tf.constant(v) for k, v in missing.items()}).numpy()
    scrambled = {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in missing.items()}
    scrambled[schema.HISTORY_CATEGORY.name][row, positions] = [123456789, -987654321]
    np.testing.assert_allclose(model({k: tf.constant(v) for k, v in scrambled.items()}).numpy(),
                               reference, rtol=1e-6, atol=1e-7)
    # The same positions holding the target item itself: the prediction moves.
    present = {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in missing.items()}
    present[hist][row, positions] = batch[schema.ITEM_ID.name].numpy()[row]
    changed = model({k: tf.constant(v) for k, v in present.items()}).numpy()
    assert abs(changed[row] - reference[row]) > 1e-6


def test_din_sees_only_the_newest_behaviours_and_muse_the_whole_history(tiny_data_dir,
                                                                         tmp_path):
    """Replacing the oldest behaviour (outside the newest ``short_term_len``) leaves DIN's
    score unchanged and changes MUSE's, whose search covers the lifelong history."""
    scores = {}
    for name in ("din", "muse"):
        model, batch = _model_and_batch(name, tiny_data_dir, str(tmp_path / name), 48)
        lengths = batch[schema.HISTORY_LENGTH].numpy()
        row = int(np.argmax(lengths))
        assert lengths[row] > 3  # short_term_len = 3 in SMALL
        target = {schema.HISTORY_ITEM_ID.name: batch[schema.ITEM_ID.name].numpy()[row],
                  schema.HISTORY_CATEGORY.name: batch[schema.ITEM_CATEGORY.name].numpy()[row]}
        before = model(batch).numpy()[row]
        after = model(_with_history(batch, [row], [0], target)).numpy()[row]
        scores[name] = (before, after)
    assert scores["din"][0] == pytest.approx(scores["din"][1], abs=1e-7)
    assert abs(scores["muse"][0] - scores["muse"][1]) > 1e-6


def test_muse_search_selects_the_numpy_top_k_of_multimodal_cosines(tiny_data_dir, tmp_path):
    model, batch = _model_and_batch("muse", tiny_data_dir, str(tmp_path))
    model(batch)
    item_lookup = model.features.lookups[schema.ITEM_ID.vocabulary]
    rows = item_lookup.lookup_all(batch[schema.HISTORY_ITEM_ID.name])
    target_rows = item_lookup.lookup_all(batch[schema.ITEM_ID.name])
    valid = history_mask(batch[schema.HISTORY_ITEM_ID.name], batch[schema.HISTORY_LENGTH])
    out = model.gsu({"mm": model.mm_table(target_rows)}, {"rows": rows}, valid)
    table = model.mm_table(np.arange(model.mm_table.num_rows)).numpy().astype(np.float64)
    present = model.mm_table.present.numpy() > 0.5
    cosines = np.einsum("bd,bld->bl", table[target_rows.numpy()], table[rows.numpy()])
    selectable = valid.numpy() & present[rows.numpy()]
    for b in range(cosines.shape[0]):
        order = sorted(np.flatnonzero(selectable[b]), key=lambda i, b=b: (-cosines[b, i], i))
        order = order[: model.config.top_k]
        got = out["indices"].numpy()[b][out["mask"].numpy()[b]]
        assert sorted(got.tolist()) == sorted(order)
        np.testing.assert_allclose(out["scores"].numpy()[b][: len(order)],
                                   cosines[b, order], atol=1e-5)


def test_twin_search_and_esu_share_one_set_of_attention_weights(tiny_data_dir, tmp_path):
    model, batch = _model_and_batch("twin", tiny_data_dir, str(tmp_path))
    model(batch)
    assert model.gsu.logits_layer is model.long_term_attention.logits_layer
    names = [v.name for v in model.trainable_variables]
    assert len(names) == len(set(names))
    kernels = [v for v in model.trainable_variables if "query_kernel" in v.name]
    assert len(kernels) == 2  # short-term attention + the shared long-term logits


def test_miss_ranker_never_selects_a_behaviour_twice(tiny_data_dir, tmp_path):
    model, batch = _model_and_batch("miss", tiny_data_dir, str(tmp_path))
    model(batch)
    item_lookup = model.features.lookups[schema.ITEM_ID.vocabulary]
    rows = item_lookup.lookup_all(batch[schema.HISTORY_ITEM_ID.name])
    category_rows = model.features.lookups[schema.ITEM_CATEGORY.vocabulary](
        batch[schema.HISTORY_CATEGORY.name])
    target_rows = item_lookup.lookup_all(batch[schema.ITEM_ID.name])
    target = model.features.behaviour_embedding(
        target_rows,
        model.features.lookups[schema.ITEM_CATEGORY.vocabulary](batch[schema.ITEM_CATEGORY.name]))
    valid = history_mask(batch[schema.HISTORY_ITEM_ID.name], batch[schema.HISTORY_LENGTH])
    out = model.gsu({"id": target, "mm": model.mm_table(target_rows)},
                    {"id": model.features.behaviour_embedding(rows, category_rows),
                     "rows": rows}, valid)
    for indices, mask in zip(out["indices"].numpy(), out["mask"].numpy(), strict=True):
        chosen = indices[mask].tolist()
        assert len(chosen) == len(set(chosen))


@pytest.mark.parametrize("name", ["muse", "twin", "miss"])
def test_config_round_trip_rebuilds_the_model(name, tiny_data_dir, tmp_path):
    model, batch = _model_and_batch(name, tiny_data_dir, str(tmp_path))
    expected = model(batch).numpy()
    clone = type(model).from_config(model.get_config())
    clone(batch)
    clone.set_weights(model.get_weights())
    np.testing.assert_allclose(clone(batch).numpy(), expected, rtol=1e-6)
    assert clone.get_config() == model.get_config()


@pytest.mark.parametrize("name", ["din", "sim_hard", "sim_soft", "twin", "miss"])
def test_official_style_baselines_keep_muses_esu_and_change_only_the_search(
        name, tiny_data_dir, tmp_path):
    from muse_tf.layers import SemanticAwareTargetAttention, SimTier

    model, batch = _model_and_batch(name, tiny_data_dir, str(tmp_path))
    muse, _ = _model_and_batch("muse", tiny_data_dir, str(tmp_path / "muse"))
    model(batch)
    # The short-term path (target attention + multimodal SimTier) is MUSE's in every one.
    assert isinstance(model.short_term_simtier, SimTier)
    if name == "din":  # no lifelong search at all
        assert model.gsu is None and model.long_term_attention is None and model.simtier is None
    else:
        assert isinstance(model.long_term_attention, SemanticAwareTargetAttention)
        assert isinstance(model.simtier, SimTier)
        assert type(model.gsu) is not type(muse.gsu)
    gates = (model.long_term_attention.effective_gates().numpy()
             if model.long_term_attention is not None else None)
    if gates is not None:
        np.testing.assert_allclose(gates[:, 0], [1.0, 10.0, 10.0], rtol=1e-6)


@pytest.mark.parametrize("name", ["din_ta", "sim_hard_ta", "sim_soft_ta", "twin_ta", "miss_ta"])
def test_original_baselines_use_id_target_attention_and_no_simtier(name, tiny_data_dir,
                                                                  tmp_path):
    from muse_tf.layers import SemanticAwareTargetAttention

    model, batch = _model_and_batch(name, tiny_data_dir, str(tmp_path))
    assert np.isfinite(model(batch).numpy()).all()
    assert model.simtier is None and model.short_term_simtier is None
    assert not isinstance(model.long_term_attention, SemanticAwareTargetAttention)
    assert (model.long_term_attention is None) == (name == "din_ta")


def test_targets_without_a_multimodal_vector_fall_back_to_the_newest_behaviours(
        tiny_data_dir, tmp_path):
    model, batch = _model_and_batch("muse", tiny_data_dir, str(tmp_path))
    unknown = dict(batch)
    unknown[schema.ITEM_ID.name] = tf.fill(tf.shape(batch[schema.ITEM_ID.name]),
                                           tf.constant(987654321987, tf.int64))
    assert np.isfinite(model(unknown).numpy()).all()
    rows = model.features.item_lookup.lookup_all(unknown[schema.ITEM_ID.name])
    assert not model.mm_table.has_embedding(rows).numpy().any()
    history = model.features.encode_history(unknown, parts=())
    selection = model.gsu({"mm": model.mm_table(rows)}, {"rows": history["rows"]},
                          history["valid"] & model.mm_table.has_embedding(history["rows"]))
    # Newest first: selected positions decrease along K.
    indices, mask = selection["indices"].numpy(), selection["mask"].numpy()
    for row, keep in zip(indices, mask, strict=True):
        picked = row[keep]
        assert (np.diff(picked) < 0).all()
    np.testing.assert_array_equal(selection["scores"].numpy(), 0.0)


def test_the_model_is_built_on_the_int8_codes_of_the_catalogue(tiny_data_dir, tmp_path):
    from muse_tf.data.data_dir import DataDir
    from muse_tf.embeddings import normalised_mm_matrix
    from muse_tf.embeddings.vocabulary import read_vocabulary_ids

    model, batch = _model_and_batch("muse", tiny_data_dir, str(tmp_path))
    table = model.mm_table
    assert table.storage_dtype == "int8" and table.stored_values().dtype == np.int8
    mm_ids, mm_vectors = DataDir.open(tiny_data_dir).mm_embeddings()
    vocab_ids = read_vocabulary_ids(model.vocabularies[schema.ITEM_ID.vocabulary])
    unit = normalised_mm_matrix(vocab_ids, mm_ids, mm_vectors)
    rows = np.arange(table.num_rows)
    np.testing.assert_allclose(table(rows).numpy(), unit, atol=2 * 2.0 ** -24, rtol=0)
    np.testing.assert_array_equal(table.has_embedding(rows).numpy(), np.any(unit != 0, axis=1))
    assert table.has_embedding(rows).numpy().sum() > 0.5 * len(mm_ids)
    assert np.all(np.isfinite(model(batch).numpy()))
