"""The one request builder (muse_tf.export.requests), the signature specs and names it
follows, and the warm-up writer: exact values on tiny inputs."""

import os

import numpy as np
import pytest
import tensorflow as tf

import muse_tf  # noqa: F401
from muse_tf import config as config_lib
from muse_tf import schema
from muse_tf.data import reader
from muse_tf.export import names, requests, retrieval, signatures, warmup

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
HIST = schema.HISTORY_ITEM_ID.name
CATS = schema.HISTORY_CATEGORY.name
LEN = schema.HISTORY_LENGTH
ITEM = schema.ITEM_ID.name
COUNT = schema.NUM_CANDIDATES
USER_NAMES = [f.name for f in schema.USER_SIDE_FEATURES]
ITEM_NAMES = [f.name for f in schema.ITEM_SIDE_FEATURES]


def _request(**changes):
    arguments = {"user": {"user_id": 9, "user_attr_2": INT64_MIN},
                 "history_items": [11, 12, 13], "history_categories": [21, 22, 23],
                 "candidates": [{ITEM: 5, "item_category": 6},
                                {ITEM: INT64_MAX, "item_attr_2": 8}],
                 "max_seq_len": 5, "max_candidates": 4}
    arguments.update(changes)
    return requests.ranking_request(**arguments)


# ---------------------------------------------------------------------------------------------
# Signatures and names.
# ---------------------------------------------------------------------------------------------


def test_signature_specs_follow_the_schema():
    ranking = signatures.ranking_input_signature(7, 3)
    assert tuple(ranking) == signatures.RANKING_INPUTS
    assert tuple(signatures.retrieval_input_signature(7)) == schema.QUERY_FEATURES
    assert signatures.RANKING_INPUTS == (*schema.QUERY_FEATURES, *ITEM_NAMES, COUNT)
    shapes = {name: (spec.dtype.name, spec.shape.as_list()) for name, spec in ranking.items()}
    assert shapes[schema.USER_ID.name] == ("int64", [None])
    assert shapes[HIST] == shapes[CATS] == ("int64", [None, 7])
    assert shapes[LEN] == shapes[COUNT] == (schema.LENGTH_DTYPE, [None])
    assert shapes[ITEM] == shapes["item_attr_2"] == ("int64", [None, 3])
    assert retrieval.serving_signature(7).keys() == signatures.retrieval_input_signature(7).keys()
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_seq_len must be a positive int"):
            signatures.retrieval_input_signature(bad)
    with pytest.raises(ValueError, match="max_candidates must be a positive int"):
        signatures.ranking_input_signature(7, 0)


def test_export_paths_and_served_names():
    assert names.ranking_base_path("runs/muse") == os.path.join("runs", "muse", "export",
                                                                "ranker")
    assert names.retrieval_base_path("runs/x", names.MISS_MODEL_NAME) == os.path.join(
        "runs", "x", "export", "miss_retrieval")
    assert names.RETRIEVAL_MODEL_NAMES == ("miss_retrieval", "two_tower_brute_force",
                                           "two_tower_scann")
    assert (retrieval.EXPORT_DIR, retrieval.MISS_MODEL_NAME, retrieval.BRUTE_FORCE_MODEL_NAME,
            retrieval.SCANN_MODEL_NAME) == ("export", *names.RETRIEVAL_MODEL_NAMES)
    with pytest.raises(ValueError, match="unknown retrieval model 'muse_ranking'"):
        names.retrieval_base_path("runs/x", names.RANKING_MODEL_NAME)


# ---------------------------------------------------------------------------------------------
# From raw Python values.
# ---------------------------------------------------------------------------------------------


def test_ranking_request_pads_and_fills_exact_values():
    request = _request()
    assert list(request) == list(signatures.RANKING_INPUTS)
    expected = {
        "user_id": [9], "user_attr_1": [0], "user_attr_2": [INT64_MIN], "user_attr_3": [0],
        "user_attr_4": [0], "user_attr_5": [0],
        HIST: [[11, 12, 13, 0, 0]], CATS: [[21, 22, 23, 0, 0]], LEN: [3],
        ITEM: [[5, INT64_MAX, 0, 0]], "item_category": [[6, 0, 0, 0]],
        "item_attr_1": [[0, 0, 0, 0]], "item_attr_2": [[0, 8, 0, 0]], COUNT: [2],
    }
    specs = signatures.ranking_input_signature(5, 4)
    for name, value in expected.items():
        assert request[name].dtype == specs[name].dtype.as_numpy_dtype, name
        assert request[name].tolist() == value, name
    assert request[LEN].dtype == np.int32 and request[COUNT].dtype == np.int32
    assert request[HIST].dtype == np.int64


def test_a_long_history_keeps_its_newest_behaviours():
    request = _request(history_items=list(range(1, 9)), history_categories=list(range(11, 19)))
    assert request[HIST].tolist() == [[4, 5, 6, 7, 8]]
    assert request[CATS].tolist() == [[14, 15, 16, 17, 18]]
    assert request[LEN].tolist() == [5]
    exact = _request(history_items=[1, 2, 3, 4, 5], history_categories=[6, 7, 8, 9, 10])
    assert exact[HIST].tolist() == [[1, 2, 3, 4, 5]] and exact[LEN].tolist() == [5]


def test_an_empty_history_and_a_full_candidate_list():
    request = _request(history_items=[], history_categories=[],
                       candidates=[{ITEM: i} for i in (1, 2, 3, 4)])
    assert request[HIST].tolist() == [[0] * 5] and request[LEN].tolist() == [0]
    assert request[ITEM].tolist() == [[1, 2, 3, 4]] and request[COUNT].tolist() == [4]


def test_json_numbers_are_accepted_when_integral():
    request = _request(user={"user_id": 9.0}, history_items=np.array([11, 12], np.int32),
                       history_categories=(21.0, 22.0))
    assert request["user_id"].tolist() == [9] and request[HIST].tolist() == [[11, 12, 0, 0, 0]]
    assert request[HIST].dtype == np.int64


def test_retrieval_query_is_the_query_block():
    query = requests.retrieval_query({"user_id": 3}, [1, 2, 3, 4], [5, 6, 7, 8], max_seq_len=2)
    assert list(query) == list(schema.QUERY_FEATURES)
    assert query[HIST].tolist() == [[3, 4]] and query[CATS].tolist() == [[7, 8]]
    assert query[LEN].tolist() == [2] and query[LEN].dtype == np.int32
    assert query["user_attr_5"].tolist() == [0]


@pytest.mark.parametrize(("changes", "fragments"), [
    ({"candidates": [{ITEM: 1}] * 5}, ["'item_id'", "5 candidates", "4 (max_candidates)"]),
    ({"history_items": [[1, 2]], "history_categories": [[3, 4]]},
     ["history_items", f"'{HIST}'", "1-D"]),
    ({"history_items": [1, 2], "history_categories": [[3], [4]]},
     ["history_categories", f"'{CATS}'", "1-D"]),
    ({"history_items": [1, 2], "history_categories": [3]},
     ["history_items has 2 entries but history_categories has 1"]),
    ({"candidates": []}, ["candidates is empty"]),
    ({"candidates": [{ITEM: 1}, {"item_category": 2}]}, ["candidate 1 has no 'item_id'"]),
    ({"candidates": [{ITEM: 1, "colour": 2}]}, ["candidate 0 has 'colour'"]),
    ({"candidates": {ITEM: 1}}, ["'candidates' must be a list"]),
    ({"user": {"age": 30}}, ["user feature 'age'"]),
    ({"user": [1]}, ["'user' must be a mapping"]),
    ({"candidates": [{ITEM: 2**63}]}, ["'item_id'", str(2**63)]),
    ({"history_items": [INT64_MIN - 1], "history_categories": [1]}, [f"'{HIST}'"]),
    ({"history_items": [1.5], "history_categories": [1]}, [f"'{HIST}'", "non-integral"]),
    ({"user": {"user_id": "9"}}, ["'user_id'", "dtype"]),
    ({"candidates": [{ITEM: True}]}, ["'item_id'", "dtype bool"]),
    ({"max_seq_len": 0}, ["max_seq_len must be a positive int"]),
    ({"max_candidates": 0}, ["max_candidates must be a positive int"]),
])
def test_bad_requests_are_errors_naming_the_field(changes, fragments):
    with pytest.raises(ValueError) as raised:
        _request(**changes)
    for fragment in fragments:
        assert fragment in str(raised.value)


# ---------------------------------------------------------------------------------------------
# From example batches.
# ---------------------------------------------------------------------------------------------


def _batch():
    """3 reader-style examples: histories of 5, 2 and 0 (width 5, right-padded)."""
    batch = {name: np.array([100 + r for r in range(3)], np.int64) for name in USER_NAMES}
    batch[HIST] = np.array([[1, 2, 3, 4, 5], [6, 7, 0, 0, 0], [0, 0, 0, 0, 0]], np.int64)
    batch[CATS] = batch[HIST] + 10 * (batch[HIST] > 0)
    batch[LEN] = np.array([5, 2, 0], np.int32)
    for k, name in enumerate(ITEM_NAMES):
        batch[name] = np.array([1000 * (k + 1) + r for r in range(3)], np.int64)
    batch["label"] = np.zeros(3, np.float32)  # the reader's extra field is ignored
    return batch


def test_ranking_requests_from_examples_exact_values():
    out = requests.ranking_requests_from_examples(_batch(), max_seq_len=3, max_candidates=4,
                                                  num_requests=5, candidates_per_request=2)
    assert len(out) == 3  # at most one request per example
    assert [r[HIST].tolist() for r in out] == [[[3, 4, 5]], [[6, 7, 0]], [[0, 0, 0]]]
    assert [r[CATS].tolist() for r in out] == [[[13, 14, 15]], [[16, 17, 0]], [[0, 0, 0]]]
    assert [r[LEN].tolist() for r in out] == [[3], [2], [0]]
    assert [r["user_attr_3"].tolist() for r in out] == [[100], [101], [102]]
    # Candidates: the targets of 2 consecutive examples from the user's row on, wrapping.
    assert [r[ITEM].tolist() for r in out] == [[[1000, 1001, 0, 0]], [[1001, 1002, 0, 0]],
                                                [[1002, 1000, 0, 0]]]
    assert out[2]["item_attr_2"].tolist() == [[4002, 4000, 0, 0]]
    assert all(r[COUNT].tolist() == [2] and r[COUNT].dtype == np.int32 for r in out)
    # More candidates per request than the signature takes: clipped to max_candidates.
    (clipped,) = requests.ranking_requests_from_examples(
        _batch(), max_seq_len=3, max_candidates=4, num_requests=1, candidates_per_request=9)
    assert clipped[ITEM].tolist() == [[1000, 1001, 1002, 1000]]
    assert clipped[COUNT].tolist() == [4]


def test_retrieval_queries_from_examples_and_the_random_query():
    batch = _batch()
    batch[LEN] = np.array([9, 2, 0], np.int32)  # more than the row holds: clipped to 5
    queries = requests.retrieval_queries_from_examples(batch, max_seq_len=7, num_requests=2)
    assert len(queries) == 2 and list(queries[0]) == list(schema.QUERY_FEATURES)
    assert queries[0][HIST].tolist() == [[1, 2, 3, 4, 5, 0, 0]]
    assert queries[0][LEN].tolist() == [5] and queries[1][LEN].tolist() == [2]
    random = requests.random_retrieval_query(6, batch_size=3, seed=1)
    assert random[LEN].dtype == np.int32 and random[HIST].shape == (3, 6)
    for row, length in enumerate(random[LEN]):
        assert np.all(random[HIST][row, length:] == 0) and np.all(random[HIST][row, :length])
    assert retrieval.example_request is requests.random_retrieval_query
    assert len(retrieval.warmup_requests(None, 6)) == 1
    assert len(retrieval.warmup_requests(random, 6, num_requests=8)) == 3


@pytest.mark.parametrize(("change", "fragment"), [
    ({HIST: np.zeros((3, 2, 2), np.int64)}, f"'{HIST}' must be [batch=3, steps]"),
    ({HIST: np.zeros((2, 5), np.int64)}, f"'{HIST}' must be [batch=3, steps]"),
    ({CATS: np.zeros((3, 4), np.int64)}, "different widths"),
    ({LEN: np.array([1, -1, 0], np.int32)}, f"'{LEN}' holds -1"),
    ({"user_attr_1": np.zeros(2, np.int64)}, "'user_attr_1' has 2 rows"),
    ({ITEM: np.zeros((3, 1), np.int64)}, f"'{ITEM}' must be [batch, candidates]"),
])
def test_bad_example_batches_are_named(change, fragment):
    batch = {**_batch(), **change}
    with pytest.raises(ValueError) as raised:
        requests.ranking_requests_from_examples(batch, max_seq_len=3, max_candidates=4,
                                                num_requests=3, candidates_per_request=2)
    assert fragment in str(raised.value)
    del batch[HIST]
    with pytest.raises(ValueError, match=f"no '{HIST}'"):
        requests.retrieval_queries_from_examples(batch, max_seq_len=3, num_requests=1)


def test_examples_from_records_is_the_reader(tiny_data):
    files = sorted(tf.io.gfile.glob(os.path.join(tiny_data.path, "test", "*.tfrecord.gz")))
    records = [r.numpy() for r in tf.data.TFRecordDataset(files, "GZIP").take(16)]
    parsed = requests.examples_from_records(records, 4)
    expected = next(iter(reader.make_dataset(tiny_data.path, "test", 16, max_seq_len=4,
                                             shuffle=False, deterministic=True)))
    assert sorted(parsed) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(parsed[name], value.numpy(), err_msg=name)
    # Newest behaviours of the 12-long history (oldest INT64_MIN, newest INT64_MAX).
    row = next(i for i, (_, seq) in enumerate(tiny_data.records["test"])
               if len(seq[HIST]) == 12)
    assert parsed[HIST][row].tolist() == tiny_data.records["test"][row][1][HIST][-4:]
    assert parsed[HIST][row, -1] == INT64_MAX
    with pytest.raises(ValueError, match="not a muse_tf SequenceExample"):
        requests.examples_from_records([b"not a record"], 4)


# ---------------------------------------------------------------------------------------------
# Which signature; raw requests.
# ---------------------------------------------------------------------------------------------


def test_request_layout_from_shapes_and_raw_requests():
    shapes = {name: spec.shape.as_list()
              for name, spec in signatures.ranking_input_signature(5, 4).items()}
    layout = requests.RequestLayout.from_shapes(shapes)
    assert layout == requests.RequestLayout(requests.RANKING, 5, 4)
    raw = {"user": {"user_id": 9, "user_attr_2": INT64_MIN}, "history_items": [11, 12, 13],
           "history_categories": [21, 22, 23],
           "candidates": [{ITEM: 5, "item_category": 6}, {ITEM: INT64_MAX, "item_attr_2": 8}]}
    built, direct = layout.from_raw(raw), _request()
    assert built.keys() == direct.keys()
    for name, value in direct.items():
        np.testing.assert_array_equal(built[name], value)
    query_shapes = {name: shape for name, shape in shapes.items() if name in
                    schema.QUERY_FEATURES}
    query_layout = requests.RequestLayout.from_shapes(query_shapes)
    assert query_layout == requests.RequestLayout(requests.RETRIEVAL, 5)
    query = {k: v for k, v in raw.items() if k != "candidates"}
    assert query_layout.from_raw(query)[HIST].tolist() == [[11, 12, 13, 0, 0]]
    assert requests.is_raw_request(raw) and not requests.is_raw_request({HIST: [1]})
    with pytest.raises(ValueError, match="retrieval query takes no 'candidates'"):
        query_layout.from_raw(raw)
    with pytest.raises(ValueError, match="ranking request needs 'candidates'"):
        layout.from_raw(query)
    with pytest.raises(ValueError, match="raw request key 'items' is unknown"):
        layout.from_raw({**raw, "items": []})
    with pytest.raises(ValueError, match="raw request has no 'history_categories'"):
        layout.from_raw({"user": {}, "history_items": []})
    assert requests.request_kind(["x", HIST]) is None
    with pytest.raises(ValueError, match="neither the ranking signature"):
        requests.RequestLayout.from_shapes({HIST: [-1, 3]})
    with pytest.raises(ValueError, match="static size"):
        requests.RequestLayout.from_shapes({**shapes, HIST: [-1, -1]})


# ---------------------------------------------------------------------------------------------
# The client-side twin of the signature's checks: lengths, one batch size, the maximum batch.
# ---------------------------------------------------------------------------------------------


def _rows(rows: int = 1) -> dict[str, np.ndarray]:
    """A valid ranking request (L = 5, C = 4) of ``rows`` users."""
    return {name: np.repeat(value, rows, axis=0) for name, value in _request().items()}


def test_valid_inputs_pass_the_checks():
    requests.check_inputs(_rows(3), max_seq_len=5, max_candidates=4)
    requests.check_inputs(_rows(requests.DEFAULT_MAX_BATCH_SIZE), max_seq_len=5,
                          max_candidates=4)
    query = {k: v for k, v in _rows(2).items() if k in schema.QUERY_FEATURES}
    requests.check_inputs(query, max_seq_len=5)
    requests.check_inputs(_rows(1000), max_seq_len=5, max_candidates=4, max_batch_size=None)
    assert requests.DEFAULT_MAX_BATCH_SIZE == signatures.DEFAULT_MAX_BATCH_SIZE == 128
    assert config_lib.ExperimentConfig().train.export_max_batch_size == 128


@pytest.mark.parametrize(("name", "value", "fragments"), [
    (LEN, -5, ["'hist_len'", "-5", "[0, 5]", "row 1"]),
    (LEN, 5000, ["'hist_len'", "5000", "[0, 5]", "row 1"]),
    (COUNT, -3, ["'num_candidates'", "-3", "[0, 4]", "row 1"]),
    (COUNT, 500, ["'num_candidates'", "500", "[0, 4]", "row 1"]),
])
def test_lengths_the_tensors_contradict_are_named(name, value, fragments):
    inputs = _rows(2)
    inputs[name] = np.array([1, value], np.int32)
    with pytest.raises(ValueError) as raised:
        requests.check_inputs(inputs, max_seq_len=5, max_candidates=4)
    for fragment in fragments:
        assert fragment in str(raised.value), str(raised.value)


def test_different_batch_sizes_and_too_large_batches_are_named():
    inputs = _rows(1)
    inputs[schema.USER_ID.name] = np.array([9, 9], np.int64)
    with pytest.raises(ValueError, match=r"'user_id' has batch size 2 .*has 1"):
        requests.check_inputs(inputs, max_seq_len=5, max_candidates=4)
    with pytest.raises(ValueError, match=r"batch size 129 .*maximum 128"):
        requests.check_inputs(_rows(129), max_seq_len=5, max_candidates=4)
    with pytest.raises(ValueError, match=r"batch size 3 .*maximum 2"):
        requests.check_inputs(_rows(3), max_seq_len=5, max_candidates=4, max_batch_size=2)
    with pytest.raises(ValueError, match="max_batch_size must be a positive int, got 0"):
        requests.check_inputs(_rows(1), max_seq_len=5, max_candidates=4, max_batch_size=0)


def test_batch_requests_stacks_users_in_order():
    first = _request()
    second = _request(user={"user_id": 10}, history_items=[1], history_categories=[2],
                      candidates=[{ITEM: 7}])
    batch = requests.batch_requests([first, second, first])
    assert list(batch) == list(first)
    for name, value in batch.items():
        assert value.dtype == first[name].dtype, name
        np.testing.assert_array_equal(value, np.concatenate([first[name], second[name],
                                                             first[name]]), err_msg=name)
    assert batch[LEN].tolist() == [3, 1, 3] and batch[COUNT].tolist() == [2, 1, 2]
    requests.check_inputs(batch, max_seq_len=5, max_candidates=4)
    # A batch of batches is a batch too.
    assert requests.batch_requests([batch, second])[ITEM].shape == (4, 4)


@pytest.mark.parametrize(("batch", "fragment"), [
    ([], "at least one request"),
    ([_request(), {k: v for k, v in _request().items() if k != ITEM}],
     "request 1 has inputs"),
    ([_request(), _request(max_seq_len=6)], r"'hist_item_id' is int64 \[1, 6\] in request 1"),
    ([_request(), _request(max_candidates=3)], r"'item_id' is int64 \[1, 3\] in request 1"),
    ([{k: np.asarray(v[0]) for k, v in _request().items()}], "is a scalar"),
])
def test_batch_requests_refuses_requests_of_different_signatures(batch, fragment):
    with pytest.raises(ValueError, match=fragment):
        requests.batch_requests(batch)


# ---------------------------------------------------------------------------------------------
# The warm-up writer.
# ---------------------------------------------------------------------------------------------


def test_warmup_file_holds_the_requests_and_refuses_more_than_tf_serving_reads(tmp_path):
    from tensorflow_serving.apis import prediction_log_pb2

    batch = requests.ranking_requests_from_examples(_batch(), max_seq_len=3, max_candidates=4,
                                                    num_requests=3, candidates_per_request=2)
    path = warmup.write_warmup(str(tmp_path), batch, model_name=names.RANKING_MODEL_NAME)
    assert path == warmup.warmup_path(str(tmp_path))
    assert path == str(tmp_path / "assets.extra" / "tf_serving_warmup_requests")
    logs = [prediction_log_pb2.PredictionLog.FromString(r.numpy())
            for r in tf.data.TFRecordDataset(path)]
    assert len(logs) == 3
    for log, inputs in zip(logs, batch, strict=True):
        request = log.predict_log.request
        assert request.model_spec.name == "muse_ranking"
        assert request.model_spec.signature_name == "serving_default"
        for name, value in inputs.items():
            sent = tf.make_ndarray(request.inputs[name])
            assert sent.dtype == value.dtype
            np.testing.assert_array_equal(sent, value)
    with pytest.raises(ValueError, match="at most 1000"):
        warmup.write_warmup(str(tmp_path), batch * 334, model_name="m")
    with pytest.raises(ValueError, match="no warm-up request"):
        warmup.write_warmup(str(tmp_path), [], model_name="m")
