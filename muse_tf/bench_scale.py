"""``python -m muse_tf.bench scale``: the whole path at TAOBAO-MM's catalogue size.

Every stage runs as its own process (so each has its own peak memory, and a stage that is
killed for memory says which), one after the other, on data it streams to disk::

    python -m muse_tf.bench scale --items 35400000 --users 20000 --samples 100000 \\
        [--seq-len 1000] [--work-dir DIR] [--raw DIR] \\
        [--stages generate,beam,train,serve,tree,miss,two_tower]

Stages and what bounds them on a 2-core, 24 GB machine (the issue's limits):

* ``generate``: :mod:`muse_tf.data.scale_data` writes the six TAOBAO-MM tables;
* ``beam``: ``python -m beam.build_dataset`` with the default in-process runner (<= 30 min,
  <= 16 GB for the whole process tree). Not ``--direct_running_mode multi_processing``: at
  35.4M items Beam 2.77's multi-process FnApiRunner lost key blocks between two stages (the
  pipeline's row check then fails the run), also on an idle machine, while in-process was
  both complete and faster (385 s, 4.95 GB against 657 s, 8.29 GB for two workers);
* ``train``: ``python -m muse_tf.train --experiment muse`` with ``--train-steps`` steps:
  its model build, training, test evaluation and export, each with its own wall seconds and
  peak RSS (``metrics.json`` ``stages``; the process within 24 GB);
* ``serve``: the local TF Serving API server loads the export and replays its warm-up
  (load seconds and RSS), then the first answer and the median of 20 answers (C = 100
  candidates, L = ``--seq-len``);
* ``tree``: the MISS index tree over the catalogue's int8 codes (<= 30 min, <= 12 GB);
* ``miss``: ``python -m muse_tf.train --experiment miss_retrieval`` over the whole catalogue
  (its tree build, model build, training steps, beam-search evaluation of at most
  ``--eval-steps`` query batches and export, each with its own row), then the local server
  loads the MISS export and answers one query (load, first and median answer);
* ``two_tower``: the same for ``--experiment two_tower`` (candidate embeddings of the whole
  catalogue, brute force, the ScaNN build, their evaluations, both exports); the server
  answers from the ScaNN export.

Peak memory of a stage is the summed RSS of its process tree, sampled every 0.5 s.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from muse_tf.bench_common import print_table
from muse_tf.export import names
from muse_tf.profiling import TreeRssSampler

STAGES = ("generate", "beam", "train", "serve", "tree", "miss", "two_tower")
#: (wall seconds, peak GB) the issue sets per stage; None where it sets none.
LIMITS: dict[str, tuple[float | None, float | None]] = {
    "generate": (None, None), "beam": (1800.0, 16.0), "train": (None, 24.0),
    "serve": (None, 24.0), "tree": (1800.0, 12.0), "miss": (None, 24.0),
    "two_tower": (None, 24.0)}
#: stage -> (experiment, the export the server answers from).
RETRIEVAL_STAGES = {"miss": ("miss_retrieval", names.MISS_MODEL_NAME),
                    "two_tower": ("two_tower", names.SCANN_MODEL_NAME)}
_GB = 1e9
#: What :func:`_release_outputs` keeps of a served run directory (the figures and the logs).
_KEPT_OUTPUTS = ("metrics.json", "config.yaml", "logs")


def _tree_bytes(path: str) -> int:
    """Bytes of the files under ``path`` (0 if it does not exist)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:  # removed while walking
                pass
    return total


def _release_outputs(run_dir: str) -> dict[str, Any]:
    """Removes a served run's checkpoints, exports and index (all but
    :data:`_KEPT_OUTPUTS`); returns the disk it held and what is free afterwards. The whole
    path at 35.4M items writes about 80 GB (a ranking export of 6.3 GB and checkpoints of
    7.8 GB, MISS 27 GB, two-tower 29.5 GB); released stage by stage, about 40 GB with the
    raw tables and the Beam output."""
    held = _tree_bytes(run_dir)
    for name in os.listdir(run_dir) if os.path.isdir(run_dir) else ():
        if name not in _KEPT_OUTPUTS:
            path = os.path.join(run_dir, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
    return {"disk_GB": held / _GB, "disk_free_GB": shutil.disk_usage(
        os.path.dirname(os.path.abspath(run_dir))).free / _GB}


def _run(name: str, command: Sequence[str], log_path: str,
         env: dict[str, str] | None = None) -> dict[str, Any]:
    """Runs ``command`` with its output in ``log_path``; wall seconds, peak tree RSS, status."""
    print(f"[scale] {name}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
        sampler = TreeRssSampler(proc.pid)
        returncode = proc.wait()
    peak = sampler.stop()
    row = {"stage": name, "seconds": time.perf_counter() - start, "peak_rss_GB": peak / _GB,
           "returncode": returncode, "log": log_path}
    if returncode != 0:
        with open(log_path) as f:
            row["log_tail"] = f.read()[-3000:]
    return row


def _limits(row: dict[str, Any], stage: str) -> dict[str, Any]:
    seconds, gigabytes = LIMITS.get(stage, (None, None))
    ok = row.get("returncode", 0) == 0
    if seconds is not None:
        ok = ok and row["seconds"] <= seconds
    if gigabytes is not None:
        ok = ok and row["peak_rss_GB"] <= gigabytes
    return {**row, "limit_s": seconds, "limit_GB": gigabytes, "within_limits": ok}


def _request(model_name: str, data_dir: str, seq_len: int) -> dict[str, Any]:
    """One request to ``model_name`` from the data's first test examples: a ranking request
    of C = 100 candidates, or one retrieval query."""
    from muse_tf.bench_common import ranking_request
    from muse_tf.data.data_dir import DataDir
    from muse_tf.export import ranking as export
    from muse_tf.export import requests

    examples = export.warmup_batch(DataDir.open(data_dir), seq_len)
    if model_name == names.RANKING_MODEL_NAME:
        return ranking_request(examples, seq_len, 100)
    return requests.retrieval_queries_from_examples(examples, max_seq_len=seq_len,
                                                    num_requests=1)[0]


def _serve(model_name: str, export_base: str, inputs: dict[str, Any], log_path: str,
           prefix: str = "") -> list[dict[str, Any]]:
    """Starts the local server on the export; load time, RSS, first and median answer."""
    import socket

    from serving import client as client_lib

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "serving.server", "--model_name", model_name,
               "--model_base_path", export_base, "--port", str(port), "--host", "127.0.0.1"]
    print(f"[scale] serve: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    log = open(log_path, "w")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    sampler = TreeRssSampler(proc.pid)
    rows: list[dict[str, Any]] = []
    try:
        with client_lib.PredictionClient(f"127.0.0.1:{port}", timeout=600) as client:
            first = None
            while first is None:
                if proc.poll() is not None:
                    raise RuntimeError(f"the server exited with {proc.returncode}; see "
                                       f"{log_path}")
                try:
                    begin = time.perf_counter()
                    client.predict(model_name, inputs)
                    first = time.perf_counter() - begin
                except Exception:  # not up yet (connection refused / model not loaded)
                    time.sleep(0.5)
            loaded = time.perf_counter() - start - first
            rows.append({"stage": f"{prefix}server load + warm-up", "seconds": loaded,
                         "peak_rss_GB": sampler.peak_bytes / _GB, "returncode": 0})
            rows.append({"stage": f"{prefix}first answer", "seconds": first,
                         "peak_rss_GB": sampler.peak_bytes / _GB, "returncode": 0})
            latencies = []
            for _ in range(20):
                begin = time.perf_counter()
                client.predict(model_name, inputs)
                latencies.append(time.perf_counter() - begin)
            latencies.sort()
            rows.append({"stage": f"{prefix}answer (median of 20)", "seconds": latencies[10],
                         "peak_rss_GB": sampler.stop() / _GB, "returncode": 0})
    finally:
        sampler.stop()
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    return rows


def bench_scale(items: int, users: int, samples: int, seq_len: int, work_dir: str,
                raw_dir: str | None = None, stages: Sequence[str] = STAGES,
                train_steps: int = 50, experiment: str = "muse",
                eval_steps: int = 5, keep_outputs: bool = False) -> list[dict[str, Any]]:
    """Runs the ``stages`` in order; returns one row per stage (and per training part).

    A training stage's run directory (checkpoints, exports, the MISS index) is removed once
    its export has been served in this run, unless ``keep_outputs``: its size is the
    ``disk_GB`` of its last serving row (beside ``disk_free_GB`` after the removal)."""
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stages {unknown}; known: {list(STAGES)}")
    os.makedirs(work_dir, exist_ok=True)
    raw = raw_dir or os.path.join(work_dir, "raw")
    data = os.path.join(work_dir, "data")
    model_dir = os.path.join(work_dir, "model")
    logs = os.path.join(work_dir, "logs")
    os.makedirs(logs, exist_ok=True)
    python = sys.executable
    rows: list[dict[str, Any]] = []

    def record(row: dict[str, Any], stage: str) -> bool:
        rows.append(_limits(row, stage))
        seconds = row["seconds"]
        took = f"{seconds:.1f} s" if seconds >= 1 else f"{1e3 * seconds:.1f} ms"
        disk = (f", wrote {row['disk_GB']:.1f} GB (released; {row['disk_free_GB']:.0f} GB free)"
                if "disk_GB" in row else "")
        print(f"[scale] {row['stage']}: {took}, peak {row['peak_rss_GB']:.2f} GB{disk}"
              f"{'' if row.get('returncode', 0) == 0 else ' FAILED, see ' + row['log']}",
              flush=True)
        return row.get("returncode", 0) == 0

    if "generate" in stages:
        ok = record(_run("generate", [python, "-m", "muse_tf.data.scale_data", "--out", raw,
                                      "--items", str(items), "--users", str(users),
                                      "--samples", str(samples), "--seq-len", str(seq_len),
                                      "--overwrite"],
                         os.path.join(logs, "generate.log")), "generate")
        if not ok:
            return rows
    if "beam" in stages:
        ok = record(_run("beam", [python, "-m", "beam.build_dataset", "--input", raw,
                                  "--output", data, "--max-seq-len", str(seq_len),
                                  "--overwrite"],
                         os.path.join(logs, "beam.log")), "beam")
        if not ok:
            return rows
    def train(stage: str, run_experiment: str, run_dir: str, *extra: str) -> bool:
        """``muse_tf.train`` as stage ``stage``, then one row per part of its metrics.json."""
        row = _run(stage, [python, "-m", "muse_tf.train", "--experiment", run_experiment,
                           "--data", data, "--model-dir", run_dir,
                           f"--set=train.max_train_steps={train_steps}",
                           "--set=train.verbose=2", *extra],
                   os.path.join(logs, f"{stage}.log"))
        ok = record(row, stage)
        metrics_path = os.path.join(run_dir, "metrics.json")
        if ok and os.path.exists(metrics_path):
            with open(metrics_path) as f:
                metrics = json.load(f)
            for part, values in metrics.get("stages", {}).items():
                rows.append({"stage": f"  {stage}: {part}", "seconds": values["seconds"],
                             "peak_rss_GB": values["peak_rss_bytes"] / _GB,
                             "returncode": 0})
            test = metrics.get("test", {})
            if "recall@100" in test:
                print(f"[scale] {stage}: recall@100 {test['recall@100']:.4f} over "
                      f"{test['queries']} queries, {test['queries_per_sec']:.2f} queries/s",
                      flush=True)
        return ok

    if "train" in stages:
        if not train("train", experiment, model_dir):
            return rows
    def served(stage: str, run_dir: str, served_rows: list[dict[str, Any]]) -> None:
        if not keep_outputs:
            served_rows[-1].update(_release_outputs(run_dir))
        for row in served_rows:
            record(row, stage)

    if "serve" in stages:
        served("serve", model_dir, _serve(
            names.RANKING_MODEL_NAME, names.ranking_base_path(model_dir),
            _request(names.RANKING_MODEL_NAME, data, seq_len), os.path.join(logs, "serve.log")))
    if "tree" in stages:
        record(_run("tree", [python, "-m", "muse_tf.index.tree_bench", "--data", data],
                    os.path.join(logs, "tree.log")), "tree")
    for stage, (run_experiment, model_name) in RETRIEVAL_STAGES.items():
        if stage not in stages:
            continue
        run_dir = os.path.join(work_dir, stage)
        if train(stage, run_experiment, run_dir, "--set=train.epochs=1",
                 f"--set=train.max_eval_steps={eval_steps}"):
            served(stage, run_dir, _serve(
                model_name, names.retrieval_base_path(run_dir, model_name),
                _request(model_name, data, seq_len), os.path.join(logs, f"{stage}_serve.log"),
                prefix=f"{stage}: "))
    print_table(f"scale: {items:,} items, {users:,} users, {samples:,} samples, L = {seq_len} "
           f"(each stage its own process; peak = summed RSS of its process tree)",
           [{k: v for k, v in r.items() if k not in ("log", "log_tail")} for r in rows])
    return rows
