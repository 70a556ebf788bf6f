"""One ranking model for MUSE and every baseline/ablation (MUSE paper, section 3 and Table 4).

Structure (config chooses the long-term GSU and the ESU parts; all else is shared)::

    raw ids ──IdLookup──► rows ──► ID embeddings (item ⊕ category, user/item attributes)
                               └─► frozen multimodal vectors (L2-normalised SCL)
    short-term path:  target attention over the newest ``short_term_len`` behaviours
    long-term path:   GSU over the whole lifelong history -> top-K indices
                      ESU over the K retrieved: TA | SA-TA, and/or SimTier on their
                      multimodal cosines R to the target
    tower:            MLP (Dice) over [target, attributes, short-term, long-term] -> sigmoid

Inputs (the reader's batch dict, see :mod:`muse_tf.schema`): context ids int64 ``[B]``,
right-padded behaviour ids/categories int64 ``[B, L]``, ``hist_len`` int32 ``[B]``.
A behaviour is valid iff its position < ``hist_len`` and its id is not 0.
Output of :meth:`call`: click probability float32 ``[B]``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs

from muse_tf import schema
from muse_tf.config import ModelConfig
from muse_tf.embeddings import FrozenMultimodalTable, IdLookup, Vocabulary
from muse_tf.layers import (
    CategoryGSU,
    IdEmbeddingGSU,
    MLPTower,
    MultimodalGSU,
    MultimodalIdCosineGSU,
    ProjectedMultimodalGSU,
    SemanticAwareTargetAttention,
    SimTier,
    TargetAttention,
)
from muse_tf.layers.masking import (
    flatten_candidates,
    history_mask,
    masked_mean,
    newest_positions,
)
from muse_tf.layers.search_unit import select_top_k
from muse_tf.training.step import TwoOptimizerModel

_flatten_candidates = flatten_candidates

_EMBEDDING_PREFIX = "id_embedding_"


class RankingModel(TwoOptimizerModel):
    """CTR ranking model whose GSU/ESU parts are chosen by :class:`ModelConfig`.

    Args:
      config: the model section of an experiment config.
      vocabularies: model-side vocabularies (:func:`muse_tf.embeddings.build_vocabularies`).
      mm_table: ``[item vocabulary rows, dim]`` L2-normalised multimodal table
        (:func:`muse_tf.embeddings.normalised_mm_matrix`), or ``None`` to restore from a
        checkpoint.
      mm_dim: multimodal embedding dimension.
    """

    def __init__(self, config: ModelConfig, vocabularies: dict[str, Vocabulary],
                 mm_table: np.ndarray | None = None, mm_dim: int = schema.MM_EMBEDDING_DIM,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.config = config
        missing = sorted(set(schema.vocabularies()) - set(vocabularies))
        if missing:
            raise ValueError(f"vocabularies missing for {missing}")
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
        self.mm_table = FrozenMultimodalTable(item_lookup.num_rows, mm_dim,
                                              initial_table=mm_table, name="multimodal_table")

        heads = dict(num_heads=config.num_heads, head_dim=config.head_dim)
        self.short_term_attention = TargetAttention(**heads, name="short_term_attention")
        self.gsu = self._make_gsu(config)
        if config.gsu == "attention" and not {"ta", "sa_ta"} & set(config.esu):
            raise ValueError("gsu='attention' (TWIN) scores with the ESU's target attention: "
                             f"model.esu must hold 'ta' or 'sa_ta', got {config.esu}")
        esu = set(config.esu)
        self.long_term_attention: tf.keras.layers.Layer | None = None
        if config.gsu != "none":
            if "sa_ta" in esu:
                self.long_term_attention = SemanticAwareTargetAttention(
                    **heads, name="long_term_sa_ta")
            elif "ta" in esu:
                self.long_term_attention = TargetAttention(**heads, name="long_term_attention")
        self.simtier = (SimTier(config.num_tiers, config.tier_dim, name="simtier")
                        if config.gsu != "none" and "simtier" in esu else None)
        self.tower = MLPTower(config.tower_units, activation=config.tower_activation,
                              dropout=config.dropout, name="tower")
        # SUM reduction, divided by the global batch in compute_loss: the same mean loss on
        # one device and under tf.distribute (gradients are summed across replicas).
        self.task = tfrs.tasks.Ranking(
            loss=tf.keras.losses.BinaryCrossentropy(reduction=tf.keras.losses.Reduction.SUM),
            metrics=[tf.keras.metrics.AUC(name="auc")])

    @staticmethod
    def _make_gsu(config: ModelConfig) -> Any:
        k = config.top_k
        if config.gsu == "none":
            return None
        if config.gsu == "multimodal":
            return MultimodalGSU(k, name="gsu_multimodal")
        if config.gsu == "category":
            return CategoryGSU(k, name="gsu_category")
        if config.gsu == "id":
            return IdEmbeddingGSU(k, name="gsu_id")
        if config.gsu == "attention":
            # TWIN: the search scores with the ESU's own attention parameters (see
            # _long_term), so the GSU is consistent with the ESU and trained through it.
            return "shares_esu_attention"
        if config.gsu == "projected_multimodal":
            return ProjectedMultimodalGSU(
                k, projection_units=(config.gsu_projection_dim, config.gsu_projection_dim),
                name="gsu_projected_multimodal")
        if config.gsu == "multimodal_plus_id":
            return MultimodalIdCosineGSU(k, name="gsu_multimodal_plus_id")
        if config.gsu == "miss":
            # MISS: Co-GSU (ID embeddings) and MM-GSU (multimodal) each retrieve half.
            return {"co": IdEmbeddingGSU(max(1, k // 2), name="gsu_miss_co"),
                    "mm": MultimodalGSU(k - max(1, k // 2), name="gsu_miss_mm")}
        raise ValueError(f"unknown gsu {config.gsu!r}")

    def get_config(self) -> dict[str, Any]:
        # Vocabularies and the frozen table travel as assets and weights, not in the config.
        return {"name": self.name, "model_config": dataclasses.asdict(self.config)}

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
        flat_target = _flatten_candidates(target)                               # [B*C, 2E]
        hist_all_rows = item_lookup.lookup_all(hist_items)                      # [B, L]
        hist_category_rows = category_lookup(features[schema.HISTORY_CATEGORY.name])

        parts = [flat_target]
        for feature in schema.ITEM_ATTRIBUTES if config.use_item_attributes else ():
            rows = self.lookups[feature.vocabulary](candidates[feature.name])
            parts.append(_flatten_candidates(self._embed(feature.vocabulary, rows)))
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
            parts += self._long_term(candidates, target, target_all_rows, hist_all_rows,
                                     hist_category_rows, features, valid)
        logits = self.tower(tf.concat(parts, axis=-1), training=training)        # [B*C, 1]
        return tf.sigmoid(tf.reshape(logits, [-1, num_candidates]))

    def _long_term(self, candidates: dict[str, tf.Tensor], target: tf.Tensor,
                   target_all_rows: tf.Tensor, hist_all_rows: tf.Tensor,
                   hist_category_rows: tf.Tensor, features: dict[str, tf.Tensor],
                   valid: tf.Tensor) -> list[tf.Tensor]:
        """GSU over the lifelong history (per user, C candidates at once), then the ESU parts
        over each candidate's K retrieved behaviours. Returns ``[B*C, ...]`` tensors."""
        config = self.config
        item_lookup = self.lookups[schema.ITEM_ID.vocabulary]
        target_mm = self.mm_table(target_all_rows)                              # [B, C, D]

        def history_mm() -> tuple[tf.Tensor, tf.Tensor]:
            return (self.mm_table(hist_all_rows),
                    valid & self.mm_table.has_embedding(hist_all_rows))

        def history_id() -> tf.Tensor:
            return self._behaviour_embedding(item_lookup.embedded_rows(hist_all_rows),
                                             hist_category_rows)

        def history_mm_valid() -> tf.Tensor:
            return valid & self.mm_table.has_embedding(hist_all_rows)

        gsu = config.gsu
        if gsu == "multimodal":
            # MUSE's GSU: cosines computed blockwise from the frozen table (see
            # FrozenMultimodalTable.similarity), then the layer's masked top-K.
            scores = self.mm_table.similarity(target_mm, hist_all_rows)          # [B, C, L]
            selections = [self.gsu.select(scores, history_mm_valid())]
        elif gsu == "projected_multimodal":
            vectors, mm_valid = history_mm()
            selections = [self.gsu(target_mm, vectors, mm_valid)]
        elif gsu == "multimodal_plus_id":
            vectors, mm_valid = history_mm()
            selections = [self.gsu(target_mm, vectors, target, history_id(), mm_valid)]
        elif gsu == "category":
            selections = [self.gsu(candidates[schema.ITEM_CATEGORY.name],
                                   features[schema.HISTORY_CATEGORY.name], valid)]
        elif gsu == "id":
            selections = [self.gsu(target, history_id(), valid)]
        elif gsu == "attention":
            selections = [self._twin_search(target, history_id(), valid)]
        elif gsu == "miss":
            scores = self.mm_table.similarity(target_mm, hist_all_rows)
            selections = [self.gsu["co"](target, history_id(), valid),
                          self.gsu["mm"].select(scores, history_mm_valid())]
        else:
            raise ValueError(f"unknown gsu {gsu!r}")
        indices = tf.concat([s["indices"] for s in selections], axis=-1)        # [B, C, K]
        selected = _flatten_candidates(
            tf.concat([s["mask"] for s in selections], axis=-1))                # [B*C, K]

        rows = tf.gather(hist_all_rows, indices, batch_dims=1)                  # [B, C, K]
        retrieved = _flatten_candidates(self._behaviour_embedding(
            item_lookup.embedded_rows(rows),
            tf.gather(hist_category_rows, indices, batch_dims=1)))              # [B*C, K, 2E]
        flat_rows = _flatten_candidates(rows)
        # Multimodal cosine R of each retrieved behaviour to the target (0 where missing).
        has_mm = self.mm_table.has_embedding(flat_rows) & selected
        if gsu == "projected_multimodal":
            # Table 2's learned similarity: its scores are R, so the projection trains.
            relevance = _flatten_candidates(selections[0]["scores"])
        else:
            relevance = tf.einsum("nd,nkd->nk", _flatten_candidates(target_mm),
                                  self.mm_table(flat_rows))
        relevance = tf.where(has_mm, relevance, 0.0)

        flat_target = _flatten_candidates(target)
        out = []
        if isinstance(self.long_term_attention, SemanticAwareTargetAttention):
            out.append(self.long_term_attention(flat_target, retrieved, relevance, selected))
        elif self.long_term_attention is not None:
            out.append(self.long_term_attention(flat_target, retrieved, selected))
        if self.simtier is not None:
            out.append(self.simtier(relevance, has_mm))
        return out

    def _twin_search(self, target: tf.Tensor, history: tf.Tensor,
                     valid: tf.Tensor) -> dict[str, tf.Tensor]:
        """TWIN's consistency-preserving GSU: the head-averaged logits of the ESU's own
        target attention over the whole history, top-K. ``target`` ``[B, C, 2E]``."""
        attention = self.long_term_attention
        flat = _flatten_candidates(target)
        if not attention.built:
            attention.build(flat.shape)
        query = attention.logits_layer.key_space_query(flat, history)          # [B*C, H, E']
        query = tf.reshape(tf.reduce_mean(query, axis=1),
                           [-1, tf.shape(target)[1], history.shape[-1]])        # [B, C, E']
        scores = tf.einsum("bce,ble->bcl", query, history)
        return select_top_k(scores, valid, self.config.top_k)

    # ------------------------------------------------------------------ training
    def compute_loss(self, inputs: dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        labels = tf.reshape(tf.cast(inputs[schema.LABEL.name], tf.float32), [-1, 1])
        predictions = tf.reshape(self(inputs, training=training), [-1, 1])
        loss = self.task(labels=labels, predictions=predictions, training=training)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        global_batch = tf.cast(tf.shape(labels)[0] * replicas, loss.dtype)
        return loss / tf.maximum(global_batch, 1.0)
