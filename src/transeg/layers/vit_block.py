"""The pre-norm transformer block of ViT, shared by the plain-ViT encoders and Segmenter's decoder."""
from torch import nn

from .attention import MultiHeadSelfAttention
from .drop import DropPath
from .mlp import Mlp


class TransformerBlock(nn.Module):
    """x + DP(attn(norm1 x)); x + DP(mlp(norm2 x)). `drop` is used for the attention probabilities,
    the attention projection and both FFN dropouts, as in Segmenter's blocks."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, drop=0.0, drop_path=0.0, norm_eps=1e-5, qkv_bias=True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = MultiHeadSelfAttention(dim, num_heads, qkv_bias, attn_drop=drop, proj_drop=drop)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))
