"""Mask2Former (Cheng et al., "Masked-attention Mask Transformer for Universal Image Segmentation",
CVPR 2022): the multi-scale deformable-attention pixel decoder, the masked-attention transformer
decoder, and the semantic scores of mask classification (`semantic_scores`). SeMask-Mask2Former's head
(`families/semask/mask2former_head.py`) is built from these; EoMT scores its masks with `semantic_scores`.

Pixel decoder (`MSDeformAttnPixelDecoder`): the stride-8/16/32 maps are projected to 256 channels
(1x1 conv + GroupNorm), refined jointly by 6 deformable-attention encoder layers (sine position +
per-level embedding, 3 levels × 4 points × 8 heads, post-norm, FFN 1024), then the stride-4 map is
added FPN-style (lateral 1x1, upsampled stride-8 output, 3x3 conv). Outputs the stride-32/16/8 maps
for the decoder and `mask_features` (1x1 conv of the stride-4 map).

Transformer decoder (`MaskedAttentionDecoder`): 100 learned queries (content `query_feat` + position
`query_embed`) go through 9 layers of cross-attention → self-attention → FFN (post-norm), visiting the
stride-32, 16, 8 maps in turn. Before every layer (and after the last) a prediction head reads the
queries: class logits over K + 1 ("no object") and a mask = mask_embed(query) · mask_features. The
cross-attention of the next layer only sees pixels where that mask's sigmoid is ≥ 0.5 at the
level's resolution (all pixels when a query's mask is empty): the masked attention.

Semantic output: softmax over classes without "no object" times the sigmoid masks, summed over
queries: scores[k] = Σ_q p_q(k) · σ(m_q). These are probabilities, not logits; at full resolution
the mask logits are upsampled first (`contracts.mask_scores(prediction, size)`), as the authors'
inference does.

Module and parameter names follow the authors' (`pixel_decoder.input_proj.0.0`,
`pixel_decoder.transformer.encoder.layers.i.self_attn.sampling_offsets`, `pixel_decoder.adapter_1`,
`predictor.transformer_cross_attention_layers.i.multihead_attn.in_proj_weight`, ...), so their
checkpoints map with a prefix change only.
"""
import torch
import torch.nn.functional as F
from torch import nn

from ..layers.deform_attn import MSDeformAttn
from ..layers.mha import MultiheadAttention
from ..layers.position import sine_position_embedding


def c2_xavier_fill(conv):
    """detectron2's init for its convs: Kaiming-uniform with a = 1, zero bias."""
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class ConvGN(nn.Conv2d):
    """detectron2's Conv2d(norm=GN[, activation=ReLU]) without bias; names `weight`, `norm.*`."""

    def __init__(self, cin, cout, kernel_size, relu=False):
        super().__init__(cin, cout, kernel_size, padding=kernel_size // 2, bias=False)
        self.norm = nn.GroupNorm(32, cout)
        self.relu = relu
        c2_xavier_fill(self)

    def forward(self, x):
        x = self.norm(super().forward(x))
        return F.relu(x) if self.relu else x


class DeformableEncoderLayer(nn.Module):
    def __init__(self, dim=256, ffn_dim=1024, num_levels=3, num_heads=8, num_points=4):
        super().__init__()
        self.self_attn = MSDeformAttn(dim, num_levels, num_heads, num_points)
        self.norm1 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x, pos, reference_points, shapes):
        x = self.norm1(x + self.self_attn(x + pos, reference_points, x, shapes))
        return self.norm2(x + self.linear2(F.relu(self.linear1(x))))


class DeformableEncoder(nn.Module):
    """The authors' `MSDeformAttnTransformerEncoderOnly` (names: `level_embed`, `encoder.layers.i`)."""

    def __init__(self, dim, num_layers, ffn_dim, num_levels, num_heads):
        super().__init__()
        self.level_embed = nn.Parameter(torch.empty(num_levels, dim))
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(DeformableEncoderLayer(dim, ffn_dim, num_levels, num_heads)
                                            for _ in range(num_layers))
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)

    @staticmethod
    def reference_points(shapes, device):
        """Every pixel centre ((j + 0.5) / w, (i + 0.5) / h) of every level, [1, S, levels, 2] (no padding
        masks here, so the reference points are the same on every level)."""
        refs = []
        for h, w in shapes:
            y = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h
            x = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w
            refs.append(torch.stack(torch.meshgrid(x, y, indexing="xy"), -1).reshape(-1, 2))
        return torch.cat(refs)[None, :, None].expand(-1, -1, len(shapes), -1)

    def forward(self, maps):
        shapes = [tuple(m.shape[-2:]) for m in maps]
        x = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1)
        pos = torch.cat([sine_position_embedding(h, w, x.shape[-1] // 2, x.device).flatten(2).transpose(1, 2)
                         + self.level_embed[i] for i, (h, w) in enumerate(shapes)], 1).to(x.dtype)
        ref = self.reference_points(shapes, x.device)
        for layer in self.encoder.layers:
            x = layer(x, pos, ref, shapes)
        return [t.transpose(1, 2).reshape(x.shape[0], -1, h, w)
                for t, (h, w) in zip(x.split([h * w for h, w in shapes], 1), shapes)]


class MSDeformAttnPixelDecoder(nn.Module):
    """in_channels: the four backbone widths (strides 4, 8, 16, 32). Returns (mask_features at stride 4,
    [stride-32, stride-16, stride-8 maps])."""

    def __init__(self, in_channels, conv_dim=256, mask_dim=256, num_layers=6, ffn_dim=1024, num_heads=8):
        super().__init__()
        # coarsest first, as the encoder's levels
        self.input_proj = nn.ModuleList(nn.Sequential(nn.Conv2d(c, conv_dim, 1), nn.GroupNorm(32, conv_dim))
                                        for c in in_channels[1:][::-1])
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight)
            nn.init.zeros_(proj[0].bias)
        self.transformer = DeformableEncoder(conv_dim, num_layers, ffn_dim, len(in_channels) - 1, num_heads)
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, 1)
        c2_xavier_fill(self.mask_features)
        self.adapter_1 = ConvGN(in_channels[0], conv_dim, 1)
        self.layer_1 = ConvGN(conv_dim, conv_dim, 3, relu=True)

    def forward(self, features):
        # In the weights' precision: fp32 under autocast too, as the authors' (deformable sampling is
        # not reliable in half precision); bf16 only when the weights were cast for inference.
        dtype, device = self.mask_features.weight.dtype, features[0].device.type
        features = [f.to(dtype) for f in features]
        if device == "meta" or not torch.is_autocast_enabled(device):  # (autocast has no meta device)
            return self._forward(features)
        with torch.autocast(device, enabled=False):
            return self._forward(features)

    def _forward(self, features):
        levels = self.transformer([proj(f) for proj, f in zip(self.input_proj, features[1:][::-1])])
        lateral = self.adapter_1(features[0])
        fine = self.layer_1(lateral + F.interpolate(levels[-1], size=lateral.shape[-2:], mode="bilinear",
                                                    align_corners=False))
        return self.mask_features(fine), levels


class CrossAttentionLayer(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.multihead_attn = MultiheadAttention(dim, num_heads)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x, memory, pos, query_pos, allowed):
        return self.norm(x + self.multihead_attn(x + query_pos, memory + pos, memory, allowed))


class SelfAttentionLayer(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.self_attn = MultiheadAttention(dim, num_heads)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x, query_pos):
        q = x + query_pos
        return self.norm(x + self.self_attn(q, q, x))


class FFNLayer(nn.Module):
    def __init__(self, dim, ffn_dim):
        super().__init__()
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm = nn.LayerNorm(dim)
        for lin in (self.linear1, self.linear2):
            nn.init.xavier_uniform_(lin.weight)

    def forward(self, x):
        return self.norm(x + self.linear2(F.relu(self.linear1(x))))


class MaskEmbed(nn.Module):
    """Three Linear layers with ReLU between (the authors' `MLP`, names `layers.0..2`)."""

    def __init__(self, dim, out_dim):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, out_dim)])

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class MaskedAttentionDecoder(nn.Module):
    """The authors' `MultiScaleMaskedTransformerDecoder` (pre_norm False, input channels = hidden dim,
    so no input projections). forward -> {"pred_logits" [N, Q, K+1], "pred_masks" [N, Q, h, w] at the
    mask features' resolution, "aux_outputs": the same from the 9 earlier prediction heads}."""

    num_levels = 3

    def __init__(self, num_classes, dim=256, num_queries=100, num_heads=8, ffn_dim=2048, num_layers=9, mask_dim=256):
        super().__init__()
        self.num_heads = num_heads
        self.transformer_self_attention_layers = nn.ModuleList(SelfAttentionLayer(dim, num_heads)
                                                               for _ in range(num_layers))
        self.transformer_cross_attention_layers = nn.ModuleList(CrossAttentionLayer(dim, num_heads)
                                                                for _ in range(num_layers))
        self.transformer_ffn_layers = nn.ModuleList(FFNLayer(dim, ffn_dim) for _ in range(num_layers))
        for m in self.modules():
            if isinstance(m, MultiheadAttention):
                nn.init.xavier_uniform_(m.out_proj.weight)
        self.decoder_norm = nn.LayerNorm(dim)
        self.query_feat = nn.Embedding(num_queries, dim)
        self.query_embed = nn.Embedding(num_queries, dim)
        self.level_embed = nn.Embedding(self.num_levels, dim)
        self.class_embed = nn.Linear(dim, num_classes + 1)
        self.mask_embed = MaskEmbed(dim, mask_dim)

    def predict_masks(self, x, mask_features, attn_size):
        """Class logits, mask logits, and where the next cross-attention may look (bool [N, 1, Q, h·w])."""
        x = self.decoder_norm(x)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(x), mask_features)
        small = F.interpolate(masks, size=attn_size, mode="bilinear", align_corners=False)
        allowed = small.sigmoid().flatten(2) >= 0.5
        allowed = allowed | ~allowed.any(-1, keepdim=True)  # an empty mask attends everywhere
        return self.class_embed(x), masks, allowed[:, None].detach()

    def forward(self, levels, mask_features):
        n = mask_features.shape[0]
        sizes = [tuple(m.shape[-2:]) for m in levels]
        memory = [m.flatten(2).transpose(1, 2) + self.level_embed.weight[i] for i, m in enumerate(levels)]
        pos = [sine_position_embedding(h, w, m.shape[1] // 2, m.device).flatten(2).transpose(1, 2).to(m.dtype)
               for m, (h, w) in zip(levels, sizes)]
        query_pos = self.query_embed.weight[None].expand(n, -1, -1)
        x = self.query_feat.weight[None].expand(n, -1, -1)
        logits, masks, allowed = self.predict_masks(x, mask_features, sizes[0])
        outputs = [(logits, masks)]
        for i, (cross, self_attn, ffn) in enumerate(zip(self.transformer_cross_attention_layers,
                                                        self.transformer_self_attention_layers,
                                                        self.transformer_ffn_layers)):
            lvl = i % self.num_levels
            x = cross(x, memory[lvl], pos[lvl], query_pos, allowed)
            x = ffn(self_attn(x, query_pos))
            logits, masks, allowed = self.predict_masks(x, mask_features, sizes[(i + 1) % self.num_levels])
            outputs.append((logits, masks))
        return {"pred_logits": outputs[-1][0], "pred_masks": outputs[-1][1],
                "aux_outputs": [{"pred_logits": c, "pred_masks": m} for c, m in outputs[:-1]]}


def semantic_scores(pred_logits, pred_masks):
    """Σ_q softmax(class)[k] · sigmoid(mask_q): [N, Q, K+1], [N, Q, h, w] -> [N, K, h, w]."""
    return torch.einsum("bqc,bqhw->bchw", pred_logits.float().softmax(-1)[..., :-1], pred_masks.float().sigmoid())
