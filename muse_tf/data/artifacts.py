"""Loaders for the non-record artifacts of a Beam output directory.

The layout is :mod:`muse_tf.data.layout`: ``metadata.json``, ``vocab/<vocabulary>.tsv``
(``"<raw id>\\t<count>"`` per line, most frequent first) and the multimodal embedding table
``embeddings/part-*.tfrecord.gz`` (``tf.train.Example`` with an int64 item id and the int8
vector as bytes). Paths go through ``tf.io.gfile``, so ``gs://`` directories work as well.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import os
import re
from typing import Any

import numpy as np
import pyarrow as pa
import tensorflow as tf
from pyarrow import csv

from muse_tf import schema
from muse_tf.data import layout

#: One vocabulary line: a signed decimal id, a tab, a non-negative decimal count.
_VOCAB_LINE = re.compile(r"-?\d+\t\d+")
#: Rows per batch when parsing the embedding records.
_EMBEDDING_BATCH = 16384
#: Parsed embedding batches are gathered into blocks of about this size while reading.
_EMBEDDING_BLOCK_BYTES = 64 << 20


def load_metadata(data_dir: str) -> dict[str, Any]:
    """Read ``metadata.json`` of a Beam output directory.

    Raises:
      FileNotFoundError: naming the path when the file is missing.
      ValueError: naming the path when it is not a JSON object, or when its schema version
        differs from :data:`muse_tf.schema.SCHEMA_VERSION`.
    """
    path = layout.metadata_path(data_dir)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(
            f"no metadata file at {path!r}: is {data_dir!r} a Beam output directory?")
    with tf.io.gfile.GFile(path, "r") as f:
        text = f.read()
    try:
        metadata = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"metadata file {path!r} is not valid JSON: {e}") from e
    if not isinstance(metadata, dict):
        raise ValueError(
            f"metadata file {path!r} must hold a JSON object, got {type(metadata).__name__}")
    # beam.build_dataset writes the version twice: top level and inside the schema.
    versions = (metadata.get("schema_version"), (metadata.get("schema") or {}).get("version"))
    other = [v for v in versions if v is not None and v != schema.SCHEMA_VERSION]
    if other:
        raise ValueError(
            f"metadata file {path!r} was written with schema version {other[0]}, this code "
            f"reads version {schema.SCHEMA_VERSION}; rebuild the data directory")
    return metadata


def max_seq_len_from_metadata(metadata: dict[str, Any], path: str) -> int:
    """``max_seq_len`` of a metadata dict (top level, else under ``"options"``), else
    :data:`muse_tf.schema.MAX_HISTORY_LEN`; ``path`` names the file in errors."""
    value = metadata.get("max_seq_len")
    if value is None:
        value = (metadata.get("options") or {}).get("max_seq_len")
    if value is None:
        return schema.MAX_HISTORY_LEN
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"max_seq_len in {path!r} must be a positive int, got {value!r}")
    return value


def split_entry(metadata: dict[str, Any], split: str) -> dict[str, Any]:
    """The ``splits.<split>`` entry of a metadata dict (``{}`` when it has none)."""
    entry = (metadata.get("splits") or {}).get(split)
    return entry if isinstance(entry, dict) else {}


def listed_split_files(metadata: dict[str, Any], split: str, data_dir: str) -> list[str] | None:
    """The shards ``metadata.json`` lists for ``split`` (``splits.<split>.files``, paths
    relative to ``data_dir``) as full paths, sorted; None when it lists none (metadata of an
    older build, or a hand-made directory)."""
    files = split_entry(metadata, split).get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return sorted(f if "://" in f else os.path.join(data_dir, f) for f in files)


def split_counts_text(metadata: dict[str, Any], split: str) -> str:
    """``"rows read R, examples written W, rows rejected X (reason n, ...)"``: what the
    build counted for ``split`` (the reasons most frequent first, zeros left out)."""
    entry = split_entry(metadata, split)
    rejected = entry.get("rejected") or {}
    reasons = sorted(((r, n) for r, n in rejected.items() if isinstance(n, int) and n),
                     key=lambda kv: (-kv[1], kv[0]))
    detail = f" ({', '.join(f'{r} {n}' for r, n in reasons)})" if reasons else ""
    return (f"rows read {entry.get('rows_read', '?')}, examples written "
            f"{entry.get('examples_written', '?')}, rows rejected "
            f"{entry.get('rows_rejected', '?')}{detail}")


def check_vocabulary_size(vocabulary: str, ids: np.ndarray, counts: np.ndarray,
                          metadata: dict[str, Any], path: str) -> None:
    """Check a vocabulary read back from ``path`` against what ``metadata.json`` says was
    written (``vocabularies.<name>``: ``size`` lines; when no id was cut by ``min_count``,
    ``size == distinct_ids``, counts adding up to ``occurrences``); a ``ValueError`` naming
    the file when they differ (a truncated or replaced file). Entries without these fields
    (older or hand-made metadata) are not checked."""
    entries = metadata.get("vocabularies")
    entry = entries.get(vocabulary) if isinstance(entries, dict) else None
    if not isinstance(entry, dict):
        return
    size, distinct = entry.get("size"), entry.get("distinct_ids")
    occurrences = entry.get("occurrences")
    if isinstance(size, int) and size != len(ids):
        raise ValueError(
            f"vocabulary file {path!r} holds {len(ids)} ids but metadata.json says {size} "
            "were written: the file was truncated or replaced; rebuild the data directory")
    if (isinstance(size, int) and size == distinct and isinstance(occurrences, int)
            and int(np.sum(counts)) != occurrences):
        raise ValueError(
            f"vocabulary file {path!r}: its counts add up to {int(np.sum(counts))} but "
            f"metadata.json says {occurrences} occurrences were counted: the file was "
            "truncated or replaced; rebuild the data directory")


def load_vocabulary(
    data_dir: str, vocabulary: str, min_count: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Read ``vocab/<vocabulary>.tsv``.

    Args:
      data_dir: the Beam output directory.
      vocabulary: a vocabulary name of the schema (``"item"``, ``"category"``, ...).
      min_count: keep only ids counted at least this often (a frequency cut-off).

    Returns:
      ``(ids, counts)``: int64 arrays of shape ``[V]`` in file order (most frequent first).

    Raises:
      FileNotFoundError: naming the file when it is missing.
      OSError: naming the file when it cannot be read (a directory, no permission, an I/O
        error of the filesystem).
      ValueError: naming the file and the 1-based line number of a malformed line (a
        truncated last line among them), or a repeated id.
    """
    if min_count < 0:
        raise ValueError(f"min_count must be >= 0, got {min_count}")
    path = layout.vocab_path(data_dir, vocabulary)
    if not tf.io.gfile.exists(path):
        known = schema.vocabularies()
        hint = "" if vocabulary in known else f" (schema vocabularies: {sorted(known)})"
        raise FileNotFoundError(f"no vocabulary file {path!r} for {vocabulary!r}{hint}")
    ids, counts = read_vocabulary_file(path)
    repeated = _first_repeated(ids)
    if repeated is not None:
        lines = (np.flatnonzero(ids == repeated) + 1).tolist()
        raise ValueError(
            f"vocabulary file {path!r} repeats id {repeated} (lines {lines[:5]})")
    if min_count > 0:
        keep = counts >= min_count
        ids, counts = ids[keep], counts[keep]
    return ids, counts


def read_vocabulary_file(path: str) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, counts)`` of any ``"<id>\\t<count>"`` vocabulary file, in line order (Arrow's
    C++ CSV reader: about a second for ten million lines).

    Raises:
      OSError: naming the file when it is missing or cannot be read.
      ValueError: naming the file and the first malformed line.
    """
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            data = f.read()
    except (tf.errors.OpError, OSError) as err:
        message = err.message if isinstance(err, tf.errors.OpError) else str(err)
        raise OSError(f"could not read vocabulary file {path!r}: {message}") from err
    return parse_vocabulary(data, path)


def read_vocabulary_ids(path: str, name: str, vocab_size: int) -> np.ndarray:
    """The first ``vocab_size`` raw ids of vocabulary ``name``'s file, in line order.

    Raises:
      OSError: naming the file when it is missing or cannot be read.
      ValueError: naming the file when a line is malformed, or when it holds fewer than
        ``vocab_size`` lines (a truncated file).
    """
    try:
        ids, _ = read_vocabulary_file(path)
    except OSError as err:
        raise OSError(f"{err} (vocabulary {name!r})") from err
    except ValueError as err:
        raise ValueError(f"malformed vocabulary file {path!r} of {name!r}: {err}") from err
    if len(ids) < vocab_size:
        raise ValueError(f"vocabulary file {path!r} of {name!r} holds {len(ids)} ids, fewer "
                         f"than its vocab_size={vocab_size}: the file was truncated or "
                         "replaced after the model was built")
    return ids[:vocab_size]


def write_vocabulary_file(path: str, ids: np.ndarray, counts: np.ndarray) -> None:
    """Writes ``"<id>\\t<count>"`` lines (Arrow's CSV writer: no Python loop over lines)."""
    table = pa.table({"id": pa.array(np.asarray(ids, np.int64)),
                      "count": pa.array(np.asarray(counts, np.int64))})
    sink = pa.BufferOutputStream()
    csv.write_csv(table, sink, write_options=csv.WriteOptions(
        include_header=False, delimiter="\t", quoting_style="none"))
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(sink.getvalue().to_pybytes())


def parse_vocabulary(data: bytes, path: str) -> tuple[np.ndarray, np.ndarray]:
    """Parse TSV bytes into (ids, counts); names ``path`` and the line when malformed."""
    if not data or data.isspace():
        return np.zeros([0], np.int64), np.zeros([0], np.int64)

    # Fast path (vocabularies reach tens of millions of lines): Arrow's C++ CSV reader.
    try:
        table = csv.read_csv(
            io.BytesIO(data),
            read_options=csv.ReadOptions(column_names=["id", "count"]),
            parse_options=csv.ParseOptions(delimiter="\t", quote_char=False,
                                           ignore_empty_lines=False),
            convert_options=csv.ConvertOptions(
                column_types={"id": pa.int64(), "count": pa.int64()},
                null_values=[], strings_can_be_null=False),
        )
        ids = table.column("id").to_numpy()
        counts = table.column("count").to_numpy()
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        ids = counts = None
    if ids is not None and counts is not None and (counts.size == 0 or counts.min() >= 0):
        return ids.astype(np.int64, copy=False), counts.astype(np.int64, copy=False)
    # Slow path, only on failure: find the first bad line to name it.
    lines = data.decode("utf-8", errors="replace").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for number, line in enumerate(lines, start=1):
        text = line.rstrip("\r")
        if _VOCAB_LINE.fullmatch(text) is None or not _fits_int64(text):
            raise ValueError(
                f"malformed line {number} of vocabulary file {path!r}: {text[:80]!r} "
                "(expected '<int64 id>\\t<non-negative int64 count>')")
    raise ValueError(f"could not parse vocabulary file {path!r}")


def _fits_int64(line: str) -> bool:
    raw_id, count = line.split("\t")
    return -(2**63) <= int(raw_id) < 2**63 and int(count) < 2**63


def load_mm_embeddings(data_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """Read the multimodal (SCL) embedding table.

    Shards are read side by side (a thread each, up to the CPU count) and records parsed in
    batches (``tf.io.parse_example`` + ``tf.io.decode_raw``), so a
    table of a million rows loads in seconds. Memory: the int8 result plus about
    :data:`_EMBEDDING_BLOCK_BYTES` (parsed batches are gathered into blocks of that size,
    which are copied into the result and freed one by one: never a second copy of the
    table, 4.5 GB for TAOBAO-MM's 35.4M items), and 8 bytes a row for the ids.

    Returns:
      ``(item_ids, vectors)``: int64 ``[N]`` and int8 ``[N, MM_EMBEDDING_DIM]``, shards in
      sorted order, rows in file order.

    Raises:
      FileNotFoundError: naming the glob when no shard exists.
      ValueError: naming the item id whose vector does not hold
        :data:`muse_tf.schema.MM_EMBEDDING_DIM` bytes, or an item id that appears twice.
    """
    pattern = layout.embeddings_pattern(data_dir)
    files = sorted(tf.io.gfile.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no embedding shards match {pattern!r}")
    dim = schema.MM_EMBEDDING_DIM
    spec = {
        layout.EMBEDDING_ID_FEATURE: tf.io.FixedLenFeature([], tf.int64),
        layout.EMBEDDING_BYTES_FEATURE: tf.io.FixedLenFeature([], tf.string),
    }

    def parse(serialized: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        parsed = tf.io.parse_example(serialized, spec)
        blobs = parsed[layout.EMBEDDING_BYTES_FEATURE]
        # fixed_length never fails on a bad row; its byte length is checked below instead.
        vectors = tf.io.decode_raw(blobs, tf.int8, fixed_length=dim)
        return parsed[layout.EMBEDDING_ID_FEATURE], tf.strings.length(blobs), vectors

    def read(path: str) -> tuple[list[np.ndarray], list[np.ndarray], tuple[int, int] | None,
                                 int]:
        """One shard: its id batches, its vector blocks, its first bad row and bad count."""
        dataset = (
            tf.data.TFRecordDataset([path], compression_type="GZIP", buffer_size=16 << 20)
            .batch(_EMBEDDING_BATCH)
            .map(parse, num_parallel_calls=2, deterministic=True)
            .prefetch(2)
        )
        ids_of_file: list[np.ndarray] = []
        batches: list[np.ndarray] = []
        blocks_of_file: list[np.ndarray] = []
        bad_row: tuple[int, int] | None = None
        bad_rows = 0
        for ids, sizes, vectors in dataset.as_numpy_iterator():
            bad = np.flatnonzero(sizes != dim)
            if bad.size and bad_row is None:
                bad_row = int(ids[bad[0]]), int(sizes[bad[0]])
            bad_rows += int(bad.size)
            ids_of_file.append(ids)
            batches.append(vectors)
            if sum(b.nbytes for b in batches) >= _EMBEDDING_BLOCK_BYTES:
                blocks_of_file.append(np.concatenate(batches))
                batches = []
        if batches:
            blocks_of_file.append(np.concatenate(batches))
        return ids_of_file, blocks_of_file, bad_row, bad_rows

    # Shards are read side by side (gzip inflation is the cost: one core per shard), and
    # assembled in sorted shard order.
    with concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, min(len(files), os.cpu_count() or 1))) as pool:
        per_file = list(pool.map(read, files))
    id_parts = [ids for part in per_file for ids in part[0]]
    blocks = [block for part in per_file for block in part[1]]
    bad_rows = [part[2] for part in per_file if part[2] is not None]
    first_bad = bad_rows[0] if bad_rows else None
    num_bad = sum(part[3] for part in per_file)
    del per_file
    if first_bad is not None:
        raise ValueError(
            f"embedding of item id {first_bad[0]} holds {first_bad[1]} bytes, expected {dim} "
            f"int8 values ({num_bad} bad rows under {pattern!r})")
    if not id_parts:
        return np.zeros([0], np.int64), np.zeros([0, dim], np.int8)
    item_ids = np.concatenate(id_parts).astype(np.int64, copy=False)
    repeated = _first_repeated(item_ids)
    if repeated is not None:
        raise ValueError(f"item id {repeated} appears more than once in {pattern!r}")
    out = np.empty((len(item_ids), dim), np.int8)
    offset = 0
    blocks.reverse()
    while blocks:  # copy, then free, block by block
        block = blocks.pop()
        out[offset:offset + len(block)] = block
        offset += len(block)
        del block
    return item_ids, out


def _first_repeated(values: np.ndarray) -> int | None:
    """The smallest value that occurs more than once in ``values``, else ``None``."""
    ordered = np.sort(values)
    same = np.flatnonzero(ordered[1:] == ordered[:-1])
    return int(ordered[same[0]]) if same.size else None
