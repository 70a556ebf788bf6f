"""TWIN-style general search unit: the target-attention logit as the retrieval score."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import tensorflow as tf

from muse_tf.layers.attention_logits import MultiHeadAttentionLogits
from muse_tf.layers.checks import check_positive_int
from muse_tf.layers.search_unit import ID, GeneralSearchUnit


@tf.keras.utils.register_keras_serializable(package="muse_tf")
class AttentionGSU(GeneralSearchUnit):
    """Attention search (TWIN, Chang et al. 2023, "consistency-preserving GSU"; a lifelong
    baseline of the MUSE paper): the behaviours are ranked by the target-attention logit.

    ``s_i = (1/H) Σ_h (W_q^h e_t) · (W_k^h e_i) / sqrt(d)`` over the ID embeddings ``e``
    (:class:`~muse_tf.layers.attention_logits.MultiHeadAttentionLogits`, averaged over heads),
    then the top-K valid ``s_i``. The head average is one matrix-vector product over the
    history (the query is projected into key space), so the cost is that of an inner-product
    search, whatever ``num_heads``/``head_dim``.

    TWIN's point is that the search and the ESU score with the **same** parameters: pass the
    ESU's ``logits_layer`` (``TargetAttention.logits_layer``) as ``logits_layer`` and both use
    one set of weights, trained through the ESU. Without it the layer owns its projections
    (they learn only through the returned ``scores``). A config round trip rebuilds an owned
    copy of the logits layer (sharing is a wiring of the model, not a property of the layer).

    Call args:
      target: ``{"id": float [B, E] or [B, C, E]}``, the target's ID embedding.
      history: ``{"id": float [B, L, E]}``, the behaviours' ID embeddings.
      mask: bool ``[B, L]``; True = a real behaviour.

    Returns:
      ``{"indices": int32 [B, (C,) K], "scores": float32, "mask": bool}`` (ties: lower
      position first).

    Args:
      top_k: K.
      num_heads: H (ignored when ``logits_layer`` is given).
      head_dim: d (ignored when ``logits_layer`` is given).
      kernel_initializer: initializer of ``W_q`` and ``W_k`` of an owned logits layer.
      logits_layer: a shared :class:`MultiHeadAttentionLogits`, or None.
    """

    target_keys = (ID,)
    history_keys = (ID,)

    def __init__(self, top_k: int, num_heads: int = 4, head_dim: int = 16,
                 kernel_initializer: Any = "glorot_uniform",
                 logits_layer: MultiHeadAttentionLogits | Mapping[str, Any] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(top_k=top_k, **kwargs)
        name = type(self).__name__
        if isinstance(logits_layer, Mapping):  # from get_config
            logits_layer = tf.keras.layers.deserialize(dict(logits_layer))
        if logits_layer is not None and not isinstance(logits_layer, MultiHeadAttentionLogits):
            raise ValueError(f"{name}: `logits_layer` must be a MultiHeadAttentionLogits, got "
                             f"{type(logits_layer).__name__}")
        if logits_layer is not None:
            kernel_initializer = logits_layer.kernel_initializer
        self.kernel_initializer = tf.keras.initializers.get(kernel_initializer)
        if logits_layer is None:
            logits_layer = MultiHeadAttentionLogits(
                check_positive_int(name, "num_heads", num_heads),
                check_positive_int(name, "head_dim", head_dim),
                kernel_initializer=self.kernel_initializer, dtype=self.dtype_policy,
                name="attention_logits")
        self.logits_layer = logits_layer
        self.num_heads = logits_layer.num_heads
        self.head_dim = logits_layer.head_dim

    def build(self, target_shape: Any) -> None:
        shape = tf.TensorShape(target_shape[ID] if isinstance(target_shape, Mapping)
                               else target_shape)
        query_shape = tf.TensorShape([None, shape[-1]])
        if not self.logits_layer.built:
            with tf.name_scope(self.logits_layer.name):
                self.logits_layer.build(query_shape)
        # Target and behaviours share the ID embedding space: D_k = D_q.
        self.logits_layer.build_keys(int(shape[-1]))
        super().build(target_shape)

    def relevance(self, target: Mapping[str, tf.Tensor], history: Mapping[str, tf.Tensor],
                  mask: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        query, keys = target[ID], history[ID]
        if query.shape.rank == 2:
            return self.logits_layer.head_mean_logits(query, keys), mask
        # [B, C, E]: C queries against the same history, keys processed once per user.
        return self.logits_layer.candidate_mean_logits(query, keys), mask

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({
            "num_heads": self.num_heads,
            "head_dim": self.head_dim,
            "kernel_initializer": tf.keras.initializers.serialize(self.kernel_initializer),
            "logits_layer": tf.keras.layers.serialize(self.logits_layer),
        })
        return config
