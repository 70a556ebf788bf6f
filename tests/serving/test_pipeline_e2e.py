"""Retrieve (MISS export) then rank (ranking export), both served by one local server."""

import os

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.config import model_server_config_pb2

from muse_tf import schema
from muse_tf.export import names, requests
from muse_tf.export.publish import SIGNATURE_NAME
from serving import pipeline
from serving.client import PredictionClient
from serving.server import serve


@pytest.fixture(scope="module")
def served(trained_runs):
    runs = os.path.join(trained_runs, "runs")
    bases = {
        names.MISS_MODEL_NAME: names.retrieval_base_path(os.path.join(runs, "miss_retrieval"),
                                                         names.MISS_MODEL_NAME),
        names.RANKING_MODEL_NAME: names.ranking_base_path(os.path.join(runs, "muse")),
    }
    config = model_server_config_pb2.ModelServerConfig()
    for name, base in bases.items():
        entry = config.model_config_list.config.add()
        entry.name, entry.base_path, entry.model_platform = name, base, "tensorflow"
    handle = serve(config, port=0)
    yield handle, bases
    handle.stop()


def _latest_signature(base):
    version = max((v for v in os.listdir(base) if v.isdigit()), key=int)
    return tf.saved_model.load(os.path.join(base, version)).signatures[SIGNATURE_NAME]


def _static_size(fn, name):
    return fn.structured_input_signature[1][name].shape[1]


@pytest.mark.slow
def test_retrieve_then_rank_matches_the_two_savedmodels(served, tiny_data):
    handle, bases = served
    context, sequences = next(r for r in tiny_data.records["test"]
                              if len(r[1][schema.HISTORY_ITEM_ID.name]) >= 3)
    user = {f.name: context[f.name] for f in schema.USER_SIDE_FEATURES}
    items = sequences[schema.HISTORY_ITEM_ID.name]
    categories = sequences[schema.HISTORY_CATEGORY.name]
    catalogue = {}
    for records in tiny_data.records.values():
        for ctx, _ in records:
            catalogue[ctx[schema.ITEM_ID.name]] = {
                f.name: ctx[f.name] for f in schema.ITEM_SIDE_FEATURES if f is not schema.ITEM_ID}
    with PredictionClient(handle.address) as client:
        ranked = pipeline.retrieve_and_rank(client, user, items, categories, catalogue)
    assert ranked and all(r.item_id != 0 for r in ranked)
    assert [r.ranking_score for r in ranked] == sorted((r.ranking_score for r in ranked),
                                                        reverse=True)

    # The retrieved set is the retrieval SavedModel's own answer ...
    retrieval = _latest_signature(bases[names.MISS_MODEL_NAME])
    query = requests.retrieval_query(
        user, items, categories,
        max_seq_len=_static_size(retrieval, schema.HISTORY_ITEM_ID.name))
    expected_ids = retrieval(**{k: tf.constant(v) for k, v in query.items()})[
        "item_ids"].numpy()[0]
    expected_ids = expected_ids[expected_ids != 0]
    assert sorted(r.item_id for r in ranked) == sorted(expected_ids.tolist())
    # ... and the ranking scores are the ranking SavedModel's.
    ranker = _latest_signature(bases[names.RANKING_MODEL_NAME])
    candidates = [{schema.ITEM_ID.name: r.item_id, **catalogue.get(r.item_id, {})}
                  for r in ranked]
    request = requests.ranking_request(
        user, items, categories, candidates,
        max_seq_len=_static_size(ranker, schema.HISTORY_ITEM_ID.name),
        max_candidates=_static_size(ranker, schema.ITEM_ID.name))
    scores = ranker(**{k: tf.constant(v) for k, v in request.items()})["scores"].numpy()
    np.testing.assert_allclose([r.ranking_score for r in ranked], scores[0, :len(candidates)],
                               atol=1e-5)


@pytest.mark.slow
def test_a_model_of_the_wrong_kind_is_named(served, tiny_data):
    handle, _ = served
    with PredictionClient(handle.address) as client, pytest.raises(
            ValueError, match="'muse_ranking' serves a ranking signature"):
        pipeline.retrieve(client, {}, [], [], model=names.RANKING_MODEL_NAME)


def test_item_catalogue_from_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"205": pa.array([5, None, 7], pa.int64()),
                      "206": pa.array([1, 2, None], pa.int64()),
                      "213": pa.array([3, 3, 3], pa.int64()),
                      "214": pa.array([4, 4, 4], pa.int64())})
    pq.write_table(table, tmp_path / "item_features.parquet")
    catalogue = pipeline.load_item_catalogue(str(tmp_path / "item_features*.parquet"))
    assert catalogue == {5: {"item_category": 1, "item_attr_1": 3, "item_attr_2": 4},
                         7: {"item_category": 0, "item_attr_1": 3, "item_attr_2": 4}}
    with pytest.raises(FileNotFoundError, match="no item_features"):
        pipeline.load_item_catalogue(str(tmp_path / "nope*.parquet"))
