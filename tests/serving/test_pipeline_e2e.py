"""Retrieve (MISS export) then rank (ranking export), both served by one local server."""

import os

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.config import model_server_config_pb2

from muse_tf import config as config_lib
from muse_tf import schema
from muse_tf.export import ranking as export
from muse_tf.export import retrieval as retrieval_export
from muse_tf.training.experiment import run_experiment
from serving import pipeline, ranking
from serving.client import PredictionClient
from serving.server import serve

TINY = ["data.batch_size=8", "model.top_k=4", "model.id_embedding_dim=4",
        "model.tower_units=[16]", "model.short_term_len=4", "train.epochs=1", "train.verbose=0",
        "model.num_tiers=4", "model.head_dim=4", "retrieval.top_n=8", "retrieval.beam_width=4"]


@pytest.fixture(scope="module")
def served(tiny_data, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("pipeline"))
    retrieval_dir, ranking_dir = os.path.join(root, "miss"), os.path.join(root, "muse")
    run_experiment(config_lib.resolve("miss_retrieval", assignments=TINY),
                                   retrieval_dir, tiny_data.path)
    run_experiment(config_lib.resolve("muse", assignments=TINY), ranking_dir, tiny_data.path)
    config = model_server_config_pb2.ModelServerConfig()
    bases = {
        pipeline.RETRIEVAL_MODEL: os.path.join(retrieval_dir, retrieval_export.EXPORT_DIR,
                                               retrieval_export.MISS_MODEL_NAME),
        ranking.MODEL_NAME: os.path.join(ranking_dir, export.EXPORT_SUBDIR),
    }
    for name, base in bases.items():
        entry = config.model_config_list.config.add()
        entry.name, entry.base_path, entry.model_platform = name, base, "tensorflow"
    handle = serve(config, port=0)
    yield handle, bases
    handle.stop()


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

    def latest(base):
        return os.path.join(base, max(os.listdir(base), key=lambda v: int(v) if v.isdigit()
                                      else -1))

    # The retrieved set is the retrieval SavedModel's own answer ...
    retrieval = tf.saved_model.load(latest(bases[pipeline.RETRIEVAL_MODEL]))
    fn = retrieval.signatures["serving_default"]
    seq_len = fn.structured_input_signature[1][schema.HISTORY_ITEM_ID.name].shape[1]
    request = ranking.ranking_inputs(user, items, categories, [{schema.ITEM_ID.name: 1}])
    inputs = {}
    for name, spec in fn.structured_input_signature[1].items():
        value = request[name]
        if spec.shape.rank == 2:
            value = np.pad(value, [[0, 0], [0, seq_len - value.shape[1]]])
        inputs[name] = tf.constant(value, spec.dtype)
    expected_ids = fn(**inputs)["item_ids"].numpy()[0]
    expected_ids = expected_ids[expected_ids != 0]
    assert sorted(r.item_id for r in ranked) == sorted(expected_ids.tolist())
    # ... and the ranking scores are the ranking SavedModel's.
    ranker = tf.saved_model.load(latest(bases[ranking.MODEL_NAME]))
    rfn = ranker.signatures["serving_default"]
    specs = rfn.structured_input_signature[1]
    candidates = [{schema.ITEM_ID.name: r.item_id, **catalogue.get(r.item_id, {})}
                  for r in ranked]
    rin = ranking.ranking_inputs(user, items, categories, candidates)
    padded = {}
    for name, spec in specs.items():
        value = rin[name]
        if spec.shape.rank == 2:
            value = np.pad(value, [[0, 0], [0, spec.shape[1] - value.shape[1]]])
        padded[name] = tf.constant(value, spec.dtype)
    scores = rfn(**padded)["scores"].numpy()[0, :len(candidates)]
    np.testing.assert_allclose([r.ranking_score for r in ranked], scores, atol=1e-5)


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
