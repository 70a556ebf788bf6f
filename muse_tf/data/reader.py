"""tf.data input from the ``SequenceExample`` shards of a Beam output directory.

Pipeline (one pass, left to right)::

    shard files --shuffle--> parallel interleave of gzip TFRecord readers
      --shuffle examples--> [repeat] --batch serialized--> parse_sequence_example (parallel)
      --> fixed-length right padding / newest-tail truncation --> prefetch

With ``users`` (a :class:`ValidationSplit`), a stage right after the interleave keeps the records
of one part of a deterministic validation split (by a seeded hash of ``user_id`` and
``item_id``, or of ``user_id`` alone); :func:`count_split` counts both parts.

Each element is ONE dict of dense tensors for a batch of ``B`` impressions:

* every context feature of :mod:`muse_tf.schema` by readable name: int64 ``[B]``; the
  label as float32 ``[B]`` under ``"label"``;
* every sequence feature: int64 ``[B, max_seq_len]``, right-padded with 0 (row ``b`` holds
  its behaviours at ``0 .. hist_len[b]-1``, oldest first, newest last);
* :data:`muse_tf.schema.HISTORY_LENGTH`: int32 ``[B]``, at most ``max_seq_len``.

A record whose history is longer than ``max_seq_len`` keeps its newest ``max_seq_len``
behaviours (the tail). Ids stay raw; mapping them to embedding rows belongs to the model.
Parsing happens on whole batches of serialized records, which is much faster than parsing
one record at a time.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import time
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow as tf

from muse_tf import schema
from muse_tf.data import artifacts, layout
from muse_tf.data.data_dir import DataDir, split_files

#: Default number of serialized examples in the shuffle buffer. With 1,000-long histories a
#: record is about 30 KB, so this buffer holds about 250 MB.
DEFAULT_SHUFFLE_BUFFER = 8192
#: Files read at once in ordered (deterministic or seeded) mode when ``num_parallel_reads`` is
#: AUTOTUNE; fixed so the order does not depend on the machine's core count.
_DETERMINISTIC_CYCLE_LENGTH = 4


#: Hash buckets of the validation split: shares are resolved to 1/10,000.
USER_SPLIT_BUCKETS = 10_000
#: What a :class:`ValidationSplit` holds out: a share of impressions, or of users.
VALIDATION_SPLIT_UNITS = ("impression", "user")
#: The two parts of a :class:`ValidationSplit`.
USER_SPLIT_PARTS = ("train", "validation")
#: Serialized records whose split keys are parsed at once by the validation-split stage.
_USER_FILTER_BATCH = 1024


@dataclasses.dataclass(frozen=True)
class ValidationSplit:
    """A deterministic split of a split's records into ``train`` and ``validation``.

    A record goes to validation when ``to_hash_bucket_fast(key, 10000)`` is below
    ``round(share * 10000)``, where the key is ``"<seed>:<user_id>:<item_id>"`` for
    ``unit="impression"`` (the default: every user keeps about ``1 - share`` of its
    impressions for training, as in the test split, whose users are the train users seen
    later; all impressions of one user-item pair land in one part) and ``"<seed>:<user_id>"``
    for ``unit="user"`` (every record of a user in one part: validation users are never
    trained on). The same record always lands in the same part, on every worker and run with
    the same seed. ``part`` names the records a dataset keeps.

    Attributes:
      share: the share of records (or users) held out for validation, in ``(0, 1)``.
      seed: mixed into the hash (another seed, another validation set).
      unit: ``"impression"`` or ``"user"``.
      part: ``"train"`` (outside the share) or ``"validation"`` (inside).
    """

    share: float
    seed: int
    unit: str = "impression"
    part: str = "train"

    def __post_init__(self) -> None:
        if not 0.0 < self.share < 1.0:
            raise ValueError(f"a validation split needs a share in (0, 1), got "
                             f"{self.share!r}")
        if self.unit not in VALIDATION_SPLIT_UNITS:
            raise ValueError(f"unit={self.unit!r} is not one of {VALIDATION_SPLIT_UNITS}")
        if self.part not in USER_SPLIT_PARTS:
            raise ValueError(f"part={self.part!r} is not one of {USER_SPLIT_PARTS}")

    @property
    def held_buckets(self) -> int:
        """Hash buckets held out: ``round(share * 10000)``."""
        return round(self.share * USER_SPLIT_BUCKETS)

    @property
    def bucket_share(self) -> float:
        """The share actually held out: whole hash buckets, ``held_buckets / 10000``."""
        return self.held_buckets / USER_SPLIT_BUCKETS

    def with_part(self, part: str) -> ValidationSplit:
        """The same split, keeping ``part``."""
        return dataclasses.replace(self, part=part)

    def held_out(self, user_ids: tf.Tensor, item_ids: tf.Tensor | None = None) -> tf.Tensor:
        """bool, same shape as the int64 ``user_ids``: True for validation records (with
        ``unit="impression"`` the records' ``item_ids`` are needed too)."""
        parts = [tf.strings.as_string(tf.constant(self.seed, tf.int64)),
                 tf.strings.as_string(tf.cast(user_ids, tf.int64))]
        if self.unit == "impression":
            if item_ids is None:
                raise ValueError("an impression split hashes user_id and item_id: pass "
                                 "item_ids")
            parts.append(tf.strings.as_string(tf.cast(item_ids, tf.int64)))
        buckets = tf.strings.to_hash_bucket_fast(tf.strings.join(parts, separator=":"),
                                                 USER_SPLIT_BUCKETS)
        return buckets < self.held_buckets

    def keeps(self, user_ids: tf.Tensor, item_ids: tf.Tensor | None = None) -> tf.Tensor:
        """bool: True for the records of :attr:`part`."""
        held = self.held_out(user_ids, item_ids)
        return held if self.part == "validation" else tf.logical_not(held)

    def filter_serialized(self, serialized: tf.Tensor) -> tf.Tensor:
        """``[N]`` serialized records -> those of :attr:`part` (only ``user_id`` and, for an
        impression split, ``item_id`` are parsed)."""
        user_ids, item_ids = _parse_split_keys(serialized)
        return tf.boolean_mask(serialized, self.keeps(user_ids, item_ids))


@dataclasses.dataclass(frozen=True)
class SplitCounts:
    """Examples and users in each part of a :class:`ValidationSplit` of one split.

    Attributes:
      train_examples, validation_examples: records of each part.
      train_users, validation_users: distinct users of each part (an impression split's
        users are in both parts); None for an estimate.
      source: ``"vocabulary"`` (a user split: the train user vocabulary's per-user counts,
        which add up to the metadata's example count: no data read), ``"pass"`` (one pass
        over the records, parsing only ``user_id`` and ``item_id``) or ``"estimate"`` (an
        impression split of more than :data:`EXACT_COUNT_LIMIT` records: the metadata's
        count times the held-out share; the validation passes count their part exactly).
      seconds: what counting took.
    """

    train_examples: int
    validation_examples: int
    train_users: int | None
    validation_users: int | None
    source: str
    seconds: float


#: An impression split of at most this many records is counted by one pass over them;
#: larger ones are estimated from the metadata (a pass over 99M records costs as much as
#: a data epoch of reading).
EXACT_COUNT_LIMIT = 2_000_000


def _parse_split_keys(serialized: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """``user_id`` and ``item_id`` of ``[N]`` serialized records (nothing else parsed)."""
    context, _, _ = tf.io.parse_sequence_example(
        serialized, context_features={
            schema.USER_ID.name: tf.io.FixedLenFeature([], tf.int64),
            schema.ITEM_ID.name: tf.io.FixedLenFeature([], tf.int64)})
    return context[schema.USER_ID.name], context[schema.ITEM_ID.name]


def _read_split_keys(data: DataDir, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(user_ids, item_ids)`` of every record of ``split``: one pass, two fields parsed."""
    with naming_unreadable_shards(data, split):
        return _read_split_keys_unchecked(data, split)


def _read_split_keys_unchecked(data: DataDir, split: str) -> tuple[np.ndarray, np.ndarray]:
    dataset = tf.data.Dataset.from_tensor_slices(data.split_files(split)).interleave(
        lambda path: tf.data.TFRecordDataset(path, compression_type="GZIP"),
        cycle_length=_DETERMINISTIC_CYCLE_LENGTH, num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=False).batch(4 * _USER_FILTER_BATCH).map(
        _parse_split_keys, num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=False).prefetch(tf.data.AUTOTUNE)
    parts = [(users.numpy(), items.numpy()) for users, items in dataset]
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


def count_split(data: DataDir, split: str, holdout: ValidationSplit) -> SplitCounts:
    """Example (and user) counts of both parts of ``holdout`` over ``split``.

    A user split of ``"train"`` is counted from ``vocab/user.tsv`` when its counts add up to
    the split's ``examples_written`` (every record counted once: Beam counts the train users
    per written record; milliseconds). An impression split of more than
    :data:`EXACT_COUNT_LIMIT` records is estimated from the metadata. Otherwise one pass over
    the records parses ``user_id`` and ``item_id`` (the cost of reading and decompressing the
    split once).
    """
    start = time.perf_counter()
    expected = data.num_examples(split)
    if holdout.unit == "impression" and expected is not None and expected > EXACT_COUNT_LIMIT:
        validation = round(expected * holdout.bucket_share)
        return SplitCounts(expected - validation, validation, None, None, "estimate",
                           time.perf_counter() - start)
    ids = counts = None
    if holdout.unit == "user" and split == "train" and expected is not None:
        try:
            ids, counts = data.vocabulary(schema.USER_ID.vocabulary or "user")
        except (FileNotFoundError, OSError, ValueError, tf.errors.NotFoundError):
            ids = counts = None
        if counts is None or int(np.sum(counts)) != expected:
            ids = counts = None
    if ids is not None and counts is not None:
        ids = np.asarray(ids, np.int64)
        counts = np.asarray(counts, np.int64)
        held = (holdout.held_out(tf.constant(ids)).numpy() if ids.size
                else np.zeros(0, bool))
        return SplitCounts(
            train_examples=int(counts[~held].sum()), validation_examples=int(counts[held].sum()),
            train_users=int((~held).sum()), validation_users=int(held.sum()),
            source="vocabulary", seconds=time.perf_counter() - start)
    user_ids, item_ids = _read_split_keys(data, split)
    held = (holdout.held_out(tf.constant(user_ids), tf.constant(item_ids)).numpy()
            if user_ids.size else np.zeros(0, bool))
    return SplitCounts(
        train_examples=int((~held).sum()), validation_examples=int(held.sum()),
        train_users=int(np.unique(user_ids[~held]).size),
        validation_users=int(np.unique(user_ids[held]).size), source="pass",
        seconds=time.perf_counter() - start)


#: Shards read at once when looking for the one a read error came from.
_SCAN_THREADS = 8


def _error_text(error: tf.errors.OpError) -> str:
    """The message of a TensorFlow error without its function-node prefix and op suffix."""
    text = error.message.split("}}", 1)[-1] if "}}" in error.message else error.message
    return text.split(" [Op:", 1)[0].strip()


def _read_error(path: str, compression_type: str) -> str | None:
    """The read error of one shard read to its end (None when it reads cleanly). Only
    record framing and decompression are exercised: nothing is parsed."""
    dataset = tf.data.TFRecordDataset(path, compression_type=compression_type).batch(1024)
    try:
        dataset.reduce(tf.constant(0, tf.int64),
                       lambda n, batch: n + tf.size(batch, out_type=tf.int64))
    except (tf.errors.DataLossError, tf.errors.NotFoundError,
            tf.errors.PermissionDeniedError) as err:
        return _error_text(err)
    return None


def find_unreadable_shards(files: Sequence[str], compression_type: str = "GZIP"
                           ) -> list[tuple[str, str]]:
    """``(file, error)`` of every shard among ``files`` that cannot be read to its end (a
    truncated or corrupt gzip stream or record, a file gone), in the order of ``files``.

    Each shard is read alone (threads, :data:`_SCAN_THREADS` at once), so the cost is one
    read of the files without parsing; called only after a read error, to name its file.
    """
    files = [str(f) for f in files]
    if not files:
        return []
    with concurrent.futures.ThreadPoolExecutor(min(_SCAN_THREADS, len(files))) as pool:
        errors = list(pool.map(lambda f: _read_error(f, compression_type), files))
    return [(f, e) for f, e in zip(files, errors, strict=True) if e is not None]


def unreadable_shards_error(error: tf.errors.OpError, files: Sequence[str], where: str,
                            compression_type: str = "GZIP") -> tf.errors.DataLossError | None:
    """After ``error`` while reading ``files`` (``where`` names them, e.g. "split 'train' of
    DATA_DIR"): a ``DataLossError`` naming every shard that cannot be read and what fails in
    it, or None when every shard reads cleanly (the error came from elsewhere)."""
    bad = find_unreadable_shards(files, compression_type)
    if not bad:
        return None
    shown = "; ".join(f"{path} ({text})" for path, text in bad[:5])
    more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
    return tf.errors.DataLossError(
        None, None,
        f"{len(bad)} of the {len(files)} record shards of {where} cannot be read: {shown}"
        f"{more}; rebuild the data directory or restore these files (the read failed with: "
        f"{_error_text(error)})")


@contextlib.contextmanager
def naming_unreadable_shards(data: DataDir, *splits: str) -> Iterator[None]:
    """Around code that reads ``splits`` of ``data`` (training with ``fit``, an evaluation
    pass): a ``DataLossError`` raised inside, which TensorFlow words without the file (e.g.
    ``truncated record at 9005883``), is raised again naming the unreadable shard(s) of
    those splits and the directory (:func:`find_unreadable_shards`); when every shard
    reads cleanly the original error is raised unchanged."""
    try:
        yield
    except tf.errors.DataLossError as err:
        named = [e for e in (unreadable_shards_error(err, data.split_files(split),
                                                     f"split {split!r} of {data.path}")
                             for split in splits) if e is not None]
        if not named:
            raise
        message = " | ".join(e.message for e in named)
        raise tf.errors.DataLossError(None, None, message) from err


def default_max_seq_len(data_dir: str) -> int:
    """The history length to pad to: ``max_seq_len`` from ``metadata.json`` (top level or
    under ``"options"``), else :data:`muse_tf.schema.MAX_HISTORY_LEN`."""
    if not tf.io.gfile.exists(layout.metadata_path(data_dir)):
        return schema.MAX_HISTORY_LEN
    return artifacts.max_seq_len_from_metadata(artifacts.load_metadata(data_dir),
                                               layout.metadata_path(data_dir))


def make_dataset(
    data_dir: str | DataDir,
    split: str,
    batch_size: int,
    *,
    max_seq_len: int | None = None,
    shuffle: bool = True,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    repeat: bool = False,
    deterministic: bool = False,
    seed: int | None = None,
    drop_remainder: bool = False,
    num_parallel_reads: int = tf.data.AUTOTUNE,
    users: ValidationSplit | None = None,
    skip_examples: int = 0,
) -> tf.data.Dataset:
    """Batches of dense tensors from split ``split`` of the Beam output directory.

    Args:
      data_dir: the Beam output directory (:mod:`muse_tf.data.layout`), as a path or an
        opened :class:`~muse_tf.data.data_dir.DataDir` (whose files and length are used).
      split: ``"train"`` or ``"test"`` (any sub-directory holding shards).
      batch_size: impressions per batch.
      max_seq_len: static length of the sequence tensors; default
        :func:`default_max_seq_len`.
      shuffle: shuffle shard order and examples (ignored when ``deterministic``).
      shuffle_buffer: examples in the shuffle buffer.
      repeat: repeat forever (reshuffled every epoch).
      deterministic: no shuffling, shards in sorted order, a deterministic interleave: the
        same order on every pass (for evaluation).
      seed: seed of the shuffles; a seeded dataset also keeps its parallel stages in order,
        so it yields the same order on every run.
      drop_remainder: drop a last, smaller batch (gives a static batch dimension).
      num_parallel_reads: shards read at once (AUTOTUNE: one per core; 4 when
        ``deterministic`` or ``seed`` is set, so the order does not depend on the machine).
      users: keep only the records of this part of a validation split (None: every
        record).
      skip_examples: start this many (shuffled, repeated) records in: where a resumed run
        left off. The skipped records are read and decompressed, not parsed; a seeded
        dataset then continues exactly where the interrupted one was.

    Returns:
      A dataset of dicts; see the module docstring for names, shapes and dtypes.
    """
    if not isinstance(data_dir, DataDir) and tf.io.gfile.exists(
            layout.metadata_path(data_dir)):
        data_dir = DataDir.open(data_dir)  # its shards are checked against metadata.json
    if isinstance(data_dir, DataDir):
        files = data_dir.split_files(split)
        if max_seq_len is None:
            max_seq_len = data_dir.max_seq_len
    else:
        files = split_files(data_dir, split)
        if max_seq_len is None:
            max_seq_len = default_max_seq_len(data_dir)
    return make_dataset_from_files(
        files, batch_size, max_seq_len, shuffle=shuffle, shuffle_buffer=shuffle_buffer,
        repeat=repeat, deterministic=deterministic, seed=seed, drop_remainder=drop_remainder,
        num_parallel_reads=num_parallel_reads, users=users, skip_examples=skip_examples)


def make_dataset_from_files(
    files: Sequence[str],
    batch_size: int,
    max_seq_len: int,
    *,
    shuffle: bool = True,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    repeat: bool = False,
    deterministic: bool = False,
    seed: int | None = None,
    drop_remainder: bool = False,
    num_parallel_reads: int = tf.data.AUTOTUNE,
    compression_type: str = "GZIP",
    users: ValidationSplit | None = None,
    skip_examples: int = 0,
) -> tf.data.Dataset:
    """Like :func:`make_dataset`, over an explicit list of ``SequenceExample`` shards.

    ``compression_type`` is the shards' TFRecord compression (``"GZIP"`` as Beam writes
    them, ``""`` for uncompressed files).
    """
    files = [str(f) for f in files]
    if not files:
        raise ValueError("make_dataset_from_files needs at least one file, got none")
    _check_positive("batch_size", batch_size)
    _check_positive("max_seq_len", max_seq_len)
    _check_positive("shuffle_buffer", shuffle_buffer)
    if num_parallel_reads != tf.data.AUTOTUNE:
        _check_positive("num_parallel_reads", num_parallel_reads)
    do_shuffle = shuffle and not deterministic
    # A seeded run must see the same order every time too, so its parallel stages keep order.
    ordered = deterministic or seed is not None
    if deterministic:
        files = sorted(files)
    cycle_length = num_parallel_reads
    if ordered and cycle_length == tf.data.AUTOTUNE:
        cycle_length = _DETERMINISTIC_CYCLE_LENGTH
    if cycle_length != tf.data.AUTOTUNE:
        cycle_length = min(cycle_length, len(files))

    def read_shard(path: tf.Tensor) -> tf.data.Dataset:
        return tf.data.TFRecordDataset(path, compression_type=compression_type)

    dataset = tf.data.Dataset.from_tensor_slices(files)
    if do_shuffle:
        dataset = dataset.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.interleave(
        read_shard, cycle_length=cycle_length, block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=ordered)
    if users is not None:
        # Parsing user_id for a thousand records at once is far cheaper than per record.
        dataset = dataset.batch(_USER_FILTER_BATCH).map(
            users.filter_serialized, num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=ordered).unbatch()
    if do_shuffle:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        dataset = dataset.repeat()
    if skip_examples < 0:
        raise ValueError(f"skip_examples={skip_examples} must be >= 0")
    if skip_examples:
        dataset = dataset.skip(skip_examples)
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    dataset = dataset.map(
        BatchParser(max_seq_len), num_parallel_calls=tf.data.AUTOTUNE, deterministic=ordered)
    return dataset.prefetch(tf.data.AUTOTUNE)


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class BatchParser:
    """Parses a ``[B]`` string tensor of serialized ``SequenceExample`` records into the
    reader's dict (see the module docstring), padding or truncating every sequence to
    ``max_seq_len``."""

    def __init__(self, max_seq_len: int) -> None:
        _check_positive("max_seq_len", max_seq_len)
        self.max_seq_len = max_seq_len
        self._context_spec = schema.context_parse_spec()
        self._sequence_spec = schema.sequence_parse_spec()

    def __call__(self, serialized: tf.Tensor) -> dict[str, tf.Tensor]:
        context, sequences, lengths = tf.io.parse_sequence_example(
            serialized, context_features=self._context_spec,
            sequence_features=self._sequence_spec)
        names = [f.name for f in schema.SEQUENCE_FEATURES]
        length = lengths[names[0]]  # int64 [B]: the record's full history length
        checks = [
            tf.debugging.assert_equal(
                lengths[name], length,
                message=f"sequence features {names[0]} and {name} differ in length "
                "within a record")
            for name in names[1:]
        ]
        label = context[schema.LABEL.name]
        checks.append(tf.debugging.Assert(
            tf.reduce_all((label == 0) | (label == 1)),
            [f"{schema.LABEL.name} must be 0 or 1; labels of this batch:", label],
            summarize=20))
        with tf.control_dependencies(checks):
            start = tf.maximum(length - self.max_seq_len, 0)
        out: dict[str, tf.Tensor] = {}
        for feature in schema.CONTEXT_FEATURES:
            out[feature.name] = context[feature.name]
        with tf.control_dependencies(checks):
            out[schema.LABEL.name] = tf.cast(label, tf.float32)
        for name in names:
            out[name] = self._fit(sequences[name], start)
        out[schema.HISTORY_LENGTH] = tf.cast(tf.minimum(length, self.max_seq_len), tf.int32)
        return out

    def _fit(self, values: tf.Tensor, start: tf.Tensor) -> tf.Tensor:
        """``[B, T]`` right-padded values -> ``[B, max_seq_len]``, keeping the newest.

        ``parse_sequence_example`` pads to the batch's longest history ``T`` with 0. When
        ``T <= max_seq_len`` the rows are already right: pad columns. Otherwise row ``b``
        takes columns ``start[b] .. start[b]+max_seq_len-1`` with
        ``start = max(length - max_seq_len, 0)``: the newest ``max_seq_len`` of a long
        history, or columns ``0..max_seq_len-1`` (values, then the parser's zeros) of a short
        one; both stay inside ``[0, T)``.
        """
        width = tf.shape(values)[1]
        max_len = self.max_seq_len

        def pad() -> tf.Tensor:
            return tf.pad(values, [[0, 0], [0, max_len - width]])

        def take_tail() -> tf.Tensor:
            columns = start[:, None] + tf.range(max_len, dtype=start.dtype)[None, :]
            return tf.gather(values, columns, batch_dims=1)

        fitted = tf.cond(width <= max_len, pad, take_tail)
        fitted.set_shape([None, max_len])
        return fitted
