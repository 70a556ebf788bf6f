"""What a person sees from a command: TensorFlow/absl noise silenced unless ``--verbose``,
and config errors as one-line usage errors instead of tracebacks."""

from __future__ import annotations

import argparse
import logging
import os
import warnings
from collections.abc import Iterable

from muse_tf import config as config_lib

#: C++ log lines and Python warnings that mean nothing to a user of these commands.
_QUIET_WARNINGS = (
    r".*Skipping full serialization of Keras layer.*",
    r".*parallel_iterations.*",
    r".*is deprecated.*",
    r".*oneDNN.*",
)


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true",
                        help="show TensorFlow's and absl's own log messages")


def configure(verbose: bool) -> None:
    """Silence TensorFlow's C++ log lines (``failed call to cuInit`` on CPU hosts and the
    oneDNN notices, which TensorFlow logs at ERROR level although nothing failed;
    ``local_rendezvous ... OUT_OF_RANGE`` at the end of every dataset), absl and
    tf.get_logger warnings and known deprecation chatter; ``verbose`` keeps everything.
    Real failures still surface as Python exceptions.

    The C++ level only takes effect for libraries loaded after this call, so the CLIs call
    it before importing TensorFlow; ``TF_CPP_MIN_LOG_LEVEL`` set by the user is respected.
    """
    if verbose:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    for pattern in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    import tensorflow as tf

    # Python loggers of the stack (Beam's "apitools not found" on import, tf-keras notices).
    logging.getLogger().setLevel(logging.ERROR)
    tf.get_logger().setLevel(logging.ERROR)
    tf.autograph.set_verbosity(0)
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:  # absl ships with TensorFlow; nothing to quiet without it
        pass


def resolve_or_exit(parser: argparse.ArgumentParser, name: str, config_file: str | None,
                    assignments: Iterable[str]) -> config_lib.ExperimentConfig:
    """:func:`muse_tf.config.resolve`, turning a bad name, field or value into
    ``parser.error`` (one line, exit code 2)."""
    try:
        return config_lib.resolve(name, config_file, assignments)
    except (KeyError, ValueError, TypeError, OSError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        parser.error(str(message))
        raise  # parser.error exits; this line is never reached
