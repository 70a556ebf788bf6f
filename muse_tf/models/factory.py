"""Builds the models of an experiment from its config and a Beam output directory.

Every model gets the same item-side tables: model-side vocabularies written into
``MODEL_DIR/vocab`` (they travel with a SavedModel as assets) and the frozen, L2-normalised
multimodal table indexed by item-vocabulary row.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from muse_tf import schema
from muse_tf.config import ExperimentConfig
from muse_tf.data.data_dir import DataDir
from muse_tf.embeddings import Vocabulary, build_vocabularies, normalised_mm_matrix
from muse_tf.embeddings.vocabulary import read_vocabulary_ids
from muse_tf.models.ranking import RankingModel

#: Sub-directory of a model directory holding the model-side vocabularies.
MODEL_VOCAB_DIR = "vocab"


@dataclasses.dataclass(frozen=True)
class ItemTables:
    """What every model of a run reads about items.

    Attributes:
      vocabularies: model-side vocabularies (the item one covers every item of the
        multimodal table, see :func:`muse_tf.embeddings.build_vocabularies`).
      mm_table: ``[item vocabulary rows, D]`` L2-normalised multimodal table.
      mm_ids: int64 ``[N]`` raw item ids of the data directory's multimodal table.
      mm_vectors: int8 ``[N, D]`` their vectors.
    """

    vocabularies: dict[str, Vocabulary]
    mm_table: np.ndarray
    mm_ids: np.ndarray
    mm_vectors: np.ndarray

    @property
    def mm_dim(self) -> int:
        return int(self.mm_table.shape[1]) if self.mm_table.ndim == 2 \
            else schema.MM_EMBEDDING_DIM


def build_item_tables(config: ExperimentConfig, data: DataDir, model_dir: str) -> ItemTables:
    """Write the model-side vocabularies into ``model_dir/vocab`` and build the frozen table."""
    mm_ids, mm_vectors = data.mm_embeddings()
    vocabularies = build_vocabularies(data, os.path.join(model_dir, MODEL_VOCAB_DIR),
                                      min_count=config.data.min_count, mm_item_ids=mm_ids)
    item_vocab = vocabularies[schema.ITEM_ID.vocabulary]
    table = normalised_mm_matrix(read_vocabulary_ids(item_vocab), mm_ids, mm_vectors)
    return ItemTables(vocabularies, table, mm_ids, mm_vectors)


def build_ranking_model(config: ExperimentConfig, data: str | DataDir,
                        model_dir: str) -> RankingModel:
    """The ranking model of ``config`` over ``data``'s item tables."""
    tables = build_item_tables(config, DataDir.open(data), model_dir)
    return RankingModel(config.model, tables.vocabularies, mm_table=tables.mm_table,
                        mm_dim=tables.mm_dim, name=f"ranking_{config.name}")
