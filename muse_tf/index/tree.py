"""The MISS multimodal index tree (MISS, arXiv 2508.14515, Sec. 3.2).

The tree is built once, offline, from the frozen multimodal item embeddings (e.g. the
L2-normalised SCL vectors, ``float [N, D]``) by recursive *balanced* 2-means: every node's
items are split into two halves of sizes ``ceil(n / 2)`` (left) and ``floor(n / 2)`` (right)
so that similar items share ancestors. Retrieval then walks it top-down with a layer-wise beam
search (:mod:`muse_tf.index.beam_search`); TDM-style training uses :meth:`IndexTree.ancestors`
and :meth:`IndexTree.sample_negatives`.

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
* ``node_vectors[i]`` is the exact mean of the embeddings of the items under node ``i``
  (accumulated in float64, stored float32); a leaf's vector is its item's embedding.

Building is vectorised level by level: all nodes of a level are split at once on one
permutation of the item array (segment-wise centroids as one sparse 0/1 matrix product, a
segment-wise sort), never recursing per node in Python.
"""

from __future__ import annotations

import os

import numpy as np
import scipy.sparse

from muse_tf.embeddings.arrays import sorted_positions

__all__ = ["IndexTree"]

_FORMAT_VERSION = 1
_ROW_CHUNK = 65536
_LOOP_SEGMENTS = 32768


def _level_counts(num_items: int, depth: int) -> list[np.ndarray]:
    """Items per node for every level: ``counts[l]`` is int64 ``[2**l]`` (heap order)."""
    counts = [np.array([num_items], dtype=np.int64)]
    for _ in range(depth):
        parent = counts[-1]
        counts.append(np.stack([(parent + 1) // 2, parent // 2], axis=1).reshape(-1))
    return counts


def _rowwise_dot(
    x: np.ndarray, table: np.ndarray, segment: np.ndarray, start: np.ndarray, count: np.ndarray
) -> np.ndarray:
    """``out[n] = x[n] . table[segment[n]]`` for contiguous segments ``start``/``count``."""
    out = np.empty(x.shape[0], dtype=np.float64)
    if table.shape[0] <= _LOOP_SEGMENTS:
        # Few large segments: one matrix-vector product each reads x once, with no gather.
        for s, (begin, size) in enumerate(zip(start.tolist(), count.tolist(), strict=True)):
            out[begin : begin + size] = np.einsum("nd,d->n", x[begin : begin + size], table[s])
        return out
    # Many small segments: gather each row's vector, in row chunks to bound temporary memory.
    for begin in range(0, x.shape[0], _ROW_CHUNK):
        end = begin + _ROW_CHUNK
        out[begin:end] = np.einsum("nd,nd->n", x[begin:end], table[segment[begin:end]])
    return out


def _segment_sort(values: np.ndarray, segment: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Permutation sorting ``values`` descending within each contiguous segment.

    One ``argsort`` of ``segment + v'`` where ``v'`` in ``[0, 1)`` is ``values`` rescaled
    descending within its segment: 5-10x faster than ``np.lexsort((-values, segment))``.
    Values closer than ~1e-9 of their segment's range may come out in either order, which only
    matters for ties the 2-means split is indifferent to anyway.
    """
    high = np.maximum.reduceat(values, start)
    spread = high - np.minimum.reduceat(values, start)
    # The factor keeps v' < 1; the tiny term avoids 0 / 0 for constant segments.
    scaled = (high[segment] - values) / (spread[segment] * (1.0 + 1e-6) + 1e-300)
    return np.argsort(segment + scaled)


def _segment_argmax(values: np.ndarray, starts: np.ndarray, segment: np.ndarray) -> np.ndarray:
    """Position of the first maximum of ``values`` in each (non-empty, contiguous) segment."""
    maxima = np.maximum.reduceat(values, starts)
    hits = np.flatnonzero(values == maxima[segment])
    hit_segment = segment[hits]
    first = np.ones(hits.shape[0], dtype=bool)
    first[1:] = hit_segment[1:] != hit_segment[:-1]
    return hits[first]


class IndexTree:
    """A balanced binary index tree over items (see the module docstring for the layout).

    Build with :meth:`build`; persist with :meth:`save` / :meth:`load`.

    Attributes:
      depth: ``L``, the number of edges from the root to a leaf; levels are ``0 .. L``.
      node_vectors: float32 ``[2**(L + 1) - 1, D]``; mean embedding of the items under each
        node (zeros for padding slots).
      leaf_item_ids: int64 ``[2**L]``; item id of each level-``L`` slot (``0`` at padding
        slots; use :attr:`leaf_valid`).
      leaf_valid: bool ``[2**L]``; whether each level-``L`` slot holds an item.
      item_ids: int64 ``[N]``; the indexed item ids, ascending.
      item_leaf: int64 ``[N]``; the leaf node id of ``item_ids[k]``.
    """

    def __init__(
        self, node_vectors: np.ndarray, leaf_item_ids: np.ndarray, leaf_valid: np.ndarray
    ) -> None:
        node_vectors = np.asarray(node_vectors)
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
        num_nodes = 2 * num_leaves - 1
        if node_vectors.ndim != 2 or node_vectors.shape[0] != num_nodes:
            raise ValueError(
                f"node_vectors must be [{num_nodes}, D] for depth {depth}; got shape "
                f"{node_vectors.shape}."
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
        self.node_vectors = node_vectors.astype(np.float32, copy=False)
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

    # ------------------------------------------------------------------------------ build

    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,
        item_ids: np.ndarray,
        *,
        num_iters: int = 5,
        seed: int = 0,
    ) -> IndexTree:
        """Builds the tree by recursive balanced 2-means, one level at a time.

        At every node: two seeds by the farthest-point heuristic (a random item ``r``, the
        item ``a`` farthest from ``r``, the item ``b`` farthest from ``a``), then up to
        ``num_iters`` rounds of balanced assignment: items sorted by
        ``||x - c_b||^2 - ||x - c_a||^2`` (linear in ``x``: ``x . (c_a - c_b) - const``), the
        ``ceil(n / 2)`` closest to ``c_a`` to the left child and the rest to the right -- or,
        for odd ``n`` when the middle item is closer to ``c_b``, the ``ceil(n / 2)`` closest to
        ``c_b`` to the left (the cheaper of the two size-balanced assignments); centroids
        recomputed as the halves' means. A level stops early once no assignment changes.

        Memory: the float32 embeddings and one permuted copy per level (``2 N D * 4`` bytes),
        ``node_vectors`` (``(2**(L + 1) - 1) D * 4``) and float64 leaf sums (``2**L D * 8``):
        about ``N D * 32`` bytes for ``N`` near a power of two. That is ~0.4 GB for 100K items
        at D = 128 but ~170 GB for TAOBAO-MM's whole 35.4M-item catalogue, which the tree is
        not meant to index on one machine (the frozen int8 table of the ranking models is
        4.5 GB; :class:`~muse_tf.training.retrieval_data.Catalogue` keeps its codes by
        reference and produces these float vectors only when asked).

        Args:
          embeddings: ``[N, D]`` real item embeddings (cast to float32), ``N >= 1``.
          item_ids: ``[N]`` unique integer item ids, aligned with ``embeddings``.
          num_iters: balanced 2-means rounds per level (>= 1).
          seed: seed of the random first seeds.

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
        ids = np.asarray(item_ids)
        if ids.shape != (x.shape[0],) or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(
                f"item_ids must be integer [N={x.shape[0]}]; got shape {ids.shape}, "
                f"dtype {ids.dtype}."
            )
        if isinstance(num_iters, bool) or not isinstance(num_iters, int) or num_iters < 1:
            raise ValueError(f"num_iters must be an int >= 1; got {num_iters!r}.")
        ids = ids.astype(np.int64)
        sorted_ids = np.sort(ids)
        duplicate = sorted_ids[1:] == sorted_ids[:-1]
        if np.any(duplicate):
            raise ValueError(
                f"item_ids must be unique; {sorted_ids[1:][duplicate][:5].tolist()} occur more "
                "than once."
            )

        num_items, dim = x.shape
        depth = (num_items - 1).bit_length()  # ceil(log2 N); 0 for one item
        counts = _level_counts(num_items, depth)
        offsets = [np.cumsum(c) - c for c in counts]
        rng = np.random.default_rng(seed)
        order = np.arange(num_items, dtype=np.int64)
        sq_norms = np.einsum("nd,nd->n", x, x, dtype=np.float64)

        for level in range(depth):
            count, start = counts[level], offsets[level]
            segment = np.repeat(np.arange(count.shape[0]), count)
            child_count, child_start = counts[level + 1], offsets[level + 1]

            # argmax_x ||x - p||^2 within a segment = argmax_x ||x||^2 - 2 x . p
            first = start + rng.integers(0, count)
            far = sq_norms - 2.0 * _rowwise_dot(x, x[first], segment, start, count)
            seed_a = _segment_argmax(far, start, segment)
            far = sq_norms - 2.0 * _rowwise_dot(x, x[seed_a], segment, start, count)
            seed_b = _segment_argmax(far, start, segment)
            centroid_a, centroid_b = x[seed_a], x[seed_b]  # [S, D]

            # Child (2s left, 2s + 1 right) of the item at each within-level sorted position.
            child_by_position = np.repeat(np.arange(child_count.shape[0]), child_count)
            indptr = np.append(child_start, num_items)
            within = np.arange(num_items) - start[segment]
            reversed_position = start[segment] + count[segment] - 1 - within
            odd = count % 2 == 1
            middle = start + count // 2
            previous_child = None
            for iteration in range(num_iters):
                # closeness > 0 <=> ||x - c_a|| < ||x - c_b||; halves = a segment-wise sort.
                offset = 0.5 * (
                    np.einsum("sd,sd->s", centroid_a, centroid_a, dtype=np.float64)
                    - np.einsum("sd,sd->s", centroid_b, centroid_b, dtype=np.float64)
                )
                direction = centroid_a - centroid_b
                closeness = _rowwise_dot(x, direction, segment, start, count) - offset[segment]
                perm = _segment_sort(closeness, segment, start)
                # Sizes are fixed (ceil left, floor right), not which centroid gets the bigger
                # half: for odd n the middle item decides, going to the centroid it is closer
                # to; when that is c_b, the segment's order is reversed (c_b's side goes left).
                flip = odd & (closeness[perm[middle]] < 0)
                if flip.any():
                    perm = np.where(flip[segment], perm[reversed_position], perm)
                child = np.empty(num_items, dtype=np.int64)
                child[perm] = child_by_position
                if previous_child is not None and np.array_equal(child, previous_child):
                    break
                previous_child = child
                if iteration == num_iters - 1:
                    break
                # Sum of each half as a sparse [2S, N] 0/1 matrix times x: row c holds the items
                # perm[child_start[c]:...], so the CSR arrays are perm and child_start as they are.
                membership = scipy.sparse.csr_matrix(
                    (np.ones(num_items, dtype=np.float32), perm, indptr),
                    shape=(child_count.shape[0], num_items),
                )
                means = (membership @ x) / np.maximum(child_count, 1)[:, None]
                centroid_a = means[0::2].astype(np.float32)
                # A one-item node has no right half: c_b = c_a keeps it where it is.
                centroid_b = np.where(
                    (count > 1)[:, None], means[1::2], means[0::2]
                ).astype(np.float32)
            x = x[perm]
            order = order[perm]
            sq_norms = sq_norms[perm]

        num_leaves = 1 << depth
        leaf_valid = counts[depth] > 0
        leaf_item_ids = np.zeros(num_leaves, dtype=np.int64)
        leaf_item_ids[leaf_valid] = ids[order]

        node_vectors = np.zeros((2 * num_leaves - 1, dim), dtype=np.float32)
        sums = np.zeros((num_leaves, dim), dtype=np.float64)
        sums[leaf_valid] = x
        node_vectors[num_leaves - 1 :][leaf_valid] = x
        for level in range(depth - 1, -1, -1):
            sums = sums.reshape(-1, 2, dim).sum(axis=1)
            first_node = (1 << level) - 1
            node_vectors[first_node : 2 * first_node + 1] = sums / counts[level][:, None]
        return cls(node_vectors, leaf_item_ids, leaf_valid)

    # ------------------------------------------------------------------------------ shape

    @property
    def num_items(self) -> int:
        return int(self.item_ids.shape[0])

    @property
    def num_nodes(self) -> int:
        return int(self.node_vectors.shape[0])

    @property
    def dim(self) -> int:
        return int(self.node_vectors.shape[1])

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
        if np.any(~self.node_valid[nodes]):
            raise ValueError(
                f"positive_nodes holds padding slots {nodes[~self.node_valid[nodes]][:5].tolist()}."
            )
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
        """Writes the tree to ``path`` (a ``.npz``; NumPy appends the suffix if missing)."""
        np.savez(
            path,
            format_version=np.int64(_FORMAT_VERSION),
            node_vectors=self.node_vectors,
            leaf_item_ids=self.leaf_item_ids,
            leaf_valid=self.leaf_valid,
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> IndexTree:
        """Reads a tree written by :meth:`save` (bit-exact round trip)."""
        with np.load(path, allow_pickle=False) as data:
            missing = {"format_version", "node_vectors", "leaf_item_ids", "leaf_valid"} - set(
                data.files
            )
            if missing:
                raise ValueError(f"{os.fspath(path)} is not an IndexTree file; missing {missing}.")
            version = int(data["format_version"])
            if version != _FORMAT_VERSION:
                raise ValueError(
                    f"{os.fspath(path)} has IndexTree format version {version}; this code "
                    f"reads version {_FORMAT_VERSION}."
                )
            return cls(data["node_vectors"], data["leaf_item_ids"], data["leaf_valid"])

    def __repr__(self) -> str:
        return (
            f"IndexTree(num_items={self.num_items}, depth={self.depth}, "
            f"num_nodes={self.num_nodes}, dim={self.dim})"
        )
