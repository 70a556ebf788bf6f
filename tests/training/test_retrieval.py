"""Tests for muse_tf.training.retrieval and retrieval_data (and the retrieval-compare table):
recall bookkeeping, click counts and the two-tower's sampling probabilities (logQ
correction), the tf.data training pipelines, and tiny end-to-end runs of
both retrieval experiments (plumbing: on the tiny data the beam covers the whole tree, so
recall there says nothing about learning; test_retrieval_learning.py checks that)."""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import pytest
import tensorflow as tf

from muse_tf import config as config_lib
from muse_tf import schema
from muse_tf.data.data_dir import DataDir
from muse_tf.export.retrieval import (
    BRUTE_FORCE_MODEL_NAME,
    MISS_MODEL_NAME,
    SCANN_MODEL_NAME,
)
from muse_tf.index.tree import IndexTree
from muse_tf.models.miss_retrieval import NODE_IDS, NODE_LABELS, QUERY_FEATURES, TrainingNodes
from muse_tf.training import evaluation, retrieval_data
from muse_tf.training import retrieval as retrieval_train
from muse_tf.training.comparison import format_table

from .clustered_data import write_clustered_data_dir
from .test_retrieval_learning import SETTINGS as LEARNING_SETTINGS

TINY = ["data.batch_size=8", "model.top_k=4", "model.id_embedding_dim=4",
        "model.tower_units=[16]", "model.short_term_len=4", "train.epochs=2", "train.verbose=0"]


def clicked(tiny_data, split: str) -> list[int]:
    return [context["item_id"] for context, _ in tiny_data.records[split] if context["label"]]


def test_recall_report_handles_short_lists():
    retrieved = np.array([[1, 2, 3], [4, 5, 6]])
    targets = np.array([3, 9])
    # The list holds the whole 3-item catalogue: recall@50 = recall@3.
    assert evaluation.recall_report(retrieved, targets, 3, (2, 50)) == {
        "recall@2": 0.0, "recall@50": 0.5}
    # A 3-item list out of a 10-item catalogue says nothing about recall@50.
    assert evaluation.recall_report(retrieved, targets, 10, (3, 50)) == {
        "recall@3": 0.5, "recall@50": None}


def test_popularity_recall_uses_the_same_list_for_every_query():
    popular, targets = np.array([7, 8, 9]), np.array([8, 1, 9, 9])
    # A 2-item list out of 100 items says nothing about recall@50.
    assert evaluation.popularity_recall(popular, targets, 2, 100) == {
        "recall@50": None, "recall@100": None, "recall@200": None}
    # Only 3 items were ever clicked: the list of all of them is complete.
    assert evaluation.popularity_recall(popular, targets, 200, 100) == {
        "recall@50": 0.75, "recall@100": 0.75, "recall@200": 0.75}
    assert evaluation.popularity_recall(popular[:0], targets, 200, 100)["recall@50"] == 0


def test_click_counts_match_the_records(tiny_data):
    ids, counts = retrieval_train.click_counts(tiny_data.path, "train")
    expected = Counter(clicked(tiny_data, "train"))
    assert dict(zip(ids.tolist(), counts.tolist(), strict=True)) == dict(expected)
    assert np.all(np.diff(counts) <= 0)


def test_item_categories_are_each_items_most_frequent_category(tiny_data):
    items, categories = retrieval_data.item_categories(tiny_data.path, "train")
    seen: dict[int, Counter] = {}
    for context, _ in tiny_data.records["train"]:
        seen.setdefault(context["item_id"], Counter())[context["item_category"]] += 1
    expected = {item: min(c, key=lambda cat: (-c[cat], cat)) for item, c in seen.items()}
    assert dict(zip(items.tolist(), categories.tolist(), strict=True)) == expected
    assert np.all(np.diff(items) > 0)


def test_item_categories_count_across_merges(tiny_data, monkeypatch):
    # Merging the pair counts every 16,384-record batch gives the same answer as one merge.
    whole = retrieval_data.item_categories(tiny_data.path, "test")
    monkeypatch.setattr(retrieval_data, "_PAIR_MERGE_ROWS", 1)
    merged = retrieval_data.item_categories(tiny_data.path, "test")
    for a, b in zip(whole, merged, strict=True):
        np.testing.assert_array_equal(a, b)


def test_catalogue_drops_rows_without_a_direction():
    vectors = np.array([[3, 4], [0, 0], [1, 0], [0, 2]], np.int8)
    catalogue = retrieval_train.Catalogue(np.array([30, 10, 0, 20]), vectors)
    np.testing.assert_array_equal(catalogue.item_ids, [20, 30])
    np.testing.assert_allclose(catalogue.vectors, [[0, 1], [0.6, 0.8]])
    assert catalogue.dropped == 2
    np.testing.assert_array_equal(catalogue.contains(np.array([20, 10, 30])), [1, 0, 1])
    catalogue.release_codes()  # ids and membership stay, the vectors go
    assert catalogue.dim == 2 and len(catalogue) == 2
    np.testing.assert_array_equal(catalogue.contains(np.array([20, 10])), [1, 0])
    with pytest.raises(RuntimeError, match="released"):
        catalogue.vectors  # noqa: B018
    with pytest.raises(RuntimeError, match="released"):
        catalogue.codes  # noqa: B018


def test_catalogue_codes_build_the_tree_of_its_unit_vectors(tiny_data):
    # The codes by reference (rows in id order) give the tree of the float unit vectors: the
    # same leaves; node vectors equal up to float32 rounding (c * (1 / ||c||) there, c / ||c||
    # in Catalogue.vectors).
    catalogue = retrieval_train.Catalogue(tiny_data.embedding_ids, tiny_data.embedding_vectors)
    assert catalogue.codes is tiny_data.embedding_vectors
    np.testing.assert_array_equal(tiny_data.embedding_ids[catalogue.code_rows],
                                  catalogue.item_ids)
    from_codes = IndexTree.build_from_codes(catalogue.codes, catalogue.item_ids,
                                            code_rows=catalogue.code_rows, seed=3)
    from_floats = IndexTree.build(catalogue.vectors, catalogue.item_ids, seed=3)
    np.testing.assert_array_equal(from_codes.leaf_item_ids, from_floats.leaf_item_ids)
    np.testing.assert_allclose(from_codes.node_vectors, from_floats.node_vectors, rtol=0,
                               atol=1e-7)


def test_click_counts_against_the_catalogue_are_exact(tiny_data):
    catalogue = retrieval_train.Catalogue(tiny_data.embedding_ids, tiny_data.embedding_vectors)
    ids, counts = retrieval_train.click_counts(DataDir.open(tiny_data.path))
    clicks = retrieval_data.ClickCounts.of(ids, counts, catalogue)
    train_clicks = clicked(tiny_data, "train")
    assert clicks.clicks_seen == len(train_clicks)
    assert clicks.clicks_not_in_index == int(
        (~np.isin(train_clicks, tiny_data.embedding_ids)).sum()) > 0
    assert clicks.clicks_in_index == int(np.isin(train_clicks, tiny_data.embedding_ids).sum())
    probe = tf.constant([int(tiny_data.embedding_ids[3]), 12345], tf.int64)
    np.testing.assert_array_equal(catalogue.contains_op(probe).numpy(), [True, False])


def test_sampling_probability_is_the_click_share_among_kept_items(tiny_data):
    catalogue = retrieval_train.Catalogue(tiny_data.embedding_ids, tiny_data.embedding_vectors)
    ids, counts = retrieval_train.click_counts(tiny_data.path, "train")
    sampling = retrieval_data.SamplingProbabilities(ids, counts, keep=catalogue.contains(ids))
    kept = Counter(i for i in clicked(tiny_data, "train")
                   if i in set(tiny_data.embedding_ids.tolist()))
    total = sum(kept.values())
    assert sampling.total_clicks == total
    unseen = [i for i in (*ids.tolist(), 12345) if i not in kept]
    assert len(unseen) >= 2  # clicked items without a vector, and an id never clicked
    probe = np.array([*kept, *unseen], np.int64)
    expected = np.array([kept[i] / total for i in kept]
                        + [retrieval_data.SamplingProbabilities.UNSEEN_CLICKS / total] * len(
                            unseen), np.float32)
    np.testing.assert_allclose(sampling.lookup(probe), expected, rtol=1e-6)
    # The floor (half a click) is below every kept item's share.
    assert sampling.floor == pytest.approx(0.5 / total)
    assert sampling.floor < min(kept.values()) / total
    assert np.sum(sampling.probabilities) == pytest.approx(1.0, rel=1e-6)
    # The TF lookup of the tf.data pipeline agrees, any shape.
    np.testing.assert_allclose(sampling.lookup_op(tf.constant(probe.reshape(-1, 1))).numpy(),
                               expected.reshape(-1, 1), rtol=1e-6)
    with pytest.raises(ValueError, match="unique"):
        retrieval_data.SamplingProbabilities(np.array([1, 1]), np.array([2, 3]))


def _config(task: str, *extra: str) -> config_lib.ExperimentConfig:
    return config_lib.resolve(task, assignments=[*TINY, *extra])


def test_training_dataset_keeps_clicked_catalogue_items_in_full_batches(tiny_data):
    catalogue = retrieval_train.Catalogue(tiny_data.embedding_ids, tiny_data.embedding_vectors)
    data = DataDir.open(tiny_data.path)
    dataset = retrieval_data.training_dataset(_config("two_tower"), data, 12,
                                              catalogue.contains_op)
    in_index = Counter(i for i in clicked(tiny_data, "train")
                       if i in set(tiny_data.embedding_ids.tolist()))
    epoch = sum(in_index.values())
    # Repeated: `epoch` batches of 8 are 8 whole passes; each batch full, each example a
    # clicked catalogue item.
    batches = list(dataset.take(epoch))
    assert set(batches[0]) == set(retrieval_data.MODEL_COLUMNS)
    seen = np.concatenate([b[schema.ITEM_ID.name].numpy() for b in batches])
    assert all(b[schema.HISTORY_LENGTH].shape == (8,) for b in batches)
    assert set(seen.tolist()) <= set(in_index)
    # Eight passes hold every kept click eight times (batches run across passes).
    assert Counter(seen.tolist()) == Counter({i: 8 * c for i, c in in_index.items()})
    assert batches[0][schema.HISTORY_ITEM_ID.name].shape == (8, 12)


def test_two_tower_training_batches_carry_q_of_their_items(tiny_data):
    from muse_tf.models.two_tower import CANDIDATE_PROBABILITY

    catalogue = retrieval_train.Catalogue(tiny_data.embedding_ids, tiny_data.embedding_vectors)
    ids, counts = retrieval_train.click_counts(tiny_data.path, "train")
    sampling = retrieval_data.SamplingProbabilities(ids, counts, keep=catalogue.contains(ids))

    def add_q(batch, step):
        return {**batch, CANDIDATE_PROBABILITY: sampling.lookup_op(batch[schema.ITEM_ID.name])}

    dataset = retrieval_data.training_dataset(_config("two_tower"), DataDir.open(tiny_data.path),
                                              12, catalogue.contains_op, add_q)
    for batch in dataset.take(3):
        items = batch[schema.ITEM_ID.name].numpy()
        assert batch[CANDIDATE_PROBABILITY].dtype == tf.float32
        np.testing.assert_array_equal(batch[CANDIDATE_PROBABILITY].numpy(),
                                      sampling.lookup(items))
        assert np.all(batch[CANDIDATE_PROBABILITY].numpy() > sampling.floor)  # all kept


def test_retrieval_config_checks_the_temperature():
    assert _config("two_tower").retrieval.logq_correction is True
    with pytest.raises(ValueError, match=r"retrieval\.temperature"):
        _config("two_tower", "retrieval.temperature=0").validate()


def test_miss_training_targets_are_deterministic_with_the_seed(tiny_data):
    catalogue = retrieval_train.Catalogue(tiny_data.embedding_ids, tiny_data.embedding_vectors)
    tree = IndexTree.build(catalogue.vectors, catalogue.item_ids)
    targets = TrainingNodes(tree, 2)

    def first_batches(seed: int) -> list[dict[str, np.ndarray]]:
        config = _config("miss_retrieval", f"data.seed={seed}")

        def with_nodes(batch, step):
            nodes, labels = targets(batch[schema.ITEM_ID.name],
                                    tf.stack([tf.constant(seed, tf.int64), step]))
            return {schema.ITEM_ID.name: batch[schema.ITEM_ID.name], NODE_IDS: nodes,
                    NODE_LABELS: labels}

        dataset = retrieval_data.training_dataset(config, DataDir.open(tiny_data.path), 12,
                                                  targets.contains, with_nodes)
        return [{k: v.numpy() for k, v in b.items()} for b in dataset.take(4)]

    first, again, other = first_batches(7), first_batches(7), first_batches(8)
    for a, b in zip(first, again, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert any(not np.array_equal(a[NODE_IDS], b[NODE_IDS])
               for a, b in zip(first, other, strict=True))
    for batch in first:
        per_level = batch[NODE_IDS].reshape(8, tree.depth, 3)
        np.testing.assert_array_equal(per_level[..., 0],
                                      tree.ancestors(batch[schema.ITEM_ID.name]))


def test_clicked_test_batches_hold_every_click_in_file_order(tiny_data):
    batches = list(retrieval_data.clicked_dataset(tiny_data.path, "test", 5, 12))
    ids = np.concatenate([b[schema.ITEM_ID.name].numpy() for b in batches])
    np.testing.assert_array_equal(ids, clicked(tiny_data, "test"))
    assert [len(b[schema.ITEM_ID.name]) for b in batches][:-1] == [5] * (len(batches) - 1)


def test_run_experiment_rejects_a_ranking_config(tmp_path):
    with pytest.raises(ValueError, match="task miss_retrieval or two_tower"):
        retrieval_train.run_retrieval(config_lib.get_experiment("muse"), str(tmp_path))


@pytest.mark.slow
def test_miss_retrieval_end_to_end(tiny_data, tmp_path):
    config = config_lib.resolve("miss_retrieval", assignments=TINY)
    model_dir = str(tmp_path / "miss")
    result = retrieval_train.run_retrieval(config, model_dir, tiny_data.path)
    with open(os.path.join(model_dir, "metrics.json")) as f:
        written = json.load(f)
    assert written["test"] == json.loads(json.dumps(result["test"]))
    test = written["test"]
    tree = IndexTree.load(os.path.join(model_dir, retrieval_train.TREE_FILE))
    assert tree.num_items == len(tiny_data.embedding_ids)
    # Beam 100 covers the tiny tree: every item is scored, the list is the whole catalogue.
    assert test["k"] == tree.num_items
    targets = clicked(tiny_data, "test")
    in_tree = np.isin(targets, tiny_data.embedding_ids)
    for key in ("recall@50", "recall@100", "recall@200"):
        assert test[key] == pytest.approx(in_tree.mean())
    assert test["queries"] == len(targets)
    assert test["targets_not_in_index"] == int((~in_tree).sum())
    assert test["queries_per_sec"] > 0
    assert set(test["per_level_recall"]) == {str(tree.depth)}
    assert test["per_level_recall"][str(tree.depth)] == 1.0
    train_clicks = clicked(tiny_data, "train")
    assert written["train"]["clicks_seen"] == len(train_clicks)
    assert written["train"]["clicks_not_in_index"] == int(
        (~np.isin(train_clicks, tiny_data.embedding_ids)).sum())
    # Trained by fit: one epoch-mean loss per epoch (a mean per (user, node) pair), the
    # steps known beforehand, a checkpoint per epoch and TensorBoard logs.
    in_index = int(np.isin(train_clicks, tiny_data.embedding_ids).sum())
    assert written["train_steps_per_epoch"] == in_index // 8
    assert written["train"]["train_steps"] == 2 * (in_index // 8)
    assert len(written["train_loss"]) == 2 and all(0 < x < 2 for x in written["train_loss"])
    for epoch in ("01", "02"):
        assert os.path.exists(os.path.join(model_dir, "checkpoints", f"ckpt-{epoch}.index"))
    assert os.listdir(os.path.join(model_dir, "logs"))
    assert os.path.exists(os.path.join(result["export_dirs"][MISS_MODEL_NAME], "saved_model.pb"))


@pytest.mark.slow
def test_miss_retrieval_with_a_pruned_beam_reports_every_level(tiny_data, tmp_path):
    config = config_lib.resolve("miss_retrieval", assignments=[
        *TINY, "retrieval.beam_width=4", "retrieval.top_n=8", "train.export=false",
        "train.epochs=1"])
    result = retrieval_train.run_retrieval(config, str(tmp_path / "miss"), tiny_data.path)
    test = result["test"]
    assert test["k"] == 8 and test["recall@50"] is None  # 8 of 36 items retrieved
    assert list(test["per_level_recall"]) == ["3", "4", "5", "6"]  # level 3: 8 nodes > 4
    recalls = list(test["per_level_recall"].values())
    assert all(0.0 <= r <= 1.0 for r in recalls)
    assert np.all(np.diff(recalls) <= 1e-12)  # an ancestor lost is never found again
    assert "export_dirs" not in result


@pytest.mark.slow
def test_miss_with_computed_lower_levels_learns_and_exports(tmp_path):
    # Learned rows for levels 0 .. 4 of the depth-9 tree only: the lower levels' nodes are
    # their items' ID embeddings (categories from the train impressions), their vectors
    # computed below the tree's stored means (levels 0 .. 3). It learns as the fully
    # tabulated scorer does (test_retrieval_learning: recall@50 1.0 there).
    data_dir = str(tmp_path / "clustered")
    world = write_clustered_data_dir(data_dir, seed=0)
    config = config_lib.resolve("miss_retrieval", assignments=[
        *LEARNING_SETTINGS, "train.epochs=2", "train.export=true",
        "retrieval.learned_node_levels=4"])
    model_dir = str(tmp_path / "miss")
    result = retrieval_train.run_retrieval(config, model_dir, data_dir)
    test = result["test"]
    assert result["index"]["depth"] == 9 and test["k"] == 50
    popularity = test["popularity"]["recall@50"]
    assert popularity < 0.2 and test["recall@50"] > popularity + 0.5
    assert 0 < result["train_loss"][1] < result["train_loss"][0] < 1.0
    with open(os.path.join(model_dir, "config.yaml")) as f:
        assert "learned_node_levels: 4" in f.read()
    # The export serves 50 catalogue items per test query.
    loaded = tf.saved_model.load(result["export_dirs"][MISS_MODEL_NAME])
    batch = next(iter(retrieval_data.clicked_dataset(data_dir, "test", 4,
                                                     world["metadata"]["max_seq_len"])))
    out = loaded.signatures["serving_default"](**{k: batch[k] for k in QUERY_FEATURES})
    ids = out["item_ids"].numpy()
    assert ids.shape == (4, 50) and np.all(np.isin(ids, world["embedded"]))


@pytest.mark.slow
def test_two_tower_end_to_end(tiny_data, tmp_path):
    config = config_lib.resolve("two_tower", assignments=TINY)
    model_dir = str(tmp_path / "two_tower")
    result = retrieval_train.run_retrieval(config, model_dir, tiny_data.path)
    with open(os.path.join(model_dir, "metrics.json")) as f:
        written = json.load(f)
    test = written["test"]
    # The in-batch softmax loss is a mean per query: about log(batch) at the start.
    assert len(written["train_loss"]) == 2
    assert all(0 < x < np.log(8) + 1 for x in written["train_loss"])
    catalogue = len(tiny_data.embedding_ids)
    in_index = np.isin(clicked(tiny_data, "test"), tiny_data.embedding_ids).mean()
    assert test["k"] == catalogue
    for key in ("recall@50", "recall@100", "recall@200"):
        assert test[key] == pytest.approx(in_index)
        assert test["scann"][key] == pytest.approx(in_index)
    assert test["queries_per_sec"] > 0 and test["scann"]["queries_per_sec"] > 0
    assert test["scann"]["overlap_with_brute_force"] == pytest.approx(1.0)
    assert set(result["export_dirs"]) == {BRUTE_FORCE_MODEL_NAME, SCANN_MODEL_NAME}

    table = format_table({"MISS tree beam search": test, "two-tower brute force": test,
                          "popularity": test["popularity"]})
    assert table.splitlines()[0].startswith("| method | recall@50 | recall@100 | recall@200 |")
    assert "| popularity |" in table and "| — |" in table


def test_warmup_requests_are_one_user_rows_of_the_signature():
    from muse_tf.export.retrieval import example_request, serving_signature, warmup_requests

    features = example_request(6, batch_size=3, seed=1)
    features["hist_len"] = np.array([2, 9, 6], np.int32)  # 9 > L: clipped
    requests = warmup_requests(features, 6, num_requests=2)
    assert len(requests) == 2
    specs = serving_signature(6)
    for r, request in enumerate(requests):
        assert set(request) == set(specs)
        for name, spec in specs.items():
            assert request[name].dtype == spec.dtype.as_numpy_dtype
            assert request[name].shape == ((1, 6) if spec.shape.rank == 2 else (1,))
        np.testing.assert_array_equal(request["hist_item_id"][0], features["hist_item_id"][r])
    assert requests[1]["hist_len"][0] == 6
    assert len(warmup_requests(None, 6)) == 1


def test_catalogue_membership_op_answers_the_former_dense_table_keys():
    from muse_tf.embeddings.id_lookup import DENSE_DELETED_KEY, DENSE_EMPTY_KEY

    catalogue = retrieval_data.Catalogue(np.array([DENSE_EMPTY_KEY, 5, -7], np.int64),
                                         np.ones((3, 4), np.int8))
    probe = np.array([[DENSE_EMPTY_KEY, DENSE_DELETED_KEY, 5], [-7, 12, 0]], np.int64)
    expected = catalogue.contains(probe)
    assert expected.tolist() == [[True, False, True], [True, False, False]]
    np.testing.assert_array_equal(catalogue.contains_op(tf.constant(probe)).numpy(), expected)
    mapped = tf.data.Dataset.from_tensors(probe).map(catalogue.contains_op)
    np.testing.assert_array_equal(next(iter(mapped)).numpy(), expected)


def test_sampling_probability_op_answers_the_former_dense_table_keys():
    from muse_tf.embeddings.id_lookup import DENSE_DELETED_KEY, DENSE_EMPTY_KEY

    sampling = retrieval_data.SamplingProbabilities(
        np.array([DENSE_EMPTY_KEY, 5, -7], np.int64), np.array([1, 3, 4]))
    probe = np.array([[DENSE_EMPTY_KEY, DENSE_DELETED_KEY, 5], [-7, 12, 0]], np.int64)
    expected = sampling.lookup(probe)
    np.testing.assert_allclose(expected, [[1 / 8, 0.5 / 8, 3 / 8], [4 / 8, 0.5 / 8, 0.5 / 8]])
    np.testing.assert_array_equal(sampling.lookup_op(tf.constant(probe)).numpy(), expected)
    # First used while a tf.data function is traced: the table is still filled eagerly.
    fresh = retrieval_data.SamplingProbabilities(np.array([5, -7], np.int64), np.array([3, 4]))
    mapped = tf.data.Dataset.from_tensors(probe).map(fresh.lookup_op)
    np.testing.assert_array_equal(next(iter(mapped)).numpy(), fresh.lookup(probe))
