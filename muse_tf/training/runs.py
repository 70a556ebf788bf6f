"""What every training run shares: the model directory, the resolved config, the history
length, the Keras callbacks, ``metrics.json`` and the summary table printed at the end."""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf

from muse_tf import config as config_lib
from muse_tf.data.data_dir import DataDir
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
    """``build()`` under ``strategy``, compiled with the config's two learning rates, every
    weight and optimizer slot created from the first batch of ``dataset``."""
    with strategy.scope():
        model = build()
        model.compile_with_learning_rates(config.train.embedding_learning_rate,
                                          config.train.dense_learning_rate,
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


def fit_callbacks(work_dir: str, batch_size: int) -> tuple[Throughput,
                                                           list[tf.keras.callbacks.Callback]]:
    """Throughput, TensorBoard (``logs/``) and per-epoch weight checkpoints
    (``checkpoints/ckpt-EE``) of a run."""
    throughput = Throughput(batch_size)
    return throughput, [
        throughput,
        tf.keras.callbacks.TensorBoard(os.path.join(work_dir, LOG_DIR), update_freq=50),
        tf.keras.callbacks.ModelCheckpoint(
            os.path.join(work_dir, CHECKPOINT_DIR, "ckpt-{epoch:02d}"), save_weights_only=True),
    ]


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
