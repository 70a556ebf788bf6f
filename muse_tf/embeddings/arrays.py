"""NumPy helpers on id and vector arrays (one copy each): unit-norm rows, int8 inverse norms
and sorted-id membership."""

from __future__ import annotations

import numpy as np

#: Rows per step of the chunked helpers (a few MB of temporaries at D = 128).
_CHUNK_ROWS = 65536


def normalise_rows(vectors: np.ndarray) -> np.ndarray:
    """float32 copy of ``vectors`` ``[N, D]`` with unit-L2 rows (all-zero rows stay zero)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be [N, D]; got shape {vectors.shape}")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


def code_inverse_norms(codes: np.ndarray) -> np.ndarray:
    """float32 ``[N]``: ``1 / ||codes[n]||`` of int8 codes ``[N, D]`` (0 for all-zero rows).

    ``||c||^2`` is summed exactly in int32 (at most ``D * 128**2``), so the only rounding is
    that of ``1 / sqrt`` (in float64) to float32: a relative error of at most ``2**-24``.
    """
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.dtype != np.int8:
        raise ValueError(f"codes must be int8 [N, D]; got shape {codes.shape}, dtype "
                         f"{codes.dtype}")
    inverse = np.zeros(codes.shape[0], np.float32)
    for start in range(0, codes.shape[0], _CHUNK_ROWS):  # bounded temporaries
        squares = np.einsum("nd,nd->n", codes[start:start + _CHUNK_ROWS],
                            codes[start:start + _CHUNK_ROWS], dtype=np.int32)
        present = squares > 0
        inverse[start:start + _CHUNK_ROWS][present] = 1.0 / np.sqrt(
            squares[present].astype(np.float64))
    return inverse


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
    if ids.size > _CHUNK_ROWS:
        # Binary searches in ascending order walk memory in order: ~40x faster than random
        # queries into a large array (7.5 s for 2M ids against 2M).
        flat = ids.reshape(-1)
        order = np.argsort(flat)
        positions = np.empty(flat.shape, np.int64)
        positions[order] = np.searchsorted(sorted_ids, flat[order])
        positions = positions.reshape(ids.shape)
    else:
        positions = np.searchsorted(sorted_ids, ids)
    positions = np.minimum(positions, len(sorted_ids) - 1)
    return positions, sorted_ids[positions] == ids


def in_sorted(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """bool mask (shape of ``ids``): which ids occur in the ascending ``sorted_ids``."""
    return sorted_positions(sorted_ids, ids)[1]
