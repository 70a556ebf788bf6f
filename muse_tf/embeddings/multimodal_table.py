"""The frozen multimodal (SCL) item table: item row -> unit vector, stored as int8 codes."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import tensorflow as tf

from muse_tf.embeddings.arrays import code_inverse_norms, normalise_rows

__all__ = ["STORAGE_DTYPES", "FrozenMultimodalTable", "MultimodalCodes"]

#: int8 codes per stored int32 word.
_CODES_PER_WORD = 4
#: What the table may store: int8 codes + a per-row inverse norm, or unit vectors.
STORAGE_DTYPES = ("int8", "float32", "float16")


@dataclasses.dataclass(frozen=True)
class MultimodalCodes:
    """The int8 SCL codes of a table, by reference: row ``r`` holds
    ``codes[code_index[r]]``, or nothing (zeros, no embedding) where ``code_index[r] < 0``.

    ``codes`` is the multimodal table as read (:func:`muse_tf.data.artifacts.
    load_mm_embeddings`, any order); nothing is copied until
    :meth:`FrozenMultimodalTable.load` gathers it chunk by chunk.

    Attributes:
      codes: int8 ``[N, D]``.
      code_index: int64 ``[num_rows]`` in ``[-1, N)``.
    """

    codes: np.ndarray
    code_index: np.ndarray

    def __post_init__(self) -> None:
        if self.codes.ndim != 2 or self.codes.dtype != np.int8:
            raise ValueError(f"MultimodalCodes: codes must be int8 [N, D], got shape "
                             f"{self.codes.shape}, dtype {self.codes.dtype}")
        if self.code_index.ndim != 1 or not np.issubdtype(self.code_index.dtype, np.integer):
            raise ValueError(f"MultimodalCodes: code_index must be an integer [num_rows] "
                             f"array, got shape {self.code_index.shape}, dtype "
                             f"{self.code_index.dtype}")
        if self.code_index.size and not (-1 <= self.code_index.min()
                                         and self.code_index.max() < len(self.codes)):
            raise ValueError(f"MultimodalCodes: code_index holds values in "
                             f"[{self.code_index.min()}, {self.code_index.max()}], outside "
                             f"[-1, {len(self.codes)}) (the rows of codes)")

    @property
    def num_rows(self) -> int:
        return int(self.code_index.shape[0])

    @property
    def dim(self) -> int:
        return int(self.codes.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        return self.num_rows, self.dim

    def rows(self, start: int, stop: int) -> np.ndarray:
        """int8 ``[stop - start, D]``: the codes of rows ``start .. stop - 1`` (zeros for
        rows without one)."""
        index = self.code_index[start:stop]
        block = np.zeros((len(index), self.dim), np.int8)
        hit = index >= 0
        block[hit] = self.codes[index[hit]]
        return block


def _write_rows(variable: tf.Variable, start: int, values: np.ndarray) -> None:
    """``variable[start:start + len(values)] = values``, in place. ``scatter_update`` writes
    only those rows (on every replica of a distributed variable); ``variable[a:b].assign``
    would first copy the whole table (measured: RSS doubles)."""
    indices = tf.range(start, start + len(values))
    variable.scatter_update(tf.IndexedSlices(tf.constant(values, dtype=variable.dtype),
                                             indices))


@tf.keras.utils.register_keras_serializable(package="muse_tf")
class FrozenMultimodalTable(tf.keras.layers.Layer):
    """Frozen multimodal item embeddings, gathered by item row.

    MUSE (section 3.1) keeps the SCL image-text embeddings of items frozen, and its GSU
    scores a behaviour by the cosine of its embedding to the target's. TAOBAO-MM ships them as
    int8 codes ``c_r`` (``D = 128`` bytes a row: 4.5 GB for its 35.4M items), so by default
    the table **keeps the codes** and one float32 inverse norm per row::

        rho_r = 1 / ||c_r||           (||c_r||^2 summed exactly in integers; 0 for c_r = 0)
        call(r)            = c_r * rho_r                        float32 unit vector [..., D]
        similarity(q, r)   = <q, c_r> * rho_r  = ||q|| cos(q, c_r)

    dequantising each gathered block on the fly (int8 -> float32, in cache-sized blocks:
    :meth:`similarity`): a quarter of the float32 table's memory and of the bytes the GSU
    gathers (on a 2-core CPU the cast and dot products dominate, so it runs at about the
    float32 path's speed: ``python -m muse_tf.bench gsu``). ``storage_dtype="float32"`` /
    ``"float16"`` keep L2-normalised vectors ``u_r = c_r / ||c_r||`` instead
    (``similarity = <q, u_r>``, cast to float32 after the gather).

    Error bound (``u = 2**-24``, float32's unit round-off): ``c_r`` is exact in float32, so
    the int8 path rounds only the ``D`` products and sums of ``<q, c_r>`` (at most
    ``gamma_D sum_d |q_d c_rd| <= gamma_D ||q|| ||c_r||``, ``gamma_D = D u / (1 - D u)``),
    ``rho_r`` and the final product::

        |similarity(q, r) - ||q|| cos(q, c_r)| <= (D + 2) u ||q||   (7.8e-6 for D = 128)

    The float32 path has the same bound (its ``u_r`` carry one rounding each), so the two
    paths' cosines differ by at most ``2 (D + 2) u ||q||`` (about 1.6e-5; ~1e-7 in practice)
    and their top-K can differ only among behaviours whose cosines are that close.

    Items without an embedding hold a zero row, ``rho = 0`` and ``present = 0``
    (:meth:`has_embedding` False); multimodal searches must mask them.

    Loading (:meth:`load`, from ``initial_table`` at construction): the weights are created
    as zeros and filled ``load_chunk_rows`` rows at a time by ``scatter_update`` (in place on
    every replica), each chunk gathered from the codes and normalised on the way. There is no
    float copy of the catalogue and no constant initializer (no graph constant: the table
    travels only as weights, in checkpoints and SavedModel variables); building the layer
    needs the weights' bytes plus a few chunks.

    Shapes: rows int32 ``[...]`` -> vectors ``[..., dim]`` (float32) and, from
    :meth:`has_embedding`, bool ``[...]``.

    Args:
      num_rows: rows of the table (row 0 = padding, row 1 = out of vocabulary: both zero).
      dim: embedding dimension (128 for TAOBAO-MM's SCL vectors).
      storage_dtype: ``int8`` (codes + inverse norms, the default), ``float32`` or
        ``float16`` (unit vectors).
      initial_table: optional ``[num_rows, dim]`` table to :meth:`load`: a
        :class:`MultimodalCodes`, an int8 array of codes by row, or (float storage only) a
        float array of L2-normalised vectors.
    """

    #: Target size of one dequantised (float32) block in :meth:`similarity`.
    chunk_bytes = 1024 * 1024
    #: Rows written per ``scatter_update`` in :meth:`load` (8 MB of int8 codes at D = 128).
    load_chunk_rows = 65536

    def __init__(self, num_rows: int, dim: int, storage_dtype: str = "int8",
                 initial_table: MultimodalCodes | np.ndarray | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"{self.name}: storage_dtype must be one of {STORAGE_DTYPES}, got "
                             f"{storage_dtype!r}")
        self.num_rows = int(num_rows)
        self.dim = int(dim)
        self.storage_dtype = storage_dtype
        if initial_table is not None:
            self._check_table(initial_table)
        # int8 codes are stored packed, four to an int32 word (the same bytes): tf.distribute's
        # collectives (MultiWorkerMirroredStrategy broadcasts every variable's initial value)
        # take no int8; the gather unpacks them with a bitcast.
        self.vectors = self.add_weight(
            name="vectors", shape=(self.num_rows, self._stored_width),
            dtype="int32" if self.quantised else storage_dtype, initializer="zeros",
            trainable=False)
        self.inverse_norm = None if not self.quantised else self.add_weight(
            name="inverse_norm", shape=(self.num_rows,), dtype="float32",
            initializer="zeros", trainable=False)
        self.present = self.add_weight(
            name="present", shape=(self.num_rows,), dtype="float32", initializer="zeros",
            trainable=False)
        if initial_table is not None:
            self.load(initial_table)

    @property
    def quantised(self) -> bool:
        """Whether the table holds int8 codes (and :attr:`inverse_norm`)."""
        return self.storage_dtype == "int8"

    @property
    def _stored_width(self) -> int:
        """Columns of :attr:`vectors`: ``ceil(dim / 4)`` int32 words of int8 codes, or
        ``dim`` floats."""
        return -(-self.dim // _CODES_PER_WORD) if self.quantised else self.dim

    def _pack(self, codes: np.ndarray) -> np.ndarray:
        """int8 ``[n, dim]`` -> int32 ``[n, ceil(dim / 4)]`` holding the same bytes."""
        width = self._stored_width * _CODES_PER_WORD
        padded = np.zeros((len(codes), width), np.int8)
        padded[:, :self.dim] = codes
        return padded.view(np.int32)

    def _gather(self, rows: tf.Tensor) -> tf.Tensor:
        """The stored rows, as int8 codes ``[..., dim]`` or float vectors."""
        stored = tf.gather(self.vectors, rows)
        if not self.quantised:
            return stored
        codes = tf.bitcast(stored, tf.int8)                  # [..., words, 4]
        width = self._stored_width * _CODES_PER_WORD
        codes = tf.reshape(codes, tf.concat([tf.shape(stored)[:-1], [width]], axis=0))
        codes = codes[..., :self.dim]
        codes.set_shape(stored.shape[:-1].concatenate([self.dim]))  # keep the static shape
        return codes

    def stored_values(self) -> np.ndarray:
        """The table as stored: int8 codes ``[num_rows, dim]`` (unpacked) or float vectors."""
        values = self.vectors.numpy()
        return values.view(np.int8)[:, :self.dim] if self.quantised else values

    def _check_table(self, table: MultimodalCodes | np.ndarray) -> None:
        if not isinstance(table, MultimodalCodes | np.ndarray):
            raise ValueError(f"{self.name}: initial_table must be MultimodalCodes or an ndarray, "
                             f"got {type(table).__name__}")
        if tuple(table.shape) != (self.num_rows, self.dim):
            raise ValueError(f"{self.name}: initial_table has shape {tuple(table.shape)}, "
                             f"expected [num_rows={self.num_rows}, dim={self.dim}]")
        if isinstance(table, np.ndarray) and table.dtype != np.int8:
            if not np.issubdtype(table.dtype, np.floating):
                raise ValueError(f"{self.name}: initial_table must hold int8 codes or float "
                                 f"unit vectors, got dtype {table.dtype}")
            if self.quantised:
                raise ValueError(
                    f"{self.name}: a {table.dtype} initial_table cannot be stored as int8 "
                    "codes without loss; pass the int8 codes (MultimodalCodes, "
                    "muse_tf.embeddings.multimodal_codes) or storage_dtype='float32'")

    def load(self, table: MultimodalCodes | np.ndarray, chunk_rows: int | None = None) -> None:
        """Fill the weights from ``table`` (see ``initial_table``), ``chunk_rows`` rows at a
        time (default :attr:`load_chunk_rows`). Eager only (it runs where the layer is built).
        """
        self._check_table(table)
        if not tf.executing_eagerly():
            raise RuntimeError(f"{self.name}: FrozenMultimodalTable.load runs eagerly (it writes "
                               "the weights chunk by chunk from NumPy arrays)")
        chunk_rows = int(chunk_rows or self.load_chunk_rows)
        if chunk_rows < 1:
            raise ValueError(f"{self.name}: chunk_rows must be >= 1, got {chunk_rows}")
        for start in range(0, self.num_rows, chunk_rows):
            stop = min(start + chunk_rows, self.num_rows)
            if isinstance(table, MultimodalCodes):
                block = table.rows(start, stop)
            else:
                block = np.asarray(table[start:stop])
            if block.dtype == np.int8:
                inverse_norm = code_inverse_norms(block)
                present = inverse_norm > 0
                values = block if self.quantised else normalise_rows(block)
            else:
                present = np.any(block != 0, axis=1)
                values = block
            _write_rows(self.vectors, start, self._pack(values) if self.quantised else values)
            _write_rows(self.present, start, present.astype(np.float32))
            if self.inverse_norm is not None:
                _write_rows(self.inverse_norm, start, inverse_norm)

    def call(self, rows: tf.Tensor) -> tf.Tensor:
        vectors = tf.cast(self._gather(rows), tf.float32)
        if self.inverse_norm is not None:
            vectors *= tf.gather(self.inverse_norm, rows)[..., tf.newaxis]
        return vectors

    def has_embedding(self, rows: tf.Tensor) -> tf.Tensor:
        return tf.gather(self.present, rows) > 0.5

    def similarity(self, queries: tf.Tensor, rows: tf.Tensor) -> tf.Tensor:
        """``<q, c_r> rho_r`` (int8) or ``<q, u_r>`` (float) over ``rows``, without
        materialising the gathered ``[B, L, dim]`` vectors.

        This is the multimodal GSU's cosine over a whole lifelong history. Gathering ``B * L``
        float rows at once writes ``B * L * dim * 4`` bytes of fresh memory per step (131 MB
        at B=256, L=1,000), which costs more than the arithmetic; the history is therefore
        walked in chunks of positions whose dequantised float32 block stays near
        :attr:`chunk_bytes` (and is reused from step to step). An int8 table gathers a
        quarter of those bytes, plus one float32 inverse norm per position.

        Args:
          queries: float32 ``[B, dim]`` or ``[B, C, dim]`` (C candidates per row).
          rows: int32 ``[B, L]`` table rows of the history.

        Returns:
          float32 ``[B, L]`` or ``[B, C, L]`` (error bound: class docstring).
        """
        queries = tf.cast(queries, tf.float32)
        rows = tf.convert_to_tensor(rows)
        if queries.shape.rank not in (2, 3) or rows.shape.rank != 2:
            raise ValueError(f"{self.name}: similarity takes queries [B, dim] or [B, C, dim] "
                             f"and rows [B, L], got {queries.shape} and {rows.shape}")
        single = queries.shape.rank == 2
        if single:
            queries = queries[:, tf.newaxis, :]
        batch, length = tf.shape(rows)[0], tf.shape(rows)[1]
        bytes_per_position = tf.cast(batch, tf.int64) * self.dim * 4
        chunk = tf.cast(tf.maximum(tf.constant(self.chunk_bytes, tf.int64)
                                   // tf.maximum(bytes_per_position, 1), 1), tf.int32)
        chunk = tf.minimum(chunk, tf.maximum(length, 1))
        num_chunks = (length + chunk - 1) // chunk
        padded = tf.pad(rows, [[0, 0], [0, num_chunks * chunk - length]])
        blocks = tf.transpose(tf.reshape(padded, [batch, num_chunks, chunk]), [1, 0, 2])

        def block_scores(block: tf.Tensor) -> tf.Tensor:
            vectors = tf.cast(self._gather(block), tf.float32)  # [B, chunk, dim]
            return tf.einsum("bcd,bld->bcl", queries, vectors)

        scores = tf.map_fn(block_scores, blocks, parallel_iterations=2,
                           fn_output_signature=tf.TensorSpec([None, None, None], tf.float32))
        scores = tf.transpose(scores, [1, 2, 0, 3])                        # [B, C, n, chunk]
        scores = tf.reshape(scores, [batch, tf.shape(queries)[1], -1])[:, :, :length]
        if self.inverse_norm is not None:
            # One [B, L] gather and product for the whole history, not one per block.
            scores *= tf.gather(self.inverse_norm, rows)[:, tf.newaxis, :]
        if rows.shape[1] is not None:
            scores = tf.ensure_shape(scores, [None, None, rows.shape[1]])
        return scores[:, 0, :] if single else scores

    def get_config(self) -> dict[str, Any]:
        # The table itself is (non-trainable) weights: it travels in checkpoints and
        # SavedModels, not in the config.
        return {**super().get_config(), "num_rows": self.num_rows, "dim": self.dim,
                "storage_dtype": self.storage_dtype}
