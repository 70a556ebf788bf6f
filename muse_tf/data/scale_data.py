"""A TAOBAO-MM-shaped data set of any size, written as a stream (for the scale benchmark).

:mod:`muse_tf.data.synthetic` plants a learnable signal and keeps its whole world in memory,
which is right for 10^4-10^5 items. This generator writes the six TAOBAO-MM tables for the
real catalogue size (35.4M items: a 4.5 GB int8 SCL table) with memory that does not grow
with the catalogue beyond a few int32/int64 arrays per item (about 12 bytes an item)::

    python -m muse_tf.data.scale_data --out DIR --items 35400000 --users 20000 \\
        --samples 100000 [--seq-len 1000] [--seed 0] [--test-fraction 0.1] [--overwrite]

What it holds (enough structure that the index tree, the GSU and the vocabularies see
realistic data, no claim of a planted effect size):

* Item ids, user ids: distinct non-zero 63-bit hashes of the row index (splitmix64, a
  bijection on 64-bit words, masked to 63 bits).
* Items fall into ``items // 5000`` clusters (at least 1); an item's embedding is its
  cluster's random unit centroid plus Gaussian noise, scaled to L2 norm 122 and rounded to
  int8 in [-38, 38] (the real table's range and norm). Every item has an embedding row and
  an item-feature row; its category is its cluster's.
* A user has three interest clusters; history items come half from them, half by a
  heavy-headed popularity (``index = N * u**3``); histories are oldest first, 70% of them
  ``seq_len`` long, the rest uniform in ``[10, seq_len)``. Targets come 60% from the
  interests; P(click) = 0.45 for an interest target, 0.10 otherwise.
* The newest ``test_fraction`` of each user's samples (on average; rounded up or down at
  random per user) go to ``test_samples``; the test user-feature row is the train row's
  history (the real set's test rows are a later cut of
  the same users).

The table layout is :mod:`muse_tf.data.synthetic`'s: ``<stem>.parquet`` or
``<stem>-NNNNN.parquet`` shards, plus ``generator.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from muse_tf import schema
from muse_tf.data import synthetic

__all__ = ["generate", "hashed_ids", "main"]

_NORM = 122.0
_CLIP = 38
_SPREAD = 0.9           # noise norm relative to the unit centroid
_ITEMS_PER_CLUSTER = 5000
_INTERESTS = 3
_CHUNK_ROWS = 262_144   # catalogue rows generated at a time (~130 MB of float32 noise)
_USER_CHUNK = 2048      # users at a time (their histories: 2 x 2048 x L int64)
_SALT_ITEM, _SALT_USER, _SALT_CLUSTER, _SALT_ATTR = 1, 2, 3, 4
_SAMPLE_STEM = {"train": synthetic.TRAIN_SAMPLES, "test": synthetic.TEST_SAMPLES}
_MASK63 = np.uint64(0x7FFF_FFFF_FFFF_FFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser (a bijection on uint64) of each element."""
    z = np.asarray(x, dtype=np.uint64).copy()
    with np.errstate(over="ignore"):
        z ^= z >> np.uint64(30)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(27)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return z


def hashed_ids(index: np.ndarray, salt: int, seed: int) -> np.ndarray:
    """Non-zero int64 ids (63-bit) of row indices ``index`` for one id space ``salt``."""
    key = (np.asarray(index, dtype=np.uint64) + np.uint64(1)) \
        + (np.uint64(seed) << np.uint64(40)) + (np.uint64(salt) << np.uint64(56))
    ids = (_splitmix64(key) & _MASK63).astype(np.int64)
    ids[ids == 0] = 1  # 2^-63 per id; keeps 0 free for padding
    return ids


class _Catalogue:
    """Per-item facts computed from the index (cluster, ids) and the cluster lookup."""

    def __init__(self, items: int, seed: int):
        self.items = items
        self.seed = seed
        self.clusters = max(1, items // _ITEMS_PER_CLUSTER)
        rng = np.random.default_rng([seed, 7])
        centroids = rng.standard_normal((self.clusters, schema.MM_EMBEDDING_DIM))
        self.centroids = (centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
                          ).astype(np.float32)
        self.category_of_cluster = hashed_ids(np.arange(self.clusters), _SALT_CLUSTER, seed)
        cluster = self.cluster_of(np.arange(items, dtype=np.int64)).astype(np.int32)
        # Items of each cluster: int32 indices sorted by cluster (4 bytes an item).
        self.by_cluster = np.argsort(cluster, kind="stable").astype(np.int32)
        self.cluster_start = np.searchsorted(cluster[self.by_cluster],
                                             np.arange(self.clusters + 1)).astype(np.int64)
        del cluster

    def cluster_of(self, index: np.ndarray) -> np.ndarray:
        return (_splitmix64(np.asarray(index, np.uint64) ^ np.uint64(0x5EED + self.seed))
                % np.uint64(self.clusters)).astype(np.int64)

    def item_ids(self, index: np.ndarray) -> np.ndarray:
        return hashed_ids(index, _SALT_ITEM, self.seed)

    def categories(self, index: np.ndarray) -> np.ndarray:
        return self.category_of_cluster[self.cluster_of(index)]

    def in_clusters(self, clusters: np.ndarray, u: np.ndarray) -> np.ndarray:
        """An item index of each ``clusters`` entry, uniform within it (``u`` in [0, 1))."""
        start = self.cluster_start[clusters]
        size = self.cluster_start[clusters + 1] - start
        offset = np.minimum((u * size).astype(np.int64), np.maximum(size - 1, 0))
        return self.by_cluster[start + offset].astype(np.int64)

    def popular(self, u: np.ndarray) -> np.ndarray:
        return np.minimum((self.items * u ** 3).astype(np.int64), self.items - 1)

    def codes(self, begin: int, end: int) -> np.ndarray:
        """int8 ``[end - begin, D]`` embeddings of items ``begin .. end - 1``."""
        rng = np.random.default_rng([self.seed, 11, begin])
        x = rng.standard_normal((end - begin, schema.MM_EMBEDDING_DIM), dtype=np.float32)
        x *= _SPREAD / np.sqrt(schema.MM_EMBEDDING_DIM)
        x += self.centroids[self.cluster_of(np.arange(begin, end))]
        x *= _NORM / np.linalg.norm(x, axis=1, keepdims=True)
        return np.clip(np.rint(x), -_CLIP, _CLIP).astype(np.int8)


def _list_array(values: np.ndarray, lengths: np.ndarray, value_type: pa.DataType) -> pa.Array:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=value_type))


def _write_catalogue(catalogue: _Catalogue, writers: dict[str, Any]) -> None:
    seed = catalogue.seed
    for begin in range(0, catalogue.items, _CHUNK_ROWS):
        end = min(begin + _CHUNK_ROWS, catalogue.items)
        index = np.arange(begin, end, dtype=np.int64)
        ids = catalogue.item_ids(index)
        attrs = hashed_ids(index % 997, _SALT_ATTR, seed), hashed_ids(index % 89, _SALT_ATTR,
                                                                       seed + 1)
        writers[synthetic.ITEM_FEATURES].write(pa.table(
            [ids, catalogue.categories(index), *attrs],
            schema=synthetic.table_schema(synthetic.ITEM_FEATURES)))
        codes = catalogue.codes(begin, end)
        vectors = _list_array(codes.reshape(-1), np.full(end - begin, codes.shape[1]),
                              pa.int8())
        writers[synthetic.EMBEDDINGS].write(pa.table(
            [ids, vectors], schema=synthetic.table_schema(synthetic.EMBEDDINGS)))


def _write_users(catalogue: _Catalogue, writers: dict[str, Any], users: int, samples: int,
                 seq_len: int, test_fraction: float, seed: int) -> dict[str, int]:
    counts = {"train_samples": 0, "test_samples": 0, "clicks": 0, "behaviours": 0}
    per_user = samples / users
    for begin in range(0, users, _USER_CHUNK):
        end = min(begin + _USER_CHUNK, users)
        n = end - begin
        rng = np.random.default_rng([seed, 13, begin])
        index = np.arange(begin, end, dtype=np.int64)
        user_ids = hashed_ids(index, _SALT_USER, seed)
        interests = rng.integers(0, catalogue.clusters, (n, _INTERESTS))
        full = rng.random(n) < 0.7
        lengths = np.where(full, seq_len, rng.integers(min(10, seq_len), seq_len + 1, n))
        lengths = np.minimum(lengths, seq_len).astype(np.int64)
        owner = np.repeat(np.arange(n), lengths)
        from_interest = rng.random(owner.size) < 0.5
        u = rng.random(owner.size)
        which = rng.integers(0, _INTERESTS, owner.size)
        history = np.where(from_interest,
                           catalogue.in_clusters(interests[owner, which], u),
                           catalogue.popular(u))
        history_ids = catalogue.item_ids(history)
        history_categories = catalogue.categories(history)
        counts["behaviours"] += int(owner.size)
        attrs = [hashed_ids(index % m, _SALT_ATTR, seed + 10 + k)
                 for k, m in enumerate((7, 2, 300, 11, 5))]
        user_columns = [user_ids, *attrs,
                        _list_array(history_ids, lengths, pa.int64()),
                        _list_array(history_categories, lengths, pa.int64())]
        user_table = pa.table(user_columns,
                              schema=synthetic.table_schema(synthetic.TRAIN_USER_FEATURES))
        writers[synthetic.TRAIN_USER_FEATURES].write(user_table)

        # Samples: floor or ceil of samples / users per user, so the total is exact.
        quota = (np.floor((index + 1) * per_user) - np.floor(index * per_user)).astype(np.int64)
        sample_owner = np.repeat(np.arange(n), quota)
        interest_target = rng.random(sample_owner.size) < 0.6
        u = rng.random(sample_owner.size)
        target = np.where(
            interest_target,
            catalogue.in_clusters(interests[sample_owner,
                                            rng.integers(0, _INTERESTS, sample_owner.size)], u),
            catalogue.popular(u))
        clicked = rng.random(sample_owner.size) < np.where(interest_target, 0.45, 0.10)
        counts["clicks"] += int(clicked.sum())
        # A user's last samples are its test samples: floor(quota * test_fraction + u) of them
        # (u uniform in [0, 1)), so test_fraction of all samples on average, also when a user
        # has only a few.
        rank = np.arange(sample_owner.size) - np.repeat(np.cumsum(quota) - quota, quota)
        tests = np.floor(quota * test_fraction + rng.random(n)).astype(np.int64)
        test = rank >= np.repeat(quota - np.minimum(tests, quota), quota)
        labels = np.stack([~clicked, clicked], axis=1).astype(np.int8).reshape(-1)
        label_lists = _list_array(labels, np.full(sample_owner.size, 2), pa.int8())
        sample_table = pa.table(
            [label_lists, user_ids[sample_owner], catalogue.item_ids(target)],
            schema=synthetic.table_schema(synthetic.TRAIN_SAMPLES))
        for split, mask in (("train", ~test), ("test", test)):
            rows = np.flatnonzero(mask)
            writers[_SAMPLE_STEM[split]].write(sample_table.take(pa.array(rows)))
            counts[f"{split}_samples"] += int(rows.size)
        test_users = np.unique(sample_owner[test])
        writers[synthetic.TEST_USER_FEATURES].write(user_table.take(pa.array(test_users)))
    return counts


def generate(out_dir: str, *, items: int, users: int, samples: int,
             seq_len: int = schema.MAX_HISTORY_LEN, seed: int = 0, test_fraction: float = 0.1,
             catalogue_shard_rows: int = 4_000_000, overwrite: bool = False) -> dict[str, Any]:
    """Writes the six tables to ``out_dir``; returns what ``generator.json`` records."""
    for name, value, low in (("items", items, 1), ("users", users, 1), ("samples", samples, 0),
                             ("seq_len", seq_len, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction!r}")
    os.makedirs(out_dir, exist_ok=True)
    existing = synthetic.existing_outputs(out_dir)
    if existing and not overwrite:
        raise FileExistsError(f"{out_dir} already holds {len(existing)} generated files (e.g. "
                              f"{existing[0]}); pass overwrite=True / --overwrite")
    for path in existing:
        os.remove(path)
    start = time.perf_counter()
    catalogue = _Catalogue(items, seed)
    shard_rows = {synthetic.ITEM_FEATURES: catalogue_shard_rows,
                  synthetic.EMBEDDINGS: catalogue_shard_rows}
    writers = {stem: synthetic.ShardedWriter(out_dir, stem, synthetic.table_schema(stem),
                                             shard_rows.get(stem, 1_000_000))
               for stem in synthetic.TABLES}
    _write_catalogue(catalogue, writers)
    counts = _write_users(catalogue, writers, users, samples, seq_len, test_fraction, seed)
    files = {stem: [os.path.basename(p) for p in writer.close()]
             for stem, writer in writers.items()}
    info = {"generator": "muse_tf.data.scale_data", "items": items, "users": users,
            "samples": samples, "seq_len": seq_len, "seed": seed,
            "test_fraction": test_fraction, "clusters": catalogue.clusters, **counts,
            "rows": {stem: writers[stem].rows for stem in synthetic.TABLES},
            "files": files, "seconds": time.perf_counter() - start}
    with open(os.path.join(out_dir, synthetic.GENERATOR_FILE), "w") as f:
        json.dump(info, f, indent=2, sort_keys=True)
    return info


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m muse_tf.data.scale_data",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--items", type=int, required=True)
    parser.add_argument("--users", type=int, required=True)
    parser.add_argument("--samples", type=int, required=True)
    parser.add_argument("--seq-len", type=int, default=schema.MAX_HISTORY_LEN)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-fraction", type=float, default=0.1)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        info = generate(args.out, items=args.items, users=args.users, samples=args.samples,
                        seq_len=args.seq_len, seed=args.seed, test_fraction=args.test_fraction,
                        overwrite=args.overwrite)
    except (ValueError, FileExistsError) as err:
        parser.error(str(err))
    print(json.dumps({k: v for k, v in info.items() if k != "files"}, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
