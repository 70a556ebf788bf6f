"""The one train step of every muse_tf model: two optimizers, one for the trainable ID
embeddings and one for everything else (the MUSE paper's setting; official code: separate
learning rates for sparse and dense parameters, ``SparseAdam`` for the embeddings and
``AdamW`` for the rest).

By default the embeddings are trained by :class:`~muse_tf.training.optimizers.LazyAdam`
(SparseAdam: only the rows of the batch's ids change, so a step costs O(batch ids × dim), not
O(vocabulary × dim)) and the dense weights by tf-keras ``AdamW`` (weight decay 0.01, betas
0.9/0.999, epsilon 1e-8: PyTorch's defaults). ``embedding_optimizer="adam"`` and
``dense_weight_decay=0`` select the former behaviour (stock tf-keras ``Adam`` for both).

Leaf module (TensorFlow, TFRS and :mod:`muse_tf.training.optimizers` only), so models can
inherit it without importing runs.
"""

from __future__ import annotations

import gc
from typing import Any

import tensorflow as tf
import tensorflow_recommenders as tfrs

from muse_tf.training.optimizers import LazyAdam

#: ``embedding_optimizer`` choices of :meth:`TwoOptimizerModel.compile_with_learning_rates`.
EMBEDDING_OPTIMIZERS = ("lazy_adam", "adam")


class TwoOptimizerModel(tfrs.models.Model):
    """A ``tfrs.models.Model`` trained by ``fit`` with two optimizers: :attr:`embedding_optimizer`
    (``LazyAdam`` by default) for :meth:`embedding_variables` and ``optimizer`` (``AdamW`` by
    default) for every other trainable variable, each with its own learning rate.

    Subclasses implement ``compute_loss`` (returning this replica's share of the global mean
    loss, so that gradients summed over replicas are those of the mean) and
    :meth:`embedding_variables`. :meth:`compile_with_learning_rates` sets the optimizers;
    :meth:`build_for` creates every weight and slot before ``fit``.

    Logged each step: ``loss``, the running mean over the epoch of the global mean loss
    (what the progress bar shows and what ``History`` records, so both agree), and the
    model's compiled/task metrics. Per-replica values are reduced with ``"first"``: metric
    results are already aggregated over replicas, summing them again (tf-keras's default
    outside TPUs) would double an AUC on two workers.
    """

    embedding_optimizer: tf.keras.optimizers.Optimizer | None = None

    def embedding_variables(self) -> list[tf.Variable]:
        """The trainable ID-embedding tables (trained by :attr:`embedding_optimizer`)."""
        raise NotImplementedError(f"{type(self).__name__} must define embedding_variables()")

    def compile_with_learning_rates(self, embedding_learning_rate: float,
                                    dense_learning_rate: float, *,
                                    embedding_optimizer: str = "lazy_adam",
                                    dense_weight_decay: float = 0.01,
                                    **kwargs: Any) -> None:
        """Set the two optimizers, each with its learning rate, and ``compile`` (``kwargs``).

        Args:
          embedding_learning_rate: of the ID embeddings.
          dense_learning_rate: of every other trainable variable.
          embedding_optimizer: ``"lazy_adam"`` (default; the official ``SparseAdam``: only the
            batch's rows and their moments change) or ``"adam"`` (stock tf-keras ``Adam``,
            which decays the moments of every row each step; the former behaviour).
          dense_weight_decay: decoupled weight decay of the dense ``AdamW`` (betas
            0.9/0.999, epsilon 1e-8; default 0.01, the official setting); 0 gives stock
            tf-keras ``Adam`` (the former behaviour).
        """
        for name, rate in (("embedding_learning_rate", embedding_learning_rate),
                           ("dense_learning_rate", dense_learning_rate)):
            if not rate > 0:
                raise ValueError(f"train.{name} must be > 0, got {rate!r}")
        if embedding_optimizer not in EMBEDDING_OPTIMIZERS:
            raise ValueError(f"train.embedding_optimizer={embedding_optimizer!r} is not one of "
                             f"{EMBEDDING_OPTIMIZERS}")
        if not dense_weight_decay >= 0:
            raise ValueError(f"train.dense_weight_decay must be >= 0, got "
                             f"{dense_weight_decay!r}")
        if embedding_optimizer == "lazy_adam":
            self.embedding_optimizer = LazyAdam(embedding_learning_rate)
        else:
            self.embedding_optimizer = tf.keras.optimizers.Adam(embedding_learning_rate)
        if dense_weight_decay > 0:
            dense = tf.keras.optimizers.AdamW(dense_learning_rate,
                                              weight_decay=dense_weight_decay, beta_1=0.9,
                                              beta_2=0.999, epsilon=1e-8)
        else:
            dense = tf.keras.optimizers.Adam(dense_learning_rate)
        self.loss_tracker = tf.keras.metrics.Mean(name="loss")
        self.compile(optimizer=dense, **kwargs)
        self.distribute_reduction_method = "first"

    def _trackable_children(self, save_type: str = "checkpoint", **kwargs: Any) -> dict:
        """Checkpoints (``ModelCheckpoint``, ``BackupAndRestore``) hold both optimizers (tf-keras
        tracks only ``optimizer`` itself, so a restored run would restart LazyAdam's moments and
        step); SavedModels hold neither (a serving export needs no optimizer slots: at 35.4M
        items they would triple its size)."""
        children = dict(super()._trackable_children(save_type, **kwargs))
        if save_type == "savedmodel":
            children.pop("optimizer", None)
            children.pop("embedding_optimizer", None)
        elif self.embedding_optimizer is not None:
            children["embedding_optimizer"] = self.embedding_optimizer
        return children

    def release_training_state(self) -> None:
        """Drops both optimizers and the traced train step once training is over: their slots
        are what an evaluation or an export never reads (with Adam, twice the trainable
        weights: 1.57 GB for the 12.3M-row item ID table of 16 floats of the 35.4M-item scale
        run) and the train step's graph holds their handles. ``fit`` cannot be called
        afterwards (compile again first); prediction, evaluation and SavedModel export are
        unaffected."""
        # Each goes from the attribute and from Keras' and the checkpoint's tracking of it
        # (assigning None leaves the old value tracked, and so alive): the optimizers, and
        # the traced train step (tf-keras keeps it twice), whose graph captures every slot.
        for name in ("optimizer", "embedding_optimizer", "train_function", "train_tf_function"):
            if getattr(self, name, None) is not None:
                delattr(self, name)
                self._delete_tracking(name)
            setattr(self, name, None)
        if hasattr(self, "_compile_config"):  # compile()'s record of its arguments holds
            delattr(self, "_compile_config")  # the dense optimizer too
        _drop_gradients_registered_since(getattr(self, "_gradients_before_fit", None))
        gc.collect()

    def split_variables(self) -> tuple[list[tf.Variable], list[tf.Variable]]:
        """``(embedding variables, the other trainable variables)``."""
        embedding_vars = self.embedding_variables()
        embedding_ids = {id(v) for v in embedding_vars}
        return embedding_vars, [v for v in self.trainable_variables
                                if id(v) not in embedding_ids]

    def build_for(self, batch: dict[str, tf.Tensor]) -> None:
        """Create every weight and optimizer slot outside ``tf.function`` (call once, inside
        the distribution strategy's scope, before ``fit``)."""
        self(batch, training=False)
        self._gradients_before_fit = _registered_custom_gradients()
        embedding_vars, dense_vars = self.split_variables()
        if self.embedding_optimizer is not None:
            self.embedding_optimizer.build(embedding_vars)
        if self.optimizer is not None:
            self.optimizer.build(dense_vars)

    def train_step(self, inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        if self.embedding_optimizer is None:
            raise RuntimeError(f"{type(self).__name__}: call compile_with_learning_rates() "
                               "before fit()")
        embedding_vars, dense_vars = self.split_variables()
        with tf.GradientTape() as tape:
            loss = self.compute_loss(inputs, training=True)
            regularization = tf.add_n([tf.constant(0.0), *[tf.reduce_sum(x)
                                                           for x in self.losses]])
            total_loss = loss + regularization
        gradients = tape.gradient(total_loss, embedding_vars + dense_vars)
        split = len(embedding_vars)
        self.embedding_optimizer.apply_gradients(
            zip(gradients[:split], embedding_vars, strict=True))
        self.optimizer.apply_gradients(zip(gradients[split:], dense_vars, strict=True))
        # Each replica holds its share of the global mean: scaled back, the replicas' mean is
        # the global mean loss.
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        self.loss_tracker.update_state(total_loss * replicas)
        return {metric.name: metric.result() for metric in self.metrics}


def _gradient_registry() -> dict[str, Any] | None:
    """TensorFlow's global op-gradient registry (private: ``None`` where it moved)."""
    from tensorflow.python.framework import ops as tf_ops

    registry = getattr(getattr(tf_ops, "_gradient_registry", None), "_registry", None)
    return registry if isinstance(registry, dict) else None


def _registered_custom_gradients() -> frozenset[str]:
    """Names of the ``tf.custom_gradient`` functions registered so far."""
    registry = _gradient_registry()
    return frozenset(name for name in (registry or {}) if name.startswith("CustomGradient-"))


def _drop_gradients_registered_since(before: frozenset[str] | None) -> None:
    """Unregisters the ``tf.custom_gradient`` functions traced since ``before``.

    Graph-mode ``tf.custom_gradient`` (tf.distribute's ``all_reduce``, which tf-keras' optimizer
    applies to the dense gradients in the train step, is one) registers each traced gradient
    in a process-wide registry that is never emptied; its closure holds tensors of the train
    step's graph, the graph holds every variable it captured, and so the optimizer slots stay
    allocated after every Python reference to them is gone (measured: 1.28 GB of slots of a
    10M x 16 table kept). Only the gradients of graphs traced after ``before`` go (the train
    step's: nothing differentiates it after training).
    """
    registry = _gradient_registry()
    if before is None or registry is None:
        return
    for name in _registered_custom_gradients() - before:
        registry.pop(name, None)
