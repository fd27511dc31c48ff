"""Segmenter's decoders (Strudel et al., ICCV 2021, Sec. 3.2) on the last ViT layer's patch tokens.

- `LinearDecoder`: one Linear from each patch token to K class scores.
- `MaskTransformer`: K learnable class embeddings are appended after the projected patch tokens and
  processed jointly by M transformer blocks; the masks are the cosine similarities of the patch and
  class embeddings (each right-multiplied by its own D×D matrix and L2-normalised), followed by a
  LayerNorm over the class axis.

Both return logits at the patch stride. Names follow the authors' `decoder.py` (`head`; `cls_emb`,
`proj_dec`, `blocks`, `proj_patch`, `proj_classes`, `decoder_norm`, `mask_norm`).
"""
import torch
from torch import nn

from ...layers import TransformerBlock, drop_path_rates
from ...layers.init import init_linear_norm


class LinearDecoder(nn.Module):
    mask_classification = False  # per-pixel logits (contracts.DecodeHead)

    def __init__(self, in_dim, num_classes, stride):
        super().__init__()
        self.num_classes = num_classes
        self.stride = stride
        self.head = nn.Linear(in_dim, num_classes)
        self.apply(init_linear_norm)

    def forward(self, features):
        x = features[-1]
        return self.head(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class MaskTransformer(nn.Module):
    mask_classification = False  # per-pixel logits (contracts.DecodeHead)

    def __init__(self, in_dim, num_classes, stride, depth=2, embed_dim=None, num_heads=None, mlp_ratio=4.0,
                 drop=0.1, drop_path_rate=0.0, norm_eps=1e-5):
        super().__init__()
        d = embed_dim or in_dim
        self.num_classes = num_classes
        self.stride = stride
        rates = drop_path_rates([depth], drop_path_rate)[0]
        self.blocks = nn.ModuleList(TransformerBlock(d, num_heads or max(1, d // 64), mlp_ratio, drop, rates[i], norm_eps)
                                    for i in range(depth))
        self.cls_emb = nn.Parameter(torch.zeros(1, num_classes, d))
        self.proj_dec = nn.Linear(in_dim, d)
        # right-multiplied matrices (x @ W), as the authors store them -- not nn.Linear weights
        self.proj_patch = nn.Parameter(d ** -0.5 * torch.randn(d, d))
        self.proj_classes = nn.Parameter(d ** -0.5 * torch.randn(d, d))
        self.decoder_norm = nn.LayerNorm(d, eps=norm_eps)
        self.mask_norm = nn.LayerNorm(num_classes, eps=norm_eps)
        self.apply(init_linear_norm)
        nn.init.trunc_normal_(self.cls_emb, std=0.02)

    def forward(self, features):
        x = features[-1]
        n, _, h, w = x.shape
        x = self.proj_dec(x.flatten(2).transpose(1, 2))
        x = torch.cat([x, self.cls_emb.expand(n, -1, -1)], dim=1)  # class tokens after the patches
        for block in self.blocks:
            x = block(x)
        x = self.decoder_norm(x)
        patches = x[:, :-self.num_classes] @ self.proj_patch
        classes = x[:, -self.num_classes:] @ self.proj_classes
        # plain x / |x| as the authors (no eps): a zero vector cannot occur after LayerNorm + projection
        patches = patches / patches.norm(dim=-1, keepdim=True)
        classes = classes / classes.norm(dim=-1, keepdim=True)
        masks = self.mask_norm(patches @ classes.transpose(1, 2))
        return masks.transpose(1, 2).reshape(n, self.num_classes, h, w)
