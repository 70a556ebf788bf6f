"""One ranking model for MUSE and every baseline/ablation (MUSE paper, section 3 and Table 4).

Structure (config chooses the long-term GSU and the ESU parts; all else is shared)::

    raw ids ──IdLookup──► rows ──► ID embeddings (item ⊕ category, user/item attributes)
                               └─► frozen multimodal vectors (L2-normalised SCL)
    short-term path:  target attention over the newest ``short_term_len`` behaviours
    long-term path:   GSU (muse_tf.models.search_units, by ``model.gsu``) over the whole
                      lifelong history -> top-K positions; ESU over the K retrieved:
                      TA | SA-TA, and/or SimTier on their multimodal cosines R to the target
    tower:            MLP (Dice) over [target, attributes, short-term, long-term] -> sigmoid

Inputs (the reader's batch dict, see :mod:`muse_tf.schema`): context ids int64 ``[B]``,
right-padded behaviour ids/categories int64 ``[B, L]``, ``hist_len`` int32 ``[B]``.
A behaviour is valid iff its position < ``hist_len`` and its id is not 0.
Output of :meth:`call`: click probability float32 ``[B]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs

from muse_tf import schema
from muse_tf.config import ModelConfig
from muse_tf.embeddings import FrozenMultimodalTable, IdLookup, Vocabulary
from muse_tf.layers import MLPTower, SemanticAwareTargetAttention, SimTier, TargetAttention
from muse_tf.layers.masking import (
    flatten_candidates,
    history_mask,
    masked_mean,
    newest_positions,
)
from muse_tf.layers.search_unit import CATEGORY, ID, MM, ROWS
from muse_tf.models.search_units import NO_SEARCH, SearchContext, build_search_unit
from muse_tf.training.step import TwoOptimizerModel

_EMBEDDING_PREFIX = "id_embedding_"


def _vocabulary(value: Vocabulary | Mapping[str, Any]) -> Vocabulary:
    return value if isinstance(value, Vocabulary) else Vocabulary(**dict(value))


@tf.keras.utils.register_keras_serializable(package="muse_tf")
class RankingModel(TwoOptimizerModel):
    """CTR ranking model whose GSU/ESU parts are chosen by :class:`ModelConfig`.

    The long-term search is whatever :func:`muse_tf.models.search_units.build_search_unit`
    returns for ``config.gsu`` (None for ``"none"``, DIN): the model gives it the target and
    history tensors it declares (``target_keys``/``history_keys``) and never branches on
    the name.

    Args:
      config: the model section of an experiment config.
      vocabularies: model-side vocabularies (:func:`muse_tf.embeddings.build_vocabularies`),
        as :class:`Vocabulary` or their dict form.
      mm_table: ``[item vocabulary rows, dim]`` L2-normalised multimodal table
        (:func:`muse_tf.embeddings.normalised_mm_matrix`), or ``None`` to restore from a
        checkpoint.
      mm_dim: multimodal embedding dimension.
    """

    def __init__(self, config: ModelConfig | Mapping[str, Any],
                 vocabularies: Mapping[str, Vocabulary | Mapping[str, Any]],
                 mm_table: np.ndarray | None = None, mm_dim: int = schema.MM_EMBEDDING_DIM,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(config, Mapping):
            config = ModelConfig(**dict(config))
        self.config = config
        vocabularies = {name: _vocabulary(v) for name, v in vocabularies.items()}
        missing = sorted(set(schema.vocabularies()) - set(vocabularies))
        if missing:
            raise ValueError(f"vocabularies missing for {missing}")
        self.vocabularies = vocabularies
        self.mm_dim = int(mm_dim)
        used = {schema.ITEM_ID.vocabulary, schema.ITEM_CATEGORY.vocabulary}
        if config.use_item_attributes:
            used |= {f.vocabulary for f in schema.ITEM_ATTRIBUTES}
        if config.use_user_attributes:
            used |= {f.vocabulary for f in schema.USER_ATTRIBUTES}
        self.lookups = {
            name: IdLookup(v.path, v.vocab_size, v.num_embedded, name=f"lookup_{name}")
            for name, v in vocabularies.items() if name in used
        }
        dim = config.id_embedding_dim
        self.embeddings = {
            name: tf.keras.layers.Embedding(
                lookup.num_embedded_rows, dim, name=f"{_EMBEDDING_PREFIX}{name}",
                embeddings_initializer=tf.keras.initializers.RandomNormal(stddev=0.05))
            for name, lookup in self.lookups.items()
        }
        item_lookup = self.lookups[schema.ITEM_ID.vocabulary]
        self.mm_table = FrozenMultimodalTable(item_lookup.num_rows, self.mm_dim,
                                              initial_table=mm_table, name="multimodal_table")

        heads = dict(num_heads=config.num_heads, head_dim=config.head_dim)
        self.short_term_attention = TargetAttention(**heads, name="short_term_attention")
        esu = set(config.esu)
        long_term = config.gsu != NO_SEARCH
        self.long_term_attention: TargetAttention | None = None
        if long_term and "sa_ta" in esu:
            self.long_term_attention = SemanticAwareTargetAttention(**heads,
                                                                    name="long_term_sa_ta")
        elif long_term and "ta" in esu:
            self.long_term_attention = TargetAttention(**heads, name="long_term_attention")
        self.gsu = build_search_unit(SearchContext(config, self.mm_table,
                                                   self.long_term_attention))
        self.simtier = (SimTier(config.num_tiers, config.tier_dim, name="simtier")
                        if long_term and "simtier" in esu else None)
        self.tower = MLPTower(config.tower_units, activation=config.tower_activation,
                              dropout=config.dropout, name="tower")
        # SUM reduction, divided by the global batch in compute_loss: the same mean loss on
        # one device and under tf.distribute (gradients are summed across replicas).
        self.task = tfrs.tasks.Ranking(
            loss=tf.keras.losses.BinaryCrossentropy(reduction=tf.keras.losses.Reduction.SUM),
            metrics=[tf.keras.metrics.AUC(name="auc")])

    def get_config(self) -> dict[str, Any]:
        # The frozen table and all trained weights travel as weights, not in the config.
        return {"name": self.name, "config": dataclasses.asdict(self.config),
                "vocabularies": {n: dataclasses.asdict(v) for n, v in self.vocabularies.items()},
                "mm_dim": self.mm_dim}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> RankingModel:
        return cls(**config)

    # ------------------------------------------------------------------ embeddings
    def _embed(self, vocabulary: str, rows: tf.Tensor) -> tf.Tensor:
        return self.embeddings[vocabulary](rows)

    def _behaviour_embedding(self, item_rows: tf.Tensor, category_rows: tf.Tensor) -> tf.Tensor:
        """Item ⊕ category ID embedding, ``[..., 2 * id_embedding_dim]``."""
        return tf.concat([self._embed(schema.ITEM_ID.vocabulary, item_rows),
                          self._embed(schema.ITEM_CATEGORY.vocabulary, category_rows)], -1)

    def embedding_variables(self) -> list[tf.Variable]:
        """Trainable ID-embedding tables (their own learning rate, as the paper)."""
        return [v for layer in self.embeddings.values() for v in layer.trainable_variables]

    # ------------------------------------------------------------------ forward
    def call(self, features: dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        """Click probability ``[B]`` (item-side features ``[B]``, one target per row) or
        ``[B, C]`` (item-side features ``[B, C]``: C candidates of one user per row)."""
        single = features[schema.ITEM_ID.name].shape.rank == 1
        candidates = {f.name: features[f.name] for f in schema.ITEM_SIDE_FEATURES}
        if single:
            candidates = {k: v[:, tf.newaxis] for k, v in candidates.items()}
        scores = self.score_candidates(features, candidates, training=training)
        return scores[:, 0] if single else scores

    def score_candidates(self, features: dict[str, tf.Tensor],
                         candidates: dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        """Scores ``[B, C]`` of C candidate items per user row.

        The history (lookups, multimodal vectors, the GSU's matrix product) is processed once
        per user, not once per candidate, so a request with a 100K-long history and 100
        candidates does not copy the history 100 times.
        """
        config = self.config
        item_lookup = self.lookups[schema.ITEM_ID.vocabulary]
        category_lookup = self.lookups[schema.ITEM_CATEGORY.vocabulary]
        hist_items = features[schema.HISTORY_ITEM_ID.name]
        if hist_items.shape.rank != 2:
            raise ValueError(f"{schema.HISTORY_ITEM_ID.name} must be [batch, seq_len], got "
                             f"shape {hist_items.shape}")
        for name, tensor in candidates.items():
            if tensor.shape.rank != 2:
                raise ValueError(f"candidate feature {name} must be [batch, candidates], got "
                                 f"shape {tensor.shape}")
        num_candidates = tf.shape(candidates[schema.ITEM_ID.name])[1]
        lengths = tf.minimum(tf.cast(features[schema.HISTORY_LENGTH], tf.int32),
                             tf.shape(hist_items)[1])
        valid = history_mask(hist_items, lengths)                               # [B, L]

        def per_candidate(user_side: tf.Tensor) -> tf.Tensor:
            """[B, ...] -> [B*C, ...] (row b*C + c belongs to user b)."""
            return tf.repeat(user_side, num_candidates, axis=0)

        target_all_rows = item_lookup.lookup_all(candidates[schema.ITEM_ID.name])  # [B, C]
        target = self._behaviour_embedding(
            item_lookup.embedded_rows(target_all_rows),
            category_lookup(candidates[schema.ITEM_CATEGORY.name]))              # [B, C, 2E]
        flat_target = flatten_candidates(target)                                # [B*C, 2E]
        hist_all_rows = item_lookup.lookup_all(hist_items)                      # [B, L]
        hist_category_rows = category_lookup(features[schema.HISTORY_CATEGORY.name])

        parts = [flat_target]
        for feature in schema.ITEM_ATTRIBUTES if config.use_item_attributes else ():
            rows = self.lookups[feature.vocabulary](candidates[feature.name])
            parts.append(flatten_candidates(self._embed(feature.vocabulary, rows)))
        for feature in schema.USER_ATTRIBUTES if config.use_user_attributes else ():
            rows = self.lookups[feature.vocabulary](features[feature.name])
            parts.append(per_candidate(self._embed(feature.vocabulary, rows)))

        # Short-term path: target attention over the newest behaviours (shared by all).
        positions, in_range = newest_positions(lengths, config.short_term_len)
        short_mask = in_range & tf.gather(valid, positions, batch_dims=1)
        short = self._behaviour_embedding(
            item_lookup.embedded_rows(tf.gather(hist_all_rows, positions, batch_dims=1)),
            tf.gather(hist_category_rows, positions, batch_dims=1))             # [B, S, 2E]
        parts.append(self.short_term_attention(flat_target, per_candidate(short),
                                               per_candidate(short_mask)))
        parts.append(flat_target * per_candidate(masked_mean(short, short_mask)))

        if self.gsu is not None:
            history = _History(self, hist_all_rows, hist_category_rows,
                               features[schema.HISTORY_CATEGORY.name])
            parts += self._long_term(candidates, target, target_all_rows, history, valid)
        logits = self.tower(tf.concat(parts, axis=-1), training=training)        # [B*C, 1]
        return tf.sigmoid(tf.reshape(logits, [-1, num_candidates]))

    def _long_term(self, candidates: dict[str, tf.Tensor], target: tf.Tensor,
                   target_all_rows: tf.Tensor, history: _History,
                   valid: tf.Tensor) -> list[tf.Tensor]:
        """GSU over the lifelong history (per user, C candidates at once), then the ESU parts
        over each candidate's K retrieved behaviours. Returns ``[B*C, ...]`` tensors."""
        item_lookup = self.lookups[schema.ITEM_ID.vocabulary]
        target_mm = self.mm_table(target_all_rows)                              # [B, C, D]
        target_side = {ID: target, MM: target_mm,
                       CATEGORY: candidates[schema.ITEM_CATEGORY.name]}
        if MM in self.gsu.history_keys:
            # A search over the history's vectors selects only behaviours that have one (a
            # table-backed search masks them itself).
            valid = valid & self.mm_table.has_embedding(history[ROWS])
        selection = self.gsu({key: target_side[key] for key in self.gsu.target_keys},
                             {key: history[key] for key in self.gsu.history_keys}, valid)
        indices = selection["indices"]                                          # [B, C, K]
        selected = flatten_candidates(selection["mask"])                        # [B*C, K]

        rows = tf.gather(history[ROWS], indices, batch_dims=1)                  # [B, C, K]
        retrieved = flatten_candidates(self._behaviour_embedding(
            item_lookup.embedded_rows(rows),
            tf.gather(history.category_rows, indices, batch_dims=1)))           # [B*C, K, 2E]
        flat_rows = flatten_candidates(rows)
        # R: multimodal cosine of each retrieved behaviour to the target (0 where missing);
        # the search's own scores when they are that similarity (no second gather).
        has_mm = self.mm_table.has_embedding(flat_rows) & selected
        if self.gsu.scores_are_similarity:
            relevance = flatten_candidates(selection["scores"])
        else:
            relevance = tf.einsum("nd,nkd->nk", flatten_candidates(target_mm),
                                  self.mm_table(flat_rows))
        relevance = tf.where(has_mm, relevance, 0.0)

        flat_target = flatten_candidates(target)
        out = []
        if isinstance(self.long_term_attention, SemanticAwareTargetAttention):
            out.append(self.long_term_attention(flat_target, retrieved, relevance, selected))
        elif self.long_term_attention is not None:
            out.append(self.long_term_attention(flat_target, retrieved, selected))
        if self.simtier is not None:
            out.append(self.simtier(relevance, has_mm))
        return out

    # ------------------------------------------------------------------ training
    def compute_loss(self, inputs: dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        labels = tf.reshape(tf.cast(inputs[schema.LABEL.name], tf.float32), [-1, 1])
        predictions = tf.reshape(self(inputs, training=training), [-1, 1])
        loss = self.task(labels=labels, predictions=predictions, training=training)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        global_batch = tf.cast(tf.shape(labels)[0] * replicas, loss.dtype)
        return loss / tf.maximum(global_batch, 1.0)


class _History:
    """The history side of a search, built on demand: only the keys the GSU declares are
    computed (a multimodal search never builds the ``[B, L, 2E]`` ID embeddings)."""

    def __init__(self, model: RankingModel, rows: tf.Tensor, category_rows: tf.Tensor,
                 categories: tf.Tensor) -> None:
        self._model = model
        self.category_rows = category_rows
        self._values: dict[str, tf.Tensor] = {ROWS: rows, CATEGORY: categories}

    def __getitem__(self, key: str) -> tf.Tensor:
        if key not in self._values:
            rows = self._values[ROWS]
            if key == ID:
                item_lookup = self._model.lookups[schema.ITEM_ID.vocabulary]
                self._values[ID] = self._model._behaviour_embedding(
                    item_lookup.embedded_rows(rows), self.category_rows)
            elif key == MM:
                self._values[MM] = self._model.mm_table(rows)
            else:
                raise KeyError(f"no history tensor {key!r}; known: {[ID, MM, ROWS, CATEGORY]}")
        return self._values[key]
