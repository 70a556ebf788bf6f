"""A local gRPC server with TF Serving's API over SavedModel export directories.

Implements ``tensorflow.serving.PredictionService`` (``Predict``, ``GetModelMetadata``) and
``tensorflow.serving.ModelService`` (``GetModelStatus``) the way ``tensorflow_model_server``
does, so one client works against both::

    python -m serving.server --model_name muse_ranking --model_base_path runs/muse/export/ranker
    python -m serving.server --model_config_file serving/models.pipeline.config --port 8500

Model layout (as TF Serving): ``BASE/<integer version>/saved_model.pb`` plus ``variables/``,
``assets/`` and optionally ``assets.extra/tf_serving_warmup_requests``.

* **Running a signature** is TF Serving's: one ``tf.compat.v1.Session`` per loaded version
  (``tf.compat.v1.saved_model.loader.load(sess, ["serve"], path)``), then ``sess.run`` of
  the signature's output tensors fed by its input tensors; no Python model code runs.
* **Versions**: the base path is polled every ``poll_seconds``; the version policy
  (``latest`` N, default 1; ``all``; ``specific``) picks the versions to serve. A new version
  is loaded and warmed up completely, then swapped in atomically; a retired version keeps its
  session until the requests running on it finish. A version that fails to load is reported
  by ``GetModelStatus`` (state ``END`` with the error) and retried on later polls (at most
  :data:`MAX_LOAD_ATTEMPTS` times, :data:`LOAD_RETRY_SECONDS` apart), while the previous
  version keeps serving. When no version is served at all (at startup) and the newest fails,
  the ``latest`` policy falls back to the newest older version that loads.
* **Warm-up**: ``assets.extra/tf_serving_warmup_requests`` (TFRecord of ``PredictionLog``)
  is replayed before a version becomes available; a failing record fails the load.
* **ScaNN**: a SavedModel whose graph uses ops not registered in this process and named
  ``Scann>...`` makes the server ``import scann`` (which registers them) before loading.
* **Requests** are checked against the signature: unknown, missing, wrong dtype, wrong rank
  and too-large inputs get ``INVALID_ARGUMENT`` naming the input. Smaller sizes in a
  non-batch dimension declared with a static size are zero-padded up to it (a convenience
  that stock TF Serving does not offer; ``--no_pad_inputs`` turns it off). Status codes follow
  TF Serving: unknown model or version ``NOT_FOUND``, unknown signature
  ``FAILED_PRECONDITION``. A batch (dimension 0) above ``max_batch_size`` (default 128) is
  ``INVALID_ARGUMENT`` before the tensors are decoded; the muse_tf signatures check their
  lengths and batch sizes themselves (:func:`muse_tf.export.signatures.checked_inputs`).
* Binds 127.0.0.1 unless told otherwise; 512 MiB gRPC messages
  (:data:`serving.grpc_options.MAX_MESSAGE_BYTES`, the client's too); a thread pool for concurrent
  requests; SIGTERM / SIGINT stop accepting, let running requests finish, exit 0.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc
import numpy as np

# isort: off
import muse_tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow's first import)
import tensorflow as tf
from google.protobuf import text_format
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)
from tensorflow_serving.config import model_server_config_pb2
# isort: on

from muse_tf.export.signatures import DEFAULT_MAX_BATCH_SIZE
from serving import signatures
from serving.grpc_options import (
    MAX_MESSAGE_BYTES,
    MAX_MESSAGE_MB_LIMIT,
    MIN_MESSAGE_MB_LIMIT,
    channel_options,
    check_message_bytes,
)

logger = logging.getLogger("serving.server")

#: Loads of one version tried before giving up (a version written in place may be partial),
#: at least LOAD_RETRY_SECONDS apart.
MAX_LOAD_ATTEMPTS = 5
LOAD_RETRY_SECONDS = 10.0
DEFAULT_PORT = 8500
DEFAULT_HOST = "127.0.0.1"

State = get_model_status_pb2.ModelVersionStatus.State
_GRPC_CODES = {code.value[0]: code for code in grpc.StatusCode}


class ServingError(Exception):
    """An error returned to the client with a gRPC status code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _invalid(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    """How the server runs.

    Attributes:
      host: interface to bind; ``127.0.0.1`` keeps the server local.
      port: gRPC port; 0 picks a free one (see :attr:`ServerHandle.port`).
      max_workers: threads answering requests concurrently.
      poll_seconds: period of the scan for new / removed version directories.
      pad_inputs: zero-pad inputs smaller than a static non-batch dimension (see module doc).
      max_message_bytes: gRPC send and receive limit (1 MiB .. 2047 MiB).
      max_batch_size: the largest dimension-0 size (batch) a request's input may have;
        larger requests are ``INVALID_ARGUMENT`` before the model runs.
      enable_warmup: replay ``assets.extra/tf_serving_warmup_requests`` on load.
      session_parallelism: intra/inter-op threads per session (0: TensorFlow's choice).
      grace_seconds: how long :meth:`ServerHandle.stop` waits for running requests.
    """

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    max_workers: int = 8
    poll_seconds: float = 1.0
    pad_inputs: bool = True
    max_message_bytes: int = MAX_MESSAGE_BYTES
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    enable_warmup: bool = True
    session_parallelism: int = 0
    grace_seconds: float = 30.0

    def __post_init__(self) -> None:
        if self.max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {self.max_workers}")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        check_message_bytes(self.max_message_bytes)
        if self.poll_seconds <= 0:
            raise ValueError(f"poll_seconds must be > 0, got {self.poll_seconds}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")


# ---------------------------------------------------------------------------------------------
# One loaded version: a session over a SavedModel.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Signature:
    definition: meta_graph_pb2.SignatureDef
    inputs: dict[str, signatures.InputSpec]
    outputs: dict[str, signatures.InputSpec]
    defaults: dict[str, np.ndarray]


class LoadedVersion:
    """One version of a model, loaded into its own graph and session.

    Thread-safe: requests run concurrently (``Session`` callables are), and the version
    counts them so that :meth:`retire` closes the session only after the last one.
    """

    def __init__(self, model_name: str, version: int, path: str, options: ServerOptions):
        self.model_name = model_name
        self.version = version
        self.path = path
        self._pad_inputs = options.pad_inputs
        self._max_batch_size = options.max_batch_size
        self._lock = threading.Lock()
        self._in_flight = 0
        self._retired = False
        self._closed = False
        self._callables: dict[tuple[str, tuple[str, ...]], Callable[..., Any]] = {}
        self.warmup_records = 0

        meta_graph = signatures.read_meta_graph(path)
        if signatures.needs_scann(meta_graph):
            logger.info("%s version %d uses ScaNN ops: importing scann", model_name, version)
            try:
                import scann  # noqa: F401  (registers the Scann>... ops)
            except ImportError as error:
                raise RuntimeError(f"SavedModel {path} uses ScaNN ops "
                                   f"{signatures.missing_ops(meta_graph)} but scann cannot be "
                                   f"imported ({error}); pip install scann") from error
        missing = signatures.missing_ops(meta_graph)
        if missing:
            raise RuntimeError(f"SavedModel {path} uses ops this TensorFlow does not register: "
                               f"{missing}")
        config = tf.compat.v1.ConfigProto(
            intra_op_parallelism_threads=options.session_parallelism,
            inter_op_parallelism_threads=options.session_parallelism,
            allow_soft_placement=True)
        config.gpu_options.allow_growth = True
        self._graph = tf.Graph()
        self._session = tf.compat.v1.Session(graph=self._graph, config=config)
        try:
            with self._graph.as_default():
                self.meta_graph = tf.compat.v1.saved_model.loader.load(
                    self._session, [signatures.SERVE_TAG], path)
            self._signatures = {
                name: _Signature(
                    definition=definition,
                    inputs=signatures.input_specs(definition),
                    outputs=signatures.output_specs(definition),
                    defaults={alias: tf.make_ndarray(proto)
                              for alias, proto in _defaults(definition).items()})
                for name, definition in self.meta_graph.signature_def.items()}
            if options.enable_warmup:
                self._warm_up()
        except BaseException:
            self._session.close()
            raise

    # -- requests --------------------------------------------------------------------------

    def acquire(self) -> bool:
        """Count a request in; False once the version is retired."""
        with self._lock:
            if self._retired:
                return False
            self._in_flight += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._in_flight -= 1
            close = self._retired and self._in_flight == 0
        if close:
            self._close()

    def retire(self) -> None:
        """No new requests; the session closes when the running ones have finished."""
        with self._lock:
            self._retired = True
            close = self._in_flight == 0
        if close:
            self._close()

    @property
    def closed(self) -> bool:
        return self._closed

    def _close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._session.close()
        logger.info("unloaded %s version %d", self.model_name, self.version)

    def signature_def_map(self) -> get_model_metadata_pb2.SignatureDefMap:
        out = get_model_metadata_pb2.SignatureDefMap()
        for name, definition in self.meta_graph.signature_def.items():
            out.signature_def[name].CopyFrom(definition)
        return out

    def predict(self, request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
        """Run ``request`` on this version (the caller holds :meth:`acquire`)."""
        name = request.model_spec.signature_name or signatures.DEFAULT_SIGNATURE
        signature = self._signatures.get(name)
        if signature is None:
            # TF Serving answers FAILED_PRECONDITION for an unknown signature key.
            raise ServingError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f'Serving signature key "{name}" not found. Model {self.model_name} version '
                f"{self.version} has signatures {sorted(self._signatures)}")
        if any(spec.dtype == 0 for spec in signature.outputs.values()):  # DT_INVALID: an op
            raise ServingError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"signature {name!r} of {self.model_name} version {self.version} runs an op "
                "and returns no tensors; it cannot serve Predict")
        feeds = self._inputs(name, signature, request)
        aliases = self._output_aliases(name, signature, request)
        run = self._callable(name, signature, aliases)
        try:
            values = run(*[feeds[alias] for alias in signature.inputs])
        except tf.errors.OpError as error:
            code = _GRPC_CODES.get(error.error_code, grpc.StatusCode.INTERNAL)
            raise ServingError(code, f"running signature {name!r} of {self.model_name} version "
                                     f"{self.version}: {error.message}") from error
        response = predict_pb2.PredictResponse()
        response.model_spec.name = self.model_name
        response.model_spec.version.value = self.version
        response.model_spec.signature_name = name
        for alias, value in zip(aliases, values, strict=True):
            signatures.fill_tensor_proto(response.outputs[alias], value)
        return response

    def _inputs(self, name: str, signature: _Signature,
                request: predict_pb2.PredictRequest) -> dict[str, np.ndarray]:
        sent = set(request.inputs)
        unknown = sorted(sent - set(signature.inputs))
        if unknown:
            raise _invalid(
                f"input {unknown[0]!r} is not an input of signature {name!r} "
                f"(unknown inputs: {unknown}); the signature takes "
                + ", ".join(f"{alias} ({spec.describe()})"
                            for alias, spec in signature.inputs.items()))
        missing = sorted(set(signature.inputs) - sent - set(signature.defaults))
        if missing:
            raise _invalid(
                f"missing input {missing[0]!r} ({signature.inputs[missing[0]].describe()}) "
                f"required by signature {name!r}; missing: {missing}")
        feeds = {}
        for alias, spec in signature.inputs.items():
            if alias not in sent:
                feeds[alias] = signature.defaults[alias]
                continue
            proto = request.inputs[alias]
            if proto.dtype != spec.dtype:
                raise _invalid(
                    f"input {alias!r} has dtype {signatures.dtype_name(proto.dtype)} but "
                    f"signature {name!r} expects {spec.describe()}")
            shape = signatures.tensor_shape_of(proto)
            # Shapes first: rejects an oversized input before decoding it.
            if (spec.shape and spec.shape[0] < 0 and shape
                    and shape[0] > self._max_batch_size):
                raise _invalid(
                    f"input {alias!r} has batch size {shape[0]} (dimension 0 of shape "
                    f"[{', '.join(map(str, shape))}]), more than the maximum "
                    f"{self._max_batch_size} this server takes (--max_batch_size); split the "
                    f"request (signature {name!r})")
            try:
                signatures.check_shape(alias, shape, spec, pad=self._pad_inputs)
                array = signatures.parse_tensor(alias, proto)
                feeds[alias] = signatures.conform(alias, array, spec, pad=self._pad_inputs)
            except signatures.InputError as error:
                raise _invalid(f"{error} (signature {name!r})") from error
        return feeds

    @staticmethod
    def _output_aliases(name: str, signature: _Signature,
                        request: predict_pb2.PredictRequest) -> tuple[str, ...]:
        if not request.output_filter:
            return tuple(signature.outputs)
        seen: set[str] = set()
        for alias in request.output_filter:
            if alias not in signature.outputs:
                raise _invalid(f"output tensor alias not found in signature {name!r}: {alias}. "
                               f"Outputs expected to be in the set {sorted(signature.outputs)}")
            if alias in seen:
                raise _invalid(f"duplicate output tensor alias: {alias}")
            seen.add(alias)
        return tuple(request.output_filter)

    def _callable(self, name: str, signature: _Signature,
                  aliases: tuple[str, ...]) -> Callable[..., Any]:
        key = (name, aliases)
        run = self._callables.get(key)
        if run is None:
            with self._lock:
                run = self._callables.get(key)
                if run is None:
                    run = self._session.make_callable(
                        [signature.outputs[a].tensor_name for a in aliases],
                        feed_list=[spec.tensor_name for spec in signature.inputs.values()])
                    self._callables[key] = run
        return run

    def _warm_up(self) -> None:
        start = time.monotonic()
        for count, log in enumerate(signatures.read_warmup_requests(self.path), start=1):
            kind = log.WhichOneof("log_type")
            if kind != "predict_log":
                raise ValueError(f"warm-up record {count} of {self.path} is a {kind}; this "
                                 "server replays predict_log records only")
            try:
                self.predict(log.predict_log.request)
            except ServingError as error:
                raise ValueError(f"warm-up record {count} of {self.path} failed: "
                                 f"{error.code.name}: {error.message}") from error
            self.warmup_records = count
        if self.warmup_records:
            logger.info("warmed up %s version %d with %d requests in %.2f s", self.model_name,
                        self.version, self.warmup_records, time.monotonic() - start)


def _defaults(definition: meta_graph_pb2.SignatureDef) -> dict[str, Any]:
    # SignatureDef.defaults (inputs that may be omitted) exists in recent TensorFlow only.
    return dict(definition.defaults) if "defaults" in definition.DESCRIPTOR.fields_by_name else {}


# ---------------------------------------------------------------------------------------------
# One model: its versions on disk, the policy, the loaded versions.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _VersionStatus:
    state: int
    error_code: int = 0
    error_message: str = ""


class ServedModel:
    """The versions of one ``ModelConfig`` entry: scanned, loaded, swapped, retired."""

    def __init__(self, config: model_server_config_pb2.ModelConfig, options: ServerOptions):
        if not config.name:
            raise ValueError("a model config entry has no name")
        if not config.base_path:
            raise ValueError(f"model {config.name!r} has no base_path")
        if config.model_platform not in ("", signatures.MODEL_PLATFORM):
            raise ValueError(f"model {config.name!r} has model_platform "
                             f"{config.model_platform!r}; only "
                             f"{signatures.MODEL_PLATFORM!r} is served")
        self.name = config.name
        self.base_path = config.base_path
        self.policy = config.model_version_policy
        self.labels = dict(config.version_labels)
        self._options = options
        self._lock = threading.Lock()
        self._poll_lock = threading.Lock()
        self._available: dict[int, LoadedVersion] = {}
        self._status: dict[int, _VersionStatus] = {}
        self._attempts: dict[int, tuple[int, float]] = {}  # version -> (count, last try)

    # -- versions on disk and the policy ---------------------------------------------------

    def versions_on_disk(self) -> list[int]:
        """Integer-named subdirectories holding a SavedModel, ascending."""
        if not tf.io.gfile.isdir(self.base_path):
            return []
        versions = []
        for entry in tf.io.gfile.listdir(self.base_path):
            entry = entry.rstrip("/")
            if not entry.isdigit():
                continue
            path = os.path.join(self.base_path, entry)
            if any(tf.io.gfile.exists(os.path.join(path, f))
                   for f in ("saved_model.pb", "saved_model.pbtxt")):
                versions.append(int(entry))
        return sorted(versions)

    def aspired(self, on_disk: Sequence[int]) -> list[int]:
        """The versions the policy wants served, given those on disk."""
        which = self.policy.WhichOneof("policy_choice")
        if which == "all":
            return list(on_disk)
        if which == "specific":
            wanted = set(self.policy.specific.versions)
            return [v for v in on_disk if v in wanted]
        count = self.policy.latest.num_versions if which == "latest" else 0
        return list(on_disk)[-max(count, 1):] if on_disk else []

    def poll(self) -> None:
        """Load aspired versions not loaded yet, then retire the ones no longer aspired."""
        with self._poll_lock:
            on_disk = self.versions_on_disk()
            aspired = self.aspired(on_disk)
            if not aspired:
                if self._available:
                    logger.warning("no servable version of %s in %s; keeping %s", self.name,
                                   self.base_path, sorted(self._available))
                return
            for version in sorted(set(aspired) - set(self._available), reverse=True):
                self._load(version)
            if not self._available:
                self._fall_back(on_disk, aspired)
            retire = [v for v in self._available if v not in aspired]
            if retire and any(v in self._available for v in aspired):
                with self._lock:
                    available = dict(self._available)
                    retired = [available.pop(v) for v in retire]
                    self._available = available
                for loaded in retired:
                    self._status[loaded.version] = _VersionStatus(State.UNLOADING)
                    loaded.retire()
                    self._status[loaded.version] = _VersionStatus(State.END)

    def _fall_back(self, on_disk: Sequence[int], aspired: Sequence[int]) -> None:
        """Nothing is served and the aspired versions failed to load: with the ``latest``
        policy, load the newest older version that loads (a corrupt newest version must
        not leave a server that starts with nothing to serve). It serves until an aspired
        version loads, then the usual swap retires it. ``all`` has no older versions and
        ``specific`` names its versions, so neither falls back."""
        if self.policy.WhichOneof("policy_choice") not in (None, "latest"):
            return
        failed = {v: self._status[v].error_message for v in aspired if v in self._status}
        tried = False
        for version in sorted((v for v in on_disk if v < min(aspired)), reverse=True):
            tried = self._load(version) or tried
            if version in self._available:
                logger.warning("%s: version(s) %s failed to load (%s); falling back to version "
                               "%d until a newer version loads", self.name, sorted(failed),
                               "; ".join(f"version {v}: {m}" for v, m in sorted(failed.items())),
                               version)
                return
        if tried:
            logger.error("%s: no version under %s loads (newest: %s)", self.name,
                         self.base_path, failed)

    def _load(self, version: int) -> bool:
        """Try to load ``version`` unless its attempts are used up or the last one is too
        recent; True when it tried (the result is in the status)."""
        attempts, last = self._attempts.get(version, (0, 0.0))
        if attempts >= MAX_LOAD_ATTEMPTS or (
                attempts and time.monotonic() - last < LOAD_RETRY_SECONDS):
            return False
        self._attempts[version] = (attempts + 1, time.monotonic())
        path = os.path.join(self.base_path, str(version))
        self._status[version] = _VersionStatus(State.LOADING)
        start = time.monotonic()
        try:
            loaded = LoadedVersion(self.name, version, path, self._options)
        except Exception as error:
            code = getattr(error, "error_code", grpc.StatusCode.UNKNOWN.value[0])
            self._status[version] = _VersionStatus(State.END, int(code),
                                                   f"{type(error).__name__}: {error}")
            logger.error("loading %s version %d from %s failed (attempt %d of %d): %s",
                         self.name, version, path, attempts + 1, MAX_LOAD_ATTEMPTS, error)
            return True
        with self._lock:  # the swap: new requests see the new version from here on
            self._available = {**self._available, version: loaded}
        self._status[version] = _VersionStatus(State.AVAILABLE)
        self._attempts.pop(version, None)  # a rollback to it later may load it again
        logger.info("loaded %s version %d from %s in %.2f s", self.name, version, path,
                    time.monotonic() - start)
        return True

    # -- requests --------------------------------------------------------------------------

    def _select(self, spec: Any) -> LoadedVersion:
        available = self._available
        if spec.HasField("version"):
            version = spec.version.value
            loaded = available.get(version)
            if loaded is None:
                raise ServingError(grpc.StatusCode.NOT_FOUND,
                                   f"Servable not found for request: Specific({self.name}, "
                                   f"{version}); available versions: {sorted(available)}")
            return loaded
        if spec.version_label:
            label = spec.version_label
            if label not in self.labels:
                raise _invalid(f"Unrecognized servable version label: {label} (model "
                               f"{self.name} has labels {sorted(self.labels)})")
            version = self.labels[label]
            loaded = available.get(version)
            if loaded is None:
                raise ServingError(grpc.StatusCode.NOT_FOUND,
                                   f"Servable not found for request: Specific({self.name}, "
                                   f"{version}) (label {label!r})")
            return loaded
        if not available:
            raise ServingError(grpc.StatusCode.NOT_FOUND,
                               f"Servable not found for request: Latest({self.name})")
        return available[max(available)]

    @contextlib.contextmanager
    def use(self, spec: Any) -> Iterator[LoadedVersion]:
        """The version ``spec`` asks for, held (not unloaded) while the block runs."""
        while True:
            with self._lock:
                loaded = self._select(spec)
                if loaded.acquire():
                    break
            # Retired between selection and acquisition: the next selection sees the swap.
        try:
            yield loaded
        finally:
            loaded.release()

    def status(self, version: int | None) -> list[get_model_status_pb2.ModelVersionStatus]:
        status = dict(self._status)
        if version is not None:
            if version not in status:
                raise ServingError(grpc.StatusCode.NOT_FOUND,
                                   f"Could not find version {version} of model {self.name}")
            status = {version: status[version]}
        if not status:
            raise ServingError(grpc.StatusCode.NOT_FOUND,
                               f"Could not find any versions of model {self.name}")
        out = []
        for v in sorted(status):
            entry = get_model_status_pb2.ModelVersionStatus(version=v, state=status[v].state)
            entry.status.error_code = status[v].error_code
            entry.status.error_message = status[v].error_message
            out.append(entry)
        return out

    @property
    def available_versions(self) -> list[int]:
        return sorted(self._available)

    def loaded(self, version: int) -> LoadedVersion:
        """The loaded version object (for tests and tools)."""
        return self._available[version]

    def close(self) -> None:
        with self._lock:
            retired, self._available = list(self._available.values()), {}
        for loaded in retired:
            loaded.retire()
            self._status[loaded.version] = _VersionStatus(State.END)


# ---------------------------------------------------------------------------------------------
# All models, the poller and the gRPC services.
# ---------------------------------------------------------------------------------------------


class ModelManager:
    """The served models and the thread that polls their base paths."""

    def __init__(self, config: model_server_config_pb2.ModelServerConfig,
                 options: ServerOptions):
        if config.WhichOneof("config") != "model_config_list":
            raise ValueError("the model server config must hold a model_config_list")
        entries = list(config.model_config_list.config)
        if not entries:
            raise ValueError("the model_config_list holds no model")
        names = [entry.name for entry in entries]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"model names appear more than once in the config: {duplicates}")
        self.models = {entry.name: ServedModel(entry, options) for entry in entries}
        self._options = options
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    def start(self) -> None:
        """Load the initial versions (blocking, as TF Serving), then poll in the background."""
        self.poll()
        self._poller = threading.Thread(target=self._poll_loop, name="model-poller",
                                        daemon=True)
        self._poller.start()

    def poll(self) -> None:
        for model in self.models.values():
            try:
                model.poll()
            except Exception:  # keep serving the loaded versions whatever the disk holds
                logger.exception("polling %s failed", model.name)

    def _poll_loop(self) -> None:
        while not self._stop.wait(self._options.poll_seconds):
            self.poll()

    def model(self, name: str) -> ServedModel:
        if not name:
            raise _invalid("ModelSpec has no name specified.")
        model = self.models.get(name)
        if model is None:
            raise ServingError(grpc.StatusCode.NOT_FOUND,
                               f"Servable not found for request: Latest({name}); this server "
                               f"serves {sorted(self.models)}")
        return model

    def close(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join()
        for model in self.models.values():
            model.close()

    # -- the three RPCs, protocol-free ---------------------------------------------------

    def predict(self, request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
        if not request.HasField("model_spec"):
            raise _invalid("Missing ModelSpec")
        with self.model(request.model_spec.name).use(request.model_spec) as loaded:
            return loaded.predict(request)

    def get_model_metadata(self, request: get_model_metadata_pb2.GetModelMetadataRequest
                           ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        if not request.HasField("model_spec"):
            raise _invalid("Missing ModelSpec")
        if not request.metadata_field:
            raise _invalid("GetModelMetadataRequest must specify at least one metadata_field")
        for field in request.metadata_field:
            if field != signatures.METADATA_FIELD:
                raise _invalid(f"Metadata field {field} is not supported")
        with self.model(request.model_spec.name).use(request.model_spec) as loaded:
            response = get_model_metadata_pb2.GetModelMetadataResponse()
            response.model_spec.name = loaded.model_name
            response.model_spec.version.value = loaded.version
            response.metadata[signatures.METADATA_FIELD].Pack(loaded.signature_def_map())
            return response

    def get_model_status(self, request: get_model_status_pb2.GetModelStatusRequest
                         ) -> get_model_status_pb2.GetModelStatusResponse:
        if not request.HasField("model_spec"):
            raise _invalid("Missing ModelSpec")
        spec = request.model_spec
        model = self.models.get(spec.name)
        if model is None:
            raise ServingError(grpc.StatusCode.NOT_FOUND,
                               f"Could not find any versions of model {spec.name}")
        version = spec.version.value if spec.HasField("version") else None
        return get_model_status_pb2.GetModelStatusResponse(
            model_version_status=model.status(version))


def _answer(context: grpc.ServicerContext, call: Callable[[], Any]) -> Any:
    try:
        return call()
    except ServingError as error:
        context.abort(error.code, error.message)
    except Exception as error:  # a bug, not a bad request: say so, keep serving
        logger.exception("internal error")
        context.abort(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}")


class _PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, manager: ModelManager):
        self._manager = manager

    def Predict(self, request, context):  # noqa: N802  (gRPC method name)
        return _answer(context, lambda: self._manager.predict(request))

    def GetModelMetadata(self, request, context):  # noqa: N802
        return _answer(context, lambda: self._manager.get_model_metadata(request))


class _ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, manager: ModelManager):
        self._manager = manager

    def GetModelStatus(self, request, context):  # noqa: N802
        return _answer(context, lambda: self._manager.get_model_status(request))


# ---------------------------------------------------------------------------------------------
# Starting and stopping.
# ---------------------------------------------------------------------------------------------


class ServerHandle:
    """A running server: :attr:`port`, :attr:`address`, :attr:`manager`, :meth:`stop`."""

    def __init__(self, server: grpc.Server, manager: ModelManager, host: str, port: int,
                 options: ServerOptions):
        self._server = server
        self.manager = manager
        self.host = host
        self.port = port
        self.options = options
        self._stopped = threading.Event()

    @property
    def address(self) -> str:
        """``host:port`` for a client (``[::1]:port`` for IPv6 hosts)."""
        host = self.host if ":" not in self.host or self.host.startswith("[") else (
            f"[{self.host}]")
        return f"{host}:{self.port}"

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting requests, wait up to ``grace`` seconds (default: the options')
        for running ones, then unload every model. Idempotent."""
        if self._stopped.is_set():
            return
        grace = self.options.grace_seconds if grace is None else grace
        self._server.stop(grace).wait()
        self.manager.close()
        self._stopped.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until :meth:`stop` has finished; False on timeout."""
        return self._stopped.wait(timeout)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def load_model_config(path: str) -> model_server_config_pb2.ModelServerConfig:
    """Parse a text-format ``ModelServerConfig`` (``models.config``)."""
    with open(path) as f:
        text = f.read()
    config = model_server_config_pb2.ModelServerConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as error:
        raise ValueError(f"{path} is not a text-format ModelServerConfig: {error}") from error
    return config


def single_model_config(name: str, base_path: str) -> model_server_config_pb2.ModelServerConfig:
    """The config ``--model_name`` / ``--model_base_path`` stand for (latest version)."""
    config = model_server_config_pb2.ModelServerConfig()
    entry = config.model_config_list.config.add()
    entry.name = name
    entry.base_path = base_path
    entry.model_platform = signatures.MODEL_PLATFORM
    return config


def serve(model_config: model_server_config_pb2.ModelServerConfig | str | None = None, *,
          model_name: str | None = None, model_base_path: str | None = None,
          options: ServerOptions | None = None, **option_overrides: Any) -> ServerHandle:
    """Load the models and start serving; returns once the initial versions are loaded.

    Args:
      model_config: a ``ModelServerConfig`` or the path of a text one; or give
        ``model_name`` and ``model_base_path`` instead.
      options: :class:`ServerOptions`; keyword overrides (``port=0``, ``poll_seconds=0.2``)
        are applied on top.

    Returns:
      A :class:`ServerHandle` (``.port`` is the bound port, useful with ``port=0``).
    """
    if (model_config is None) == (model_name is None or model_base_path is None):
        raise ValueError("give either model_config or both model_name and model_base_path")
    if isinstance(model_config, str):
        model_config = load_model_config(model_config)
    elif model_config is None:
        model_config = single_model_config(model_name, model_base_path)  # type: ignore[arg-type]
    options = dataclasses.replace(options or ServerOptions(), **option_overrides)

    manager = ModelManager(model_config, options)
    manager.start()
    message_options = [*channel_options(options.max_message_bytes), ("grpc.so_reuseport", 0)]
    server = grpc.server(
        concurrent.futures.ThreadPoolExecutor(max_workers=options.max_workers,
                                              thread_name_prefix="serving-rpc"),
        options=message_options)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        _PredictionService(manager), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(_ModelService(manager), server)
    host = options.host
    bind_host = host if ":" not in host or host.startswith("[") else f"[{host}]"
    try:
        port = server.add_insecure_port(f"{bind_host}:{options.port}")
    except RuntimeError as error:
        port = 0
        bind_error: Exception | None = error
    else:
        bind_error = None
    if port == 0:
        manager.close()
        raise OSError(f"cannot bind {bind_host}:{options.port}"
                      + (f": {bind_error}" if bind_error else ""))
    server.start()
    handle = ServerHandle(server, manager, host, port, options)
    for name, model in manager.models.items():
        logger.info("serving %s versions %s from %s", name, model.available_versions,
                    model.base_path)
    return handle


def _bounded_int(low: int, high: int | None = None, unit: str = "") -> Callable[[str], int]:
    """An argparse ``type``: an int in ``[low, high]`` (no upper bound when None); anything
    else is a one-line usage error naming the value and the range."""
    allowed = f">= {low}" if high is None else f"in [{low}, {high}]"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer (must be "
                                             f"{allowed}{unit})") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is out of range (must be {allowed}{unit})")
        return value

    parse.__name__ = "int"  # argparse names the type in some messages
    return parse


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line of ``python -m serving.server`` (flags as ``tensorflow_model_server``'s)."""
    parser = argparse.ArgumentParser(
        prog="python -m serving.server",
        description="Local TF Serving-compatible gRPC server (Predict, GetModelMetadata, "
                    "GetModelStatus) over SavedModel version directories.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model_config_file",
                        help="text-format ModelServerConfig (serving/models.config)")
    source.add_argument("--model_name", help="name of the single model to serve")
    parser.add_argument("--model_base_path",
                        help="directory of integer-named version directories (with --model_name)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help="gRPC port (0: pick a free one)")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="interface to bind (0.0.0.0 exposes the server to the network)")
    parser.add_argument("--max_workers", type=_bounded_int(1),
                        default=ServerOptions.max_workers,
                        help="requests answered concurrently (>= 1)")
    parser.add_argument("--max_batch_size", type=_bounded_int(1),
                        default=ServerOptions.max_batch_size,
                        help="largest dimension-0 size (users) of a request's inputs; larger "
                             "requests are INVALID_ARGUMENT before the model runs (>= 1)")
    parser.add_argument("--poll_seconds", type=float, default=ServerOptions.poll_seconds,
                        help="period of the scan for new version directories")
    parser.add_argument("--no_pad_inputs", action="store_true",
                        help="reject inputs smaller than a static dimension (stock TF Serving "
                             "behaviour) instead of zero-padding them")
    parser.add_argument("--no_warmup", action="store_true",
                        help="do not replay assets.extra/tf_serving_warmup_requests")
    parser.add_argument("--max_message_mb",
                        type=_bounded_int(MIN_MESSAGE_MB_LIMIT, MAX_MESSAGE_MB_LIMIT, " MiB"),
                        default=MAX_MESSAGE_BYTES // (1024 * 1024),
                        help="gRPC send/receive limit in MiB (1 .. 2047)")
    parser.add_argument("--session_parallelism", type=int, default=0)
    parser.add_argument("--grace_seconds", type=float, default=ServerOptions.grace_seconds,
                        help="how long shutdown waits for running requests")
    args = parser.parse_args(argv)
    if args.model_name is not None and not args.model_base_path:
        parser.error("--model_name needs --model_base_path")
    if args.model_config_file is not None and args.model_base_path:
        parser.error("--model_base_path goes with --model_name, not --model_config_file")
    return args


def serve_from_args(args: argparse.Namespace) -> ServerHandle:
    """:func:`serve` what a parsed command line (:func:`parse_args`) asks for."""
    options = ServerOptions(
        host=args.host, port=args.port, max_workers=args.max_workers,
        poll_seconds=args.poll_seconds, pad_inputs=not args.no_pad_inputs,
        max_message_bytes=args.max_message_mb * 1024 * 1024,
        max_batch_size=args.max_batch_size, enable_warmup=not args.no_warmup,
        session_parallelism=args.session_parallelism, grace_seconds=args.grace_seconds)
    return serve(args.model_config_file, model_name=args.model_name,
                 model_base_path=args.model_base_path, options=options)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        received.append(signum)
        stop.set()

    # Installed before loading so that a signal during a long load still exits cleanly.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        handle = serve_from_args(args)
    except (ValueError, OSError) as error:
        print(f"serving.server: {error}", file=sys.stderr)
        return 2
    # A machine-readable line for scripts and tests (the port matters with --port 0).
    print(f"serving.server: listening on {handle.address}", flush=True)
    while not stop.wait(1.0):
        pass
    logger.info("received %s: stopping (grace %.0f s)", signal.Signals(received[0]).name,
                handle.options.grace_seconds)
    handle.stop()
    logger.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
