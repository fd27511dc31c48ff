"""Swin Transformer (Liu et al., ICCV 2021) as a segmentation encoder, in the layout of the authors'
segmentation code (Swin-Transformer-Semantic-Segmentation, which SeMask forks).

Patch embedding (4×4 conv + LayerNorm; inputs zero-padded to a multiple of 4) -> four stages of
(shifted-)window attention blocks with a relative position bias, joined by patch merging -> a
LayerNorm per output stage (`norm0..3`). Every block of a stage alternates shift 0 / window//2, the
last stage included; feature maps that do not divide by the window are zero-padded after `norm1`
(padded tokens take part as zero keys/values, as theirs) and the shifted-window mask uses -100.

Names follow the authors' (`patch_embed.proj`, `layers.i.blocks.j.attn.relative_position_bias_table`,
`layers.i.downsample.reduction`, `norm{i}`); `relative_position_index` is kept as a (saved) buffer so
their checkpoints load strictly.
"""
import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import DropPath, Mlp, drop_path_rates
from ..layers.init import init_linear_norm
from ..layers.shape import round_up


def window_partition(x, w):
    """[B, H, W, C] (H, W multiples of w) -> [B, nW, w*w, C], windows in row-major order."""
    b, h, wd, c = x.shape
    return x.view(b, h // w, w, wd // w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(b, -1, w * w, c)


def window_reverse(windows, w, h, wd):
    """[B, nW, w*w, C] -> [B, H, W, C]."""
    b, _, _, c = windows.shape
    return windows.view(b, h // w, wd // w, w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, wd, c)


def pad_to_windows(x, w):
    """[B, H, W, C] zero-padded at the bottom and right to multiples of the window w."""
    h, wd = x.shape[1:3]
    return F.pad(x, (0, 0, 0, round_up(wd, w) - wd, 0, round_up(h, w) - h))


def relative_position_index(w):
    """(w², w²) indices into the ((2w-1)², heads) bias table: (dy + w - 1) * (2w - 1) + (dx + w - 1)."""
    coords = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (w - 1)
    return rel[..., 0] * (2 * w - 1) + rel[..., 1]


def _bands(n, w, s, device):
    """Region of each of n padded rows (or columns) for the shifted windows: 0 up to n - w, 1 up to
    n - s, 2 after (the authors' slices (0, -w), (-w, -s), (-s, None)), as arithmetic: the same mask,
    with far fewer symbolic expressions to trace than nine slice assignments (a faster dynamic-size
    ONNX export)."""
    i = torch.arange(n, device=device)
    return (i >= n - w).long() + (i >= n - s).long()


@functools.lru_cache(maxsize=64)
def shift_mask(hp, wp, w, s, device):
    """The shifted-window attention mask [nW, w², w²]: 0 within a region, -100 across regions. Cached:
    it depends only on the padded size, the window and the device, and no step writes to it."""
    img = (3 * _bands(hp, w, s, device)[:, None] + _bands(wp, w, s, device)[None, :]).float()
    regions = window_partition(img[None, :, :, None], w)[0, :, :, 0]  # [nW, w²]
    diff = regions[:, None, :] - regions[:, :, None]
    return torch.where(diff != 0, -100.0, 0.0)


class WindowAttention(nn.Module):
    def __init__(self, dim, window_size, num_heads, qkv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x, mask=None):
        """x: [B, nW, N, C] windows; mask: [nW, N, N] or None."""
        b, nw, n, c = x.shape
        h = self.num_heads
        # windows folded into the batch: 4-D attention, which every SDPA kernel and ONNX's converter take
        q, k, v = self.qkv(x).reshape(b * nw, n, 3, h, c // h).permute(2, 0, 3, 1, 4)  # [B·nW, heads, N, d]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, h).permute(2, 0, 1)
        if mask is not None:  # [nW, heads, N, N], the same for every image
            bias = bias + mask[:, None]
        if torch.compiler.is_exporting():
            # written out: the exporter's SDPA decomposition yields strides its own next view rejects;
            # the mask broadcasts over the images instead of being copied for each
            attn = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).view(b, nw, h, n, n) + bias.to(q.dtype)
            out = attn.view(b * nw, h, n, n).softmax(-1) @ v
        else:
            if mask is not None:
                bias = bias.expand(b, -1, -1, -1, -1).reshape(b * nw, h, n, n)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.proj(out.transpose(1, 2).reshape(b, nw, n, c))


class SwinBlock(nn.Module):
    def __init__(self, dim, num_heads, window_size, shift, mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        self.window_size, self.shift = window_size, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, hw, mask):
        h, wd = hw
        b, _, c = x.shape
        w, s = self.window_size, self.shift
        y = pad_to_windows(self.norm1(x).view(b, h, wd, c), w)
        hp, wp = y.shape[1:3]
        if s:
            y = torch.roll(y, (-s, -s), dims=(1, 2))
        y = window_reverse(self.attn(window_partition(y, w), mask if s else None), w, hp, wp)
        if s:
            y = torch.roll(y, (s, s), dims=(1, 2))
        x = x + self.drop_path(y[:, :h, :wd].reshape(b, h * wd, c))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2×2 neighbourhoods -> 4C channels (order: (even,even), (odd,even), (even,odd), (odd,odd) rows/cols)
    -> LayerNorm -> Linear(4C, 2C, no bias). Odd sides are zero-padded first."""

    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x, hw):
        h, w = hw
        b, _, c = x.shape
        # round_up, not `h % 2`: an exported graph's sizes stay (h + 1) // 2 instead of nested remainders
        hp, wp = round_up(h, 2), round_up(w, 2)
        x = F.pad(x.view(b, h, w, c), (0, 0, 0, wp - w, 0, hp - h))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.reshape(b, hp * wp // 4, 4 * c))), (hp // 2, wp // 2)


class SwinStage(nn.Module):
    """`blocks`, then (SeMask) `semantic_layer`, then `downsample` (all but the last stage)."""

    def __init__(self, dim, depth, num_heads, window_size, drop_paths, downsample, mlp_ratio=4.0):
        super().__init__()
        self.window_size = window_size
        self.blocks = nn.ModuleList(SwinBlock(dim, num_heads, window_size, 0 if j % 2 == 0 else window_size // 2,
                                              mlp_ratio, drop_paths[j]) for j in range(depth))
        self.downsample = PatchMerging(dim) if downsample else None

    def run_blocks(self, x, hw):
        w = self.window_size
        hp, wp = round_up(hw[0], w), round_up(hw[1], w)
        # the cache keys on ints; an exported graph builds the mask from its symbolic sizes instead
        make = shift_mask.__wrapped__ if torch.compiler.is_exporting() else shift_mask
        mask = make(hp, wp, w, w // 2, x.device) if len(self.blocks) > 1 else None
        for block in self.blocks:
            x = block(x, hw, mask)
        return x


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, in_chans, embed_dim):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x):
        p = self.patch_size
        h, w = x.shape[-2:]
        x = F.pad(x, (0, round_up(w, p) - w, 0, round_up(h, p) - h))
        x = self.proj(x)
        hw = tuple(x.shape[-2:])
        return self.norm(x.flatten(2).transpose(1, 2)), hw


class SwinTransformer(nn.Module):
    """Returns [c1..c4]: `norm{i}`-normalised NCHW maps at strides 4, 8, 16, 32 with C·2^i channels."""

    def __init__(self, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7, mlp_ratio=4.0,
                 drop_path_rate=0.3, patch_size=4, in_chans=3, pad_multiple=1):
        super().__init__()
        # detectron2 models (Mask2Former) zero-pad the normalised image to a multiple of 32 first;
        # mmseg ones only pad to the patch inside the patch embedding (pad_multiple=1)
        self.pad_multiple = pad_multiple
        self.out_channels = [embed_dim * 2 ** i for i in range(4)]
        self.strides = [patch_size * 2 ** i for i in range(4)]
        self.depths = list(depths)
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_drop = nn.Dropout(0.0)
        rates = drop_path_rates(depths, drop_path_rate)
        self.layers = nn.ModuleList(SwinStage(self.out_channels[i], depths[i], num_heads[i], window_size, rates[i],
                                              downsample=i < 3, mlp_ratio=mlp_ratio) for i in range(4))
        for i, c in enumerate(self.out_channels):
            setattr(self, f"norm{i}", nn.LayerNorm(c))
        self.apply(init_linear_norm)

    def stage_tokens(self, stage, x, hw):
        """(tokens a stage outputs -- before its norm{i} and its patch merging --, anything else it returns).
        SeMask overrides this to add its semantic layer and return the stage's prior map."""
        return self.layers[stage].run_blocks(x, hw), None

    def stages(self, x):
        """The four normalised maps and what each stage returned beside its tokens."""
        m = self.pad_multiple
        if m > 1:
            h, w = x.shape[-2:]
            x = F.pad(x, (0, round_up(w, m) - w, 0, round_up(h, m) - h))
        x, hw = self.patch_embed(x)
        x = self.pos_drop(x)
        features, extras = [], []
        for i, stage in enumerate(self.layers):
            x, extra = self.stage_tokens(i, x, hw)
            features.append(getattr(self, f"norm{i}")(x).transpose(1, 2).reshape(x.shape[0], -1, *hw))
            extras.append(extra)
            if stage.downsample is not None:
                x, hw = stage.downsample(x, hw)
        return features, extras

    def forward(self, x):
        return self.stages(x)[0]
