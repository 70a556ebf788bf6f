"""``tf.distribute`` strategies by config name, and which worker is the chief."""

from __future__ import annotations

import os

import tensorflow as tf

STRATEGIES = ("default", "mirrored", "multi_worker")


def make_strategy(name: str) -> tf.distribute.Strategy:
    """``default`` | ``mirrored`` (all local devices) | ``multi_worker`` (from TF_CONFIG)."""
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError("--strategy multi_worker needs the TF_CONFIG environment variable "
                             "(cluster spec and this worker's task)")
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"unknown strategy {name!r}; one of {STRATEGIES}")


def shard_for_strategy(dataset: tf.data.Dataset, name: str) -> tf.data.Dataset:
    """``dataset`` as the ``name`` strategy reads it: under ``multi_worker`` every worker
    reads every file and keeps its share of the batches (``AutoShardPolicy.DATA``), which
    works for any number of shards; other strategies read it as it is."""
    if name != "multi_worker":
        return dataset
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA)
    return dataset.with_options(options)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True on a single machine, on the chief, or on worker 0 of a chief-less cluster."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return True
    return resolver.task_type == "chief" or (resolver.task_type == "worker"
                                             and resolver.task_id == 0)


def work_dir(model_dir: str, chief: bool) -> str:
    """Where this worker writes: the model directory on the chief, a private temporary
    directory beside it on the others (their checkpoints and logs are discarded)."""
    return model_dir if chief else os.path.join(model_dir, f"worker_tmp_{os.getpid()}")
