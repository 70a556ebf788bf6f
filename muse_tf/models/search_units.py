"""The registry of long-term searches: config name (``model.gsu``) → the GSU layer.

Every entry builds a :class:`~muse_tf.layers.search_unit.GeneralSearchUnit` with the one
call contract ``gsu(target, history, mask) -> {indices, scores, mask}``; the ranking model
calls whatever the registry returns and never branches on the name. Adding a search is one
layer file plus one line here. ``"none"`` (DIN: no lifelong search) is the absence of an
entry: the model then has no long-term path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

from muse_tf.embeddings.multimodal_table import FrozenMultimodalTable
from muse_tf.layers import (
    AttentionGSU,
    CategoryGSU,
    CoMultimodalGSU,
    GeneralSearchUnit,
    IdEmbeddingGSU,
    MultimodalGSU,
    MultimodalIdCosineGSU,
    ProjectedMultimodalGSU,
    TargetAttention,
)

if TYPE_CHECKING:
    from muse_tf.config import ModelConfig

#: ``model.gsu`` of the experiments without a lifelong search.
NO_SEARCH = "none"


@dataclasses.dataclass(frozen=True)
class SearchContext:
    """What a search may share with the model it is part of.

    Attributes:
      config: the model section of the experiment.
      mm_table: the model's frozen multimodal table.
      attention: the long-term ESU's attention (TWIN scores the search with its logits), or
        None when the ESU has none.
    """

    config: ModelConfig
    mm_table: FrozenMultimodalTable
    attention: TargetAttention | None


def _twin(context: SearchContext) -> GeneralSearchUnit:
    if context.attention is None:
        raise ValueError("gsu='attention' (TWIN) scores with the ESU's target attention: "
                         f"model.esu must hold 'ta' or 'sa_ta', got {context.config.esu}")
    return AttentionGSU(context.config.top_k, logits_layer=context.attention.logits_layer,
                        name="gsu_attention")


SEARCH_UNITS: dict[str, Callable[[SearchContext], GeneralSearchUnit]] = {
    # MUSE: cosine of the frozen multimodal (SCL) embeddings, blockwise from the table.
    "multimodal": lambda c: MultimodalGSU(c.config.top_k, table=c.mm_table,
                                          name="gsu_multimodal"),
    # SIM-hard: behaviours of the target's category, newest first.
    "category": lambda c: CategoryGSU(c.config.top_k, name="gsu_category"),
    # SIM-soft: cosine (official MUSE code) or inner product (SIM) of ID embeddings.
    "id": lambda c: IdEmbeddingGSU(c.config.top_k, similarity=c.config.id_gsu_similarity,
                                   name="gsu_id"),
    # TWIN: the ESU's own attention logits as the search (one set of weights).
    "attention": _twin,
    # Table 2: learned projection before the multimodal similarity.
    "projected_multimodal": lambda c: ProjectedMultimodalGSU(
        c.config.top_k, projection_units=(c.config.gsu_projection_dim,) * 2,
        name="gsu_projected_multimodal"),
    # Table 2: multimodal cosine + ID-embedding cosine.
    "multimodal_plus_id": lambda c: MultimodalIdCosineGSU(c.config.top_k,
                                                          name="gsu_multimodal_plus_id"),
    # MISS: Co-GSU (ID) K/2 + MM-GSU (multimodal) K/2, de-duplicated.
    "miss": lambda c: CoMultimodalGSU(c.config.top_k, table=c.mm_table, name="gsu_miss"),
}


def search_names() -> tuple[str, ...]:
    """Every valid ``model.gsu``: ``"none"`` and the registry's names."""
    return (NO_SEARCH, *SEARCH_UNITS)


def build_search_unit(context: SearchContext) -> GeneralSearchUnit | None:
    """The GSU of ``context.config.gsu`` (None for ``"none"``)."""
    name = context.config.gsu
    if name == NO_SEARCH:
        return None
    if name not in SEARCH_UNITS:
        raise ValueError(f"model.gsu={name!r} is not one of {search_names()}")
    return SEARCH_UNITS[name](context)
