"""predict_split over a whole split checks what it read against metadata.json, and names
the shard a read error comes from."""

from __future__ import annotations

import pytest
import tensorflow as tf

from muse_tf import schema
from muse_tf.data import reader
from muse_tf.data.data_dir import DataDir
from muse_tf.training import evaluation
from tests.data.test_split_checks import copy_data_dir, reshard, truncate, update_metadata


def constant_model(batch: dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
    """A stand-in ranking model: 0.5 for every example (only the data path is tested)."""
    return tf.fill(tf.shape(batch[schema.LABEL.name]), 0.5)


def _test_batches(data: DataDir) -> tf.data.Dataset:
    return reader.make_dataset(data, "test", 4, shuffle=False, deterministic=True)


def _claim_test_examples(data_dir: str, examples: int) -> None:
    update_metadata(data_dir,
                    lambda m: m["splits"]["test"].update(examples_written=examples))


def test_a_whole_pass_reads_what_the_metadata_says_was_written(tiny_data):
    data = DataDir.open(tiny_data.path)
    out = evaluation.predict_split(constant_model, _test_batches(data), data=data,
                                   split="test")
    assert len(out["score"]) == len(tiny_data.records["test"]) == data.num_examples("test")


def test_a_pass_that_reads_fewer_examples_than_written_is_an_error(tiny_data, tmp_path):
    """A shard cut at a record boundary reads cleanly: only the count shows it."""
    data_dir = copy_data_dir(tiny_data.path, tmp_path / "data")
    _claim_test_examples(data_dir, 17)
    data = DataDir.open(data_dir)
    with pytest.raises(ValueError, match=rf"pass over split 'test' of {data_dir} read 16 "
                                         r"examples, but .*metadata.json says 17 were "
                                         r"written to its 1 shards"):
        evaluation.predict_split(constant_model, _test_batches(data), data=data,
                                 split="test")


def test_a_capped_or_partial_pass_is_not_counted(tiny_data, tmp_path):
    data_dir = copy_data_dir(tiny_data.path, tmp_path / "data")
    _claim_test_examples(data_dir, 17)
    data = DataDir.open(data_dir)
    capped = evaluation.predict_split(constant_model, _test_batches(data), max_steps=2,
                                      data=data, split="test")
    assert len(capped["score"]) == 8
    part = evaluation.predict_split(constant_model, _test_batches(data), data=data,
                                    split="test", whole_split=False)
    assert len(part["score"]) == 16
    # Capped at more batches than there are: the pass reached the end, so it is checked.
    with pytest.raises(ValueError, match="read 16 examples"):
        evaluation.predict_split(constant_model, _test_batches(data), max_steps=100,
                                 data=data, split="test")


def test_a_truncated_test_shard_is_named(tiny_data, tmp_path):
    data_dir = copy_data_dir(tiny_data.path, tmp_path / "data")
    shards = reshard(data_dir, "test", 3)
    truncate(shards[1])
    data = DataDir.open(data_dir)
    with pytest.raises(tf.errors.DataLossError,
                       match=rf"1 of the 3 record shards of split 'test' of {data_dir} "
                             rf"cannot be read: {shards[1]} \(.*truncated.*\)"):
        evaluation.predict_split(constant_model, _test_batches(data), data=data,
                                 split="test")

