"""Input/output pieces of the dataset pipeline: parquet tables in, TFRecords and files out.

* :class:`ReadParquetTable` reads a table given as a list of parquet files, one row group at
  a time (spread over workers), only the needed columns, and emits ``(file, first_row,
  pyarrow.Table)`` batches so parsers can work column-wise and still name each row by its
  file and row number.
* :class:`WriteTFRecords` writes serialised records as sharded gzip TFRecord files with
  TensorFlow's C++ record writer (framing, CRC32C and zlib in native code), through Beam's
  file-sink machinery (temporary files, then an atomic rename on finalisation).
* :func:`write_file` writes a small single file (vocabularies, ``metadata.json``).
* :func:`find_sink_temp_dirs` / :func:`remove_sink_temp_dirs` find and remove the
  ``beam-temp-*`` directories a failed or killed run leaves in a sink's directory.

A file that cannot be read (0 bytes, truncated, not parquet, gone or unreadable) raises
:class:`ParquetReadError`, naming the table and the file.

All paths go through Beam's ``FileSystems`` (local or ``gs://``).
"""

from __future__ import annotations

import json
import os
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import apache_beam as beam
from apache_beam import coders
from apache_beam.io import filebasedsink
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.localfilesystem import LocalFileSystem

from muse_tf.data import layout

#: The TAOBAO-MM file stems (``STEM.parquet``, ``STEM/*.parquet`` or ``STEM-*.parquet``).
TRAIN_SAMPLES = "train_samples"
TEST_SAMPLES = "test_samples"
TRAIN_USER_FEATURES = "train_user_features"
TEST_USER_FEATURES = "test_user_features"
ITEM_FEATURES = "item_features"
EMBEDDINGS = "scl_embedding_int8_p90"
#: zlib level of the gzip TFRecords (see :class:`WriteTFRecords`).
DEFAULT_COMPRESSION_LEVEL = 4

TABLE_STEMS = (TRAIN_SAMPLES, TEST_SAMPLES, TRAIN_USER_FEATURES, TEST_USER_FEATURES,
               ITEM_FEATURES, EMBEDDINGS)


def default_patterns(input_dir: str, stem: str) -> tuple[str, ...]:
    """The globs a table ``stem`` is looked for under ``input_dir``."""
    return (FileSystems.join(input_dir, f"{stem}.parquet"),
            FileSystems.join(input_dir, stem, "*.parquet"),
            FileSystems.join(input_dir, f"{stem}-*.parquet"))


def match_files(patterns: Sequence[str]) -> list[str]:
    """Sorted distinct files matching any of ``patterns`` (may be empty)."""
    files: set[str] = set()
    for result in FileSystems.match(list(patterns)):
        files.update(m.path for m in result.metadata_list)
    return sorted(files)


#: Bytes read at a time from a parquet column chunk.
_READ_BUFFER_BYTES = 8 << 20


class ParquetReadError(OSError):
    """A parquet file of a table cannot be read; the message names the table and the file."""


def _file_size(path: str) -> str:
    """``"N bytes"`` of ``path``, or why its size is unknown (for error messages)."""
    try:
        return f"{FileSystems.match([path])[0].metadata_list[0].size_in_bytes} bytes"
    except Exception as error:  # the file may be gone: say so, keep the original error
        return f"size unknown: {type(error).__name__}: {error}"


def _read_error(table: str, path: str, doing: str, error: BaseException) -> ParquetReadError:
    return ParquetReadError(
        f"table {table!r}: cannot read parquet file {path} ({_file_size(path)}) while "
        f"{doing}: {type(error).__name__}: {error}")


def _open_parquet(table: str, path: str):
    """``(handle, pyarrow.parquet.ParquetFile)``; raises :class:`ParquetReadError`."""
    import pyarrow.parquet as pq

    try:
        handle = FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)
    except Exception as error:
        raise _read_error(table, path, "opening it", error) from error
    try:
        # Column chunks are streamed (buffer_size) rather than read whole: a row group of a
        # catalogue table can be far larger than one batch.
        return handle, pq.ParquetFile(handle, buffer_size=_READ_BUFFER_BYTES)
    except Exception as error:  # 0 bytes, truncated, not parquet: pyarrow's many types
        handle.close()
        raise _read_error(table, path, "reading its footer", error) from error


class _ListRowGroups(beam.DoFn):
    """file -> ``(file, row_group, first_row)`` per row group; checks the needed columns."""

    def __init__(self, table: str, columns: Sequence[str]):
        self._table = table
        self._columns = list(columns)

    def process(self, path: str) -> Iterator[tuple[str, int, int]]:
        handle, parquet = _open_parquet(self._table, path)
        try:
            try:
                names = set(parquet.schema_arrow.names)
                metadata = parquet.metadata
                sizes = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
            except Exception as error:
                raise _read_error(self._table, path, "reading its metadata", error) from error
            missing = [c for c in self._columns if c not in names]
            if missing:
                raise ValueError(
                    f"table {self._table!r}: file {path} lacks columns {missing}; "
                    f"it has {sorted(names)}")
            first_row = 0
            for index, num_rows in enumerate(sizes):
                yield path, index, first_row
                first_row += num_rows
        finally:
            handle.close()


class _ReadRowGroup(beam.DoFn):
    """``(file, row_group, first_row)`` -> ``(file, first_row, table)`` batches."""

    def __init__(self, table: str, columns: Sequence[str], batch_rows: int):
        self._table = table
        self._columns = list(columns)
        self._batch_rows = batch_rows

    def process(self, element: tuple[str, int, int]) -> Iterator[tuple[str, int, Any]]:
        import pyarrow as pa

        path, index, first_row = element
        handle, parquet = _open_parquet(self._table, path)
        try:
            # Streamed in batches: a row group of long histories can be far larger than one.
            batches = parquet.iter_batches(batch_size=self._batch_rows, row_groups=[index],
                                           columns=self._columns, use_threads=False)
            while True:
                try:
                    batch = next(batches, None)
                except Exception as error:  # a truncated or corrupt page
                    raise _read_error(self._table, path, f"reading row group {index} (rows "
                                      f"from {first_row})", error) from error
                if batch is None:
                    return
                yield path, first_row, pa.Table.from_batches([batch])
                first_row += batch.num_rows
        finally:
            handle.close()


class ReadParquetTable(beam.PTransform):
    """Reads ``columns`` of a parquet table as ``(file, first_row, pyarrow.Table)`` batches.

    A file that cannot be read raises :class:`ParquetReadError` naming ``table`` and the
    file (Beam adds the stage: ``ListRowGroups`` for a file that does not open,
    ``ReadRowGroups`` for a corrupt row group).

    Args:
      table: the table's name, used in error messages.
      files: the parquet files of the table (see :func:`match_files`).
      columns: the columns to read.
      batch_rows: the most rows of one emitted batch (row groups are sliced to it).
    """

    def __init__(self, table: str, files: Sequence[str], columns: Sequence[str],
                 batch_rows: int = 65536):
        super().__init__()
        if batch_rows < 1:
            raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
        self._table = table
        self._files = list(files)
        self._columns = list(columns)
        self._batch_rows = batch_rows

    def expand(self, pbegin):
        return (pbegin
                | "ListFiles" >> beam.Create(self._files)
                | "ListRowGroups" >> beam.ParDo(_ListRowGroups(self._table, self._columns))
                | "SpreadRowGroups" >> beam.Reshuffle()
                | "ReadRowGroups" >> beam.ParDo(
                    _ReadRowGroup(self._table, self._columns, self._batch_rows)))


class _BackgroundRecordWriter:
    """A ``tf.io.TFRecordWriter`` fed through a bounded queue by a writer thread.

    TensorFlow's ``write`` releases the GIL while it compresses, so the thread compresses
    on another core while the pipeline thread builds the next records. Records are handed
    over in batches of about ``batch_bytes``; at most ``max_batches`` wait in the queue.
    An error in the thread is raised by the next ``write`` or by ``close``.
    """

    def __init__(self, path: str, compression_level: int, batch_bytes: int = 4 << 20,
                 max_batches: int = 8):
        import tensorflow as tf

        self._writer = tf.io.TFRecordWriter(path, tf.io.TFRecordOptions(
            compression_type="GZIP", compression_level=compression_level))
        self._queue: queue.Queue = queue.Queue(maxsize=max_batches)
        self._batch: list[bytes] = []
        self._batch_size = 0
        self._batch_bytes = batch_bytes
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name=f"tfrecord-writer:{path}",
                                        daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            if self._error is not None:
                continue  # keep draining so the producer never blocks
            try:
                for record in batch:
                    self._writer.write(record)
            except BaseException as error:  # re-raised in the pipeline thread
                self._error = error

    def _check(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"writing TFRecords failed: {self._error}") from self._error

    def write(self, record: bytes) -> None:
        self._batch.append(record)
        self._batch_size += len(record)
        if self._batch_size >= self._batch_bytes:
            self._check()
            self._queue.put(self._batch)
            self._batch, self._batch_size = [], 0

    def close(self) -> None:
        if self._batch:
            self._queue.put(self._batch)
            self._batch, self._batch_size = [], 0
        self._queue.put(None)
        self._thread.join()
        self._check()
        self._writer.close()


class _TensorFlowRecordSink(filebasedsink.FileBasedSink):
    """File sink whose shards are written by ``tf.io.TFRecordWriter`` (gzip).

    TensorFlow's writer frames, checksums (CRC32C) and compresses in native code, in a
    background thread (see :class:`_BackgroundRecordWriter`); it writes every filesystem
    TensorFlow knows (local, ``gs://``).
    """

    def __init__(self, file_path_prefix: str, file_name_suffix: str, num_shards: int,
                 compression_level: int):
        super().__init__(file_path_prefix, coder=coders.BytesCoder(),
                         file_name_suffix=file_name_suffix, num_shards=num_shards,
                         mime_type="application/octet-stream",
                         compression_type=CompressionTypes.UNCOMPRESSED)
        self._compression_level = compression_level

    def open(self, temp_path: str) -> _BackgroundRecordWriter:
        return _BackgroundRecordWriter(temp_path, self._compression_level)

    def write_record(self, file_handle, value: bytes | Sequence[bytes]) -> None:
        if isinstance(value, bytes):
            file_handle.write(value)
        else:  # a batch of records, written in order
            for record in value:
                file_handle.write(record)

    def close(self, file_handle) -> None:
        file_handle.close()


class WriteTFRecords(beam.PTransform):
    """Writes serialised records to ``PREFIX-SSSSS-of-NNNNN.tfrecord.gz``.

    Elements are serialised records or lists of them (a batch is written in order, and
    costs the pipeline one element instead of one per record). Returns the PCollection of
    the final file names.

    Args:
      file_path_prefix: e.g. ``DATA_DIR/train/part``.
      num_shards: the number of files; 0 lets the runner decide (one file per bundle of the
        writing stage, no reshuffle: the fast path); N > 0 makes Beam regroup the records
        into exactly N files, which moves every record through one more shuffle (which the
        local runners hold in memory: keep 0 for full-size tables there).
      compression_level: zlib level 0-9 of the gzip stream. The default 4 writes files
        within a few percent of level 6 (zlib's default) in about two thirds of the time on
        SequenceExamples of long histories.
    """

    def __init__(self, file_path_prefix: str, num_shards: int = 0,
                 compression_level: int = DEFAULT_COMPRESSION_LEVEL):
        super().__init__()
        if not 0 <= compression_level <= 9:
            raise ValueError(f"compression_level must be in 0..9, got {compression_level}")
        self._sink = _TensorFlowRecordSink(file_path_prefix, layout.RECORD_SUFFIX, num_shards,
                                           compression_level)

    def expand(self, records):
        return records | "WriteShards" >> beam.io.Write(self._sink)


class WriteJsonLines(beam.PTransform):
    """Writes dicts as JSON lines to ``PREFIX-SSSSS-of-NNNNN.jsonl``; returns file names."""

    def __init__(self, file_path_prefix: str):
        super().__init__()
        self._prefix = file_path_prefix

    def expand(self, rows):
        return (rows
                | "ToJson" >> beam.Map(lambda row: json.dumps(row, sort_keys=True))
                | "WriteLines" >> beam.io.WriteToText(self._prefix, file_name_suffix=".jsonl"))


def write_file(path: str, lines: Iterable[str]) -> None:
    """Writes ``lines`` (each without its newline) to ``path`` through ``FileSystems``."""
    handle = FileSystems.create(path, mime_type="text/plain",
                                compression_type=CompressionTypes.UNCOMPRESSED)
    try:
        chunk: list[str] = []
        for line in lines:
            chunk.append(line)
            if len(chunk) >= 65536:
                handle.write(("\n".join(chunk) + "\n").encode("utf-8"))
                chunk = []
        if chunk:
            handle.write(("\n".join(chunk) + "\n").encode("utf-8"))
    finally:
        handle.close()


#: Name prefix of the directory a Beam file sink keeps its shards in until it finalises
#: (``DIR/beam-temp-<prefix>-<uuid>/`` for a sink writing ``DIR/<prefix>-*``).
SINK_TEMP_PREFIX = "beam-temp-"


def _is_local(path: str) -> bool:
    return isinstance(FileSystems.get_filesystem(path), LocalFileSystem)


def _temp_dir_files(directory: str) -> dict[str, list[str]]:
    """Temp dir -> its files, for filesystems whose directories exist only through files."""
    out: dict[str, list[str]] = {}
    base = directory.rstrip("/") + "/"
    for path in match_files([FileSystems.join(directory, SINK_TEMP_PREFIX + "*", "**")]):
        name = path[len(base):].split("/", 1)[0]
        out.setdefault(FileSystems.join(directory, name), []).append(path)
    return out


def find_sink_temp_dirs(directories: Sequence[str]) -> list[str]:
    """The ``beam-temp-*`` directories directly inside ``directories`` (sorted).

    A sink removes its temp directory when it finalises; a run that fails or is killed
    before leaves it behind. Local directories are listed, so empty temp directories count
    too; on object stores (``gs://``) they are found through the files in them.
    """
    found: set[str] = set()
    for directory in directories:
        if _is_local(directory):
            if os.path.isdir(directory):
                with os.scandir(directory) as entries:
                    found.update(e.path for e in entries
                                 if e.name.startswith(SINK_TEMP_PREFIX) and e.is_dir())
        else:
            found.update(_temp_dir_files(directory))
    return sorted(found)


def remove_sink_temp_dirs(directories: Sequence[str]) -> list[str]:
    """Deletes the ``beam-temp-*`` directories inside ``directories``; returns them."""
    removed = []
    for directory in directories:
        if _is_local(directory):
            temp_dirs = find_sink_temp_dirs([directory])
            if temp_dirs:
                FileSystems.delete(temp_dirs)  # recursive on local directories
            removed += temp_dirs
        else:
            by_dir = _temp_dir_files(directory)
            files = [f for paths in by_dir.values() for f in paths]
            if files:
                FileSystems.delete(files)
            removed += sorted(by_dir)
    return removed
