"""Unit tests of the pipeline's parsers, plans, encoders and merge helpers on pyarrow batches."""

from __future__ import annotations

from collections import Counter, defaultdict

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pytest
from tensorflow.core.example import example_pb2

from beam import transforms
from muse_tf import schema
from muse_tf.data import records

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


def _split_outputs(outputs) -> tuple[list, list[dict], Counter, dict[str, list]]:
    """(main outputs, rejected rows, summed counts, other tagged outputs by tag)."""
    main, rejected, counts, tagged = [], [], Counter(), defaultdict(list)
    for out in outputs:
        if isinstance(out, beam.pvalue.TaggedOutput):
            value = getattr(out.value, "value", out.value)  # finish_bundle: windowed
            if out.tag == transforms.REJECTED:
                rejected.append(value)
            elif out.tag == transforms.COUNTS:
                key, n = value
                counts[key] += n
            else:
                tagged[out.tag].append(value)
        else:
            main.append(getattr(out, "value", out))
    return main, rejected, counts, tagged


def _run(dofn, *elements, **side_inputs) -> tuple[list, list[dict], Counter, dict[str, list]]:
    """Runs a DoFn over ``elements`` as one bundle (setup, start, process..., finish)."""
    dofn.setup()
    dofn.start_bundle()
    outputs = []
    for element in elements:
        outputs += list(dofn.process(element, **side_inputs) or [])
    outputs += list(dofn.finish_bundle() or [])
    return _split_outputs(outputs)


def _blocks(main: list, columns) -> dict[int, dict[str, np.ndarray]]:
    """bucket -> the rows of its blocks."""
    by_bucket = defaultdict(list)
    for bucket, block in main:
        by_bucket[bucket].append(block)
    return {b: transforms.concat_blocks(blocks, columns) for b, blocks in by_bucket.items()}


def _multimap(entries) -> defaultdict:
    """A plain-dict stand-in for a multimap side input of plan entries."""
    plan = defaultdict(list)
    for key, block in entries:
        plan[key].append(block)
    return plan


# ---------------------------------------------------------------------------------------------
# Column blocks, buckets, positions, plans.
# ---------------------------------------------------------------------------------------------

def test_blocks_round_trip_any_dtype_and_length():
    columns = {"a": np.array([INT64_MIN, -1, 0, INT64_MAX], np.int64),
               "b": np.array([-128, 127, 3], np.int8), "empty": np.zeros(0, np.int32),
               "f": np.array([0.5], np.float32)}
    data = transforms.encode_block(columns)
    assert isinstance(data, bytes) and len(data) % 8 == 0
    decoded = transforms.decode_block(data)
    assert list(decoded) == list(columns)
    for name, column in columns.items():
        assert decoded[name].dtype == column.dtype
        assert decoded[name].tolist() == column.tolist()
    both = transforms.concat_blocks([data, columns], {k: v.dtype for k, v in columns.items()})
    assert both["a"].tolist() == columns["a"].tolist() * 2
    empty = transforms.concat_blocks([], {"a": np.dtype(np.int64)})
    assert empty["a"].dtype == np.int64 and empty["a"].size == 0
    with pytest.raises(ValueError, match="expected"):
        transforms.concat_blocks([data], {"a": np.dtype(np.int64)})
    with pytest.raises(ValueError, match="not a column block"):
        transforms.decode_block(b"nope" + data[4:])
    with pytest.raises(ValueError, match="1-D"):
        transforms.encode_block({"m": np.zeros((2, 2))})


def test_id_buckets_are_fixed_and_even():
    ids = np.array([INT64_MIN, -1, 0, 1, 2, INT64_MAX], np.int64)
    buckets = transforms.id_buckets(ids, 256)
    # The values are part of the output contract only through determinism: the same ids
    # land in the same buckets on every worker and in every run.
    assert buckets.tolist() == transforms.id_buckets(ids.copy(), 256).tolist()
    assert ids.tolist() == [INT64_MIN, -1, 0, 1, 2, INT64_MAX]  # input left alone
    assert transforms.id_buckets(ids, 1).tolist() == [0] * 6
    many = transforms.id_buckets(np.arange(1, 200_001, dtype=np.int64) * 1024, 256)
    assert many.min() >= 0 and many.max() <= 255
    sizes = np.bincount(many, minlength=256)
    assert sizes.min() > 0.85 * 200_000 / 256 and sizes.max() < 1.15 * 200_000 / 256


def test_positions_order_rows_by_file_then_row():
    pos = np.concatenate([transforms.positions(2, [0, 5]), transforms.positions(0, [7]),
                          transforms.positions(1, [2**40 - 1])])
    assert [(transforms.position_file(p), transforms.position_row(p))
            for p in np.sort(pos).tolist()] == [(0, 7), (1, 2**40 - 1), (2, 0), (2, 5)]
    with pytest.raises(ValueError, match="row numbers"):
        transforms.positions(0, [2**40])


def test_deduplicate_keeps_the_first_row_in_file_and_row_order():
    rng = np.random.default_rng(4)
    ids = rng.integers(-4, 5, 300)
    pos = rng.permutation(1000)[:300].astype(np.int64)
    dedup = transforms.deduplicate(ids, pos)
    want = {}
    for i, p in zip(ids.tolist(), pos.tolist(), strict=True):
        want.setdefault(i, []).append(p)
    assert dedup.ids.tolist() == sorted(want)
    assert dedup.kept.tolist() == [min(want[i]) for i in sorted(want)]
    dup_rows = sorted(p for i in want if len(want[i]) > 1 for p in want[i])
    assert sorted(dedup.duplicate_positions.tolist()) == dup_rows
    kept = {min(want[i]) for i in want}
    assert [p in kept for p in dedup.duplicate_positions.tolist()] == \
        dedup.duplicate_kept.tolist()
    found, kept_pos = dedup.lookup(np.array([-4, 99, 4]))
    assert found.tolist() == [-4 in want, False, 4 in want]
    assert kept_pos[0] == (min(want[-4]) if -4 in want else 0)
    empty = transforms.deduplicate(np.zeros(0, np.int64), np.zeros(0, np.int64))
    assert empty.lookup(np.array([1]))[0].tolist() == [False]


def test_bucket_buffer_hands_out_every_row_once():
    rng = np.random.default_rng(5)
    buffer = transforms.BucketBuffer(flush_rows=30, max_rows=200)
    out, want = [], Counter()
    for step in range(20):
        values = np.arange(step * 50, step * 50 + 50)
        buckets = rng.integers(0, 7, 50)
        want.update(zip(buckets.tolist(), values.tolist(), strict=True))
        out += buffer.add(buckets, {"v": values})
    out += buffer.drain()
    assert buffer.drain() == []
    got = Counter()
    for bucket, block in out:
        got.update((bucket, v) for v in transforms.decode_block(block)["v"].tolist())
    assert got == want
    assert max(len(transforms.decode_block(b)["v"]) for _, b in out) < 30 + 50


def test_plan_lookup_returns_exactly_the_rows_of_a_batch():
    rng = np.random.default_rng(6)
    files = rng.integers(0, 3, 400)
    rows = rng.integers(0, 1000, 400)
    pos = np.unique(np.concatenate([transforms.positions(f, [r]) for f, r in
                                    zip(files.tolist(), rows.tolist(), strict=True)]))
    flags = rng.integers(1, 8, pos.size).astype(np.int8)
    doubled = np.concatenate([pos, pos[:10]])  # flags of one row given twice combine
    extra = np.concatenate([flags, np.full(10, transforms.SKIP, np.int8)])
    plan = _multimap(transforms.table_plan(doubled, extra, chunk_rows=64))
    assert all(len({transforms.decode_block(b)["row"].max() // 64 for b in blocks}) == 1
               for blocks in plan.values())
    want = dict(zip(pos.tolist(), flags.tolist(), strict=True))
    for p in pos[:10].tolist():
        want[p] |= transforms.SKIP
    lookup = transforms.PlanLookup(64, {"flags": np.dtype(np.int8)}, cache_chunks=2)
    for f in range(3):
        for first, n in ((0, 100), (100, 37), (137, 500), (637, 400), (990, 0)):
            got = lookup.rows(plan, f, first, n)
            expect = sorted((transforms.position_row(p), v) for p, v in want.items()
                            if transforms.position_file(p) == f
                            and first <= transforms.position_row(p) < first + n)
            assert list(zip(got["row"].tolist(), got["flags"].tolist(), strict=True)) == expect


# ---------------------------------------------------------------------------------------------
# First reads.
# ---------------------------------------------------------------------------------------------

def _users_table(rows):
    columns = {schema.USER_ID.key: pa.array([r[0] for r in rows], pa.int64())}
    for feature in schema.USER_ATTRIBUTES:
        columns[feature.key] = pa.array([r[1] for r in rows], pa.int64())
    columns[schema.HISTORY_ITEM_ID.key] = pa.array([r[2] for r in rows], pa.list_(pa.int64()))
    columns[schema.HISTORY_CATEGORY.key] = pa.array([r[3] for r in rows], pa.list_(pa.int64()))
    return pa.table(columns)


USER_ROWS = [
    (1, 10, [1, 2, 3], [4, 5, 6]),
    (2, None, [7, 8, 9, 10, 11], [12, None, 14, 15, 16]),  # null element -> 0
    (3, 30, None, None),  # null lists -> empty history
    (4, 40, [1, 2], [3]),  # mismatch
    (None, 50, [1], [1]),  # null id
    (0, 60, [1], [1]),  # id 0 counts as missing
]


def test_parse_user_keys_on_a_sliced_batch():
    table = _users_table(USER_ROWS).slice(1)  # parsers must honour slice offsets
    parser = transforms.ParseUserKeys("train_user_features", ["a.parquet", "f.parquet"],
                                      max_seq_len=3, num_buckets=1)
    main, rejected, counts, _ = _run(parser, ("f.parquet", 100, table))
    keys = _blocks(main, transforms.USER_KEY_COLUMNS)[0]
    assert keys["id"].tolist() == [2, 3, 4]
    assert keys["position"].tolist() == transforms.positions(1, [100, 101, 102]).tolist()
    assert keys["good"].tolist() == [1, 1, 0]
    assert [(r["reason"], r["row"], r["user_id"]) for r in rejected] == [
        (transforms.NULL_ID, 103, None), (transforms.NULL_ID, 104, 0),
        (transforms.HISTORY_LENGTH_MISMATCH, 102, 4)]
    assert rejected[2]["lengths"] == {schema.HISTORY_ITEM_ID.key: 2,
                                      schema.HISTORY_CATEGORY.key: 1}
    assert counts == {("train_user_features", transforms.ROWS_READ): 5,
                      ("train_user_features", transforms.HISTORIES_TRUNCATED): 1}
    with pytest.raises(ValueError, match="not one of the 2 files"):
        _run(parser, ("other.parquet", 0, table))


def test_parse_samples_checks_ids_and_one_hot_labels():
    table = pa.table({
        schema.LABEL.key: pa.array([[1, 0], [0, 1], [1, 1], None, [0, None], [0, 1], [1, 0],
                                    [0, 1, 0]], pa.list_(pa.int8())),
        schema.USER_ID.key: pa.array([1, 2, 3, 4, 5, None, 0, 8], pa.int64()),
        schema.ITEM_ID.key: pa.array([7, 8, 9, 9, 9, 9, 9, 9], pa.int64()),
    })
    main, rejected, counts, _ = _run(
        transforms.ParseSamples("test", ["s.parquet"], num_buckets=3), ("s.parquet", 10, table))
    by_bucket = _blocks(main, transforms.SAMPLE_COLUMNS)
    rows = sorted((int(i), int(u), int(lab), int(p)) for block in by_bucket.values()
                  for i, u, lab, p in zip(*block.values(), strict=True))
    assert rows == [(7, 1, 0, 10), (8, 2, 1, 11)]
    for bucket, block in by_bucket.items():
        assert (transforms.id_buckets(block[schema.ITEM_ID.name], 3) == bucket).all()
    assert sorted((r["reason"], r["row"], r["user_id"], r.get("label", "-")) for r in rejected) == [
        (transforms.BAD_LABEL, 12, 3, [1, 1]), (transforms.BAD_LABEL, 13, 4, None),
        (transforms.BAD_LABEL, 14, 5, [0, None]), (transforms.BAD_LABEL, 17, 8, [0, 1, 0]),
        (transforms.NULL_ID, 15, None, "-"), (transforms.NULL_ID, 16, 0, "-")]
    assert counts == {("test", transforms.ROWS_READ): 8}


def test_parse_samples_names_a_column_of_the_wrong_type():
    table = pa.table({schema.LABEL.key: pa.array([1], pa.int8()),
                      schema.USER_ID.key: pa.array([1], pa.int64()),
                      schema.ITEM_ID.key: pa.array([1], pa.int64())})
    parser = transforms.ParseSamples("train", ["s.parquet"], num_buckets=2)
    with pytest.raises(ValueError, match=r"'label_0' of s.parquet must be a one-hot list"):
        _run(parser, ("s.parquet", 0, table))
    table = table.set_column(1, schema.USER_ID.key, pa.array(["x"]))
    with pytest.raises(ValueError, match=r"'129_1' of s.parquet must be an integer column"):
        _run(parser, ("s.parquet", 0, table))


def _embeddings_table(vectors, ids=None):
    return pa.table({
        schema.EMBEDDING_ITEM_KEY: pa.array(ids or list(range(1, len(vectors) + 1)), pa.int64()),
        schema.EMBEDDING_VECTOR_KEY: pa.array(vectors, pa.list_(pa.int8()))})


def test_parse_embedding_keys_rejects_wrong_dimensions():
    table = _embeddings_table(
        [[-128, 0, 1, 127], [1, 2, 3], None, [1, 2, 3, 4], [1, None, 3, 4], [4, 3, 2, 1]],
        ids=[1, 2, 3, None, 5, 0])
    main, rejected, counts, _ = _run(
        transforms.ParseEmbeddingKeys("embeddings", ["e.parquet"], dim=4, num_buckets=1),
        ("e.parquet", 0, table))
    keys = _blocks(main, transforms.KEY_COLUMNS)[0]
    assert (keys["id"].tolist(), keys["position"].tolist()) == ([1], [0])
    assert sorted((r["reason"], r["row"], r["item_id"], r.get("dim")) for r in rejected) == [
        (transforms.BAD_EMBEDDING_DIM, 1, 2, 3), (transforms.BAD_EMBEDDING_DIM, 2, 3, None),
        (transforms.BAD_EMBEDDING_DIM, 4, 5, 4), (transforms.NULL_ID, 3, None, None),
        (transforms.NULL_ID, 5, 0, None)]
    assert counts == {("embeddings", transforms.ROWS_READ): 6}
    wide = pa.table({schema.EMBEDDING_ITEM_KEY: pa.array([1], pa.int64()),
                     schema.EMBEDDING_VECTOR_KEY: pa.array([[1, 300, 2, 3]],
                                                           pa.list_(pa.int64()))})
    with pytest.raises(ValueError, match="outside int8"):
        _run(transforms.ParseEmbeddingKeys("embeddings", ["e.parquet"], 4, 1),
             ("e.parquet", 0, wide))


# ---------------------------------------------------------------------------------------------
# Second reads: planned rows.
# ---------------------------------------------------------------------------------------------

def test_embedding_rows_are_written_once_and_duplicates_forwarded():
    vectors = [[k, -k, 127, -128] for k in range(6)]
    vectors[3] = [1, 2, 3]  # bad dim: never planned, never written
    table = _embeddings_table(vectors, ids=[5, 6, 5, 7, 8, 5]).slice(1)
    files = ["e0.parquet", "e1.parquet"]
    # Item 5 has rows 0 (this file, not in the slice), 2 and 5: the first is kept.
    pos = transforms.positions(1, [100, 102, 105])
    plan = _multimap(transforms.table_plan(
        pos, np.array([transforms.DUPLICATE, transforms.DUPLICATE | transforms.SKIP,
                       transforms.DUPLICATE | transforms.SKIP], np.int8), chunk_rows=4))
    main, rejected, counts, tagged = _run(
        transforms.EncodeEmbeddings("embeddings", files, dim=4, chunk_rows=4),
        ("e1.parquet", 101, table), plan=plan)
    written = [records.encode_embedding_example_fast(i, np.array(v, np.int8).tobytes())
               for i, v in ((6, vectors[1]), (8, vectors[4]))]
    assert main == [written] and rejected == []
    assert counts == {("embeddings", transforms.ROWS_WRITTEN): 2}
    assert tagged[transforms.DUPLICATES] == [
        (5, (int(pos[1]), np.array(vectors[2], np.int8).tobytes())),
        (5, (int(pos[2]), np.array(vectors[5], np.int8).tobytes()))]


def test_batch_embedding_encoder_writes_the_reference_bytes():
    # Every varint length (1..10 bytes), negative ids and the int64 extremes.
    ids = [0, 1, -1, 127, 128, 16383, 16384, 2**21, 2**28, 2**35, 2**42, 2**49, 2**56 - 1,
           2**56, 2**62, INT64_MAX, INT64_MIN, INT64_MIN + 1, -(2**35)]
    rng = np.random.default_rng(8)
    ids = np.array(ids + rng.integers(INT64_MIN, INT64_MAX, 50, dtype=np.int64,
                                      endpoint=True).tolist(), np.int64)
    vectors = rng.integers(-128, 128, (ids.size, 16), dtype=np.int8)
    vectors[0, :2] = [-128, 127]
    got = transforms.EmbeddingRecordEncoder(16).encode(ids, vectors)
    assert got == [records.encode_embedding_example_fast(int(i), v.tobytes())
                   for i, v in zip(ids, vectors, strict=True)]
    assert transforms.EmbeddingRecordEncoder(16).encode(np.zeros(0, np.int64),
                                                        np.zeros((0, 16), np.int8)) == []
    with pytest.raises(ValueError, match="shape"):
        transforms.EmbeddingRecordEncoder(16).encode(ids, vectors[:, :8])


def test_reject_duplicates_names_the_kept_row_and_compares_content():
    files = ["a.parquet", "b.parquet"]
    rows = [(int(transforms.positions(1, [3])[0]), b"x"), (int(transforms.positions(0, [9])[0]),
                                                           b"x"),
            (int(transforms.positions(1, [0])[0]), b"y")]
    _, rejected, _, _ = _run(transforms.RejectDuplicates("item_features", "item_id", files),
                             (42, rows))
    assert rejected == [
        {"source": "item_features", "reason": transforms.DUPLICATE_KEY, "file": "b.parquet",
         "row": 0, "item_id": 42, "kept": {"file": "a.parquet", "row": 9}, "identical": False},
        {"source": "item_features", "reason": transforms.DUPLICATE_KEY, "file": "b.parquet",
         "row": 3, "item_id": 42, "kept": {"file": "a.parquet", "row": 9}, "identical": True}]


def _sample_plan(user_rows, user_ids, labels, item_values, chunk_rows):
    columns = {schema.USER_ID.name: np.array(user_ids, np.int64),
               schema.LABEL.name: np.array(labels, np.int8)}
    for k, feature in enumerate(transforms._ITEM_FEATURES):
        columns[feature.name] = np.array([v[k] for v in item_values], np.int64)
    return _multimap(transforms.plan_blocks(transforms.positions(0, user_rows), columns,
                                            chunk_rows))


def test_user_records_keep_the_newest_steps_and_count_vocabularies():
    table = _users_table(USER_ROWS).slice(1)  # rows 100.. are users 2, 3, 4, None, 0
    items = [(70, 71, 72, 73), (80, 81, 82, 83), (70, 71, 72, 73)]
    plan = _sample_plan([100, 101, 100], [2, 3, 2], [1, 0, 0], items, chunk_rows=2)
    encoder = transforms.EncodeUserRecords(
        "train", "train_user_features", ["u.parquet"], max_seq_len=3, chunk_rows=2,
        count_vocabularies=True, num_buckets=4)
    main, rejected, counts, tagged = _run(encoder, ("u.parquet", 100, table),
                                          samples_plan=plan, duplicate_plan=_multimap([]))
    assert rejected == []
    assert [len(r) for r in main] == [2, 1]  # user 2's two records, then user 3's
    expected = []
    for (user, attr, hist, cats), label, item in (
            ((2, 0, [9, 10, 11], [14, 15, 16]), 1, items[0]),
            ((2, 0, [9, 10, 11], [14, 15, 16]), 0, items[2]),
            ((3, 30, [], []), 0, items[1])):
        context = {schema.LABEL.name: label, schema.USER_ID.name: user,
                   **{f.name: attr for f in schema.USER_ATTRIBUTES},
                   **{f.name: v for f, v in zip(transforms._ITEM_FEATURES, item, strict=True)}}
        expected.append(records.encode_sequence_example(
            context, {schema.HISTORY_ITEM_ID.name: hist, schema.HISTORY_CATEGORY.name: cats}))
    got = [example_pb2.SequenceExample.FromString(r) for group in main for r in group]
    assert got == [example_pb2.SequenceExample.FromString(r) for r in expected]
    assert counts == {("train", transforms.EXAMPLES_WRITTEN): 3,
                      ("train", transforms.HISTORIES_TRUNCATED): 2}
    vocab: dict[str, Counter] = defaultdict(Counter)
    for (name, bucket), (ids, n) in tagged[transforms.VOCAB]:
        ids, n = np.frombuffer(ids, np.int64), np.frombuffer(n, np.int64)
        assert (transforms.id_buckets(ids, 4) == bucket).all()  # keyed by id bucket
        vocab[name].update(dict(zip(ids.tolist(), n.tolist(), strict=True)))
    assert vocab["user"] == {2: 2, 3: 1}
    assert vocab["item"] == {9: 2, 10: 2, 11: 2, 70: 2, 80: 1}
    assert vocab["category"] == {14: 2, 15: 2, 16: 2, 71: 2, 81: 1}
    assert vocab["user_attr_1"] == {30: 1}  # 0 (a null attribute) is never counted


def test_user_records_refuse_a_plan_that_does_not_match_the_file():
    table = _users_table(USER_ROWS)
    plan = _sample_plan([1], [99], [0], [(1, 2, 3, 4)], chunk_rows=8)
    encoder = transforms.EncodeUserRecords("test", "test_user_features", ["u.parquet"], 3, 8,
                                           count_vocabularies=False, num_buckets=1)
    with pytest.raises(RuntimeError, match=r"u\.parquet changed"):
        _run(encoder, ("u.parquet", 0, table), samples_plan=plan, duplicate_plan=_multimap([]))


def test_resolve_users_rejects_in_precedence_order_and_plans_the_rest():
    user_keys = {"id": np.array([5, 6, 6, 7], np.int64),
                 "position": transforms.positions(0, [4, 9, 2, 1]),
                 "good": np.array([1, 1, 1, 0], np.int8)}
    samples = {schema.ITEM_ID.name: np.array([1, 2, 3, 4], np.int64),
               schema.USER_ID.name: np.array([5, 6, 7, 8], np.int64),
               schema.LABEL.name: np.array([1, 0, 1, 0], np.int8),
               "position": transforms.positions(1, [0, 1, 2, 3]),
               "has_item": np.array([1, 0, 1, 0], np.int8),
               **{f.name: np.array([11, 12, 13, 14]) * (k + 1)
                  for k, f in enumerate(transforms._ITEM_CONTEXT)}}
    resolver = transforms.ResolveUsers("train", "train_user_features", ["s0", "s1"], 4)
    main, rejected, counts, tagged = _run(resolver, (0, {
        "users": [transforms.encode_block(user_keys)],
        "samples": [transforms.encode_block(samples)]}))
    assert sorted((r["reason"], r["file"], r["row"], r["user_id"]) for r in rejected) == [
        (transforms.HISTORY_LENGTH_MISMATCH, "s1", 2, 7),
        (transforms.NO_ITEM_FEATURES, "s1", 1, 6),
        (transforms.NO_USER_FEATURES, "s1", 3, 8)]
    assert counts == {("train_user_features", transforms.ROWS_KEPT): 2}
    plan = _multimap(main)
    got = transforms.PlanLookup(4, {k: v for k, v in transforms.SAMPLE_PLAN_COLUMNS.items()
                                    if k != "row"}).rows(plan, 0, 0, 10)
    assert got["row"].tolist() == [4] and got[schema.USER_ID.name].tolist() == [5]
    duplicates = transforms.PlanLookup(4, {"flags": np.dtype(np.int8)}).rows(
        _multimap(tagged[transforms.DUPLICATE_PLAN]), 0, 0, 10)
    assert list(zip(duplicates["row"].tolist(), duplicates["flags"].tolist(), strict=True)) \
        == [(2, transforms.DUPLICATE), (9, transforms.DUPLICATE | transforms.SKIP)]


# ---------------------------------------------------------------------------------------------
# Counting, merging, metadata.
# ---------------------------------------------------------------------------------------------

def test_id_counter_and_merge_match_a_python_counter():
    rng = np.random.default_rng(3)
    counter = transforms.IdCounter(compact_every=50)  # force several compactions
    want: Counter = Counter()
    for _ in range(40):
        ids = rng.integers(-5, 6, rng.integers(0, 12))
        weight = int(rng.integers(1, 4))
        counter.add(ids, weight)
        for i in ids.tolist():
            if i:
                want[i] += weight
    ids, counts = counter.result()
    assert dict(zip(ids.tolist(), counts.tolist(), strict=True)) == dict(want)
    assert ids.tolist() == sorted(want)
    combine = transforms.MergeIdCounts()
    acc = combine.add_input(combine.create_accumulator(), (ids.tobytes(), counts.tobytes()))
    acc = combine.merge_accumulators([acc, acc, combine.create_accumulator()])
    merged_ids, merged_counts = (np.frombuffer(b, np.int64) for b in combine.extract_output(acc))
    assert merged_ids.tolist() == ids.tolist()
    assert merged_counts.tolist() == (2 * counts).tolist()


def test_vocabulary_file_merges_bucket_partials(tmp_path):
    partials = [(np.array([5, -3], np.int64).tobytes(), np.array([2, 4], np.int64).tobytes()),
                (np.array([7, 2], np.int64).tobytes(), np.array([2, 4], np.int64).tobytes()),
                (b"", b"")]
    writer = transforms.WriteVocabulary(str(tmp_path), min_count=2)
    (name, info), = list(writer.process(("item", partials)))
    assert name == "item" and info["size"] == 4 and info["occurrences"] == 12
    assert (tmp_path / "vocab" / "item.tsv").read_text().splitlines() == [
        "-3\t4", "2\t4", "5\t2", "7\t2"]


def test_metadata_refuses_rows_that_do_not_add_up():
    sections = {"train": {"kind": "split", "output": transforms.EXAMPLES_WRITTEN,
                          "reasons": transforms.SAMPLE_REASONS, "records_dir": "train"}}
    counts = {("train", transforms.ROWS_READ): 5, ("train", transforms.EXAMPLES_WRITTEN): 3,
              ("train", "rejected.null_id"): 1}
    with pytest.raises(RuntimeError, match="train: rows read 5 != examples_written 3") as lost:
        transforms.build_metadata("/out", sections, {"max_seq_len": 4}, counts, {}, [])
    assert "lost between two stages" in str(lost.value)   # fewer out than in: the runner
    counts[("train", "rejected.null_id")] = 3
    with pytest.raises(RuntimeError, match="rows read 5 != examples_written 3") as extra:
        transforms.build_metadata("/out", sections, {"max_seq_len": 4}, counts, {}, [])
    assert "lost between two stages" not in str(extra.value)   # more out than in: a bug here
    counts[("train", "rejected.null_id")] = 2
    metadata = transforms.build_metadata("/out", sections, {"max_seq_len": 4}, counts, {},
                                         ["/out/train/part-0.tfrecord.gz"])
    assert metadata["splits"]["train"]["rows_rejected"] == 2
    assert metadata["splits"]["train"]["files"] == ["train/part-0.tfrecord.gz"]


def test_list_offsets_of_a_sliced_array_cover_only_the_slice():
    array = pa.array([[1, 2], [3], None, [4, 5, 6], [7]], pa.list_(pa.int64())).slice(1, 3)
    offsets, values = transforms._offsets_and_values(array)
    assert offsets.tolist() == [0, 1, 1, 4]
    assert values.to_pylist() == [3, 4, 5, 6]
    starts, lengths, flat, present = transforms.list_column(pa.table({"x": array}), "x", "f")
    assert [flat[s:s + n].tolist() for s, n in zip(starts, lengths, strict=True)] == [
        [3], [], [4, 5, 6]]
    assert present.tolist() == [True, False, True]
    lengths, present = transforms.list_lengths(pa.table({"x": array}), "x", "f")
    assert (lengths.tolist(), present.tolist()) == ([1, 0, 3], [True, False, True])
