"""The streaming scale generator: TAOBAO-MM schema, joinable tables, exact counts."""

import glob
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from muse_tf import schema
from muse_tf.data import scale_data, synthetic


def _table(out_dir, stem):
    files = sorted(glob.glob(synthetic.table_pattern(out_dir, stem)))
    assert files, stem
    return pq.read_table(files) if len(files) == 1 else pq.ParquetDataset(files).read()


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("scale"))
    info = scale_data.generate(out, items=12_000, users=37, samples=401, seq_len=60, seed=3,
                               catalogue_shard_rows=5_000)
    return out, info


def test_tables_have_the_taobao_mm_schema_and_exact_counts(generated):
    out, info = generated
    for stem in synthetic.TABLES:
        table = _table(out, stem)
        assert table.schema.equals(synthetic.table_schema(stem)), stem
        assert table.num_rows == info["rows"][stem], stem
    assert info["rows"][synthetic.ITEM_FEATURES] == 12_000
    assert len(glob.glob(os.path.join(out, "item_features-*.parquet"))) == 3
    assert info["train_samples"] + info["test_samples"] == 401
    assert 20 <= info["test_samples"] <= 60  # test_fraction 0.1 of 401
    with open(os.path.join(out, synthetic.GENERATOR_FILE)) as f:
        assert json.load(f)["rows"] == info["rows"]


def test_every_sample_joins_and_ids_are_unique_and_non_zero(generated):
    out, _ = generated
    items = _table(out, synthetic.ITEM_FEATURES)
    item_ids = items.column(schema.ITEM_ID.key).to_numpy()
    assert len(np.unique(item_ids)) == len(item_ids) and (item_ids != 0).all()
    embeddings = _table(out, synthetic.EMBEDDINGS)
    np.testing.assert_array_equal(embeddings.column(schema.EMBEDDING_ITEM_KEY).to_numpy(),
                                  item_ids)
    for split in ("train", "test"):
        samples = _table(out, f"{split}_samples")
        users = _table(out, f"{split}_user_features")
        user_ids = users.column(schema.USER_ID.key).to_numpy()
        assert len(np.unique(user_ids)) == len(user_ids)
        assert np.isin(samples.column(schema.USER_ID.key).to_numpy(), user_ids).all()
        assert np.isin(samples.column(schema.ITEM_ID.key).to_numpy(), item_ids).all()
        labels = np.stack(samples.column(schema.LABEL.key).to_numpy(zero_copy_only=False))
        assert set(map(tuple, labels.tolist())) <= {(1, 0), (0, 1)}
        histories = users.column(schema.HISTORY_ITEM_ID.key).to_pylist()
        categories = users.column(schema.HISTORY_CATEGORY.key).to_pylist()
        assert all(1 <= len(h) <= 60 and len(h) == len(c)
                   for h, c in zip(histories, categories, strict=True))
        assert np.isin(np.concatenate(histories), item_ids).all()
    # A behaviour's category is its item's category in the item table.
    category_of = dict(zip(item_ids.tolist(),
                           items.column(schema.ITEM_CATEGORY.key).to_pylist(), strict=True))
    assert all(category_of[i] == c for i, c in zip(histories[0], categories[0], strict=True))


def test_embeddings_look_like_the_real_int8_table(generated):
    out, _ = generated
    vectors = np.stack(_table(out, synthetic.EMBEDDINGS).column(
        schema.EMBEDDING_VECTOR_KEY).to_numpy(zero_copy_only=False)).astype(np.float64)
    assert vectors.shape[1] == schema.MM_EMBEDDING_DIM
    assert vectors.min() >= -38 and vectors.max() <= 38
    norms = np.linalg.norm(vectors, axis=1)
    assert 110 < np.median(norms) < 130


def test_same_seed_same_tables_and_existing_output_is_refused(generated, tmp_path):
    out, _ = generated
    again = str(tmp_path / "again")
    scale_data.generate(again, items=12_000, users=37, samples=401, seq_len=60, seed=3,
                        catalogue_shard_rows=5_000)
    for stem in synthetic.TABLES:
        assert _table(again, stem).equals(_table(out, stem)), stem
    with pytest.raises(FileExistsError, match="overwrite"):
        scale_data.generate(again, items=10, users=1, samples=1, seq_len=5)
    with pytest.raises(ValueError, match="items must be an integer >= 1"):
        scale_data.generate(str(tmp_path / "x"), items=0, users=1, samples=1)


def test_users_with_few_samples_still_give_a_test_split(tmp_path):
    info = scale_data.generate(str(tmp_path), items=500, users=200, samples=1000, seq_len=8)
    assert 50 <= info["test_samples"] <= 150
    assert info["train_samples"] + info["test_samples"] == 1000
