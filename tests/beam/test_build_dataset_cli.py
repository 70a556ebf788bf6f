"""The command line of ``beam.build_dataset``: options, default runner, the real demo files."""

from __future__ import annotations

import glob
import json
import os
import re
from pathlib import Path

import pytest
import tensorflow as tf
from apache_beam.options.pipeline_options import DirectOptions, StandardOptions
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline

from beam import build_dataset, transforms
from beam import io as beam_io
from muse_tf import schema
from muse_tf.data import layout

#: The real ten-row TAOBAO-MM files (shared/ lies beside the repository).
DEMO_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "taobao_mm_demo"


def test_runner_defaults_to_fn_api_runner_and_flags_pass_through():
    options = build_dataset.pipeline_options(["--input", "in", "--output", "out"])
    assert options.view_as(StandardOptions).runner == "FnApiRunner"
    options = build_dataset.pipeline_options([
        "--input", "in", "--output", "out", "--direct_num_workers", "2",
        "--direct_running_mode", "multi_processing"])
    assert options.view_as(StandardOptions).runner == "FnApiRunner"
    assert options.view_as(DirectOptions).direct_num_workers == 2
    assert options.view_as(DirectOptions).direct_running_mode == "multi_processing"
    options = build_dataset.pipeline_options([
        "--input", "gs://b/in", "--output", "gs://b/out", "--runner", "DataflowRunner",
        "--project", "p", "--region", "r", "--temp_location", "gs://b/tmp",
        "--setup_file", "./setup.py"])
    assert options.view_as(StandardOptions).runner == "DataflowRunner"
    assert options.get_all_options()["setup_file"] == "./setup.py"


def test_config_from_flags():
    options = build_dataset.pipeline_options([
        "--input", "/in", "--output", "/out", "--max-seq-len", "50", "--min-count", "3",
        "--num-shards", "4", "--compression-level", "6", "--overwrite", "--catalogue-buckets", "3",
        "--train-samples", "/a/*.parquet, /b/x.parquet", "--embeddings", "/e/*.parquet"])
    config = build_dataset.config_from_options(options)
    assert (config.input_dir, config.output_dir) == ("/in", "/out")
    assert (config.max_seq_len, config.min_count, config.num_shards) == (50, 3, 4)
    assert config.compression_level == 6 and config.overwrite
    assert config.catalogue_buckets == 3
    assert config.patterns(beam_io.TRAIN_SAMPLES) == ("/a/*.parquet", "/b/x.parquet")
    assert config.patterns(beam_io.EMBEDDINGS) == ("/e/*.parquet",)
    assert config.patterns(beam_io.ITEM_FEATURES) == (
        "/in/item_features.parquet", "/in/item_features/*.parquet",
        "/in/item_features-*.parquet")
    defaults = build_dataset.config_from_options(
        build_dataset.pipeline_options(["--input", "/in", "--output", "/out"]))
    assert defaults.max_seq_len == schema.MAX_HISTORY_LEN
    assert (defaults.min_count, defaults.num_shards, defaults.overwrite) == (1, 0, False)
    assert defaults.catalogue_buckets == transforms.DEFAULT_BUCKETS


@pytest.mark.parametrize("flags, message", [
    (["--output", "/out"], "--input is required"),
    (["--input", "/in"], "--output is required"),
    (["--input", "/in", "--output", "/o", "--max-seq-len", "0"], "--max-seq-len must be >= 1"),
    (["--input", "/in", "--output", "/o", "--min-count", "0"], "--min-count must be >= 1"),
    (["--input", "/in", "--output", "/o", "--num-shards", "-1"], "--num-shards must be >= 0"),
    (["--input", "/in", "--output", "/o", "--compression-level", "10"], "got 10"),
    (["--input", "/in", "--output", "/o", "--catalogue-buckets", "0"],
     "--catalogue-buckets must be >= 1"),
])
def test_bad_flags_are_named(flags, message):
    with pytest.raises(ValueError, match=message):
        build_dataset.config_from_options(build_dataset.pipeline_options(flags))


def _temp_dirs(output: str) -> list[str]:
    return sorted(glob.glob(os.path.join(output, "**", "beam-temp-*"), recursive=True))


def _count_records(pattern: str) -> int:
    files = sorted(glob.glob(pattern))
    assert files, f"no files match {pattern}"
    return sum(1 for _ in tf.data.TFRecordDataset(files, compression_type="GZIP"))


@pytest.mark.skipif(not DEMO_DIR.is_dir(), reason=f"demo files not found at {DEMO_DIR}")
def test_demo_files_reject_every_sample_for_missing_user_features(tmp_path, capsys):
    # The ten-row demo tables do not join: the build writes metadata and rejects, then
    # says so on stderr and exits non-zero (issue 11).
    output = str(tmp_path / "demo")
    assert build_dataset.main(["--input", str(DEMO_DIR), "--output", output]) == 1
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["totals"]["rows_read"] == 20
    err = captured.err
    assert "0 examples" in err and "--allow-empty" in err, err
    for split in layout.SPLITS:
        assert re.search(rf"{split}: rows read 10, examples written 0, rejected 10 "
                         rf"\({transforms.NO_USER_FEATURES} 10\)", err), err
    for name in ("train_user_features", "test_user_features", "item_features"):
        assert f"{name}: rows read 10" in err, err
    assert _temp_dirs(output) == []
    with open(layout.metadata_path(output)) as f:
        metadata = json.load(f)
    assert metadata["options"]["runner"] == "FnApiRunner"
    for split in layout.SPLITS:
        entry = metadata["splits"][split]
        assert entry["rows_read"] == 10
        assert entry["examples_written"] == 0
        assert entry["rows_rejected"] == 10
        assert entry["rejected"][transforms.NO_USER_FEATURES] == 10
        assert _count_records(layout.split_pattern(output, split)) == 0
        rows = []
        for path in glob.glob(layout.rejected_pattern(output, split)):
            with open(path) as f:
                rows += [json.loads(line) for line in f]
        assert len(rows) == 10
        assert {r["reason"] for r in rows} == {transforms.NO_USER_FEATURES}
        assert sorted(r["row"] for r in rows) == list(range(10))
        assert all(isinstance(r["user_id"], int) and isinstance(r["item_id"], int)
                   for r in rows)
    assert metadata["totals"]["rejected"][transforms.NO_USER_FEATURES] == 20
    assert metadata["totals"]["examples_written"] == 0
    # The demo's own tables are clean: 10 rows each, all kept / written.
    for name in ("train_user_features", "test_user_features", "item_features"):
        assert metadata["tables"][name]["rows_kept"] == 10, name
    assert metadata["tables"]["embeddings"]["rows_written"] == 10
    assert _count_records(layout.embeddings_pattern(output)) == 10
    for name in schema.vocabularies():
        assert os.path.getsize(layout.vocab_path(output, name)) == 0
        assert metadata["vocabularies"][name]["size"] == 0


@pytest.mark.slow
@pytest.mark.skipif(not DEMO_DIR.is_dir(), reason=f"demo files not found at {DEMO_DIR}")
def test_overwrite_replaces_a_previous_build(tmp_path):
    output = str(tmp_path / "demo")
    first = build_dataset.run(["--input", str(DEMO_DIR), "--output", output, "--num-shards", "3"])
    assert len(first["splits"]["train"]["files"]) == 3
    with pytest.raises(FileExistsError, match="--overwrite"):
        build_dataset.run(["--input", str(DEMO_DIR), "--output", output])
    again = build_dataset.run(["--input", str(DEMO_DIR), "--output", output, "--overwrite"])
    assert again["totals"] == first["totals"]
    # The three old shards are gone: only the new build's files are left.
    assert sorted(glob.glob(layout.split_pattern(output, "train"))) == [
        os.path.join(output, f) for f in again["splits"]["train"]["files"]]
    assert _temp_dirs(output) == []


@pytest.mark.slow
def test_two_worker_processes_give_the_in_process_result(table_writer, tmp_path):
    users = [{"id": u, "attrs": [u] * 5, "items": list(range(u, u + u % 7)),
              "cats": list(range(u % 7))} for u in range(1, 13)]
    samples = [([1 - k % 2, k % 2], 1 + k % 12, 100 + k % 5) for k in range(40)]
    samples += [([1, 0], 77, 100), ([1, 0], 1, 999)]  # no user, no item
    for split in layout.SPLITS:
        table_writer.samples(f"{split}_samples/a.parquet", samples[:21])
        table_writer.samples(f"{split}_samples/b.parquet", samples[21:])
        table_writer.users(f"{split}_user_features.parquet", users, row_group_size=5)
    table_writer.items("item_features.parquet", [(100 + k, k, k, k) for k in range(5)])
    table_writer.embeddings("scl_embedding_int8_p90.parquet",
                            [(100 + k, [k] * schema.MM_EMBEDDING_DIM) for k in range(5)])
    flags = ["--input", table_writer.root, "--max-seq-len", "3"]
    single = build_dataset.run([*flags, "--output", str(tmp_path / "one")])
    multi = build_dataset.run([*flags, "--output", str(tmp_path / "two"),
                               "--direct_num_workers", "2",
                               "--direct_running_mode", "multi_processing"])
    for metadata in (single, multi):
        for split in layout.SPLITS:
            entry = metadata["splits"][split]
            assert (entry["rows_read"], entry["examples_written"]) == (42, 40)
            assert entry["rejected"][transforms.NO_USER_FEATURES] == 1
            assert entry["rejected"][transforms.NO_ITEM_FEATURES] == 1
    assert multi["vocabularies"] == single["vocabularies"]
    for split in layout.SPLITS:
        assert _count_records(layout.split_pattern(str(tmp_path / "two"), split)) == 40
        with open(layout.vocab_path(str(tmp_path / "one"), "item")) as f1, \
                open(layout.vocab_path(str(tmp_path / "two"), "item")) as f2:
            assert f1.read() == f2.read()


def test_cli_help_and_usage_errors(capsys, tmp_path):
    assert build_dataset.main(["--help"]) == 0
    assert "--max-seq-len" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        build_dataset.main(["--output", str(tmp_path)])
    assert "--input is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_dataset.main(["--input", str(tmp_path / "none"), "--output", str(tmp_path)])
    assert "no parquet files for table 'train_samples'" in capsys.readouterr().err


def _metadata(counts: dict[tuple[str, str], int]) -> dict:
    """metadata.json content from per-section counts, as the pipeline would write it."""
    return transforms.build_metadata("/out", build_dataset._sections(), {"max_seq_len": 4},
                                     counts, {}, [])


def _fake_build(monkeypatch, counts: dict[tuple[str, str], int]) -> None:
    monkeypatch.setattr(build_dataset, "run", lambda argv: _metadata(counts))


JOINED = {("test", "rows_read"): 3, ("test", "examples_written"): 3}
NOTHING_JOINED_IN_TRAIN = {
    ("train", "rows_read"): 5, ("train", "rejected.no_user_features"): 4,
    ("train", "rejected.bad_label"): 1,
    ("train_user_features", "rows_read"): 7, ("train_user_features", "rows_kept"): 7,
    ("item_features", "rows_read"): 2, ("item_features", "rows_kept"): 2, **JOINED}


def test_a_split_with_rows_but_no_examples_fails_the_cli(monkeypatch, capsys):
    _fake_build(monkeypatch, NOTHING_JOINED_IN_TRAIN)
    assert build_dataset.main(["--input", "/in", "--output", "/out"]) == 1
    err = capsys.readouterr().err
    assert "split 'train' read 5 sample rows but wrote 0 examples" in err, err
    assert "train: rows read 5, examples written 0, rejected 5 (no_user_features 4, " \
           "bad_label 1)" in err, err
    assert "train_user_features: rows read 7, rows kept 7" in err, err
    assert "item_features: rows read 2, rows kept 2" in err, err
    assert "split 'test'" not in err  # the test split joined
    assert "/out/metadata.json" in err and "/out/rejected" in err, err


def test_allow_empty_keeps_exit_zero_but_still_warns(monkeypatch, capsys):
    _fake_build(monkeypatch, NOTHING_JOINED_IN_TRAIN)
    assert build_dataset.main(["--input", "/in", "--output", "/out", "--allow-empty"]) == 0
    assert "split 'train' read 5 sample rows but wrote 0 examples" in capsys.readouterr().err


def test_a_split_without_input_rows_does_not_fail(monkeypatch, capsys):
    _fake_build(monkeypatch, JOINED)  # train read no rows: nothing was lost
    assert build_dataset.main(["--input", "/in", "--output", "/out"]) == 0
    assert "wrote 0 examples" not in capsys.readouterr().err


def _tiny_tables(writer) -> None:
    users = [{"id": u, "attrs": [u] * 5, "items": [1, 2], "cats": [3, 4]} for u in (1, 2)]
    for split in layout.SPLITS:
        writer.samples(f"{split}_samples.parquet", [([0, 1], 1, 100), ([1, 0], 2, 101)])
        writer.users(f"{split}_user_features.parquet", users)
    writer.items("item_features.parquet", [(100, 1, 1, 1), (101, 2, 2, 2)])
    writer.embeddings("scl_embedding_int8_p90.parquet", [(100, [1] * schema.MM_EMBEDDING_DIM)])


def _plant_temp_dirs(output: str) -> list[str]:
    """Leftovers of a killed build: Beam sink temp dirs, with and without files."""
    dirs = [os.path.join(output, "train", "beam-temp-part-0123456789abcdef"),
            os.path.join(output, layout.EMBEDDINGS_DIR, "beam-temp-part-fedcba9876543210"),
            os.path.join(output, layout.REJECTED_DIR, "test", "beam-temp-part-00ff00ff")]
    for k, path in enumerate(dirs):
        os.makedirs(path)
        if k != 1:  # the embedding one stays empty (opened, no writer yet)
            with open(os.path.join(path, "a1b2.part"), "wb") as f:
                f.write(b"partial shard")
    return dirs


def test_leftover_temp_dirs_need_overwrite(tmp_path, table_writer):
    _tiny_tables(table_writer)
    output = str(tmp_path / "out")
    _plant_temp_dirs(output)
    config = build_dataset.BuildConfig(input_dir=table_writer.root, output_dir=output)
    with pytest.raises(FileExistsError, match=r"beam-temp-.*--overwrite"):
        build_dataset.build_pipeline(BeamTestPipeline(runner="FnApiRunner"), config)


def test_overwrite_removes_leftover_temp_dirs(tmp_path, table_writer):
    _tiny_tables(table_writer)
    output = str(tmp_path / "out")
    _plant_temp_dirs(output)
    metadata = build_dataset.run(["--input", table_writer.root, "--output", output,
                                  "--overwrite"])
    assert metadata["totals"]["examples_written"] == 4
    assert _temp_dirs(output) == []
    # Only the new build's shards are left in each record directory.
    for split in layout.SPLITS:
        listed = sorted(f"{split}/{name}" for name in os.listdir(os.path.join(output, split)))
        assert listed == metadata["splits"][split]["files"]


def test_temp_dirs_on_object_stores_are_found_through_their_files(tmp_path, monkeypatch):
    # gs:// has no directories: the object-store branch must find temp dirs by their files.
    output = str(tmp_path / "out")
    planted = _plant_temp_dirs(output)
    monkeypatch.setattr(beam_io, "_is_local", lambda path: False)
    dirs = build_dataset._sink_dirs(output)
    with_files = sorted(planted[k] for k in (0, 2))  # the empty one has no objects
    assert beam_io.find_sink_temp_dirs(dirs) == with_files
    assert sorted(beam_io.remove_sink_temp_dirs(dirs)) == with_files
    assert [os.listdir(d) for d in planted] == [[], [], []]
