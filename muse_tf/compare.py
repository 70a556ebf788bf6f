"""``python -m muse_tf.compare``: paper-style comparison tables on one Beam output directory.

::

    python -m muse_tf.compare compare --data DIR [--experiments muse,din,...]   # Table 4, Fig. 6
    python -m muse_tf.compare ablation table1|table2|table3 --data DIR          # Tables 1-3
    python -m muse_tf.compare retrieval --data DIR                              # MISS vs two-tower

Each command trains every experiment it names into ``OUT/<experiment>``, prints one markdown
table and writes ``results.md`` and ``results.json`` (plus the Fig. 6 group plots for
``compare``/``ablation``) into ``OUT``. Defaults of ``--out``: ``runs/compare``,
``runs/ablation_<table>`` and ``runs/retrieval_compare``, so no command overwrites another.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from muse_tf import config as config_lib
from muse_tf import console

#: MUSE, the official-code-style baselines (MUSE's ESU over each search) and the original
#: papers' baselines (ID target attention, no SimTier).
DEFAULT_EXPERIMENTS = ("muse,din,sim_hard,sim_soft,twin,miss,"
                       "din_ta,sim_hard_ta,sim_soft_ta,twin_ta,miss_ta")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m muse_tf.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    cmp_parser = sub.add_parser("compare", help="main models and baselines")
    cmp_parser.add_argument("--experiments", default=DEFAULT_EXPERIMENTS)
    abl_parser = sub.add_parser("ablation", help="the paper's ablation tables")
    abl_parser.add_argument("table", choices=sorted(config_lib.ABLATIONS))
    ret_parser = sub.add_parser("retrieval", help="MISS tree vs two-tower (brute force, "
                                "ScaNN) vs popularity: recall@N and queries/s")
    for p in (cmp_parser, abl_parser, ret_parser):
        p.add_argument("--data", required=True, help="a Beam output directory")
        p.add_argument("--out", help="output directory (default: see above)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field of every experiment")
        console.add_verbose_flag(p)
    for p in (cmp_parser, abl_parser):
        p.add_argument("--baseline", default="din")
    return parser


def default_out(args: argparse.Namespace) -> str:
    if args.command == "ablation":
        return f"runs/ablation_{args.table}"
    return "runs/compare" if args.command == "compare" else "runs/retrieval_compare"


def experiment_names(args: argparse.Namespace) -> list[str]:
    if args.command == "compare":
        return [n for n in args.experiments.split(",") if n]
    if args.command == "ablation":
        return list(config_lib.ABLATIONS[args.table])
    return ["miss_retrieval", "two_tower"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    console.configure(args.verbose)
    out = args.out or default_out(args)
    names = experiment_names(args)
    for name in names:  # a bad name or --set fails here, before any training
        console.resolve_or_exit(parser, name, None, args.set)
    from muse_tf.training import comparison

    if args.command == "retrieval":
        table = comparison.retrieval_compare(args.data, out, args.set)
    else:
        title = "Main comparison" if args.command == "compare" else f"Ablation {args.table}"
        table = comparison.compare(args.data, names, out, args.baseline, args.set, title)
    print(table)
    print(f"\nresults in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
