"""The data of the retrieval runs: the catalogue, exact click counts and the tf.data pipelines
of clicked impressions (train: repeated, filtered to the catalogue, fixed-size batches; test:
one deterministic pass).

Filtering happens inside tf.data on whole parsed batches (a boolean mask per batch, then
``rebatch`` to the batch size), never per example in Python. The number of training examples
is known before training from one pass over the context features (:func:`click_counts`), so
every epoch has the same number of steps and the progress bar a total.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import tensorflow as tf

from muse_tf import config as config_lib
from muse_tf import schema
from muse_tf.data import reader
from muse_tf.data.data_dir import DataDir, split_files
from muse_tf.embeddings.arrays import code_inverse_norms, in_sorted, normalise_rows
from muse_tf.embeddings.sorted_ids import SortedIds, host_variable
from muse_tf.training.strategy import shard_for_strategy

__all__ = ["Catalogue", "ClickCounts", "SamplingProbabilities", "click_counts",
           "clicked_dataset", "item_categories", "training_dataset"]

#: Impressions read (and parsed) per batch before keeping the clicked ones.
READ_BATCH = 1024
#: What a retrieval model reads of a clicked impression: the query and the clicked item.
MODEL_COLUMNS: tuple[str, ...] = (*schema.QUERY_FEATURES, schema.ITEM_ID.name)

#: Rows normalised per step by :attr:`Catalogue.vectors`.
_VECTOR_CHUNK_ROWS = 65536
#: Impressions whose (item, category) pairs :func:`item_categories` counts at a time.
_PAIR_MERGE_ROWS = 1 << 23
#: ``keep(item_ids int64 [N]) -> bool [N]``: which clicked items a pipeline keeps.
KeepFn = Callable[[tf.Tensor], tf.Tensor]


class Catalogue:
    """The retrievable items: ids of the multimodal table (ascending) whose int8 vector is not
    all zero (a zero vector has no direction), and their L2-normalised vectors.

    The int8 codes are kept by reference (:attr:`codes` and the int64 :attr:`code_rows`: no
    copy), which is what the MISS tree build reads
    (:meth:`muse_tf.index.tree.IndexTree.build_from_codes`); :attr:`vectors` computes the
    float32 unit vectors ``[N, D]`` on each access, chunk by chunk, into one array of ``N * D
    * 4`` bytes (18 GB for TAOBAO-MM's 35.4M items: for small catalogues only).
    :meth:`contains_op` holds the ids once more, in a host variable (8 bytes an item: 283 MB
    for 35.4M items).
    """

    def __init__(self, mm_ids: np.ndarray, mm_vectors: np.ndarray) -> None:
        mm_ids = np.asarray(mm_ids, np.int64)
        if mm_vectors.ndim != 2 or mm_vectors.dtype != np.int8 or len(mm_vectors) != len(mm_ids):
            raise ValueError(f"Catalogue: mm_vectors must be int8 [len(mm_ids)={len(mm_ids)}, D], "
                             f"got shape {mm_vectors.shape}, dtype {mm_vectors.dtype}")
        keep = (mm_ids != 0) & (code_inverse_norms(mm_vectors) > 0)
        kept = np.flatnonzero(keep)
        self._index = kept[np.argsort(mm_ids[kept])]  # unique ids (load_mm_embeddings)
        self._codes: np.ndarray | None = mm_vectors
        self._dim = int(mm_vectors.shape[1])
        self.item_ids = mm_ids[self._index]
        self.dropped = int(len(mm_ids) - len(kept))
        self._lookup: SortedIds | None = None

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def codes(self) -> np.ndarray:
        """The int8 table ``[M, D]`` as given (by reference; item ``k``'s row is
        ``code_rows[k]``): what :meth:`muse_tf.index.tree.IndexTree.build_from_codes` reads."""
        if self._codes is None:
            raise RuntimeError("Catalogue.codes: the int8 codes were released (release_codes)")
        return self._codes

    @property
    def code_rows(self) -> np.ndarray:
        """int64 ``[N]``: the row of :attr:`codes` of each of :attr:`item_ids`."""
        return self._index

    def release_codes(self) -> None:
        """Drop this catalogue's reference to the int8 codes (4.5 GB at 35.4M items) once a
        model's table holds them; :attr:`vectors` is unavailable afterwards."""
        self._codes = None

    @property
    def vectors(self) -> np.ndarray:
        """float32 ``[N, D]`` unit vectors of :attr:`item_ids` (a new array each access)."""
        if self._codes is None:
            raise RuntimeError("Catalogue.vectors: the int8 codes were released "
                               "(release_codes); read them before")
        out = np.empty((len(self), self.dim), np.float32)
        for start in range(0, len(self), _VECTOR_CHUNK_ROWS):
            stop = start + _VECTOR_CHUNK_ROWS
            out[start:stop] = normalise_rows(self._codes[self._index[start:stop]])
        return out

    def __len__(self) -> int:
        return int(self.item_ids.shape[0])

    def contains(self, item_ids: np.ndarray) -> np.ndarray:
        """bool (shape of ``item_ids``): which ids are in the catalogue (NumPy)."""
        return in_sorted(self.item_ids, item_ids)

    def contains_op(self, item_ids: tf.Tensor) -> tf.Tensor:
        """:meth:`contains` in TF ops, for tf.data pipelines: bool of the shape of
        ``item_ids`` (int64). A binary search over the ids in a host variable made on first
        use (:class:`~muse_tf.embeddings.sorted_ids.SortedIds`: never a graph constant)."""
        if self._lookup is None:
            self._lookup = SortedIds(self.item_ids, "catalogue_items")
        return self._lookup.contains(item_ids)


def _context_batches(data_dir: str | DataDir, split: str,
                     names: Sequence[str]) -> Iterator[tuple[np.ndarray, ...]]:
    """The context features ``names`` of ``split``'s records, as NumPy arrays of up to
    16,384 records (file order). Parses only the context, so it is fast."""
    spec = {name: spec for name, spec in schema.context_parse_spec().items() if name in names}

    def parse(serialized: tf.Tensor) -> tuple[tf.Tensor, ...]:
        context, _, _ = tf.io.parse_sequence_example(serialized, context_features=spec)
        return tuple(context[name] for name in names)

    files = (data_dir.split_files(split) if isinstance(data_dir, DataDir)
             else split_files(data_dir, split))
    dataset = (tf.data.TFRecordDataset(files, compression_type="GZIP")
               .batch(16384).map(parse, num_parallel_calls=tf.data.AUTOTUNE))
    return dataset.as_numpy_iterator()


def click_counts(data_dir: str | DataDir, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Clicks per item in ``split``: ``(item_ids, counts)``, most clicked first (ties: lower
    id first). Parses only the context features, so it is fast."""
    clicked = [ids[labels > 0] for ids, labels in _context_batches(
        data_dir, split, (schema.ITEM_ID.name, schema.LABEL.name))]
    ids = np.concatenate(clicked) if clicked else np.zeros(0, np.int64)
    unique, counts = np.unique(ids, return_counts=True)
    order = np.lexsort((unique, -counts))
    return unique[order], counts[order]


def item_categories(data_dir: str | DataDir,
                    split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Each item's category in ``split``'s impressions: ``(item_ids, category_ids)``, item ids
    ascending, the category an item carries most often (ties: the lower id; an item carries
    one in TAOBAO-MM). Parses only the context features; the (item, category) pairs are
    counted :data:`_PAIR_MERGE_ROWS` impressions at a time, so memory follows the distinct
    pairs, not the impressions. MISS reads it for the ID embeddings of its leaves."""
    merged = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))
    pending: list[tuple[np.ndarray, np.ndarray]] = []
    for batch in _context_batches(data_dir, split,
                                  (schema.ITEM_ID.name, schema.ITEM_CATEGORY.name)):
        pending.append(batch)
        if sum(len(ids) for ids, _ in pending) >= _PAIR_MERGE_ROWS:
            merged = _pair_counts(merged, pending)
            pending = []
    if pending:
        merged = _pair_counts(merged, pending)
    items, categories, counts = merged
    order = np.lexsort((categories, -counts, items))      # per item: most frequent first
    items, categories = items[order], categories[order]
    first = np.ones(len(items), bool)
    first[1:] = items[1:] != items[:-1]
    return items[first], categories[first]


def _pair_counts(merged: tuple[np.ndarray, np.ndarray, np.ndarray],
                 batches: list[tuple[np.ndarray, np.ndarray]]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(items, categories, counts)`` of the distinct (item, category) pairs of ``merged``
    (pairs with counts) and ``batches`` (one impression a row), sorted by item then
    category."""
    items = np.concatenate([merged[0], *(ids for ids, _ in batches)])
    categories = np.concatenate([merged[1], *(cats for _, cats in batches)])
    counts = np.concatenate([merged[2], np.ones(len(items) - len(merged[0]), np.int64)])
    order = np.lexsort((categories, items))
    items, categories, counts = items[order], categories[order], counts[order]
    starts = np.flatnonzero(np.concatenate(
        [[True], (items[1:] != items[:-1]) | (categories[1:] != categories[:-1])]))
    return items[starts], categories[starts], np.add.reduceat(counts, starts)


@dataclasses.dataclass(frozen=True)
class ClickCounts:
    """Exact clicked train impressions, and those whose item is not in the index (skipped)."""

    clicks_seen: int
    clicks_not_in_index: int

    @classmethod
    def of(cls, item_ids: np.ndarray, counts: np.ndarray, catalogue: Catalogue) -> ClickCounts:
        """From :func:`click_counts` of the train split."""
        return cls(int(np.sum(counts)), int(np.sum(counts[~catalogue.contains(item_ids)])))

    @property
    def clicks_in_index(self) -> int:
        """The training examples of one epoch."""
        return self.clicks_seen - self.clicks_not_in_index

    def as_dict(self) -> dict[str, int]:
        return {"clicks_seen": self.clicks_seen, "clicks_not_in_index": self.clicks_not_in_index}


class SamplingProbabilities:
    """``q(item)``: the probability that a training example's clicked item is ``item``, i.e. that
    a given in-batch candidate of the two-tower loss is ``item`` (the logQ correction of Yi et
    al., RecSys 2019, "Sampling-bias-corrected neural modeling for large corpus item
    recommendations").

    The training batches are uniform draws (shuffled, repeated) of the clicked train
    impressions whose item passes the pipeline's filter, so with ``c_i`` the train clicks of
    item ``i`` among the ``n`` kept ones::

        q(i) = c_i / n                                      for a kept, clicked item
        q(i) = UNSEEN_CLICKS / n  (half a click: the floor)  for any other id

    The floor is below every clicked item's share and keeps ``log q`` finite; such ids never
    occur as training candidates (the pipeline feeds only kept clicks), it only answers
    lookups of other ids. Note that ``tfrs.tasks.Retrieval`` clips ``q`` to ``[1e-6, 1]``:
    with more than ``UNSEEN_CLICKS * 1e6`` kept clicks the rarest items' corrections saturate.

    Args:
      item_ids: int64 ``[N]`` items, as returned by :func:`click_counts` of the train split.
      counts: ``[N]`` their clicks (> 0).
      keep: bool ``[N]``: which items the training pipeline keeps (e.g.
        :meth:`Catalogue.contains` of ``item_ids``); all when None.
    """

    #: Clicks credited to an item without any kept train click (the lookup's default).
    UNSEEN_CLICKS = 0.5

    def __init__(self, item_ids: np.ndarray, counts: np.ndarray,
                 keep: np.ndarray | None = None) -> None:
        item_ids = np.asarray(item_ids, np.int64)
        counts = np.asarray(counts, np.float64)
        if item_ids.shape != counts.shape or item_ids.ndim != 1:
            raise ValueError(f"item_ids {item_ids.shape} and counts {counts.shape} must be "
                             "[N] and [N]")
        if keep is not None:
            keep = np.asarray(keep, bool)
            item_ids, counts = item_ids[keep], counts[keep]
        if len(np.unique(item_ids)) != len(item_ids) or np.any(counts <= 0):
            raise ValueError("SamplingProbabilities: item ids must be unique, counts > 0")
        self.total_clicks = float(np.sum(counts))
        if not self.total_clicks > 0:
            raise ValueError("SamplingProbabilities: no kept train clicks")
        order = np.argsort(item_ids, kind="stable")
        #: Kept clicked items (ascending) and their ``q``, float32 ``[N]``.
        self.item_ids = item_ids[order]
        self.probabilities = (counts[order] / self.total_clicks).astype(np.float32)
        self.floor = float(self.UNSEEN_CLICKS / self.total_clicks)
        self._lookup: SortedIds | None = None
        self._q: tf.Variable | None = None

    def lookup(self, item_ids: np.ndarray) -> np.ndarray:
        """float32 ``q`` of ``item_ids`` (NumPy; the floor for ids without kept clicks)."""
        item_ids = np.asarray(item_ids, np.int64)
        at = np.minimum(np.searchsorted(self.item_ids, item_ids), len(self.item_ids) - 1)
        found = self.item_ids[at] == item_ids
        return np.where(found, self.probabilities[at], np.float32(self.floor)).astype(np.float32)

    def lookup_op(self, item_ids: tf.Tensor) -> tf.Tensor:
        """:meth:`lookup` in TF ops, for tf.data pipelines: float32 of the shape of
        ``item_ids``. A binary search over the clicked ids
        (:class:`~muse_tf.embeddings.sorted_ids.SortedIds`) and a gather of their ``q``,
        both host variables made on first use (no graph constant of the clicked ids)."""
        if self._lookup is None:
            self._lookup = SortedIds(self.item_ids, "sampling_item_ids")
            self._q = host_variable(np.append(self.probabilities, np.float32(self.floor)),
                                    "sampling_probabilities")
        at = self._lookup.positions(item_ids)
        # Absent ids (-1) read the floor, stored after the last probability.
        return tf.gather(self._q, tf.where(at < 0, tf.cast(len(self.item_ids), tf.int64), at))


def clicked_dataset(data: str | DataDir, split: str, batch_size: int, max_seq_len: int, *,
                    keep: KeepFn | None = None, columns: Sequence[str] = MODEL_COLUMNS,
                    shuffle: bool = False, seed: int | None = None,
                    shuffle_buffer: int = reader.DEFAULT_SHUFFLE_BUFFER, repeat: bool = False,
                    drop_remainder: bool = False) -> tf.data.Dataset:
    """Batches of ``batch_size`` clicked impressions (label 1) of ``split`` whose item passes
    ``keep`` (all clicked ones when None): dicts of ``columns`` (reader names and shapes).

    Without ``shuffle`` the order is the files' (deterministic); with it, the reader's seeded
    shuffle. ``repeat`` repeats the split forever (reshuffled each pass); batches then run
    across passes, so with ``drop_remainder`` every batch is full.
    """
    dataset = reader.make_dataset(
        data, split, READ_BATCH, max_seq_len=max_seq_len, shuffle=shuffle,
        shuffle_buffer=shuffle_buffer, seed=seed if shuffle else None,
        deterministic=not shuffle, repeat=repeat)
    columns = tuple(columns)

    def select(batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        mask = batch[schema.LABEL.name] > 0.5
        if keep is not None:
            mask &= keep(batch[schema.ITEM_ID.name])
        return {name: tf.boolean_mask(batch[name], mask) for name in columns}

    dataset = dataset.map(select, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.rebatch(batch_size, drop_remainder=drop_remainder)


def training_dataset(config: config_lib.ExperimentConfig, data: DataDir, seq_len: int,
                     keep: KeepFn,
                     add_targets: Callable[[dict[str, tf.Tensor], tf.Tensor],
                                           dict[str, tf.Tensor]] | None = None,
                     skip_batches: int = 0) -> tf.data.Dataset:
    """The repeated, shuffled train batches of ``data.batch_size`` clicked impressions whose
    item passes ``keep``. ``add_targets(batch, step)`` (step: int64 scalar, the batch's index
    from 0) maps each batch to the model's inputs, e.g. to add the MISS node targets drawn
    with a seed derived from ``step`` (so the whole pipeline is deterministic).
    ``skip_batches``: start that many batches in (where a resumed run left off; the same
    batches, with the same targets, as the interrupted run's from there)."""
    dataset = clicked_dataset(
        data, "train", config.data.batch_size, seq_len, keep=keep, shuffle=True,
        seed=config.data.seed, shuffle_buffer=config.data.shuffle_buffer, repeat=True,
        drop_remainder=True)
    if add_targets is not None:
        dataset = tf.data.Dataset.zip((dataset, tf.data.Dataset.counter())).map(
            add_targets, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if skip_batches:
        dataset = dataset.skip(skip_batches)
    return shard_for_strategy(dataset, config.train.strategy).prefetch(tf.data.AUTOTUNE)
