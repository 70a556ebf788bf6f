"""The layout of a Beam output directory (what ``python -m beam.build_dataset`` writes).

::

    DATA_DIR/
      metadata.json                         counts in/out/rejected per split, schema, options
      train/part-SSSSS-of-NNNNN.tfrecord.gz SequenceExamples (see muse_tf.schema)
      test/part-SSSSS-of-NNNNN.tfrecord.gz
      vocab/<vocabulary>.tsv                "<raw id>\\t<count>" per line, most frequent first
      embeddings/part-*.tfrecord.gz         tf.train.Example {item_id: int64, embedding: bytes}
      rejected/<split>/part-*.jsonl         one JSON object per rejected row: key and reason

Vocabularies are counted on the train split only (ids first seen at test time are out of
vocabulary, as in production). The embedding table holds every valid row of the multimodal
(SCL) table, int8 bytes of :data:`muse_tf.schema.MM_EMBEDDING_DIM` values.

``metadata.json`` is the directory's manifest: ``splits.<split>.files`` lists the shards
(paths relative to the directory) and ``examples_written`` their records,
``vocabularies.<name>`` the lines (``size``) of each vocabulary file. Readers hold the files
to it (:meth:`muse_tf.data.data_dir.DataDir.split_files`): a listed shard that is missing is
an error, a shard that is not listed is left out with a warning, and a whole evaluation pass
that reads another number of records than was written is an error.
"""

from __future__ import annotations

import os

METADATA_FILE = "metadata.json"
SPLITS = ("train", "test")
RECORD_SUFFIX = ".tfrecord.gz"
VOCAB_DIR = "vocab"
EMBEDDINGS_DIR = "embeddings"
REJECTED_DIR = "rejected"

#: Feature names inside the embedding-table records.
EMBEDDING_ID_FEATURE = "item_id"
EMBEDDING_BYTES_FEATURE = "embedding"


def split_pattern(data_dir: str, split: str) -> str:
    """Glob of the record shards of ``split``."""
    return os.path.join(data_dir, split, f"part-*{RECORD_SUFFIX}")


def vocab_path(data_dir: str, vocabulary: str) -> str:
    return os.path.join(data_dir, VOCAB_DIR, f"{vocabulary}.tsv")


def embeddings_pattern(data_dir: str) -> str:
    return os.path.join(data_dir, EMBEDDINGS_DIR, f"part-*{RECORD_SUFFIX}")


def metadata_path(data_dir: str) -> str:
    return os.path.join(data_dir, METADATA_FILE)


def rejected_pattern(data_dir: str, split: str) -> str:
    return os.path.join(data_dir, REJECTED_DIR, split, "part-*.jsonl")
