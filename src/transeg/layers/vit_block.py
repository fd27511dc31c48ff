"""The pre-norm transformer block of ViT, shared by the plain-ViT encoders and Segmenter's decoder."""
import torch
from torch import nn

from .attention import MultiHeadSelfAttention
from .drop import DropPath
from .mlp import Mlp


class LayerScale(nn.Module):
    """CaiT's per-channel scale of a residual branch (Touvron et al. 2021), as DINOv2 trains with it:
    x * gamma, gamma initialised to `init` (timm's name `gamma`)."""

    def __init__(self, dim, init=1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x):
        return x * self.gamma


class TransformerBlock(nn.Module):
    """x + DP(attn(norm1 x)); x + DP(mlp(norm2 x)). `drop` is used for the attention probabilities,
    the attention projection and both FFN dropouts, as in Segmenter's blocks. `drop_path_attn=False`
    keeps stochastic depth off the attention branch (mmseg 0.24's ViT, which SegViT trains with).
    With `context`, the block cross-attends: x + attn(norm1 x, norm1 context) (SegViT's QD layer).
    `layer_scale_init` adds LayerScale to both branches (`ls1`, `ls2`: DINOv2); `attn_mask` restricts
    the attention (EoMT's masked attention); `key_bias=False` drops the key bias (DINOv3); `rope` rotates the
    patches' queries and keys (DINOv3's rotary position embedding, `layers.rope`)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, drop=0.0, drop_path=0.0, norm_eps=1e-5, qkv_bias=True,
                 drop_path_attn=True, layer_scale_init=None, key_bias=True):
        super().__init__()
        self.drop_path_attn = drop_path_attn
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = MultiHeadSelfAttention(dim, num_heads, qkv_bias, attn_drop=drop, proj_drop=drop, key_bias=key_bias)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if layer_scale_init is not None:
            self.ls1, self.ls2 = LayerScale(dim, layer_scale_init), LayerScale(dim, layer_scale_init)
        else:
            self.ls1 = self.ls2 = None

    def forward(self, x, context=None, attn_mask=None, rope=None):
        y = self.attn(self.norm1(x), None if context is None else self.norm1(context), attn_mask, rope)
        if self.ls1 is not None:
            y = self.ls1(y)
        x = x + (self.drop_path(y) if self.drop_path_attn else y)
        y = self.mlp(self.norm2(x))
        return x + self.drop_path(y if self.ls2 is None else self.ls2(y))
