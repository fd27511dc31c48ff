"""The from-scratch initialisation PVT, SegFormer and EDAFormer share (training normally starts from
ImageNet weights instead): truncated-normal Linear (std 0.02, bounds ±2), unit LayerNorm, and
He-normal convs with fan_out = k·k·out/groups."""
import math

from torch import nn


def init_weights(m):
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)
