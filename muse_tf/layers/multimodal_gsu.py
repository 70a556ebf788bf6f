"""MUSE's general search unit: multimodal cosine similarity, top-K (MUSE paper, Sec. 3.2)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import tensorflow as tf

from muse_tf.embeddings.multimodal_table import FrozenMultimodalTable
from muse_tf.layers.search_unit import MM, ROWS, GeneralSearchUnit, broadcast_mask, inner_product


@tf.keras.utils.register_keras_serializable(package="muse_tf")
class MultimodalGSU(GeneralSearchUnit):
    """Retrieves the K behaviours whose multimodal embedding is most cosine-similar to the
    target's (MUSE's GSU: "simplicity suffices in the GSU").

    ``r_i = cos(m_t, m_i) = <m_t, m_i>`` for L2-normalised SCL embeddings ``m``, then the
    top-K valid ``r_i`` (``K = 50`` in the paper). Vectors are normalised once, when the
    frozen table is built, not per step. The returned ``scores`` are the cosines
    (:attr:`scores_are_similarity`), which feed
    :class:`~muse_tf.layers.sim_tier.SimTier` and
    :class:`~muse_tf.layers.semantic_aware_target_attention.SemanticAwareTargetAttention`.

    Two ways to read the history:

    * with ``table`` (what the models do): ``history["rows"]`` int32 ``[B, L]`` rows of the
      :class:`~muse_tf.embeddings.FrozenMultimodalTable`; the cosines are computed block by
      block from the table (:meth:`FrozenMultimodalTable.similarity`: no ``[B, L, D]``
      gather per step) and behaviours without an embedding are masked here;
    * without: ``history["mm"]`` float ``[B, L, D]`` normalised vectors; the caller folds
      "has an embedding" into ``mask``.

    A target without a multimodal embedding (an all-zero vector: every cosine would be 0 and
    the tie rule would pick the *oldest* K) selects the **newest** K selectable behaviours
    instead, with scores 0: recency is the sane fallback when content says nothing (the
    official code's choice among all-equal scores is unspecified).

    Call args:
      target: ``{"mm": float [B, D] or [B, C, D]}`` normalised multimodal vectors.
      history: ``{"rows": int32 [B, L]}`` (with ``table``) or ``{"mm": float [B, L, D]}``.
      mask: bool ``[B, L]``; True = a real behaviour.

    Returns:
      ``{"indices": int32 [B, (C,) K], "scores": float32, "mask": bool}`` (ties: lower
      position first; newest first for a target without an embedding).

    Args:
      top_k: K, the number of behaviours to retrieve (default 50, as in the paper).
      table: the frozen multimodal table to read the history from, or None.
    """

    target_keys = (MM,)
    scores_are_similarity = True

    def __init__(self, top_k: int = 50, table: FrozenMultimodalTable | None = None,
                 **kwargs: Any) -> None:
        super().__init__(top_k=top_k, **kwargs)
        if isinstance(table, Mapping):  # from get_config
            table = tf.keras.layers.deserialize(dict(table))
        if table is not None and not isinstance(table, FrozenMultimodalTable):
            raise ValueError(f"MultimodalGSU: `table` must be a FrozenMultimodalTable or None, "
                             f"got {type(table).__name__}")
        self.table = table
        self.history_keys = (ROWS,) if table is not None else (MM,)

    def call(self, target: Mapping[str, tf.Tensor], history: Mapping[str, tf.Tensor],
             mask: tf.Tensor | None = None) -> dict[str, tf.Tensor]:
        target, history, mask = self.check_inputs(target, history, mask)
        scores, mask = self.relevance(target, history, mask)
        has_target = tf.reduce_any(tf.not_equal(target[MM], 0), axis=-1)[..., tf.newaxis]
        # Without a target vector, rank by position (right-padded, oldest first: a higher
        # position is newer), then report cosines (all 0) as the scores.
        positions = tf.cast(tf.range(tf.shape(scores)[-1]), scores.dtype)
        ranking = tf.where(has_target, scores, tf.broadcast_to(positions, tf.shape(scores)))
        selection = self.select(ranking, mask)
        picked = tf.gather(scores, selection["indices"], batch_dims=scores.shape.rank - 1)
        selection["scores"] = tf.where(selection["mask"] & has_target,
                                       tf.cast(picked, tf.float32), 0.0)
        return selection

    def relevance(self, target: Mapping[str, tf.Tensor], history: Mapping[str, tf.Tensor],
                  mask: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        if self.table is None:
            return inner_product(target[MM], history[MM]), mask
        rows = history[ROWS]
        if target[MM].shape[-1] is not None and target[MM].shape[-1] != self.table.dim:
            raise ValueError(
                f"MultimodalGSU: `target['mm']` has shape {tuple(target[MM].shape.as_list())} "
                f"but the table holds vectors of size {self.table.dim}")
        scores = tf.cast(self.table.similarity(target[MM], rows), self.compute_dtype)
        return scores, broadcast_mask(mask & self.table.has_embedding(rows), scores)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["table"] = (None if self.table is None
                           else tf.keras.layers.serialize(self.table))
        return config
