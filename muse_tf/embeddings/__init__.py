"""Raw-id -> row lookups and the frozen multimodal item table."""

from muse_tf.embeddings.id_lookup import IdLookup
from muse_tf.embeddings.multimodal_table import (
    STORAGE_DTYPES,
    FrozenMultimodalTable,
    MultimodalCodes,
)
from muse_tf.embeddings.vocabulary import (
    Vocabulary,
    build_vocabularies,
    multimodal_codes,
    normalised_mm_matrix,
)

__all__ = [
    "STORAGE_DTYPES",
    "FrozenMultimodalTable",
    "IdLookup",
    "MultimodalCodes",
    "Vocabulary",
    "build_vocabularies",
    "multimodal_codes",
    "normalised_mm_matrix",
]
