"""SegViT's Attention-to-Mask decoders (Zhang et al., NeurIPS 2022).

ATM layer: a post-norm transformer decoder layer (self-attention among the class queries, cross-
attention to the encoder tokens, ReLU FFN; dropout 0.1, LayerNorm eps 1e-5) whose cross-attention
also returns its similarity map: the scaled, pre-softmax query-key logits averaged over heads. Those
maps are the mask logits; a sigmoid makes them masks.

- `ATMHead` (plain SegViT): one decoder of `num_layers` ATM layers per backbone level, deepest level
  first, the class queries flowing through them in turn. Each decoder's last layer gives a mask;
  the masks accumulate over the levels.
- `TPNATMHead` (Shrunk SegViT): query-based up-sampling (QU) — one learnable query per stride-16
  location attends (stock transformer decoders) to the stride-16 then the stride-32 features — then
  one ATM decoder (`atm`) on those tokens, every layer giving its own (not accumulated) mask.

Class logits come from `class_embed` (C + 1 outputs, the last "no object"); per-pixel scores are
sum_q softmax(class)[q, c] * sigmoid(mask)[q], at the fixed `img_size` (the training crop). In
training the heads return the outputs of every supervised layer for `atm_loss`. Module names follow
the authors' code so their checkpoints load unchanged.
"""
import torch
import torch.nn.functional as F
from torch import nn

from ...contracts import LossInputs
from ...layers.init import init_linear_norm
from .loss import atm_loss


class ATMAttention(nn.Module):
    """Cross-attention (separate q, k, v, proj) that also returns the head-mean of its scaled logits."""

    def __init__(self, dim, num_heads, attn_drop=0.1):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)

    def forward(self, query, memory):
        n, nq, c = query.shape
        h = self.num_heads
        q = self.q(query).reshape(n, nq, h, c // h).transpose(1, 2)
        k = self.k(memory).reshape(n, -1, h, c // h).transpose(1, 2)
        v = self.v(memory).reshape(n, -1, h, c // h).transpose(1, 2)
        logits = (q @ k.transpose(-2, -1)) * self.scale          # [N, heads, Q, tokens]
        out = self.attn_drop(logits.softmax(-1)) @ v
        return self.proj(out.transpose(1, 2).reshape(n, nq, c)), logits.mean(1)


class ATMLayer(nn.Module):
    """Post-norm decoder layer with the ATM cross-attention; names as torch's TransformerDecoderLayer."""

    def __init__(self, dim, num_heads, dropout=0.1):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.multihead_attn = ATMAttention(dim, num_heads, attn_drop=dropout)
        self.linear1 = nn.Linear(dim, 4 * dim)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(4 * dim, dim)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(dim) for _ in range(3))
        self.dropout1, self.dropout2, self.dropout3 = (nn.Dropout(dropout) for _ in range(3))

    def forward(self, q, memory):
        q = self.norm1(q + self.dropout1(self.self_attn(q, q, q, need_weights=False)[0]))
        out, sim = self.multihead_attn(q, memory)
        q = self.norm2(q + self.dropout2(out))
        q = self.norm3(q + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(q))))))
        return q, sim


class ATMDecoder(nn.Module):
    def __init__(self, dim, num_heads, num_layers):
        super().__init__()
        self.layers = nn.ModuleList(ATMLayer(dim, num_heads) for _ in range(num_layers))

    def forward(self, q, memory):
        """Every layer's (queries, similarity [N, Q, tokens])."""
        out = []
        for layer in self.layers:
            q, sim = layer(q, memory)
            out.append((q, sim))
        return out


class ATMHead(nn.Module):
    """`single=True` is the authors' ATMSingleHead (inside the Shrunk head): one level, no input
    projection, a mask from every layer, not accumulated."""

    mask_classification = False  # per-pixel logits (contracts.DecodeHead)

    def __init__(self, in_channels, num_classes, img_size, embed_dim, num_heads, num_layers=3, use_stages=3,
                 use_proj=True, single=False, stride=16):
        super().__init__()
        self.num_classes = num_classes
        self.img_size = img_size
        self.stride = stride
        self.single = single
        self.use_stages = use_stages
        for i in range(1, use_stages + 1):
            setattr(self, f"input_proj_{i}", nn.Linear(in_channels, embed_dim) if use_proj else nn.Identity())
            setattr(self, f"proj_norm_{i}", nn.LayerNorm(embed_dim) if use_proj else nn.Identity())
            setattr(self, f"decoder_{i}", ATMDecoder(embed_dim, num_heads, num_layers))
        self.q = nn.Embedding(num_classes, embed_dim)
        self.class_embed = nn.Linear(embed_dim, num_classes + 1)
        self.apply(init_linear_norm)
        nn.init.normal_(self.q.weight)

    def forward(self, features):
        maps = list(features[:self.use_stages])[::-1]  # deepest level first
        n = maps[0].shape[0]
        q = self.q.weight.unsqueeze(0).expand(n, -1, -1)
        queries, sims = [], []
        for i, x in enumerate(maps, 1):
            h, w = x.shape[-2:]
            memory = getattr(self, f"proj_norm_{i}")(getattr(self, f"input_proj_{i}")(x.flatten(2).transpose(1, 2)))
            layers = getattr(self, f"decoder_{i}")(q, memory)
            q = layers[-1][0]
            for lq, sim in (layers if self.single else layers[-1:]):
                queries.append(lq)
                sims.append(sim.reshape(n, -1, h, w))
        size = sims[-1].shape[-2:]
        masks = [F.interpolate(s, size=size, mode="bilinear", align_corners=False) for s in sims]
        if not self.single:  # plain SegViT: the levels' masks add up
            masks = list(torch.cumsum(torch.stack(masks), dim=0))
        logits = [self.class_embed(lq) for lq in queries]
        pred_masks = F.interpolate(masks[-1], size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        pred = semantic_scores(logits[-1], pred_masks)
        if not self.training:
            return pred
        return LossInputs(pred=pred, pred_logits=logits[-1], pred_masks=pred_masks,
                          aux_outputs=[{"pred_logits": c, "pred_masks": m} for c, m in zip(logits[:-1], masks[:-1])])

    def loss(self, outputs, label, ignore_index=255, reduction=None, ohem=None):
        """The ATM loss (its own normalisations; `reduction` and `ohem` do not apply)."""
        if ohem:
            raise ValueError("SegViT's loss has no OHEM option")
        return atm_loss(outputs, label, self.num_classes, ignore_index)


class TPNATMHead(nn.Module):
    """Shrunk SegViT's head: QU queries at stride 16, then an ATM decoder on them."""

    mask_classification = False  # per-pixel logits (contracts.DecodeHead)

    def __init__(self, in_channels, num_classes, img_size, embed_dim, num_heads, num_layers=3, patch_size=16):
        super().__init__()
        self.num_classes = num_classes
        self.img_size = img_size
        self.stride = patch_size
        self.grid = img_size // patch_size
        for i in (1, 2):
            setattr(self, f"input_proj_{i}", nn.Linear(in_channels, embed_dim))
            setattr(self, f"proj_norm_{i}", nn.LayerNorm(embed_dim))
            layer = nn.TransformerDecoderLayer(embed_dim, num_heads, 4 * embed_dim, dropout=0.1, batch_first=True)
            setattr(self, f"decoder_{i}", nn.TransformerDecoder(layer, num_layers))
        self.q = nn.Embedding(self.grid * self.grid, embed_dim)
        self.atm = ATMHead(embed_dim, num_classes, img_size, embed_dim, num_heads, num_layers, use_stages=1,
                           use_proj=False, single=True, stride=patch_size)
        self.apply(init_linear_norm)
        nn.init.normal_(self.q.weight)
        nn.init.normal_(self.atm.q.weight)

    def forward(self, features):
        f16, f32 = features[0], features[-1]
        n = f16.shape[0]
        q = self.q.weight.unsqueeze(0).expand(n, -1, -1)
        for i, x in ((1, f16), (2, f32)):
            memory = getattr(self, f"proj_norm_{i}")(getattr(self, f"input_proj_{i}")(x.flatten(2).transpose(1, 2)))
            q = getattr(self, f"decoder_{i}")(q, memory)
        return self.atm([q.transpose(1, 2).reshape(n, -1, self.grid, self.grid)])

    def loss(self, outputs, label, ignore_index=255, reduction=None, ohem=None):
        """The ATM loss (its own normalisations; `reduction` and `ohem` do not apply)."""
        if ohem:
            raise ValueError("SegViT's loss has no OHEM option")
        return atm_loss(outputs, label, self.num_classes, ignore_index)


def semantic_scores(class_logits, mask_logits):
    """[N, C, H, W] = sum over queries of softmax(class)[..., :C] * sigmoid(mask)."""
    return torch.einsum("bqc,bqhw->bchw", class_logits.softmax(-1)[..., :-1], mask_logits.sigmoid())
