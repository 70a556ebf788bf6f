"""Dice, the data-adaptive activation function of DIN (Zhou et al., KDD 2018)."""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from muse_tf.layers.checks import check_float, check_rank

#: Dice's normalisations (see the class docstring).
NORMALIZATIONS = ("batch", "layer")


@tf.keras.utils.register_keras_serializable(package="muse_tf")
class Dice(tf.keras.layers.Layer):
    """Dice activation (DIN), per unit of a ``[batch, units]`` input.

    ``p(s) = sigmoid((s − E[s]) / sqrt(Var[s] + ε))``, ``f(s) = p(s) · s + (1 − p(s)) · α · s``

    with a learned ``α`` per unit. Two normalisations:

    * ``normalization="batch"`` (DIN; the layer's default): ``E[s]``, ``Var[s]`` are the
      mini-batch mean and (biased) variance per unit in training and their moving averages in
      inference, kept by a non-centring, non-scaling batch normalisation;
    * ``normalization="layer"`` (the official MUSE tower, "LayerNorm-Dice"): the mean and
      variance over the units of each example (a non-affine layer normalisation), the same in
      training and inference.

    ``α`` starts at 0 by default (a soft, data-centred gate between ``s`` and 0); the official
    MUSE code starts it at -0.25.

    Call args:
      inputs: float ``[batch, units]``.
      training: Python bool; batch statistics (and moving-average updates) when True.

    Returns:
      float ``[batch, units]``.

    Args:
      epsilon: ε (DIN uses 1e-8).
      momentum: momentum of the moving mean / variance (``"batch"`` only).
      alpha_initializer: initializer of ``α``.
      normalization: ``"batch"`` or ``"layer"``.
    """

    def __init__(self, epsilon: float = 1e-8, momentum: float = 0.99,
                 alpha_initializer: Any = "zeros", normalization: str = "batch",
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not epsilon > 0:
            raise ValueError(f"Dice: `epsilon` must be > 0, got {epsilon!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Dice: `momentum` must be in [0, 1), got {momentum!r}")
        self.epsilon = float(epsilon)
        self.momentum = float(momentum)
        self.alpha_initializer = tf.keras.initializers.get(alpha_initializer)
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"Dice: `normalization` must be one of {NORMALIZATIONS}, got "
                             f"{normalization!r}")
        self.normalization_kind = normalization
        if normalization == "layer":
            self.normalization = tf.keras.layers.LayerNormalization(
                axis=-1, epsilon=self.epsilon, center=False, scale=False,
                dtype=self.dtype_policy, name="normalization")
        else:
            self.normalization = tf.keras.layers.BatchNormalization(
                axis=-1, momentum=self.momentum, epsilon=self.epsilon, center=False,
                scale=False, dtype=self.dtype_policy, name="normalization")

    def build(self, input_shape: tf.TensorShape) -> None:
        input_shape = tf.TensorShape(input_shape)
        if input_shape.rank is not None and input_shape.rank != 2:
            raise ValueError(
                f"Dice: `inputs` must have rank 2 [batch, units], got shape {input_shape}")
        units = input_shape[-1]
        if units is None:
            raise ValueError(f"Dice: the units dimension of `inputs` must be known, got "
                             f"shape {input_shape}")
        self.alpha = self.add_weight("alpha", shape=(units,), initializer=self.alpha_initializer)
        super().build(input_shape)

    def call(self, inputs: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        check_float("Dice", "inputs", inputs)
        check_rank("Dice", "inputs", inputs, ("batch", "units"))
        p = tf.sigmoid(self.normalization(inputs, training=training))
        return p * inputs + (1.0 - p) * self.alpha * inputs

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({
            "epsilon": self.epsilon,
            "momentum": self.momentum,
            "alpha_initializer": tf.keras.initializers.serialize(self.alpha_initializer),
            "normalization": self.normalization_kind,
        })
        return config
