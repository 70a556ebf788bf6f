"""bench scale's disk hygiene: a served run directory keeps its figures and logs only."""

from __future__ import annotations

import os

from muse_tf import bench_scale


def _write(path: str, size: int) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"x" * size)


def test_release_outputs_keeps_metrics_config_and_logs(tmp_path):
    run = tmp_path / "miss"
    _write(str(run / "metrics.json"), 10)
    _write(str(run / "config.yaml"), 20)
    _write(str(run / "logs" / "train" / "events"), 30)
    _write(str(run / "checkpoints" / "ckpt-1.data"), 1000)
    _write(str(run / "export" / "miss_retrieval" / "1" / "saved_model.pb"), 400)
    _write(str(run / "index_tree.npz"), 300)

    result = bench_scale._release_outputs(str(run))

    assert result["disk_GB"] == (10 + 20 + 30 + 1000 + 400 + 300) / 1e9
    assert result["disk_free_GB"] > 0
    assert sorted(os.listdir(run)) == ["config.yaml", "logs", "metrics.json"]
    assert (run / "logs" / "train" / "events").stat().st_size == 30


def test_release_outputs_of_a_missing_directory_is_empty(tmp_path):
    result = bench_scale._release_outputs(str(tmp_path / "never_written"))
    assert result["disk_GB"] == 0.0
