"""muse_tf.layers: the Keras layers of the ranking models (MUSE and its baselines).

One concept per module; every layer takes padded tensors plus boolean masks and never
selects or weights padding.
"""

from muse_tf.layers.attention_gsu import AttentionGSU
from muse_tf.layers.attention_logits import MultiHeadAttentionLogits
from muse_tf.layers.category_gsu import CategoryGSU
from muse_tf.layers.co_multimodal_gsu import CoMultimodalGSU
from muse_tf.layers.dice import Dice
from muse_tf.layers.id_embedding_gsu import IdEmbeddingGSU
from muse_tf.layers.masked_softmax import masked_softmax
from muse_tf.layers.mlp_tower import MLPTower
from muse_tf.layers.multimodal_gsu import MultimodalGSU
from muse_tf.layers.multimodal_id_cosine_gsu import MultimodalIdCosineGSU
from muse_tf.layers.projected_multimodal_gsu import ProjectedMultimodalGSU
from muse_tf.layers.search_unit import GeneralSearchUnit
from muse_tf.layers.semantic_aware_target_attention import SemanticAwareTargetAttention
from muse_tf.layers.sim_tier import SimTier
from muse_tf.layers.target_attention import TargetAttention
from muse_tf.layers.topk import masked_top_k

__all__ = [
    "AttentionGSU",
    "CategoryGSU",
    "CoMultimodalGSU",
    "Dice",
    "GeneralSearchUnit",
    "IdEmbeddingGSU",
    "MLPTower",
    "MultiHeadAttentionLogits",
    "MultimodalGSU",
    "MultimodalIdCosineGSU",
    "ProjectedMultimodalGSU",
    "SemanticAwareTargetAttention",
    "SimTier",
    "TargetAttention",
    "masked_softmax",
    "masked_top_k",
]
