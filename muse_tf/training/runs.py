"""What every training run shares: the model directory, the resolved config, the history
length, the Keras callbacks, ``metrics.json`` and the summary table printed at the end; and
the ranking run's schedule (:class:`Schedule`: data epochs cut into validation periods) and
its validation callback (:class:`ValidationMetrics`)."""

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
from muse_tf.training.step import TwoOptimizerModel

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
CHECKPOINT_DIR = "checkpoints"
LOG_DIR = "logs"


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
                  ) -> tuple[Throughput, list[tf.keras.callbacks.Callback]]:
    """Throughput, then ``validation`` (callbacks that add ``val_*`` figures to the epoch
    logs, and early stopping: placed before TensorBoard, the checkpoints and ``History``,
    so that they all see those figures), TensorBoard (``logs/``) and per-(Keras-)epoch
    weight checkpoints (``checkpoints/ckpt-EE``). With ``checkpoint_monitor`` (a ``val_*``
    figure, higher is better) only improving epochs are saved, so the latest checkpoint holds
    the best weights."""
    throughput = Throughput(batch_size)
    checkpoint_path = os.path.join(work_dir, CHECKPOINT_DIR, "ckpt-{epoch:02d}")
    if checkpoint_monitor is None:
        checkpoint = tf.keras.callbacks.ModelCheckpoint(checkpoint_path,
                                                        save_weights_only=True)
    else:
        checkpoint = tf.keras.callbacks.ModelCheckpoint(
            checkpoint_path, save_weights_only=True, monitor=checkpoint_monitor, mode="max",
            save_best_only=True)
    return throughput, [
        throughput,
        *validation,
        tf.keras.callbacks.TensorBoard(os.path.join(work_dir, LOG_DIR), update_freq=50),
        checkpoint,
    ]


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
