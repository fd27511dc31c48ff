"""The pre-norm transformer block of ViT, shared by the plain-ViT encoders and Segmenter's decoder."""
from torch import nn

from .attention import MultiHeadSelfAttention
from .drop import DropPath
from .mlp import Mlp


class TransformerBlock(nn.Module):
    """x + DP(attn(norm1 x)); x + DP(mlp(norm2 x)). `drop` is used for the attention probabilities,
    the attention projection and both FFN dropouts, as in Segmenter's blocks. `drop_path_attn=False`
    keeps stochastic depth off the attention branch (mmseg 0.24's ViT, which SegViT trains with).
    With `context`, the block cross-attends: x + attn(norm1 x, norm1 context) (SegViT's QD layer)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, drop=0.0, drop_path=0.0, norm_eps=1e-5, qkv_bias=True,
                 drop_path_attn=True):
        super().__init__()
        self.drop_path_attn = drop_path_attn
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = MultiHeadSelfAttention(dim, num_heads, qkv_bias, attn_drop=drop, proj_drop=drop)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x, context=None):
        y = self.attn(self.norm1(x), None if context is None else self.norm1(context))
        x = x + (self.drop_path(y) if self.drop_path_attn else y)
        return x + self.drop_path(self.mlp(self.norm2(x)))
