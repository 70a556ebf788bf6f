"""Tests for muse_tf.models.miss_retrieval: TDM training targets in TF ops, the node-axis
scorer (loss convention, training through ``fit``, config round trip), beam search on a
trained scorer, and the stock-op SavedModel export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from muse_tf import schema
from muse_tf.config import ModelConfig
from muse_tf.data import artifacts
from muse_tf.embeddings import build_vocabularies, multimodal_codes
from muse_tf.embeddings.arrays import normalise_rows
from muse_tf.embeddings.vocabulary import read_vocabulary_ids
from muse_tf.export.retrieval import export_retrieval, serving_signature
from muse_tf.index.beam_search import tree_beam_search
from muse_tf.index.tree import IndexTree
from muse_tf.models.miss_retrieval import (
    AUTO_LEARNED_LEVELS,
    MAX_LEARNED_NODES,
    NODE_IDS,
    NODE_LABELS,
    QUERY_FEATURES,
    MissNodeScorer,
    MissTreeIndex,
    TrainingNodes,
    learned_levels,
)

SEQ_LEN = 12
SMALL = ModelConfig(id_embedding_dim=4, top_k=4, short_term_len=3, num_heads=2, head_dim=4,
                    tower_units=[16], tower_activation="prelu")


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def small_tree() -> IndexTree:
    rng = np.random.default_rng(3)
    return IndexTree.build(rng.normal(size=(11, 5)), np.arange(100, 111))


@pytest.fixture(scope="module")
def world(tiny_data_dir, tmp_path_factory):
    """Vocabularies, multimodal table and tree of the tiny data directory."""
    model_dir = tmp_path_factory.mktemp("miss_model")
    mm_ids, mm_vectors = artifacts.load_mm_embeddings(tiny_data_dir)
    vocabularies = build_vocabularies(tiny_data_dir, str(model_dir / "vocab"),
                                      mm_item_ids=mm_ids)
    table = multimodal_codes(read_vocabulary_ids(vocabularies["item"]), mm_ids, mm_vectors)
    tree = IndexTree.build(normalise_rows(mm_vectors), mm_ids)
    categories = np.random.default_rng(8).integers(1, 30, len(mm_ids))
    return {"vocabularies": vocabularies, "table": table, "tree": tree, "mm_ids": mm_ids,
            "categories": (mm_ids, categories)}


def make_queries(tree: IndexTree, batch: int, seed: int) -> dict[str, tf.Tensor]:
    """Random users whose histories hold tree items (and unknown ids, and padding)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, SEQ_LEN + 1, batch).astype(np.int32)
    lengths[0] = SEQ_LEN
    pool = np.concatenate([tree.item_ids, [12345, 67890]])
    items = rng.choice(pool, size=(batch, SEQ_LEN))
    categories = rng.integers(1, 1000, size=(batch, SEQ_LEN))
    padding = np.arange(SEQ_LEN)[None, :] >= lengths[:, None]
    out = {schema.HISTORY_ITEM_ID.name: np.where(padding, 0, items).astype(np.int64),
           schema.HISTORY_CATEGORY.name: np.where(padding, 0, categories).astype(np.int64),
           schema.HISTORY_LENGTH: lengths}
    for feature in schema.USER_SIDE_FEATURES:
        out[feature.name] = rng.integers(1, 10**6, batch).astype(np.int64)
    return {name: tf.constant(value) for name, value in out.items()}


def make_batches(tree: IndexTree, count: int, batch: int, negatives: int = 2,
                 seed: int = 0) -> list[dict[str, tf.Tensor]]:
    """Training inputs: random users, clicked tree items, their node targets."""
    targets = TrainingNodes(tree, negatives)
    rng = np.random.default_rng(seed)
    out = []
    for step in range(count):
        nodes, labels = targets(tf.constant(rng.choice(tree.item_ids, batch)), [seed, step])
        out.append({**make_queries(tree, batch, seed=1000 * seed + step), NODE_IDS: nodes,
                    NODE_LABELS: labels})
    return out


def as_dataset(batches: list[dict[str, tf.Tensor]]) -> tf.data.Dataset:
    dataset = tf.data.Dataset.from_tensors(batches[0])
    for batch in batches[1:]:
        dataset = dataset.concatenate(tf.data.Dataset.from_tensors(batch))
    return dataset


#: Levels 0 .. 2 of the depth-6 tree learned; 3 .. 6 computed from the items (and the node
#: vectors below the tree's stored means, level 0: computed_levels=5).
PARTIAL_LEVELS = 2


def new_scorer(world, seed: int = 0, rates: tuple[float, float] = (0.01, 0.01),
               learned_node_levels: int = AUTO_LEARNED_LEVELS, **kwargs) -> MissNodeScorer:
    tf.keras.utils.set_random_seed(seed)
    scorer = MissNodeScorer(SMALL, world["vocabularies"], mm_table=world["table"],
                            tree=world["tree"], learned_node_levels=learned_node_levels,
                            item_categories=world["categories"], **kwargs)
    scorer.compile_with_learning_rates(*rates)
    return scorer


def trained_scorer(world, learned_node_levels: int) -> MissNodeScorer:
    batches = make_batches(world["tree"], 6, 8)
    scorer = new_scorer(world, learned_node_levels=learned_node_levels)
    scorer.build_for(batches[0])
    history = scorer.fit(as_dataset(batches), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    return scorer


@pytest.fixture(scope="module")
def trained(world):
    """A scorer trained with ``fit`` for a few steps on random users with clicked tree items
    (the automatic rule: every level of the small tree learned)."""
    return trained_scorer(world, AUTO_LEARNED_LEVELS)


@pytest.fixture(scope="module")
def partial(world):
    """As ``trained``, with learned rows for levels 0 .. PARTIAL_LEVELS only."""
    scorer = trained_scorer(world, PARTIAL_LEVELS)
    assert scorer.learned_node_levels == PARTIAL_LEVELS < world["tree"].depth
    assert scorer.stored_multimodal_depth == world["tree"].stored_depth == 0
    return scorer


#: Both trained scorers, for the tests that hold for either.
SCORERS = pytest.mark.parametrize("scorer_fixture", ["trained", "partial"])


# ------------------------------------------------------------------------------ targets


def test_training_nodes_positives_are_ancestors_and_negatives_share_their_level(small_tree):
    tree = small_tree
    items = np.array([100, 105, 110, 105])
    targets = TrainingNodes(tree, 3)
    nodes, labels = (x.numpy() for x in targets(tf.constant(items), [0, 0]))
    assert nodes.dtype == np.int32 and labels.dtype == np.float32
    assert nodes.shape == labels.shape == (4, tree.depth * 4) == (4, targets.width)
    per_level = nodes.reshape(4, tree.depth, 4)
    np.testing.assert_array_equal(per_level[..., 0], tree.ancestors(items))  # root excluded
    np.testing.assert_array_equal(labels.reshape(4, tree.depth, 4),
                                  np.broadcast_to([1.0, 0, 0, 0], (4, tree.depth, 4)))
    levels = tree.level_of(per_level)
    np.testing.assert_array_equal(levels, np.broadcast_to(
        np.arange(1, tree.depth + 1)[None, :, None], levels.shape))
    negatives = per_level[..., 1:]
    assert np.all(negatives != per_level[..., :1])
    assert np.all(tree.node_valid[negatives])  # never a padding slot


def test_training_nodes_negatives_cover_each_level_uniformly(small_tree):
    tree = small_tree
    nodes, _ = TrainingNodes(tree, 2)(tf.fill([3000], tf.constant(103, tf.int64)), [1, 2])
    per_level = nodes.numpy().reshape(3000, tree.depth, 3)
    for level in range(1, tree.depth + 1):
        first, end = tree.level_range(level)
        valid = {n for n in range(first, end) if tree.node_valid[n]}
        others = sorted(valid - {int(per_level[0, level - 1, 0])})
        drawn, counts = np.unique(per_level[:, level - 1, 1:], return_counts=True)
        assert drawn.tolist() == others
        # Uniform over the others: every count within 5 standard deviations of its mean.
        mean = 6000 / len(others)
        assert np.all(np.abs(counts - mean) < 5 * np.sqrt(mean)), (level, counts)


def test_training_nodes_are_deterministic_in_the_seed_and_reject_unknown_items(small_tree):
    targets = TrainingNodes(small_tree, 2)
    items = tf.constant([100, 101, 109], tf.int64)
    first = targets(items, [7, 3])[0].numpy()
    np.testing.assert_array_equal(targets(items, [7, 3])[0].numpy(), first)
    assert not np.array_equal(targets(items, [7, 4])[0].numpy(), first)
    np.testing.assert_array_equal(targets.contains(tf.constant([100, 99, 110], tf.int64)).numpy(),
                                  [True, False, True])
    # Below the first id, past the last, between ids, any shape (binary search, not a table).
    probe = tf.constant([[111, 105], [-5, 2**62]], tf.int64)
    np.testing.assert_array_equal(targets.contains(probe).numpy(), [[False, True], [False, False]])
    # The positives of an id are those of its own leaf, wherever it sits in the sorted ids.
    for item in (100, 105, 110):
        leaf = small_tree.item_leaf[np.searchsorted(small_tree.item_ids, item)]
        nodes = targets(tf.constant([item], tf.int64), [1, 1])[0].numpy()[0]
        assert nodes[(targets.depth - 1) * 3] == leaf
    with pytest.raises(tf.errors.InvalidArgumentError, match="not in the tree"):
        targets(tf.constant([100, 99], tf.int64), [0, 0])


def test_training_nodes_reject_a_one_item_tree_and_bad_counts(small_tree):
    tree = IndexTree.build(np.ones((1, 3)), np.array([7]))
    with pytest.raises(ValueError, match="depth 0"):
        TrainingNodes(tree, 2)
    with pytest.raises(ValueError, match="negatives_per_level must be an int >= 1"):
        TrainingNodes(small_tree, 0)


# ------------------------------------------------------------------------------ scorer


@SCORERS
def test_node_axis_equals_scoring_each_node_alone(world, scorer_fixture, request):
    trained = request.getfixturevalue(scorer_fixture)
    tree = world["tree"]
    queries = make_queries(tree, 3, seed=11)
    nodes = np.random.default_rng(4).integers(0, tree.num_nodes, (3, 7)).astype(np.int32)
    together = trained({**queries, NODE_IDS: nodes}).numpy()
    assert together.shape == (3, 7)
    for m in range(7):
        alone = trained({**queries, NODE_IDS: nodes[:, m:m + 1]}).numpy()
        np.testing.assert_allclose(together[:, m], alone[:, 0], rtol=1e-5, atol=1e-5)


def test_scorer_ignores_padding_and_reads_the_node_vectors(world, trained):
    tree = world["tree"]
    queries = make_queries(tree, 4, seed=5)
    nodes = tf.constant(np.tile(np.arange(1, 7, dtype=np.int32), (4, 1)))
    base = trained({**queries, NODE_IDS: nodes}).numpy()
    # Values behind hist_len are padding: changing them changes nothing.
    lengths = queries[schema.HISTORY_LENGTH].numpy()
    padding = np.arange(SEQ_LEN)[None, :] >= lengths[:, None]
    noisy = dict(queries)
    for name in (schema.HISTORY_ITEM_ID.name, schema.HISTORY_CATEGORY.name):
        noisy[name] = tf.where(padding, tf.constant(int(tree.item_ids[0]), tf.int64),
                               queries[name])
    np.testing.assert_allclose(trained({**noisy, NODE_IDS: nodes}).numpy(), base, atol=1e-6)
    # The MM-GSU reads the (re-normalised) node vectors.
    expected = normalise_rows(tree.node_vectors)
    np.testing.assert_allclose(trained.node_mm.numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(expected[:tree.num_nodes - 2**tree.depth], axis=1),
                               1.0, atol=1e-5)


def test_loss_is_the_mean_over_user_node_pairs(world, trained):
    batch = make_batches(world["tree"], 1, 5, negatives=3, seed=9)[0]
    logits = trained(batch).numpy().astype(np.float64)
    labels = batch[NODE_LABELS].numpy()
    expected = np.mean(np.maximum(logits, 0) - logits * labels + np.log1p(np.exp(-abs(logits))))
    assert float(trained.compute_loss(batch)) == pytest.approx(expected, rel=1e-5)


def test_fit_history_loss_is_the_epoch_mean_of_the_batch_losses(world):
    # Learning rates so small the weights do not move: each step's loss is compute_loss of
    # its batch, and History's figure (= the progress bar's last value) is their mean.
    batches = make_batches(world["tree"], 4, 6, seed=3)
    scorer = new_scorer(world, rates=(1e-12, 1e-12))
    scorer.build_for(batches[0])
    expected = np.mean([float(scorer.compute_loss(b)) for b in batches])
    history = scorer.fit(as_dataset(batches), epochs=1, verbose=0)
    assert history.history["loss"][0] == pytest.approx(expected, rel=1e-4)
    assert 0.1 < expected < 2.0  # a per-pair mean, not a sum over the batch
    assert 0.0 <= history.history["auc"][0] <= 1.0


@pytest.mark.parametrize("learned_node_levels", [AUTO_LEARNED_LEVELS, PARTIAL_LEVELS])
def test_fit_lowers_the_loss_and_trains_every_part(world, learned_node_levels):
    batches = make_batches(world["tree"], 1, 6, seed=2)
    scorer = new_scorer(world, seed=1, rates=(0.02, 0.02),
                        learned_node_levels=learned_node_levels)
    scorer.build_for(batches[0])
    before = {v.name: v.numpy().copy() for v in scorer.trainable_variables}
    first = float(scorer.compute_loss(batches[0]))
    scorer.fit(as_dataset(batches).repeat(15), epochs=1, verbose=0)
    assert float(scorer.compute_loss(batches[0])) < 0.7 * first
    changed = {v.name for v in scorer.trainable_variables
               if not np.array_equal(before[v.name], v.numpy())}
    for part in ("id_embedding_item", "id_embedding_category", "node_embedding", "tower",
                 "esu_target_attention"):
        assert any(part in name for name in changed), (part, sorted(changed))
    assert int(scorer.embedding_optimizer.iterations.numpy()) == 15
    assert {v.name for v in scorer.embedding_variables()} <= changed
    # The frozen parts never change.
    codes = world["table"].rows(0, world["table"].num_rows)
    assert scorer.features.mm_table.storage_dtype == "int8"
    np.testing.assert_array_equal(scorer.features.mm_table.stored_values(), codes)
    stored = scorer.node_mm.shape[0]
    np.testing.assert_allclose(scorer.node_mm.numpy(),
                               normalise_rows(world["tree"].node_vectors)[:stored])


@SCORERS
def test_config_round_trip_rebuilds_the_scorer_from_its_weights(world, scorer_fixture, request,
                                                                 tmp_path):
    trained = request.getfixturevalue(scorer_fixture)
    config = trained.get_config()
    json.dumps(config)
    clone = MissNodeScorer.from_config(config)
    assert clone.get_config() == config
    assert clone.num_nodes == world["tree"].num_nodes
    # Rebuilt with zeros for the frozen table and node vectors; they come back as weights.
    assert not np.any(clone.node_mm.numpy()) and not np.any(
        clone.features.mm_table.stored_values())
    batch = make_batches(world["tree"], 1, 4, seed=5)[0]
    clone.build_for(batch)
    path = str(tmp_path / "weights")
    trained.save_weights(path)
    clone.load_weights(path).assert_existing_objects_matched()
    np.testing.assert_allclose(clone(batch).numpy(), trained(batch).numpy(), rtol=1e-6,
                               atol=1e-6)
    np.testing.assert_array_equal(clone.features.mm_table.stored_values(),
                                  world["table"].rows(0, world["table"].num_rows))
    serialized = tf.keras.utils.serialize_keras_object(trained)
    assert serialized["registered_name"] == "muse_tf>MissNodeScorer"


def test_scorer_input_errors_name_the_problem(world, trained):
    tree = world["tree"]
    queries = make_queries(tree, 2, seed=1)
    with pytest.raises(ValueError, match=NODE_IDS):
        trained(queries)
    with pytest.raises(ValueError, match=r"node_ids must be \[batch, nodes\]"):
        trained.score_nodes(trained.encode_user(queries), tf.constant([1, 2]))
    with pytest.raises(ValueError, match=NODE_LABELS):
        trained.compute_loss({**queries, NODE_IDS: tf.constant([[1], [2]])})
    with pytest.raises(ValueError, match="top_k >= 2"):
        MissNodeScorer(ModelConfig(top_k=1), world["vocabularies"], tree.node_vectors)
    with pytest.raises(ValueError, match="node_vectors must be"):
        MissNodeScorer(SMALL, world["vocabularies"], np.zeros((3, 5)))
    with pytest.raises(ValueError, match="node_vectors, a tree or a positive num_nodes"):
        MissNodeScorer(SMALL, world["vocabularies"])
    with pytest.raises(ValueError, match="vocabularies missing"):
        MissNodeScorer(SMALL, {}, tree.node_vectors)
    with pytest.raises(ValueError, match="node_vectors or tree, not both"):
        MissNodeScorer(SMALL, world["vocabularies"], tree.node_vectors, tree=tree)
    with pytest.raises(ValueError, match=r"num_nodes=100 is not 2\*\*\(depth \+ 1\) - 1"):
        MissNodeScorer(SMALL, world["vocabularies"], num_nodes=100)
    with pytest.raises(ValueError, match=r"node_vectors fill every level.*need the tree"):
        MissNodeScorer(SMALL, world["vocabularies"], tree.node_vectors,
                       stored_multimodal_depth=2)
    for source in ({"node_vectors": tree.node_vectors}, {"num_nodes": tree.num_nodes}):
        with pytest.raises(ValueError, match="learned_node_levels < depth needs the tree"):
            MissNodeScorer(SMALL, world["vocabularies"], learned_node_levels=2, **source)
    with pytest.raises(ValueError, match=r"stored_multimodal_depth must be an int in \[-1, "
                                         r"depth=6\], got 7"):
        MissNodeScorer(SMALL, world["vocabularies"], tree=tree, stored_multimodal_depth=7)
    with pytest.raises(ValueError, match="learned_node_levels must be an int >= 0, or -1"):
        MissNodeScorer(SMALL, world["vocabularies"], tree=tree, learned_node_levels=-2)
    with pytest.raises(ValueError, match=r"item_categories must be two \[N\] arrays"):
        MissNodeScorer(SMALL, world["vocabularies"], tree=tree, learned_node_levels=1,
                       item_categories=(np.arange(3), np.arange(2)))


# ------------------------------------------------------------------------------ node tables


@pytest.mark.parametrize(("depth", "requested", "expected"), [
    (6, AUTO_LEARNED_LEVELS, 6), (21, AUTO_LEARNED_LEVELS, 21), (22, AUTO_LEARNED_LEVELS, 21),
    (26, AUTO_LEARNED_LEVELS, 21), (26, 0, 0), (26, 23, 23), (6, 9, 6)])
def test_learned_levels_follow_the_auto_rule_or_the_request(depth, requested, expected):
    learned = learned_levels(depth, requested)
    assert learned == expected
    if requested == AUTO_LEARNED_LEVELS:
        # Every level while the tree fits, else the deepest level that keeps the bound.
        assert (2 << learned) - 1 <= MAX_LEARNED_NODES
        assert learned == depth or (4 << learned) - 1 > MAX_LEARNED_NODES
    for bad in (-2, True, 1.5):
        with pytest.raises(ValueError, match="learned_node_levels must be an int >= 0"):
            learned_levels(depth, bad)


def test_auto_rule_keeps_a_small_tree_fully_tabulated(world):
    # The scorer from the tree is the scorer from its dense node vectors: the same weights
    # (names, shapes, initial values), no leaf tables, the same logits.
    tree = world["tree"]
    batch = make_batches(tree, 1, 4, seed=6)[0]
    tf.keras.utils.set_random_seed(3)
    dense = MissNodeScorer(SMALL, world["vocabularies"], tree.node_vectors,
                           mm_table=world["table"])
    dense_logits = dense(batch).numpy()  # builds the remaining weights from the same seed
    tf.keras.utils.set_random_seed(3)
    auto = MissNodeScorer(SMALL, world["vocabularies"], mm_table=world["table"], tree=tree,
                          item_categories=world["categories"])
    np.testing.assert_array_equal(auto(batch).numpy(), dense_logits)
    assert auto.learned_node_levels == auto.stored_multimodal_depth == tree.depth
    assert not auto.needs_leaves and auto.leaf_rows is None and auto.item_category_rows is None
    def layout(scorer: MissNodeScorer) -> list[tuple[str, tf.TensorShape]]:
        return [(w.name.removeprefix(f"{scorer.name}/"), w.shape) for w in scorer.weights]

    assert layout(auto) == layout(dense)
    assert auto.node_embedding.input_dim == auto.node_mm.shape[0] == tree.num_nodes
    np.testing.assert_array_equal(auto.node_mm.numpy(), dense.node_mm.numpy())
    assert auto.get_config() == {**dense.get_config(), "name": auto.name}


def reference_node_tables(scorer: MissNodeScorer, tree: IndexTree, categories
                          ) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    """NumPy ``(e_n [num_nodes, 2E], v_n [num_nodes, D])`` of every node, and the item ID
    embedding rows under each node: learned rows at levels <= S, else the mean of the items'
    item ⊕ category ID embeddings; stored vectors at levels <= K, else
    normalise(tree.vectors_of)."""
    features = scorer.features
    item_table = features.embeddings["item"].embeddings.numpy()
    category_table = features.embeddings["category"].embeddings.numpy()
    lookup = features.item_lookup
    item_ids, category_ids = categories
    item_rows = dict(zip(item_ids.tolist(),
                         lookup.lookup_all(tf.constant(item_ids)).numpy().tolist(), strict=True))
    category_rows = dict(zip(item_ids.tolist(), features.lookup(
        "category", tf.constant(category_ids)).numpy().tolist(), strict=True))
    learned = scorer.node_embedding.embeddings.numpy()
    stored = scorer.node_mm.numpy()
    embeddings, rows_under = [], []
    for node in range(tree.num_nodes):
        level = int(tree.level_of(np.array([node]))[0])
        span = 1 << (tree.depth - level)
        first = (node + 1) * span - (1 << tree.depth)
        items = [int(tree.leaf_item_ids[s]) for s in range(first, first + span)
                 if tree.leaf_valid[s]]
        rows_under.append([int(lookup.embedded_rows(item_rows[i])) for i in items])
        if level <= scorer.learned_node_levels:
            embeddings.append(learned[node])
        elif not items:
            embeddings.append(np.zeros(learned.shape[1], np.float32))
        else:
            embeddings.append(np.mean([np.concatenate([
                item_table[row], category_table[category_rows[i]]])
                for row, i in zip(rows_under[-1], items, strict=True)], axis=0))
    vectors = normalise_rows(tree.vectors_of(np.arange(tree.num_nodes)))
    vectors[:stored.shape[0]] = stored
    return np.stack(embeddings), vectors, rows_under


@pytest.mark.parametrize(("learned_node_levels", "stored_multimodal_depth"),
                         [(0, -1), (PARTIAL_LEVELS, None), (5, 2), (6, 3)])
def test_node_tables_equal_a_numpy_reference_at_every_level(world, learned_node_levels,
                                                            stored_multimodal_depth):
    tree = world["tree"]
    scorer = new_scorer(world, learned_node_levels=learned_node_levels,
                        stored_multimodal_depth=stored_multimodal_depth)
    depth = tree.depth
    expected_stored = 0 if stored_multimodal_depth is None else stored_multimodal_depth
    assert scorer.stored_multimodal_depth == expected_stored
    assert scorer.node_embedding.input_dim == (2 << learned_node_levels) - 1
    assert scorer.node_mm.shape[0] == (1 << (expected_stored + 1)) - 1
    assert scorer.leaf_rows.shape == (1 << depth,)
    assert (scorer.item_category_rows is None) == (learned_node_levels == depth)
    np.testing.assert_allclose(scorer.node_mm.numpy(),
                               normalise_rows(tree.vectors_of(np.arange(scorer.node_mm.shape[0]))))
    nodes = np.random.default_rng(2).permutation(tree.num_nodes).astype(np.int32)
    with tf.GradientTape() as tape:
        embeddings, vectors = scorer.node_features(nodes.reshape(1, -1))
        total = tf.reduce_sum(embeddings)
    expected_embeddings, expected_vectors, rows_under = reference_node_tables(
        scorer, tree, world["categories"])
    assert embeddings.shape == (1, tree.num_nodes, 2 * SMALL.id_embedding_dim)
    np.testing.assert_allclose(embeddings.numpy()[0], expected_embeddings[nodes], rtol=1e-6,
                               atol=1e-7)
    # The direction of IndexTree.vectors_of at every level (float rounding only).
    np.testing.assert_allclose(vectors.numpy()[0], expected_vectors[nodes], rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(vectors.numpy()[0][tree.node_valid[nodes]],
                                              axis=1), 1.0, atol=1e-6)
    # Gradients reach the item embeddings through the computed nodes: d sum(e_n) / d E[r] =
    # sum over the computed nodes above item row r of 1 / (items under the node).
    item_table = scorer.features.embeddings["item"].embeddings
    gradient = tape.gradient(total, item_table)
    gradient = (np.zeros(item_table.shape) if gradient is None
                else tf.convert_to_tensor(gradient).numpy())
    expected = np.zeros(item_table.shape[0])
    levels = tree.level_of(np.arange(tree.num_nodes))
    for node, rows in enumerate(rows_under):
        if levels[node] > learned_node_levels:
            for row in rows:
                expected[row] += 1.0 / len(rows)
    np.testing.assert_allclose(gradient, np.repeat(expected[:, None], gradient.shape[1], 1),
                               rtol=1e-5, atol=1e-6)


def test_graphs_hold_the_per_item_arrays_as_variables_and_tables(world, partial):
    # A captured constant would be serialised into the tf.data / SavedModel graph (2 GB
    # proto limit at 35.4M items); variables and tables are captured as resource handles.
    tree = world["tree"]
    targets = TrainingNodes(tree, 2)
    index = MissTreeIndex(partial, tree, beam_width=3, top_n=4)
    queries = make_queries(tree, 2, seed=3)
    functions = [
        tf.function(lambda ids: targets(ids, tf.constant([0, 0], tf.int64))
                    ).get_concrete_function(tf.TensorSpec([None], tf.int64)),
        tf.function(lambda q: index(q)[1]).get_concrete_function(serving_signature(SEQ_LEN)),
        tf.function(lambda b: partial(b)).get_concrete_function(
            {**{k: tf.TensorSpec(v.shape, v.dtype) for k, v in queries.items()},
             NODE_IDS: tf.TensorSpec([None, None], tf.int32)}),
    ]
    for function in functions:
        arrays = [t for t in function.captured_inputs
                  if t.dtype != tf.resource and t.shape.num_elements() >= tree.num_items]
        assert not arrays, [t.shape for t in arrays]
        constants = [op for op in function.graph.get_operations() if op.type == "Const"
                     and op.outputs[0].shape.num_elements() >= tree.num_items]
        assert not constants, [op.name for op in constants]


# ------------------------------------------------------------------------------ beam search


def exhaustive_top(scorer: MissNodeScorer, tree: IndexTree, queries, top_n: int):
    leaves = tree.valid_leaf_nodes.astype(np.int32)
    batch = int(queries[schema.HISTORY_LENGTH].shape[0])
    logits = scorer({**queries, NODE_IDS: np.tile(leaves, (batch, 1))}).numpy()
    order = np.argsort(-logits, axis=1, kind="stable")[:, :top_n]
    return tree.items_of_leaves(leaves[order]), np.take_along_axis(logits, order, axis=1)


@SCORERS
def test_beam_covering_a_level_equals_exhaustive_scoring(world, scorer_fixture, request):
    trained = request.getfixturevalue(scorer_fixture)
    tree = world["tree"]
    queries = make_queries(tree, 5, seed=21)
    expected_ids, expected_scores = exhaustive_top(trained, tree, queries, 10)
    # beam_width >= 2**(depth-1) covers the level above the leaves: every leaf is scored.
    for beam_width, start_level in [(2 ** (tree.depth - 1), None), (2 ** (tree.depth - 1), 2),
                                    (4, tree.depth)]:
        index = MissTreeIndex(trained, tree, beam_width, 10, start_level)
        scores, ids = index(queries)
        np.testing.assert_array_equal(ids.numpy(), expected_ids)
        np.testing.assert_allclose(scores.numpy(), expected_scores, rtol=1e-5, atol=1e-5)


def test_pruned_beam_keeps_the_best_children_level_by_level(world, trained):
    tree = world["tree"]
    queries = make_queries(tree, 3, seed=8)
    index = MissTreeIndex(trained, tree, beam_width=3, top_n=4)
    result = index.search(queries)
    assert result.levels == index.levels
    assert index.levels[0] == 2  # the first level with more than 3 nodes
    # Each level's kept nodes are the best-scored children of the previous level's.
    for j in range(1, len(result.levels)):
        parents = result.kept_nodes[j - 1].numpy()
        children = np.concatenate([2 * parents + 1, 2 * parents + 2], axis=1)
        logits = trained({**queries, NODE_IDS: children.astype(np.int32)}).numpy()
        if result.levels[j] == tree.depth:
            valid = tree.node_valid[children]
            logits = np.where(valid, logits, -np.inf)
        keep = result.kept_nodes[j].shape[1]
        best = np.take_along_axis(children, np.argsort(-logits, axis=1, kind="stable")[:, :keep],
                                  axis=1)
        np.testing.assert_array_equal(result.kept_nodes[j].numpy(), best)
    with pytest.raises(ValueError, match="k=5 must be in"):
        index(queries, k=5)


@SCORERS
def test_search_keys_give_the_streaming_scores(world, scorer_fixture, request):
    trained = request.getfixturevalue(scorer_fixture)
    tree = world["tree"]
    queries = make_queries(tree, 4, seed=12)
    nodes = np.random.default_rng(5).integers(0, tree.num_nodes, (4, 9)).astype(np.int32)
    user = trained.encode_user(queries)
    assert user["co_keys"].shape[-1] == 2 * SMALL.id_embedding_dim + 1
    streamed = trained.encode_user(queries, search_keys=False)
    assert "co_keys" not in streamed and "mm_keys" not in streamed
    np.testing.assert_allclose(trained.score_nodes(user, nodes).numpy(),
                               trained.score_nodes(streamed, nodes).numpy(),
                               rtol=1e-5, atol=1e-6)


@SCORERS
def test_beam_search_equals_the_streaming_path(world, scorer_fixture, request):
    trained = request.getfixturevalue(scorer_fixture)
    # The search (GSU keys made once per user) against the path that streams the
    # multimodal table at every level: the same nodes at every level, the same items.
    tree = world["tree"]
    queries = make_queries(tree, 6, seed=13)
    index = MissTreeIndex(trained, tree, beam_width=3, top_n=5)
    result = index.search(queries)
    streamed = trained.encode_user(queries, search_keys=False)
    reference = tree_beam_search(lambda nodes: trained.score_nodes(streamed, nodes),
                                 index.tree_tensors, 3, 5, batch_size=6)
    for got, expected in zip(result.kept_nodes, reference.kept_nodes, strict=True):
        np.testing.assert_array_equal(got.numpy(), expected.numpy())
    np.testing.assert_array_equal(result.item_ids.numpy(), reference.item_ids.numpy())
    np.testing.assert_allclose(result.scores.numpy(), reference.scores.numpy(), rtol=1e-5,
                               atol=1e-6)


def test_index_rejects_a_scorer_of_another_tree(world, trained):
    other = IndexTree.build(np.eye(3), np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="trained on another tree"):
        MissTreeIndex(trained, other, 4, 2)


# ------------------------------------------------------------------------------ export


@pytest.mark.slow
@SCORERS
def test_export_reloads_without_muse_tf_or_scann_and_returns_the_same_items(
        world, scorer_fixture, request, tmp_path):
    trained = request.getfixturevalue(scorer_fixture)
    tree = world["tree"]
    index = MissTreeIndex(trained, tree, beam_width=4, top_n=6)
    version_dir = export_retrieval(index, str(tmp_path / "miss_retrieval"), k=6,
                                   max_seq_len=SEQ_LEN)
    assert version_dir.endswith(os.path.join("miss_retrieval", "1"))
    assert os.path.exists(os.path.join(version_dir, "assets.extra", "tf_serving_warmup_requests"))
    with open(os.path.join(version_dir, "assets.extra", "muse_tf_signature.json")) as f:
        info = json.load(f)
    assert info["model_name"] == "miss_retrieval" and info["k"] == 6
    assert info["needs_scann_ops"] is False
    assert set(info["inputs"]) == set(QUERY_FEATURES)
    with pytest.raises(FileExistsError, match="version 1 exists"):
        export_retrieval(index, str(tmp_path / "miss_retrieval"), k=6, max_seq_len=SEQ_LEN,
                         version=1)
    queries = make_queries(tree, 4, seed=30)
    expected_scores, expected_ids = index(queries)
    np.savez(tmp_path / "inputs.npz", **{k: v.numpy() for k, v in queries.items()})
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        import tensorflow as tf
        loaded = tf.saved_model.load({version_dir!r})
        fn = loaded.signatures["serving_default"]
        inputs = dict(np.load({str(tmp_path / "inputs.npz")!r}))
        out = fn(**{{k: tf.constant(v) for k, v in inputs.items()}})
        np.savez({str(tmp_path / "outputs.npz")!r}, **{{k: v.numpy() for k, v in out.items()}})
        ops = {{n.op for f in loaded.signatures["serving_default"].graph.as_graph_def().library
                .function for n in f.node_def}}
        print(json.dumps({{"modules": sorted(m for m in sys.modules
                                             if m.split(".")[0] in ("muse_tf", "scann")),
                           "inputs": sorted(fn.structured_input_signature[1]),
                           "scann_ops": sorted(o for o in ops if "Scann" in o)}}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, cwd=str(tmp_path), timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"modules": [], "inputs": sorted(QUERY_FEATURES), "scann_ops": []}
    outputs = np.load(tmp_path / "outputs.npz")
    np.testing.assert_array_equal(outputs["item_ids"], expected_ids.numpy())
    np.testing.assert_allclose(outputs["scores"], expected_scores.numpy(), rtol=1e-5, atol=1e-5)
    assert set(serving_signature(SEQ_LEN)) == set(QUERY_FEATURES)


@pytest.mark.parametrize("stored_multimodal_depth", [None, "depth"], ids=["stored", "all"])
def test_item_codes_are_released_once_the_tables_no_longer_read_them(world, tiny_data_dir,
                                                                     stored_multimodal_depth):
    mm_ids, mm_vectors = artifacts.load_mm_embeddings(tiny_data_dir)
    tree = IndexTree.build(normalise_rows(mm_vectors), mm_ids)   # its own: it is released
    depth = tree.depth if stored_multimodal_depth == "depth" else stored_multimodal_depth
    # "all": node tables read computed levels too, so the release must wait for them.
    assert tree.stored_depth < tree.depth
    seen = []

    def release() -> None:   # what the run does: the tree's item vectors go
        seen.append(None)
        tree.release_item_vectors()

    reference = new_scorer({**world, "tree": tree}, learned_node_levels=PARTIAL_LEVELS,
                           stored_multimodal_depth=depth)
    released = new_scorer({**world, "tree": tree}, learned_node_levels=PARTIAL_LEVELS,
                          stored_multimodal_depth=depth, release_item_codes=release)
    assert len(seen) == 1
    # Same tables either way: nothing read the codes after they went (when released early,
    # the node tables came from the stored rows alone).
    for mine, theirs in zip(released.weights, reference.weights, strict=True):
        np.testing.assert_array_equal(mine.numpy(), theirs.numpy())
    stored = np.arange((2 << tree.stored_depth) - 1)   # the stored rows stay readable
    assert tree.vectors_of(stored).shape == (stored.size, tree.dim)
    with pytest.raises(RuntimeError, match="item vectors were released"):   # below them
        tree.vectors_of(np.array([tree.num_nodes - 1]))
