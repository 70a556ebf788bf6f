"""A Beam output directory checked against its metadata.json: lost, extra, truncated and
corrupt shards, empty splits and truncated vocabularies are named (file and directory).

The helpers here (:func:`copy_data_dir`, :func:`reshard`, :func:`update_metadata`) are
shared with the training tests that break a directory on purpose.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from muse_tf.data import layout, reader
from muse_tf.data.data_dir import DataDir
from muse_tf.embeddings.vocabulary import Vocabulary, read_vocabulary_ids


def copy_data_dir(source: str, target) -> str:
    """A writable copy of the (read-only, session-wide) tiny directory."""
    shutil.copytree(source, str(target))
    return str(target)


def update_metadata(data_dir: str, change) -> dict:
    """Apply ``change(metadata)`` to ``metadata.json`` in place; returns the new content."""
    path = layout.metadata_path(data_dir)
    with open(path) as f:
        metadata = json.load(f)
    change(metadata)
    with open(path, "w") as f:
        json.dump(metadata, f)
    return metadata


def reshard(data_dir: str, split: str, num_shards: int) -> list[str]:
    """Rewrite ``split`` as ``num_shards`` shards (records in order) and list them in the
    metadata, as beam.build_dataset would have; returns the shard paths."""
    old = sorted(tf.io.gfile.glob(layout.split_pattern(data_dir, split)))
    records = [r.numpy() for r in tf.data.TFRecordDataset(old, compression_type="GZIP")]
    for path in old:
        os.remove(path)
    bounds = np.linspace(0, len(records), num_shards + 1).astype(int)
    paths = []
    for shard in range(num_shards):
        path = os.path.join(data_dir, split,
                            f"part-{shard:05d}-of-{num_shards:05d}{layout.RECORD_SUFFIX}")
        with tf.io.TFRecordWriter(path, "GZIP") as writer:
            for record in records[bounds[shard]:bounds[shard + 1]]:
                writer.write(record)
        paths.append(path)

    def relist(metadata: dict) -> None:
        metadata["splits"][split]["files"] = [
            f"{split}/{os.path.basename(p)}" for p in paths]

    update_metadata(data_dir, relist)
    return paths


def truncate(path: str) -> None:
    """Cut a shard in the middle of its gzip stream (a copy that stopped half way)."""
    with open(path, "rb") as f:
        blob = f.read()
    with open(path, "wb") as f:
        f.write(blob[: len(blob) // 2])


# --- shards listed in metadata.json -------------------------------------------------------

def test_a_lost_shard_is_named_when_the_split_is_opened(tiny_data, tmp_path):
    data_dir = copy_data_dir(tiny_data.path, tmp_path / "data")
    lost = sorted(tf.io.gfile.glob(layout.split_pattern(data_dir, "train")))[1]
    os.remove(lost)
    pattern = rf"1 of the 3 record shards of split 'train'.*missing from {data_dir}: {lost}"
    with pytest.raises(FileNotFoundError, match=pattern):
        DataDir.open(data_dir).split_files("train")
    with pytest.raises(FileNotFoundError, match=pattern):  # a path is checked the same way
        reader.make_dataset(data_dir, "train", 4)
    with pytest.raises(FileNotFoundError, match=pattern):
        DataDir.open(data_dir).check_for_training()


def test_a_shard_the_metadata_does_not_list_is_left_out_with_a_warning(tiny_data, tmp_path):
    data_dir = copy_data_dir(tiny_data.path, tmp_path / "data")
    listed = DataDir.open(data_dir).split_files("test")
    extra = os.path.join(data_dir, "test", f"part-00001-of-00002{layout.RECORD_SUFFIX}")
    shutil.copy(listed[0], extra)
    data = DataDir.open(data_dir)
    with pytest.warns(UserWarning, match=rf"not listed in .*metadata.json.*not read: {extra}"):
        files = data.split_files("test")
    assert files == listed
    batches = reader.make_dataset(data, "test", 64, deterministic=True)
    assert sum(len(b["label"]) for b in batches) == len(tiny_data.records["test"])


def test_metadata_without_file_lists_falls_back_to_the_shards_on_disk(tiny_data, tmp_path):
    data_dir = copy_data_dir(tiny_data.path, tmp_path / "data")
    update_metadata(data_dir, lambda m: m["splits"]["train"].pop("files"))
    assert len(DataDir.open(data_dir).split_files("train")) == tiny_data.shards["train"]


# --- unreadable shards --------------------------------------------------------------------

def test_a_truncated_shard_is_named_in_the_read_error(tiny_data, tmp_path):
    """The count pass of a validation split reads every train record: TensorFlow's own
    error ("truncated record at N") does not say which of the shards is cut."""
    data_dir = copy_data_dir(tiny_data.path, tmp_path / "data")
    shards = DataDir.open(data_dir).split_files("train")
    truncate(shards[2])
    holdout = reader.ValidationSplit(0.5, seed=1)
    with pytest.raises(tf.errors.DataLossError,
                       match=rf"1 of the 3 record shards of split 'train' of {data_dir} "
                             rf"cannot be read: {shards[2]} \(.*\)") as caught:
        reader.count_split(DataDir.open(data_dir), "train", holdout)
    assert shards[0] not in caught.value.message and shards[1] not in caught.value.message


def test_every_unreadable_shard_is_found_and_clean_ones_are_not(tiny_data, tmp_path):
    data_dir = copy_data_dir(tiny_data.path, tmp_path / "data")
    shards = DataDir.open(data_dir).split_files("train")
    truncate(shards[0])
    with open(shards[2], "wb") as f:
        f.write(b"not a gzip stream" * 10)
    bad = reader.find_unreadable_shards(shards)
    assert [path for path, _ in bad] == [shards[0], shards[2]]
    assert "truncated" in bad[0][1] and "header" in bad[1][1]


def test_a_data_loss_elsewhere_is_raised_unchanged(tiny_data):
    """Clean shards: the error did not come from them, so it is not reworded."""
    original = tf.errors.DataLossError(None, None, "a checkpoint is corrupt")
    with pytest.raises(tf.errors.DataLossError) as caught:
        with reader.naming_unreadable_shards(DataDir.open(tiny_data.path), "train", "test"):
            raise original
    assert caught.value is original


# --- empty splits ---------------------------------------------------------------------------

def test_an_empty_train_split_is_refused_with_the_build_counts(tiny_data, tmp_path):
    data_dir = copy_data_dir(tiny_data.path, tmp_path / "data")

    def empty(metadata: dict) -> None:
        metadata["splits"]["train"].update(
            rows_read=48, examples_written=0, rows_rejected=48,
            rejected={"no_user_features": 40, "null_id": 8, "bad_label": 0})

    update_metadata(data_dir, empty)
    with pytest.raises(ValueError) as caught:
        DataDir.open(data_dir).check_for_training()
    message = str(caught.value)
    assert "\n" not in message
    assert f"split 'train' of {data_dir} holds no examples" in message
    assert ("rows read 48, examples written 0, rows rejected 48 "
            "(no_user_features 40, null_id 8)") in message


# --- vocabularies ---------------------------------------------------------------------------

def _declare_vocabulary(data_dir: str, name: str, entries: list[tuple[int, int]]) -> None:
    """The vocabulary entry beam.build_dataset writes into metadata.json."""

    def declare(metadata: dict) -> None:
        metadata["vocabularies"][name] = {
            "size": len(entries), "distinct_ids": len(entries),
            "occurrences": sum(c for _, c in entries), "file": f"vocab/{name}.tsv"}

    update_metadata(data_dir, declare)


@pytest.mark.parametrize("cut", ["whole_lines", "inside_a_count"])
def test_a_truncated_vocabulary_is_named(tiny_data, tmp_path, cut):
    data_dir = copy_data_dir(tiny_data.path, tmp_path / "data")
    name = "category"
    entries = tiny_data.vocabularies[name]
    assert entries[0][1] >= 10  # the first count has two digits to cut one off
    _declare_vocabulary(data_dir, name, entries)
    path = layout.vocab_path(data_dir, name)
    with open(path) as f:
        lines = f.read().splitlines()
    kept = lines[:-2] if cut == "whole_lines" else [lines[0][:-1], *lines[1:]]
    with open(path, "w") as f:
        f.write("\n".join(kept) + "\n")
    with pytest.raises(ValueError, match=rf"vocabulary file '{path}'.*truncated or replaced"):
        DataDir.open(data_dir).vocabulary(name)


def test_a_vocabulary_that_cannot_be_read_is_named(tiny_data, tmp_path):
    data_dir = copy_data_dir(tiny_data.path, tmp_path / "data")
    path = layout.vocab_path(data_dir, "category")
    os.remove(path)
    os.makedirs(path)  # a directory where the file should be
    with pytest.raises(OSError, match=rf"could not read vocabulary file '{path}'"):
        DataDir.open(data_dir).vocabulary("category")


def test_a_truncated_or_malformed_model_vocabulary_is_named(tmp_path):
    path = tmp_path / "item.tsv"
    path.write_text("11\t3\n12\t2\n")
    vocabulary = Vocabulary("item", str(path), vocab_size=3, num_embedded=3)
    with pytest.raises(ValueError, match=rf"'{path}' of 'item' holds 2 ids, fewer than its "
                                         "vocab_size=3"):
        read_vocabulary_ids(vocabulary)
    path.write_text("11\t3\nx12\t2\n13\t1\n")
    with pytest.raises(ValueError, match=rf"malformed vocabulary file '{path}'"):
        read_vocabulary_ids(vocabulary)
    os.remove(path)
    with pytest.raises(OSError, match=rf"could not read vocabulary file '{path}'"):
        read_vocabulary_ids(vocabulary)


def test_only_a_small_multimodal_table_is_kept_between_model_builds(tiny_data, monkeypatch):
    from muse_tf.data import data_dir as data_dir_module

    data = DataDir.open(tiny_data.path)
    assert data.mm_embeddings() is data.mm_embeddings()
    monkeypatch.setattr(data_dir_module, "MM_CACHE_BYTES", 0)
    fresh = DataDir.open(tiny_data.path)
    first, second = fresh.mm_embeddings(), fresh.mm_embeddings()
    assert first is not second
    np.testing.assert_array_equal(first[1], second[1])
