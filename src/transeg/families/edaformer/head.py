"""EDAFormer's all-attention decoder (Yu et al., ECCV 2024, Sec. 3.2).

Embedding-free transformer blocks refine the encoder's last three levels: 3 blocks on c4 (8 heads,
K/V pooled by 1), 2 on c3 (4 heads, pooled by 2), 1 on c2 (2 heads, pooled by 4), so each attends
to the same (H/32)x(W/32) grid in training. c4 and c3 are upsampled to c2's size, concatenated in
the authors' order [c4, c3, c2], fused by a 1x1 conv + BN + ReLU and classified by a 1x1 conv.
Block names (`attn4`, `attn44`, `attn444`, `attn3`, `attn33`, `attn2`) follow the authors' code.
Their model also carries mmseg's unused `conv_seg`; it is left out here and dropped on conversion.
By default the fuse conv's columns act on each branch before upsampling (exact algebra, see
`layers/fusion.py`), with the BatchNorm folded in eval.
"""
import torch
import torch.nn.functional as F
from torch import nn

from ...layers import ConvBNReLU, EFTBlock, map_to_tokens, tokens_to_map
from ...layers.fusion import fused_concat_conv_bn
from ...layers.init import init_weights

# branch name -> (block names, heads, training pool ratio); the ISR decoder ratios index these in
# the authors' order (c2, c3, c4).
_BRANCHES = {
    "c2": (("attn2",), 2, 4),
    "c3": (("attn3", "attn33"), 4, 2),
    "c4": (("attn4", "attn44", "attn444"), 8, 1),
}


class EDAFormerHead(nn.Module):
    mask_classification = False  # per-pixel logits (contracts.DecodeHead)

    def __init__(self, in_channels, embed_dim, num_classes, mlp_ratio=2, dropout=0.1, drop_path=0.1):
        """in_channels: the encoder's four widths (c1 is not used)."""
        super().__init__()
        self.num_classes = num_classes
        self.stride = 8
        for (branch, (names, heads, pool)), dim in zip(_BRANCHES.items(), in_channels[1:]):
            for name in names:
                setattr(self, name, EFTBlock(dim, heads, mlp_ratio, pool, drop_path, decoder=True))
        self.apply(init_weights)
        self.linear_fuse = ConvBNReLU(sum(in_channels[1:]), embed_dim)
        nn.init.kaiming_normal_(self.linear_fuse.conv.weight, mode="fan_out", nonlinearity="relu")
        # Dropout2d drops whole channels, as mmseg's BaseDecodeHead does.
        self.dropout = nn.Dropout2d(dropout)
        self.linear_pred = nn.Conv2d(embed_dim, num_classes, 1)
        self.fused = True

    def _branch(self, branch, x):
        hw = x.shape[-2:]
        tokens = map_to_tokens(x)
        for name in _BRANCHES[branch][0]:
            tokens = getattr(self, name)(tokens, hw)
        return tokens_to_map(tokens, hw)

    def forward(self, features):
        _, c2, c3, c4 = features
        size = c2.shape[-2:]
        if self.fused:  # upsample after the fuse conv's columns, not before (layers/fusion.py)
            maps = [self._branch("c4", c4), self._branch("c3", c3), self._branch("c2", c2)]
            x = fused_concat_conv_bn(maps, [None] * 3, self.linear_fuse.conv, self.linear_fuse.bn, size)
            return self.linear_pred(self.dropout(self.linear_fuse.act(x)))
        up = [F.interpolate(self._branch(b, x), size=size, mode="bilinear", align_corners=False)
              for b, x in (("c4", c4), ("c3", c3))]
        x = self.linear_fuse(torch.cat(up + [self._branch("c2", c2)], dim=1))
        return self.linear_pred(self.dropout(x))

    def isr_pools(self):
        """The key/value pools of each branch in the authors' ISR order (c2, c3, c4)."""
        return [[getattr(self, n).attn.pool for n in names] for names, _, _ in _BRANCHES.values()]
