"""The retrieval runs learn: on data with a planted cluster signal (:mod:`.clustered_data`),
MISS with a beam far narrower than the tree, and the two-tower, retrieve far more of the
clicked test items than popularity does, and the untrained MISS scorer does not."""

from __future__ import annotations

import numpy as np
import pytest

from muse_tf import config as config_lib
from muse_tf import schema
from muse_tf.training import retrieval

from .clustered_data import write_clustered_data_dir

#: 512 items in 16 clusters of 32: the tree has depth 9 and 256 nodes above the leaves; a
#: beam of 25 keeps under a tenth of them and returns 50 of the 512 items.
SETTINGS = ["data.batch_size=64", "model.top_k=8", "model.id_embedding_dim=8",
            "model.tower_units=[32]", "model.tower_activation=prelu", "model.short_term_len=5",
            "model.head_dim=8", "retrieval.beam_width=25", "retrieval.top_n=50",
            "retrieval.tower_dim=16", "train.embedding_learning_rate=0.01",
            "train.dense_learning_rate=0.003", "train.verbose=0", "train.export=false"]


@pytest.fixture(scope="module")
def clustered(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("clustered_data"))
    return path, write_clustered_data_dir(path, seed=0)


def run(name: str, epochs: int, data_dir: str, model_dir) -> dict:
    config = config_lib.resolve(name, assignments=[*SETTINGS, f"train.epochs={epochs}"])
    return retrieval.run_retrieval(config, str(model_dir), data_dir)


@pytest.mark.slow
def test_trained_miss_and_two_tower_beat_popularity_and_the_untrained_scorer(clustered,
                                                                           tmp_path):
    data_dir, world = clustered
    untrained = run("miss_retrieval", 0, data_dir, tmp_path / "untrained")
    trained = run("miss_retrieval", 2, data_dir, tmp_path / "miss")
    two_tower = run("two_tower", 2, data_dir, tmp_path / "two_tower")

    test = trained["test"]
    assert trained["index"]["depth"] == 9 and test["k"] == 50
    assert trained["index"]["start_level"] == 5  # the first level with more than 25 nodes
    assert test["recall@100"] is None  # 50 of 512 items retrieved: a pruned search
    popularity = test["popularity"]["recall@50"]
    assert popularity < 0.2  # uniform popularity: about 50 / 512
    # Measured: trained 1.0, untrained 0.10, popularity 0.11, two-tower 1.0.
    assert test["recall@50"] > popularity + 0.5
    assert untrained["test"]["recall@50"] < popularity + 0.1
    assert test["recall@50"] > untrained["test"]["recall@50"] + 0.5
    assert two_tower["test"]["recall@50"] > popularity + 0.5
    # The per-level recall of the trained beam stays high down the tree.
    assert min(test["per_level_recall"].values()) > 0.8

    # Exact bookkeeping: every train click counted; those on items without a vector skipped.
    clicks = [c[schema.ITEM_ID.name] for c, _ in world["records"]["train"]
              if c[schema.LABEL.name]]
    not_in_index = int(np.sum(~np.isin(clicks, world["embedded"])))
    assert not_in_index > 0
    for result in (untrained, trained, two_tower):
        assert result["train"]["clicks_seen"] == len(clicks)
        assert result["train"]["clicks_not_in_index"] == not_in_index
    steps = (len(clicks) - not_in_index) // 64
    assert trained["train_steps_per_epoch"] == steps
    assert trained["train"]["train_steps"] == 2 * steps
    assert untrained["train_loss"] == [] and untrained["train"]["train_steps"] == 0
    # Mean losses (per (user, node) pair; per query), falling from epoch to epoch.
    assert 0 < trained["train_loss"][1] < trained["train_loss"][0] < 1.0
    assert 0 < two_tower["train_loss"][1] < two_tower["train_loss"][0] < np.log(64) + 1
