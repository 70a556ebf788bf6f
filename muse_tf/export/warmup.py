"""The one writer of TF Serving's warm-up file, ``assets.extra/tf_serving_warmup_requests``.

TF Serving replays these ``PredictionLog`` records when it loads a version, so the first
real request does not pay for graph set-up; it reads at most 1,000 of them (its
``kMaxNumRecords``), so more are refused here rather than silently ignored there. The
requests themselves come from :mod:`muse_tf.export.requests`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from muse_tf.export.publish import ASSETS_EXTRA, SIGNATURE_NAME

WARMUP_FILE = "tf_serving_warmup_requests"
#: TF Serving's limit on warm-up records per model version.
MAX_WARMUP_RECORDS = 1000


def warmup_path(export_dir: str) -> str:
    """``export_dir/assets.extra/tf_serving_warmup_requests``."""
    return os.path.join(export_dir, ASSETS_EXTRA, WARMUP_FILE)


def write_warmup_logs(export_dir: str, requests: Iterable[Any]) -> str:
    """Write ``PredictRequest`` protos as ``export_dir``'s warm-up file (one
    ``PredictionLog`` each); returns the file's path.

    Raises ``ValueError`` for no request or more than :data:`MAX_WARMUP_RECORDS`.
    """
    from tensorflow_serving.apis import prediction_log_pb2

    requests = list(requests)
    if not requests:
        raise ValueError(f"{export_dir}: no warm-up request to write")
    if len(requests) > MAX_WARMUP_RECORDS:
        raise ValueError(f"{len(requests)} warm-up requests: TF Serving reads at most "
                         f"{MAX_WARMUP_RECORDS}")
    path = warmup_path(export_dir)
    tf.io.gfile.makedirs(os.path.dirname(path))
    with tf.io.TFRecordWriter(path) as writer:
        for request in requests:
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())
    return path


def write_warmup(export_dir: str, requests: Sequence[Mapping[str, np.ndarray]],
                 model_name: str, signature_name: str = SIGNATURE_NAME) -> str:
    """One ``PredictionLog`` (a ``PredictRequest`` for ``model_name``) per input dict;
    returns the file's path."""
    from tensorflow_serving.apis import model_pb2, predict_pb2

    protos = []
    for inputs in requests:
        request = predict_pb2.PredictRequest(
            model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature_name))
        for name, value in inputs.items():
            request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
        protos.append(request)
    return write_warmup_logs(export_dir, protos)
