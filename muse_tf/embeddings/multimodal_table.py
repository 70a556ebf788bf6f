"""The frozen multimodal (SCL) item table: item row -> L2-normalised vector."""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf


@tf.keras.utils.register_keras_serializable(package="muse_tf")
class FrozenMultimodalTable(tf.keras.layers.Layer):
    """Frozen multimodal item embeddings, gathered by item row.

    MUSE (section 3.1) keeps the SCL image-text embeddings of items frozen. The int8 vectors
    are converted to float and L2-normalised **once**, when the table is built
    (:func:`muse_tf.embeddings.normalised_mm_matrix`), so a cosine similarity is a plain dot
    product at every step. Items without an embedding hold a zero vector and
    ``has_embedding = False``; multimodal searches must mask them.

    Shapes: rows int32 ``[...]`` -> vectors ``[..., dim]`` (float32) and, from
    :meth:`has_embedding`, bool ``[...]``.

    Args:
      num_rows: rows of the table (row 0 = padding, row 1 = out of vocabulary: both zero).
      dim: embedding dimension (128 for TAOBAO-MM's SCL vectors).
      storage_dtype: ``float32`` or ``float16`` (halves memory of large catalogues; vectors
        are cast to float32 after the gather).
      initial_table: optional ``[num_rows, dim]`` array of L2-normalised vectors.
    """

    #: Target size of one gathered block in :meth:`similarity`.
    chunk_bytes = 1024 * 1024

    def __init__(self, num_rows: int, dim: int, storage_dtype: str = "float32",
                 initial_table: np.ndarray | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if storage_dtype not in ("float32", "float16"):
            raise ValueError(f"storage_dtype must be float32 or float16, got {storage_dtype!r}")
        if initial_table is not None and tuple(initial_table.shape) != (num_rows, dim):
            raise ValueError(f"initial_table has shape {tuple(initial_table.shape)}, expected "
                             f"[num_rows={num_rows}, dim={dim}]")
        self.num_rows = int(num_rows)
        self.dim = int(dim)
        self.storage_dtype = storage_dtype
        init_vectors = ("zeros" if initial_table is None
                        else tf.constant_initializer(initial_table.astype(storage_dtype)))
        self.vectors = self.add_weight(
            name="vectors", shape=(self.num_rows, self.dim), dtype=storage_dtype,
            initializer=init_vectors, trainable=False)
        init_mask = ("zeros" if initial_table is None else tf.constant_initializer(
            (np.abs(initial_table).sum(axis=1) > 0).astype(np.float32)))
        self.present = self.add_weight(
            name="present", shape=(self.num_rows,), dtype="float32", initializer=init_mask,
            trainable=False)

    def call(self, rows: tf.Tensor) -> tf.Tensor:
        vectors = tf.gather(self.vectors, rows)
        return tf.cast(vectors, tf.float32)

    def has_embedding(self, rows: tf.Tensor) -> tf.Tensor:
        return tf.gather(self.present, rows) > 0.5

    def similarity(self, queries: tf.Tensor, rows: tf.Tensor) -> tf.Tensor:
        """``<q, table[rows]>`` without materialising the gathered ``[B, L, dim]`` vectors.

        This is the multimodal GSU's cosine over a whole lifelong history (vectors are
        L2-normalised). Gathering ``B * L`` rows at once writes ``B * L * dim * 4`` bytes of
        fresh memory per step (131 MB at B=256, L=1,000), which costs more than the
        arithmetic; the history is therefore walked in chunks of positions whose gathered
        block stays near :attr:`chunk_bytes` and is reused from step to step.

        Args:
          queries: float32 ``[B, dim]`` or ``[B, C, dim]`` (C candidates per row).
          rows: int32 ``[B, L]`` table rows of the history.

        Returns:
          float32 ``[B, L]`` or ``[B, C, L]``.
        """
        queries = tf.cast(queries, tf.float32)
        if queries.shape.rank not in (2, 3) or rows.shape.rank != 2:
            raise ValueError(f"{self.name}: similarity takes queries [B, dim] or [B, C, dim] "
                             f"and rows [B, L], got {queries.shape} and {rows.shape}")
        single = queries.shape.rank == 2
        if single:
            queries = queries[:, tf.newaxis, :]
        batch, length = tf.shape(rows)[0], tf.shape(rows)[1]
        bytes_per_position = tf.cast(batch, tf.int64) * self.dim * 4
        chunk = tf.cast(tf.maximum(tf.constant(self.chunk_bytes, tf.int64)
                                   // tf.maximum(bytes_per_position, 1), 1), tf.int32)
        chunk = tf.minimum(chunk, tf.maximum(length, 1))
        num_chunks = (length + chunk - 1) // chunk
        padded = tf.pad(rows, [[0, 0], [0, num_chunks * chunk - length]])
        blocks = tf.transpose(tf.reshape(padded, [batch, num_chunks, chunk]), [1, 0, 2])

        def block_scores(block: tf.Tensor) -> tf.Tensor:
            vectors = tf.cast(tf.gather(self.vectors, block), tf.float32)  # [B, chunk, dim]
            return tf.einsum("bcd,bld->bcl", queries, vectors)

        scores = tf.map_fn(block_scores, blocks, parallel_iterations=2,
                           fn_output_signature=tf.TensorSpec([None, None, None], tf.float32))
        scores = tf.transpose(scores, [1, 2, 0, 3])                        # [B, C, n, chunk]
        scores = tf.reshape(scores, [batch, tf.shape(queries)[1], -1])[:, :, :length]
        if rows.shape[1] is not None:
            scores = tf.ensure_shape(scores, [None, None, rows.shape[1]])
        return scores[:, 0, :] if single else scores

    def get_config(self) -> dict[str, Any]:
        # The table itself is a (non-trainable) weight: it travels in checkpoints and
        # SavedModels, not in the config.
        return {**super().get_config(), "num_rows": self.num_rows, "dim": self.dim,
                "storage_dtype": self.storage_dtype}
