"""The ranking export: a trained ranking model as a versioned SavedModel for TF Serving.

``python -m muse_tf.export --model-dir DIR [--version N]`` (also run at the end of training)
writes ``DIR/export/ranker/<version>/`` with:

* a ``serving_default`` signature (:func:`~muse_tf.export.signatures.ranking_input_signature`)
  whose inputs are raw ids as a production log has them, one row per user: the user features
  int64 ``[B]``, the lifelong history (right-padded item ids and categories int64 ``[B, L]``,
  ``L`` the model's maximum history length) with ``hist_len`` int32 ``[B]``, and up to ``C``
  candidate items (right-padded ids and attributes int64 ``[B, C]``) with ``num_candidates``
  int32 ``[B]``; output ``scores`` float32 ``[B, C]`` — the click probability of each
  candidate, 0 for padded candidate slots. No ragged tensors; the static maximums are the
  declared dimensions of the signature and are repeated in
  ``assets.extra/muse_tf_signature.json``. The signature checks its inputs before scoring
  (:func:`~muse_tf.export.signatures.checked_inputs`, stock ``Assert`` ops, so TF Serving
  answers ``INVALID_ARGUMENT`` too): one batch size ``B`` across the inputs,
  ``B <= max_batch_size`` (``train.export_max_batch_size``, default 128),
  ``0 <= hist_len <= L`` and ``0 <= num_candidates <= C``;
* the vocabulary files as SavedModel assets (raw id -> row lookups are in the graph);
* ``assets.extra/tf_serving_warmup_requests``: representative ``PredictionLog`` records that
  TF Serving replays when it loads the model, built by :mod:`muse_tf.export.requests` from
  test-split examples (the builder every client of the export uses).

TF Serving serves the base path ``DIR/export/ranker`` as ``muse_ranking``
(:data:`~muse_tf.export.names.RANKING_MODEL_NAME`).

Only stock TensorFlow ops are used (no ScaNN, no custom ops), so TF Serving's GPU image loads it.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from muse_tf import config as config_lib
from muse_tf import schema
from muse_tf.data import reader
from muse_tf.data.data_dir import DataDir
from muse_tf.export import names, requests, signatures
from muse_tf.export.publish import (
    SIGNATURE_NAME,
    describe,
    publish_export,
    spec_info,
    version_dirs,
)
from muse_tf.export.retrieval import without_keras_traces
from muse_tf.export.signatures import SCORES, checked_inputs, ranking_input_signature
from muse_tf.export.warmup import WARMUP_FILE, write_warmup
from muse_tf.models.factory import build_ranking_model
from muse_tf.training import runs

#: ``export/ranker``: where a run's ranking versions go, relative to its model directory.
EXPORT_SUBDIR = names.RANKING_EXPORT_SUBDIR
DEFAULT_MAX_CANDIDATES = 100
#: The name TF Serving serves EXPORT_SUBDIR under (serving/models.config).
SERVED_MODEL_NAME = names.RANKING_MODEL_NAME
#: Candidates per warm-up request (at most the export's max_candidates).
WARMUP_CANDIDATES = 16
_LENGTH_DTYPE = tf.dtypes.as_dtype(schema.LENGTH_DTYPE)

__all__ = ["DEFAULT_MAX_CANDIDATES", "EXPORT_SUBDIR", "SCORES", "SERVED_MODEL_NAME",
           "SIGNATURE_NAME", "WARMUP_FILE", "describe", "export_ranking_model",
           "ranking_input_signature", "restore_ranking_model", "warmup_batch"]


class RankingServingModule(tf.Module):
    """Holds the trained model and its serving function (stock ops only)."""

    def __init__(self, model: tf.keras.Model, max_seq_len: int, max_candidates: int,
                 max_batch_size: int = signatures.DEFAULT_MAX_BATCH_SIZE) -> None:
        super().__init__(name="ranking_serving")
        self.model = model
        self.max_seq_len = max_seq_len
        self.max_candidates = max_candidates
        specs = ranking_input_signature(max_seq_len, max_candidates)
        self.max_batch_size = signatures.check_max_batch_size(max_batch_size)
        self.serve = tf.function(self._serve, input_signature=[specs])

    def _serve(self, inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        inputs = checked_inputs(inputs, max_seq_len=self.max_seq_len,
                                max_candidates=self.max_candidates,
                                max_batch_size=self.max_batch_size)
        user = {name: inputs[name] for name in schema.QUERY_FEATURES}
        candidates = {f.name: inputs[f.name] for f in schema.ITEM_SIDE_FEATURES}
        scores = self.model.score_candidates(user, candidates, training=False)
        slots = tf.range(self.max_candidates, dtype=_LENGTH_DTYPE)[tf.newaxis, :]
        present = slots < inputs[schema.NUM_CANDIDATES][:, tf.newaxis]
        return {SCORES: tf.where(present, scores, tf.zeros_like(scores))}


def export_ranking_model(model: tf.keras.Model, config: config_lib.ExperimentConfig,
                         model_dir: str, version: int | None = None,
                         max_seq_len: int | None = None,
                         max_candidates: int = DEFAULT_MAX_CANDIDATES,
                         warmup_examples: dict[str, np.ndarray] | None = None,
                         num_warmup_requests: int = 8,
                         data: DataDir | None = None,
                         max_batch_size: int | None = None) -> str:
    """Write ``model_dir/export/ranker/<version>/``; returns that directory.

    ``data`` (default: the config's data directory) gives the default ``max_seq_len`` and the
    test examples the warm-up requests are built from. ``max_batch_size`` (default: the
    config's ``train.export_max_batch_size``) is the most users one request may hold; the
    signature rejects larger requests.
    """
    if max_batch_size is None:
        max_batch_size = config.train.export_max_batch_size
    signatures.check_max_batch_size(max_batch_size)
    tmp_dir, export_dir = version_dirs(names.ranking_base_path(model_dir), version)
    if not max_seq_len or warmup_examples is None:
        data = DataDir.open(data or config.data.data_dir)
        max_seq_len = max_seq_len or runs.max_seq_len_of(config, data)
    module = RankingServingModule(model, max_seq_len, max_candidates, max_batch_size)
    with without_keras_traces():  # the signature serves; Keras reloading is not needed
        tf.saved_model.save(module, tmp_dir, signatures={SIGNATURE_NAME: module.serve})
    if warmup_examples is None:
        warmup_examples = warmup_batch(data, max_seq_len)
    warmup = requests.ranking_requests_from_examples(
        warmup_examples, max_seq_len=max_seq_len, max_candidates=max_candidates,
        num_requests=num_warmup_requests, candidates_per_request=WARMUP_CANDIDATES)
    write_warmup(tmp_dir, warmup, model_name=SERVED_MODEL_NAME)
    specs = ranking_input_signature(max_seq_len, max_candidates)
    info = {"signature": SIGNATURE_NAME, "model_name": SERVED_MODEL_NAME,
            "max_seq_len": max_seq_len, "max_candidates": max_candidates,
            "max_batch_size": max_batch_size, "experiment": config.name, "inputs": spec_info(specs),
            "outputs": {SCORES: {"dtype": "float32", "shape": [None, max_candidates]}},
            "padding": "right-padded histories and candidates; scores of padded candidate "
                       "slots are 0"}
    return publish_export(tmp_dir, export_dir, info)


def warmup_batch(data: DataDir, max_seq_len: int, size: int = 64) -> dict[str, np.ndarray]:
    """A batch of test-split examples (train split when test is empty)."""
    for split in ("test", "train"):
        try:
            dataset = reader.make_dataset(data, split, size, max_seq_len=max_seq_len,
                                          shuffle=False, deterministic=True)
        except FileNotFoundError:
            continue
        for batch in dataset.take(1):
            return {k: v.numpy() for k, v in batch.items()}
    raise ValueError(f"{data.path}: no example in the test or train split to build warm-up "
                     "requests from")


def restore_ranking_model(model_dir: str) -> tuple[tf.keras.Model, config_lib.ExperimentConfig]:
    """Rebuild the model of a training run and load its latest checkpoint."""
    config = config_lib.ExperimentConfig()
    config_lib.apply_overrides(config, config_lib.load_yaml(os.path.join(model_dir,
                                                                         runs.CONFIG_FILE)))
    config.validate()
    checkpoint_dir = os.path.join(model_dir, runs.CHECKPOINT_DIR)
    checkpoint = tf.train.latest_checkpoint(checkpoint_dir)
    if checkpoint is None:
        candidates = sorted(tf.io.gfile.glob(os.path.join(checkpoint_dir, "ckpt-*.index")))
        if not candidates:
            raise FileNotFoundError(f"no checkpoint under {checkpoint_dir}")
        checkpoint = candidates[-1][: -len(".index")]
    data = DataDir.open(config.data.data_dir)
    model = build_ranking_model(config, data, model_dir)
    batch = next(iter(reader.make_dataset(data, "train", 2,
                                          max_seq_len=runs.max_seq_len_of(config, data),
                                          shuffle=False, deterministic=True)))
    model(batch)
    model.load_weights(checkpoint).expect_partial()
    return model, config
