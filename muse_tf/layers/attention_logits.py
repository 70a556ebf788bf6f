"""Multi-head scaled dot-product target-attention logits (shared by target attention, SA-TA and
the TWIN-style attention GSU)."""

from __future__ import annotations

import math
from typing import Any

import tensorflow as tf

from muse_tf.layers.checks import (
    check_float,
    check_positive_int,
    check_rank,
    check_same_dim,
)


def fresh_initializer(initializer: tf.keras.initializers.Initializer,
                      salt: int) -> tf.keras.initializers.Initializer:
    """A new instance of ``initializer`` for one kernel. An unseeded tf-keras initializer
    returns the same values on every call and a seeded one repeats its seed, so each kernel
    gets its own instance (a seeded one with ``seed + salt``) to start different."""
    config = initializer.get_config()
    if config.get("seed") is not None:
        config["seed"] = int(config["seed"]) + salt
    return initializer.__class__.from_config(config)


#: Activations allowed on the projections (None = linear).
PROJECTION_ACTIVATIONS = (None, "silu")


# The attention products below are batched matrix products (``tf.matmul``) rather than
# ``tf.einsum``: the same values, but on CPU einsum's forward and gradient run 2-3x slower
# at these shapes (measured: [1000, 1, 32] x [1000, 50, 1, 32], forward + backward).
def heads_first(x: tf.Tensor) -> tf.Tensor:
    """``[batch, K, H, d] -> [batch, H, K, d]``."""
    return tf.transpose(x, [0, 2, 1, 3])


def per_head_logits(query: tf.Tensor, keys: tf.Tensor) -> tf.Tensor:
    """``a^h_i = q^h · k^h_i``: query ``[batch, H, d]``, keys ``[batch, K, H, d]`` ->
    ``[batch, H, K]``."""
    return tf.matmul(query[:, :, tf.newaxis, :], heads_first(keys), transpose_b=True)[:, :, 0, :]


def per_head_pool(weights: tf.Tensor, values: tf.Tensor) -> tf.Tensor:
    """``o^h = Σ_i w^h_i v^h_i``: weights ``[batch, H, K]``, values ``[batch, K, H, d]`` ->
    ``[batch, H, d]``."""
    return tf.matmul(weights[:, :, tf.newaxis, :], heads_first(values))[:, :, 0, :]


@tf.keras.utils.register_keras_serializable(package="muse_tf")
class MultiHeadAttentionLogits(tf.keras.layers.Layer):
    """Per-head target-attention logits between one query and K keys.

    ``a^h_i = φ(W_q^h q + b_q^h) · φ(W_k^h k_i + b_k^h) · c`` for heads ``h = 1..H`` with
    ``W_q^h ∈ R^{d×D_q}``, ``W_k^h ∈ R^{d×D_k}``, ``d = head_dim``, an activation ``φ``
    (identity or SiLU), optional biases and ``c = 1/sqrt(d)`` (``scaled``) or 1: the
    ``a_id`` of the MUSE paper's SA-TA (eq. 4) and of DIN/TWIN-style target attention.

    * Linear projections (``activation=None``, with or without bias; the first muse_tf
      version and the official code's short-term attention): computed as
      ``a^h_i = c·(k_i · u^h + b_k^h · p^h)`` with ``p^h = W_q^h q + b_q^h`` and
      ``u^h = (W_k^h)^T p^h ∈ R^{D_k}``: the query projected into key space once, the same
      value for ``O(K·D_k)`` per head instead of ``O(K·D_k·d)`` (what lets the attention GSU
      score 100,000 behaviours cheaply).
    * With an activation (the official MUSE code's SA-TA: one head, ``Linear`` + SiLU
      projections of query and keys, unscaled dot product) every key is projected.

    Call args:
      query: float ``[batch, D_q]``.
      keys: float ``[batch, K, D_k]``.

    Returns:
      logits ``[batch, H, K]``.

    Args:
      num_heads: H.
      head_dim: d, the size of each head's query/key projection.
      key_dim: D_k; inferred from ``keys`` on the first call when None (it is recorded in the
        config so a layer rebuilt from its config creates all weights in ``build``).
      kernel_initializer: initializer of ``W_q`` and ``W_k``.
      use_bias: add ``b_q``, ``b_k``.
      activation: ``φ``: None (linear) or ``"silu"``.
      scaled: multiply by ``1/sqrt(d)``.
      bias_initializer: initializer of the biases (the official code: 0.1).
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
        if activation not in PROJECTION_ACTIVATIONS:
            raise ValueError(f"{name}: `activation` must be one of {PROJECTION_ACTIVATIONS}, "
                             f"got {activation!r}")
        self.use_bias = bool(use_bias)
        self.activation = activation
        self.scaled = bool(scaled)
        self.bias_initializer = tf.keras.initializers.get(bias_initializer)
        self.query_kernel: tf.Variable | None = None
        self.key_kernel: tf.Variable | None = None
        self.query_bias: tf.Variable | None = None
        self.key_bias: tf.Variable | None = None

    @property
    def projects_keys(self) -> bool:
        """Whether every key is projected (an activation): no key-space shortcut."""
        return self.activation is not None

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim) if self.scaled else 1.0

    def project(self, x: tf.Tensor, kernel: tf.Variable, bias: tf.Variable | None) -> tf.Tensor:
        """``φ(W^h x + b^h)``: ``[..., D] -> [..., H, d]`` (one 2-D matmul)."""
        heads = self.num_heads * self.head_dim
        flat = tf.reshape(x, [-1, kernel.shape[0]])
        out = tf.matmul(flat, tf.reshape(kernel, [kernel.shape[0], heads]))
        if bias is not None:
            out = out + tf.reshape(bias, [heads])
        if self.activation == "silu":
            out = tf.nn.silu(out)
        shape = tf.concat([tf.shape(x)[:-1], [self.num_heads, self.head_dim]], axis=0)
        return tf.reshape(out, shape)

    def build(self, query_shape: tf.TensorShape) -> None:
        query_shape = tf.TensorShape(query_shape)
        query_dim = query_shape[-1]
        if query_dim is None:
            raise ValueError(
                f"{type(self).__name__}: the last dimension of `query` must be known, got "
                f"shape {query_shape}")
        self.query_kernel = self.add_weight(
            "query_kernel", shape=(query_dim, self.num_heads, self.head_dim),
            initializer=fresh_initializer(self.kernel_initializer, 0))
        if self.use_bias:
            self.query_bias = self.add_weight(
                "query_bias", shape=(self.num_heads, self.head_dim),
                initializer=self.bias_initializer)
        if self.key_dim is not None:
            self.build_keys(self.key_dim)
        super().build(query_shape)

    def build_keys(self, key_dim: int) -> None:
        """Creates ``W_k`` for keys of size ``key_dim`` (once; later calls check the size)."""
        if self.key_kernel is not None:
            if self.key_kernel.shape[0] != key_dim:
                raise ValueError(
                    f"{type(self).__name__}: built for keys of size {self.key_kernel.shape[0]}, "
                    f"got keys of size {key_dim}")
            return
        # Weights first seen inside a trace (functional model, tf.function) are lifted out of
        # it, like tf.keras.layers.MultiHeadAttention does.
        with tf.init_scope():
            self.key_kernel = self.add_weight(
                "key_kernel", shape=(key_dim, self.num_heads, self.head_dim),
                initializer=fresh_initializer(self.kernel_initializer, 1))
            if self.use_bias:
                self.key_bias = self.add_weight(
                    "key_bias", shape=(self.num_heads, self.head_dim),
                    initializer=self.bias_initializer)
        self.key_dim = key_dim

    def check_inputs(self, query: tf.Tensor, keys: tf.Tensor, layer: str | None = None,
                     query_arg: str = "query", keys_arg: str = "keys") -> None:
        """Raises ``ValueError`` naming the argument on a bad rank, dtype or batch size."""
        layer = layer or type(self).__name__
        check_float(layer, query_arg, query)
        check_float(layer, keys_arg, keys)
        check_rank(layer, query_arg, query, ("batch", "query_dim"))
        check_rank(layer, keys_arg, keys, ("batch", "seq_len", "key_dim"))
        check_same_dim(layer, query_arg, query, 0, keys_arg, keys, 0, "batch")
        if keys.shape[-1] is None:
            raise ValueError(
                f"{layer}: the last dimension of `{keys_arg}` must be known, got shape "
                f"{tuple(keys.shape.as_list())}")
        if self.query_kernel is not None and query.shape[-1] is not None \
                and query.shape[-1] != self.query_kernel.shape[0]:
            raise ValueError(
                f"{layer}: built for a query of size {self.query_kernel.shape[0]}, got "
                f"`{query_arg}` with shape {tuple(query.shape.as_list())}")

    def key_space_query(self, query: tf.Tensor, keys: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """``(c·u^h [batch, H, D_k], c·b_k^h·p^h [batch, H])``, so that
        ``a^h_i = k_i · (c u^h) + c b_k^h·p^h`` (linear projections only, see
        :attr:`projects_keys`)."""
        if self.query_kernel is None:
            raise RuntimeError(f"{type(self).__name__} is used before it was built")
        if self.projects_keys:
            raise RuntimeError(f"{type(self).__name__}: no key-space query with an "
                               "activation; use logits()/candidate_mean_logits()")
        self.build_keys(int(keys.shape[-1]))
        projected = tf.einsum("bq,qhd->bhd", query, self.query_kernel)
        if self.query_bias is not None:
            projected = projected + self.query_bias
        scale = tf.cast(self.scale, projected.dtype)
        key_space = tf.einsum("bhd,khd->bhk", projected, self.key_kernel) * scale
        if self.key_bias is None:
            offset = tf.zeros(tf.shape(projected)[:2], projected.dtype)
        else:
            offset = tf.reduce_sum(projected * self.key_bias, axis=-1) * scale
        return key_space, offset

    def _projected(self, query: tf.Tensor, keys: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """``(φ(W_q q + b_q) · c [..., H, d], φ(W_k k + b_k) [B, K, H, d])``."""
        if self.query_kernel is None:
            raise RuntimeError(f"{type(self).__name__} is used before it was built")
        self.build_keys(int(keys.shape[-1]))
        projected_query = self.project(query, self.query_kernel, self.query_bias)
        projected_keys = self.project(keys, self.key_kernel, self.key_bias)
        return projected_query * tf.cast(self.scale, projected_query.dtype), projected_keys

    def call(self, query: tf.Tensor, keys: tf.Tensor) -> tf.Tensor:
        query = tf.convert_to_tensor(query)
        keys = tf.convert_to_tensor(keys)
        self.check_inputs(query, keys)
        return self.logits(tf.cast(query, self.compute_dtype), tf.cast(keys, self.compute_dtype))

    def logits(self, query: tf.Tensor, keys: tf.Tensor) -> tf.Tensor:
        """``a^h_i``: ``[batch, H, K]`` (inputs already checked and cast)."""
        if self.projects_keys:
            projected_query, projected_keys = self._projected(query, keys)
            return per_head_logits(projected_query, projected_keys)
        key_space, offset = self.key_space_query(query, keys)
        return tf.matmul(key_space, keys, transpose_b=True) + offset[:, :, tf.newaxis]

    def head_mean_logits(self, query: tf.Tensor, keys: tf.Tensor) -> tf.Tensor:
        """``(1/H) Σ_h a^h_i``: ``[batch, K]`` (one matrix-vector product over the keys
        without bias and activation)."""
        if self.projects_keys:
            return tf.reduce_mean(self.logits(query, keys), axis=1)
        key_space, offset = self.key_space_query(query, keys)
        mean_query = tf.reduce_mean(key_space, axis=1)
        return (tf.linalg.matvec(keys, mean_query)
                + tf.reduce_mean(offset, axis=1)[:, tf.newaxis])

    def candidate_mean_logits(self, query: tf.Tensor, keys: tf.Tensor) -> tf.Tensor:
        """``(1/H) Σ_h a^h_{c,i}`` of C queries per row against that row's keys:
        ``query`` ``[batch, C, D_q]``, ``keys`` ``[batch, K, D_k]`` → ``[batch, C, K]``; the
        keys are processed once per row, not once per candidate."""
        if self.projects_keys:
            projected_query, projected_keys = self._projected(query, keys)
            heads = tf.cast(self.num_heads, projected_query.dtype)
            return tf.einsum("bchd,bkhd->bck", projected_query, projected_keys) / heads
        flat = tf.reshape(query, [-1, query.shape[-1]])
        key_space, offset = self.key_space_query(flat, keys)
        candidates = tf.shape(query)[1]
        key_space = tf.reshape(tf.reduce_mean(key_space, axis=1),
                               [-1, candidates, keys.shape[-1]])
        offset = tf.reshape(tf.reduce_mean(offset, axis=1), [-1, candidates])
        return tf.matmul(key_space, keys, transpose_b=True) + offset[:, :, tf.newaxis]

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({
            "num_heads": self.num_heads,
            "head_dim": self.head_dim,
            "key_dim": self.key_dim,
            "kernel_initializer": tf.keras.initializers.serialize(self.kernel_initializer),
            "use_bias": self.use_bias,
            "activation": self.activation,
            "scaled": self.scaled,
            "bias_initializer": tf.keras.initializers.serialize(self.bias_initializer),
        })
        return config
