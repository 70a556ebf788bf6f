"""Evaluation: a ranking model over a split (AUC, GAUC, logloss) and a retrieval index over
clicked test queries (recall@N, queries/s, the popularity baseline)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from muse_tf import metrics as metrics_lib
from muse_tf import schema
from muse_tf.data import layout, reader
from muse_tf.data.data_dir import DataDir

RECALL_CUTOFFS = (50, 100, 200)

#: Per-example columns kept from the test split beside the scores (for group analyses).
PREDICTION_COLUMNS = (schema.USER_ID.name, schema.ITEM_ID.name, schema.LABEL.name,
                      schema.HISTORY_LENGTH)
PREDICTIONS_FILE = "test_predictions.npz"


#: The batch of the official MUSE code's test loop, over which it groups users for GAUC
#: (reported as ``gauc_batch``, see :func:`muse_tf.metrics.gauc_batch`).
OFFICIAL_GAUC_BATCH = 1000

PredictStep = Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]]


def prediction_step(model: tf.keras.Model) -> PredictStep:
    """A ``tf.function`` mapping a batch to its :data:`PREDICTION_COLUMNS` and ``score``;
    keep it to predict several times without tracing the model again."""

    @tf.function
    def step(batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        out = {name: batch[name] for name in PREDICTION_COLUMNS}
        out["score"] = model(batch, training=False)
        return out

    return step


def predict_split(model: tf.keras.Model, dataset: tf.data.Dataset,
                  max_steps: int = 0, step: PredictStep | None = None, *,
                  data: DataDir | None = None, split: str | None = None,
                  whole_split: bool = True) -> dict[str, np.ndarray]:
    """Run the model over a (deterministic) dataset.

    Args:
      model: the ranking model.
      dataset: batches of the reader.
      max_steps: at most this many batches (0: all).
      step: from :func:`prediction_step` (default: a new one, traced on the first batch).
      data, split: where ``dataset`` reads from. Given, a read error of a shard is raised
        naming the shard(s) (:func:`muse_tf.data.reader.naming_unreadable_shards`) and, with
        ``whole_split``, a pass that reaches the end of the data checks that it read the
        examples the metadata says were written.
      whole_split: ``dataset`` holds every record of ``split`` once (False for a part of
        it, as the validation part of a validation split).

    Returns the :data:`PREDICTION_COLUMNS` of every example and its ``score``.

    Raises:
      ValueError: naming the split, both counts and the directory when a whole pass read
        another number of examples than ``metadata.json`` lists as written.
      tf.errors.DataLossError: naming the unreadable shard(s) (with ``data`` and ``split``).
    """
    if step is None:
        step = prediction_step(model)
    columns: dict[str, list[np.ndarray]] = {name: [] for name in (*PREDICTION_COLUMNS, "score")}
    guard = (contextlib.nullcontext() if data is None or split is None
             else reader.naming_unreadable_shards(data, split))
    complete = True
    with guard:
        for i, batch in enumerate(dataset):
            if max_steps and i >= max_steps:
                complete = False
                break
            for name, value in step(batch).items():
                columns[name].append(value.numpy())
    out = {name: (np.concatenate(parts) if parts else np.zeros(0))
           for name, parts in columns.items()}
    if complete and whole_split and data is not None and split is not None:
        check_examples_read(data, split, len(out["score"]))
    return out


def check_examples_read(data: DataDir, split: str, examples_read: int) -> None:
    """A ``ValueError`` naming ``split``, both counts and the directory when a whole pass
    over ``split`` read another number of examples than ``metadata.json`` says were written
    (a shard cut at a record boundary or replaced after the build); nothing when the
    metadata holds no count."""
    written = data.num_examples(split)
    if written is None or written == examples_read:
        return
    raise ValueError(
        f"a pass over split {split!r} of {data.path} read {examples_read} examples, but "
        f"{layout.metadata_path(data.path)} says {written} were written to its "
        f"{len(data.split_files(split))} shards: a shard was truncated or replaced after the "
        "build; rebuild the data directory")


def evaluate_predictions(predictions: dict[str, np.ndarray]) -> dict[str, Any]:
    """AUC, the exact GAUC (users over the whole split), the official batch-wise
    ``gauc_batch`` (users within consecutive batches of :data:`OFFICIAL_GAUC_BATCH` examples in
    the split's order), logloss and the click rate of per-example predictions."""
    labels, scores = predictions[schema.LABEL.name], predictions["score"]
    out: dict[str, Any] = {"examples": len(labels)}
    if len(labels) == 0:
        return {**out, "auc": float("nan"), "gauc": float("nan"),
                "gauc_batch": float("nan"), "logloss": float("nan")}
    users = predictions[schema.USER_ID.name]
    out["auc"] = float(metrics_lib.auc(labels, scores))
    out["gauc"] = float(metrics_lib.gauc(users, labels, scores))
    out["gauc_batch"] = float(metrics_lib.gauc_batch(users, labels, scores,
                                                     batch_size=OFFICIAL_GAUC_BATCH))
    out["logloss"] = float(metrics_lib.logloss(labels, scores))
    out["click_rate"] = float(np.mean(labels))
    return out


def recall_report(retrieved: np.ndarray, targets: np.ndarray, catalogue_size: int,
                  cutoffs: Sequence[int] = RECALL_CUTOFFS) -> dict[str, float | None]:
    """``recall@N`` for each cut-off. A list shorter than N is complete when it holds the
    whole catalogue (then recall@N = recall@list length); otherwise recall@N is ``None``."""
    width = retrieved.shape[1]
    out: dict[str, float | None] = {}
    for n in cutoffs:
        if n <= width:
            out.update(metrics_lib.recall_at_n(retrieved, targets, [n]))
        elif width >= catalogue_size:
            out[f"recall@{n}"] = metrics_lib.recall_at_n(retrieved, targets, [width])[
                f"recall@{width}"]
        else:
            out[f"recall@{n}"] = None
    return out


def evaluate_retrieval(search: Callable[[dict[str, tf.Tensor]], Any],
                       batches: Iterator[dict[str, tf.Tensor]], *,
                       on_result: Callable[[Any, np.ndarray], None] | None = None,
                       max_steps: int = 0) -> dict[str, Any]:
    """Runs ``search`` (query features → ``{"item_ids": ...}`` or ``(scores, ids)``) over
    clicked query batches; returns retrieved ids ``[Q, k]``, targets ``[Q]``, timing."""
    retrieved, targets = [], []
    seconds = 0.0
    warmed = False
    for i, batch in enumerate(batches):
        if max_steps and i >= max_steps:
            break
        features = {name: batch[name] for name in schema.QUERY_FEATURES}
        if not warmed:
            search(features)  # traces the function: not timed
            warmed = True
        start = time.perf_counter()
        result = search(features)
        ids = (result["item_ids"] if isinstance(result, dict) else result[1]).numpy()
        seconds += time.perf_counter() - start
        target = batch[schema.ITEM_ID.name].numpy()
        retrieved.append(ids)
        targets.append(target)
        if on_result is not None:
            on_result(result, target)
    if not targets:
        raise ValueError("the test split has no clicked impression to evaluate retrieval on")
    queries = int(sum(len(t) for t in targets))
    return {"retrieved": np.concatenate(retrieved), "targets": np.concatenate(targets),
            "queries": queries, "seconds": seconds,
            "queries_per_sec": queries / seconds if seconds else float("nan")}


def popularity_recall(popular_ids: np.ndarray, targets: np.ndarray, top_n: int,
                      catalogue_size: int) -> dict[str, Any]:
    """Recall of the popularity baseline: the same ``top_n`` most clicked train items for every
    query. When fewer than ``top_n`` items were ever clicked the list holds all of them and is
    complete (the others have no popularity to rank them by)."""
    top = np.asarray(popular_ids[:top_n], dtype=np.int64)
    if len(top) == 0:
        return {f"recall@{n}": 0.0 for n in RECALL_CUTOFFS}
    retrieved = np.broadcast_to(top, (len(targets), len(top)))
    complete = len(top) if len(top) < top_n else catalogue_size
    return recall_report(retrieved, targets, complete)
