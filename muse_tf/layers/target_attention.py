"""Multi-head DIN-style target attention over padded behaviours with a mask."""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from muse_tf.layers.attention_logits import (
    MultiHeadAttentionLogits,
    fresh_initializer,
    per_head_pool,
)
from muse_tf.layers.checks import check_mask, check_positive_int
from muse_tf.layers.masked_softmax import masked_softmax


@tf.keras.utils.register_keras_serializable(package="muse_tf")
class TargetAttention(tf.keras.layers.Layer):
    """Target attention (DIN, Zhou et al. 2018; the ID-based ESU of SIM/TWIN/MUSE): the target
    attends over the K retrieved behaviours.

    Per head ``h = 1..H`` (the ``a_id`` of the MUSE paper's eq. 4):

    * ``a^h_i = (W_q^h q) · (W_k^h k_i) / sqrt(d)``  (:class:`MultiHeadAttentionLogits`);
    * ``w^h_i = softmax_i(a^h_i)`` over the valid keys only (:func:`masked_softmax`);
    * ``o^h = Σ_i w^h_i · W_v^h k_i``;

    output ``[o^1; …; o^H]``; a row with no valid key outputs exactly zeros (no NaN).

    Two projection styles (the options of :class:`MultiHeadAttentionLogits`):

    * linear (the layer's defaults: no bias, logits scaled by ``1/sqrt(d)``; or with biases,
      unscaled, the official short-term attention): the pooled sum is computed as
      ``W_v^h (Σ_i w^h_i k_i) + b_v^h Σ_i w^h_i``, one projection per head instead of one per
      key;
    * ``activation="silu"`` (the official MUSE code's SA-TA: one head,
      ``Linear`` + SiLU for query, keys and values, unscaled): ``o^h = Σ_i w^h_i
      φ(W_v^h k_i + b_v^h)``, every key projected.

    Subclasses change the logits and reuse the rest: :meth:`attention_logits` gives
    ``a^h_i`` ``[batch, H, K]`` and :meth:`pool` turns any logits into the output (see
    :class:`~muse_tf.layers.semantic_aware_target_attention.SemanticAwareTargetAttention`).

    Call args:
      query: float ``[batch, D_q]``, the target item's embedding.
      keys: float ``[batch, K, D_k]``, the behaviours' embeddings (keys and values).
      mask: bool ``[batch, K]``; True = a real behaviour.

    Returns:
      float ``[batch, H * head_dim]``.

    Args:
      num_heads: H.
      head_dim: d, the size of each head's query/key/value projection.
      key_dim: D_k; inferred from ``keys`` on the first call when None.
      kernel_initializer: initializer of ``W_q``, ``W_k`` and ``W_v``.
      use_bias, activation, scaled, bias_initializer: the projection style (above; the
        same for query, keys and values).
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        key_dim: int | None = None,
        kernel_initializer: Any = "glorot_uniform",
        use_bias: bool = False,
        activation: str | None = None,
        scaled: bool = True,
        bias_initializer: Any = "zeros",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        name = type(self).__name__
        self.num_heads = check_positive_int(name, "num_heads", num_heads)
        self.head_dim = check_positive_int(name, "head_dim", head_dim)
        self.key_dim = None if key_dim is None else check_positive_int(name, "key_dim", key_dim)
        self.kernel_initializer = tf.keras.initializers.get(kernel_initializer)
        self.logits_layer = MultiHeadAttentionLogits(
            self.num_heads, self.head_dim, key_dim=self.key_dim,
            kernel_initializer=self.kernel_initializer, use_bias=use_bias,
            activation=activation, scaled=scaled, bias_initializer=bias_initializer,
            dtype=self.dtype_policy, name="attention_logits")
        self.value_kernel: tf.Variable | None = None
        self.value_bias: tf.Variable | None = None

    def build(self, query_shape: tf.TensorShape) -> None:
        # Already built when a TWIN search (AttentionGSU) shares these logits and ran first.
        if not self.logits_layer.built:
            with tf.name_scope(self.logits_layer.name):
                self.logits_layer.build(query_shape)
        if self.key_dim is not None:
            self._build_values(self.key_dim)
        super().build(query_shape)

    def _build_values(self, key_dim: int) -> None:
        if self.value_kernel is not None:
            return
        with tf.init_scope():
            self.value_kernel = self.add_weight(
                "value_kernel", shape=(key_dim, self.num_heads, self.head_dim),
                initializer=fresh_initializer(self.kernel_initializer, 2))
            if self.logits_layer.use_bias:
                self.value_bias = self.add_weight(
                    "value_bias", shape=(self.num_heads, self.head_dim),
                    initializer=self.logits_layer.bias_initializer)
        self.key_dim = key_dim

    def _prepare(self, query: tf.Tensor, keys: tf.Tensor,
                 mask: tf.Tensor | None) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        query = tf.convert_to_tensor(query)
        keys = tf.convert_to_tensor(keys)
        self.logits_layer.check_inputs(query, keys, layer=type(self).__name__)
        mask = check_mask(type(self).__name__, mask, keys, "keys")
        keys = tf.cast(keys, self.compute_dtype)
        # Padding never contributes, even if it holds NaN/inf: zero it before any product.
        keys = tf.where(mask[:, :, tf.newaxis], keys, tf.zeros([], keys.dtype))
        return tf.cast(query, self.compute_dtype), keys, mask

    def attention_logits(self, query: tf.Tensor, keys: tf.Tensor) -> tf.Tensor:
        """``a^h_i``: ``[batch, H, K]`` for checked, cast inputs."""
        return self.logits_layer.logits(query, keys)

    def pool(self, logits: tf.Tensor, keys: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
        """Masked softmax of ``logits`` ``[batch, H, K]`` over K, weighted sum of
        ``W_v^h k_i``, heads concatenated: ``[batch, H * head_dim]``."""
        self._build_values(int(keys.shape[-1]))
        weights = masked_softmax(logits, mask[:, tf.newaxis, :], axis=-1)
        if self.logits_layer.projects_keys:
            values = self.logits_layer.project(keys, self.value_kernel, self.value_bias)
            heads = per_head_pool(weights, values)
            return tf.reshape(heads, [-1, self.num_heads * self.head_dim])
        pooled_keys = tf.matmul(weights, keys)                                  # [B, H, D_k]
        heads = tf.einsum("bhe,ehd->bhd", pooled_keys, self.value_kernel)
        if self.value_bias is not None:
            # Σ_i w_i (W_v k_i + b_v) = W_v Σ_i w_i k_i + b_v Σ_i w_i (0 for an empty row).
            heads = heads + tf.reduce_sum(weights, axis=-1)[:, :, tf.newaxis] * self.value_bias
        return tf.reshape(heads, [-1, self.num_heads * self.head_dim])

    def call(self, query: tf.Tensor, keys: tf.Tensor, mask: tf.Tensor | None = None) -> tf.Tensor:
        query, keys, mask = self._prepare(query, keys, mask)
        return self.pool(self.attention_logits(query, keys), keys, mask)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({
            "num_heads": self.num_heads,
            "head_dim": self.head_dim,
            "key_dim": self.key_dim,
            "kernel_initializer": tf.keras.initializers.serialize(self.kernel_initializer),
            "use_bias": self.logits_layer.use_bias,
            "activation": self.logits_layer.activation,
            "scaled": self.logits_layer.scaled,
            "bias_initializer":
                tf.keras.initializers.serialize(self.logits_layer.bias_initializer),
        })
        return config
