"""MISS's two searches as one GSU: Co-GSU (ID embeddings) and MM-GSU (multimodal cosine),
each keeping part of the K, never the same behaviour twice (MISS, arXiv 2508.14515)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import tensorflow as tf

from muse_tf.embeddings.multimodal_table import FrozenMultimodalTable
from muse_tf.layers.checks import (
    check_float,
    check_mask,
    check_positive_int,
    check_rank,
    check_same_dim,
)
from muse_tf.layers.id_embedding_gsu import IdEmbeddingGSU
from muse_tf.layers.multimodal_gsu import MultimodalGSU
from muse_tf.layers.search_unit import ID, MM, ROWS, GeneralSearchUnit, broadcast_mask
from muse_tf.layers.topk import INDICES, MASK, SCORES

#: Keys of :meth:`CoMultimodalGSU.encode_history`: each search's per-user keys.
CO_KEYS = "co_keys"
MM_KEYS = "mm_keys"
SEARCH_KEYS = (CO_KEYS, MM_KEYS)

_NEG_INF = float("-inf")


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


def masked_keys(vectors: tf.Tensor, selectable: tf.Tensor) -> tf.Tensor:
    """``[..., L, D]`` vectors with a last column ``0`` where ``selectable``, ``-inf`` where
    not: ``[..., L, D + 1]``.

    Against a target ``[t, 1]`` the product is the score itself (``<t, v_i> + 0``, the added
    term exact) or ``-inf``, so one matrix product yields the masked scores a top-K reads:
    no ``[..., C, L]`` mask is tiled or applied per target.
    """
    bias = tf.where(selectable, tf.zeros([], vectors.dtype),
                    tf.constant(_NEG_INF, vectors.dtype))
    return tf.concat([vectors, bias[..., tf.newaxis]], axis=-1)


def _with_one(target: tf.Tensor) -> tf.Tensor:
    """``[..., D] -> [..., D + 1]``: the target side of :func:`masked_keys`."""
    return tf.concat([target, tf.ones_like(target[..., :1])], axis=-1)


def ranked_top_k(ranked: tf.Tensor, k: int) -> dict[str, tf.Tensor]:
    """:func:`~muse_tf.layers.topk.masked_top_k` of scores that carry their mask as ``-inf``.

    ``ranked`` ``[..., L]`` is finite where a position may be selected and ``-inf`` where not
    (what a product with :func:`masked_keys` gives). Returns ``{"indices": int32 [..., k],
    "scores": float32, "mask": bool}`` with ``masked_top_k``'s rules: best first, ties by the
    lower position, unused slots index 0, score 0, mask False. One ``TopKV2`` over the last
    axis, with no separate mask tensor or ``tf.where`` over ``[..., L]``.
    """
    length = ranked.shape[-1]
    if length is None or length < k:
        # Fewer positions than slots: pad with unselectable positions so top_k can return k.
        missing = tf.maximum(k - tf.shape(ranked)[-1], 0)
        rank = ranked.shape.rank
        paddings = tf.concat([tf.zeros([rank - 1, 2], tf.int32),
                              tf.stack([[0, missing]])], axis=0)
        ranked = tf.pad(ranked, paddings, constant_values=_NEG_INF)
    values, indices = tf.math.top_k(ranked, k=k, sorted=True)
    selected = values > _NEG_INF
    return {INDICES: tf.where(selected, indices, tf.zeros_like(indices)),
            SCORES: tf.where(selected, tf.cast(values, tf.float32), tf.zeros([], tf.float32)),
            MASK: selected}


def exclude_selected(ranked: tf.Tensor, selection: Mapping[str, tf.Tensor]) -> tf.Tensor:
    """``ranked`` ``[..., L]`` with ``-inf`` at the positions ``selection`` selected
    (``{"indices", "mask"}`` ``[..., K]``): ``min(ranked, -inf)`` there, ``min(ranked, +inf)``
    (unchanged) at unused slots, so their index 0 is harmless and repeated indices commute.

    One ``TensorScatterMin`` of ``K`` values per row into the score tensor, which it updates
    in place when nothing else reads it (no ``[..., L]`` mask is built).
    """
    length = tf.shape(ranked)[-1]
    flat = tf.reshape(ranked, tf.stack([-1, length]))
    k = tf.shape(selection[INDICES])[-1]
    rows = tf.repeat(tf.range(tf.shape(flat)[0]), k)
    columns = tf.reshape(selection[INDICES], [-1])
    updates = tf.where(tf.reshape(selection[MASK], [-1]), tf.constant(_NEG_INF, ranked.dtype),
                       tf.constant(float("inf"), ranked.dtype))
    flat = tf.tensor_scatter_nd_min(flat, tf.stack([rows, columns], axis=1), updates)
    return tf.reshape(flat, tf.shape(ranked))


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

    Many targets against one history (MISS's beam search scores ~2,000 tree nodes per user):
    :meth:`encode_history` computes the target-independent keys once per user (the ID
    embeddings and the dequantised unit vectors, each with its mask folded in as a
    ``0 / -inf`` column, :func:`masked_keys`) and :meth:`search` selects from them: per call
    one matrix product and one top-K per search, plus one scatter of Co-GSU's picks into
    MM-GSU's scores. The same selection as :meth:`call` up to float rounding (with an int8
    table MM-GSU's cosine is ``<m_t, c_r rho_r>`` there and ``<m_t, c_r> rho_r`` in
    :meth:`call`, which streams the table and never holds the ``[B, L, D]`` float vectors).

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

    # ------------------------------------------------------------------ many targets
    def encode_history(self, history: Mapping[str, tf.Tensor],
                       mask: tf.Tensor) -> dict[str, tf.Tensor]:
        """The target-independent search keys of a history, computed once per user.

        ``co_keys = [e_i, b_i]`` ``[B, L, E + 1]`` and ``mm_keys = [u_i, b'_i]``
        ``[B, L, D + 1]``: ``e_i`` the ID embeddings, ``u_i`` the unit multimodal vectors
        (``c_r rho_r`` from the table, or ``history["mm"]``), ``b_i = 0`` where ``mask`` and
        ``-inf`` elsewhere, ``b'_i`` the same but also ``-inf`` for a behaviour without a
        multimodal embedding (with a table). Feed to :meth:`search`.

        Args:
          history, mask: as for :meth:`call`.

        Returns:
          ``{"co_keys": float [B, L, E + 1], "mm_keys": float [B, L, D + 1]}``.
        """
        name = type(self).__name__
        if not isinstance(history, Mapping) or any(k not in history for k in self.history_keys):
            got = sorted(history) if isinstance(history, Mapping) else type(history).__name__
            raise ValueError(f"{name}: `history` must be a dict with keys "
                             f"{list(self.history_keys)}, got {got}")
        ids = tf.convert_to_tensor(history[ID])
        check_float(name, "history['id']", ids)
        check_rank(name, "history['id']", ids, ("batch", "seq_len", "dim"))
        mask = check_mask(name, mask, ids, "history['id']")
        table = self.mm_gsu.table
        if table is not None:
            rows = tf.convert_to_tensor(history[ROWS])
            if not rows.dtype.is_integer:
                raise ValueError(f"{name}: `history['rows']` must be an integer id tensor, got "
                                 f"dtype {rows.dtype.name} with shape "
                                 f"{tuple(rows.shape.as_list())}")
            check_rank(name, "history['rows']", rows, ("batch", "seq_len"))
            check_same_dim(name, "history['rows']", rows, 1, "history['id']", ids, 1,
                           "sequence length")
            vectors = table(rows)
            mm_selectable = mask & table.has_embedding(rows)
        else:
            vectors = tf.convert_to_tensor(history[MM])
            check_float(name, "history['mm']", vectors)
            check_rank(name, "history['mm']", vectors, ("batch", "seq_len", "dim"))
            check_same_dim(name, "history['mm']", vectors, 1, "history['id']", ids, 1,
                           "sequence length")
            mm_selectable = mask
        return {CO_KEYS: masked_keys(tf.cast(ids, self.compute_dtype), mask),
                MM_KEYS: masked_keys(tf.cast(vectors, self.compute_dtype), mm_selectable)}

    def search(self, target: Mapping[str, tf.Tensor],
               keys: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """:meth:`call`'s selection from :meth:`encode_history`'s keys.

        With ``t = [e_t, 1]``, ``s = [m_t, 1]`` (``m_t`` the normalised target vector)::

            co  = top_{K_co}(t K_co^T)                          [B, C, L] -> [B, C, K_co]
            mm  = top_{K - K_co}(s K_mm^T, -inf at co's picks)  [B, C, L] -> [B, C, K - K_co]

        Args:
          target: ``{"id": float [B, (C,) E], "mm": float [B, (C,) D]}``.
          keys: ``{"co_keys": [B, L, E + 1], "mm_keys": [B, L, D + 1]}`` (other keys are
            ignored).

        Returns:
          ``{"indices": int32 [B, (C,) K], "scores": float32, "mask": bool}``, as :meth:`call`.
        """
        name = type(self).__name__
        for side, given, needed in (("target", target, self.target_keys),
                                    ("keys", keys, SEARCH_KEYS)):
            if not isinstance(given, Mapping) or any(k not in given for k in needed):
                got = sorted(given) if isinstance(given, Mapping) else type(given).__name__
                raise ValueError(f"{name}: `{side}` must be a dict with keys {list(needed)}, "
                                 f"got {got}")
        checked = {}
        for key, key_name in ((ID, CO_KEYS), (MM, MM_KEYS)):
            query = tf.convert_to_tensor(target[key])
            search_keys = tf.convert_to_tensor(keys[key_name])
            arg, keys_arg = f"target[{key!r}]", f"keys[{key_name!r}]"
            check_float(name, arg, query)
            check_float(name, keys_arg, search_keys)
            check_rank(name, keys_arg, search_keys, ("batch", "seq_len", "dim + 1"))
            if query.shape.rank not in (2, 3):
                raise ValueError(f"{name}: `{arg}` must be [batch, dim] or [batch, candidates, "
                                 f"dim], got shape {tuple(query.shape.as_list())}")
            check_same_dim(name, arg, query, 0, keys_arg, search_keys, 0, "batch")
            if (query.shape[-1] is not None and search_keys.shape[-1] is not None
                    and query.shape[-1] + 1 != search_keys.shape[-1]):
                raise ValueError(f"{name}: `{arg}` has shape {tuple(query.shape.as_list())} but "
                                 f"`{keys_arg}` has shape {tuple(search_keys.shape.as_list())}: "
                                 "keys are the target's size + 1 (encode_history's mask column)")
            checked[key] = (tf.cast(query, self.compute_dtype),
                            tf.cast(search_keys, self.compute_dtype))
        single = checked[ID][0].shape.rank == 2
        if checked[MM][0].shape.rank != checked[ID][0].shape.rank:
            raise ValueError(f"{name}: `target['id']` and `target['mm']` must both have a "
                             f"candidate axis or neither, got shapes "
                             f"{tuple(checked[ID][0].shape.as_list())} and "
                             f"{tuple(checked[MM][0].shape.as_list())}")
        queries = {key: (query[:, tf.newaxis, :] if single else query, search_keys)
                   for key, (query, search_keys) in checked.items()}
        co_query, co_keys = queries[ID]
        mm_query, mm_keys = queries[MM]
        co = ranked_top_k(tf.matmul(_with_one(co_query), co_keys, transpose_b=True),
                          self.co_top_k)
        mm_scores = tf.matmul(_with_one(mm_query), mm_keys, transpose_b=True)
        mm = ranked_top_k(exclude_selected(mm_scores, co), self.top_k - self.co_top_k)
        out = {key: tf.concat([co[key], mm[key]], axis=-1) for key in (INDICES, SCORES, MASK)}
        return {key: value[:, 0] for key, value in out.items()} if single else out

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"co_top_k": self.co_top_k,
                       "table": self.mm_gsu.get_config()["table"]})
        return config
