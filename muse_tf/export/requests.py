"""The one builder of serving requests: NumPy inputs for the muse_tf signatures.

Every builder makes a batch of ONE user (TF Serving batches users across requests);
:func:`batch_requests` stacks such requests into one request of ``B`` users (what TF
Serving's batching feeds the signature, or what a caller that ranks for many users at once
sends). The arrays follow :mod:`muse_tf.export.signatures`:

* a **retrieval query** (:func:`retrieval_query`, :func:`retrieval_queries_from_examples`):
  the user features, the history and ``hist_len``;
* a **ranking request** (:func:`ranking_request`, :func:`ranking_requests_from_examples`):
  the same query block plus up to ``max_candidates`` candidates and ``num_candidates``.

Built from raw Python values (a user mapping, history item and category lists, candidate
mappings: what a production log or a JSON request has) or from reader-style example batches
(:mod:`muse_tf.data.reader`; :func:`examples_from_records` parses Beam records into one).
The rules are the reader's, so a served model sees what it was trained on:

* dtypes are the signature's: ids int64, ``hist_len`` and ``num_candidates`` int32; ids are
  range-checked, never wrapped;
* the history is right-padded with 0 to ``max_seq_len``; a longer history keeps its newest
  ``max_seq_len`` behaviours (the tail) and ``hist_len`` is clipped to ``max_seq_len``;
* candidates are right-padded with 0 to ``max_candidates`` and ``num_candidates`` is their
  count; more candidates than ``max_candidates`` is an error naming ``item_id``;
* user and candidate attributes that are not given are 0 (the dataset's "missing" id);
  feature names the schema does not know are errors, and so is a candidate without
  ``item_id``.

:func:`check_inputs` runs the signature's own checks
(:func:`muse_tf.export.signatures.checked_inputs`) on NumPy inputs, so a client refuses what
the server would: one batch size across the inputs, at most ``max_batch_size`` users,
``0 <= hist_len <= L`` and ``0 <= num_candidates <= C``.

Errors are ``ValueError``s naming the field.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from muse_tf import schema
from muse_tf.data.reader import BatchParser
from muse_tf.export import signatures

#: What a signature is for (:func:`request_kind`).
RANKING = "ranking"
RETRIEVAL = "retrieval"

#: Keys of a raw request, the JSON object the serving tools read (``serving/README.md``)::
#:
#:     {"user": {"user_id": 42, "user_attr_1": 7},
#:      "history_items": [11, 12], "history_categories": [3, 3],
#:      "candidates": [{"item_id": 5, "item_category": 3}, {"item_id": 6}]}
#:
#: ``candidates`` only for a ranking request.
USER = "user"
HISTORY_ITEMS = "history_items"
HISTORY_CATEGORIES = "history_categories"
CANDIDATES = "candidates"
RAW_REQUEST_KEYS = (USER, HISTORY_ITEMS, HISTORY_CATEGORIES, CANDIDATES)

_USER_NAMES = tuple(f.name for f in schema.USER_SIDE_FEATURES)
_ITEM_NAMES = tuple(f.name for f in schema.ITEM_SIDE_FEATURES)
_HIST_ITEMS = schema.HISTORY_ITEM_ID.name
_HIST_CATEGORIES = schema.HISTORY_CATEGORY.name
_ITEM_ID = schema.ITEM_ID.name
#: The most users per request an export takes unless told otherwise
#: (:data:`muse_tf.export.signatures.DEFAULT_MAX_BATCH_SIZE`).
DEFAULT_MAX_BATCH_SIZE = signatures.DEFAULT_MAX_BATCH_SIZE
#: Rows of a bad length input an error lists.
_SHOWN_ROWS = 10


@functools.cache
def _dtypes() -> dict[str, np.dtype]:
    """Input name -> NumPy dtype, from the ranking signature's specs (a superset of the
    retrieval signature's)."""
    return {name: np.dtype(spec.dtype.as_numpy_dtype)
            for name, spec in signatures.ranking_input_signature(1, 1).items()}


def _check_size(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def integer_array(name: str, values: Any, dtype: Any, *, label: str | None = None
                  ) -> np.ndarray:
    """``values`` as an array of integer ``dtype``; values outside its range (an id is never
    wrapped), non-integral floats and non-numbers are ``ValueError``s naming the field
    (``label``, default ``'name'``). Integral floats are accepted (JSON may write ``5.0``).
    The serving client casts its inputs with it too."""
    label = repr(name) if label is None else label
    dtype = np.dtype(dtype)
    try:
        array = np.asarray(values)
    except ValueError as error:  # ragged nested lists
        raise ValueError(f"{label} is not a rectangular array: {error}") from error
    if array.size == 0:
        return np.zeros(array.shape, dtype)
    info = np.iinfo(dtype)
    kind = array.dtype.kind
    if kind == "O":  # Python ints beyond 64 bits, None, strings, ...
        flat = array.ravel().tolist()
        for value in flat:
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise ValueError(f"{label} holds {value!r}, not an integer")
            if not info.min <= int(value) <= info.max:
                raise ValueError(f"{label} holds {value}, outside the range of {dtype}")
        return np.array(flat, dtype).reshape(array.shape)
    if kind == "f":
        if not np.all(np.isfinite(array)) or not np.all(np.floor(array) == array):
            raise ValueError(f"{label} holds non-integral values; ids and counts are integers")
    elif kind not in "iu":
        raise ValueError(f"{label} has dtype {array.dtype}; ids and counts are integers")
    low, high = array.min(), array.max()
    if low < info.min or high > info.max:
        bad = low if low < info.min else high
        raise ValueError(f"{label} holds {int(bad)}, outside the range of {dtype}")
    return array.astype(dtype)


# ---------------------------------------------------------------------------------------------
# The signature's checks, before sending.
# ---------------------------------------------------------------------------------------------


def check_inputs(inputs: Mapping[str, Any], *, max_seq_len: int,
                 max_candidates: int | None = None,
                 max_batch_size: int | None = DEFAULT_MAX_BATCH_SIZE) -> None:
    """Raise ``ValueError`` for inputs of a muse_tf signature that its checks
    (:func:`muse_tf.export.signatures.checked_inputs`) would reject.

    Checks, in the signature's order: every input has the same batch size ``B``
    (dimension 0), ``B <= max_batch_size`` (None: no limit), ``0 <= hist_len <= max_seq_len``
    and, when ``max_candidates`` is given and ``num_candidates`` is there,
    ``0 <= num_candidates <= max_candidates``. Messages name the input, the values and the
    limit.
    """
    _check_size("max_seq_len", max_seq_len)
    if max_candidates is not None:
        _check_size("max_candidates", max_candidates)
    if max_batch_size is not None:
        _check_size("max_batch_size", max_batch_size)
    arrays = {name: np.asarray(value) for name, value in inputs.items()}
    if not arrays:
        return
    for name, array in arrays.items():
        if array.ndim == 0:
            raise ValueError(f"input {name!r} is a scalar ({array.tolist()!r}); every input of "
                             "a muse_tf signature has a batch dimension (one row per user)")
    sizes = {name: int(array.shape[0]) for name, array in arrays.items()}
    batch = collections.Counter(sizes.values()).most_common(1)[0][0]
    odd = [name for name, size in sizes.items() if size != batch]
    if odd:
        usual = next(name for name, size in sizes.items() if size == batch)
        raise ValueError(f"input {odd[0]!r} has batch size {sizes[odd[0]]} but {usual!r} has "
                         f"{batch}: every input of a request holds the same users (batch "
                         f"sizes {sizes})")
    if max_batch_size is not None and batch > max_batch_size:
        raise ValueError(f"input {next(iter(sizes))!r} has batch size {batch} (users in the "
                         f"request), more than the maximum {max_batch_size} the export takes "
                         "(max_batch_size); split the request")
    for name, limit, limit_name in ((schema.HISTORY_LENGTH, max_seq_len, "max_seq_len"),
                                    (schema.NUM_CANDIDATES, max_candidates, "max_candidates")):
        if limit is None or name not in arrays:
            continue
        values = arrays[name]
        if values.ndim != 1:
            raise ValueError(f"input {name!r} must be 1-D [batch] (one count per user), got "
                             f"shape {list(values.shape)}")
        rows = np.flatnonzero((values < 0) | (values > limit))
        if rows.size:
            more = (f" ({rows.size} rows out of range: {rows[:_SHOWN_ROWS].tolist()})"
                    if rows.size > 1 else "")
            raise ValueError(f"input {name!r} must be in [0, {limit}] (0 <= {name} <= "
                             f"{limit_name}); row {rows[0]} holds {values[rows[0]]}{more}")


# ---------------------------------------------------------------------------------------------
# The two blocks, on [B]-row arrays: every public builder ends here.
# ---------------------------------------------------------------------------------------------


def _fit_history(values: np.ndarray, lengths: np.ndarray, max_seq_len: int) -> np.ndarray:
    """``[B, T]`` right-padded values -> ``[B, max_seq_len]``, keeping the newest.

    Row ``b`` takes columns ``start .. start + max_seq_len - 1`` with
    ``start = max(length[b] - max_seq_len, 0)`` (the reader's rule), zeros past ``T``.
    """
    batch, width = values.shape
    if width == 0:
        return np.zeros((batch, max_seq_len), values.dtype)
    start = np.maximum(np.minimum(lengths, width) - max_seq_len, 0)
    columns = start[:, None] + np.arange(max_seq_len)[None, :]
    taken = np.take_along_axis(values, np.minimum(columns, width - 1), axis=1)
    return np.where(columns < width, taken, 0).astype(values.dtype)


def _query_block(columns: Mapping[str, Any], lengths: Any,
                 max_seq_len: int) -> dict[str, np.ndarray]:
    """User features ``[B]``, histories ``[B, T]`` and their lengths ``[B]`` -> the query
    inputs (histories fitted to ``max_seq_len``)."""
    _check_size("max_seq_len", max_seq_len)
    dtypes = _dtypes()
    out: dict[str, np.ndarray] = {}
    for name in _USER_NAMES:
        out[name] = integer_array(name, columns[name], dtypes[name])
        if out[name].ndim != 1:
            raise ValueError(f"{name!r} must be 1-D [batch], got shape {out[name].shape}")
    batch = len(out[_USER_NAMES[0]])
    for name in _USER_NAMES:
        if len(out[name]) != batch:
            raise ValueError(f"{name!r} has {len(out[name])} rows but {_USER_NAMES[0]!r} "
                             f"has {batch}")
    lengths = integer_array(schema.HISTORY_LENGTH, lengths, np.dtype(np.int64))
    if lengths.shape != (batch,):
        raise ValueError(f"{schema.HISTORY_LENGTH!r} must have shape [{batch}], got "
                         f"{list(lengths.shape)}")
    if np.any(lengths < 0):
        raise ValueError(f"{schema.HISTORY_LENGTH!r} holds {int(lengths.min())}; lengths "
                         "are >= 0")
    histories = {}
    for name in (_HIST_ITEMS, _HIST_CATEGORIES):
        values = integer_array(name, columns[name], dtypes[name])
        if values.ndim != 2 or len(values) != batch:
            raise ValueError(f"{name!r} must be [batch={batch}, steps] (one 1-D history row "
                             f"per user), got shape {list(values.shape)}")
        histories[name] = values
    widths = {name: values.shape[1] for name, values in histories.items()}
    if len(set(widths.values())) > 1:
        raise ValueError(f"{_HIST_ITEMS!r} and {_HIST_CATEGORIES!r} have different widths "
                         f"{widths}; they are aligned step by step")
    for name, values in histories.items():
        out[name] = _fit_history(values, lengths, max_seq_len)
    width = widths[_HIST_ITEMS]
    out[schema.HISTORY_LENGTH] = np.minimum(np.minimum(lengths, width), max_seq_len).astype(
        dtypes[schema.HISTORY_LENGTH])
    return out


def _candidate_block(columns: Mapping[str, Any], max_candidates: int) -> dict[str, np.ndarray]:
    """Candidate features ``[B, C]`` -> the candidate inputs, right-padded to
    ``max_candidates``, with ``num_candidates = C``."""
    _check_size("max_candidates", max_candidates)
    dtypes = _dtypes()
    out: dict[str, np.ndarray] = {}
    count = None
    for name in _ITEM_NAMES:
        values = integer_array(name, columns[name], dtypes[name])
        if values.ndim != 2:
            raise ValueError(f"{name!r} must be [batch, candidates], got shape "
                             f"{list(values.shape)}")
        if count is None:
            count = values.shape[1]
        if values.shape[1] != count:
            raise ValueError(f"{name!r} has {values.shape[1]} candidates per row but "
                             f"{_ITEM_NAMES[0]!r} has {count}")
        if count > max_candidates:
            raise ValueError(f"{name!r} holds {count} candidates, more than the "
                             f"{max_candidates} (max_candidates) the ranking signature takes")
        out[name] = np.pad(values, [[0, 0], [0, max_candidates - count]])
    batch = len(out[_ITEM_ID])
    out[schema.NUM_CANDIDATES] = np.full([batch], count, dtypes[schema.NUM_CANDIDATES])
    return out


# ---------------------------------------------------------------------------------------------
# From raw Python values.
# ---------------------------------------------------------------------------------------------


def _user_columns(user: Mapping[str, Any]) -> dict[str, list[Any]]:
    if not isinstance(user, Mapping):
        raise ValueError(f"{USER!r} must be a mapping of user feature -> id, got "
                         f"{type(user).__name__}")
    unknown = sorted(set(user) - set(_USER_NAMES))
    if unknown:
        raise ValueError(f"user feature {unknown[0]!r} is not a user feature of the schema; "
                         f"a user takes {list(_USER_NAMES)}")
    return {name: [user.get(name, 0)] for name in _USER_NAMES}


def _history_columns(history_items: Sequence[int], history_categories: Sequence[int]
                     ) -> tuple[dict[str, np.ndarray], int]:
    rows = {}
    for argument, name, values in ((HISTORY_ITEMS, _HIST_ITEMS, history_items),
                                   (HISTORY_CATEGORIES, _HIST_CATEGORIES, history_categories)):
        if isinstance(values, str | bytes | Mapping):
            raise ValueError(f"{argument} ({name!r}) must be a 1-D list of ids, got "
                             f"{type(values).__name__}")
        row = integer_array(name, values, _dtypes()[name])
        if row.ndim != 1:
            raise ValueError(f"{argument} ({name!r}) must be a 1-D list of ids (one user's "
                             f"history, oldest first), got shape {list(row.shape)}")
        rows[argument] = row
    if len(rows[HISTORY_ITEMS]) != len(rows[HISTORY_CATEGORIES]):
        raise ValueError(f"{HISTORY_ITEMS} has {len(rows[HISTORY_ITEMS])} entries but "
                         f"{HISTORY_CATEGORIES} has {len(rows[HISTORY_CATEGORIES])}")
    return ({_HIST_ITEMS: rows[HISTORY_ITEMS][np.newaxis, :],
             _HIST_CATEGORIES: rows[HISTORY_CATEGORIES][np.newaxis, :]},
            len(rows[HISTORY_ITEMS]))


def _candidate_columns(candidates: Sequence[Mapping[str, Any]]) -> dict[str, list[list[Any]]]:
    if isinstance(candidates, str | bytes | Mapping):
        raise ValueError(f"{CANDIDATES!r} must be a list of candidate mappings, got "
                         f"{type(candidates).__name__}")
    candidates = list(candidates)
    if not candidates:
        raise ValueError("candidates is empty: nothing to rank")
    columns: dict[str, list[Any]] = {name: [] for name in _ITEM_NAMES}
    for i, candidate in enumerate(candidates):
        if not isinstance(candidate, Mapping):
            raise ValueError(f"candidate {i} is a {type(candidate).__name__}, not a mapping of "
                             "item feature -> id")
        unknown = sorted(set(candidate) - set(_ITEM_NAMES))
        if unknown:
            raise ValueError(f"candidate {i} has {unknown[0]!r}, not an item feature of the "
                             f"schema; a candidate takes {list(_ITEM_NAMES)}")
        if _ITEM_ID not in candidate:
            raise ValueError(f"candidate {i} has no {_ITEM_ID!r}")
        for name in _ITEM_NAMES:
            columns[name].append(candidate.get(name, 0))
    return {name: [values] for name, values in columns.items()}


def retrieval_query(user: Mapping[str, int], history_items: Sequence[int],
                    history_categories: Sequence[int], *,
                    max_seq_len: int) -> dict[str, np.ndarray]:
    """The retrieval signature's inputs for one user (a batch of one).

    Args:
      user: user feature name -> raw id (``user_id``, ``user_attr_1`` ..); absent ones are 0.
      history_items, history_categories: the user's behaviours, oldest first (1-D, aligned).
      max_seq_len: the signature's ``L``.

    Returns:
      ``{name: array}``: user features int64 ``[1]``, histories int64 ``[1, L]``,
      ``hist_len`` int32 ``[1]``.
    """
    columns, length = _history_columns(history_items, history_categories)
    return _query_block({**_user_columns(user), **columns}, [length], max_seq_len)


def ranking_request(user: Mapping[str, int], history_items: Sequence[int],
                    history_categories: Sequence[int],
                    candidates: Sequence[Mapping[str, int]], *, max_seq_len: int,
                    max_candidates: int) -> dict[str, np.ndarray]:
    """The ranking signature's inputs for one user and a candidate list (a batch of one).

    Args:
      user, history_items, history_categories, max_seq_len: as :func:`retrieval_query`.
      candidates: item feature name -> raw id per candidate (``item_id`` required, the
        attributes 0 when absent); at most ``max_candidates`` of them.
      max_candidates: the signature's ``C``.

    Returns:
      The query block of :func:`retrieval_query`, candidate features int64 ``[1, C]`` and
      ``num_candidates`` int32 ``[1]``.
    """
    query = retrieval_query(user, history_items, history_categories, max_seq_len=max_seq_len)
    return {**query, **_candidate_block(_candidate_columns(candidates), max_candidates)}


# ---------------------------------------------------------------------------------------------
# From reader-style example batches.
# ---------------------------------------------------------------------------------------------


def _require(batch: Mapping[str, Any], names: Iterable[str]) -> None:
    missing = [name for name in names if name not in batch]
    if missing:
        raise ValueError(f"the example batch has no {missing[0]!r} (missing: {missing}); it "
                         f"has {sorted(batch)}")


def retrieval_queries_from_examples(batch: Mapping[str, np.ndarray], *, max_seq_len: int,
                                    num_requests: int) -> list[dict[str, np.ndarray]]:
    """One query per example row: rows ``0 .. min(num_requests, B) - 1`` of ``batch``.

    ``batch`` holds reader-style query features (user features ``[B]``, right-padded
    histories ``[B, T]``, ``hist_len`` ``[B]``); histories are fitted to ``max_seq_len``.
    """
    _require(batch, signatures.RETRIEVAL_INPUTS)
    count = min(int(num_requests), len(batch[schema.HISTORY_LENGTH]))
    if count <= 0:
        return []
    block = _query_block({name: np.asarray(batch[name])[:count]
                          for name in signatures.RETRIEVAL_INPUTS},
                         np.asarray(batch[schema.HISTORY_LENGTH])[:count], max_seq_len)
    return [{name: value[r:r + 1] for name, value in block.items()} for r in range(count)]


def ranking_requests_from_examples(batch: Mapping[str, np.ndarray], *, max_seq_len: int,
                                   max_candidates: int, num_requests: int,
                                   candidates_per_request: int) -> list[dict[str, np.ndarray]]:
    """Ranking requests built from reader examples (e.g. warm-up requests).

    Request ``r`` takes user row ``r`` and as candidates the targets of
    ``min(candidates_per_request, max_candidates)`` consecutive examples from row ``r`` on
    (wrapping around the batch).
    """
    _check_size("candidates_per_request", candidates_per_request)
    _require(batch, signatures.RANKING_INPUTS[:-1])  # every input but num_candidates
    size = len(batch[_ITEM_ID])
    count = min(candidates_per_request, max_candidates)
    out = []
    queries = retrieval_queries_from_examples(batch, max_seq_len=max_seq_len,
                                              num_requests=num_requests)
    for r, query in enumerate(queries):
        rows = (r + np.arange(count)) % size
        columns = {name: np.asarray(batch[name])[rows][np.newaxis, :] for name in _ITEM_NAMES}
        out.append({**query, **_candidate_block(columns, max_candidates)})
    return out


def examples_from_records(records: Sequence[bytes], max_seq_len: int) -> dict[str, np.ndarray]:
    """Serialized Beam ``SequenceExample`` records -> a reader-style example batch, parsed
    by the reader's own parser (newest-tail truncation to ``max_seq_len`` included)."""
    if not records:
        raise ValueError("no record to parse")
    try:
        parsed = BatchParser(max_seq_len)(tf.constant(list(records), tf.string))
    except tf.errors.InvalidArgumentError as error:
        raise ValueError(f"not a muse_tf SequenceExample record (the schema's features): "
                         f"{error.message}") from error
    return {name: value.numpy() for name, value in parsed.items()}


def random_retrieval_query(max_seq_len: int, batch_size: int = 1,
                           seed: int = 0) -> dict[str, np.ndarray]:
    """A valid retrieval query batch of random raw ids and random history lengths (for
    warm-up when no example is at hand, and tests)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, max_seq_len + 1, batch_size)
    positions = np.arange(max_seq_len)[None, :]
    columns: dict[str, np.ndarray] = {}
    for name, spec in signatures.retrieval_input_signature(max_seq_len).items():
        if name == schema.HISTORY_LENGTH:
            continue
        if spec.shape.rank == 2:
            values = rng.integers(1, 2**62, (batch_size, max_seq_len), dtype=np.int64)
            columns[name] = np.where(positions < lengths[:, None], values, 0)
        else:
            columns[name] = rng.integers(1, 2**62, batch_size, dtype=np.int64)
    return _query_block(columns, lengths, max_seq_len)


def batch_requests(batch: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One request of ``B = len(batch)`` users from requests of the same signature (each
    from a builder of this module, any number of users each), rows in order.

    The static sizes are the signature's, so the arrays stack along the batch dimension
    as they are (the export's ``max_batch_size`` still bounds ``B``: :func:`check_inputs`).

    Raises:
      ValueError: no request, requests with other inputs, or inputs whose non-batch shapes
        or dtypes differ (requests built for different signatures), naming the input.
    """
    batch = list(batch)
    if not batch:
        raise ValueError("batch_requests needs at least one request, got none")
    names = list(batch[0])
    for index, request in enumerate(batch[1:], start=1):
        if set(request) != set(names):
            raise ValueError(f"request {index} has inputs {sorted(request)} but request 0 has "
                             f"{sorted(names)}: requests of one batch are for one signature")
    out = {}
    for name in names:
        arrays = [np.asarray(request[name]) for request in batch]
        first = arrays[0]
        if first.ndim == 0:
            raise ValueError(f"input {name!r} of request 0 is a scalar; every input of a "
                             "muse_tf signature has a batch dimension (one row per user)")
        for index, array in enumerate(arrays[1:], start=1):
            if array.shape[1:] != first.shape[1:] or array.dtype != first.dtype:
                raise ValueError(
                    f"input {name!r} is {array.dtype} {list(array.shape)} in request {index} "
                    f"but {first.dtype} {list(first.shape)} in request 0: requests of one "
                    "batch are built for one signature (the same max_seq_len and "
                    "max_candidates)")
        out[name] = np.concatenate(arrays, axis=0)
    return out


# ---------------------------------------------------------------------------------------------
# Which signature, and raw (JSON) requests for it.
# ---------------------------------------------------------------------------------------------


def request_kind(input_names: Iterable[str]) -> str | None:
    """:data:`RANKING` or :data:`RETRIEVAL` when ``input_names`` are exactly that
    signature's inputs, else None (some other signature)."""
    names = set(input_names)
    if names == set(signatures.RANKING_INPUTS):
        return RANKING
    if names == set(signatures.RETRIEVAL_INPUTS):
        return RETRIEVAL
    return None


def _static_size(shapes: Mapping[str, Sequence[int | None] | None], name: str) -> int:
    shape = shapes[name]
    size = None if shape is None or len(shape) != 2 else shape[1]
    if size is None or size < 1:
        raise ValueError(f"input {name!r} has shape {shape}; a muse_tf signature declares a "
                         "static size in dimension 1")
    return int(size)


@dataclasses.dataclass(frozen=True)
class RequestLayout:
    """What one muse_tf signature takes: its kind and static sizes.

    Attributes:
      kind: :data:`RANKING` or :data:`RETRIEVAL`.
      max_seq_len: ``L``, the history length of the signature.
      max_candidates: ``C`` of a ranking signature; None for retrieval.
    """

    kind: str
    max_seq_len: int
    max_candidates: int | None = None

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, Sequence[int | None] | None]) -> RequestLayout:
        """From a signature's ``{input name: declared shape}`` (``-1``/None: any size)."""
        kind = request_kind(shapes)
        if kind is None:
            raise ValueError(
                f"a signature with inputs {sorted(shapes)} is neither the ranking signature "
                f"({sorted(signatures.RANKING_INPUTS)}) nor a retrieval signature "
                f"({sorted(signatures.RETRIEVAL_INPUTS)})")
        return cls(kind, _static_size(shapes, _HIST_ITEMS),
                   _static_size(shapes, _ITEM_ID) if kind == RANKING else None)

    def build(self, user: Mapping[str, int], history_items: Sequence[int],
              history_categories: Sequence[int],
              candidates: Sequence[Mapping[str, int]] | None = None) -> dict[str, np.ndarray]:
        """:func:`ranking_request` or :func:`retrieval_query` for this signature."""
        if self.kind == RETRIEVAL:
            if candidates is not None:
                raise ValueError(f"a retrieval query takes no {CANDIDATES!r}")
            return retrieval_query(user, history_items, history_categories,
                                   max_seq_len=self.max_seq_len)
        if candidates is None:
            raise ValueError(f"a ranking request needs {CANDIDATES!r}")
        return ranking_request(user, history_items, history_categories, candidates,
                               max_seq_len=self.max_seq_len,
                               max_candidates=self.max_candidates)  # type: ignore[arg-type]

    def from_raw(self, raw: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The inputs for a raw request object (:data:`RAW_REQUEST_KEYS`)."""
        return self.build(*raw_request_fields(raw))

    def check(self, inputs: Mapping[str, Any],
              max_batch_size: int | None = DEFAULT_MAX_BATCH_SIZE) -> None:
        """:func:`check_inputs` with this signature's sizes."""
        check_inputs(inputs, max_seq_len=self.max_seq_len, max_candidates=self.max_candidates,
                     max_batch_size=max_batch_size)


def raw_request_fields(raw: Any) -> tuple[Any, Any, Any, Any]:
    """``(user, history_items, history_categories, candidates or None)`` of a raw request
    object; unknown or missing keys are errors naming them."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"a raw request is a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(RAW_REQUEST_KEYS))
    if unknown:
        raise ValueError(f"raw request key {unknown[0]!r} is unknown; a request holds "
                         f"{list(RAW_REQUEST_KEYS)}")
    missing = [key for key in (USER, HISTORY_ITEMS, HISTORY_CATEGORIES) if key not in raw]
    if missing:
        raise ValueError(f"raw request has no {missing[0]!r} (it holds "
                         f"{list(RAW_REQUEST_KEYS)}, {CANDIDATES!r} for ranking only)")
    return raw[USER], raw[HISTORY_ITEMS], raw[HISTORY_CATEGORIES], raw.get(CANDIDATES)


def is_raw_request(obj: Any) -> bool:
    """Whether ``obj`` is a raw request (rather than ``{input name: values}``)."""
    return isinstance(obj, Mapping) and any(key in obj for key in RAW_REQUEST_KEYS)
