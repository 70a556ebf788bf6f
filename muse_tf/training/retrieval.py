"""The retrieval runs (``task`` = ``miss_retrieval`` or ``two_tower``): train with Keras ``fit``,
evaluate, export; ``python -m muse_tf.train --experiment miss_retrieval|two_tower``.

Both experiments use the same data and catalogue:

* **Catalogue** = the items of the multimodal (SCL) table. MISS builds its index tree over
  their L2-normalised vectors, straight from the int8 codes (:meth:`IndexTree.build_from_codes`,
  saved as ``MODEL_DIR/index_tree.npz``), learns node rows for the tree's upper levels
  (``retrieval.learned_node_levels``) and, below them, embeds nodes by their items (item ⊕
  category ID embeddings, the categories counted on the train impressions,
  :func:`~muse_tf.training.retrieval_data.item_categories`); the two-tower indexes the same
  items. A clicked item without a multimodal embedding is in
  neither: such training samples are skipped and such test samples count as misses, and both
  are counted exactly in ``metrics.json`` (``train.clicks_seen``,
  ``train.clicks_not_in_index``, ``test.targets_not_in_index``).
* **Training** = clicked train impressions (label 1) whose item is in the catalogue, as a
  repeated tf.data pipeline (:mod:`muse_tf.training.retrieval_data`): MISS adds (user, node)
  targets per example (:class:`~muse_tf.models.miss_retrieval.TrainingNodes`), the two-tower
  learns an in-batch softmax over (user, clicked item) pairs, by default with the logQ
  correction (``retrieval.logq_correction``: each example carries ``q`` of its item, its
  share of the clicks in the index, looked up from the exact train click counts,
  :class:`~muse_tf.training.retrieval_data.SamplingProbabilities`) and
  ``retrieval.temperature``; both are training-only, retrieval scores are ``<u, v>``.
  Keras ``fit`` with the one two-optimizer step
  (:class:`~muse_tf.training.step.TwoOptimizerModel`: Adam ``train.embedding_learning_rate``
  for ID/node embeddings, Adam ``train.dense_learning_rate`` for the rest), under
  ``train.strategy``; every epoch has ``clicks in the index // data.batch_size`` steps (at
  most ``train.max_train_steps``), counted before training; the callbacks of
  :func:`muse_tf.training.runs.fit_callbacks` (TensorBoard, per-epoch checkpoints
  ``checkpoints/ckpt-EE``). ``train.epochs=0`` evaluates the untrained model.
  ``train_loss`` (one value per epoch) is ``History``'s epoch mean of the per-step global
  mean loss, which is also the progress bar's last value of the epoch.
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

Writes ``config.yaml``, ``vocab/``, ``checkpoints/``, ``logs/``, ``metrics.json`` and (with
``train.export``) versioned SavedModels under ``export/`` (:mod:`muse_tf.export.retrieval`).
"""

from __future__ import annotations

import gc
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import tensorflow as tf

from muse_tf import config as config_lib
from muse_tf import metrics as metrics_lib
from muse_tf import schema
from muse_tf.data import reader
from muse_tf.data.data_dir import DataDir
from muse_tf.embeddings.arrays import in_sorted
from muse_tf.export import names
from muse_tf.export import retrieval as retrieval_export
from muse_tf.export.retrieval import serving_signature
from muse_tf.index.tree import IndexTree
from muse_tf.models.factory import ItemTables, build_item_tables
from muse_tf.models.miss_retrieval import (
    NODE_IDS,
    NODE_LABELS,
    QUERY_FEATURES,
    MissNodeScorer,
    MissTreeIndex,
    TrainingNodes,
    learned_levels,
)
from muse_tf.models.two_tower import CANDIDATE_PROBABILITY, TwoTowerModel
from muse_tf.profiling import StageTimer
from muse_tf.training import runs
from muse_tf.training.evaluation import (
    RECALL_CUTOFFS,
    evaluate_retrieval,
    popularity_recall,
    recall_report,
)
from muse_tf.training.retrieval_data import (
    Catalogue,
    ClickCounts,
    KeepFn,
    SamplingProbabilities,
    click_counts,
    clicked_dataset,
    item_categories,
    training_dataset,
)
from muse_tf.training.step import TwoOptimizerModel
from muse_tf.training.strategy import (
    finish_workers,
    is_chief,
    make_strategy,
    make_work_dir,
    worker_role,
)

__all__ = ["TREE_FILE", "Catalogue", "click_counts", "miss_eval_batch_size", "run_retrieval",
           "summary_table"]

TREE_FILE = "index_tree.npz"
#: Cap on B * M * L elements of one MISS scoring call ([B, M, L] similarity tensors).
_MISS_SCORE_ELEMENTS = 1 << 24
_TASKS = ("miss_retrieval", "two_tower")


class _Run:
    """What both retrieval runs share: the opened data, item tables, catalogue, exact click
    counts, the strategy, and the fit / evaluation / result steps."""

    def __init__(self, config: config_lib.ExperimentConfig, model_dir: str,
                 data_dir: str | DataDir | None) -> None:
        config.validate()
        if config.task not in _TASKS:
            raise ValueError(f"the retrieval run takes task miss_retrieval or two_tower, got "
                             f"task={config.task!r} (experiment {config.name!r})")
        self.config = config
        self.model_dir = model_dir
        #: Wall seconds and peak RSS of each part of the run (``metrics.json`` ``stages``).
        self.stages = StageTimer(config.name if config.train.verbose else None)
        with self.stages("prepare"):
            self.data = runs.prepare_run(config, model_dir, data_dir)
        # Before the first TensorFlow op: multi_worker configures the collectives at start-up.
        self.strategy = make_strategy(config.train.strategy)
        self.chief = is_chief(self.strategy)
        self.role = worker_role(self.strategy)
        #: The model directory on the chief, a scratch directory on the other workers.
        self.out_dir = make_work_dir(model_dir, self.strategy)
        with self.stages("item tables"):
            self.tables: ItemTables = build_item_tables(config, self.data, self.out_dir)
        with self.stages("catalogue and clicks"):
            self.catalogue = Catalogue(self.tables.mm_ids, self.tables.mm_vectors)
            if len(self.catalogue) < 2:
                raise ValueError(f"{self.data.path}: the multimodal table holds "
                                 f"{len(self.catalogue)} usable item(s); retrieval needs at "
                                 "least 2")
            self.seq_len = runs.max_seq_len_of(config, self.data)
            self.popular_ids, self.popular_counts = click_counts(self.data, "train")
            self.clicks = ClickCounts.of(self.popular_ids, self.popular_counts, self.catalogue)
        batch = config.data.batch_size
        self.steps = runs.steps_per_epoch(config, self.clicks.clicks_in_index, batch)
        if not self.clicks.clicks_in_index or not self.steps:
            raise ValueError(
                f"{self.data.path}: {self.clicks.clicks_in_index} clicked train impressions "
                f"have their item in the index ({self.clicks.clicks_seen} clicks, "
                f"{self.clicks.clicks_not_in_index} without a multimodal embedding), fewer "
                f"than one batch of data.batch_size={batch}")
        if config.train.verbose and self.clicks.clicks_not_in_index:
            print(f"[{config.name}] {self.clicks.clicks_not_in_index} of "
                  f"{self.clicks.clicks_seen} clicked train impressions have an item without "
                  "a multimodal embedding (not in the index): not trained on", flush=True)

    def release_codes(self) -> None:
        """Drop the host copy of the int8 codes (:attr:`tables` goes, the catalogue keeps
        its ids) once the model's frozen table holds them."""
        del self.tables
        self.catalogue.release_codes()

    def fit(self, build: Callable[[], TwoOptimizerModel], keep: KeepFn,
            add_targets: Callable | None = None) -> tuple[TwoOptimizerModel, dict[str, Any]]:
        """Builds the model under the strategy and trains it with ``fit``."""
        config = self.config
        resume = (runs.Resume(self.model_dir, self.steps, config.train.backup_every_seconds,
                              self.chief)
                  if config.train.resume and config.train.epochs > 0 else None)
        point = None if resume is None else resume.point
        dataset = training_dataset(config, self.data, self.seq_len, keep, add_targets,
                                   skip_batches=0 if point is None else point.steps_done)
        with self.stages("model build"):
            model = runs.compiled_model(config, self.strategy, build, dataset)
        throughput, callbacks = runs.fit_callbacks(self.out_dir, config.data.batch_size,
                                                   resume=resume)
        if resume is not None and config.train.verbose:
            resume.announce(config.name)
        start = time.perf_counter()
        losses: list[float] = []
        if config.train.epochs > 0:  # 0: evaluate the untrained model (fit rejects 0)
            with self.stages("train"), reader.naming_unreadable_shards(self.data, "train"):
                history = model.fit(dataset, epochs=config.train.epochs,
                                    steps_per_epoch=self.steps, callbacks=callbacks,
                                    verbose=config.train.verbose)
            # History's epoch mean of the per-step global mean loss (= the progress bar's
            # last value of each epoch), after those of the epochs before a resume.
            losses = (resume.losses(history) if resume is not None
                      else [float(x) for x in history.history.get("loss", [])])
        # The optimizer slots go before the candidate vectors / the tree's scores are made
        # (with Adam, 1.57 GB in the 35.4M-item two-tower run, measured).
        with self.stages("release optimizer state"):
            model.release_training_state()
        seconds = time.perf_counter() - start
        steps = self.steps * len(losses)
        return model, {
            **({"resumed_from": point.as_dict()} if point is not None else {}),
            "train_loss": losses,
            "train_seconds": seconds, "train_steps_per_epoch": self.steps,
            "train_steps": steps, "train_examples": steps * config.data.batch_size,
            "train_examples_per_sec": throughput.examples_per_sec}

    def test_batches(self, batch_size: int) -> Iterator[dict[str, tf.Tensor]]:
        return iter(clicked_dataset(self.data, "test", batch_size, self.seq_len))

    def warmup_features(self) -> dict[str, np.ndarray] | None:
        """Query features of a few clicked test impressions, for the exports' warm-up."""
        for batch in self.test_batches(8):
            return {name: batch[name].numpy() for name in QUERY_FEATURES}
        return None

    def test_section(self, evaluation: dict[str, Any], k: int, batch_size: int,
                     popularity: bool = True) -> dict[str, Any]:
        targets = evaluation["targets"]
        section = {
            **recall_report(evaluation["retrieved"], targets, len(self.catalogue)),
            "queries": evaluation["queries"],
            "queries_per_sec": evaluation["queries_per_sec"],
            "retrieval_batch_size": batch_size,
            "k": k,
            "targets_not_in_index": int(np.sum(~self.catalogue.contains(targets))),
        }
        if popularity:
            section["popularity"] = popularity_recall(self.popular_ids, targets, k,
                                                      len(self.catalogue))
        return section

    def finish(self, test: dict[str, Any], training: dict[str, Any],
               index: dict[str, Any]) -> dict[str, Any]:
        """The metrics.json of a retrieval run (written by the chief)."""
        return {
            "experiment": self.config.name, "task": self.config.task, "test": test,
            "train": {**self.clicks.as_dict(),
                      **{k: v for k, v in training.items() if k != "train_loss"}},
            "train_loss": training["train_loss"],
            **({"resumed_from": training["resumed_from"]} if "resumed_from" in training
               else {}),
            "train_examples_per_sec": training["train_examples_per_sec"],
            "train_seconds": training["train_seconds"],
            "train_steps_per_epoch": training["train_steps_per_epoch"],
            "index": {**index, "catalogue_rows_without_vector": self.catalogue.dropped},
            "data_dir": self.data.path, "max_seq_len": self.seq_len,
            **({"worker": self.role.as_dict()} if self.role is not None else {}),
        }

    def export(self, model_name: str, index: Any, *, k: int, scann: bool = False,
               warmup_features: dict[str, np.ndarray] | None = None) -> str:
        """Exports ``index`` as ``model_name`` (timed as the stage ``export MODEL``)."""
        with self.stages(f"export {model_name}"):
            return retrieval_export.export_retrieval(
                index, self.export_dir(model_name), k=k, max_seq_len=self.seq_len,
                scann=scann, warmup_features=warmup_features,
                max_batch_size=self.config.train.export_max_batch_size)

    def export_dir(self, model_name: str) -> str:
        """Where this worker exports ``model_name`` (every worker exports: saving is
        collective under multi_worker; the chief into the model directory, the others into
        their scratch directories)."""
        return names.retrieval_base_path(self.out_dir, model_name)

    def end(self, result: dict[str, Any], export_dirs: dict[str, str] | None) -> dict[str, Any]:
        """The chief writes ``metrics.json`` (with the export directories); then every
        worker meets the others (:func:`~muse_tf.training.strategy.finish_workers`)."""
        if self.chief:
            if export_dirs is not None:
                result["export_dirs"] = export_dirs
            result["stages"] = self.stages.as_dict()
            runs.write_metrics(self.model_dir, result)
        finish_workers(self.strategy, self.model_dir)
        return result


def miss_eval_batch_size(eval_batch_size: int, beam_width: int, depth: int,
                         seq_len: int) -> int:
    """Queries per MISS beam-search call: ``eval_batch_size``, capped so that one level's
    ``[B, M, L]`` score tensors (``M = 2 * beam_width`` candidate nodes, ``L = seq_len``) hold
    at most ``2**24`` elements (83 queries at beam 100, L = 1,000)."""
    width_per_level = max(2 * min(beam_width, 1 << max(depth - 1, 0)), 1)
    return max(1, min(eval_batch_size,
                      _MISS_SCORE_ELEMENTS // (width_per_level * max(seq_len, 1))))


def _layout_of(tree: IndexTree) -> IndexTree:
    """``tree``'s layout (leaves, items, levels: what training targets, the beam search and
    its bookkeeping read) without its vectors (zero-width, :meth:`IndexTree.from_parts`), so
    that the tree no longer holds the int8 codes nor its stored means."""
    return IndexTree.from_parts(tree.leaf_item_ids, tree.leaf_valid,
                                np.zeros((0, 0), np.float32),
                                np.zeros((tree.num_items, 0), np.float32))


def run_miss(config: config_lib.ExperimentConfig, model_dir: str,
             data_dir: str | DataDir | None = None) -> dict[str, Any]:
    """Builds the tree, trains the MISS scorer, evaluates the beam search, exports."""
    run = _Run(config, model_dir, data_dir)
    retrieval, catalogue, tables = config.retrieval, run.catalogue, run.tables
    with run.stages("tree build"):
        # From the int8 codes by reference: no float32 copy of the catalogue (18 GB at 35.4M).
        tree = IndexTree.build_from_codes(catalogue.codes, catalogue.item_ids,
                                          code_rows=catalogue.code_rows, seed=config.data.seed)
    tree_seconds = run.stages.seconds("tree build")
    if run.chief:
        tree.save(os.path.join(model_dir, TREE_FILE))
    if config.train.verbose:
        print(f"[{config.name}] index tree: {tree} built in {tree_seconds:.1f}s", flush=True)

    with run.stages("training nodes"):
        targets = TrainingNodes(tree, retrieval.negatives_per_level)
    seed = tf.constant(config.data.seed, tf.int64)

    def with_nodes(batch: dict[str, tf.Tensor], step: tf.Tensor) -> dict[str, tf.Tensor]:
        nodes, labels = targets(batch[schema.ITEM_ID.name], tf.stack([seed, step]))
        return {**{name: batch[name] for name in QUERY_FEATURES},
                NODE_IDS: nodes, NODE_LABELS: labels}

    learned = learned_levels(tree.depth, retrieval.learned_node_levels)
    # Only the scorer's build reads the tree's vectors, the host codes and the items'
    # categories (nodes below the learned levels embed their items: item ⊕ category); once
    # its weights hold them they go (N * D bytes of codes and the stored means: 5.6 GB at
    # 35.4M items), before training. The run keeps the tree's layout.
    for_build = {"tree": tree, "vocabularies": tables.vocabularies, "mm_table": tables.mm_table,
                 "mm_dim": tables.mm_dim, "categories": (
                     item_categories(run.data, "train") if learned < tree.depth else None)}
    del tables
    tree = _layout_of(tree)

    def build() -> MissNodeScorer:
        full_tree = for_build.pop("tree")

        def release() -> None:
            """The frozen table holds the codes: the run's, the catalogue's and the tree's
            references go before the node tables and the optimiser slots are allocated."""
            run.release_codes()
            full_tree.release_item_vectors()

        # Popped, not held here: the codes must have no holder in this frame when released.
        return MissNodeScorer(config.model, for_build.pop("vocabularies"), tree=full_tree,
                              learned_node_levels=learned,
                              item_categories=for_build.pop("categories"),
                              mm_table=for_build.pop("mm_table"),
                              mm_dim=for_build.pop("mm_dim"), release_item_codes=release,
                              name=f"miss_scorer_{config.name}")

    scorer, training = run.fit(build, keep=targets.contains, add_targets=with_nodes)

    top_n = min(retrieval.top_n, tree.num_items)
    index = MissTreeIndex(scorer, tree, retrieval.beam_width, top_n)
    levels = list(index.levels)

    @tf.function(input_signature=[serving_signature(run.seq_len)], autograph=False)
    def search(features: dict[str, tf.Tensor]) -> dict[str, Any]:
        result = index.search(features)
        return {"item_ids": result.item_ids, "kept_nodes": result.kept_nodes}

    kept: list[list[np.ndarray]] = []
    positives: list[np.ndarray] = []

    def record_levels(result: dict[str, Any], queried: np.ndarray) -> None:
        in_tree = in_sorted(tree.item_ids, queried)
        kept.append([k.numpy()[in_tree] for k in result["kept_nodes"]])
        positives.append(tree.ancestors(queried[in_tree], include_root=True)[:, levels])

    batch_size = miss_eval_batch_size(config.data.eval_batch_size, retrieval.beam_width,
                                      tree.depth, run.seq_len)
    with run.stages("test evaluation"):
        evaluation = evaluate_retrieval(search, run.test_batches(batch_size),
                                        on_result=record_levels,
                                        max_steps=config.train.max_eval_steps)
    test = run.test_section(evaluation, top_n, batch_size)
    all_positives = np.concatenate(positives)
    test["per_level_recall"] = {}
    if len(all_positives):
        kept_levels = [np.concatenate([k[j] for k in kept]) for j in range(len(levels))]
        per_level = metrics_lib.hierarchical_recall(kept_levels, all_positives)
        test["per_level_recall"] = {str(level): float(value)
                                    for level, value in zip(levels, per_level, strict=True)}
    result = run.finish(test, training, index={
        "kind": "tree", "items": tree.num_items, "depth": tree.depth,
        "nodes": tree.num_nodes, "build_seconds": tree_seconds,
        "beam_width": retrieval.beam_width, "top_n": top_n,
        "start_level": levels[0] if levels else None})
    dirs = None
    if config.train.export:
        dirs = {retrieval_export.MISS_MODEL_NAME: run.export(
            retrieval_export.MISS_MODEL_NAME, index, k=top_n,
            warmup_features=run.warmup_features())}
    return run.end(result, dirs)


def _search_function(index: Any, k: int, seq_len: int) -> Callable:
    """``index``'s top-``k`` of query features, traced once for the serving signature."""
    return tf.function(lambda features: index(features, k=k),
                       input_signature=[serving_signature(seq_len)], autograph=False)


def run_two_tower(config: config_lib.ExperimentConfig, model_dir: str,
                  data_dir: str | DataDir | None = None) -> dict[str, Any]:
    """Trains the two-tower model; evaluates brute-force and ScaNN top-k; exports both."""
    from muse_tf.index.brute_force import brute_force_index

    run = _Run(config, model_dir, data_dir)
    retrieval, catalogue = config.retrieval, run.catalogue
    add_probability = None
    if retrieval.logq_correction:
        # q of the items the pipeline keeps (clicked train items in the catalogue).
        sampling = SamplingProbabilities(run.popular_ids, run.popular_counts,
                                         keep=catalogue.contains(run.popular_ids))

        def add_probability(batch: dict[str, tf.Tensor], step: tf.Tensor
                            ) -> dict[str, tf.Tensor]:
            del step  # the lookup is deterministic
            return {**batch,
                    CANDIDATE_PROBABILITY: sampling.lookup_op(batch[schema.ITEM_ID.name])}

    model, training = run.fit(
        lambda: TwoTowerModel(config.model, retrieval.tower_dim, run.tables.vocabularies,
                              mm_table=run.tables.mm_table, mm_dim=run.tables.mm_dim,
                              temperature=retrieval.temperature,
                              logq_correction=retrieval.logq_correction,
                              name=f"two_tower_{config.name}"),
        keep=catalogue.contains_op, add_targets=add_probability)

    # The model's frozen table holds the codes now: the host copy goes before the candidate
    # matrix and the indexes are built (at 35.4M items 4.5 GB of the ~20 GB the ScaNN build
    # would otherwise need beside it).
    with run.stages("release host codes"):
        run.release_codes()
    top_n = min(retrieval.top_n, len(catalogue))
    with run.stages("candidate embeddings"):
        candidates = model.candidate_embeddings(catalogue.item_ids)
    brute_force = brute_force_index(candidates, catalogue.item_ids, top_n,
                                    query_model=model.user_tower)
    batch_size = config.data.eval_batch_size
    bf_search = _search_function(brute_force, top_n, run.seq_len)
    with run.stages("test evaluation, brute force"):
        evaluation = evaluate_retrieval(bf_search, run.test_batches(batch_size),
                                        max_steps=config.train.max_eval_steps)
    test = run.test_section(evaluation, top_n, batch_size)
    test["index"] = "brute_force"
    dirs: dict[str, str] | None = None
    warmup = run.warmup_features() if config.train.export else None
    if config.train.export:
        dirs = {retrieval_export.BRUTE_FORCE_MODEL_NAME: run.export(
            retrieval_export.BRUTE_FORCE_MODEL_NAME, brute_force, k=top_n,
            warmup_features=warmup)}
    scann_layer = None
    try:
        from muse_tf.index.scann_index import reordering_candidates, scaled_tree, scann_index

        # ScaNN trains on copies of its input (2.1x its bytes above it: 9.4 GB at 35.4M x
        # 32), so the candidate matrix leaves memory first: spilled to a scratch file that
        # the build reads through a read-only map (pages the kernel can drop), and the
        # brute-force index that shared it is done (evaluated, exported) and freed.
        with tempfile.TemporaryDirectory(prefix="candidates_", dir=run.out_dir) as scratch:
            with run.stages("spill candidates"):
                spilled = os.path.join(scratch, "candidates.npy")
                np.save(spilled, candidates)
                del brute_force, bf_search, candidates
                gc.collect()
            # The configured tree up to 100^2 items, ~sqrt(N) leaves above (scaled_tree).
            leaves, to_search = scaled_tree(len(catalogue), retrieval.scann_leaves,
                                            retrieval.scann_leaves_to_search)
            with run.stages("ScaNN build"):
                scann_layer = scann_index(np.load(spilled, mmap_mode="r"), catalogue.item_ids,
                                          top_n, num_leaves=leaves,
                                          num_leaves_to_search=to_search,
                                          num_reordering_candidates=reordering_candidates(
                                              len(catalogue), top_n),
                                          query_model=model.user_tower)
        scann_search = _search_function(scann_layer, top_n, run.seq_len)
        with run.stages("test evaluation, ScaNN"):
            scann_eval = evaluate_retrieval(scann_search, run.test_batches(batch_size),
                                            max_steps=config.train.max_eval_steps)
        scann_test = run.test_section(scann_eval, top_n, batch_size, popularity=False)
        overlap = np.mean([len(np.intersect1d(a, b)) / top_n for a, b in
                           zip(evaluation["retrieved"], scann_eval["retrieved"], strict=True)])
        scann_test.update(overlap_with_brute_force=float(overlap),
                          build_seconds=run.stages.seconds("ScaNN build"),
                          **scann_layer.describe())
        test["scann"] = scann_test
    except ImportError as err:
        test["scann"] = {"error": str(err)}
    result = run.finish(test, training, index={
        "kind": "factorized", "items": len(catalogue), "tower_dim": retrieval.tower_dim,
        "candidate_embedding_seconds": run.stages.seconds("candidate embeddings"),
        "top_n": top_n})
    if dirs is not None and scann_layer is not None:
        dirs[retrieval_export.SCANN_MODEL_NAME] = run.export(
            retrieval_export.SCANN_MODEL_NAME, scann_layer, k=top_n, scann=True,
            warmup_features=warmup)
    return run.end(result, dirs)


def run_retrieval(config: config_lib.ExperimentConfig, model_dir: str,
                  data_dir: str | DataDir | None = None) -> dict[str, Any]:
    """Train + evaluate (+ export) a retrieval experiment; returns the metrics dict (also
    written to ``MODEL_DIR/metrics.json``)."""
    if config.task == "miss_retrieval":
        return run_miss(config, model_dir, data_dir)
    if config.task == "two_tower":
        return run_two_tower(config, model_dir, data_dir)
    raise ValueError(f"the retrieval run takes task miss_retrieval or two_tower, got "
                     f"task={config.task!r} (experiment {config.name!r})")


def summary_table(result: dict[str, Any]) -> str:
    """The table printed at the end of a retrieval run."""
    test = result["test"]
    rows = [(result["experiment"], *(test.get(f"recall@{n}") for n in RECALL_CUTOFFS),
             test.get("queries_per_sec"))]
    if "popularity" in test:
        rows.append(("popularity", *(test["popularity"].get(f"recall@{n}")
                                     for n in RECALL_CUTOFFS), None))
    return runs.markdown_table(["method", *(f"recall@{n}" for n in RECALL_CUTOFFS),
                                "queries/s"], rows)
