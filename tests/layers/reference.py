"""NumPy references shared by the layer tests (written independently of the layers)."""

from __future__ import annotations

from typing import Any

import numpy as np


def top_k_reference(scores: np.ndarray, mask: np.ndarray, k: int,
                    newest_first_ties: bool = False) -> dict[str, np.ndarray]:
    """Top-k valid scores per row, descending; ties by lower position (or higher position
    when ``newest_first_ties``); unused slots index 0, score 0, mask False."""
    batch = scores.shape[0]
    indices = np.zeros((batch, k), np.int32)
    values = np.zeros((batch, k), np.float32)
    selected = np.zeros((batch, k), bool)
    for b in range(batch):
        valid = [i for i in range(scores.shape[1]) if mask[b, i]]
        order = sorted(valid, key=lambda i, b=b: (-scores[b, i],
                                                   -i if newest_first_ties else i))[:k]
        indices[b, : len(order)] = order
        values[b, : len(order)] = scores[b, order]
        selected[b, : len(order)] = True
    return {"indices": indices, "scores": values, "mask": selected}


def assert_top_k_matches(actual: dict[str, Any], scores: np.ndarray, mask: np.ndarray,
                         k: int, atol: float = 1e-6) -> None:
    """``actual`` (a search's ``indices`` / ``scores`` / ``mask``, ``[batch, k]``) is a top-k
    of the reference ``scores`` ``[batch, L]`` under ``mask``, up to the order of scores
    within ``atol`` of each other.

    Float products of one row at two positions may round differently (a BLAS kernel treats
    the last columns of a panel apart, and panels differ between CPUs and shapes), so
    positions holding the same item tie only within rounding: which of them a search keeps
    is not a property to test. What is: the same number of picks, distinct valid positions,
    and at every rank the reference score of the pick within ``atol`` of the reference's
    own k-th best score at that rank; the reported scores within ``atol`` of the picks'."""
    expected = top_k_reference(scores, mask, k)
    indices, picked = np.asarray(actual["indices"]), np.asarray(actual["mask"])
    np.testing.assert_array_equal(picked, expected["mask"])
    for b in range(scores.shape[0]):
        chosen = indices[b][picked[b]]
        assert len(set(chosen.tolist())) == len(chosen), f"row {b}: repeated picks {chosen}"
        assert mask[b, chosen].all(), f"row {b}: a masked position was picked: {chosen}"
        np.testing.assert_allclose(scores[b, chosen], expected["scores"][b][picked[b]],
                                   atol=atol, err_msg=f"row {b}: picks {chosen}")
        np.testing.assert_allclose(np.asarray(actual["scores"])[b][picked[b]],
                                   scores[b, chosen], atol=atol)


def unit_rows(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random L2-normalised float32 vectors along the last axis."""
    x = rng.standard_normal(shape)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def softmax_reference(logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Softmax over the last axis restricted to ``mask``; all-masked rows give zeros."""
    logits = np.where(mask, logits, -np.inf).astype(np.float64)
    out = np.zeros_like(logits)
    for idx in np.ndindex(*logits.shape[:-1]):
        row = logits[idx]
        if np.isfinite(row).any():
            e = np.exp(row - row[np.isfinite(row)].max())
            out[idx] = e / e.sum()
    return out


def multi_head_attention_reference(query: np.ndarray, keys: np.ndarray, w_q: np.ndarray,
                                   w_k: np.ndarray) -> np.ndarray:
    """Textbook a[b, h, i] = (q W_q^h) · (k_i W_k^h) / sqrt(d), kernels [D, H, d]."""
    q = np.einsum("bq,qhd->bhd", query.astype(np.float64), w_q)
    k = np.einsum("bie,ehd->bihd", keys.astype(np.float64), w_k)
    return np.einsum("bhd,bihd->bhi", q, k) / np.sqrt(w_q.shape[-1])


def target_attention_reference(layer: Any, query: np.ndarray, keys: np.ndarray,
                               mask: np.ndarray, logits: np.ndarray | None = None) -> np.ndarray:
    """Textbook multi-head target attention with ``layer``'s kernels: project every key,
    masked softmax of ``logits`` (default: the scaled dot products), weighted sum."""
    w_q = layer.logits_layer.query_kernel.numpy()
    w_k = layer.logits_layer.key_kernel.numpy()
    w_v = layer.value_kernel.numpy()
    if logits is None:
        logits = multi_head_attention_reference(query, keys, w_q, w_k)
    weights = softmax_reference(logits, np.broadcast_to(mask[:, None, :], logits.shape))
    values = np.einsum("bie,ehd->bihd", keys.astype(np.float64), w_v)
    return np.einsum("bhi,bihd->bhd", weights, values).reshape(len(query), -1)
