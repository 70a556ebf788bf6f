"""The bucketed, columnar build writes exactly what the row-at-a-time semantics say.

One random input (:mod:`tests.beam.scenario`: sharded tables with duplicates inside and across
shards, every rejection reason, int64 extremes) is built three ways; each output must equal
the reference computed in plain Python from the source rows (records, every rejected row
with its kept row and ``identical`` flag, vocabulary files, the embedding table, every
count), so the bucket count, the shard count and the batch size change nothing.
"""

from __future__ import annotations

import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline

from beam import build_dataset
from tests.beam import scenario

MAX_SEQ_LEN = 4
MIN_COUNT = 2


@pytest.fixture(scope="module")
def input_tables(module_table_writer):
    return scenario.write_scenario(module_table_writer, seed=7)


@pytest.fixture(scope="module")
def expected(input_tables):
    return scenario.expected_outputs(input_tables, MAX_SEQ_LEN, MIN_COUNT)


def _build(tables, output: str, buckets: int, num_shards: int = 0) -> dict:
    config = build_dataset.BuildConfig(input_dir=tables.root, output_dir=output,
                                       max_seq_len=MAX_SEQ_LEN, min_count=MIN_COUNT,
                                       num_shards=num_shards, catalogue_buckets=buckets)
    p = BeamTestPipeline(runner="FnApiRunner")
    build_dataset.build_pipeline(p, config)
    p.run().wait_until_finish()
    return scenario.read_outputs(output)


def test_the_scenario_exercises_every_rule(expected):
    reasons = {(section, row.split('"reason": "')[1].split('"')[0])
               for section, rows in expected["rejected"].items() for row in rows}
    for split in ("train", "test"):
        assert {(split, r) for r in ("null_id", "bad_label", "no_user_features",
                                     "history_length_mismatch", "no_item_features")} <= reasons
    for table in ("train_user_features", "test_user_features"):
        assert {(table, "duplicate_key"), (table, "null_id"),
                (table, "history_length_mismatch")} <= reasons
    assert {("item_features", "duplicate_key"), ("item_features", "null_id"),
            ("embeddings", "duplicate_key"), ("embeddings", "bad_embedding_dim"),
            ("embeddings", "null_id")} <= reasons
    identical = [row for rows in expected["rejected"].values() for row in rows
                 if '"identical": true' in row]
    different = [row for rows in expected["rejected"].values() for row in rows
                 if '"identical": false' in row]
    assert identical and different
    assert expected["records"]["train"] and expected["records"]["test"]
    assert all(expected["vocabularies"][name] for name in ("item", "category", "user"))


@pytest.mark.slow
@pytest.mark.parametrize("buckets, num_shards", [(1, 0), (7, 2)])
def test_build_equals_the_reference_for_any_bucket_count(input_tables, expected, tmp_path,
                                                          buckets, num_shards):
    got = _build(input_tables, str(tmp_path / "out"), buckets, num_shards)
    for key in expected:
        assert got[key] == expected[key], key


@pytest.mark.slow
def test_tiny_batches_split_row_groups_and_plan_chunks(input_tables, expected, tmp_path,
                                                       monkeypatch):
    # Three rows a batch: every table is read in many batches, plans span several chunks
    # and a batch may straddle two.
    monkeypatch.setattr(build_dataset, "_batch_rows", lambda stem: 3)
    got = _build(input_tables, str(tmp_path / "out"), buckets=3)
    for key in expected:
        assert got[key] == expected[key], key
