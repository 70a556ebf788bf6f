"""The CTR prediction tower: an MLP from the concatenated features to one logit."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from muse_tf.layers.attention_logits import fresh_initializer
from muse_tf.layers.checks import check_float, check_positive_int, check_rank
from muse_tf.layers.dice import NORMALIZATIONS, Dice

ACTIVATIONS = ("dice", "prelu", "relu")


@tf.keras.utils.register_keras_serializable(package="muse_tf")
class MLPTower(tf.keras.layers.Layer):
    """The ranking tower shared by MUSE and every baseline (MUSE paper: the user
    interest representations are concatenated with the other features and fed to an MLP).

    ``x_{l+1} = dropout(act(W_l x_l + b_l))`` for each hidden layer, then ``logit = w^T x + b``.
    ``act`` is :class:`~muse_tf.layers.dice.Dice` (DIN), PReLU (``α`` per unit, initialised
    to 0) or ReLU. The tower returns the logit; the model applies the sigmoid (inside the loss
    in training).

    Call args:
      inputs: float ``[batch, features]``.
      training: Python bool (Dice batch statistics, dropout).

    Returns:
      float ``[batch, 1]``, the click logit (float32 under a 16-bit mixed-precision policy).

    The official MUSE tower: ``hidden_units=(256, 128, 64)``, Dice with ``"layer"``
    normalisation and ``α`` starting at -0.25, weights ``N(0, 1/fan_in)``
    (``kernel_initializer=VarianceScaling(1, "fan_in", "untruncated_normal")``) and biases 0.1.

    Args:
      hidden_units: sizes of the hidden layers (may be empty: a linear model).
      activation: ``"dice"``, ``"prelu"`` or ``"relu"``.
      dropout: dropout rate after each hidden activation, in ``[0, 1)``.
      dice_normalization: :class:`~muse_tf.layers.dice.Dice`'s ``"batch"`` or ``"layer"``.
      dice_alpha: the initial ``α`` of Dice.
      kernel_initializer, bias_initializer: of every ``Dense`` layer.
    """

    def __init__(self, hidden_units: Sequence[int], activation: str = "dice",
                 dropout: float = 0.0, dice_normalization: str = "batch",
                 dice_alpha: float = 0.0, kernel_initializer: Any = "glorot_uniform",
                 bias_initializer: Any = "zeros", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(hidden_units, (str, bytes)) or not isinstance(hidden_units, Sequence):
            raise ValueError(
                f"MLPTower: `hidden_units` must be a sequence of positive ints, got "
                f"{hidden_units!r}")
        self.hidden_units = [check_positive_int("MLPTower", "hidden_units[]", u)
                             for u in hidden_units]
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"MLPTower: `activation` must be one of {ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"MLPTower: `dropout` must be in [0, 1), got {dropout!r}")
        self.dropout = float(dropout)
        if dice_normalization not in NORMALIZATIONS:
            raise ValueError(f"MLPTower: `dice_normalization` must be one of {NORMALIZATIONS}, "
                             f"got {dice_normalization!r}")
        self.dice_normalization = dice_normalization
        self.dice_alpha = float(dice_alpha)
        self.kernel_initializer = tf.keras.initializers.get(kernel_initializer)
        self.bias_initializer = tf.keras.initializers.get(bias_initializer)
        dense = dict(kernel_initializer=self.kernel_initializer,
                     bias_initializer=self.bias_initializer)
        # Sublayers follow this layer's dtype policy (mixed precision included).
        policy = self.dtype_policy
        self.hidden_layers: list[tf.keras.layers.Layer] = []
        for i, units in enumerate(self.hidden_units):
            self.hidden_layers.append(tf.keras.layers.Dense(
                units, dtype=policy, name=f"dense_{i}",
                **{k: fresh_initializer(v, i) for k, v in dense.items()}))
            self.hidden_layers.append(self._make_activation(i))
            if self.dropout > 0.0:
                self.hidden_layers.append(
                    tf.keras.layers.Dropout(self.dropout, dtype=policy, name=f"dropout_{i}"))
        self.logit_layer = tf.keras.layers.Dense(
            1, dtype=policy, name="logit",
            **{k: fresh_initializer(v, len(self.hidden_units)) for k, v in dense.items()})

    def _make_activation(self, i: int) -> tf.keras.layers.Layer:
        if self.activation == "dice":
            return Dice(normalization=self.dice_normalization,
                        alpha_initializer=tf.keras.initializers.Constant(self.dice_alpha),
                        epsilon=1e-12 if self.dice_normalization == "layer" else 1e-8,
                        dtype=self.dtype_policy, name=f"dice_{i}")
        if self.activation == "prelu":
            return tf.keras.layers.PReLU(dtype=self.dtype_policy, name=f"prelu_{i}")
        return tf.keras.layers.ReLU(dtype=self.dtype_policy, name=f"relu_{i}")

    def call(self, inputs: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        check_float("MLPTower", "inputs", inputs)
        check_rank("MLPTower", "inputs", inputs, ("batch", "features"))
        x = inputs
        for layer in self.hidden_layers:
            x = layer(x, training=training)
        logit = self.logit_layer(x)
        # Under mixed precision the logit leaves in float32, ready for a numerically safe loss.
        return tf.cast(logit, tf.float32) if logit.dtype.size < 4 else logit

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({
            "hidden_units": list(self.hidden_units),
            "activation": self.activation,
            "dropout": self.dropout,
            "dice_normalization": self.dice_normalization,
            "dice_alpha": self.dice_alpha,
            "kernel_initializer": tf.keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": tf.keras.initializers.serialize(self.bias_initializer),
        })
        return config
