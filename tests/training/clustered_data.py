"""A small Beam-style data directory with a planted retrieval signal, written directly (no
Beam run): items in multimodal clusters, users who click inside their interest cluster.

* ``clusters`` clusters of ``items_per_cluster`` items; an item's SCL vector is its cluster's
  random unit centroid plus isotropic noise (cos(item, centroid) about 0.7), scaled to the
  real table's norm and quantised to int8. Each cluster has its own two categories.
* ``unembedded`` further items have no multimodal vector (they are in no index): a share of
  the train clicks lands on them, so ``clicks_not_in_index`` is not 0.
* Every user has one interest cluster; a history of ``min_history..max_history`` behaviours,
  ``interest_share`` of them in the cluster, the others uniform over all items. Train: clicks
  on items of the cluster (``interest_share``) or uniform, plus non-clicked impressions.
  Test: one click per user on an item of its cluster.
* Item popularity is uniform, so the popularity baseline's recall@N is about N / items.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np

from muse_tf import schema
from muse_tf.data import layout
from muse_tf.data.records import encode_embedding_example, encode_sequence_example

Record = tuple[dict[str, int], dict[str, list[int]]]


def write_vocabularies(path: str, train_records: list[tuple[dict, dict]]) -> None:
    """Beam's vocabulary files (``id<TAB>count``, most frequent first) from train records."""
    os.makedirs(os.path.join(path, layout.VOCAB_DIR), exist_ok=True)
    for name, features in schema.vocabularies().items():
        counts: Counter[int] = Counter()
        for context, sequences in train_records:
            for feature in features:
                values = (sequences[feature.name] if feature.is_sequence
                          else [context[feature.name]])
                counts.update(v for v in values if v != 0)
        with open(layout.vocab_path(path, name), "w") as f:
            f.writelines(f"{i}\t{c}\n" for i, c in sorted(counts.items(),
                                                         key=lambda kv: (-kv[1], kv[0])))


def _write_records(directory: str, records: list[bytes], num_shards: int) -> list[str]:
    import tensorflow as tf

    os.makedirs(directory, exist_ok=True)
    bounds = np.linspace(0, len(records), num_shards + 1).astype(int)
    names = []
    for shard in range(num_shards):
        name = f"part-{shard:05d}-of-{num_shards:05d}{layout.RECORD_SUFFIX}"
        with tf.io.TFRecordWriter(os.path.join(directory, name), "GZIP") as writer:
            for record in records[bounds[shard]:bounds[shard + 1]]:
                writer.write(record)
        names.append(name)
    return names


def write_clustered_data_dir(path: str, *, clusters: int = 16, items_per_cluster: int = 32,
                             unembedded: int = 16, users: int = 800, train_clicks: int = 5,
                             train_skips: int = 2, min_history: int = 8, max_history: int = 20,
                             interest_share: float = 0.9, seed: int = 0) -> dict:
    """Writes the directory (module docstring) and returns what it holds: ``items``,
    ``embedded`` (ids with a vector), ``cluster_of`` (item -> cluster), ``interest`` (user
    index -> cluster), the record lists per split and the metadata."""
    rng = np.random.default_rng(seed)
    num_embedded = clusters * items_per_cluster
    # Signed 64-bit hashes over the whole range, as in TAOBAO-MM (never 0, all distinct).
    ids = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, dtype=np.int64,
                       size=num_embedded + unembedded + 2 * clusters + users * 6)
    assert len(np.unique(ids)) == len(ids) and np.all(ids != 0)
    items, ids = ids[:num_embedded + unembedded], ids[num_embedded + unembedded:]
    categories, ids = ids[:2 * clusters].reshape(clusters, 2), ids[2 * clusters:]
    cluster_of = np.concatenate([np.repeat(np.arange(clusters), items_per_cluster),
                                 rng.integers(0, clusters, unembedded)])
    category_of = categories[cluster_of, rng.integers(0, 2, len(items))]
    members = [items[:num_embedded][cluster_of[:num_embedded] == c] for c in range(clusters)]
    position = {int(item): k for k, item in enumerate(items)}

    dim = schema.MM_EMBEDDING_DIM
    centroids = rng.normal(size=(clusters, dim))
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    noise = rng.normal(size=(num_embedded, dim)) / np.sqrt(dim)
    vectors = centroids[cluster_of[:num_embedded]] + noise
    vectors *= 110.0 / np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors = np.clip(np.round(vectors), -127, 127).astype(np.int8)

    def draw(cluster: int, n: int) -> np.ndarray:
        own = rng.random(n) < interest_share
        return np.where(own, rng.choice(members[cluster], n), rng.choice(items, n))

    records: dict[str, list[Record]] = {"train": [], "test": []}
    interest = rng.integers(0, clusters, users)
    for u in range(users):
        user = {schema.USER_ID.name: int(ids[6 * u]),
                **{f.name: int(ids[6 * u + 1 + k]) for k, f in enumerate(schema.USER_ATTRIBUTES)}}
        history = draw(interest[u], int(rng.integers(min_history, max_history + 1)))
        sequences = {schema.HISTORY_ITEM_ID.name: history.tolist(),
                     schema.HISTORY_CATEGORY.name: [int(category_of[position[int(h)]])
                                                    for h in history]}
        clicked = [(1, item) for item in draw(interest[u], train_clicks)]
        skipped = [(0, item) for item in rng.choice(items, train_skips)]
        for split, impressions in (("train", clicked + skipped),
                                   ("test", [(1, rng.choice(members[interest[u]]))])):
            for label, item in impressions:
                k = position[int(item)]
                context = {schema.LABEL.name: label, **user, schema.ITEM_ID.name: int(item),
                           schema.ITEM_CATEGORY.name: int(category_of[k]),
                           **{f.name: 1 + a for a, f in enumerate(schema.ITEM_ATTRIBUTES)}}
                records[split].append((context, sequences))
    order = rng.permutation(len(records["train"]))
    records["train"] = [records["train"][i] for i in order]

    files = {split: [f"{split}/{name}" for name in _write_records(
        os.path.join(path, split), [encode_sequence_example(c, s) for c, s in split_records],
        num_shards=2)] for split, split_records in records.items()}
    _write_records(os.path.join(path, layout.EMBEDDINGS_DIR),
                   [encode_embedding_example(int(i), v.tobytes())
                    for i, v in zip(items[:num_embedded], vectors, strict=True)], num_shards=1)
    write_vocabularies(path, records["train"])
    metadata = {
        "splits": {split: {"rows_read": len(r), "examples_written": len(r), "rows_rejected": 0,
                           "rejected": {}, "files": files[split]}
                   for split, r in records.items()},
        "options": {"max_seq_len": max_history, "min_count": 1},
        "max_seq_len": max_history,
        "schema": schema.as_dict(),
        "schema_version": schema.SCHEMA_VERSION,
    }
    with open(layout.metadata_path(path), "w") as f:
        json.dump(metadata, f, indent=2)
    return {"items": items, "embedded": items[:num_embedded], "cluster_of": cluster_of,
            "interest": interest, "records": records, "metadata": metadata}
