"""Raw 64-bit id -> embedding row, through a vocabulary file written by the Beam pipeline."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import tensorflow as tf

from muse_tf.data.artifacts import read_vocabulary_ids

PADDING_ROW = 0
OOV_ROW = 1
NUM_RESERVED_ROWS = 2

#: How the id -> line table is held: ``"file"`` (parsed from the asset file whenever the
#: model or SavedModel loads), ``"dense"`` (a DenseHashTable whose buckets are saved with the
#: weights) or ``"auto"`` (dense from :data:`DENSE_TABLE_MIN_ROWS` lines on).
TABLE_KINDS = ("auto", "file", "dense")
#: ``"auto"`` switches to the dense table here: parsing text costs ~2 s per million lines at
#: every load (75 s for TAOBAO-MM's 35.4M items), restoring the buckets about a tenth of that.
DENSE_TABLE_MIN_ROWS = 1_000_000
#: Keys the dense table reserves for its empty and deleted buckets (no vocabulary may hold
#: them; a file that does is refused, naming the id).
DENSE_EMPTY_KEY = -(2**63)
DENSE_DELETED_KEY = -(2**63) + 3
_DENSE_MAX_LOAD = 0.8  # the op's default max_load_factor


@tf.keras.utils.register_keras_serializable(package="muse_tf")
class IdLookup(tf.keras.layers.Layer):
    """Maps raw int64 ids to int32 rows of an embedding table.

    ``row(id) = 0`` for id 0 (padding / missing), ``2 + line`` for an id on line ``line`` of
    the vocabulary file (``"<raw id>\\t<count>"`` lines, most frequent first), ``1`` (the
    out-of-vocabulary bucket) otherwise. Only the first ``vocab_size`` lines are read.

    ``num_embedded`` (<= ``vocab_size``) splits the rows in two: :meth:`call` returns rows for
    a *trainable* ID embedding, where lines at or past ``num_embedded`` (ids seen fewer than
    min-count times in train) map to the OOV row; :meth:`lookup_all` returns the full rows,
    used for tables that cover more ids (the frozen multimodal table covers every item that
    has an embedding, however rare).

    The table (``table``, :data:`TABLE_KINDS`) is either a ``StaticHashTable`` over a
    ``TextFileInitializer`` (``"file"``: the vocabulary file travels with a SavedModel as an
    asset and is parsed at every load) or, for long vocabularies, a ``DenseHashTable`` filled
    once from the file (read by Arrow) whose buckets are saved with the weights (``"dense"``:
    checkpoints and SavedModels restore it without parsing text; 16 bytes a bucket, buckets
    the next power of two above ``vocab_size / 0.8``). Both are stock TF ops, and the served
    model takes raw ids either way. ``"auto"`` picks ``"dense"`` from
    :data:`DENSE_TABLE_MIN_ROWS` lines on.

    Input: int64 ids of any shape. Output: int32 rows of the same shape.
    """

    def __init__(self, vocabulary_file: str, vocab_size: int, num_embedded: int | None = None,
                 table: str = "auto", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if vocab_size < 0:
            raise ValueError(f"vocab_size must be >= 0, got {vocab_size}")
        num_embedded = vocab_size if num_embedded is None else num_embedded
        if not 0 <= num_embedded <= vocab_size:
            raise ValueError(f"num_embedded={num_embedded} must be within [0, vocab_size="
                             f"{vocab_size}]")
        if table not in TABLE_KINDS:
            raise ValueError(f"table must be one of {TABLE_KINDS}, got {table!r}")
        self.vocabulary_file = vocabulary_file
        self.vocab_size = int(vocab_size)
        self.num_embedded = int(num_embedded)
        self.table = table
        self.table_kind = (("dense" if self.vocab_size >= DENSE_TABLE_MIN_ROWS else "file")
                           if table == "auto" else table)
        self._table: Any = None
        if self.vocab_size == 0:
            pass
        elif self.table_kind == "file":
            initializer = tf.lookup.TextFileInitializer(
                vocabulary_file, key_dtype=tf.int64, key_index=0, value_dtype=tf.int64,
                value_index=tf.lookup.TextFileIndex.LINE_NUMBER, delimiter="\t",
                vocab_size=self.vocab_size)
            self._table = tf.lookup.StaticHashTable(initializer, default_value=-1)
        else:
            self._table = self._dense_table()

    def _dense_table(self) -> tf.lookup.experimental.DenseHashTable:
        ids = read_vocabulary_ids(self.vocabulary_file, self.name, self.vocab_size)
        for reserved in (DENSE_EMPTY_KEY, DENSE_DELETED_KEY):
            hits = np.flatnonzero(ids == reserved)
            if hits.size:
                raise ValueError(
                    f"{self.name}: vocabulary file {self.vocabulary_file!r} holds id {reserved} "
                    f"(line {int(hits[0]) + 1}), which the dense table reserves; use "
                    "table='file' for this vocabulary")
        buckets = 1 << max(4, math.ceil(math.log2(self.vocab_size / _DENSE_MAX_LOAD + 1)))
        table = tf.lookup.experimental.DenseHashTable(
            key_dtype=tf.int64, value_dtype=tf.int64, default_value=-1,
            empty_key=DENSE_EMPTY_KEY, deleted_key=DENSE_DELETED_KEY,
            initial_num_buckets=buckets,
            name=f"{self.name}_table")
        with tf.init_scope():  # filled eagerly, once; later loads restore the buckets
            table.insert(tf.constant(ids), tf.range(self.vocab_size, dtype=tf.int64))
        return table

    @property
    def num_rows(self) -> int:
        """Rows of a table indexed by :meth:`lookup_all` (reserved rows included)."""
        return self.vocab_size + NUM_RESERVED_ROWS

    @property
    def num_embedded_rows(self) -> int:
        """Rows of a table indexed by :meth:`call` (reserved rows included)."""
        return self.num_embedded + NUM_RESERVED_ROWS

    def lookup_all(self, ids: tf.Tensor) -> tf.Tensor:
        ids = tf.convert_to_tensor(ids)
        if ids.dtype != tf.int64:
            raise TypeError(f"{self.name}: ids must be int64 raw ids, got {ids.dtype}")
        if self._table is None:
            rows = tf.fill(tf.shape(ids), tf.constant(OOV_ROW, tf.int64))
        else:
            if self.table_kind == "dense":  # its lookup takes a flat key vector
                line = tf.reshape(self._table.lookup(tf.reshape(ids, [-1])), tf.shape(ids))
            else:
                line = self._table.lookup(ids)
            rows = tf.where(line >= 0, line + NUM_RESERVED_ROWS, OOV_ROW)
        rows = tf.where(ids == 0, tf.constant(PADDING_ROW, tf.int64), rows)
        return tf.cast(rows, tf.int32)

    def embedded_rows(self, all_rows: tf.Tensor) -> tf.Tensor:
        """Rows of :meth:`lookup_all` -> rows of the trainable ID embedding."""
        if self.num_embedded == self.vocab_size:
            return all_rows
        return tf.where(all_rows < self.num_embedded_rows, all_rows, OOV_ROW)

    def call(self, ids: tf.Tensor) -> tf.Tensor:
        return self.embedded_rows(self.lookup_all(ids))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "vocabulary_file": self.vocabulary_file,
                "vocab_size": self.vocab_size, "num_embedded": self.num_embedded,
                "table": self.table}
