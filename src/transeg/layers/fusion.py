"""Exact algebraic fusion of the all-MLP style decoders.

SegFormer's and EDAFormer's heads concatenate maps that were (a) linearly projected and (b)
bilinearly upsampled to one resolution, then mix them with a 1x1 conv followed by BatchNorm. Both
(a), (b) and the 1x1 conv are linear, and bilinear interpolation mixes pixels while a 1x1 conv mixes
channels, so they commute: `conv(cat_i(up(P_i x_i))) == sum_i up((W_i P_i) x_i)` where W_i is the
conv's block of columns for input i (bias too, as interpolation weights sum to one). The right-hand
side projects each level at its own resolution straight to the output width, which for SegFormer-B0
at 512x512 turns the 4.3 GMACs fuse conv into 0.25, and never materialises the 4E-channel concat.
In eval, BatchNorm is an affine map per channel and folds into W_i P_i as well.

The fused path is the default in training and inference (gradients are those of the same function);
`unfused(model)` switches back to the published computation, which FLOP counts in the papers'
convention and the equality tests use.
"""
import contextlib
import functools

import torch
import torch.nn.functional as F

from .shape import map_to_tokens, tokens_to_map


def set_fused(model, fused):
    """Put `model`'s fusable modules (those with a `fused` attribute: these decoders, and the blocked training
    loss of `losses.upsampled_cross_entropy`) in the fused form (True) or the published one (False); returns
    their previous flags, for `restore_fused`. Which form a device trains with is `device.Paths.training_form`."""
    modules = [m for m in model.modules() if hasattr(m, "fused")]
    saved = [(m, m.fused) for m in modules]
    for m in modules:
        m.fused = fused
    return saved


def restore_fused(saved):
    for m, flag in saved:
        m.fused = flag


@contextlib.contextmanager
def unfused(model):
    """`model` in its published form (`set_fused(model, False)`) within the block."""
    saved = set_fused(model, False)
    try:
        yield model
    finally:
        restore_fused(saved)


def fused_concat_conv_bn(inputs, projections, conv, bn, size):
    """`bn(conv(cat_i(up(proj_i(x_i)))))` computed as `sum_i up(fused_i(x_i))`, see the module doc.

    inputs: maps (N, C_i, h_i, w_i) in the concat order; projections: per input a (weight, bias)
    applied to its channels before the concat, or None for the identity; conv: the 1x1 Conv2d
    without bias; bn: its BatchNorm2d (folded in eval, batch statistics in training); size: the
    output (H, W). Returns the normalised map (channels-last), before the activation.
    """
    weight = conv.weight.flatten(1)
    shift = None
    if not bn.training:
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        shift = bn.bias - bn.running_mean * scale
        weight = weight * scale[:, None]
    fused, start = [], 0
    for x, proj in zip(inputs, projections):
        c = x.shape[1] if proj is None else proj[0].shape[0]
        w, b = weight[:, start:start + c], None
        start += c
        if proj is not None:
            w, b = w @ proj[0], w @ proj[1]
        fused.append([x, w, b])
    if start != weight.shape[1]:
        raise ValueError(f"inputs have {start} channels in all, the conv expects {weight.shape[1]}")
    # Accumulate into the input already at the output size (no upsampling, and it takes the folded
    # BatchNorm shift as bias, since interpolation carries a constant through unchanged).
    first = next((i for i, f in enumerate(fused) if tuple(f[0].shape[-2:]) == tuple(size)), 0)
    fused.insert(0, fused.pop(first))
    if shift is not None:
        fused[0][2] = shift if fused[0][2] is None else fused[0][2] + shift
    ys = [tokens_to_map(F.linear(map_to_tokens(x), w, b), x.shape[-2:]) for x, w, b in fused]
    out, rest = ys[0], ys[1:]
    if out.device.type == "cpu" and out.dtype in (torch.bfloat16, torch.float16):
        out = upsample_sum_gemm(out, rest)
    else:
        for y in rest:
            up = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            # In place for inference (a full-size buffer less); not under autograd, where `out` is a
            # view of the linear's output and an in-place add makes backward rebuild the whole base
            # (CopySlices) and hand the upsampling a non-channels-last gradient, which costs far more than the
            # buffer saved.
            out = out + up if out.requires_grad else out.add_(up)
    return out if shift is not None else bn(out)


@functools.lru_cache(maxsize=64)
def bilinear_matrix(out_size, in_size, dtype, device):
    """(out_size, in_size) matrix M with `M @ v` = 1-D bilinear resampling of v, align_corners=False,
    PyTorch's exact rule: source = max((i + 0.5) * in/out - 0.5, 0), two taps, the last one clamped.
    Cached, so always made as a normal tensor: one made under inference_mode could not enter a
    later training step's autograd graph."""
    with torch.inference_mode(False):
        return _bilinear_matrix(out_size, in_size).to(dtype=dtype, device=device)


def _bilinear_matrix(out_size, in_size):
    i = torch.arange(out_size, dtype=torch.float64)
    src = ((i + 0.5) * (in_size / out_size) - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=in_size - 1)
    i1 = (i0 + 1).clamp(max=in_size - 1)
    frac = src - i0
    m = torch.zeros(out_size, in_size, dtype=torch.float64)
    m.index_put_((i.long(), i0), 1 - frac, accumulate=True)
    m.index_put_((i.long(), i1), frac, accumulate=True)
    return m


def upsample_sum_gemm(acc, maps):
    """`acc + sum_i up(maps_i)` (bilinear, align_corners=False, to acc's size) as matrix products:
    each map is resampled along W by one batched GEMM, then all of them along H by a single GEMM
    that accumulates into `acc` (their H-matrices side by side, K = sum of the heights). Used for
    bf16/fp16 on CPU, where the interpolation kernel runs several times slower than this (and rounds to bf16
    after every level, where the GEMM accumulates in fp32); equal to interpolate + add otherwise."""
    n, c, height, width = acc.shape
    rows, resampled = [], []
    for y in maps:
        h, w = y.shape[-2:]
        z = torch.matmul(bilinear_matrix(width, w, y.dtype, y.device), map_to_tokens(y).reshape(n * h, w, c))
        resampled.append(z.reshape(n, h, width * c))
        rows.append(bilinear_matrix(height, h, y.dtype, y.device))
    a = torch.cat(rows, 1).expand(n, -1, -1)
    out = torch.baddbmm(map_to_tokens(acc).reshape(n, height, width * c), a, torch.cat(resampled, 1))
    return tokens_to_map(out.reshape(n, height * width, c), (height, width))
