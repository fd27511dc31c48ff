"""Multi-scale deformable attention (Zhu et al., Deformable DETR, ICLR 2021), the attention of
Mask2Former's pixel decoder, in plain PyTorch (no compiled extension).

Each query looks at `n_points` locations per head and per feature level: its reference point plus
learned offsets (in pixels of that level), samples the values there bilinearly (zero outside,
align_corners=False, i.e. pixel centres at (i + 0.5) / size) and averages them with learned weights
softmaxed over all levels and points. Names follow the reference implementation (`sampling_offsets`,
`attention_weights`, `value_proj`, `output_proj`) so Mask2Former checkpoints load unchanged.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


def deformable_sample(value, shapes, locations, weights):
    """value [N, S, heads, d] (levels concatenated, row-major), shapes [(h, w)] per level,
    locations [N, Q, heads, levels, points, 2] as (x, y) in [0, 1], weights [N, Q, heads, levels, points]
    -> [N, Q, heads * d]."""
    n, _, heads, d = value.shape
    _, q, _, levels, points, _ = locations.shape
    grids = 2 * locations - 1  # grid_sample's [-1, 1]
    sampled = []
    for lvl, per_level in enumerate(value.split([h * w for h, w in shapes], dim=1)):
        h, w = shapes[lvl]
        v = per_level.permute(0, 2, 3, 1).reshape(n * heads, d, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # [N*heads, Q, points, 2]
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    stacked = torch.stack(sampled, dim=-2).flatten(-2)  # [N*heads, d, Q, levels*points]
    w = weights.transpose(1, 2).reshape(n * heads, 1, q, levels * points)
    return (stacked * w).sum(-1).view(n, heads * d, q).transpose(1, 2)


class MSDeformAttn(nn.Module):
    def __init__(self, d_model=256, n_levels=4, n_heads=8, n_points=4):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self):
        """The reference initialisation: offsets start on a ring of directions (one per head), the k-th
        point k pixels out; uniform attention weights; Xavier projections."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1) * torch.arange(1, self.n_points + 1).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, query, reference_points, value, shapes, padding_mask=None):
        """query [N, Q, C]; reference_points [N, Q, levels, 2] (x, y) in [0, 1]; value [N, S, C] with S the
        sum of h*w over `shapes`; padding_mask [N, S] True where padded."""
        n, q, _ = query.shape
        v = self.value_proj(value)
        if padding_mask is not None:
            v = v.masked_fill(padding_mask[..., None], 0.0)
        v = v.view(n, -1, self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(n, q, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(n, q, self.n_heads, self.n_levels * self.n_points).softmax(-1)
        weights = weights.view(n, q, self.n_heads, self.n_levels, self.n_points)
        # Positions and the bilinear sampling stay fp32 whatever the weights' dtype (no-ops in fp32):
        # a bf16 position in [0, 1] is off by up to half a pixel on a 128-wide map.
        normalizer = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32, device=query.device)
        locations = reference_points.float()[:, :, None, :, None, :] + offsets.float() / normalizer[None, None, None, :, None, :]
        out = deformable_sample(v.float(), shapes, locations, weights.float())
        return self.output_proj(out.to(query.dtype))
