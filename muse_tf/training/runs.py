"""What every training run shares: the model directory, the resolved config, the history
length, the Keras callbacks, resuming after a crash (:class:`Resume`), ``metrics.json`` and
the summary table printed at the end; and the ranking run's schedule (:class:`Schedule`: data
epochs cut into validation periods) and its validation callback (:class:`ValidationMetrics`)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf

from muse_tf import config as config_lib
from muse_tf.data.data_dir import DataDir
from muse_tf.training import evaluation
from muse_tf.training.early_stopping import BestWeightsEarlyStopping
from muse_tf.training.step import TwoOptimizerModel
from muse_tf.training.strategy import barrier

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
CHECKPOINT_DIR = "checkpoints"
LOG_DIR = "logs"
#: The training state of a run in progress (weights, both optimizers' slots, the step and
#: epoch counters, and :data:`STATE_FILE`); removed when ``fit`` ends normally.
BACKUP_DIR = "backup"
#: Per-period state of the callbacks (validation records, early stopping, best checkpoint,
#: losses) beside the backup, so that a resumed run continues them.
STATE_FILE = "run_state.json"


def prepare_run(config: config_lib.ExperimentConfig, model_dir: str,
                data: str | DataDir | None) -> DataDir:
    """Open the data directory (building the demo data when none is given), create the model
    directory, write the resolved config, seed; returns the opened data directory."""
    if data is None or data == "":
        data = config.data.data_dir or None
    if data is None:
        from muse_tf import demo

        data = demo.ensure_demo_data()
    data = DataDir.open(data)
    # Before anything is built or written: an empty train split, a lost shard.
    data.check_for_training()
    config.data.data_dir = data.path
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, CONFIG_FILE), "w") as f:
        f.write(config.to_yaml())
    tf.keras.utils.set_random_seed(config.data.seed)
    return data


def max_seq_len_of(config: config_lib.ExperimentConfig, data: DataDir) -> int:
    """``data.max_seq_len`` of the config, else the data directory's. A length above the
    data's pads every history with zeros (slower, same predictions): say so."""
    written = data.max_seq_len
    wanted = config.data.max_seq_len or written
    if wanted > written:
        warnings.warn(
            f"data.max_seq_len={wanted} is longer than the histories of {data.path} (written "
            f"with max_seq_len={written}): every history is padded to {wanted}, which costs "
            f"about {wanted / written:.1f}x the time for the same predictions", stacklevel=2)
    return wanted


def compiled_model(config: config_lib.ExperimentConfig, strategy: tf.distribute.Strategy,
                   build: Callable[[], TwoOptimizerModel],
                   dataset: tf.data.Dataset) -> TwoOptimizerModel:
    """``build()`` under ``strategy``, compiled with the config's two optimizers and learning
    rates, every weight and optimizer slot created from the first batch of ``dataset``."""
    with strategy.scope():
        model = build()
        model.compile_with_learning_rates(config.train.embedding_learning_rate,
                                          config.train.dense_learning_rate,
                                          embedding_optimizer=config.train.embedding_optimizer,
                                          dense_weight_decay=config.train.dense_weight_decay,
                                          steps_per_execution=config.train.steps_per_execution)
        model.build_for(next(iter(dataset.take(1))))
    return model


class Throughput(tf.keras.callbacks.Callback):
    """Examples/s over the training batches after the first (tracing) ones."""

    def __init__(self, batch_size: int, skip_batches: int = 2) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.skip_batches = skip_batches
        self.examples = 0
        self.seconds = 0.0
        self._seen = 0
        self._start = 0.0

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self._seen += 1
        if self._seen > self.skip_batches:
            self.seconds += time.perf_counter() - self._start
            self.examples += self.batch_size

    @property
    def examples_per_sec(self) -> float:
        return self.examples / self.seconds if self.seconds else float("nan")


def fit_callbacks(work_dir: str, batch_size: int,
                  validation: Sequence[tf.keras.callbacks.Callback] = (),
                  checkpoint_monitor: str | None = None,
                  resume: Resume | None = None,
                  ) -> tuple[Throughput, list[tf.keras.callbacks.Callback]]:
    """Throughput, then ``validation`` (callbacks that add ``val_*`` figures to the epoch
    logs, and early stopping: placed before TensorBoard, the checkpoints and ``History``,
    so that they all see those figures), TensorBoard (``logs/``) and per-(Keras-)epoch
    weight checkpoints (``checkpoints/ckpt-EE``). With ``checkpoint_monitor`` (a ``val_*``
    figure, higher is better) only improving epochs are saved, so the latest checkpoint holds
    the best weights. With ``resume``, its backup callback comes first (it restores the
    training state before the others start) and its state callback last (it saves what the
    others did in a period, then backs the period up)."""
    throughput = Throughput(batch_size)
    checkpoint_path = os.path.join(work_dir, CHECKPOINT_DIR, "ckpt-{epoch:02d}")
    if checkpoint_monitor is None:
        checkpoint = tf.keras.callbacks.ModelCheckpoint(checkpoint_path,
                                                        save_weights_only=True)
    else:
        checkpoint = tf.keras.callbacks.ModelCheckpoint(
            checkpoint_path, save_weights_only=True, monitor=checkpoint_monitor, mode="max",
            save_best_only=True)
    callbacks: list[tf.keras.callbacks.Callback] = [
        throughput,
        *validation,
        tf.keras.callbacks.TensorBoard(os.path.join(work_dir, LOG_DIR), update_freq=50),
        checkpoint,
    ]
    if resume is not None:
        callbacks = [resume.backup, *callbacks,
                     resume.state_callback(validation, checkpoint, checkpoint_monitor)]
    return throughput, callbacks


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    """Where a resumed run continues: after ``epoch`` complete Keras epochs (periods) and
    ``step`` steps of the next, i.e. ``epoch * period_steps + step`` steps in all."""

    epoch: int
    step: int
    period_steps: int

    @property
    def steps_done(self) -> int:
        return self.epoch * self.period_steps + self.step

    def as_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step": self.step, "steps_done": self.steps_done}


class _TimedBackup(tf.keras.callbacks.BackupAndRestore):
    """Keras ``BackupAndRestore`` (weights, both optimizers' slots, the epoch/step counters;
    restored in ``on_train_begin``, under any ``tf.distribute`` strategy it supports) that
    backs up every ``every_seconds`` of training instead of every N steps, never at a period's
    last step: :class:`_RunState` backs the period up after the period's validation, early
    stopping and checkpoint have run, so a resumed run never skips them."""

    def __init__(self, backup_dir: str, every_seconds: float, period_steps: int) -> None:
        # An int save_freq makes Keras resume at the saved step (not only the epoch).
        super().__init__(backup_dir, save_freq=1, delete_checkpoint=True)
        self.every_seconds = every_seconds
        self.period_steps = period_steps
        self._last = time.monotonic()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if (self.every_seconds > 0 and batch < self.period_steps - 1
                and time.monotonic() - self._last >= self.every_seconds):
            self._backup(epoch=self._current_epoch, batch=batch)
            self._last = time.monotonic()

    def on_train_end(self, logs: dict | None = None) -> None:
        state = self._training_state
        own = state.write_checkpoint_manager.directory
        shared = state.read_checkpoint_manager.directory
        super().on_train_end(logs)  # removes the chief's backup
        # A non-chief worker backs up into its own workertemp_<id> (on its own disk without a
        # shared file system), which Keras leaves: remove it (before the chief removes the
        # whole backup directory, _RunState.on_train_end).
        if own != shared and tf.io.gfile.exists(own):
            tf.io.gfile.rmtree(own)

    def back_up_period(self, epoch: int) -> None:
        """Back up the end of Keras epoch ``epoch`` (a resumed run starts the next one)."""
        self._training_state._ckpt_saved_batch.assign(self.period_steps - 1)
        self._backup(epoch=epoch, batch=self.period_steps - 1)
        self._last = time.monotonic()


class Resume:
    """Resuming a killed run: started again with the same command, it continues from the
    last backup instead of from scratch.

    The backup (``BACKUP_DIR`` of the model directory, shared by all workers) holds the
    weights, both optimizers' slots and the step counters (Keras ``BackupAndRestore``),
    taken every ``train.backup_every_seconds`` of training and at the end of every period;
    :data:`STATE_FILE` beside it holds, per period, the validation record, the early-stopping
    and best-checkpoint state and the train loss. A resumed run's data starts where the
    killed one was (:attr:`point`: the train batches of a seeded, repeated dataset are the
    same on every run, so the first ``point.steps_done`` batches are skipped), its TensorBoard
    steps continue (the step counter is restored) and ``metrics.json`` records
    ``resumed_from``. Both are removed when training ends normally.

    Args:
      model_dir: the run's model directory.
      period_steps: steps per Keras epoch of this run (a backup of another schedule is an
        error: the data position would not match).
      every_seconds: back up every this many seconds of training (0: at period ends only).
      chief: this worker writes the state file.
    """

    def __init__(self, model_dir: str, period_steps: int, every_seconds: float,
                 chief: bool = True) -> None:
        self.backup_dir = os.path.join(model_dir, BACKUP_DIR)
        self.state_path = os.path.join(self.backup_dir, STATE_FILE)
        self.model_dir = model_dir
        self.period_steps = period_steps
        self.chief = chief
        self.state = self._read_state()
        self.point = self._read_point()
        self.backup = _TimedBackup(self.backup_dir, every_seconds, period_steps)

    def _read_state(self) -> dict[str, Any]:
        if not tf.io.gfile.exists(self.state_path):
            return {"period_steps": self.period_steps, "periods": []}
        with tf.io.gfile.GFile(self.state_path) as f:
            state = json.load(f)
        if state.get("period_steps") != self.period_steps:
            raise ValueError(
                f"{self.backup_dir} holds the backup of a run with {state.get('period_steps')} "
                f"steps per period, this run has {self.period_steps}: the config or the data "
                f"changed since that run was killed; delete {self.backup_dir} to start afresh")
        return state

    def _read_point(self) -> ResumePoint | None:
        path = tf.train.latest_checkpoint(os.path.join(self.backup_dir, "chief"))
        if path is None:
            return None
        reader = tf.train.load_checkpoint(path)
        epoch = int(reader.get_tensor("ckpt_saved_epoch/.ATTRIBUTES/VARIABLE_VALUE"))
        batch = int(reader.get_tensor("ckpt_saved_batch/.ATTRIBUTES/VARIABLE_VALUE"))
        if epoch < 0 or batch < 0:
            return None
        # Keras' own rule (WorkerTrainingState): a backup at a period's last step resumes
        # at the next period, else at the next step.
        if batch >= self.period_steps - 1:
            return ResumePoint(epoch + 1, 0, self.period_steps)
        return ResumePoint(epoch, batch + 1, self.period_steps)

    def announce(self, name: str) -> None:
        """Say where a resumed run continues (nothing when it starts afresh)."""
        if self.point is not None:
            print(f"[{name}] resuming from {self.backup_dir}: Keras epoch "
                  f"{self.point.epoch + 1}, step {self.point.step} "
                  f"({self.point.steps_done} steps done)", flush=True)

    def periods_before(self) -> list[dict[str, Any]]:
        """The state entries of the periods completed before the resume point."""
        done = 0 if self.point is None else self.point.epoch
        return [p for p in self.state["periods"] if p["period"] <= done]

    def state_callback(self, validation: Sequence[tf.keras.callbacks.Callback],
                       checkpoint: tf.keras.callbacks.ModelCheckpoint,
                       checkpoint_monitor: str | None) -> tf.keras.callbacks.Callback:
        return _RunState(self, validation, checkpoint, checkpoint_monitor)

    def write_state(self) -> None:
        if not self.chief:
            return
        tf.io.gfile.makedirs(self.backup_dir)
        tmp = self.state_path + ".tmp"
        with tf.io.gfile.GFile(tmp, "w") as f:
            json.dump(self.state, f, default=float)
        tf.io.gfile.rename(tmp, self.state_path, overwrite=True)

    def remove(self) -> None:
        """Remove the backup (the run ended normally): the chief does, once every worker is
        past its last backup (:class:`_RunState` waits for them)."""
        if self.chief and tf.io.gfile.exists(self.backup_dir):
            tf.io.gfile.rmtree(self.backup_dir)

    def losses(self, history: tf.keras.callbacks.History) -> list[float]:
        """Per-period train losses of the whole run: those before the resume point, then
        this run's."""
        before = [float(p["loss"]) for p in self.periods_before()]
        return before + [float(x) for x in history.history.get("loss", [])]


class _RunState(tf.keras.callbacks.Callback):
    """The last callback of a resumable run: restores the other callbacks' state at the
    start of a resumed run (after they reset it) and, at the end of each period, saves it
    and backs the period up."""

    def __init__(self, resume: Resume, validation: Sequence[tf.keras.callbacks.Callback],
                 checkpoint: tf.keras.callbacks.ModelCheckpoint,
                 checkpoint_monitor: str | None) -> None:
        super().__init__()
        self.resume = resume
        self.validator = next((c for c in validation if isinstance(c, ValidationMetrics)),
                              None)
        self.early_stopping = next(
            (c for c in validation if isinstance(c, tf.keras.callbacks.EarlyStopping)), None)
        self.checkpoint = checkpoint
        self.checkpoint_monitor = checkpoint_monitor

    def on_train_begin(self, logs: dict | None = None) -> None:
        resume = self.resume
        if resume.point is None:
            resume.state["periods"] = []
            return
        before = resume.periods_before()
        resume.state["periods"] = before
        if not before:
            return
        last = before[-1]
        if self.validator is not None:
            self.validator.records = [p["validation"] for p in before if "validation" in p]
        if self.checkpoint_monitor is not None and last.get("checkpoint_best") is not None:
            self.checkpoint.best = last["checkpoint_best"]
        stopping = self.early_stopping
        if stopping is not None and last.get("early_stopping"):
            state = last["early_stopping"]
            stopping.wait = state["wait"]
            stopping.best = state["best"]
            stopping.best_epoch = state["best_epoch"]
            if stopping.restore_best_weights:
                self._restore_best_weights(stopping)

    def _restore_best_weights(self, stopping: tf.keras.callbacks.EarlyStopping) -> None:
        """EarlyStopping keeps the best weights in memory: load them from the best period's
        checkpoint, then restore the backup again (the checkpoint holds optimizer slots of
        that period too)."""
        path = os.path.join(self.resume.model_dir, CHECKPOINT_DIR,
                            f"ckpt-{stopping.best_epoch + 1:02d}")
        if not tf.io.gfile.exists(path + ".index"):
            return
        self.model.load_weights(path).expect_partial()
        if isinstance(stopping, BestWeightsEarlyStopping):
            stopping.snapshot()
        else:
            stopping.best_weights = self.model.get_weights()
        self.resume.backup._training_state.restore()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        entry: dict[str, Any] = {"period": epoch + 1,
                                 "loss": float((logs or {}).get("loss", float("nan")))}
        if self.validator is not None and self.validator.records:
            entry["validation"] = self.validator.records[-1]
        if self.checkpoint_monitor is not None:
            entry["checkpoint_best"] = float(self.checkpoint.best)
        stopping = self.early_stopping
        if stopping is not None:
            entry["early_stopping"] = {"wait": stopping.wait, "best": float(stopping.best),
                                       "best_epoch": stopping.best_epoch}
        self.resume.state["periods"].append(entry)
        self.resume.write_state()
        self.resume.backup.back_up_period(epoch)

    def on_train_end(self, logs: dict | None = None) -> None:
        # The other workers may still be writing their part of the last backup (into the
        # backup directory's workertemp_<id>): the chief removes it once all have finished.
        barrier(self.model.distribute_strategy)
        self.resume.remove()


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How a ranking run's training is cut into Keras epochs ("periods").

    A *data epoch* is one pass over the train examples (``epoch_steps`` batches). Validation
    runs at the end of every *period* of ``period_steps`` batches, the Keras
    ``steps_per_epoch`` over the repeated train data: a data epoch, or a fraction of one (at
    most ``train.validation_every_examples`` examples, dividing the data epoch into equal
    periods). ``periods`` periods (the Keras ``epochs``) cover ``train.epochs`` data epochs
    (the maximum: early stopping may end sooner), capped at ``train.max_train_steps`` steps.

    Attributes:
      epoch_steps: batches of one data epoch (None: unknown, one period = one pass).
      period_steps: batches per period (None as ``epoch_steps``).
      periods: periods to run at most.
      batch_size: examples per batch.
      max_epochs: ``train.epochs``.
    """

    epoch_steps: int | None
    period_steps: int | None
    periods: int
    batch_size: int
    max_epochs: int

    def examples(self, periods_done: int) -> int | None:
        """Train examples seen after ``periods_done`` periods (None if unknown)."""
        if self.period_steps is None:
            return None
        return periods_done * self.period_steps * self.batch_size

    def data_epochs(self, periods_done: int) -> float:
        """Data epochs done after ``periods_done`` periods."""
        if self.period_steps is None or not self.epoch_steps:
            return float(periods_done)
        return periods_done * self.period_steps / self.epoch_steps

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def training_schedule(config: config_lib.ExperimentConfig, examples: int | None,
                      batch_size: int, validate: bool) -> Schedule:
    """The :class:`Schedule` of ``examples`` train examples in batches of ``batch_size``.

    With ``validate``, a period is at most ``train.validation_every_examples`` examples (0:
    a data epoch); without, a period is a data epoch (the fixed-epoch schedule).
    ``train.max_train_steps`` caps the steps in all (quick checks). Raises ``ValueError``
    when ``examples`` is under one batch.
    """
    train = config.train
    max_epochs = train.epochs
    cap = train.max_train_steps
    if examples is None:  # unknown size: Keras runs each period to the end of the data
        if cap:
            return Schedule(cap, cap, min(1, max_epochs), batch_size, max_epochs)
        return Schedule(None, None, max_epochs, batch_size, max_epochs)
    epoch_steps = examples // batch_size
    if epoch_steps == 0:
        raise ValueError(f"the train split holds {examples} examples, fewer than one batch of "
                         f"data.batch_size={batch_size}")
    period_steps = epoch_steps
    every_steps = train.validation_every_examples // batch_size
    if validate and train.validation_every_examples > 0 and max(1, every_steps) < epoch_steps:
        per_epoch = math.ceil(epoch_steps / max(1, every_steps))
        period_steps = math.ceil(epoch_steps / per_epoch)
    total_steps = max_epochs * epoch_steps
    if cap:
        total_steps = min(total_steps, cap)
    if total_steps <= 0:
        return Schedule(epoch_steps, period_steps, 0, batch_size, max_epochs)
    period_steps = min(period_steps, total_steps)
    return Schedule(epoch_steps, period_steps, math.ceil(total_steps / period_steps),
                    batch_size, max_epochs)


class ValidationMetrics(tf.keras.callbacks.Callback):
    """At the end of every Keras epoch (period), predicts the validation data and writes its
    exact GAUC, AUC and logloss into the epoch ``logs`` as ``val_gauc``, ``val_auc`` and
    ``val_logloss`` (for early stopping, TensorBoard, the checkpoints and ``History``: put
    it before them). :attr:`records` keeps one dict per period.

    Args:
      dataset: the validation batches (deterministic).
      schedule: of the run (data epochs and examples per period).
      max_steps: at most this many validation batches (0: all).
    """

    def __init__(self, dataset: tf.data.Dataset, schedule: Schedule,
                 max_steps: int = 0) -> None:
        super().__init__()
        self.dataset = dataset
        self.schedule = schedule
        self.max_steps = max_steps
        self.records: list[dict[str, Any]] = []
        self.seconds = 0.0
        #: Validation examples of the last pass.
        self.examples_read = 0
        self._step: evaluation.PredictStep | None = None

    @property
    def step(self) -> evaluation.PredictStep | None:
        """The traced prediction step (after training began): reuse it for the test split."""
        return self._step

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.records = []
        self._step = evaluation.prediction_step(self.model)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        start = time.perf_counter()
        predictions = evaluation.predict_split(self.model, self.dataset, self.max_steps,
                                               step=self._step)
        figures = evaluation.evaluate_predictions(predictions)
        self.seconds += time.perf_counter() - start
        self.examples_read = int(figures["examples"])
        if not math.isfinite(figures["gauc"]):
            raise ValueError(
                f"validation GAUC is undefined: none of the {figures['examples']} validation "
                "examples' users has both a click and a non-click; raise "
                "train.validation_share, or set it to 0 for the fixed-epoch schedule")
        period = epoch + 1
        record = {"period": period, "epoch": self.schedule.data_epochs(period),
                  "examples": self.schedule.examples(period), "gauc": figures["gauc"],
                  "auc": figures["auc"], "logloss": figures["logloss"],
                  "gauc_batch": figures["gauc_batch"]}
        if logs is not None:
            loss = logs.get("loss")
            if loss is not None:
                record["train_loss"] = float(loss)
            logs.update(val_gauc=figures["gauc"], val_auc=figures["auc"],
                        val_logloss=figures["logloss"])
        self.records.append(record)


def steps_per_epoch(config: config_lib.ExperimentConfig, examples: int | None,
                    batch_size: int) -> int | None:
    """Steps of one epoch: ``train.max_train_steps`` if set, else whole batches of
    ``examples`` (None when the count is unknown: Keras then runs the data to its end)."""
    if config.train.max_train_steps:
        steps = config.train.max_train_steps
        return steps if examples is None else max(1, min(steps, examples // batch_size))
    if examples is None:
        return None
    return examples // batch_size


def write_metrics(model_dir: str, result: dict[str, Any]) -> str:
    path = os.path.join(model_dir, METRICS_FILE)
    with open(path, "w") as f:
        json.dump(result, f, indent=2, default=float)
    return path


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; floats with 4 significant decimals, None as —."""
    def cell(value: Any) -> str:
        if value is None:
            return "—"
        if isinstance(value, float):
            return f"{value:.4f}" if abs(value) < 100 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
