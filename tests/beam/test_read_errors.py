"""Unreadable parquet shards: every read error names the table and the file (issue 11).

Each case breaks one shard among good ones, the way a half-copied or empty shard turns up
among hundreds, and checks that the error the user sees names that shard and its table.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Callable

import apache_beam as beam
import pytest

from beam import build_dataset
from beam import io as beam_io
from muse_tf import schema
from muse_tf.data import layout
from tests.beam.conftest import TableWriter

ITEM_ROWS = [(100 + k, k, k, k) for k in range(20)]


def _empty(path: str) -> None:
    with open(path, "wb"):
        pass


def _truncated(path: str) -> None:
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])


def _not_parquet(path: str) -> None:
    with open(path, "w") as f:
        f.write("205,206,213,214\n1,2,3,4\n")


def _corrupt_pages(path: str) -> None:
    # The footer stays intact (the file opens and lists its row groups); the first page
    # header is overwritten, so reading the row group fails.
    with open(path, "rb") as f:
        data = bytearray(f.read())
    data[4:60] = b"\xff" * 56
    with open(path, "wb") as f:
        f.write(data)


def _vanished(path: str) -> None:
    os.remove(path)  # listed when the pipeline was built, gone (or unreadable) when read


BREAKERS: dict[str, Callable[[str], None]] = {
    "zero_bytes": _empty, "truncated": _truncated, "not_parquet": _not_parquet,
    "corrupt_row_group": _corrupt_pages, "vanished": _vanished}


@pytest.mark.parametrize("kind", list(BREAKERS))
def test_read_error_names_table_and_file(kind, table_writer: TableWriter):
    files = [table_writer.items(f"item_features/part-{k}.parquet", ITEM_ROWS[k::3])
             for k in range(3)]
    bad = files[1]
    columns = schema.columns(schema.ITEM_FEATURES)
    p = beam.Pipeline(runner="FnApiRunner")
    _ = (p
         | "ReadItems" >> beam_io.ReadParquetTable("item_features", files, columns)
         | "Drop" >> beam.Map(lambda batch: None))
    BREAKERS[kind](bad)
    with pytest.raises(beam_io.ParquetReadError) as caught:
        p.run().wait_until_finish()
    message = str(caught.value)
    assert "'item_features'" in message, message
    assert bad in message, message
    assert files[0] not in message and files[2] not in message, message


def test_cli_names_the_bad_shard_and_leaves_no_temp_dirs(table_writer: TableWriter,
                                                          tmp_path, capsys):
    users = [{"id": u, "attrs": [u] * 5, "items": [1, 2], "cats": [3, 4]} for u in (1, 2)]
    for split in layout.SPLITS:
        table_writer.samples(f"{split}_samples.parquet", [([0, 1], 1, 100), ([1, 0], 2, 101)])
        table_writer.users(f"{split}_user_features.parquet", users)
    table_writer.items("item_features.parquet", ITEM_ROWS)
    table_writer.embeddings("scl_embedding_int8_p90.parquet",
                            [(100, [1] * schema.MM_EMBEDDING_DIM)])
    good = table_writer.samples("test_samples-00000-of-00002.parquet", [([1, 0], 1, 100)])
    bad = table_writer.samples("test_samples-00001-of-00002.parquet", [([1, 0], 1, 100)])
    _empty(bad)
    output = str(tmp_path / "out")
    assert build_dataset.main(["--input", table_writer.root, "--output", output]) == 1
    err = capsys.readouterr().err
    assert re.search(rf"table 'test_samples'.*{re.escape(bad)}", err), err
    assert "0 bytes" in err
    assert good not in err
    # A failed build leaves no Beam temporary directories behind.
    assert glob.glob(os.path.join(output, "**", "beam-temp-*"), recursive=True) == []
