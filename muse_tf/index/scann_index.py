"""Approximate top-k with ScaNN (the TFRS ScaNN layer), its size rules for large catalogues, and
its benchmark against brute force.

:class:`ScannIndex` is :class:`tfrs.layers.factorized_top_k.ScaNN` (k-means tree partitioning
+ asymmetric-hashing scoring, optional re-ordering) with the same interface as the
brute-force index (:mod:`muse_tf.index.brute_force`): ``index(candidates, identifiers)`` and
``call(queries, k) -> (scores [B, k], identifiers [B, k])``. Unlike the plain TFRS layer its
output always has ``k`` columns: ScaNN returns fewer neighbours when the searched leaves hold
fewer than ``k`` candidates (and pads ragged rows with index 0 and a NaN distance, which TFRS
would map to the first identifier); here such slots carry identifier ``0`` (the schema's
"missing" id) and score ``-inf``.

Building. The index is trained by ScaNN's own builder (``scann_ops_pybind``), whose searcher
is then serialized and loaded into the TF ops' state (:func:`load_state`:
``scann_ops.ScannState``, the tensors the ``ScannToTensors`` op gives, as variables, so the
SavedModel and TF Serving read it as they read a TFRS-built one). ScaNN copies the float32
data twice while it trains whichever API builds it (measured peak: 2.1 x ``N * D * 4`` bytes
above the input, 9.4 GB for 35.4M x 32), but the TF op ``ScannCreateSearcher`` that TFRS's
layer uses also converts its input (peak 4.1 x above a NumPy input, measured at 4M x 32) and
keeps the searcher it built, with a float copy of the data, in the op's resource for the life
of the process (0.67 GiB kept at 4M, against this build's 0.2 GiB index); the Python searcher
is freed as soon as its state is taken. (Neither build is exactly reproducible: ScaNN trains
on several threads.)

Sizes (:func:`scaled_tree`, :func:`tree_training_sample`, :func:`reordering_candidates`,
:func:`reorder_dtype_for`): the configured tree (``retrieval.scann_leaves`` = 100 leaves, 10
searched, TFRS's defaults) is kept up to 100² = 10,000 items; above, ~√N leaves (ScaNN's rule
of thumb; 1,000 at 1M, 5,950 at 35.4M) with the same share searched; k-means trains on
``max(100,000, 64 * leaves)`` points (ScaNN's default sample, and enough points per leaf for
thousands of leaves); ``max(4k, 100)`` hits are re-scored up to 1M items, ``max(10k, 100)``
above; re-ordering keeps float32 vectors while they take at most
:data:`FLOAT32_REORDER_MAX_BYTES`, int8 ones (a quarter) above (the TF ops serialize only these
two). Index memory for ``N`` items of ``D`` dims (``D / 2`` asymmetric-hashing blocks):
``N * (4 + D / 2 + (4 * D or D))`` bytes (the int32 leaf of each point, a byte per block, the
re-ordering vectors): 1.84 GB for 35.4M x 32 with int8 re-ordering. The state holds it once,
and every traced function that searches builds a searcher from it once more.

Deployment: a SavedModel holding this layer contains ScaNN's custom ops (namespace ``Scann``);
it is saved with ``tf.saved_model.SaveOptions(namespace_whitelist=["Scann"])`` and loads only in
a process that has imported ``scann`` (or a TF Serving build with ScaNN's ops linked in, e.g.
the ``google/tf-serving-scann`` image). Stock TF Serving serves the brute-force export instead.

ScaNN is imported only here, lazily (:func:`require_scann`), with a clear error when missing.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs

from muse_tf.index.brute_force import (
    aligned_empty,
    brute_force_index,
    check_catalogue,
    shape_and_dtype,
    shared_tensor,
    shared_variable,
)
from muse_tf.profiling import reset_peak_rss, rss_bytes

__all__ = [
    "DEFAULT_NUM_LEAVES",
    "DEFAULT_NUM_LEAVES_TO_SEARCH",
    "FLOAT32_REORDER_MAX_BYTES",
    "REORDER_DTYPES",
    "REORDER_SCALE_FROM_ITEMS",
    "SCANN_NAMESPACE",
    "ScannIndex",
    "load_state",
    "reorder_dtype_for",
    "reordering_candidates",
    "require_scann",
    "scaled_tree",
    "scann_index",
    "scann_save_options",
    "scann_vs_brute_force",
    "tree_training_sample",
]

#: Op namespace of ScaNN's custom ops (for ``SaveOptions(namespace_whitelist=...)``).
SCANN_NAMESPACE = "Scann"
#: The tree for catalogues up to ``DEFAULT_NUM_LEAVES ** 2`` items (TFRS's ScaNN defaults and
#: ``retrieval.scann_leaves`` / ``retrieval.scann_leaves_to_search``).
DEFAULT_NUM_LEAVES = 100
DEFAULT_NUM_LEAVES_TO_SEARCH = 10
#: k-means needs several points per leaf: ``num_leaves`` is clipped to ``N // 16``.
MIN_ITEMS_PER_LEAF = 16
#: ScaNN's default k-means training sample, and the sample per leaf above it.
DEFAULT_TRAINING_SAMPLE = 100_000
TRAINING_SAMPLE_PER_LEAF = 64
#: Re-ordering vectors the index keeps: ``"float32"`` (exact scores, ``N * D * 4`` bytes) or
#: ``"int8"`` (ScaNN's fixed-point, ``N * D`` bytes; overlap with brute force within 0.005
#: of float32's at 1M items).
REORDER_DTYPES = ("float32", "int8")
#: Above this size of the float32 vectors, re-ordering is int8 (256 MiB: 2.1M items x 32).
FLOAT32_REORDER_MAX_BYTES = 1 << 28
#: Above this many items, :func:`reordering_candidates` re-scores 10k hits instead of 4k.
REORDER_SCALE_FROM_ITEMS = 1_000_000

#: The state tensors of ``scann_ops.ScannState``, in its order, and their dtypes.
_STATE_TENSORS: tuple[tuple[str, tf.DType], ...] = (
    ("scann_config", tf.string), ("serialized_partitioner", tf.string),
    ("datapoint_to_token", tf.int32), ("ah_codebook", tf.string),
    ("hashed_dataset", tf.uint8), ("int8_dataset", tf.int8),
    ("int8_multipliers", tf.float32), ("dp_norms", tf.float32), ("dataset", tf.float32))
#: Files of a serialized searcher that are not state tensors.
_OTHER_ARTIFACTS = ("scann_assets.pbtxt",)


def require_scann() -> Any:
    """Imports and returns the ``scann`` module; raises ``ImportError`` saying what to do."""
    try:
        import scann  # optional dependency, imported only where used
    except ImportError as err:
        raise ImportError(
            "the ScaNN index needs the `scann` package (pip install scann; Linux x86-64 wheels "
            "matching the TensorFlow version). Without it, use the exact brute-force index "
            "(muse_tf.index.brute_force), which needs no custom ops."
        ) from err
    return scann


def scann_save_options() -> tf.saved_model.SaveOptions:
    """Save options for a SavedModel holding ScaNN ops (it then needs a ScaNN-enabled
    TensorFlow / TF Serving to load)."""
    return tf.saved_model.SaveOptions(namespace_whitelist=[SCANN_NAMESPACE])


def scaled_tree(num_items: int, num_leaves: int = DEFAULT_NUM_LEAVES,
                num_leaves_to_search: int = DEFAULT_NUM_LEAVES_TO_SEARCH) -> tuple[int, int]:
    """The partition tree for ``num_items`` items: ``(leaves, leaves searched per query)``.

    ::

        leaves    = min(max(num_leaves, ceil(sqrt(N))), max(1, N // 16))
        to_search = min(max(num_leaves_to_search,
                            ceil(leaves * num_leaves_to_search / num_leaves)), leaves)

    So the configured tree up to ``N = num_leaves ** 2`` (10,000 items with the defaults;
    smaller catalogues clip it as :func:`scann_index` always did), then about √N leaves of √N
    items each (ScaNN's rule of thumb: 1,000 at 1M items, 5,950 at 35.4M), searching the
    configured share of them (10%: a query scores about ``N / 10`` points by asymmetric
    hashing before re-ordering).
    """
    for name, value in (("num_items", num_items), ("num_leaves", num_leaves),
                        ("num_leaves_to_search", num_leaves_to_search)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"scaled_tree: {name} must be a positive int, got {value!r}")
    leaves = min(max(int(num_leaves), math.isqrt(int(num_items) - 1) + 1),
                 max(1, int(num_items) // MIN_ITEMS_PER_LEAF))
    to_search = max(int(num_leaves_to_search),
                    math.ceil(leaves * int(num_leaves_to_search) / int(num_leaves)))
    return leaves, min(to_search, leaves)


def tree_training_sample(num_items: int, num_leaves: int) -> int:
    """Points the partitioner's k-means trains on: ``min(N, max(100,000, 64 * leaves))``
    (ScaNN's default sample, which is the whole catalogue up to 100,000 items; 380,800 for
    5,950 leaves)."""
    return int(min(num_items, max(DEFAULT_TRAINING_SAMPLE, TRAINING_SAMPLE_PER_LEAF * num_leaves)))


def reordering_candidates(num_items: int, k: int) -> int:
    """Asymmetric-hashing hits re-scored per query for top-``k``: ``max(4k, 100)`` up to
    :data:`REORDER_SCALE_FROM_ITEMS` items, ``max(10k, 100)`` above. In a larger catalogue
    more items score within the hashing error of the k-th best (measured on 4M clustered
    items x 32, top-200, 10% of 2,000 leaves searched: overlap with brute force 0.80 for 800
    re-scored, 0.89 for 2,000, 0.91 for 5,000; queries/s 560, 433, 319)."""
    factor = 4 if num_items <= REORDER_SCALE_FROM_ITEMS else 10
    return int(max(factor * k, 100))


def reorder_dtype_for(num_items: int, dim: int) -> str:
    """``"float32"`` while the float32 vectors take at most :data:`FLOAT32_REORDER_MAX_BYTES`
    (``N * D * 4`` bytes), else ``"int8"``."""
    return "float32" if num_items * dim * 4 <= FLOAT32_REORDER_MAX_BYTES else "int8"


def _float32_matrix(candidates: Any) -> np.ndarray:
    """``candidates`` as a C-contiguous float32 ``[N, D]`` NumPy array, without a copy when it
    is one already, or a CPU tensor / variable (read-only views of their buffers)."""
    if isinstance(candidates, tf.Variable):
        candidates = candidates.value()
    if isinstance(candidates, tf.Tensor):
        candidates = tf.cast(candidates, tf.float32)
    return np.ascontiguousarray(candidates, dtype=np.float32)


def load_state(directory: str) -> Any:
    """The TF ops' state (``scann_ops.ScannState``: the searcher's parts as variables) of a
    searcher serialized into ``directory`` by ScaNN's pybind API (``searcher.serialize``).

    Its tensors are those the ``ScannToTensors`` op gives: protos as ``[1]`` strings, arrays
    as they are, absent parts as scalars. Arrays are read into aligned buffers that the
    state's variables share (:func:`~muse_tf.index.brute_force.shared_tensor`): one copy of
    each in memory.
    """
    from scann import scann_ops

    files = set(os.listdir(directory))
    known = {f"{name}{suffix}" for name, _ in _STATE_TENSORS for suffix in (".pb", ".npy")}
    unknown = files - known - set(_OTHER_ARTIFACTS)
    if unknown:
        raise ValueError(f"the ScaNN searcher wrote artifacts this loader does not know: "
                         f"{sorted(unknown)} (a re-ordering dtype other than float32/int8?)")
    tensors = []
    for name, dtype in _STATE_TENSORS:
        if dtype == tf.string and f"{name}.pb" in files:
            with open(os.path.join(directory, f"{name}.pb"), "rb") as f:
                tensors.append(tf.constant([f.read()]))
        elif f"{name}.npy" in files:
            values = np.load(os.path.join(directory, f"{name}.npy"), mmap_mode="r")
            if values.size == 0:
                tensors.append(tf.zeros([], dtype))
            else:
                tensors.append(shared_tensor(np.asarray(values, dtype.as_numpy_dtype)))
        else:
            tensors.append(tf.zeros([], dtype))
    return scann_ops.ScannState(tensors)


class ScannIndex(tfrs.layers.factorized_top_k.ScaNN):
    """:class:`tfrs.layers.factorized_top_k.ScaNN` built by ScaNN's own builder (module
    docstring), whose results always have ``k`` columns.

    Slots ScaNN could not fill (fewer than ``k`` candidates in the searched leaves) hold
    identifier ``missing_id`` and score ``-inf``. Construct through :func:`scann_index`, which
    also fits the tree size to the catalogue.

    Args: those of the TFRS layer (dot-product similarity only), plus ``training_sample_size``
    (points the partitioner trains on; ScaNN's default 100,000), ``reorder_dtype`` (one of
    :data:`REORDER_DTYPES`, used with ``num_reordering_candidates``) and ``missing_id``
    (default 0, the schema's missing id).
    """

    def __init__(self, query_model: tf.keras.Model | None = None, k: int = 10, *,
                 num_leaves: int = DEFAULT_NUM_LEAVES,
                 num_leaves_to_search: int = DEFAULT_NUM_LEAVES_TO_SEARCH,
                 num_reordering_candidates: int | None = None, dimensions_per_block: int = 2,
                 training_iterations: int = 12,
                 training_sample_size: int = DEFAULT_TRAINING_SAMPLE,
                 reorder_dtype: str = "float32", missing_id: int = 0,
                 name: str | None = None) -> None:
        require_scann()
        if reorder_dtype not in REORDER_DTYPES:
            raise ValueError(f"reorder_dtype must be one of {REORDER_DTYPES}, got "
                             f"{reorder_dtype!r}")
        super().__init__(query_model=query_model, k=k, distance_measure="dot_product",
                         num_leaves=num_leaves, num_leaves_to_search=num_leaves_to_search,
                         training_iterations=training_iterations,
                         dimensions_per_block=dimensions_per_block,
                         num_reordering_candidates=num_reordering_candidates, name=name)
        self.missing_id = int(missing_id)
        self.num_leaves = int(num_leaves)
        self.num_leaves_to_search = int(num_leaves_to_search)
        self.num_reordering_candidates = num_reordering_candidates
        self.dimensions_per_block = int(dimensions_per_block)
        self.training_sample_size = int(training_sample_size)
        self.reorder_dtype = reorder_dtype

    def build_searcher(self, dataset: np.ndarray) -> Any:
        """ScaNN's (pybind) searcher over ``dataset`` float32 ``[N, D]`` (read, not copied)
        with this layer's parameters."""
        scann = require_scann()
        from scann.scann_ops.py.scann_builder import ReorderType

        builder = scann.scann_ops_pybind.builder(dataset, self._k, "dot_product").tree(
            num_leaves=self.num_leaves, num_leaves_to_search=self.num_leaves_to_search,
            training_sample_size=self.training_sample_size,
            training_iterations=self._training_iterations)
        builder = builder.score_ah(self.dimensions_per_block)
        if self.num_reordering_candidates is not None:
            quantize = {"float32": ReorderType.FLOAT32, "int8": ReorderType.INT8}
            builder = builder.reorder(self.num_reordering_candidates,
                                      quantize=quantize[self.reorder_dtype])
        return builder.build()

    def index(self, candidates: np.ndarray | tf.Tensor,
              identifiers: np.ndarray | tf.Tensor | None = None) -> ScannIndex:
        """Builds the index over float ``[N, D]`` ``candidates`` (``[N]`` ``identifiers``,
        copied; without them queries return row indices). Peak memory beyond the inputs:
        ScaNN's two float32 copies while it trains, then the index (module docstring)."""
        shape = shape_and_dtype(candidates)[0]
        if len(shape) != 2:
            raise ValueError(f"The candidates tensor must be 2D (got {shape}).")
        if identifiers is not None and shape_and_dtype(identifiers)[0][:1] != shape[:1]:
            raise ValueError(f"{self.name}: {shape[0]} candidates but identifiers of shape "
                             f"{shape_and_dtype(identifiers)[0]}")
        searcher = self.build_searcher(_float32_matrix(candidates))
        with tempfile.TemporaryDirectory(prefix="muse_scann_") as directory:
            searcher.serialize(directory)
            del searcher  # frees ScaNN's data before the state is read in
            self._serialized_searcher = load_state(directory)
        self._identifiers = (None if identifiers is None
                             else shared_variable(np.array(identifiers), "identifiers"))
        self._reset_tf_function_cache()
        return self

    def call(self, queries: tf.Tensor | dict[str, tf.Tensor],
             k: int | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        k = k if k is not None else self._k
        scores, identifiers = super().call(queries, k=k)
        found = ~tf.math.is_nan(scores)
        scores = tf.where(found, scores, tf.constant(-np.inf, scores.dtype))
        identifiers = tf.where(found, identifiers,
                               tf.constant(self.missing_id, identifiers.dtype))
        missing = k - tf.shape(scores)[1]
        scores = tf.pad(scores, [[0, 0], [0, missing]], constant_values=-np.inf)
        identifiers = tf.pad(identifiers, [[0, 0], [0, missing]],
                             constant_values=self.missing_id)
        return tf.ensure_shape(scores, [None, k]), tf.ensure_shape(identifiers, [None, k])

    def describe(self) -> dict[str, Any]:
        """The index's parameters, for a run's ``metrics.json``."""
        return {"num_leaves": self.num_leaves, "num_leaves_to_search": self.num_leaves_to_search,
                "num_reordering_candidates": self.num_reordering_candidates,
                "reorder_dtype": self.reorder_dtype,
                "training_sample_size": self.training_sample_size,
                "dimensions_per_block": self.dimensions_per_block}


def scann_index(candidates: np.ndarray | tf.Tensor, identifiers: np.ndarray | tf.Tensor, k: int,
                *, num_leaves: int | None = None, num_leaves_to_search: int | None = None,
                num_reordering_candidates: int | None = None, dimensions_per_block: int = 2,
                training_iterations: int = 12, training_sample_size: int | None = None,
                reorder_dtype: str | None = None, query_model: tf.keras.Model | None = None,
                name: str = "scann") -> ScannIndex:
    """An indexed :class:`ScannIndex` over ``candidates`` (dot-product similarity).

    The partition tree is fitted to the catalogue size ``N``: without ``num_leaves`` it is
    :func:`scaled_tree` (``N``); a given ``num_leaves`` is clipped to ``max(1, N // 16)``
    (k-means needs several points per leaf) and ``num_leaves_to_search`` to the leaves.

    Args:
      candidates: float ``[N, D]`` embeddings (NumPy, read in place; a tensor or variable is
        read through a view of its buffer); identifiers: ``[N]`` ids.
      k: default number of results (clipped to ``N``).
      num_leaves: k-means partitions of the catalogue (default: :func:`scaled_tree`).
      num_leaves_to_search: partitions scanned per query (default: :func:`scaled_tree`'s).
      num_reordering_candidates: if set, that many asymmetric-hashing hits are re-scored
        with the kept vectors (raises overlap with brute force).
      dimensions_per_block: asymmetric-hashing block size (2: accurate; higher: faster).
      training_iterations: k-means iterations of the partitioner.
      training_sample_size: points k-means trains on (default :func:`tree_training_sample`).
      reorder_dtype: ``"float32"`` or ``"int8"`` re-ordering vectors (default
        :func:`reorder_dtype_for`: float32 up to 256 MiB of vectors).
      query_model: optional query tower (raw features → ``[B, D]``).
    """
    require_scann()
    candidates, identifiers, k = check_catalogue(candidates, identifiers, k)
    num_items, dim = shape_and_dtype(candidates)[0]
    if num_leaves is None:
        leaves, to_search = scaled_tree(num_items)
    else:
        leaves = max(1, min(int(num_leaves), num_items // MIN_ITEMS_PER_LEAF))
        to_search = DEFAULT_NUM_LEAVES_TO_SEARCH
    if num_leaves_to_search is not None:
        to_search = int(num_leaves_to_search)
    to_search = max(1, min(to_search, leaves))
    layer = ScannIndex(
        query_model=query_model, k=k, num_leaves=leaves, num_leaves_to_search=to_search,
        training_iterations=training_iterations, dimensions_per_block=dimensions_per_block,
        num_reordering_candidates=num_reordering_candidates,
        training_sample_size=(tree_training_sample(num_items, leaves)
                              if training_sample_size is None else int(training_sample_size)),
        reorder_dtype=reorder_dtype or reorder_dtype_for(num_items, dim), name=name)
    return layer.index(candidates, identifiers)


# ------------------------------------------------------------------------------ benchmark


def clustered_catalogue(num_items: int, dim: int, num_queries: int, seed: int = 0,
                        items_per_cluster: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic catalogue shaped like item embeddings: unit vectors around random cluster
    centres (cosine to their centre about 0.7), and queries drawn the same way (a user's
    interest is near some cluster). Returns float32 ``(items [N, D], queries [Q, D])``, the
    items in an aligned array (:func:`~muse_tf.index.brute_force.aligned_empty`)."""
    rng = np.random.default_rng(seed)
    num_clusters = max(1, num_items // items_per_cluster)
    centres = rng.standard_normal((num_clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def draw(count: int) -> np.ndarray:
        out = aligned_empty((count, dim), np.float32)
        for start in range(0, count, 262144):  # bounded temporaries
            end = min(count, start + 262144)
            noise = rng.standard_normal((end - start, dim), dtype=np.float32) / np.sqrt(dim)
            block = centres[rng.integers(0, num_clusters, end - start)] + noise
            out[start:end] = block / np.linalg.norm(block, axis=1, keepdims=True)
        return out

    return draw(num_items), draw(num_queries)


def _queries_per_second(search: Any, queries: np.ndarray, batch_size: int) -> tuple[float,
                                                                                  np.ndarray]:
    """Runs ``search`` over ``queries`` in batches (after one warm-up batch); returns
    queries/s and the stacked identifiers."""
    search(queries[:batch_size])  # traces / warms up
    outputs = []
    start = time.perf_counter()
    for begin in range(0, len(queries), batch_size):
        outputs.append(search(queries[begin:begin + batch_size]).numpy())
    seconds = time.perf_counter() - start
    return len(queries) / seconds, np.concatenate(outputs)


def _timed_build(build: Any) -> tuple[Any, dict[str, float]]:
    """Runs ``build()``; returns its result and ``{"seconds", "rss_before_bytes",
    "peak_rss_bytes", "rss_after_bytes"}``: wall time, and this process's RSS before, at its
    peak during and after it (Linux ``/proc``; 0 where unavailable)."""
    before = rss_bytes()
    reset_peak_rss()
    start = time.perf_counter()
    result = build()
    seconds = time.perf_counter() - start
    return result, {"seconds": seconds, "rss_before_bytes": float(before),
                    "peak_rss_bytes": float(rss_bytes("VmHWM")),
                    "rss_after_bytes": float(rss_bytes())}


def scann_vs_brute_force(num_items: int = 1_000_000, dim: int = 64, queries: int = 1000,
                         k: int = 100, *, num_leaves: int | None = None,
                         num_leaves_to_search: int | None = None,
                         num_reordering_candidates: int = 400, reorder_dtype: str | None = None,
                         dimensions_per_block: int = 2, batch_size: int = 100,
                         seed: int = 0) -> dict[str, Any]:
    """ScaNN top-``k`` against exact brute force on a synthetic clustered catalogue.

    Both run through their layers on the same query batches (``batch_size`` queries per call,
    timed after one warm-up call). The catalogue array is built first; the brute-force index
    shares it (no copy), then ScaNN is built from it: each build's wall seconds, and this
    process's peak RSS during it and RSS after it above the RSS before it (the catalogue
    itself, ``N * D * 4`` bytes, is outside both). ``num_leaves`` / ``num_leaves_to_search``
    / ``reorder_dtype`` default to the catalogue-scaled values of :func:`scann_index`.

    Returns:
      ``{"overlap": mean |ScaNN top-k ∩ brute-force top-k| / k, "brute_force_qps",
      "scann_qps", "speedup": scann_qps / brute_force_qps, "brute_force_build_seconds",
      "brute_force_build_extra_bytes" (RSS after - before), "scann_build_seconds",
      "scann_build_peak_extra_bytes" (peak RSS during - before), "scann_index_extra_bytes"
      (RSS after - before), "catalogue_bytes", "peak_rss_bytes" (the process's, from the
      catalogue's generation to the last search), ...the index parameters}``.
    """
    require_scann()
    items, query_vectors = clustered_catalogue(num_items, dim, queries, seed)
    identifiers = np.arange(num_items, dtype=np.int64)

    exact, bf_build = _timed_build(lambda: brute_force_index(items, identifiers, k))
    approximate, scann_build = _timed_build(lambda: scann_index(
        items, identifiers, k, num_leaves=num_leaves, num_leaves_to_search=num_leaves_to_search,
        num_reordering_candidates=num_reordering_candidates, reorder_dtype=reorder_dtype,
        dimensions_per_block=dimensions_per_block))

    exact_search = tf.function(lambda q: exact(q, k=k)[1], autograph=False)
    scann_search = tf.function(lambda q: approximate(q, k=k)[1], autograph=False)
    bf_qps, bf_ids = _queries_per_second(exact_search, query_vectors, batch_size)
    scann_qps, scann_ids = _queries_per_second(scann_search, query_vectors, batch_size)
    overlap = np.mean([len(np.intersect1d(a, b)) / k
                       for a, b in zip(bf_ids, scann_ids, strict=True)])
    return {
        "num_items": num_items, "dim": dim, "queries": queries, "k": k,
        **approximate.describe(), "batch_size": batch_size,
        "overlap": float(overlap),
        "brute_force_qps": float(bf_qps), "scann_qps": float(scann_qps),
        "speedup": float(scann_qps / bf_qps),
        "brute_force_build_seconds": bf_build["seconds"],
        "brute_force_build_extra_bytes": bf_build["rss_after_bytes"] - bf_build[
            "rss_before_bytes"],
        "scann_build_seconds": scann_build["seconds"],
        "scann_build_peak_extra_bytes": scann_build["peak_rss_bytes"] - scann_build[
            "rss_before_bytes"],
        "scann_index_extra_bytes": scann_build["rss_after_bytes"] - scann_build[
            "rss_before_bytes"],
        "catalogue_bytes": float(items.nbytes),
        "peak_rss_bytes": max(bf_build["peak_rss_bytes"], scann_build["peak_rss_bytes"],
                              float(rss_bytes("VmHWM"))),
    }
