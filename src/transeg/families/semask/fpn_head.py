"""SeMask-FPN's head (the authors' `BranchFPNHead`): Semantic-FPN's head on the raw backbone maps (there
is no FPN neck despite the name) plus the parameter-free semantic decoder on the prior maps.

Main branch: level i goes through max(1, i) blocks of 3x3 conv-BN-ReLU (256 channels), each but the
first level's followed by a ×2 bilinear upsampling; the four are summed at stride 4 (the coarser ones
resized to the finest), then Dropout2d and `conv_seg`. Semantic decoder: the four prior maps summed
after i repeated ×2 bilinear upsamplings (then a resize), no weights. In training both are returned
for the loss: CE on the main logits (optionally OHEM) + 0.4 × CE on the semantic logits.
"""
import torch.nn.functional as F
from torch import nn

from ...contracts import LossInputs, SemanticFeatures
from ...layers import ConvBNReLU
from ...losses import ohem_cross_entropy, upsampled_cross_entropy


def _up():
    return nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)


def semantic_decoder(priors, align_corners=False, size=None):
    """SeMask's parameter-free semantic decoder: the prior map of stage i (stride 4·2^i) upsampled ×2
    i times, resized to stage 1's size and summed; optionally resized to `size`. SeMask-FPN
    interpolates with align_corners=False, SeMask-Mask2Former with True (and resizes ×4)."""
    def resize(x, **kw):
        return F.interpolate(x, mode="bilinear", align_corners=align_corners, **kw)

    out = priors[0]
    for i, p in enumerate(priors[1:], start=1):
        for _ in range(i):
            p = resize(p, scale_factor=2)
        out = out + resize(p, size=out.shape[-2:])
    return out if size is None else resize(out, size=tuple(size))


class SeMaskFPNHead(nn.Module):
    mask_classification = False  # per-pixel logits (contracts.DecodeHead)

    def __init__(self, in_channels, num_classes, channels=256, dropout=0.1, cate_weight=0.4):
        super().__init__()
        self.num_classes = num_classes
        self.stride = 4
        self.cate_weight = cate_weight
        self.scale_heads = nn.ModuleList()
        for i, c in enumerate(in_channels):
            layers = []
            for j in range(max(1, i)):
                layers.append(ConvBNReLU(c if j == 0 else channels, channels, 3, padding=1))
                if i > 0:
                    layers.append(_up())
            self.scale_heads.append(nn.Sequential(*layers))
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.fused = True  # the blocked losses (losses.upsampled_cross_entropy); layers.fusion.unfused turns it off
        for m in self.modules():
            if isinstance(m, ConvBNReLU):
                nn.init.kaiming_normal_(m.conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.normal_(self.conv_seg.weight, 0, 0.01)
        nn.init.zeros_(self.conv_seg.bias)

    @staticmethod
    def _merge(maps, heads):
        out = heads[0](maps[0])
        for x, head in zip(maps[1:], heads[1:]):
            out = out + F.interpolate(head(x), size=out.shape[-2:], mode="bilinear", align_corners=False)
        return out

    def forward(self, inputs: SemanticFeatures):
        features, priors = inputs
        seg = self.conv_seg(self.dropout(self._merge(features, self.scale_heads)))
        if not self.training:
            return seg
        return LossInputs(seg=seg, cls=semantic_decoder(priors))

    def loss(self, outputs, label, ignore_index=255, reduction="all", ohem=None):
        """loss_ce (OHEM when `ohem` = dict(thresh=None, min_kept=100000)) + 0.4 · loss_cate, both on logits
        upsampled to the label size."""
        if ohem:
            seg = F.interpolate(outputs["seg"].float(), size=label.shape[-2:], mode="bilinear", align_corners=False)
            ce = ohem_cross_entropy(seg, label, ignore_index=ignore_index, reduction=reduction, **ohem)
        else:
            ce = upsampled_cross_entropy(outputs["seg"], label, ignore_index, reduction, blocked=self.fused)
        cate = upsampled_cross_entropy(outputs["cls"], label, ignore_index, reduction, blocked=self.fused)
        cate = self.cate_weight * cate
        return {"loss": ce + cate, "loss_ce": ce, "loss_cate": cate}
