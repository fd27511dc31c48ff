"""The embedding-free transformer block shared by EDAFormer's encoder and its all-attention decoder."""
from torch import nn

from .attention import EmbeddingFreeAttention
from .drop import DropPath
from .mlp import MixFFN


class EFTBlock(nn.Module):
    """Pre-norm block: x + DP(EFA(LN1 x)); x + DP(FFN(LN2 x)).

    Encoder blocks (`decoder=False`): LayerNorm eps 1e-6, no norm on K/V, FFN with ReLU before the
    depth-wise conv. Decoder blocks (`decoder=True`): eps 1e-5, LayerNorm + GELU on K/V, plain
    Mix-FFN. These are the only differences in the authors' two Block classes.
    """

    def __init__(self, dim, num_heads, mlp_ratio, pool_ratio, drop_path=0.0, decoder=False):
        super().__init__()
        eps = 1e-5 if decoder else 1e-6
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = EmbeddingFreeAttention(dim, num_heads, pool_ratio, kv_norm=decoder)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MixFFN(dim, int(dim * mlp_ratio), relu_first=not decoder)

    def forward(self, x, hw):
        x = x + self.drop_path(self.attn(self.norm1(x), hw))
        return x + self.drop_path(self.mlp(self.norm2(x), hw))
