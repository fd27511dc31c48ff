"""Rotary position embedding (RoPE; Su et al., "RoFormer", 2021) on a 2-D patch grid, as DINOv3 (Siméoni et al.,
2025) trains its ViT with it instead of learned absolute position embeddings.

Each patch gets its centre's coordinates normalised to [-1, 1]: row i of gh rows has y = 2 (i + 1/2) / gh - 1,
column j likewise x. A head of dimension d is rotated in d/2 planes: plane k pairs channel k with channel
k + d/2 (the two halves of the head), and turns it by the angle 2π · c · θ^(-4m/d), where the first d/4 planes
take c = y and the next d/4 take c = x, each with m = 0 .. d/4 - 1 (periods θ^(4m/d), θ = 100 for DINOv3).
Queries and keys of the patch tokens are rotated; the tokens before them (class, registers, EoMT's queries) are
not, so their attention to a patch depends on its content only, and patch-patch attention on relative position.

In training DINOv3 augments the coordinates ("RoPE box jittering"): a shift by a uniform [-shift, shift] per
axis, a jitter by a log-uniform factor in [1/jitter, jitter] per axis, and a rescale by a log-uniform factor in
[1/rescale, rescale] for both axes; each is off when None. Evaluation uses the plain coordinates.

Holds no parameters: the angles are computed from the grid of each input, so any input size works.
"""
import math

import torch
from torch import nn


class RotaryPositionEmbedding(nn.Module):
    """forward(grid) -> (cos, sin), each [gh * gw, head_dim] (float32), for `apply_rotary`."""

    def __init__(self, head_dim, theta=100.0, shift=None, jitter=None, rescale=None):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2-D RoPE rotates head_dim / 4 planes per axis; head_dim {head_dim} is not a multiple of 4")
        self.head_dim, self.theta = head_dim, float(theta)
        self.shift, self.jitter, self.rescale = shift, jitter, rescale

    def coordinates(self, grid, device=None):
        """[gh * gw, 2] patch centres (y, x) in [-1, 1], row-major."""
        gh, gw = grid
        y = (torch.arange(gh, dtype=torch.float32, device=device) + 0.5) / gh * 2 - 1
        x = (torch.arange(gw, dtype=torch.float32, device=device) + 0.5) / gw * 2 - 1
        return torch.stack(torch.meshgrid(y, x, indexing="ij"), dim=-1).reshape(-1, 2)

    def box_jittering(self, coords):
        if self.shift is not None:
            coords = coords + torch.empty(1, 2, device=coords.device).uniform_(-self.shift, self.shift)
        if self.jitter is not None:
            r = math.log(self.jitter)
            coords = coords * torch.empty(1, 2, device=coords.device).uniform_(-r, r).exp()
        if self.rescale is not None:
            r = math.log(self.rescale)
            coords = coords * torch.empty(1, device=coords.device).uniform_(-r, r).exp()
        return coords

    def forward(self, grid, device=None):
        coords = self.coordinates(grid, device)
        if self.training:
            coords = self.box_jittering(coords)
        m = torch.arange(self.head_dim // 4, dtype=torch.float32, device=device)
        frequencies = self.theta ** (-4 * m / self.head_dim)                      # [d/4]
        angles = 2 * math.pi * coords[:, :, None] * frequencies                  # [T, 2 (y, x), d/4]
        angles = angles.reshape(coords.shape[0], -1)                              # [T, d/2]: y planes, then x planes
        return angles.cos(), angles.sin()

    def extra_repr(self):
        return f"head_dim={self.head_dim}, theta={self.theta}, shift={self.shift}, jitter={self.jitter}, " \
               f"rescale={self.rescale}"


def apply_rotary(x, cos, sin):
    """Rotate the last cos.shape[0] tokens of x [N, heads, T, d] (the patches; the tokens before stay as they
    are): plane k of (channel k, channel k + d/2) turns by angle k. cos, sin: [P, d/2]."""
    p, half = cos.shape[0], cos.shape[1]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    prefix, patches = x[..., :-p, :], x[..., -p:, :]
    a, b = patches[..., :half], patches[..., half:]
    rotated = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
    return torch.cat([prefix, rotated], dim=-2)
