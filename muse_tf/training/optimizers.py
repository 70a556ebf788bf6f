"""A lazy (row-sparse) Adam for the ID-embedding tables, with optional decoupled weight decay.

tf-keras's ``Adam`` decays the moments of *every* row of a table on every step, even when the
gradient is a ``tf.IndexedSlices`` (``m.assign_add(-m * (1 - beta_1))``), so a step costs
O(vocabulary × dim) however few ids the batch holds. :class:`LazyAdam` is the reference
implementation's ``torch.optim.SparseAdam``: only the rows present in the batch change (their
first and second moments and their values); absent rows keep their value and both slots bit
for bit. A step then costs O(rows in the batch × dim), independent of the vocabulary.

Leaf module (TensorFlow only).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tensorflow as tf

#: What a learning rate may be (as for tf-keras's own optimizers).
LearningRate = float | tf.Tensor | tf.keras.optimizers.schedules.LearningRateSchedule | Callable


@tf.keras.utils.register_keras_serializable(package="muse_tf")
class LazyAdam(tf.keras.optimizers.Optimizer):
    r"""Adam that updates only the rows a sparse gradient touches (``SparseAdam``), optionally
    with decoupled weight decay on those rows (a lazy AdamW).

    With ``t = iterations + 1`` the *global* step (the same for every row, as in PyTorch's
    ``SparseAdam``, whose per-parameter step counts every step that had a gradient) and
    ``alpha_t = lr * sqrt(1 - beta_2^t) / (1 - beta_1^t)``:

    **Sparse gradient** (``tf.IndexedSlices`` of a ``[N, D]`` table: ``values [K, D]``,
    ``indices [K]``, ids possibly repeated). Repeated ids are merged first — ``rows [U]`` the
    distinct ids, ``g [U, D]`` the gradients of each id summed (``tf.unique`` +
    ``tf.math.unsorted_segment_sum``). Then, for those ``U`` rows only::

        m[rows] <- m[rows] + (g - m[rows]) * (1 - beta_1)            # [U, D]
        v[rows] <- v[rows] + (g^2 - v[rows]) * (1 - beta_2)          # [U, D]
        w[rows] <- w[rows] - lr * weight_decay * w[rows]
                           - alpha_t * m[rows] / (sqrt(v[rows]) + epsilon)

    (gathers and ``scatter_update`` of ``[U, D]`` rows of the variable and both slots); every
    other row of ``w``, ``m`` and ``v`` is untouched. The
    moments of a row absent for a while are therefore *not* decayed in between (the "lazy" in
    the name).

    **Dense gradient** (a ``tf.Tensor`` shaped like the variable): exactly tf-keras's
    ``Adam`` (the same three equations over the whole variable), after the decoupled decay
    ``w <- w - lr * weight_decay * w`` when ``weight_decay`` is set.

    ``weight_decay`` is decoupled (AdamW-style, applied to the value, not added to the
    gradient) and honours :meth:`exclude_from_weight_decay`; the default 0 is plain lazy Adam.
    Unlike tf-keras's optimizers (whose base class decays every row of every variable before
    the update), the decay here is applied inside :meth:`update_step`, to the touched rows only.

    The defaults are PyTorch's ``SparseAdam`` defaults (``lr=1e-3``, betas ``0.9/0.999``,
    ``eps=1e-8``); ``epsilon`` is added to ``sqrt(v)``, as in both tf-keras's ``Adam`` and
    ``SparseAdam``. ``jit_compile`` defaults to False: under XLA the number of distinct ids
    (a dynamic shape) would recompile the update on every new count, and the gather/scatter
    update gains nothing from fusion.

    Works inside ``tf.function``/``fit`` and under ``MirroredStrategy`` /
    ``MultiWorkerMirroredStrategy`` (build it in the strategy's scope: slots are created
    next to their variables, sparse gradients are all-reduced by the base class, and every
    write goes through the variable's own ``scatter_*``/``assign_*`` methods inside the
    per-device update).
    """

    def __init__(self, learning_rate: LearningRate = 1e-3, beta_1: float = 0.9,
                 beta_2: float = 0.999, epsilon: float = 1e-8, weight_decay: float = 0.0,
                 clipnorm: float | None = None, clipvalue: float | None = None,
                 global_clipnorm: float | None = None, jit_compile: bool = False,
                 name: str = "LazyAdam", **kwargs: Any) -> None:
        super().__init__(name=name, weight_decay=weight_decay, clipnorm=clipnorm,
                         clipvalue=clipvalue, global_clipnorm=global_clipnorm,
                         jit_compile=jit_compile, **kwargs)
        if not 0.0 <= beta_1 < 1.0 or not 0.0 <= beta_2 < 1.0:
            raise ValueError(f"LazyAdam: beta_1 and beta_2 must be in [0, 1), got {beta_1!r} "
                             f"and {beta_2!r}")
        if weight_decay is not None and weight_decay < 0:
            raise ValueError(f"LazyAdam: weight_decay must be >= 0, got {weight_decay!r}")
        self._learning_rate = self._build_learning_rate(learning_rate)
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon

    def build(self, var_list: list[tf.Variable]) -> None:
        """Create the first (``m``) and second (``v``) moment slots, zeros shaped like each
        variable (in the strategy's scope: next to the variable)."""
        super().build(var_list)
        if getattr(self, "_built", False):
            return
        self._built = True
        self._momentums = [self.add_variable_from_reference(model_variable=var,
                                                            variable_name="m")
                           for var in var_list]
        self._velocities = [self.add_variable_from_reference(model_variable=var,
                                                             variable_name="v")
                            for var in var_list]

    # The base class decays every row of every variable before the update, and merges
    # repeated sparse ids; both happen row-wise in update_step instead.
    def _apply_weight_decay(self, variables: Any) -> None:
        return

    def _deduplicate_sparse_grad(self, grads: Any) -> Any:
        return grads

    def _decay_rate(self, variable: tf.Variable, lr: tf.Tensor) -> tf.Tensor | None:
        """``lr * weight_decay`` for this variable, None when it is not decayed."""
        if not self.weight_decay or not self._use_weight_decay(variable):
            return None
        return lr * tf.cast(self.weight_decay, variable.dtype)

    def update_step(self, gradient: tf.Tensor | tf.IndexedSlices,
                    variable: tf.Variable) -> None:
        """One lazy Adam(W) step of ``variable`` (see the class docstring)."""
        dtype = variable.dtype
        lr = tf.cast(self.learning_rate, dtype)
        step = tf.cast(self.iterations + 1, dtype)
        beta_1_power = tf.pow(tf.cast(self.beta_1, dtype), step)
        beta_2_power = tf.pow(tf.cast(self.beta_2, dtype), step)
        alpha = lr * tf.sqrt(1 - beta_2_power) / (1 - beta_1_power)
        index = self._index_dict[self._var_key(variable)]
        m = self._momentums[index]
        v = self._velocities[index]
        decay = self._decay_rate(variable, lr)

        if isinstance(gradient, tf.IndexedSlices):
            indices = gradient.indices
            num_rows = variable.shape[0] if variable.shape.rank else None
            if indices.dtype == tf.int64 and num_rows is not None and num_rows < 2**31:
                indices = tf.cast(indices, tf.int32)  # tf.unique is ~1.6x faster on int32
            rows, positions = tf.unique(indices)                                 # [U], [K]
            values = tf.math.unsorted_segment_sum(gradient.values, positions,
                                                  tf.shape(rows)[0])             # [U, D]
            m_rows = tf.gather(m, rows)
            m_rows = m_rows + (values - m_rows) * (1 - self.beta_1)
            v_rows = tf.gather(v, rows)
            v_rows = v_rows + (tf.square(values) - v_rows) * (1 - self.beta_2)
            m.scatter_update(tf.IndexedSlices(m_rows, rows))
            v.scatter_update(tf.IndexedSlices(v_rows, rows))
            w_rows = tf.gather(variable, rows)
            if decay is not None:
                w_rows = w_rows - w_rows * decay
            # Gather, subtract, scatter_update: on CPU ~2x faster than scatter_sub.
            w_rows = w_rows - (m_rows * alpha) / (tf.sqrt(v_rows) + self.epsilon)
            variable.scatter_update(tf.IndexedSlices(w_rows, rows))
        else:
            if decay is not None:
                variable.assign_sub(variable * decay)
            m.assign_add((gradient - m) * (1 - self.beta_1))
            v.assign_add((tf.square(gradient) - v) * (1 - self.beta_2))
            variable.assign_sub((m * alpha) / (tf.sqrt(v) + self.epsilon))

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({
            "learning_rate": self._serialize_hyperparameter(self._learning_rate),
            "beta_1": self.beta_1,
            "beta_2": self.beta_2,
            "epsilon": self.epsilon,
        })
        return config
