"""One ranking run: train with Keras ``fit`` (under the configured ``tf.distribute``
strategy), evaluate AUC/GAUC/logloss on the test split, export for TF Serving.

Writes into the model directory: ``config.yaml`` (the resolved config), ``vocab/``,
``checkpoints/ckpt-EE``, ``logs/`` (TensorBoard), ``test_predictions.npz``,
``metrics.json`` and, with ``train.export``, ``export/ranker/<version>/``.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import tensorflow as tf

from muse_tf import config as config_lib
from muse_tf.data import reader
from muse_tf.data.data_dir import DataDir
from muse_tf.models.factory import build_ranking_model
from muse_tf.training import evaluation, runs
from muse_tf.training.strategy import is_chief, make_strategy, shard_for_strategy, work_dir

PREDICTIONS_FILE = "test_predictions.npz"


def train_dataset(config: config_lib.ExperimentConfig, data: DataDir, seq_len: int,
                  batch_size: int) -> tuple[tf.data.Dataset, int | None]:
    """The repeated, shuffled train batches and the steps of one epoch (None when the split's
    size is unknown; then one epoch is one pass over the files)."""
    examples = data.num_examples("train")
    steps = runs.steps_per_epoch(config, examples, batch_size)
    if steps == 0:
        raise ValueError(f"{data.path}: the train split holds {examples} examples, fewer than "
                         f"one batch of data.batch_size={batch_size}")
    dataset = reader.make_dataset(data, "train", batch_size, max_seq_len=seq_len,
                                  shuffle=True, shuffle_buffer=config.data.shuffle_buffer,
                                  seed=config.data.seed, drop_remainder=True,
                                  repeat=steps is not None)
    return shard_for_strategy(dataset, config.train.strategy), steps


def run_ranking(config: config_lib.ExperimentConfig, model_dir: str,
                data: str | DataDir | None = None) -> dict[str, Any]:
    """Train + evaluate (+ export) one ranking experiment; returns the metrics dict (also
    written to ``metrics.json``)."""
    config.validate()
    if config.task != "ranking":
        raise ValueError(f"{config.name}: task {config.task!r} is not a ranking task; run it "
                         "with muse_tf.training.experiment.run_experiment")
    data = runs.prepare_run(config, model_dir, data)
    strategy = make_strategy(config.train.strategy)
    chief = is_chief(strategy)
    out_dir = work_dir(model_dir, chief)
    seq_len = runs.max_seq_len_of(config, data)
    batch = config.data.batch_size
    train_ds, steps = train_dataset(config, data, seq_len, batch)
    model = runs.compiled_model(config, strategy,
                                lambda: build_ranking_model(config, data, out_dir), train_ds)
    throughput, callbacks = runs.fit_callbacks(out_dir, batch)
    start = time.perf_counter()
    history = model.fit(train_ds, epochs=config.train.epochs, steps_per_epoch=steps,
                        callbacks=callbacks, verbose=config.train.verbose)
    train_seconds = time.perf_counter() - start

    test_ds = reader.make_dataset(data, "test", config.data.eval_batch_size,
                                  max_seq_len=seq_len, shuffle=False, deterministic=True)
    eval_start = time.perf_counter()
    predictions = evaluation.predict_split(model, test_ds, config.train.max_eval_steps)
    eval_seconds = time.perf_counter() - eval_start
    test = evaluation.evaluate_predictions(predictions)
    test["examples_per_sec"] = test["examples"] / eval_seconds if eval_seconds else None
    result: dict[str, Any] = {
        "experiment": config.name,
        "task": config.task,
        "test": test,
        "train_examples_per_sec": throughput.examples_per_sec,
        "train_seconds": train_seconds,
        "train_steps_per_epoch": steps,
        # The epoch mean of the training loss: what the progress bar shows last.
        "train_loss": [float(x) for x in history.history.get("loss", [])],
        "data_dir": data.path,
        "max_seq_len": seq_len,
    }
    if chief and config.train.export:
        from muse_tf.export.ranking import export_ranking_model

        result["export_dir"] = export_ranking_model(model, config, model_dir,
                                                    max_seq_len=seq_len, data=data)
    if chief:
        np.savez_compressed(os.path.join(model_dir, PREDICTIONS_FILE), **predictions)
        runs.write_metrics(model_dir, result)
    return result


def summary_table(results: list[dict[str, Any]]) -> str:
    """The table printed at the end of a ranking run or comparison."""
    rows = [(r["experiment"], r["test"]["auc"], r["test"]["gauc"], r["test"]["logloss"],
             r["test"]["examples"], r["train_loss"][-1] if r["train_loss"] else None,
             r["train_examples_per_sec"]) for r in results]
    return runs.markdown_table(
        ["experiment", "AUC", "GAUC", "logloss", "test examples", "train loss",
         "train examples/s"], rows)
