"""gRPC latency and throughput of one Predict request, sent over and over.

:func:`grpc_latency` builds the request once (through :class:`serving.client.PredictionClient`,
so it is padded like any client request), then ``concurrency`` threads, each with its own
channel, send it until ``requests`` calls have completed (after ``warmup`` untimed calls).
Latency is client-observed wall time per call; throughput is completed calls per second
of the timed phase. Works against stock TF Serving and :mod:`serving.server` alike::

    python -m serving.bench --server localhost:8500 --model muse_ranking \\
        --features request.json --requests 2000 --concurrency 8

``--features`` takes what ``python -m serving.client --features`` takes: a raw request
(``{"user": ..., "history_items": ..., "history_categories": ..., "candidates": ...}``) or
``{input alias: nested list}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import numpy as np

import muse_tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow's first import)
from serving import client as client_lib
from serving import signatures
from serving.grpc_options import channel_options


@dataclasses.dataclass(frozen=True)
class LatencyStats:
    """Client-observed latency of the timed calls (milliseconds) and throughput."""

    requests: int
    concurrency: int
    errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    throughput_rps: float
    request_bytes: int

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def grpc_latency(server_address: str, model: str, inputs: Mapping[str, Any],
                 requests: int = 1000, concurrency: int = 1, *,
                 signature_name: str = signatures.DEFAULT_SIGNATURE,
                 version: int | None = None, warmup: int = 10,
                 timeout: float = client_lib.DEFAULT_TIMEOUT_SECONDS) -> LatencyStats:
    """Send the same Predict request ``requests`` times from ``concurrency`` threads.

    Args:
      server_address: ``host:port``.
      model, inputs, signature_name, version: the request (see
        :meth:`serving.client.PredictionClient.build_request`).
      requests: timed calls in total.
      concurrency: threads sending at once (one gRPC channel each).
      warmup: untimed calls first (per thread: ``ceil(warmup / concurrency)``).
      timeout: seconds per call.

    Returns:
      :class:`LatencyStats`; failed calls are counted in ``errors`` and left out of the
      latencies. Raises ``RuntimeError`` if every call failed, with the first error.
    """
    if requests < 1 or concurrency < 1:
        raise ValueError(f"requests and concurrency must be >= 1, got {requests}, "
                         f"{concurrency}")
    with client_lib.PredictionClient(server_address, timeout=timeout) as client:
        request = client.build_request(model, inputs, signature_name=signature_name,
                                       version=version)
    per_thread = [requests // concurrency + (i < requests % concurrency)
                  for i in range(concurrency)]
    warmup_per_thread = -(-warmup // concurrency) if warmup > 0 else 0
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors: list[list[grpc.RpcError]] = [[] for _ in range(concurrency)]
    ready = threading.Barrier(concurrency + 1)
    go = threading.Event()

    def worker(slot: int) -> None:
        channel = grpc.insecure_channel(server_address, options=channel_options())
        try:
            predict = client_lib.prediction_service_pb2_grpc.PredictionServiceStub(
                channel).Predict
            for _ in range(warmup_per_thread):
                try:
                    predict(request, timeout=timeout)
                except grpc.RpcError:
                    pass
            ready.wait()
            go.wait()
            for _ in range(per_thread[slot]):
                start = time.perf_counter()
                try:
                    predict(request, timeout=timeout)
                except grpc.RpcError as error:
                    errors[slot].append(error)
                    continue
                latencies[slot].append(time.perf_counter() - start)
        finally:
            channel.close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True)
               for i in range(concurrency)]
    for thread in threads:
        thread.start()
    ready.wait()
    start = time.perf_counter()
    go.set()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start

    timed = np.asarray([t for slot in latencies for t in slot]) * 1000.0
    failed = [e for slot in errors for e in slot]
    if timed.size == 0:
        first = failed[0]
        raise RuntimeError(f"every call failed; first error {first.code().name}: "
                           f"{first.details()}")
    p50, p90, p99 = np.percentile(timed, [50, 90, 99])
    return LatencyStats(
        requests=int(timed.size), concurrency=concurrency, errors=len(failed),
        p50_ms=float(p50), p90_ms=float(p90), p99_ms=float(p99),
        mean_ms=float(timed.mean()), max_ms=float(timed.max()),
        throughput_rps=float(timed.size / elapsed), request_bytes=request.ByteSize())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.bench",
                                     description="Predict latency / throughput over gRPC.")
    parser.add_argument("--server", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--signature", default=signatures.DEFAULT_SIGNATURE)
    parser.add_argument("--features", required=True,
                        help="JSON file: a raw request or {input alias: nested list} (as "
                             "python -m serving.client --features)")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args(argv)
    with open(args.features) as f:
        obj = json.load(f)
    with client_lib.PredictionClient(args.server) as client:
        inputs = client_lib.inputs_from_json(
            obj, client.signature_def(args.model, args.signature))
    stats = grpc_latency(args.server, args.model, inputs, args.requests, args.concurrency,
                         signature_name=args.signature, warmup=args.warmup)
    print(json.dumps(stats.as_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
