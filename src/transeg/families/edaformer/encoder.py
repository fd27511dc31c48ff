"""Embedding-Free Transformer (EFT), EDAFormer's hierarchical encoder (Yu et al., ECCV 2024).

MiT's four-stage layout (overlapping patch embeddings at strides 4, 8, 16, 32) with the
embedding-free attention: no q/k/v projections, keys = values = a 1x1 conv of the average-pooled
tokens, pooled by 8, 4, 2, 1 per stage in training so every stage attends to an (H/32)x(W/32) grid.
The FFN puts a ReLU before the depth-wise conv and a GELU after it.

Module names match the authors' `eft.py` (`patch_embed1`, `block1.0.attn.sr`, `norm1`, ...). Two
LayerNorm eps values coexist as in their model: 1e-5 in the patch embeddings, 1e-6 elsewhere.
`num_classes > 0` adds the ImageNet classifier (`head`, on the mean of the last stage's tokens, as
PVTv2 which EFT derives from) used to pre-train the encoder; segmentation never calls it.
"""
from torch import nn

from ...layers import EFTBlock
from ...layers.init import init_weights
from ...backbones.mit import build_stages, run_stages


class EmbeddingFreeTransformer(nn.Module):
    """Returns [c1, c2, c3, c4]: NCHW maps at strides 4, 8, 16, 32 with `embed_dims` channels."""

    pad_multiple = 1  # no input padding beyond the patch embeddings' own (contracts.Backbone)

    def __init__(self, in_chans=3, embed_dims=(32, 64, 128, 256), num_heads=(1, 2, 4, 8), mlp_ratios=(3.8,) * 4,
                 depths=(2, 2, 10, 2), pooling_ratios=(8, 4, 2, 1), drop_path_rate=0.2, num_classes=0):
        super().__init__()
        build_stages(self, in_chans, embed_dims, depths, drop_path_rate,
                     lambda s, rate: EFTBlock(embed_dims[s], num_heads[s], mlp_ratios[s], pooling_ratios[s], rate))
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else None
        self.apply(init_weights)

    def forward(self, x):
        return run_stages(self, x)

    def classify(self, x):
        """ImageNet logits [N, num_classes]: global average of the last stage, then `head`."""
        if self.head is None:
            raise ValueError("built without a classifier (num_classes=0)")
        return self.head(self.forward(x)[-1].mean(dim=(2, 3)))

    def isr_pools(self):
        """The key/value pools of each stage, for `transeg.isr`."""
        return [[b.attn.pool for b in getattr(self, f"block{s}")] for s in range(1, 5)]
