"""SIM-hard general search unit: behaviours of the target's category, newest first (SIM)."""

from __future__ import annotations

from collections.abc import Mapping

import tensorflow as tf

from muse_tf.layers.search_unit import CATEGORY, GeneralSearchUnit
from muse_tf.layers.topk import MASK, SCORES


@tf.keras.utils.register_keras_serializable(package="muse_tf")
class CategoryGSU(GeneralSearchUnit):
    """SIM-hard search: the newest K behaviours whose category equals the target's (SIM,
    "hard-search"; a lifelong baseline in the MUSE paper).

    ``match_i = [c_i = c_t] ∧ mask_i``; among matches, the K with the **highest position**
    are kept, newest first (histories are right-padded and oldest first, so position
    ``len - 1`` is the newest behaviour). Every selected slot has score 1.0. No ties are
    possible (positions are distinct). Category id 0 (missing) is not treated specially:
    fold it into ``mask`` if missing categories must not match.

    Call args:
      target: ``{"category": int [B]}`` (the target's category id) or ``[B, C]`` for C
        candidates searched against the same history (outputs ``[B, C, K]``).
      history: ``{"category": int [B, L]}`` (same dtype), the behaviours' category ids.
      mask: bool ``[B, L]``; True = a real behaviour.

    Returns:
      ``{"indices": int32 [B, (C,) K], "scores": float32, "mask": bool}`` with ``scores``
      1.0 on selected slots and 0.0 elsewhere.

    Args:
      top_k: K, the maximum number of behaviours to retrieve.
    """

    target_keys = (CATEGORY,)
    history_keys = (CATEGORY,)

    def relevance(self, target: Mapping[str, tf.Tensor], history: Mapping[str, tf.Tensor],
                  mask: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        name = type(self).__name__
        target_category, history_categories = target[CATEGORY], history[CATEGORY]
        for arg, tensor in (("target['category']", target_category),
                            ("history['category']", history_categories)):
            if not tensor.dtype.is_integer:
                raise ValueError(
                    f"{name}: `{arg}` must be an integer id tensor, got dtype "
                    f"{tensor.dtype.name} with shape {tuple(tensor.shape.as_list())}")
        if target_category.dtype != history_categories.dtype:
            raise ValueError(
                f"{name}: `target['category']` ({target_category.dtype.name}) and "
                f"`history['category']` ({history_categories.dtype.name}) must share a dtype")
        if target_category.shape.rank == 2:
            # [B, C, L]: candidate c matches the history against its own category.
            match = tf.logical_and(tf.equal(history_categories[:, tf.newaxis, :],
                                            target_category[:, :, tf.newaxis]),
                                   mask[:, tf.newaxis, :])
        else:
            match = tf.logical_and(
                tf.equal(history_categories, target_category[:, tf.newaxis]), mask)
        # Rank matches by position so that top-K keeps the newest; float32 is exact for
        # positions below 2**24, far above any history length.
        positions = tf.cast(tf.range(tf.shape(history_categories)[1]), tf.float32)
        return tf.broadcast_to(positions, tf.shape(match)), match

    def call(self, target: Mapping[str, tf.Tensor], history: Mapping[str, tf.Tensor],
             mask: tf.Tensor | None = None) -> dict[str, tf.Tensor]:
        selected = super().call(target, history, mask)
        selected[SCORES] = tf.cast(selected[MASK], tf.float32)
        return selected
