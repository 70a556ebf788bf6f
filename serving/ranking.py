"""Ranking requests: one user's raw features + a candidate list -> scores, over gRPC.

The ranking export's inputs (:mod:`muse_tf.export.ranking`) are built by
:mod:`muse_tf.export.requests` from raw ids as a production log has them, fitted to the
served signature's sizes (read once from ``GetModelMetadata``): the history right-padded (or
cut to its newest ``L`` behaviours), the candidates right-padded to ``C``. The scores of the
real candidates are returned (the export zeroes padded slots)::

    with PredictionClient("localhost:8500") as client:
        scores = rank(client, user={"user_id": 42, "user_attr_1": 7, ...},
                      history_items=[...], history_categories=[...],
                      candidates=[{"item_id": 5, "item_category": 3, ...}, ...])

Command line: ``python -m serving.ranking --server HOST:PORT --request request.json`` where
the JSON object is a raw ranking request (:data:`muse_tf.export.requests.RAW_REQUEST_KEYS`):
``user`` (a mapping), ``history_items``, ``history_categories`` and ``candidates`` (a list of
mappings); prints one score per candidate.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from muse_tf import schema
from muse_tf.export import requests
from muse_tf.export.names import RANKING_MODEL_NAME
from muse_tf.export.signatures import SCORES
from serving.client import PredictionClient, run_command
from serving.signatures import InputError


def ranking_layout(client: PredictionClient, model: str = RANKING_MODEL_NAME,
                   version: int | None = None) -> requests.RequestLayout:
    """The served ranking signature's layout (``max_seq_len``, ``max_candidates``)."""
    layout = client.request_layout(model, version=version)
    if layout.kind != requests.RANKING:
        raise InputError(f"model {model!r} serves a {layout.kind} signature, not the ranking "
                         "signature")
    return layout


def _scores(client: PredictionClient, inputs: Mapping[str, np.ndarray], model: str,
            version: int | None) -> np.ndarray:
    outputs = client.predict(model, inputs, version=version)
    count = int(inputs[schema.NUM_CANDIDATES][0])
    return np.asarray(outputs[SCORES])[0, :count]


def rank(client: PredictionClient, user: Mapping[str, int], history_items: Sequence[int],
         history_categories: Sequence[int], candidates: Sequence[Mapping[str, int]],
         model: str = RANKING_MODEL_NAME, version: int | None = None) -> np.ndarray:
    """Click probabilities of ``candidates`` (float32 ``[len(candidates)]``).

    Raises ``ValueError`` naming the field for a request that does not fit the signature
    (more candidates than its ``C``, a candidate without ``item_id``, unknown features, ...).
    """
    layout = ranking_layout(client, model, version)
    inputs = layout.build(user, history_items, history_categories, candidates)
    return _scores(client, inputs, model, version)


def rank_raw(client: PredictionClient, raw: Mapping[str, Any], model: str = RANKING_MODEL_NAME,
             version: int | None = None) -> np.ndarray:
    """:func:`rank` for a raw request object (the ``--request`` JSON)."""
    inputs = ranking_layout(client, model, version).from_raw(raw)
    return _scores(client, inputs, model, version)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.ranking", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", default="localhost:8500")
    parser.add_argument("--model", default=RANKING_MODEL_NAME)
    parser.add_argument("--request", required=True, help="JSON file (see the module doc)")
    args = parser.parse_args(argv)

    def score() -> None:
        with open(args.request) as f:
            raw = json.load(f)
        with PredictionClient(args.server) as client:
            scores = rank_raw(client, raw, model=args.model)
        print(json.dumps({SCORES: [float(s) for s in scores]}))

    return run_command("serving.ranking", score)


if __name__ == "__main__":
    sys.exit(main())
