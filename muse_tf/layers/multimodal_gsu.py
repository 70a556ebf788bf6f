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
      :class:`~muse_tf.embeddings.FrozenMultimodalTable`; the cosines are computed from the
      table block by block, never gathering the ``[B, L, D]`` vectors at once
      (:meth:`table_similarity`: whole histories of a few users at a time, the same values
      as :meth:`FrozenMultimodalTable.similarity`) and behaviours without an embedding are
      masked here;
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
    #: Target size of one block of dequantised history vectors (float32
    #: ``[users, L, D]``) in :meth:`table_similarity`.
    block_bytes = 4 * 1024 * 1024

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
        scores = tf.cast(self.table_similarity(target[MM], rows), self.compute_dtype)
        return scores, broadcast_mask(mask & self.table.has_embedding(rows), scores)

    def table_similarity(self, queries: tf.Tensor, rows: tf.Tensor) -> tf.Tensor:
        """:meth:`FrozenMultimodalTable.similarity` (``<q, c_r> rho_r``, the same values),
        walked a block of whole user histories at a time.

        The table walks the history in blocks of positions across the whole batch: at a
        training batch of 1,000 users its ~1 MB block is two positions, so a step ran 500
        batched products of 1,000 one-by-two matrices (about 70 % of ``muse``'s op time at
        B = L = 1,000, profiled). Here a block is as many users as fit :attr:`block_bytes`
        with their whole history (8 at L = 1,000, D = 128): one matrix-vector product per
        user over all L positions, bit for bit the table's values. A history longer than the
        budget on its own (serving at L = 10,000 and more) goes to the table's own position
        blocks.

        Args:
          queries: float ``[B, dim]`` or ``[B, C, dim]``.
          rows: int32 ``[B, L]`` table rows of the history.

        Returns:
          float32 ``[B, L]`` or ``[B, C, L]``.
        """
        table = self.table
        queries = tf.cast(queries, tf.float32)
        rows = tf.convert_to_tensor(rows)
        single = queries.shape.rank == 2
        if single:
            queries = queries[:, tf.newaxis, :]
        batch, length = tf.shape(rows)[0], tf.shape(rows)[1]
        candidates = tf.shape(queries)[1]
        history_bytes = tf.cast(length, tf.int64) * table.dim * 4
        users = tf.cast(tf.clip_by_value(self.block_bytes // tf.maximum(history_bytes, 1), 1,
                                         tf.maximum(tf.cast(batch, tf.int64), 1)), tf.int32)

        def by_users() -> tf.Tensor:
            # At least one block, so that an empty batch still stacks a (sliced-off) block.
            blocks = tf.maximum((batch + users - 1) // users, 1)
            padding = blocks * users - batch
            block_rows = tf.reshape(tf.pad(rows, [[0, padding], [0, 0]]),
                                    [blocks, users, length])
            block_queries = tf.reshape(tf.pad(queries, [[0, padding], [0, 0], [0, 0]]),
                                       [blocks, users, candidates, table.dim])

            def block_scores(block: tuple[tf.Tensor, tf.Tensor]) -> tf.Tensor:
                block_rows, block_queries = block
                # The gather FrozenMultimodalTable.similarity uses: int8 codes (unpacked
                # from their int32 words) or float vectors, as stored.
                vectors = tf.cast(table._gather(block_rows), tf.float32)  # [users, L, dim]
                return tf.matmul(block_queries, vectors, transpose_b=True)

            scores = tf.map_fn(block_scores, (block_rows, block_queries),
                               parallel_iterations=2,
                               fn_output_signature=tf.TensorSpec([None, None, None],
                                                                 tf.float32))
            scores = tf.reshape(scores, [-1, candidates, length])[:batch]
            if table.inverse_norm is not None:
                scores *= tf.gather(table.inverse_norm, rows)[:, tf.newaxis, :]
            return scores

        def by_positions() -> tf.Tensor:
            return table.similarity(queries, rows)

        if rows.shape[1] is not None:  # the usual case (padded to max_seq_len): no cond
            fits = rows.shape[1] * table.dim * 4 <= self.block_bytes
            scores = by_users() if fits else by_positions()
        else:
            scores = tf.cond(history_bytes <= self.block_bytes, by_users, by_positions)
        scores = tf.ensure_shape(scores, [None, None, rows.shape[1]])
        return scores[:, 0, :] if single else scores

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["table"] = (None if self.table is None
                           else tf.keras.layers.serialize(self.table))
        return config
