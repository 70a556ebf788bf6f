"""One ranking model for MUSE and every baseline/ablation (MUSE paper, section 3 and Table 4).

Structure (config chooses the long-term GSU and the ESU parts; all else is shared)::

    raw ids ──IdLookup──► rows ──► ID embeddings (item ⊕ category, user/item attributes)
                               └─► frozen multimodal vectors (L2-normalised SCL)
    short-term path:  target attention over the newest ``short_term_len`` behaviours, their
                      mean ID embedding, and (``short_term_simtier``) SimTier of their
                      multimodal cosines to the target
    long-term path:   GSU (muse_tf.models.search_units, by ``model.gsu``) over the whole
                      lifelong history -> top-K positions; ESU over the K retrieved:
                      TA | SA-TA, and/or SimTier on their multimodal cosines R to the target;
                      (``retrieved_mean``) their mean ID embedding
    tower:            MLP (Dice) over [target, item/user attributes, user id, short-term,
                      long-term] -> sigmoid

Defaults follow the official MUSE code (alimama-tech/MUSE, ``model/muse.py``): one-head
SiLU SA-TA with temperature 0.1 on R and gates 1, SimTier of width-0.1 tiers with one weight
each on both paths, a 256-128-64 LayerNorm-Dice tower, truncated-normal(0.001) embeddings.
Deviations kept on purpose: padded and embedding-less behaviours are masked everywhere (the
official code counts their cosine 0 in SimTier and averages padding zeros into the means);
a target without a multimodal embedding gets no SimTier counts and R = 0 and its search
falls back to the newest K behaviours.

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
from muse_tf.embeddings import MultimodalCodes, Vocabulary
from muse_tf.embeddings.feature_embeddings import FeatureEmbeddings
from muse_tf.layers import MLPTower, SemanticAwareTargetAttention, SimTier, TargetAttention
from muse_tf.layers.masking import flatten_candidates, masked_mean, newest_positions
from muse_tf.layers.search_unit import CATEGORY, ID, MM, ROWS
from muse_tf.models.search_units import NO_SEARCH, SearchContext, build_search_unit
from muse_tf.training.step import TwoOptimizerModel


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
      mm_table: the item vocabulary's multimodal codes (:class:`MultimodalCodes`, loaded
        in chunks into the frozen table of ``config.mm_storage_dtype``, int8 by default), a
        ``[item vocabulary rows, dim]`` float array, or ``None`` to restore from a
        checkpoint.
      mm_dim: multimodal embedding dimension.
    """

    def __init__(self, config: ModelConfig | Mapping[str, Any],
                 vocabularies: Mapping[str, Vocabulary | Mapping[str, Any]],
                 mm_table: MultimodalCodes | np.ndarray | None = None,
                 mm_dim: int = schema.MM_EMBEDDING_DIM, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(config, Mapping):
            config = ModelConfig(**dict(config))
        self.config = config
        vocabularies = {name: Vocabulary.of(v) for name, v in vocabularies.items()}
        missing = sorted(set(schema.vocabularies()) - set(vocabularies))
        if missing:
            raise ValueError(f"vocabularies missing for {missing}")
        self.vocabularies = vocabularies
        self.mm_dim = int(mm_dim)
        # Lookups, trainable ID embeddings and the frozen table: the layer the retrieval
        # models use too.
        self.features = FeatureEmbeddings(
            vocabularies, config.id_embedding_dim, mm_dim=self.mm_dim,
            short_term_len=config.short_term_len,
            use_user_attributes=config.use_user_attributes,
            use_item_attributes=config.use_item_attributes, use_user_id=config.use_user_id,
            mm_table=mm_table, embeddings_initializer=_embedding_initializer(config),
            embedding_dims=_user_attribute_dims(config),
            mm_storage_dtype=config.mm_storage_dtype, name="features")
        self.mm_table = self.features.mm_table

        short_style, long_style = _attention_styles(config)
        heads = dict(num_heads=config.num_heads, head_dim=config.head_dim)
        self.short_term_attention = TargetAttention(**heads, **short_style,
                                                    name="short_term_attention")
        esu = set(config.esu)
        long_term = config.gsu != NO_SEARCH
        self.long_term_attention: TargetAttention | None = None
        if long_term and "sa_ta" in esu:
            g1, g2, g3 = config.sa_ta_gates
            self.long_term_attention = SemanticAwareTargetAttention(
                **heads, **long_style, id_gate_init=g1, similarity_gate_init=g2,
                interaction_gate_init=g3,
                semantic_temperature_init=config.sa_ta_temperature or None,
                name="long_term_sa_ta")
        elif long_term and "ta" in esu:
            self.long_term_attention = TargetAttention(**heads, **long_style,
                                                       name="long_term_attention")
        self.gsu = build_search_unit(SearchContext(config, self.mm_table,
                                                   self.long_term_attention))
        self.simtier = (_simtier(config, "simtier")
                        if long_term and "simtier" in esu else None)
        self.short_term_simtier = (_simtier(config, "short_term_simtier")
                                   if config.short_term_simtier else None)
        self.tower = MLPTower(config.tower_units, activation=config.tower_activation,
                              dropout=config.dropout, **_tower_style(config), name="tower")
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

    def embedding_variables(self) -> list[tf.Variable]:
        """Trainable ID-embedding tables (their own learning rate, as the paper)."""
        return self.features.embedding_variables()

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
        features_layer = self.features
        if features[schema.HISTORY_ITEM_ID.name].shape.rank != 2:
            raise ValueError(f"{schema.HISTORY_ITEM_ID.name} must be [batch, seq_len], got "
                             f"shape {features[schema.HISTORY_ITEM_ID.name].shape}")
        for name, tensor in candidates.items():
            if tensor.shape.rank != 2:
                raise ValueError(f"candidate feature {name} must be [batch, candidates], got "
                                 f"shape {tensor.shape}")
        num_candidates = tf.shape(candidates[schema.ITEM_ID.name])[1]
        one_candidate = candidates[schema.ITEM_ID.name].shape[1] == 1  # training, call()
        history = features_layer.encode_history(features, parts=())  # rows, masks, lengths
        valid = history["valid"]                                                # [B, L]

        def per_candidate(user_side: tf.Tensor) -> tf.Tensor:
            """[B, ...] -> [B*C, ...] (row b*C + c belongs to user b; no copy for C = 1)."""
            if one_candidate:
                return user_side
            return tf.repeat(user_side, num_candidates, axis=0)

        target_all_rows = features_layer.item_lookup.lookup_all(
            candidates[schema.ITEM_ID.name])                                    # [B, C]
        target = features_layer.behaviour_embedding(
            target_all_rows, features_layer.lookup(schema.ITEM_CATEGORY.vocabulary,
                                                   candidates[schema.ITEM_CATEGORY.name]))
        flat_target = flatten_candidates(target)                                # [B*C, 2E]
        parts = [flat_target]
        if config.use_item_attributes:
            parts.append(flatten_candidates(features_layer.item_attributes(candidates)))
        if config.use_user_attributes:
            parts.append(per_candidate(features_layer.user_attributes(features)))
        if config.use_user_id:
            parts.append(per_candidate(features_layer.user_id_embedding(features)))
        target_side = _Target(self.mm_table, target, target_all_rows,
                              candidates[schema.ITEM_CATEGORY.name])

        # Short-term path over the newest behaviours (shared by all candidates).
        positions, in_range = newest_positions(history["lengths"], config.short_term_len)
        short_mask = in_range & tf.gather(valid, positions, batch_dims=1)
        short_rows = tf.gather(history["rows"], positions, batch_dims=1)        # [B, S]
        short = features_layer.behaviour_embedding(
            short_rows, tf.gather(history["category_rows"], positions, batch_dims=1))
        parts.append(self.short_term_attention(flat_target, per_candidate(short),
                                               per_candidate(short_mask)))
        parts.append(per_candidate(masked_mean(short, short_mask)))             # [B*C, 2E]
        if self.short_term_simtier is not None:
            cosines = tf.matmul(target_side.mm, self.mm_table(short_rows), transpose_b=True)
            has_mm = (short_mask & self.mm_table.has_embedding(short_rows))[:, tf.newaxis, :]
            parts.append(self.short_term_simtier(
                flatten_candidates(cosines),
                flatten_candidates(has_mm & target_side.has_mm[:, :, tf.newaxis])))

        if self.gsu is not None:
            parts += self._long_term(target_side, _History(features_layer, history), valid)
        logits = self.tower(tf.concat(parts, axis=-1), training=training)        # [B*C, 1]
        return tf.sigmoid(tf.reshape(logits, [-1, num_candidates]))

    def _long_term(self, target: _Target, history: _History,
                   valid: tf.Tensor) -> list[tf.Tensor]:
        """GSU over the lifelong history (per user, C candidates at once), then the ESU parts
        over each candidate's K retrieved behaviours. Returns ``[B*C, ...]`` tensors."""
        target_side = {ID: target.id, CATEGORY: target.category}
        if MM in self.gsu.target_keys:
            target_side[MM] = target.mm
        if MM in self.gsu.history_keys:
            # A search over the history's vectors selects only behaviours that have one (a
            # table-backed search masks them itself).
            valid = valid & self.mm_table.has_embedding(history[ROWS])
        selection = self.gsu({key: target_side[key] for key in self.gsu.target_keys},
                             {key: history[key] for key in self.gsu.history_keys}, valid)
        indices = selection["indices"]                                          # [B, C, K]
        selected = flatten_candidates(selection["mask"])                        # [B*C, K]

        rows = tf.gather(history[ROWS], indices, batch_dims=1)                  # [B, C, K]
        retrieved = flatten_candidates(self.features.behaviour_embedding(
            rows, tf.gather(history.category_rows, indices, batch_dims=1)))     # [B*C, K, 2E]
        flat_rows = flatten_candidates(rows)
        # R: multimodal cosine of each retrieved behaviour to the target (0 where either has
        # no vector); the search's own scores when they are that similarity (no second gather).
        has_mm = (self.mm_table.has_embedding(flat_rows) & selected
                  & flatten_candidates(target.has_mm)[:, tf.newaxis])
        if self.gsu.scores_are_similarity:
            relevance = flatten_candidates(selection["scores"])
        else:
            relevance = tf.linalg.matvec(self.mm_table(flat_rows),
                                         flatten_candidates(target.mm))        # [B*C, K]
        relevance = tf.where(has_mm, relevance, 0.0)

        flat_target = flatten_candidates(target.id)
        out = []
        if isinstance(self.long_term_attention, SemanticAwareTargetAttention):
            out.append(self.long_term_attention(flat_target, retrieved, relevance, selected))
        elif self.long_term_attention is not None:
            out.append(self.long_term_attention(flat_target, retrieved, selected))
        if self.simtier is not None:
            out.append(self.simtier(relevance, has_mm))
        if self.config.retrieved_mean:
            out.append(masked_mean(retrieved, selected))                        # [B*C, 2E]
        return out

    # ------------------------------------------------------------------ training
    def compute_loss(self, inputs: dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        labels = tf.reshape(tf.cast(inputs[schema.LABEL.name], tf.float32), [-1, 1])
        predictions = tf.reshape(self(inputs, training=training), [-1, 1])
        loss = self.task(labels=labels, predictions=predictions, training=training)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        global_batch = tf.cast(tf.shape(labels)[0] * replicas, loss.dtype)
        return loss / tf.maximum(global_batch, 1.0)


def _embedding_initializer(config: ModelConfig) -> tf.keras.initializers.Initializer:
    if config.embedding_init == "truncated_normal":
        return tf.keras.initializers.TruncatedNormal(stddev=config.embedding_init_std)
    return tf.keras.initializers.RandomNormal(stddev=config.embedding_init_std)


def _user_attribute_dims(config: ModelConfig) -> dict[str, int]:
    """Vocabulary -> size of the user attributes' embeddings (official: E, E, E/2, E/2, E/2)."""
    dim = config.id_embedding_dim
    dims = config.user_attribute_dims or [dim, dim] + [max(dim // 2, 1)] * 3
    return {f.vocabulary: d for f, d in zip(schema.USER_ATTRIBUTES, dims, strict=True)}


#: The official code's Linear initialisation: N(0, 1/fan_in) weights, biases 0.1.
_OFFICIAL_KERNEL = {"class_name": "VarianceScaling",
                    "config": {"scale": 1.0, "mode": "fan_in",
                               "distribution": "untruncated_normal"}}
_OFFICIAL_BIAS = {"class_name": "Constant", "config": {"value": 0.1}}


def _attention_styles(config: ModelConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Projection options of the short-term and the long-term attention."""
    if config.attention == "scaled":
        return {}, {}
    official = dict(use_bias=True, scaled=False, kernel_initializer=_OFFICIAL_KERNEL,
                    bias_initializer=_OFFICIAL_BIAS)
    # Official: linear projections in the short-term attention, SiLU ones in SA-TA.
    return official, {**official, "activation": "silu"}


def _tower_style(config: ModelConfig) -> dict[str, Any]:
    if config.tower_style == "batch":
        return {}
    return dict(dice_normalization="layer", dice_alpha=-0.25,
                kernel_initializer=_OFFICIAL_KERNEL, bias_initializer=_OFFICIAL_BIAS)


def _simtier(config: ModelConfig, name: str) -> SimTier:
    initializer = ({"class_name": "RandomUniform", "config": {"minval": 0.0, "maxval": 1.0}}
                   if config.simtier_binning == "ceil" else "glorot_uniform")
    return SimTier(config.num_tiers, config.tier_dim, embeddings_initializer=initializer,
                   binning=config.simtier_binning, name=name)


class _Target:
    """The candidates' side of a search: ID embeddings ``[B, C, 2E]``, multimodal vectors
    ``[B, C, D]`` (built on first use), whether they have one ``[B, C]``, raw categories."""

    def __init__(self, table: Any, id_embedding: tf.Tensor, rows: tf.Tensor,
                 category: tf.Tensor) -> None:
        self._table = table
        self.id = id_embedding
        self.rows = rows
        self.category = category
        self.has_mm = table.has_embedding(rows)
        self._mm: tf.Tensor | None = None

    @property
    def mm(self) -> tf.Tensor:
        if self._mm is None:
            self._mm = self._table(self.rows)
        return self._mm


class _History:
    """The history side of a search, built on demand from an
    :meth:`FeatureEmbeddings.encode_history` result: only the keys the GSU declares are
    computed (a multimodal search never builds the ``[B, L, 2E]`` ID embeddings)."""

    def __init__(self, features: FeatureEmbeddings, encoded: Mapping[str, tf.Tensor]) -> None:
        self._features = features
        self.category_rows = encoded["category_rows"]
        self._values: dict[str, tf.Tensor] = {ROWS: encoded["rows"],
                                              CATEGORY: encoded["category"]}

    def __getitem__(self, key: str) -> tf.Tensor:
        if key not in self._values:
            rows = self._values[ROWS]
            if key == ID:
                self._values[ID] = self._features.behaviour_embedding(rows, self.category_rows)
            elif key == MM:
                self._values[MM] = self._features.mm_table(rows)
            else:
                raise KeyError(f"no history tensor {key!r}; known: {[ID, MM, ROWS, CATEGORY]}")
        return self._values[key]
