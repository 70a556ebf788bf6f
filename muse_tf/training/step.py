"""The one train step of every muse_tf model: two Adam optimizers, one for the trainable ID
embeddings and one for everything else (the MUSE paper's setting; official code: separate
learning rates for sparse and dense parameters).

Leaf module (TensorFlow and TFRS only), so models can inherit it without importing runs.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf
import tensorflow_recommenders as tfrs


class TwoOptimizerModel(tfrs.models.Model):
    """A ``tfrs.models.Model`` trained by ``fit`` with two optimizers.

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
                                    dense_learning_rate: float, **kwargs: Any) -> None:
        """Adam for the ID embeddings and Adam for everything else, each with its rate."""
        for name, rate in (("embedding_learning_rate", embedding_learning_rate),
                           ("dense_learning_rate", dense_learning_rate)):
            if not rate > 0:
                raise ValueError(f"train.{name} must be > 0, got {rate!r}")
        self.embedding_optimizer = tf.keras.optimizers.Adam(embedding_learning_rate)
        self.loss_tracker = tf.keras.metrics.Mean(name="loss")
        self.compile(optimizer=tf.keras.optimizers.Adam(dense_learning_rate), **kwargs)
        self.distribute_reduction_method = "first"

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
