"""Plain Vision Transformer (Dosovitskiy et al. 2021; DeiT, Touvron et al. 2021) as a segmentation encoder.

Non-overlapping P×P patches -> [class token (, distillation token)] + patch tokens + learned absolute
position embeddings -> pre-norm transformer blocks -> final LayerNorm. The output is the maps of the
patch tokens after the blocks in `out_indices` (default: the last, after the final norm), at stride P;
the extra tokens are dropped (no head here needs them).

Two users, two sets of options:
- Segmenter (timm-style): the class token runs through the blocks, final norm, LayerNorm eps 1e-5,
  bilinear position-embedding resize, logits cropped after the padding (`logits_follow_padding`).
- SegViT (mmseg 0.24's ViT): `cls_token_in_blocks=False` (the class token is added with its position
  embedding and dropped before the first block), no final norm, eps 1e-6, bicubic resize, several
  `out_indices`, stochastic depth on the FFN branch only; and for the Shrunk variant the
  query-based down-sampling layer `shrink_index`: that block's queries are the top-left token of each
  2×2 cell and its keys/values all tokens, so the blocks after it run on a 2× coarser grid.

Position embeddings are stored at the checkpoint grid (crop / P) and resized for each input grid
(`pos_interp`: Segmenter resizes bilinearly, align_corners=False, keeping the extra tokens as they
are). Inputs whose sides are not multiples of P are zero-padded at the bottom/right (after
normalisation, as Segmenter does); `pad_multiple` tells the segmentor to crop the logits back.

DINOv2's ViT (as EoMT runs it, `families/eomt/encoder.py` adding its queries): `num_register_tokens` (timm's
`reg_token`), position embeddings for the patches only (`class_pos_embed=False`, timm's no_embed_class),
`layer_scale_init` (LayerScale `ls1`/`ls2` in every block). With DINOv3's ViT (Siméoni et al. 2025) there are no position embeddings: `rope_theta` gives every block
rotary position embeddings on the patches' queries and keys (`layers.rope`; class, register and query tokens
unrotated), `rope_box_jittering` DINOv3's (shift, jitter, rescale) of the coordinates in training, and
`key_bias=False` DINOv3's attention biases on queries and values only.

Names follow timm / Segmenter (`patch_embed.proj`, `cls_token`, `dist_token`, `pos_embed`, `blocks.i`,
`norm`, `head`, `head_dist`) so their checkpoints load unchanged. `num_classes > 0` keeps the ImageNet
classifier(s) those checkpoints carry; they are frozen (segmentation never calls them) and counted in
the parameters, as the Segmenter README counts them.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import RotaryPositionEmbedding, TransformerBlock, drop_path_rates, tokens_to_map
from ..layers.init import init_linear_norm


def resize_pos_embed(pos_embed, old_grid, new_grid, num_extra, mode="bilinear"):
    """(1, extra + gh*gw, D) position embeddings resized from `old_grid` to `new_grid` (extra tokens kept)."""
    if tuple(old_grid) == tuple(new_grid) and not torch.compiler.is_exporting():
        return pos_embed  # (an exported graph always resizes: its grid is symbolic)
    extra, grid = pos_embed[:, :num_extra], pos_embed[:, num_extra:]
    d = grid.shape[-1]
    grid = grid.reshape(1, old_grid[0], old_grid[1], d).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(new_grid), mode=mode, align_corners=False)
    return torch.cat([extra, grid.permute(0, 2, 3, 1).reshape(1, -1, d)], dim=1)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, in_chans, embed_dim):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """Returns [map]: the last layer's normalised patch tokens as an NCHW map at stride `patch_size`."""

    def __init__(self, img_size=(512, 512), patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                 distilled=False, drop_rate=0.0, drop_path_rate=0.1, norm_eps=1e-5, num_classes=1000,
                 pos_interp="bilinear", in_chans=3, out_indices=None, final_norm=True, cls_token_in_blocks=True,
                 drop_path_attn=True, shrink_index=None, logits_follow_padding=True, num_register_tokens=0,
                 class_pos_embed=True, layer_scale_init=None, rope_theta=None, rope_box_jittering=None, key_bias=True):
        super().__init__()
        self.patch_size = patch_size
        # Segmenter upsamples its logits to the padded size and crops; mmseg resizes to the input size
        self.pad_multiple = patch_size if logits_follow_padding else 1
        self.grid = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.num_extra = (2 if distilled else 1) + num_register_tokens  # tokens before the patches
        self.class_pos_embed = class_pos_embed  # False: position embeddings for the patches only (DINOv2)
        self.pos_interp = pos_interp
        self.cls_token_in_blocks = cls_token_in_blocks
        self.out_indices = [i % depth for i in (out_indices if out_indices is not None else [depth - 1])]
        self.shrink_index = shrink_index
        self.out_channels = [embed_dim] * len(self.out_indices)
        self.strides = [patch_size * (2 if shrink_index is not None and i >= shrink_index else 1)
                        for i in self.out_indices]
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if distilled else None
        self.reg_token = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        if rope_theta is None:
            pos_tokens = (self.num_extra if class_pos_embed else 0) + self.grid[0] * self.grid[1]
            self.pos_embed = nn.Parameter(torch.zeros(1, pos_tokens, embed_dim))
            self.rope = None
        else:  # DINOv3: rotary position embeddings in every block instead
            self.pos_embed = None
            self.rope = RotaryPositionEmbedding(embed_dim // num_heads, rope_theta, *(rope_box_jittering or ()))
        self.pos_drop = nn.Dropout(drop_rate)
        rates = drop_path_rates([depth], drop_path_rate)[0]
        self.blocks = nn.ModuleList(TransformerBlock(embed_dim, num_heads, mlp_ratio, drop_rate, rates[i], norm_eps,
                                                     drop_path_attn=drop_path_attn, layer_scale_init=layer_scale_init,
                                                     key_bias=key_bias)
                                    for i in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps) if final_norm else None
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else None
        self.head_dist = nn.Linear(embed_dim, num_classes) if num_classes > 0 and distilled else None
        self._init_weights()

    def _init_weights(self):
        for p in (self.cls_token, self.dist_token, self.pos_embed):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)
        self.apply(init_linear_norm)
        for head in (self.head, self.head_dist):
            if head is not None:
                head.requires_grad_(False)

    def _embed(self, x):
        """Patch tokens + extra tokens + position embeddings, and the grid of the padded input."""
        p = self.patch_size
        pad_h, pad_w = -x.shape[-2] % p, -x.shape[-1] % p
        if pad_h or pad_w or torch.compiler.is_exporting():  # exported graphs keep the pad: sizes are symbolic
            x = F.pad(x, (0, pad_w, 0, pad_h))
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        x = self.patch_embed(x)
        extra = [self.cls_token] + [t for t in (self.dist_token, self.reg_token) if t is not None]
        if self.pos_embed is not None and not self.class_pos_embed:  # timm's no_embed_class: patches, then extras
            x = x + resize_pos_embed(self.pos_embed, self.grid, grid, 0, self.pos_interp)
        x = torch.cat([t.expand(x.shape[0], -1, -1) for t in extra] + [x], dim=1)
        if self.pos_embed is not None and self.class_pos_embed:
            x = x + resize_pos_embed(self.pos_embed, self.grid, grid, self.num_extra, self.pos_interp)
        return self.pos_drop(x), grid

    def tokens(self, x):
        """All tokens after the final norm, [N, extra + gh*gw, D], and the grid (gh, gw) of the padded input
        (Segmenter's layout: extra tokens through the blocks)."""
        x, grid = self._embed(x)
        rope = self._rope(grid, x.device)
        for block in self.blocks:
            x = block(x, rope=rope)
        return (self.norm(x) if self.norm is not None else x), grid

    def forward(self, x):
        x, grid = self._embed(x)
        rope = self._rope(grid, x.device)
        extra = self.num_extra if self.cls_token_in_blocks else 0
        if not self.cls_token_in_blocks:
            x = x[:, self.num_extra:]
        outs = []
        for i, block in enumerate(self.blocks):
            if i == self.shrink_index:
                patches = tokens_to_map(x[:, extra:], grid)[:, :, ::2, ::2]  # top-left token of each 2x2 cell
                grid = tuple(patches.shape[-2:])
                x = block(torch.cat([x[:, :extra], patches.flatten(2).transpose(1, 2)], dim=1), context=x)
            else:
                x = block(x, rope=rope)
            if i in self.out_indices:
                y = self.norm(x) if self.norm is not None and i == len(self.blocks) - 1 else x
                outs.append(tokens_to_map(y[:, extra:], grid))
        return outs

    def _rope(self, grid, device):
        """(cos, sin) of the rotary position embeddings for the patch grid, or None (absolute positions)."""
        return None if self.rope is None else self.rope(grid, device)

    def classify(self, x):
        """ImageNet logits from the class token (DeiT: mean of the class and distillation heads)."""
        if self.head is None:
            raise ValueError("built without a classifier (num_classes=0)")
        tokens, _ = self.tokens(x)
        if self.head_dist is None:
            return self.head(tokens[:, 0])
        return (self.head(tokens[:, 0]) + self.head_dist(tokens[:, 1])) / 2


def padded_size(size, multiple):
    return tuple(math.ceil(s / multiple) * multiple for s in size)
