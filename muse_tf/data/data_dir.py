"""One object for a Beam output directory: metadata read once, splits, vocabularies, the
multimodal table and the history length, passed down a run instead of a path.

::

    data = DataDir.open("/data/taobao_mm")     # reads and checks metadata.json once
    data.max_seq_len                            # metadata (top level or "options")
    data.num_examples("train")                  # examples_written of the split, or None
    data.split_files("test")                    # sorted shards, checked against metadata.json
    data.check_for_training()                   # train not empty, every listed shard there
    data.vocabulary("item")                     # (ids, counts), read once
    data.mm_embeddings()                        # (item ids, int8 vectors); kept when small
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import tensorflow as tf

from muse_tf.data import artifacts, layout

#: The multimodal table is kept in memory between model builds up to this size (bytes).
MM_CACHE_BYTES = 512 << 20


def split_files(data_dir: str, split: str) -> list[str]:
    """The record shards of ``split``, sorted; raises ``FileNotFoundError`` naming the
    directory and split when there are none."""
    pattern = layout.split_pattern(data_dir, split)
    files = sorted(tf.io.gfile.glob(pattern))
    if not files:
        raise FileNotFoundError(
            f"no record shards for split {split!r} in {data_dir!r} (pattern {pattern!r}); "
            f"the splits a Beam output directory holds are {list(layout.SPLITS)}")
    return files


class DataDir:
    """A Beam output directory (:mod:`muse_tf.data.layout`), opened once.

    Args:
      path: the directory (local or ``gs://``).
      metadata: its parsed ``metadata.json`` (:meth:`open` reads and checks it).
    """

    def __init__(self, path: str, metadata: dict[str, Any]) -> None:
        self.path = str(path)
        self.metadata = metadata
        self._vocabularies: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._mm: tuple[np.ndarray, np.ndarray] | None = None
        self._files: dict[str, list[str]] = {}

    @classmethod
    def open(cls, data: str | DataDir) -> DataDir:
        """``data`` as a :class:`DataDir` (a path is opened: ``metadata.json`` is read and
        its schema version checked, see :func:`muse_tf.data.artifacts.load_metadata`)."""
        if isinstance(data, DataDir):
            return data
        return cls(str(data), artifacts.load_metadata(str(data)))

    def __repr__(self) -> str:
        return f"DataDir({self.path!r})"

    def __fspath__(self) -> str:
        return self.path

    @property
    def max_seq_len(self) -> int:
        """The history length the directory was written with."""
        return artifacts.max_seq_len_from_metadata(self.metadata,
                                                   layout.metadata_path(self.path))

    def num_examples(self, split: str) -> int | None:
        """Examples written to ``split`` according to the metadata (None if not recorded)."""
        entry = (self.metadata.get("splits") or {}).get(split) or {}
        value = entry.get("examples_written")
        return int(value) if isinstance(value, int) and not isinstance(value, bool) else None

    def split_files(self, split: str) -> list[str]:
        """The record shards of ``split``, sorted; ``FileNotFoundError`` naming the directory
        and split when there are none.

        When ``metadata.json`` lists the split's files (``splits.<split>.files``), those are
        the shards: a listed file that is missing is a ``FileNotFoundError`` naming the
        files and the directory (a lost shard would otherwise go unnoticed), and a shard on
        disk that the metadata does not list (a leftover of another build) is left out with
        a warning naming it, so that what is read is what the counts describe.
        """
        if split not in self._files:
            self._files[split] = self._checked_files(split)
        return list(self._files[split])

    def _checked_files(self, split: str) -> list[str]:
        listed = artifacts.listed_split_files(self.metadata, split, self.path)
        if listed is None:
            return split_files(self.path, split)
        if not listed:
            raise FileNotFoundError(
                f"{layout.metadata_path(self.path)} lists no record shards for split "
                f"{split!r} of {self.path}: "
                f"{artifacts.split_counts_text(self.metadata, split)}")
        # By file name: the glob and the metadata may spell the directory differently.
        found = tf.io.gfile.glob(layout.split_pattern(self.path, split))
        found_names = {os.path.basename(f) for f in found}
        missing = [f for f in listed
                   if os.path.basename(f) not in found_names and not tf.io.gfile.exists(f)]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more"
                                              if len(missing) > 5 else "")
            raise FileNotFoundError(
                f"{len(missing)} of the {len(listed)} record shards of split {split!r} that "
                f"{layout.metadata_path(self.path)} lists are missing from {self.path}: "
                f"{shown}; restore them or rebuild the data directory")
        listed_names = {os.path.basename(f) for f in listed}
        unlisted = sorted(f for f in found if os.path.basename(f) not in listed_names)
        if unlisted:
            warnings.warn(
                f"{len(unlisted)} record shards under {self.path}/{split} are not listed in "
                f"{layout.metadata_path(self.path)} and are not read: "
                f"{', '.join(unlisted[:5])}{' ...' if len(unlisted) > 5 else ''}",
                stacklevel=3)
        return listed

    def require_examples(self, split: str) -> None:
        """A one-line ``ValueError`` naming the directory and the build's counts for
        ``split`` (rows read, examples written, rows rejected by reason) when the metadata
        says it holds no example, as when the sample rows do not join the feature tables."""
        if self.num_examples(split) != 0:
            return
        raise ValueError(
            f"split {split!r} of {self.path} holds no examples: "
            f"{artifacts.split_counts_text(self.metadata, split)} "
            f"(from {layout.metadata_path(self.path)}); its sample rows did not join the "
            f"feature tables (see {self.path}/{layout.REJECTED_DIR}/{split}/): rebuild from "
            "sample and feature tables of the same cut of the data")

    def check_for_training(self, splits: tuple[str, ...] = layout.SPLITS) -> None:
        """What a training run checks before it builds or reads anything: the train split
        holds examples (:meth:`require_examples`) and every shard of ``splits`` that the
        metadata lists exists (:meth:`split_files`). Raises ``ValueError`` or
        ``FileNotFoundError`` with a one-line message naming the directory."""
        self.require_examples("train")
        for split in splits:
            self.split_files(split)

    def vocabulary(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, counts)`` of ``vocab/<name>.tsv`` (read once)."""
        if name not in self._vocabularies:
            ids, counts = artifacts.load_vocabulary(self.path, name)
            artifacts.check_vocabulary_size(name, ids, counts, self.metadata,
                                            layout.vocab_path(self.path, name))
            self._vocabularies[name] = (ids, counts)
        return self._vocabularies[name]

    def mm_embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """``(item_ids int64 [N], vectors int8 [N, D])`` of the multimodal table.

        Kept for the next call only while the codes take at most :data:`MM_CACHE_BYTES`: a
        full-size table (4.5 GB for TAOBAO-MM) is read again per model build rather than
        held beside the model's own copy for the whole run."""
        if self._mm is not None:
            return self._mm
        mm = artifacts.load_mm_embeddings(self.path)
        if mm[1].nbytes <= MM_CACHE_BYTES:
            self._mm = mm
        return mm
