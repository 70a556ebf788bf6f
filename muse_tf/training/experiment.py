"""One entry for any registered experiment: ranking or retrieval, by ``config.task``."""

from __future__ import annotations

from typing import Any

from muse_tf import config as config_lib
from muse_tf.data.data_dir import DataDir
from muse_tf.training import ranking, retrieval


def run_experiment(config: config_lib.ExperimentConfig, model_dir: str,
                   data: str | DataDir | None = None) -> dict[str, Any]:
    """Train, evaluate and (with ``train.export``) export ``config``; returns its metrics."""
    config.validate()
    if config.task == "ranking":
        return ranking.run_ranking(config, model_dir, data)
    return retrieval.run_retrieval(config, model_dir, data)


def summary_table(result: dict[str, Any]) -> str:
    """The table a CLI prints at the end of a run of either task."""
    if result.get("task", "ranking") == "ranking":
        return ranking.summary_table([result])
    return retrieval.summary_table(result)
