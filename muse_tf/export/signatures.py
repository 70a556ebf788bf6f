"""The input and output specs of the muse_tf serving signatures, derived from the schema.

Both signatures take one row per user, raw ids as a production log has them::

    query block (retrieval signature; the first inputs of the ranking signature)
      user_id, user_attr_1 .. user_attr_5     int64 [B]
      hist_item_id, hist_category             int64 [B, L]   right-padded, oldest first
      hist_len                                int32 [B]
    candidate block (ranking signature only)
      item_id, item_category, item_attr_1..2  int64 [B, C]   right-padded
      num_candidates                          int32 [B]

``L`` (``max_seq_len``) and ``C`` (``max_candidates``) are static: what TF Serving batching
needs. :mod:`muse_tf.export.requests` builds inputs for these specs.
"""

from __future__ import annotations

import tensorflow as tf

from muse_tf import schema

#: Output of the ranking signature: float32 ``[B, C]`` click probabilities (0 in padded slots).
SCORES = "scores"
#: Outputs of the retrieval signatures: int64 ``[B, k]`` item ids best first (0 = no item)
#: and their float32 ``[B, k]`` scores (under :data:`SCORES`).
ITEM_IDS = "item_ids"

#: Input names of the candidate block, in signature order.
CANDIDATE_INPUTS: tuple[str, ...] = (*(f.name for f in schema.ITEM_SIDE_FEATURES),
                                     schema.NUM_CANDIDATES)
#: Input names of the retrieval signature (the query block), in signature order.
RETRIEVAL_INPUTS: tuple[str, ...] = schema.QUERY_FEATURES
#: Input names of the ranking signature, in signature order.
RANKING_INPUTS: tuple[str, ...] = (*schema.QUERY_FEATURES, *CANDIDATE_INPUTS)

_LENGTH_DTYPE = tf.dtypes.as_dtype(schema.LENGTH_DTYPE)


def _check_size(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _feature_specs(features: tuple[schema.Feature, ...],
                   shape: list[int | None]) -> dict[str, tf.TensorSpec]:
    return {f.name: tf.TensorSpec(shape, tf.dtypes.as_dtype(f.dtype), name=f.name)
            for f in features}


def _length_spec(name: str) -> dict[str, tf.TensorSpec]:
    return {name: tf.TensorSpec([None], _LENGTH_DTYPE, name=name)}


def retrieval_input_signature(max_seq_len: int) -> dict[str, tf.TensorSpec]:
    """Input specs of a retrieval signature (the query block), in signature order."""
    _check_size("max_seq_len", max_seq_len)
    return {**_feature_specs(schema.USER_SIDE_FEATURES, [None]),
            **_feature_specs(schema.SEQUENCE_FEATURES, [None, max_seq_len]),
            **_length_spec(schema.HISTORY_LENGTH)}


def ranking_input_signature(max_seq_len: int, max_candidates: int) -> dict[str, tf.TensorSpec]:
    """Input specs of the ranking signature (query block + candidate block), in order."""
    _check_size("max_candidates", max_candidates)
    return {**retrieval_input_signature(max_seq_len),
            **_feature_specs(schema.ITEM_SIDE_FEATURES, [None, max_candidates]),
            **_length_spec(schema.NUM_CANDIDATES)}
