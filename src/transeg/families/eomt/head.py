"""EoMT's mask module (Kerssies et al., "Your ViT is Secretly an Image Segmentation Model", CVPR 2025).

EoMT has no decoder: learned queries join the ViT's last blocks (`encoder.py`, `num_queries`,
`query_blocks`) and this small module reads them out, after the encoder's final norm:
- class head: a Linear on each query -> K + 1 logits (the last one is "no object");
- mask MLP: three Linears with GELU between, on each query -> a mask embedding;
- upscale: the patch map enlarged 2x per `ScaleBlock` (transposed conv 2x2 stride 2 -> GELU -> 3x3
  depth-wise conv -> LayerNorm2d), log2(patch) - 2 of them (2 for patch 16: stride 4);
- mask logits = mask embedding . upscaled map, per query and pixel.

The same module predicts before each of the last blocks while masked attention is on (the encoder calls
`predict_masks`, the `contracts.MaskPredictor` the builder hands it); those predictions are the deep
supervision of the loss.

Semantic output, as the authors' semantic inference forms it: scores[k] = sum_q softmax(class)_q[k] *
sigmoid(mask_q), "no object" dropped (`contracts.mask_scores`). These are probabilities, not logits
(`mask_classification`); at full resolution the mask logits are upsampled (bilinear) before the sigmoid.

Names follow the authors' code (`class_head`, `mask_head.0/2/4`, `upscale.i.conv1/conv2/norm`), so their
checkpoints map with a prefix change only.
"""
import math

import torch.nn.functional as F
from torch import nn

from ...contracts import LossInputs, MaskPrediction, QueryFeatures
from ...heads.mask2former_loss import mask2former_loss, semantic_targets


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (timm's LayerNorm2d, eps 1e-6)."""

    def __init__(self, channels, eps=1e-6):
        super().__init__(channels, eps=eps)

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class ScaleBlock(nn.Module):
    """2x upscaling: transposed conv (2x2, stride 2) -> GELU -> 3x3 depth-wise conv (no bias) -> LayerNorm2d."""

    def __init__(self, dim):
        super().__init__()
        self.conv1 = nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, bias=False)
        self.norm = LayerNorm2d(dim)

    def forward(self, x):
        return self.norm(self.conv2(self.act(self.conv1(x))))


def num_upscale_blocks(patch_size):
    """The authors' rule: max(1, floor(log2 patch) - 2) blocks (patch 16 -> 2, stride 4; patch 14 -> 1)."""
    return max(1, int(math.log2(patch_size)) - 2)


class EoMTHead(nn.Module):
    """forward(QueryFeatures) from the EoMT encoder: in eval the final `MaskPrediction` at stride `stride`;
    in training `LossInputs` for `loss` with the final prediction ("pred_logits" [N, Q, K+1], "pred_masks"
    [N, Q, h, w]) and the intermediate ones ("aux_outputs").

    Loss (the authors' weights): 2 * CE (no object 0.1) + 5 * mask BCE + 5 * dice on 12,544 points
    sampled as Mask2Former does, for the final and every intermediate prediction, each matched on its own.
    """

    mask_classification = True

    def __init__(self, embed_dim, num_classes, patch_size=16, num_points=12544, oversample_ratio=3.0,
                 importance_sample_ratio=0.75, class_weight=2.0, mask_weight=5.0, dice_weight=5.0,
                 no_object_weight=0.1):
        super().__init__()
        self.num_classes = num_classes
        blocks = num_upscale_blocks(patch_size)
        self.stride = patch_size // 2 ** blocks
        self.class_head = nn.Linear(embed_dim, num_classes + 1)
        self.mask_head = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.GELU(), nn.Linear(embed_dim, embed_dim),
                                       nn.GELU(), nn.Linear(embed_dim, embed_dim))
        self.upscale = nn.Sequential(*[ScaleBlock(embed_dim) for _ in range(blocks)])
        self.loss_cfg = dict(num_points=num_points, oversample_ratio=oversample_ratio,
                             importance_sample_ratio=importance_sample_ratio, class_weight=class_weight,
                             mask_weight=mask_weight, dice_weight=dice_weight, no_object_weight=no_object_weight)

    def predict_masks(self, queries, patch_map) -> MaskPrediction:
        """queries [N, Q, D], patch map [N, D, h, w] (both after the encoder's norm) -> mask logits
        [N, Q, h * 2^b, w * 2^b] and class logits [N, Q, K + 1]."""
        masks = _einsum_masks(self.mask_head(queries), self.upscale(patch_map))
        return MaskPrediction(masks, self.class_head(queries))

    def decode(self, features: QueryFeatures) -> LossInputs:
        """The final and intermediate predictions in Mask2Former's layout, which its set loss reads."""
        final = self.predict_masks(features.queries, features.patch_map)
        return LossInputs(pred_logits=final.class_logits, pred_masks=final.mask_logits,
                          aux_outputs=[{"pred_logits": p.class_logits, "pred_masks": p.mask_logits}
                                       for p in features.predictions])

    def forward(self, features: QueryFeatures):
        if not self.training:
            return self.predict_masks(features.queries, features.patch_map)
        return self.decode(features)

    def loss(self, outputs, label, ignore_index=255, reduction="valid", ohem=None):
        """Mask2Former's set loss against the label map's per-class masks (zero-padded to the padded
        input size), over the final and intermediate predictions. `reduction` does not apply: the
        authors' terms average over points / all queries."""
        if ohem:
            raise ValueError("OHEM does not apply to EoMT's set loss")
        h, w = outputs["pred_masks"].shape[-2:]
        targets = semantic_targets(label, ignore_index, size=(h * self.stride, w * self.stride))
        return mask2former_loss(outputs, targets, self.num_classes, **self.loss_cfg)


def _einsum_masks(embeddings, maps):
    """[N, Q, D] . [N, D, h, w] -> [N, Q, h, w]."""
    n, d, h, w = maps.shape
    return (embeddings @ maps.reshape(n, d, h * w)).reshape(n, -1, h, w)
