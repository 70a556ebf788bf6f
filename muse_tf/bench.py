"""Benchmarks: ``python -m muse_tf.bench WHAT``, WHAT one of the sections below or ``all``.

Every figure is measured in the same run as the figure it is compared with (medians over
repeats; ratios printed beside them), because the machines here are shared and noisy.

* ``data``: generate ``--samples`` impressions with ``--seq-len``-long histories, convert them
  with the Beam pipeline (FnApiRunner, ``--workers`` processes) and read them back with the
  tf.data reader. Targets on a 2-core machine: 100K samples in <= 120 s; >= 10,000 read/s.
* ``train``: training examples/s of ``muse`` and ``din`` at history length 1,000 (target:
  >= 3,000/s for ``muse`` on 2 CPU cores).
* ``gsu``: the multimodal GSU (cosine + masked top-K) at L = 1,000 / 10,000 / 100,000 beside a
  NumPy matmul of the same shape and a TF einsum (target: GSU within 1.5x of the matmul); and
  over a ``--table-rows`` frozen table: int8 codes (the default storage) beside float32 unit
  vectors and NumPy's fp32 gather + matmul, with the table bytes read per second and the
  share of equal top-K indices.
* ``mm_table``: peak RSS of building the frozen multimodal table of ``--rows`` (5M) items
  from int8 arrays (vocabulary mapping + chunked load), against the int8 table's bytes
  (target: <= 1.5x); ``--storage float32`` for the float table.
* ``serving``: gRPC latency (p50/p99) and throughput of the exported ranker through the local
  PredictionService server, C = 100 candidates, L = 1,000 / 10,000 (/ 100,000), 1 and 8
  concurrent clients (target: p99 <= 50 ms for C = 100, L = 1,000, one client).
* ``scann``: ScaNN vs brute-force top-100 over a synthetic 1M-item catalogue (overlap and
  queries/s; target: overlap >= 0.95 at >= 5x the brute-force queries/s).
* ``optimizer``: one step of the embeddings' ``LazyAdam`` beside tf-keras ``Adam`` on one
  16-d table updated from a ``--batch-size`` x ``--ids-per-example`` (256 x 1,051) id batch,
  at ``--rows`` (10K and 10M) vocabulary rows: ms/step (median of ``--optimizer-steps``), the
  ratio and the bytes each touches per step.
* ``scale``: the whole path (generate, Beam, model build, train steps, test evaluation, export,
  server load, first answer, index tree) at ``--items`` catalogue items (TAOBAO-MM: 35.4M),
  ``--users`` users and ``--samples`` samples, every stage in its own process with its wall
  seconds and peak RSS beside the issue's limits (:mod:`muse_tf.bench_scale`; not in ``all``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from muse_tf import schema
from muse_tf.bench_common import print_table as _print
from muse_tf.bench_common import ranking_request as _ranking_request
from muse_tf.profiling import reset_peak_rss, rss_bytes


def _median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ----------------------------------------------------------------------------- data
def bench_data(samples: int, seq_len: int, workers: int, work_dir: str,
               read_seconds: float = 20.0) -> dict[str, Any]:
    from beam import build_dataset
    from muse_tf.data import reader, synthetic

    users = max(1, samples // 10)
    raw = os.path.join(work_dir, "raw")
    out = os.path.join(work_dir, "data")
    start = time.perf_counter()
    counts = synthetic.generate(raw, users=users, items=max(1000, samples), seq_len=seq_len,
                                seed=1, samples_per_user=10.0, overwrite=True)
    generate_s = time.perf_counter() - start
    rows_in = counts[synthetic.TRAIN_SAMPLES] + counts[synthetic.TEST_SAMPLES]
    args = ["--input", raw, "--output", out, "--max-seq-len", str(seq_len), "--overwrite"]
    if workers > 1:
        args += ["--direct_num_workers", str(workers),
                 "--direct_running_mode", "multi_processing"]
    start = time.perf_counter()
    metadata = build_dataset.run(args)
    beam_s = time.perf_counter() - start
    written = sum(metadata["splits"][s]["examples_written"] for s in ("train", "test"))

    dataset = reader.make_dataset(out, "train", 256, max_seq_len=seq_len, shuffle=True,
                                  repeat=True)
    iterator = iter(dataset)
    next(iterator)
    examples, start = 0, time.perf_counter()
    while time.perf_counter() - start < read_seconds:
        batch = next(iterator)
        examples += int(batch[schema.ITEM_ID.name].shape[0])
    read_rate = examples / (time.perf_counter() - start)
    result = {
        "samples": rows_in, "seq_len": seq_len, "generate_s": generate_s,
        "beam_workers": workers, "beam_s": beam_s, "beam_rows_per_s": rows_in / beam_s,
        "examples_written": written, "beam_target_s": 120.0 * rows_in / 100_000,
        "read_examples_per_s": read_rate, "read_target_per_s": 10_000.0,
    }
    _print("data: Beam conversion and tf.data read", [result])
    return result


# ----------------------------------------------------------------------------- train
def bench_train(data_dir: str | None, experiments: Sequence[str], steps: int,
                batch_size: int, seq_len: int, work_dir: str) -> list[dict[str, Any]]:
    from muse_tf import config as config_lib
    from muse_tf.data import reader
    from muse_tf.models.factory import build_ranking_model

    if not data_dir:
        from muse_tf import demo

        data_dir = demo.ensure_data({**demo.DEMO_PARAMS, "seq_len": seq_len})
    rows = []
    for name in experiments:
        config = config_lib.resolve(name, assignments=[f"data.batch_size={batch_size}"])
        dataset = reader.make_dataset(data_dir, "train", batch_size, max_seq_len=seq_len,
                                      shuffle=True, repeat=True, drop_remainder=True)
        model = build_ranking_model(config, data_dir, os.path.join(work_dir, name))
        model.compile_with_learning_rates(config.train.embedding_learning_rate,
                                          config.train.dense_learning_rate,
                                          embedding_optimizer=config.train.embedding_optimizer,
                                          dense_weight_decay=config.train.dense_weight_decay)
        iterator = iter(dataset)
        model.build_for(next(iterator))
        model.fit(iterator, steps_per_epoch=5, epochs=1, verbose=0)  # trace + warm up
        timings = []
        for _ in range(3):
            start = time.perf_counter()
            model.fit(iterator, steps_per_epoch=steps, epochs=1, verbose=0)
            timings.append(time.perf_counter() - start)
        seconds = statistics.median(timings)
        rows.append({"experiment": name, "seq_len": seq_len, "batch": batch_size,
                     "examples_per_s": steps * batch_size / seconds,
                     "target_per_s": 3000.0 if name == "muse" else float("nan")})
    _print("train: examples/s (median of 3 fits)", rows)
    return rows


# ----------------------------------------------------------------------------- gsu
def _gsu_row(length: int, dim: int, top_k: int, repeats: int, rng: np.random.Generator,
             table_rows: int) -> dict[str, Any]:
    from muse_tf.embeddings import FrozenMultimodalTable
    from muse_tf.embeddings.arrays import normalise_rows
    from muse_tf.layers import MultimodalGSU
    from muse_tf.layers.search_unit import MM

    batch = max(1, min(256, 25_600_000 // (length * dim)))
    history = rng.standard_normal((batch, length, dim), dtype=np.float32)
    history /= np.linalg.norm(history, axis=-1, keepdims=True)
    target = rng.standard_normal((batch, dim), dtype=np.float32)
    target /= np.linalg.norm(target, axis=-1, keepdims=True)
    mask = rng.random((batch, length)) > 0.05
    history_tf, target_tf, mask_tf = tf.constant(history), tf.constant(target), tf.constant(mask)
    layer = MultimodalGSU(top_k)
    gsu = tf.function(lambda: layer({MM: target_tf}, {MM: history_tf}, mask_tf))
    einsum = tf.function(lambda: tf.einsum("bd,bld->bl", target_tf, history_tf))
    numpy_s = _median_seconds(lambda: np.matmul(history, target[:, :, None]), repeats)
    gsu_s = _median_seconds(lambda: gsu()["indices"].numpy(), repeats)
    einsum_s = _median_seconds(lambda: einsum().numpy(), repeats)
    # The model's path: cosines straight from the frozen table (gather included), top-K, from
    # int8 codes (the default storage) and from float32 unit vectors, beside NumPy's fp32
    # gather + matmul of the same shape (the floor).
    codes = rng.integers(-128, 128, (table_rows, dim), dtype=np.int8)
    unit = normalise_rows(codes)
    rows = rng.integers(0, table_rows, (batch, length)).astype(np.int32)
    query = unit[rng.integers(0, table_rows, batch)]
    query_tf, rows_tf = tf.constant(query), tf.constant(rows)
    tables = {"f32": FrozenMultimodalTable(table_rows, dim, storage_dtype="float32",
                                           initial_table=unit),
              "int8": FrozenMultimodalTable(table_rows, dim, initial_table=codes)}
    seconds, indices = {}, {}
    for name, frozen in tables.items():
        table_gsu = tf.function(
            lambda frozen=frozen: layer.select(frozen.similarity(query_tf, rows_tf), mask_tf))
        seconds[name] = _median_seconds(lambda f=table_gsu: f()["indices"].numpy(), repeats)
        indices[name] = table_gsu()["indices"].numpy()
    seconds["numpy"] = _median_seconds(
        lambda: np.matmul(np.take(unit, rows, axis=0), query[:, :, None]), repeats)
    positions = batch * length
    read = {"numpy": positions * dim * 4, "f32": positions * dim * 4,
            "int8": positions * (dim + 4)}  # codes + one float32 inverse norm a position
    return {"seq_len": length, "batch": batch, "numpy_matmul_ms": 1e3 * numpy_s,
            "tf_einsum_ms": 1e3 * einsum_s, "gsu_topk_ms": 1e3 * gsu_s,
            "gsu_vs_numpy": gsu_s / numpy_s,
            "numpy_gather_matmul_ms": 1e3 * seconds["numpy"],
            "table_f32_ms": 1e3 * seconds["f32"], "table_int8_ms": 1e3 * seconds["int8"],
            **{f"{name}_GB_per_s": read[name] / 1e9 / seconds[name] for name in read},
            "int8_vs_f32": seconds["int8"] / seconds["f32"],
            "int8_vs_numpy": seconds["int8"] / seconds["numpy"],
            "topk_agreement": float(np.mean(indices["int8"] == indices["f32"])),
            "target_ratio": 1.5}


def bench_gsu(lengths: Sequence[int], dim: int = schema.MM_EMBEDDING_DIM, top_k: int = 50,
              repeats: int = 7, table_rows: int = 1_000_000) -> list[dict[str, Any]]:
    """About 25.6M history floats per call (batch = 25.6M / (L * dim), at most 256); the
    table paths read a ``table_rows``-row table (1M rows: 512 MB float32, larger than any
    cache; 128 MB int8). GB/s = table bytes the search reads (B * L rows) per second."""
    rng = np.random.default_rng(0)
    rows = [_gsu_row(length, dim, top_k, repeats, rng, table_rows) for length in lengths]
    vector_keys = ("seq_len", "batch", "numpy_matmul_ms", "tf_einsum_ms", "gsu_topk_ms",
                   "gsu_vs_numpy", "target_ratio")
    _print("gsu: multimodal cosine + masked top-50 vs a same-shape matmul (median ms)",
           [{k: row[k] for k in vector_keys} for row in rows])
    _print(f"gsu over a {table_rows:,}-row frozen table: int8 codes vs float32 vs NumPy fp32 "
           "gather + matmul (median ms, table GB/s read)",
           [{k: v for k, v in row.items() if k not in vector_keys[2:6]} for row in rows])
    return rows


# ----------------------------------------------------------------------------- mm_table
def bench_mm_table(rows: int, dim: int = schema.MM_EMBEDDING_DIM, storage: str = "int8",
                   seed: int = 0) -> dict[str, Any]:
    """Peak RSS of the model build's multimodal-table step over ``rows`` catalogue items.

    The int8 catalogue (ids + ``[rows, dim]`` codes, as ``load_mm_embeddings`` returns it)
    and an item vocabulary (the same ids in another order, plus 1% without an embedding)
    are made first; then, between two RSS readings, what ``build_item_tables`` and the
    models do: :func:`~muse_tf.embeddings.multimodal_codes` (vocabulary row -> code) and a
    :class:`~muse_tf.embeddings.FrozenMultimodalTable` loaded from it. Target: peak RSS
    delta <= 1.5x the int8 table bytes (``rows * dim``).
    """
    import gc

    from muse_tf.embeddings import FrozenMultimodalTable, multimodal_codes

    rng = np.random.default_rng(seed)
    FrozenMultimodalTable(4, dim, storage_dtype=storage,
                          initial_table=np.ones((4, dim), np.int8))  # TF's one-off set-up
    mm_ids = rng.permutation(rows).astype(np.int64) * 3 + 1
    codes = rng.integers(-128, 128, (rows, dim), dtype=np.int8)
    codes[::1000] = 0  # items whose vector is all zero
    vocab_ids = np.concatenate([mm_ids[rng.permutation(rows)],
                                np.arange(rows // 100, dtype=np.int64) * 3 + 2])
    gc.collect()
    before = rss_bytes()
    if not reset_peak_rss():
        raise RuntimeError("the mm_table benchmark needs Linux's /proc/self/clear_refs to "
                           "measure a peak RSS")
    start = time.perf_counter()
    table = FrozenMultimodalTable(len(vocab_ids) + 2, dim, storage_dtype=storage,
                                  initial_table=multimodal_codes(vocab_ids, mm_ids, codes))
    build_s = time.perf_counter() - start
    gc.collect()
    peak, after = rss_bytes("VmHWM") - before, rss_bytes() - before
    int8_bytes = rows * dim
    weight_bytes = sum(int(np.prod(w.shape)) * w.dtype.size for w in table.weights)
    row = {"rows": rows, "storage": storage, "int8_table_MB": int8_bytes / 1e6,
           "weights_MB": weight_bytes / 1e6, "peak_rss_delta_MB": peak / 1e6,
           "peak_over_int8_table": peak / int8_bytes,
           "peak_over_weights": peak / weight_bytes,
           "rss_delta_after_MB": after / 1e6, "build_s": build_s, "target_ratio": 1.5}
    _print(f"mm_table: peak RSS of building a {storage} FrozenMultimodalTable from int8 "
           "arrays (delta over the loaded catalogue)", [row])
    return row


# ----------------------------------------------------------------------------- serving
def bench_serving(work_dir: str, lengths: Sequence[int], data_dir: str | None = None,
                  candidates: int = 100, requests: int = 200,
                  concurrency: Sequence[int] = (1, 8)) -> list[dict[str, Any]]:
    """gRPC latency of the exported ``muse`` ranker through the local server."""
    from muse_tf import config as config_lib
    from muse_tf.data.data_dir import DataDir
    from muse_tf.export import ranking as export
    from muse_tf.export.names import RANKING_MODEL_NAME
    from muse_tf.models.factory import build_ranking_model
    from serving.bench import grpc_latency
    from serving.server import serve

    if not data_dir:
        from muse_tf import demo

        data_dir = demo.ensure_demo_data()
    config = config_lib.resolve("muse")
    config.data.data_dir = data_dir
    examples = export.warmup_batch(DataDir.open(data_dir), schema.MAX_HISTORY_LEN)
    rows = []
    for length in lengths:
        model_dir = os.path.join(work_dir, f"serving_{length}")
        model = build_ranking_model(config, data_dir, model_dir)
        request = _ranking_request(examples, length, candidates)
        path = export.export_ranking_model(
            model, config, model_dir, max_seq_len=length, max_candidates=candidates,
            warmup_examples=examples)
        handle = serve(model_name=RANKING_MODEL_NAME, model_base_path=os.path.dirname(path),
                       port=0)
        try:
            for clients in concurrency:
                stats = grpc_latency(handle.address, RANKING_MODEL_NAME, request,
                                     requests=requests, concurrency=clients).as_dict()
                rows.append({"seq_len": length, "candidates": candidates, "clients": clients,
                             "p50_ms": stats["p50_ms"], "p99_ms": stats["p99_ms"],
                             "requests_per_s": stats["throughput_rps"],
                             "errors": stats["errors"],
                             "target_p99_ms": 50.0 if (length, clients) == (1000, 1)
                             else float("nan")})
        finally:
            handle.stop()
    _print(f"serving: gRPC Predict through the local server, C = {candidates}", rows)
    return rows


# ----------------------------------------------------------------------------- optimizer
def _optimizer_row(name: str, make: Callable[[], tf.keras.optimizers.Optimizer], rows: int,
                   dim: int, batches: Sequence[tuple[tf.Tensor, tf.Tensor]],
                   steps: int) -> dict[str, Any]:
    """ms/step of ``make()`` on a fresh ``[rows, dim]`` table, the sparse gradients cycling
    through ``batches`` (``(indices [K], values [K, dim])``)."""
    table = tf.Variable(tf.random.uniform((rows, dim), -0.05, 0.05), name="table")
    optimizer = make()
    optimizer.build([table])

    @tf.function
    def step(indices: tf.Tensor, values: tf.Tensor) -> tf.Tensor:
        gradient = tf.IndexedSlices(values, indices, tf.constant([rows, dim], tf.int64))
        return optimizer.apply_gradients([(gradient, table)])

    turn = [0]

    def one_step() -> None:
        indices, values = batches[turn[0] % len(batches)]
        turn[0] += 1
        step(indices, values).numpy()

    seconds = _median_seconds(one_step, steps, warmup=2)
    unique = round(statistics.mean(int(tf.size(tf.unique(i)[0])) for i, _ in batches))
    return {"optimizer": name, "rows": rows, "unique_ids": unique, "ms_per_step": 1e3 * seconds}


def bench_optimizer(rows: Sequence[int], steps: int, batch_size: int = 256,
                    ids_per_example: int = 1051, dim: int = 16) -> list[dict[str, Any]]:
    """LazyAdam vs tf-keras Adam, one sparse step of one ``[rows, dim]`` float32 table from a
    batch of ``batch_size * ids_per_example`` uniformly drawn ids (repeats included)."""
    from muse_tf.training.optimizers import LazyAdam

    rng = np.random.default_rng(0)
    ids = batch_size * ids_per_example
    out = []
    for num_rows in rows:
        batches = [(tf.constant(rng.integers(0, num_rows, ids), tf.int64),
                    tf.constant(rng.standard_normal((ids, dim), dtype=np.float32)))
                   for _ in range(3)]
        lazy = _optimizer_row("lazy_adam", lambda: LazyAdam(1e-3), num_rows, dim, batches,
                              steps)
        adam = _optimizer_row("adam", lambda: tf.keras.optimizers.Adam(1e-3), num_rows, dim,
                              batches, steps)
        row_bytes = 4 * dim
        gradient_bytes = ids * (row_bytes + 8)  # K ids and K x dim values, read and merged
        for row in (lazy, adam):
            # At least: LazyAdam gathers and scatters U rows of the table and of both slots;
            # Adam reads and writes the whole table and both slots (its temporaries and
            # scatter-adds come on top).
            touched = gradient_bytes + 3 * 2 * row_bytes * (
                row["unique_ids"] if row is lazy else num_rows)
            row["MB_touched"] = touched / 1e6
            row["GB_per_s"] = touched / 1e9 / (row["ms_per_step"] / 1e3)
        lazy["adam_over_lazy"] = adam["ms_per_step"] / lazy["ms_per_step"]
        adam["adam_over_lazy"] = lazy["adam_over_lazy"]
        out += [lazy, adam]
    _print(f"optimizer: one sparse step of a {dim}-d table from {batch_size} x "
           f"{ids_per_example} ids (median of {steps} steps)", out)
    return out


# ----------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m muse_tf.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["data", "train", "gsu", "mm_table", "serving",
                                         "scann", "optimizer", "scale", "all"])
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--seq-len", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--data", help="Beam output directory for `train` (default: demo)")
    parser.add_argument("--experiments", default="muse,din")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lengths", default="1000,10000,100000")
    parser.add_argument("--scann-items", type=int, default=1_000_000)
    parser.add_argument("--rows", default=None,
                        help="`optimizer`: vocabulary sizes of the embedding table (default "
                             "10000,10000000); `mm_table`: catalogue items (default 5000000)")
    parser.add_argument("--storage", default="int8", choices=["int8", "float32", "float16"],
                        help="`mm_table`: storage of the frozen multimodal table")
    parser.add_argument("--table-rows", type=int, default=1_000_000,
                        help="`gsu`: rows of the frozen table the table paths read")
    parser.add_argument("--ids-per-example", type=int, default=1051,
                        help="`optimizer`: ids of one example (the batch is --batch-size x this)")
    parser.add_argument("--optimizer-steps", type=int, default=7,
                        help="`optimizer`: timed steps (after 2 warm-up steps) per optimizer")
    parser.add_argument("--work-dir", help="scratch directory (default: a temporary one)")
    parser.add_argument("--items", type=int, default=35_400_000,
                        help="`scale`: catalogue items")
    parser.add_argument("--users", type=int, default=20_000, help="`scale`: users")
    parser.add_argument("--raw", help="`scale`: TAOBAO-MM tables already generated (skip "
                                      "the generate stage by leaving it out of --stages)")
    parser.add_argument("--stages", default="generate,beam,train,serve,tree",
                        help="`scale`: stages to run, in order")
    parser.add_argument("--train-steps", type=int, default=50,
                        help="`scale`: training steps of the train stage")
    parser.add_argument("--json", help="also write all figures to this JSON file")
    args = parser.parse_args(argv)
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="muse_tf_bench_")
    print(f"# muse_tf benchmarks ({os.cpu_count()} CPUs, TF {tf.__version__}, "
          f"GPUs: {len(tf.config.list_physical_devices('GPU'))}); scratch: {work_dir}")
    results: dict[str, Any] = {}
    lengths = [int(x) for x in args.lengths.split(",") if x]
    if args.what in ("data", "all"):
        results["data"] = bench_data(args.samples, args.seq_len, args.workers,
                                     os.path.join(work_dir, "data_bench"))
    if args.what in ("gsu", "all"):
        results["gsu"] = bench_gsu(lengths, table_rows=args.table_rows)
    if args.what in ("mm_table", "all"):
        results["mm_table"] = [bench_mm_table(int(x), storage=args.storage)
                               for x in (args.rows or "5000000").split(",") if x]
    if args.what in ("train", "all"):
        results["train"] = bench_train(args.data, args.experiments.split(","), args.steps,
                                       args.batch_size, args.seq_len, work_dir)
    if args.what in ("serving", "all"):
        results["serving"] = bench_serving(work_dir, lengths=lengths, data_dir=args.data)
    if args.what in ("scann", "all"):
        from muse_tf.index.scann_index import scann_vs_brute_force

        row = scann_vs_brute_force(num_items=args.scann_items)
        _print("scann: ScaNN vs brute force, top-100", [row])
        results["scann"] = row
    if args.what in ("optimizer", "all"):
        optimizer_rows = (args.rows or "10000,10000000").split(",")
        results["optimizer"] = bench_optimizer([int(x) for x in optimizer_rows if x],
                                               args.optimizer_steps, args.batch_size,
                                               args.ids_per_example)
    if args.what == "scale":
        from muse_tf.bench_scale import bench_scale

        results["scale"] = bench_scale(args.items, args.users, args.samples, args.seq_len,
                                       work_dir, raw_dir=args.raw,
                                       stages=[s for s in args.stages.split(",") if s],
                                       train_steps=args.train_steps)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
