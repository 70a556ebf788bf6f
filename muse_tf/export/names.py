"""Where exports are written and the names TF Serving serves them under, defined once.

A training run writes its exports under ``<model dir>/export/``:

* ranking: ``export/ranker/<version>/``, served as :data:`RANKING_MODEL_NAME`;
* retrieval: ``export/<model name>/<version>/`` — the directory's name is the served name
  (:data:`MISS_MODEL_NAME`, :data:`BRUTE_FORCE_MODEL_NAME`, :data:`SCANN_MODEL_NAME`).

``serving/`` (configs, client, pipeline) imports these names instead of repeating them.
"""

from __future__ import annotations

import os

#: Sub-directory of a run's model directory that holds its exports.
EXPORT_DIR = "export"
#: Directory of the ranking export under :data:`EXPORT_DIR` (its versions are beneath it).
RANKING_EXPORT_NAME = "ranker"
#: ``export/ranker``: the base path of the ranking model, relative to the model directory.
RANKING_EXPORT_SUBDIR = os.path.join(EXPORT_DIR, RANKING_EXPORT_NAME)

#: Served model name of the ranking export (``model_spec.name`` in requests).
RANKING_MODEL_NAME = "muse_ranking"
#: Served model names of the retrieval exports (also their directories under ``export/``).
MISS_MODEL_NAME = "miss_retrieval"
BRUTE_FORCE_MODEL_NAME = "two_tower_brute_force"
SCANN_MODEL_NAME = "two_tower_scann"
RETRIEVAL_MODEL_NAMES = (MISS_MODEL_NAME, BRUTE_FORCE_MODEL_NAME, SCANN_MODEL_NAME)


def ranking_base_path(model_dir: str) -> str:
    """``<model_dir>/export/ranker``: the directory of the ranking export's versions."""
    return os.path.join(model_dir, RANKING_EXPORT_SUBDIR)


def retrieval_base_path(model_dir: str, model_name: str) -> str:
    """``<model_dir>/export/<model_name>``: the directory of a retrieval export's versions."""
    if model_name not in RETRIEVAL_MODEL_NAMES:
        raise ValueError(f"unknown retrieval model {model_name!r}; known: "
                         f"{list(RETRIEVAL_MODEL_NAMES)}")
    return os.path.join(model_dir, EXPORT_DIR, model_name)
