"""Mix Transformer (MiT), SegFormer's hierarchical encoder (Xie et al., NeurIPS 2021).

Four stages at strides 4, 8, 16, 32. Each stage: overlapping patch embedding -> `depth` blocks of
(efficient self-attention, Mix-FFN), both pre-norm with residuals -> LayerNorm -> feature map.

Module names match the authors' `mix_transformer.py` (`patch_embed1`, `block1.0.attn.kv`, `norm1`,
...) so official checkpoints load with only a prefix change. Three LayerNorm eps values coexist in
the authors' model and are kept: 1e-5 in the patch embeddings and the reduction norms, 1e-6 in the
blocks and after each stage.
"""
from torch import nn

from ..layers import DropPath, MixFFN, OverlapPatchEmbed, SpatialReductionAttention, drop_path_rates, tokens_to_map
from ..layers.init import init_weights


class MiTBlock(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, sr_ratio, drop_path=0.0, qkv_bias=True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SpatialReductionAttention(dim, num_heads, sr_ratio, qkv_bias=qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MixFFN(dim, int(dim * mlp_ratio))

    def forward(self, x, hw):
        x = x + self.drop_path(self.attn(self.norm1(x), hw))
        return x + self.drop_path(self.mlp(self.norm2(x), hw))


class MixVisionTransformer(nn.Module):
    """Returns [c1, c2, c3, c4]: NCHW maps at strides 4, 8, 16, 32 with `embed_dims` channels."""

    pad_multiple = 1  # no input padding beyond the patch embeddings' own (contracts.Backbone)

    def __init__(self, in_chans=3, embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(4, 4, 4, 4),
                 depths=(3, 4, 6, 3), sr_ratios=(8, 4, 2, 1), drop_path_rate=0.1, qkv_bias=True):
        super().__init__()
        build_stages(self, in_chans, embed_dims, depths, drop_path_rate,
                     lambda s, rate: MiTBlock(embed_dims[s], num_heads[s], mlp_ratios[s], sr_ratios[s], rate, qkv_bias))
        self.apply(init_weights)

    def forward(self, x):
        return run_stages(self, x)

    def isr_pools(self):
        """The key/value pools of each stage, for `transeg.isr` (ISR pools before the strided conv)."""
        return [[b.attn.pool for b in getattr(self, f"block{s}")] for s in range(1, 5)]


def build_stages(encoder, in_chans, embed_dims, depths, drop_path_rate, make_block):
    """The four-stage layout MiT and EDAFormer's EFT share: `patch_embed{s}` (7x7/4, then 3x3/2, LayerNorm
    eps 1e-5), `block{s}` = [make_block(stage, drop-path rate)] * depth, `norm{s}` (eps 1e-6)."""
    encoder.out_channels = list(embed_dims)
    encoder.strides = [4, 8, 16, 32]
    encoder.depths = list(depths)
    rates = drop_path_rates(depths, drop_path_rate)
    chans = [in_chans] + list(embed_dims)
    for s in range(4):
        patch, stride = (7, 4) if s == 0 else (3, 2)
        setattr(encoder, f"patch_embed{s + 1}", OverlapPatchEmbed(chans[s], chans[s + 1], patch, stride, norm_eps=1e-5))
        setattr(encoder, f"block{s + 1}", nn.ModuleList(make_block(s, rates[s][j]) for j in range(depths[s])))
        setattr(encoder, f"norm{s + 1}", nn.LayerNorm(embed_dims[s], eps=1e-6))


def run_stages(encoder, x):
    """The four-stage loop MiT and EDAFormer's EFT share: `patch_embed{s}` -> `block{s}` -> `norm{s}` -> map."""
    features = []
    for s in range(1, 5):
        x, hw = getattr(encoder, f"patch_embed{s}")(x)
        for block in getattr(encoder, f"block{s}"):
            x = block(x, hw)
        x = getattr(encoder, f"norm{s}")(x)
        x = tokens_to_map(x, hw)
        features.append(x)
    return features
