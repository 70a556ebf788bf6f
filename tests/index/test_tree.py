"""Tests for muse_tf.index.tree.IndexTree: layout, balance, node means, helpers, save/load,
the int8 build, compact node storage and the streamed (memory-bounded) build path."""

from __future__ import annotations

import math
import zipfile

import numpy as np
import pytest

from muse_tf.embeddings.arrays import code_inverse_norms
from muse_tf.index import tree as tree_module
from muse_tf.index import tree_bench
from muse_tf.index.tree import IndexTree


def random_items(n: int, dim: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    embeddings = rng.normal(size=(n, dim)).astype(np.float32)
    item_ids = rng.choice(np.arange(1, 10 * n + 2), size=n, replace=False).astype(np.int64)
    return embeddings, item_ids


def items_below(tree: IndexTree) -> list[list[int]]:
    """For every node, the input row indices of the items under it (by walking parents)."""
    below: list[list[int]] = [[] for _ in range(tree.num_nodes)]
    first_leaf = (1 << tree.depth) - 1
    for slot in np.flatnonzero(tree.leaf_valid):
        node = int(slot) + first_leaf
        item = int(tree.leaf_item_ids[slot])
        while True:
            below[node].append(item)
            if node == 0:
                break
            node = (node - 1) // 2
    return below


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 37, 100, 513])
def test_balanced_layout_every_item_in_one_leaf(n):
    embeddings, item_ids = random_items(n)
    tree = IndexTree.build(embeddings, item_ids)
    depth = math.ceil(math.log2(n)) if n > 1 else 0
    assert tree.depth == depth
    assert tree.num_nodes == 2 ** (depth + 1) - 1
    assert tree.num_items == n
    # Every item sits in exactly one level-`depth` leaf.
    held = tree.leaf_item_ids[tree.leaf_valid]
    np.testing.assert_array_equal(np.sort(held), np.sort(item_ids))
    assert tree.leaf_valid.sum() == n
    counts = np.array([len(items) for items in items_below(tree)])
    # Balanced: children hold ceil(n/2) (left) and floor(n/2) (right) of their parent's items.
    for node in range((1 << depth) - 1):
        assert counts[2 * node + 1] == (counts[node] + 1) // 2
        assert counts[2 * node + 2] == counts[node] // 2
    # Padding slots only at the leaf level, each the right child of a one-item node.
    assert np.all(counts[: (1 << depth) - 1] > 0)
    np.testing.assert_array_equal(tree.node_valid, counts > 0)
    np.testing.assert_array_equal(tree.node_item_counts, counts)


def test_node_vectors_are_means_of_their_leaves():
    embeddings, item_ids = random_items(100, dim=5, seed=1)
    tree = IndexTree.build(embeddings, item_ids)
    row_of = {int(item): row for row, item in enumerate(item_ids)}
    for node, items in enumerate(items_below(tree)):
        if not items:
            np.testing.assert_array_equal(tree.node_vectors[node], 0.0)
            continue
        rows = [row_of[item] for item in items]
        expected = embeddings[rows].astype(np.float64).mean(axis=0)
        np.testing.assert_allclose(tree.node_vectors[node], expected, rtol=1e-6, atol=1e-6)
    # Leaves are the item embeddings themselves, bit for bit.
    leaves = tree.leaf_of(item_ids)
    np.testing.assert_array_equal(tree.node_vectors[leaves], embeddings)
    assert tree.node_vectors.dtype == np.float32


def test_tiny_tree_exact():
    # Three 1-D items: the two close ones share the bigger (left) half whatever the seeds.
    embeddings = np.array([[0.0], [1.0], [10.0]])
    for seed in range(4):
        tree = IndexTree.build(embeddings, np.array([100, 101, 110]), seed=seed)
        assert tree.depth == 2
        np.testing.assert_array_equal(tree.leaf_valid, [True, True, True, False])
        assert set(tree.leaf_item_ids[:2].tolist()) == {100, 101}
        assert tree.leaf_item_ids[2] == 110
        np.testing.assert_allclose(tree.node_vectors[:3, 0], [11 / 3, 0.5, 10.0], rtol=1e-6)
        np.testing.assert_array_equal(tree.ancestors([110]), [[2, 5]])
        np.testing.assert_array_equal(tree.ancestors([110], include_root=True), [[0, 2, 5]])
        np.testing.assert_array_equal(tree.path_codes([110]), [[1, 0]])
        assert tree.ancestors([100])[0, 0] == 1


def test_planted_clusters_share_subtrees():
    # 8 well-separated clusters of 64 items: each level-3 node must hold exactly one cluster.
    rng = np.random.default_rng(2)
    centres = 10.0 * rng.normal(size=(8, 16))
    labels = np.repeat(np.arange(8), 64)
    perm = rng.permutation(labels.size)
    labels = labels[perm]
    embeddings = centres[labels] + 0.01 * rng.normal(size=(labels.size, 16))
    item_ids = np.arange(labels.size, dtype=np.int64) + 1000
    tree = IndexTree.build(embeddings, item_ids)
    label_of = dict(zip(item_ids.tolist(), labels.tolist(), strict=True))
    below = items_below(tree)
    first, end = tree.level_range(3)
    clusters = [{label_of[item] for item in below[node]} for node in range(first, end)]
    assert all(len(c) == 1 for c in clusters)
    assert set().union(*clusters) == set(range(8))


def test_ancestors_and_path_codes_are_consistent():
    embeddings, item_ids = random_items(37, seed=3)
    tree = IndexTree.build(embeddings, item_ids)
    anc = tree.ancestors(item_ids)
    assert anc.shape == (37, tree.depth) and anc.dtype == np.int64
    np.testing.assert_array_equal(anc[:, -1], tree.leaf_of(item_ids))
    np.testing.assert_array_equal(anc[:, 0], np.where(tree.path_codes(item_ids)[:, 0] == 0, 1, 2))
    for column in range(tree.depth):
        np.testing.assert_array_equal(tree.level_of(anc[:, column]), column + 1)
        parent = anc[:, column - 1] if column else np.zeros(37, dtype=np.int64)
        np.testing.assert_array_equal((anc[:, column] - 1) // 2, parent)
        codes = tree.path_codes(item_ids)[:, column]
        np.testing.assert_array_equal(anc[:, column], 2 * parent + 1 + codes)
    with_root = tree.ancestors(item_ids.reshape(37, 1), include_root=True)
    assert with_root.shape == (37, 1, tree.depth + 1)
    np.testing.assert_array_equal(with_root[:, 0, 0], 0)
    np.testing.assert_array_equal(tree.items_of_leaves(anc[:, -1]), item_ids)


def test_unknown_items_and_bad_leaves_are_rejected():
    embeddings, item_ids = random_items(5, seed=4)
    tree = IndexTree.build(embeddings, item_ids)
    with pytest.raises(ValueError, match="not in the tree: \\[-7\\]"):
        tree.ancestors([item_ids[0], -7])
    with pytest.raises(ValueError, match="holding an item"):
        tree.items_of_leaves([0])
    with pytest.raises(ValueError, match="node ids in"):
        tree.level_of([tree.num_nodes])


def test_sample_negatives_same_level_never_positive():
    embeddings, item_ids = random_items(37, seed=5)
    tree = IndexTree.build(embeddings, item_ids)
    positives = tree.ancestors(item_ids)  # [37, depth], levels 1..depth
    rng = np.random.default_rng(0)
    negatives = tree.sample_negatives(positives, 16, rng)
    assert negatives.shape == (37, tree.depth, 16) and negatives.dtype == np.int64
    expected_levels = np.broadcast_to(tree.level_of(positives)[..., None], negatives.shape)
    np.testing.assert_array_equal(tree.level_of(negatives), expected_levels)
    assert np.all(negatives != positives[..., None])
    assert np.all(tree.node_valid[negatives])  # never a padding slot
    # Level 1 has two nodes: the only negative is the sibling.
    sibling = np.where(positives[:, 0] == 1, 2, 1)
    np.testing.assert_array_equal(negatives[:, 0, :], np.repeat(sibling[:, None], 16, axis=1))
    # Over many draws, every other item leaf (and no padding) turns up.
    leaf = positives[:1, -1]
    drawn = set(tree.sample_negatives(leaf, 3000, rng).ravel().tolist())
    assert drawn == set(tree.valid_leaf_nodes.tolist()) - {int(leaf[0])}


def test_sample_negatives_bad_input():
    embeddings, item_ids = random_items(5, seed=6)
    tree = IndexTree.build(embeddings, item_ids)  # depth 3, slots 7..14, padding 10, 12, 14
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="alone at its level"):
        tree.sample_negatives(np.array([0]), 2, rng)
    padding = int(np.flatnonzero(~tree.node_valid)[0])
    with pytest.raises(ValueError, match="padding slots"):
        tree.sample_negatives(np.array([padding]), 2, rng)
    with pytest.raises(ValueError, match="num_per_level must be >= 1"):
        tree.sample_negatives(np.array([1]), 0, rng)
    with pytest.raises(ValueError, match=r"numpy\.random\.Generator"):
        tree.sample_negatives(np.array([1]), 1, 7)


def test_save_load_round_trip(tmp_path):
    embeddings, item_ids = random_items(21, seed=7)
    tree = IndexTree.build(embeddings, item_ids)
    path = tmp_path / "tree.npz"
    tree.save(path)
    loaded = IndexTree.load(path)
    assert loaded.depth == tree.depth
    for name in ("node_vectors", "leaf_item_ids", "leaf_valid", "item_ids", "item_leaf"):
        original, restored = getattr(tree, name), getattr(loaded, name)
        assert original.dtype == restored.dtype
        np.testing.assert_array_equal(original, restored)
    np.testing.assert_array_equal(loaded.ancestors(item_ids), tree.ancestors(item_ids))


def test_load_rejects_other_files(tmp_path):
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="not an IndexTree file"):
        IndexTree.load(tmp_path / "other.npz")
    embeddings, item_ids = random_items(4, seed=8)
    tree = IndexTree.build(embeddings, item_ids)
    np.savez(
        tmp_path / "future.npz",
        format_version=np.int64(99),
        node_vectors=tree.node_vectors,
        leaf_item_ids=tree.leaf_item_ids,
        leaf_valid=tree.leaf_valid,
    )
    with pytest.raises(ValueError, match="format version 99"):
        IndexTree.load(tmp_path / "future.npz")


@pytest.mark.parametrize(
    ("embeddings", "item_ids", "match"),
    [
        (np.zeros((0, 4)), np.zeros(0, np.int64), "non-empty"),
        (np.zeros((3, 4)), np.array([1, 2, 2]), "occur more than once"),
        (np.zeros((3, 4)), np.array([1, 2]), "item_ids must be integer \\[N=3\\]"),
        (np.array([[0.0, np.nan], [1.0, 1.0]]), np.array([1, 2]), "non-finite values in rows"),
        (np.zeros(4), np.array([1]), "\\[N, D\\]"),
    ],
)
def test_build_rejects_bad_input(embeddings, item_ids, match):
    with pytest.raises(ValueError, match=match):
        IndexTree.build(embeddings, item_ids)


def test_build_is_deterministic_for_a_seed():
    embeddings, item_ids = random_items(200, seed=9)
    first = IndexTree.build(embeddings, item_ids, seed=3)
    second = IndexTree.build(embeddings, item_ids, seed=3)
    np.testing.assert_array_equal(first.leaf_item_ids, second.leaf_item_ids)
    np.testing.assert_array_equal(first.node_vectors, second.node_vectors)


# ---------------------------------------------------------------------------- reference build


def reference_leaf_order(x: np.ndarray, seed: int = 0, num_iters: int = 5) -> np.ndarray:
    """The build rule of IndexTree.build, node by node in float64 (a plain statement of it):
    row indices of ``x`` in leaf order."""
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    depth = (n - 1).bit_length()
    rng = np.random.default_rng(seed)
    counts = [np.array([n])]
    for _ in range(depth):
        counts.append(np.stack([(counts[-1] + 1) // 2, counts[-1] // 2], axis=1).reshape(-1))
    firsts = [rng.integers(0, counts[level]) for level in range(depth)]
    nodes = [np.arange(n)]
    for level in range(depth):
        children = []
        for s, items in enumerate(nodes):
            v = x[items]
            m = v.shape[0]
            sq = (v * v).sum(axis=1)
            a = int(np.argmax(sq - 2 * v @ v[firsts[level][s]]))
            b = int(np.argmax(sq - 2 * v @ v[a]))
            c_a, c_b = v[a], v[b]
            previous = None
            for iteration in range(num_iters):
                closeness = v @ (c_a - c_b) - 0.5 * (c_a @ c_a - c_b @ c_b)
                order = np.argsort(-closeness, kind="stable")
                if m % 2 and closeness[order[m // 2]] < 0:
                    order = order[::-1]
                left = np.zeros(m, dtype=bool)
                left[order[: (m + 1) // 2]] = True
                if previous is not None and np.array_equal(left, previous):
                    break
                previous = left
                if iteration == num_iters - 1:
                    break
                c_a = v[left].mean(axis=0)
                c_b = v[~left].mean(axis=0) if m > 1 else c_a
            children += [items[order[: (m + 1) // 2]], items[order[(m + 1) // 2 :]]]
        nodes = children
    return np.concatenate(nodes)


def unit_codes(n: int, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random int8 codes (no zero rows) and their float32 unit vectors ``c * (1 / ||c||)``."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(-38, 39, size=(n, dim), dtype=np.int8)
    codes[:, 0] |= 1  # never all zero
    return codes, codes.astype(np.float32) * code_inverse_norms(codes)[:, None]


@pytest.mark.parametrize(
    ("n", "block_rows", "workers"),
    [(2, 1, 1), (3, 1, 1), (37, 4096, 1), (513, 4096, 2), (1500, 4096, 1), (37, 5, 1),
     (513, 40, 2), (1500, 100, 2)],
)
def test_build_follows_the_reference_rule(n, block_rows, workers):
    # Block-only (block_rows >= n) and streamed (small block_rows) paths, one or two threads.
    embeddings, item_ids = random_items(n, dim=7, seed=n)
    tree = IndexTree.build(embeddings, item_ids, seed=4, block_rows=block_rows, workers=workers)
    expected = item_ids[reference_leaf_order(embeddings, seed=4)]
    np.testing.assert_array_equal(tree.leaf_item_ids[tree.leaf_valid], expected)


@pytest.mark.parametrize(
    ("gram_width", "cache_rows", "pass_rows"),
    [(0, 1 << 20, 2048), (0, 64, 2048), (64, 64, 2048), (1 << 20, 1 << 20, 2048),
     (8, 40, 16)],
)
def test_block_regimes_follow_the_reference_rule(monkeypatch, gram_width, cache_rows,
                                                 pass_rows):
    # Rows only, rows in cache-sized runs, Gram matrices from the start, Gram below 8 items,
    # and products cut into 16-row steps: all the same rule.
    monkeypatch.setattr(tree_module, "_GRAM_WIDTH", gram_width)
    monkeypatch.setattr(tree_module, "_CACHE_ROWS", cache_rows)
    monkeypatch.setattr(tree_module, "_PASS_ROWS", pass_rows)
    embeddings, item_ids = random_items(1100, dim=7, seed=21)
    tree = IndexTree.build(embeddings, item_ids, seed=2, block_rows=4096, workers=1)
    expected = item_ids[reference_leaf_order(embeddings, seed=2)]
    np.testing.assert_array_equal(tree.leaf_item_ids[tree.leaf_valid], expected)


@pytest.mark.parametrize("copy_bytes", [0, 700 * 16, 1 << 40])
def test_streamed_node_copies_give_the_same_tree(monkeypatch, copy_bytes):
    # Rows gathered in every pass, copied per node with one node at a time (the budget holds
    # one node of the top levels), and copied with whole nodes per thread: one tree, with the
    # codes addressed through code_rows as well.
    codes, _ = unit_codes(900, seed=7)
    rows = np.random.default_rng(3).permutation(900)[:700]
    item_ids = np.arange(700) + 11
    reference = IndexTree.build_from_codes(codes, item_ids, code_rows=rows, block_rows=40,
                                           workers=1)
    monkeypatch.setattr(tree_module, "_NODE_COPY_BYTES", copy_bytes)
    tree = IndexTree.build_from_codes(codes, item_ids, code_rows=rows, block_rows=40,
                                      workers=2)
    np.testing.assert_array_equal(tree.leaf_item_ids, reference.leaf_item_ids)
    np.testing.assert_array_equal(tree.node_vectors, reference.node_vectors)


def test_duplicate_items_still_give_a_balanced_tree_of_means():
    # Exact ties everywhere (each vector 8 times): the selections fall back to ranks, and
    # the tree keeps its contract.
    rng = np.random.default_rng(5)
    embeddings = np.repeat(rng.normal(size=(40, 6)).astype(np.float32), 8, axis=0)
    item_ids = np.arange(320) + 1
    for block_rows in (4096, 30):
        tree = IndexTree.build(embeddings, item_ids, block_rows=block_rows)
        counts = tree.node_item_counts
        inner = np.arange((1 << tree.depth) - 1)
        np.testing.assert_array_equal(counts[2 * inner + 1], (counts[inner] + 1) // 2)
        np.testing.assert_array_equal(counts[2 * inner + 2], counts[inner] // 2)
        np.testing.assert_array_equal(np.sort(tree.leaf_item_ids[tree.leaf_valid]), item_ids)
        row_of = {int(item): row for row, item in enumerate(item_ids)}
        for node, items in enumerate(items_below(tree)[:63]):
            expected = embeddings[[row_of[item] for item in items]].astype(np.float64).mean(0)
            np.testing.assert_allclose(tree.node_vectors[node], expected, atol=1e-6)


def test_node_means_summed_in_small_groups_are_identical(monkeypatch):
    codes, _ = unit_codes(1000, dim=8, seed=8)
    item_ids = np.arange(1000)
    whole = IndexTree.build_from_codes(codes, item_ids, computed_levels=0)
    monkeypatch.setattr(tree_module, "_SUM_GROUP_LEVELS", 2)
    grouped = IndexTree.build_from_codes(codes, item_ids, computed_levels=0)
    np.testing.assert_array_equal(grouped._node_means, whole._node_means)
    np.testing.assert_array_equal(grouped.node_vectors, whole.vectors_of(
        np.arange(whole.num_nodes)))


def test_streamed_path_with_tiny_pass_steps(monkeypatch):
    # Streamed passes of 7 rows (the memory-bounded path at a small size): same tree.
    monkeypatch.setattr(tree_module, "_PASS_ROWS", 7)
    embeddings, item_ids = random_items(600, dim=9, seed=11)
    stages = []
    tree = IndexTree.build(embeddings, item_ids, block_rows=30, workers=2,
                           on_stage=lambda name, seconds: stages.append(name))
    reference = IndexTree.build(embeddings, item_ids)
    np.testing.assert_array_equal(tree.leaf_item_ids, reference.leaf_item_ids)
    np.testing.assert_allclose(tree.node_vectors, reference.node_vectors, rtol=0, atol=1e-6)
    assert sum("streamed" in name for name in stages) == 5  # levels 0..4 hold > 30 items
    assert any("blocks" in name for name in stages) and "node means" in stages


@pytest.mark.parametrize("block_rows", [4096, 60])
def test_codes_build_equals_float_build_of_unit_vectors(block_rows):
    codes, unit = unit_codes(700, seed=1)
    item_ids = np.arange(700, dtype=np.int64) * 3 + 5
    from_codes = IndexTree.build_from_codes(codes, item_ids, block_rows=block_rows)
    from_floats = IndexTree.build(unit, item_ids, block_rows=block_rows)
    np.testing.assert_array_equal(from_codes.leaf_item_ids, from_floats.leaf_item_ids)
    if block_rows >= 700:  # one in-memory block: the same numbers, bit for bit
        np.testing.assert_array_equal(from_codes.node_vectors, from_floats.node_vectors)
    else:  # streamed top levels differ from the float path only in rounding
        np.testing.assert_allclose(from_codes.node_vectors, from_floats.node_vectors, atol=1e-6)
    # The codes are kept by reference, with one inverse norm per item.
    assert from_codes._items.table is codes
    assert from_codes.nbytes < from_floats.nbytes


def test_codes_by_row_index_equal_gathered_codes():
    # A MultimodalCodes-like table: more rows than items, in another order.
    codes, _ = unit_codes(300, seed=2)
    rng = np.random.default_rng(0)
    rows = rng.permutation(300)[:250]
    item_ids = rng.choice(10**6, size=250, replace=False)
    by_index = IndexTree.build_from_codes(codes, item_ids, code_rows=rows, seed=5)
    gathered = IndexTree.build_from_codes(codes[rows], item_ids, seed=5)
    np.testing.assert_array_equal(by_index.leaf_item_ids, gathered.leaf_item_ids)
    np.testing.assert_array_equal(by_index.node_vectors, gathered.node_vectors)


@pytest.mark.parametrize("computed_levels", [0, 2, 20])
def test_vectors_of_are_exact_means_of_unit_vectors(computed_levels):
    codes, unit = unit_codes(77, dim=6, seed=3)
    item_ids = np.arange(1000, 1077)
    tree = IndexTree.build_from_codes(codes, item_ids, computed_levels=computed_levels)
    assert tree.stored_depth == max(tree.depth - 1 - computed_levels, -1)
    row_of = {int(item): row for row, item in enumerate(item_ids)}
    below = items_below(tree)
    vectors = tree.vectors_of(np.arange(tree.num_nodes))
    assert vectors.dtype == np.float32 and vectors.shape == (tree.num_nodes, 6)
    for node, items in enumerate(below):
        if not items:
            np.testing.assert_array_equal(vectors[node], 0.0)
            continue
        # The float64 mean of the float32 unit vectors: float32's rounding is the only error.
        expected = unit[[row_of[item] for item in items]].astype(np.float64).mean(axis=0)
        np.testing.assert_allclose(vectors[node], expected, rtol=2**-23, atol=2**-26)
    leaves = tree.leaf_of(item_ids)
    np.testing.assert_array_equal(tree.vectors_of(leaves), unit)
    # Any shape of node ids; node_vectors is the same heap array.
    picked = np.array([[0, tree.num_nodes - 1], [5, 2]])
    np.testing.assert_array_equal(tree.vectors_of(picked), vectors[picked])
    np.testing.assert_array_equal(tree.node_vectors, vectors)


def test_stored_and_computed_levels_give_identical_vectors():
    embeddings, item_ids = random_items(150, dim=5, seed=12)
    every = IndexTree.build(embeddings, item_ids, computed_levels=0)
    few = IndexTree.build(embeddings, item_ids, computed_levels=6)
    assert few._node_means.shape[0] == (1 << (few.depth - 6)) - 1 < every._node_means.shape[0]
    np.testing.assert_array_equal(few.node_vectors, every.node_vectors)


def test_node_vectors_of_a_large_tree_points_at_vectors_of(monkeypatch):
    embeddings, item_ids = random_items(20, dim=4, seed=13)
    tree = IndexTree.build(embeddings, item_ids)
    monkeypatch.setattr(tree_module, "MAX_DENSE_NODE_BYTES", 100)
    with pytest.raises(ValueError, match=r"float32 \[63, 4\].*vectors_of"):
        _ = tree.node_vectors
    assert tree.vectors_of(np.array([0])).shape == (1, 4)


def test_codes_save_load_round_trip(tmp_path):
    codes, _ = unit_codes(90, dim=8, seed=4)
    item_ids = np.arange(90) + 7
    tree = IndexTree.build_from_codes(codes, item_ids, computed_levels=2)
    tree.save(tmp_path / "codes_tree")  # the suffix is appended
    path = tmp_path / "codes_tree.npz"
    with zipfile.ZipFile(path) as archive:  # uncompressed members, codes kept int8
        assert {info.compress_type for info in archive.infolist()} == {zipfile.ZIP_STORED}
    loaded = IndexTree.load(path)
    assert loaded._items.table.dtype == np.int8 and loaded._items.table.shape == (90, 8)
    assert loaded.stored_depth == tree.stored_depth
    np.testing.assert_array_equal(loaded.leaf_item_ids, tree.leaf_item_ids)
    np.testing.assert_array_equal(loaded.vectors_of(np.arange(tree.num_nodes)),
                                  tree.vectors_of(np.arange(tree.num_nodes)))
    np.testing.assert_array_equal(loaded.ancestors(item_ids), tree.ancestors(item_ids))


def test_version_1_files_still_load(tmp_path):
    embeddings, item_ids = random_items(13, seed=14)
    tree = IndexTree.build(embeddings, item_ids)
    np.savez(tmp_path / "v1.npz", format_version=np.int64(1), node_vectors=tree.node_vectors,
             leaf_item_ids=tree.leaf_item_ids, leaf_valid=tree.leaf_valid)
    loaded = IndexTree.load(tmp_path / "v1.npz")
    np.testing.assert_array_equal(loaded.node_vectors, tree.node_vectors)
    # Saved again, it is a compact (version 2) file with the same vectors.
    loaded.save(tmp_path / "v2.npz")
    again = IndexTree.load(tmp_path / "v2.npz")
    np.testing.assert_array_equal(again.node_vectors, tree.node_vectors)
    np.testing.assert_array_equal(again.leaf_item_ids, tree.leaf_item_ids)


@pytest.mark.parametrize(
    ("codes", "kwargs", "match"),
    [
        (np.zeros((3, 4), np.int8), {}, "all-zero codes"),
        (np.ones((3, 4), np.float32), {}, "codes must be int8"),
        (np.ones((3, 4), np.int8), {"code_rows": np.array([0, 3])}, "code_rows must be rows"),
        (np.ones((3, 4), np.int8), {"block_rows": 0}, "block_rows must be an int >= 1"),
    ],
)
def test_build_from_codes_rejects_bad_input(codes, kwargs, match):
    num_items = len(kwargs.get("code_rows", codes))
    with pytest.raises(ValueError, match=match):
        IndexTree.build_from_codes(codes, np.arange(num_items), **kwargs)


def test_tree_bench_reports_every_stage():
    result = tree_bench.run(3000, dim=8, num_clusters=16, block_rows=500, verbose=False)
    assert result["items"] == 3000 and result["depth"] == 12
    assert result["build_seconds"] > 0 and result["peak_rss_gib"] > 0
    assert [name for name in result["stages"] if "streamed" in name] == [
        "level 0 (streamed, 1 nodes)", "level 1 (streamed, 2 nodes)",
        "level 2 (streamed, 4 nodes)"]
    assert "node means" in result["stages"]
    codes = tree_bench.clustered_codes(1000, dim=8, num_clusters=4)
    assert codes.dtype == np.int8 and codes.shape == (1000, 8) and codes.any(axis=1).all()


def test_tree_bench_builds_over_a_data_directorys_table(tiny_data_dir):
    from muse_tf.data.artifacts import load_mm_embeddings
    from muse_tf.embeddings.arrays import code_inverse_norms

    _, codes = load_mm_embeddings(tiny_data_dir)
    with_direction = int((code_inverse_norms(codes) > 0).sum())
    result = tree_bench.run(0, verbose=False, data_dir=tiny_data_dir)
    assert result["items"] == with_direction and result["dim"] == codes.shape[1]
    assert result["depth"] == (with_direction - 1).bit_length()
