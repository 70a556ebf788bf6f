"""The retrieval runs (``task`` = ``miss_retrieval`` or ``two_tower``): train, evaluate,
export; ``python -m muse_tf.train --experiment miss_retrieval|two_tower``.

Both experiments use the same data and catalogue:

* **Catalogue** = the items of the multimodal (SCL) table. MISS builds its index tree over
  their L2-normalised vectors (:meth:`IndexTree.build`, saved as ``MODEL_DIR/index_tree.npz``);
  the two-tower indexes the same items. A clicked item without a multimodal embedding is in
  neither: such training samples are skipped and such test samples count as misses, and both
  are counted in ``metrics.json`` (``train.clicks_not_in_index``,
  ``test.targets_not_in_index``).
* **Training examples** = clicked train impressions (label 1): MISS learns (user, node)
  labels from them (:func:`~muse_tf.models.miss_retrieval.training_nodes`), the two-tower an
  in-batch softmax over (user, clicked item) pairs. Two Adam optimizers, as the ranking model:
  ``train.embedding_learning_rate`` for ID/node embeddings, ``train.dense_learning_rate``
  for the rest. ``train.max_train_steps`` caps the steps of each epoch.
* **Evaluation** = every clicked test impression is one query (its user features and history);
  ``recall@N`` = share of queries whose clicked item is among the first N retrieved
  (:func:`muse_tf.metrics.recall_at_n`; with a catalogue smaller than N the whole catalogue is
  the list, so recall@N equals recall@catalogue size). ``queries_per_sec`` = queries / wall
  time of the retrieval calls (in-graph: feature lookups, user encoding and the search; data
  reading excluded; the first, tracing call is not timed), ``retrieval_batch_size`` queries per
  call. MISS adds ``per_level_recall`` (share of the queries' target ancestors the beam kept at
  each searched level, :func:`muse_tf.metrics.hierarchical_recall`, over targets in the tree).
  Both runs also report the **popularity** baseline: the ``top_n`` most clicked train items
  for every query.

Writes ``config.yaml``, ``vocab/``, ``checkpoints/``, ``metrics.json`` and (with
``train.export``) versioned SavedModels under ``export/`` (:mod:`muse_tf.export.retrieval`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from muse_tf import config as config_lib
from muse_tf import metrics as metrics_lib
from muse_tf import schema
from muse_tf.data import reader
from muse_tf.data.data_dir import DataDir
from muse_tf.export import retrieval as retrieval_export
from muse_tf.export.retrieval import serving_signature
from muse_tf.index.tree import IndexTree
from muse_tf.models.factory import build_item_tables
from muse_tf.models.miss_retrieval import (
    NODE_IDS,
    NODE_LABELS,
    QUERY_FEATURES,
    MissNodeScorer,
    MissTreeIndex,
    in_index,
    normalise_rows,
    training_nodes,
)
from muse_tf.models.two_tower import TwoTowerModel
from muse_tf.training.evaluation import (
    RECALL_CUTOFFS,
    evaluate_retrieval,
    popularity_recall,
    recall_report,
)
from muse_tf.training.runs import METRICS_FILE, max_seq_len_of, prepare_run

TREE_FILE = "index_tree.npz"
#: Impressions read per batch before keeping the clicked ones.
_READ_BATCH = 1024
#: Cap on B * M * L elements of one MISS scoring call ([B, M, L] similarity tensors).
_MISS_SCORE_ELEMENTS = 1 << 24


# ------------------------------------------------------------------------------ data


class Catalogue:
    """The retrievable items: ids of the multimodal table (ascending) and their L2-normalised
    vectors ``[N, D]``. Rows whose vector is all zero are left out (they have no direction)."""

    def __init__(self, mm_ids: np.ndarray, mm_vectors: np.ndarray) -> None:
        vectors = normalise_rows(mm_vectors.astype(np.float32))
        keep = (mm_ids != 0) & np.any(vectors != 0, axis=1)
        order = np.argsort(mm_ids[keep], kind="stable")
        self.item_ids = mm_ids[keep][order].astype(np.int64)
        self.vectors = vectors[keep][order]
        self.dropped = int(np.sum(~keep))

    def __len__(self) -> int:
        return int(self.item_ids.shape[0])

    def contains(self, item_ids: np.ndarray) -> np.ndarray:
        return in_index(self.item_ids, item_ids)


def clicked_dataset(data_dir: str, split: str, batch_size: int, max_seq_len: int, *,
                    shuffle: bool, seed: int, shuffle_buffer: int = 8192) -> tf.data.Dataset:
    """Batches of ``batch_size`` clicked impressions (label 1) of ``split`` (reader dicts)."""
    dataset = reader.make_dataset(
        data_dir, split, _READ_BATCH, max_seq_len=max_seq_len, shuffle=shuffle,
        shuffle_buffer=shuffle_buffer, seed=seed if shuffle else None,
        deterministic=not shuffle)
    dataset = dataset.unbatch().filter(lambda x: x[schema.LABEL.name] > 0.5)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def click_counts(data_dir: str, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Clicks per item in ``split``: ``(item_ids, counts)``, most clicked first (ties: lower
    id first). Parses only the context features, so it is fast."""
    spec = {name: spec for name, spec in schema.context_parse_spec().items()
            if name in (schema.ITEM_ID.name, schema.LABEL.name)}

    def parse(serialized: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        context, _, _ = tf.io.parse_sequence_example(serialized, context_features=spec)
        return context[schema.ITEM_ID.name], context[schema.LABEL.name]

    dataset = (tf.data.TFRecordDataset(reader.split_files(data_dir, split),
                                       compression_type="GZIP")
               .batch(16384).map(parse, num_parallel_calls=tf.data.AUTOTUNE))
    clicked = [ids[labels > 0] for ids, labels in dataset.as_numpy_iterator()]
    ids = np.concatenate(clicked) if clicked else np.zeros(0, np.int64)
    unique, counts = np.unique(ids, return_counts=True)
    order = np.lexsort((unique, -counts))
    return unique[order], counts[order]


def query_features(batch: Mapping[str, Any]) -> dict[str, tf.Tensor]:
    """The :data:`QUERY_FEATURES` of a reader batch."""
    return {name: batch[name] for name in QUERY_FEATURES}


def _take_rows(batch: Mapping[str, tf.Tensor], keep: np.ndarray) -> dict[str, tf.Tensor]:
    index = tf.constant(np.flatnonzero(keep), tf.int32)
    return {name: tf.gather(value, index) for name, value in batch.items()}


# ------------------------------------------------------------------------------ training


def _train_step(model: tf.keras.Model, input_signature: dict[str, tf.TensorSpec],
                embedding_lr: float, dense_lr: float) -> Callable[[dict], tf.Tensor]:
    """One optimisation step as a ``tf.function``: Adam(``embedding_lr``) on the model's
    ``embedding_variables()``, Adam(``dense_lr``) on the other trainable variables."""
    embedding_vars = model.embedding_variables()
    embedding_ids = {id(v) for v in embedding_vars}
    dense_vars = [v for v in model.trainable_variables if id(v) not in embedding_ids]
    embedding_optimizer = tf.keras.optimizers.Adam(embedding_lr)
    dense_optimizer = tf.keras.optimizers.Adam(dense_lr)
    embedding_optimizer.build(embedding_vars)
    dense_optimizer.build(dense_vars)
    model.retrieval_optimizers = (embedding_optimizer, dense_optimizer)  # for checkpoints

    @tf.function(input_signature=[input_signature])
    def step(inputs: dict[str, tf.Tensor]) -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = model.compute_loss(inputs, training=True)
            total = loss + tf.add_n([tf.constant(0.0), *model.losses])
        gradients = tape.gradient(total, embedding_vars + dense_vars)
        split = len(embedding_vars)
        embedding_optimizer.apply_gradients(
            zip(gradients[:split], embedding_vars, strict=True))
        dense_optimizer.apply_gradients(zip(gradients[split:], dense_vars, strict=True))
        return loss

    return step


def _fit(config: config_lib.ExperimentConfig, batches: Callable[[], Iterator[dict]],
         model: tf.keras.Model, input_signature: dict[str, tf.TensorSpec]) -> dict[str, Any]:
    """Runs the epochs; ``batches()`` yields ready training inputs (one epoch's worth)."""
    step = _train_step(model, input_signature, config.train.embedding_learning_rate,
                       config.train.dense_learning_rate)
    epoch_losses: list[float] = []
    examples = 0
    steps = 0
    start = time.perf_counter()
    for epoch in range(config.train.epochs):
        losses = []
        for i, inputs in enumerate(batches()):
            if config.train.max_train_steps and i >= config.train.max_train_steps:
                break
            losses.append(float(step(inputs)))
            examples += int(inputs[schema.HISTORY_LENGTH].shape[0])
            steps += 1
            if config.train.verbose and (i + 1) % 50 == 0:
                print(f"[{config.name}] epoch {epoch + 1} step {i + 1}: loss "
                      f"{np.mean(losses[-50:]):.4f}", flush=True)
        if not losses:
            raise ValueError(f"{config.name}: epoch {epoch + 1} saw no training batch (no "
                             "clicked train impression with its item in the index)")
        epoch_losses.append(float(np.mean(losses)))
        if config.train.verbose:
            print(f"[{config.name}] epoch {epoch + 1}: mean loss {epoch_losses[-1]:.4f}",
                  flush=True)
    seconds = time.perf_counter() - start
    return {"train_loss": epoch_losses, "train_seconds": seconds, "train_steps": steps,
            "train_examples": examples,
            "train_examples_per_sec": examples / seconds if seconds else float("nan")}


# ------------------------------------------------------------------------------ the runs


def _prepare(config: config_lib.ExperimentConfig, model_dir: str,
             data_dir: str | None) -> tuple[str, int, dict, np.ndarray, Catalogue]:
    config.validate()
    if config.task not in ("miss_retrieval", "two_tower"):
        raise ValueError(f"retrieval_train runs task miss_retrieval or two_tower, got "
                         f"task={config.task!r} (experiment {config.name!r})")
    data = prepare_run(config, model_dir, data_dir)
    tables = build_item_tables(config, data, model_dir)
    vocabularies, table = tables.vocabularies, tables.mm_table
    catalogue = Catalogue(tables.mm_ids, tables.mm_vectors)
    data_dir = data.path
    if len(catalogue) < 2:
        raise ValueError(f"{data_dir}: the multimodal table holds {len(catalogue)} usable "
                         "item(s); retrieval needs at least 2")
    return data_dir, max_seq_len_of(config, data), vocabularies, table, catalogue


def _clicked_training_batches(config: config_lib.ExperimentConfig, data_dir: str, seq_len: int,
                              catalogue: Catalogue, skipped: dict[str, int],
                              transform: Callable[[dict[str, tf.Tensor], np.ndarray], dict]
                              ) -> Callable[[], Iterator[dict]]:
    """An epoch factory: clicked train batches whose item is in the catalogue, passed through
    ``transform(features, item_ids)``. The first epoch (the first call with ``count``) adds
    the clicks it reads and those whose item is not in the catalogue to ``skipped``."""
    dataset = clicked_dataset(data_dir, "train", config.data.batch_size, seq_len, shuffle=True,
                              seed=config.data.seed, shuffle_buffer=config.data.shuffle_buffer)
    counted = [False]

    def batches(count: bool = True) -> Iterator[dict]:
        counting = count and not counted[0]
        counted[0] = counted[0] or counting
        for batch in dataset:
            item_ids = batch[schema.ITEM_ID.name].numpy()
            keep = catalogue.contains(item_ids)
            if counting:
                skipped["clicks_seen"] += len(item_ids)
                skipped["clicks_not_in_index"] += int(np.sum(~keep))
            if not keep.any():
                continue
            if not keep.all():
                batch = _take_rows(batch, keep)
            yield transform(batch, item_ids[keep])

    return batches


def _test_batches(config: config_lib.ExperimentConfig, data_dir: str, seq_len: int,
                  batch_size: int) -> Iterator[dict[str, tf.Tensor]]:
    return iter(clicked_dataset(data_dir, "test", batch_size, seq_len, shuffle=False,
                                seed=config.data.seed))


def _warmup_features(config: config_lib.ExperimentConfig, data_dir: str,
                     seq_len: int) -> dict[str, np.ndarray] | None:
    """Query features of a few clicked test impressions, for the exports' warm-up requests."""
    for batch in _test_batches(config, data_dir, seq_len, 8):
        return {name: value.numpy() for name, value in query_features(batch).items()}
    return None


def _report_skipped(config: config_lib.ExperimentConfig, skipped: dict[str, int]) -> None:
    if config.train.verbose and skipped["clicks_not_in_index"]:
        print(f"[{config.name}] {skipped['clicks_not_in_index']} of {skipped['clicks_seen']} "
              "clicked train impressions have an item without a multimodal embedding (not in "
              "the index): not trained on", flush=True)


def _result(config: config_lib.ExperimentConfig, test: dict[str, Any],
            training: Mapping[str, Any], skipped: Mapping[str, Any], data_dir: str,
            seq_len: int, index: dict[str, Any]) -> dict[str, Any]:
    """The metrics.json of a retrieval run (both models): test, training and index sections."""
    return {
        "experiment": config.name, "task": config.task, "test": test,
        "train": {**skipped, **{k: v for k, v in training.items() if k != "train_loss"}},
        "train_loss": training["train_loss"],
        "train_examples_per_sec": training["train_examples_per_sec"],
        "train_seconds": training["train_seconds"],
        "index": index, "data_dir": data_dir, "max_seq_len": seq_len,
    }


def _finish(config: config_lib.ExperimentConfig, model_dir: str, result: dict[str, Any]) -> None:
    with open(os.path.join(model_dir, METRICS_FILE), "w") as f:
        json.dump(result, f, indent=2, default=float)


def run_miss(config: config_lib.ExperimentConfig, model_dir: str,
             data_dir: str | None = None) -> dict[str, Any]:
    """Builds the tree, trains the MISS scorer, evaluates the beam search, exports."""
    data_dir, seq_len, vocabularies, table, catalogue = _prepare(config, model_dir, data_dir)
    retrieval = config.retrieval
    start = time.perf_counter()
    tree = IndexTree.build(catalogue.vectors, catalogue.item_ids, seed=config.data.seed)
    tree_seconds = time.perf_counter() - start
    tree.save(os.path.join(model_dir, TREE_FILE))
    if config.train.verbose:
        print(f"[{config.name}] index tree: {tree} built in {tree_seconds:.1f}s", flush=True)

    scorer = MissNodeScorer(config.model, vocabularies, tree.node_vectors, mm_table=table,
                            mm_dim=table.shape[1], name=f"miss_scorer_{config.name}")
    rng = np.random.default_rng(config.data.seed)
    skipped = {"clicks_seen": 0, "clicks_not_in_index": 0}

    def with_nodes(batch: dict[str, tf.Tensor], item_ids: np.ndarray) -> dict[str, tf.Tensor]:
        nodes, labels = training_nodes(tree, item_ids, retrieval.negatives_per_level, rng)
        return {**query_features(batch), NODE_IDS: tf.constant(nodes),
                NODE_LABELS: tf.constant(labels)}

    batches = _clicked_training_batches(config, data_dir, seq_len, catalogue, skipped,
                                        with_nodes)
    width = tree.depth * (1 + retrieval.negatives_per_level)
    signature = {**serving_signature(seq_len),
                 NODE_IDS: tf.TensorSpec([None, width], tf.int32, name=NODE_IDS),
                 NODE_LABELS: tf.TensorSpec([None, width], tf.float32, name=NODE_LABELS)}
    scorer(next(batches(count=False)))  # creates every weight before the tf.function
    training = _fit(config, batches, scorer, signature)
    _report_skipped(config, skipped)
    tf.train.Checkpoint(model=scorer).write(os.path.join(model_dir, "checkpoints", "final"))

    top_n = min(retrieval.top_n, tree.num_items)
    index = MissTreeIndex(scorer, tree, retrieval.beam_width, top_n)
    levels = list(index.levels)

    @tf.function(input_signature=[serving_signature(seq_len)], autograph=False)
    def search(features: dict[str, tf.Tensor]) -> dict[str, Any]:
        result = index.search(features)
        return {"item_ids": result.item_ids, "kept_nodes": result.kept_nodes}

    kept: list[list[np.ndarray]] = []
    positives: list[np.ndarray] = []

    def record_levels(result: dict[str, Any], targets: np.ndarray) -> None:
        in_tree = in_index(tree.item_ids, targets)
        kept.append([k.numpy()[in_tree] for k in result["kept_nodes"]])
        positives.append(tree.ancestors(targets[in_tree], include_root=True)[:, levels])

    # Bounds the [B, M, L] similarity tensors of one scoring call.
    width_per_level = max(2 * min(retrieval.beam_width, 1 << max(tree.depth - 1, 0)), 1)
    batch_size = max(1, min(config.data.eval_batch_size,
                            _MISS_SCORE_ELEMENTS // (width_per_level * seq_len)))
    evaluation = evaluate_retrieval(search, _test_batches(config, data_dir, seq_len, batch_size),
                                    on_result=record_levels, max_steps=config.train.max_eval_steps)
    test = _test_section(evaluation, catalogue, top_n, batch_size)
    kept_levels = [np.concatenate([k[j] for k in kept]) for j in range(len(levels))]
    all_positives = np.concatenate(positives)
    if len(all_positives):
        per_level = metrics_lib.hierarchical_recall(kept_levels, all_positives)
        test["per_level_recall"] = {str(level): float(value)
                                    for level, value in zip(levels, per_level, strict=True)}
    else:
        test["per_level_recall"] = {}
    test["popularity"] = popularity_recall(click_counts(data_dir)[0], evaluation["targets"],
                                           top_n, len(catalogue))
    result = _result(config, test, training, skipped, data_dir, seq_len, index={
        "kind": "tree", "items": tree.num_items, "depth": tree.depth,
        "nodes": tree.num_nodes, "build_seconds": tree_seconds,
        "beam_width": retrieval.beam_width, "top_n": top_n,
        "start_level": levels[0] if levels else None,
        "catalogue_rows_without_vector": catalogue.dropped})
    if config.train.export:
        result["export_dirs"] = {
            retrieval_export.MISS_MODEL_NAME: retrieval_export.export_retrieval(
                index, os.path.join(model_dir, retrieval_export.EXPORT_DIR,
                                    retrieval_export.MISS_MODEL_NAME),
                k=top_n, max_seq_len=seq_len,
                warmup_features=_warmup_features(config, data_dir, seq_len))}
    _finish(config, model_dir, result)
    return result


def _test_section(evaluation: dict[str, Any], catalogue: Catalogue, k: int,
                  batch_size: int) -> dict[str, Any]:
    targets = evaluation["targets"]
    return {
        **recall_report(evaluation["retrieved"], targets, len(catalogue)),
        "queries": evaluation["queries"],
        "queries_per_sec": evaluation["queries_per_sec"],
        "retrieval_batch_size": batch_size,
        "k": k,
        "targets_not_in_index": int(np.sum(~catalogue.contains(targets))),
    }


def run_two_tower(config: config_lib.ExperimentConfig, model_dir: str,
                  data_dir: str | None = None) -> dict[str, Any]:
    """Trains the two-tower model; evaluates brute-force and ScaNN top-k; exports both."""
    from muse_tf.index.brute_force import brute_force_index

    data_dir, seq_len, vocabularies, table, catalogue = _prepare(config, model_dir, data_dir)
    retrieval = config.retrieval
    model = TwoTowerModel(config.model, retrieval.tower_dim, vocabularies, mm_table=table,
                          mm_dim=table.shape[1], name=f"two_tower_{config.name}")
    skipped = {"clicks_seen": 0, "clicks_not_in_index": 0}

    def as_inputs(batch: dict[str, tf.Tensor], item_ids: np.ndarray) -> dict[str, tf.Tensor]:
        return {**query_features(batch), schema.ITEM_ID.name: batch[schema.ITEM_ID.name]}

    batches = _clicked_training_batches(config, data_dir, seq_len, catalogue, skipped,
                                        as_inputs)
    signature = {**serving_signature(seq_len),
                 schema.ITEM_ID.name: tf.TensorSpec([None], tf.int64, name=schema.ITEM_ID.name)}
    first = next(batches(count=False))
    model(first)
    model.item_tower(first[schema.ITEM_ID.name])
    training = _fit(config, batches, model, signature)
    _report_skipped(config, skipped)
    tf.train.Checkpoint(model=model).write(os.path.join(model_dir, "checkpoints", "final"))

    top_n = min(retrieval.top_n, len(catalogue))
    start = time.perf_counter()
    candidates = model.candidate_embeddings(catalogue.item_ids)
    candidate_seconds = time.perf_counter() - start
    brute_force = brute_force_index(candidates, catalogue.item_ids, top_n,
                                    query_model=model.user_tower)
    batch_size = config.data.eval_batch_size
    bf_search = tf.function(lambda features: brute_force(features, k=top_n),
                            input_signature=[serving_signature(seq_len)], autograph=False)
    evaluation = evaluate_retrieval(bf_search, _test_batches(config, data_dir, seq_len,
                                                             batch_size),
                                    max_steps=config.train.max_eval_steps)
    test = _test_section(evaluation, catalogue, top_n, batch_size)
    test["index"] = "brute_force"
    test["popularity"] = popularity_recall(click_counts(data_dir)[0], evaluation["targets"],
                                           top_n, len(catalogue))
    scann_layer = None
    try:
        from muse_tf.index.scann_index import scann_index

        start = time.perf_counter()
        scann_layer = scann_index(candidates, catalogue.item_ids, top_n,
                                  num_leaves=retrieval.scann_leaves,
                                  num_leaves_to_search=retrieval.scann_leaves_to_search,
                                  num_reordering_candidates=max(4 * top_n, 100),
                                  query_model=model.user_tower)
        scann_build = time.perf_counter() - start
        scann_search = tf.function(lambda features: scann_layer(features, k=top_n),
                                   input_signature=[serving_signature(seq_len)],
                                   autograph=False)
        scann_eval = evaluate_retrieval(
            scann_search, _test_batches(config, data_dir, seq_len, batch_size),
            max_steps=config.train.max_eval_steps)
        scann_test = _test_section(scann_eval, catalogue, top_n, batch_size)
        overlap = np.mean([len(np.intersect1d(a, b)) / top_n for a, b in
                           zip(evaluation["retrieved"], scann_eval["retrieved"], strict=True)])
        scann_test.update(overlap_with_brute_force=float(overlap), build_seconds=scann_build,
                          num_leaves=scann_layer.num_leaves,
                          num_leaves_to_search=scann_layer.num_leaves_to_search,
                          num_reordering_candidates=scann_layer.num_reordering_candidates)
        test["scann"] = scann_test
    except ImportError as err:
        test["scann"] = {"error": str(err)}
    result = _result(config, test, training, skipped, data_dir, seq_len, index={
        "kind": "factorized", "items": len(catalogue), "tower_dim": retrieval.tower_dim,
        "candidate_embedding_seconds": candidate_seconds, "top_n": top_n,
        "catalogue_rows_without_vector": catalogue.dropped})
    if config.train.export:
        export_root = os.path.join(model_dir, retrieval_export.EXPORT_DIR)
        warmup = _warmup_features(config, data_dir, seq_len)
        dirs = {retrieval_export.BRUTE_FORCE_MODEL_NAME: retrieval_export.export_retrieval(
            brute_force, os.path.join(export_root, retrieval_export.BRUTE_FORCE_MODEL_NAME),
            k=top_n, max_seq_len=seq_len, warmup_features=warmup)}
        if scann_layer is not None:
            dirs[retrieval_export.SCANN_MODEL_NAME] = retrieval_export.export_retrieval(
                scann_layer, os.path.join(export_root, retrieval_export.SCANN_MODEL_NAME),
                k=top_n, max_seq_len=seq_len, scann=True, warmup_features=warmup)
        result["export_dirs"] = dirs
    _finish(config, model_dir, result)
    return result


def run_retrieval(config: config_lib.ExperimentConfig, model_dir: str,
                  data_dir: str | DataDir | None = None) -> dict[str, Any]:
    """Train + evaluate (+ export) a retrieval experiment; returns the metrics dict (also
    written to ``MODEL_DIR/metrics.json``)."""
    if config.task == "miss_retrieval":
        return run_miss(config, model_dir, data_dir)
    if config.task == "two_tower":
        return run_two_tower(config, model_dir, data_dir)
    raise ValueError(f"retrieval_train runs task miss_retrieval or two_tower, got "
                     f"task={config.task!r} (experiment {config.name!r})")


def summary_table(result: dict[str, Any]) -> str:
    """The table printed at the end of a retrieval run."""
    from muse_tf.training.runs import markdown_table

    test = result["test"]
    rows = [(result["experiment"], *(test.get(f"recall@{n}") for n in RECALL_CUTOFFS),
             test.get("queries_per_sec"))]
    if "popularity" in test:
        rows.append(("popularity", *(test["popularity"].get(f"recall@{n}")
                                     for n in RECALL_CUTOFFS), None))
    return markdown_table(["method", *(f"recall@{n}" for n in RECALL_CUTOFFS), "queries/s"],
                          rows)
