"""Group analyses of python -m muse_tf.experiments (paper Fig. 6)."""

import numpy as np

from muse_tf.training import comparison as experiments


def test_quantile_groups_are_equal_sized_even_with_ties():
    values = np.array([1000] * 14 + [3, 5, 7, 9])
    groups = experiments.quantile_groups(values, 9)
    assert np.bincount(groups, minlength=9).tolist() == [2] * 9
    # Shorter histories land in the first groups.
    assert set(groups[-4:].tolist()) == {0, 1}


def test_group_gauc_per_group():
    predictions = {"user_id": np.array([1, 1, 2, 2]), "label": np.array([1, 0, 1, 0]),
                   "score": np.array([0.9, 0.1, 0.1, 0.9])}
    out = experiments.group_gauc(predictions, np.array([0, 0, 1, 1]), num_groups=3)
    assert out[0] == 1.0 and out[1] == 0.0 and np.isnan(out[2])
