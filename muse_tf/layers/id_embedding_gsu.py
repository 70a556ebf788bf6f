"""SIM-soft general search unit: inner product of ID embeddings, top-K (SIM, Pi et al. 2020)."""

from __future__ import annotations

from collections.abc import Mapping

import tensorflow as tf

from muse_tf.layers.search_unit import ID, GeneralSearchUnit, inner_product


@tf.keras.utils.register_keras_serializable(package="muse_tf")
class IdEmbeddingGSU(GeneralSearchUnit):
    """SIM-soft search: the K behaviours with the largest ID-embedding inner product with the
    target (SIM "soft-search"; the ID-based GSU baseline of the MUSE paper's comparisons, and
    MISS's Co-GSU).

    ``s_i = <e_t, e_i>`` with learned ID embeddings ``e`` (not normalised), then the top-K
    valid ``s_i``. Selection is not differentiable; the embeddings learn through the model's
    use of the returned scores (or an auxiliary loss), as in SIM.

    Call args:
      target: ``{"id": float [B, E] or [B, C, E]}``, the target's ID embedding.
      history: ``{"id": float [B, L, E]}``, the behaviours' ID embeddings.
      mask: bool ``[B, L]``; True = a real behaviour.

    Returns:
      ``{"indices": int32 [B, (C,) K], "scores": float32, "mask": bool}`` (ties: lower
      position first).

    Args:
      top_k: K, the number of behaviours to retrieve.
    """

    target_keys = (ID,)
    history_keys = (ID,)

    def relevance(self, target: Mapping[str, tf.Tensor], history: Mapping[str, tf.Tensor],
                  mask: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return inner_product(target[ID], history[ID]), mask
