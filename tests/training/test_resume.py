"""Resuming a killed ranking run: the same command continues from the last backup (weights,
optimizer slots, step, data position, validation and early-stopping state) and ends where an
uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import pytest
import tensorflow as tf

from muse_tf import config as config_lib
from muse_tf.training import runs
from muse_tf.training.ranking import PREDICTIONS_FILE, run_ranking

from .test_schedule import SMALL, _write_data_dir

#: Three validation periods per data epoch (~2,160 train examples / 32 = 67 steps), two
#: epochs, no early stop: six periods.
SCHEDULE = [*SMALL, "train.validation_every_examples=1000", "train.epochs=2",
            "train.patience=10", "train.embedding_learning_rate=0.02",
            "train.dense_learning_rate=0.005"]


class _Crash(tf.keras.callbacks.Callback):
    """Raises inside ``fit`` at step ``step`` of Keras epoch ``epoch`` (a crash without
    clean-up, like a killed process)."""

    def __init__(self, epoch: int, step: int) -> None:
        super().__init__()
        self.epoch, self.step = epoch, step
        self._epoch = -1

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self._epoch == self.epoch and batch == self.step:
            raise RuntimeError("simulated crash")


def _crash_once(monkeypatch: pytest.MonkeyPatch, crash: _Crash,
                run: Callable[[], object]) -> None:
    """``run()`` with ``crash`` as the last ``fit`` callback; it must die of it."""
    fit_callbacks = runs.fit_callbacks

    def crashing(*args, **kwargs):
        throughput, callbacks = fit_callbacks(*args, **kwargs)
        return throughput, [*callbacks, crash]

    monkeypatch.setattr(runs, "fit_callbacks", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run()
    monkeypatch.setattr(runs, "fit_callbacks", fit_callbacks)


@pytest.fixture(scope="module")
def resume_data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _write_data_dir(str(tmp_path_factory.mktemp("resume_data")))


def _scores(model_dir: str) -> np.ndarray:
    return np.load(os.path.join(model_dir, PREDICTIONS_FILE))["score"]


@pytest.mark.slow
def test_a_crashed_run_resumes_mid_period_and_matches_an_uninterrupted_one(
        resume_data_dir, tmp_path, monkeypatch):
    # Back up after every step; the crash comes after step 10's backup (the backup callback
    # runs first), so the resumed run starts at step 11 of period 3.
    # Only the crashing run backs up after every step (a backup costs more than a step here);
    # the others back up at period ends, which does not change what they compute.
    every_step = [*SCHEDULE, "train.backup_every_seconds=0.000001"]
    assignments = SCHEDULE
    whole = run_ranking(config_lib.resolve("din", assignments=assignments),
                        str(tmp_path / "whole"), resume_data_dir)
    assert "resumed_from" not in whole
    assert not os.path.exists(os.path.join(str(tmp_path / "whole"), runs.BACKUP_DIR))

    model_dir = str(tmp_path / "crashed")
    _crash_once(monkeypatch, _Crash(epoch=2, step=10), lambda: run_ranking(
        config_lib.resolve("din", assignments=every_step), model_dir, resume_data_dir))
    with open(os.path.join(model_dir, runs.BACKUP_DIR, runs.STATE_FILE)) as f:
        assert [p["period"] for p in json.load(f)["periods"]] == [1, 2]

    resumed = run_ranking(config_lib.resolve("din", assignments=assignments), model_dir,
                          resume_data_dir)
    period_steps = whole["schedule"]["period_steps"]
    assert resumed["resumed_from"] == {"epoch": 2, "step": 11,
                                       "steps_done": 2 * period_steps + 11}
    assert not os.path.exists(os.path.join(model_dir, runs.BACKUP_DIR))
    # The whole run's records: the two periods before the crash restored, four after.
    assert [r["period"] for r in resumed["validation"]] == [1, 2, 3, 4, 5, 6]
    assert len(resumed["train_loss"]) == 6
    np.testing.assert_allclose([r["gauc"] for r in resumed["validation"]],
                               [r["gauc"] for r in whole["validation"]], atol=2e-3)
    np.testing.assert_allclose(resumed["train_loss"][:2], whole["train_loss"][:2], rtol=1e-6)
    assert resumed["best_period"] == whole["best_period"]
    np.testing.assert_allclose(_scores(model_dir), _scores(str(tmp_path / "whole")),
                               atol=2e-3)
    assert resumed["test"]["gauc"] == pytest.approx(whole["test"]["gauc"], abs=2e-3)


@pytest.mark.slow
def test_a_sigkilled_training_process_resumes_with_the_same_command(resume_data_dir, tmp_path):
    model_dir = str(tmp_path / "run")
    state = os.path.join(model_dir, runs.BACKUP_DIR, runs.STATE_FILE)
    command = [sys.executable, "-m", "muse_tf.train", "--experiment", "din",
               "--data", resume_data_dir, "--model-dir", model_dir,
               *[f"--set={a}" for a in SCHEDULE]]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    periods: list[int] = []
    while time.monotonic() < deadline and process.poll() is None and len(periods) < 2:
        time.sleep(0.2)
        try:
            with open(state) as f:
                periods = [p["period"] for p in json.load(f)["periods"]]
        except (OSError, ValueError):
            pass
    assert process.poll() is None, process.stderr.read().decode()[-2000:]
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert os.path.exists(os.path.join(model_dir, runs.BACKUP_DIR))

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    with open(os.path.join(model_dir, runs.METRICS_FILE)) as f:
        saved = json.load(f)
    point = saved["resumed_from"]
    # The second period's state is written just before its backup: a kill in between
    # resumes from the first period's end (or later).
    assert point["epoch"] >= 1
    assert [r["period"] for r in saved["validation"]] == list(range(1, 7))
    assert len(saved["train_loss"]) == 6 and np.all(np.isfinite(saved["train_loss"]))
    assert not os.path.exists(os.path.join(model_dir, runs.BACKUP_DIR))
    # One TensorBoard run whose step counter continues: the resumed events start after the
    # restored step, not at 0.
    events = sorted(os.listdir(os.path.join(model_dir, runs.LOG_DIR, "train")))
    assert len(events) == 2
    def steps(name: str, prefix: str) -> list[int]:
        return [e.step for e in tf.compat.v1.train.summary_iterator(
            os.path.join(model_dir, runs.LOG_DIR, "train", name))
            for v in e.summary.value if v.tag.startswith(prefix)]

    # Per-step summaries count train steps, per-period ones periods: both go on.
    assert steps(events[1], "batch_") and min(steps(events[1], "batch_")) >= point["steps_done"]
    assert min(steps(events[1], "epoch_")) == point["epoch"]
    assert max(steps(events[0], "epoch_")) <= point["epoch"]   # (the kill may follow a
    # period's summaries before its backup)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["two_tower", "miss_retrieval"])
def test_a_crashed_retrieval_run_resumes(task, tiny_data_dir, tmp_path, monkeypatch):
    from muse_tf.training import retrieval

    assignments = ["data.batch_size=8", "model.top_k=4", "model.id_embedding_dim=4",
                   "model.tower_units=[16]", "model.short_term_len=4", "train.epochs=3",
                   "train.verbose=0", "train.export=false",
                   "train.backup_every_seconds=0.000001"]
    whole = retrieval.run_retrieval(config_lib.resolve(task, assignments=assignments),
                                    str(tmp_path / "whole"), tiny_data_dir)
    model_dir = str(tmp_path / "crashed")
    _crash_once(monkeypatch, _Crash(epoch=1, step=0), lambda: retrieval.run_retrieval(
        config_lib.resolve(task, assignments=assignments), model_dir, tiny_data_dir))
    with open(os.path.join(model_dir, runs.BACKUP_DIR, runs.STATE_FILE)) as f:
        before = [p["loss"] for p in json.load(f)["periods"]]
    assert len(before) == 1
    resumed = retrieval.run_retrieval(config_lib.resolve(task, assignments=assignments),
                                      model_dir, tiny_data_dir)
    assert resumed["resumed_from"] == {"epoch": 1, "step": 1,
                                       "steps_done": whole["train_steps_per_epoch"] + 1}
    assert "resumed_from" not in whole
    # The epoch before the crash is kept as it was; training goes on from there (the
    # resumed epoch's loss is the mean over its steps after the resume point only; the
    # tiny two-tower run's losses vary from run to run by more than the resume changes).
    losses = resumed["train_loss"]
    assert len(losses) == 3 and losses[0] == pytest.approx(before[0], rel=1e-6)
    assert np.all(np.isfinite(losses)) and losses[2] < losses[0]
    assert len(whole["train_loss"]) == 3
    assert not os.path.exists(os.path.join(model_dir, runs.BACKUP_DIR))
