"""Building blocks shared by more than one model family. One concept per file."""
from .attention import EmbeddingFreeAttention, KeyValuePool, MultiHeadSelfAttention, SpatialReductionAttention
from .conv import ConvBNReLU
from .drop import DropPath, drop_path_rates
from .eft_block import EFTBlock
from .mlp import DepthwiseConv, MixFFN, Mlp
from .patch_embed import OverlapPatchEmbed
from .rope import RotaryPositionEmbedding, apply_rotary
from .shape import map_to_tokens, tokens_to_map
from .vit_block import TransformerBlock

__all__ = [
    "ConvBNReLU", "DepthwiseConv", "DropPath", "EFTBlock", "EmbeddingFreeAttention", "KeyValuePool", "MixFFN", "Mlp",
    "MultiHeadSelfAttention", "OverlapPatchEmbed", "RotaryPositionEmbedding", "SpatialReductionAttention", "TransformerBlock",
    "apply_rotary", "drop_path_rates", "map_to_tokens", "tokens_to_map",
]
