"""Multi-head attention between two token sets, as DETR-style decoders use it.

Parameters are named as `torch.nn.MultiheadAttention`'s (`in_proj_weight` [3C, C] stacking the Q, K and
V projections, `in_proj_bias`, `out_proj`), so checkpoints of models built on it (Mask2Former) load
unchanged; the computation goes through `F.scaled_dot_product_attention`, batch-first. Position
embeddings are the caller's business (added to queries/keys, not values), as in those models.
"""
import torch
import torch.nn.functional as F
from torch import nn


class MultiheadAttention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def _heads(self, x, w, b):
        n, length, c = x.shape
        return F.linear(x, w, b).view(n, length, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, query, key, value, allowed=None):
        """query [N, Q, C], key/value [N, S, C]; allowed: bool, broadcastable to [N, heads, Q, S], True
        where a query may attend (the opposite of nn.MultiheadAttention's attn_mask)."""
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        q, k, v = self._heads(query, wq, bq), self._heads(key, wk, bk), self._heads(value, wv, bv)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.out_proj(out.transpose(1, 2).flatten(2))
