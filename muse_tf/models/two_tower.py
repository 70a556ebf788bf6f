"""The two-tower retrieval baseline (TFRS ``Retrieval`` task) over the same features as MISS.

::

    user tower:  [masked mean of item ⊕ category ID embeddings over the whole history,
                  masked mean of the behaviours' normalised SCL vectors (those that have one),
                  masked mean ID embedding of the newest short_term_len behaviours,
                  user attribute embeddings] ──MLP (ReLU)──► Dense(tower_dim) ──► L2-normalise
    item tower:  [item ID embedding, normalised SCL vector] ──MLP (ReLU)──► Dense(tower_dim)
                  ──► L2-normalise

Both towers read one :class:`~muse_tf.embeddings.feature_embeddings.FeatureEmbeddings`
(shared ID embeddings: a behaviour and a candidate item use the same item-ID row). Training:
clicked (user, item) pairs, in-batch sampled softmax of :class:`tfrs.tasks.Retrieval`. The
batch's B clicked items are its candidates: item ``c`` is one with probability ``q_c``, its
share of the training clicks, so popular items are over-represented as negatives. The logQ
correction (Yi et al., RecSys 2019, "Sampling-bias-corrected neural modeling for large corpus
item recommendations") subtracts ``log q_c`` from every logit of candidate ``c``, which
removes that popularity bias of the sampled softmax against the full softmax over the
catalogue; accidental hits (the positive's item again as another row's candidate) are
removed; the loss is the **mean** over the global batch of each query's cross-entropy::

    s_bc = <u_b, v_c> / T - log q_c          (u: [B, D], v: [B, D], q: [B], s: [B, B];
                                              "- log q_c" only with logq_correction)
    s_bc = -inf  where item_c == item_b and c != b             (accidental hits)
    loss = -1/B_global Σ_b log softmax_c(s_b.)[b]

``q`` is a per-example input feature (:data:`CANDIDATE_PROBABILITY`, float32 ``[B]``, the
probability of the example's own item), looked up in the tf.data pipeline from the exact
train click counts (:class:`muse_tf.training.retrieval_data.SamplingProbabilities`), never
estimated from the batch. The correction and the temperature are training-only: retrieval
scores are ``<u, v>`` (a positive temperature does not change the order).

Retrieval: top-k by dot product over the candidate embeddings of the catalogue with
:func:`muse_tf.index.brute_force.brute_force_index` (exact, stock ops) or
:func:`muse_tf.index.scann_index.scann_index` (approximate, ScaNN ops).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs

from muse_tf import schema
from muse_tf.config import ModelConfig
from muse_tf.embeddings import MultimodalCodes, Vocabulary
from muse_tf.embeddings.feature_embeddings import MM_VALID, VALID, FeatureEmbeddings
from muse_tf.index.brute_force import aligned_empty
from muse_tf.layers.masking import masked_mean
from muse_tf.layers.search_unit import ID, MM
from muse_tf.training.step import TwoOptimizerModel

__all__ = ["CANDIDATE_PROBABILITY", "DEFAULT_TEMPERATURE", "ItemTower", "TwoTowerModel",
           "UserTower"]

#: Softmax temperature of the in-batch retrieval loss on L2-normalised tower outputs (best of
#: 0.05 / 0.1 / 0.2 / 0.35 / 0.6 by test recall@100 on the demo data set; with the logQ
#: correction still the best of 0.05 / 0.1 / 0.2 / 0.35). ``retrieval.temperature`` in runs.
DEFAULT_TEMPERATURE = 0.2
#: Training input: float32 ``[B]``, ``q`` of each example's clicked item (the probability that
#: an in-batch candidate is that item), read by the loss when ``logq_correction`` is on.
CANDIDATE_PROBABILITY = "candidate_sampling_probability"


def _mlp(hidden_units: Sequence[int], output_dim: int, name: str) -> tf.keras.Sequential:
    layers = [tf.keras.layers.Dense(units, activation="relu", name=f"dense_{i}")
              for i, units in enumerate(hidden_units)]
    layers.append(tf.keras.layers.Dense(output_dim, name="output"))
    return tf.keras.Sequential(layers, name=name)


class UserTower(tf.keras.Model):
    """Raw user features → L2-normalised query embedding ``[B, tower_dim]``.

    Input: the reader's dict (reads ``user_attr_*``, ``hist_item_id``, ``hist_category``
    int64 ``[B, L]`` and ``hist_len`` int32 ``[B]``; other keys are ignored).
    """

    def __init__(self, features: FeatureEmbeddings, hidden_units: Sequence[int],
                 output_dim: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.features = features
        self.mlp = _mlp(hidden_units, output_dim, "user_mlp")

    def call(self, inputs: Mapping[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        history = self.features.encode_history(inputs, parts=(ID, MM))
        parts = [masked_mean(history[ID], history[VALID]),
                 masked_mean(history[MM], history[MM_VALID]),
                 self.features.short_term_mean(history)]
        if self.features.user_dim:
            parts.append(self.features.user_attributes(inputs))
        return tf.math.l2_normalize(self.mlp(tf.concat(parts, -1), training=training), -1)


class ItemTower(tf.keras.Model):
    """Raw item ids int64 ``[N]`` → L2-normalised candidate embedding ``[N, tower_dim]``."""

    def __init__(self, features: FeatureEmbeddings, hidden_units: Sequence[int],
                 output_dim: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.features = features
        self.mlp = _mlp(hidden_units, output_dim, "item_mlp")

    def call(self, item_ids: tf.Tensor, training: bool = False) -> tf.Tensor:
        item_ids = tf.convert_to_tensor(item_ids)
        if item_ids.dtype != tf.int64 or item_ids.shape.rank != 1:
            raise ValueError(f"ItemTower: item ids must be int64 [N], got {item_ids.dtype.name} "
                             f"with shape {item_ids.shape}")
        id_vectors, mm_vectors, _ = self.features.item_embedding(item_ids)
        x = tf.concat([id_vectors, mm_vectors], axis=-1)
        return tf.math.l2_normalize(self.mlp(x, training=training), -1)


@tf.keras.utils.register_keras_serializable(package="muse_tf")
class TwoTowerModel(TwoOptimizerModel):
    """Two-tower retrieval model (module docstring).

    :meth:`compute_loss` takes a batch of *clicked* impressions: the user features are the
    query, ``item_id`` the positive candidate; the other items of the batch are the
    negatives (with ``logq_correction``, ``CANDIDATE_PROBABILITY`` holds each item's ``q``).
    It returns this replica's share of the global-batch mean loss (the summed
    cross-entropy over ``global batch``; on one device the batch mean), the convention of
    :class:`~muse_tf.training.step.TwoOptimizerModel`, which trains it with ``fit`` and two
    optimizers. :meth:`get_config` / :meth:`from_config` rebuild it (the frozen multimodal
    table is a weight: zeros until the weights are loaded).

    Args:
      config: model section (``id_embedding_dim``, ``short_term_len``, ``tower_units`` as the
        towers' hidden ReLU layers, ``use_user_attributes``).
      tower_dim: size of the query / candidate embeddings (``retrieval.tower_dim``).
      vocabularies: model-side vocabularies (or their dict form).
      mm_table: the frozen multimodal table to load (``ItemTables.mm_table``: int8 codes by
        reference; see :class:`~muse_tf.embeddings.FrozenMultimodalTable`), ``None`` to
        restore it from weights. Stored as ``config.mm_storage_dtype``.
      mm_dim: multimodal embedding size.
      temperature: softmax temperature of the in-batch loss (``retrieval.temperature``).
      logq_correction: subtract ``log q`` of each candidate from its logits (needs
        ``CANDIDATE_PROBABILITY`` in the training batches); the runs pass
        ``retrieval.logq_correction`` (default on), the class default is off so that a model
        saved without the field rebuilds as it was trained.
    """

    def __init__(self, config: ModelConfig, tower_dim: int,
                 vocabularies: Mapping[str, Vocabulary | dict],
                 mm_table: MultimodalCodes | np.ndarray | None = None,
                 mm_dim: int = schema.MM_EMBEDDING_DIM,
                 temperature: float = DEFAULT_TEMPERATURE, logq_correction: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(tower_dim, bool) or not isinstance(tower_dim, int) or tower_dim < 1:
            raise ValueError(f"retrieval.tower_dim must be a positive int, got {tower_dim!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.config = config
        self.tower_dim = tower_dim
        self.mm_dim = int(mm_dim)
        self.temperature = float(temperature)
        self.logq_correction = bool(logq_correction)
        self.features = FeatureEmbeddings(
            vocabularies, config.id_embedding_dim, mm_dim=mm_dim,
            short_term_len=config.short_term_len,
            use_user_attributes=config.use_user_attributes, mm_table=mm_table,
            mm_storage_dtype=config.mm_storage_dtype, name="features")
        self.user_tower = UserTower(self.features, config.tower_units, tower_dim,
                                    name="user_tower")
        self.item_tower = ItemTower(self.features, config.tower_units, tower_dim,
                                    name="item_tower")
        # SUM over the queries, divided by the global batch in compute_loss.
        self.task = tfrs.tasks.Retrieval(
            loss=tf.keras.losses.CategoricalCrossentropy(
                from_logits=True, reduction=tf.keras.losses.Reduction.SUM),
            temperature=self.temperature, remove_accidental_hits=True)

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "model_config": dataclasses.asdict(self.config),
                "tower_dim": self.tower_dim,
                "vocabularies": self.features.get_config()["vocabularies"],
                "mm_dim": self.mm_dim, "temperature": self.temperature,
                "logq_correction": self.logq_correction}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TwoTowerModel:
        config = dict(config)
        model_config = ModelConfig(**config.pop("model_config"))
        return cls(model_config, config.pop("tower_dim"), config.pop("vocabularies"), **config)

    def call(self, inputs: Mapping[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        """The query embedding ``[B, tower_dim]`` of the user features."""
        return self.user_tower(inputs, training=training)

    def build_for(self, batch: dict[str, tf.Tensor]) -> None:
        """Both towers' weights and the optimizers' slots (``call`` builds only the user
        tower)."""
        self.item_tower(tf.convert_to_tensor(batch[schema.ITEM_ID.name]), training=False)
        super().build_for(batch)

    def compute_loss(self, inputs: Mapping[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        """This replica's share of the global-batch mean in-batch softmax loss (module
        docstring): a scalar."""
        item_ids = tf.convert_to_tensor(inputs[schema.ITEM_ID.name])
        queries = self.user_tower(inputs, training=training)
        candidates = self.item_tower(item_ids, training=training)
        probability = None
        if self.logq_correction:
            if CANDIDATE_PROBABILITY not in inputs:
                raise KeyError(f"{self.name}: logq_correction needs the training batches' "
                               f"{CANDIDATE_PROBABILITY!r} feature (q of each item, [B])")
            probability = tf.cast(tf.reshape(inputs[CANDIDATE_PROBABILITY], [-1]),
                                  candidates.dtype)
        return self.in_batch_loss(queries, candidates, item_ids, probability, training=training)

    def in_batch_loss(self, queries: tf.Tensor, candidates: tf.Tensor, item_ids: tf.Tensor,
                      probability: tf.Tensor | None = None, training: bool = False
                      ) -> tf.Tensor:
        """The loss of the module docstring on given embeddings: scalar, this replica's share
        of the global-batch mean (summed cross-entropy / global batch)::

            s = u v^T / T - log q[None, :]      (u: queries [B, D], v: candidates [B, D])
            loss = -1/B_global Σ_b log softmax(s_b.)[b], accidental hits masked

        Args:
          queries: float ``[B, D]`` query embeddings (row ``b`` clicked candidate ``b``).
          candidates: float ``[B, D]`` candidate embeddings.
          item_ids: int64 ``[B]`` the candidates' items (for the accidental hits).
          probability: float ``[B]`` ``q`` of each candidate, or None: no correction
            (``tfrs.tasks.Retrieval`` clips it to ``[1e-6, 1]`` before the log).
        """
        loss = self.task(queries, candidates, candidate_ids=item_ids, compute_metrics=False,
                         candidate_sampling_probability=probability, training=training)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        global_batch = tf.cast(tf.shape(queries)[0] * replicas, loss.dtype)
        return loss / tf.maximum(global_batch, 1.0)

    def candidate_embeddings(self, item_ids: np.ndarray, batch_size: int = 8192,
                             out: np.ndarray | None = None) -> np.ndarray:
        """Item-tower embeddings of ``item_ids`` int64 ``[N]``: float32 ``[N, tower_dim]``.

        Each batch of ``batch_size`` ids is written straight into its rows of one array
        (``out``, or a new :func:`~muse_tf.index.brute_force.aligned_empty` one), so the
        embeddings take ``N * tower_dim * 4`` bytes (4.5 GB for 35.4M items x 32) plus one
        batch, never a list of parts and their concatenation (twice that). The new array is
        64-byte aligned, so :func:`~muse_tf.index.brute_force.brute_force_index` shares it
        instead of copying it. Returns the filled array.
        """
        item_ids = np.asarray(item_ids, dtype=np.int64)
        if item_ids.ndim != 1:
            raise ValueError(f"candidate_embeddings: item ids must be [N], got shape "
                             f"{item_ids.shape}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        shape = (len(item_ids), self.tower_dim)
        if out is None:
            out = aligned_empty(shape, np.float32)
        elif (not isinstance(out, np.ndarray) or out.shape != shape
              or out.dtype != np.float32 or not out.flags.writeable):
            raise ValueError(f"out must be a writeable float32 array of shape {shape}, got "
                             f"{type(out).__name__} {getattr(out, 'shape', None)} "
                             f"{getattr(out, 'dtype', None)}")
        embed = tf.function(lambda ids: self.item_tower(ids, training=False),
                            input_signature=[tf.TensorSpec([None], tf.int64)], autograph=False)
        for start in range(0, len(item_ids), batch_size):
            stop = min(start + batch_size, len(item_ids))
            out[start:stop] = embed(item_ids[start:stop])
        return out

    def embedding_variables(self) -> list[tf.Variable]:
        """Trainable ID-embedding tables (their own learning rate)."""
        return self.features.embedding_variables()
