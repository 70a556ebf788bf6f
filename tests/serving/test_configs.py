"""The shipped TF Serving configs parse as the protos tensorflow_model_server reads."""

from __future__ import annotations

import os

import pytest
import yaml
from google.protobuf import (
    descriptor_pb2,
    descriptor_pool,
    message_factory,
    text_format,
    wrappers_pb2,
)

from muse_tf.export import names
from muse_tf.export import signatures as export_signatures
from muse_tf.train import DEFAULT_RUNS_DIR
from serving import client as client_lib
from serving import grpc_options
from serving import server as server_lib

SERVING_DIR = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "serving")


def _batching_parameters_class():
    """tensorflow.serving.BatchingParameters (session_bundle_config.proto), which the pip
    package does not ship: the same fields, numbers and types, built here."""
    file = descriptor_pb2.FileDescriptorProto(
        name="muse_tf_test/batching_parameters.proto", package="muse_tf_test",
        syntax="proto3", dependency=["google/protobuf/wrappers.proto"])
    message = file.message_type.add(name="BatchingParameters")
    field = descriptor_pb2.FieldDescriptorProto
    for number, name, type_name in [(1, "max_batch_size", "Int64Value"),
                                    (2, "batch_timeout_micros", "Int64Value"),
                                    (3, "max_enqueued_batches", "Int64Value"),
                                    (4, "num_batch_threads", "Int64Value"),
                                    (5, "thread_pool_name", "StringValue")]:
        message.field.add(name=name, number=number, type=field.TYPE_MESSAGE,
                          label=field.LABEL_OPTIONAL,
                          type_name=f".google.protobuf.{type_name}")
    message.field.add(name="allowed_batch_sizes", number=6, type=field.TYPE_INT64,
                      label=field.LABEL_REPEATED)
    message.field.add(name="pad_variable_length_inputs", number=7, type=field.TYPE_BOOL,
                      label=field.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    wrappers = descriptor_pb2.FileDescriptorProto()
    wrappers_pb2.DESCRIPTOR.CopyToProto(wrappers)
    pool.Add(wrappers)
    pool.Add(file)
    descriptor = pool.FindMessageTypeByName("muse_tf_test.BatchingParameters")
    return message_factory.GetMessageClass(descriptor)


def test_models_config():
    config = server_lib.load_model_config(os.path.join(SERVING_DIR, "models.config"))
    (entry,) = config.model_config_list.config
    assert entry.name == names.RANKING_MODEL_NAME
    assert entry.base_path == f"/models/{names.RANKING_MODEL_NAME}"
    assert entry.model_platform == "tensorflow"
    assert entry.model_version_policy.latest.num_versions == 1


def test_pipeline_models_config_serves_what_training_writes():
    config = server_lib.load_model_config(os.path.join(SERVING_DIR, "models.pipeline.config"))
    entries = {entry.name: entry for entry in config.model_config_list.config}
    # python -m muse_tf.train --experiment NAME writes runs/NAME/export/...
    assert {name: entry.base_path for name, entry in entries.items()} == {
        names.MISS_MODEL_NAME: names.retrieval_base_path(
            os.path.join(DEFAULT_RUNS_DIR, "miss_retrieval"), names.MISS_MODEL_NAME),
        names.RANKING_MODEL_NAME: names.ranking_base_path(os.path.join(DEFAULT_RUNS_DIR,
                                                                       "muse")),
    }
    for entry in entries.values():
        assert entry.model_platform == "tensorflow"
        assert entry.model_version_policy.latest.num_versions == 1


def test_server_and_client_share_one_message_limit():
    assert grpc_options.MAX_MESSAGE_BYTES == 512 * 1024 * 1024
    assert server_lib.ServerOptions().max_message_bytes == grpc_options.MAX_MESSAGE_BYTES
    assert client_lib.MAX_MESSAGE_BYTES is grpc_options.MAX_MESSAGE_BYTES
    assert dict(client_lib.channel_options()) == {
        "grpc.max_send_message_length": grpc_options.MAX_MESSAGE_BYTES,
        "grpc.max_receive_message_length": grpc_options.MAX_MESSAGE_BYTES}
    assert server_lib.parse_args(["--model_name", "m", "--model_base_path", "b"]
                                 ).max_message_mb * 1024 * 1024 == grpc_options.MAX_MESSAGE_BYTES
    assert grpc_options.MAX_MESSAGE_MB_LIMIT == 2047  # 2 GiB overflows gRPC's int32
    for bad in (0, -1, 2**31, 1024 * 1024 - 1):
        with pytest.raises(ValueError, match=f"max_message_bytes must be in .*got {bad}"):
            client_lib.channel_options(bad)
    assert dict(client_lib.channel_options(2047 * 1024 * 1024))[
        "grpc.max_send_message_length"] < 2**31


def test_batching_parameters():
    with open(os.path.join(SERVING_DIR, "batching_parameters.txt")) as f:
        parameters = text_format.Parse(f.read(), _batching_parameters_class()())
    assert parameters.max_batch_size.value == 128
    # The signature's checks see the batched request: its limit must not be smaller.
    assert parameters.max_batch_size.value <= export_signatures.DEFAULT_MAX_BATCH_SIZE
    assert server_lib.ServerOptions().max_batch_size >= parameters.max_batch_size.value
    sizes = list(parameters.allowed_batch_sizes)
    assert sizes == sorted(sizes) and sizes[-1] == parameters.max_batch_size.value
    assert parameters.num_batch_threads.value >= 1
    assert 0 < parameters.batch_timeout_micros.value <= 10_000


def test_docker_compose_runs_the_pinned_gpu_image_on_localhost():
    with open(os.path.join(SERVING_DIR, "docker-compose.yml")) as f:
        service = yaml.safe_load(f)["services"]["tf-serving"]
    assert service["image"] == "tensorflow/serving:2.20.0-gpu"
    assert sorted(service["ports"]) == ["127.0.0.1:8500:8500", "127.0.0.1:8501:8501"]
    flags = dict(flag.lstrip("-").split("=", 1) for flag in service["command"])
    mounts = {volume.split(":")[-2]: volume.split(":")[-3] for volume in service["volumes"]}
    assert mounts[flags["model_config_file"]] == "./models.config"
    assert mounts[flags["batching_parameters_file"]] == "./batching_parameters.txt"
    assert flags["enable_batching"] == "true"
    assert f"/models/{names.RANKING_MODEL_NAME}" in mounts
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"]


@pytest.mark.parametrize("bad", ["model_config_list { config { name: 'x' base_pth: 'y' } }",
                                 "model_config_list { config { name: 'x' "])
def test_a_bad_models_config_is_named(tmp_path, bad):
    path = tmp_path / "models.config"
    path.write_text(bad)
    with pytest.raises(ValueError, match=r"models\.config is not a text-format"):
        server_lib.load_model_config(str(path))
