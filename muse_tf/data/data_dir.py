"""One object for a Beam output directory: metadata read once, splits, vocabularies, the
multimodal table and the history length, passed down a run instead of a path.

::

    data = DataDir.open("/data/taobao_mm")     # reads and checks metadata.json once
    data.max_seq_len                            # metadata (top level or "options")
    data.num_examples("train")                  # examples_written of the split, or None
    data.split_files("test")                    # sorted shards (FileNotFoundError if none)
    data.vocabulary("item")                     # (ids, counts), read once
    data.mm_embeddings()                        # (item ids, int8 vectors), read once
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from muse_tf.data import artifacts, layout


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
        and split when there are none."""
        if split not in self._files:
            self._files[split] = split_files(self.path, split)
        return list(self._files[split])

    def vocabulary(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, counts)`` of ``vocab/<name>.tsv`` (read once)."""
        if name not in self._vocabularies:
            self._vocabularies[name] = artifacts.load_vocabulary(self.path, name)
        return self._vocabularies[name]

    def mm_embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """``(item_ids int64 [N], vectors int8 [N, D])`` of the multimodal table (read once)."""
        if self._mm is None:
            self._mm = artifacts.load_mm_embeddings(self.path)
        return self._mm
