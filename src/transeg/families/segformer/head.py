"""SegFormer's All-MLP decoder (Xie et al., NeurIPS 2021, Sec. 3.2).

Each encoder level is projected to E channels by a Linear, upsampled to stride 4, and the four are
concatenated in the authors' order [c4, c3, c2, c1], fused by a 1x1 conv + BN + ReLU, and classified
by a 1x1 conv. Names follow the authors' `segformer_head.py`. Their model also carries an unused
`conv_seg` (a leftover of mmseg's BaseDecodeHead); it is left out here and dropped on conversion.

By default the projections, the fuse conv and (in eval) its BatchNorm run fused (exact algebra, see
`layers/fusion.py`): each level is projected straight to the fused width at its own resolution.
"""
import torch
import torch.nn.functional as F
from torch import nn

from ...layers import ConvBNReLU
from ...layers.fusion import fused_concat_conv_bn


class MLP(nn.Module):
    """Linear projection of a feature map's tokens (named `proj` as in the authors' code)."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x):
        n, _, h, w = x.shape
        return self.proj(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(n, -1, h, w)


class SegFormerHead(nn.Module):
    mask_classification = False  # per-pixel logits (contracts.DecodeHead)

    def __init__(self, in_channels, embed_dim, num_classes, dropout=0.1):
        super().__init__()
        self.num_classes = num_classes
        self.stride = 4
        for i, c in enumerate(in_channels):
            setattr(self, f"linear_c{i + 1}", MLP(c, embed_dim))
        self.linear_fuse = ConvBNReLU(len(in_channels) * embed_dim, embed_dim)
        # Dropout2d drops whole channels, as the authors' head does (HF uses element-wise Dropout).
        self.dropout = nn.Dropout2d(dropout)
        self.linear_pred = nn.Conv2d(embed_dim, num_classes, 1)
        self.fused = True

    def forward(self, features):
        size = features[0].shape[-2:]
        if self.fused:
            order = list(reversed(range(len(features))))  # the authors concatenate c4 first
            projections = [(getattr(self, f"linear_c{i + 1}").proj.weight, getattr(self, f"linear_c{i + 1}").proj.bias)
                           for i in order]
            x = fused_concat_conv_bn([features[i] for i in order], projections, self.linear_fuse.conv,
                                     self.linear_fuse.bn, size)
            return self.linear_pred(self.dropout(self.linear_fuse.act(x)))
        projected = []
        for i in reversed(range(len(features))):  # the authors concatenate c4 first
            x = getattr(self, f"linear_c{i + 1}")(features[i])
            if i > 0:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            projected.append(x)
        x = self.linear_fuse(torch.cat(projected, dim=1))
        return self.linear_pred(self.dropout(x))
