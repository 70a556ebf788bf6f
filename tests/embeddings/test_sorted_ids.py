"""Binary-search id lookups in TF ops (muse_tf.embeddings.sorted_ids)."""

import numpy as np
import pytest
import tensorflow as tf

from muse_tf.embeddings.sorted_ids import SortedIds

_EXTREMES = np.array([np.iinfo(np.int64).min, -7, 0, 5, np.iinfo(np.int64).max], np.int64)


def test_positions_match_numpy_on_random_ids():
    rng = np.random.default_rng(3)
    ids = np.unique(rng.integers(-(1 << 62), 1 << 62, 5000, dtype=np.int64))
    probe = np.concatenate([rng.choice(ids, 300), rng.integers(-(1 << 62), 1 << 62, 300)])
    probe = probe.reshape(20, 30)
    at = np.minimum(np.searchsorted(ids, probe), len(ids) - 1)
    expected = np.where(ids[at] == probe, at, -1)
    lookup = SortedIds(ids, "ids")
    np.testing.assert_array_equal(lookup.positions(tf.constant(probe)).numpy(), expected)
    assert (expected >= 0).sum() >= 300  # the probe holds present and absent ids


def test_every_int64_is_an_ordinary_key_also_inside_tf_data():
    lookup = SortedIds(_EXTREMES[[0, 1, 3, 4]], "ids")
    probe = _EXTREMES.reshape(1, 5)
    expected = [[True, True, False, True, True]]
    assert lookup.contains(probe).numpy().tolist() == expected
    mapped = tf.data.Dataset.from_tensors(probe).map(lookup.contains)
    assert next(iter(mapped)).numpy().tolist() == expected


def test_empty_ids_hold_nothing():
    assert SortedIds(np.zeros(0, np.int64), "none").positions([[3, 0]]).numpy().tolist() == [
        [-1, -1]]


@pytest.mark.parametrize(("ids", "message"), [
    (np.array([1, 3, 3], np.int64), r"ids\[1\]=3 >= ids\[2\]=3"),
    (np.array([1, 2], np.int32), "int64"),
])
def test_bad_ids_are_refused_naming_the_problem(ids, message):
    with pytest.raises(ValueError, match=message):
        SortedIds(ids, "bad")
