"""Versioned, atomic SavedModel publishing: TF Serving polls ``BASE/<version>/`` and must
never see a half-written version."""

from __future__ import annotations

import json
import os
from typing import Any

import tensorflow as tf

#: The one signature every muse_tf export serves.
SIGNATURE_NAME = "serving_default"
#: Signature description written beside every export (inputs, outputs, limits).
SIGNATURE_INFO_FILE = "muse_tf_signature.json"
ASSETS_EXTRA = "assets.extra"


def next_version(base_dir: str) -> int:
    """One above the highest numeric version directory under ``base_dir`` (1 if none)."""
    versions = [int(d.strip("/")) for d in tf.io.gfile.listdir(base_dir)
                if d.strip("/").isdigit()] if tf.io.gfile.exists(base_dir) else []
    return max(versions, default=0) + 1


def version_dirs(base_dir: str, version: int | None) -> tuple[str, str]:
    """``(temporary directory, version directory)`` of a new export under ``base_dir``.

    Raises ``FileExistsError`` when the version exists and ``ValueError`` for a version that
    is not a positive int; a stale temporary directory of the same version is removed.
    """
    version = next_version(base_dir) if version is None else version
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"export version must be a positive int, got {version!r}")
    version_dir = os.path.join(base_dir, str(version))
    if tf.io.gfile.exists(version_dir):
        raise FileExistsError(f"export version {version} exists already at {version_dir}")
    tmp_dir = os.path.join(base_dir, f".tmp-{version}")
    if tf.io.gfile.exists(tmp_dir):
        tf.io.gfile.rmtree(tmp_dir)
    tf.io.gfile.makedirs(base_dir)
    return tmp_dir, version_dir


def publish_export(tmp_dir: str, version_dir: str, info: dict[str, Any]) -> str:
    """Write ``assets.extra/muse_tf_signature.json`` into the finished export in ``tmp_dir``,
    then rename it to ``version_dir``; returns ``version_dir``."""
    extra = os.path.join(tmp_dir, ASSETS_EXTRA)
    tf.io.gfile.makedirs(extra)
    with tf.io.gfile.GFile(os.path.join(extra, SIGNATURE_INFO_FILE), "w") as f:
        f.write(json.dumps(info, indent=2))
    tf.io.gfile.rename(tmp_dir, version_dir)
    return version_dir


def describe(export_dir: str) -> dict[str, Any]:
    """The signature description written beside an export."""
    with tf.io.gfile.GFile(os.path.join(export_dir, ASSETS_EXTRA, SIGNATURE_INFO_FILE)) as f:
        return json.loads(f.read())


def spec_info(specs: dict[str, tf.TensorSpec]) -> dict[str, dict[str, Any]]:
    """``{name: {"dtype", "shape"}}`` of a signature's input specs, for the description."""
    return {name: {"dtype": spec.dtype.name, "shape": spec.shape.as_list()}
            for name, spec in specs.items()}
