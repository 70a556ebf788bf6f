"""SignatureDef helpers shared by the local server, the client and the benchmark.

A serving signature declares, per input alias, a graph tensor name, a dtype and a shape
(``TensorInfo``); ``-1`` in a shape means "any size", an absent shape means "any rank".
:class:`InputSpec` is that declaration in NumPy terms, and :func:`conform` checks one input
array against it, the same way on both sides:

* the dtype must match exactly (stock TF Serving does not cast either);
* the rank must match;
* a dimension declared ``-1`` takes any size;
* a dimension declared ``N`` rejects a size above ``N`` (naming the input and the maximum);
* a smaller size is an error too, unless ``pad=True`` and the dimension is not the first
  (batch) one: then the input is zero-padded at the end (right-padded, as the
  :mod:`muse_tf.schema` layout) up to ``N``.

Padding to the declared static size is a convenience of this project's server and client;
**stock TF Serving does not pad**, so a client that talks to stock TF Serving must send the
full static shapes (:mod:`serving.client` pads before sending, so it works against both).

:func:`request_layout` tells whether a signature is one of muse_tf's (ranking or retrieval)
and its static sizes, so that requests are built by :mod:`muse_tf.export.requests`.

:func:`missing_ops` / :func:`needs_scann` look at a SavedModel's MetaGraphDef before it is
loaded, and :func:`write_warmup_requests` / :func:`read_warmup_requests` handle the
``assets.extra/tf_serving_warmup_requests`` file TF Serving replays on load (the writer and
the file's name and limit are :mod:`muse_tf.export.warmup`'s).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

# isort: off
import muse_tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow's first import)
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2
# isort: on

from muse_tf.export import publish, requests, warmup

#: The signature a request without ``signature_name`` runs (as TF Serving), and the one
#: every muse_tf export serves.
DEFAULT_SIGNATURE = publish.SIGNATURE_NAME
#: The ``GetModelMetadata`` field that holds the signatures (the only one TF Serving has).
METADATA_FIELD = "signature_def"
#: The ``model_platform`` of a ``ModelConfig`` that serves SavedModels.
MODEL_PLATFORM = "tensorflow"
#: The tag set of the MetaGraphDef that TF Serving loads.
SERVE_TAG = tf.saved_model.SERVING
#: Where TF Serving looks for warm-up requests inside a SavedModel directory.
ASSETS_EXTRA_DIR = publish.ASSETS_EXTRA
WARMUP_FILE = warmup.WARMUP_FILE
#: TF Serving refuses warm-up files with more records than this.
MAX_WARMUP_RECORDS = warmup.MAX_WARMUP_RECORDS
#: Op-name prefix of the custom ops that ``import scann`` registers ("Scann>ScannSearch").
SCANN_OP_PREFIX = "Scann"


class InputError(ValueError):
    """A request input that does not fit its signature; the message names the input."""


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One input (or output) of a signature, as its ``TensorInfo`` declares it.

    Attributes:
      alias: the key in the signature's ``inputs`` map (what requests use).
      tensor_name: the graph tensor fed (``"serving_default_hist_item_id:0"``).
      dtype: the TensorFlow ``DataType`` enum value (``types_pb2.DT_INT64``).
      shape: the declared dims (``-1`` = any size), or ``None`` for an unknown rank.
    """

    alias: str
    tensor_name: str
    dtype: int
    shape: tuple[int, ...] | None

    @classmethod
    def from_tensor_info(cls, alias: str, info: meta_graph_pb2.TensorInfo) -> InputSpec:
        if info.WhichOneof("encoding") not in (None, "name"):
            raise InputError(
                f"signature tensor {alias!r} uses the {info.WhichOneof('encoding')} encoding; "
                "only dense tensors are supported")
        shape = None
        if not info.tensor_shape.unknown_rank:
            shape = tuple(int(d.size) for d in info.tensor_shape.dim)
        return cls(alias=alias, tensor_name=info.name, dtype=int(info.dtype), shape=shape)

    @property
    def tf_dtype(self) -> tf.DType:
        return tf.dtypes.as_dtype(self.dtype)

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(self.tf_dtype.as_numpy_dtype)

    def describe(self) -> str:
        """``"int64 [-1, 8]"`` (``"int64 [unknown rank]"``)."""
        shape = "[unknown rank]" if self.shape is None else f"[{', '.join(map(str, self.shape))}]"
        return f"{self.tf_dtype.name} {shape}"


def input_specs(signature: meta_graph_pb2.SignatureDef) -> dict[str, InputSpec]:
    """Alias -> :class:`InputSpec` for every input of ``signature``, sorted by alias."""
    return {alias: InputSpec.from_tensor_info(alias, signature.inputs[alias])
            for alias in sorted(signature.inputs)}


def output_specs(signature: meta_graph_pb2.SignatureDef) -> dict[str, InputSpec]:
    """Alias -> :class:`InputSpec` for every output of ``signature``, sorted by alias."""
    return {alias: InputSpec.from_tensor_info(alias, signature.outputs[alias])
            for alias in sorted(signature.outputs)}


def request_layout(signature: meta_graph_pb2.SignatureDef) -> requests.RequestLayout | None:
    """The muse_tf request layout (ranking or retrieval, static sizes) of ``signature``;
    None for a signature that is not one of muse_tf's."""
    specs = input_specs(signature)
    if requests.request_kind(specs) is None:
        return None
    try:
        return requests.RequestLayout.from_shapes(
            {alias: spec.shape for alias, spec in specs.items()})
    except ValueError as error:
        raise InputError(str(error)) from error


def dtype_name(dtype: int) -> str:
    """``"int64"`` for ``DT_INT64``; the enum name for values TensorFlow cannot map."""
    try:
        return tf.dtypes.as_dtype(dtype).name
    except TypeError:
        return types_pb2.DataType.Name(dtype) if dtype in types_pb2.DataType.values() else str(
            dtype)


def _shape_str(shape: Iterable[int]) -> str:
    return f"[{', '.join(str(int(d)) for d in shape)}]"


def check_shape(alias: str, shape: tuple[int, ...], spec: InputSpec, *, pad: bool) -> bool:
    """Check a sent ``shape`` against ``spec``; True when it needs padding.

    Raises:
      InputError: naming ``alias``, for a wrong rank, a size above a declared maximum, or a
        size below a declared static size that may not be padded.
    """
    if spec.shape is None:
        return False
    if len(shape) != len(spec.shape):
        raise InputError(
            f"input {alias!r} has rank {len(shape)} (shape {_shape_str(shape)}) but the "
            f"signature declares rank {len(spec.shape)} ({spec.describe()})")
    needs_padding = False
    for axis, (sent, declared) in enumerate(zip(shape, spec.shape, strict=True)):
        if declared < 0 or sent == declared:
            continue
        if sent > declared:
            raise InputError(
                f"input {alias!r} has size {sent} in dimension {axis} (shape "
                f"{_shape_str(shape)}), more than the maximum {declared} the signature "
                f"declares ({spec.describe()})")
        if not pad or axis == 0:
            why = ("the batch dimension is never padded" if pad and axis == 0
                   else "padding is off")
            raise InputError(
                f"input {alias!r} has size {sent} in dimension {axis} (shape "
                f"{_shape_str(shape)}) but the signature declares exactly {declared} "
                f"({spec.describe()}; {why})")
        needs_padding = True
    return needs_padding


def pad_to_static(array: np.ndarray, spec: InputSpec) -> np.ndarray:
    """``array`` zero-padded (``b""`` for strings) at the end of every dimension whose
    declared size is static and larger; call :func:`check_shape` first."""
    if spec.shape is None:
        return array
    widths = [(0, 0 if declared < 0 else declared - sent)
              for sent, declared in zip(array.shape, spec.shape, strict=True)]
    if not any(after for _, after in widths):
        return array
    fill: Any = b"" if array.dtype == object else 0
    return np.pad(array, widths, mode="constant", constant_values=fill)


def conform(alias: str, array: np.ndarray, spec: InputSpec, *, pad: bool) -> np.ndarray:
    """``array`` checked against ``spec`` (dtype, rank, dims) and padded if allowed.

    The dtype must already be the declared one (see :func:`coerce` for client-side casting).

    Raises:
      InputError: naming ``alias`` and what is wrong.
    """
    expected = spec.numpy_dtype
    if array.dtype != expected and not (expected.kind == "O" and array.dtype.kind in "OSU"):
        raise InputError(
            f"input {alias!r} has dtype {array.dtype} but the signature expects "
            f"{spec.describe()}")
    if check_shape(alias, tuple(array.shape), spec, pad=pad):
        return pad_to_static(array, spec)
    return array


def coerce(alias: str, value: Any, spec: InputSpec, *, expand_dims: bool = True) -> np.ndarray:
    """A client value (list, scalar or array) as an array of ``spec``'s dtype and rank.

    Integers are range-checked (an id outside int64 is an error, never wrapped); floats go to
    an integer input only when every value is integral (JSON may write ``5.0``). With
    ``expand_dims``, leading size-1 axes are added until the rank matches the signature: a
    single example (``[8]`` history for a ``[-1, 8]`` input, a scalar item id for a
    ``[-1, 4]`` input) becomes a batch of one.

    Raises:
      InputError: naming ``alias``, for values that do not fit the dtype.
    """
    target = spec.numpy_dtype
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as error:  # ragged nested lists
        raise InputError(f"input {alias!r} is not a rectangular array: {error}") from error
    if target.kind == "O":
        if array.size and array.dtype.kind not in "OSU":
            raise InputError(f"input {alias!r} must hold strings/bytes ({spec.describe()}), "
                             f"got dtype {array.dtype}")
        array = np.vectorize(lambda v: v.encode() if isinstance(v, str) else v,
                             otypes=[object])(array) if array.size else array.astype(object)
    elif array.dtype != target:
        array = _cast(alias, array, target, spec)
    if expand_dims and spec.shape is not None and array.ndim < len(spec.shape):
        array = array.reshape((1,) * (len(spec.shape) - array.ndim) + array.shape)
    return array


def _cast(alias: str, array: np.ndarray, target: np.dtype, spec: InputSpec) -> np.ndarray:
    if array.size == 0:
        return array.astype(target)
    kind = array.dtype.kind
    if target.kind in "iu":
        if kind == "b":  # generic signatures may take flags as integers
            return array.astype(target)
        try:  # the range and integrality checks of muse_tf's request builder
            return requests.integer_array(alias, array, target, label=f"input {alias!r}")
        except ValueError as error:
            raise InputError(f"{error} (the signature expects {spec.describe()})") from error
    if target.kind in "fc":
        if kind not in "iubf" + ("c" if target.kind == "c" else ""):
            raise InputError(f"input {alias!r} has dtype {array.dtype} but the signature "
                             f"expects {spec.describe()}")
        return array.astype(target)
    if target.kind == "b":
        if kind != "b" and not np.all(np.isin(array, (0, 1))):
            raise InputError(f"input {alias!r} must be boolean ({spec.describe()})")
        return array.astype(target)
    raise InputError(f"input {alias!r} has dtype {array.dtype} but the signature expects "
                     f"{spec.describe()}")


def tensor_shape_of(proto: tensor_pb2.TensorProto) -> tuple[int, ...]:
    return tuple(int(d.size) for d in proto.tensor_shape.dim)


def parse_tensor(alias: str, proto: tensor_pb2.TensorProto) -> np.ndarray:
    """``proto`` as a NumPy array; a malformed proto is an :class:`InputError` naming
    ``alias``.

    A numeric tensor sent as ``tensor_content`` (what :func:`fill_tensor_proto` and
    ``tf.make_tensor_proto`` write) is viewed in place, read-only: no copy of a 1.6 MB
    history; everything else goes through ``tf.make_ndarray``.
    """
    dtype = _CONTENT_DTYPES.get(proto.dtype)
    if dtype is not None and proto.tensor_content and _LITTLE_ENDIAN:
        shape = tensor_shape_of(proto)
        content = proto.tensor_content
        if len(content) == int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            return np.frombuffer(content, dtype=dtype).reshape(shape)
    try:
        return tf.make_ndarray(proto)
    except Exception as error:  # TypeError / ValueError from malformed protos
        raise InputError(
            f"input {alias!r} is not a valid {dtype_name(proto.dtype)} TensorProto of shape "
            f"{_shape_str(tensor_shape_of(proto))}: {error}") from error


# ---------------------------------------------------------------------------------------------
# SavedModel inspection.
# ---------------------------------------------------------------------------------------------


def read_meta_graph(export_dir: str, tags: Iterable[str] = (SERVE_TAG,)
                    ) -> meta_graph_pb2.MetaGraphDef:
    """The MetaGraphDef of ``export_dir`` whose tag set is exactly ``tags`` (as the loader)."""
    from google.protobuf import text_format

    model = saved_model_pb2.SavedModel()
    binary = os.path.join(export_dir, "saved_model.pb")
    text = os.path.join(export_dir, "saved_model.pbtxt")
    if tf.io.gfile.exists(binary):
        with tf.io.gfile.GFile(binary, "rb") as f:
            model.ParseFromString(f.read())
    elif tf.io.gfile.exists(text):
        with tf.io.gfile.GFile(text, "r") as f:
            text_format.Parse(f.read(), model)
    else:
        raise FileNotFoundError(f"no saved_model.pb or saved_model.pbtxt in {export_dir}")
    wanted = set(tags)
    for meta_graph in model.meta_graphs:
        if set(meta_graph.meta_info_def.tags) == wanted:
            return meta_graph
    found = [sorted(m.meta_info_def.tags) for m in model.meta_graphs]
    raise ValueError(f"SavedModel at {export_dir} has no MetaGraphDef tagged {sorted(wanted)}; "
                     f"it has {found}")


def graph_ops(meta_graph: meta_graph_pb2.MetaGraphDef) -> set[str]:
    """Every op type used by the graph and its function library."""
    graph = meta_graph.graph_def
    ops = {node.op for node in graph.node}
    for function in graph.library.function:
        ops.update(node.op for node in function.node_def)
    return ops


def missing_ops(meta_graph: meta_graph_pb2.MetaGraphDef) -> list[str]:
    """Op types the graph uses that this process has not registered, sorted."""
    from tensorflow.python.framework import op_def_registry

    function_names = {f.signature.name for f in meta_graph.graph_def.library.function}
    return sorted(op for op in graph_ops(meta_graph)
                  if op not in function_names and op_def_registry.get(op) is None)


def needs_scann(meta_graph: meta_graph_pb2.MetaGraphDef) -> bool:
    """Whether the graph uses ScaNN's custom ops (registered by ``import scann``)."""
    return any(op.startswith(SCANN_OP_PREFIX) for op in missing_ops(meta_graph))


# ---------------------------------------------------------------------------------------------
# Warm-up requests (assets.extra/tf_serving_warmup_requests).
# ---------------------------------------------------------------------------------------------


warmup_path = warmup.warmup_path
#: Write ``PredictRequest`` protos as the warm-up file of an export directory.
write_warmup_requests = warmup.write_warmup_logs


def read_warmup_requests(export_dir: str) -> Iterator[Any]:
    """The ``PredictionLog`` records of ``export_dir``'s warm-up file (none if absent)."""
    from tensorflow_serving.apis import prediction_log_pb2

    path = warmup_path(export_dir)
    if not tf.io.gfile.exists(path):
        return
    for count, record in enumerate(tf.compat.v1.io.tf_record_iterator(path), start=1):
        if count > MAX_WARMUP_RECORDS:
            raise ValueError(f"warm-up file {path} has more than {MAX_WARMUP_RECORDS} records "
                             "(TF Serving's maximum)")
        log = prediction_log_pb2.PredictionLog()
        try:
            log.ParseFromString(record)
        except Exception as error:  # google.protobuf.message.DecodeError
            raise ValueError(f"record {count} of warm-up file {path} is not a "
                             f"PredictionLog: {error}") from error
        yield log


#: DataType -> NumPy dtype of the numeric tensors sent as raw ``tensor_content`` bytes.
_CONTENT_DTYPES = {tf.dtypes.as_dtype(d).as_datatype_enum: np.dtype(d) for d in (
    np.float32, np.float64, np.float16, np.int8, np.int16, np.int32, np.int64, np.uint8,
    np.uint32, np.uint64)}  # the types make_tensor_proto writes as tensor_content
_LITTLE_ENDIAN = sys.byteorder == "little"  # tensor_content is little-endian
#: The typed field ``make_tensor_proto`` puts a tensor of at most one element in.
_SMALL_VALUE_FIELDS = {types_pb2.DT_INT64: "int64_val", types_pb2.DT_INT32: "int_val",
                       types_pb2.DT_FLOAT: "float_val", types_pb2.DT_DOUBLE: "double_val"}


def fill_tensor_proto(proto: tensor_pb2.TensorProto, array: np.ndarray) -> None:
    """Write ``array`` into ``proto`` (e.g. ``request.inputs[alias]``, filled in place)
    exactly as ``tf.make_tensor_proto(array)`` encodes it.

    A numeric array of more than one element is its dtype, shape and raw bytes
    (``tensor_content``), set directly: ``make_tensor_proto``'s generic Python costs about
    0.3 ms a tensor, a few ms for a ranking request. Other arrays go through
    ``make_tensor_proto``.
    """
    array = np.asarray(array)
    datatype = tf.dtypes.as_dtype(array.dtype).as_datatype_enum if array.dtype.kind in "iuf" \
        else None
    small_field = _SMALL_VALUE_FIELDS.get(datatype)
    if not _LITTLE_ENDIAN or datatype not in _CONTENT_DTYPES or (
            array.size <= 1 and small_field is None):
        proto.CopyFrom(tf.make_tensor_proto(array))
        return
    proto.Clear()
    proto.dtype = datatype
    proto.tensor_shape.SetInParent()  # present even for a scalar, as make_tensor_proto
    for size in array.shape:
        proto.tensor_shape.dim.add().size = size
    if array.size > 1:
        proto.tensor_content = np.ascontiguousarray(array).tobytes()
    else:  # make_tensor_proto writes zero or one value to the typed field
        getattr(proto, small_field).extend(array.ravel().tolist())


def as_tensor_protos(arrays: Mapping[str, np.ndarray]) -> dict[str, tensor_pb2.TensorProto]:
    """Every array as a ``TensorProto`` (:func:`fill_tensor_proto`: ``tensor_content``
    encoding, compact)."""
    out = {}
    for name, array in arrays.items():
        out[name] = tensor_pb2.TensorProto()
        fill_tensor_proto(out[name], array)
    return out
