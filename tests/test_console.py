"""What a person sees: TensorFlow's C++ noise silenced unless --verbose, config errors as
one-line usage errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from muse_tf import train

_PROBE = ("import sys; from muse_tf import console; console.configure(sys.argv[1] == 'v'); "
          "import tensorflow as tf; tf.constant([1.0]) + 1.0; "
          "tf.config.list_physical_devices('GPU')")


def _stderr(mode: str) -> str:
    env = {k: v for k, v in __import__("os").environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                          env=env, timeout=120, check=True).stderr


#: What TensorFlow's C++ side prints at start-up on a machine without a GPU; which of them
#: depends on the CPU (oneDNN announces itself on some x86 CPUs, not on others).
_NOISE = ("oneDNN", "cuInit", "cuda_platform", "cudart_stub", "cpu_feature_guard")


def test_tensorflow_noise_is_silenced_and_verbose_brings_it_back():
    quiet, verbose = _stderr("q"), _stderr("v")
    assert any(noise in verbose for noise in _NOISE), verbose
    for noise in _NOISE:
        assert noise not in quiet, quiet


@pytest.mark.parametrize("argv,message", [
    (["--set", "model.top_k=abc"], "config field model.top_k"),
    (["--set", "model.nope=1"], "unknown config field 'model.nope'"),
    (["--experiment", "nope"], "unknown experiment 'nope'"),
    (["--set", "model.gsu=bogus"], "model.gsu='bogus' is not one of"),
])
def test_config_errors_are_one_line_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
