"""tf.distribute MultiWorkerMirroredStrategy: two workers on localhost train a few steps."""

import json
import os
import re
import socket
import subprocess
import sys

import pytest

SHRINK = ["data.batch_size=4", "data.eval_batch_size=8", "model.top_k=4",
          "model.short_term_len=3", "model.num_tiers=4", "model.tower_units=[8]",
          "model.head_dim=4", "train.max_train_steps=3", "train.verbose=2",
          "train.export=false"]


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


@pytest.mark.slow
def test_two_workers_on_localhost_train_and_the_chief_writes_metrics(tiny_data_dir, tmp_path):
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    model_dir = str(tmp_path / "run")
    procs = _start_workers(cluster, model_dir, tiny_data_dir, SHRINK, experiment="muse")
    outputs = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=420)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        outputs.append(out)
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out[-4000:]
    with open(os.path.join(model_dir, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["test"]["examples"] == 16
    # The logged metrics are the global ones, reduced once: an AUC is never summed over the
    # two workers, and the chief's logged epoch loss is metrics.json's train_loss.
    aucs = [float(x) for out in outputs for x in re.findall(r" auc: ([0-9.]+)", out)]
    assert aucs and all(0.0 <= a <= 1.0 for a in aucs), aucs
    losses = [float(x) for x in re.findall(r" loss: ([0-9.]+)", outputs[0])]
    assert losses and metrics["train_loss"][-1] == pytest.approx(losses[-1], abs=1e-4)
    # Only the chief (worker 0) writes into the model directory proper.
    assert os.path.exists(os.path.join(model_dir, "checkpoints"))


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
    deadline, periods = time.monotonic() + 420, []
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
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=420)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out[-4000:]
    with open(os.path.join(model_dir, "metrics.json")) as f:
        metrics = json.load(f)
    # The state of a period is written just before its backup: a kill in between resumes
    # from the period before (whose state entries are the ones kept).
    assert metrics["resumed_from"]["epoch"] >= 1
    assert [r["period"] for r in metrics["validation"]] == list(range(1, 7))
    assert not os.path.exists(os.path.join(model_dir, "backup"))
