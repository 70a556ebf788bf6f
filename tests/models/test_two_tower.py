"""Tests for muse_tf.models.two_tower: towers, the in-batch loss (a batch mean, with and
without the logQ correction) against NumPy, training through ``fit``, the config round trip,
the candidate embeddings written into one preallocated array, brute-force retrieval over the
item tower, and the exports (stock ops reload without muse_tf/scann; ScaNN reloads with
scann)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from muse_tf import schema
from muse_tf.config import ModelConfig
from muse_tf.data import artifacts
from muse_tf.embeddings import build_vocabularies, multimodal_codes
from muse_tf.embeddings.vocabulary import read_vocabulary_ids
from muse_tf.export.retrieval import export_retrieval
from muse_tf.index.brute_force import ALIGNMENT, brute_force_index, numpy_top_k
from muse_tf.index.scann_index import scann_index
from muse_tf.models.two_tower import CANDIDATE_PROBABILITY, DEFAULT_TEMPERATURE, TwoTowerModel

SEQ_LEN = 12
SMALL = ModelConfig(id_embedding_dim=4, short_term_len=3, tower_units=[16])


@pytest.fixture(scope="module")
def world(tiny_data_dir, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("two_tower_model")
    mm_ids, mm_vectors = artifacts.load_mm_embeddings(tiny_data_dir)
    vocabularies = build_vocabularies(tiny_data_dir, str(model_dir / "vocab"),
                                      mm_item_ids=mm_ids)
    table = multimodal_codes(read_vocabulary_ids(vocabularies["item"]), mm_ids, mm_vectors)
    tf.keras.utils.set_random_seed(0)
    model = TwoTowerModel(SMALL, 8, vocabularies, mm_table=table, temperature=0.2)
    return {"model": model, "items": np.sort(mm_ids), "vocabularies": vocabularies,
            "table": table}


def make_batch(items: np.ndarray, batch: int, seed: int) -> dict[str, tf.Tensor]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, SEQ_LEN + 1, batch).astype(np.int32)
    padding = np.arange(SEQ_LEN)[None, :] >= lengths[:, None]
    out = {
        schema.HISTORY_ITEM_ID.name: np.where(padding, 0, rng.choice(items, (batch, SEQ_LEN))),
        schema.HISTORY_CATEGORY.name: np.where(padding, 0,
                                               rng.integers(1, 99, (batch, SEQ_LEN))),
        schema.HISTORY_LENGTH: lengths,
        schema.ITEM_ID.name: rng.choice(items, batch),
    }
    for feature in schema.USER_SIDE_FEATURES:
        out[feature.name] = rng.integers(1, 10**6, batch)
    return {k: tf.constant(v.astype(np.int32 if k == schema.HISTORY_LENGTH else np.int64))
            for k, v in out.items()}


def test_towers_are_unit_norm_and_ignore_padding(world):
    model, items = world["model"], world["items"]
    batch = make_batch(items, 6, seed=1)
    queries = model(batch).numpy()
    candidates = model.item_tower(batch[schema.ITEM_ID.name]).numpy()
    assert queries.shape == (6, 8) and candidates.shape == (6, 8)
    np.testing.assert_allclose(np.linalg.norm(queries, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(candidates, axis=1), 1.0, atol=1e-5)
    lengths = batch[schema.HISTORY_LENGTH].numpy()
    padding = np.arange(SEQ_LEN)[None, :] >= lengths[:, None]
    noisy = dict(batch)
    noisy[schema.HISTORY_ITEM_ID.name] = tf.where(padding, int(items[0]),
                                                  batch[schema.HISTORY_ITEM_ID.name])
    np.testing.assert_allclose(model(noisy).numpy(), queries, atol=1e-6)
    # The history matters: another user's history gives another query.
    other = dict(batch)
    other[schema.HISTORY_ITEM_ID.name] = make_batch(items, 6, 2)[schema.HISTORY_ITEM_ID.name]
    other[schema.HISTORY_LENGTH] = tf.fill([6], SEQ_LEN)
    assert not np.allclose(model(other).numpy(), queries, atol=1e-4)


def test_loss_is_the_in_batch_softmax_without_accidental_hits(world):
    model, items = world["model"], world["items"]
    batch = make_batch(items, 5, seed=3)
    ids = batch[schema.ITEM_ID.name].numpy()
    ids[3] = ids[1]  # the same item twice: not a negative of its own row
    batch[schema.ITEM_ID.name] = tf.constant(ids)
    q = model(batch).numpy()
    c = model.item_tower(batch[schema.ITEM_ID.name]).numpy()
    logits = q @ c.T / model.temperature
    same = (ids[:, None] == ids[None, :]) & ~np.eye(5, dtype=bool)
    logits = np.where(same, -np.inf, logits)
    log_softmax = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1,
                                  keepdims=True)) - logits.max(1, keepdims=True)
    # The mean over the batch's queries (tfrs' default would be their sum).
    expected = -np.mean(np.diag(log_softmax))
    assert float(model.compute_loss(batch)) == pytest.approx(expected, rel=1e-4)


def reference_loss(u: np.ndarray, v: np.ndarray, ids: np.ndarray, temperature: float,
                   q: np.ndarray | None = None) -> float:
    """NumPy in-batch softmax: mean_b -log softmax_c(<u_b, v_c> / T - log q_c)[b], another
    row's copy of the positive's item masked out."""
    logits = u.astype(np.float64) @ v.astype(np.float64).T / temperature
    if q is not None:
        logits = logits - np.log(q.astype(np.float64))[None, :]
    same = (ids[:, None] == ids[None, :]) & ~np.eye(len(ids), dtype=bool)
    logits = np.where(same, -np.inf, logits)
    top = logits.max(1, keepdims=True)
    log_softmax = logits - top - np.log(np.exp(logits - top).sum(1, keepdims=True))
    return float(-np.mean(np.diag(log_softmax)))


#: A hand-made batch of 4: unit-norm query/candidate embeddings, item 7 twice, and q.
HAND_U = np.array([[1, 0, 0], [0.6, 0.8, 0], [0, 0, 1], [0, 0.6, 0.8]], np.float32)
HAND_V = np.array([[0.8, 0.6, 0], [0, 1, 0], [0.6, 0, 0.8], [0, 1, 0]], np.float32)
HAND_IDS = np.array([3, 7, 11, 7], np.int64)
HAND_Q = np.array([0.05, 0.4, 0.002, 0.4], np.float32)


@pytest.mark.parametrize("correction", [True, False])
def test_in_batch_loss_equals_the_numpy_reference_on_hand_made_embeddings(world, correction):
    model = TwoTowerModel(SMALL, 8, world["vocabularies"], mm_table=world["table"],
                          temperature=0.3, logq_correction=correction)
    q = tf.constant(HAND_Q) if correction else None
    loss = float(model.in_batch_loss(tf.constant(HAND_U), tf.constant(HAND_V),
                                     tf.constant(HAND_IDS), q))
    expected = reference_loss(HAND_U, HAND_V, HAND_IDS, 0.3, HAND_Q if correction else None)
    assert loss == pytest.approx(expected, rel=1e-5)
    # The correction matters here: it is not the other reference.
    other = reference_loss(HAND_U, HAND_V, HAND_IDS, 0.3, None if correction else HAND_Q)
    assert abs(loss - other) > 0.05


def test_compute_loss_with_logq_correction_reads_q_from_the_batch(world):
    model, items = world["model"], world["items"]
    corrected = TwoTowerModel(SMALL, 8, world["vocabularies"], mm_table=world["table"],
                              temperature=0.2, logq_correction=True)
    batch = make_batch(items, 6, seed=4)
    corrected.build_for(batch)
    corrected.set_weights(model.get_weights())  # the same towers as `model`
    rng = np.random.default_rng(0)
    q = rng.uniform(1e-4, 0.2, 6).astype(np.float32)
    ids = batch[schema.ITEM_ID.name].numpy()
    u = model(batch).numpy()
    v = model.item_tower(batch[schema.ITEM_ID.name]).numpy()
    with pytest.raises(KeyError, match=CANDIDATE_PROBABILITY):
        corrected.compute_loss(batch)
    batch = {**batch, CANDIDATE_PROBABILITY: tf.constant(q)}
    assert float(corrected.compute_loss(batch)) == pytest.approx(
        reference_loss(u, v, ids, 0.2, q), rel=1e-4)
    # Without the correction the feature is ignored; serving scores stay <u, v>: the towers
    # (all that the indexes and exports use) are unchanged by the flag.
    assert float(model.compute_loss(batch)) == pytest.approx(reference_loss(u, v, ids, 0.2),
                                                             rel=1e-4)
    np.testing.assert_allclose(corrected(batch).numpy(), u, atol=1e-6)
    assert corrected.get_config()["logq_correction"] is True
    assert TwoTowerModel.from_config(corrected.get_config()).logq_correction


def test_config_defaults_match_the_model(world):
    from muse_tf.config import RetrievalConfig

    assert RetrievalConfig().temperature == DEFAULT_TEMPERATURE
    assert RetrievalConfig().logq_correction is True
    assert world["model"].logq_correction is False  # class default: configs saved before it


def new_model(world, seed: int = 0, rates: tuple[float, float] = (0.01, 0.01)
              ) -> TwoTowerModel:
    tf.keras.utils.set_random_seed(seed)
    model = TwoTowerModel(SMALL, 8, world["vocabularies"], mm_table=world["table"],
                          temperature=0.2)
    model.compile_with_learning_rates(*rates)
    return model


def as_dataset(batches):
    dataset = tf.data.Dataset.from_tensors(batches[0])
    for batch in batches[1:]:
        dataset = dataset.concatenate(tf.data.Dataset.from_tensors(batch))
    return dataset


def test_fit_history_loss_is_the_epoch_mean_of_the_batch_means(world):
    batches = [make_batch(world["items"], 8, seed=20 + i) for i in range(4)]
    model = new_model(world, rates=(1e-12, 1e-12))  # the weights do not move
    model.build_for(batches[0])
    expected = np.mean([float(model.compute_loss(b)) for b in batches])
    history = model.fit(as_dataset(batches), epochs=1, verbose=0)
    assert history.history["loss"][0] == pytest.approx(expected, rel=1e-4)
    assert expected < np.log(8) + 1.0  # about log(batch) for random towers, not B times it


def test_fit_trains_both_towers_and_the_embeddings(world):
    batch = make_batch(world["items"], 8, seed=30)
    model = new_model(world, seed=1, rates=(0.05, 0.01))
    model.build_for(batch)
    parts = {"user tower": model.user_tower.mlp, "item tower": model.item_tower.mlp,
             **{name: layer for name, layer in model.features.embeddings.items()}}
    before = {name: [v.numpy().copy() for v in layer.trainable_variables]
              for name, layer in parts.items()}
    first = float(model.compute_loss(batch))
    model.fit(as_dataset([batch]).repeat(20), epochs=1, verbose=0)
    assert float(model.compute_loss(batch)) < 0.7 * first
    for name, layer in parts.items():
        assert all(not np.array_equal(old, v.numpy())
                   for old, v in zip(before[name], layer.trainable_variables, strict=True)), name
    assert sorted(v.name for v in model.embedding_variables()) == sorted(
        v.name for layer in model.features.embeddings.values() for v in layer.weights)
    assert int(model.embedding_optimizer.iterations.numpy()) == 20
    assert not model.features.mm_table.trainable_weights


def test_config_round_trip_rebuilds_the_model_from_its_weights(world, tmp_path):
    batch = make_batch(world["items"], 6, seed=40)
    model = new_model(world, seed=2)
    model.build_for(batch)
    model.fit(as_dataset([batch]), epochs=1, verbose=0)
    config = model.get_config()
    json.dumps(config)
    clone = TwoTowerModel.from_config(config)
    assert clone.get_config() == config
    assert not np.any(clone.features.mm_table.stored_values())  # restored from the weights
    clone.build_for(batch)
    path = str(tmp_path / "weights")
    model.save_weights(path)
    clone.load_weights(path).assert_existing_objects_matched()
    np.testing.assert_allclose(clone(batch).numpy(), model(batch).numpy(), atol=1e-6)
    items = tf.constant(world["items"][:9])
    np.testing.assert_allclose(clone.item_tower(items).numpy(),
                               model.item_tower(items).numpy(), atol=1e-6)
    assert float(clone.compute_loss(batch)) == pytest.approx(float(model.compute_loss(batch)),
                                                             rel=1e-5)
    serialized = tf.keras.utils.serialize_keras_object(model)
    assert serialized["registered_name"] == "muse_tf>TwoTowerModel"


def test_item_tower_rejects_bad_ids(world):
    with pytest.raises(ValueError, match="int64 \\[N\\]"):
        world["model"].item_tower(tf.constant([[1, 2]], tf.int64))
    with pytest.raises(ValueError, match="tower_dim"):
        TwoTowerModel(SMALL, 0, {}, None)


def test_brute_force_over_the_item_tower_equals_numpy(world):
    model, items = world["model"], world["items"]
    candidates = model.candidate_embeddings(items, batch_size=7)
    np.testing.assert_allclose(candidates, model.item_tower(tf.constant(items)).numpy(),
                               atol=1e-6)
    batch = make_batch(items, 4, seed=5)
    index = brute_force_index(candidates, items, 10, query_model=model.user_tower)
    scores, found = index(batch)
    expected_scores, expected_ids = numpy_top_k(model(batch).numpy(), candidates, 10, items)
    np.testing.assert_array_equal(found.numpy(), expected_ids)
    np.testing.assert_allclose(scores.numpy(), expected_scores, atol=1e-5)


def test_candidate_embeddings_fill_one_preallocated_array(world):
    model, items = world["model"], world["items"]
    expected = model.item_tower(tf.constant(items)).numpy()
    candidates = model.candidate_embeddings(items, batch_size=7)  # the last batch is short
    assert candidates.shape == (len(items), 8) and candidates.dtype == np.float32
    assert candidates.flags.c_contiguous and candidates.ctypes.data % ALIGNMENT == 0
    np.testing.assert_allclose(candidates, expected, atol=1e-6)
    out = np.full((len(items), 8), np.nan, np.float32)
    assert model.candidate_embeddings(items, batch_size=5, out=out) is out
    np.testing.assert_allclose(out, expected, atol=1e-6)
    with pytest.raises(ValueError, match="out must be a writeable float32 array of shape"):
        model.candidate_embeddings(items, out=np.zeros((len(items), 7), np.float32))
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        model.candidate_embeddings(items, batch_size=0)
    assert model.candidate_embeddings(items[:0]).shape == (0, 8)
    # The brute-force index shares the (aligned) array: the catalogue is in memory once.
    index = brute_force_index(candidates, items, 10)
    assert np.shares_memory(np.asarray(index.candidates.value()), candidates)


@pytest.mark.slow
def test_exports_reload_and_return_the_same_items(world, tmp_path):
    model, items = world["model"], world["items"]
    candidates = model.candidate_embeddings(items)
    batch = make_batch(items, 3, seed=9)
    request = {k: v for k, v in batch.items() if k != schema.ITEM_ID.name}
    brute = brute_force_index(candidates, items, 10, query_model=model.user_tower)
    scann = scann_index(candidates, items, 10, num_leaves=2, num_leaves_to_search=2,
                        num_reordering_candidates=36, query_model=model.user_tower)
    brute_dir = export_retrieval(brute, str(tmp_path / "two_tower_brute_force"), k=10,
                                 max_seq_len=SEQ_LEN)
    scann_dir = export_retrieval(scann, str(tmp_path / "two_tower_scann"), k=10,
                                 max_seq_len=SEQ_LEN, scann=True)
    expected = brute(request, k=10)[1].numpy()
    np.testing.assert_array_equal(scann(request, k=10)[1].numpy(), expected)

    # ScaNN export: reloads here (scann is imported) and returns the same items.
    loaded = tf.saved_model.load(scann_dir).signatures["serving_default"]
    np.testing.assert_array_equal(loaded(**request)["item_ids"].numpy(), expected)

    # Brute-force export: reloads in a process that imports neither muse_tf nor scann.
    np.savez(tmp_path / "inputs.npz", **{k: v.numpy() for k, v in request.items()})
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        import tensorflow as tf
        fn = tf.saved_model.load({brute_dir!r}).signatures["serving_default"]
        inputs = dict(np.load({str(tmp_path / "inputs.npz")!r}))
        out = fn(**{{k: tf.constant(v) for k, v in inputs.items()}})
        print(json.dumps({{"ids": out["item_ids"].numpy().tolist(),
                           "modules": sorted(m for m in sys.modules
                                             if m.split(".")[0] in ("muse_tf", "scann"))}}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, cwd=str(tmp_path), timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["modules"] == []
    np.testing.assert_array_equal(np.array(report["ids"]), expected)


def test_the_table_storage_is_the_configs_and_gives_the_same_towers(world):
    import dataclasses

    batch = make_batch(world["items"], 6, seed=41)
    towers = {}
    for storage in ("int8", "float32"):
        tf.keras.utils.set_random_seed(3)
        config = dataclasses.replace(SMALL, mm_storage_dtype=storage)
        model = TwoTowerModel(config, 8, world["vocabularies"], mm_table=world["table"])
        assert model.features.mm_table.storage_dtype == storage
        clone = TwoTowerModel.from_config(model.get_config())
        assert clone.features.mm_table.storage_dtype == storage
        towers[storage] = model.candidate_embeddings(world["items"][:50])
        towers[storage + "_query"] = model(batch).numpy()
    np.testing.assert_allclose(towers["int8"], towers["float32"], atol=1e-5)
    np.testing.assert_allclose(towers["int8_query"], towers["float32_query"], atol=1e-5)
    assert np.abs(towers["int8"]).max() > 1e-3
