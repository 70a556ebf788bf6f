"""BestWeightsEarlyStopping: tf-keras' rule, a snapshot without the frozen table."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from muse_tf.embeddings.multimodal_table import FrozenMultimodalTable
from muse_tf.training.early_stopping import BestWeightsEarlyStopping, changing_variables


class _Model(tf.keras.Model):
    def __init__(self) -> None:
        super().__init__()
        codes = np.arange(-40, 40, dtype=np.int8).reshape(10, 8)
        self.table = FrozenMultimodalTable(10, 8, initial_table=codes)
        self.dense = tf.keras.layers.Dense(3)
        self.norm = tf.keras.layers.BatchNormalization()

    def call(self, rows: tf.Tensor) -> tf.Tensor:
        return self.norm(self.dense(self.table(rows)))


def _model(seed: int) -> _Model:
    tf.keras.utils.set_random_seed(seed)
    model = _Model()
    model(tf.constant([1, 2, 3]))
    return model


def _perturb(model: tf.keras.Model, epoch: int) -> None:
    """What a training period does: new values in every variable but the frozen table's."""
    for variable in changing_variables(model):
        variable.assign(variable + float(epoch + 1))


def test_changing_variables_leave_out_only_the_frozen_table():
    model = _model(0)
    frozen = {id(v) for v in model.table.weights}
    assert len(frozen) == 3  # packed codes, inverse norms, presence
    kept = changing_variables(model)
    assert {id(v) for v in kept}.isdisjoint(frozen)
    assert len(kept) == len(model.weights) - len(frozen)  # BatchNorm's moving stats stay


@pytest.mark.parametrize("known_epochs", [False, True], ids=["epochs-unknown", "epochs-known"])
@pytest.mark.parametrize("values,patience", [
    ([0.5, 0.7, 0.6, 0.65, 0.66], 2),      # stops at epoch 3, restores epoch 1
    ([0.5, 0.7, 0.6, 0.65, 0.66], 10),     # runs to the end, restores epoch 1
    ([0.5, 0.6, 0.7, 0.8, 0.9], 1),        # always improving: the last epoch
    ([float("nan"), 0.4, 0.3, 0.2], 1),    # no progress at first: the first epoch's weights
    ([0.5], 1),                            # a single period
    ([float("nan")], 1),                   # a single period, no value
], ids=["stops", "runs-out", "improving", "nan-first", "one", "one-nan"])
def test_same_decisions_and_restored_weights_as_tf_keras(values, patience, known_epochs):
    ours, theirs = _model(1), _model(1)
    callbacks = []
    for model, callback in ((ours, BestWeightsEarlyStopping(monitor="val_gauc", mode="max",
                                                             patience=patience)),
                            (theirs, tf.keras.callbacks.EarlyStopping(
                                monitor="val_gauc", mode="max", patience=patience,
                                restore_best_weights=True))):
        callback.set_model(model)
        if known_epochs:  # what fit passes: the last period then takes no copy
            callback.set_params({"epochs": len(values), "steps": 1, "verbose": 0})
        callback.on_train_begin()
        for epoch, value in enumerate(values):
            _perturb(model, epoch)
            callback.on_epoch_end(epoch, {"val_gauc": value})
            if model.stop_training:
                break
        callback.on_train_end()
        callbacks.append(callback)
    assert (callbacks[0].stopped_epoch, callbacks[0].best_epoch, callbacks[0].wait) == (
        callbacks[1].stopped_epoch, callbacks[1].best_epoch, callbacks[1].wait)
    for mine, reference in zip(ours.weights, theirs.weights, strict=True):
        np.testing.assert_array_equal(mine.numpy(), reference.numpy())
    last_kept = known_epochs and callbacks[0].best_epoch == len(values) - 1
    if last_kept:  # the kept weights are the final ones: no copy held
        assert callbacks[0].best_weights is None
        return
    snapshot_bytes = sum(w.nbytes for w in callbacks[0].best_weights)
    table_bytes = sum(w.numpy().nbytes for w in ours.table.weights)
    assert snapshot_bytes == sum(w.nbytes for w in callbacks[1].best_weights) - table_bytes


def test_the_last_period_takes_no_snapshot():
    model = _model(2)
    callback = BestWeightsEarlyStopping(monitor="val_gauc", mode="max", patience=5)
    callback.set_model(model)
    callback.set_params({"epochs": 3, "steps": 1, "verbose": 0})
    callback.on_train_begin()
    taken = []
    callback.snapshot = lambda original=callback.snapshot: (taken.append(1), original())[1]
    for epoch, value in enumerate([0.5, 0.6, 0.7]):
        _perturb(model, epoch)
        callback.on_epoch_end(epoch, {"val_gauc": value})
    final = [v.numpy().copy() for v in model.weights]
    callback.on_train_end()
    assert len(taken) == 2  # periods 0 and 1; the last improving one keeps its weights
    for value, kept in zip(model.weights, final, strict=True):
        np.testing.assert_array_equal(value.numpy(), kept)


def test_restore_best_weights_cannot_be_turned_off():
    with pytest.raises(ValueError, match="always restores"):
        BestWeightsEarlyStopping(monitor="val_gauc", restore_best_weights=False)
