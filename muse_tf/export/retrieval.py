"""SavedModel exports of the retrieval indexes, for TF Serving and the local server.

Every export is a versioned directory ``EXPORT_ROOT/<model name>/<version>/`` (a training run
writes ``<model dir>/export/<model name>/<version>/``, :mod:`muse_tf.export.names`) with one
``serving_default`` signature (:func:`~muse_tf.export.signatures.retrieval_input_signature`)::

    inputs   user_id, user_attr_1 .. user_attr_5   int64 [B]
             hist_item_id, hist_category           int64 [B, L]  right-padded, oldest first
             hist_len                              int32 [B]
    outputs  item_ids                              int64 [B, k]  best first (0 = no item)
             scores                                float32 [B, k]

(raw ids, as in production logs; ``user_id`` is accepted so a client sends the same user
block as to the ranking model, but no retrieval model reads it). The signature checks its
inputs before searching (:func:`~muse_tf.export.signatures.checked_inputs`, stock ``Assert``
ops: ``INVALID_ARGUMENT`` in TF Serving too): one batch size ``B`` across the inputs,
``B <= max_batch_size`` (default 128) and ``0 <= hist_len <= L``. Warm-up requests (built by
:mod:`muse_tf.export.requests`) in ``assets.extra/tf_serving_warmup_requests`` and the
signature described in
``assets.extra/muse_tf_signature.json`` (as the ranking export, :mod:`muse_tf.export.ranking`).

* ``miss_retrieval``: the MISS tree beam search (:class:`MissTreeIndex`) — stock ops only;
* ``two_tower_brute_force``: user tower + exact top-k (TFRS ``BruteForce``) — stock ops only,
  the export for TF Serving's GPU image;
* ``two_tower_scann``: user tower + ScaNN top-k — holds ScaNN's custom ops (saved with
  ``namespace_whitelist=["Scann"]``), so it needs a ScaNN-enabled server: TF Serving built with
  ScaNN's ops (e.g. the ``google/tf-serving-scann`` image) or a Python server that imports
  ``scann`` before loading it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from muse_tf import schema
from muse_tf.export import names, requests
from muse_tf.export.publish import SIGNATURE_NAME, publish_export, spec_info, version_dirs
from muse_tf.export.signatures import (
    DEFAULT_MAX_BATCH_SIZE,
    ITEM_IDS,
    SCORES,
    check_max_batch_size,
    checked_inputs,
    retrieval_input_signature,
)
from muse_tf.export.warmup import write_warmup

__all__ = [
    "BRUTE_FORCE_MODEL_NAME",
    "EXPORT_DIR",
    "MISS_MODEL_NAME",
    "SCANN_MODEL_NAME",
    "RetrievalServingModule",
    "example_request",
    "export_retrieval",
    "serving_signature",
    "warmup_requests",
    "without_keras_traces",
]

EXPORT_DIR = names.EXPORT_DIR
MISS_MODEL_NAME = names.MISS_MODEL_NAME
BRUTE_FORCE_MODEL_NAME = names.BRUTE_FORCE_MODEL_NAME
SCANN_MODEL_NAME = names.SCANN_MODEL_NAME
#: The retrieval signature's input specs
#: (:func:`muse_tf.export.signatures.retrieval_input_signature`).
serving_signature = retrieval_input_signature
#: A random valid query (:func:`muse_tf.export.requests.random_retrieval_query`).
example_request = requests.random_retrieval_query


class RetrievalServingModule(tf.Module):
    """Wraps an index with ``index(features, k=k) -> (scores, ids)`` (a TFRS top-k layer or
    :class:`~muse_tf.models.miss_retrieval.MissTreeIndex`) into the serving function, which
    checks its inputs first (at most ``max_batch_size`` users per request)."""

    def __init__(self, index: Any, k: int, max_seq_len: int, name: str = "retrieval",
                 max_batch_size: int = DEFAULT_MAX_BATCH_SIZE) -> None:
        super().__init__(name=name)
        self.index = index
        self.k = int(k)
        self.max_seq_len = int(max_seq_len)
        self.max_batch_size = check_max_batch_size(max_batch_size)
        self.serve = tf.function(self._serve, input_signature=[serving_signature(max_seq_len)],
                                 autograph=False)

    def _serve(self, features: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        features = checked_inputs(features, max_seq_len=self.max_seq_len,
                                  max_batch_size=self.max_batch_size)
        scores, ids = self.index(features, k=self.k)
        return {ITEM_IDS: tf.cast(ids, tf.int64), SCORES: tf.cast(scores, tf.float32)}


def without_keras_traces() -> contextlib.AbstractContextManager:
    """Saving skips tf-keras's per-layer call traces (only needed to reload the layers as
    Keras objects; serving uses the signature), which makes the export about 4x faster (the
    ranking export uses it too). Falls back to a normal save if tf-keras moves the option."""
    try:
        from tf_keras.src.saving.legacy.saved_model import utils as keras_saved_model_utils

        return keras_saved_model_utils.keras_option_scope(save_traces=False,
                                                          in_tf_saved_model_scope=True)
    except (ImportError, AttributeError):
        return contextlib.nullcontext()


def warmup_requests(features: Mapping[str, np.ndarray] | None, max_seq_len: int,
                    num_requests: int = 8) -> list[dict[str, np.ndarray]]:
    """One-user queries for the warm-up file: rows of ``features`` (reader-style query
    features, e.g. test examples) or, without them, one random query."""
    if features is not None and len(features[schema.HISTORY_LENGTH]):
        return requests.retrieval_queries_from_examples(features, max_seq_len=max_seq_len,
                                                        num_requests=num_requests)
    return [requests.random_retrieval_query(max_seq_len)]


def export_retrieval(index: Any, model_root: str, *, k: int, max_seq_len: int,
                     version: int | None = None, scann: bool = False,
                     warmup_features: Mapping[str, np.ndarray] | None = None,
                     max_batch_size: int = DEFAULT_MAX_BATCH_SIZE) -> str:
    """Saves ``index`` as ``model_root/<version>`` with the ``serving_default`` signature.

    As the ranking export (:mod:`muse_tf.export.ranking`): written into a temporary directory and
    renamed, so a server polling ``model_root`` never sees a half-written version; warm-up
    requests and ``assets.extra/muse_tf_signature.json`` beside it.

    Args:
      index: ``index(features, k=k) -> (scores, ids)``: a TFRS ``BruteForce``/``ScaNN`` layer
        with the user tower as query model, or a ``MissTreeIndex``.
      model_root: the model's directory (its base name is the served model name).
      k: items per query in the signature's outputs.
      max_seq_len: the static history length L of the signature.
      version: the version sub-directory (default: one above the highest present).
      scann: the index holds ScaNN ops: saved with ``namespace_whitelist=["Scann"]``.
      warmup_features: reader-style query features whose first rows become the warm-up
        requests (default: one random request).
      max_batch_size: the most users one request may hold (the signature rejects more; a
        training run's ``train.export_max_batch_size``).

    Returns:
      The version directory.
    """
    check_max_batch_size(max_batch_size)
    tmp_dir, version_dir = version_dirs(model_root, version)
    module = RetrievalServingModule(index, k, max_seq_len, max_batch_size=max_batch_size)
    options = None
    if scann:
        from muse_tf.index.scann_index import scann_save_options

        options = scann_save_options()
    with without_keras_traces():
        tf.saved_model.save(module, tmp_dir, signatures={SIGNATURE_NAME: module.serve},
                            options=options)
    model_name = os.path.basename(os.path.normpath(model_root))
    write_warmup(tmp_dir, warmup_requests(warmup_features, max_seq_len), model_name=model_name)
    info = {"signature": SIGNATURE_NAME, "model_name": model_name, "max_seq_len": max_seq_len,
            "k": int(k), "max_batch_size": max_batch_size, "needs_scann_ops": bool(scann),
            "inputs": spec_info(serving_signature(max_seq_len)),
            "outputs": {ITEM_IDS: {"dtype": "int64", "shape": [None, int(k)]},
                        SCORES: {"dtype": "float32", "shape": [None, int(k)]}},
            "padding": "right-padded histories; item id 0 with score -inf where fewer than k "
                       "items were found"}
    return publish_export(tmp_dir, version_dir, info)
