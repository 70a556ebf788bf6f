"""A fused-score variant of the multimodal GSU: multimodal cosine plus ID-embedding cosine
(MUSE paper, Table 2 ablation)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import tensorflow as tf

from muse_tf.layers.search_unit import ID, MM, GeneralSearchUnit, inner_product


@tf.keras.utils.register_keras_serializable(package="muse_tf")
class MultimodalIdCosineGSU(GeneralSearchUnit):
    """Multimodal search fused with ID similarity (MUSE paper, Table 2: a GSU that adds the
    ID-embedding similarity to the multimodal one).

    ``s_i = cos(m_t, m_i) + λ · cos(e_t, e_i)`` with ``m`` the already L2-normalised
    multimodal embeddings (so ``cos(m_t, m_i) = <m_t, m_i>``) and ``e`` the learned item-ID
    embeddings (normalised here like ``tf.math.l2_normalize``: squared norms floored at
    ``1e-12``, so a zero ID embedding has cosine 0, not NaN), then the top-K
    valid ``s_i``.

    Call args:
      target: ``{"mm": float [B, D] or [B, C, D], "id": float [B, E] or [B, C, E]}``.
      history: ``{"mm": float [B, L, D], "id": float [B, L, E]}``.
      mask: bool ``[B, L]``; True = a real behaviour with a multimodal embedding.

    Returns:
      ``{"indices": int32 [B, (C,) K], "scores": float32, "mask": bool}`` (ties: lower
      position first).

    Args:
      top_k: K.
      id_weight: λ, the weight of the ID cosine (1.0: the plain sum).
    """

    target_keys = (MM, ID)
    history_keys = (MM, ID)

    def __init__(self, top_k: int = 50, id_weight: float = 1.0, **kwargs: Any) -> None:
        super().__init__(top_k=top_k, **kwargs)
        self.id_weight = float(id_weight)

    def relevance(self, target: Mapping[str, tf.Tensor], history: Mapping[str, tf.Tensor],
                  mask: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        mm_cosine = inner_product(target[MM], history[MM])
        history_id = history[ID]
        # cos(e_t, e_i) = <e_t/|e_t|, e_i> / |e_i|: one pass over the history for the norms.
        id_dot = inner_product(tf.math.l2_normalize(target[ID], axis=-1), history_id)
        id_norm_sq = tf.reduce_sum(tf.square(history_id), axis=-1)
        inverse_norm = tf.math.rsqrt(tf.maximum(id_norm_sq, 1e-12))
        if id_dot.shape.rank == 3:  # candidate axis: [B, C, L]
            inverse_norm = inverse_norm[:, tf.newaxis, :]
        return mm_cosine + self.id_weight * id_dot * inverse_norm, mask

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"id_weight": self.id_weight})
        return config
