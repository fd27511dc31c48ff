"""Attention whose keys/values come from a spatially reduced copy of the tokens.

SegFormer's "efficient self-attention" (PVT's spatial-reduction attention): queries are all H·W
tokens; keys and values are computed from the token map shrunk by a strided conv (kernel = stride
= `sr_ratio`) and a LayerNorm, which cuts the cost from O((HW)^2) to O((HW)^2 / sr^2).
"""
import torch.nn.functional as F
from torch import nn


def tokens_to_map(x, hw):
    """(N, H*W, C) -> (N, C, H, W)."""
    n, _, c = x.shape
    return x.transpose(1, 2).reshape(n, c, hw[0], hw[1])


class SpatialReductionAttention(nn.Module):
    """Multi-head attention with strided-conv key/value reduction.

    Parameter names follow the authors' code (`q`, `kv`, `proj`, `sr`, `norm`) so their checkpoints
    load unchanged. `kv` is one Linear with 2C outputs: rows [0, C) are K and [C, 2C) are V, each
    ordered head-major.
    """

    def __init__(self, dim, num_heads, sr_ratio=1, qkv_bias=True, attn_drop=0.0, proj_drop=0.0, norm_eps=1e-5):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.sr_ratio = sr_ratio
        self.attn_drop = attn_drop
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=norm_eps)

    def forward(self, x, hw):
        n, length, c = x.shape
        heads = self.num_heads
        q = self.q(x).reshape(n, length, heads, c // heads).transpose(1, 2)
        if self.sr_ratio > 1:
            reduced = self.sr(tokens_to_map(x, hw)).flatten(2).transpose(1, 2)
            x = self.norm(reduced)
        kv = self.kv(x).reshape(n, -1, 2, heads, c // heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1], dropout_p=self.attn_drop if self.training else 0.0)
        out = out.transpose(1, 2).reshape(n, length, c)
        return self.proj_drop(self.proj(out))
