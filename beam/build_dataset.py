"""TAOBAO-MM parquet -> TFRecord SequenceExamples, vocabularies, embedding table, metadata.

Usage::

    python -m beam.build_dataset --input DIR --output DIR [--max-seq-len N] [--min-count K]
        [--num-shards N] [--compression-level L] [--overwrite] [--allow-empty]
        [--train-samples GLOBS] [--test-samples GLOBS] [--train-user-features GLOBS]
        [--test-user-features GLOBS] [--item-features GLOBS] [--embeddings GLOBS]
        [Beam options]

Runs on FnApiRunner (in-process) unless ``--runner`` says otherwise; e.g.
``--direct_num_workers 2 --direct_running_mode multi_processing`` runs it on two local
worker processes, and ``--runner DataflowRunner --project P --region R --temp_location
gs://... --setup_file ./setup.py`` on Dataflow (input/output may then be ``gs://`` paths).

Graph (every stage named)::

    {train,test}_samples --Parse--> (item_id, sample) --+
    item_features ---------Parse--> (item_id, item) ----+--JoinItemFeatures--> per split:
    {split}_user_features --Parse--> (user_id, user) ---+--GroupByUser--EncodeUserExamples-->
        {split}/part-*.tfrecord.gz   (+ train vocabulary counts -> vocab/<name>.tsv)
    scl_embedding_int8_p90 --Parse--GroupByItem--EncodeEmbeddings--> embeddings/part-*
    every stage --rejected--> rejected/<section>/part-*.jsonl
    every stage --counts--> metadata.json (checks rows read = written + rejected)

The item join runs first on the small sample rows; a sample without item features is
carried to the user join and only rejected there, so that "no user features" takes
precedence (the demo files' samples join with neither table). Only user histories (as
int64 bytes) and samples cross the user shuffle; records are built and written in the
same fused stage, one user's records next to each other.

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

# Rows per emitted parquet batch: user rows carry whole histories, so fewer of them.
_BATCH_ROWS = {beam_io.TRAIN_USER_FEATURES: 2048, beam_io.TEST_USER_FEATURES: 2048}
_DEFAULT_BATCH_ROWS = 65536


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
    """

    input_dir: str
    output_dir: str
    max_seq_len: int = schema.MAX_HISTORY_LEN
    min_count: int = 1
    num_shards: int = 0
    tables: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    overwrite: bool = False
    compression_level: int = beam_io.DEFAULT_COMPRESSION_LEVEL

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
                       compression_level=view.compression_level)


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
    counts: list[beam.PCollection] = []
    rejected: list[beam.PCollection] = []

    def read(stem: str, label: str, parser: beam.DoFn, table: str):
        batches = p | f"Read{label}" >> beam_io.ReadParquetTable(
            stem, files[stem], schema.columns(table), _BATCH_ROWS.get(stem, _DEFAULT_BATCH_ROWS))
        parsed = batches | f"Parse{label}" >> beam.ParDo(parser).with_outputs(
            transforms.REJECTED, transforms.COUNTS, main="rows")
        counts.append(parsed[transforms.COUNTS])
        rejected.append(parsed[transforms.REJECTED])
        return parsed

    # Samples of both splits, keyed by item id.
    samples = []
    for split in layout.SPLITS:
        name = split.capitalize()
        samples.append(read(SAMPLE_STEM[split], f"{name}Samples", transforms.ParseSamples(split),
                            schema.SAMPLES).rows)
    all_samples = samples | "FlattenSamples" >> beam.Flatten()
    items = read(beam_io.ITEM_FEATURES, "ItemFeatures", transforms.ParseItemFeatures(ITEM_SECTION),
                 schema.ITEM_FEATURES).rows
    joined = ({"samples": all_samples, "items": items}
              | "GroupByItem" >> beam.CoGroupByKey()
              | "JoinItemFeatures" >> beam.ParDo(
                  transforms.JoinItemFeatures(ITEM_SECTION)).with_outputs(
                  transforms.REJECTED, transforms.COUNTS, *layout.SPLITS, main="unused"))
    counts.append(joined[transforms.COUNTS])
    rejected.append(joined[transforms.REJECTED])

    results: dict[str, beam.PCollection] = {}
    written_files: list[beam.PCollection] = []
    vocab_partials = None
    for split in layout.SPLITS:
        name = split.capitalize()
        user_section = USER_TABLE_SECTION[split]
        users = read(USER_STEM[split], f"{name}UserFeatures",
                     transforms.ParseUserFeatures(user_section, config.max_seq_len),
                     schema.USER_FEATURES).rows
        encoded = ({"samples": joined[split], "users": users}
                   | f"Group{name}ByUser" >> beam.CoGroupByKey()
                   | f"Encode{name}Examples" >> beam.ParDo(transforms.EncodeUserExamples(
                       split, user_section, config.max_seq_len,
                       count_vocabularies=(split == "train"))).with_outputs(
                       transforms.REJECTED, transforms.COUNTS, transforms.VOCAB, main="records"))
        counts.append(encoded[transforms.COUNTS])
        rejected.append(encoded[transforms.REJECTED])
        if split == "train":
            vocab_partials = encoded[transforms.VOCAB]
        split_files = encoded.records | f"Write{name}Records" >> beam_io.WriteTFRecords(
            FileSystems.join(out_dir, split, "part"), config.num_shards,
            config.compression_level)
        results[f"{split}_files"] = split_files
        written_files.append(split_files)

    # Multimodal embedding table.
    embeddings = read(beam_io.EMBEDDINGS, "Embeddings",
                      transforms.ParseEmbeddings(EMBEDDING_SECTION, schema.MM_EMBEDDING_DIM),
                      schema.EMBEDDINGS).rows
    encoded_embeddings = (embeddings
                          | "GroupEmbeddingsByItem" >> beam.GroupByKey()
                          | "EncodeEmbeddings" >> beam.ParDo(
                              transforms.EncodeEmbeddings(EMBEDDING_SECTION)).with_outputs(
                              transforms.REJECTED, transforms.COUNTS, main="records"))
    counts.append(encoded_embeddings[transforms.COUNTS])
    rejected.append(encoded_embeddings[transforms.REJECTED])
    embedding_files = encoded_embeddings.records | "WriteEmbeddings" >> beam_io.WriteTFRecords(
        FileSystems.join(out_dir, layout.EMBEDDINGS_DIR, "part"), config.num_shards,
        config.compression_level)
    results["embedding_files"] = embedding_files
    written_files.append(embedding_files)

    # Vocabularies over the written train records (every vocabulary, even if empty).
    empty = (b"", b"")
    vocabularies = (
        [vocab_partials,
         p | "VocabularyNames" >> beam.Create([(v, empty) for v in schema.vocabularies()])]
        | "FlattenVocabularyCounts" >> beam.Flatten()
        | "MergeVocabularyCounts" >> beam.CombinePerKey(transforms.MergeIdCounts())
        | "WriteVocabularies" >> beam.ParDo(transforms.WriteVocabulary(out_dir, config.min_count)))
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
