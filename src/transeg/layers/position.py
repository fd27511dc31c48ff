"""Fixed sine position embeddings for 2-D maps (DETR's `PositionEmbeddingSine`, normalised variant).

For an unpadded h×w map, row i and column j get y = (i+1)/(h+eps)·2π and x = (j+1)/(w+eps)·2π (the
cumulative count of valid pixels, normalised by the last one); each coordinate is expanded into
`num_feats` channels sin/cos-interleaved at frequencies 10000^(2⌊k/2⌋/num_feats), y channels first.
"""
import math

import torch


def sine_position_embedding(h, w, num_feats, device=None, temperature=10000.0, eps=1e-6):
    """[1, 2·num_feats, h, w] (float32)."""
    y = torch.arange(1, h + 1, dtype=torch.float32, device=device)[:, None].expand(h, w)
    x = torch.arange(1, w + 1, dtype=torch.float32, device=device)[None, :].expand(h, w)
    # the reference's float32 operations, in its order (its outputs are matched bit for bit)
    y = y / (y[-1:, :] + eps) * (2 * math.pi)
    x = x / (x[:, -1:] + eps) * (2 * math.pi)
    k = torch.arange(num_feats, dtype=torch.float32, device=device)
    freq = temperature ** (2 * torch.div(k, 2, rounding_mode="floor") / num_feats)
    pos_x, pos_y = x[..., None] / freq, y[..., None] / freq
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=-1).flatten(-2)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=-1).flatten(-2)
    return torch.cat((pos_y, pos_x), dim=-1).permute(2, 0, 1)[None]
