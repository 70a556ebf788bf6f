"""FeatureEmbeddings: exact lookups (OOV and rare rows), history masks and parts, the user and
item attribute embeddings, only the vocabularies asked for, and the config round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

import muse_tf  # noqa: F401
from muse_tf import schema
from muse_tf.embeddings import Vocabulary
from muse_tf.embeddings.feature_embeddings import FeatureEmbeddings
from tests.layers.harness import assert_config_round_trip, assert_nested_close

E = 3
D = 4
ITEMS = [11, 12, 13, 14]        # 14 is rare: past num_embedded, no ID row of its own
CATEGORIES = [21, 22]
#: The frozen table's int8 codes by row (what models load) and their unit vectors.
MM_CODES = np.array([[0, 0, 0, 0], [0, 0, 0, 0],       # padding, OOV
                     [5, 0, 0, 0], [0, 3, 4, 0],       # items 11, 12
                     [0, 0, 0, 0], [0, 0, 0, -7]],     # 13 has no vector, 14 has one
                    np.int8)
MM = np.array([[0, 0, 0, 0], [0, 0, 0, 0],
               [1, 0, 0, 0], [0, 0.6, 0.8, 0],
               [0, 0, 0, 0], [0, 0, 0, -1]], np.float32)


def _write(directory, name: str, ids: list[int], num_embedded: int | None = None) -> Vocabulary:
    path = str(directory / f"{name}.tsv")
    with open(path, "w") as f:
        f.writelines(f"{i}\t{len(ids) - k}\n" for k, i in enumerate(ids))
    return Vocabulary(name, path, len(ids), len(ids) if num_embedded is None else num_embedded)


@pytest.fixture(scope="module")
def vocabularies(tmp_path_factory) -> dict[str, Vocabulary]:
    directory = tmp_path_factory.mktemp("vocab")
    out = {"item": _write(directory, "item", ITEMS, num_embedded=3),
           "category": _write(directory, "category", CATEGORIES),
           "user": _write(directory, "user", [500, 501])}
    for k, feature in enumerate(schema.USER_ATTRIBUTES):
        out[feature.vocabulary] = _write(directory, feature.vocabulary, [100 + k])
    for k, feature in enumerate(schema.ITEM_ATTRIBUTES):
        out[feature.vocabulary] = _write(directory, feature.vocabulary, [200 + k, 300 + k])
    assert set(out) == set(schema.vocabularies())
    return out


def make_layer(vocabularies, **options) -> FeatureEmbeddings:
    tf.keras.utils.set_random_seed(0)
    options.setdefault("mm_table", MM_CODES)
    return FeatureEmbeddings(vocabularies, E, mm_dim=D, short_term_len=2, **options)


def weight(layer: FeatureEmbeddings, vocabulary: str) -> np.ndarray:
    return layer.embeddings[vocabulary].embeddings.numpy()


def history_batch() -> dict[str, tf.Tensor]:
    # Row 0: 11, 99 (unknown), 14 (rare), then padding; row 1: a 0 id inside the length and a
    # stale value behind it; row 2: empty.
    return {
        schema.HISTORY_ITEM_ID.name: tf.constant([[11, 99, 14, 0], [12, 0, 13, 12],
                                                  [0, 0, 0, 0]], tf.int64),
        schema.HISTORY_CATEGORY.name: tf.constant([[21, 22, 77, 0], [22, 0, 21, 22],
                                                   [0, 0, 0, 0]], tf.int64),
        schema.HISTORY_LENGTH: tf.constant([3, 9, 0], tf.int32),
    }


def test_lookups_and_embeddings_are_exact(vocabularies):
    layer = make_layer(vocabularies)
    ids = tf.constant([11, 12, 13, 14, 99, 0], tf.int64)
    # Full rows (the frozen table's index) keep the rare item 14; the ID rows send it and the
    # unknown 99 to the OOV row 1; 0 is padding.
    np.testing.assert_array_equal(layer.item_lookup.lookup_all(ids).numpy(), [2, 3, 4, 5, 1, 0])
    np.testing.assert_array_equal(layer.lookup("item", ids).numpy(), [2, 3, 4, 1, 1, 0])
    np.testing.assert_allclose(layer.embed("item", ids).numpy(),
                               weight(layer, "item")[[2, 3, 4, 1, 1, 0]])
    id_vectors, mm_vectors, has_mm = layer.item_embedding(ids)
    np.testing.assert_allclose(id_vectors.numpy(), weight(layer, "item")[[2, 3, 4, 1, 1, 0]])
    np.testing.assert_allclose(mm_vectors.numpy(), MM[[2, 3, 4, 5, 1, 0]])
    np.testing.assert_array_equal(has_mm.numpy(), [1, 1, 0, 1, 0, 0])
    rows = layer.item_lookup.lookup_all(tf.constant([[11, 14]], tf.int64))
    categories = layer.lookup("category", tf.constant([[22, 5]], tf.int64))
    np.testing.assert_array_equal(categories.numpy(), [[3, 1]])
    np.testing.assert_allclose(
        layer.behaviour_embedding(rows, categories).numpy(),
        np.concatenate([weight(layer, "item")[[[2, 1]]], weight(layer, "category")[[[3, 1]]]],
                       axis=-1))
    assert weight(layer, "item").shape == (3 + 2, E)  # num_embedded + padding + OOV
    assert layer.behaviour_dim == 2 * E


def test_history_masks_and_parts(vocabularies):
    layer = make_layer(vocabularies)
    history = layer.encode_history(history_batch())
    np.testing.assert_array_equal(history["lengths"].numpy(), [3, 4, 0])  # clipped to L
    np.testing.assert_array_equal(history["valid"].numpy(),
                                  [[1, 1, 1, 0], [1, 0, 1, 1], [0, 0, 0, 0]])
    # 99 is unknown (OOV row: no vector), 13 has no vector.
    np.testing.assert_array_equal(history["mm_valid"].numpy(),
                                  [[1, 0, 1, 0], [1, 0, 0, 1], [0, 0, 0, 0]])
    np.testing.assert_array_equal(history["rows"].numpy(),
                                  [[2, 1, 5, 0], [3, 0, 4, 3], [0, 0, 0, 0]])
    np.testing.assert_array_equal(history["category"].numpy(),
                                  history_batch()[schema.HISTORY_CATEGORY.name].numpy())
    np.testing.assert_allclose(history["mm"].numpy()[0], MM[[2, 1, 5, 0]])
    expected_id = np.concatenate([weight(layer, "item")[[2, 1, 1, 0]],
                                  weight(layer, "category")[[2, 3, 1, 0]]], axis=-1)
    np.testing.assert_allclose(history["id"].numpy()[0], expected_id)
    # Short-term mean: the newest 2 valid behaviours (row 0: positions 1, 2; row 1: 2, 3;
    # row 2: none -> zeros).
    short = layer.short_term_mean(history).numpy()
    ids = history["id"].numpy()
    np.testing.assert_allclose(short[0], ids[0, 1:3].mean(0), atol=1e-7)
    np.testing.assert_allclose(short[1], ids[1, 2:4].mean(0), atol=1e-7)
    np.testing.assert_array_equal(short[2], np.zeros(2 * E))

    mm_only = layer.encode_history(history_batch(), parts=("mm",))
    assert "id" not in mm_only and "mm" in mm_only
    with pytest.raises(ValueError, match="needs the history's 'id' part"):
        layer.short_term_mean(mm_only)
    with pytest.raises(ValueError, match=r"unknown parts \['ids'\]"):
        layer.encode_history(history_batch(), parts=("ids",))
    bad = dict(history_batch())
    bad[schema.HISTORY_LENGTH] = tf.constant([[3]], tf.int32)
    with pytest.raises(ValueError, match=r"hist_len must be \[batch\]"):
        layer.encode_history(bad)


def test_user_and_item_attributes_and_only_the_vocabularies_asked_for(vocabularies):
    plain = make_layer(vocabularies)
    assert sorted(plain.lookups) == sorted(["item", "category",
                                            *(f.vocabulary for f in schema.USER_ATTRIBUTES)])
    features = {f.name: tf.constant([100 + k, 7], tf.int64)
                for k, f in enumerate(schema.USER_ATTRIBUTES)}
    features[schema.HISTORY_LENGTH] = tf.constant([1, 1], tf.int32)
    attributes = plain.user_attributes(features).numpy()
    assert attributes.shape == (2, 5 * E) == (2, plain.user_dim)
    for k, feature in enumerate(schema.USER_ATTRIBUTES):
        np.testing.assert_allclose(attributes[:, k * E:(k + 1) * E],
                                   weight(plain, feature.vocabulary)[[2, 1]])
    candidates = {schema.ITEM_ID.name: tf.constant([[11, 12, 13]], tf.int64)}
    assert plain.item_attributes(candidates).shape == (1, 3, 0)
    with pytest.raises(ValueError, match="use_user_id=True"):
        plain.user_id_embedding(features)
    with pytest.raises(ValueError, match="'user' is not used"):
        plain.embed("user", features[schema.USER_ATTRIBUTES[0].name])

    full = make_layer(vocabularies, use_user_attributes=False, use_item_attributes=True,
                      use_user_id=True)
    assert sorted(full.lookups) == sorted(["item", "category", "user",
                                           *(f.vocabulary for f in schema.ITEM_ATTRIBUTES)])
    assert full.user_attributes(features).shape == (2, 0) and full.user_dim == 0
    candidates.update({f.name: tf.constant([[300 + k, 200 + k, 0]], tf.int64)
                       for k, f in enumerate(schema.ITEM_ATTRIBUTES)})
    item_attributes = full.item_attributes(candidates).numpy()
    assert item_attributes.shape == (1, 3, 2 * E) == (1, 3, full.item_attribute_dim)
    for k, feature in enumerate(schema.ITEM_ATTRIBUTES):
        np.testing.assert_allclose(item_attributes[0, :, k * E:(k + 1) * E],
                                   weight(full, feature.vocabulary)[[3, 2, 0]])
    user = full.user_id_embedding({schema.USER_ID.name: tf.constant([501, 9], tf.int64)})
    np.testing.assert_allclose(user.numpy(), weight(full, "user")[[3, 1]])
    names = sorted(v.name for v in full.embedding_variables())
    assert len(names) == 5 and all("id_embedding_" in n for n in names)
    assert any("id_embedding_user" in n for n in names)
    assert not full.mm_table.trainable_weights


def test_missing_vocabularies_and_bad_sizes_are_named(vocabularies):
    with pytest.raises(ValueError, match=r"vocabularies missing for \['item', 'category'"):
        FeatureEmbeddings({}, 4)
    without_user = {k: v for k, v in vocabularies.items() if k != "user"}
    FeatureEmbeddings(without_user, 4, mm_dim=D)  # the user id is not used by default
    with pytest.raises(ValueError, match=r"missing for \['user'\]"):
        FeatureEmbeddings(without_user, 4, mm_dim=D, use_user_id=True)
    with pytest.raises(ValueError, match="`id_embedding_dim` must be a positive int"):
        FeatureEmbeddings(vocabularies, 0)


def test_config_round_trip(vocabularies):
    layer = make_layer(vocabularies, use_item_attributes=True)
    config = layer.get_config()
    json.dumps(config)
    assert set(config["vocabularies"]) == set(layer.lookups)
    assert config["use_item_attributes"] and not config["use_user_id"]
    # The frozen table travels as a weight: a clone starts from zeros and matches once the
    # weights are copied.
    assert_config_round_trip(layer, [history_batch()])
    clone = FeatureEmbeddings.from_config(config)
    assert not np.any(clone.mm_table.stored_values())
    clone.set_weights(layer.get_weights())
    assert_nested_close(clone.item_embedding(tf.constant([12, 14], tf.int64)),
                        layer.item_embedding(tf.constant([12, 14], tf.int64)))


@pytest.mark.parametrize("storage, table", [("float32", MM), ("float16", MM),
                                            ("float32", MM_CODES)])
def test_float_storages_give_the_int8_tables_vectors(vocabularies, storage, table):
    int8 = make_layer(vocabularies)
    other = make_layer(vocabularies, mm_storage_dtype=storage, mm_table=table)
    assert int8.mm_table.storage_dtype == "int8" and int8.mm_table.stored_values().dtype == np.int8
    assert other.get_config()["mm_storage_dtype"] == storage
    assert FeatureEmbeddings.from_config(other.get_config()).mm_table.storage_dtype == storage
    ids = tf.constant([11, 12, 13, 14, 99, 0], tf.int64)
    _, want, want_has = int8.item_embedding(ids)
    _, got, got_has = other.item_embedding(ids)
    np.testing.assert_allclose(want.numpy(), MM[[2, 3, 4, 5, 1, 0]], atol=1e-7)
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-3 if storage == "float16"
                               else 1e-7)
    np.testing.assert_array_equal(got_has.numpy(), want_has.numpy())
    np.testing.assert_array_equal(want_has.numpy(), [True, True, False, True, False, False])


def test_float_table_cannot_be_stored_as_int8(vocabularies):
    with pytest.raises(ValueError, match=r"a float32 initial_table cannot be stored as int8"):
        make_layer(vocabularies, mm_table=MM)
