"""TAOBAO-MM parquet -> TFRecord SequenceExamples, vocabularies, embedding table, metadata.

Usage::

    python -m beam.build_dataset --input DIR --output DIR [--max-seq-len N] [--min-count K]
        [--num-shards N] [--compression-level L] [--catalogue-buckets B] [--overwrite]
        [--allow-empty] [--train-samples GLOBS] [--test-samples GLOBS]
        [--train-user-features GLOBS] [--test-user-features GLOBS] [--item-features GLOBS]
        [--embeddings GLOBS] [Beam options]

Runs on FnApiRunner (in-process) unless ``--runner`` says otherwise; e.g.
``--direct_num_workers 2 --direct_running_mode multi_processing`` runs it on two local
worker processes (Beam 2.77's multi-process runner has lost rows at 35.4M items, which the
row check catches; in-process was faster there), and ``--runner DataflowRunner --project P
--region R --temp_location gs://... --setup_file ./setup.py`` on Dataflow (input/output may
then be ``gs://`` paths).

Rows move between stages as column blocks (NumPy columns of many rows in one ``bytes``
value) keyed by an id-hash bucket (``--catalogue-buckets``, default 256), and are named by a
position (file index, row) instead of carrying their file name; see
:mod:`beam.transforms`. The catalogue and user tables are read twice: the first read sends
only ``(id, position)`` keys through a shuffle to decide, per bucket, which row of each key
is kept, which rows are duplicates and which rows the samples need; that decision (a small
"plan", keyed by file and row chunk) is a side input of the second read, which encodes or
forwards exactly those rows straight from its parquet batches. Embedding vectors and user
histories never cross a shuffle.

Graph (every stage named; ``=>`` a shuffle, ``~plan~>`` a side input)::

    {train,test}_samples --Parse{Split}Samples--> sample blocks (by item bucket)
    item_features --ParseItemKeys--> key blocks
        + sample blocks =GroupItemKeys=> ResolveItems: kept row per item, duplicates,
          the rows samples need (plan)
    item_features ~plan~> EmitItemValues --> values of those rows
        + sample blocks =GroupItemValues=> JoinItemFeatures --> joined samples (by user
          bucket), per split
    {split}_user_features --Parse{Split}UserKeys--> key blocks
        + joined samples =Group{Split}ByUser=> Resolve{Split}Users: kept row per user;
          samples rejected, or planned on their user's row (plan)
    {split}_user_features ~plan~> Encode{Split}Examples --> {split}/part-*.tfrecord.gz
        (train: id counts by (vocabulary, id bucket) =MergeVocabularyCounts=>
         =GroupVocabularyBuckets=> WriteVocabularies --> vocab/<name>.tsv)
    scl_embedding_int8_p90 --ParseEmbeddingKeys--> key blocks =GroupEmbeddingKeys=>
        ResolveEmbeddings: duplicates (plan)
    scl_embedding_int8_p90 ~plan~> EncodeEmbeddings --> embeddings/part-*.tfrecord.gz
    rows of duplicated keys (second reads) =Group*Duplicates=> Reject*Duplicates
    every stage --rejected--> rejected/<section>/part-*.jsonl
    every stage --counts--> metadata.json (checks rows read = written + rejected)

The item join runs first; a sample without item features is carried to the user join and
only rejected there, so that "no user features" takes precedence (the demo files' samples
join with neither table). Records are built and written in the same fused stage as the
user rows are read, one user's records next to each other.

Memory: the local runners hold every shuffle in memory. What crosses one is 16 bytes a
catalogue row (key blocks of items and embeddings), about 40 bytes a sample, and the rows of
duplicated keys; parquet column chunks are streamed and every DoFn works one batch at a
time, so workers stay bounded whatever the table sizes. Keep ``--num-shards 0`` (the
default) for full-size tables there: ``N > 0`` shuffles every written record.

Exit status of the command: 0 when every split that read sample rows wrote examples; 1 when
the build failed (e.g. :class:`beam.io.ParquetReadError`: a file that cannot be read, named
with its table) or when a split read rows but wrote no example (nothing joined: the counts
go to stderr, metadata.json and the rejected rows stay for inspection; ``--allow-empty``
makes this a warning with status 0); 2 for bad flags, missing inputs or an existing output.
Temporary ``beam-temp-*`` directories are removed after the run, also a failed one;
leftovers of a killed run count as existing output (``--overwrite`` removes them).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from beam import io as beam_io
from beam import transforms
from muse_tf import schema
from muse_tf.data import layout

#: Runner used when ``--runner`` is not given (in-process, needs no download).
DEFAULT_RUNNER = "FnApiRunner"

#: Sections of metadata.json: the splits, then the feature tables.
USER_TABLE_SECTION = {"train": "train_user_features", "test": "test_user_features"}
SAMPLE_STEM = {"train": beam_io.TRAIN_SAMPLES, "test": beam_io.TEST_SAMPLES}
USER_STEM = {"train": beam_io.TRAIN_USER_FEATURES, "test": beam_io.TEST_USER_FEATURES}
ITEM_SECTION = "item_features"
EMBEDDING_SECTION = "embeddings"

#: Option name (``--train-samples`` ...) -> table stem, for per-table glob overrides.
TABLE_FLAGS = {stem.replace("_", "-"): stem for stem in beam_io.TABLE_STEMS
               if stem != beam_io.EMBEDDINGS}
TABLE_FLAGS["embeddings"] = beam_io.EMBEDDINGS

# Rows per emitted parquet batch (and per plan chunk of a table read twice): user rows carry
# whole histories, so fewer of them.
_BATCH_ROWS = {beam_io.TRAIN_USER_FEATURES: 2048, beam_io.TEST_USER_FEATURES: 2048}
_DEFAULT_BATCH_ROWS = 65536


def _batch_rows(stem: str) -> int:
    return _BATCH_ROWS.get(stem, _DEFAULT_BATCH_ROWS)


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    """What to build, independent of the runner.

    Attributes:
      input_dir: directory of the TAOBAO-MM tables (local or ``gs://``).
      output_dir: the data directory to write (layout in :mod:`muse_tf.data.layout`).
      max_seq_len: histories longer than this keep their newest ``max_seq_len`` steps.
      min_count: vocabulary cut-off: ids counted fewer times are left out.
      num_shards: record files per split and for the embedding table; 0 lets the runner
        decide (fastest: no extra shuffle).
      tables: table stem -> glob patterns overriding the defaults under ``input_dir``.
      overwrite: delete this layout's files already in ``output_dir`` first (else an
        existing data directory is an error).
      compression_level: zlib level (0-9) of the gzip TFRecords.
      catalogue_buckets: id-hash buckets the tables are grouped in (items, embeddings,
        users, samples, vocabulary counts): the unit of parallel work of every join. The
        default suits ten rows and the full 35.4M-item catalogue alike.
    """

    input_dir: str
    output_dir: str
    max_seq_len: int = schema.MAX_HISTORY_LEN
    min_count: int = 1
    num_shards: int = 0
    tables: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    overwrite: bool = False
    compression_level: int = beam_io.DEFAULT_COMPRESSION_LEVEL
    catalogue_buckets: int = transforms.DEFAULT_BUCKETS

    def __post_init__(self) -> None:
        if not self.input_dir and len(self.tables) < len(beam_io.TABLE_STEMS):
            raise ValueError("--input is required (unless every table has its own flag)")
        if not self.output_dir:
            raise ValueError("--output is required")
        if self.max_seq_len < 1:
            raise ValueError(f"--max-seq-len must be >= 1, got {self.max_seq_len}")
        if self.min_count < 1:
            raise ValueError(f"--min-count must be >= 1, got {self.min_count}")
        if self.num_shards < 0:
            raise ValueError(f"--num-shards must be >= 0, got {self.num_shards}")
        if not 0 <= self.compression_level <= 9:
            raise ValueError(f"--compression-level must be in 0..9, got "
                             f"{self.compression_level}")
        if self.catalogue_buckets < 1:
            raise ValueError(f"--catalogue-buckets must be >= 1, got {self.catalogue_buckets}")
        unknown = sorted(set(self.tables) - set(beam_io.TABLE_STEMS))
        if unknown:
            raise ValueError(f"unknown tables {unknown}; known: {list(beam_io.TABLE_STEMS)}")

    def patterns(self, stem: str) -> tuple[str, ...]:
        """The globs of table ``stem``."""
        if stem in self.tables:
            return tuple(self.tables[stem])
        return beam_io.default_patterns(self.input_dir, stem)

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["tables"] = {stem: list(self.patterns(stem)) for stem in beam_io.TABLE_STEMS}
        return out


class BuildDatasetOptions(PipelineOptions):
    """Command-line options of :mod:`beam.build_dataset` (beside Beam's own)."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--input", dest="input_dir", default=None,
                            help="directory of the TAOBAO-MM parquet tables")
        parser.add_argument("--output", dest="output_dir", default=None,
                            help="data directory to write")
        parser.add_argument("--max-seq-len", dest="max_seq_len", type=int,
                            default=schema.MAX_HISTORY_LEN,
                            help="keep the newest N behaviours of longer histories")
        parser.add_argument("--min-count", dest="min_count", type=int, default=1,
                            help="vocabulary frequency cut-off (train split)")
        parser.add_argument("--num-shards", dest="num_shards", type=int, default=0,
                            help="record files per split (0: runner decides, fastest)")
        parser.add_argument("--compression-level", dest="compression_level", type=int,
                            default=beam_io.DEFAULT_COMPRESSION_LEVEL,
                            help="zlib level (0-9) of the gzip TFRecords")
        parser.add_argument("--catalogue-buckets", dest="catalogue_buckets", type=int,
                            default=transforms.DEFAULT_BUCKETS,
                            help="id-hash buckets of the joins, de-duplication and "
                                 "vocabulary counts (default %(default)s)")
        parser.add_argument("--overwrite", dest="overwrite", action="store_true",
                            default=False, help="replace an existing data directory's files "
                                                "(and remove beam-temp-* leftovers)")
        parser.add_argument("--allow-empty", "--allow_empty", dest="allow_empty",
                            action="store_true", default=False,
                            help="exit 0 even when a split reads rows but writes no example "
                                 "(nothing joined); the counts are still printed to stderr")
        for flag, stem in TABLE_FLAGS.items():
            parser.add_argument(
                f"--{flag}", dest=f"table_{stem}", default=None,
                help=f"comma-separated parquet globs of {stem} (default: INPUT/{stem}.parquet, "
                     f"INPUT/{stem}/*.parquet, INPUT/{stem}-*.parquet)")


def config_from_options(options: PipelineOptions) -> BuildConfig:
    """The :class:`BuildConfig` of parsed pipeline options."""
    view = options.view_as(BuildDatasetOptions)
    tables = {}
    for stem in beam_io.TABLE_STEMS:
        value = getattr(view, f"table_{stem}", None)
        if value:
            tables[stem] = tuple(p.strip() for p in value.split(",") if p.strip())
    return BuildConfig(input_dir=view.input_dir or "", output_dir=view.output_dir or "",
                       max_seq_len=view.max_seq_len, min_count=view.min_count,
                       num_shards=view.num_shards, tables=tables, overwrite=view.overwrite,
                       compression_level=view.compression_level,
                       catalogue_buckets=view.catalogue_buckets)


def _sections() -> dict[str, dict[str, Any]]:
    sections: dict[str, dict[str, Any]] = {}
    for split in layout.SPLITS:
        sections[split] = {"kind": "split", "output": transforms.EXAMPLES_WRITTEN,
                           "reasons": transforms.SAMPLE_REASONS, "records_dir": split,
                           "truncation": True}
    for split in layout.SPLITS:
        sections[USER_TABLE_SECTION[split]] = {"kind": "table", "output": transforms.ROWS_KEPT,
                                               "reasons": transforms.USER_TABLE_REASONS,
                                               "truncation": True}
    sections[ITEM_SECTION] = {"kind": "table", "output": transforms.ROWS_KEPT,
                              "reasons": transforms.ITEM_TABLE_REASONS}
    sections[EMBEDDING_SECTION] = {"kind": "table", "output": transforms.ROWS_WRITTEN,
                                   "reasons": transforms.EMBEDDING_TABLE_REASONS,
                                   "records_dir": layout.EMBEDDINGS_DIR,
                                   "extra": {"dim": schema.MM_EMBEDDING_DIM}}
    return sections


def _output_files(output_dir: str) -> list[str]:
    """Files of this layout already under ``output_dir``."""
    patterns = [layout.metadata_path(output_dir), layout.embeddings_pattern(output_dir)]
    patterns += [layout.split_pattern(output_dir, s) for s in layout.SPLITS]
    patterns += [layout.vocab_path(output_dir, v) for v in schema.vocabularies()]
    patterns += [layout.rejected_pattern(output_dir, s) for s in _sections()]
    return beam_io.match_files(patterns)


def _sink_dirs(output_dir: str) -> list[str]:
    """The directories :func:`build_pipeline`'s file sinks write ``part-*`` files into.

    Beam keeps each sink's shards in a ``beam-temp-*`` directory there until it finalises.
    """
    dirs = [FileSystems.join(output_dir, split) for split in layout.SPLITS]
    dirs.append(FileSystems.join(output_dir, layout.EMBEDDINGS_DIR))
    dirs += [FileSystems.join(output_dir, layout.REJECTED_DIR, s) for s in _sections()]
    return dirs


def _prepare_output(config: BuildConfig) -> None:
    existing = _output_files(config.output_dir)
    leftovers = beam_io.find_sink_temp_dirs(_sink_dirs(config.output_dir))
    if existing and not config.overwrite:
        raise FileExistsError(
            f"output directory {config.output_dir} already holds a data set ({len(existing)} "
            f"files, e.g. {existing[0]}); pass --overwrite or choose another --output")
    if leftovers and not config.overwrite:
        raise FileExistsError(
            f"output directory {config.output_dir} holds {len(leftovers)} temporary "
            f"directories of an unfinished build (e.g. {leftovers[0]}); pass --overwrite to "
            f"remove them or choose another --output")
    if existing:
        FileSystems.delete(existing)
    if leftovers:
        beam_io.remove_sink_temp_dirs(_sink_dirs(config.output_dir))


def remove_temp_dirs(output_dir: str) -> list[str]:
    """Removes the ``beam-temp-*`` directories of the sinks under ``output_dir``.

    Returns the removed directories. Sinks remove their own when they finalise; this is for
    what a failed run leaves behind.
    """
    return beam_io.remove_sink_temp_dirs(_sink_dirs(output_dir))


def _input_files(config: BuildConfig) -> dict[str, list[str]]:
    files = {}
    for stem in beam_io.TABLE_STEMS:
        patterns = config.patterns(stem)
        files[stem] = beam_io.match_files(patterns)
        if not files[stem]:
            raise FileNotFoundError(f"no parquet files for table {stem!r}: nothing matches "
                                    f"{list(patterns)}")
    return files


def build_pipeline(p: beam.Pipeline, options: PipelineOptions | BuildConfig
                   ) -> dict[str, beam.PCollection]:
    """Adds the dataset build to pipeline ``p``.

    Checks the inputs (every table must match at least one parquet file) and the output
    directory (must hold no data set unless ``overwrite``) while constructing.

    Args:
      p: the pipeline.
      options: a :class:`BuildConfig`, or pipeline options carrying
        :class:`BuildDatasetOptions`.

    Returns:
      Named PCollections: ``metadata`` (the metadata.json path, once written),
      ``<split>_files``, ``embedding_files``, ``rejected_files`` (file names),
      ``vocabularies`` (``(name, info)``) and ``counts`` (``((section, counter), n)``).
    """
    config = options if isinstance(options, BuildConfig) else config_from_options(options)
    files = _input_files(config)
    _prepare_output(config)
    out_dir = config.output_dir
    sections = _sections()
    buckets = config.catalogue_buckets
    counts: list[beam.PCollection] = []
    rejected: list[beam.PCollection] = []

    def read(stem: str, label: str, step: str, dofn: beam.DoFn, columns: Sequence[str],
             *tags: str, **side_inputs: Any):
        """Reads ``columns`` of table ``stem`` (stage ``label``) into ``dofn`` (stage
        ``step``); returns its outputs: ``main``, ``rejected``, ``counts`` and ``tags``."""
        batches = p | label >> beam_io.ReadParquetTable(
            stem, files[stem], columns, _batch_rows(stem))
        out = batches | step >> beam.ParDo(dofn, **side_inputs).with_outputs(
            transforms.REJECTED, transforms.COUNTS, *tags, main="main")
        counts.append(out[transforms.COUNTS])
        rejected.append(out[transforms.REJECTED])
        return out

    def reject_duplicates(label: str, rows: beam.PCollection, section: str, key_name: str,
                          stem: str) -> None:
        out = (rows
               | f"Group{label}Duplicates" >> beam.GroupByKey()
               | f"Reject{label}Duplicates" >> beam.ParDo(transforms.RejectDuplicates(
                   section, key_name, files[stem])).with_outputs(transforms.REJECTED,
                                                                 main="unused"))
        rejected.append(out[transforms.REJECTED])

    # Samples of both splits, as column blocks keyed by target-item bucket.
    samples = {}
    for split in layout.SPLITS:
        name, stem = split.capitalize(), SAMPLE_STEM[split]
        samples[split] = read(stem, f"Read{name}Samples", f"Parse{name}Samples",
                              transforms.ParseSamples(split, files[stem], buckets),
                              schema.columns(schema.SAMPLES)).main

    # Item features: the keys first (kept rows, duplicates, the rows samples refer to),
    # then the values of exactly those rows, joined with the samples per bucket.
    item_stem = beam_io.ITEM_FEATURES
    item_chunk = _batch_rows(item_stem)
    item_keys = read(item_stem, "ReadItemKeys", "ParseItemKeys",
                     transforms.ParseItemKeys(ITEM_SECTION, files[item_stem], buckets),
                     [schema.ITEM_ID.key]).main
    item_plan = ({"keys": item_keys, **samples}
                 | "GroupItemKeys" >> beam.CoGroupByKey()
                 | "ResolveItems" >> beam.ParDo(transforms.ResolveItems(
                     ITEM_SECTION, layout.SPLITS, item_chunk)).with_outputs(
                     transforms.COUNTS, main="plan"))
    counts.append(item_plan[transforms.COUNTS])
    item_values = read(
        item_stem, "ReadItemFeatures", "EmitItemValues",
        transforms.EmitItemValues(ITEM_SECTION, files[item_stem], item_chunk, buckets),
        schema.columns(schema.ITEM_FEATURES), transforms.DUPLICATES,
        plan=beam.pvalue.AsMultiMap(item_plan.plan))
    reject_duplicates("Item", item_values[transforms.DUPLICATES], ITEM_SECTION, "item_id",
                      item_stem)
    joined = ({"items": item_values.main, **samples}
              | "GroupItemValues" >> beam.CoGroupByKey()
              | "JoinItemFeatures" >> beam.ParDo(transforms.JoinItemValues(
                  layout.SPLITS, buckets)).with_outputs(*layout.SPLITS, main="unused"))

    # Per split, the user join: the keys first (kept rows, duplicates; samples rejected or
    # planned on their user's row), then the records straight from the planned user rows.
    results: dict[str, beam.PCollection] = {}
    written_files: list[beam.PCollection] = []
    vocab_partials = None
    sequence_keys = {f.key for f in schema.SEQUENCE_FEATURES}
    user_key_columns = [c for c in schema.columns(schema.USER_FEATURES)
                        if c == schema.USER_ID.key or c in sequence_keys]
    for split in layout.SPLITS:
        name = split.capitalize()
        user_section = USER_TABLE_SECTION[split]
        user_stem = USER_STEM[split]
        user_chunk = _batch_rows(user_stem)
        user_keys = read(user_stem, f"Read{name}UserKeys", f"Parse{name}UserKeys",
                         transforms.ParseUserKeys(user_section, files[user_stem],
                                                  config.max_seq_len, buckets),
                         user_key_columns).main
        plans = ({"users": user_keys, "samples": joined[split]}
                 | f"Group{name}ByUser" >> beam.CoGroupByKey()
                 | f"Resolve{name}Users" >> beam.ParDo(transforms.ResolveUsers(
                     split, user_section, files[SAMPLE_STEM[split]], user_chunk)).with_outputs(
                     transforms.REJECTED, transforms.COUNTS, transforms.DUPLICATE_PLAN,
                     main="plan"))
        counts.append(plans[transforms.COUNTS])
        rejected.append(plans[transforms.REJECTED])
        encoded = read(
            user_stem, f"Read{name}UserFeatures", f"Encode{name}Examples",
            transforms.EncodeUserRecords(split, user_section, files[user_stem],
                                         config.max_seq_len, user_chunk,
                                         count_vocabularies=(split == "train"),
                                         num_buckets=buckets),
            schema.columns(schema.USER_FEATURES), transforms.DUPLICATES, transforms.VOCAB,
            samples_plan=beam.pvalue.AsMultiMap(plans.plan),
            duplicate_plan=beam.pvalue.AsMultiMap(plans[transforms.DUPLICATE_PLAN]))
        reject_duplicates(f"{name}User", encoded[transforms.DUPLICATES], user_section,
                          "user_id", user_stem)
        if split == "train":
            vocab_partials = encoded[transforms.VOCAB]
        split_files = encoded.main | f"Write{name}Records" >> beam_io.WriteTFRecords(
            FileSystems.join(out_dir, split, "part"), config.num_shards,
            config.compression_level)
        results[f"{split}_files"] = split_files
        written_files.append(split_files)

    # Multimodal embedding table: the keys first (duplicates), then every kept row encoded
    # straight from its parquet batch.
    emb_stem = beam_io.EMBEDDINGS
    emb_chunk = _batch_rows(emb_stem)
    dim = schema.MM_EMBEDDING_DIM
    emb_keys = read(emb_stem, "ReadEmbeddingKeys", "ParseEmbeddingKeys",
                    transforms.ParseEmbeddingKeys(EMBEDDING_SECTION, files[emb_stem], dim,
                                                  buckets),
                    schema.columns(schema.EMBEDDINGS)).main
    emb_plan = (emb_keys
                | "GroupEmbeddingKeys" >> beam.GroupByKey()
                | "ResolveEmbeddings" >> beam.ParDo(transforms.ResolveEmbeddings(emb_chunk)))
    encoded_embeddings = read(
        emb_stem, "ReadEmbeddings", "EncodeEmbeddings",
        transforms.EncodeEmbeddings(EMBEDDING_SECTION, files[emb_stem], dim, emb_chunk),
        schema.columns(schema.EMBEDDINGS), transforms.DUPLICATES,
        plan=beam.pvalue.AsMultiMap(emb_plan))
    reject_duplicates("Embedding", encoded_embeddings[transforms.DUPLICATES],
                      EMBEDDING_SECTION, "item_id", emb_stem)
    embedding_files = encoded_embeddings.main | "WriteEmbeddings" >> beam_io.WriteTFRecords(
        FileSystems.join(out_dir, layout.EMBEDDINGS_DIR, "part"), config.num_shards,
        config.compression_level)
    results["embedding_files"] = embedding_files
    written_files.append(embedding_files)

    # Vocabularies over the written train records (every vocabulary, even if empty): partial
    # counts combined per (vocabulary, id bucket), no hot key; merged per vocabulary once.
    empty = (b"", b"")
    vocabularies = (
        [vocab_partials
         | "MergeVocabularyCounts" >> beam.CombinePerKey(transforms.MergeIdCounts())
         | "KeyByVocabulary" >> beam.Map(lambda kv: (kv[0][0], kv[1])),
         p | "VocabularyNames" >> beam.Create([(v, empty) for v in schema.vocabularies()])]
        | "FlattenVocabularyCounts" >> beam.Flatten()
        | "GroupVocabularyBuckets" >> beam.GroupByKey()
        | "WriteVocabularies" >> beam.ParDo(
            transforms.WriteVocabulary(out_dir, config.min_count)))
    results["vocabularies"] = vocabularies

    # Rejected rows, one directory per section; counted from what is written.
    section_names = list(sections)
    all_rejected = rejected | "FlattenRejected" >> beam.Flatten()
    by_section = all_rejected | "PartitionRejected" >> beam.Partition(
        lambda row, n: section_names.index(row["source"]), len(section_names))
    rejected_files = []
    for index, section in enumerate(section_names):
        label = "".join(part.capitalize() for part in section.split("_"))
        rejected_files.append(by_section[index] | f"WriteRejected{label}" >> beam_io.WriteJsonLines(
            FileSystems.join(out_dir, layout.REJECTED_DIR, section, "part")))
    results["rejected_files"] = rejected_files | "FlattenRejectedFiles" >> beam.Flatten()
    written_files.append(results["rejected_files"])
    counts.append(all_rejected | "CountRejected" >> beam.Map(
        lambda row: ((row["source"], transforms.REJECTED_PREFIX + row["reason"]), 1)))

    summed = (counts
              | "FlattenCounts" >> beam.Flatten()
              | "SumCounts" >> beam.CombinePerKey(sum))
    results["counts"] = summed
    all_files = written_files | "FlattenWrittenFiles" >> beam.Flatten()
    options_dict = config.as_dict()
    options_dict["input_files"] = {stem: len(paths) for stem, paths in files.items()}
    if isinstance(options, PipelineOptions):
        options_dict["runner"] = options.view_as(StandardOptions).runner
    results["metadata"] = (
        p
        | "MetadataTrigger" >> beam.Create([None])
        | "WriteMetadata" >> beam.ParDo(
            transforms.WriteMetadata(out_dir, sections, options_dict),
            counts=beam.pvalue.AsDict(summed),
            vocabularies=beam.pvalue.AsDict(vocabularies),
            files=beam.pvalue.AsList(all_files)))
    return results


def pipeline_options(argv: Sequence[str] | None = None) -> PipelineOptions:
    """Parses ``argv`` into pipeline options; the runner defaults to :data:`DEFAULT_RUNNER`."""
    options = PipelineOptions(list(argv) if argv is not None else sys.argv[1:])
    standard = options.view_as(StandardOptions)
    if not standard.runner:
        standard.runner = DEFAULT_RUNNER
    return options


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Builds the data set; returns the metadata (read back from ``metadata.json``).

    A split that writes no example is not an error here (see :func:`empty_splits`; the
    command line fails on it). After the run, also a failed one, no ``beam-temp-*``
    directory is left in the output (an interrupted run may leave some: ``--overwrite``
    removes them).

    Raises:
      FileNotFoundError: a table matches no file.
      FileExistsError: the output holds a data set or leftovers, without ``--overwrite``.
      beam.io.ParquetReadError: a file cannot be read (the message names table and file).
    """
    options = pipeline_options(argv)
    config = config_from_options(options)
    # Temp dirs are removed only once the job is over: not after a failure while building
    # the graph (leftovers without --overwrite are the user's), not on KeyboardInterrupt
    # and not with --no_wait_until_finish (a remote job may still be writing).
    waits = not options.view_as(StandardOptions).no_wait_until_finish
    built = False
    try:
        with beam.Pipeline(options=options) as p:
            build_pipeline(p, options)  # checks inputs and output before anything is written
            built = True
    except Exception:
        if built and waits:
            try:
                remove_temp_dirs(config.output_dir)
            except Exception as cleanup_error:  # never hide the build's own error
                logging.warning("could not remove beam-temp-* directories under %s: %s",
                                config.output_dir, cleanup_error)
        raise
    if waits:
        remove_temp_dirs(config.output_dir)
    with FileSystems.open(layout.metadata_path(config.output_dir)) as handle:
        return json.loads(handle.read().decode("utf-8"))


def empty_splits(metadata: Mapping[str, Any]) -> list[str]:
    """Splits that read sample rows but wrote no example (nothing joined)."""
    return [split for split, entry in metadata["splits"].items()
            if entry[transforms.ROWS_READ] > 0 and entry[transforms.EXAMPLES_WRITTEN] == 0]


#: Why samples are rejected, for the report of an empty split.
_REASON_HINTS = {
    transforms.NO_USER_FEATURES: f"their user ids ({schema.USER_ID.key!r}) are not in the "
                                 "split's user-feature table",
    transforms.NO_ITEM_FEATURES: f"their target item ids ({schema.ITEM_ID.key!r}) are not "
                                 "in the item-feature table",
    transforms.NULL_ID: "their user or item id is null or 0",
    transforms.BAD_LABEL: f"their label ({schema.LABEL.key!r}) is not one-hot [1,0] / [0,1]",
    transforms.HISTORY_LENGTH_MISMATCH: "their user's history columns differ in length",
}


def _count_line(name: str, entry: Mapping[str, Any], output: str) -> str:
    rejected = sorted(((r, n) for r, n in entry["rejected"].items() if n),
                      key=lambda kv: (-kv[1], kv[0]))
    reasons = f" ({', '.join(f'{r} {n}' for r, n in rejected)})" if rejected else ""
    return (f"  {name}: rows read {entry[transforms.ROWS_READ]}, {output.replace('_', ' ')} "
            f"{entry[output]}, rejected {entry['rows_rejected']}{reasons}")


def count_report(metadata: Mapping[str, Any]) -> list[str]:
    """Lines of counts: per split and per table, rows read, out and rejected by reason."""
    lines = [_count_line(split, entry, transforms.EXAMPLES_WRITTEN)
             for split, entry in metadata["splits"].items()]
    for name, entry in metadata["tables"].items():
        output = next(c for c in (transforms.ROWS_KEPT, transforms.ROWS_WRITTEN) if c in entry)
        lines.append(_count_line(name, entry, output))
    return lines


def empty_split_report(metadata: Mapping[str, Any], output_dir: str, allow_empty: bool
                       ) -> str:
    """The stderr message of a build whose splits read rows but wrote no example ("" if none).

    Also warns (one line) about a split that read no sample row at all.
    """
    empty = empty_splits(metadata)
    no_input = [s for s, e in metadata["splits"].items() if e[transforms.ROWS_READ] == 0]
    lines = [f"warning: split {s!r} read no sample rows (its sample files hold no rows)"
             for s in no_input]
    if not empty:
        return "\n".join(lines)
    kind = "warning" if allow_empty else "error"
    for split in empty:
        entry = metadata["splits"][split]
        lines.append(f"{kind}: split {split!r} read {entry[transforms.ROWS_READ]} sample rows "
                     f"but wrote 0 examples: nothing joined")
    lines.append("counts:")
    lines += count_report(metadata)
    for split in empty:
        entry = metadata["splits"][split]
        reasons = entry["rejected"]
        top = max(reasons, key=lambda r: reasons[r]) if reasons else None
        if top is not None and reasons[top] and top in _REASON_HINTS:
            lines.append(f"{split}: {reasons[top]} of {entry[transforms.ROWS_READ]} rows "
                         f"rejected as {top}: {_REASON_HINTS[top]}")
    lines.append("check that the sample and feature tables come from the same cut of the data "
                 "(tables cut independently, like the ten-row TAOBAO-MM sample files, do not "
                 "join)")
    lines.append(f"kept for inspection: {layout.metadata_path(output_dir)} and the rejected "
                 f"rows under {FileSystems.join(output_dir, layout.REJECTED_DIR)}/<section>/")
    if not allow_empty:
        lines.append("pass --allow-empty to accept empty splits (exit status 0)")
    return "\n".join(lines)


def _cli_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m beam.build_dataset",
        description="TAOBAO-MM parquet -> TFRecord SequenceExamples, vocabularies, the "
                    "multimodal embedding table and metadata.json (layout: "
                    "muse_tf.data.layout).",
        epilog="Beam options pass through, e.g. --runner DataflowRunner --project P "
               "--region R --temp_location gs://... --setup_file ./setup.py, or "
               "--direct_num_workers 2 --direct_running_mode multi_processing. "
               f"The runner defaults to {DEFAULT_RUNNER}.")
    BuildDatasetOptions._add_argparse_args(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: builds the data set and prints the per-split counts."""
    argv = list(argv) if argv is not None else sys.argv[1:]
    parser = _cli_parser()
    if "-h" in argv or "--help" in argv:
        parser.print_help()
        return 0
    logging.basicConfig(level=logging.WARNING)
    try:
        options = pipeline_options(argv)
        config = config_from_options(options)
    except ValueError as error:
        parser.error(str(error))
    allow_empty = options.view_as(BuildDatasetOptions).allow_empty
    try:
        metadata = run(argv)
    except (FileNotFoundError, FileExistsError) as error:  # inputs / output, before running
        parser.error(str(error))
    except beam_io.ParquetReadError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 1
    summary = {split: {k: v for k, v in entry.items() if k not in ("files", "rejected_files")}
               for split, entry in metadata["splits"].items()}
    print(json.dumps({"splits": summary, "totals": metadata["totals"]}, indent=2))
    report = empty_split_report(metadata, config.output_dir, allow_empty)
    if report:
        print(report, file=sys.stderr)
    return 1 if empty_splits(metadata) and not allow_empty else 0


if __name__ == "__main__":
    sys.exit(main())
