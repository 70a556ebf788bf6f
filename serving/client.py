"""gRPC client for TF Serving's ``PredictionService`` (stock TF Serving or :mod:`serving.server`).

Generic over signatures: inputs are a dict of alias -> array-like (lists, NumPy arrays,
scalars). With the signature known (one ``GetModelMetadata`` call per model and version,
cached), each input is cast to the declared dtype (range-checked, never wrapped), given
leading size-1 axes up to the declared rank (one example -> a batch of one) and zero-padded
at the end of every non-batch dimension whose declared size is static and larger, so the
request works against stock TF Serving, which does not pad. An input larger than a static
dimension is refused before sending, with a message naming it, and so is a request to a
muse_tf signature that the signature's own checks would reject
(:func:`muse_tf.export.requests.check_inputs`: one batch size, at most ``max_batch_size``
users, ``0 <= hist_len <= L``, ``0 <= num_candidates <= C``)::

    with PredictionClient("localhost:8500") as client:
        scores = client.predict("muse_ranking", {"hist_item_id": [[5, 9, 2]], ...})["scores"]

For the muse_tf signatures (ranking, retrieval) the request can also be *raw*: a user, the
history lists and (ranking) candidate mappings, built into the signature's inputs by
:mod:`muse_tf.export.requests` (:meth:`PredictionClient.request_layout`,
:func:`inputs_from_json`).

Command line (prints the response as JSON)::

    python -m serving.client --server localhost:8500 --model muse_ranking \\
        (--features request.json | --tfrecord FILE_OR_GLOB --index I [--num_candidates N])
        [--signature serving_default] [--version V]

``--features`` reads a JSON object: a raw request ``{"user": {...}, "history_items": [...],
"history_categories": [...], "candidates": [{...}, ...]}`` (no ``candidates`` for a
retrieval model) or ``{"input alias": nested list, ...}``. ``--tfrecord`` reads record ``I``
(0-based, counted across the sorted files a glob matches; GZIP when a name ends in ``.gz``)
holding either a ``PredictionLog`` (a warm-up file: its request's inputs are sent) or a Beam
``SequenceExample``: for the ranking signature, that record's user and as candidates the
targets of records ``I .. I+N-1`` (``N = --num_candidates``, default 1: the record's own
target); for a retrieval signature, the record's user; for any other signature, the record's
features by name (see :func:`features_from_record`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import grpc
import numpy as np

# isort: off
import muse_tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow's first import)
import tensorflow as tf
from tensorflow.core.example import example_pb2
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_log_pb2,
    prediction_service_pb2_grpc,
)
# isort: on

from muse_tf import schema
from muse_tf.export import requests
from serving import signatures
from serving.grpc_options import MAX_MESSAGE_BYTES, channel_options

DEFAULT_TIMEOUT_SECONDS = 30.0

__all__ = ["DEFAULT_TIMEOUT_SECONDS", "MAX_MESSAGE_BYTES", "PredictionClient",
           "build_predict_request", "channel_options", "features_from_record",
           "inputs_from_json", "inputs_from_tfrecord", "read_record", "read_records",
           "response_outputs"]


def run_command(prog: str, body: Callable[[], None],
                input_errors: tuple[type[Exception], ...] = (ValueError, OSError)) -> int:
    """The exit code of one serving CLI: runs ``body`` (which prints its own result) and
    maps its errors to a one-line message on stderr: 1 for a gRPC error (with its status
    code), 2 for ``input_errors`` (a bad request or file), 0 otherwise."""
    try:
        body()
    except grpc.RpcError as error:
        print(f"{prog}: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    except input_errors as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 2
    return 0


def build_predict_request(
    model: str,
    inputs: Mapping[str, Any],
    *,
    signature_name: str = signatures.DEFAULT_SIGNATURE,
    version: int | None = None,
    version_label: str | None = None,
    signature_def: meta_graph_pb2.SignatureDef | None = None,
    pad: bool = True,
    output_filter: Iterable[str] = (),
    max_batch_size: int | None = requests.DEFAULT_MAX_BATCH_SIZE,
) -> predict_pb2.PredictRequest:
    """A ``PredictRequest`` from raw inputs.

    Args:
      model: the model name.
      inputs: input alias -> array-like.
      signature_name: the signature to run.
      version, version_label: pin a version (at most one of them).
      signature_def: the signature's definition; with it, inputs are checked, cast, expanded
        and padded (see the module doc); without it they are sent as ``np.asarray`` makes
        them.
      pad: zero-pad smaller inputs up to static dimensions (needs ``signature_def``).
      output_filter: output aliases to return (default: all).
      max_batch_size: for a muse_tf signature, the most users the request may hold (the
        export's ``max_batch_size``, 128 unless it was exported with another; None: no
        limit here, the server's still applies).

    Raises:
      ValueError (:class:`serving.signatures.InputError`): an input that does not fit the
        signature, named; for a muse_tf signature, inputs its checks would reject.
    """
    if version is not None and version_label:
        raise ValueError("give a version or a version_label, not both")
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature_name
    if version is not None:
        request.model_spec.version.value = int(version)
    if version_label:
        request.model_spec.version_label = version_label
    request.output_filter.extend(output_filter)
    if signature_def is None:
        arrays = {alias: np.asarray(value) for alias, value in inputs.items()}
    else:
        specs = signatures.input_specs(signature_def)
        unknown = sorted(set(inputs) - set(specs))
        if unknown:
            raise signatures.InputError(
                f"input {unknown[0]!r} is not an input of signature {signature_name!r} "
                f"(unknown: {unknown}); it takes {sorted(specs)}")
        missing = sorted(set(specs) - set(inputs) - set(_defaults(signature_def)))
        if missing:
            raise signatures.InputError(
                f"missing input {missing[0]!r} ({specs[missing[0]].describe()}) required by "
                f"signature {signature_name!r}; missing: {missing}")
        arrays = {}
        for alias, value in inputs.items():
            spec = specs[alias]
            arrays[alias] = signatures.conform(alias, signatures.coerce(alias, value, spec),
                                               spec, pad=pad)
        layout = signatures.request_layout(signature_def)
        if layout is not None:
            try:
                layout.check(arrays, max_batch_size=max_batch_size)
            except ValueError as error:
                raise signatures.InputError(f"{error} (signature {signature_name!r})"
                                            ) from error
    for alias, array in arrays.items():
        signatures.fill_tensor_proto(request.inputs[alias], array)
    return request


def _defaults(signature_def: meta_graph_pb2.SignatureDef) -> Mapping[str, Any]:
    fields = signature_def.DESCRIPTOR.fields_by_name
    return signature_def.defaults if "defaults" in fields else {}


def response_outputs(response: predict_pb2.PredictResponse) -> dict[str, np.ndarray]:
    """Output alias -> NumPy array."""
    return {alias: tf.make_ndarray(proto) for alias, proto in response.outputs.items()}


class PredictionClient:
    """A channel to one server, with its signatures cached.

    Args:
      server: ``host:port``.
      timeout: seconds per call.
      max_message_bytes: send/receive limit of the channel.
      pad: pad inputs up to static dimensions (when the signature is known).
      max_batch_size: the most users a request to a muse_tf signature may hold (see
        :func:`build_predict_request`).
    """

    def __init__(self, server: str, *, timeout: float = DEFAULT_TIMEOUT_SECONDS,
                 max_message_bytes: int = MAX_MESSAGE_BYTES, pad: bool = True,
                 max_batch_size: int | None = requests.DEFAULT_MAX_BATCH_SIZE) -> None:
        self.server = server
        self.timeout = timeout
        self.pad = pad
        self.max_batch_size = max_batch_size
        self._channel = grpc.insecure_channel(server, options=channel_options(max_message_bytes))
        self._prediction = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._models = model_service_pb2_grpc.ModelServiceStub(self._channel)
        self._signature_defs: dict[tuple[str, int | None], dict[str, Any] | None] = {}

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> PredictionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- metadata and status ----------------------------------------------------------------

    def metadata(self, model: str, version: int | None = None
                 ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        """The raw ``GetModelMetadata`` response (``signature_def`` field)."""
        request = get_model_metadata_pb2.GetModelMetadataRequest()
        request.model_spec.name = model
        if version is not None:
            request.model_spec.version.value = int(version)
        request.metadata_field.append(signatures.METADATA_FIELD)
        return self._prediction.GetModelMetadata(request, timeout=self.timeout)

    def signature_defs(self, model: str, version: int | None = None
                       ) -> dict[str, meta_graph_pb2.SignatureDef] | None:
        """Signature name -> ``SignatureDef`` (one call per model/version, cached); None if
        the server does not implement ``GetModelMetadata``."""
        key = (model, version)
        if key not in self._signature_defs:
            try:
                response = self.metadata(model, version)
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                self._signature_defs[key] = None
            else:
                signature_map = get_model_metadata_pb2.SignatureDefMap()
                response.metadata[signatures.METADATA_FIELD].Unpack(signature_map)
                self._signature_defs[key] = dict(signature_map.signature_def)
        return self._signature_defs[key]

    def status(self, model: str, version: int | None = None
               ) -> list[get_model_status_pb2.ModelVersionStatus]:
        """``GetModelStatus``: one entry per version the server knows of."""
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = model
        if version is not None:
            request.model_spec.version.value = int(version)
        return list(self._models.GetModelStatus(request, timeout=self.timeout)
                    .model_version_status)

    # -- predict ----------------------------------------------------------------------------

    def signature_def(self, model: str, signature_name: str = signatures.DEFAULT_SIGNATURE,
                      version: int | None = None) -> meta_graph_pb2.SignatureDef | None:
        """The ``SignatureDef`` of ``signature_name`` (None if the server does not implement
        ``GetModelMetadata``); an unknown signature is an ``InputError`` naming it."""
        defs = self.signature_defs(model, version)
        if defs is None:
            return None
        if signature_name not in defs:
            raise signatures.InputError(
                f"model {model!r} has no signature {signature_name!r}; it has "
                f"{sorted(n for n in defs if not n.startswith('__'))}")
        return defs[signature_name]

    def request_layout(self, model: str, signature_name: str = signatures.DEFAULT_SIGNATURE,
                       version: int | None = None) -> requests.RequestLayout:
        """What the muse_tf signature ``signature_name`` of ``model`` takes (ranking or
        retrieval, its static sizes), to build raw requests for it.

        Raises:
          InputError: the server gives no signatures, or this one is not a muse_tf one.
        """
        signature_def = self.signature_def(model, signature_name, version)
        if signature_def is None:
            raise signatures.InputError(
                f"{self.server} does not implement GetModelMetadata: the signature of "
                f"{model!r}, needed to build a raw request, is unknown")
        layout = signatures.request_layout(signature_def)
        if layout is None:
            raise signatures.InputError(
                f"signature {signature_name!r} of {model!r} takes "
                f"{sorted(signature_def.inputs)}: not a muse_tf ranking or retrieval signature, "
                "so it takes {input alias: values}, not a raw request")
        return layout

    def build_request(self, model: str, inputs: Mapping[str, Any], *,
                      signature_name: str = signatures.DEFAULT_SIGNATURE,
                      version: int | None = None, version_label: str | None = None,
                      output_filter: Iterable[str] = ()) -> predict_pb2.PredictRequest:
        """:func:`build_predict_request` with the signature fetched from the server."""
        signature_def = self.signature_def(model, signature_name, version)
        return build_predict_request(model, inputs, signature_name=signature_name,
                                     version=version, version_label=version_label,
                                     signature_def=signature_def, pad=self.pad,
                                     output_filter=output_filter,
                                     max_batch_size=self.max_batch_size)

    def predict_response(self, request: predict_pb2.PredictRequest
                         ) -> predict_pb2.PredictResponse:
        return self._prediction.Predict(request, timeout=self.timeout)

    def predict(self, model: str, inputs: Mapping[str, Any], *,
                signature_name: str = signatures.DEFAULT_SIGNATURE, version: int | None = None,
                version_label: str | None = None,
                output_filter: Iterable[str] = ()) -> dict[str, np.ndarray]:
        """Run ``signature_name`` of ``model`` on ``inputs``; output alias -> array."""
        request = self.build_request(model, inputs, signature_name=signature_name,
                                     version=version, version_label=version_label,
                                     output_filter=output_filter)
        return response_outputs(self.predict_response(request))


# ---------------------------------------------------------------------------------------------
# Inputs from files.
# ---------------------------------------------------------------------------------------------


def _record_files(pattern: str) -> list[str]:
    if any(c in pattern for c in "*?["):
        files = sorted(tf.io.gfile.glob(pattern))
        if not files:
            raise FileNotFoundError(f"no TFRecord file matches {pattern!r}")
        return files
    if not tf.io.gfile.exists(pattern):
        raise FileNotFoundError(f"no TFRecord file {pattern!r}")
    return [pattern]


def read_records(pattern: str, index: int, count: int = 1) -> list[bytes]:
    """Records ``index .. index+count-1`` (0-based) of a TFRecord file, or of the sorted files
    a glob matches, counted across them (GZIP for names ending in ``.gz``)."""
    if index < 0:
        raise ValueError(f"record index must be >= 0, got {index}")
    if count < 1:
        raise ValueError(f"record count must be >= 1, got {count}")
    out: list[bytes] = []
    position = 0
    for path in _record_files(pattern):
        options = tf.io.TFRecordOptions(compression_type="GZIP" if path.endswith(".gz")
                                        else None)
        for record in tf.compat.v1.io.tf_record_iterator(path, options):
            if position >= index:
                out.append(record)
                if len(out) == count:
                    return out
            position += 1
    raise IndexError(f"{pattern} has fewer than {index + count} records ({position})")


def read_record(path: str, index: int) -> bytes:
    """Record ``index`` (0-based) of a TFRecord file or glob (see :func:`read_records`)."""
    return read_records(path, index, 1)[0]


def _prediction_log_inputs(record: bytes) -> dict[str, np.ndarray] | None:
    """The request inputs of a serialised ``PredictionLog`` (warm-up record), else None."""
    log = prediction_log_pb2.PredictionLog()
    try:
        log.ParseFromString(record)
    except Exception:  # google.protobuf.message.DecodeError: not a PredictionLog
        return None
    if log.WhichOneof("log_type") != "predict_log":
        return None
    return {alias: tf.make_ndarray(proto)
            for alias, proto in log.predict_log.request.inputs.items()}


def _feature_values(feature: example_pb2.Feature) -> np.ndarray:
    kind = feature.WhichOneof("kind")
    if kind == "int64_list":
        return np.asarray(feature.int64_list.value, dtype=np.int64)
    if kind == "float_list":
        return np.asarray(feature.float_list.value, dtype=np.float32)
    if kind == "bytes_list":
        return np.asarray(list(feature.bytes_list.value), dtype=object)
    return np.zeros([0], dtype=np.float32)


def features_from_record(record: bytes,
                         signature_def: meta_graph_pb2.SignatureDef | None = None
                         ) -> dict[str, np.ndarray]:
    """A record's features by name, for any signature (no schema involved).

    A ``PredictionLog`` gives its request's inputs. A ``SequenceExample``/``Example`` gives
    its context features as ``[1]`` arrays and its feature lists as ``[steps]`` arrays; with
    ``signature_def``, features it does not take are dropped and a missing
    :data:`muse_tf.schema.HISTORY_LENGTH` input is the number of steps. (For the muse_tf
    signatures, :func:`inputs_from_tfrecord` builds the full request instead.)
    """
    inputs = _prediction_log_inputs(record)
    if inputs is not None:
        return inputs
    example = example_pb2.SequenceExample()
    example.ParseFromString(record)
    features = {name: _feature_values(feature)
                for name, feature in example.context.feature.items()}
    steps = None
    for name, feature_list in example.feature_lists.feature_list.items():
        rows = [_feature_values(step) for step in feature_list.feature]
        widths = {row.size for row in rows}
        if len(widths) > 1:
            raise ValueError(f"feature list {name!r} has steps of different sizes {widths}")
        if rows and widths == {1}:
            features[name] = np.concatenate(rows)
        elif rows:
            features[name] = np.stack(rows)
        else:
            features[name] = np.zeros([0], dtype=np.int64)
        steps = len(rows) if steps is None else steps
    if signature_def is not None:
        wanted = set(signature_def.inputs)
        if (schema.HISTORY_LENGTH in wanted and schema.HISTORY_LENGTH not in features
                and steps is not None):
            features[schema.HISTORY_LENGTH] = np.asarray([steps], dtype=schema.LENGTH_DTYPE)
        features = {name: value for name, value in features.items() if name in wanted}
    return features


def inputs_from_tfrecord(pattern: str, index: int,
                         signature_def: meta_graph_pb2.SignatureDef | None,
                         num_candidates: int | None = None) -> dict[str, np.ndarray]:
    """A request's inputs from record ``index`` of a TFRecord file or glob.

    * a ``PredictionLog`` (warm-up record): its request's inputs;
    * a Beam ``SequenceExample`` and the muse_tf ranking signature: the record's user, and
      as candidates the targets of records ``index .. index + num_candidates - 1`` (default
      1: the record's own target), built by :mod:`muse_tf.export.requests` (history fitted
      to the signature's length, newest kept);
    * a ``SequenceExample`` and a muse_tf retrieval signature: the record's user;
    * any other signature: :func:`features_from_record`.
    """
    record = read_record(pattern, index)
    layout = None if signature_def is None else signatures.request_layout(signature_def)
    if num_candidates is not None and (layout is None or layout.kind != requests.RANKING):
        raise ValueError("num_candidates needs a muse_tf ranking signature and Beam records")
    inputs = _prediction_log_inputs(record)
    if inputs is not None:
        if num_candidates is not None:
            raise ValueError(f"record {index} of {pattern} is a warm-up PredictionLog: its "
                             "request is sent as it is, num_candidates does not apply")
        return inputs
    if layout is None:
        return features_from_record(record, signature_def)
    if layout.kind == requests.RETRIEVAL:
        batch = requests.examples_from_records([record], layout.max_seq_len)
        (query,) = requests.retrieval_queries_from_examples(
            batch, max_seq_len=layout.max_seq_len, num_requests=1)
        return query
    count = 1 if num_candidates is None else num_candidates
    if count < 1 or count > layout.max_candidates:  # type: ignore[operator]
        raise signatures.InputError(
            f"num_candidates {count}: the ranking signature takes 1 .. "
            f"{layout.max_candidates} candidates ({schema.ITEM_ID.name!r})")
    records = [record, *read_records(pattern, index + 1, count - 1)] if count > 1 else [record]
    batch = requests.examples_from_records(records, layout.max_seq_len)
    (request,) = requests.ranking_requests_from_examples(
        batch, max_seq_len=layout.max_seq_len, max_candidates=layout.max_candidates,
        num_requests=1, candidates_per_request=count)
    return request


def inputs_from_json(obj: Any, signature_def: meta_graph_pb2.SignatureDef | None
                     ) -> Mapping[str, Any]:
    """A request's inputs from a JSON value: a raw request (``{"user": ..., "history_items":
    ..., "history_categories": ..., ["candidates": ...]}``, built for the muse_tf signature
    ``signature_def``) or ``{input alias: values}`` (returned as it is)."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"a request is a JSON object (a raw request or {{input alias: "
                         f"values}}), got {type(obj).__name__}")
    if not requests.is_raw_request(obj):
        return obj
    layout = None if signature_def is None else signatures.request_layout(signature_def)
    if layout is None:
        raise signatures.InputError(
            f"a raw request ({list(requests.RAW_REQUEST_KEYS)}) needs a muse_tf ranking or "
            "retrieval signature; this signature takes "
            f"{sorted(signature_def.inputs) if signature_def is not None else 'unknown inputs'}")
    return layout.from_raw(obj)


def _to_jsonable(array: np.ndarray) -> Any:
    if array.dtype.kind == "O":
        array = np.vectorize(
            lambda v: v.decode("utf-8", "replace") if isinstance(v, bytes) else v,
            otypes=[object])(array)
    return array.tolist()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serving.client",
        description="Send one Predict request to TF Serving or serving.server and print the "
                    "outputs as JSON.")
    parser.add_argument("--server", required=True, help="host:port of the gRPC server")
    parser.add_argument("--model", required=True)
    parser.add_argument("--signature", default=signatures.DEFAULT_SIGNATURE)
    parser.add_argument("--version", type=int, default=None)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--features", help="JSON file: a raw request or {input alias: nested "
                                           "list} ('-': stdin)")
    source.add_argument("--tfrecord", help="TFRecord file or glob of PredictionLogs or Beam "
                                           "SequenceExamples")
    parser.add_argument("--index", type=int, default=0, help="record index with --tfrecord")
    parser.add_argument("--num_candidates", type=int, default=None,
                        help="with --tfrecord and a ranking model: rank the targets of this "
                             "many records from --index on (default 1)")
    parser.add_argument("--no_pad", action="store_true",
                        help="send inputs as given (no padding to static dimensions)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_SECONDS)
    args = parser.parse_args(argv)
    if args.num_candidates is not None and args.tfrecord is None:
        parser.error("--num_candidates goes with --tfrecord")

    def query() -> None:
        with PredictionClient(args.server, timeout=args.timeout,
                              pad=not args.no_pad) as client:
            signature_def = client.signature_def(args.model, args.signature, args.version)
            if args.features is not None:
                if args.features == "-":
                    obj = json.load(sys.stdin)
                else:
                    with open(args.features) as f:
                        obj = json.load(f)
                inputs = inputs_from_json(obj, signature_def)
            else:
                inputs = inputs_from_tfrecord(args.tfrecord, args.index, signature_def,
                                              args.num_candidates)
            request = client.build_request(args.model, inputs, signature_name=args.signature,
                                           version=args.version)
            responses.append(client.predict_response(request))

    responses: list[predict_pb2.PredictResponse] = []
    code = run_command("serving.client", query, (ValueError, IndexError, OSError))
    if code:
        return code
    response = responses[0]
    outputs = response_outputs(response)
    print(json.dumps({
        "model": response.model_spec.name,
        "version": response.model_spec.version.value,
        "signature": response.model_spec.signature_name,
        "outputs": {alias: _to_jsonable(value) for alias, value in sorted(outputs.items())},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
