"""The gRPC client: request building (cast, expand, pad), records, command line."""

from __future__ import annotations

import json
import os

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import predict_pb2

from muse_tf import schema
from muse_tf.data.records import encode_sequence_example
from muse_tf.export import requests
from muse_tf.export import signatures as export_signatures
from serving import client as client_lib
from serving import server as server_lib
from serving import signatures

from .conftest import MODEL
from .toy_models import (
    HIST,
    HIST_LEN,
    HIST_LENGTH,
    INT64_MAX,
    INT64_MIN,
    ITEM,
    NUM_CANDIDATES,
    copy_versions,
    reference_scores,
)


@pytest.fixture(scope="module")
def signature_def(client):
    return client.signature_defs(MODEL)["serving_default"]


def _one_user(history: list[int], candidates: list[int]) -> dict[str, np.ndarray]:
    """The padded batch-of-one the server should see for one user."""
    hist = np.zeros((1, HIST_LEN), np.int64)
    hist[0, :len(history)] = history
    items = np.zeros((1, NUM_CANDIDATES), np.int64)
    items[0, :len(candidates)] = candidates
    return {HIST: hist, HIST_LENGTH: np.array([len(history)], np.int64), ITEM: items}


def test_build_request_casts_expands_and_pads(signature_def):
    request = client_lib.build_predict_request(
        MODEL, {HIST: [INT64_MIN, 5, INT64_MAX], HIST_LENGTH: 3, ITEM: [[42.0, -9]]},
        signature_def=signature_def, version=3, output_filter=["scores"])
    assert request.model_spec.name == MODEL
    assert request.model_spec.version.value == 3
    assert request.model_spec.signature_name == "serving_default"
    assert list(request.output_filter) == ["scores"]
    arrays = {alias: tf.make_ndarray(proto) for alias, proto in request.inputs.items()}
    expected = _one_user([INT64_MIN, 5, INT64_MAX], [42, -9])
    assert sorted(arrays) == sorted(expected)
    for alias, value in expected.items():
        assert arrays[alias].dtype == np.int64
        np.testing.assert_array_equal(arrays[alias], value)


@pytest.mark.parametrize(("inputs", "fragments"), [
    ({HIST: [[1] * (HIST_LEN + 1)], HIST_LENGTH: [1], ITEM: [[1]]},
     [f"'{HIST}'", f"maximum {HIST_LEN}"]),
    ({HIST: [[1]], HIST_LENGTH: [1], ITEM: [[1] * (NUM_CANDIDATES + 2)]},
     [f"'{ITEM}'", f"maximum {NUM_CANDIDATES}"]),
    ({HIST: [[1]], HIST_LENGTH: [1], ITEM: [[1]], "user_age": [3]}, ["'user_age'"]),
    ({HIST: [[1]], ITEM: [[1]]}, [f"missing input '{HIST_LENGTH}'"]),
    ({HIST: [[1]], HIST_LENGTH: [1], ITEM: [[2**64]]}, [f"'{ITEM}'", str(2**64)]),
])
def test_build_request_refuses_bad_inputs_before_sending(signature_def, inputs, fragments):
    with pytest.raises(signatures.InputError) as raised:
        client_lib.build_predict_request(MODEL, inputs, signature_def=signature_def)
    for fragment in fragments:
        assert fragment in str(raised.value)


def test_build_request_without_a_signature_sends_arrays_as_given():
    request = client_lib.build_predict_request(MODEL, {"x": [[1, 2, 3]]}, version_label="stable")
    assert request.model_spec.version_label == "stable"
    np.testing.assert_array_equal(tf.make_ndarray(request.inputs["x"]), [[1, 2, 3]])
    with pytest.raises(ValueError, match="not both"):
        client_lib.build_predict_request(MODEL, {}, version=1, version_label="stable")


def test_predict_one_user_and_metadata_is_fetched_once(client, monkeypatch):
    calls = []
    fetch = client_lib.PredictionClient.metadata

    def counting(self, model, version=None):
        calls.append((model, version))
        return fetch(self, model, version)

    monkeypatch.setattr(client_lib.PredictionClient, "metadata", counting)
    client._signature_defs.clear()
    history, candidates = [5, -9, 7, INT64_MAX, 2], [42, 5, INT64_MIN]
    for _ in range(2):
        outputs = client.predict(MODEL, {HIST: history, HIST_LENGTH: len(history),
                                         ITEM: candidates})
    padded = _one_user(history, candidates)
    expected = reference_scores(padded[HIST], padded[HIST_LENGTH], padded[ITEM], 1.0)
    np.testing.assert_allclose(outputs["scores"], expected["scores"], rtol=1e-6)
    assert calls == [(MODEL, None)]
    (status,) = client.status(MODEL)
    assert status.version == 1


def test_client_padding_makes_requests_work_against_a_server_that_does_not_pad(
        toy_versions, tmp_path):
    base = copy_versions(toy_versions, str(tmp_path / MODEL), [1])
    with server_lib.serve(model_name=MODEL, model_base_path=base, port=0,
                          pad_inputs=False) as strict:
        with client_lib.PredictionClient(strict.address) as client:
            outputs = client.predict(MODEL, {HIST: [3, 4], HIST_LENGTH: 2, ITEM: [5]})
            padded = _one_user([3, 4], [5])
            np.testing.assert_allclose(
                outputs["scores"],
                reference_scores(padded[HIST], padded[HIST_LENGTH], padded[ITEM],
                                 1.0)["scores"])
        unpadded = client_lib.PredictionClient(strict.address, pad=False)
        with unpadded, pytest.raises(signatures.InputError, match="padding is off"):
            unpadded.predict(MODEL, {HIST: [3, 4], HIST_LENGTH: 2, ITEM: [5]})


def _sequence_example(history: list[int], item: int) -> bytes:
    context = {feature.name: 1000 + i for i, feature in enumerate(schema.CONTEXT_FEATURES)}
    context[schema.ITEM_ID.name] = item
    sequences = {schema.HISTORY_ITEM_ID.name: history,
                 schema.HISTORY_CATEGORY.name: [h // 2 for h in history]}
    return encode_sequence_example(context, sequences)


def test_features_from_a_beam_record(signature_def):
    record = _sequence_example([INT64_MIN, 5, 7], item=42)
    everything = client_lib.features_from_record(record)
    assert everything[schema.HISTORY_CATEGORY.name].tolist() == [INT64_MIN // 2, 2, 3]
    assert everything["label"].tolist() == [1000]
    features = client_lib.features_from_record(record, signature_def)
    assert sorted(features) == sorted([HIST, HIST_LENGTH, ITEM])
    assert features[HIST].tolist() == [INT64_MIN, 5, 7]
    assert features[HIST_LENGTH].tolist() == [3]
    assert features[ITEM].tolist() == [42]


def test_features_from_a_warmup_record():
    log_request = predict_pb2.PredictRequest()
    log_request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array([[1, 2]], np.int64)))
    from tensorflow_serving.apis import prediction_log_pb2

    log = prediction_log_pb2.PredictionLog()
    log.predict_log.request.CopyFrom(log_request)
    features = client_lib.features_from_record(log.SerializeToString())
    np.testing.assert_array_equal(features["x"], [[1, 2]])


def test_command_line_with_json_features(served, tmp_path, capsys):
    path = tmp_path / "request.json"
    path.write_text(json.dumps({HIST: [[5, -9, 7]], HIST_LENGTH: [3], ITEM: [[42, 5]]}))
    code = client_lib.main(["--server", served.address, "--model", MODEL,
                            "--features", str(path)])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    padded = _one_user([5, -9, 7], [42, 5])
    expected = reference_scores(padded[HIST], padded[HIST_LENGTH], padded[ITEM], 1.0)
    assert printed["model"] == MODEL and printed["version"] == 1
    np.testing.assert_allclose(printed["outputs"]["scores"], expected["scores"], rtol=1e-6)


def test_command_line_with_a_gzip_tfrecord(served, tmp_path, capsys):
    path = str(tmp_path / "records.tfrecord.gz")
    with tf.io.TFRecordWriter(path, "GZIP") as writer:
        writer.write(_sequence_example([1, 2, 3, 4, 5, 6, 7, 8, 9], item=5))  # too long
        writer.write(_sequence_example([INT64_MAX, 12], item=-9))
    code = client_lib.main(["--server", served.address, "--model", MODEL,
                            "--tfrecord", path, "--index", "1"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    padded = _one_user([INT64_MAX, 12], [-9])
    expected = reference_scores(padded[HIST], padded[HIST_LENGTH], padded[ITEM], 1.0)
    np.testing.assert_allclose(printed["outputs"]["scores"], expected["scores"], rtol=1e-6)

    code = client_lib.main(["--server", served.address, "--model", MODEL,
                            "--tfrecord", path, "--index", "0"])
    assert code == 2
    assert f"'{HIST}'" in capsys.readouterr().err
    code = client_lib.main(["--server", served.address, "--model", MODEL,
                            "--tfrecord", path, "--index", "5"])
    assert code == 2
    assert "fewer than 6 records" in capsys.readouterr().err


def test_command_line_reports_server_errors(served, tmp_path, capsys):
    path = tmp_path / "request.json"
    path.write_text(json.dumps({"x": [1]}))
    code = client_lib.main(["--server", served.address, "--model", "nope",
                            "--features", str(path)])
    assert code == 1
    assert grpc.StatusCode.NOT_FOUND.name in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Full requests for the muse_tf signatures (no server: their SignatureDefs built here).
# ---------------------------------------------------------------------------------------------

L, C = 4, 3


def _signature_def(specs: dict[str, tf.TensorSpec]) -> meta_graph_pb2.SignatureDef:
    signature = meta_graph_pb2.SignatureDef()
    for name, spec in specs.items():
        info = signature.inputs[name]
        info.name, info.dtype = f"serving_default_{name}:0", spec.dtype.as_datatype_enum
        for size in spec.shape.as_list():
            info.tensor_shape.dim.add(size=-1 if size is None else size)
    return signature


RANKING_DEF = _signature_def(export_signatures.ranking_input_signature(L, C))
RETRIEVAL_DEF = _signature_def(export_signatures.retrieval_input_signature(L))


def _test_shard(tiny_data) -> str:
    (path,) = tf.io.gfile.glob(os.path.join(tiny_data.path, "test", "part-*.tfrecord.gz"))
    return path


def _newest(values: list[int]) -> list[int]:
    tail = values[-L:]
    return tail + [0] * (L - len(tail))


def test_a_beam_record_becomes_a_full_ranking_request(tiny_data):
    path = _test_shard(tiny_data)
    records = tiny_data.records["test"]
    for index, count in [(3, None), (3, 3), (14, 2)]:
        inputs = client_lib.inputs_from_tfrecord(path, index, RANKING_DEF, count)
        assert sorted(inputs) == sorted(RANKING_DEF.inputs)
        context, sequences = records[index]
        for feature in schema.USER_SIDE_FEATURES:
            assert inputs[feature.name].tolist() == [context[feature.name]]
        assert inputs[HIST].tolist() == [_newest(sequences[HIST])]
        assert inputs[schema.HISTORY_CATEGORY.name].tolist() == [
            _newest(sequences[schema.HISTORY_CATEGORY.name])]
        assert inputs[HIST_LENGTH].tolist() == [min(len(sequences[HIST]), L)]
        assert inputs[HIST_LENGTH].dtype == np.int32
        n = count or 1  # default: the record's own target is the one candidate
        for feature in schema.ITEM_SIDE_FEATURES:
            targets = [records[index + j][0][feature.name] for j in range(n)]
            assert inputs[feature.name].tolist() == [targets + [0] * (C - n)]
        assert inputs[schema.NUM_CANDIDATES].tolist() == [n]
        assert inputs[schema.NUM_CANDIDATES].dtype == np.int32
    with pytest.raises(signatures.InputError, match=f"1 .. {C} candidates .*'item_id'"):
        client_lib.inputs_from_tfrecord(path, 3, RANKING_DEF, C + 1)
    with pytest.raises(IndexError, match="fewer than 17 records"):
        client_lib.inputs_from_tfrecord(path, 15, RANKING_DEF, 2)


def test_a_beam_record_becomes_a_retrieval_query(tiny_data):
    path = _test_shard(tiny_data)
    inputs = client_lib.inputs_from_tfrecord(path, 5, RETRIEVAL_DEF)
    context, sequences = tiny_data.records["test"][5]
    assert sorted(inputs) == sorted(schema.QUERY_FEATURES)
    assert inputs[schema.USER_ID.name].tolist() == [context[schema.USER_ID.name]]
    assert inputs[HIST].tolist() == [_newest(sequences[HIST])]
    with pytest.raises(ValueError, match="num_candidates needs a muse_tf ranking signature"):
        client_lib.inputs_from_tfrecord(path, 5, RETRIEVAL_DEF, 2)


def test_records_are_counted_across_the_files_a_glob_matches(tiny_data, signature_def):
    pattern = os.path.join(tiny_data.path, "train", "part-*.tfrecord.gz")
    records = tiny_data.records["train"]
    assert tiny_data.shards["train"] == 3
    for index in (0, 20, len(records) - 1):  # 20 is in the second shard
        inputs = client_lib.inputs_from_tfrecord(pattern, index, RANKING_DEF)
        assert inputs[ITEM].tolist() == [[records[index][0][ITEM], 0, 0]]
    raw = client_lib.read_records(pattern, 20, 2)
    assert [client_lib.features_from_record(r)[ITEM].tolist() for r in raw] == [
        [records[20][0][ITEM]], [records[21][0][ITEM]]]
    with pytest.raises(FileNotFoundError, match="no TFRecord file matches"):
        client_lib.read_records(os.path.join(tiny_data.path, "nope-*.gz"), 0)
    # Any other signature (the toy's) takes the record's features by name, as before.
    toy = client_lib.inputs_from_tfrecord(pattern, 20, signature_def)
    assert sorted(toy) == sorted([HIST, HIST_LENGTH, ITEM])
    with pytest.raises(ValueError, match="num_candidates needs a muse_tf ranking signature"):
        client_lib.inputs_from_tfrecord(pattern, 20, signature_def, 2)


def test_json_inputs_raw_requests_and_input_dicts(signature_def):
    raw = {"user": {"user_id": 7}, "history_items": [1, 2, 3, 4, 5],
           "history_categories": [6, 7, 8, 9, 10], "candidates": [{"item_id": 11}]}
    built = client_lib.inputs_from_json(raw, RANKING_DEF)
    expected = requests.ranking_request(raw["user"], raw["history_items"],
                                        raw["history_categories"], raw["candidates"],
                                        max_seq_len=L, max_candidates=C)
    assert built.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_array_equal(built[name], value)
    assert built[HIST].tolist() == [[2, 3, 4, 5]]
    query = {k: v for k, v in raw.items() if k != "candidates"}
    assert client_lib.inputs_from_json(query, RETRIEVAL_DEF)[HIST_LENGTH].tolist() == [L]
    aliases = {HIST: [[1]], HIST_LENGTH: [1], ITEM: [[2]]}
    assert client_lib.inputs_from_json(aliases, signature_def) is aliases
    with pytest.raises(signatures.InputError, match="needs a muse_tf ranking or retrieval"):
        client_lib.inputs_from_json(raw, signature_def)
    with pytest.raises(ValueError, match="got list"):
        client_lib.inputs_from_json([1, 2], RANKING_DEF)
    with pytest.raises(ValueError, match="'item_id' holds 4 candidates"):
        client_lib.inputs_from_json({**raw, "candidates": [{"item_id": 1}] * 4}, RANKING_DEF)


def _ranking_inputs(rows: int = 1) -> dict[str, np.ndarray]:
    raw = {"user": {"user_id": 7}, "history_items": [1, 2], "history_categories": [6, 7],
           "candidates": [{"item_id": 11}, {"item_id": 12}]}
    built = client_lib.inputs_from_json(raw, RANKING_DEF)
    return {name: np.repeat(value, rows, axis=0) for name, value in built.items()}


@pytest.mark.parametrize(("name", "value", "fragments"), [
    (HIST_LENGTH, -5, ["'hist_len'", "-5", f"[0, {L}]"]),
    (HIST_LENGTH, 5000, ["'hist_len'", "5000", f"[0, {L}]"]),
    (schema.NUM_CANDIDATES, -3, ["'num_candidates'", "-3", f"[0, {C}]"]),
    (schema.NUM_CANDIDATES, 500, ["'num_candidates'", "500", f"[0, {C}]"]),
])
def test_the_client_refuses_lengths_the_tensors_contradict(name, value, fragments):
    inputs = _ranking_inputs()
    inputs[name] = np.array([value], np.int32)
    with pytest.raises(signatures.InputError) as raised:
        client_lib.build_predict_request("muse_ranking", inputs, signature_def=RANKING_DEF)
    for fragment in fragments:
        assert fragment in str(raised.value), str(raised.value)


def test_the_client_refuses_mixed_and_too_large_batches():
    inputs = _ranking_inputs()
    inputs[schema.USER_ID.name] = np.array([7, 8], np.int64)
    with pytest.raises(signatures.InputError, match="'user_id' has batch size 2"):
        client_lib.build_predict_request("muse_ranking", inputs, signature_def=RANKING_DEF)
    with pytest.raises(signatures.InputError, match=r"batch size 129 .*maximum 128"):
        client_lib.build_predict_request("muse_ranking", _ranking_inputs(129),
                                         signature_def=RANKING_DEF)
    with pytest.raises(signatures.InputError, match=r"batch size 5 .*maximum 4"):
        client_lib.build_predict_request("muse_ranking", _ranking_inputs(5),
                                         signature_def=RANKING_DEF, max_batch_size=4)
    request = client_lib.build_predict_request("muse_ranking", _ranking_inputs(129),
                                               signature_def=RANKING_DEF, max_batch_size=None)
    assert tf.make_ndarray(request.inputs[HIST_LENGTH]).shape == (129,)
    with client_lib.PredictionClient("127.0.0.1:1") as client:
        assert client.max_batch_size == requests.DEFAULT_MAX_BATCH_SIZE == 128
