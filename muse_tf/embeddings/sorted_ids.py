"""Membership and position of raw int64 ids in an ascending id array, in TF ops.

A binary search (``tf.searchsorted``) over the ids held once in a host-side variable: 8 bytes
an id (283 MB for TAOBAO-MM's 35.4M items), where a ``DenseHashTable`` of the same ids held
1.71 GB (measured) and reserves two keys it cannot store. The variable is created eagerly
(``init_scope``), also when the first call happens while a tf.data function is traced, so the
ids are never a constant of a pipeline's graph (tf.data serialises that graph when it rewrites
it, and a proto is limited to 2 GB). Every int64 value, the extremes included, is an ordinary
key.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

__all__ = ["SortedIds", "host_variable"]


def host_variable(values: np.ndarray, name: str) -> tf.Variable:
    """A non-trainable variable on the host CPU (where tf.data functions run) holding
    ``values``, created eagerly (also while a tf.data or ``tf.function`` graph is traced), so
    the values are never a constant of that graph."""
    with tf.init_scope(), tf.device("/CPU:0"):
        return tf.Variable(values, trainable=False, name=name)


class SortedIds:
    """``ids`` (int64 ``[N]``, strictly ascending) for lookups inside tf.data pipelines.

    :meth:`positions` maps ids of any shape to their index in ``ids`` (int64, ``-1`` where
    absent); :meth:`contains` to bools. Cost per looked-up id: ``log2(N)`` probes.
    """

    def __init__(self, ids: np.ndarray, name: str) -> None:
        ids = np.asarray(ids)
        if ids.ndim != 1 or ids.dtype != np.int64:
            raise ValueError(f"SortedIds({name!r}): ids must be int64 [N], got shape "
                             f"{ids.shape}, dtype {ids.dtype}")
        if len(ids) > 1 and not bool(np.all(ids[1:] > ids[:-1])):
            first = int(np.flatnonzero(ids[1:] <= ids[:-1])[0])
            raise ValueError(f"SortedIds({name!r}): ids must be strictly ascending; "
                             f"ids[{first}]={ids[first]} >= ids[{first + 1}]={ids[first + 1]}")
        self.size = len(ids)
        # One sentinel row keeps the variable non-empty when N = 0 (positions() never reads it).
        self._ids = host_variable(ids if len(ids) else np.zeros(1, np.int64), name)

    def positions(self, ids: tf.Tensor) -> tf.Tensor:
        """int64 (shape of ``ids``): each id's index in the ascending ids, -1 if absent."""
        ids = tf.convert_to_tensor(ids, tf.int64)
        flat = tf.reshape(ids, [-1])
        if self.size == 0:
            return tf.fill(tf.shape(ids), tf.constant(-1, tf.int64))
        at = tf.searchsorted(tf.reshape(self._ids, [1, -1]), flat[None, :], side="left",
                             out_type=tf.int64)[0]
        at = tf.minimum(at, self.size - 1)
        found = tf.gather(self._ids, at) == flat
        return tf.reshape(tf.where(found, at, tf.constant(-1, tf.int64)), tf.shape(ids))

    def contains(self, ids: tf.Tensor) -> tf.Tensor:
        """bool (shape of ``ids``): which ids are held."""
        return self.positions(ids) >= 0
