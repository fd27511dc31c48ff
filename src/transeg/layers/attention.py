"""Attention whose keys/values come from a spatially reduced copy of the tokens.

Two families pool keys/values here:

- SegFormer's "efficient self-attention" (PVT's spatial-reduction attention): queries are all H·W
  tokens; keys and values come from the token map shrunk by a strided conv (kernel = stride =
  `sr_ratio`) and a LayerNorm, which cuts the cost from O((HW)^2) to O((HW)^2 / sr^2).
- EDAFormer's embedding-free attention: no q/k/v projections at all; the queries are the tokens
  themselves and keys = values = a 1x1 conv of the average-pooled tokens.

Both reduce with a `KeyValuePool`, which carries the inference spatial reduction (ISR) multiplier
(see `transeg.isr`): pooling harder at inference changes no weight, only how coarse K/V are.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .rope import apply_rotary
from .shape import map_to_tokens, tokens_to_map


class KeyValuePool(nn.Module):
    """Average pooling with kernel = stride = `ratio × isr` (floor semantics, as nn.AvgPool2d).

    `ratio` is the pooling the weights were trained with; `isr` is the inference multiplier set by
    `transeg.isr.set_isr`. A window larger than the map is clipped to the map (one global K/V token
    in that direction) instead of failing on an empty output, which the authors' code would do.
    Holds no parameters, so the state dict is the same for every setting.

    `kv_reduction` is what the attention's keys/values end up reduced by, for reports: the pooling
    itself for EDAFormer, the strided conv's ratio × ISR for SegFormer (whose pool only does ISR).
    """

    def __init__(self, ratio=1, trained_reduction=None):
        super().__init__()
        self.ratio = int(ratio)
        self.trained_reduction = int(trained_reduction or ratio)
        self.isr = 1

    @property
    def effective(self):
        return self.ratio * self.isr

    @property
    def kv_reduction(self):
        return self.trained_reduction * self.isr

    def forward(self, x):
        s = self.effective
        if torch.compiler.is_exporting():
            # symbolic sizes: a min() here becomes a guard torch.export cannot solve; exported graphs
            # therefore need maps at least as large as the window (as the authors' code does)
            return F.avg_pool2d(x, s, s)
        k = (min(s, x.shape[-2]), min(s, x.shape[-1]))
        return F.avg_pool2d(x, k, k)

    def extra_repr(self):
        return f"ratio={self.ratio}, isr={self.isr}"


class SpatialReductionAttention(nn.Module):
    """Multi-head attention with strided-conv key/value reduction.

    Parameter names follow the authors' code (`q`, `kv`, `proj`, `sr`, `norm`) so their checkpoints
    load unchanged. `kv` is one Linear with 2C outputs: rows [0, C) are K and [C, 2C) are V, each
    ordered head-major. ISR pools the tokens by `pool.isr` *before* the strided conv, which is how
    ISR is added to SegFormer; the trained path never calls the pool.
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
        self.pool = KeyValuePool(1, trained_reduction=sr_ratio)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=norm_eps)

    def forward(self, x, hw):
        n, length, c = x.shape
        heads = self.num_heads
        q = self.q(x).reshape(n, length, heads, c // heads).transpose(1, 2)
        if self.sr_ratio > 1 or self.pool.isr > 1:
            kv_map = tokens_to_map(x, hw)
            if self.pool.isr > 1:
                kv_map = self.pool(kv_map)
            if self.sr_ratio > 1:
                kv_map = self.sr(kv_map)
            x = map_to_tokens(kv_map)
            if self.sr_ratio > 1:
                x = self.norm(x)
        kv = self.kv(x).reshape(n, -1, 2, heads, c // heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1], dropout_p=self.attn_drop if self.training else 0.0)
        out = out.transpose(1, 2).reshape(n, length, c)
        return self.proj_drop(self.proj(out))


class EmbeddingFreeAttention(nn.Module):
    """EDAFormer's embedding-free attention.

    Q = the input tokens split into heads; K = V = `sr`(pool(tokens)), a 1x1 conv of the pooled map
    (the decoder's version adds LayerNorm + GELU after it: `kv_norm=True`); output = `proj`(attn).
    Because the 1x1 conv acts after pooling, its weights do not depend on the pooling ratio, which
    is what lets ISR pool harder at inference with the trained weights. Names follow the authors'
    code (`pool`, `sr`, `norm`, `act`, `proj`).
    """

    def __init__(self, dim, num_heads, pool_ratio, kv_norm=False, norm_eps=1e-5, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.pool = KeyValuePool(pool_ratio)
        self.sr = nn.Conv2d(dim, dim, 1)
        if kv_norm:
            self.norm = nn.LayerNorm(dim, eps=norm_eps)
            self.act = nn.GELU()
        self.kv_norm = kv_norm
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, hw):
        n, length, c = x.shape
        heads = self.num_heads
        q = x.reshape(n, length, heads, c // heads).transpose(1, 2)
        # The pool runs even at ratio 1 (as the authors' nn.AvgPool2d(1) does) so that FLOP counts
        # in their convention, which count pooling inputs, come out equal.
        kv = map_to_tokens(self.sr(self.pool(tokens_to_map(x, hw))))
        if self.kv_norm:
            kv = self.act(self.norm(kv))
        kv = kv.reshape(n, -1, heads, c // heads).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, kv, kv, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(n, length, c)))


class MultiHeadSelfAttention(nn.Module):
    """Standard ViT self-attention with one fused `qkv` Linear (rows q | k | v, each head-major) and
    `proj`, as timm's and Segmenter's layout, computed with scaled_dot_product_attention.
    `key_bias=False` (DINOv3: biases on queries and values only) keeps the Linear bias-free and holds the
    two biases as `q_bias` and `v_bias` (timm's BEiT names), the key's fixed at zero."""

    def __init__(self, dim, num_heads, qkv_bias=True, attn_drop=0.0, proj_drop=0.0, key_bias=True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        split = qkv_bias and not key_bias
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias and not split)
        if split:
            self.q_bias, self.v_bias = nn.Parameter(torch.zeros(dim)), nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def qkv_bias(self):
        if self.q_bias is None:
            return self.qkv.bias
        return torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])

    def forward(self, x, context=None, attn_mask=None, rope=None):
        """Self-attention; with `context`, the queries come from `x` and keys/values from `context`
        through the same fused weights (SegViT's query-based down-sampling). `attn_mask`: a boolean
        mask broadcastable to [N, heads, L, S], True where a query may attend (EoMT's masked attention).
        `rope`: (cos, sin) of `layers.rope`, which rotates the queries and keys of the last tokens (the patches)."""
        n, length, c = x.shape
        heads = self.num_heads
        if context is None:
            qkv = self.qkv(x) if self.q_bias is None else F.linear(x, self.qkv.weight, self.qkv_bias())
            q, k, v = qkv.reshape(n, length, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
            if rope is not None:
                q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        else:
            if rope is not None:
                raise ValueError("rotary position embeddings with a separate key/value context are not supported")
            w, b = self.qkv.weight, self.qkv_bias()
            q = F.linear(x, w[:c], None if b is None else b[:c]).reshape(n, length, heads, c // heads).transpose(1, 2)
            k, v = F.linear(context, w[c:], None if b is None else b[c:]).reshape(
                n, -1, 2, heads, c // heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(n, length, c)))
