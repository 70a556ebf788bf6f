"""tf.distribute MultiWorkerMirroredStrategy: two workers on localhost train, evaluate and
export with the default settings (tiny sizes apart), and killed workers resume."""

import dataclasses
import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

SHRINK = ["data.batch_size=4", "data.eval_batch_size=8", "model.top_k=4",
          "model.short_term_len=3", "model.num_tiers=4", "model.tower_units=[8]",
          "model.head_dim=4", "train.max_train_steps=3", "train.verbose=2"]
#: Seconds a two-worker run may take (the slow runs take about 1-3 minutes).
TIMEOUT = 420


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _start_workers(cluster: dict, model_dir: str, data_dir: str, assignments: list[str],
                   experiment: str = "din") -> list[subprocess.Popen]:
    """One ``python -m muse_tf.train --strategy multi_worker`` process per worker."""
    procs = []
    for index in range(len(cluster["worker"])):
        env = dict(os.environ, TF_CONFIG=json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": index}}),
            CUDA_VISIBLE_DEVICES="")
        cmd = [sys.executable, "-m", "muse_tf.train", "--experiment", experiment,
               "--data", data_dir, "--model-dir", model_dir, "--strategy", "multi_worker",
               *[f"--set={a}" for a in assignments]]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    return procs


def _outputs(procs: list[subprocess.Popen]) -> list[str]:
    """Every worker's output, once all have exited (all are killed after TIMEOUT)."""
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=TIMEOUT)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    return outputs


def _leftovers(model_dir: str) -> list[str]:
    """Scratch and half-written directories under ``model_dir``: the non-chief workers'
    ``worker_tmp_*``, Keras' ``workertemp_*``, exports' ``.tmp-*``, the backup."""
    found = []
    for root, dirs, files in os.walk(model_dir):
        for name in dirs + files:
            if name.startswith(("worker_tmp_", "workertemp_", ".tmp-")) or name == "backup":
                found.append(os.path.relpath(os.path.join(root, name), model_dir))
    return found


@dataclasses.dataclass(frozen=True)
class TwoWorkerRun:
    model_dir: str
    returncodes: list[int]
    outputs: list[str]

    def metrics(self) -> dict:
        with open(os.path.join(self.model_dir, "metrics.json")) as f:
            return json.load(f)


@pytest.fixture(scope="module")
def two_workers(tiny_data_dir, tmp_path_factory) -> TwoWorkerRun:
    """One run of the default command (export on) on two workers, shared by the tests below."""
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
    model_dir = str(tmp_path_factory.mktemp("multi_worker") / "run")
    procs = _start_workers(cluster, model_dir, tiny_data_dir, SHRINK, experiment="muse")
    outputs = _outputs(procs)
    return TwoWorkerRun(model_dir, [p.returncode for p in procs], outputs)


@pytest.mark.slow
def test_two_workers_exit_0_and_only_the_chief_writes_metrics(two_workers):
    for code, out in zip(two_workers.returncodes, two_workers.outputs, strict=True):
        assert code == 0, out[-4000:]
    metrics = two_workers.metrics()
    assert metrics["test"]["examples"] == 16
    assert metrics["worker"] == {"task": "worker 0", "chief": True, "chief_task": "worker 0",
                                 "num_workers": 2}
    # The logged metrics are the global ones, reduced once: an AUC is never summed over the
    # two workers, and the chief's logged epoch loss is metrics.json's train_loss.
    chief, other = two_workers.outputs
    aucs = [float(x) for out in two_workers.outputs for x in re.findall(r" auc: ([0-9.]+)", out)]
    assert aucs and all(0.0 <= a <= 1.0 for a in aucs), aucs
    losses = [float(x) for x in re.findall(r" loss: ([0-9.]+)", chief)]
    assert losses and metrics["train_loss"][-1] == pytest.approx(losses[-1], abs=1e-4)
    # The chief prints the results; the other worker says what it is and where they are.
    assert "| muse |" in chief and f"model dir: {two_workers.model_dir}" in chief
    assert "| muse |" not in other and "| experiment |" not in other
    assert "worker 1 of 2 workers" in other and two_workers.model_dir in other


@pytest.mark.slow
def test_the_chiefs_export_loads_and_scores_as_the_evaluated_model(two_workers):
    import tensorflow as tf

    from muse_tf import schema
    from muse_tf.data.data_dir import DataDir
    from muse_tf.export import ranking as export
    from muse_tf.export import requests

    assert two_workers.returncodes == [0, 0], two_workers.outputs[0][-4000:]
    metrics = two_workers.metrics()
    path = metrics["export_dir"]
    assert path == os.path.join(two_workers.model_dir, "export", "ranker", "1")
    fn = tf.saved_model.load(path).signatures[export.SIGNATURE_NAME]
    info = export.describe(path)
    examples = export.warmup_batch(DataDir.open(metrics["data_dir"]), info["max_seq_len"])
    # Request r: user r with the target of test example r as its one candidate.
    batch = requests.ranking_requests_from_examples(
        examples, max_seq_len=info["max_seq_len"], max_candidates=info["max_candidates"],
        num_requests=len(examples[schema.LABEL.name]), candidates_per_request=1)
    served = np.concatenate([
        fn(**{k: tf.constant(v) for k, v in request.items()})[export.SCORES].numpy()
        for request in batch])
    predictions = np.load(os.path.join(two_workers.model_dir, "test_predictions.npz"))
    np.testing.assert_array_equal(examples[schema.ITEM_ID.name],
                                  predictions[schema.ITEM_ID.name])
    # The exported weights are the evaluated ones; padded candidate slots score 0.
    np.testing.assert_allclose(served[:, 0], predictions["score"], atol=1e-5)
    np.testing.assert_array_equal(served[:, 1:], 0.0)


@pytest.mark.slow
def test_no_scratch_or_half_written_directory_is_left(two_workers):
    assert two_workers.returncodes == [0, 0], two_workers.outputs[1][-4000:]
    assert _leftovers(two_workers.model_dir) == []
    assert os.listdir(os.path.join(two_workers.model_dir, "export", "ranker")) == ["1"]


@pytest.mark.slow
def test_killed_workers_restarted_with_the_same_commands_resume(tmp_path):
    import time

    from .training.test_schedule import SMALL, _write_data_dir

    data_dir = _write_data_dir(str(tmp_path / "data"))
    # Six validation periods (two epochs of three); the kill comes after the second.
    assignments = [*SMALL, "train.validation_every_examples=1000", "train.epochs=2",
                   "train.patience=10"]
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
    model_dir = str(tmp_path / "run")
    state = os.path.join(model_dir, "backup", "run_state.json")
    procs = _start_workers(cluster, model_dir, data_dir, assignments)
    deadline, periods = time.monotonic() + TIMEOUT, []
    try:
        while time.monotonic() < deadline and len(periods) < 2 and all(
                p.poll() is None for p in procs):
            time.sleep(0.2)
            try:
                with open(state) as f:
                    periods = json.load(f)["periods"]
            except (OSError, ValueError):
                pass
    finally:
        for proc in procs:   # the scheduler loses both workers
            proc.kill()
            proc.communicate()
    assert len(periods) >= 2, "the workers did not reach the second period"
    procs = _start_workers(cluster, model_dir, data_dir, assignments)
    outputs = _outputs(procs)
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out[-4000:]
    with open(os.path.join(model_dir, "metrics.json")) as f:
        metrics = json.load(f)
    # The state of a period is written just before its backup: a kill in between resumes
    # from the period before (whose state entries are the ones kept).
    assert metrics["resumed_from"]["epoch"] >= 1
    assert [r["period"] for r in metrics["validation"]] == list(range(1, 7))
    # The killed worker 1's scratch directory went with the restarted one's.
    assert _leftovers(model_dir) == []
