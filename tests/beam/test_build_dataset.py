"""End-to-end tests of ``beam.build_dataset`` on crafted parquet tables.

One module-scoped run (FnApiRunner, ``TestPipeline``) over a tiny data set holding a bad row
for every rejection reason; the tests then read what it wrote back with TensorFlow and
compare it with values computed here from the source rows.
"""

from __future__ import annotations

import glob
import json
import os
from collections import Counter

import numpy as np
import pytest
import tensorflow as tf
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline

import muse_tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
from beam import build_dataset, transforms
from muse_tf import schema
from muse_tf.data import layout
from tests.beam import scenario

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
MAX_SEQ_LEN = 4
MIN_COUNT = 2
DIM = schema.MM_EMBEDDING_DIM

# Users, items and categories of the tiny data set.
U1, U2, U3, U4, U5, U_MISSING = 101, -102, 103, 104, 105, 999
I1, I2, I3, I4, I_MISSING = INT64_MIN, 202, INT64_MAX, -204, 888
CLICK, NO_CLICK = [0, 1], [1, 0]


def _user(uid, attrs, items):
    return {"id": uid, "attrs": attrs, "items": items, "cats": [(i % 1000) * 10 for i in items]}


TRAIN_USERS_A = [
    _user(U1, [11, 12, 13, 14, 15], [1, 2, 3, 4, 5, 6]),  # longer than MAX_SEQ_LEN
    _user(U2, [21, None, 23, 24, 25], []),  # null attribute -> 0, empty history
    _user(U3, [31, 32, 33, 34, 35], [INT64_MIN, 0, INT64_MAX]),
    {"id": U4, "attrs": [41] * 5, "items": [7, 8, 9], "cats": [70, 80]},  # mismatch
    _user(None, [0] * 5, [1]),  # null id
]
TRAIN_USERS_B = [_user(U1, [91, 92, 93, 94, 95], [9])]  # duplicate of U1, later file
TEST_USERS = [_user(U1, [11, 12, 13, 14, 15], [5, 6, 7]), _user(U5, [51] * 5, [-3, 4])]
ITEMS = [(I1, 1001, 1, 2), (I2, 1002, 3, 4), (I3, 1001, 5, 6), (I4, 1004, 7, 8),
         (I2, 5555, 5, 5),  # duplicate: the first row wins
         (None, 1, 1, 1), (0, 1, 1, 1)]  # null ids

GOOD_TRAIN = [(CLICK, U1, I1), (NO_CLICK, U1, I2), (CLICK, U2, I1), (NO_CLICK, U3, I3),
              (CLICK, U3, I1)]
BAD_TRAIN = [
    ((CLICK, U1, I_MISSING), transforms.NO_ITEM_FEATURES),
    ((CLICK, U_MISSING, I1), transforms.NO_USER_FEATURES),
    ((CLICK, U_MISSING, I_MISSING), transforms.NO_USER_FEATURES),  # user checked first
    ((CLICK, U4, I1), transforms.HISTORY_LENGTH_MISMATCH),
    ((CLICK, None, I1), transforms.NULL_ID),
    ((CLICK, U1, None), transforms.NULL_ID),
    ((CLICK, 0, I1), transforms.NULL_ID),
    (([1, 1], U1, I1), transforms.BAD_LABEL),
    (([1], U1, I1), transforms.BAD_LABEL),
    ((None, U1, I1), transforms.BAD_LABEL),
    (([0, 0], U1, I1), transforms.BAD_LABEL),
    (([0, 1, 0], U1, I1), transforms.BAD_LABEL),
]
GOOD_TEST = [(NO_CLICK, U1, I1), (CLICK, U5, I4)]
BAD_TEST = [((CLICK, U3, I1), transforms.NO_USER_FEATURES)]


def _vector(seed: int) -> list[int]:
    values = np.random.default_rng(seed).integers(-38, 39, DIM)
    values[:2] = [-128, 127]
    return values.tolist()


EMBEDDINGS = [(I1, _vector(1)), (I2, _vector(2)), (I3, _vector(3)),
              (I1, _vector(4)),  # duplicate
              (I4, _vector(5)[:-1]),  # 127 values
              (-5, None),  # null vector
              (None, _vector(6)),  # null id
              (-6, [*_vector(7)[:-1], None])]  # null element
EMBEDDING_REASONS = [None, None, None, transforms.DUPLICATE_KEY, transforms.BAD_EMBEDDING_DIM,
                     transforms.BAD_EMBEDDING_DIM, transforms.NULL_ID,
                     transforms.BAD_EMBEDDING_DIM]


@pytest.fixture(scope="module")
def built(module_table_writer, tmp_path_factory):
    """Writes the tiny input (every file-name pattern in use) and builds it once."""
    w = module_table_writer
    # Train samples interleave good and bad rows: STEM.parquet, two row groups.
    train = []
    for k in range(max(len(GOOD_TRAIN), len(BAD_TRAIN))):
        train += [GOOD_TRAIN[k]] if k < len(GOOD_TRAIN) else []
        train += [BAD_TRAIN[k][0]] if k < len(BAD_TRAIN) else []
    w.samples("train_samples.parquet", train, row_group_size=7)
    # Test samples as STEM-*.parquet shards.
    w.samples("test_samples-00000-of-00002.parquet", GOOD_TEST)
    w.samples("test_samples-00001-of-00002.parquet", [r for r, _ in BAD_TEST])
    # Train user features as STEM/*.parquet; the duplicate U1 row is in the later file.
    w.users("train_user_features/part-0.parquet", TRAIN_USERS_A, row_group_size=2)
    w.users("train_user_features/part-1.parquet", TRAIN_USERS_B)
    w.users("test_user_features.parquet", TEST_USERS)
    w.items("item_features.parquet", ITEMS)
    w.embeddings("scl_embedding_int8_p90.parquet", EMBEDDINGS)

    output = str(tmp_path_factory.mktemp("built") / "data")
    config = build_dataset.BuildConfig(input_dir=w.root, output_dir=output,
                                       max_seq_len=MAX_SEQ_LEN, min_count=MIN_COUNT,
                                       num_shards=2)
    p = BeamTestPipeline(runner="FnApiRunner")
    build_dataset.build_pipeline(p, config)
    p.run().wait_until_finish()
    with open(layout.metadata_path(output)) as f:
        metadata = json.load(f)
    return {"input": w.root, "output": output, "metadata": metadata, "train_rows": train}


def _read_records(pattern: str) -> list[dict]:
    assert glob.glob(pattern), f"no files match {pattern}"
    return scenario.parsed_records(pattern)


def _expected_record(sample, users, max_seq_len=MAX_SEQ_LEN) -> dict:
    label, uid, iid = sample
    user = next(u for u in users if u["id"] == uid)
    item = next(i for i in ITEMS if i[0] == iid)
    record = {schema.LABEL.name: label.index(1), schema.USER_ID.name: uid,
              schema.ITEM_ID.name: iid, schema.ITEM_CATEGORY.name: item[1]}
    for k, feature in enumerate(schema.USER_ATTRIBUTES):
        record[feature.name] = user["attrs"][k] or 0
    for k, feature in enumerate(schema.ITEM_ATTRIBUTES):
        record[feature.name] = item[2 + k]
    record[schema.HISTORY_ITEM_ID.name] = user["items"][-max_seq_len:]
    record[schema.HISTORY_CATEGORY.name] = user["cats"][-max_seq_len:]
    return record


def _key(record: dict) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in record.items()))


def _rejected_rows(output: str, source: str) -> list[dict]:
    rows = []
    for path in sorted(glob.glob(layout.rejected_pattern(output, source))):
        with open(path) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return rows


def test_train_records_parse_to_the_joined_source_rows(built):
    got = sorted(map(_key, _read_records(layout.split_pattern(built["output"], "train"))))
    want = sorted(_key(_expected_record(s, TRAIN_USERS_A)) for s in GOOD_TRAIN)
    assert got == want


def test_test_records_use_the_test_user_features(built):
    got = sorted(map(_key, _read_records(layout.split_pattern(built["output"], "test"))))
    want = sorted(_key(_expected_record(s, TEST_USERS)) for s in GOOD_TEST)
    assert got == want


def test_truncation_keeps_the_newest_behaviours(built):
    records = _read_records(layout.split_pattern(built["output"], "train"))
    u1 = [r for r in records if r[schema.USER_ID.name] == U1]
    assert len(u1) == 2
    for record in u1:
        # U1's history is 1..6 oldest first; the newest MAX_SEQ_LEN stay, newest last.
        assert record[schema.HISTORY_ITEM_ID.name] == [3, 4, 5, 6]
        assert record[schema.HISTORY_CATEGORY.name] == [30, 40, 50, 60]
    train = built["metadata"]["splits"]["train"]
    assert train["histories_truncated"] == 2  # the two U1 records
    # Table level: user rows cut (U1's first row; its duplicate row is short).
    assert built["metadata"]["tables"]["train_user_features"]["histories_truncated"] == 1
    assert built["metadata"]["max_seq_len"] == MAX_SEQ_LEN


def test_every_rejection_reason_is_counted_and_listed(built):
    metadata = built["metadata"]
    train = metadata["splits"]["train"]
    want = Counter(reason for _, reason in BAD_TRAIN)
    assert {k: v for k, v in train["rejected"].items() if v} == dict(want)
    rows = _rejected_rows(built["output"], "train")
    assert Counter(r["reason"] for r in rows) == want
    # Each rejected sample keeps its keys and its row identity.
    positions = {r["row"]: r for r in rows}
    for (sample, reason) in BAD_TRAIN:
        row = built["train_rows"].index(sample)
        assert positions[row]["reason"] == reason
        assert positions[row]["user_id"] == sample[1]
        assert positions[row]["item_id"] == sample[2]
        assert positions[row]["file"].endswith("train_samples.parquet")
        assert positions[row]["source"] == "train"
    test_rows = _rejected_rows(built["output"], "test")
    assert [(r["user_id"], r["item_id"], r["reason"]) for r in test_rows] == [
        (U3, I1, transforms.NO_USER_FEATURES)]
    assert test_rows[0]["file"].endswith("test_samples-00001-of-00002.parquet")


def test_rows_read_equal_written_plus_rejected(built):
    metadata = built["metadata"]
    for split, good, bad in (("train", GOOD_TRAIN, BAD_TRAIN), ("test", GOOD_TEST, BAD_TEST)):
        entry = metadata["splits"][split]
        assert entry["rows_read"] == len(good) + len(bad)
        assert entry["examples_written"] == len(good)
        assert entry["rows_rejected"] == len(bad) == sum(entry["rejected"].values())
        assert entry["rows_read"] == entry["examples_written"] + entry["rows_rejected"]
        assert len(_read_records(layout.split_pattern(built["output"], split))) == len(good)
        assert len(_rejected_rows(built["output"], split)) == len(bad)
    totals = metadata["totals"]
    assert totals["rows_read"] == totals["examples_written"] + totals["rows_rejected"] == 20
    for name, entry in metadata["tables"].items():
        out = entry.get("rows_kept", entry.get("rows_written"))
        assert entry["rows_read"] == out + entry["rows_rejected"], name
        assert len(_rejected_rows(built["output"], name)) == entry["rows_rejected"], name


def test_table_rows_rejections_and_duplicate_policy(built):
    tables = built["metadata"]["tables"]
    users = tables["train_user_features"]
    assert users["rows_read"] == 6
    assert users["rows_kept"] == 3  # U1 (first file), U2, U3
    assert users["rejected"] == {"null_id": 1, "history_length_mismatch": 1, "duplicate_key": 1}
    dup = [r for r in _rejected_rows(built["output"], "train_user_features")
           if r["reason"] == transforms.DUPLICATE_KEY]
    assert dup[0]["user_id"] == U1 and dup[0]["file"].endswith("part-1.parquet")
    assert dup[0]["kept"]["file"].endswith("part-0.parquet") and not dup[0]["identical"]
    mismatch = [r for r in _rejected_rows(built["output"], "train_user_features")
                if r["reason"] == transforms.HISTORY_LENGTH_MISMATCH]
    assert mismatch[0]["user_id"] == U4 and mismatch[0]["row"] == 3
    items = tables["item_features"]
    assert (items["rows_read"], items["rows_kept"]) == (7, 4)
    assert items["rejected"] == {"null_id": 2, "duplicate_key": 1}
    dup = [r for r in _rejected_rows(built["output"], "item_features")
           if r["reason"] == transforms.DUPLICATE_KEY]
    assert (dup[0]["item_id"], dup[0]["row"], dup[0]["kept"]["row"]) == (I2, 4, 1)
    embeddings = tables["embeddings"]
    assert embeddings["rows_written"] == 3
    assert embeddings["rejected"] == dict(Counter(r for r in EMBEDDING_REASONS if r))
    assert embeddings["dim"] == DIM


def test_embedding_table_round_trip(built):
    files = sorted(glob.glob(layout.embeddings_pattern(built["output"])))
    assert len(files) == 2  # num_shards
    spec = {layout.EMBEDDING_ID_FEATURE: tf.io.FixedLenFeature([], tf.int64),
            layout.EMBEDDING_BYTES_FEATURE: tf.io.FixedLenFeature([], tf.string)}
    got = {}
    for serialized in tf.data.TFRecordDataset(files, compression_type="GZIP"):
        example = tf.io.parse_single_example(serialized, spec)
        vector = np.frombuffer(example[layout.EMBEDDING_BYTES_FEATURE].numpy(), np.int8)
        got[int(example[layout.EMBEDDING_ID_FEATURE])] = vector.tolist()
    want = {item: vector for (item, vector), reason in zip(EMBEDDINGS, EMBEDDING_REASONS,
                                                          strict=True) if reason is None}
    assert got == want  # the first I1 row is kept, with -128 and 127 intact


def _expected_vocabularies(min_count: int) -> dict[str, list[tuple[int, int]]]:
    records = [_expected_record(s, TRAIN_USERS_A) for s in GOOD_TRAIN]
    out = {}
    for name, features in schema.vocabularies().items():
        counts: Counter = Counter()
        for record in records:
            for feature in features:
                values = record[feature.name]
                counts.update(v for v in (values if feature.is_sequence else [values]) if v)
        out[name] = sorted(((i, c) for i, c in counts.items() if c >= min_count),
                           key=lambda kv: (-kv[1], kv[0]))
    return out


def test_vocabularies_count_train_records_with_min_count(built):
    want = _expected_vocabularies(MIN_COUNT)
    assert set(want) == set(schema.vocabularies())
    assert want["item"] and want["category"] and want["user"]  # the check is not vacuous
    for name, entries in want.items():
        with open(layout.vocab_path(built["output"], name)) as f:
            lines = f.read().splitlines()
        assert lines == [f"{i}\t{c}" for i, c in entries], name
        info = built["metadata"]["vocabularies"][name]
        assert info["size"] == len(entries)
        assert info["distinct_ids"] == len(_expected_vocabularies(1)[name])
    # The id 0 in U3's history is never a vocabulary entry; ids below min-count are cut.
    items = dict(want["item"])
    assert 0 not in items and I1 in items and I2 not in items


def test_vocabulary_lines_order_and_cut():
    ids = np.array([5, -3, 7, 0, 9, 2], np.int64)
    counts = np.array([2, 4, 2, 9, 1, 4], np.int64)
    lines, distinct = transforms.vocabulary_lines(ids, counts, min_count=2)
    assert lines == ["-3\t4", "2\t4", "5\t2", "7\t2"]
    assert distinct == 5
    assert transforms.vocabulary_lines(ids, counts, min_count=5)[0] == []


def test_metadata_describes_the_build(built):
    metadata = built["metadata"]
    assert metadata["schema"] == schema.as_dict()
    assert metadata["schema_version"] == schema.SCHEMA_VERSION
    options = metadata["options"]
    assert options["min_count"] == MIN_COUNT and options["num_shards"] == 2
    assert options["input_files"]["test_samples"] == 2
    assert options["input_files"]["train_user_features"] == 2
    for split in layout.SPLITS:
        files = metadata["splits"][split]["files"]
        assert len(files) == 2
        assert all(os.path.exists(os.path.join(built["output"], f)) for f in files)
    assert set(metadata["splits"]["train"]["rejected"]) == set(transforms.SAMPLE_REASONS)
    assert metadata["totals"]["rejected"][transforms.NULL_ID] == 3


def test_existing_output_needs_overwrite(built):
    config = build_dataset.BuildConfig(input_dir=built["input"], output_dir=built["output"])
    with pytest.raises(FileExistsError, match="--overwrite"):
        build_dataset.build_pipeline(BeamTestPipeline(runner="FnApiRunner"), config)


def test_missing_table_is_a_clear_error(tmp_path, built):
    config = build_dataset.BuildConfig(
        input_dir=built["input"], output_dir=str(tmp_path / "out"),
        tables={"item_features": (str(tmp_path / "nowhere-*.parquet"),)})
    with pytest.raises(FileNotFoundError, match="item_features"):
        build_dataset.build_pipeline(BeamTestPipeline(runner="FnApiRunner"), config)
