"""MISS's two searches as one GSU: Co-GSU (ID embeddings) and MM-GSU (multimodal cosine),
each keeping part of the K, never the same behaviour twice (MISS, arXiv 2508.14515)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import tensorflow as tf

from muse_tf.embeddings.multimodal_table import FrozenMultimodalTable
from muse_tf.layers.checks import check_positive_int
from muse_tf.layers.id_embedding_gsu import IdEmbeddingGSU
from muse_tf.layers.multimodal_gsu import MultimodalGSU
from muse_tf.layers.search_unit import ID, MM, GeneralSearchUnit, broadcast_mask
from muse_tf.layers.topk import INDICES, MASK, SCORES


def selected_positions(indices: tf.Tensor, selected: tf.Tensor, length: tf.Tensor) -> tf.Tensor:
    """bool ``[..., L]``: True at the positions of ``indices`` ``[..., K]`` whose slot is
    ``selected``. One scatter over ``[N, L]`` (no ``[N, K, L]`` one-hot tensor)."""
    k = tf.shape(indices)[-1]
    flat = tf.reshape(indices, [-1, k])
    rows = tf.repeat(tf.range(tf.shape(flat)[0]), k)
    hits = tf.scatter_nd(tf.stack([rows, tf.reshape(flat, [-1])], axis=1),
                         tf.reshape(tf.cast(selected, tf.int32), [-1]),
                         tf.stack([tf.shape(flat)[0], length]))
    return tf.reshape(hits > 0, tf.concat([tf.shape(indices)[:-1], [length]], axis=0))


@tf.keras.utils.register_keras_serializable(package="muse_tf")
class CoMultimodalGSU(GeneralSearchUnit):
    """MISS's GSU pair (its ranking-side use in the MUSE paper's baselines).

    * Co-GSU: the ``K_co`` behaviours with the largest ``<e_t, e_i>`` (ID embeddings,
      :class:`IdEmbeddingGSU`);
    * MM-GSU: among the behaviours Co-GSU did **not** select, the ``K - K_co`` with the
      largest ``cos(m_t, m_i)`` (:class:`MultimodalGSU`).

    De-duplication: a behaviour both searches rank high is selected once (by Co-GSU) and
    MM-GSU takes the next most similar one, so the ESU sees ``K`` distinct behaviours rather
    than one behaviour twice (which would double its attention weight). Outputs are Co-GSU's
    ``K_co`` slots then MM-GSU's: ``scores`` ``[..., :K_co]`` are ID inner products,
    ``[..., K_co:]`` cosines.

    Call args:
      target: ``{"id": float [B, (C,) E], "mm": float [B, (C,) D]}``.
      history: ``{"id": float [B, L, E]}`` plus ``{"rows": int32 [B, L]}`` (with ``table``)
        or ``{"mm": float [B, L, D]}``.
      mask: bool ``[B, L]``; True = a real behaviour.

    Returns:
      ``{"indices": int32 [B, (C,) K], "scores": float32, "mask": bool}``.

    Args:
      top_k: K (>= 2).
      co_top_k: K_co (default ``K // 2``, as MISS splits its budget evenly).
      table: the frozen multimodal table for MM-GSU (see :class:`MultimodalGSU`).
    """

    target_keys = (ID, MM)

    def __init__(self, top_k: int, co_top_k: int | None = None,
                 table: FrozenMultimodalTable | Mapping[str, Any] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(top_k=top_k, **kwargs)
        name = type(self).__name__
        if self.top_k < 2:
            raise ValueError(f"{name}: `top_k` must be >= 2 (each search keeps at least one "
                             f"behaviour), got {self.top_k}")
        co_top_k = self.top_k // 2 if co_top_k is None else co_top_k
        self.co_top_k = check_positive_int(name, "co_top_k", co_top_k)
        if not self.co_top_k < self.top_k:
            raise ValueError(f"{name}: co_top_k={self.co_top_k} must be < top_k={self.top_k} "
                             "(both searches keep at least one behaviour)")
        self.co_gsu = IdEmbeddingGSU(self.co_top_k, name="co_gsu")
        self.mm_gsu = MultimodalGSU(self.top_k - self.co_top_k, table=table, name="mm_gsu")
        self.history_keys = (ID, *self.mm_gsu.history_keys)

    def relevance(self, target: Mapping[str, tf.Tensor], history: Mapping[str, tf.Tensor],
                  mask: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        raise NotImplementedError("CoMultimodalGSU selects in two steps; use call()")

    def call(self, target: Mapping[str, tf.Tensor], history: Mapping[str, tf.Tensor],
             mask: tf.Tensor | None = None) -> dict[str, tf.Tensor]:
        target, history, mask = self.check_inputs(target, history, mask)
        co = self.co_gsu.select(*self.co_gsu.relevance(target, history, mask))
        scores, mm_mask = self.mm_gsu.relevance(target, history, mask)
        taken = selected_positions(co[INDICES], co[MASK], tf.shape(scores)[-1])
        mm = self.mm_gsu.select(scores, broadcast_mask(mm_mask, scores) & ~taken)
        return {key: tf.concat([co[key], mm[key]], axis=-1) for key in (INDICES, SCORES, MASK)}

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"co_top_k": self.co_top_k,
                       "table": self.mm_gsu.get_config()["table"]})
        return config
