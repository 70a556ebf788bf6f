"""SIM-soft general search unit: inner product of ID embeddings, top-K (SIM, Pi et al. 2020)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import tensorflow as tf

from muse_tf.layers.search_unit import ID, GeneralSearchUnit, inner_product

#: How :class:`IdEmbeddingGSU` compares embeddings.
SIMILARITIES = ("inner_product", "cosine")


@tf.keras.utils.register_keras_serializable(package="muse_tf")
class IdEmbeddingGSU(GeneralSearchUnit):
    """SIM-soft search: the K behaviours with the largest ID-embedding inner product with the
    target (SIM "soft-search"; the ID-based GSU baseline of the MUSE paper's comparisons, and
    MISS's Co-GSU).

    ``s_i = <e_t, e_i>`` with learned ID embeddings ``e`` (``similarity="inner_product"``), or
    ``s_i = cos(e_t, e_i)`` (``similarity="cosine"``: the official MUSE code's SIM-soft, on
    L2-normalised item ⊕ category embeddings; a zero embedding has cosine 0), then the
    top-K valid ``s_i``. Selection is not differentiable; the embeddings learn through the model's
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
      similarity: ``"inner_product"`` or ``"cosine"``.
    """

    target_keys = (ID,)
    history_keys = (ID,)

    def __init__(self, top_k: int, similarity: str = "inner_product", **kwargs: Any) -> None:
        super().__init__(top_k=top_k, **kwargs)
        if similarity not in SIMILARITIES:
            raise ValueError(f"IdEmbeddingGSU: `similarity` must be one of {SIMILARITIES}, got "
                             f"{similarity!r}")
        self.similarity = similarity

    def relevance(self, target: Mapping[str, tf.Tensor], history: Mapping[str, tf.Tensor],
                  mask: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        query, keys = target[ID], history[ID]
        if self.similarity == "cosine":
            query = tf.math.l2_normalize(query, axis=-1)
            keys = tf.math.l2_normalize(keys, axis=-1)
        return inner_product(query, keys), mask

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "similarity": self.similarity}
