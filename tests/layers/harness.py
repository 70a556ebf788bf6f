"""Shared checks for the layer tests: config round trip and SavedModel save → reload."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf


def assert_nested_close(actual: Any, expected: Any, atol: float = 1e-6,
                        rtol: float = 1e-6) -> None:
    """Same structure, same dtypes, values equal within tolerance (exact for ints/bools)."""
    tf.nest.assert_same_structure(actual, expected)
    for got, want in zip(tf.nest.flatten(actual), tf.nest.flatten(expected), strict=True):
        got, want = np.asarray(got), np.asarray(want)
        assert got.dtype == want.dtype, (got.dtype, want.dtype)
        if np.issubdtype(want.dtype, np.floating):
            np.testing.assert_allclose(got, want, atol=atol, rtol=rtol)
        else:
            np.testing.assert_array_equal(got, want)


def assert_config_round_trip(layer: tf.keras.layers.Layer, args: Sequence[Any],
                             kwargs: Mapping[str, Any] | None = None) -> None:
    """``get_config`` → ``from_config`` (directly and through the registered name) gives a
    layer with the same config that, given the same weights, computes the same outputs."""
    kwargs = dict(kwargs or {})
    expected = layer(*args, **kwargs)
    config = layer.get_config()
    json.dumps(config)  # configs are stored as JSON in SavedModels

    serialized = tf.keras.layers.serialize(layer)
    assert serialized["registered_name"] == f"muse_tf>{type(layer).__name__}", serialized
    for clone in (type(layer).from_config(config), tf.keras.layers.deserialize(serialized)):
        assert type(clone) is type(layer)
        clone(*args, **kwargs)  # builds the weights
        assert [w.shape for w in clone.weights] == [w.shape for w in layer.weights]
        clone.set_weights(layer.get_weights())
        assert_nested_close(clone(*args, **kwargs), expected)
        assert clone.get_config() == config


def _keras_input(name: str, value: np.ndarray) -> tf.keras.Input:
    value = np.asarray(value)
    return tf.keras.Input(shape=value.shape[1:], dtype=tf.as_dtype(value.dtype), name=name)


def _flat_named(args: Sequence[Any], kwargs: Mapping[str, Any]) -> list[tuple[str, np.ndarray]]:
    """``(name, array)`` of every tensor of ``args``/``kwargs``; dict args (a search unit's
    target/history) contribute one entry per key, named ``arg_<i>_<key>``."""
    out = []
    for i, arg in enumerate(args):
        if isinstance(arg, Mapping):
            out += [(f"arg_{i}_{key}", np.asarray(v)) for key, v in sorted(arg.items())]
        else:
            out.append((f"arg_{i}", np.asarray(arg)))
    out += [(name, np.asarray(v)) for name, v in kwargs.items()]
    return out


def _nest(args: Sequence[Any], kwargs: Mapping[str, Any],
          flat: Sequence[Any]) -> tuple[list[Any], dict[str, Any]]:
    """``flat`` (in :func:`_flat_named` order) back into the structure of args/kwargs."""
    it = iter(flat)
    nested_args = [{key: next(it) for key in sorted(a)} if isinstance(a, Mapping) else next(it)
                   for a in args]
    return nested_args, {name: next(it) for name in kwargs}


def assert_saved_model_round_trip(layer: tf.keras.layers.Layer, args: Sequence[Any],
                                  kwargs: Mapping[str, np.ndarray] | None,
                                  directory: pathlib.Path) -> None:
    """A tiny functional model around ``layer``, saved in SavedModel format, reloads (a) with
    Keras as the same layer class and (b) with plain ``tf.saved_model.load`` (what TF Serving
    runs) and both give the same outputs as before saving (inference mode). Arguments may be
    arrays or dicts of arrays."""
    kwargs = dict(kwargs or {})
    named = _flat_named(args, kwargs)
    names = [n for n, _ in named]
    values = [v for _, v in named]
    inputs = [_keras_input(n, v) for n, v in named]
    call_args, call_kwargs = _nest(args, kwargs, inputs)
    outputs = layer(*call_args, **call_kwargs)
    model = tf.keras.Model(inputs=inputs, outputs=outputs)
    expected = model(values, training=False)

    specs = [tf.TensorSpec([None, *v.shape[1:]], tf.as_dtype(v.dtype), name=n)
             for n, v in named]

    @tf.function(input_signature=specs)
    def serve(*tensors: tf.Tensor) -> dict[str, tf.Tensor]:
        out = model(list(tensors), training=False)
        return dict(out) if isinstance(out, Mapping) else {"output": out}

    path = str(directory / "model")
    model.save(path, save_format="tf", signatures={"serving_default": serve})

    reloaded = tf.keras.models.load_model(path)
    assert type(reloaded.get_layer(layer.name)) is type(layer)
    assert_nested_close(reloaded(values, training=False), expected)

    serving = tf.saved_model.load(path).signatures["serving_default"]
    served = serving(**{n: tf.constant(v) for n, v in zip(names, values, strict=True)})
    assert_nested_close(served, dict(expected) if isinstance(expected, Mapping)
                        else {"output": expected})


def assert_round_trips(layer: tf.keras.layers.Layer, args: Sequence[np.ndarray],
                       kwargs: Mapping[str, np.ndarray] | None,
                       directory: pathlib.Path) -> None:
    """Both harness checks on fresh copies of ``layer`` (configured alike, unbuilt)."""
    config = layer.get_config()
    assert_config_round_trip(type(layer).from_config(config), args, kwargs)
    assert_saved_model_round_trip(type(layer).from_config(config), args, kwargs, directory)
