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
from muse_tf.data.data_dir import DataDir
from muse_tf.embeddings.arrays import normalise_rows, sorted_positions
from muse_tf.embeddings.id_lookup import NUM_RESERVED_ROWS


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


def _write(path: str, ids: np.ndarray, counts: np.ndarray) -> None:
    with open(path, "w") as f:
        f.writelines(f"{i}\t{c}\n" for i, c in zip(ids.tolist(), counts.tolist(), strict=True))


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
            extra = np.setdiff1d(mm_item_ids[mm_item_ids != 0], ids)
            ids = np.concatenate([ids, extra])
            counts = np.concatenate([counts, np.zeros(len(extra), np.int64)])
        path = os.path.join(out_dir, f"{name}.tsv")
        _write(path, ids, counts)
        out[name] = Vocabulary(name, path, len(ids), num_embedded)
    return out


def read_vocabulary_ids(vocabulary: Vocabulary) -> np.ndarray:
    """The raw ids of a model-side vocabulary file, in line order."""
    ids = np.loadtxt(vocabulary.path, dtype=np.int64, delimiter="\t", usecols=0, ndmin=1)
    return ids[: vocabulary.vocab_size]


def normalised_mm_matrix(vocab_ids: np.ndarray, mm_ids: np.ndarray,
                         mm_vectors: np.ndarray) -> np.ndarray:
    """``[len(vocab_ids) + 2, dim]`` float32 table of L2-normalised multimodal vectors.

    Row ``2 + i`` holds the vector of ``vocab_ids[i]``; rows 0/1 (padding, OOV) and items
    without an embedding hold zeros. Normalisation happens here, once.
    """
    if mm_vectors.ndim != 2 or len(mm_vectors) != len(mm_ids):
        raise ValueError(f"mm_vectors has shape {mm_vectors.shape}, expected "
                         f"[len(mm_ids)={len(mm_ids)}, dim]")
    dim = mm_vectors.shape[1]
    table = np.zeros((len(vocab_ids) + NUM_RESERVED_ROWS, dim), np.float32)
    if len(mm_ids) == 0 or len(vocab_ids) == 0:
        return table
    order = np.argsort(mm_ids, kind="stable")
    positions, found = sorted_positions(mm_ids[order], vocab_ids)
    table[NUM_RESERVED_ROWS + np.flatnonzero(found)] = normalise_rows(
        mm_vectors[order[positions[found]]])
    return table
