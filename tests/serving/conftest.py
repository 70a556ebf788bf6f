"""Fixtures of the serving tests: toy SavedModels (saved once), an in-process server, and the
exports serving/README.md's training commands write (tiny data, trained once)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

import muse_tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
from serving import client as client_lib
from serving import server as server_lib

from . import readme
from .toy_models import copy_versions, save_toy_ranker

#: Version -> scale of the toy ranker saved for that version.
SCALES = {1: 1.0, 2: 2.0}
MODEL = "toy"
#: The ``served`` fixture's --max_batch_size.
BIG_BATCHES = 200_000


@pytest.fixture(scope="session")
def toy_versions(tmp_path_factory: pytest.TempPathFactory) -> dict[int, str]:
    """Version -> directory of a saved :class:`ToyRanker` (scale 1.0 for 1, 2.0 for 2).
    Read-only: copy them (:func:`copy_versions`) into a base path to serve them."""
    root = tmp_path_factory.mktemp("toy_saved")
    return {version: save_toy_ranker(str(root / f"v{version}"), scale)
            for version, scale in SCALES.items()}


@pytest.fixture(scope="module")
def served(toy_versions: dict[int, str], tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[server_lib.ServerHandle]:
    """A server on a free port serving version 1 of the toy ranker as ``toy``."""
    base = copy_versions(toy_versions, os.fspath(tmp_path_factory.mktemp("served") / MODEL),
                         [1])
    # A batch limit far above the default 128: one test sends 100,000 rows.
    handle = server_lib.serve(model_name=MODEL, model_base_path=base, port=0,
                              poll_seconds=0.2, max_workers=4, max_batch_size=BIG_BATCHES)
    yield handle
    handle.stop(grace=5)


@pytest.fixture(scope="module")
def client(served: server_lib.ServerHandle) -> Iterator[client_lib.PredictionClient]:
    with client_lib.PredictionClient(served.address, timeout=20) as connection:
        yield connection


@pytest.fixture(scope="session")
def trained_runs(tiny_data_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A directory standing for the repository root, after serving/README.md's training
    commands (``python -m muse_tf.train --experiment muse|miss_retrieval --data "$DATA"``, run
    in it on the tiny data with :data:`readme.TINY_TRAINING` sizes): it holds
    ``runs/muse/export/ranker/1/`` and ``runs/miss_retrieval/export/miss_retrieval/1/``.
    Shared: add versions only if every user of it copes."""
    from muse_tf import train

    root = str(tmp_path_factory.mktemp("repository"))
    commands = readme.parse().commands_of("muse_tf.train")
    assert len(commands) == 2, commands
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)  # the commands write runs/<experiment> under the working directory
        for command in commands:
            args = readme.argv(command, {"DATA": tiny_data_dir})
            assert train.main([*args, *(f"--set={s}" for s in readme.TINY_TRAINING)]) == 0
    return root
