"""The retrieval export's signature checks (stock TF Serving runs them too): history lengths,
one batch size, the maximum batch size; the export still loads with plain
``tf.saved_model.load`` and its warm-up records still replay."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import muse_tf  # noqa: F401
from muse_tf import schema
from muse_tf.export import publish, requests, retrieval, signatures

L = 6
K = 3
HIST = schema.HISTORY_ITEM_ID.name
LEN = schema.HISTORY_LENGTH


def _newest_items(features: dict[str, tf.Tensor], k: int) -> tuple[tf.Tensor, tf.Tensor]:
    """A toy index: the first ``k`` history items, scored by the history length."""
    ids = features[HIST][:, :k]
    scores = tf.cast(features[LEN], tf.float32)[:, tf.newaxis] + tf.zeros([1, k])
    return scores, ids


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[int, str]:
    """Max batch size -> version directory of the toy index exported with it."""
    root = str(tmp_path_factory.mktemp("retrieval") / "toy_retrieval")
    return {size: retrieval.export_retrieval(_newest_items, root, k=K, max_seq_len=L,
                                             max_batch_size=size)
            for size in (signatures.DEFAULT_MAX_BATCH_SIZE, 2)}


def _query(rows: int = 1) -> dict[str, np.ndarray]:
    return requests.random_retrieval_query(L, batch_size=rows, seed=3)


def _run(path: str, query: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    fn = tf.saved_model.load(path).signatures[publish.SIGNATURE_NAME]
    return {k: v.numpy() for k, v in fn(**{k: tf.constant(v) for k, v in query.items()}).items()}


def test_a_valid_query_is_answered(exported):
    path = exported[signatures.DEFAULT_MAX_BATCH_SIZE]
    query = _query(3)
    out = _run(path, query)
    np.testing.assert_array_equal(out[signatures.ITEM_IDS], query[HIST][:, :K])
    assert publish.describe(path)["max_batch_size"] == signatures.DEFAULT_MAX_BATCH_SIZE


@pytest.mark.parametrize("value", [-5, L + 1, 5000])
def test_hist_len_outside_the_history_is_rejected(exported, value):
    query = _query(2)
    query[LEN] = np.array([1, value], np.int32)
    with pytest.raises(tf.errors.InvalidArgumentError) as raised:
        _run(exported[signatures.DEFAULT_MAX_BATCH_SIZE], query)
    message = raised.value.message
    assert "input hist_len" in message and f"[{value}]" in message, message
    assert f"[0, {L}]" in message and "at rows] [1]" in message, message


def test_inputs_of_different_batch_sizes_are_rejected(exported):
    query = _query(1)
    query[schema.USER_ID.name] = np.array([1, 2], np.int64)
    with pytest.raises(tf.errors.InvalidArgumentError) as raised:
        _run(exported[signatures.DEFAULT_MAX_BATCH_SIZE], query)
    assert "same batch size" in raised.value.message
    assert "user_id:] [2]" in raised.value.message and "hist_len:] [1]" in raised.value.message


def test_batches_above_the_export_max_batch_size_are_rejected(exported):
    assert _run(exported[2], _query(2))[signatures.ITEM_IDS].shape == (2, K)
    with pytest.raises(tf.errors.InvalidArgumentError) as raised:
        _run(exported[2], _query(3))
    assert "batch size" in raised.value.message and "maximum 2" in raised.value.message


def test_warmup_records_replay_through_a_v1_session(exported):
    from serving import server as server_lib

    for path in exported.values():
        loaded = server_lib.LoadedVersion("toy_retrieval", 1, path, server_lib.ServerOptions())
        try:
            assert loaded.warmup_records == 1
        finally:
            loaded.retire()


def test_a_bad_max_batch_size_is_named():
    with pytest.raises(ValueError, match="max_batch_size must be a positive int, got 0"):
        retrieval.RetrievalServingModule(_newest_items, K, L, max_batch_size=0)
