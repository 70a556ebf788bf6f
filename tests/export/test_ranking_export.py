"""Ranking export: signature, SavedModel vs Keras predictions, stock ops only, warm-up."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

import muse_tf  # noqa: F401
from muse_tf import config as config_lib
from muse_tf import schema
from muse_tf.data.data_dir import DataDir
from muse_tf.export import names, requests
from muse_tf.export import ranking as export
from muse_tf.export.__main__ import main as export_main
from muse_tf.training.ranking import run_ranking as run_experiment

SMALL = ["data.batch_size=4", "model.top_k=4", "model.short_term_len=3", "train.verbose=0",
         "model.tower_units=[8]", "model.num_tiers=4"]
MAX_CANDIDATES = 5


@pytest.fixture(scope="module")
def trained(tiny_data_dir, tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("ranker"))
    config = config_lib.resolve("muse", assignments=[*SMALL, "train.export=false"])
    run_experiment(config, model_dir, tiny_data_dir)
    model, config = export.restore_ranking_model(model_dir)
    path = export.export_ranking_model(model, config, model_dir, max_candidates=MAX_CANDIDATES)
    return model, config, model_dir, path


def _requests(config, max_seq_len):
    examples = export.warmup_batch(DataDir.open(config.data.data_dir), max_seq_len)
    return requests.ranking_requests_from_examples(
        examples, max_seq_len=max_seq_len, max_candidates=MAX_CANDIDATES, num_requests=4,
        candidates_per_request=4)


def test_signature_inputs_follow_the_schema(trained):
    _, _, model_dir, path = trained
    fn = tf.saved_model.load(path).signatures[export.SIGNATURE_NAME]
    specs = fn.structured_input_signature[1]
    expected = {f.name for f in schema.INPUT_FEATURES} | {schema.HISTORY_LENGTH,
                                                          schema.NUM_CANDIDATES}
    assert set(specs) == expected
    info = export.describe(path)
    seq_len = info["max_seq_len"]
    assert specs[schema.HISTORY_ITEM_ID.name].shape.as_list() == [None, seq_len]
    assert specs[schema.ITEM_ID.name].shape.as_list() == [None, MAX_CANDIDATES]
    assert specs[schema.USER_ID.name].dtype == tf.int64
    assert specs[schema.HISTORY_LENGTH].dtype == tf.int32
    assert specs[schema.NUM_CANDIDATES].dtype == tf.int32
    assert info["inputs"] == {name: {"dtype": spec.dtype.name, "shape": spec.shape.as_list()}
                              for name, spec in specs.items()}
    assert info["model_name"] == names.RANKING_MODEL_NAME
    assert path.startswith(names.ranking_base_path(model_dir))
    assert fn.structured_outputs[export.SCORES].shape.as_list() == [None, MAX_CANDIDATES]
    assert os.path.exists(os.path.join(path, "assets", "item.tsv"))


def test_saved_model_matches_keras_and_zeroes_padded_candidates(trained):
    model, config, _, path = trained
    fn = tf.saved_model.load(path).signatures[export.SIGNATURE_NAME]
    seq_len = export.describe(path)["max_seq_len"]
    requests = _requests(config, seq_len)
    assert requests
    for request in requests:
        served = fn(**{k: tf.constant(v) for k, v in request.items()})[export.SCORES].numpy()
        count = int(request[schema.NUM_CANDIDATES][0])
        user = {k: tf.constant(v) for k, v in request.items()
                if k not in {f.name for f in schema.ITEM_SIDE_FEATURES}}
        candidates = {f.name: tf.constant(request[f.name]) for f in schema.ITEM_SIDE_FEATURES}
        keras = model.score_candidates(user, candidates).numpy()
        np.testing.assert_allclose(served[:, :count], keras[:, :count], atol=1e-5)
        np.testing.assert_array_equal(served[:, count:], 0.0)


def test_fresh_process_loads_without_scann_or_muse_tf(trained, tmp_path):
    model, config, _, path = trained
    seq_len = export.describe(path)["max_seq_len"]
    request = _requests(config, seq_len)[0]
    np.savez(tmp_path / "request.npz", **request)
    user = {k: tf.constant(v) for k, v in request.items()
            if k not in {f.name for f in schema.ITEM_SIDE_FEATURES}}
    candidates = {f.name: tf.constant(request[f.name]) for f in schema.ITEM_SIDE_FEATURES}
    expected = model.score_candidates(user, candidates).numpy()
    script = textwrap.dedent(f"""
        import sys, json
        import numpy as np
        import tensorflow as tf
        request = dict(np.load({str(tmp_path / 'request.npz')!r}))
        fn = tf.saved_model.load({path!r}).signatures["serving_default"]
        out = fn(**{{k: tf.constant(v) for k, v in request.items()}})["scores"].numpy()
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("scann", "muse_tf",
                                                                    "tensorflow_recommenders"))
        print(json.dumps({{"scores": out.tolist(), "modules": bad}}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=str(tmp_path), env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["modules"] == []
    count = int(request[schema.NUM_CANDIDATES][0])
    np.testing.assert_allclose(np.array(result["scores"])[:, :count], expected[:, :count],
                               atol=1e-5)


def test_only_stock_ops_in_the_graph(trained):
    _, _, _, path = trained
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    ops = set()
    for meta in proto.meta_graphs:
        ops |= {node.op for node in meta.graph_def.node}
        for function in meta.graph_def.library.function:
            ops |= {node.op for node in function.node_def}
    registered = set(tf.raw_ops.__dict__)
    assert not [op for op in ops if op.lower().startswith("scann")]
    assert {op for op in ops if op not in registered} == set()


def test_warmup_requests_are_prediction_logs_the_model_accepts(trained):
    from tensorflow_serving.apis import prediction_log_pb2

    _, config, _, path = trained
    fn = tf.saved_model.load(path).signatures[export.SIGNATURE_NAME]
    warmup = os.path.join(path, "assets.extra", export.WARMUP_FILE)
    logs = [prediction_log_pb2.PredictionLog.FromString(r.numpy())
            for r in tf.data.TFRecordDataset(warmup)]
    assert len(logs) == 8  # num_warmup_requests (the tiny test split has 16 examples)
    info = export.describe(path)
    # The warm-up requests are the builder's, from the first test examples.
    expected = requests.ranking_requests_from_examples(
        export.warmup_batch(DataDir.open(config.data.data_dir), info["max_seq_len"]),
        max_seq_len=info["max_seq_len"], max_candidates=MAX_CANDIDATES, num_requests=8,
        candidates_per_request=export.WARMUP_CANDIDATES)
    for log, want in zip(logs, expected, strict=True):
        request = log.predict_log.request
        assert request.model_spec.signature_name == export.SIGNATURE_NAME
        assert request.model_spec.name == names.RANKING_MODEL_NAME
        inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
        assert sorted(inputs) == sorted(want)
        for name, value in want.items():
            assert inputs[name].dtype == value.dtype, name
            np.testing.assert_array_equal(inputs[name], value)
        assert int(inputs[schema.NUM_CANDIDATES][0]) == MAX_CANDIDATES  # min(16, C)
        scores = fn(**{k: tf.constant(v) for k, v in inputs.items()})[export.SCORES].numpy()
        assert np.all((scores >= 0) & (scores <= 1))


def test_versions_increase_and_cli_exports(trained):
    _, _, model_dir, path = trained
    assert export_main(["--model-dir", model_dir, "--max-candidates", "3"]) == 0
    base = os.path.dirname(path)
    versions = sorted(int(v) for v in os.listdir(base) if v.isdigit())
    assert versions == [int(os.path.basename(path)), int(os.path.basename(path)) + 1]
    assert not [v for v in os.listdir(base) if v.startswith(".tmp")]


# ---------------------------------------------------------------------------------------------
# The signature's own checks (stock TF Serving runs them too): lengths, batch sizes.
# ---------------------------------------------------------------------------------------------


def _signature_request(config, path, rows=1):
    """A valid request of ``rows`` users (the first warm-up-style request, repeated)."""
    info = export.describe(path)
    request = _requests(config, info["max_seq_len"])[0]
    return {name: np.repeat(value, rows, axis=0) for name, value in request.items()}, info


def _run(fn, request):
    return fn(**{k: tf.constant(v) for k, v in request.items()})[export.SCORES].numpy()


@pytest.mark.parametrize(("name", "value", "fragments"), [
    (schema.HISTORY_LENGTH, -5, ["input hist_len", "-5", "[0, {L}]"]),
    (schema.HISTORY_LENGTH, "L+1", ["input hist_len", "{L1}", "[0, {L}]"]),
    (schema.NUM_CANDIDATES, -3, ["input num_candidates", "-3", "[0, {C}]"]),
    (schema.NUM_CANDIDATES, "C+1", ["input num_candidates", "{C1}", "[0, {C}]"]),
])
def test_signature_rejects_lengths_the_tensors_contradict(trained, name, value, fragments):
    _, config, _, path = trained
    request, info = _signature_request(config, path, rows=3)
    sizes = {"L": info["max_seq_len"], "L1": info["max_seq_len"] + 1,
             "C": MAX_CANDIDATES, "C1": MAX_CANDIDATES + 1}
    value = {"L+1": sizes["L1"], "C+1": sizes["C1"]}.get(value, value)
    request[name] = request[name].copy()
    request[name][1] = value
    fn = tf.saved_model.load(path).signatures[export.SIGNATURE_NAME]
    with pytest.raises(tf.errors.InvalidArgumentError) as raised:
        _run(fn, request)
    for fragment in fragments:
        assert fragment.format(**sizes) in raised.value.message, raised.value.message
    assert "at rows] [1]" in raised.value.message, raised.value.message


def test_signature_rejects_inputs_of_different_batch_sizes(trained):
    _, config, _, path = trained
    request, _ = _signature_request(config, path)
    request[schema.USER_ID.name] = np.repeat(request[schema.USER_ID.name], 2)  # 2 users, 1 row
    fn = tf.saved_model.load(path).signatures[export.SIGNATURE_NAME]
    with pytest.raises(tf.errors.InvalidArgumentError) as raised:
        _run(fn, request)
    message = raised.value.message
    assert "same batch size" in message and "user_id:] [2]" in message, message
    assert "hist_len:] [1]" in message, message


def test_signature_rejects_batches_above_its_max_batch_size(trained):
    _, config, _, path = trained
    info = export.describe(path)
    assert info["max_batch_size"] == config.train.export_max_batch_size == 128
    fn = tf.saved_model.load(path).signatures[export.SIGNATURE_NAME]
    request, _ = _signature_request(config, path, rows=128)
    assert _run(fn, request).shape == (128, MAX_CANDIDATES)
    request, _ = _signature_request(config, path, rows=129)
    with pytest.raises(tf.errors.InvalidArgumentError) as raised:
        _run(fn, request)
    assert "batch size" in raised.value.message and "129" in raised.value.message
    assert "maximum 128" in raised.value.message, raised.value.message


def test_the_max_batch_size_is_configurable_and_the_warmup_still_replays(trained, tmp_path):
    from serving import server as server_lib

    model, config, _, _ = trained
    small = config_lib.resolve("muse", assignments=[*SMALL, "train.export_max_batch_size=4"])
    small.data.data_dir = config.data.data_dir
    path = export.export_ranking_model(model, small, str(tmp_path),
                                       max_candidates=MAX_CANDIDATES)
    assert export.describe(path)["max_batch_size"] == 4
    fn = tf.saved_model.load(path).signatures[export.SIGNATURE_NAME]
    request, _ = _signature_request(config, path, rows=4)
    assert _run(fn, request).shape == (4, MAX_CANDIDATES)
    request, _ = _signature_request(config, path, rows=5)
    with pytest.raises(tf.errors.InvalidArgumentError, match="maximum 4"):
        _run(fn, request)
    # TF Serving's way of running it (a v1 session over the graph), warm-up replayed.
    loaded = server_lib.LoadedVersion(names.RANKING_MODEL_NAME, 1, path,
                                      server_lib.ServerOptions())
    try:
        assert loaded.warmup_records == 8
    finally:
        loaded.retire()
    with pytest.raises(ValueError, match=r"train\.export_max_batch_size=0"):
        config_lib.resolve("muse", assignments=[*SMALL, "train.export_max_batch_size=0"])
    with pytest.raises(ValueError, match="max_batch_size must be a positive int, got -1"):
        export.export_ranking_model(model, config, str(tmp_path), max_batch_size=-1)
