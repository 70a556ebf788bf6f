"""Export a trained ranker -> local gRPC server -> client: the same scores as in process."""

import grpc
import numpy as np
import pytest
import tensorflow as tf

from muse_tf import config as config_lib
from muse_tf import schema
from muse_tf.data.data_dir import DataDir
from muse_tf.export import ranking as export
from muse_tf.training.ranking import run_ranking as run_experiment
from serving import ranking
from serving.client import PredictionClient, build_predict_request
from serving.server import serve

SMALL = ["data.batch_size=4", "model.top_k=4", "model.short_term_len=3", "train.verbose=0",
         "model.tower_units=[8]", "model.num_tiers=4", "train.export=false"]


@pytest.fixture(scope="module")
def served(tiny_data_dir, tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("ranker"))
    config = config_lib.resolve("muse", assignments=SMALL)
    run_experiment(config, model_dir, tiny_data_dir)
    model, config = export.restore_ranking_model(model_dir)
    path = export.export_ranking_model(model, config, model_dir, max_candidates=6)
    import os

    handle = serve(model_name=ranking.MODEL_NAME, model_base_path=os.path.dirname(path),
                   port=0)
    yield model, config, handle, export.describe(path)
    handle.stop()


def _user(example, row):
    user = {f.name: int(example[f.name][row]) for f in schema.USER_SIDE_FEATURES}
    length = int(example[schema.HISTORY_LENGTH][row])
    items = example[schema.HISTORY_ITEM_ID.name][row, :length].tolist()
    categories = example[schema.HISTORY_CATEGORY.name][row, :length].tolist()
    return user, items, categories


@pytest.mark.slow
def test_served_scores_equal_in_process_predictions(served):
    model, config, handle, info = served
    examples = export.warmup_batch(DataDir.open(config.data.data_dir), info["max_seq_len"])
    size = len(examples[schema.ITEM_ID.name])
    with PredictionClient(handle.address) as client:
        for row in range(3):
            user, items, categories = _user(examples, row)
            picks = [(row + j) % size for j in range(4)]
            candidates = [{f.name: int(examples[f.name][p]) for f in schema.ITEM_SIDE_FEATURES}
                          for p in picks]
            scores = ranking.rank(client, user, items, categories, candidates)
            batch = {k: tf.constant(v) for k, v in examples.items()}
            singles = []
            for p in picks:
                one = {k: v[row:row + 1] for k, v in batch.items()}
                for f in schema.ITEM_SIDE_FEATURES:
                    one[f.name] = batch[f.name][p:p + 1]
                singles.append(float(model(one).numpy()[0]))
            np.testing.assert_allclose(scores, singles, atol=1e-5)


@pytest.mark.slow
def test_too_long_history_and_too_many_candidates_are_invalid_arguments(served):
    _, config, handle, info = served
    examples = export.warmup_batch(DataDir.open(config.data.data_dir), info["max_seq_len"])
    user, items, categories = _user(examples, 0)
    candidate = {f.name: int(examples[f.name][0]) for f in schema.ITEM_SIDE_FEATURES}
    too_long = [7] * (info["max_seq_len"] + 1)
    with PredictionClient(handle.address) as client:
        # The client refuses these itself; raw requests show what the server does.
        inputs = ranking.ranking_inputs(user, too_long, too_long, [candidate])
        with pytest.raises(grpc.RpcError) as err:
            client.predict_response(build_predict_request(ranking.MODEL_NAME, inputs))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "hist_" in err.value.details() and str(info["max_seq_len"]) in err.value.details()
        inputs = ranking.ranking_inputs(user, items, categories,
                                        [candidate] * (info["max_candidates"] + 1))
        with pytest.raises(grpc.RpcError) as err:
            client.predict_response(build_predict_request(ranking.MODEL_NAME, inputs))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "item" in err.value.details()
        # ... and the server keeps serving.
        ok = ranking.rank(client, user, items, categories, [candidate])
        assert ok.shape == (1,) and 0.0 < float(ok[0]) < 1.0


def test_ranking_inputs_validate():
    with pytest.raises(ValueError, match="history_categories has 1"):
        ranking.ranking_inputs({}, [1, 2], [3], [{"item_id": 1}])
    with pytest.raises(ValueError, match="candidates is empty"):
        ranking.ranking_inputs({}, [], [], [])
    with pytest.raises(ValueError, match="candidate 1 has no 'item_id'"):
        ranking.ranking_inputs({}, [], [], [{"item_id": 1}, {"item_category": 2}])
    inputs = ranking.ranking_inputs({"user_id": 9}, [5], [6], [{"item_id": 1}])
    assert inputs["user_attr_1"].tolist() == [0] and inputs["num_candidates"].tolist() == [1]
