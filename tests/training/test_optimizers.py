"""LazyAdam (row-sparse Adam / AdamW for the ID embeddings) and the two optimizers of the train
step: lazy rows, a NumPy SparseAdam reference, dense parity with tf-keras Adam, row-wise weight
decay, config and checkpoints, each optimizer's own learning rate, MirroredStrategy in ``fit``
and the ``bench optimizer`` command."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from muse_tf import bench
from muse_tf import config as config_lib
from muse_tf.training import runs
from muse_tf.training.optimizers import LazyAdam
from muse_tf.training.step import TwoOptimizerModel

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _sparse(values, indices, rows: int, dim: int) -> tf.IndexedSlices:
    return tf.IndexedSlices(tf.constant(values, tf.float32), tf.constant(indices, tf.int64),
                            tf.constant([rows, dim], tf.int64))


def _apply(optimizer: tf.keras.optimizers.Optimizer, gradient, variable: tf.Variable) -> None:
    """One step inside a tf.function (as in ``fit``)."""
    tf.function(lambda: optimizer.apply_gradients([(gradient, variable)]))()


def _slots(optimizer: LazyAdam) -> tuple[np.ndarray, np.ndarray]:
    return optimizer._momentums[0].numpy(), optimizer._velocities[0].numpy()


def sparse_adam_reference(w: np.ndarray, steps, lr: float, beta_1: float = 0.9,
                          beta_2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0):
    """PyTorch's SparseAdam in float64: per-row moments of the rows present (repeated ids
    summed first), bias correction with the global step, (optional) decoupled decay."""
    w = w.astype(np.float64).copy()
    m, v = np.zeros_like(w), np.zeros_like(w)
    for t, (indices, values) in enumerate(steps, start=1):
        g = np.zeros_like(w)
        np.add.at(g, np.asarray(indices), np.asarray(values, np.float64))
        rows = np.unique(indices)
        m[rows] = beta_1 * m[rows] + (1 - beta_1) * g[rows]
        v[rows] = beta_2 * v[rows] + (1 - beta_2) * g[rows] ** 2
        step_size = lr * np.sqrt(1 - beta_2 ** t) / (1 - beta_1 ** t)
        w[rows] = (w[rows] - lr * weight_decay * w[rows]
                   - step_size * m[rows] / (np.sqrt(v[rows]) + eps))
    return w, m, v


# ----------------------------------------------------------------------------- LazyAdam
def test_rows_absent_from_the_batch_stay_bit_identical():
    rng = np.random.default_rng(0)
    init = rng.standard_normal((8, 3)).astype(np.float32)
    var = tf.Variable(init)
    optimizer = LazyAdam(0.05)
    optimizer.build([var])
    _apply(optimizer, _sparse(rng.standard_normal((3, 3)), [1, 4, 4], 8, 3), var)
    after_first = var.numpy().copy()
    m_first, v_first = (s.copy() for s in _slots(optimizer))
    for _ in range(3):  # rows 1 and 4 no longer in the batch
        _apply(optimizer, _sparse(rng.standard_normal((2, 3)), [2, 6], 8, 3), var)
    value, (m, v) = var.numpy(), _slots(optimizer)
    never = [0, 3, 5, 7]
    np.testing.assert_array_equal(value[never], init[never])
    np.testing.assert_array_equal(m[never], 0.0)
    np.testing.assert_array_equal(v[never], 0.0)
    # Rows of the first step only: value and both moments exactly as they were (lazy).
    np.testing.assert_array_equal(value[[1, 4]], after_first[[1, 4]])
    np.testing.assert_array_equal(m[[1, 4]], m_first[[1, 4]])
    np.testing.assert_array_equal(v[[1, 4]], v_first[[1, 4]])
    assert not np.any(after_first[[1, 4]] == init[[1, 4]])
    # Present rows changed, value and moments.
    assert not np.any(value[[2, 6]] == init[[2, 6]])
    assert np.all(m[[2, 6]] != 0) and np.all(v[[2, 6]] > 0)
    assert int(optimizer.iterations.numpy()) == 4


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_two_steps_match_a_numpy_sparse_adam_with_a_repeated_id(weight_decay):
    rng = np.random.default_rng(1)
    init = rng.standard_normal((5, 2)).astype(np.float32)
    steps = [([0, 3], rng.standard_normal((2, 2))),
             ([3, 1, 3], rng.standard_normal((3, 2)))]  # id 3 twice: gradients summed
    var = tf.Variable(init)
    optimizer = LazyAdam(0.01, weight_decay=weight_decay)
    for indices, values in steps:
        _apply(optimizer, _sparse(values, indices, 5, 2), var)
    w, m, v = sparse_adam_reference(init, steps, lr=0.01, weight_decay=weight_decay)
    got_m, got_v = _slots(optimizer)
    np.testing.assert_allclose(var.numpy(), w, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got_m, m, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(got_v, v, rtol=1e-5, atol=1e-10)
    # Row 0 (first step only) kept its step-1 moments: m = 0.1 g, not 0.09 g.
    np.testing.assert_allclose(got_m[0], 0.1 * steps[0][1][0], rtol=1e-5)


def test_a_dense_gradient_matches_tf_keras_adam_exactly():
    rng = np.random.default_rng(2)
    init = rng.standard_normal((4, 3)).astype(np.float32)
    lazy_var, adam_var = tf.Variable(init), tf.Variable(init)
    lazy = LazyAdam(0.01, epsilon=1e-7)
    adam = tf.keras.optimizers.Adam(0.01, epsilon=1e-7)
    for _ in range(3):
        gradient = tf.constant(rng.standard_normal((4, 3)), tf.float32)
        _apply(lazy, gradient, lazy_var)
        _apply(adam, gradient, adam_var)
    np.testing.assert_array_equal(lazy_var.numpy(), adam_var.numpy())
    np.testing.assert_array_equal(_slots(lazy)[0], adam._momentums[0].numpy())
    np.testing.assert_array_equal(_slots(lazy)[1], adam._velocities[0].numpy())


def test_dense_weight_decay_matches_tf_keras_adamw_and_all_rows_sparse_matches_dense():
    rng = np.random.default_rng(3)
    init = rng.standard_normal((4, 2)).astype(np.float32)
    lazy_var, adamw_var, sparse_var = tf.Variable(init), tf.Variable(init), tf.Variable(init)
    lazy = LazyAdam(0.01, weight_decay=0.1)
    adamw = tf.keras.optimizers.AdamW(0.01, weight_decay=0.1, epsilon=1e-8)
    sparse = LazyAdam(0.01, weight_decay=0.1)
    for _ in range(3):
        values = rng.standard_normal((4, 2))
        _apply(lazy, tf.constant(values, tf.float32), lazy_var)
        _apply(adamw, tf.constant(values, tf.float32), adamw_var)
        _apply(sparse, _sparse(values[::-1], [3, 2, 1, 0], 4, 2), sparse_var)
    np.testing.assert_allclose(lazy_var.numpy(), adamw_var.numpy(), rtol=1e-6)
    np.testing.assert_allclose(sparse_var.numpy(), lazy_var.numpy(), rtol=1e-6)


def test_weight_decay_touches_only_the_rows_in_the_batch():
    init = np.full((6, 2), 2.0, np.float32)
    decayed_var, plain_var = tf.Variable(init), tf.Variable(init)
    decayed, plain = LazyAdam(0.1, weight_decay=0.5), LazyAdam(0.1)
    gradient = _sparse([[1.0, -1.0], [0.5, 2.0]], [1, 4], 6, 2)
    _apply(decayed, gradient, decayed_var)
    _apply(plain, gradient, plain_var)
    absent = [0, 2, 3, 5]
    np.testing.assert_array_equal(decayed_var.numpy()[absent], init[absent])
    # Present rows: the plain step minus lr * wd * (their value before the step).
    np.testing.assert_allclose(decayed_var.numpy()[[1, 4]],
                               plain_var.numpy()[[1, 4]] - 0.1 * 0.5 * 2.0, rtol=1e-6)
    for a, b in zip(_slots(decayed), _slots(plain), strict=True):
        np.testing.assert_array_equal(a, b)


def test_config_round_trip_and_registration():
    optimizer = LazyAdam(0.02, beta_1=0.8, beta_2=0.99, epsilon=1e-6, weight_decay=0.03,
                         clipnorm=1.0, name="lazy")
    config = optimizer.get_config()
    assert {k: config[k] for k in ("learning_rate", "beta_1", "beta_2", "epsilon",
                                   "weight_decay", "clipnorm", "name", "jit_compile")} == {
        "learning_rate": pytest.approx(0.02), "beta_1": 0.8, "beta_2": 0.99, "epsilon": 1e-6,
        "weight_decay": 0.03, "clipnorm": 1.0, "name": "lazy", "jit_compile": False}
    assert LazyAdam.from_config(config).get_config() == config
    assert tf.keras.utils.get_registered_name(LazyAdam) == "muse_tf>LazyAdam"
    clone = tf.keras.optimizers.deserialize(tf.keras.optimizers.serialize(optimizer))
    assert isinstance(clone, LazyAdam) and clone.get_config() == config
    with pytest.raises(ValueError, match="beta_1"):
        LazyAdam(beta_1=1.0)


def test_checkpoint_save_and_restore_keeps_the_slots(tmp_path):
    rng = np.random.default_rng(4)
    grads = [_sparse(rng.standard_normal((2, 2)), ids, 5, 2) for ids in ([0, 2], [2, 4], [1, 2])]
    var = tf.Variable(rng.standard_normal((5, 2)).astype(np.float32))
    optimizer = LazyAdam(0.01)
    for gradient in grads[:2]:
        _apply(optimizer, gradient, var)
    path = tf.train.Checkpoint(var=var, optimizer=optimizer).save(str(tmp_path / "ckpt"))

    restored_var = tf.Variable(tf.zeros((5, 2)))
    restored = LazyAdam(0.01)
    restored.build([restored_var])
    tf.train.Checkpoint(var=restored_var, optimizer=restored).restore(path).assert_consumed()
    assert int(restored.iterations.numpy()) == 2
    np.testing.assert_array_equal(restored_var.numpy(), var.numpy())
    for a, b in zip(_slots(restored), _slots(optimizer), strict=True):
        assert np.any(a != 0)
        np.testing.assert_array_equal(a, b)
    # The next step (step 3: bias correction from the restored counter) is the same.
    _apply(optimizer, grads[2], var)
    _apply(restored, grads[2], restored_var)
    np.testing.assert_array_equal(restored_var.numpy(), var.numpy())


# ----------------------------------------------------------------------------- train step
EMBEDDING_GRAD_SIGN = np.array([1.0, -1.0], np.float32)
DENSE_GRAD = np.array([3.0, -0.5], np.float32)
DENSE_INIT = np.array([1.0, -2.0], np.float32)
ROWS = 6
IDS = np.array([[0, 2], [2, 3]], np.int64)  # rows 0, 2, 3 present (2 twice), 1, 4, 5 absent


class TinyTwoOptimizerModel(TwoOptimizerModel):
    """One 6 x 2 embedding and one dense weight; a linear loss, so every gradient is known:
    d/dE[r] = count(r) * [1, -1], d/dw = [3, -0.5] (summed over replicas)."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = tf.keras.layers.Embedding(
            ROWS, 2, embeddings_initializer=tf.keras.initializers.Constant(0.5))
        self.dense_weight = self.add_weight(
            name="dense_weight", shape=(2,),
            initializer=tf.keras.initializers.Constant(DENSE_INIT))

    def embedding_variables(self) -> list[tf.Variable]:
        return self.embedding.trainable_variables

    def call(self, inputs: dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        return tf.reduce_sum(self.embedding(inputs["ids"]) * EMBEDDING_GRAD_SIGN, axis=[1, 2])

    def compute_loss(self, inputs: dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        return (tf.reduce_sum(self(inputs, training=training))
                + tf.reduce_sum(self.dense_weight * DENSE_GRAD))


def _dataset() -> tf.data.Dataset:
    return tf.data.Dataset.from_tensors({"ids": tf.constant(IDS)}).repeat()


def _trained(steps: int = 1, strategy: tf.distribute.Strategy | None = None,
             **compile_kwargs) -> TinyTwoOptimizerModel:
    strategy = strategy or tf.distribute.get_strategy()
    with strategy.scope():
        model = TinyTwoOptimizerModel()
        model.compile_with_learning_rates(0.1, 0.01, **compile_kwargs)
        model.build_for({"ids": tf.constant(IDS)})
    model.fit(_dataset(), steps_per_epoch=steps, epochs=1, verbose=0)
    return model


@pytest.mark.parametrize("options, weight_decay, atol", [
    ({}, 0.01, 1e-6),                                                   # LazyAdam + AdamW
    ({"embedding_optimizer": "adam", "dense_weight_decay": 0.0}, 0.0, 1e-5),  # the old Adams
])
def test_each_optimizer_applies_its_own_learning_rate_to_its_own_variables(
        options, weight_decay, atol):
    model = _trained(**options)
    # Adam's first step moves each element by about lr * sign(g) (AdamW: also lr * wd * w).
    table = model.embedding.embeddings.numpy()
    present, absent = [0, 2, 3], [1, 4, 5]
    np.testing.assert_allclose(table[present],
                               np.tile(0.5 - 0.1 * EMBEDDING_GRAD_SIGN, (3, 1)), atol=atol)
    np.testing.assert_array_equal(table[absent], 0.5)
    np.testing.assert_allclose(
        model.dense_weight.numpy(),
        DENSE_INIT - 0.01 * weight_decay * DENSE_INIT - 0.01 * np.sign(DENSE_GRAD),
        rtol=0, atol=1e-6)
    assert int(model.embedding_optimizer.iterations.numpy()) == 1
    assert int(model.optimizer.iterations.numpy()) == 1


def test_release_training_state_frees_every_slot_and_keeps_predictions():
    import weakref

    model = _trained(steps=2)
    slots = [weakref.ref(v) for optimizer in (model.embedding_optimizer, model.optimizer)
             for v in optimizer.variables]
    assert len(slots) >= 6  # iterations + m, v of the embedding and of the dense weight
    before = model({"ids": tf.constant(IDS)}).numpy()
    model.release_training_state()
    assert model.optimizer is None and model.embedding_optimizer is None
    # Nothing (the traced train step included) holds a slot any more: each is freed.
    assert [ref() is None for ref in slots] == [True] * len(slots)
    np.testing.assert_array_equal(model({"ids": tf.constant(IDS)}).numpy(), before)


def test_release_unregisters_the_train_steps_custom_gradients():
    from muse_tf.training import step

    with tf.distribute.get_strategy().scope():
        model = TinyTwoOptimizerModel()
        model.compile_with_learning_rates(0.1, 0.01)
        model.build_for({"ids": tf.constant(IDS)})
    before = step._registered_custom_gradients()
    model.fit(_dataset(), steps_per_epoch=1, epochs=1, verbose=0)
    # tf.distribute's all_reduce of the dense gradients is a graph-mode custom gradient: its
    # registration holds the train step's graph, and through it every captured slot.
    assert step._registered_custom_gradients() > before
    model.release_training_state()
    assert step._registered_custom_gradients() == before


def test_compile_picks_the_optimizers_and_rejects_unknown_ones():
    model = TinyTwoOptimizerModel()
    model.compile_with_learning_rates(0.1, 0.01)
    assert type(model.embedding_optimizer) is LazyAdam
    assert type(model.optimizer) is tf.keras.optimizers.AdamW
    dense = model.optimizer.get_config()
    assert (dense["weight_decay"], dense["beta_1"], dense["beta_2"], dense["epsilon"]) == (
        0.01, 0.9, 0.999, 1e-8)
    model.compile_with_learning_rates(0.1, 0.01, embedding_optimizer="adam",
                                      dense_weight_decay=0)
    assert type(model.embedding_optimizer) is tf.keras.optimizers.Adam
    assert type(model.optimizer) is tf.keras.optimizers.Adam
    with pytest.raises(ValueError, match="embedding_optimizer='sgd'"):
        model.compile_with_learning_rates(0.1, 0.01, embedding_optimizer="sgd")
    with pytest.raises(ValueError, match="dense_weight_decay"):
        model.compile_with_learning_rates(0.1, 0.01, dense_weight_decay=-1.0)


def test_the_config_fields_reach_the_compiled_model_and_are_validated():
    config = config_lib.ExperimentConfig()
    assert (config.train.embedding_optimizer, config.train.dense_weight_decay) == (
        "lazy_adam", 0.01)
    config.train.embedding_optimizer, config.train.dense_weight_decay = "adam", 0.0
    model = runs.compiled_model(config, tf.distribute.get_strategy(), TinyTwoOptimizerModel,
                                _dataset())
    assert type(model.embedding_optimizer) is tf.keras.optimizers.Adam
    assert type(model.optimizer) is tf.keras.optimizers.Adam
    with pytest.raises(ValueError, match=re.escape("train.embedding_optimizer='sgd'")):
        config_lib.resolve("muse", assignments=["train.embedding_optimizer=sgd"])
    with pytest.raises(ValueError, match=re.escape("train.dense_weight_decay=-0.1")):
        config_lib.resolve("muse", assignments=["train.dense_weight_decay=-0.1"])


def test_fit_under_mirrored_strategy_matches_the_default_strategy():
    strategy = tf.distribute.MirroredStrategy()
    mirrored = _trained(steps=3, strategy=strategy)
    assert isinstance(mirrored.embedding_optimizer, LazyAdam)
    assert type(mirrored.embedding.embeddings).__name__ == "MirroredVariable"
    plain = _trained(steps=3)
    np.testing.assert_allclose(mirrored.embedding.embeddings.numpy(),
                               plain.embedding.embeddings.numpy(), rtol=1e-6)
    np.testing.assert_allclose(mirrored.dense_weight.numpy(), plain.dense_weight.numpy(),
                               rtol=1e-6)
    np.testing.assert_array_equal(mirrored.embedding.embeddings.numpy()[[1, 4, 5]], 0.5)
    assert int(mirrored.embedding_optimizer.iterations.numpy()) == 3


_TWO_REPLICAS = textwrap.dedent("""
    import json, sys
    import muse_tf  # noqa: F401  (tf-keras)
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from tests.training import test_optimizers as t
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    mirrored = t._trained(steps=2, strategy=strategy)
    plain = t._trained(steps=2)
    json.dump({"replicas": strategy.num_replicas_in_sync,
               "mirrored": mirrored.embedding.embeddings.numpy().tolist(),
               "plain": plain.embedding.embeddings.numpy().tolist(),
               "mirrored_dense": mirrored.dense_weight.numpy().tolist(),
               "plain_dense": plain.dense_weight.numpy().tolist()}, sys.stdout)
""")


@pytest.mark.slow
def test_two_cpu_replicas_match_one_device():
    """Each replica holds one example (id 2 in both): the sparse gradients are gathered over
    the replicas and merged before the lazy update."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", _TWO_REPLICAS], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["replicas"] == 2
    np.testing.assert_allclose(result["mirrored"], result["plain"], rtol=1e-6)
    np.testing.assert_allclose(result["mirrored_dense"], result["plain_dense"], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(result["mirrored"])[[1, 4, 5]], 0.5)


# ----------------------------------------------------------------------------- bench
def test_bench_optimizer_parses_and_runs_at_tiny_sizes(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert bench.main(["optimizer", "--rows", "50,400", "--batch-size", "4",
                       "--ids-per-example", "8", "--optimizer-steps", "2",
                       "--work-dir", str(tmp_path), "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["optimizer"]
    assert [(r["optimizer"], r["rows"]) for r in rows] == [
        ("lazy_adam", 50), ("adam", 50), ("lazy_adam", 400), ("adam", 400)]
    assert all(r["ms_per_step"] > 0 and r["adam_over_lazy"] > 0 for r in rows)
    assert rows[2]["MB_touched"] < rows[3]["MB_touched"]
    assert "## optimizer" in capsys.readouterr().out


def test_model_weight_checkpoints_hold_both_optimizers_and_savedmodels_neither(tmp_path):
    model = _trained(steps=3)
    path = str(tmp_path / "ckpt")
    model.save_weights(path)
    names = [name for name, _ in tf.train.list_variables(path)]
    assert any(n.startswith("embedding_optimizer/") for n in names)
    assert any(n.startswith("optimizer/") for n in names)
    # Restoring into a fresh model brings back LazyAdam's moments and step, not only AdamW's.
    fresh = TinyTwoOptimizerModel()
    fresh.compile_with_learning_rates(0.1, 0.01)
    fresh.build_for({"ids": tf.constant(IDS)})
    fresh.load_weights(path)
    assert int(fresh.embedding_optimizer.iterations) == 3
    for mine, theirs in zip(_slots(model.embedding_optimizer),
                            _slots(fresh.embedding_optimizer), strict=True):
        np.testing.assert_array_equal(mine, theirs)
    export = str(tmp_path / "export")
    tf.saved_model.save(model, export)
    exported = [n for n, _ in tf.train.list_variables(os.path.join(export, "variables",
                                                                   "variables"))]
    assert exported and not [n for n in exported if "optimizer" in n]
