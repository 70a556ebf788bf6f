"""Signature checks, padding, casting, op scanning and warm-up files (no server)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import predict_pb2

from serving import signatures
from serving.signatures import InputError, InputSpec

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


def spec(shape, dtype=types_pb2.DT_INT64, alias="hist_item_id") -> InputSpec:
    return InputSpec(alias=alias, tensor_name=f"{alias}:0", dtype=dtype,
                     shape=None if shape is None else tuple(shape))


def test_input_specs_from_a_signature_def():
    signature = meta_graph_pb2.SignatureDef()
    info = signature.inputs["hist_item_id"]
    info.name, info.dtype = "serving_default_hist_item_id:0", types_pb2.DT_INT64
    info.tensor_shape.dim.add(size=-1)
    info.tensor_shape.dim.add(size=1000)
    signature.inputs["anything"].tensor_shape.unknown_rank = True
    specs = signatures.input_specs(signature)
    assert specs["hist_item_id"] == InputSpec(
        alias="hist_item_id", tensor_name="serving_default_hist_item_id:0",
        dtype=types_pb2.DT_INT64, shape=(-1, 1000))
    assert specs["hist_item_id"].describe() == "int64 [-1, 1000]"
    assert specs["anything"].shape is None


@pytest.mark.parametrize(("shape", "declared", "pad", "needs_padding"), [
    ((3, 1000), (-1, 1000), True, False),
    ((1, 1000), (-1, 1000), False, False),
    ((1, 17), (-1, -1), False, False),      # -1: any size, never padded
    ((1, 999), (-1, 1000), True, True),
    ((0, 5), (-1, 1000), True, True),       # an empty batch is fine
    ((2, 3, 4), None, False, False),        # unknown rank: anything goes
])
def test_check_shape_accepts(shape, declared, pad, needs_padding):
    assert signatures.check_shape("x", shape, spec(declared), pad=pad) is needs_padding


@pytest.mark.parametrize(("shape", "declared", "pad", "fragments"), [
    ((1, 1001), (-1, 1000), True, ["'x'", "size 1001", "dimension 1", "maximum 1000"]),
    ((1, 999), (-1, 1000), False, ["'x'", "size 999", "exactly 1000", "padding is off"]),
    ((1, 8), (2, 8), True, ["'x'", "dimension 0", "batch dimension is never padded"]),
    ((1000,), (-1, 1000), True, ["'x'", "rank 1", "rank 2"]),
    ((), (-1,), True, ["'x'", "rank 0"]),
])
def test_check_shape_rejects_naming_the_input(shape, declared, pad, fragments):
    with pytest.raises(InputError) as raised:
        signatures.check_shape("x", shape, spec(declared), pad=pad)
    for fragment in fragments:
        assert fragment in str(raised.value)


def test_pad_to_static_pads_at_the_end_with_zeros_and_empty_strings():
    ids = np.array([[INT64_MIN, 7], [INT64_MAX, -1]], dtype=np.int64)
    np.testing.assert_array_equal(
        signatures.pad_to_static(ids, spec([-1, 4])),
        [[INT64_MIN, 7, 0, 0], [INT64_MAX, -1, 0, 0]])
    text = np.array([[b"a"]], dtype=object)
    padded = signatures.pad_to_static(text, spec([-1, 3], types_pb2.DT_STRING))
    assert padded.tolist() == [[b"a", b"", b""]]
    untouched = np.zeros((2, 4), np.int64)
    assert signatures.pad_to_static(untouched, spec([-1, 4])) is untouched


def test_conform_checks_the_dtype_then_pads():
    with pytest.raises(InputError, match=r"'x' has dtype int32 .* int64 \[-1, 4\]"):
        signatures.conform("x", np.zeros((1, 4), np.int32), spec([-1, 4]), pad=True)
    out = signatures.conform("x", np.ones((2, 3), np.int64), spec([-1, 4]), pad=True)
    np.testing.assert_array_equal(out, [[1, 1, 1, 0], [1, 1, 1, 0]])


def test_coerce_keeps_int64_extremes_and_rejects_what_does_not_fit():
    out = signatures.coerce("x", [INT64_MIN, INT64_MAX, 0], spec([-1, 4]))
    assert out.dtype == np.int64 and out.shape == (1, 3)
    np.testing.assert_array_equal(out, [[INT64_MIN, INT64_MAX, 0]])
    with pytest.raises(InputError, match=rf"'x' .*{2**63}"):
        signatures.coerce("x", [2**63], spec([-1, 4]))
    with pytest.raises(InputError, match="'x' holds non-integral values"):
        signatures.coerce("x", [1.5], spec([-1, 4]))
    np.testing.assert_array_equal(signatures.coerce("x", [3.0, 4.0], spec([-1, 4])), [[3, 4]])
    with pytest.raises(InputError, match="'x' is not a rectangular array"):
        signatures.coerce("x", [[1, 2], [3]], spec([-1, 4]))


def test_coerce_expands_leading_axes_and_converts_strings_and_floats():
    assert signatures.coerce("x", 42, spec([-1, 4])).shape == (1, 1)
    assert signatures.coerce("x", 42, spec([-1])).tolist() == [42]
    assert signatures.coerce("x", 42, spec([-1]), expand_dims=False).shape == ()
    text = signatures.coerce("x", ["a", b"b"], spec([-1, 2], types_pb2.DT_STRING))
    assert text.tolist() == [[b"a", b"b"]]
    floats = signatures.coerce("x", [[1, 2]], spec([-1, 2], types_pb2.DT_FLOAT))
    assert floats.dtype == np.float32
    with pytest.raises(InputError, match="'x' must hold strings"):
        signatures.coerce("x", [1, 2], spec([-1, 2], types_pb2.DT_STRING))


def test_parse_tensor_names_the_input_of_a_malformed_proto():
    proto = tf.make_tensor_proto(np.zeros((2, 8), np.int64))
    proto.tensor_content = b"\x01" * 3
    with pytest.raises(InputError, match="'hist' is not a valid int64 TensorProto"):
        signatures.parse_tensor("hist", proto)


@pytest.mark.parametrize("array", [
    np.zeros((2, 8), np.int64), np.array([[INT64_MIN, INT64_MAX, 0]]), np.array([5], np.int64),
    np.array([], np.int64), np.zeros((0, 4), np.float32), np.array(3, np.int32),
    np.array([2.5], np.float32), np.array([[1.5, -0.0]], np.float64), np.array(7.0),
    np.array([[np.nan, np.inf]], np.float32), np.array([7], np.int8),
    np.arange(12, dtype=np.float16).reshape(3, 4), np.array([1], np.float16),
    np.arange(6, dtype=np.uint16).reshape(2, 3), np.arange(6, dtype=np.uint32),
    np.array([True, False]), np.array([b"a", b"bc"], dtype=object),
    np.asfortranarray(np.arange(6).reshape(2, 3)), np.arange(10)[::2],
], ids=lambda a: f"{a.dtype}{list(a.shape)}")
def test_fill_tensor_proto_is_make_tensor_proto_and_parse_tensor_reads_it_back(array):
    proto = tf.make_tensor_proto(np.array([1, 2, 3], np.int64))  # stale content is replaced
    signatures.fill_tensor_proto(proto, array)
    expected = tf.make_tensor_proto(array)
    assert proto.SerializeToString() == expected.SerializeToString()
    (fast,) = signatures.as_tensor_protos({"x": array}).values()
    assert fast.SerializeToString() == expected.SerializeToString()
    back, reference = signatures.parse_tensor("x", proto), tf.make_ndarray(expected)
    assert back.dtype == reference.dtype and back.shape == reference.shape
    if array.dtype.kind == "f":
        np.testing.assert_array_equal(back, reference)  # NaN == NaN here
    else:
        assert back.tolist() == reference.tolist()


def test_parse_tensor_views_tensor_content_in_place_read_only():
    proto = tf.make_tensor_proto(np.arange(8, dtype=np.int64).reshape(2, 4))
    array = signatures.parse_tensor("hist", proto)
    assert array.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]] and not array.flags.writeable


def test_missing_ops_and_scann_detection():
    meta_graph = meta_graph_pb2.MetaGraphDef()
    meta_graph.graph_def.node.add(name="a", op="Placeholder")
    assert signatures.missing_ops(meta_graph) == []
    assert not signatures.needs_scann(meta_graph)
    function = meta_graph.graph_def.library.function.add()
    function.signature.name = "my_function"
    function.node_def.add(name="b", op="Scann>NotARealOpForTest")
    meta_graph.graph_def.node.add(name="c", op="my_function")  # calls are not ops
    assert signatures.missing_ops(meta_graph) == ["Scann>NotARealOpForTest"]
    assert signatures.needs_scann(meta_graph)
    meta_graph.graph_def.node[0].op = "SomethingElseForTest"
    assert signatures.missing_ops(meta_graph) == ["Scann>NotARealOpForTest",
                                                  "SomethingElseForTest"]


def test_warmup_file_round_trip_and_limit(tmp_path):
    requests = []
    for i in range(3):
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "m"
        request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.full([1, 2], i, np.int64)))
        requests.append(request)
    path = signatures.write_warmup_requests(str(tmp_path), requests)
    assert path == str(tmp_path / "assets.extra" / "tf_serving_warmup_requests")
    logs = list(signatures.read_warmup_requests(str(tmp_path)))
    assert [log.predict_log.request for log in logs] == requests
    assert list(signatures.read_warmup_requests(str(tmp_path / "none"))) == []
    with pytest.raises(ValueError, match="at most 1000"):
        signatures.write_warmup_requests(str(tmp_path), requests * 334)
