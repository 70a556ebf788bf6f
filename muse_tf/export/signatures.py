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

:func:`checked_inputs` is the first step of every serving function: stock-op assertions
(``Assert``, so a request that breaks them fails with ``InvalidArgumentError``, gRPC
``INVALID_ARGUMENT``, in TF Serving as in the local server) that

* every input has the same batch size ``B`` (dimension 0) and every ``[B, n]`` input its
  declared width ``n``;
* ``B <= max_batch_size`` (:data:`DEFAULT_MAX_BATCH_SIZE` unless the export says otherwise);
* ``0 <= hist_len <= L`` and ``0 <= num_candidates <= C``, row by row;

and that the model runs only after they hold. :func:`muse_tf.export.requests.check_inputs`
is their NumPy twin, run by the client before sending.
"""

from __future__ import annotations

from collections.abc import Mapping

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

#: Users per request an export takes unless told otherwise (``train.export_max_batch_size``);
#: TF Serving batching's ``max_batch_size`` (``serving/batching_parameters.txt``) must not be
#: larger, since the checks see the batched request.
DEFAULT_MAX_BATCH_SIZE = 128
#: Rows of a bad input :func:`checked_inputs` prints.
_SHOWN_ROWS = 10

_LENGTH_DTYPE = tf.dtypes.as_dtype(schema.LENGTH_DTYPE)


def _check_size(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_max_batch_size(value: int) -> int:
    """``value`` when it is a valid ``max_batch_size`` (a positive int), else ``ValueError``."""
    _check_size("max_batch_size", value)
    return value


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


def _length_check(inputs: Mapping[str, tf.Tensor], name: str, limit: int,
                  limit_name: str) -> tuple[tf.Tensor, list[str | tf.Tensor]]:
    """(condition, message) of "every row of the ``[B]`` length input ``name`` is in
    ``[0, limit]``"; the message names the input, the bad values and their rows."""
    lengths = inputs[name]
    bad = tf.logical_or(lengths < 0, lengths > limit)
    # int32 and string data only: then Assert needs no cond around it (host memory). No
    # quotes in the strings: Assert prints them C-escaped (\').
    rows = tf.cast(tf.where(bad)[:, 0], tf.int32)
    return tf.logical_not(tf.reduce_any(bad)), [
        f"input {name} must be in [0, {limit}] (0 <= {name} <= {limit_name}); got",
        tf.boolean_mask(lengths, bad), "at rows", rows]


def checked_inputs(inputs: Mapping[str, tf.Tensor], *, max_seq_len: int,
                   max_candidates: int | None = None,
                   max_batch_size: int = DEFAULT_MAX_BATCH_SIZE) -> dict[str, tf.Tensor]:
    """``inputs`` (a retrieval or ranking signature's) gated by the signature's checks.

    Stock ops only: ``Assert`` (``InvalidArgumentError`` when a check fails, naming the
    input and the offending values and limits), and the returned tensors are ``Identity``
    ops that depend on every check, so the model never runs on a request that fails one.
    The checks run in this order (the first that fails is reported): one batch size ``B``
    across the inputs, each ``[B, n]`` input's declared width ``n``, ``B <= max_batch_size``,
    ``0 <= hist_len <= max_seq_len`` and, with ``max_candidates`` (ranking),
    ``0 <= num_candidates <= max_candidates``.

    Args:
      inputs: input name -> tensor, in signature order (:func:`retrieval_input_signature`,
        :func:`ranking_input_signature`).
      max_seq_len: ``L``, the history length.
      max_candidates: ``C`` of a ranking signature; None for retrieval.
      max_batch_size: the most users one request (or one TF Serving batch) may hold.

    Returns:
      The same names -> tensors, available once the checks hold.
    """
    _check_size("max_seq_len", max_seq_len)
    check_max_batch_size(max_batch_size)
    if max_candidates is not None:
        _check_size("max_candidates", max_candidates)
    names = list(inputs)
    shapes = {name: tf.shape(inputs[name], out_type=tf.int32) for name in names}
    batch = shapes[names[0]][0]
    sizes: list[str | tf.Tensor] = []
    for name in names:
        sizes += [f"{name}:", shapes[name][0]]
    checks: list[tuple[tf.Tensor, list[str | tf.Tensor]]] = [(
        tf.reduce_all(tf.stack([tf.equal(shapes[name][0], batch) for name in names])),
        ["every input of a request must have the same batch size (dimension 0, one row per "
         "user); got batch sizes", *sizes])]
    for name in names:
        declared = inputs[name].shape
        if declared.rank == 2 and declared[1] is not None:
            checks.append((tf.equal(shapes[name][1], declared[1]), [
                f"input {name} must have {declared[1]} columns (dimension 1, as the "
                "signature declares); got", shapes[name][1]]))
    checks.append((batch <= max_batch_size, [
        f"input {names[0]} has batch size", batch,
        f"(users in the request), more than the maximum {max_batch_size} this export takes "
        "(max_batch_size); split the request"]))
    checks.append(_length_check(inputs, schema.HISTORY_LENGTH, max_seq_len, "max_seq_len"))
    if max_candidates is not None:
        checks.append(_length_check(inputs, schema.NUM_CANDIDATES, max_candidates,
                                    "max_candidates"))
    asserts: list[tf.Operation] = []
    for condition, data in checks:
        with tf.control_dependencies(asserts[-1:]):  # in order: the first failure is reported
            asserts.append(tf.debugging.Assert(condition, data, summarize=_SHOWN_ROWS))
    with tf.control_dependencies(asserts):
        return {name: tf.identity(inputs[name]) for name in names}
