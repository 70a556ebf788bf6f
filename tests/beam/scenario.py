"""A random TAOBAO-MM input with every kind of bad row, and what the build must write for it.

:func:`write_scenario` writes sharded tables (duplicates across and within shards, null ids,
bad labels, mismatched and null histories, bad embedding dimensions, unknown users and
items); :func:`expected_outputs` computes, in plain Python from the source rows, the records,
rejected rows, vocabularies, embedding table and counts that ``beam.build_dataset`` writes
(the row-at-a-time semantics of the first pipeline: first row in (file, row) order kept,
"no user features" before "no item features"). :func:`read_outputs` reads a built data
directory into the same shape, so a test compares the two with ``==``.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections import Counter
from typing import Any

import numpy as np
import tensorflow as tf

import muse_tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
from muse_tf import schema
from muse_tf.data import layout
from tests.beam.conftest import TableWriter

DIM = schema.MM_EMBEDDING_DIM
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
_SAMPLE_FILES = {"train": "train_samples", "test": "test_samples"}
_USER_FILES = {"train": "train_user_features", "test": "test_user_features"}


@dataclasses.dataclass
class Scenario:
    """The source rows of every table, as ``(path, row, values)`` in file and row order."""

    root: str
    samples: dict[str, list[tuple[str, int, tuple]]]
    users: dict[str, list[tuple[str, int, dict]]]
    items: list[tuple[str, int, tuple]]
    embeddings: list[tuple[str, int, tuple]]


def _shards(writer_fn, stem: str, rows: list, shards: int, rng: np.random.Generator,
            **kwargs) -> list[tuple[str, int, Any]]:
    """Writes ``rows`` in ``shards`` files ``stem/part-K.parquet``; returns positioned rows."""
    cuts = np.sort(rng.choice(np.arange(1, len(rows)), shards - 1, replace=False)).tolist()
    out = []
    for k, (begin, end) in enumerate(zip([0, *cuts], [*cuts, len(rows)], strict=True)):
        path = writer_fn(f"{stem}/part-{k}.parquet", rows[begin:end], **kwargs)
        out += [(path, r, row) for r, row in enumerate(rows[begin:end])]
    return out


def write_scenario(writer: TableWriter, seed: int = 0, items: int = 40, users: int = 30,
                   samples: int = 160) -> Scenario:
    """Random tables with every rejection reason; ids include 0-adjacent and int64 extremes."""
    rng = np.random.default_rng(seed)
    item_ids = [INT64_MIN, INT64_MAX, -1, 1, *rng.integers(-10**12, 10**12, items - 4).tolist()]
    user_ids = [INT64_MIN + 1, 2, *rng.integers(-10**12, 10**12, users - 2).tolist()]
    categories = [int(c) for c in rng.integers(-50, 50, 7)]

    def item_row(item):
        return (item, int(rng.choice(categories)), int(rng.integers(0, 5)),
                int(rng.integers(-3, 3)))

    # Items: all but the last three ids have rows (those stay unknown); some duplicates
    # (identical or not), null and 0 ids.
    known_items = item_ids[:-3]
    item_rows = [item_row(i) for i in known_items]
    for item in rng.choice(known_items, 6, replace=False).tolist():
        same = next(r for r in item_rows if r[0] == item)
        item_rows.append(same if rng.random() < 0.5 else item_row(item))
    item_rows += [(None, 1, 1, 1), (0, 2, 2, 2)]
    order = rng.permutation(len(item_rows))
    item_rows = [item_rows[k] for k in order]

    def vector():
        return rng.integers(-128, 128, DIM).tolist()

    emb_rows: list[tuple] = [(i, vector()) for i in known_items[:-2]]
    for item in rng.choice(known_items[:-2], 5, replace=False).tolist():
        same = next(r for r in emb_rows if r[0] == item)
        emb_rows.append(same if rng.random() < 0.5 else (item, vector()))
    emb_rows += [(known_items[-2], vector()[:-1]), (known_items[-1], None),
                 (known_items[0], [*vector()[:-1], None]),  # bad rows do not count as dups
                 (None, vector()), (0, vector())]
    order = rng.permutation(len(emb_rows))
    emb_rows = [emb_rows[k] for k in order]

    def history(length):
        items_ = rng.choice([*item_ids, 0], length).tolist()
        return items_, [int(rng.choice(categories)) for _ in items_]

    def user_row(uid, length=None):
        length = int(rng.integers(0, 9)) if length is None else length
        hist, cats = history(length)
        attrs = [None if rng.random() < 0.1 else int(rng.integers(-5, 5)) for _ in range(5)]
        if rng.random() < 0.1 and hist:
            hist[0] = None  # a null element reads as 0
        return {"id": uid, "attrs": attrs, "items": hist, "cats": cats}

    scenario_users: dict[str, list] = {}
    scenario_samples: dict[str, list] = {}
    for split in ("train", "test"):
        # The last four users have no rows; user 4 has only a mismatched row, user 5 a
        # mismatched and a good row.
        known = user_ids[:-4]
        rows = [user_row(u) for u in known if u != known[4]]
        rows.append({**user_row(known[4], 3), "cats": [1]})
        rows.append({**user_row(known[5], 2), "cats": [1, 2, 3]})
        for uid in rng.choice(known[6:], 5, replace=False).tolist():
            same = next(r for r in rows if r["id"] == uid)
            rows.append(same if rng.random() < 0.5 else user_row(uid))
        rows += [user_row(None), user_row(0),
                 {"id": int(known[7]), "attrs": [1] * 5, "items": None, "cats": None}]
        order = rng.permutation(len(rows))
        scenario_users[split] = [rows[k] for k in order]

        labels = [[1, 0], [0, 1]]
        sample_rows = []
        for _ in range(samples):
            r = rng.random()
            label = labels[int(rng.integers(0, 2))]
            if r < 0.03:
                bad = [None, [1, 1], [0, 0], [1], [0, 1, 0], [None, 1]]
                label = bad[int(rng.integers(0, len(bad)))]
            user = (None if 0.03 <= r < 0.045 else 0 if 0.045 <= r < 0.05
                    else int(rng.choice(user_ids)))
            item = 0 if 0.05 <= r < 0.06 else int(rng.choice(item_ids))
            sample_rows.append((label, user, item))
        scenario_samples[split] = sample_rows

    samples_out = {split: _shards(writer.samples, _SAMPLE_FILES[split], rows, 3, rng,
                                  row_group_size=17)
                   for split, rows in scenario_samples.items()}
    users_out = {split: _shards(writer.users, _USER_FILES[split], rows, 2, rng,
                                row_group_size=5)
                 for split, rows in scenario_users.items()}
    items_out = _shards(writer.items, "item_features", item_rows, 3, rng)
    embeddings_out = _shards(writer.embeddings, "scl_embedding_int8_p90", emb_rows, 3, rng)
    return Scenario(writer.root, samples_out, users_out, items_out, embeddings_out)


def _first(rows: list[tuple[str, int, Any]]):
    return min(rows, key=lambda r: (r[0], r[1]))


def _rejected(source, reason, path, row, **keys) -> dict:
    return {"source": source, "reason": reason, "file": path, "row": row, **keys}


def _null(value):
    return value is None or value == 0


def _dedup(source: str, key: str, rows: list, content) -> tuple[dict, list[dict]]:
    """id -> kept (path, row, values); duplicate_key rejections."""
    by_id: dict[int, list] = {}
    for path, row, values in rows:
        by_id.setdefault(values[0] if isinstance(values, tuple) else values["id"], []).append(
            (path, row, values))
    kept, rejected = {}, []
    for ident, group in by_id.items():
        first = _first(group)
        kept[ident] = first
        for path, row, values in group:
            if (path, row) != first[:2]:
                rejected.append(_rejected(source, "duplicate_key", path, row, **{key: ident},
                                          kept={"file": first[0], "row": first[1]},
                                          identical=content(values) == content(first[2])))
    return kept, rejected


def expected_outputs(s: Scenario, max_seq_len: int, min_count: int) -> dict[str, Any]:
    """Records, rejected rows, vocabularies, embeddings and counts the build must write."""
    rejected: dict[str, list[dict]] = {}
    counts: Counter = Counter()

    # Items.
    good_items = []
    for path, row, values in s.items:
        if _null(values[0]):
            rejected.setdefault("item_features", []).append(
                _rejected("item_features", "null_id", path, row, item_id=values[0]))
        else:
            good_items.append((path, row, values))
    items, dups = _dedup("item_features", "item_id", good_items, lambda v: v[1:])
    rejected.setdefault("item_features", []).extend(dups)
    counts["item_features", "rows_read"] = len(s.items)
    counts["item_features", "rows_kept"] = len(items)

    # Embeddings.
    good_embeddings = []
    for path, row, (item, vector) in s.embeddings:
        if _null(item):
            reason = _rejected("embeddings", "null_id", path, row, item_id=item)
        elif vector is None or len(vector) != DIM or None in vector:
            reason = _rejected("embeddings", "bad_embedding_dim", path, row, item_id=item,
                               dim=None if vector is None else len(vector))
        else:
            good_embeddings.append((path, row, (item, vector)))
            continue
        rejected.setdefault("embeddings", []).append(reason)
    embeddings, dups = _dedup("embeddings", "item_id", good_embeddings, lambda v: v[1])
    rejected.setdefault("embeddings", []).extend(dups)
    counts["embeddings", "rows_read"] = len(s.embeddings)
    counts["embeddings", "rows_written"] = len(embeddings)
    table = {item: row[2][1] for item, row in embeddings.items()}

    records: dict[str, list[dict]] = {}
    vocab_records = []
    for split in ("train", "test"):
        section = _USER_FILES[split]
        good_users, bad_users = [], set()
        for path, row, user in s.users[split]:
            items_, cats = user["items"] or [], user["cats"] or []
            if _null(user["id"]):
                rejected.setdefault(section, []).append(
                    _rejected(section, "null_id", path, row, user_id=user["id"]))
            elif len(items_) != len(cats):
                rejected.setdefault(section, []).append(_rejected(
                    section, "history_length_mismatch", path, row, user_id=user["id"],
                    lengths={schema.HISTORY_ITEM_ID.key: len(items_),
                             schema.HISTORY_CATEGORY.key: len(cats)}))
                bad_users.add(user["id"])
            else:
                parsed = {"id": user["id"], "attrs": [a or 0 for a in user["attrs"]],
                          "items": [i or 0 for i in items_][-max_seq_len:],
                          "cats": [c or 0 for c in cats][-max_seq_len:], "full": len(items_)}
                good_users.append((path, row, parsed))
                counts[section, "histories_truncated"] += len(items_) > max_seq_len
        users, dups = _dedup(section, "user_id", good_users,
                             lambda u: (u["attrs"], u["items"], u["cats"], u["full"]))
        rejected.setdefault(section, []).extend(dups)
        counts[section, "rows_read"] = len(s.users[split])
        counts[section, "rows_kept"] = len(users)

        out = records.setdefault(split, [])
        for path, row, (label, user_id, item_id) in s.samples[split]:
            keys = {"user_id": user_id, "item_id": item_id}
            if _null(user_id) or _null(item_id):
                reason = "null_id"
            elif not (isinstance(label, list) and tuple(label) in ((1, 0), (0, 1))):
                rejected.setdefault(split, []).append(
                    _rejected(split, "bad_label", path, row, **keys, label=label))
                continue
            elif user_id not in users:
                reason = ("history_length_mismatch" if user_id in bad_users
                          else "no_user_features")
            elif item_id not in items:
                reason = "no_item_features"
            else:
                user = users[user_id][2]
                item = items[item_id][2]
                record = {schema.LABEL.name: label.index(1), schema.USER_ID.name: user_id,
                          schema.ITEM_ID.name: item_id, schema.ITEM_CATEGORY.name: item[1],
                          schema.HISTORY_ITEM_ID.name: user["items"],
                          schema.HISTORY_CATEGORY.name: user["cats"]}
                for k, feature in enumerate(schema.USER_ATTRIBUTES):
                    record[feature.name] = user["attrs"][k]
                for k, feature in enumerate(schema.ITEM_ATTRIBUTES):
                    record[feature.name] = item[2 + k]
                out.append(record)
                counts[split, "histories_truncated"] += user["full"] > max_seq_len
                if split == "train":
                    vocab_records.append(record)
                continue
            rejected.setdefault(split, []).append(_rejected(split, reason, path, row, **keys))
        counts[split, "rows_read"] = len(s.samples[split])
        counts[split, "examples_written"] = len(out)

    vocabularies = {}
    for name, features in schema.vocabularies().items():
        counter: Counter = Counter()
        for record in vocab_records:
            for feature in features:
                value = record[feature.name]
                counter.update(v for v in (value if feature.is_sequence else [value]) if v)
        vocabularies[name] = [f"{i}\t{c}" for i, c in sorted(
            counter.items(), key=lambda kv: (-kv[1], kv[0])) if c >= min_count]
    for section, rows in rejected.items():
        for r in rows:
            counts[section, "rejected." + r["reason"]] += 1
    return {"records": {k: sorted(map(_record_key, v)) for k, v in records.items()},
            "rejected": {k: sorted(map(_json, v)) for k, v in rejected.items() if v},
            "vocabularies": vocabularies, "embeddings": table,
            "counts": {k: v for k, v in counts.items() if v}}


def _record_key(record: dict) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in record.items()))


def _json(row: dict) -> str:
    return json.dumps(row, sort_keys=True)


def parsed_records(pattern: str) -> list[dict]:
    files = sorted(glob.glob(pattern))
    out = []
    if not files:
        return out
    dataset = tf.data.TFRecordDataset(files, compression_type="GZIP").batch(256)
    for batch in dataset:
        context, sequences, lengths = tf.io.parse_sequence_example(
            batch, context_features=schema.context_parse_spec(),
            sequence_features=schema.sequence_parse_spec())
        for i in range(int(batch.shape[0])):
            record = {name: int(v[i]) for name, v in context.items()}
            for name, v in sequences.items():
                record[name] = v[i].numpy()[:int(lengths[name][i])].tolist()
            out.append(record)
    return out


def read_embeddings(data_dir: str) -> dict[int, list[int]]:
    """The embedding table of a data directory: item id -> int8 values."""
    spec = {layout.EMBEDDING_ID_FEATURE: tf.io.FixedLenFeature([], tf.int64),
            layout.EMBEDDING_BYTES_FEATURE: tf.io.FixedLenFeature([], tf.string)}
    table: dict[int, list[int]] = {}
    files = sorted(glob.glob(layout.embeddings_pattern(data_dir)))
    for serialized in tf.data.TFRecordDataset(files, compression_type="GZIP"):
        example = tf.io.parse_single_example(serialized, spec)
        item = int(example[layout.EMBEDDING_ID_FEATURE])
        assert item not in table, f"item {item} written twice"
        table[item] = np.frombuffer(example[layout.EMBEDDING_BYTES_FEATURE].numpy(),
                                    np.int8).tolist()
    return table


def read_outputs(data_dir: str) -> dict[str, Any]:
    """A built data directory in the shape of :func:`expected_outputs`."""
    with open(layout.metadata_path(data_dir)) as f:
        metadata = json.load(f)
    counts: dict[tuple[str, str], int] = {}
    for group in ("splits", "tables"):
        for section, entry in metadata[group].items():
            for key in ("rows_read", "rows_kept", "rows_written", "examples_written",
                        "histories_truncated"):
                if entry.get(key):
                    counts[section, key] = entry[key]
            for reason, n in entry["rejected"].items():
                if n:
                    counts[section, "rejected." + reason] = n
    rejected = {}
    for section in os.listdir(os.path.join(data_dir, layout.REJECTED_DIR)):
        rows = []
        for path in sorted(glob.glob(layout.rejected_pattern(data_dir, section))):
            with open(path) as f:
                rows += [json.loads(line) for line in f if line.strip()]
        if rows:
            rejected[section] = sorted(map(_json, rows))
    vocabularies = {}
    for name in schema.vocabularies():
        with open(layout.vocab_path(data_dir, name)) as f:
            vocabularies[name] = f.read().splitlines()
    return {"records": {split: sorted(map(_record_key, parsed_records(
                layout.split_pattern(data_dir, split)))) for split in layout.SPLITS},
            "rejected": rejected, "vocabularies": vocabularies,
            "embeddings": read_embeddings(data_dir), "counts": counts}
