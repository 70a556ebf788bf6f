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
