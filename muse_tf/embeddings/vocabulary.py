"""Model-side vocabularies: copied next to the model so a SavedModel carries them as assets.

The item vocabulary is the union of the Beam item vocabulary (train ids, most frequent
first) and every item of the multimodal table that is not in it: rare and unseen items keep
their frozen multimodal vector (MUSE's point: content generalises to the long tail) while
their trainable ID embedding falls back to the out-of-vocabulary row
(:class:`~muse_tf.embeddings.IdLookup` ``num_embedded``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from muse_tf import schema
from muse_tf.data import artifacts
from muse_tf.data.artifacts import write_vocabulary_file
from muse_tf.data.data_dir import DataDir
from muse_tf.embeddings.arrays import normalise_rows, sorted_positions
from muse_tf.embeddings.id_lookup import NUM_RESERVED_ROWS
from muse_tf.embeddings.multimodal_table import MultimodalCodes


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """A vocabulary file in the model directory: ``vocab_size`` lines, the first
    ``num_embedded`` of them (count >= min_count) with their own trainable embedding."""

    name: str
    path: str
    vocab_size: int
    num_embedded: int

    @classmethod
    def of(cls, value: Vocabulary | Mapping[str, Any]) -> Vocabulary:
        """``value`` as a Vocabulary (its dict form comes from a model's ``get_config``)."""
        return value if isinstance(value, cls) else cls(**dict(value))


def build_vocabularies(data_dir: str | DataDir, out_dir: str, min_count: int = 1,
                       mm_item_ids: np.ndarray | None = None) -> dict[str, Vocabulary]:
    """Write every schema vocabulary into ``out_dir`` and describe them.

    Args:
      data_dir: a Beam output directory (path or :class:`~muse_tf.data.data_dir.DataDir`).
      out_dir: where to write ``<vocabulary>.tsv`` (e.g. ``MODEL_DIR/vocab``).
      min_count: ids with fewer train occurrences keep a row but share the OOV ID embedding.
      mm_item_ids: item ids of the multimodal table, appended to the item vocabulary when
        they are not in it.
    """
    data = DataDir.open(data_dir)
    os.makedirs(out_dir, exist_ok=True)
    out: dict[str, Vocabulary] = {}
    for name in schema.vocabularies():
        ids, counts = data.vocabulary(name)
        num_embedded = int(np.sum(counts >= min_count))
        if name == schema.ITEM_ID.vocabulary and mm_item_ids is not None and len(mm_item_ids):
            # Sort + binary search: NumPy's setdiff1d (hash-based unique) took 352 s for
            # 35.4M ids against 12.3M on a loaded 2-core machine, this 12 s. The multimodal
            # ids are unique (the loader checks), so the difference needs no de-duplication.
            candidates = mm_item_ids[mm_item_ids != 0]
            _, known = sorted_positions(np.sort(ids), candidates)
            extra = np.sort(candidates[~known])
            ids = np.concatenate([ids, extra])
            counts = np.concatenate([counts, np.zeros(len(extra), np.int64)])
        path = os.path.join(out_dir, f"{name}.tsv")
        write_vocabulary_file(path, ids, counts)
        out[name] = Vocabulary(name, path, len(ids), num_embedded)
    return out


def read_vocabulary_ids(vocabulary: Vocabulary) -> np.ndarray:
    """The raw ids of a model-side vocabulary file, in line order.

    Raises:
      OSError: naming the file when it is missing or cannot be read.
      ValueError: naming the file when a line is malformed, or when it holds fewer than
        ``vocab_size`` lines (a truncated file).
    """
    return artifacts.read_vocabulary_ids(vocabulary.path, vocabulary.name,
                                         vocabulary.vocab_size)


def multimodal_codes(vocab_ids: np.ndarray, mm_ids: np.ndarray,
                     mm_vectors: np.ndarray) -> MultimodalCodes:
    """The frozen table's rows as references into ``mm_vectors`` (no copy of the vectors).

    Row ``2 + i`` of the table is the int8 vector of ``vocab_ids[i]``; rows 0/1 (padding,
    OOV) and items without an embedding have none. Besides the result's int64
    ``[len(vocab_ids) + 2]`` index, the mapping needs a few int64 arrays of the ids' length
    (about 40 bytes a row, against the 128 bytes of a D = 128 int8 row).

    Args:
      vocab_ids: int64 ``[V]`` the model-side item vocabulary (line order).
      mm_ids: int64 ``[N]`` item ids of the multimodal table (any order, unique, as
        :func:`~muse_tf.data.artifacts.load_mm_embeddings` checks).
      mm_vectors: int8 ``[N, D]`` their vectors (:func:`muse_tf.data.artifacts.
        load_mm_embeddings`).
    """
    mm_vectors = np.asarray(mm_vectors)
    if mm_vectors.ndim != 2 or len(mm_vectors) != len(mm_ids):
        raise ValueError(f"mm_vectors has shape {mm_vectors.shape}, expected "
                         f"[len(mm_ids)={len(mm_ids)}, dim]")
    if mm_vectors.dtype != np.int8:
        raise ValueError(f"mm_vectors must be the int8 SCL codes, got dtype {mm_vectors.dtype}")
    vocab_ids = np.asarray(vocab_ids, np.int64)
    code_index = np.full(len(vocab_ids) + NUM_RESERVED_ROWS, -1, np.int64)
    if len(mm_ids) and len(vocab_ids):
        mm_ids = np.asarray(mm_ids, np.int64)
        ascending = bool(np.all(mm_ids[1:] > mm_ids[:-1]))
        order = None if ascending else np.argsort(mm_ids)  # unique ids: any sort will do
        positions, found = sorted_positions(mm_ids if order is None else mm_ids[order],
                                            vocab_ids)
        hits = positions[found]
        code_index[NUM_RESERVED_ROWS + np.flatnonzero(found)] = (
            hits if order is None else order[hits])
    return MultimodalCodes(mm_vectors, code_index)


def normalised_mm_matrix(vocab_ids: np.ndarray, mm_ids: np.ndarray,
                         mm_vectors: np.ndarray) -> np.ndarray:
    """``[len(vocab_ids) + 2, dim]`` float32 table of L2-normalised multimodal vectors.

    Row ``2 + i`` holds the vector of ``vocab_ids[i]``; rows 0/1 (padding, OOV) and items
    without an embedding hold zeros. For small tables and tests: a float copy of the whole
    catalogue (4x the int8 bytes); models load :func:`multimodal_codes` instead.
    """
    codes = multimodal_codes(vocab_ids, mm_ids, mm_vectors)
    return normalise_rows(codes.rows(0, codes.num_rows))
