"""Stage wall time and peak RSS (muse_tf.profiling)."""

import os
import subprocess
import sys
import time

import numpy as np

from muse_tf import profiling


def test_stage_timer_records_each_stage_peak():
    timer = profiling.StageTimer()
    with timer("small"):
        time.sleep(0.01)
    with timer("big"):
        block = np.ones(200 << 20 >> 3)  # 200 MB touched
        del block
    stages = timer.as_dict()
    assert list(stages) == ["small", "big"]
    assert stages["small"]["seconds"] >= 0.01
    if profiling.reset_peak_rss():  # Linux with clear_refs: peaks are per stage
        assert stages["big"]["peak_rss_bytes"] >= stages["small"]["peak_rss_bytes"] + 150e6


def test_tree_rss_counts_child_processes():
    child = subprocess.Popen([sys.executable, "-c",
                              "import time; b = b'x' * (300 << 20); time.sleep(30)"])
    try:
        sampler = profiling.TreeRssSampler(os.getpid(), interval=0.05)
        deadline = time.time() + 20
        while sampler.peak_bytes < profiling.rss_bytes() + 250e6 and time.time() < deadline:
            time.sleep(0.05)
        assert sampler.stop() >= profiling.rss_bytes() + 250e6
    finally:
        child.kill()
        child.wait()
