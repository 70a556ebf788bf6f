"""serving/README.md, run: every command of its ``bash`` blocks, its JSON request files and its
Python snippets, against the exports the README's own training commands write (tiny data,
``conftest.trained_runs``), from a directory standing for the repository root.

The ``python -m`` commands run in process through their ``main(argv)`` (the server through
``parse_args`` + ``serve_from_args`` on a free port instead of 8500, clients sent to that
port). The docker, curl and nvidia-smi lines need Docker and a GPU: they are checked against
the configs they use (paths, names, ports, flags), not run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import time
from collections.abc import Iterator

import numpy as np
import pytest
import yaml

from muse_tf import schema
from muse_tf.export import names
from muse_tf.export.__main__ import main as export_main
from muse_tf.export.publish import describe
from muse_tf.export.ranking import DEFAULT_MAX_CANDIDATES, WARMUP_CANDIDATES
from muse_tf.train import DEFAULT_RUNS_DIR
from serving import bench, pipeline, ranking
from serving import client as client_lib
from serving import server as server_lib

from . import readme

pytestmark = pytest.mark.slow

DOC = readme.parse()
MAINS = {"serving.client": client_lib.main, "serving.ranking": ranking.main,
         "serving.pipeline": pipeline.main, "serving.bench": bench.main}
#: Every program the README runs, and the test that runs (or checks) it.
PROGRAMS = {
    "muse_tf.train": "conftest.trained_runs, test_training_commands_write_the_documented_exports",
    "muse_tf.export": "test_server_commands_serve_the_exports_and_pick_up_a_new_version",
    "serving.server": "test_server_commands_serve_the_exports_and_pick_up_a_new_version",
    **{program: "test_client_commands" for program in MAINS},
    "docker": "test_docker_curl_and_nvidia_smi_lines_match_the_configs",
    "curl": "test_docker_curl_and_nvidia_smi_lines_match_the_configs",
    "nvidia-smi": "test_docker_curl_and_nvidia_smi_lines_match_the_configs",
}
RANKING_BASE = names.ranking_base_path(os.path.join(DEFAULT_RUNS_DIR, "muse"))
MISS_BASE = names.retrieval_base_path(os.path.join(DEFAULT_RUNS_DIR, "miss_retrieval"),
                                      names.MISS_MODEL_NAME)


def test_every_documented_command_is_run_or_checked_here():
    assert {readme.program_of(c) for c in DOC.commands} == set(PROGRAMS)
    assert sorted(DOC.json_files) == ["query.json", "ranking_request.json"]
    assert len(DOC.python_blocks) == 3


@pytest.fixture
def workspace(trained_runs, tiny_data, monkeypatch) -> dict[str, str]:
    """The README's variables, its JSON files and the pipeline config in the trained
    directory, which becomes the working directory."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for name, text in DOC.json_files.items():
        with open(os.path.join(trained_runs, name), "w") as f:
            f.write(text)
    os.makedirs(os.path.join(trained_runs, "serving"), exist_ok=True)
    shutil.copy(os.path.join(readme.SERVING_DIR, "models.pipeline.config"),
                os.path.join(trained_runs, "serving"))
    raw = os.path.join(trained_runs, "raw")
    os.makedirs(raw, exist_ok=True)
    items = {context[schema.ITEM_ID.name]: context
             for records in tiny_data.records.values() for context, _ in records}
    table = {f.key: pa.array([context[f.name] for context in items.values()], pa.int64())
             for f in schema.ITEM_SIDE_FEATURES}
    pq.write_table(pa.table(table), os.path.join(raw, "item_features.parquet"))
    monkeypatch.chdir(trained_runs)
    return {"DATA": tiny_data.path, "RAW": raw, "PWD": trained_runs}


@contextlib.contextmanager
def _server(command: str, variables: dict[str, str]) -> Iterator[server_lib.ServerHandle]:
    args = server_lib.parse_args(readme.argv(command, variables))
    assert args.port == 8500
    args.port = 0  # 8500 may be taken on a test machine
    handle = server_lib.serve_from_args(args)
    try:
        yield handle
    finally:
        handle.stop(grace=5)


def _server_command(flag: str) -> str:
    (command,) = [c for c in DOC.commands_of("serving.server") if flag in c]
    return command


def test_training_commands_write_the_documented_exports(trained_runs):
    ranking_version = os.path.join(trained_runs, RANKING_BASE, "1")
    miss_version = os.path.join(trained_runs, MISS_BASE, "1")
    assert describe(ranking_version)["model_name"] == names.RANKING_MODEL_NAME
    assert describe(miss_version)["model_name"] == names.MISS_MODEL_NAME
    for version in (ranking_version, miss_version):
        assert os.path.exists(os.path.join(version, "assets.extra",
                                           "tf_serving_warmup_requests"))
    with open(readme.README) as f:
        text = f.read()
    # The table of what training writes, in the names training uses.
    assert f"`runs/<experiment>/{names.RANKING_EXPORT_SUBDIR}/<version>/`" in text
    assert f"`{MISS_BASE}/<version>/`" in text
    assert f"`runs/two_tower/{names.EXPORT_DIR}/{names.BRUTE_FORCE_MODEL_NAME}/<version>/`" in text


def test_server_commands_serve_the_exports_and_pick_up_a_new_version(workspace):
    with _server(_server_command("--model_name"), workspace) as handle:
        model = handle.manager.models[names.RANKING_MODEL_NAME]
        assert list(handle.manager.models) == [names.RANKING_MODEL_NAME]
        assert model.base_path == RANKING_BASE and model.available_versions == [1]
        # python -m muse_tf.export publishes version 2; the server swaps to it.
        (command,) = DOC.commands_of("muse_tf.export")
        assert export_main(readme.argv(command, workspace)) == 0
        deadline = time.monotonic() + 120
        while model.available_versions != [2] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert model.available_versions == [2]
    with _server(_server_command("--model_config_file"), workspace) as handle:
        assert {name: served.base_path for name, served in handle.manager.models.items()} == {
            names.MISS_MODEL_NAME: MISS_BASE, names.RANKING_MODEL_NAME: RANKING_BASE}
        assert all(served.available_versions for served in handle.manager.models.values())


def _expected_candidates(argv: list[str]) -> int:
    """How many real candidates a documented ranking command sends."""
    if "--features" in argv or "--request" in argv:
        path = argv[argv.index("--features" if "--features" in argv else "--request") + 1]
        with open(path) as f:
            return len(json.load(f)["candidates"])
    if "--num_candidates" in argv:
        return int(argv[argv.index("--num_candidates") + 1])
    if argv[argv.index("--tfrecord") + 1].endswith("tf_serving_warmup_requests"):
        return WARMUP_CANDIDATES
    return 1  # a Beam record: its own target


def _check_scores(scores: np.ndarray, count: int) -> None:
    assert np.all((scores[:count] > 0) & (scores[:count] < 1)), scores
    np.testing.assert_array_equal(scores[count:], 0.0)


def test_client_commands(workspace, tiny_data, capsys):
    commands = [c for program in MAINS for c in DOC.commands_of(program)]
    assert len(commands) == 8
    with _server(_server_command("--model_config_file"), workspace) as handle:
        printed = {}
        for command in commands:
            argv = [handle.address if a == readme.DOCUMENTED_ADDRESS else a
                    for a in readme.argv(command, workspace)]
            code = MAINS[readme.program_of(command)](argv)
            out, err = capsys.readouterr()
            assert code == 0, f"`{command}` failed: {err[-2000:]}"
            printed[command] = json.loads(out)
            if readme.program_of(command) != "serving.client":
                continue
            outputs = printed[command]["outputs"]
            model = argv[argv.index("--model") + 1]
            if model == names.RANKING_MODEL_NAME:
                scores = np.asarray(outputs["scores"])
                assert scores.shape == (1, DEFAULT_MAX_CANDIDATES)
                _check_scores(scores[0], _expected_candidates(argv))
            else:
                assert model == names.MISS_MODEL_NAME
                assert np.asarray(outputs["item_ids"]).shape == np.asarray(
                    outputs["scores"]).shape
                assert np.count_nonzero(outputs["item_ids"]) > 0

        by_program = {readme.program_of(c): printed[c] for c in commands
                      if readme.program_of(c) != "serving.client"}
        # serving.ranking and the client send the same raw request: the same scores.
        (features,) = [c for c in DOC.commands_of("serving.client")
                       if "ranking_request.json" in c]
        ranked = by_program["serving.ranking"]["scores"]
        assert len(ranked) == 3
        np.testing.assert_allclose(ranked, printed[features]["outputs"]["scores"][0][:3],
                                   rtol=1e-6)
        # A Beam record's request is the one built from that record's raw values.
        (record,) = [c for c in DOC.commands_of("serving.client")
                     if "--index 3" in c and "--num_candidates" not in c]
        context, sequences = tiny_data.records["test"][3]
        with client_lib.PredictionClient(handle.address) as client:
            expected = ranking.rank(
                client, {f.name: context[f.name] for f in schema.USER_SIDE_FEATURES},
                sequences[schema.HISTORY_ITEM_ID.name], sequences[schema.HISTORY_CATEGORY.name],
                [{f.name: context[f.name] for f in schema.ITEM_SIDE_FEATURES}])
        np.testing.assert_allclose(printed[record]["outputs"]["scores"][0][:1], expected,
                                   rtol=1e-6)
        # The pipeline ranks what it retrieved, best first.
        retrieved = by_program["serving.pipeline"]
        assert retrieved and len(retrieved) <= DEFAULT_MAX_CANDIDATES
        scores = [r["ranking_score"] for r in retrieved]
        assert scores == sorted(scores, reverse=True) and all(0 < s < 1 for s in scores)
        assert all(r["item_id"] != 0 for r in retrieved)
        stats = by_program["serving.bench"]
        assert stats["requests"] == 200 and stats["errors"] == 0 and stats["concurrency"] == 2


def test_python_snippets(workspace, capsys):
    with _server(_server_command("--model_config_file"), workspace) as handle:
        namespace: dict = {}
        for block in DOC.python_blocks:
            code = compile(block.replace(readme.DOCUMENTED_ADDRESS, handle.address),
                           readme.README, "exec")
            exec(code, namespace)
    lines = capsys.readouterr().out.splitlines()
    own = namespace["handle"]  # the first snippet's server, stopped by the snippet
    assert lines[0] == f"{own.address} {own.port}" and own.port > 0
    assert json.loads(lines[1]) and lines[1] == str(sorted(json.loads(lines[1])))
    assert namespace["layout"].max_candidates == DEFAULT_MAX_CANDIDATES
    out = namespace["out"]["scores"]
    assert out.shape == (1, DEFAULT_MAX_CANDIDATES)
    _check_scores(out[0], len(namespace["candidates"]))
    assert namespace["stats"].requests == 200 and namespace["stats"].errors == 0


def test_docker_curl_and_nvidia_smi_lines_match_the_configs():
    root = os.path.dirname(readme.SERVING_DIR)
    with open(os.path.join(readme.SERVING_DIR, "docker-compose.yml")) as f:
        services = yaml.safe_load(f)["services"]
    (service_name,) = services
    service = services[service_name]
    config = server_lib.load_model_config(os.path.join(readme.SERVING_DIR, "models.config"))
    (entry,) = config.model_config_list.config
    assert entry.name == names.RANKING_MODEL_NAME
    compose_flags = dict(flag.lstrip("-").split("=", 1) for flag in service["command"])
    checked = 0
    for command in DOC.commands:
        words = shlex.split(command)
        program = readme.program_of(command)
        if program == "docker" and "compose" in words:
            compose_file = words[words.index("-f") + 1]
            assert os.path.samefile(os.path.join(root, compose_file),
                                    os.path.join(readme.SERVING_DIR, "docker-compose.yml"))
            if "up" in words:
                variable, value = words[0].split("=", 1)
                assert value == f"$PWD/{RANKING_BASE}"  # what training writes
                (volume,) = [v for v in service["volumes"] if variable in v]
                assert volume.split(":")[-2] == entry.base_path
            else:
                assert words[-1] == service_name
        elif program == "docker":
            assert words[:2] == ["docker", "run"]
            options = [(w, words[i + 1]) for i, w in enumerate(words) if w in ("-p", "-v")]
            ports = [v for flag, v in options if flag == "-p"]
            assert sorted(ports) == sorted(service["ports"])
            mounts = {}
            for flag, value in options:
                if flag == "-v":
                    host, container, mode = value.split(":")
                    assert mode == "ro" and host.startswith("$PWD/")
                    mounts[container] = host[len("$PWD/"):]
            assert mounts.pop(entry.base_path) == RANKING_BASE
            image_at = words.index(service["image"])
            flags = dict(w.lstrip("-").split("=", 1) for w in words[image_at + 1:])
            assert flags.items() <= compose_flags.items()
            for flag in ("model_config_file", "batching_parameters_file"):
                host = mounts.pop(flags[flag])
                assert os.path.exists(os.path.join(root, host)), host
            assert not mounts
        elif program == "curl":
            url = words[-1]
            assert url.startswith("http://127.0.0.1:8501/v1/models/")
            assert "127.0.0.1:8501:8501" in service["ports"]
            assert url.split("/v1/models/")[1].split("/")[0] == entry.name
        elif program == "nvidia-smi":
            assert words == ["nvidia-smi"]  # nothing to check without a GPU host
        else:
            continue
        checked += 1
    assert checked == sum(readme.program_of(c) in ("docker", "curl", "nvidia-smi")
                          for c in DOC.commands) == 6
