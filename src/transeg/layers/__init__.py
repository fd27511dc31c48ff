"""Building blocks shared by more than one model family. One concept per file."""
from .attention import EmbeddingFreeAttention, KeyValuePool, SpatialReductionAttention, tokens_to_map
from .conv import ConvBNReLU
from .drop import DropPath, drop_path_rates
from .eft_block import EFTBlock
from .mlp import DepthwiseConv, MixFFN
from .patch_embed import OverlapPatchEmbed

__all__ = [
    "ConvBNReLU", "DepthwiseConv", "DropPath", "EFTBlock", "EmbeddingFreeAttention", "KeyValuePool", "MixFFN",
    "OverlapPatchEmbed", "SpatialReductionAttention", "drop_path_rates", "tokens_to_map",
]
