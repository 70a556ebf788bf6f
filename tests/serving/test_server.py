"""The local TF Serving-compatible server: Predict, metadata, status, errors, versions."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import grpc
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)
from tensorflow_serving.config import model_server_config_pb2

from serving import client as client_lib
from serving import server as server_lib
from serving import signatures

from .conftest import MODEL, SCALES
from .toy_models import (
    HIST,
    HIST_LEN,
    HIST_LENGTH,
    ITEM,
    NUM_CANDIDATES,
    copy_versions,
    random_batch,
    reference_scores,
    save_scann_searcher,
)

AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE
END = get_model_status_pb2.ModelVersionStatus.END


def _stub(address: str) -> prediction_service_pb2_grpc.PredictionServiceStub:
    channel = grpc.insecure_channel(address, options=client_lib.channel_options())
    return prediction_service_pb2_grpc.PredictionServiceStub(channel)


def _request(inputs: dict[str, np.ndarray], model: str = MODEL,
             signature: str = "serving_default") -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    for alias, value in inputs.items():
        request.inputs[alias].CopyFrom(tf.make_tensor_proto(value))
    return request


def _outputs(response: predict_pb2.PredictResponse) -> dict[str, np.ndarray]:
    return client_lib.response_outputs(response)


def _padded(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    hist = np.zeros((len(batch[HIST_LENGTH]), HIST_LEN), np.int64)
    hist[:, :batch[HIST].shape[1]] = batch[HIST]
    items = np.zeros((len(batch[HIST_LENGTH]), NUM_CANDIDATES), np.int64)
    items[:, :batch[ITEM].shape[1]] = batch[ITEM]
    return {HIST: hist, HIST_LENGTH: batch[HIST_LENGTH], ITEM: items}


# ---------------------------------------------------------------------------------------------
# Predict, metadata, status.
# ---------------------------------------------------------------------------------------------


def test_predict_equals_in_process(served, toy_versions):
    batch = random_batch(np.random.default_rng(0), 5)
    response = _stub(served.address).Predict(_request(batch), timeout=20)
    outputs = _outputs(response)

    in_process = tf.saved_model.load(toy_versions[1]).signatures["serving_default"](
        **{k: tf.constant(v) for k, v in batch.items()})
    expected = reference_scores(batch[HIST], batch[HIST_LENGTH], batch[ITEM], SCALES[1])
    assert sorted(outputs) == ["scores", "user_score"]
    for name in outputs:
        np.testing.assert_allclose(outputs[name], in_process[name].numpy(), rtol=1e-6)
        np.testing.assert_allclose(outputs[name], expected[name], rtol=1e-6)
    assert outputs["scores"].dtype == np.float32
    assert response.model_spec.name == MODEL
    assert response.model_spec.version.value == 1
    assert response.model_spec.signature_name == "serving_default"


def test_empty_signature_name_means_serving_default_and_output_filter(served):
    batch = random_batch(np.random.default_rng(1), 2)
    request = _request(batch, signature="")
    request.output_filter.append("user_score")
    response = _stub(served.address).Predict(request, timeout=20)
    assert list(response.outputs) == ["user_score"]
    assert response.model_spec.signature_name == "serving_default"
    np.testing.assert_allclose(
        _outputs(response)["user_score"],
        reference_scores(batch[HIST], batch[HIST_LENGTH], batch[ITEM], 1.0)["user_score"])


def test_shorter_inputs_are_zero_padded_to_the_static_size(served):
    batch = random_batch(np.random.default_rng(2), 3, hist_len=5, candidates=2)
    outputs = _outputs(_stub(served.address).Predict(_request(batch), timeout=20))
    padded = _padded(batch)
    expected = reference_scores(padded[HIST], padded[HIST_LENGTH], padded[ITEM], 1.0)
    assert outputs["scores"].shape == (3, NUM_CANDIDATES)
    np.testing.assert_allclose(outputs["scores"], expected["scores"], rtol=1e-6)


def test_requests_above_grpc_default_4_mib_limit_pass(served, client):
    # 100,000 rows x 8 history ids = 6.4 MB of int64: more than gRPC's default 4 MiB.
    batch = random_batch(np.random.default_rng(10), 100_000)
    request = client.build_request(MODEL, batch)
    assert request.ByteSize() > 4 * 1024 * 1024
    outputs = _outputs(client.predict_response(request))
    expected = reference_scores(batch[HIST], batch[HIST_LENGTH], batch[ITEM], 1.0)
    np.testing.assert_allclose(outputs["scores"], expected["scores"], rtol=1e-6)


def test_requests_above_the_max_batch_size_are_invalid_arguments(toy_versions, tmp_path):
    assert server_lib.ServerOptions().max_batch_size == 128
    base = copy_versions(toy_versions, str(tmp_path / MODEL), [1])
    with server_lib.serve(model_name=MODEL, model_base_path=base, port=0,
                          max_batch_size=4) as handle:
        stub = _stub(handle.address)
        batch = random_batch(np.random.default_rng(11), 4)
        np.testing.assert_allclose(
            _outputs(stub.Predict(_request(batch), timeout=20))["scores"],
            reference_scores(batch[HIST], batch[HIST_LENGTH], batch[ITEM], 1.0)["scores"])
        with pytest.raises(grpc.RpcError) as raised:
            stub.Predict(_request(random_batch(np.random.default_rng(12), 5)), timeout=20)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = raised.value.details()
        assert f"input '{HIST}'" in details and "batch size 5" in details, details
        assert "maximum 4" in details and "--max_batch_size" in details, details
        # Scalars have no batch dimension; and the rejected request ran nothing.
        calls = _outputs(stub.Predict(_request({}, signature="count"), timeout=20))["calls"]
        assert int(calls) == 4


@pytest.mark.parametrize(("flag", "value", "fragment"), [
    ("--max_message_mb", "0", "--max_message_mb: 0"),
    ("--max_message_mb", "-1", "--max_message_mb: -1"),
    ("--max_message_mb", "4096", "--max_message_mb: 4096"),
    ("--max_message_mb", "x", "--max_message_mb: 'x'"),
    ("--max_workers", "0", "--max_workers: 0"),
    ("--max_batch_size", "0", "--max_batch_size: 0"),
    ("--max_batch_size", "-2", "--max_batch_size: -2"),
])
def test_bad_server_limits_are_one_line_argparse_errors(flag, value, fragment, capsys):
    with pytest.raises(SystemExit) as raised:
        server_lib.parse_args(["--model_name", "m", "--model_base_path", "b", flag, value])
    assert raised.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("python -m serving.server: error: argument ") and fragment in error
    args = server_lib.parse_args(["--model_name", "m", "--model_base_path", "b"])
    assert (args.max_message_mb, args.max_workers, args.max_batch_size) == (512, 8, 128)
    with pytest.raises(ValueError, match="max_batch_size must be >= 1, got 0"):
        server_lib.ServerOptions(max_batch_size=0)
    with pytest.raises(ValueError, match="max_message_bytes must be in"):
        server_lib.ServerOptions(max_message_bytes=0)


def test_get_model_metadata_returns_the_signature_defs(served):
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = MODEL
    response = _stub(served.address).GetModelMetadata(request, timeout=20)
    assert response.model_spec.name == MODEL
    assert response.model_spec.version.value == 1
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signature_map)
    assert {"serving_default", "count", "slow"} <= set(signature_map.signature_def)
    default = signature_map.signature_def["serving_default"]
    specs = signatures.input_specs(default)
    assert {alias: (spec.tf_dtype, spec.shape) for alias, spec in specs.items()} == {
        HIST: (tf.int64, (-1, HIST_LEN)),
        HIST_LENGTH: (tf.int64, (-1,)),
        ITEM: (tf.int64, (-1, NUM_CANDIDATES)),
    }
    outputs = signatures.output_specs(default)
    assert outputs["scores"].shape == (-1, NUM_CANDIDATES)
    assert outputs["scores"].tf_dtype == tf.float32


@pytest.mark.parametrize(("fields", "message"), [
    ([], "at least one metadata_field"),
    (["signature_def", "weights"], "weights"),
])
def test_get_model_metadata_rejects_bad_fields(served, fields, message):
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=fields)
    request.model_spec.name = MODEL
    with pytest.raises(grpc.RpcError) as raised:
        _stub(served.address).GetModelMetadata(request, timeout=20)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in raised.value.details()


def test_get_model_status(served):
    channel = grpc.insecure_channel(served.address)
    stub = model_service_pb2_grpc.ModelServiceStub(channel)
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = MODEL
    statuses = stub.GetModelStatus(request, timeout=20).model_version_status
    assert [(s.version, s.state, s.status.error_code) for s in statuses] == [(1, AVAILABLE, 0)]

    request.model_spec.version.value = 7
    with pytest.raises(grpc.RpcError) as raised:
        stub.GetModelStatus(request, timeout=20)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert "version 7" in raised.value.details()

    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "nope"
    with pytest.raises(grpc.RpcError) as raised:
        stub.GetModelStatus(request, timeout=20)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


# ---------------------------------------------------------------------------------------------
# Bad requests: named, and the server keeps serving.
# ---------------------------------------------------------------------------------------------


def _good() -> dict[str, np.ndarray]:
    return random_batch(np.random.default_rng(3), 2)


def _with(**changes: np.ndarray | None) -> Callable[[], predict_pb2.PredictRequest]:
    def build() -> predict_pb2.PredictRequest:
        inputs = _good()
        for name, value in changes.items():
            name = {"hist": HIST, "hist_len": HIST_LENGTH, "items": ITEM}.get(name, name)
            if value is None:
                del inputs[name]
            else:
                inputs[name] = value
        return _request(inputs)
    return build


def _malformed() -> predict_pb2.PredictRequest:
    request = _request(_good())
    request.inputs[HIST].tensor_content = b"\x00" * 12  # 2 x 8 int64 need 128 bytes
    return request


def _model(name: str, version: int | None = None, signature: str = "serving_default"
           ) -> Callable[[], predict_pb2.PredictRequest]:
    def build() -> predict_pb2.PredictRequest:
        request = _request(_good(), model=name, signature=signature)
        if version is not None:
            request.model_spec.version.value = version
        return request
    return build


def _output_filter(*aliases: str) -> Callable[[], predict_pb2.PredictRequest]:
    def build() -> predict_pb2.PredictRequest:
        request = _request(_good())
        request.output_filter.extend(aliases)
        return request
    return build


INVALID = grpc.StatusCode.INVALID_ARGUMENT
BAD_REQUESTS = {
    "missing input": (_with(items=None), INVALID, [f"missing input '{ITEM}'"]),
    "unknown input": (_with(user_age=np.zeros([2], np.int64)), INVALID, ["'user_age'"]),
    "wrong dtype": (_with(hist=np.zeros([2, HIST_LEN], np.int32)), INVALID,
                    [f"'{HIST}'", "int32", "int64"]),
    "float ids": (_with(items=np.zeros([2, NUM_CANDIDATES], np.float32)), INVALID,
                  [f"'{ITEM}'", "float32"]),
    "wrong rank": (_with(hist=np.zeros([HIST_LEN], np.int64)), INVALID,
                   [f"'{HIST}'", "rank 1", "rank 2"]),
    "sequence too long": (_with(hist=np.zeros([1, HIST_LEN + 1], np.int64),
                                hist_len=np.zeros([1], np.int64),
                                items=np.zeros([1, NUM_CANDIDATES], np.int64)),
                          INVALID, [f"'{HIST}'", f"size {HIST_LEN + 1}",
                                    f"maximum {HIST_LEN}"]),
    "too many candidates": (_with(items=np.zeros([2, NUM_CANDIDATES + 1], np.int64)), INVALID,
                            [f"'{ITEM}'", f"maximum {NUM_CANDIDATES}"]),
    "malformed tensor": (_malformed, INVALID, [f"'{HIST}'"]),
    "unknown output": (_output_filter("logits"), INVALID, ["logits"]),
    "duplicate output": (_output_filter("scores", "scores"), INVALID, ["duplicate"]),
    "unknown signature": (_model(MODEL, signature="rank_v9"),
                          grpc.StatusCode.FAILED_PRECONDITION, ["rank_v9"]),
    "unknown model": (_model("nope"), grpc.StatusCode.NOT_FOUND, ["nope"]),
    "no model name": (_model(""), INVALID, ["no name"]),
    "unknown version": (_model(MODEL, version=9), grpc.StatusCode.NOT_FOUND,
                        [f"Specific({MODEL}, 9)"]),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request_is_rejected_and_the_server_keeps_serving(served, case):
    build, code, fragments = BAD_REQUESTS[case]
    stub = _stub(served.address)
    with pytest.raises(grpc.RpcError) as raised:
        stub.Predict(build(), timeout=20)
    assert raised.value.code() == code, raised.value.details()
    for fragment in fragments:
        assert fragment in raised.value.details()
    good = _good()
    outputs = _outputs(stub.Predict(_request(good), timeout=20))
    np.testing.assert_allclose(
        outputs["scores"],
        reference_scores(good[HIST], good[HIST_LENGTH], good[ITEM], 1.0)["scores"])


def test_without_padding_shorter_inputs_are_rejected(toy_versions, tmp_path):
    base = copy_versions(toy_versions, str(tmp_path / MODEL), [1])
    with server_lib.serve(model_name=MODEL, model_base_path=base, port=0,
                          pad_inputs=False) as handle:
        batch = random_batch(np.random.default_rng(4), 1, hist_len=3)
        with pytest.raises(grpc.RpcError) as raised:
            _stub(handle.address).Predict(_request(batch), timeout=20)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"'{HIST}'" in raised.value.details()
        assert f"exactly {HIST_LEN}" in raised.value.details()


# ---------------------------------------------------------------------------------------------
# Versions: policy, labels, hot swap, failed loads.
# ---------------------------------------------------------------------------------------------


def _config(base: str, policy: str, labels: dict[str, int] | None = None
            ) -> model_server_config_pb2.ModelServerConfig:
    text = (f"model_config_list {{ config {{ name: '{MODEL}' base_path: '{base}' "
            f"model_platform: 'tensorflow' model_version_policy {{ {policy} }} "
            + "".join(f"version_labels {{ key: '{k}' value: {v} }} "
                      for k, v in (labels or {}).items())
            + "} }")
    return text_format.Parse(text, model_server_config_pb2.ModelServerConfig())


def _scores(stub, batch, **spec) -> tuple[int, np.ndarray]:
    request = _request(batch)
    if "version" in spec:
        request.model_spec.version.value = spec["version"]
    if "label" in spec:
        request.model_spec.version_label = spec["label"]
    response = stub.Predict(request, timeout=20)
    return response.model_spec.version.value, _outputs(response)["scores"]


def test_specific_versions_and_labels(toy_versions, tmp_path):
    base = copy_versions(toy_versions, str(tmp_path / MODEL), [1, 2])
    batch = random_batch(np.random.default_rng(5), 2)
    expected = {v: reference_scores(batch[HIST], batch[HIST_LENGTH], batch[ITEM],
                                    scale)["scores"] for v, scale in SCALES.items()}
    config = _config(base, "specific { versions: 1 versions: 2 }", {"stable": 1, "canary": 2})
    with server_lib.serve(config, port=0) as handle:
        stub = _stub(handle.address)
        for spec, version in [({}, 2), ({"version": 1}, 1), ({"label": "stable"}, 1),
                              ({"label": "canary"}, 2)]:
            served_version, scores = _scores(stub, batch, **spec)
            assert served_version == version, spec
            np.testing.assert_allclose(scores, expected[version], rtol=1e-6)
        with pytest.raises(grpc.RpcError) as raised:
            _scores(stub, batch, label="beta")
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with client_lib.PredictionClient(handle.address) as client:
            assert [(s.version, s.state) for s in client.status(MODEL)] == [
                (1, AVAILABLE), (2, AVAILABLE)]

    with server_lib.serve(_config(base, "specific { versions: 1 }"), port=0) as handle:
        stub = _stub(handle.address)
        assert _scores(stub, batch)[0] == 1
        with pytest.raises(grpc.RpcError) as raised:
            _scores(stub, batch, version=2)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND


def _slow_iterations(stub, seconds: float) -> int:
    """Iterations of the ``slow`` signature that take about ``seconds`` on this machine."""
    probe = 200_000
    start = time.perf_counter()
    stub.Predict(_request({"iterations": np.int64(probe)}, signature="slow"), timeout=60)
    per_iteration = (time.perf_counter() - start) / probe
    return int(seconds / max(per_iteration, 1e-8))


@pytest.mark.slow
def test_hot_swap_under_load_fails_no_request(toy_versions, tmp_path):
    base = copy_versions(toy_versions, str(tmp_path / MODEL), [1])
    batch = random_batch(np.random.default_rng(6), 3)
    expected = {v: reference_scores(batch[HIST], batch[HIST_LENGTH], batch[ITEM],
                                    scale)["scores"] for v, scale in SCALES.items()}
    with server_lib.serve(model_name=MODEL, model_base_path=base, port=0,
                          poll_seconds=0.1, max_workers=6) as handle:
        stub = _stub(handle.address)
        old = handle.manager.models[MODEL].loaded(1)
        iterations = _slow_iterations(stub, 2.0)
        # A long request on version 1 that is still running when version 2 arrives.
        slow = stub.Predict.future(
            _request({"iterations": np.int64(iterations)}, signature="slow"), timeout=60)

        seen: list[int] = []
        failures: list[BaseException] = []
        stop = threading.Event()

        def send() -> None:
            while not stop.is_set():
                try:
                    version, scores = _scores(stub, batch)
                    np.testing.assert_allclose(scores, expected[version], rtol=1e-6)
                    seen.append(version)
                except BaseException as error:  # any failure fails the test
                    failures.append(error)

        senders = [threading.Thread(target=send) for _ in range(2)]
        for sender in senders:
            sender.start()
        time.sleep(0.3)
        # Publish version 2 the way exporters should: write elsewhere, rename into place.
        staging = tmp_path / "staging"
        copy_versions(toy_versions, str(staging), [2])
        os.rename(staging / "2", os.path.join(base, "2"))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and seen[-50:].count(2) < 50:
            time.sleep(0.05)
        stop.set()
        for sender in senders:
            sender.join()

        assert not failures, failures[:3]
        assert seen[0] == 1 and seen[-1] == 2
        first_two = seen.index(2)
        assert 2 not in seen[:first_two] and 1 not in seen[first_two + 10:]
        assert slow.result().model_spec.version.value == 1  # finished on the old session
        assert old.closed
        with client_lib.PredictionClient(handle.address) as client:
            assert [(s.version, s.state) for s in client.status(MODEL)] == [
                (1, END), (2, AVAILABLE)]


def test_a_version_that_fails_to_load_is_reported_and_the_old_one_keeps_serving(
        toy_versions, tmp_path):
    base = copy_versions(toy_versions, str(tmp_path / MODEL), [1])
    # Version 2 names an op that no TensorFlow registers.
    staging = copy_versions(toy_versions, str(tmp_path / "staging"), [2])
    pb = os.path.join(staging, "2", "saved_model.pb")
    with open(pb, "rb") as f:
        model = saved_model_pb2.SavedModel.FromString(f.read())
    model.meta_graphs[0].graph_def.node[0].op = "NoSuchOpForTest"
    with open(pb, "wb") as f:
        f.write(model.SerializeToString())
    with pytest.raises(RuntimeError, match="NoSuchOpForTest"):
        server_lib.LoadedVersion(MODEL, 2, os.path.join(staging, "2"),
                                 server_lib.ServerOptions())

    with server_lib.serve(model_name=MODEL, model_base_path=base, port=0,
                          poll_seconds=30) as handle:
        os.rename(os.path.join(staging, "2"), os.path.join(base, "2"))
        handle.manager.poll()
        with client_lib.PredictionClient(handle.address) as client:
            statuses = {s.version: s for s in client.status(MODEL)}
        assert statuses[2].state == END
        assert "NoSuchOpForTest" in statuses[2].status.error_message
        # Version 2 never became available, so version 1 is not retired.
        assert statuses[1].state == AVAILABLE
        batch = random_batch(np.random.default_rng(7), 1)
        assert _scores(_stub(handle.address), batch)[0] == 1


def _corrupt(version_dir: str, how: str) -> None:
    if how == "garbage saved_model.pb":
        with open(os.path.join(version_dir, "saved_model.pb"), "wb") as f:
            f.write(b"not a SavedModel")
    else:  # the variables of a half-copied version
        for name in os.listdir(os.path.join(version_dir, "variables")):
            os.remove(os.path.join(version_dir, "variables", name))


@pytest.mark.parametrize("how", ["garbage saved_model.pb", "no variables"])
def test_startup_falls_back_to_the_newest_older_version_that_loads(toy_versions, tmp_path,
                                                                    how, caplog):
    base = copy_versions(toy_versions, str(tmp_path / MODEL), [1, 2])
    staging = copy_versions(toy_versions, str(tmp_path / "staging"), [1, 2])
    os.rename(os.path.join(staging, "1"), os.path.join(base, "3"))
    _corrupt(os.path.join(base, "3"), how)
    batch = random_batch(np.random.default_rng(13), 2)
    expected = {v: reference_scores(batch[HIST], batch[HIST_LENGTH], batch[ITEM],
                                    scale)["scores"] for v, scale in SCALES.items()}
    with caplog.at_level("WARNING", logger="serving.server"), server_lib.serve(
            model_name=MODEL, model_base_path=base, port=0, poll_seconds=30) as handle:
        stub = _stub(handle.address)
        version, scores = _scores(stub, batch)
        assert version == 2
        np.testing.assert_allclose(scores, expected[2], rtol=1e-6)
        with client_lib.PredictionClient(handle.address) as client:
            statuses = {s.version: s for s in client.status(MODEL)}
        assert statuses[3].state == END and statuses[3].status.error_message
        assert statuses[2].state == AVAILABLE and 1 not in statuses
        logged = " ".join(r.getMessage() for r in caplog.records)
        assert "version 3" in logged and "falling back to version 2" in logged, logged
        # Later polls keep version 2 while version 3 stays corrupt, and a good version 4
        # replaces it.
        handle.manager.poll()
        assert _scores(stub, batch)[0] == 2
        os.rename(os.path.join(staging, "2"), os.path.join(base, "4"))
        handle.manager.poll()
        version, scores = _scores(stub, batch)
        assert version == 4 and handle.manager.models[MODEL].available_versions == [4]
        np.testing.assert_allclose(scores, expected[2], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Warm-up.
# ---------------------------------------------------------------------------------------------


def _warmup_requests(sizes: list[int]) -> list[predict_pb2.PredictRequest]:
    rng = np.random.default_rng(8)
    return [_request(random_batch(rng, size)) for size in sizes]


def test_warmup_requests_are_replayed_on_load(toy_versions, tmp_path):
    base = copy_versions(toy_versions, str(tmp_path / MODEL), [1])
    signatures.write_warmup_requests(os.path.join(base, "1"), _warmup_requests([1, 2, 3]))
    with server_lib.serve(model_name=MODEL, model_base_path=base, port=0) as handle:
        assert handle.manager.models[MODEL].loaded(1).warmup_records == 3
        response = _stub(handle.address).Predict(_request({}, signature="count"), timeout=20)
        # The warm-up requests ran through the served session: 1 + 2 + 3 examples.
        assert int(_outputs(response)["calls"]) == 6


def test_a_failing_warmup_request_fails_the_load(toy_versions, tmp_path):
    base = copy_versions(toy_versions, str(tmp_path / MODEL), [1])
    bad = _request({HIST: np.zeros([1, HIST_LEN], np.int64)})  # the other inputs are missing
    signatures.write_warmup_requests(os.path.join(base, "1"),
                                     [*_warmup_requests([1]), bad])
    with server_lib.serve(model_name=MODEL, model_base_path=base, port=0,
                          poll_seconds=30) as handle:
        with client_lib.PredictionClient(handle.address) as client:
            (status,) = client.status(MODEL)
        assert status.state == END
        assert "warm-up record 2" in status.status.error_message
        assert HIST_LENGTH in status.status.error_message
        with pytest.raises(grpc.RpcError) as raised:
            _stub(handle.address).Predict(_request(_good()), timeout=20)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND


# ---------------------------------------------------------------------------------------------
# A real process: ScaNN ops, SIGTERM.
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_subprocess_serves_scann_models_and_stops_cleanly_on_sigterm(toy_versions, tmp_path):
    database = np.random.default_rng(9).normal(size=(32, 8)).astype(np.float32)
    scann_base = tmp_path / "searcher"
    save_scann_searcher(str(scann_base / "1"), database, k=3)
    toy_base = copy_versions(toy_versions, str(tmp_path / MODEL), [1])
    config_path = tmp_path / "models.config"
    config_path.write_text(
        f"model_config_list {{\n"
        f"  config {{ name: '{MODEL}' base_path: '{toy_base}' model_platform: 'tensorflow' }}\n"
        f"  config {{ name: 'searcher' base_path: '{scann_base}' "
        f"model_platform: 'tensorflow' }}\n}}\n")
    process = subprocess.Popen(
        [sys.executable, "-m", "serving.server", "--model_config_file", str(config_path),
         "--port", "0", "--max_workers", "4", "--grace_seconds", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    try:
        line = process.stdout.readline()
        match = re.search(r"listening on (\S+)", line)
        assert match, f"unexpected first line {line!r} (exit code {process.poll()})"
        stub = _stub(match.group(1))

        queries = database[:2] + 0.01
        outputs = _outputs(stub.Predict(_request({"query": queries}, model="searcher"),
                                        timeout=30))
        expected = np.argsort(-(queries @ database.T), axis=1, kind="stable")[:, :3]
        np.testing.assert_array_equal(outputs["neighbors"], expected)

        iterations = _slow_iterations(stub, 2.5)
        in_flight = stub.Predict.future(
            _request({"iterations": np.int64(iterations)}, signature="slow"), timeout=60)
        time.sleep(1.0)  # let the request reach the server before the signal
        process.send_signal(signal.SIGTERM)
        assert in_flight.result().model_spec.version.value == 1  # finished, not cut off
        assert process.wait(timeout=60) == 0
        with pytest.raises(grpc.RpcError) as raised:
            stub.Predict(_request(_good()), timeout=5)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
