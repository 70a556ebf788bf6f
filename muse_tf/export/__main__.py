"""``python -m muse_tf.export --model-dir DIR [--version N] [--max-candidates C]``: export the
latest checkpoint of a ranking run as ``DIR/export/ranker/<version>/``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from muse_tf.export.ranking import (
    DEFAULT_MAX_CANDIDATES,
    export_ranking_model,
    restore_ranking_model,
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m muse_tf.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, help="a training run's model directory")
    parser.add_argument("--version", type=int, help="export version (default: next free)")
    parser.add_argument("--max-candidates", type=int, default=DEFAULT_MAX_CANDIDATES)
    args = parser.parse_args(argv)
    model, config = restore_ranking_model(args.model_dir)
    path = export_ranking_model(model, config, args.model_dir, args.version,
                                max_candidates=args.max_candidates)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
