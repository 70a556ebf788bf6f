"""The MISS multimodal index tree (MISS, arXiv 2508.14515, Sec. 3.2).

The tree is built once, offline, from the frozen multimodal item embeddings (the
L2-normalised SCL vectors) by recursive *balanced* 2-means: every node's items are split into
two halves of sizes ``ceil(n / 2)`` (left) and ``floor(n / 2)`` (right) so that similar items
share ancestors. Retrieval then walks it top-down with a layer-wise beam search
(:mod:`muse_tf.index.beam_search`); TDM-style training uses :meth:`IndexTree.ancestors` and
:meth:`IndexTree.sample_negatives`.

Layout (chosen so the beam search needs nothing but index arithmetic):

* A *perfect* binary tree of depth ``L = ceil(log2 N)`` (``L = 0`` for one item) in heap
  order: node ``i`` has children ``2i + 1`` (left) and ``2i + 2`` (right) and parent
  ``(i - 1) // 2``; level ``l`` holds nodes ``2**l - 1 .. 2**(l + 1) - 2``; there are
  ``2**(L + 1) - 1`` node ids.
* Items sit only at level ``L``, one per leaf. Halving by ceil/floor gives every node at level
  ``l`` either ``floor(N / 2**l)`` or ``ceil(N / 2**l)`` items, so levels ``0 .. L - 1`` are
  full (every node holds >= 1 item) and a node at level ``L - 1`` holds one or two items. A node
  with one item keeps it in its left child; its right child is a *padding* slot (invalid, no
  item, zero vector). So the ``2**L - N`` padding slots all sit at level ``L`` and are the only
  invalid nodes: "leaves one level higher" are represented by a one-child chain instead, and
  the beam search finds every item at the same depth.
* A node's vector is the exact mean of the vectors of the items under it (sums in float64,
  pairwise up the tree; float32 result); a leaf's vector is its item's vector.

Node vector storage (compact, so that TAOBAO-MM's 35.4M items fit in memory). A heap array of
every node's float32 vector would be ``(2**(L + 1) - 1) D * 4`` bytes (68 GB at depth 26,
``D = 128``) although most of it repeats the items: the tree keeps

* the means of the nodes at levels ``0 .. K`` (:attr:`IndexTree.stored_depth`), float32
  ``[2**(K + 1) - 1, D]``, exact (float64 sums rounded once);
* the item vectors themselves, by reference: the float32 embeddings in leaf order, or the int8
  codes ``c`` as given (a row index per item) with one float32 inverse norm ``rho = 1 / ||c||``
  per item, the item's vector being ``float32(c) * rho``;

and computes the vectors of the deeper nodes (levels ``K + 1 .. L``, at most
``2**(L - K - 1)`` leaf slots each) on demand from their items (:meth:`IndexTree.vectors_of`),
by the same float64 pairwise sums, so every node vector is the exact mean whatever was stored:
there is no quantisation error, only float32's rounding of the mean (relative ``2**-24`` per
coordinate; a cosine against it is off by at most ``~(D + 2) 2**-24``). The build default
``computed_levels = 5`` (``K = L - 6``) stores ``2**(L - 5) - 1`` rows: 1.07 GB at depth 26 and
``D = 128`` (vs 68 GB), while a computed node gathers at most 32 item rows.
:attr:`IndexTree.node_vectors` still returns the whole float32 heap array for trees small
enough (:data:`MAX_DENSE_NODE_BYTES`).

Building is vectorised (never a Python recursion per node) on one permutation of the items,
in two regimes chosen by node size (``block_rows``, default ``2**15``):

* *streamed* levels (the top ones, whose nodes hold more than ``block_rows`` items): each node
  is split by passes over its items' rows, ``_PASS_ROWS`` rows at a time (int8 -> float32 cast
  into a cache-sized buffer, one BLAS matrix-vector product), so no float copy of the
  catalogue ever exists. A node's raw rows are first gathered once into a contiguous copy when
  they fit ``_NODE_COPY_BYTES`` (2.5 GiB; level 0 reads the table in place), so that the
  passes read memory sequentially instead of gathering scattered rows each time; the threads
  share a node's passes while its copy is that large, then take whole nodes each;
* *block* levels: once every node holds at most ``block_rows`` items, runs of whole nodes are
  gathered once as float32 (one block per thread) and all their remaining levels are split in
  memory, laid out ``[nodes, W, D]`` so that every per-node dot product is one batched BLAS
  product (larger ``block_rows`` are finished in runs of ``_CACHE_ROWS`` rows once their nodes
  are small), and nodes of at most ``_GRAM_WIDTH`` items through their Gram matrices (``O(W)``
  per item and level instead of ``O(D)``). Blocks of ``2**15`` rows (16 MiB) stay in the CPU
  cache while each numpy call is large enough to run mostly without the GIL (measured with
  ``py-spy --gil``: ~20% of a thread's time holds it, ~50% with blocks of ``2**12``), so the
  threads' blocks run in parallel.

Per level: 2 passes for the seeds, then per round one pass (``x . (c_a - c_b)``) and the
centroid update (float64 sums of the halves, updated by the rows that changed sides), a
selection per round (``np.partition``) and one sort per node at the end. Node means are summed
pairwise from the items in leaf order, ``2**_SUM_GROUP_LEVELS`` level-``L - 1`` nodes at a
time, in parallel.

Memory of :meth:`IndexTree.build_from_codes` for ``N`` items, ``D`` dimensions, depth ``L``,
beside the int8 input itself (``N D`` bytes, the caller's, kept by reference): 16 bytes per
item (permutation, squared norms) + the streamed nodes' copies (at most ``_NODE_COPY_BYTES``
in all) and ~50 bytes per item of the nodes being split (level 0: the whole catalogue), or
~4 ``block_rows * D * 4`` bytes per thread for the blocks; then the tree: ``(2**(L - c) - 1)
D * 4`` (stored means, ``c = computed_levels``) + ``2**L * 9`` (leaf ids, validity) + ``N *
36`` (item ids, leaves, valid leaves, code rows, inverse norms). At 35.4M items, D = 128, L =
26, defaults: 1.07 + 0.6 + 1.3 GB for the tree and ~3 GB of transient state (the level-1
node's copy and its temporaries) beside the 4.5 GB table (``python -m
muse_tf.index.tree_bench``).
"""

from __future__ import annotations

import itertools
import os
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from muse_tf.embeddings.arrays import code_inverse_norms, sorted_positions

__all__ = ["MAX_DENSE_NODE_BYTES", "IndexTree"]

_FORMAT_VERSION = 2
_ROW_CHUNK = 65536
#: Rows per step of a streamed pass: small enough to stay in the L2 cache and for OpenBLAS to
#: run the matrix-vector product on the calling thread (its own threads fight ours).
_PASS_ROWS = 2048
#: Bytes of the contiguous copies of streamed nodes' raw rows (all threads together): 2.5 GiB
#: holds a level-1 node of TAOBAO-MM's 35.4M int8 codes (2.1 GiB).
_NODE_COPY_BYTES = 5 << 29
#: Nodes of at most this many items are split through their Gram matrix (:func:`_split_block`).
_GRAM_WIDTH = 64
#: Rows of the small nodes of a larger block split together through their remaining levels
#: (float32 ``rows * D * 4`` bytes: 16 MiB, in the L3 cache; smaller runs make the numpy calls
#: so short that the threads wait for the GIL).
_CACHE_ROWS = 1 << 15
#: Rows whose Gram matrices one step forms (float64 temporaries of ``rows * D * 8`` bytes).
_GRAM_ROWS = 8192
#: Level-``L - 1`` nodes whose subtree sums the build forms at a time (``2**13 * D * 8`` bytes
#: each level, twice that for the items).
_SUM_GROUP_LEVELS = 13
#: Nodes whose vectors one :meth:`IndexTree.vectors_of` step computes.
_COMPUTE_NODES = 4096
#: Largest tree whose whole float32 heap array :attr:`IndexTree.node_vectors` builds: 4 GiB.
MAX_DENSE_NODE_BYTES = 1 << 32
#: Default number of items per in-memory block of the build.
DEFAULT_BLOCK_ROWS = 1 << 15
#: Default number of levels above the leaves whose node vectors are computed, not stored.
DEFAULT_COMPUTED_LEVELS = 5

#: ``on_stage(name, seconds)``: called by the build after each stage (progress, benchmarks).
StageCallback = Callable[[str, float], None]


def _children(count: np.ndarray) -> np.ndarray:
    """Items per child (heap order) of nodes holding ``count`` items: ceil left, floor right."""
    return np.stack([(count + 1) // 2, count // 2], axis=1).reshape(-1)


def _iter_level_counts(num_items: int, last_level: int) -> Iterator[np.ndarray]:
    """Items per node of levels ``0 .. last_level`` in turn (int32 ``[2**l]``, heap order)."""
    count = np.array([num_items], dtype=np.int32)
    for level in range(last_level + 1):
        yield count
        if level < last_level:
            count = _children(count)


def _leaf_valid(num_items: int, depth: int) -> np.ndarray:
    """bool ``[2**depth]``: which leaf slots hold an item."""
    *_, count = _iter_level_counts(num_items, depth)
    return count > 0


def _starts(count: np.ndarray) -> np.ndarray:
    """int64 offsets of contiguous segments of sizes ``count``."""
    ends = np.cumsum(count, dtype=np.int64)
    return ends - count


def _smallest_uint(values: np.ndarray) -> np.ndarray:
    """``values`` (non-negative) in the narrowest unsigned dtype that holds them."""
    top = int(values.max()) if values.size else 0
    for dtype in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(dtype).max:
            return values.astype(dtype)
    return values.astype(np.uint64)


def _sort_keys(values: np.ndarray, segment: np.ndarray, start: np.ndarray) -> np.ndarray:
    """``segment + v'`` where ``v'`` in ``[0, 1)`` is ``values`` rescaled descending within its
    contiguous segment: one ``argsort`` of it sorts every segment descending, 5-10x faster than
    ``np.lexsort((-values, segment))``. Values closer than ~1e-9 of their segment's range may
    come out in either order, which only matters for ties the 2-means split is indifferent to.
    ``segment`` holds the segments' level-wide indices (the key depends on them only through
    float64 rounding, but that keeps a block's order equal to a whole level's)."""
    if start.shape[0] == 1:  # one segment: the same numbers without per-row gathers
        high = values.max()
        return segment + (high - values) / ((high - values.min()) * (1.0 + 1e-6) + 1e-300)
    high = np.maximum.reduceat(values, start)
    spread = high - np.minimum.reduceat(values, start)
    local = np.repeat(np.arange(start.shape[0]), np.diff(np.append(start, values.shape[0])))
    # The factor keeps v' < 1; the tiny term avoids 0 / 0 for constant segments.
    return segment + (high[local] - values) / (spread[local] * (1.0 + 1e-6) + 1e-300)


class _ItemVectors:
    """Item vectors by reference: float32 ``table[rows[k]]``, or int8 ``table[rows[k]] *
    scale[k]`` (``rows`` None: the identity), for items ``k = 0 .. N - 1``."""

    def __init__(
        self, table: np.ndarray, rows: np.ndarray | None, scale: np.ndarray | None
    ) -> None:
        self.table = table
        self.rows = rows
        self.scale = scale

    @property
    def num_items(self) -> int:
        return int(self.table.shape[0] if self.rows is None else self.rows.shape[0])

    @property
    def dim(self) -> int:
        return int(self.table.shape[1])

    def raw(self, items: np.ndarray | slice) -> tuple[np.ndarray, np.ndarray | None]:
        """``(float32 [n, D] unscaled rows, float32 [n] scales or None)`` of ``items``."""
        if self.rows is None:
            block = self.table[items] if isinstance(items, slice) else np.take(
                self.table, items, axis=0
            )
        else:
            block = np.take(self.table, self.rows[items], axis=0)
        scale = None if self.scale is None else self.scale[items]
        return block.astype(np.float32, copy=False), scale

    def vectors(self, items: np.ndarray | slice) -> np.ndarray:
        """float32 ``[n, D]`` vectors of ``items``."""
        block, scale = self.raw(items)
        if scale is not None:
            block *= scale[:, None]
        return block

    def leaf_order(self, order: np.ndarray) -> _ItemVectors:
        """The same vectors for items ``order[0], order[1], ...``; a float32 table is copied
        in that order (the tree then owns it), an int8 one stays by reference."""
        if self.scale is None:
            return _ItemVectors(self.vectors(order), None, None)
        rows = order if self.rows is None else self.rows[order]
        return _ItemVectors(self.table, rows, self.scale[order])


class _Workers:
    """A tiny thread pool (NumPy releases the GIL in the heavy calls): ``map(fn, parts)``."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._pool = ThreadPoolExecutor(count) if count > 1 else None

    def map(self, fn: Callable, parts: Sequence) -> list:
        if self._pool is None or len(parts) < 2:
            return [fn(part) for part in parts]
        return list(self._pool.map(fn, parts))

    def ranges(self, size: int) -> list[tuple[int, int]]:
        """``size`` rows cut into one contiguous range per worker (multiples of a pass step)."""
        steps = -(-size // _PASS_ROWS)
        cuts = [min(size, (steps * w // self.count) * _PASS_ROWS) for w in range(self.count)]
        cuts.append(size)
        return [(a, b) for a, b in itertools.pairwise(cuts) if b > a]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


class _StreamedNode:
    """Passes over the rows of one large node (items ``rows``, in the current order).

    When the node's raw rows (int8 codes or float32 vectors) fit in ``copy_bytes`` they are
    first gathered once into a contiguous copy (in parallel), so that every pass reads them
    sequentially (about 2.5x faster than gathering scattered rows again in every pass; a
    float32 copy of int8 codes measured slower than casting each step in the cache);
    ``contiguous`` says the rows already are items ``rows[0] .. rows[0] + n - 1`` of a table
    without row indirection (level 0), which is read in place."""

    def __init__(
        self,
        items: _ItemVectors,
        rows: np.ndarray,
        workers: _Workers,
        copy_bytes: int = 0,
        contiguous: bool = False,
    ) -> None:
        self.size = int(rows.shape[0])
        self.dim = items.dim
        self.workers = workers
        self.local: np.ndarray | None = None  # [n, D] raw rows in node order, or None
        self.local_scale: np.ndarray | None = None
        self.items, self.rows = items, rows
        if contiguous and items.rows is None:
            begin = int(rows[0]) if self.size else 0
            self.local = items.table[begin : begin + self.size]
            if items.scale is not None:
                self.local_scale = items.scale[begin : begin + self.size]
        elif self.size * self.dim * items.table.itemsize <= copy_bytes:
            local = self.local = np.empty((self.size, self.dim), items.table.dtype)

            def copy(bounds: tuple[int, int]) -> None:
                for begin in range(bounds[0], bounds[1], _ROW_CHUNK):
                    end = min(begin + _ROW_CHUNK, bounds[1])
                    index = rows[begin:end] if items.rows is None else items.rows[
                        rows[begin:end]]
                    np.take(items.table, index, axis=0, out=local[begin:end])

            workers.map(copy, workers.ranges(self.size))
            if items.scale is not None:
                self.local_scale = items.scale[rows]

    def _raw(
        self, index: slice | np.ndarray, buffer: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """``(float32 unscaled rows, scales or None)`` of node positions ``index``; int8 rows
        are cast into ``buffer`` (float32 ``[_PASS_ROWS, D]``)."""
        if self.local is None:
            return self.items.raw(self.rows[index])
        block = self.local[index]
        scale = None if self.local_scale is None else self.local_scale[index]
        if block.dtype == np.float32:
            return block, scale
        cast = buffer[: block.shape[0]]
        np.copyto(cast, block, casting="unsafe")
        return cast, scale

    def dot(self, vector: np.ndarray, with_sum: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``(x . vector`` float64 ``[n]``, the float64 sum of the rows ``[D]`` (zeros unless
        ``with_sum``)). Per step: one gather or copy, one cast, one BLAS matrix-vector product."""
        n = self.size
        out = np.empty(n, dtype=np.float64)
        partial = np.zeros(((n + _PASS_ROWS - 1) // _PASS_ROWS if with_sum else 0,
                            self.dim), np.float64)

        def run(bounds: tuple[int, int]) -> None:
            buffer = np.empty((_PASS_ROWS, self.dim), np.float32)
            for begin in range(bounds[0], bounds[1], _PASS_ROWS):
                end = min(begin + _PASS_ROWS, bounds[1])
                block, scale = self._raw(slice(begin, end), buffer)
                products = block @ vector
                if scale is not None:
                    products *= scale
                out[begin:end] = products
                if with_sum:
                    weights = np.ones(end - begin, np.float32) if scale is None else scale
                    partial[begin // _PASS_ROWS] = weights @ block

        self.workers.map(run, self.workers.ranges(n))
        return out, partial.sum(axis=0)

    def weighted_sum(self, positions: np.ndarray, signs: np.ndarray) -> np.ndarray:
        """float64 ``[D]``: ``sum_k signs[k] * x[positions[k]]``."""
        partial = np.zeros(((positions.shape[0] + _PASS_ROWS - 1) // _PASS_ROWS,
                            self.dim), np.float64)

        def run(bounds: tuple[int, int]) -> None:
            buffer = np.empty((_PASS_ROWS, self.dim), np.float32)
            for begin in range(bounds[0], bounds[1], _PASS_ROWS):
                end = min(begin + _PASS_ROWS, bounds[1])
                block, scale = self._raw(positions[begin:end], buffer)
                weights = signs[begin:end] if scale is None else signs[begin:end] * scale
                partial[begin // _PASS_ROWS] = weights @ block

        self.workers.map(run, self.workers.ranges(positions.shape[0]))
        return partial.sum(axis=0)

    def vector(self, position: int) -> np.ndarray:
        block, scale = self._raw(slice(position, position + 1),
                                 np.empty((1, self.dim), np.float32))
        return block[0] * scale[0] if scale is not None else block[0].copy()


def _balanced_left(closeness: np.ndarray) -> tuple[np.ndarray, bool]:
    """Which rows of one node go to its left child, and whether the sides are flipped.

    The ``ceil(n / 2)`` rows of largest ``closeness`` (closest to ``c_a``) go left, unless
    ``n`` is odd and the middle row is closer to ``c_b`` (``closeness < 0``): then the
    ``ceil(n / 2)`` smallest go left (``c_b``'s side gets the bigger half). A selection, not a
    sort (only the final order of a level needs the sort): :func:`_halves` of one node."""
    n = closeness.shape[0]
    in_left, flip = _halves(-closeness[None], np.array([n]), np.array([(n + 1) // 2]))
    return in_left[0], bool(flip[0])


def _split_streamed(
    node: _StreamedNode, sq_norms: np.ndarray, first: int, key: int, num_iters: int
) -> np.ndarray:
    """Balanced 2-means of one large node by passes over its rows (see :meth:`IndexTree.
    build`); returns the permutation of its rows: left child first, each child in descending
    ``closeness`` (the order a block-level split produces).

    Centroids are kept as float64 sums of the left half, updated by the rows that changed
    sides (the right half's sum is the node's sum minus it), so an iteration reads every row
    once (the dot product) plus the rows that moved."""
    n = node.size
    if n == 1:  # nothing to split (a level of 1- and 2-item nodes, streamed)
        return np.zeros(1, dtype=np.int64)
    left = (n + 1) // 2
    anchor = node.vector(first)
    dots, total = node.dot(anchor, with_sum=True)
    seed_a = int(np.argmax(sq_norms - 2.0 * dots))
    centroid_a = node.vector(seed_a)
    dots, _ = node.dot(centroid_a)
    centroid_b = node.vector(int(np.argmax(sq_norms - 2.0 * dots)))
    member = np.zeros(n, dtype=bool)  # the rows summed in left_sum
    left_sum = np.zeros(node.dim, dtype=np.float64)
    previous = None
    rounds = 1 if n <= 2 else num_iters  # as in blocks: the seeds settle a pair
    for iteration in range(rounds):
        direction = centroid_a - centroid_b
        offset = 0.5 * np.dot(direction.astype(np.float64), centroid_a + centroid_b)
        closeness, _ = node.dot(direction)
        closeness -= offset
        in_left, _ = _balanced_left(closeness)
        if (previous is not None and np.array_equal(in_left, previous)) or (
            iteration == rounds - 1
        ):
            break
        moved = np.flatnonzero(in_left != member)
        signs = np.where(in_left[moved], 1.0, -1.0).astype(np.float32)
        left_sum += node.weighted_sum(moved, signs)
        member = previous = in_left
        centroid_a = (left_sum / left).astype(np.float32)
        centroid_b = ((total - left_sum) / (n - left)).astype(np.float32)
    keys = _sort_keys(closeness, np.full(1, key), np.zeros(1, np.int64))
    perm = np.argsort(keys)
    return perm[::-1] if n % 2 == 1 and closeness[perm[n // 2]] < 0 else perm


def _matvec(x: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """float32 ``[S, W]``: ``x[s] @ vectors[s]`` for ``x`` ``[S, W, D]``, ``vectors`` ``[S, D]``:
    BLAS products of at most ``_PASS_ROWS`` rows, which OpenBLAS runs on the calling thread."""
    if x.shape[1] <= _PASS_ROWS:
        return np.matmul(x, vectors[:, :, None])[..., 0]
    out = np.empty(x.shape[:2], np.float32)
    column = vectors[:, :, None]
    for begin in range(0, x.shape[1], _PASS_ROWS):
        end = begin + _PASS_ROWS
        out[:, begin:end] = np.matmul(x[:, begin:end], column)[..., 0]
    return out


def _matvec_left(weights: np.ndarray, x: np.ndarray) -> np.ndarray:
    """float64 ``[S, D]``: ``weights[s] @ x[s]`` for ``weights`` float32 ``[S, W]``, by float32
    products over ``_PASS_ROWS`` slots at a time, accumulated in float64."""
    out = np.zeros((x.shape[0], x.shape[2]), np.float64)
    for begin in range(0, x.shape[1], _PASS_ROWS):
        end = begin + _PASS_ROWS
        out += np.matmul(weights[:, None, begin:end], x[:, begin:end])[:, 0]
    return out


def _moved_sums(x: np.ndarray, changed: np.ndarray, in_left: np.ndarray) -> np.ndarray:
    """float64 ``[S, D]``: per node, the sum of its ``changed`` rows that are ``in_left`` minus
    that of the others (every node has a changed row). Nodes that fit the CPU cache: one
    product with weights ``+-1 / 0`` (as fast as a gather there); larger ones: a gather of the
    changed rows only (a few percent of them after the first round)."""
    width = x.shape[1]
    if width <= _PASS_ROWS:
        signs = np.where(changed, np.where(in_left, np.float32(1), np.float32(-1)),
                         np.float32(0))
        return _matvec_left(signs, x)
    moved = np.flatnonzero(changed)  # node-major: each node's rows are one run
    rows = x.reshape(-1, x.shape[2])[moved]
    signs = np.where(in_left.reshape(-1)[moved], np.float32(1), np.float32(-1))
    bounds = np.searchsorted(moved, np.arange(x.shape[0] + 1) * width).tolist()
    out = np.zeros((x.shape[0], x.shape[2]), np.float64)
    for node, (first, last) in enumerate(itertools.pairwise(bounds)):  # few nodes this large
        for begin in range(first, last, _PASS_ROWS):
            end = min(begin + _PASS_ROWS, last)
            out[node] += signs[begin:end] @ rows[begin:end]
    return out


def _half_sums(x: np.ndarray, in_left: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """float64 ``[S, 2, D]``: each node's sums over its left and its right rows, by float32
    products over ``_PASS_ROWS // 2`` slots at a time, accumulated in float64."""
    masks = np.stack([in_left, valid & ~in_left], axis=1).astype(np.float32)  # [S, 2, W]
    sums = np.zeros((x.shape[0], 2, x.shape[2]), np.float64)
    # Half as many slots as a pass: a [2, 2048] x [2048, D] product crosses OpenBLAS's
    # threading threshold, and its threads then fight the build's (measured 20-100x slower
    # at 35.4M items, where most block-level time went there).
    step = _PASS_ROWS // 2
    for begin in range(0, x.shape[1], step):
        end = begin + step
        sums += np.matmul(masks[:, :, begin:end], x[:, begin:end])
    return sums


def _halves(
    key: np.ndarray, size: np.ndarray, left: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The balanced assignment of :meth:`IndexTree.build` for every node (row) at once, by
    the ``left``-th smallest key of each row (``np.partition``; ``np.sort`` for short rows)
    and one comparison; rows with equal keys at that threshold choose by rank instead.

    Args:
      key: float64 ``[S, W]``: ``-closeness``, ``+inf`` at padding (ascending key = descending
        closeness); size, left: int ``[S]`` items per node and ``ceil(size / 2)``.

    Returns:
      ``(in_left, flip)``: bool ``[S, W]`` the slots of the left child (the ``left`` smallest
      keys; with ``flip`` the ``left`` largest finite ones), bool ``[S]`` whether ``c_b``'s
      side goes left (odd ``size``, middle item closer to ``c_b``).
    """
    nodes = np.arange(key.shape[0])
    if key.shape[1] <= 64:  # short rows: a sort costs less than a selection
        ordered = np.sort(key, axis=1)
    else:  # sizes at one level differ by at most one: at most two kth positions
        ordered = np.partition(key, sorted({int(left.min()) - 1, int(left.max()) - 1}), axis=1)
    threshold = ordered[nodes, left - 1]  # the left-th smallest key
    flip = (size % 2 == 1) & (threshold > 0)  # the middle item is closer to c_b
    in_left = key <= threshold[:, None]
    if flip.any():
        in_left[flip] = (key[flip] >= threshold[flip, None]) & (key[flip] < np.inf)
    tied = np.flatnonzero(in_left.view(np.uint8).sum(axis=1, dtype=np.int32) != left)
    if tied.shape[0]:  # equal keys at the threshold: choose by rank, as a sort would
        part = np.argsort(key[tied], axis=1, kind="stable")
        position = np.arange(key.shape[1])
        chosen = np.where(
            flip[tied, None],
            (position >= (left[tied] - 1)[:, None]) & (position < size[tied, None]),
            position < left[tied, None],
        )
        rows = np.empty_like(chosen)
        np.put_along_axis(rows, part, chosen, axis=1)
        in_left[tied] = rows
    return in_left, flip


def _child_layout(
    key: np.ndarray, flip: np.ndarray, size: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The children's layout after a level's split.

    Node ``s``'s rows sorted by ``key`` (descending closeness; reversed within its items when
    ``flip``): child ``2s`` takes the first ``ceil(size / 2)``, ``2s + 1`` the rest, each in
    that order, padding last. Returns ``(source, valid, child_size)``: int64 ``[2S, W']`` the
    parent's flat slot (``s * W + j``) of every child slot (some valid slot at padding), bool
    ``[2S, W']``, int64 ``[2S]``."""
    num_segments, width = key.shape
    perm = np.argsort(key, axis=1)
    if flip.any():
        slot = np.arange(width)
        reverse = np.where(slot < size[flip, None], size[flip, None] - 1 - slot, slot)
        perm[flip] = np.take_along_axis(perm[flip], reverse, axis=1)
    left = (size + 1) // 2
    child_size = np.stack([left, size - left], axis=1).reshape(-1)
    child_width = int(child_size.max())
    child_slot = np.arange(child_width)
    position = np.stack(
        [np.broadcast_to(child_slot, (num_segments, child_width)), left[:, None] + child_slot],
        axis=1,
    ).reshape(num_segments, 2 * child_width)
    source = np.take_along_axis(perm, np.minimum(position, width - 1), axis=1)
    source += np.arange(num_segments)[:, None] * width
    child_valid = child_slot < child_size[:, None]
    return source.reshape(2 * num_segments, child_width), child_valid, child_size


def _split_block(
    items: _ItemVectors,
    positions: np.ndarray,
    sq_norms: np.ndarray,
    count: np.ndarray,
    level: int,
    first_segment: int,
    firsts: Sequence[np.ndarray],
    depth: int,
    num_iters: int,
    gram_width: int,
    cache_rows: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Balanced 2-means of whole nodes held in memory, all remaining levels.

    The rows are laid out per node, ``[S, W, D]`` with ``W`` the largest node's size (the
    nodes of one level hold ``floor`` or ``ceil(N / 2**l)`` items, so at most one padding row
    each, a copy of a valid row that is never chosen: key ``+inf``, weight 0, squared norm
    ``-inf``): every dot product with a per-node vector is then one batched BLAS product
    that reads each row once. A round costs one such product (``x . (c_a - c_b)``) and one
    selection per node; the halves' sums are float64, summed once, then updated by the rows
    that changed sides. Each level ends with one sort per node and a gather of the rows into
    the children's layout. Once nodes hold at most ``cache_rows / 2`` items, runs of whole
    nodes of about ``cache_rows`` rows (a slice of the layout, no copy) are split through all
    their remaining levels in turn, so that their passes read the CPU cache, not memory.

    Once nodes hold at most ``gram_width`` items, each node's float64 Gram matrix ``G = X
    X^T`` (``[S, W, W]``, formed once) replaces the rows: a centroid is a weight vector ``w``
    over the node's items (``c = X^T w``), so ``x_i . (c_a - c_b) = (G (w_a - w_b))_i`` and
    ``||c_a||^2 - ||c_b||^2 = (w_a + w_b)^T G (w_a - w_b)``, and a child's Gram matrix is a
    sub-matrix of its parent's: the deepest levels cost ``O(W)`` per item instead of ``O(D)``.

    Args:
      items: the item vectors; positions: int64 ``[n]`` the items of consecutive
        level-``level`` nodes, in the current order; ``count`` int ``[S]`` items per node;
        ``first_segment`` the level-wide index of the first node.
      sq_norms: float64 ``[n]`` squared norms of those items' vectors.
      firsts: per level, the random first-seed offset of every node of that level.
      gram_width: nodes of at most this many items are split through their Gram matrix.
      cache_rows: rows split level by level together once nodes are small (see above).

    Returns:
      ``(permutation of the n rows into leaf order, float64 [depth - level] seconds spent
      per level)``.
    """
    size = count.astype(np.int64)
    width = int(size.max())
    slot = np.arange(width)
    valid = slot < size[:, None]  # [S, W]
    rows = np.where(valid, _starts(size)[:, None] + slot, -1)  # block rows, -1 at padding
    gather = np.where(valid, rows, 0).reshape(-1)
    # Padding rows repeat a valid row: they are never chosen (key +inf, weight 0, sq -inf).
    xp = items.vectors(positions[gather]).reshape(*valid.shape, items.dim)
    sq = np.where(valid, sq_norms[gather].reshape(valid.shape), -np.inf)
    seconds = np.zeros(depth - level)
    order = _split_layout(xp, sq, valid, rows, level, first_segment, firsts, depth, num_iters,
                          gram_width, cache_rows, seconds)
    return order, seconds


def _split_layout(
    xp: np.ndarray,
    sq: np.ndarray,
    valid: np.ndarray,
    rows: np.ndarray,
    level: int,
    first_segment: int,
    firsts: Sequence[np.ndarray],
    depth: int,
    num_iters: int,
    gram_width: int,
    cache_rows: int,
    seconds: np.ndarray,
) -> np.ndarray:
    """:func:`_split_block` on nodes already laid out: ``xp`` float32 ``[S, W, D]`` (zero
    padding rows), ``sq`` float64 ``[S, W]`` squared norms (``-inf`` at padding), ``valid``
    bool ``[S, W]``, ``rows`` int ``[S, W]`` block rows (``-1`` at padding); adds each
    level's seconds to ``seconds[level - first level]``; returns the block rows in leaf
    order."""
    offset = seconds.shape[0] - (depth - level)
    size = valid.sum(axis=1)
    gram: np.ndarray | None = None
    for lvl in range(level, depth):
        num_segments, width = valid.shape
        base = first_segment << (lvl - level)
        if gram is None and num_segments > 1 and 2 * width <= cache_rows < valid.size:
            per = cache_rows // width
            return np.concatenate([
                _split_layout(xp[begin : begin + per], sq[begin : begin + per],
                              valid[begin : begin + per], rows[begin : begin + per], lvl,
                              base + begin, firsts, depth, num_iters, gram_width, cache_rows,
                              seconds)
                for begin in range(0, num_segments, per)
            ])
        began = time.perf_counter()
        segments = np.arange(num_segments)
        first = firsts[lvl][base : base + num_segments].astype(np.int64)
        if gram is None and width <= gram_width:
            gram = _gram(xp)
        if gram is None:
            key, flip = _rounds_rows(xp, sq, valid, size, segments, first, num_iters)
        else:
            key, flip = _rounds_gram(gram, sq, valid, size, segments, first, num_iters)
        source, valid, size = _child_layout(key, flip, size)
        rows = rows.reshape(-1)[source]
        if lvl < depth - 1:
            sq = np.where(valid, sq.reshape(-1)[source], -np.inf)
            if gram is None:
                xp = np.take(xp.reshape(-1, xp.shape[2]), source.reshape(-1), axis=0).reshape(
                    *valid.shape, xp.shape[2])
            else:
                # G_child[c, i, j] = G[parent, source_i, source_j] (flat: parent slots).
                flat = source[:, :, None] * width + (source[:, None, :] % width)
                gram = np.take(gram.reshape(-1), flat)
        seconds[offset + lvl - level] += time.perf_counter() - began
    return rows[valid]


def _gram(xp: np.ndarray) -> np.ndarray:
    """float64 ``[S, W, W]``: every node's Gram matrix, ``_GRAM_ROWS`` rows at a time."""
    num_segments, width, _ = xp.shape
    gram = np.empty((num_segments, width, width), np.float64)
    step = max(1, _GRAM_ROWS // width)
    for begin in range(0, num_segments, step):
        part = xp[begin : begin + step].astype(np.float64)
        np.matmul(part, part.transpose(0, 2, 1), out=gram[begin : begin + step])
    return gram


def _padding_keys(key: np.ndarray, size: np.ndarray) -> np.ndarray:
    """``key`` with ``+inf`` at each node's padding slot (at most one, at ``size``)."""
    short = np.flatnonzero(size < key.shape[1])
    key[short, size[short]] = np.inf
    return key


def _rounds_rows(
    xp: np.ndarray,
    sq: np.ndarray,
    valid: np.ndarray,
    size: np.ndarray,
    segments: np.ndarray,
    first: np.ndarray,
    num_iters: int,
) -> tuple[np.ndarray, np.ndarray]:
    """One level's 2-means rounds on rows ``xp`` ``[S, W, D]``: ``(key, flip)`` of each
    node's last round (:func:`_halves`)."""
    # argmax_x ||x - p||^2 within a node = argmax_x ||x||^2 - 2 x . p (padding: -inf)
    far = sq - 2.0 * _matvec(xp, xp[segments, first])
    centroid_a = xp[segments, np.argmax(far, axis=1)]  # [S, D] (copies)
    far = sq - 2.0 * _matvec(xp, centroid_a)
    centroid_b = xp[segments, np.argmax(far, axis=1)]
    del far
    num_segments, width = valid.shape
    final_key = np.empty((num_segments, width), np.float64)
    final_flip = np.zeros(num_segments, dtype=bool)
    # A node whose assignment repeats has converged (its next rounds would repeat it): later
    # rounds read only the rows of the nodes still moving, and every per-node array below is
    # kept for those nodes only.
    active, x_active, valid_a, size_a = segments, xp, valid, size
    left_a = (size + 1) // 2
    previous = sums = None
    # Nodes of <= 2 items are settled by the first round (centroids = the two seeds).
    rounds = 1 if width <= 2 else num_iters
    for iteration in range(rounds):
        # key = -closeness; closeness > 0 <=> ||x - c_a|| < ||x - c_b||
        # (||c_a||^2 - ||c_b||^2 as (c_a - c_b) . (c_a + c_b): one product, no cancellation)
        direction = centroid_a - centroid_b
        offset = 0.5 * np.einsum("sd,sd->s", direction, centroid_a + centroid_b,
                                 dtype=np.float64)
        key = _padding_keys(offset[:, None] - _matvec(x_active, direction), size_a)
        in_left, flip = _halves(key, size_a, left_a)
        if iteration == rounds - 1:
            final_key[active], final_flip[active] = key, flip
            break
        if previous is None:
            sums = _half_sums(x_active, in_left, valid_a)
        else:
            changed = in_left != previous
            keep = _retire_settled(changed.any(axis=1), key, flip, active, final_key, final_flip)
            if keep is not None:
                if keep.shape[0] == 0:
                    break
                active, x_active = active[keep], np.take(x_active, keep, axis=0)
                valid_a, size_a, left_a = valid_a[keep], size_a[keep], left_a[keep]
                in_left, changed, sums = in_left[keep], changed[keep], sums[keep]
            # Only the rows that changed sides: +x into the left sum, -x out of the right.
            delta = _moved_sums(x_active, changed, in_left)
            sums[:, 0] += delta
            sums[:, 1] -= delta
        previous = in_left
        right_a = size_a - left_a
        centroid_a = (sums[:, 0] / left_a[:, None]).astype(np.float32)
        # A one-item node has no right half: c_b = c_a keeps it where it is.
        centroid_b = np.where(
            (right_a > 0)[:, None], sums[:, 1] / np.maximum(right_a, 1)[:, None], centroid_a
        ).astype(np.float32)
    return final_key, final_flip


def _retire_settled(
    moving: np.ndarray,
    key: np.ndarray,
    flip: np.ndarray,
    active: np.ndarray,
    final_key: np.ndarray,
    final_flip: np.ndarray,
) -> np.ndarray | None:
    """Writes the final keys and flips of the active nodes whose assignment repeated
    (``~moving``, bool ``[S_active]``) into ``final_key`` / ``final_flip`` (indexed by node).

    Returns the positions (in the active arrays) of the nodes still moving, or ``None`` when
    all of them still move (nothing to drop)."""
    if moving.all():
        return None
    done = ~moving
    final_key[active[done]], final_flip[active[done]] = key[done], flip[done]
    return np.flatnonzero(moving)


def _rounds_gram(
    gram: np.ndarray,
    sq: np.ndarray,
    valid: np.ndarray,
    size: np.ndarray,
    segments: np.ndarray,
    first: np.ndarray,
    num_iters: int,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_rounds_rows` on the nodes' Gram matrices ``[S, W, W]`` (centroids as weights
    over the node's items, see :func:`_split_block`)."""
    seed_a = np.argmax(sq - 2.0 * gram[segments, first], axis=1)
    seed_b = np.argmax(sq - 2.0 * gram[segments, seed_a], axis=1)
    num_segments, width = valid.shape
    # weights[:, 0] = w_a - w_b, weights[:, 1] = w_a + w_b
    weights = np.zeros((num_segments, 2, width), np.float64)
    weights[segments, :, seed_a] = 1.0
    weights[segments, 0, seed_b] -= 1.0
    weights[segments, 1, seed_b] += 1.0
    final_key = np.empty((num_segments, width), np.float64)
    final_flip = np.zeros(num_segments, dtype=bool)
    active, gram_a, valid_a, size_a = segments, gram, valid, size
    left_a = (size + 1) // 2
    previous = None
    rounds = 1 if width <= 2 else num_iters
    for iteration in range(rounds):
        direction = np.matmul(gram_a, weights[:, 0, :, None])[..., 0]  # G (w_a - w_b)
        offset = 0.5 * np.einsum("sw,sw->s", weights[:, 1], direction)
        key = _padding_keys(offset[:, None] - direction, size_a)
        in_left, flip = _halves(key, size_a, left_a)
        if iteration == rounds - 1:
            final_key[active], final_flip[active] = key, flip
            break
        if previous is not None:
            moving = (in_left != previous).any(axis=1)
            keep = _retire_settled(moving, key, flip, active, final_key, final_flip)
            if keep is not None:
                if keep.shape[0] == 0:
                    break
                active, gram_a = active[keep], np.take(gram_a, keep, axis=0)
                valid_a, size_a, left_a = valid_a[keep], size_a[keep], left_a[keep]
                in_left = in_left[keep]
        previous = in_left
        right_a = size_a - left_a
        weight_a = in_left / left_a[:, None]
        weight_b = np.where(
            (right_a > 0)[:, None], (valid_a & ~in_left) / np.maximum(right_a, 1)[:, None],
            weight_a,
        )
        weights = np.stack([weight_a - weight_b, weight_a + weight_b], axis=1)
    return final_key, final_flip


def _split_streamed_level(
    items: _ItemVectors,
    order: np.ndarray,
    count: np.ndarray,
    level: int,
    firsts: np.ndarray,
    sq_norms: np.ndarray,
    num_iters: int,
    pool: _Workers,
) -> None:
    """Splits every node of one streamed level (items per node ``count``), permuting its run
    of ``order`` in place: whole nodes per thread once every thread's copy fits in
    ``_NODE_COPY_BYTES``, before that one node at a time with its passes cut between the
    threads."""
    copy_bytes = _NODE_COPY_BYTES
    node_parallel = pool.count > 1 and count.shape[0] > 1 and (
        pool.count * int(count.max()) * items.dim * items.table.itemsize <= copy_bytes)
    inner = _Workers(1) if node_parallel else pool
    node_copy = copy_bytes // pool.count if node_parallel else copy_bytes
    starts = _starts(count)

    def split_node(segment: int) -> None:
        start, size = int(starts[segment]), int(count[segment])
        rows = order[start : start + size]
        node = _StreamedNode(items, rows, inner, node_copy, contiguous=level == 0)
        perm = _split_streamed(node, sq_norms[rows], int(firsts[segment]), segment, num_iters)
        order[start : start + size] = rows[perm]

    segments = list(range(count.shape[0]))
    if node_parallel:
        pool.map(split_node, segments)
    else:
        for segment in segments:
            split_node(segment)


def _partition(
    items: _ItemVectors,
    depth: int,
    num_iters: int,
    seed: int,
    block_rows: int,
    pool: _Workers,
    report: Callable[..., None],
) -> np.ndarray:
    """The leaf order of the items: int64 ``[N]``, the ``k``-th valid leaf slot's item
    (:meth:`IndexTree.build`'s 2-means, streamed levels then blocks)."""
    num_items = items.num_items
    began = time.perf_counter()
    # The random first seeds of every node, drawn level by level as version 1 did.
    rng = np.random.default_rng(seed)
    firsts = [
        _smallest_uint(rng.integers(0, count))
        for count in _iter_level_counts(num_items, depth - 1)
    ] if depth else []
    sq_norms = np.empty(num_items, dtype=np.float64)

    def norms(bounds: tuple[int, int]) -> None:
        for begin in range(bounds[0], bounds[1], _ROW_CHUNK):
            end = min(begin + _ROW_CHUNK, bounds[1])
            vectors = items.vectors(slice(begin, end))
            sq_norms[begin:end] = np.einsum("nd,nd->n", vectors, vectors, dtype=np.float64)

    pool.map(norms, pool.ranges(num_items))
    report("seeds and squared norms", began)

    order = np.arange(num_items, dtype=np.int64)
    level = 0
    count = np.array([num_items], dtype=np.int64)
    while level < depth and int(count.max()) > block_rows:
        began = time.perf_counter()
        _split_streamed_level(items, order, count, level, firsts[level], sq_norms, num_iters,
                              pool)
        count = _children(count)
        report(f"level {level} (streamed, {count.shape[0] // 2} nodes)", began)
        level += 1
    if level == depth:
        return order

    began = time.perf_counter()
    starts = _starts(count)
    per_block = max(1, block_rows // int(count.max()))
    blocks = [(s, min(s + per_block, count.shape[0])) for s in range(0, count.shape[0], per_block)]

    def split(block: tuple[int, int]) -> list[float]:
        low, high = block
        begin = int(starts[low])
        end = int(starts[high - 1] + count[high - 1])
        rows = order[begin:end]
        perm, seconds = _split_block(
            items, rows, sq_norms[rows], count[low:high], level, low, firsts, depth,
            num_iters, _GRAM_WIDTH, _CACHE_ROWS,
        )
        order[begin:end] = rows[perm]
        return seconds

    seconds = np.sum(pool.map(split, blocks), axis=0)
    for lvl, spent in enumerate(seconds.tolist(), start=level):
        report(f"level {lvl} (blocks, thread-seconds)", None, spent)
    report(f"levels {level}..{depth - 1} (in {len(blocks)} blocks)", began)
    return order


def _sum_pairs(
    sums: np.ndarray,
    counts: np.ndarray,
    steps: int,
    each: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``sums`` ``[2**steps * m, ...]`` and ``counts`` summed over sibling pairs ``steps``
    times (one tree level each), calling ``each(step, sums, counts)`` after every step."""
    for step in range(1, steps + 1):
        sums = sums.reshape(-1, 2, *sums.shape[1:]).sum(axis=1)
        counts = counts.reshape(-1, 2).sum(axis=1)
        if each is not None:
            each(step, sums, counts)
    return sums, counts


class IndexTree:
    """A balanced binary index tree over items (see the module docstring for the layout).

    Build with :meth:`build` (float vectors) or :meth:`build_from_codes` (int8 codes, the
    TAOBAO-MM scale path); persist with :meth:`save` / :meth:`load`.

    Attributes:
      depth: ``L``, the number of edges from the root to a leaf; levels are ``0 .. L``.
      stored_depth: ``K``: the means of levels ``0 .. K`` are stored, deeper node vectors are
        computed from the items on demand (``-1``: none stored).
      leaf_item_ids: int64 ``[2**L]``; item id of each level-``L`` slot (``0`` at padding
        slots; use :attr:`leaf_valid`).
      leaf_valid: bool ``[2**L]``; whether each level-``L`` slot holds an item.
      item_ids: int64 ``[N]``; the indexed item ids, ascending.
      item_leaf: int64 ``[N]``; the leaf node id of ``item_ids[k]``.
    """

    def __init__(
        self, node_vectors: np.ndarray, leaf_item_ids: np.ndarray, leaf_valid: np.ndarray
    ) -> None:
        """A tree from the whole float32 heap array of node vectors (``[2**(L + 1) - 1,
        D]``, zeros at padding slots) and its leaves; see :meth:`from_parts` for the compact
        form."""
        self._set_layout(leaf_item_ids, leaf_valid)
        node_vectors = np.asarray(node_vectors)
        if node_vectors.ndim != 2 or node_vectors.shape[0] != self.num_nodes:
            raise ValueError(
                f"node_vectors must be [{self.num_nodes}, D] for depth {self.depth}; got shape "
                f"{node_vectors.shape}."
            )
        node_vectors = node_vectors.astype(np.float32, copy=False)
        first_leaf = (1 << self.depth) - 1
        self._set_storage(
            node_vectors[:first_leaf], _ItemVectors(node_vectors, self._valid_leaf_nodes, None)
        )
        self._dense = node_vectors

    @classmethod
    def from_parts(
        cls,
        leaf_item_ids: np.ndarray,
        leaf_valid: np.ndarray,
        node_means: np.ndarray,
        item_vectors: np.ndarray,
        item_rows: np.ndarray | None = None,
        item_scale: np.ndarray | None = None,
    ) -> IndexTree:
        """A tree from its compact form (what :meth:`save` writes).

        Args:
          leaf_item_ids: int ``[2**L]`` item id per leaf slot; leaf_valid: bool ``[2**L]``.
          node_means: float32 ``[2**(K + 1) - 1, D]``, the means of levels ``0 .. K``.
          item_vectors: ``[M, D]``: float32 item vectors, or int8 codes (then ``item_scale``).
          item_rows: int ``[N]``: row of ``item_vectors`` of the ``k``-th item leaf (slot
            order); ``None`` when ``item_vectors`` holds exactly those rows in that order.
          item_scale: float32 ``[N]``: factor of the ``k``-th item leaf's int8 codes (its
            inverse norm); required for int8, forbidden for float.
        """
        tree = cls.__new__(cls)
        tree._set_layout(leaf_item_ids, leaf_valid)
        node_means = np.asarray(node_means)
        table = np.asarray(item_vectors)
        num_items = tree.num_items
        if table.ndim != 2 or node_means.ndim != 2 or node_means.shape[1] != table.shape[1]:
            raise ValueError(
                f"node_means and item_vectors must be [rows, D] with one D; got shapes "
                f"{node_means.shape} and {table.shape}."
            )
        stored = node_means.shape[0]
        if stored & (stored + 1) or stored > (1 << tree.depth) - 1:
            raise ValueError(
                f"node_means must hold whole levels 0 .. K < {tree.depth} (2**(K + 1) - 1 rows); "
                f"got {stored} rows."
            )
        if item_rows is None:
            if table.shape[0] != num_items:
                raise ValueError(
                    f"item_vectors must hold the {num_items} items' rows in leaf order when "
                    f"item_rows is None; got {table.shape[0]} rows."
                )
        else:
            item_rows = np.asarray(item_rows)
            if item_rows.shape != (num_items,) or not np.issubdtype(item_rows.dtype, np.integer):
                raise ValueError(f"item_rows must be integer [{num_items}]; got shape "
                                 f"{item_rows.shape}, dtype {item_rows.dtype}.")
            if num_items and (item_rows.min() < 0 or item_rows.max() >= table.shape[0]):
                raise ValueError(f"item_rows must be rows of item_vectors in [0, "
                                 f"{table.shape[0]}).")
        if table.dtype == np.int8:
            scale = np.asarray(item_scale) if item_scale is not None else None
            if scale is None or scale.shape != (num_items,):
                raise ValueError(f"int8 item_vectors need item_scale float32 [{num_items}].")
            scale = scale.astype(np.float32, copy=False)
        elif table.dtype == np.float32:
            if item_scale is not None:
                raise ValueError("item_scale is only for int8 item_vectors.")
            scale = None
        else:
            raise ValueError(f"item_vectors must be float32 or int8; got {table.dtype}.")
        tree._set_storage(
            node_means.astype(np.float32, copy=False), _ItemVectors(table, item_rows, scale)
        )
        return tree

    def _set_layout(self, leaf_item_ids: np.ndarray, leaf_valid: np.ndarray) -> None:
        leaf_item_ids = np.asarray(leaf_item_ids)
        leaf_valid = np.asarray(leaf_valid)
        if leaf_valid.ndim != 1 or leaf_valid.dtype != np.bool_:
            raise ValueError(
                f"leaf_valid must be a 1-D bool array; got shape {leaf_valid.shape}, "
                f"dtype {leaf_valid.dtype}."
            )
        num_leaves = leaf_valid.shape[0]
        depth = num_leaves.bit_length() - 1
        if num_leaves == 0 or num_leaves != 1 << depth:
            raise ValueError(
                f"the leaf level must hold a power of two of slots; got {num_leaves}."
            )
        if leaf_item_ids.shape != (num_leaves,) or not np.issubdtype(
            leaf_item_ids.dtype, np.integer
        ):
            raise ValueError(
                f"leaf_item_ids must be integer [{num_leaves}]; got shape "
                f"{leaf_item_ids.shape}, dtype {leaf_item_ids.dtype}."
            )
        if not leaf_valid.any():
            raise ValueError("the tree holds no item: leaf_valid is all False.")
        # Padding slots may only be right children of single-item parents (module docstring).
        if depth > 0 and not np.all(leaf_valid[0::2]):
            bad = int(np.flatnonzero(~leaf_valid[0::2])[0]) * 2 + num_leaves - 1
            raise ValueError(
                f"leaf node {bad} is padding but is a left child; every level-{depth - 1} "
                "node must hold an item in its left child."
            )
        self.depth = depth
        self.leaf_item_ids = leaf_item_ids.astype(np.int64, copy=False)
        self.leaf_valid = leaf_valid
        valid_slots = np.flatnonzero(leaf_valid)
        ids = self.leaf_item_ids[valid_slots]
        order = np.argsort(ids, kind="stable")
        self.item_ids = ids[order]
        self.item_leaf = (valid_slots[order] + num_leaves - 1).astype(np.int64)
        duplicate = self.item_ids[1:] == self.item_ids[:-1]
        if np.any(duplicate):
            raise ValueError(
                f"item ids must be unique; {self.item_ids[1:][duplicate][:5].tolist()} "
                "occur more than once."
            )
        self._valid_leaf_nodes = (valid_slots + num_leaves - 1).astype(np.int64)

    def _set_storage(self, node_means: np.ndarray, items: _ItemVectors) -> None:
        self._node_means = node_means
        self._items = items
        self._dense: np.ndarray | None = None
        self.stored_depth = (node_means.shape[0] + 1).bit_length() - 2

    # ------------------------------------------------------------------------------ build

    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,
        item_ids: np.ndarray,
        *,
        num_iters: int = 5,
        seed: int = 0,
        block_rows: int = DEFAULT_BLOCK_ROWS,
        computed_levels: int = DEFAULT_COMPUTED_LEVELS,
        workers: int | None = None,
        on_stage: StageCallback | None = None,
    ) -> IndexTree:
        """Builds the tree by recursive balanced 2-means, one level at a time.

        At every node: two seeds by the farthest-point heuristic (the item ``r`` at a random
        position of the node, the item ``a`` farthest from ``r``, the item ``b`` farthest from
        ``a``), then up to ``num_iters`` rounds of balanced assignment: items sorted by
        ``||x - c_b||^2 - ||x - c_a||^2`` (linear in ``x``: ``x . (c_a - c_b) - const``), the
        ``ceil(n / 2)`` closest to ``c_a`` to the left child and the rest to the right -- or,
        for odd ``n`` when the middle item is closer to ``c_b``, the ``ceil(n / 2)`` closest to
        ``c_b`` to the left (the cheaper of the two size-balanced assignments); centroids
        recomputed as the halves' means. A node stops once its assignment no longer changes
        (a fixed point: its next rounds would repeat it); a node of two items after its
        first round (its seeds are then its halves, so the second round repeats it). Each
        child keeps its items in descending ``x . (c_a - c_b)`` (the random positions of the
        next level read it).

        The rule, the random draws (one ``rng.integers`` per level) and the node vectors'
        arithmetic are version 1's, so a seed gives version 1's tree and its float32 node
        vectors bit for bit, except where float32 rounding decides a split: the dot products
        (float32 BLAS; float64 Gram matrices for nodes of at most 64 items) and centroid sums
        (float64, updated by the rows that changed sides) are computed in another order, which
        matters only for near-ties -- in the order of near-equal items too, which can change
        the next level's random first seed (``tests/index/test_tree.py`` checks trees against
        a float64 statement of the rule). Exact ties (duplicate vectors) are split by rank.

        Memory: besides the input, the build state and the tree of the module docstring; the
        float32 input is copied once, in leaf order (the tree's own item vectors). For int8
        codes use :meth:`build_from_codes`, which never forms a float copy.

        Args:
          embeddings: ``[N, D]`` real item embeddings (cast to float32), ``N >= 1``.
          item_ids: ``[N]`` unique integer item ids, aligned with ``embeddings``.
          num_iters: balanced 2-means rounds per level (>= 1).
          seed: seed of the random first seeds.
          block_rows: nodes of at most this many items are split in memory, in blocks of
            about this many float32 rows; larger ones by streamed passes (>= 1).
          computed_levels: levels directly above the leaves whose node vectors are not stored
            but computed from their items on demand (>= 0).
          workers: threads for the passes and blocks (default: ``min(2, CPUs)``).
          on_stage: called with ``(stage name, seconds)`` after each build stage.

        Returns:
          The tree; ``depth == ceil(log2 N)``.
        """
        x = np.asarray(embeddings)
        if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"embeddings must be a non-empty [N, D] array; got shape {x.shape}.")
        if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
            raise ValueError(f"embeddings must be real numbers; got dtype {x.dtype}.")
        x = x.astype(np.float32, copy=False)  # float32 input (Catalogue.vectors): no copy
        if not np.all(np.isfinite(x)):
            bad = np.flatnonzero(~np.all(np.isfinite(x), axis=1))
            raise ValueError(f"embeddings has non-finite values in rows {bad[:5].tolist()}.")
        return cls._build(
            _ItemVectors(x, None, None), item_ids, num_iters=num_iters, seed=seed,
            block_rows=block_rows, computed_levels=computed_levels, workers=workers,
            on_stage=on_stage,
        )

    @classmethod
    def build_from_codes(
        cls,
        codes: np.ndarray,
        item_ids: np.ndarray,
        code_rows: np.ndarray | None = None,
        *,
        num_iters: int = 5,
        seed: int = 0,
        block_rows: int = DEFAULT_BLOCK_ROWS,
        computed_levels: int = DEFAULT_COMPUTED_LEVELS,
        workers: int | None = None,
        on_stage: StageCallback | None = None,
    ) -> IndexTree:
        """Builds the tree of :meth:`build` over int8 codes, compared by cosine.

        Item ``k``'s vector is its L2-normalised code, ``u_k = float32(c_k) * rho_k`` with
        ``rho_k = 1 / ||c_k||`` (:func:`~muse_tf.embeddings.arrays.code_inverse_norms`,
        float32), formed only ``_PASS_ROWS`` (streamed levels) or ``block_rows`` (block
        levels) rows at a time: the float32 ``[N, D]`` catalogue never exists. The codes are
        kept **by reference** (the tree's leaves read them; do not modify them afterwards):
        ``N * 12`` more bytes (code row, inverse norm) hold the items. For ``N <=
        block_rows`` the tree equals ``build(u)``; above, streamed passes compute ``(c .
        v) * rho`` instead of ``u . v``, which can only reorder float32 near-ties.

        Args:
          codes: int8 ``[M, D]`` (e.g. :class:`~muse_tf.embeddings.MultimodalCodes` ``.codes``
            or the table as read).
          item_ids: ``[N]`` unique integer item ids.
          code_rows: int ``[N]``: the row of ``codes`` of each item (e.g. ``MultimodalCodes.
            code_index`` without its ``-1`` rows); default: ``codes`` holds the ``N`` items
            in order.
          num_iters, seed, block_rows, computed_levels, workers, on_stage: as :meth:`build`.

        Returns:
          The tree; ``depth == ceil(log2 N)``.
        """
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.dtype != np.int8 or codes.shape[1] == 0:
            raise ValueError(f"codes must be int8 [M, D]; got shape {codes.shape}, dtype "
                             f"{codes.dtype}.")
        if code_rows is None:
            rows = None
            num_items = codes.shape[0]
        else:
            rows = np.asarray(code_rows)
            if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer):
                raise ValueError(f"code_rows must be a 1-D integer array; got shape "
                                 f"{rows.shape}, dtype {rows.dtype}.")
            if rows.size and (rows.min() < 0 or rows.max() >= codes.shape[0]):
                raise ValueError(f"code_rows must be rows of codes in [0, {codes.shape[0]}); "
                                 f"got values in [{rows.min()}, {rows.max()}].")
            rows = rows.astype(np.int64, copy=False)
            num_items = rows.shape[0]
        if num_items == 0:
            raise ValueError("codes must hold at least one item.")
        inverse = np.empty(num_items, dtype=np.float32)
        for begin in range(0, num_items, _ROW_CHUNK):
            end = min(begin + _ROW_CHUNK, num_items)
            block = codes[begin:end] if rows is None else np.take(codes, rows[begin:end], axis=0)
            inverse[begin:end] = code_inverse_norms(block)
        if not np.all(inverse > 0):
            bad = np.flatnonzero(inverse == 0)
            raise ValueError(f"items {bad[:5].tolist()} have all-zero codes: no direction to "
                             "index by cosine.")
        return cls._build(
            _ItemVectors(codes, rows, inverse), item_ids, num_iters=num_iters, seed=seed,
            block_rows=block_rows, computed_levels=computed_levels, workers=workers,
            on_stage=on_stage,
        )

    @classmethod
    def _build(
        cls,
        items: _ItemVectors,
        item_ids: np.ndarray,
        *,
        num_iters: int,
        seed: int,
        block_rows: int,
        computed_levels: int,
        workers: int | None,
        on_stage: StageCallback | None,
    ) -> IndexTree:
        num_items = items.num_items
        ids = np.asarray(item_ids)
        if ids.shape != (num_items,) or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(
                f"item_ids must be integer [N={num_items}]; got shape {ids.shape}, "
                f"dtype {ids.dtype}."
            )
        for name, value, low in (("num_iters", num_iters, 1), ("block_rows", block_rows, 1),
                                 ("computed_levels", computed_levels, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}; got {value!r}.")
        if workers is None:
            workers = min(2, os.cpu_count() or 1)
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an int >= 1; got {workers!r}.")
        if num_items >= 1 << 31:
            raise ValueError(f"at most 2**31 - 1 items; got {num_items}.")
        ids = ids.astype(np.int64)
        sorted_ids = np.sort(ids)
        duplicate = sorted_ids[1:] == sorted_ids[:-1]
        if np.any(duplicate):
            raise ValueError(
                f"item_ids must be unique; {sorted_ids[1:][duplicate][:5].tolist()} occur more "
                "than once."
            )
        del sorted_ids, duplicate

        def report(name: str, began: float | None, seconds: float = 0.0) -> None:
            if on_stage is not None:
                on_stage(name, seconds if began is None else time.perf_counter() - began)

        depth = (num_items - 1).bit_length()  # ceil(log2 N); 0 for one item
        pool = _Workers(workers)
        try:
            order = _partition(items, depth, num_iters, seed, block_rows, pool, report)
            began = time.perf_counter()
            leaf_valid = _leaf_valid(num_items, depth)
            leaf_item_ids = np.zeros(leaf_valid.shape[0], dtype=np.int64)
            leaf_item_ids[leaf_valid] = ids[order]
            leaf_items = items.leaf_order(order)
            del order
            stored_depth = max(depth - 1 - computed_levels, -1)
            node_means = _node_means(leaf_items, leaf_valid, depth, stored_depth, pool)
            report("node means", began)
        finally:
            pool.close()
        return cls.from_parts(
            leaf_item_ids, leaf_valid, node_means, leaf_items.table, leaf_items.rows,
            leaf_items.scale,
        )

    # ------------------------------------------------------------------------------ shape

    @property
    def num_items(self) -> int:
        return int(self.item_ids.shape[0])

    @property
    def num_nodes(self) -> int:
        return (2 << self.depth) - 1

    @property
    def dim(self) -> int:
        return self._items.dim

    @property
    def nbytes(self) -> int:
        """Bytes of the tree's arrays; int8 item codes held by reference are not counted (a
        float32 item table is the tree's own copy and is)."""
        items = self._items
        arrays = [self.leaf_item_ids, self.leaf_valid, self.item_ids, self.item_leaf,
                  self._valid_leaf_nodes, self._node_means, items.rows, items.scale]
        if items.scale is None:
            arrays.append(items.table)
        if self._dense is not None and self._dense is not items.table:
            arrays.append(self._dense)
        return sum(array.nbytes for array in arrays if array is not None)

    @property
    def num_levels(self) -> int:
        """``depth + 1`` (levels ``0 .. depth``)."""
        return self.depth + 1

    @property
    def level_starts(self) -> np.ndarray:
        """int64 ``[depth + 2]``: level ``l`` holds node ids ``level_starts[l] ..
        level_starts[l + 1] - 1``."""
        return (1 << np.arange(self.depth + 2, dtype=np.int64)) - 1

    def level_range(self, level: int) -> tuple[int, int]:
        """``(first, end)`` node ids of ``level`` (end exclusive)."""
        if not 0 <= level <= self.depth:
            raise ValueError(f"level must be in [0, {self.depth}]; got {level}.")
        return (1 << level) - 1, (1 << (level + 1)) - 1

    @property
    def node_valid(self) -> np.ndarray:
        """bool ``[num_nodes]``: False only at padding slots (all at level ``depth``)."""
        valid = np.ones(self.num_nodes, dtype=bool)
        valid[self.leaf_valid.shape[0] - 1 :] = self.leaf_valid
        return valid

    @property
    def node_item_counts(self) -> np.ndarray:
        """int64 ``[num_nodes]``: number of items under each node."""
        counts = np.zeros(self.num_nodes, dtype=np.int64)
        level_counts = self.leaf_valid.astype(np.int64)
        for level in range(self.depth, -1, -1):
            first = (1 << level) - 1
            counts[first : 2 * first + 1] = level_counts
            level_counts = level_counts.reshape(-1, 2).sum(axis=1) if level else level_counts
        return counts

    def _holds_items(self, nodes: np.ndarray) -> np.ndarray:
        """:attr:`node_valid` of (checked) ``nodes`` only, without the ``[num_nodes]`` array
        (134 MB at depth 26)."""
        first_leaf = self.leaf_valid.shape[0] - 1
        valid = nodes < first_leaf
        at_leaf = ~valid
        valid[at_leaf] = self.leaf_valid[nodes[at_leaf] - first_leaf]
        return valid

    @property
    def valid_leaf_nodes(self) -> np.ndarray:
        """int64 ``[N]``: node ids of the leaves that hold an item, ascending."""
        return self._valid_leaf_nodes

    def level_of(self, node_ids: np.ndarray) -> np.ndarray:
        """Level of each node id (int64, same shape); raises for ids outside the tree."""
        nodes = self._check_nodes(node_ids, "node_ids")
        return np.searchsorted(self.level_starts, nodes, side="right") - 1

    def _check_nodes(self, node_ids: np.ndarray, name: str) -> np.ndarray:
        nodes = np.asarray(node_ids)
        if not np.issubdtype(nodes.dtype, np.integer):
            raise ValueError(f"{name} must be integers; got dtype {nodes.dtype}.")
        nodes = nodes.astype(np.int64)
        bad = (nodes < 0) | (nodes >= self.num_nodes)
        if np.any(bad):
            raise ValueError(
                f"{name} must be node ids in [0, {self.num_nodes}); got {nodes[bad][:5].tolist()}."
            )
        return nodes

    # ------------------------------------------------------------------------------ vectors

    def vectors_of(self, node_ids: np.ndarray) -> np.ndarray:
        """float32 ``[..., D]``: the vector of each node id (shape ``node_ids.shape + (D,)``).

        The exact mean of the vectors of the items under the node (zeros for padding slots):
        a stored row for levels ``0 ..`` :attr:`stored_depth`, else computed from the node's
        at most ``2**(depth - stored_depth - 1)`` items by float64 pairwise sums -- the same
        numbers :attr:`node_vectors` holds. Cost: one gather per stored node, one per item of
        a computed node (``_COMPUTE_NODES`` nodes at a time).
        """
        nodes = self._check_nodes(node_ids, "node_ids")
        flat = nodes.reshape(-1)
        out = np.empty((flat.shape[0], self.dim), dtype=np.float32)
        if self._dense is not None:
            np.take(self._dense, flat, axis=0, out=out)
            return out.reshape(*nodes.shape, self.dim)
        stored = flat < self._node_means.shape[0]
        out[stored] = self._node_means[flat[stored]]
        computed = np.flatnonzero(~stored)
        if computed.size:
            levels = np.searchsorted(self.level_starts, flat[computed], side="right") - 1
            for level in np.unique(levels).tolist():
                at = computed[levels == level]
                for begin in range(0, at.shape[0], _COMPUTE_NODES):
                    chunk = at[begin : begin + _COMPUTE_NODES]
                    out[chunk] = self._computed_means(flat[chunk] - ((1 << level) - 1), level)
        return out.reshape(*nodes.shape, self.dim)

    def release_item_vectors(self) -> None:
        """Drop this tree's reference to the item vectors (the int8 codes it was built from
        by reference: 4.5 GB at 35.4M items) once they are needed no more. The layout and the
        stored rows (levels ``0 ..`` :attr:`stored_depth`) stay readable; nodes below them
        raise, as does :attr:`node_vectors`."""
        dim = self.dim
        self._items = _ItemVectors(np.zeros((0, dim), np.float32), None, None)
        self._dense = None

    def _computed_means(self, positions: np.ndarray, level: int) -> np.ndarray:
        """float32 ``[n, D]``: means of the level-``level`` nodes at ``positions`` in it."""
        if self._items.num_items == 0 and self.num_items > 0:
            raise RuntimeError(f"IndexTree: the item vectors were released "
                               f"(release_item_vectors); level {level} is below the stored "
                               f"levels 0..{self.stored_depth}")
        span = 1 << (self.depth - level)
        slots = (positions[:, None] * span + np.arange(span)).reshape(-1)
        valid = self.leaf_valid[slots]
        sums = np.zeros((slots.shape[0], self.dim), dtype=np.float64)
        ranks = np.searchsorted(self._valid_leaf_nodes, slots[valid] + self.leaf_valid.shape[0]
                                - 1)
        sums[valid] = self._items.vectors(ranks)
        sums, counts = _sum_pairs(sums, valid.astype(np.int64), self.depth - level)
        means = np.zeros((positions.shape[0], self.dim), dtype=np.float32)
        present = counts > 0
        means[present] = sums[present] / counts[present, None]
        return means

    @property
    def node_vectors(self) -> np.ndarray:
        """float32 ``[2**(L + 1) - 1, D]``: every node's vector (:meth:`vectors_of`), as one
        heap array, built on first access and kept; for trees of at most
        :data:`MAX_DENSE_NODE_BYTES` (larger ones: use :meth:`vectors_of` on the nodes needed).
        """
        if self._dense is None:
            size = self.num_nodes * self.dim * 4
            if size > MAX_DENSE_NODE_BYTES:
                raise ValueError(
                    f"node_vectors of this tree would be a float32 [{self.num_nodes}, "
                    f"{self.dim}] array of {size / 2**30:.1f} GiB (more than "
                    f"MAX_DENSE_NODE_BYTES = {MAX_DENSE_NODE_BYTES / 2**30:.0f} GiB); use "
                    "IndexTree.vectors_of(node_ids) for the nodes you need."
                )
            dense = np.empty((self.num_nodes, self.dim), dtype=np.float32)
            stored = self._node_means.shape[0]
            dense[:stored] = self._node_means
            for begin in range(stored, self.num_nodes, _COMPUTE_NODES):
                end = min(begin + _COMPUTE_NODES, self.num_nodes)
                dense[begin:end] = self.vectors_of(np.arange(begin, end))
            self._dense = dense
        return self._dense

    # ------------------------------------------------------------------------------ items

    def leaf_of(self, item_ids: np.ndarray) -> np.ndarray:
        """Leaf node id (int64, same shape) of each item id; raises for unknown ids."""
        ids = np.asarray(item_ids)
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"item_ids must be integers; got dtype {ids.dtype}.")
        ids = ids.astype(np.int64)
        positions, found = sorted_positions(self.item_ids, ids)
        if not np.all(found):
            raise ValueError(f"item ids not in the tree: {ids[~found][:5].tolist()}.")
        return self.item_leaf[positions]

    def items_of_leaves(self, leaf_nodes: np.ndarray) -> np.ndarray:
        """Item id (int64, same shape) of each leaf node id; raises for non-leaf or padding."""
        nodes = self._check_nodes(leaf_nodes, "leaf_nodes")
        slot = nodes - (self.leaf_valid.shape[0] - 1)
        bad = slot < 0
        bad[~bad] = ~self.leaf_valid[slot[~bad]]
        if np.any(bad):
            raise ValueError(
                f"leaf_nodes must be level-{self.depth} nodes holding an item; got "
                f"{nodes[bad][:5].tolist()}."
            )
        return self.leaf_item_ids[slot]

    def ancestors(self, item_ids: np.ndarray, include_root: bool = False) -> np.ndarray:
        """Node ids on the path from the root to each item's leaf, one column per level.

        Args:
          item_ids: int ``[...]`` item ids in the tree.
          include_root: with False (default, the TDM training view: the root is every item's
            ancestor, so it carries no signal) columns are levels ``1 .. depth``; with True
            they are levels ``0 .. depth`` (column ``j`` = level ``j``).

        Returns:
          int64 ``[..., depth]`` (or ``[..., depth + 1]``); the last column is the leaf.
        """
        leaf = self.leaf_of(item_ids)
        first_level = 0 if include_root else 1
        shifts = self.depth - np.arange(first_level, self.depth + 1, dtype=np.int64)
        return ((leaf[..., None] + 1) >> shifts) - 1

    def path_codes(self, item_ids: np.ndarray) -> np.ndarray:
        """Branch codes from the root to each item's leaf: int8 ``[..., depth]``, column
        ``j`` = 0 when the level-``j + 1`` ancestor is a left child, 1 when a right child."""
        nodes = self.ancestors(item_ids)
        return ((nodes + 1) % 2).astype(np.int8)

    # ------------------------------------------------------------------------------ training

    def sample_negatives(
        self, positive_nodes: np.ndarray, num_per_level: int, rng: np.random.Generator
    ) -> np.ndarray:
        """Random nodes of the same level as each positive node, never the positive itself.

        Uniform over the level's nodes that hold items (padding slots are never drawn), with
        replacement (a level with two nodes yields the one other node ``num_per_level`` times).

        Args:
          positive_nodes: int ``[...]`` node ids, any levels (e.g. :meth:`ancestors` output,
            ``[Q, depth]``). The root cannot be a positive: it has no same-level negative.
          num_per_level: negatives per positive node (>= 1).
          rng: the NumPy random generator to draw from.

        Returns:
          int64 ``[..., num_per_level]``: ``out[..., k]`` is at the level of ``positive[...]``.
        """
        if isinstance(num_per_level, bool) or not isinstance(num_per_level, int | np.integer):
            raise ValueError(f"num_per_level must be an int; got {num_per_level!r}.")
        if num_per_level < 1:
            raise ValueError(f"num_per_level must be >= 1; got {num_per_level}.")
        if not isinstance(rng, np.random.Generator):
            raise ValueError(f"rng must be a numpy.random.Generator; got {type(rng).__name__}.")
        nodes = self._check_nodes(positive_nodes, "positive_nodes")
        padding = ~self._holds_items(nodes)
        if np.any(padding):
            raise ValueError(f"positive_nodes holds padding slots {nodes[padding][:5].tolist()}.")
        level = np.searchsorted(self.level_starts, nodes, side="right") - 1
        at_leaf = level == self.depth
        size = np.where(at_leaf, self.num_items, np.int64(1) << level)
        if np.any(size < 2):
            raise ValueError(
                "positive_nodes holds a node that is alone at its level (the root, or the leaf "
                f"of a one-item tree): {nodes[size < 2][:5].tolist()}; it has no negatives."
            )
        first = (np.int64(1) << level) - 1
        # Rank of the positive among its level's candidates; draw among the others.
        rank = np.where(
            at_leaf,
            np.searchsorted(self._valid_leaf_nodes, nodes),
            nodes - first,
        )
        draws = rng.integers(0, (size - 1)[..., None], size=(*nodes.shape, num_per_level))
        draws = draws + (draws >= rank[..., None])
        inner = first[..., None] + draws
        leaf = self._valid_leaf_nodes[np.minimum(draws, self.num_items - 1)]
        return np.where(at_leaf[..., None], leaf, inner).astype(np.int64)

    # ------------------------------------------------------------------------------ io

    def save(self, path: str | os.PathLike) -> None:
        """Writes the tree's compact form to ``path`` (an uncompressed ``.npz``; the suffix is
        appended if missing, as NumPy does).

        Members: ``format_version``, ``leaf_item_ids``, ``leaf_valid``, ``node_means``,
        ``item_vectors`` (the items' float32 vectors or int8 codes, in leaf order) and, for
        codes, ``item_scale``. Arrays are streamed into the archive ``_ROW_CHUNK`` rows at a
        time: writing needs no copy of the tree (the items are gathered into leaf order chunk
        by chunk).
        """
        path = os.fspath(path)
        if not path.endswith(".npz"):
            path += ".npz"
        items = self._items
        arrays: dict[str, tuple[tuple[int, ...], np.dtype, Callable[[int, int], np.ndarray]]] = {
            "format_version": ((), np.dtype(np.int64),
                               lambda a, b: np.array(_FORMAT_VERSION, np.int64)),
            "leaf_item_ids": _rows_of(self.leaf_item_ids),
            "leaf_valid": _rows_of(self.leaf_valid),
            "node_means": _rows_of(self._node_means),
            "item_vectors": (
                (self.num_items, self.dim), items.table.dtype,
                lambda a, b: np.ascontiguousarray(
                    items.table[a:b] if items.rows is None else np.take(
                        items.table, items.rows[a:b], axis=0)),
            ),
        }
        if items.scale is not None:
            arrays["item_scale"] = _rows_of(items.scale)
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, (shape, dtype, rows) in arrays.items():
                with zf.open(name + ".npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array_header_2_0(member, {
                        "descr": np.lib.format.dtype_to_descr(dtype),
                        "fortran_order": False, "shape": shape})
                    total = shape[0] if shape else 1
                    for begin in range(0, total, _ROW_CHUNK):
                        end = min(begin + _ROW_CHUNK, total)
                        member.write(np.asarray(rows(begin, end), dtype=dtype).tobytes())

    @classmethod
    def load(cls, path: str | os.PathLike) -> IndexTree:
        """Reads a tree written by :meth:`save` (bit-exact round trip), or a version-1 file
        (the whole ``node_vectors`` heap array). Each array is read once, into its final
        place (no second copy)."""
        with np.load(path, allow_pickle=False) as data:
            if "format_version" not in data.files:
                raise ValueError(f"{os.fspath(path)} is not an IndexTree file; missing "
                                 "{'format_version'}.")
            version = int(data["format_version"])
            required = {
                1: {"node_vectors", "leaf_item_ids", "leaf_valid"},
                2: {"node_means", "item_vectors", "leaf_item_ids", "leaf_valid"},
            }.get(version)
            if required is None:
                raise ValueError(
                    f"{os.fspath(path)} has IndexTree format version {version}; this code "
                    f"reads versions 1 and {_FORMAT_VERSION}."
                )
            missing = required - set(data.files)
            if missing:
                raise ValueError(f"{os.fspath(path)} is not an IndexTree file; missing {missing}.")
            if version == 1:
                return cls(data["node_vectors"], data["leaf_item_ids"], data["leaf_valid"])
            return cls.from_parts(
                data["leaf_item_ids"], data["leaf_valid"], data["node_means"],
                data["item_vectors"],
                item_scale=data["item_scale"] if "item_scale" in data.files else None,
            )

    def __repr__(self) -> str:
        return (
            f"IndexTree(num_items={self.num_items}, depth={self.depth}, "
            f"num_nodes={self.num_nodes}, dim={self.dim})"
        )


def _rows_of(
    array: np.ndarray,
) -> tuple[tuple[int, ...], np.dtype, Callable[[int, int], np.ndarray]]:
    """``(shape, dtype, rows(a, b))`` of an in-memory array, for :meth:`IndexTree.save`."""
    return array.shape, array.dtype, lambda a, b: np.ascontiguousarray(array[a:b])


def _node_means(
    items: _ItemVectors, leaf_valid: np.ndarray, depth: int, stored_depth: int, pool: _Workers
) -> np.ndarray:
    """float32 ``[2**(K + 1) - 1, D]``: means of the nodes of levels ``0 .. K`` (``K =
    stored_depth``) over ``items`` in leaf order, by float64 sums of sibling pairs from the
    leaves up, so each is the mean :meth:`IndexTree.vectors_of` would compute.

    Subtrees of ``2**_SUM_GROUP_LEVELS`` level-``L - 1`` nodes are summed at a time (in
    parallel), each level by one vectorised add of the even and odd rows; a level-``L - 1``
    node's sum is its left item plus its right item or ``+0.0`` (a padding slot), the very
    additions of the pairwise sum over zero-padded leaf slots, without forming those slots."""
    dim = items.dim
    means = np.zeros(((2 << stored_depth) - 1 if stored_depth >= 0 else 0, dim), np.float32)
    if stored_depth < 0:  # depth >= 1 from here (stored_depth <= depth - 1)
        return means
    # Items per level-(L - 1) node (1 or 2), uint8: 32 MiB at depth 26.
    pair_counts = leaf_valid.reshape(-1, 2).sum(axis=1, dtype=np.uint8)
    group_levels = min(depth - 1, _SUM_GROUP_LEVELS)
    root_level = depth - 1 - group_levels
    span = 1 << group_levels  # level-(L - 1) nodes per group
    group_starts = np.concatenate(
        [[0], np.cumsum(pair_counts.reshape(-1, span).sum(axis=1, dtype=np.int64))])

    def store(level: int, first_position: int, sums: np.ndarray, counts: np.ndarray) -> None:
        if level <= stored_depth:
            begin = (1 << level) - 1 + first_position
            means[begin : begin + sums.shape[0]] = sums / np.maximum(counts, 1)[:, None]

    root_sums = np.zeros((1 << root_level, dim), np.float64)
    root_counts = np.zeros(1 << root_level, np.int64)

    def reduce_groups(bounds: tuple[int, int]) -> None:
        for group in range(bounds[0], bounds[1]):
            counts = pair_counts[group * span : (group + 1) * span].astype(np.int64)
            first_item, end_item = int(group_starts[group]), int(group_starts[group + 1])
            # The group's item vectors and one zero row (a padding slot's vector).
            vectors = np.zeros((end_item - first_item + 1, dim), np.float32)
            vectors[:-1] = items.vectors(slice(first_item, end_item))
            lefts = np.cumsum(counts) - counts
            rights = np.where(counts == 2, lefts + 1, end_item - first_item)
            sums = vectors[lefts].astype(np.float64)
            sums += vectors[rights]
            level = depth - 1
            store(level, group * span, sums, counts)
            while level > root_level:
                sums = sums[0::2] + sums[1::2]
                counts = counts[0::2] + counts[1::2]
                level -= 1
                store(level, group * (span >> (depth - 1 - level)), sums, counts)
            root_sums[group] = sums[0]
            root_counts[group] = counts[0]

    num_groups = 1 << root_level
    cuts = [num_groups * w // pool.count for w in range(pool.count + 1)]
    pool.map(reduce_groups, [(a, b) for a, b in itertools.pairwise(cuts) if b > a])
    _sum_pairs(root_sums, root_counts, root_level,
               lambda step, s, c: store(root_level - step, 0, s, c))
    return means
