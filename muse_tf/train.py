"""``python -m muse_tf.train``: train, evaluate and export one experiment.

With no arguments it builds the demo data set through the real path (synthetic TAOBAO-MM
generator -> Beam pipeline -> TFRecords, cached), trains ``muse``, evaluates on the test split,
prints a summary table and writes ``metrics.json``, the resolved config, TensorBoard logs,
checkpoints and a TF Serving export into the model directory. Retrieval experiments
(``miss_retrieval``, ``two_tower``) run the same way.

With ``--strategy multi_worker`` the same command runs on every worker (each with its
TF_CONFIG); the chief (worker 0, or the ``chief`` task) writes the model directory and prints
the table, every other worker says which task it was and where the chief writes.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from muse_tf import config as config_lib
from muse_tf import console
from muse_tf.data import layout

if TYPE_CHECKING:
    from muse_tf.data.data_dir import DataDir

DEFAULT_RUNS_DIR = "runs"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m muse_tf.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="muse",
                        help=f"registered experiment, one of {sorted(config_lib.experiments())}")
    parser.add_argument("--config", help="YAML file overriding config fields")
    parser.add_argument("--data", help="a Beam output directory (default: the demo data set)")
    parser.add_argument("--model-dir", help="where to write checkpoints, logs, metrics, export "
                        f"(default: {DEFAULT_RUNS_DIR}/<experiment>)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set model.top_k=20")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--strategy", choices=["default", "mirrored", "multi_worker"])
    parser.add_argument("--list", action="store_true", help="list experiments and exit")
    console.add_verbose_flag(parser)
    return parser


def open_data_or_exit(parser: argparse.ArgumentParser, path: str | None) -> DataDir:
    """The data directory at ``path`` (the demo data set, built if needed, when empty),
    checked before anything is built or trained
    (:meth:`~muse_tf.data.data_dir.DataDir.check_for_training`: ``metadata.json`` readable,
    a train split with examples, every shard it lists there); a problem is a one-line
    ``parser.error`` (exit code 2) naming the directory."""
    from muse_tf.data.data_dir import DataDir

    if not path:
        from muse_tf import demo

        path = demo.ensure_demo_data()
    try:
        data = DataDir.open(path)
        data.check_for_training()
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
        raise  # parser.error exits; this line is never reached
    return data


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    console.configure(args.verbose)
    if args.list:
        for name, description in sorted(config_lib.experiments().items()):
            print(f"{name:28s} {description}")
        return 0
    assignments = list(args.set)
    if args.epochs is not None:
        assignments.append(f"train.epochs={args.epochs}")
    if args.batch_size is not None:
        assignments.append(f"data.batch_size={args.batch_size}")
    if args.strategy is not None:
        assignments.append(f"train.strategy={args.strategy}")
    config = console.resolve_or_exit(parser, args.experiment, args.config, assignments)
    data = open_data_or_exit(parser, args.data or config.data.data_dir)
    # TensorFlow is imported after console.configure, so its C++ log level applies.
    from muse_tf.data import reader
    from muse_tf.training.experiment import run_experiment, summary_table

    model_dir = args.model_dir or os.path.join(DEFAULT_RUNS_DIR, config.name)
    # TensorFlow's read errors do not say which shard is corrupt: find and name it.
    with reader.naming_unreadable_shards(data, *layout.SPLITS):
        result = run_experiment(config, model_dir, data)
    worker = result.get("worker")
    if worker is not None and not worker["chief"]:
        # This worker's figures equal the chief's; the model directory is the chief's.
        print(f"\n{worker['task']} of {worker['num_workers']} workers: done (trained, "
              f"evaluated and exported in step with the chief, {worker['chief_task']}; "
              f"this worker's scratch copy is removed).\nThe chief writes metrics.json, "
              f"the checkpoints and the export into: {model_dir}")
        return 0
    print()
    print(summary_table(result))
    print(f"\ndata: {result['data_dir']}\nmodel dir: {model_dir}")
    for name, path in sorted((result.get("export_dirs") or {}).items()):
        print(f"export ({name}): {path}")
    if result.get("export_dir"):
        print(f"export: {result['export_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
