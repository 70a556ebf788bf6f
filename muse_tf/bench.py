"""Benchmarks: ``python -m muse_tf.bench WHAT``, WHAT one of the sections below or ``all``.

Every figure is measured in the same run as the figure it is compared with (medians over
repeats; ratios printed beside them), because the machines here are shared and noisy.

* ``data``: generate ``--samples`` impressions with ``--seq-len``-long histories, convert them
  with the Beam pipeline (FnApiRunner, ``--workers`` processes) and read them back with the
  tf.data reader. Targets on a 2-core machine: 100K samples in <= 120 s; >= 10,000 read/s.
* ``train``: training of ``--experiments`` (``muse,din``) at history length ``--seq-len``,
  batch ``--batch-size`` (the performance issue's setting: 1,000): all models built first,
  then alternating rounds of a fit from disk and of steps on one cached batch; examples/s from
  disk, ms and CPU ms per cached step, each as a ratio to the last experiment (``din``).
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
* ``miss``: MISS tree beam search (50K-item tree, depth 16, beam 100): queries/s and CPU
  seconds per query of the previous scoring path beside the current one (search keys encoded
  once per user), with recall@100 of both against the scorer's exhaustive top-100 and the
  cost of the top-K selections alone (:mod:`muse_tf.bench_miss`).
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
               read_seconds: float = 20.0, reference_records: int = 8192,
               reference_seconds: float = 6.0) -> dict[str, Any]:
    """Beam conversion, then the tf.data read of the train split, beside same-run references.

    ``read_examples_per_s`` is the reader (``make_dataset``: shuffled, repeated, batch 256)
    over the whole train split. The references read the first ``reference_records`` train
    records, rewritten as 4 shards: as Beam writes them (gzip) and uncompressed, through
    the same reader; the gzip framing alone (``TFRecordDataset`` + batch, nothing parsed);
    and the reader's parser alone over the records held in memory (no file, no gzip). Each
    reference is the median of 3 alternating runs of ``reference_seconds``; ``*_cpu_us``
    is process CPU time per record (user + system), steadier than rates on a shared
    machine.
    """
    import resource

    from beam import build_dataset
    from beam.io import DEFAULT_COMPRESSION_LEVEL
    from muse_tf.data import reader, synthetic
    from muse_tf.data.data_dir import DataDir

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

    def cpu_seconds() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def rate(dataset: tf.data.Dataset, seconds: float) -> tuple[float, float]:
        """(records/s, CPU-us/record) of iterating ``dataset`` for ``seconds``."""
        iterator = iter(dataset)
        next(iterator)
        examples, cpu, start = 0, cpu_seconds(), time.perf_counter()
        while time.perf_counter() - start < seconds:
            batch = next(iterator)
            first = batch[schema.ITEM_ID.name] if isinstance(batch, dict) else batch
            examples += int(first.shape[0])
        wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu
        return examples / wall, 1e6 * cpu / examples

    read_rate, read_cpu = rate(reader.make_dataset(out, "train", 256, max_seq_len=seq_len,
                                                   shuffle=True, repeat=True), read_seconds)

    data = DataDir.open(out)
    train_files = data.split_files("train")
    records = [r for batch in tf.data.TFRecordDataset(train_files, compression_type="GZIP")
               .take(reference_records).batch(1024).as_numpy_iterator() for r in batch]
    shards: dict[str, list[str]] = {}
    for name, options in (("GZIP", tf.io.TFRecordOptions(
            compression_type="GZIP", compression_level=DEFAULT_COMPRESSION_LEVEL)),
                          ("", tf.io.TFRecordOptions(compression_type=""))):
        shards[name] = []
        for shard in range(4):
            path = os.path.join(work_dir, f"reference-{shard}.tfrecord"
                                + (".gz" if name else ""))
            with tf.io.TFRecordWriter(path, options) as writer:
                for record in records[shard::4]:
                    writer.write(record)
            shards[name].append(path)
    in_memory = tf.constant(records)
    references: dict[str, Callable[[], tf.data.Dataset]] = {
        "gzip": lambda: reader.make_dataset_from_files(shards["GZIP"], 256, seq_len,
                                                       repeat=True),
        "uncompressed": lambda: reader.make_dataset_from_files(
            shards[""], 256, seq_len, repeat=True, compression_type=""),
        "gzip_framing_only": lambda: tf.data.TFRecordDataset(
            shards["GZIP"], compression_type="GZIP", num_parallel_reads=4).repeat().batch(256),
        "parse_only": lambda: tf.data.Dataset.from_tensor_slices(in_memory).repeat().batch(
            256).map(reader.BatchParser(seq_len), num_parallel_calls=tf.data.AUTOTUNE,
                     deterministic=False).prefetch(tf.data.AUTOTUNE),
    }
    measured: dict[str, list[tuple[float, float]]] = {name: [] for name in references}
    for _ in range(3):
        for name, make in references.items():
            measured[name].append(rate(make(), reference_seconds))
    result = {
        "samples": rows_in, "seq_len": seq_len, "generate_s": generate_s,
        "beam_workers": workers, "beam_s": beam_s, "beam_rows_per_s": rows_in / beam_s,
        "examples_written": written, "beam_target_s": 120.0 * rows_in / 100_000,
        "read_examples_per_s": read_rate, "read_cpu_us": read_cpu,
        "read_target_per_s": 10_000.0,
    }
    for name, runs in measured.items():
        result[f"{name}_per_s"] = statistics.median(r for r, _ in runs)
        result[f"{name}_cpu_us"] = statistics.median(c for _, c in runs)
    result["record_KB"] = sum(len(r) for r in records) / len(records) / 1e3
    _print("data: Beam conversion and tf.data read", [{k: v for k, v in result.items()
                                                       if not k.endswith(("_per_s", "_us"))
                                                       or k.startswith(("beam", "read"))}])
    _print(f"data: read references (first {len(records):,} train records in 4 shards, "
           "median of 3; CPU-us per record)",
           [{"path": name, "examples_per_s": result[f"{name}_per_s"],
             "cpu_us_per_record": result[f"{name}_cpu_us"]} for name in references])
    return result


# ----------------------------------------------------------------------------- train
def bench_train(data_dir: str | None, experiments: Sequence[str], steps: int,
                batch_size: int, seq_len: int, work_dir: str,
                rounds: int = 3) -> list[dict[str, Any]]:
    """Training speed of ``experiments`` (``muse`` and ``din``) in one run, interleaved.

    Every model is built first; then each of ``rounds`` rounds runs, model after model, one
    ``fit`` of ``steps`` steps on records read from disk (the reader: shuffled, repeated;
    one iterator shared by the models) and one of ``steps`` steps on a single cached batch
    (the step alone, without the reader competing for the CPUs). Reported per model: the
    median examples/s from disk, the median ms per cached step with the process CPU ms per
    step (user + system: steadier than wall time on a shared machine), and each figure over
    the last experiment's (``din``): how many times the reference's step this model's costs.
    """
    import resource

    from muse_tf import config as config_lib
    from muse_tf.data import reader
    from muse_tf.models.factory import build_ranking_model

    def cpu_seconds() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    if not data_dir:
        from muse_tf import demo

        data_dir = demo.ensure_data({**demo.DEMO_PARAMS, "seq_len": seq_len})
    dataset = reader.make_dataset(data_dir, "train", batch_size, max_seq_len=seq_len,
                                  shuffle=True, repeat=True, drop_remainder=True)
    iterator = iter(dataset)
    cached = next(iterator)
    models = {}
    for name in experiments:
        config = config_lib.resolve(name, assignments=[f"data.batch_size={batch_size}"])
        model = build_ranking_model(config, data_dir, os.path.join(work_dir, name))
        model.compile_with_learning_rates(config.train.embedding_learning_rate,
                                          config.train.dense_learning_rate,
                                          embedding_optimizer=config.train.embedding_optimizer,
                                          dense_weight_decay=config.train.dense_weight_decay)
        model.build_for(cached)
        model.fit(iterator, steps_per_epoch=5, epochs=1, verbose=0)  # trace + warm up
        models[name] = model
    repeated = iter(tf.data.Dataset.from_tensors(cached).repeat())
    disk: dict[str, list[float]] = {name: [] for name in experiments}
    step: dict[str, list[float]] = {name: [] for name in experiments}
    cpu: dict[str, list[float]] = {name: [] for name in experiments}
    for _ in range(rounds):
        for name, model in models.items():
            start = time.perf_counter()
            model.fit(iterator, steps_per_epoch=steps, epochs=1, verbose=0)
            disk[name].append(time.perf_counter() - start)
            start, cpu_start = time.perf_counter(), cpu_seconds()
            model.fit(repeated, steps_per_epoch=steps, epochs=1, verbose=0)
            step[name].append((time.perf_counter() - start) / steps)
            cpu[name].append((cpu_seconds() - cpu_start) / steps)
    reference = experiments[-1]
    rows = []
    for name in experiments:
        examples_per_s = steps * batch_size / statistics.median(disk[name])
        rows.append({
            "experiment": name, "seq_len": seq_len, "batch": batch_size,
            "examples_per_s": examples_per_s,
            "cached_step_ms": 1e3 * statistics.median(step[name]),
            "cached_cpu_ms": 1e3 * statistics.median(cpu[name]),
            f"time_vs_{reference}": statistics.median(disk[name])
            / statistics.median(disk[reference]),
            f"step_vs_{reference}": statistics.median(step[name])
            / statistics.median(step[reference]),
            f"cpu_vs_{reference}": statistics.median(cpu[name])
            / statistics.median(cpu[reference]),
            "target_per_s": 3000.0 if name == "muse" else float("nan")})
    _print(f"train: examples/s read from disk and ms per step on one cached batch (medians "
           f"of {rounds} interleaved fits of {steps} steps)", rows)
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
                  concurrency: Sequence[int] = (1, 8), batch_users: Sequence[int] = (32,),
                  batch_lengths: Sequence[int] = (1000,)) -> list[dict[str, Any]]:
    """gRPC latency of the exported ``muse`` ranker through the local server.

    Every row stands beside its same-run floor: a float32 ``[C, D] x [D, L]`` product per
    user of the request (the candidates' multimodal vectors against the history's: the GSU's
    arithmetic), in TensorFlow (``matmul_ms``, the served graph's runtime and threads) and
    NumPy (``numpy_matmul_ms``); medians. With one client, calls and floor products
    alternate (a shared machine's load then weighs on both alike); with more, the floor is
    measured before and after the row. Each row has the client-observed p50/p99 (the request
    is built once), ``server_p50_ms`` (the server's ``Predict`` run in-process on the same
    request, no gRPC: proto decoding, input checks, the session run, the response) and
    ``client_build_ms`` (what a client pays per call to build that request). Rows with
    ``users > 1`` send one request holding that many users (what TF Serving's batching feeds
    the signature), at the lengths in ``batch_lengths``; their ``users_per_s`` is
    requests/s times users.
    """
    import grpc

    from muse_tf import config as config_lib
    from muse_tf.data.data_dir import DataDir
    from muse_tf.export import ranking as export
    from muse_tf.export import requests as request_lib
    from muse_tf.export.names import RANKING_MODEL_NAME
    from muse_tf.models.factory import build_ranking_model
    from serving import client as client_lib
    from serving.bench import grpc_latency
    from serving.grpc_options import channel_options
    from serving.server import serve

    if not data_dir:
        from muse_tf import demo

        data_dir = demo.ensure_demo_data()
    config = config_lib.resolve("muse")
    config.data.data_dir = data_dir
    examples = export.warmup_batch(DataDir.open(data_dir), schema.MAX_HISTORY_LEN)
    rng = np.random.default_rng(0)
    dim = schema.MM_EMBEDDING_DIM

    def users_request(length: int, users: int) -> dict[str, np.ndarray]:
        """``users`` users: user ``u`` is example row ``u`` (wrapping) with its history
        repeated to ``length`` and the targets of ``candidates`` other rows."""
        rows = len(examples[schema.ITEM_ID.name])
        single = []
        for u in range(users):
            shifted = {name: np.roll(values, -(u % rows), axis=0)
                       for name, values in examples.items()}
            single.append(_ranking_request(shifted, length, candidates))
        return request_lib.batch_requests(single)

    def seconds(fn: Callable[[], Any]) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    def timed(fn: Callable[[], Any], repeats: int) -> np.ndarray:
        fn()
        return 1e3 * np.asarray([seconds(fn) for _ in range(repeats)])

    rows = []
    for length in lengths:
        model_dir = os.path.join(work_dir, f"serving_{length}")
        model = build_ranking_model(config, data_dir, model_dir)
        path = export.export_ranking_model(
            model, config, model_dir, max_seq_len=length, max_candidates=candidates,
            warmup_examples=examples)
        del model
        handle = serve(model_name=RANKING_MODEL_NAME, model_base_path=os.path.dirname(path),
                       port=0)
        try:
            with client_lib.PredictionClient(handle.address) as client:
                signature = client.signature_def(RANKING_MODEL_NAME)
                shapes = [(1, clients) for clients in concurrency]
                if length in batch_lengths:
                    shapes += [(users, 1) for users in batch_users]
                for users, clients in shapes:
                    inputs = users_request(length, users)
                    build = timed(lambda inputs=inputs, signature=signature:
                                  client_lib.build_predict_request(
                                      RANKING_MODEL_NAME, inputs, signature_def=signature), 10)
                    proto = client.build_request(RANKING_MODEL_NAME, inputs)
                    calls = requests if users == 1 else max(20, requests // users * 4)
                    server = timed(lambda proto=proto, manager=handle.manager:
                                   manager.predict(proto), max(5, min(30, calls // 4)))
                    queries = rng.standard_normal((users, candidates, dim), dtype=np.float32)
                    keys = rng.standard_normal((users, dim, length), dtype=np.float32)
                    tf_queries, tf_keys = tf.constant(queries), tf.constant(keys)
                    tf_product = tf.function(lambda q=tf_queries, k=tf_keys: tf.matmul(q, k))

                    def tf_floor(product=tf_product) -> None:
                        product().numpy()

                    def numpy_floor(q=queries, k=keys) -> None:
                        for u in range(len(q)):
                            np.matmul(q[u], k[u])

                    tf_floor(), numpy_floor()
                    if clients == 1:
                        channel = grpc.insecure_channel(handle.address,
                                                        options=channel_options())
                        predict = client_lib.prediction_service_pb2_grpc.PredictionServiceStub(
                            channel).Predict
                        for _ in range(3):
                            predict(proto)
                        latency, floor_tf, floor_np = [], [], []
                        for _ in range(calls):
                            latency.append(seconds(lambda p=proto, call=predict: call(p)))
                            floor_tf.append(seconds(tf_floor))
                            floor_np.append(seconds(numpy_floor))
                        channel.close()
                        latency_ms = 1e3 * np.asarray(latency)
                        stats = {"p50_ms": float(np.median(latency_ms)),
                                 "p99_ms": float(np.percentile(latency_ms, 99)),
                                 "throughput_rps": calls / sum(latency),
                                 "request_bytes": proto.ByteSize(), "errors": 0}
                    else:
                        floor_tf = list(timed(tf_floor, 10) / 1e3)
                        floor_np = list(timed(numpy_floor, 10) / 1e3)
                        stats = grpc_latency(handle.address, RANKING_MODEL_NAME, inputs,
                                             requests=calls, concurrency=clients).as_dict()
                        floor_tf += list(timed(tf_floor, 10) / 1e3)
                        floor_np += list(timed(numpy_floor, 10) / 1e3)
                    floor = 1e3 * float(np.median(floor_tf))
                    rows.append({
                        "seq_len": length, "candidates": candidates, "users": users,
                        "clients": clients, "p50_ms": stats["p50_ms"],
                        "p99_ms": stats["p99_ms"], "requests_per_s": stats["throughput_rps"],
                        "users_per_s": stats["throughput_rps"] * users,
                        "server_p50_ms": float(np.median(server)),
                        "client_build_ms": float(np.median(build)),
                        "request_MB": stats["request_bytes"] / 1e6,
                        "matmul_ms": floor,
                        "numpy_matmul_ms": 1e3 * float(np.median(floor_np)),
                        "p50_over_matmul": stats["p50_ms"] / floor,
                        "p99_over_matmul": stats["p99_ms"] / floor,
                        "errors": stats["errors"],
                        "target": ("p99 <= 50 ms" if (length, users, clients) == (1000, 1, 1)
                                   else "p99 <= 2x matmul" if (length, users, clients) == (
                                       100_000, 1, 1)
                                   else ">= 2,000 users/s" if users == 32 else "-")})
        finally:
            handle.stop()
    _print(f"serving: gRPC Predict through the local server, C = {candidates} (matmul_ms: "
           f"same-run TF fp32 [C, {dim}] x [{dim}, L] per user, median)", rows)
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
                                         "scann", "optimizer", "miss", "scale", "all"])
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
    parser.add_argument("--stages", default="generate,beam,train,serve,tree,miss,two_tower",
                        help="`scale`: stages to run, in order")
    parser.add_argument("--train-steps", type=int, default=50,
                        help="`scale`: training steps of each training stage")
    parser.add_argument("--eval-steps", type=int, default=5,
                        help="`scale`: query batches the retrieval stages evaluate")
    parser.add_argument("--keep-outputs", action="store_true",
                        help="`scale`: keep each training stage's checkpoints and exports "
                             "(default: removed once served; about 80 GB at 35.4M items)")
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
    if args.what in ("miss", "all"):
        from muse_tf.bench_miss import bench_miss

        results["miss"] = bench_miss(seq_len=args.seq_len)
    if args.what == "scale":
        from muse_tf.bench_scale import bench_scale

        results["scale"] = bench_scale(args.items, args.users, args.samples, args.seq_len,
                                       work_dir, raw_dir=args.raw,
                                       stages=[s for s in args.stages.split(",") if s],
                                       train_steps=args.train_steps,
                                       eval_steps=args.eval_steps,
                                       keep_outputs=args.keep_outputs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
