"""MISS tree beam search throughput (issue #12): the previous scoring path beside the current
one, in the same run, on a synthetic catalogue.

``python -m muse_tf.bench_miss [--items 50000] [--queries 166] [--repeats 3]``

What it builds (no data directory needed): ``items`` items with clustered int8 SCL codes
(``dim`` = 128, 64 clusters) and 500 categories, their index tree (:meth:`IndexTree.build`:
50,000 items give depth 16), an initialised :class:`~muse_tf.models.miss_retrieval.
MissNodeScorer` of the ``miss_retrieval`` experiment's model, and ``queries`` users whose
``seq_len``-long histories (9 in 10 full, the rest 50-100 %; 600 distinct items per user, so
repeats and score ties occur as in TAOBAO-MM) come from three clusters each.

What it measures, both paths over the same query batches (``batch_size`` per call, by default
the evaluation cap of :func:`~muse_tf.training.retrieval.miss_eval_batch_size`, 83 queries at
beam 100 and L = 1,000), alternating which runs first, ``repeats`` times; medians:

* ``previous``: the scorer with ``encode_user(search_keys=False)``: every level re-reads the
  history's int8 codes from the multimodal table for the MM-GSU, masks both score tensors and
  keeps MM-GSU off Co-GSU's picks through an ``[B, M, L]`` scatter mask (the path before
  issue #12);
* ``current``: :meth:`MissTreeIndex.search`: the GSU's search keys (ID embeddings and unit
  vectors with the mask folded in as a ``0 / -inf`` column) made once per user, then per
  level one matrix product and one top-K per search and a scatter of Co-GSU's picks.

Queries/s = queries / wall seconds of the search calls (tracing excluded); CPU s/query is the
process CPU time of the same calls (less sensitive to a shared machine than wall time).
``top_k_only`` times nothing but the GSU selections both paths make: two ``TopKV2`` (k = 25)
over ``[B, 2 * beam_width, L]`` per searched level and batch, on random scores; no exact
path that selects with ``tf.math.top_k`` answers faster than that.
recall@``recall_k`` of both is measured against the same ground truth: the scorer's exact
top-``recall_k`` items over every item leaf (exhaustive scoring) for the first
``recall_queries`` queries, i.e. how much of what this scorer would retrieve from the whole
catalogue the beam finds. ``same_items`` is the share of identical item ids (same rank) of
the two paths' results over all queries and ``max_score_diff`` their largest score gap.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from muse_tf import config as config_lib
from muse_tf import schema
from muse_tf.bench_common import print_table
from muse_tf.data.artifacts import write_vocabulary_file
from muse_tf.embeddings import Vocabulary
from muse_tf.embeddings.arrays import normalise_rows
from muse_tf.embeddings.vocabulary import multimodal_codes
from muse_tf.export.retrieval import serving_signature
from muse_tf.index.beam_search import tree_beam_search
from muse_tf.index.tree import IndexTree
from muse_tf.models.miss_retrieval import NODE_IDS, MissNodeScorer, MissTreeIndex
from muse_tf.training.retrieval import miss_eval_batch_size

__all__ = ["bench_miss", "main"]

_CLUSTERS = 64
_CATEGORIES = 500
_ATTRIBUTE_IDS = 100
_DISTINCT_PER_USER = 600
#: Tree nodes scored per exhaustive-scoring call (the ground truth), per query.
_TRUTH_NODES = 2048

Features = dict[str, tf.Tensor]


def _catalogue(items: int, dim: int, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(item ids int64 [N], int8 codes [N, dim], cluster of each item [N])."""
    item_ids = rng.choice(np.arange(1, 20 * items + 1), items, replace=False).astype(np.int64)
    centres = rng.normal(size=(_CLUSTERS, dim))
    clusters = rng.integers(0, _CLUSTERS, items)
    vectors = centres[clusters] + 0.6 * rng.normal(size=(items, dim))
    codes = np.round(vectors / np.abs(vectors).max(axis=1, keepdims=True) * 127)
    return item_ids, codes.astype(np.int8), clusters


def _vocabularies(directory: str, item_ids: np.ndarray) -> dict[str, Vocabulary]:
    """Every schema vocabulary as a file under ``directory`` (every id embedded)."""
    out = {}
    for name in schema.vocabularies():
        if name == schema.ITEM_ID.vocabulary:
            ids = item_ids
        elif name == schema.ITEM_CATEGORY.vocabulary:
            ids = np.arange(1, _CATEGORIES + 1, dtype=np.int64)
        else:
            ids = np.arange(1, _ATTRIBUTE_IDS + 1, dtype=np.int64)
        path = os.path.join(directory, f"{name}.tsv")
        write_vocabulary_file(path, ids, np.ones(len(ids), np.int64))
        out[name] = Vocabulary(name, path, len(ids), len(ids))
    return out


def _queries(item_ids: np.ndarray, clusters: np.ndarray, count: int, seq_len: int,
             rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Users with histories from three clusters each (padded, oldest first)."""
    by_cluster = [item_ids[clusters == c] for c in range(_CLUSTERS)]
    category_of = rng.integers(1, _CATEGORIES + 1, len(item_ids))
    position = {int(i): k for k, i in enumerate(item_ids)}
    lengths = np.where(rng.random(count) < 0.9, seq_len,
                       rng.integers(seq_len // 2, seq_len + 1, count)).astype(np.int32)
    items = np.zeros((count, seq_len), np.int64)
    categories = np.zeros((count, seq_len), np.int64)
    for u in range(count):
        pool = np.concatenate([by_cluster[c] for c in rng.choice(_CLUSTERS, 3, replace=False)])
        distinct = rng.choice(pool, min(_DISTINCT_PER_USER, len(pool)), replace=False)
        history = rng.choice(distinct, lengths[u])
        items[u, :lengths[u]] = history
        categories[u, :lengths[u]] = category_of[[position[int(i)] for i in history]]
    out = {schema.HISTORY_ITEM_ID.name: items, schema.HISTORY_CATEGORY.name: categories,
           schema.HISTORY_LENGTH: lengths}
    for feature in schema.USER_SIDE_FEATURES:
        out[feature.name] = rng.integers(1, _ATTRIBUTE_IDS + 1, count).astype(np.int64)
    return out


def _batches(queries: dict[str, np.ndarray], batch_size: int) -> list[Features]:
    count = len(queries[schema.HISTORY_LENGTH])
    return [{name: tf.constant(value[start:start + batch_size])
             for name, value in queries.items()} for start in range(0, count, batch_size)]


def _search_functions(index: MissTreeIndex, seq_len: int
                      ) -> dict[str, Callable[[Features], tuple[tf.Tensor, tf.Tensor]]]:
    """``{"previous": ..., "current": ...}``: query features -> (item ids, scores)."""
    scorer = index.scorer

    def previous(features: Features) -> tuple[tf.Tensor, tf.Tensor]:
        user = scorer.encode_user(features, search_keys=False)
        result = tree_beam_search(
            lambda nodes: scorer.score_nodes(user, nodes), index.tree_tensors,
            index.beam_width, index.top_n, index.start_level,
            batch_size=tf.shape(features[schema.HISTORY_LENGTH])[0])
        return result.item_ids, result.scores

    def current(features: Features) -> tuple[tf.Tensor, tf.Tensor]:
        result = index.search(features)
        return result.item_ids, result.scores

    signature = [serving_signature(seq_len)]
    return {name: tf.function(fn, input_signature=signature, autograph=False)
            for name, fn in (("previous", previous), ("current", current))}


def _run(search: Callable[[Features], tuple[tf.Tensor, tf.Tensor]],
         batches: list[Features]) -> tuple[float, float, np.ndarray, np.ndarray]:
    """(wall s, CPU s, item ids [Q, top_n], scores [Q, top_n]) of one pass over ``batches``."""
    ids, scores = [], []
    wall, cpu = time.perf_counter(), time.process_time()
    for batch in batches:
        item_ids, item_scores = search(batch)
        ids.append(item_ids.numpy())
        scores.append(item_scores.numpy())
    return (time.perf_counter() - wall, time.process_time() - cpu, np.concatenate(ids),
            np.concatenate(scores))


def _top_k_floor(batches: list[Features], levels: int, width: int, seq_len: int, k: int,
                 rng: np.random.Generator) -> tuple[float, float]:
    """(wall s, CPU s) of the GSU selections alone: per batch and level two ``TopKV2`` of
    ``k`` over ``[B, width, seq_len]`` random scores, i.e. what any exact path that selects
    with ``tf.math.top_k`` pays at least."""
    select = tf.function(lambda scores: tf.math.top_k(scores, k=k).indices, autograph=False)
    inputs = {len(b[schema.HISTORY_LENGTH]): tf.constant(
        rng.standard_normal((len(b[schema.HISTORY_LENGTH]), width, seq_len)).astype(np.float32))
        for b in batches}
    for scores in inputs.values():
        select(scores).numpy()  # traces: not timed
    wall, cpu = time.perf_counter(), time.process_time()
    for batch in batches:
        for _ in range(2 * levels):
            select(inputs[len(batch[schema.HISTORY_LENGTH])]).numpy()
    return time.perf_counter() - wall, time.process_time() - cpu


def _exhaustive_scorer(scorer: MissNodeScorer
                       ) -> Callable[[Features, tf.Tensor], tf.Tensor]:
    """``(query features, node ids [B, M]) -> logits [B, M]`` (the current path)."""
    return tf.function(lambda features, nodes: scorer.score_nodes(scorer.encode_user(features),
                                                                  nodes), autograph=False)


def _exhaustive_top(score: Callable[[Features, tf.Tensor], tf.Tensor], tree: IndexTree,
                    batch: Features, k: int) -> np.ndarray:
    """Item ids ``[B, k]``: the scorer's exact top-``k`` over every item leaf (ties: leaf
    order, as the beam's top-K)."""
    leaves = np.asarray(tree.valid_leaf_nodes, np.int32)
    queries = int(batch[schema.HISTORY_LENGTH].shape[0])
    logits = np.concatenate([
        score(batch, tf.constant(np.tile(leaves[start:start + _TRUTH_NODES], (queries, 1))))
        .numpy() for start in range(0, len(leaves), _TRUTH_NODES)], axis=1)
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return tree.items_of_leaves(leaves[order])


def _recall(retrieved: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(np.intersect1d(r[:k], t)) / k
                          for r, t in zip(retrieved, truth, strict=True)]))


def bench_miss(items: int = 50_000, seq_len: int = 1000, beam_width: int = 100,
               top_n: int = 200, queries: int = 166, batch_size: int | None = None,
               repeats: int = 3, recall_k: int = 100, recall_queries: int = 16,
               dim: int = schema.MM_EMBEDDING_DIM, seed: int = 0,
               work_dir: str | None = None, verbose: bool = True) -> dict[str, Any]:
    """Beam search queries/s and recall@``recall_k`` of the previous and the current MISS
    scoring path (module docstring); prints a table with
    :func:`~muse_tf.bench_common.print_table` when ``verbose``.

    Returns:
      ``{"items", "depth", "levels", "beam_width", "top_n", "seq_len", "batch_size",
      "queries", "previous": {...}, "current": {...}, "top_k_only": {...}, "speedup",
      "cpu_speedup", "same_items", "max_score_diff", "recall_queries", "setup_seconds"}``;
      each path's dict has ``queries_per_sec``, ``cpu_seconds_per_query`` (medians) and
      ``seconds`` (every repeat), the two searches' also ``recall@<recall_k>``.
    """
    if not 1 <= recall_k <= top_n:
        raise ValueError(f"recall_k={recall_k} must be in [1, top_n={top_n}]")
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    item_ids, codes, clusters = _catalogue(items, dim, rng)
    tree = IndexTree.build(normalise_rows(codes), item_ids, seed=seed)
    top_n = min(top_n, tree.num_items)
    batch_size = batch_size or miss_eval_batch_size(queries, beam_width, tree.depth, seq_len)
    with tempfile.TemporaryDirectory(dir=work_dir) as directory:
        vocabularies = _vocabularies(directory, item_ids)
        tf.keras.utils.set_random_seed(seed)
        model = config_lib.get_experiment("miss_retrieval").model
        scorer = MissNodeScorer(model, vocabularies, tree.node_vectors,
                                mm_table=multimodal_codes(item_ids, item_ids, codes),
                                mm_dim=dim, name="miss_scorer_bench")
        query_features = _queries(item_ids, clusters, queries, seq_len, rng)
        batches = _batches(query_features, batch_size)
        scorer({**{k: v[:1] for k, v in batches[0].items()},
                NODE_IDS: tf.zeros([1, 1], tf.int32)})  # builds every weight
        index = MissTreeIndex(scorer, tree, beam_width, top_n)
        searches = _search_functions(index, seq_len)
        for search in searches.values():
            search(batches[0])  # traces: not timed
        setup_seconds = time.perf_counter() - start
        walls: dict[str, list[float]] = {name: [] for name in searches}
        cpus: dict[str, list[float]] = {name: [] for name in searches}
        results: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for repeat in range(repeats):
            order = list(searches) if repeat % 2 == 0 else list(searches)[::-1]
            for name in order:
                wall, cpu, ids, scores = _run(searches[name], batches)
                walls[name].append(wall)
                cpus[name].append(cpu)
                results.setdefault(name, (ids, scores))
            if verbose:
                print(f"[bench miss] repeat {repeat + 1}/{repeats}: " + ", ".join(
                    f"{name} {walls[name][-1]:.1f}s" for name in searches), flush=True)
        floor = [_top_k_floor(batches, len(index.levels), 2 * beam_width, seq_len,
                              model.top_k - model.top_k // 2, rng) for _ in range(repeats)]
        truth_queries = min(recall_queries, queries)
        exhaustive = _exhaustive_scorer(scorer)
        truth = np.concatenate([
            _exhaustive_top(exhaustive, tree, batch, recall_k) for batch in
            _batches({k: v[:truth_queries] for k, v in query_features.items()}, 8)])
    paths = {}
    for name in searches:
        paths[name] = {
            "queries_per_sec": queries / statistics.median(walls[name]),
            "cpu_seconds_per_query": statistics.median(cpus[name]) / queries,
            "seconds": walls[name],
            f"recall@{recall_k}": _recall(results[name][0][:truth_queries], truth)}
    paths["top_k_only"] = {
        "queries_per_sec": queries / statistics.median(wall for wall, _ in floor),
        "cpu_seconds_per_query": statistics.median(cpu for _, cpu in floor) / queries,
        "seconds": [wall for wall, _ in floor]}
    (previous_ids, previous_scores), (current_ids, current_scores) = (
        results["previous"], results["current"])
    finite = np.isfinite(previous_scores) & np.isfinite(current_scores)
    score_gap = np.abs(previous_scores[finite] - current_scores[finite])
    out = {
        "items": tree.num_items, "depth": tree.depth, "levels": len(index.levels),
        "beam_width": beam_width, "top_n": top_n, "seq_len": seq_len,
        "batch_size": batch_size, "queries": queries, **paths,
        "speedup": paths["current"]["queries_per_sec"] / paths["previous"]["queries_per_sec"],
        "cpu_speedup": (paths["previous"]["cpu_seconds_per_query"]
                        / paths["current"]["cpu_seconds_per_query"]),
        "same_items": float(np.mean(previous_ids == current_ids)),
        "max_score_diff": float(np.max(score_gap, initial=0.0)),
        "recall_queries": truth_queries, "setup_seconds": setup_seconds,
    }
    if verbose:
        print_table(
            f"MISS beam search: {tree.num_items:,} items (depth {tree.depth}, {out['levels']} "
            f"levels searched), beam {beam_width}, L = {seq_len}, {queries} queries in "
            f"batches of {batch_size}, median of {repeats}",
            [{"path": name, "queries/s": paths[name]["queries_per_sec"],
              "CPU s/query": paths[name]["cpu_seconds_per_query"],
              f"recall@{recall_k} (vs exhaustive, {truth_queries} queries)":
                  paths[name].get(f"recall@{recall_k}", "-")} for name in paths])
        print(f"speedup {out['speedup']:.2f}x (CPU time {out['cpu_speedup']:.2f}x); same item "
              f"ids {out['same_items']:.4f}; max |score difference| "
              f"{out['max_score_diff']:.2e}; top_k_only: the {2 * out['levels']} GSU top-Ks "
              "per batch alone", flush=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--seq-len", type=int, default=1000)
    parser.add_argument("--beam-width", type=int, default=100)
    parser.add_argument("--top-n", type=int, default=200)
    parser.add_argument("--queries", type=int, default=166)
    parser.add_argument("--batch-size", type=int, default=0, help="0: the evaluation cap")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--recall-k", type=int, default=100)
    parser.add_argument("--recall-queries", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    bench_miss(items=args.items, seq_len=args.seq_len, beam_width=args.beam_width,
               top_n=args.top_n, queries=args.queries, batch_size=args.batch_size or None,
               repeats=args.repeats, recall_k=args.recall_k,
               recall_queries=args.recall_queries, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
