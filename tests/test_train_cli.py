"""python -m muse_tf.train: every registered ranking experiment, shrunk, trains and evaluates."""

import json
import os

import numpy as np
import pytest

from muse_tf import config as config_lib
from muse_tf import metrics as metrics_lib
from muse_tf import train
from muse_tf.training import evaluation, runs
from muse_tf.training.ranking import PREDICTIONS_FILE, run_ranking
from tests.data.test_split_checks import copy_data_dir, reshard, truncate, update_metadata

SHRINK = ["data.batch_size=4", "data.eval_batch_size=8", "model.top_k=4",
          "model.short_term_len=3", "model.num_tiers=4", "model.tower_units=[8]",
          "model.head_dim=4", "train.max_train_steps=1", "train.verbose=0",
          "train.export=false"]
RANKING = sorted(n for n in config_lib.experiments()
                 if config_lib.get_experiment(n).task == "ranking")


@pytest.mark.parametrize("name", RANKING)
def test_every_registered_experiment_trains_a_step_and_evaluates(name, tiny_data_dir,
                                                                  tmp_path):
    config = config_lib.resolve(name, assignments=SHRINK)
    result = run_ranking(config, str(tmp_path), tiny_data_dir)
    test = result["test"]
    assert test["examples"] == 16  # every test example of the tiny directory, once
    assert 0.0 <= test["auc"] <= 1.0 and 0.0 < test["logloss"] < 5.0
    # The reported figures are those of the saved per-example predictions, and the tiny test
    # split has two-class users, so GAUC is a number.
    predictions = np.load(os.path.join(str(tmp_path), PREDICTIONS_FILE))
    assert test["gauc"] == pytest.approx(metrics_lib.gauc(
        predictions["user_id"], predictions["label"], predictions["score"]))
    assert test["auc"] == pytest.approx(metrics_lib.auc(predictions["label"],
                                                        predictions["score"]))
    assert 0.0 <= test["gauc"] <= 1.0
    assert len(result["train_loss"]) == 1 and np.isfinite(result["train_loss"][0])
    with open(os.path.join(str(tmp_path), runs.METRICS_FILE)) as f:
        saved = json.load(f)
    assert set(saved["test"]) >= {"auc", "gauc", "logloss", "examples"}
    assert "train_examples_per_sec" in saved
    # Wall seconds and peak RSS of each part of the run (export only when it is on).
    parts = ["prepare", "model build", "train", "test evaluation"]
    assert list(saved["stages"])[:4] == parts
    assert all(saved["stages"][p]["seconds"] > 0 and saved["stages"][p]["peak_rss_bytes"] > 0
               for p in parts)
    resolved = config_lib.load_yaml(os.path.join(str(tmp_path), runs.CONFIG_FILE))
    assert resolved["model"]["top_k"] == 4 and resolved["name"] == name


def test_cli_writes_metrics_checkpoints_logs_and_export(tiny_data_dir, tmp_path, capsys):
    model_dir = str(tmp_path / "run")
    rc = train.main(["--experiment", "din", "--data", tiny_data_dir, "--model-dir", model_dir,
                     "--epochs", "1", "--batch-size", "4",
                     *[f"--set={a}" for a in SHRINK if not a.startswith("train.export")
                       and not a.startswith("data.batch_size")]])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| din |" in out and "GAUC" in out
    assert os.path.exists(os.path.join(model_dir, runs.METRICS_FILE))
    assert os.listdir(os.path.join(model_dir, "checkpoints"))
    assert os.listdir(os.path.join(model_dir, "logs"))
    export_dirs = os.listdir(os.path.join(model_dir, "export", "ranker"))
    assert export_dirs == ["1"]
    predictions = np.load(os.path.join(model_dir, PREDICTIONS_FILE))
    assert len(predictions["score"]) == 16


def test_evaluate_predictions_uses_gauc_and_logloss():
    predictions = {"user_id": np.array([1, 1, 2, 2, 3]),
                   "item_id": np.zeros(5, np.int64),
                   "label": np.array([1, 0, 0, 1, 1], np.float32),
                   "hist_len": np.zeros(5, np.int32),
                   "score": np.array([0.9, 0.1, 0.8, 0.2, 0.5], np.float32)}
    result = evaluation.evaluate_predictions(predictions)
    # user 1 ranks right, user 2 wrong, user 3 single-class (skipped): GAUC = 0.5.
    assert result["gauc"] == pytest.approx(0.5)
    assert result["examples"] == 5


def test_retrieval_task_is_refused_by_the_ranking_runner(tiny_data_dir, tmp_path):
    config = config_lib.get_experiment("miss_retrieval")
    with pytest.raises(ValueError, match="not a ranking task"):
        run_ranking(config, str(tmp_path), tiny_data_dir)


def test_a_longer_max_seq_len_than_the_data_warns(tiny_data_dir, tmp_path):
    """configs/long_history.yaml on 1,000-long data pads every history: say so."""
    config = config_lib.resolve("din", assignments=[*SHRINK, "data.max_seq_len=30"])
    with pytest.warns(UserWarning, match=r"data.max_seq_len=30 is longer than the histories"):
        result = run_ranking(config, str(tmp_path), tiny_data_dir)
    assert result["max_seq_len"] == 30


def test_cli_prints_one_summary_table_and_the_data_path(tiny_data_dir, tmp_path, capsys):
    rc = train.main(["--experiment", "din", "--data", tiny_data_dir,
                     "--model-dir", str(tmp_path / "run"),
                     *[f"--set={a}" for a in SHRINK]])
    assert rc == 0
    out = capsys.readouterr().out
    assert out.count("| experiment |") == 1 and "| din |" in out
    assert f"data: {tiny_data_dir}" in out


# --- refused before anything is built or trained -------------------------------------------

def _usage_error(argv: list[str], capsys) -> str:
    """The one-line message of ``python -m muse_tf.train`` exiting with status 2."""
    with pytest.raises(SystemExit) as caught:
        train.main(argv)
    assert caught.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("python -m muse_tf.train: error: ")
    return lines[-1]


def test_cli_refuses_a_lost_test_shard_before_training(tiny_data_dir, tmp_path, capsys):
    """Without the check, one of three test shards gone meant a test figure over two thirds
    of the split and metrics.json written without a word."""
    data_dir = copy_data_dir(tiny_data_dir, tmp_path / "data")
    lost = reshard(data_dir, "test", 3)[1]
    os.remove(lost)
    model_dir = tmp_path / "run"
    message = _usage_error(["--experiment", "din", "--data", data_dir, "--model-dir",
                            str(model_dir), *[f"--set={a}" for a in SHRINK]], capsys)
    assert "split 'test'" in message and f"missing from {data_dir}: {lost}" in message
    assert not model_dir.exists()  # nothing built, trained or written


def test_cli_names_the_truncated_shard_a_read_error_comes_from(tiny_data_dir, tmp_path):
    """TensorFlow says "truncated record at N", not which of the split's shards is cut."""
    import tensorflow as tf

    data_dir = copy_data_dir(tiny_data_dir, tmp_path / "data")
    shards = reshard(data_dir, "test", 3)
    truncate(shards[2])
    with pytest.raises(tf.errors.DataLossError,
                       match=rf"1 of the 3 record shards of split 'test' of {data_dir} cannot "
                             rf"be read: {shards[2]} \(truncated record"):
        train.main(["--experiment", "din", "--data", data_dir, "--model-dir",
                    str(tmp_path / "run"), *[f"--set={a}" for a in SHRINK]])


def test_cli_refuses_an_empty_train_split_with_the_build_counts(tiny_data_dir, tmp_path,
                                                                capsys):
    data_dir = copy_data_dir(tiny_data_dir, tmp_path / "data")
    update_metadata(data_dir, lambda m: m["splits"]["train"].update(
        rows_read=48, examples_written=0, rows_rejected=48,
        rejected={"no_item_features": 48}))
    message = _usage_error(["--experiment", "din", "--data", data_dir, "--model-dir",
                            str(tmp_path / "run"), *[f"--set={a}" for a in SHRINK]], capsys)
    assert f"split 'train' of {data_dir} holds no examples" in message
    assert "rows read 48, examples written 0, rows rejected 48 (no_item_features 48)" in message


@pytest.mark.parametrize("assignment", [
    "data.eval_batch_size=0", "data.batch_size=-4", "data.shuffle_buffer=0",
    "data.max_seq_len=-1", "data.min_count=-1", "data.seed=-1",
    "train.steps_per_execution=0", "train.dense_learning_rate=0",
    "train.embedding_learning_rate=-1e-3", "train.verbose=3", "model.dropout=1.5",
    "model.tower_units=[8,0]", "model.gsu_projection_dim=0", "retrieval.top_n=0",
    "retrieval.beam_width=0"])
def test_cli_bad_config_values_fail_before_any_data_is_read(assignment, tiny_data_dir,
                                                           tmp_path, capsys, monkeypatch):
    import time

    from muse_tf import demo
    from muse_tf.data.data_dir import DataDir

    def no_data(*args, **kwargs):
        raise AssertionError("data was opened or built before the config was checked")

    monkeypatch.setattr(DataDir, "open", no_data)
    monkeypatch.setattr(demo, "ensure_demo_data", no_data)
    start = time.perf_counter()
    message = _usage_error(["--data", tiny_data_dir, "--model-dir", str(tmp_path / "run"),
                            f"--set={assignment}"], capsys)
    assert time.perf_counter() - start < 1.0
    assert assignment.split("=")[0] in message
