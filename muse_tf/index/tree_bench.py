"""Benchmark of the MISS index tree build at catalogue scale (:meth:`IndexTree.build_from_codes`).

``python -m muse_tf.index.tree_bench --items N`` generates ``N`` random *clustered* int8 codes
(``D = 128`` by default, like TAOBAO-MM's SCL table: values within about ``-38 .. 38``, L2 norm
~122), chunk by chunk straight into one int8 ``[N, D]`` array (no float copy of it), builds the
tree over them by cosine and prints the wall seconds of every build stage (each streamed level,
each block level's thread-seconds, the node means), the total, the RSS before the build and
the peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``: the process's peak, the input
included). :func:`run` returns the same figures as a dict.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Sequence

import numpy as np

from muse_tf.index.tree import DEFAULT_BLOCK_ROWS, DEFAULT_COMPUTED_LEVELS, IndexTree

__all__ = ["clustered_codes", "main", "run"]

#: Rows generated per step (float32 temporaries of ``rows * D * 4`` bytes).
_GENERATE_ROWS = 1 << 16


def clustered_codes(
    num_items: int, dim: int = 128, num_clusters: int = 4096, seed: int = 0
) -> np.ndarray:
    """int8 ``[num_items, dim]`` codes around ``num_clusters`` random centres.

    Centre coordinates ~ N(0, 9^2), each item adds N(0, 6^2) noise, rounded and clipped to
    int8: per-coordinate spread ~10.8 (TAOBAO-MM's codes: about -38 .. 38, norm ~122).
    Generated ``_GENERATE_ROWS`` rows at a time into the output (peak: the codes + ~100 MB).
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 9.0, size=(num_clusters, dim)).astype(np.float32)
    codes = np.empty((num_items, dim), dtype=np.int8)
    for begin in range(0, num_items, _GENERATE_ROWS):
        end = min(begin + _GENERATE_ROWS, num_items)
        labels = rng.integers(0, num_clusters, size=end - begin)
        block = centres[labels]
        block += rng.normal(0.0, 6.0, size=block.shape).astype(np.float32)
        np.rint(block, out=block)
        np.clip(block, -127, 127, out=block)
        codes[begin:end] = block.astype(np.int8)
        # An all-zero code has no direction: make it a unit code (vanishingly rare).
        zero = ~codes[begin:end].any(axis=1)
        if zero.any():
            codes[begin:end][zero, 0] = 1
    return codes


def _rss_gib() -> float:
    """Current resident set size (GiB), from /proc/self/statm (0.0 where unavailable)."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
    except OSError:
        return 0.0
    return pages * resource.getpagesize() / 2**30


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (all threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _peak_rss_gib() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run(
    num_items: int,
    dim: int = 128,
    num_clusters: int = 4096,
    seed: int = 0,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    computed_levels: int = DEFAULT_COMPUTED_LEVELS,
    workers: int | None = None,
    num_iters: int = 5,
    verbose: bool = True,
    data_dir: str | None = None,
) -> dict:
    """Generates the codes, builds the tree, returns (and with ``verbose`` prints) the figures:
    ``items, dim, depth, generate_seconds, build_seconds, build_cpu_seconds`` (all threads),
    ``stages`` (name -> wall seconds; block levels: seconds summed over the threads),
    ``rss_before_build_gib, peak_rss_gib, input_gib, tree_gib`` (the tree's own arrays).

    With ``data_dir`` (a Beam output directory) the codes are its multimodal table instead
    (``num_items``, ``dim`` and ``num_clusters`` are then ignored; all-zero rows, which have
    no direction, are left out of the tree), and ``generate_seconds`` is the time to read it.
    """
    began = time.perf_counter()
    code_rows = None
    if data_dir is not None:
        from muse_tf.data.artifacts import load_mm_embeddings
        from muse_tf.embeddings.arrays import code_inverse_norms

        table_ids, codes = load_mm_embeddings(data_dir)
        code_rows = np.flatnonzero(code_inverse_norms(codes) > 0)
        item_ids = table_ids[code_rows]
        num_items, dim = len(code_rows), codes.shape[1]
    else:
        codes = clustered_codes(num_items, dim, num_clusters, seed)
        item_ids = np.arange(1, num_items + 1, dtype=np.int64)
    generate_seconds = time.perf_counter() - began
    rss_before = _rss_gib()
    stages: dict[str, float] = {}
    cpu_mark = [_cpu_seconds()]

    def on_stage(name: str, seconds: float) -> None:
        # CPU seconds since the previous stage: with other load on the machine, CPU time
        # is the steadier figure (wall = CPU / cores only on an idle machine).
        cpu = _cpu_seconds()
        stages[name] = seconds
        if verbose:
            spent = "" if "thread-seconds" in name else f", CPU {cpu - cpu_mark[0]:.2f} s"
            print(f"  {name}: {seconds:.2f} s{spent} (RSS {_rss_gib():.2f} GiB, peak "
                  f"{_peak_rss_gib():.2f} GiB)", flush=True)
        if "thread-seconds" not in name:
            cpu_mark[0] = cpu

    if verbose:
        print(f"tree_bench: {num_items} items x {dim} int8 ({codes.nbytes / 2**30:.2f} GiB) "
              f"generated in {generate_seconds:.1f} s; RSS {rss_before:.2f} GiB", flush=True)
    began = time.perf_counter()
    cpu_began = _cpu_seconds()
    tree = IndexTree.build_from_codes(
        codes, item_ids, code_rows=code_rows, num_iters=num_iters, seed=seed,
        block_rows=block_rows, computed_levels=computed_levels, workers=workers,
        on_stage=on_stage,
    )
    build_seconds = time.perf_counter() - began
    build_cpu_seconds = _cpu_seconds() - cpu_began
    tree_bytes = tree.nbytes
    result = {
        "items": num_items, "dim": dim, "depth": tree.depth,
        "stored_depth": tree.stored_depth, "block_rows": block_rows,
        "generate_seconds": round(generate_seconds, 2),
        "build_seconds": round(build_seconds, 2),
        "build_cpu_seconds": round(build_cpu_seconds, 2),
        "stages": {name: round(seconds, 3) for name, seconds in stages.items()},
        "input_gib": round(codes.nbytes / 2**30, 3),
        "tree_gib": round(tree_bytes / 2**30, 3),
        "rss_before_build_gib": round(rss_before, 3),
        "peak_rss_gib": round(_peak_rss_gib(), 3),
    }
    if verbose:
        print(f"tree_bench: depth {tree.depth}, built in {build_seconds:.1f} s (CPU "
              f"{build_cpu_seconds:.1f} s); tree arrays "
              f"{result['tree_gib']:.2f} GiB; peak RSS {result['peak_rss_gib']:.2f} GiB "
              f"(input {result['input_gib']:.2f} GiB)", flush=True)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m muse_tf.index.tree_bench",
        description="Build the MISS index tree over N random clustered int8 codes and report "
                    "wall seconds per stage and peak RSS.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--items", type=int, help="number of random items N")
    source.add_argument("--data", help="a Beam output directory: build over its int8 table")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--clusters", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--block-rows", type=int, default=DEFAULT_BLOCK_ROWS)
    parser.add_argument("--computed-levels", type=int, default=DEFAULT_COMPUTED_LEVELS)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--num-iters", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON last")
    args = parser.parse_args(argv)
    if args.items is not None and args.items < 1:
        parser.error(f"--items must be >= 1; got {args.items}")
    result = run(args.items or 0, args.dim, args.clusters, args.seed, args.block_rows,
                 args.computed_levels, args.workers, args.num_iters, data_dir=args.data)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
