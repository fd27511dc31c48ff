"""The initialisations the transformer families share (training normally starts from ImageNet weights).

`init_linear_norm`: truncated-normal Linear weights (std 0.02, bounds ±2) with zero biases, unit
LayerNorms -- every family's transformer layers. `init_weights` adds the He-normal conv init
(fan_out = k·k·out/groups) of PVT, SegFormer and EDAFormer.
"""
import math

from torch import nn


def init_linear_norm(m):
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def init_weights(m):
    init_linear_norm(m)
    if isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)
