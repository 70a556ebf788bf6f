"""Retrieve, then rank, over gRPC: one user's raw features -> a ranked candidate list.

1. ``Predict`` on a retrieval export (``miss_retrieval``, ``two_tower_brute_force`` or
   ``two_tower_scann``): user features + lifelong history -> item ids and retrieval scores;
2. the retrieved items' attributes come from an item catalogue (the TAOBAO-MM
   ``item_features`` table: ``205`` -> ``206``, ``213``, ``214``);
3. ``Predict`` on the ranking export (``muse_ranking``): the same user block + the best
   retrieved items as candidates (at most the ranker's ``C``) -> click probabilities.

Both requests are built by :mod:`muse_tf.export.requests` for the served signatures' sizes.
Both models are served by one server (stock TF Serving or ``serving.server`` with a
``models.config`` naming both, e.g. ``serving/models.pipeline.config``)::

    python -m serving.pipeline --server localhost:8500 --request request.json \\
        --items "RAW/item_features*.parquet" [--retrieval-model miss_retrieval]

``request.json`` is a raw retrieval request (:data:`muse_tf.export.requests.RAW_REQUEST_KEYS`
without ``candidates``): ``user`` (a mapping of user features), ``history_items`` and
``history_categories``; the output lists items with their retrieval and ranking scores, best
ranking score first.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import sys
from collections.abc import Mapping, Sequence

import numpy as np

from muse_tf import schema
from muse_tf.export import requests
from muse_tf.export.names import MISS_MODEL_NAME, RANKING_MODEL_NAME
from muse_tf.export.signatures import ITEM_IDS, SCORES
from serving import ranking
from serving.client import PredictionClient, run_command
from serving.signatures import InputError


@dataclasses.dataclass(frozen=True)
class Ranked:
    item_id: int
    retrieval_score: float
    ranking_score: float


def load_item_catalogue(pattern: str) -> dict[int, dict[str, int]]:
    """``item id -> {item_category, item_attr_1, item_attr_2}`` from item_features parquet."""
    import pyarrow.parquet as pq

    files = sorted(glob.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no item_features parquet file matches {pattern!r}")
    columns = [schema.ITEM_ID.key] + [f.key for f in schema.ITEM_SIDE_FEATURES
                                      if f is not schema.ITEM_ID]
    catalogue: dict[int, dict[str, int]] = {}
    for path in files:
        table = pq.read_table(path, columns=columns).to_pydict()
        for i, item in enumerate(table[schema.ITEM_ID.key]):
            if item is None:
                continue
            catalogue[int(item)] = {f.name: int(table[f.key][i] or 0)
                                    for f in schema.ITEM_SIDE_FEATURES if f is not schema.ITEM_ID}
    return catalogue


def retrieve(client: PredictionClient, user: Mapping[str, int], history_items: Sequence[int],
             history_categories: Sequence[int],
             model: str = MISS_MODEL_NAME) -> tuple[np.ndarray, np.ndarray]:
    """Item ids and scores from a retrieval export (padding slots, id 0, dropped)."""
    layout = client.request_layout(model)
    if layout.kind != requests.RETRIEVAL:
        raise InputError(f"model {model!r} serves a {layout.kind} signature, not a retrieval "
                         "signature")
    outputs = client.predict(model, layout.build(user, history_items, history_categories))
    ids, scores = np.asarray(outputs[ITEM_IDS])[0], np.asarray(outputs[SCORES])[0]
    keep = ids != 0
    return ids[keep], scores[keep]


def retrieve_and_rank(client: PredictionClient, user: Mapping[str, int],
                      history_items: Sequence[int], history_categories: Sequence[int],
                      catalogue: Mapping[int, Mapping[str, int]],
                      retrieval_model: str = MISS_MODEL_NAME,
                      ranking_model: str = RANKING_MODEL_NAME) -> list[Ranked]:
    """Retrieve, rank the best ``C`` retrieved items, return them best ranking score first.

    Retrieved items missing from ``catalogue`` are ranked with attributes 0 ("missing").
    """
    ids, retrieval_scores = retrieve(client, user, history_items, history_categories,
                                     retrieval_model)
    max_candidates = ranking.ranking_layout(client, ranking_model).max_candidates
    ids, retrieval_scores = ids[:max_candidates], retrieval_scores[:max_candidates]
    if len(ids) == 0:
        return []
    candidates = [{schema.ITEM_ID.name: int(i), **catalogue.get(int(i), {})} for i in ids]
    scores = ranking.rank(client, user, history_items, history_categories, candidates,
                          model=ranking_model)
    out = [Ranked(int(i), float(r), float(s))
           for i, r, s in zip(ids, retrieval_scores, scores, strict=True)]
    return sorted(out, key=lambda x: -x.ranking_score)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", default="localhost:8500")
    parser.add_argument("--request", required=True)
    parser.add_argument("--items", required=True, help="item_features parquet file or glob")
    parser.add_argument("--retrieval-model", default=MISS_MODEL_NAME)
    parser.add_argument("--ranking-model", default=RANKING_MODEL_NAME)
    args = parser.parse_args(argv)

    def retrieve() -> None:
        with open(args.request) as f:
            user, items, categories, candidates = requests.raw_request_fields(json.load(f))
        if candidates is not None:
            raise ValueError(f"{args.request}: the pipeline retrieves its candidates; drop "
                             f"{requests.CANDIDATES!r}")
        catalogue = load_item_catalogue(args.items)
        with PredictionClient(args.server) as client:
            ranked = retrieve_and_rank(client, user, items, categories, catalogue,
                                       args.retrieval_model, args.ranking_model)
        print(json.dumps([dataclasses.asdict(r) for r in ranked], indent=1))

    return run_command("serving.pipeline", retrieve)


if __name__ == "__main__":
    sys.exit(main())
