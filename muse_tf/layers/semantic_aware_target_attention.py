"""MUSE's semantic-aware target attention (SA-TA): ID attention fused with multimodal
similarity (MUSE paper, eq. 4–5)."""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from muse_tf.layers.checks import check_float, check_rank, check_same_dim
from muse_tf.layers.target_attention import TargetAttention


@tf.keras.utils.register_keras_serializable(package="muse_tf")
class SemanticAwareTargetAttention(TargetAttention):
    """SA-TA: target attention whose logits also see the multimodal similarity of each
    retrieved behaviour to the target (MUSE paper, ESU).

    Per head ``h`` (eq. 4–5):

    * ``a^h_i``, the ID attention logit
      (:class:`~muse_tf.layers.target_attention.TargetAttention`, either projection style);
    * ``R'_i = R_i / τ^h`` with ``R_i`` the multimodal cosine of behaviour ``i`` to the
      target (the GSU's scores) and a learned temperature ``τ^h`` (or ``R'_i = R_i`` when
      ``semantic_temperature_init`` is None);
    * ``z^h_i = g1^h · a^h_i + g2^h · R'_i + g3^h · (a^h_i · R'_i)`` with learned scalars
      ``g1^h, g2^h, g3^h``;
    * ``w^h_i = softmax_i(z^h_i)`` over valid behaviours; ``o^h = Σ_i w^h_i v^h_i``;

    output ``[o^1; …; o^H]`` (zeros for a row with no valid behaviour).

    Initialisation. The official MUSE code: ``τ = 0.1`` and ``g1 = g2 = g3 = 1``, so the
    effective initial gates on ``(a, R, a·R)`` are ``(1, 10, 10)``: the semantic terms
    dominate from the first step, which a dense learning rate of 2e-4 could not reach from
    small gates in one epoch. The layer's defaults (the first muse_tf version) are no
    temperature and ``(1, 1, 0)``: ID attention plus an additive prior.

    Call args:
      query: float ``[batch, D_q]``, the target's ID embedding.
      keys: float ``[batch, K, D_k]``, the retrieved behaviours' ID embeddings.
      similarities: float ``[batch, K]``, ``R_i``; ignored where ``mask`` is False.
      mask: bool ``[batch, K]``; True = a real retrieved behaviour.

    Returns:
      float ``[batch, H * head_dim]``.

    Args:
      num_heads, head_dim, key_dim, kernel_initializer: as in
        :class:`~muse_tf.layers.target_attention.TargetAttention`.
      id_gate_init, similarity_gate_init, interaction_gate_init: initial ``g1``, ``g2``,
        ``g3`` (the same for every head).
      semantic_temperature_init: initial ``τ`` (learned, one per head), or None for none.
      use_bias, activation, scaled, bias_initializer: the projection style of
        :class:`~muse_tf.layers.target_attention.TargetAttention`.
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        key_dim: int | None = None,
        kernel_initializer: Any = "glorot_uniform",
        id_gate_init: float = 1.0,
        similarity_gate_init: float = 1.0,
        interaction_gate_init: float = 0.0,
        semantic_temperature_init: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_heads, head_dim, key_dim=key_dim,
                         kernel_initializer=kernel_initializer, **kwargs)
        self.id_gate_init = float(id_gate_init)
        self.similarity_gate_init = float(similarity_gate_init)
        self.interaction_gate_init = float(interaction_gate_init)
        if semantic_temperature_init is not None and not semantic_temperature_init > 0:
            raise ValueError(f"SemanticAwareTargetAttention: `semantic_temperature_init` must "
                             f"be > 0 or None, got {semantic_temperature_init!r}")
        self.semantic_temperature_init = (None if semantic_temperature_init is None
                                          else float(semantic_temperature_init))
        self.semantic_temperature: tf.Variable | None = None

    def build(self, query_shape: tf.TensorShape) -> None:
        def gate(name: str, value: float) -> tf.Variable:
            return self.add_weight(name, shape=(self.num_heads,),
                                   initializer=tf.keras.initializers.Constant(value))

        self.id_gate = gate("id_gate", self.id_gate_init)
        self.similarity_gate = gate("similarity_gate", self.similarity_gate_init)
        self.interaction_gate = gate("interaction_gate", self.interaction_gate_init)
        if self.semantic_temperature_init is not None:
            self.semantic_temperature = gate("semantic_temperature",
                                             self.semantic_temperature_init)
        super().build(query_shape)

    def effective_gates(self) -> tf.Tensor:
        """``[3, H]``: the weights of ``a``, ``R`` and ``a·R`` in ``z`` (``g1``, ``g2/τ``,
        ``g3/τ``)."""
        inverse = (tf.ones_like(self.id_gate) if self.semantic_temperature is None
                   else 1.0 / self.semantic_temperature)
        return tf.stack([self.id_gate, self.similarity_gate * inverse,
                         self.interaction_gate * inverse])

    def fused_logits(self, query: tf.Tensor, keys: tf.Tensor,
                     similarities: tf.Tensor) -> tf.Tensor:
        """``z^h_i = g1^h a^h_i + g2^h R'_i + g3^h a^h_i R'_i``: ``[batch, H, K]``."""
        id_logits = self.attention_logits(query, keys)
        similarity = similarities[:, tf.newaxis, :]
        if self.semantic_temperature is not None:
            similarity = similarity / self.semantic_temperature[tf.newaxis, :, tf.newaxis]
        g1, g2, g3 = (g[tf.newaxis, :, tf.newaxis] for g in
                      (self.id_gate, self.similarity_gate, self.interaction_gate))
        return g1 * id_logits + g2 * similarity + g3 * id_logits * similarity

    def call(self, query: tf.Tensor, keys: tf.Tensor, similarities: tf.Tensor,
             mask: tf.Tensor | None = None) -> tf.Tensor:
        query, keys, mask = self._prepare(query, keys, mask)
        similarities = tf.convert_to_tensor(similarities)
        name = type(self).__name__
        check_float(name, "similarities", similarities)
        check_rank(name, "similarities", similarities, ("batch", "seq_len"))
        check_same_dim(name, "similarities", similarities, 0, "keys", keys, 0, "batch")
        check_same_dim(name, "similarities", similarities, 1, "keys", keys, 1,
                       "sequence length")
        similarities = tf.where(mask, tf.cast(similarities, self.compute_dtype),
                                tf.zeros([], self.compute_dtype))
        return self.pool(self.fused_logits(query, keys, similarities), keys, mask)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({
            "id_gate_init": self.id_gate_init,
            "similarity_gate_init": self.similarity_gate_init,
            "interaction_gate_init": self.interaction_gate_init,
            "semantic_temperature_init": self.semantic_temperature_init,
        })
        return config
