"""DoFns and combiners of the dataset pipeline (see :mod:`beam.build_dataset` for the graph).

Rows travel between stages as **column blocks**: a few NumPy columns of many rows serialised
into one ``bytes`` value (:func:`encode_block` / :func:`decode_block`), keyed by the
**id-hash bucket** of their join key (:func:`id_buckets`), so a shuffle moves a few large
values instead of one Python element per row. A row is named by its **position**
``file_index << 40 | row`` (:func:`positions`): the index of its file in the table's sorted
file list and its row number there, so file names are held once, in the DoFns, and sorting
positions sorts rows in (file, row) order.

Catalogue and user tables are read twice. The first read sends only ``(id, position)`` key
blocks through a shuffle, per bucket, to find each key's first row and the duplicate rows
(:func:`deduplicate`) and which rows the samples need; that decision comes back as a **plan**,
small column blocks keyed by ``(file_index, chunk)`` (rows ``chunk * chunk_rows`` onwards)
and read as a multimap side input (:class:`PlanLookup`) by the second read, which then
encodes or forwards exactly the planned rows straight from its parquet batches. Embedding
vectors and user histories never enter a shuffle; only the (usually few) rows of duplicated
keys do, to decide ``identical`` (:class:`RejectDuplicates`).

Every DoFn is configured through its constructor and emits, beside its main output:

* ``rejected``: one dict per rejected row, ``{"source", "reason", keys..., "file", "row"}``
  (``source`` is a split name for sample rows, a table name for table rows);
* ``counts``: ``((section, counter), n)`` pairs summed into ``metadata.json``.

Rejection reasons, in the order they are checked for a sample: ``null_id`` (user or item id
null or 0), ``bad_label`` (not ``[1,0]`` / ``[0,1]``), ``no_user_features``,
``history_length_mismatch`` (every user-feature row of the user has sequence columns of
different lengths), ``no_item_features``. Table rows are rejected for ``null_id``,
``history_length_mismatch`` (user features), ``bad_embedding_dim`` (embeddings) and
``duplicate_key``: when a table holds several rows with one key, the first row in (file,
row) order is kept and every other row is rejected (and listed, with the kept row and
whether it is ``identical``) as ``duplicate_key``, so samples are still joined and nothing
is dropped silently.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.transforms.window import GlobalWindows

from muse_tf import schema
from muse_tf.data import layout, records

# Rejection reasons.
NULL_ID = "null_id"
BAD_LABEL = "bad_label"
NO_USER_FEATURES = "no_user_features"
HISTORY_LENGTH_MISMATCH = "history_length_mismatch"
NO_ITEM_FEATURES = "no_item_features"
BAD_EMBEDDING_DIM = "bad_embedding_dim"
DUPLICATE_KEY = "duplicate_key"
#: Reasons a sample row (an impression) can be rejected for.
SAMPLE_REASONS = (NULL_ID, BAD_LABEL, NO_USER_FEATURES, HISTORY_LENGTH_MISMATCH,
                  NO_ITEM_FEATURES)
#: Reasons a row of each feature table can be rejected for.
USER_TABLE_REASONS = (NULL_ID, HISTORY_LENGTH_MISMATCH, DUPLICATE_KEY)
ITEM_TABLE_REASONS = (NULL_ID, DUPLICATE_KEY)
EMBEDDING_TABLE_REASONS = (NULL_ID, BAD_EMBEDDING_DIM, DUPLICATE_KEY)

# Output tags.
REJECTED = "rejected"
COUNTS = "counts"
VOCAB = "vocab"
#: Rows of duplicated keys, ``(key, (position, content_bytes))``, for :class:`RejectDuplicates`.
DUPLICATES = "duplicates"
#: The duplicate-row plan of a user table (beside its sample plan).
DUPLICATE_PLAN = "duplicate_plan"

# Counter names inside a section.
ROWS_READ = "rows_read"
ROWS_KEPT = "rows_kept"
ROWS_WRITTEN = "rows_written"
EXAMPLES_WRITTEN = "examples_written"
HISTORIES_TRUNCATED = "histories_truncated"
REJECTED_PREFIX = "rejected."

#: Default number of id-hash buckets (:func:`id_buckets`): enough parallelism and small
#: per-bucket work (35.4M items: ~140K keys, 2 MB, a bucket), cheap for ten rows.
DEFAULT_BUCKETS = 256

# Plan flags of a table row (bits, combined with ``|``).
#: The item row's values are needed by the join (a kept row some sample refers to).
NEEDED = 1
#: The row's key has several rows: the row goes to :class:`RejectDuplicates`.
DUPLICATE = 2
#: A duplicate that is not kept: not written.
SKIP = 4

# Columns by role, derived from the schema.
_USER_CONTEXT = tuple(f for f in schema.CONTEXT_FEATURES if f.table == schema.USER_FEATURES)
_USER_SEQUENCES = tuple(f for f in schema.SEQUENCE_FEATURES if f.table == schema.USER_FEATURES)
_ITEM_CONTEXT = tuple(f for f in schema.CONTEXT_FEATURES if f.table == schema.ITEM_FEATURES)
#: Item-side context of a record: the target id, then the item table's features.
_ITEM_FEATURES = (schema.ITEM_ID, *_ITEM_CONTEXT)
#: User-side context of a record: the user id, then the user table's attributes.
_USER_FEATURES = (schema.USER_ID, *_USER_CONTEXT)
# The sample table holds the label and the join keys only, sequences come from user features.
if [f for f in schema.FEATURES if f.table == schema.SAMPLES] != [
        schema.LABEL, schema.USER_ID, schema.ITEM_ID]:
    raise NotImplementedError("the pipeline reads only label, user id and item id from samples")
if len(_USER_SEQUENCES) != len(schema.SEQUENCE_FEATURES):
    raise NotImplementedError(
        "the pipeline reads sequence features from the user-feature table only; schema has "
        f"{[(f.name, f.table) for f in schema.SEQUENCE_FEATURES]}")

_I64 = np.dtype(np.int64)
_I8 = np.dtype(np.int8)
# Column blocks by kind: name -> dtype.
#: Key rows of a catalogue table (first read).
KEY_COLUMNS = {"id": _I64, "position": _I64}
#: Key rows of a user table: ``good`` is 0 for a row whose sequences differ in length.
USER_KEY_COLUMNS = {**KEY_COLUMNS, "good": _I8}
#: Valid sample rows (label 0/1), keyed by target-item bucket.
SAMPLE_COLUMNS = {schema.ITEM_ID.name: _I64, schema.USER_ID.name: _I64,
                  schema.LABEL.name: _I8, "position": _I64}
#: The item join's values: the item-side context of a record.
ITEM_VALUE_COLUMNS = {f.name: _I64 for f in _ITEM_FEATURES}
#: Samples after the item join (item values 0 where ``has_item`` is 0), keyed by user bucket.
JOINED_SAMPLE_COLUMNS = {**SAMPLE_COLUMNS, "has_item": _I8, **ITEM_VALUE_COLUMNS}
#: A table's plan: rows (within the file) and their flags.
PLAN_COLUMNS = {"row": _I64, "flags": _I8}
#: A user table's sample plan: the kept user row of each joinable sample, with its record's
#: label and item-side values.
SAMPLE_PLAN_COLUMNS = {"row": _I64, schema.USER_ID.name: _I64, schema.LABEL.name: _I8,
                       **ITEM_VALUE_COLUMNS}

_LABEL_VALUES = {(1, 0): 0, (0, 1): 1}


def count(section: str, counter: str, n: int = 1) -> beam.pvalue.TaggedOutput:
    """A ``counts`` output inside ``process``."""
    return beam.pvalue.TaggedOutput(COUNTS, ((section, counter), n))


def _bundle_counts(counter: Counter) -> Iterator[beam.pvalue.TaggedOutput]:
    """``counts`` outputs from ``finish_bundle`` (which must carry their window)."""
    for key, n in sorted(counter.items()):
        if n:
            yield beam.pvalue.TaggedOutput(COUNTS, GlobalWindows.windowed_value((key, n)))


def _rejected(source: str, reason: str, path: str, row: int, **keys: Any
              ) -> beam.pvalue.TaggedOutput:
    return beam.pvalue.TaggedOutput(
        REJECTED, {"source": source, "reason": reason, "file": path, "row": int(row), **keys})


# ---------------------------------------------------------------------------------------------
# Column blocks, buckets and positions.
# ---------------------------------------------------------------------------------------------

_POSITION_BITS = 40
_ROW_MASK = (1 << _POSITION_BITS) - 1
_BLOCK_HEADER = struct.Struct("<4sI")
_BLOCK_MAGIC = b"MCB1"


def positions(file_index: int, rows: np.ndarray) -> np.ndarray:
    """Positions ``file_index << 40 | row`` of ``rows`` of one file (int64)."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size and (rows.min() < 0 or rows.max() > _ROW_MASK):
        raise ValueError(f"row numbers must be in [0, 2**{_POSITION_BITS}), got "
                         f"{rows.min()}..{rows.max()}")
    return (np.int64(file_index) << np.int64(_POSITION_BITS)) | rows


def position_file(position: int) -> int:
    """The file index of a position."""
    return int(position) >> _POSITION_BITS


def position_row(position: int) -> int:
    """The row number (within its file) of a position."""
    return int(position) & _ROW_MASK


def id_buckets(ids: np.ndarray, num_buckets: int) -> np.ndarray:
    """The bucket (0 .. ``num_buckets - 1``) of each int64 id.

    MurmurHash3's 64-bit finaliser of the id, modulo ``num_buckets``: the same on every
    worker and platform, and spread evenly also for ids that are themselves hashes.
    """
    z = np.array(ids, dtype=np.int64).view(np.uint64)
    with np.errstate(over="ignore"):
        z ^= z >> np.uint64(33)
        z *= np.uint64(0xFF51AFD7ED558CCD)
        z ^= z >> np.uint64(33)
        z *= np.uint64(0xC4CEB9FE1A85EC53)
        z ^= z >> np.uint64(33)
    return (z % np.uint64(num_buckets)).astype(np.int64)


def encode_block(columns: Mapping[str, np.ndarray]) -> bytes:
    """Serialises named 1-D NumPy columns (any lengths) into one ``bytes`` value.

    Layout: magic, header length, a JSON header ``[[name, dtype, length], ...]``, then each
    column's raw little-endian bytes, every part padded to 8 bytes.
    """
    arrays = []
    for name, column in columns.items():
        array = np.ascontiguousarray(column)
        if array.ndim != 1:
            raise ValueError(f"block column {name!r} must be 1-D, got shape {array.shape}")
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        arrays.append((name, array))
    header = json.dumps([[n, a.dtype.str, int(a.shape[0])] for n, a in arrays]).encode()
    parts = [_BLOCK_HEADER.pack(_BLOCK_MAGIC, len(header)), header, _padding(len(header))]
    for _, array in arrays:
        data = array.tobytes()
        parts += [data, _padding(len(data))]
    return b"".join(parts)


def _padding(size: int) -> bytes:
    return b"\0" * (-size % 8)


def decode_block(data: bytes) -> dict[str, np.ndarray]:
    """The columns of an :func:`encode_block` value (read-only views into ``data``)."""
    magic, header_size = _BLOCK_HEADER.unpack_from(data, 0)
    if magic != _BLOCK_MAGIC:
        raise ValueError(f"not a column block (starts with {bytes(data[:4])!r})")
    offset = _BLOCK_HEADER.size
    header = json.loads(bytes(data[offset:offset + header_size]))
    offset += header_size + (-header_size % 8)
    out = {}
    for name, dtype, length in header:
        dtype = np.dtype(dtype)
        out[name] = np.frombuffer(data, dtype=dtype, count=length, offset=offset)
        size = dtype.itemsize * length
        offset += size + (-size % 8)
    return out


def concat_blocks(blocks: Iterable[bytes | Mapping[str, np.ndarray]],
                  columns: Mapping[str, np.dtype]) -> dict[str, np.ndarray]:
    """The rows of several blocks (encoded or decoded) with the given columns, concatenated.

    Missing blocks give empty columns; a block with other columns is an error.
    """
    parts: dict[str, list[np.ndarray]] = {name: [] for name in columns}
    for block in blocks:
        decoded = decode_block(block) if isinstance(block, bytes | bytearray | memoryview) \
            else block
        if set(decoded) != set(columns):
            raise ValueError(f"block has columns {sorted(decoded)}, expected {sorted(columns)}")
        for name in columns:
            parts[name].append(decoded[name])
    return {name: (np.concatenate(parts[name]).astype(dtype, copy=False) if parts[name]
                   else np.zeros(0, dtype)) for name, dtype in columns.items()}


def _take(columns: Mapping[str, np.ndarray], index) -> dict[str, np.ndarray]:
    return {name: column[index] for name, column in columns.items()}


def split_by_bucket(columns: Mapping[str, np.ndarray], buckets: np.ndarray
                    ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """``(bucket, rows of that bucket)`` for every bucket present, rows in input order."""
    if not len(buckets):
        return
    order = np.argsort(buckets, kind="stable")
    sorted_buckets = buckets[order]
    starts = np.flatnonzero(np.concatenate([[True], sorted_buckets[1:] != sorted_buckets[:-1]]))
    ends = np.append(starts[1:], len(order))
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
        yield int(sorted_buckets[start]), _take(columns, order[start:end])


class BucketBuffer:
    """Gathers rows per bucket across a bundle and hands them out as encoded blocks.

    A bucket's rows are handed out once they reach ``flush_rows``; everything is handed out
    when the buffer holds more than ``max_rows`` rows and by :meth:`drain` (at the end of a
    bundle). Memory: at most ``max_rows`` rows plus one batch.
    """

    def __init__(self, flush_rows: int = 16384, max_rows: int = 1 << 20):
        self._flush_rows = flush_rows
        self._max_rows = max_rows
        self._parts: dict[int, list[dict[str, np.ndarray]]] = {}
        self._rows: Counter = Counter()
        self._total = 0

    def add(self, buckets: np.ndarray, columns: Mapping[str, np.ndarray]
            ) -> list[tuple[int, bytes]]:
        """Adds rows (``buckets[i]`` is row ``i``'s bucket); returns blocks ready to emit."""
        ready = []
        for bucket, part in split_by_bucket(columns, buckets):
            self._parts.setdefault(bucket, []).append(part)
            n = len(next(iter(part.values())))
            self._rows[bucket] += n
            self._total += n
            if self._rows[bucket] >= self._flush_rows:
                ready.append(self._pop(bucket))
        if self._total > self._max_rows:
            ready += self.drain()
        return ready

    def _pop(self, bucket: int) -> tuple[int, bytes]:
        parts = self._parts.pop(bucket)
        self._total -= self._rows.pop(bucket)
        merged = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
        return bucket, encode_block(merged)

    def drain(self) -> list[tuple[int, bytes]]:
        """Every buffered bucket's block (the buffer is empty afterwards)."""
        return [self._pop(bucket) for bucket in sorted(self._parts)]


@dataclasses.dataclass(frozen=True)
class Deduplicated:
    """The first row of every key, and the rows of keys that have several.

    Attributes:
      ids: the distinct keys, ascending.
      kept: the position of each key's first row in (file, row) order.
      duplicate_positions: every row of the keys with several rows (kept ones included),
        by key, then position.
      duplicate_kept: whether each of those rows is its key's kept row.
    """

    ids: np.ndarray
    kept: np.ndarray
    duplicate_positions: np.ndarray
    duplicate_kept: np.ndarray

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each of ``ids``: whether it has a row, and the kept position (0 if not)."""
        if not self.ids.size:
            return np.zeros(len(ids), bool), np.zeros(len(ids), np.int64)
        index = np.minimum(np.searchsorted(self.ids, ids), self.ids.size - 1)
        found = self.ids[index] == ids
        return found, np.where(found, self.kept[index], 0)


def deduplicate(ids: np.ndarray, row_positions: np.ndarray) -> Deduplicated:
    """Groups rows by key: the first row (lowest position) of each key is kept."""
    order = np.lexsort((row_positions, ids))
    sorted_ids, sorted_positions = ids[order], row_positions[order]
    first = np.concatenate([[True], sorted_ids[1:] != sorted_ids[:-1]]) if order.size \
        else np.zeros(0, bool)
    starts = np.flatnonzero(first)
    sizes = np.diff(np.append(starts, order.size))
    in_duplicate = np.repeat(sizes > 1, sizes)
    return Deduplicated(ids=sorted_ids[starts], kept=sorted_positions[starts],
                        duplicate_positions=sorted_positions[in_duplicate],
                        duplicate_kept=first[in_duplicate])


def plan_blocks(row_positions: np.ndarray, columns: Mapping[str, np.ndarray], chunk_rows: int
                ) -> Iterator[tuple[tuple[int, int], bytes]]:
    """Plan entries ``((file_index, chunk), block)``: ``columns`` of rows at ``row_positions``.

    The block holds a ``row`` column (row within the file) and ``columns``, rows ascending.
    """
    if not len(row_positions):
        return
    order = np.argsort(row_positions, kind="stable")
    ordered = row_positions[order]
    files = ordered >> np.int64(_POSITION_BITS)
    rows = ordered & np.int64(_ROW_MASK)
    chunks = rows // chunk_rows
    change = np.concatenate([[True], (files[1:] != files[:-1]) | (chunks[1:] != chunks[:-1])])
    starts = np.flatnonzero(change)
    ends = np.append(starts[1:], order.size)
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
        block = {"row": rows[start:end],
                 **{name: column[order[start:end]] for name, column in columns.items()}}
        yield (int(files[start]), int(chunks[start])), encode_block(block)


def table_plan(row_positions: np.ndarray, flags: np.ndarray, chunk_rows: int
               ) -> Iterator[tuple[tuple[int, int], bytes]]:
    """Plan entries of table rows with flags; flags of one row given twice are combined."""
    if not len(row_positions):
        return
    order = np.argsort(row_positions, kind="stable")
    ordered = row_positions[order]
    starts = np.flatnonzero(np.concatenate([[True], ordered[1:] != ordered[:-1]]))
    combined = np.bitwise_or.reduceat(flags[order].astype(np.int8), starts)
    yield from plan_blocks(ordered[starts], {"flags": combined}, chunk_rows)


class PlanLookup:
    """The plan rows of one parquet batch, from a multimap side input of :func:`plan_blocks`.

    Fetches the entries of every chunk the batch overlaps and caches the last few chunks, so
    consecutive batches of one file fetch each chunk once; :meth:`clear` at the start of a
    bundle.
    """

    def __init__(self, chunk_rows: int, columns: Mapping[str, np.dtype], cache_chunks: int = 4):
        self._chunk_rows = chunk_rows
        self._columns = {"row": _I64, **columns}
        self._cache: dict[tuple[int, int], dict[str, np.ndarray]] = {}
        self._cache_chunks = cache_chunks

    def clear(self) -> None:
        """Forgets the cached chunks."""
        self._cache = {}

    def rows(self, plan: Any, file_index: int, first_row: int, num_rows: int
             ) -> dict[str, np.ndarray]:
        """The plan's rows in ``[first_row, first_row + num_rows)`` of the file, ascending."""
        if num_rows <= 0:
            return concat_blocks([], self._columns)
        parts = []
        for chunk in range(first_row // self._chunk_rows,
                           (first_row + num_rows - 1) // self._chunk_rows + 1):
            key = (file_index, chunk)
            if key not in self._cache:
                if len(self._cache) >= self._cache_chunks:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[key] = concat_blocks(plan[key], self._columns)
            parts.append(self._cache[key])
        merged = concat_blocks(parts, self._columns)
        keep = (merged["row"] >= first_row) & (merged["row"] < first_row + num_rows)
        order = np.argsort(merged["row"][keep], kind="stable")
        return {name: column[keep][order] for name, column in merged.items()}


# ---------------------------------------------------------------------------------------------
# Column helpers (pyarrow -> numpy).
# ---------------------------------------------------------------------------------------------

def _column(table, key: str):
    import pyarrow as pa

    column = table.column(key)
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column


def int_column(table, key: str, path: str) -> tuple[np.ndarray, np.ndarray]:
    """``(values, present)``: int64 values with nulls as 0, and a not-null mask."""
    import pyarrow as pa

    column = _column(table, key)
    if not pa.types.is_integer(column.type):
        raise ValueError(f"column {key!r} of {path} must be an integer column, "
                         f"got type {column.type}")
    present = ~np.asarray(column.is_null(), dtype=bool)
    values = np.asarray(column.fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)
    return values, present


def _list_type_check(column, key: str, path: str) -> None:
    import pyarrow as pa

    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)) or \
            not pa.types.is_integer(column.type.value_type):
        raise ValueError(f"column {key!r} of {path} must be a list of integers, "
                         f"got type {column.type}")


def list_lengths(table, key: str, path: str) -> tuple[np.ndarray, np.ndarray]:
    """``(lengths, present)`` of an integer list column (a null list has length 0)."""
    column = _column(table, key)
    _list_type_check(column, key, path)
    present = ~np.asarray(column.is_null(), dtype=bool)
    offsets = np.asarray(column.offsets, dtype=np.int64)
    return np.where(present, np.diff(offsets), 0), present


def list_column(table, key: str, path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                        np.ndarray]:
    """``(starts, lengths, values, present)`` of an integer list column.

    Row ``i`` holds ``values[starts[i]:starts[i] + lengths[i]]`` (null elements as 0); a
    null list has length 0 and ``present[i] = False``.
    """
    column = _column(table, key)
    _list_type_check(column, key, path)
    present = ~np.asarray(column.is_null(), dtype=bool)
    offsets, values = _offsets_and_values(column)
    lengths = np.where(present, np.diff(offsets), 0)
    values = np.asarray(values.fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)
    return offsets[:-1], lengths, values, present


def _offsets_and_values(column) -> tuple[np.ndarray, Any]:
    """A list array's offsets (from 0) and the part of its child array they cover.

    ``offsets`` of a sliced list array index into the whole unsliced child; cutting the
    child to the slice keeps per-batch work proportional to the batch.
    """
    offsets = np.asarray(column.offsets, dtype=np.int64)
    first = int(offsets[0]) if offsets.size else 0
    last = int(offsets[-1]) if offsets.size else 0
    return offsets - first, column.values.slice(first, last - first)


def _null_elements(table, key: str) -> np.ndarray:
    """Per row: whether a list column's row holds a null element."""
    column = _column(table, key)
    offsets, values = _offsets_and_values(column)
    if not values.null_count:
        return np.zeros(len(column), dtype=bool)
    nulls = np.asarray(values.is_null(), dtype=np.int64)
    cumulative = np.concatenate([[0], np.cumsum(nulls)])
    return (cumulative[offsets[1:]] - cumulative[offsets[:-1]]) > 0


def _id_or_none(ids: np.ndarray, present: np.ndarray, i: int) -> int | None:
    return int(ids[i]) if present[i] else None


def one_hot_labels(table, path: str) -> np.ndarray:
    """Per sample row: the label (0 for ``[1,0]``, 1 for ``[0,1]``) or -1 for any other value."""
    column = _column(table, schema.LABEL.key)
    if not hasattr(column, "offsets"):
        raise ValueError(f"column {schema.LABEL.key!r} of {path} must be a one-hot list "
                         f"of 2, got type {column.type}")
    present = ~np.asarray(column.is_null(), dtype=bool)
    offsets, values = _offsets_and_values(column)
    two = present & (np.diff(offsets) == 2) & ~_null_elements(table, schema.LABEL.key)
    labels = np.full(len(column), -1, dtype=np.int64)
    if two.any():
        flat = np.asarray(values.fill_null(0).to_numpy(zero_copy_only=False))
        starts = offsets[:-1][two]
        first, second = flat[starts], flat[starts + 1]
        value = np.where((first == 1) & (second == 0), 0,
                         np.where((first == 0) & (second == 1), 1, -1))
        labels[two] = value
    return labels


def _file_index(files: Sequence[str]) -> dict[str, int]:
    return {path: k for k, path in enumerate(files)}


class _TableDoFn(beam.DoFn):
    """Base of the DoFns that read one table: knows its files (positions <-> paths)."""

    def __init__(self, source: str, files: Sequence[str]):
        self._source = source
        self._files = list(files)
        self._index: dict[str, int] = {}

    def setup(self) -> None:
        self._index = _file_index(self._files)

    def _file_of(self, path: str) -> int:
        if not self._index:
            self._index = _file_index(self._files)
        try:
            return self._index[path]
        except KeyError:
            raise ValueError(f"table {self._source!r}: file {path} is not one of the "
                             f"{len(self._files)} files listed when the pipeline was built"
                             ) from None


class _BucketedOutput(_TableDoFn):
    """A table DoFn whose main output is column blocks keyed by bucket (buffered per bundle)."""

    def __init__(self, source: str, files: Sequence[str], num_buckets: int):
        super().__init__(source, files)
        if num_buckets < 1:
            raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
        self._num_buckets = num_buckets

    def start_bundle(self) -> None:
        self._buffer = BucketBuffer()
        self._counts: Counter = Counter()

    def _emit(self, ids: np.ndarray, columns: Mapping[str, np.ndarray]
              ) -> list[tuple[int, bytes]]:
        return self._buffer.add(id_buckets(ids, self._num_buckets), columns)

    def finish_bundle(self) -> Iterator[Any]:
        for bucket, block in self._buffer.drain():
            yield GlobalWindows.windowed_value((bucket, block))
        yield from _bundle_counts(self._counts)


# ---------------------------------------------------------------------------------------------
# First reads: samples and the keys of the feature tables.
# ---------------------------------------------------------------------------------------------

class ParseSamples(_BucketedOutput):
    """Sample batches -> ``(item_bucket, block)`` of :data:`SAMPLE_COLUMNS` for valid rows.

    Rejects ``null_id`` (user or item id null or 0) and ``bad_label`` rows; counts
    ``rows_read`` of the split.

    Args:
      split: the split (section of the counts, source of rejected rows).
      files: the split's sample files (sorted, as listed by the pipeline).
      num_buckets: the number of item-id buckets.
    """

    def process(self, batch: tuple[str, int, Any]) -> Iterator[Any]:
        path, first_row, table = batch
        file_index = self._file_of(path)
        user_ids, user_present = int_column(table, schema.USER_ID.key, path)
        item_ids, item_present = int_column(table, schema.ITEM_ID.key, path)
        labels = one_hot_labels(table, path)
        null = ~(user_present & (user_ids != 0) & item_present & (item_ids != 0))
        bad_label = ~null & (labels < 0)
        split = self._source
        for i in np.flatnonzero(null).tolist():
            yield _rejected(split, NULL_ID, path, first_row + i,
                            user_id=_id_or_none(user_ids, user_present, i),
                            item_id=_id_or_none(item_ids, item_present, i))
        if bad_label.any():
            label_column = _column(table, schema.LABEL.key)
            for i in np.flatnonzero(bad_label).tolist():
                yield _rejected(split, BAD_LABEL, path, first_row + i, user_id=int(user_ids[i]),
                                item_id=int(item_ids[i]), label=label_column[i].as_py())
        good = np.flatnonzero(~null & ~bad_label)
        yield from self._emit(item_ids[good], {
            schema.ITEM_ID.name: item_ids[good], schema.USER_ID.name: user_ids[good],
            schema.LABEL.name: labels[good].astype(np.int8),
            "position": positions(file_index, first_row + good)})
        self._counts[(split, ROWS_READ)] += table.num_rows


class ParseItemKeys(_BucketedOutput):
    """Item-feature batches (the id column) -> ``(item_bucket, block)`` of :data:`KEY_COLUMNS`.

    Rejects ``null_id`` rows; counts ``rows_read``.
    """

    def process(self, batch: tuple[str, int, Any]) -> Iterator[Any]:
        path, first_row, table = batch
        ids, present = int_column(table, schema.ITEM_ID.key, path)
        ok = present & (ids != 0)
        for i in np.flatnonzero(~ok).tolist():
            yield _rejected(self._source, NULL_ID, path, first_row + i,
                            item_id=_id_or_none(ids, present, i))
        good = np.flatnonzero(ok)
        yield from self._emit(ids[good], {
            "id": ids[good], "position": positions(self._file_of(path), first_row + good)})
        self._counts[(self._source, ROWS_READ)] += table.num_rows


@dataclasses.dataclass(frozen=True)
class _EmbeddingBatch:
    """An embedding batch, column-wise.

    ``good`` rows have a non-zero id and exactly ``dim`` values, none null; ``vectors``
    holds theirs (``[good rows, dim]`` int8, in row order).
    """

    ids: np.ndarray
    id_present: np.ndarray
    ok: np.ndarray
    good_dim: np.ndarray
    vector_present: np.ndarray
    lengths: np.ndarray
    good: np.ndarray
    vectors: np.ndarray


def _embedding_batch(table, path: str, dim: int, with_vectors: bool) -> _EmbeddingBatch:
    """Parses an embedding batch; the vectors only ``with_vectors``. Values must fit int8."""
    import pyarrow as pa

    ids, present = int_column(table, schema.EMBEDDING_ITEM_KEY, path)
    column = _column(table, schema.EMBEDDING_VECTOR_KEY)
    _list_type_check(column, schema.EMBEDDING_VECTOR_KEY, path)
    vector_present = ~np.asarray(column.is_null(), dtype=bool)
    offsets, values = _offsets_and_values(column)
    lengths = np.where(vector_present, np.diff(offsets), 0)
    flat = np.asarray(values.fill_null(0).to_numpy(zero_copy_only=False))
    if values.type != pa.int8() and flat.size and (flat.min() < -128 or flat.max() > 127):
        raise ValueError(f"column {schema.EMBEDDING_VECTOR_KEY!r} of {path} holds values "
                         f"outside int8: min {flat.min()}, max {flat.max()}")
    good_dim = vector_present & (lengths == dim) & \
        ~_null_elements(table, schema.EMBEDDING_VECTOR_KEY)
    ok = present & (ids != 0)
    good = ok & good_dim
    vectors = np.zeros((0, dim), np.int8)
    if with_vectors and good.any():
        flat = flat.astype(np.int8, copy=False)
        if good.all() and flat.size == len(ids) * dim:
            vectors = flat.reshape(len(ids), dim)
        else:  # rows of other lengths in between: gather the good ones
            windows = np.lib.stride_tricks.sliding_window_view(flat, dim)
            vectors = windows[offsets[:-1][good]]
    return _EmbeddingBatch(ids, present, ok, good_dim, vector_present, lengths, good, vectors)


class EmbeddingRecordEncoder:
    """Vectorised twin of :func:`muse_tf.data.records.encode_embedding_example_fast`.

    Writes the same bytes for a whole batch with NumPy: a record is a fixed head (by the
    id's varint length), the id's varint, a fixed middle and the ``dim`` vector bytes. The
    fixed parts are taken from the reference encoder itself, for every varint length, and
    checked when the encoder is built.
    """

    def __init__(self, dim: int):
        self._dim = dim
        zeros = bytes(dim)
        self._parts: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for length in range(1, 11):
            probes = [self._probe(length, group) for group in (1, 2)]
            encoded = [records.encode_embedding_example_fast(p, zeros) for p in probes]
            varints = [records.encode_varint(p) for p in probes]
            start = next(k for k in range(len(encoded[0])) if encoded[0][k] != encoded[1][k])
            end = start + length
            if any(len(v) != length for v in varints) or any(
                    e[start:end] != v or e[end:] != encoded[0][end:] or not e.endswith(zeros)
                    for e, v in zip(encoded, varints, strict=True)):
                raise RuntimeError("the embedding record layout is not head + id varint + "
                                   "middle + vector; the batch encoder cannot be used")
            head = np.frombuffer(encoded[0][:start], np.uint8)
            middle = np.frombuffer(encoded[0][end:len(encoded[0]) - dim], np.uint8)
            self._parts[length] = head, middle

    @staticmethod
    def _probe(length: int, group: int) -> int:
        """A signed int64 whose varint has ``length`` bytes, every 7-bit group ``group``."""
        value = sum(group << (7 * k) for k in range(length - 1))
        value += (1 if length == 10 else group) << (7 * (length - 1))
        return value - (1 << 64) if value >= 1 << 63 else value

    def encode(self, ids: np.ndarray, vectors: np.ndarray) -> list[bytes]:
        """The records of ``ids[i]`` with ``vectors[i]`` (int8 ``[n, dim]``), in order."""
        ids = np.asarray(ids, dtype=np.int64)
        if vectors.shape != (ids.size, self._dim):
            raise ValueError(f"vectors must have shape ({ids.size}, {self._dim}), got "
                             f"{vectors.shape}")
        words = ids.view(np.uint64)
        lengths = np.ones(ids.size, np.int64)
        for k in range(1, 10):
            lengths += words >= np.uint64(1 << (7 * k))
        out: list[bytes] = [b""] * ids.size
        codes = vectors.view(np.uint8)
        for length in np.unique(lengths).tolist():
            rows = np.flatnonzero(lengths == length)
            head, middle = self._parts[length]
            width = head.size + length + middle.size + self._dim
            matrix = np.empty((rows.size, width), np.uint8)
            matrix[:, :head.size] = head
            selected = words[rows]
            for k in range(length):
                byte = (selected >> np.uint64(7 * k)) & np.uint64(0x7F)
                if k < length - 1:
                    byte |= np.uint64(0x80)
                matrix[:, head.size + k] = byte
            matrix[:, head.size + length:width - self._dim] = middle
            matrix[:, width - self._dim:] = codes[rows]
            blob = matrix.tobytes()
            for j, row in enumerate(rows.tolist()):
                out[row] = blob[j * width:(j + 1) * width]
        return out


class ParseEmbeddingKeys(_BucketedOutput):
    """Embedding batches -> ``(item_bucket, block)`` of :data:`KEY_COLUMNS` for valid rows.

    Rejects ``null_id`` and ``bad_embedding_dim`` (null vector, null element, or a length
    other than ``dim``); values must fit int8. Counts ``rows_read``.
    """

    def __init__(self, source: str, files: Sequence[str], dim: int, num_buckets: int):
        super().__init__(source, files, num_buckets)
        self._dim = dim

    def process(self, batch: tuple[str, int, Any]) -> Iterator[Any]:
        path, first_row, table = batch
        parsed = _embedding_batch(table, path, self._dim, with_vectors=False)
        ids = parsed.ids
        for i in np.flatnonzero(~parsed.ok).tolist():
            yield _rejected(self._source, NULL_ID, path, first_row + i,
                            item_id=_id_or_none(ids, parsed.id_present, i))
        for i in np.flatnonzero(parsed.ok & ~parsed.good_dim).tolist():
            yield _rejected(self._source, BAD_EMBEDDING_DIM, path, first_row + i,
                            item_id=int(ids[i]),
                            dim=int(parsed.lengths[i]) if parsed.vector_present[i] else None)
        good = np.flatnonzero(parsed.good)
        yield from self._emit(ids[good], {
            "id": ids[good], "position": positions(self._file_of(path), first_row + good)})
        self._counts[(self._source, ROWS_READ)] += table.num_rows


class ParseUserKeys(_BucketedOutput):
    """User-feature batches -> ``(user_bucket, block)`` of :data:`USER_KEY_COLUMNS`.

    Rows whose sequence columns differ in length are rejected as
    ``history_length_mismatch`` and still emitted, with ``good = 0`` (their samples are
    rejected for it); rows with a null or 0 user id are rejected as ``null_id``. Counts
    ``rows_read`` and ``histories_truncated`` (good rows longer than ``max_seq_len``).
    """

    def __init__(self, source: str, files: Sequence[str], max_seq_len: int, num_buckets: int):
        super().__init__(source, files, num_buckets)
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
        self._max_seq_len = max_seq_len

    def process(self, batch: tuple[str, int, Any]) -> Iterator[Any]:
        path, first_row, table = batch
        source = self._source
        ids, present = int_column(table, schema.USER_ID.key, path)
        lengths = np.stack([list_lengths(table, f.key, path)[0] for f in _USER_SEQUENCES])
        matched = (lengths == lengths[0]).all(axis=0)
        ok = present & (ids != 0)
        for i in np.flatnonzero(~ok).tolist():
            yield _rejected(source, NULL_ID, path, first_row + i,
                            user_id=_id_or_none(ids, present, i))
        for i in np.flatnonzero(ok & ~matched).tolist():
            yield _rejected(source, HISTORY_LENGTH_MISMATCH, path, first_row + i,
                            user_id=int(ids[i]),
                            lengths={f.key: int(lengths[k, i])
                                     for k, f in enumerate(_USER_SEQUENCES)})
        rows = np.flatnonzero(ok)
        yield from self._emit(ids[rows], {
            "id": ids[rows], "position": positions(self._file_of(path), first_row + rows),
            "good": matched[rows].astype(np.int8)})
        self._counts[(source, ROWS_READ)] += table.num_rows
        self._counts[(source, HISTORIES_TRUNCATED)] += int(
            (ok & matched & (lengths[0] > self._max_seq_len)).sum())


# ---------------------------------------------------------------------------------------------
# Per-bucket decisions: which rows are kept, which the samples need.
# ---------------------------------------------------------------------------------------------

def _duplicate_flags(dedup: Deduplicated) -> np.ndarray:
    return np.where(dedup.duplicate_kept, DUPLICATE, DUPLICATE | SKIP).astype(np.int8)


class ResolveItems(beam.DoFn):
    """``(item_bucket, {"keys": [...], <split>: [...]})`` -> the item table's plan.

    Keeps each item's first row (counts ``rows_kept``); plans ``NEEDED`` for the kept rows of
    items some sample refers to and ``DUPLICATE`` (``| SKIP`` unless kept) for every row of an
    item with several rows. Emits ``((file_index, chunk), block)`` of :data:`PLAN_COLUMNS`.
    """

    def __init__(self, source: str, sample_tags: Sequence[str], chunk_rows: int):
        self._source = source
        self._sample_tags = tuple(sample_tags)
        self._chunk_rows = chunk_rows

    def start_bundle(self) -> None:
        self._kept = 0

    def process(self, element: tuple[int, Mapping[str, Iterable[bytes]]]) -> Iterator[Any]:
        _, grouped = element
        keys = concat_blocks(grouped["keys"], KEY_COLUMNS)
        dedup = deduplicate(keys["id"], keys["position"])
        self._kept += dedup.ids.size
        targets = np.concatenate([concat_blocks(grouped[tag], SAMPLE_COLUMNS)[
            schema.ITEM_ID.name] for tag in self._sample_tags])
        found, kept = dedup.lookup(np.unique(targets))
        needed = kept[found]
        row_positions = np.concatenate([needed, dedup.duplicate_positions])
        flags = np.concatenate([np.full(needed.size, NEEDED, np.int8), _duplicate_flags(dedup)])
        yield from table_plan(row_positions, flags, self._chunk_rows)

    def finish_bundle(self) -> Iterator[Any]:
        yield from _bundle_counts(Counter({(self._source, ROWS_KEPT): self._kept}))


class ResolveEmbeddings(beam.DoFn):
    """``(item_bucket, [key blocks])`` -> the embedding table's plan of duplicate rows.

    Every row of an item with several rows is planned ``DUPLICATE``, all but the first in
    (file, row) order also ``SKIP`` (not written). Emits ``((file_index, chunk), block)``.
    """

    def __init__(self, chunk_rows: int):
        self._chunk_rows = chunk_rows

    def process(self, element: tuple[int, Iterable[bytes]]) -> Iterator[Any]:
        _, blocks = element
        keys = concat_blocks(blocks, KEY_COLUMNS)
        dedup = deduplicate(keys["id"], keys["position"])
        yield from table_plan(dedup.duplicate_positions, _duplicate_flags(dedup),
                              self._chunk_rows)


class ResolveUsers(beam.DoFn):
    """``(user_bucket, {"users": [...], "samples": [...]})`` -> one split's user join plan.

    Keeps each user's first good row in (file, row) order (counts ``rows_kept`` of the user
    table), rejects the samples that cannot be written, in this order: ``no_user_features``
    / ``history_length_mismatch`` (the user has rows, none good), ``no_item_features``; and
    plans the others on their user's kept row. Main output: the sample plan
    ``((file_index, chunk), block)`` of :data:`SAMPLE_PLAN_COLUMNS`; ``duplicate_plan``: the
    user table's duplicate rows (as :class:`ResolveEmbeddings`).

    Args:
      split: the split (source of rejected samples).
      user_source: the user table's section.
      sample_files: the split's sample files (to name rejected samples' files).
      chunk_rows: rows per plan chunk of the user table.
    """

    def __init__(self, split: str, user_source: str, sample_files: Sequence[str],
                 chunk_rows: int):
        self._split = split
        self._user_source = user_source
        self._sample_files = list(sample_files)
        self._chunk_rows = chunk_rows

    def start_bundle(self) -> None:
        self._kept = 0

    def process(self, element: tuple[int, Mapping[str, Iterable[bytes]]]) -> Iterator[Any]:
        _, grouped = element
        keys = concat_blocks(grouped["users"], USER_KEY_COLUMNS)
        good = keys["good"] == 1
        dedup = deduplicate(keys["id"][good], keys["position"][good])
        self._kept += dedup.ids.size
        for entry in table_plan(dedup.duplicate_positions, _duplicate_flags(dedup),
                                self._chunk_rows):
            yield beam.pvalue.TaggedOutput(DUPLICATE_PLAN, entry)
        samples = concat_blocks(grouped["samples"], JOINED_SAMPLE_COLUMNS)
        if not samples["position"].size:
            return
        user_ids = samples[schema.USER_ID.name]
        found, user_positions = dedup.lookup(user_ids)
        bad_users = np.unique(keys["id"][~good])
        mismatch = ~found & np.isin(user_ids, bad_users)
        no_item = found & (samples["has_item"] == 0)
        reasons = ((~found & ~mismatch, NO_USER_FEATURES), (mismatch, HISTORY_LENGTH_MISMATCH),
                   (no_item, NO_ITEM_FEATURES))
        item_ids = samples[schema.ITEM_ID.name]
        for mask, reason in reasons:
            for i in np.flatnonzero(mask).tolist():
                position = int(samples["position"][i])
                yield _rejected(self._split, reason, self._sample_files[position_file(position)],
                                position_row(position), user_id=int(user_ids[i]),
                                item_id=int(item_ids[i]))
        ok = np.flatnonzero(found & ~no_item)
        columns = {name: samples[name][ok] for name in SAMPLE_PLAN_COLUMNS if name != "row"}
        yield from plan_blocks(user_positions[ok], columns, self._chunk_rows)

    def finish_bundle(self) -> Iterator[Any]:
        yield from _bundle_counts(Counter({(self._user_source, ROWS_KEPT): self._kept}))


# ---------------------------------------------------------------------------------------------
# Second reads: planned rows straight from the parquet batches.
# ---------------------------------------------------------------------------------------------

def _check_planned(source: str, path: str, planned_ok: np.ndarray) -> None:
    if not planned_ok.all():
        raise RuntimeError(f"table {source!r}: file {path} changed while the pipeline ran "
                           f"(a planned row no longer holds a valid key)")


class EmitItemValues(_BucketedOutput):
    """Item-feature batches + the item plan -> the item values the join needs.

    Main output: ``(item_bucket, block)`` of :data:`ITEM_VALUE_COLUMNS` for the ``NEEDED``
    rows (one row per item: its kept row); ``duplicates``: ``(item_id, (position,
    values_bytes))`` of ``DUPLICATE`` rows.
    """

    def __init__(self, source: str, files: Sequence[str], chunk_rows: int, num_buckets: int):
        super().__init__(source, files, num_buckets)
        self._lookup = PlanLookup(chunk_rows, {"flags": _I8})

    def start_bundle(self) -> None:
        super().start_bundle()
        self._lookup.clear()

    def process(self, batch: tuple[str, int, Any], plan: Any) -> Iterator[Any]:
        path, first_row, table = batch
        file_index = self._file_of(path)
        planned = self._lookup.rows(plan, file_index, first_row, table.num_rows)
        if not planned["row"].size:
            return
        ids, present = int_column(table, schema.ITEM_ID.key, path)
        values = [ids, *(int_column(table, f.key, path)[0] for f in _ITEM_CONTEXT)]
        local = planned["row"] - first_row
        _check_planned(self._source, path, present[local] & (ids[local] != 0))
        needed = local[(planned["flags"] & NEEDED) != 0]
        yield from self._emit(ids[needed], {f.name: v[needed]
                                            for f, v in zip(_ITEM_FEATURES, values, strict=True)})
        duplicate = local[(planned["flags"] & DUPLICATE) != 0]
        content = np.stack(values[1:], axis=1) if len(values) > 1 else np.zeros((len(ids), 0))
        for i in duplicate.tolist():
            yield beam.pvalue.TaggedOutput(DUPLICATES, (int(ids[i]), (
                int(positions(file_index, first_row + i)), content[i].tobytes())))


class JoinItemValues(beam.DoFn):
    """``(item_bucket, {"items": [...], <split>: [...]})`` -> samples with item values.

    Emits, tagged with each split, ``(user_bucket, block)`` of :data:`JOINED_SAMPLE_COLUMNS`:
    the bucket's samples with ``has_item`` and the item-side values of their target (0 and
    ``has_item = 0`` without item features; the user join rejects them, so that "no user
    features" takes precedence).
    """

    def __init__(self, splits: Sequence[str], num_buckets: int):
        self._splits = tuple(splits)
        self._num_buckets = num_buckets

    def start_bundle(self) -> None:
        self._buffers = {split: BucketBuffer() for split in self._splits}

    def process(self, element: tuple[int, Mapping[str, Iterable[bytes]]]) -> Iterator[Any]:
        _, grouped = element
        items = concat_blocks(grouped["items"], ITEM_VALUE_COLUMNS)
        item_ids = items[schema.ITEM_ID.name]
        order = np.argsort(item_ids, kind="stable")
        sorted_ids = item_ids[order]
        if sorted_ids.size > 1 and (sorted_ids[1:] == sorted_ids[:-1]).any():
            raise RuntimeError("the item join received two rows of one item")
        for split in self._splits:
            samples = concat_blocks(grouped[split], SAMPLE_COLUMNS)
            targets = samples[schema.ITEM_ID.name]
            if not targets.size:
                continue
            if sorted_ids.size:
                index = order[np.minimum(np.searchsorted(sorted_ids, targets),
                                         sorted_ids.size - 1)]
                has_item = item_ids[index] == targets
            else:
                index = np.zeros(targets.size, np.int64)
                has_item = np.zeros(targets.size, bool)
            joined = dict(samples)
            joined["has_item"] = has_item.astype(np.int8)
            for feature in _ITEM_FEATURES:
                column = items[feature.name]
                joined[feature.name] = (np.where(has_item, column[index], 0) if column.size
                                        else np.zeros(targets.size, np.int64))
            joined[schema.ITEM_ID.name] = targets
            buckets = id_buckets(samples[schema.USER_ID.name], self._num_buckets)
            for bucket, block in self._buffers[split].add(buckets, joined):
                yield beam.pvalue.TaggedOutput(split, (bucket, block))

    def finish_bundle(self) -> Iterator[Any]:
        for split, buffer in self._buffers.items():
            for bucket, block in buffer.drain():
                yield beam.pvalue.TaggedOutput(split, GlobalWindows.windowed_value(
                    (bucket, block)))


class EncodeEmbeddings(_TableDoFn):
    """Embedding batches + the duplicate plan -> ``tf.train.Example`` records.

    Writes every valid row but the ``SKIP`` ones (so each item once, its first row), as one
    list of records per batch (:class:`EmbeddingRecordEncoder`: the bytes of
    :func:`muse_tf.data.records.encode_embedding_example_fast`); ``duplicates``:
    ``(item_id, (position, vector_bytes))`` of ``DUPLICATE`` rows. Counts ``rows_written``.
    """

    def __init__(self, source: str, files: Sequence[str], dim: int, chunk_rows: int):
        super().__init__(source, files)
        self._dim = dim
        self._lookup = PlanLookup(chunk_rows, {"flags": _I8})
        self._encoder: EmbeddingRecordEncoder | None = None

    def setup(self) -> None:
        super().setup()
        self._encoder = EmbeddingRecordEncoder(self._dim)

    def start_bundle(self) -> None:
        self._written = 0
        self._lookup.clear()

    def process(self, batch: tuple[str, int, Any], plan: Any) -> Iterator[Any]:
        path, first_row, table = batch
        file_index = self._file_of(path)
        parsed = _embedding_batch(table, path, self._dim, with_vectors=True)
        planned = self._lookup.rows(plan, file_index, first_row, table.num_rows)
        local = planned["row"] - first_row
        _check_planned(self._source, path, parsed.good[local])
        # Index of each good row in parsed.vectors.
        slot = np.cumsum(parsed.good) - 1
        write = parsed.good.copy()
        write[local[(planned["flags"] & SKIP) != 0]] = False
        written = np.flatnonzero(write)
        if self._encoder is None:
            self._encoder = EmbeddingRecordEncoder(self._dim)
        out = self._encoder.encode(parsed.ids[written], parsed.vectors[slot[written]])
        self._written += len(out)
        for i in local[(planned["flags"] & DUPLICATE) != 0].tolist():
            yield beam.pvalue.TaggedOutput(DUPLICATES, (int(parsed.ids[i]), (
                int(positions(file_index, first_row + i)), parsed.vectors[slot[i]].tobytes())))
        if out:
            yield out

    def finish_bundle(self) -> Iterator[Any]:
        yield from _bundle_counts(Counter({(self._source, ROWS_WRITTEN): self._written}))


class RejectDuplicates(beam.DoFn):
    """``(key, [(position, content), ...])`` -> ``duplicate_key`` rejections.

    The row first in (file, row) order is the kept one; every other row is rejected with
    the kept row's file and row and whether its content is ``identical``.

    Args:
      source: the table's section.
      key_name: the key's field in rejected rows (``item_id``, ``user_id``).
      files: the table's files (positions -> paths).
    """

    def __init__(self, source: str, key_name: str, files: Sequence[str]):
        self._source = source
        self._key_name = key_name
        self._files = list(files)

    def process(self, element: tuple[int, Iterable[tuple[int, bytes]]]) -> Iterator[Any]:
        key, rows = element
        ordered = sorted(rows, key=lambda r: r[0])
        kept_position, kept_content = ordered[0]
        kept = {"file": self._files[position_file(kept_position)],
                "row": position_row(kept_position)}
        for position, content in ordered[1:]:
            yield _rejected(self._source, DUPLICATE_KEY, self._files[position_file(position)],
                            position_row(position), **{self._key_name: key}, kept=dict(kept),
                            identical=bytes(content) == bytes(kept_content))


def _ragged_take(values: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``values[starts[k]:starts[k] + lengths[k]]`` of every ``k``, concatenated."""
    total = int(lengths.sum())
    if not total:
        return np.zeros(0, values.dtype)
    offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return values[offsets + np.arange(total)]


class EncodeUserRecords(_TableDoFn):
    """User-feature batches + the split's plans -> serialised SequenceExamples.

    For every user row the sample plan names (the user's kept row), serialises its feature
    lists (the newest ``max_seq_len`` steps, oldest first) and user context once and emits
    the list of the user's records, one per planned sample. ``duplicates``: ``(user_id,
    (position, content))`` of the rows the duplicate plan names, ``content`` being the
    attributes, full history length and cut histories as int64 bytes. Counts
    ``examples_written`` and ``histories_truncated`` of the split. With
    ``count_vocabularies`` the ids of the written records are counted per vocabulary and
    emitted on ``vocab`` as ``((vocabulary, id_bucket), (ids_bytes, counts_bytes))``, at the
    end of each bundle and whenever more than ``vocab_flush_ids`` distinct ids are held.

    Args:
      split: the split (section of the counts).
      user_source: the user-feature table's section.
      files: the user table's files.
      max_seq_len: the history length cut.
      chunk_rows: rows per plan chunk (as in :class:`ResolveUsers`).
      count_vocabularies: whether to count vocabulary ids (the train split).
      num_buckets: the number of id buckets of the vocabulary counts.
    """

    def __init__(self, split: str, user_source: str, files: Sequence[str], max_seq_len: int,
                 chunk_rows: int, count_vocabularies: bool, num_buckets: int,
                 vocab_flush_ids: int = 1_000_000):
        super().__init__(user_source, files)
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
        self._split = split
        self._max_seq_len = max_seq_len
        self._count_vocabularies = count_vocabularies
        self._num_buckets = num_buckets
        self._vocab_flush_ids = vocab_flush_ids
        self._samples = PlanLookup(chunk_rows, {k: v for k, v in SAMPLE_PLAN_COLUMNS.items()
                                                if k != "row"})
        self._duplicates = PlanLookup(chunk_rows, {"flags": _I8})

    def setup(self) -> None:
        super().setup()
        self._label_context = {v: records.encode_context_entries({schema.LABEL.name: v})
                               for v in (0, 1)}

    def start_bundle(self) -> None:
        self._counts: Counter = Counter()
        self._vocab: dict[str, IdCounter] = {}
        self._samples.clear()
        self._duplicates.clear()

    def _counter(self, vocabulary: str) -> IdCounter:
        if vocabulary not in self._vocab:
            self._vocab[vocabulary] = IdCounter()
        return self._vocab[vocabulary]

    def process(self, batch: tuple[str, int, Any], samples_plan: Any, duplicate_plan: Any
                ) -> Iterator[Any]:
        path, first_row, table = batch
        file_index = self._file_of(path)
        planned = self._samples.rows(samples_plan, file_index, first_row, table.num_rows)
        duplicates = self._duplicates.rows(duplicate_plan, file_index, first_row,
                                           table.num_rows)
        if not planned["row"].size and not duplicates["row"].size:
            return
        ids, present = int_column(table, schema.USER_ID.key, path)
        attrs = [int_column(table, f.key, path)[0] for f in _USER_CONTEXT]
        sequences = [list_column(table, f.key, path) for f in _USER_SEQUENCES]
        full = sequences[0][1]
        matched = np.all([s[1] == full for s in sequences], axis=0)
        cut = np.maximum(full - self._max_seq_len, 0)

        def histories(i: int) -> list[np.ndarray]:
            return [values[start[i] + cut[i]:start[i] + length[i]]
                    for start, length, values, _ in sequences]

        for i in (duplicates["row"] - first_row).tolist():
            content = np.array([*(a[i] for a in attrs), full[i]], np.int64).tobytes()
            content += b"".join(h.tobytes() for h in histories(i))
            yield beam.pvalue.TaggedOutput(DUPLICATES, (int(ids[i]), (
                int(positions(file_index, first_row + i)), content)))
        local = planned["row"] - first_row
        if not local.size:
            return
        _check_planned(self._source, path, present[local] & matched[local]
                       & (ids[local] == planned[schema.USER_ID.name]))
        starts = np.flatnonzero(np.concatenate([[True], local[1:] != local[:-1]]))
        ends = np.append(starts[1:], local.size)
        labels = planned[schema.LABEL.name].tolist()
        item_columns = [planned[f.name].tolist() for f in _ITEM_FEATURES]
        item_names = [f.name for f in _ITEM_FEATURES]
        label_context = self._label_context
        truncated = 0
        for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
            i = int(local[start])
            feature_lists = records.encode_feature_lists_field(
                {f.name: h for f, h in zip(_USER_SEQUENCES, histories(i), strict=True)})
            user_context = records.encode_context_entries(
                {f.name: int(v[i]) for f, v in zip(_USER_FEATURES, (ids, *attrs), strict=True)})
            out = []
            for j in range(start, end):
                item_context = records.encode_context_entries(
                    {name: column[j] for name, column in zip(item_names, item_columns,
                                                             strict=True)})
                out.append(records.assemble_sequence_example(
                    label_context[labels[j]] + user_context + item_context, feature_lists))
            truncated += (end - start) if full[i] > self._max_seq_len else 0
            yield out
        self._counts[(self._split, EXAMPLES_WRITTEN)] += int(local.size)
        self._counts[(self._split, HISTORIES_TRUNCATED)] += truncated
        if self._count_vocabularies:
            self._count_ids(local[starts], ends - starts, ids, attrs, sequences, cut, planned)
            if sum(c.size for c in self._vocab.values()) > self._vocab_flush_ids:
                yield from self._vocab_partials(windowed=False)

    def _count_ids(self, users: np.ndarray, weights: np.ndarray, ids: np.ndarray,
                   attrs: list[np.ndarray], sequences: list, cut: np.ndarray,
                   planned: Mapping[str, np.ndarray]) -> None:
        """Counts the ids of the records just written: user side weighted by records."""
        for weight in np.unique(weights).tolist():
            group = users[weights == weight]
            for feature, column in zip(_USER_FEATURES, (ids, *attrs), strict=True):
                if feature.vocabulary is not None:
                    self._counter(feature.vocabulary).add(column[group], weight)
            for feature, (start, length, values, _) in zip(_USER_SEQUENCES, sequences,
                                                           strict=True):
                if feature.vocabulary is not None:
                    self._counter(feature.vocabulary).add(_ragged_take(
                        values, start[group] + cut[group], length[group] - cut[group]), weight)
        for feature in _ITEM_FEATURES:
            if feature.vocabulary is not None:
                self._counter(feature.vocabulary).add(planned[feature.name])

    def _vocab_partials(self, windowed: bool) -> Iterator[beam.pvalue.TaggedOutput]:
        for vocabulary, counter in sorted(self._vocab.items()):
            ids, counts = counter.result()
            for bucket, part in split_by_bucket({"id": ids, "count": counts},
                                                id_buckets(ids, self._num_buckets)):
                value = ((vocabulary, bucket), (part["id"].tobytes(), part["count"].tobytes()))
                yield beam.pvalue.TaggedOutput(
                    VOCAB, GlobalWindows.windowed_value(value) if windowed else value)
        self._vocab = {}

    def finish_bundle(self) -> Iterator[Any]:
        yield from _bundle_counts(self._counts)
        yield from self._vocab_partials(windowed=True)


class IdCounter:
    """Weighted id counts of one vocabulary, accumulated as NumPy arrays.

    ``add`` buffers ids per weight; the buffer is reduced to distinct ids and summed counts
    (each weight's ids sorted with :func:`numpy.sort`, then merged with the counts so far as
    sorted runs) whenever it grows past ``compact_every`` entries and past the number of ids
    already counted, so the total work stays O(n log n). Id 0 (missing) is dropped.
    """

    def __init__(self, compact_every: int = 1_000_000):
        self._compact_every = compact_every
        self._buffer: dict[int, list[np.ndarray]] = {}
        self._counted = (np.zeros(0, np.int64), np.zeros(0, np.int64))
        self._buffered = 0

    @property
    def size(self) -> int:
        """Entries held: distinct ids counted so far plus buffered ids."""
        return self._counted[0].size + self._buffered

    def add(self, ids: np.ndarray, weight: int = 1) -> None:
        """Counts each of ``ids`` ``weight`` times."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        self._buffer.setdefault(int(weight), []).append(ids)
        self._buffered += ids.size
        if self._buffered >= max(self._compact_every, self._counted[0].size):
            self._compact()

    def _compact(self) -> None:
        if not self._buffer:
            return
        ids, counts = [self._counted[0]], [self._counted[1]]
        for weight, arrays in self._buffer.items():
            ordered = np.sort(np.concatenate(arrays))
            distinct, n = _run_lengths(ordered)
            ids.append(distinct)
            counts.append(n * weight)
        self._buffer, self._buffered = {}, 0
        self._counted = merge_id_counts(ids, counts)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """Distinct ids (ascending) and their counts."""
        self._compact()
        return self._counted


def _run_lengths(ordered: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct values of a sorted array and how often each occurs."""
    if not ordered.size:
        return ordered, np.zeros(0, np.int64)
    starts = np.flatnonzero(np.concatenate([[True], ordered[1:] != ordered[:-1]]))
    return ordered[starts], np.diff(np.append(starts, ordered.size))


def merge_id_counts(ids: Sequence[np.ndarray], counts: Sequence[np.ndarray]
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Sums counts per id over the given arrays; drops id 0; ids come back ascending.

    Fastest when each array is sorted already (the stable sort then merges runs).
    """
    if not ids:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    all_ids = np.concatenate([np.asarray(a, dtype=np.int64) for a in ids])
    all_counts = np.concatenate([np.asarray(c, dtype=np.int64) for c in counts])
    keep = all_ids != 0
    all_ids, all_counts = all_ids[keep], all_counts[keep]
    if all_ids.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.argsort(all_ids, kind="stable")
    sorted_ids = all_ids[order]
    starts = np.flatnonzero(np.concatenate([[True], sorted_ids[1:] != sorted_ids[:-1]]))
    return sorted_ids[starts], np.add.reduceat(all_counts[order], starts)


# ---------------------------------------------------------------------------------------------
# Vocabularies and metadata.
# ---------------------------------------------------------------------------------------------

class MergeIdCounts(beam.CombineFn):
    """Combines ``(ids_bytes, counts_bytes)`` partial counts of one (vocabulary, bucket)."""

    def create_accumulator(self) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)

    def add_input(self, accumulator, element):
        ids, counts = element
        return merge_id_counts(
            [accumulator[0], np.frombuffer(ids, np.int64)],
            [accumulator[1], np.frombuffer(counts, np.int64)])

    def merge_accumulators(self, accumulators):
        accumulators = list(accumulators)
        return merge_id_counts([a[0] for a in accumulators], [a[1] for a in accumulators])

    def extract_output(self, accumulator) -> tuple[bytes, bytes]:
        return accumulator[0].tobytes(), accumulator[1].tobytes()


def vocabulary_entries(ids: np.ndarray, counts: np.ndarray, min_count: int
                       ) -> tuple[np.ndarray, np.ndarray, int]:
    """Ids counted at least ``min_count`` times (never id 0) and their counts, most frequent
    first, ties by ascending id; and the number of distinct ids before the cut."""
    keep = (counts >= min_count) & (ids != 0)
    kept_ids, kept_counts = ids[keep], counts[keep]
    order = np.lexsort((kept_ids, -kept_counts))
    return kept_ids[order], kept_counts[order], int((ids != 0).sum())


def _lines(ids: np.ndarray, counts: np.ndarray, chunk: int = 1 << 16) -> Iterator[str]:
    for start in range(0, ids.size, chunk):
        yield from (f"{i}\t{c}" for i, c in zip(ids[start:start + chunk].tolist(),
                                                counts[start:start + chunk].tolist(),
                                                strict=True))


def vocabulary_lines(ids: np.ndarray, counts: np.ndarray, min_count: int
                     ) -> tuple[list[str], int]:
    """``"<id>\\t<count>"`` lines of :func:`vocabulary_entries`, and the distinct ids."""
    kept_ids, kept_counts, distinct = vocabulary_entries(ids, counts, min_count)
    return list(_lines(kept_ids, kept_counts)), distinct


class WriteVocabulary(beam.DoFn):
    """``(vocabulary, [(ids_bytes, counts_bytes), ...])`` -> ``vocab/<vocabulary>.tsv``.

    The partial counts (one per id bucket, already combined) are merged here, once per
    vocabulary. Emits ``(vocabulary, {"size", "distinct_ids", "occurrences", "file"})``.
    """

    def __init__(self, output_dir: str, min_count: int):
        self._output_dir = output_dir
        self._min_count = min_count

    def process(self, element: tuple[str, Iterable[tuple[bytes, bytes]]]) -> Iterator[Any]:
        from beam import io as beam_io

        vocabulary, partials = element
        partials = list(partials)
        ids_array, counts_array = merge_id_counts(
            [np.frombuffer(ids, np.int64) for ids, _ in partials],
            [np.frombuffer(counts, np.int64) for _, counts in partials])
        kept_ids, kept_counts, distinct = vocabulary_entries(ids_array, counts_array,
                                                             self._min_count)
        path = layout.vocab_path(self._output_dir, vocabulary)
        beam_io.write_file(path, _lines(kept_ids, kept_counts))  # streamed: up to 35M lines
        yield vocabulary, {"size": int(kept_ids.size), "distinct_ids": distinct,
                           "occurrences": int(counts_array.sum()),
                           "file": f"{layout.VOCAB_DIR}/{vocabulary}.tsv"}


class WriteMetadata(beam.DoFn):
    """Writes ``metadata.json`` from the summed counts, the vocabularies and the file lists.

    Raises ``RuntimeError`` when a split's or a table's rows do not add up (rows read =
    written/kept + rejected): a row was lost or counted twice.
    """

    def __init__(self, output_dir: str, sections: dict[str, dict[str, Any]],
                 options: dict[str, Any]):
        self._output_dir = output_dir
        self._sections = sections
        self._options = options

    def process(self, _: Any, counts: dict, vocabularies: dict, files: list[str]
                ) -> Iterator[str]:
        from beam import io as beam_io

        metadata = build_metadata(self._output_dir, self._sections, self._options, counts,
                                  vocabularies, files)
        path = layout.metadata_path(self._output_dir)
        beam_io.write_file(path, [json.dumps(metadata, indent=2, sort_keys=True)])
        yield path


RUNNER_LOSS_HINT = (
    ". Rows that were read but neither kept nor rejected were lost between two stages, inside "
    "the runner: every DoFn here accounts for each row it receives. Seen with Beam 2.77's "
    "local FnApiRunner in multi_processing mode, loaded or idle (35.4M-item catalogue: "
    "key blocks that ParseItemKeys emitted never reached ResolveItems); no metadata.json was "
    "written, so the output is not usable. Rerun, or run in-process (the default runner, or "
    "--direct_running_mode in_memory), which did not lose rows in the same conditions.")


def build_metadata(output_dir: str, sections: dict[str, dict[str, Any]],
                   options: dict[str, Any], counts: dict, vocabularies: dict,
                   files: list[str]) -> dict[str, Any]:
    """The ``metadata.json`` content; checks that every section's rows add up.

    Args:
      sections: section name -> {"kind": "split" | "table", "output": counter of rows out
        ("examples_written", "rows_kept" or "rows_written"), "reasons": reasons to list}.
      counts: ``(section, counter) -> n``.
      vocabularies: vocabulary -> info from :class:`WriteVocabulary`.
      files: every file the pipeline wrote (records, embeddings, rejected rows).
    """
    def relative(path: str) -> str:
        prefix = output_dir.rstrip("/") + "/"
        return path[len(prefix):] if path.startswith(prefix) else path

    file_list = sorted(relative(f) for f in files)
    out: dict[str, Any] = {"splits": {}, "tables": {}}
    errors = []
    lost = False
    for name, spec in sections.items():
        get = lambda counter, name=name: int(counts.get((name, counter), 0))  # noqa: E731
        reasons = {r: get(REJECTED_PREFIX + r) for r in spec["reasons"]}
        unexpected = sorted(c[len(REJECTED_PREFIX):] for (s, c) in counts
                            if s == name and c.startswith(REJECTED_PREFIX)
                            and c[len(REJECTED_PREFIX):] not in reasons)
        for reason in unexpected:
            reasons[reason] = get(REJECTED_PREFIX + reason)
        rejected = sum(reasons.values())
        entry = {ROWS_READ: get(ROWS_READ), spec["output"]: get(spec["output"]),
                 "rows_rejected": rejected, "rejected": reasons,
                 "rejected_files": [f for f in file_list
                                    if f.startswith(f"{layout.REJECTED_DIR}/{name}/")]}
        if spec.get("records_dir"):
            entry["files"] = [f for f in file_list if f.startswith(spec["records_dir"] + "/")]
        if spec.get("truncation"):
            entry[HISTORIES_TRUNCATED] = get(HISTORIES_TRUNCATED)
        entry.update(spec.get("extra", {}))
        if entry[ROWS_READ] != entry[spec["output"]] + rejected:
            errors.append(f"{name}: rows read {entry[ROWS_READ]} != {spec['output']} "
                          f"{entry[spec['output']]} + rejected {rejected}")
            lost = lost or entry[ROWS_READ] > entry[spec["output"]] + rejected
        out["splits" if spec["kind"] == "split" else "tables"][name] = entry
    if errors:
        raise RuntimeError("row accounting does not add up: " + "; ".join(errors)
                           + (RUNNER_LOSS_HINT if lost else ""))
    totals_reasons: Counter = Counter()
    for entry in out["splits"].values():
        totals_reasons.update(entry["rejected"])
    out["totals"] = {
        ROWS_READ: sum(e[ROWS_READ] for e in out["splits"].values()),
        EXAMPLES_WRITTEN: sum(e[EXAMPLES_WRITTEN] for e in out["splits"].values()),
        "rows_rejected": sum(e["rows_rejected"] for e in out["splits"].values()),
        "rejected": dict(sorted(totals_reasons.items())),
    }
    out["vocabularies"] = {name: dict(info) for name, info in sorted(vocabularies.items())}
    out["options"] = options
    out["max_seq_len"] = options["max_seq_len"]
    out["schema"] = schema.as_dict()
    out["schema_version"] = schema.SCHEMA_VERSION
    out["layout"] = {"record_suffix": layout.RECORD_SUFFIX, "compression": "GZIP",
                     "embedding_features": {"id": layout.EMBEDDING_ID_FEATURE,
                                            "bytes": layout.EMBEDDING_BYTES_FEATURE,
                                            "dtype": "int8", "dim": schema.MM_EMBEDDING_DIM}}
    return out
