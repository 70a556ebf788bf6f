"""Masks and masked reductions over right-padded histories (the one copy every model uses).

A history is right-padded, oldest first: row ``b`` holds its behaviours at positions
``0 .. len[b] - 1``; a behaviour is valid iff its position < ``len[b]`` and its id != 0.
"""

from __future__ import annotations

import tensorflow as tf


def history_mask(ids: tf.Tensor, lengths: tf.Tensor) -> tf.Tensor:
    """bool ``[B, L]``: position < length and id != 0 (``ids`` ``[B, L]``, ``lengths``
    ``[B]``)."""
    ids = tf.convert_to_tensor(ids)
    if ids.shape.rank != 2:
        raise ValueError(f"history_mask: ids must be [batch, seq_len], got shape {ids.shape}")
    positions = tf.range(tf.shape(ids)[1], dtype=tf.int32)[tf.newaxis, :]
    return (positions < tf.cast(lengths, tf.int32)[:, tf.newaxis]) & (ids != 0)


def newest_positions(lengths: tf.Tensor, count: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Positions of the newest ``count`` behaviours (oldest of them first) and their mask.

    Returns int32 ``[B, count]`` positions clipped to 0 and bool ``[B, count]`` (False where
    the history is shorter than ``count``).
    """
    lengths = tf.cast(lengths, tf.int32)[:, tf.newaxis]
    positions = lengths - count + tf.range(count, dtype=tf.int32)[tf.newaxis, :]
    return tf.maximum(positions, 0), positions >= 0


def masked_mean(values: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """``Σ_i mask_i v_i / Σ_i mask_i``: ``values`` ``[B, S, D]``, ``mask`` ``[B, S]`` →
    ``[B, D]``.

    Masked positions never contribute, even when they hold NaN or inf (they are replaced by
    zeros before the sum), and a row with no valid position is exactly zero.
    """
    values = tf.convert_to_tensor(values)
    mask = tf.convert_to_tensor(mask)
    if values.shape.rank != 3 or mask.shape.rank != 2:
        raise ValueError(f"masked_mean: values must be [batch, seq, dim] and mask [batch, seq], "
                         f"got shapes {values.shape} and {mask.shape}")
    kept = tf.where(mask[:, :, tf.newaxis], values, tf.zeros([], values.dtype))
    count = tf.reduce_sum(tf.cast(mask, values.dtype), axis=1, keepdims=True)
    return tf.math.divide_no_nan(tf.reduce_sum(kept, axis=1), count)


def flatten_candidates(x: tf.Tensor) -> tf.Tensor:
    """``[B, C, ...]`` → ``[B*C, ...]`` (row ``b*C + c`` is candidate ``c`` of user ``b``;
    static trailing dimensions kept)."""
    if x.shape.rank is None:
        return tf.reshape(x, tf.concat([[-1], tf.shape(x)[2:]], axis=0))
    return tf.reshape(x, [-1, *[d if d is not None else -1 for d in x.shape[2:]]])
