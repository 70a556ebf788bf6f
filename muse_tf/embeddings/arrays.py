"""NumPy helpers on id and vector arrays (one copy each): unit-norm rows and sorted-id
membership."""

from __future__ import annotations

import numpy as np


def normalise_rows(vectors: np.ndarray) -> np.ndarray:
    """float32 copy of ``vectors`` ``[N, D]`` with unit-L2 rows (all-zero rows stay zero)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be [N, D]; got shape {vectors.shape}")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


def sorted_positions(sorted_ids: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each of ``ids`` sits in the ascending ``sorted_ids``.

    Returns ``(positions, found)`` of the shape of ``ids``: ``sorted_ids[positions[i]] ==
    ids[i]`` where ``found[i]``; positions are clipped into range (0 for an empty array) so
    they can index without a check, and must be ignored where ``found`` is False.
    """
    ids = np.asarray(ids, dtype=np.int64)
    sorted_ids = np.asarray(sorted_ids, dtype=np.int64)
    if sorted_ids.ndim != 1:
        raise ValueError(f"sorted_ids must be 1-D, got shape {sorted_ids.shape}")
    if len(sorted_ids) == 0:
        return np.zeros(ids.shape, np.int64), np.zeros(ids.shape, bool)
    positions = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    return positions, sorted_ids[positions] == ids


def in_sorted(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """bool mask (shape of ``ids``): which ids occur in the ascending ``sorted_ids``."""
    return sorted_positions(sorted_ids, ids)[1]
