"""A learned-score variant of the multimodal GSU: cosine after a learned MLP projection
(MUSE paper, Table 2 ablation)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import tensorflow as tf

from muse_tf.layers.checks import check_positive_int
from muse_tf.layers.search_unit import MM, GeneralSearchUnit, inner_product


@tf.keras.utils.register_keras_serializable(package="muse_tf")
class ProjectedMultimodalGSU(GeneralSearchUnit):
    """Multimodal search with a learned similarity (MUSE paper, Table 2: a "learned
    attention score" over the multimodal embeddings, which the paper finds no better than the
    plain cosine of :class:`~muse_tf.layers.multimodal_gsu.MultimodalGSU`).

    ``s_i = cos(P(m_t), P(m_i))`` where ``P`` is one MLP shared by target and behaviours
    (``Dense → act → … → Dense``, the last layer linear), then the top-K valid ``s_i``. A
    projection that is exactly zero has cosine 0 with everything (``tf.math.l2_normalize``).

    Selection is not differentiable; ``P`` learns through the returned ``scores``.

    The scores are the learned similarity this ablation puts in place of the cosine, so a
    model uses them as the ESU's ``R`` (:attr:`scores_are_similarity`): that is how ``P``
    trains.

    Call args:
      target: ``{"mm": float [B, D] or [B, C, D]}``, the target's multimodal embedding.
      history: ``{"mm": float [B, L, D]}``, the behaviours' multimodal embeddings.
      mask: bool ``[B, L]``; True = a real behaviour with a multimodal embedding.

    Returns:
      ``{"indices": int32 [B, (C,) K], "scores": float32, "mask": bool}`` with scores the
      cosines in the projected space (ties: lower position first).

    Args:
      top_k: K.
      projection_units: sizes of the projection layers (the last is the projected size).
      activation: Keras activation between projection layers.
    """

    target_keys = (MM,)
    history_keys = (MM,)
    scores_are_similarity = True

    def __init__(self, top_k: int = 50, projection_units: Sequence[int] = (128, 128),
                 activation: str = "relu", **kwargs: Any) -> None:
        super().__init__(top_k=top_k, **kwargs)
        if isinstance(projection_units, (str, bytes)) \
                or not isinstance(projection_units, Sequence) or not projection_units:
            raise ValueError(
                f"ProjectedMultimodalGSU: `projection_units` must be a non-empty sequence of "
                f"positive ints, got {projection_units!r}")
        self.projection_units = [
            check_positive_int("ProjectedMultimodalGSU", "projection_units[]", u)
            for u in projection_units]
        self.activation = tf.keras.activations.serialize(tf.keras.activations.get(activation))
        last = len(self.projection_units) - 1
        self.projection = [
            tf.keras.layers.Dense(units, activation=None if i == last else self.activation,
                                  dtype=self.dtype_policy, name=f"projection_{i}")
            for i, units in enumerate(self.projection_units)]

    def project(self, x: tf.Tensor) -> tf.Tensor:
        """``P(x) / ||P(x)||`` over the last axis."""
        for layer in self.projection:
            x = layer(x)
        return tf.math.l2_normalize(x, axis=-1)

    def relevance(self, target: Mapping[str, tf.Tensor], history: Mapping[str, tf.Tensor],
                  mask: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return inner_product(self.project(target[MM]), self.project(history[MM])), mask

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({
            "projection_units": list(self.projection_units),
            "activation": self.activation,
        })
        return config
