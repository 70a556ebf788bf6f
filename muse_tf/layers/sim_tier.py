"""MUSE's SimTier: a learned embedding of the histogram of target–behaviour similarities
(MUSE paper, eq. 3)."""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from muse_tf.layers.checks import check_float, check_mask, check_positive_int, check_rank

#: SimTier's binnings (see the class docstring).
BINNINGS = ("ceil", "floor")
#: ``"ceil"`` binning: cosines ``>= 1 - SELF_MATCH_TOLERANCE`` count as the target itself
#: (tier N + 1). A self-match computed from int8 codes and float32 inverse norms is 1 within
#: a few 1e-7; two different items' cosines that close to 1 have (nearly) the same codes.
SELF_MATCH_TOLERANCE = 1e-5


@tf.keras.utils.register_keras_serializable(package="muse_tf")
class SimTier(tf.keras.layers.Layer):
    """Summarises the multimodal similarities of the retrieved behaviours to the target as a
    histogram over N similarity tiers, embedded (MUSE paper, ESU, eq. 3).

    ``c_n = #{i : mask_i ∧ s_i ∈ tier n}``, ``h = [log(1 + c_1) e_1; …; log(1 + c_N) e_N]``
    with a learned ``e_n ∈ R^{tier_dim}`` per tier.

    Two binnings of ``[-1, 1]`` into tiers of width ``w = 2/N`` (N even for ``"ceil"``):

    * ``binning="ceil"`` (the official MUSE code, ``N = 20``, ``w = 0.1``): tier
      ``n = ceil(s / w) + N/2`` computed in float32, clipped to ``[0, N + 1]``: ``N + 2``
      tiers; ``s = -1`` alone in tier 0, ``(k-1)w < s - (-1) <= k w`` in tier k. A
      similarity exactly on an edge goes to the **lower** tier. Tier ``N + 1`` holds the
      cosines within :data:`SELF_MATCH_TOLERANCE` of 1 or above: the target itself (or an
      identical embedding) in the history. The official code puts there only what rounds
      above 1, so whether a self-match lands in tier N or N + 1 depends on the float
      rounding of one dot product (batch shape, BLAS kernel, CPU): with it, a re-clicked
      item's tier could differ between training and serving, or between a request of one
      user and a batched one. Here it does not (the only departure from the formula).
    * ``binning="floor"`` (the first muse_tf version): N tiers with edges
      ``b_n = float32(-1 + 2n/N)``; tier ``n`` holds ``b_n <= s < b_{n+1}``, the last also
      ``s >= 1``; an inner edge goes to the **upper** tier; ``s < -1`` to the first tier.

    Masked entries are never counted, whatever their value (NaN included).

    Call args:
      similarities: float ``[batch, K]``, cosines of the behaviours to the target.
      mask: bool ``[batch, K]``; True = a real behaviour.

    Returns:
      float ``[batch, tier_count * tier_dim]`` (``tier_count`` = N + 2 for ``"ceil"``,
      N for ``"floor"``).

    Args:
      num_tiers: N.
      tier_dim: size of each tier embedding ``e_n`` (the official code: 1, a weight).
      embeddings_initializer: initializer of the ``[tier_count, tier_dim]`` embeddings (the
        official code: uniform on [0, 1)).
      binning: ``"ceil"`` or ``"floor"`` (above).
    """

    def __init__(self, num_tiers: int, tier_dim: int,
                 embeddings_initializer: Any = "glorot_uniform", binning: str = "floor",
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        name = type(self).__name__
        self.num_tiers = check_positive_int(name, "num_tiers", num_tiers)
        self.tier_dim = check_positive_int(name, "tier_dim", tier_dim)
        self.embeddings_initializer = tf.keras.initializers.get(embeddings_initializer)
        if binning not in BINNINGS:
            raise ValueError(f"{name}: `binning` must be one of {BINNINGS}, got {binning!r}")
        if binning == "ceil" and self.num_tiers % 2:
            raise ValueError(f"{name}: binning='ceil' needs an even `num_tiers` (tiers of "
                             f"width 2/N centred on 0), got {self.num_tiers}")
        self.binning = binning

    @property
    def tier_count(self) -> int:
        """How many tiers (and tier embeddings) there are."""
        return self.num_tiers + 2 if self.binning == "ceil" else self.num_tiers

    @property
    def inner_edges(self) -> np.ndarray:
        """The N − 1 inner tier edges ``b_1 .. b_{N-1}`` as float32."""
        n = np.arange(1, self.num_tiers, dtype=np.float64)
        return (-1.0 + 2.0 * n / self.num_tiers).astype(np.float32)

    def build(self, input_shape: tf.TensorShape) -> None:
        self.tier_embeddings = self.add_weight(
            "tier_embeddings", shape=(self.tier_count, self.tier_dim),
            initializer=self.embeddings_initializer)
        super().build(input_shape)

    def tier_counts(self, similarities: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
        """``c_n``: float32 ``[batch, tier_count]``, counts of valid similarities per
        tier."""
        similarities = tf.cast(similarities, tf.float32)
        if self.binning == "ceil":
            half = self.num_tiers // 2
            # NaN (only allowed under the mask) is replaced before the integer cast.
            finite = tf.where(tf.math.is_finite(similarities), similarities, 0.0)
            tiers = tf.cast(tf.math.ceil(finite * float(half)), tf.int32) + half
            tiers = tf.where(finite >= 1.0 - SELF_MATCH_TOLERANCE, self.tier_count - 1, tiers)
            tiers = tf.clip_by_value(tiers, 0, self.tier_count - 1)
            one_hot = tf.one_hot(tiers, self.tier_count, dtype=tf.float32)
            return tf.reduce_sum(one_hot * tf.cast(mask, tf.float32)[:, :, tf.newaxis], axis=1)
        # Tier = number of inner edges <= s: s = 1.0 lands in the last tier, s < -1 in the
        # first, and a NaN (only allowed under the mask) in the first before being masked.
        edges = tf.constant(self.inner_edges, tf.float32)
        tiers = tf.reduce_sum(
            tf.cast(similarities[:, :, tf.newaxis] >= edges, tf.int32), axis=-1)
        one_hot = tf.one_hot(tiers, self.num_tiers, dtype=tf.float32)
        return tf.reduce_sum(one_hot * tf.cast(mask, tf.float32)[:, :, tf.newaxis], axis=1)

    def call(self, similarities: tf.Tensor, mask: tf.Tensor | None = None) -> tf.Tensor:
        name = type(self).__name__
        similarities = tf.convert_to_tensor(similarities)
        check_float(name, "similarities", similarities)
        check_rank(name, "similarities", similarities, ("batch", "seq_len"))
        mask = check_mask(name, mask, similarities, "similarities")
        counts = tf.cast(self.tier_counts(similarities, mask), self.compute_dtype)
        tiers = tf.math.log1p(counts)[:, :, tf.newaxis] * self.tier_embeddings
        return tf.reshape(tiers, [-1, self.tier_count * self.tier_dim])

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({
            "num_tiers": self.num_tiers,
            "tier_dim": self.tier_dim,
            "binning": self.binning,
            "embeddings_initializer":
                tf.keras.initializers.serialize(self.embeddings_initializer),
        })
        return config
