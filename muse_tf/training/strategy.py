"""``tf.distribute`` strategies by config name, which worker is the chief, where each worker
writes, and how a multi-worker run ends.

Under ``multi_worker`` (``MultiWorkerMirroredStrategy``) every worker runs the same program,
and every collective (an all-reduce across the workers) must be entered by all of them, the
same number of times and in the same order, or the ones that entered wait until the cluster
is declared unhealthy (``UnavailableError``). Collectives are not only the training steps:
reading a sync-on-read variable outside a replica is one too — the Keras metrics' counters
and BatchNormalization's moving statistics are such variables — so a prediction through a
model with BatchNormalization is collective, and so is ``tf.saved_model.save`` of any model
that tracks a metric (its checkpoint holds the reduced values). A run therefore trains,
validates, evaluates and exports on every worker in step; following TensorFlow's pattern for
saving under this strategy, the chief writes into the model directory and every other
worker into its own scratch directory (:func:`make_work_dir`), which it removes at the end;
then all workers meet at a barrier (:func:`finish_workers`) before any of them exits.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import tensorflow as tf

STRATEGIES = ("default", "mirrored", "multi_worker")
#: A non-chief worker's scratch directory in the model directory: this prefix, then its task.
SCRATCH_PREFIX = "worker_tmp_"


def make_strategy(name: str) -> tf.distribute.Strategy:
    """``default`` | ``mirrored`` (all local devices) | ``multi_worker`` (from TF_CONFIG).

    ``multi_worker`` must be made before the program's first TensorFlow op (collectives are
    configured when the runtime starts)."""
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


@dataclasses.dataclass(frozen=True)
class WorkerRole:
    """This process's task in a multi-worker cluster.

    Attributes:
      task_type: ``"chief"`` or ``"worker"`` (TF_CONFIG's ``task.type``).
      task_id: TF_CONFIG's ``task.index``.
      num_workers: tasks that train (the chief, if the cluster has one, and the workers).
      chief: this task writes the model directory (the chief, else worker 0).
      chief_task: the task that does, e.g. ``"worker 0"``.
    """

    task_type: str
    task_id: int
    num_workers: int
    chief: bool
    chief_task: str

    @property
    def task(self) -> str:
        return f"{self.task_type} {self.task_id}"

    def as_dict(self) -> dict[str, Any]:
        return {"task": self.task, "chief": self.chief, "chief_task": self.chief_task,
                "num_workers": self.num_workers}


def worker_role(strategy: tf.distribute.Strategy) -> WorkerRole | None:
    """The task of a multi-worker strategy's cluster this process is; None on one machine."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return None
    jobs = resolver.cluster_spec().as_dict()
    has_chief = bool(jobs.get("chief"))
    chief_task = "chief 0" if has_chief else "worker 0"
    task_type, task_id = str(resolver.task_type), int(resolver.task_id or 0)
    return WorkerRole(task_type, task_id,
                      num_workers=len(jobs.get("chief", [])) + len(jobs.get("worker", [])),
                      chief=f"{task_type} {task_id}" == chief_task, chief_task=chief_task)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True on a single machine, on the chief, or on worker 0 of a chief-less cluster."""
    role = worker_role(strategy)
    return role is None or role.chief


def scratch_dir(model_dir: str, role: WorkerRole) -> str:
    """A non-chief worker's scratch directory: ``model_dir/worker_tmp_<type>_<id>``."""
    return os.path.join(model_dir, f"{SCRATCH_PREFIX}{role.task_type}_{role.task_id}")


def make_work_dir(model_dir: str, strategy: tf.distribute.Strategy) -> str:
    """Where this worker writes: the model directory on the chief; on another worker its
    scratch directory (:func:`scratch_dir`: its vocabulary copy, checkpoints, logs and
    export, all discarded), created empty — a killed run's is removed first — and removed by
    :func:`finish_workers`."""
    role = worker_role(strategy)
    if role is None or role.chief:
        return model_dir
    path = scratch_dir(model_dir, role)
    if tf.io.gfile.exists(path):
        tf.io.gfile.rmtree(path)
    tf.io.gfile.makedirs(path)
    return path


def barrier(strategy: tf.distribute.Strategy) -> None:
    """Returns once every worker of ``strategy``'s cluster has called it (an all-reduce of
    one number over the workers); at once on a single machine."""
    if worker_role(strategy) is None:
        return
    arrived = strategy.reduce(tf.distribute.ReduceOp.SUM, tf.constant(1.0), axis=None)
    arrived.numpy()  # eager collectives may run asynchronously: wait for this one


def finish_workers(strategy: tf.distribute.Strategy, model_dir: str) -> None:
    """The last step of a run, on every worker: a non-chief worker removes its scratch
    directory, then all workers wait at :func:`barrier` until the chief has written
    ``metrics.json`` and the export too, so that no worker exits (and takes its part of the
    collectives with it) while another still runs. Nothing on a single machine."""
    role = worker_role(strategy)
    if role is None:
        return
    if not role.chief:
        path = scratch_dir(model_dir, role)
        if tf.io.gfile.exists(path):
            tf.io.gfile.rmtree(path)
    barrier(strategy)
