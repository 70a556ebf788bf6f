"""Exact (brute-force) top-k over an embedding catalogue, streamed over chunks of it, and the
NumPy reference.

The factorized indexes share the TFRS top-k interface: ``index(candidates, identifiers)``
builds the index from ``[N, D]`` candidate embeddings and their ids, ``call(queries, k)``
returns ``(scores [B, k], identifiers [B, k])``, best first, scores = dot products.
:class:`ChunkedBruteForce` uses stock TensorFlow ops only (``MatMul``, ``TopKV2``, a
``While`` loop), so its SavedModel runs on TF Serving's GPU image; the approximate ScaNN index
(:mod:`muse_tf.index.scann_index`) needs ScaNN's custom ops.

Memory, for ``N`` candidates of ``D`` float32 and a batch of ``B`` queries:

* the index holds the candidates once, ``N * D * 4`` bytes (4.5 GB for 35.4M x 32), in a
  variable (saved with the SavedModel's variables, never a graph constant, so exports are not
  bound by the 2 GB proto limit); given a C-contiguous, 64-byte-aligned float32 array (e.g.
  from :func:`aligned_empty`, which :meth:`TwoTowerModel.candidate_embeddings` uses) the
  variable *shares* that array's memory (:func:`shared_variable`: no copy);
* a search never forms the ``[B, N]`` score matrix (145 GB at B = 1024, N = 35.4M): it scores
  ``C = max(k, max_chunk_scores // B)`` candidates at a time (``B * C * 4`` bytes, 128 MiB with
  the default :data:`DEFAULT_MAX_CHUNK_SCORES`), keeps each chunk's top ``k`` and merges them
  into the running ``[B, k]`` best.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs

__all__ = [
    "ALIGNMENT",
    "DEFAULT_MAX_CHUNK_SCORES",
    "ChunkedBruteForce",
    "aligned_empty",
    "brute_force_index",
    "check_catalogue",
    "chunked_top_k",
    "numpy_top_k",
    "shape_and_dtype",
    "shared_tensor",
    "shared_variable",
]

#: Byte alignment TensorFlow needs to use an outside buffer as a tensor's (Eigen's largest,
#: AVX-512); :func:`aligned_empty` arrays have it.
ALIGNMENT = 64
#: Scores one search step computes at most: ``B * C`` floats of the ``[B, C]`` chunk (128 MiB).
DEFAULT_MAX_CHUNK_SCORES = 1 << 25
#: Chunk lengths are rounded up to this many rows (keeps chunk starts aligned).
_CHUNK_ROW_MULTIPLE = 16


def aligned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an :data:`ALIGNMENT`-byte
    boundary (so :func:`shared_variable` can hand its memory to TensorFlow without a copy).
    Costs its size plus at most ``ALIGNMENT`` bytes."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(size + ALIGNMENT, np.uint8)
    offset = -raw.ctypes.data % ALIGNMENT
    return raw[offset:offset + size].view(dtype).reshape(shape)


def _is_shareable(values: np.ndarray) -> bool:
    return (values.flags.c_contiguous and values.flags.writeable
            and values.ctypes.data % ALIGNMENT == 0)


def shared_variable(values: np.ndarray, name: str) -> tf.Variable:
    """A non-trainable ``tf.Variable`` holding ``values``, over the same memory when it can.

    A C-contiguous, writeable, :data:`ALIGNMENT`-aligned array is handed to TensorFlow through
    DLPack (no copy: the variable and the array share one buffer, which stays alive as long as
    either does) and is then marked read-only, since writing into it would change the
    variable. Any other array is first copied once into an aligned one (``values.nbytes``).
    The variable is only ever assigned whole, so its reads alias the buffer too (a sparse
    update would switch it to copy-on-read, and every read would copy it).
    """
    return tf.Variable(shared_tensor(values), trainable=False, name=name)


def shared_tensor(values: np.ndarray) -> tf.Tensor:
    """An eager tensor over ``values``' memory (no copy) where it can be, as
    :func:`shared_variable` (which see); ``values`` is then read-only."""
    values = np.asarray(values)
    if values.size == 0:
        return tf.constant(values)
    if not _is_shareable(values):
        copy = aligned_empty(values.shape, values.dtype)
        copy[...] = values
        values = copy
    tensor = tf.experimental.dlpack.from_dlpack(values.__dlpack__())
    values.flags.writeable = False
    return tensor


def shape_and_dtype(values: Any) -> tuple[tuple[int | None, ...], tf.DType]:
    """The shape and dtype of an array, tensor or variable, without converting (copying) it."""
    if isinstance(values, tf.Variable | tf.Tensor):
        return tuple(values.shape.as_list()), values.dtype
    values = np.asarray(values)
    return values.shape, tf.as_dtype(values.dtype)


def check_catalogue(candidates: np.ndarray | tf.Tensor, identifiers: np.ndarray | tf.Tensor,
                    k: int) -> tuple[Any, Any, int]:
    """Checks a catalogue: float ``[N, D]`` candidates, ``[N]`` identifiers, ``k >= 1``.

    Returns the two unchanged (arrays are not converted to tensors: that would copy them) and
    ``min(k, N)`` (no index can return more than N items).
    """
    shape, dtype = shape_and_dtype(candidates)
    id_shape, _ = shape_and_dtype(identifiers)
    if len(shape) != 2 or not dtype.is_floating:
        raise ValueError(f"candidates must be a float [N, D] matrix, got shape "
                         f"{tf.TensorShape(shape)} and dtype {dtype.name}")
    if len(id_shape) != 1 or id_shape[0] != shape[0]:
        raise ValueError(f"identifiers must be [N={shape[0]}], got shape "
                         f"{tf.TensorShape(id_shape)}")
    if shape[0] == 0:
        raise ValueError(f"the catalogue is empty: candidates has shape {tuple(shape)}")
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    return candidates, identifiers, int(min(k, shape[0]))


def chunked_top_k(queries: tf.Tensor, candidates: tf.Tensor, k: int,
                  max_chunk_scores: int = DEFAULT_MAX_CHUNK_SCORES
                  ) -> tuple[tf.Tensor, tf.Tensor]:
    """Exact top-``k`` dot products of ``queries`` [B, D] over ``candidates`` [N, D], chunk by
    chunk: ``(scores [B, k], candidate indices int32 [B, k])``, best first.

    With ``C = max(k, max_chunk_scores // B)`` (rounded up to a multiple of 16, at most N)::

        best = top_k(q @ candidates[0:C]^T, k)
        for every later chunk c = candidates[s:s + C]:
            best = top_k(concat(best, top_k(q @ c^T, min(k, |c|)) + s), k)

    Ties: ``top_k`` puts the lower index first among equal scores, and the running best (lower
    indices) comes before each new chunk in the merge, so equal scores are ordered by
    candidate index exactly as one ``top_k`` over the whole ``[B, N]`` row orders them. With
    ``C >= N`` (``B * N <= max_chunk_scores``: with the default, 1024 queries over up to 32,768
    items) it is that single ``MatMul`` + ``top_k``, the computation of TFRS's
    ``BruteForce``.

    Memory beyond the inputs: one ``[B, C]`` chunk of scores and ``[B, 2k]`` to merge
    (``4 * B * (C + 2k)`` bytes for float32; chunks are slices of ``candidates``, not
    copies).
    """
    n = candidates.shape[0]
    if n is None or n == 0:
        raise ValueError(f"candidates must have a static, non-zero length, got shape "
                         f"{candidates.shape}")
    k = int(min(k, n))
    batch = tf.shape(queries)[0]
    rows = tf.maximum(tf.constant(max_chunk_scores, tf.int32) // tf.maximum(batch, 1), k)
    rows = tf.minimum((rows + _CHUNK_ROW_MULTIPLE - 1) // _CHUNK_ROW_MULTIPLE
                      * _CHUNK_ROW_MULTIPLE, n)

    def chunk_top(start: tf.Tensor, size: tf.Tensor, top: Any) -> tuple[tf.Tensor, tf.Tensor]:
        chunk = tf.slice(candidates, tf.stack([start, 0]), tf.stack([size, -1]))
        scores, indices = tf.math.top_k(tf.matmul(queries, chunk, transpose_b=True), k=top)
        return scores, indices + start

    best_scores, best_indices = chunk_top(tf.constant(0), rows, k)

    def merge(start: tf.Tensor, best_scores: tf.Tensor, best_indices: tf.Tensor
              ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        size = tf.minimum(rows, n - start)
        scores, indices = chunk_top(start, size, tf.minimum(k, size))
        best_scores, at = tf.math.top_k(tf.concat([best_scores, scores], 1), k=k)
        best_indices = tf.gather(tf.concat([best_indices, indices], 1), at, batch_dims=1)
        return start + size, best_scores, best_indices

    # One chunk at a time (parallel_iterations=1): the scores of one chunk in memory.
    _, best_scores, best_indices = tf.while_loop(
        lambda start, *_: start < n, merge, (rows, best_scores, best_indices),
        parallel_iterations=1)
    return best_scores, best_indices


class ChunkedBruteForce(tfrs.layers.factorized_top_k.TopK):
    """Exact top-k (TFRS's ``BruteForce`` contract) that scores the catalogue chunk by chunk
    (:func:`chunked_top_k`), so no ``[B, N]`` score matrix exists.

    ``index(candidates, identifiers)`` stores both as non-trainable variables (a NumPy array
    shares its memory with the variable where it can, :func:`shared_variable`: the caller must
    not write into it afterwards, and it is marked read-only); ``call(queries, k)`` returns
    ``(scores [B, k], identifiers [B, k])`` for query embeddings ``[B, D]`` (or raw features
    when ``query_model`` is set), ``k`` clipped to ``N``. Results equal TFRS's ``BruteForce``:
    the same ids in the same order, ties by catalogue position.

    Args:
      query_model: optional model mapping raw query features to ``[B, D]``.
      k: default number of results.
      max_chunk_scores: the most scores one chunk step computes (``B * C``).
      name: layer name.
    """

    def __init__(self, query_model: tf.keras.Model | None = None, k: int = 10,
                 max_chunk_scores: int = DEFAULT_MAX_CHUNK_SCORES,
                 name: str | None = None) -> None:
        super().__init__(k=k, name=name)
        if isinstance(max_chunk_scores, bool) or int(max_chunk_scores) < 1:
            raise ValueError(f"max_chunk_scores must be a positive int, got "
                             f"{max_chunk_scores!r}")
        self.query_model = query_model
        self.max_chunk_scores = int(max_chunk_scores)
        self._candidates: tf.Variable | None = None
        self._identifiers: tf.Variable | None = None

    @property
    def candidates(self) -> tf.Variable | None:
        """float ``[N, D]`` candidate embeddings (after :meth:`index`)."""
        return self._candidates

    @property
    def identifiers(self) -> tf.Variable | None:
        """``[N]`` identifiers returned for the candidates (after :meth:`index`)."""
        return self._identifiers

    def index(self, candidates: np.ndarray | tf.Tensor,
              identifiers: np.ndarray | tf.Tensor | None = None) -> ChunkedBruteForce:
        if identifiers is None:
            identifiers = np.arange(shape_and_dtype(candidates)[0][0], dtype=np.int64)
        candidates, identifiers, _ = check_catalogue(candidates, identifiers, 1)
        if isinstance(candidates, tf.Variable | tf.Tensor):
            self._candidates = tf.Variable(tf.convert_to_tensor(candidates), trainable=False,
                                           name="candidates")
        else:
            self._candidates = shared_variable(candidates, "candidates")
        # The identifiers are copied (once): the caller's array stays writeable.
        self._identifiers = shared_variable(np.array(identifiers), "identifiers")
        self._reset_tf_function_cache()
        return self

    def call(self, queries: tf.Tensor | dict[str, tf.Tensor],
             k: int | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        if self._candidates is None or self._identifiers is None:
            raise ValueError("The `index` method must be called first to create the "
                             "retrieval index.")
        k = self._k if k is None else k
        if self.query_model is not None:
            queries = self.query_model(queries)
        queries = tf.convert_to_tensor(queries)
        if queries.shape.rank != 2:
            raise ValueError(f"{self.name}: queries must be [B, D] embeddings, got shape "
                             f"{queries.shape}")
        # Whole-variable reads (they alias the buffers), never gathers from the variables.
        scores, indices = chunked_top_k(queries, self._candidates.value(), k,
                                        self.max_chunk_scores)
        return scores, tf.gather(self._identifiers.value(), indices)

    def is_exact(self) -> bool:
        return True


def brute_force_index(candidates: np.ndarray | tf.Tensor, identifiers: np.ndarray | tf.Tensor,
                      k: int, query_model: tf.keras.Model | None = None,
                      name: str = "brute_force",
                      max_chunk_scores: int = DEFAULT_MAX_CHUNK_SCORES) -> ChunkedBruteForce:
    """An indexed :class:`ChunkedBruteForce` layer.

    Args:
      candidates: float ``[N, D]`` candidate embeddings (an aligned NumPy array is shared,
        not copied, and becomes read-only: :func:`shared_variable`).
      identifiers: ``[N]`` their ids (returned by queries; copied).
      k: default number of results, clipped to ``N``.
      query_model: optional model mapping raw query features to ``[B, D]`` (e.g. the
        two-tower user tower); without it queries are embeddings.
      max_chunk_scores: the most scores one search step computes (:func:`chunked_top_k`).
    """
    candidates, identifiers, k = check_catalogue(candidates, identifiers, k)
    layer = ChunkedBruteForce(query_model=query_model, k=k, max_chunk_scores=max_chunk_scores,
                              name=name)
    return layer.index(candidates, identifiers)


def numpy_top_k(queries: np.ndarray, candidates: np.ndarray, k: int,
                identifiers: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Reference exact top-k by dot product: ``(scores [B, k], ids [B, k])``, best first
    (ties: lower candidate index first). Forms the whole ``[B, N]`` score matrix: for tests."""
    queries = np.asarray(queries, dtype=np.float32)
    candidates = np.asarray(candidates, dtype=np.float32)
    if queries.ndim != 2 or candidates.ndim != 2 or queries.shape[1] != candidates.shape[1]:
        raise ValueError(f"queries [B, D] and candidates [N, D] must share D; got shapes "
                         f"{queries.shape} and {candidates.shape}")
    k = min(int(k), candidates.shape[0])
    scores = queries @ candidates.T
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    ids = top if identifiers is None else np.asarray(identifiers)[top]
    return np.take_along_axis(scores, top, axis=1), ids
