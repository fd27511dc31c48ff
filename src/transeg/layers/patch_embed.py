"""Patch embeddings."""
from torch import nn

from .shape import map_to_tokens


class OverlapPatchEmbed(nn.Module):
    """Conv with kernel > stride (padding k//2), flattened to tokens, then LayerNorm.

    Overlapping patches keep local continuity; with padding k//2 the output size is ceil(H/stride)
    for any H (odd sizes included).
    """

    def __init__(self, in_chans, embed_dim, patch_size=7, stride=4, norm_eps=1e-5):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride, patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)

    def forward(self, x):
        """Returns tokens (N, H'*W', C) and their grid size (H', W')."""
        x = self.proj(x)
        hw = x.shape[-2:]
        return self.norm(map_to_tokens(x)), hw
