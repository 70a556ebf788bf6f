"""Export a trained ranker -> local gRPC server -> client: the same scores as in process."""

import os

import grpc
import numpy as np
import pytest
import tensorflow as tf

from muse_tf import config as config_lib
from muse_tf import schema
from muse_tf.data.data_dir import DataDir
from muse_tf.export import ranking as export
from muse_tf.export import requests
from muse_tf.export.names import RANKING_MODEL_NAME
from muse_tf.training.ranking import run_ranking as run_experiment
from serving import ranking
from serving.client import PredictionClient, build_predict_request, response_outputs
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
    handle = serve(model_name=RANKING_MODEL_NAME, model_base_path=os.path.dirname(path),
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
def test_a_request_of_several_users_scores_each_user_as_alone(served):
    """The signature takes B users per call (what TF Serving's batching feeds it): row u
    of a batched request scores what user u's own request scores."""
    _, config, handle, info = served
    examples = export.warmup_batch(DataDir.open(config.data.data_dir), info["max_seq_len"])
    singles = requests.ranking_requests_from_examples(
        examples, max_seq_len=info["max_seq_len"], max_candidates=info["max_candidates"],
        num_requests=5, candidates_per_request=info["max_candidates"] - 1)
    singles[1] = requests.ranking_request(  # an empty history and one candidate between
        {"user_id": 3}, [], [], [{schema.ITEM_ID.name: 5}],
        max_seq_len=info["max_seq_len"], max_candidates=info["max_candidates"])
    with PredictionClient(handle.address) as client:
        alone = [client.predict(RANKING_MODEL_NAME, one)["scores"][0] for one in singles]
        together = client.predict(RANKING_MODEL_NAME, requests.batch_requests(singles))
    assert together["scores"].shape == (len(singles), info["max_candidates"])
    np.testing.assert_allclose(together["scores"], np.stack(alone), atol=1e-5)


def _one_candidate_request(served) -> tuple[dict[str, np.ndarray], tuple]:
    """A valid ranking request (the first warm-up user with one candidate) and what it was
    built from: ``(user, items, categories, candidate)``."""
    _, config, _, info = served
    examples = export.warmup_batch(DataDir.open(config.data.data_dir), info["max_seq_len"])
    user, items, categories = _user(examples, 0)
    candidate = {f.name: int(examples[f.name][0]) for f in schema.ITEM_SIDE_FEATURES}
    request = requests.ranking_request(user, items, categories, [candidate],
                                       max_seq_len=info["max_seq_len"],
                                       max_candidates=info["max_candidates"])
    return request, (user, items, categories, candidate)


@pytest.mark.slow
def test_too_long_history_and_too_many_candidates_are_invalid_arguments(served):
    _, _, handle, info = served
    good, (user, items, categories, candidate) = _one_candidate_request(served)
    with PredictionClient(handle.address) as client:
        # The builder and the client refuse these themselves; raw requests show what the
        # server does.
        too_long = {**good, **{f.name: np.full([1, info["max_seq_len"] + 1], 7, np.int64)
                               for f in schema.SEQUENCE_FEATURES}}
        with pytest.raises(grpc.RpcError) as err:
            client.predict_response(build_predict_request(RANKING_MODEL_NAME, too_long))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "hist_" in err.value.details() and str(info["max_seq_len"]) in err.value.details()
        too_many = {**good, **{f.name: np.ones([1, info["max_candidates"] + 1], np.int64)
                               for f in schema.ITEM_SIDE_FEATURES}}
        with pytest.raises(grpc.RpcError) as err:
            client.predict_response(build_predict_request(RANKING_MODEL_NAME, too_many))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "item" in err.value.details()
        wrong_dtype = {**good, schema.HISTORY_LENGTH: good[schema.HISTORY_LENGTH].astype(
            np.int64)}
        with pytest.raises(grpc.RpcError) as err:
            client.predict_response(build_predict_request(RANKING_MODEL_NAME, wrong_dtype))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"'{schema.HISTORY_LENGTH}' has dtype int64" in err.value.details()
        # rank() refuses too many candidates before sending, naming the field ...
        with pytest.raises(ValueError, match=f"'item_id' holds {info['max_candidates'] + 1} "
                                             "candidates"):
            ranking.rank(client, user, items, categories,
                         [candidate] * (info["max_candidates"] + 1))
        # ... cuts a too-long history to its newest behaviours, and the server keeps serving.
        ok = ranking.rank(client, user, items, categories, [candidate])
        assert ok.shape == (1,) and 0.0 < float(ok[0]) < 1.0
        longer = [7] * info["max_seq_len"] + list(items)
        newest = ranking.rank(client, user, longer, [3] * info["max_seq_len"] + list(categories),
                              [candidate])
        tail = [7] * (info["max_seq_len"] - len(items)) + list(items)
        expected = ranking.rank(client, user, tail,
                                [3] * (info["max_seq_len"] - len(items)) + list(categories),
                                [candidate])
        np.testing.assert_allclose(newest, expected, rtol=1e-6)


@pytest.mark.slow
def test_served_signature_is_what_the_builder_targets(served):
    _, _, handle, info = served
    with PredictionClient(handle.address) as client:
        layout = client.request_layout(RANKING_MODEL_NAME)
    assert layout == requests.RequestLayout(requests.RANKING, info["max_seq_len"],
                                            info["max_candidates"])
    assert info["inputs"][schema.HISTORY_LENGTH]["dtype"] == schema.LENGTH_DTYPE
    assert info["inputs"][schema.NUM_CANDIDATES]["dtype"] == schema.LENGTH_DTYPE


@pytest.mark.slow
def test_lengths_and_batch_sizes_the_tensors_contradict_are_invalid_arguments(served):
    # Sent without the signature (as any TF Serving client may), so the client's own checks
    # do not run: the export's signature rejects them, in the server's v1 session as in TF
    # Serving.
    _, _, handle, info = served
    good, _ = _one_candidate_request(served)
    length, count = schema.HISTORY_LENGTH, schema.NUM_CANDIDATES
    cases = {
        "negative hist_len": ({length: np.array([-5], np.int32)}, [f"input {length}", "-5"]),
        "hist_len above L": ({length: np.array([5000], np.int32)},
                             [f"input {length}", "5000", f"[0, {info['max_seq_len']}]"]),
        "negative num_candidates": ({count: np.array([-3], np.int32)},
                                    [f"input {count}", "-3"]),
        "num_candidates above C": ({count: np.array([500], np.int32)},
                                   [f"input {count}", "500", f"[0, {info['max_candidates']}]"]),
        "two users, one history": ({schema.USER_ID.name: np.repeat(good["user_id"], 2)},
                                   ["same batch size", "user_id:] [2]", "hist_len:] [1]"]),
    }
    with PredictionClient(handle.address) as client:
        for case, (changes, fragments) in cases.items():
            with pytest.raises(grpc.RpcError) as err:
                client.predict_response(build_predict_request(RANKING_MODEL_NAME,
                                                              {**good, **changes}))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, case
            for fragment in fragments:
                assert fragment in err.value.details(), (case, err.value.details())
        scores = response_outputs(client.predict_response(
            build_predict_request(RANKING_MODEL_NAME, good)))["scores"]
        assert 0 < scores[0, 0] < 1 and np.all(scores[0, 1:] == 0)
