"""The one call contract of every general search unit (GSU): score the lifelong history
against a target, keep the top K.

``gsu(target, history, mask) -> {"indices", "scores", "mask"}`` where ``target`` and
``history`` are dicts of the tensors a search may read, under these keys:

=============  ==========================================  ===================================
key            target                                      history
=============  ==========================================  ===================================
``"id"``       float ``[B, E]`` or ``[B, C, E]``           float ``[B, L, E]``: ID embedding
               (item ⊕ category ID embedding)              of each behaviour
``"mm"``       float ``[B, D]`` / ``[B, C, D]``:           float ``[B, L, D]``: the
               L2-normalised multimodal vector             behaviours' normalised vectors
``"rows"``     —                                           int32 ``[B, L]``: rows of the
                                                           frozen multimodal table
``"category"`` int ``[B]`` / ``[B, C]``                    int ``[B, L]``
=============  ==========================================  ===================================

A layer reads only the keys in :attr:`~GeneralSearchUnit.target_keys` and
:attr:`~GeneralSearchUnit.history_keys`, so a model computes just those (the ``[B, L, E]``
ID embeddings of a 100K history are never built for a multimodal search). ``mask`` is bool
``[B, L]``: True = a real behaviour. A candidate axis ``C`` on the target searches C targets
against the *same* history at once (outputs ``[B, C, K]``), without tiling the history.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import tensorflow as tf

from muse_tf.layers.checks import (
    check_float,
    check_mask,
    check_positive_int,
    check_rank,
    check_same_dim,
)
from muse_tf.layers.topk import masked_top_k

#: Keys of the target/history dicts.
ID = "id"
MM = "mm"
ROWS = "rows"
CATEGORY = "category"
_FLOAT_KEYS = (ID, MM)


class GeneralSearchUnit(tf.keras.layers.Layer):
    """Base of every GSU: the ``top_k`` option, the input contract (module docstring) and
    the masked top-K.

    A subclass sets :attr:`target_keys`/:attr:`history_keys` and implements
    :meth:`relevance` (one score per behaviour, and the mask of the selectable ones);
    :meth:`call` checks the inputs and selects. :attr:`scores_are_similarity` tells whether
    the returned scores are the multimodal cosine of the behaviour to the target (then an ESU
    may use them as ``R`` directly).

    Returns of :meth:`call`: ``{"indices": int32 [B, (C,) K], "scores": float32 [B, (C,) K],
    "mask": bool [B, (C,) K]}`` (see :func:`muse_tf.layers.topk.masked_top_k` for the padding
    and tie rules).

    Args:
      top_k: K, the number of behaviours to retrieve.
    """

    target_keys: tuple[str, ...] = ()
    history_keys: tuple[str, ...] = ()
    scores_are_similarity: bool = False

    def __init__(self, top_k: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.top_k = check_positive_int(type(self).__name__, "top_k", top_k)

    def relevance(self, target: Mapping[str, tf.Tensor], history: Mapping[str, tf.Tensor],
                  mask: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """``(scores [B, (C,) L], selectable mask [B, L] or [B, C, L])`` of checked inputs."""
        raise NotImplementedError

    def call(self, target: Mapping[str, tf.Tensor], history: Mapping[str, tf.Tensor],
             mask: tf.Tensor | None = None) -> dict[str, tf.Tensor]:
        target, history, mask = self.check_inputs(target, history, mask)
        scores, mask = self.relevance(target, history, mask)
        return self.select(scores, mask)

    def select(self, scores: tf.Tensor, mask: tf.Tensor) -> dict[str, tf.Tensor]:
        """Top-``top_k`` valid positions of ``scores`` (see :func:`select_top_k`)."""
        return select_top_k(scores, mask, self.top_k)

    # ------------------------------------------------------------------ checks
    def check_inputs(self, target: Mapping[str, tf.Tensor], history: Mapping[str, tf.Tensor],
                     mask: tf.Tensor | None
                     ) -> tuple[dict[str, tf.Tensor], dict[str, tf.Tensor], tf.Tensor]:
        """The needed entries of ``target``/``history`` as checked tensors (floats in the
        layer's compute dtype) and the checked mask; errors name the layer, key and shape."""
        name = type(self).__name__
        for side, given, keys in (("target", target, self.target_keys),
                                  ("history", history, self.history_keys)):
            if not isinstance(given, Mapping):
                raise ValueError(f"{name}: `{side}` must be a dict with keys {list(keys)}, "
                                 f"got {type(given).__name__}")
            missing = [k for k in keys if k not in given]
            if missing:
                raise ValueError(f"{name}: `{side}` lacks {missing}; it needs {list(keys)}, "
                                 f"got {sorted(given)}")
        checked_history = {k: tf.convert_to_tensor(history[k]) for k in self.history_keys}
        checked_target = {k: tf.convert_to_tensor(target[k]) for k in self.target_keys}
        first = self.history_keys[0]
        for key, tensor in checked_history.items():
            arg = f"history[{key!r}]"
            if key in _FLOAT_KEYS:
                check_float(name, arg, tensor)
                check_rank(name, arg, tensor, ("batch", "seq_len", "dim"))
                checked_history[key] = tf.cast(tensor, self.compute_dtype)
            else:
                if not tensor.dtype.is_integer:
                    raise ValueError(f"{name}: `{arg}` must be an integer id tensor, got dtype "
                                     f"{tensor.dtype.name} with shape "
                                     f"{tuple(tensor.shape.as_list())}")
                check_rank(name, arg, tensor, ("batch", "seq_len"))
            check_same_dim(name, arg, tensor, 0, f"history[{first!r}]",
                           checked_history[first], 0, "batch")
            check_same_dim(name, arg, tensor, 1, f"history[{first!r}]",
                           checked_history[first], 1, "sequence length")
        for key, tensor in checked_target.items():
            arg = f"target[{key!r}]"
            rank = tensor.shape.rank
            expected = (2, 3) if key in _FLOAT_KEYS else (1, 2)
            if rank not in (*expected, None):
                layout = ("[batch, dim] or [batch, candidates, dim]" if key in _FLOAT_KEYS
                          else "[batch] or [batch, candidates]")
                raise ValueError(f"{name}: `{arg}` must be {layout}, got rank {rank} with "
                                 f"shape {tuple(tensor.shape.as_list())}")
            check_same_dim(name, arg, tensor, 0, f"history[{first!r}]",
                           checked_history[first], 0, "batch")
            if key in _FLOAT_KEYS:
                check_float(name, arg, tensor)
                if key in checked_history:
                    check_same_dim(name, arg, tensor, tensor.shape.rank - 1,
                                   f"history[{key!r}]", checked_history[key], 2, "embedding")
                checked_target[key] = tf.cast(tensor, self.compute_dtype)
        mask = check_mask(name, mask, checked_history[first], f"history[{first!r}]")
        return checked_target, checked_history, mask

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"top_k": self.top_k})
        return config


def select_top_k(scores: tf.Tensor, mask: tf.Tensor, k: int) -> dict[str, tf.Tensor]:
    """:func:`~muse_tf.layers.topk.masked_top_k` that also takes a candidate axis.

    ``scores`` ``[batch, L]`` with ``mask`` ``[batch, L]``, or ``scores`` ``[batch, C, L]``
    with ``mask`` ``[batch, L]`` (shared by the C candidates) or ``[batch, C, L]``; outputs
    ``[batch, K]`` or ``[batch, C, K]``.
    """
    if scores.shape.rank != 3:
        return masked_top_k(scores, mask, k)
    length = scores.shape[2] if scores.shape[2] is not None else tf.shape(scores)[2]
    candidates = tf.shape(scores)[1]
    flat_mask = (tf.reshape(mask, [-1, length]) if mask.shape.rank == 3
                 else tf.repeat(mask, candidates, axis=0))
    flat = masked_top_k(tf.reshape(scores, [-1, length]), flat_mask, k)
    return {key: tf.reshape(value, [-1, candidates, k]) for key, value in flat.items()}


def inner_product(target: tf.Tensor, history: tf.Tensor) -> tf.Tensor:
    """``s_i = <target, history_i>``: ``[batch, dim]`` × ``[batch, L, dim]`` → ``[batch, L]``.

    One batched matrix-vector product (``einsum('bd,bld->bl')``), the cost floor of any
    search over the full history. With a candidate axis, ``[batch, C, dim]`` →
    ``[batch, C, L]`` as one batched matrix product.
    """
    target = tf.convert_to_tensor(target)
    if target.shape.rank == 3:
        return tf.einsum("bcd,bld->bcl", target, history)
    return tf.einsum("bd,bld->bl", target, history)


def broadcast_mask(mask: tf.Tensor, scores: tf.Tensor) -> tf.Tensor:
    """``mask`` ``[B, L]`` as ``[B, C, L]`` when ``scores`` has a candidate axis."""
    if scores.shape.rank == 3 and mask.shape.rank == 2:
        return tf.broadcast_to(mask[:, tf.newaxis, :], tf.shape(scores))
    return mask
