"""Pieces the benchmark modules share: the markdown table printer and a ranking request."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from muse_tf import schema

__all__ = ["print_table", "ranking_request"]


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n## {title}")
    if not rows:
        return
    keys = list(dict.fromkeys(key for row in rows for key in row))  # every row's, in order
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        cells = [_cell(row.get(key, "")) for key in keys]
        print("| " + " | ".join(cells) + " |")
    sys.stdout.flush()


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def ranking_request(examples: dict[str, np.ndarray], seq_len: int,
                    candidates: int) -> dict[str, np.ndarray]:
    """One user (row 0) whose history is its demo history repeated to ``seq_len``, and
    ``candidates`` targets of other examples, built by the serving request builder."""
    from muse_tf.export import requests

    length = max(1, int(examples[schema.HISTORY_LENGTH][0]))
    user = {f.name: int(examples[f.name][0]) for f in schema.USER_SIDE_FEATURES}
    history = {f.name: np.resize(examples[f.name][0, :length], seq_len)
               for f in schema.SEQUENCE_FEATURES}
    rows = np.arange(candidates) % len(examples[schema.ITEM_ID.name])
    picked = [{f.name: int(examples[f.name][r]) for f in schema.ITEM_SIDE_FEATURES}
              for r in rows]
    return requests.ranking_request(user, history[schema.HISTORY_ITEM_ID.name],
                                    history[schema.HISTORY_CATEGORY.name], picked,
                                    max_seq_len=seq_len, max_candidates=candidates)
