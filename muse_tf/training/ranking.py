"""One ranking run: train with Keras ``fit`` (under the configured ``tf.distribute``
strategy) with early stopping on a validation split held out of train, evaluate
AUC/GAUC/logloss on the test split, export for TF Serving.

Writes into the model directory: ``config.yaml`` (the resolved config), ``vocab/``,
``checkpoints/ckpt-PP`` (per period; with validation only the improving ones, so the latest
is the best), ``logs/`` (TensorBoard, with ``val_gauc``/``val_auc``/``val_logloss`` per
period), ``test_predictions.npz``, ``metrics.json`` (``stages``: wall seconds and peak RSS
of each part of the run) and, with ``train.export``, ``export/ranker/<version>/``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import tensorflow as tf

from muse_tf import config as config_lib
from muse_tf.data import reader
from muse_tf.data.data_dir import DataDir
from muse_tf.models.factory import build_ranking_model
from muse_tf.profiling import StageTimer
from muse_tf.training import evaluation, runs
from muse_tf.training.early_stopping import BestWeightsEarlyStopping
from muse_tf.training.strategy import (
    finish_workers,
    is_chief,
    make_strategy,
    make_work_dir,
    shard_for_strategy,
    worker_role,
)

PREDICTIONS_FILE = "test_predictions.npz"


def validation_split_of(config: config_lib.ExperimentConfig) -> reader.ValidationSplit | None:
    """The train/validation split of ``train.validation_share`` and
    ``train.validation_split`` (seeded by ``data.seed``), or None when the share is 0 (no
    validation, fixed epochs)."""
    share = config.train.validation_share
    if share <= 0:
        return None
    return reader.ValidationSplit(share, config.data.seed, unit=config.train.validation_split)


def count_split(config: config_lib.ExperimentConfig, data: DataDir,
                holdout: reader.ValidationSplit) -> reader.SplitCounts:
    """Both parts of ``holdout`` over the train split (:func:`muse_tf.data.reader.count_split`);
    a ``ValueError`` naming the counts when either part is empty."""
    counts = reader.count_split(data, "train", holdout)
    if counts.train_examples == 0 or counts.validation_examples == 0:
        empty = "validation" if counts.validation_examples == 0 else "train"
        raise ValueError(
            f"{data.path}: train.validation_share={holdout.share} "
            f"(train.validation_split={holdout.unit}, seed data.seed={holdout.seed}) leaves the "
            f"{empty} part of the train split empty: {counts.train_examples} train examples "
            f"of {counts.train_users} users, {counts.validation_examples} validation examples "
            f"of {counts.validation_users} users; choose another share or seed, or set "
            "train.validation_share=0")
    return counts


def train_dataset(config: config_lib.ExperimentConfig, data: DataDir, seq_len: int,
                  batch_size: int, users: reader.ValidationSplit | None = None,
                  examples: int | None = None, resume_model_dir: str | None = None,
                  chief: bool = True,
                  ) -> tuple[tf.data.Dataset, runs.Schedule, runs.Resume | None]:
    """The shuffled train batches (repeated when the size is known), their schedule and, with
    ``resume_model_dir`` (and ``train.resume``), the run's :class:`~muse_tf.training.runs.Resume`
    (the batches then start where a killed run left off).

    Args:
      config: the run's config.
      data: the data directory.
      seq_len: history length of the batches.
      batch_size: examples per batch.
      users: keep only the train part of this validation split (None: every train example).
      examples: train examples (default: the split's count in the metadata; with ``users``
        pass the counted train part).
      resume_model_dir: the model directory whose backup to resume from (None: no resume).
      chief: this worker writes the resume state.
    """
    if examples is None and users is None:
        examples = data.num_examples("train")
    try:
        schedule = runs.training_schedule(config, examples, batch_size,
                                          validate=users is not None)
    except ValueError as err:
        raise ValueError(f"{data.path}: {err}") from None
    resume = None
    if resume_model_dir is not None and config.train.resume and schedule.period_steps:
        resume = runs.Resume(resume_model_dir, schedule.period_steps,
                             config.train.backup_every_seconds, chief)
    skip = 0 if resume is None or resume.point is None else resume.point.steps_done
    dataset = reader.make_dataset(data, "train", batch_size, max_seq_len=seq_len,
                                  shuffle=True, shuffle_buffer=config.data.shuffle_buffer,
                                  seed=config.data.seed, drop_remainder=True,
                                  repeat=schedule.period_steps is not None,
                                  users=None if users is None else users.with_part("train"),
                                  skip_examples=skip * batch_size)
    return shard_for_strategy(dataset, config.train.strategy), schedule, resume


def run_ranking(config: config_lib.ExperimentConfig, model_dir: str,
                data: str | DataDir | None = None) -> dict[str, Any]:
    """Train + evaluate (+ export) one ranking experiment; returns the metrics dict (also
    written to ``metrics.json``).

    With ``train.validation_share`` > 0 (the default) that share of the train split is held
    out (``train.validation_split``: of every user's impressions, the default, or of the
    users); the model is validated (exact GAUC, AUC, logloss) at the end of every period
    (:class:`~muse_tf.training.runs.Schedule`), training stops when the validation GAUC has
    not improved for ``train.patience`` periods, and the best period's weights are restored
    (and saved as the latest checkpoint) before the test evaluation and the export. With 0,
    exactly ``train.epochs`` epochs over the whole train split.

    Under ``train.strategy=multi_worker`` every worker runs all of this in step (training,
    validation, the test evaluation and the export are collective,
    :mod:`muse_tf.training.strategy`); only the chief writes the model directory
    (checkpoints, logs, ``metrics.json``, the export), the others write into scratch
    directories they remove, and every worker's result has ``worker`` (its task, the chief's
    and the number of workers).
    """
    config.validate()
    if config.task != "ranking":
        raise ValueError(f"{config.name}: task {config.task!r} is not a ranking task; run it "
                         "with muse_tf.training.experiment.run_experiment")
    stages = StageTimer(config.name if config.train.verbose else None)
    with stages("prepare"):
        data = runs.prepare_run(config, model_dir, data)
    strategy = make_strategy(config.train.strategy)
    chief = is_chief(strategy)
    out_dir = make_work_dir(model_dir, strategy)
    seq_len = runs.max_seq_len_of(config, data)
    batch = config.data.batch_size
    users = validation_split_of(config)
    counts = count_split(config, data, users) if users is not None else None
    train_ds, schedule, resume = train_dataset(
        config, data, seq_len, batch, users,
        examples=None if counts is None else counts.train_examples,
        resume_model_dir=model_dir, chief=chief)
    with stages("model build"):
        model = runs.compiled_model(config, strategy,
                                    lambda: build_ranking_model(config, data, out_dir), train_ds)
    validation: list[tf.keras.callbacks.Callback] = []
    validator = early_stopping = None
    if users is not None:
        validation_ds = reader.make_dataset(
            data, "train", config.data.eval_batch_size, max_seq_len=seq_len, shuffle=False,
            deterministic=True, users=users.with_part("validation"))
        validator = runs.ValidationMetrics(validation_ds, schedule,
                                           config.train.max_eval_steps)
        early_stopping = BestWeightsEarlyStopping(
            monitor="val_gauc", mode="max", patience=config.train.patience,
            verbose=1 if config.train.verbose else 0)
        validation = [validator, early_stopping]
    throughput, callbacks = runs.fit_callbacks(
        out_dir, batch, validation, checkpoint_monitor="val_gauc" if validation else None,
        resume=resume)
    if resume is not None and config.train.verbose:
        resume.announce(config.name)
    with stages("train"), reader.naming_unreadable_shards(data, "train"):
        history = model.fit(train_ds, epochs=schedule.periods,
                            steps_per_epoch=schedule.period_steps, callbacks=callbacks,
                            verbose=config.train.verbose)
    train_seconds = stages.seconds("train")
    losses = (resume.losses(history) if resume is not None
              else [float(x) for x in history.history.get("loss", [])])
    periods_run = len(losses)
    model.release_training_state()  # the optimizer slots: never read by evaluation or export

    test_ds = reader.make_dataset(data, "test", config.data.eval_batch_size,
                                  max_seq_len=seq_len, shuffle=False, deterministic=True)
    with stages("test evaluation"):
        predictions = evaluation.predict_split(
            model, test_ds, config.train.max_eval_steps,
            step=None if validator is None else validator.step, data=data, split="test")
    eval_seconds = stages.seconds("test evaluation")
    test = evaluation.evaluate_predictions(predictions)
    test["examples_per_sec"] = test["examples"] / eval_seconds if eval_seconds else None
    result: dict[str, Any] = {
        "experiment": config.name,
        "task": config.task,
        "test": test,
        "train_examples_per_sec": throughput.examples_per_sec,
        "train_seconds": train_seconds,
        # Steps of one data epoch (a pass over the train examples).
        "train_steps_per_epoch": schedule.epoch_steps,
        # Per period (a Keras epoch: a data epoch, or a fraction of one with validation):
        # the mean of the training loss over the period, what the progress bar shows last.
        "train_loss": losses,
        "schedule": {**schedule.as_dict(), "periods_run": periods_run,
                     "epochs_run": schedule.data_epochs(periods_run)},
        "validation_share": config.train.validation_share,
        "data_dir": data.path,
        "max_seq_len": seq_len,
    }
    if resume is not None and resume.point is not None:
        result["resumed_from"] = resume.point.as_dict()
    if counts is not None and validator is not None and early_stopping is not None:
        records = validator.records
        # EarlyStopping's best (the first of equal GAUCs): the restored weights.
        best = records[early_stopping.best_epoch] if records else None
        result.update({
            "train_examples": counts.train_examples,
            "validation_examples": counts.validation_examples,
            "train_users": counts.train_users,
            "validation_users": counts.validation_users,
            "validation_split": users.unit if users is not None else None,
            "split_counted_by": counts.source,
            # What the validation passes read (all of the part unless train.max_eval_steps).
            "validation_examples_read": validator.examples_read,
            "split_count_seconds": counts.seconds,
            "validation": records,
            "validation_seconds": validator.seconds,
            "best_period": best["period"] if best else None,
            "best_epoch": best["epoch"] if best else None,
            "best_val_gauc": best["gauc"] if best else None,
            "stopped_early": early_stopping.stopped_epoch > 0,
        })
    else:
        result["train_examples"] = data.num_examples("train")
    role = worker_role(strategy)
    if role is not None:
        result["worker"] = role.as_dict()
    if config.train.export:
        from muse_tf.export.ranking import export_ranking_model

        # On every worker: saving is collective under multi_worker (muse_tf.training.strategy);
        # the other workers' copies go to their scratch directories, removed below.
        with stages("export"):
            export_dir = export_ranking_model(model, config, out_dir, max_seq_len=seq_len,
                                              data=data)
        if chief:
            result["export_dir"] = export_dir
    # Per part of the run: wall seconds and this process's peak RSS within it (the training
    # part includes the validation passes).
    result["stages"] = stages.as_dict()
    if chief:
        np.savez_compressed(os.path.join(model_dir, PREDICTIONS_FILE), **predictions)
        runs.write_metrics(model_dir, result)
    finish_workers(strategy, model_dir)
    return result


def reported_train_loss(result: dict[str, Any]) -> float | None:
    """The train loss of the evaluated weights: the best period's with early stopping (the
    restored weights), else the last period's."""
    losses = result.get("train_loss") or []
    best = result.get("best_period")
    if best and len(losses) >= best:
        return losses[best - 1]
    return losses[-1] if losses else None


def summary_table(results: list[dict[str, Any]]) -> str:
    """The table printed at the end of a ranking run or comparison."""
    rows = [(r["experiment"], r["test"]["auc"], r["test"]["gauc"], r["test"]["logloss"],
             r["test"]["examples"], reported_train_loss(r),
             r["train_examples_per_sec"]) for r in results]
    return runs.markdown_table(
        ["experiment", "AUC", "GAUC", "logloss", "test examples", "train loss",
         "train examples/s"], rows)
