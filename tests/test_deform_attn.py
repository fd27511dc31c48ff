"""Multi-scale deformable attention (Mask2Former's pixel decoder) against bilinear sampling written out by hand."""
import math

import torch

from transeg.layers.deform_attn import MSDeformAttn, deformable_sample


def _bilinear(img, x, y):
    """img [d, h, w]; (x, y) in [0, 1] with pixel centres at (i + 0.5) / size; zero outside."""
    d, h, w = img.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(d)
    for yy, xx in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
        if 0 <= yy < h and 0 <= xx < w:
            out += img[:, yy, xx] * (1 - abs(px - xx)) * (1 - abs(py - yy))
    return out


def test_sampling_equals_explicit_bilinear_interpolation():
    torch.manual_seed(0)
    shapes = [(5, 7), (3, 4)]
    n, heads, d, q, points = 2, 2, 3, 4, 3
    value = torch.randn(n, sum(h * w for h, w in shapes), heads, d)
    loc = torch.rand(n, q, heads, len(shapes), points, 2) * 1.2 - 0.1  # some points fall outside
    weights = torch.rand(n, q, heads, len(shapes), points)
    got = deformable_sample(value, shapes, loc, weights)
    levels = value.split([h * w for h, w in shapes], dim=1)
    for b in range(n):
        for i in range(q):
            for m in range(heads):
                acc = torch.zeros(d)
                for lvl, (h, w) in enumerate(shapes):
                    img = levels[lvl][b, :, m].T.reshape(d, h, w)
                    for p in range(points):
                        x, y = loc[b, i, m, lvl, p].tolist()
                        acc += weights[b, i, m, lvl, p] * _bilinear(img, x, y)
                assert torch.allclose(got[b, i, m * d:(m + 1) * d], acc, atol=1e-5)


def test_module_init_is_the_references_ring_of_points():
    """Reference init: zero attention logits (uniform weights over levels x points); the k-th point of a
    head starts k pixels along the head's direction (angle 2*pi*head/heads, scaled so max |x|,|y| = 1)."""
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=8, n_levels=1, n_heads=2, n_points=2)
    bias = attn.sampling_offsets.bias.view(2, 1, 2, 2)
    assert torch.allclose(bias[0, 0], torch.tensor([[1.0, 0.0], [2.0, 0.0]]), atol=1e-6)    # head 0: angle 0
    assert torch.allclose(bias[1, 0], torch.tensor([[-1.0, 0.0], [-2.0, 0.0]]), atol=1e-6)  # head 1: angle pi
    assert not attn.attention_weights.weight.any() and not attn.attention_weights.bias.any()
    value = torch.randn(1, 16, 8)
    out = attn(torch.randn(1, 3, 8), torch.full((1, 3, 1, 2), 0.5), value, [(4, 4)])
    assert out.shape == (1, 3, 8) and torch.isfinite(out).all()
