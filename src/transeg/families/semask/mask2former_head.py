"""SeMask-Mask2Former's head: Mask2Former's pixel and masked-attention decoders (`heads.mask2former_head`)
beside SeMask's semantic decoder on the class priors, trained with Mask2Former's set criterion."""
import torch.nn.functional as F
from torch import nn

from ...contracts import LossInputs, MaskPrediction, SemanticFeatures
from ...heads.mask2former_head import MaskedAttentionDecoder, MSDeformAttnPixelDecoder
from ...heads.mask2former_loss import mask2former_loss, semantic_targets
from .fpn_head import semantic_decoder


class SeMaskMask2FormerHead(nn.Module):
    """The authors' `BranchMaskFormerHead` (pixel decoder + masked-attention decoder + semantic
    decoder) with their criterion as `loss`.

    forward(SemanticFeatures): in eval, the final `MaskPrediction` at stride 4 (`contracts.mask_scores` forms
    the scores); in training `LossInputs` with the decoder outputs and "sem" (the summed prior maps at the
    input size) for `loss`.
    Loss (weights as the authors' config): 2 · CE + 5 · mask BCE + 5 · dice on 12,544 sampled points
    for the final and each of the 9 auxiliary predictions, plus 0.4 · CE of the semantic decoder
    (mean over non-ignored pixels) on the final one.
    """

    stride = 4
    mask_classification = True

    def __init__(self, in_channels, num_classes, conv_dim=256, mask_dim=256, enc_layers=6, enc_ffn_dim=1024,
                 num_heads=8, num_queries=100, dec_layers=9, dec_ffn_dim=2048, num_points=12544,
                 oversample_ratio=3.0, importance_sample_ratio=0.75, class_weight=2.0, mask_weight=5.0,
                 dice_weight=5.0, no_object_weight=0.1, cate_weight=0.4):
        super().__init__()
        self.num_classes = num_classes
        self.pixel_decoder = MSDeformAttnPixelDecoder(in_channels, conv_dim, mask_dim, enc_layers, enc_ffn_dim,
                                                      num_heads)
        self.predictor = MaskedAttentionDecoder(num_classes, conv_dim, num_queries, num_heads, dec_ffn_dim,
                                                dec_layers, mask_dim)
        self.loss_cfg = dict(num_points=num_points, oversample_ratio=oversample_ratio,
                             importance_sample_ratio=importance_sample_ratio, class_weight=class_weight,
                             mask_weight=mask_weight, dice_weight=dice_weight, no_object_weight=no_object_weight)
        self.cate_weight = cate_weight

    def decode(self, features):
        mask_features, levels = self.pixel_decoder(features)
        return self.predictor(levels, mask_features)

    def forward(self, inputs: SemanticFeatures):
        features, priors = inputs
        out = self.decode(features)
        if not self.training:
            return MaskPrediction(out["pred_masks"], out["pred_logits"])
        h, w = features[0].shape[-2:]
        out["sem"] = semantic_decoder(priors, align_corners=True, size=(h * self.stride, w * self.stride))
        return LossInputs(out)

    def loss(self, outputs, label, ignore_index=255, reduction="valid", ohem=None):
        """Set loss against the label map's per-class masks (zero-padded to the padded input size) plus
        0.4 · CE of the semantic decoder. `reduction` and `ohem` do not apply to this criterion: the
        authors' CE terms average over valid pixels / all queries."""
        if ohem:
            raise ValueError("OHEM does not apply to the Mask2Former head's set loss")
        h, w = outputs["pred_masks"].shape[-2:]
        padded = (h * self.stride, w * self.stride)
        targets = semantic_targets(label, ignore_index, size=padded)
        losses = mask2former_loss(outputs, targets, self.num_classes, **self.loss_cfg)
        sem = outputs["sem"][..., :label.shape[-2], :label.shape[-1]]  # padding = ignored label pixels
        cate = F.cross_entropy(sem.float(), label, ignore_index=ignore_index)
        losses["loss_cate"] = cate
        losses["loss"] = losses["loss"] + self.cate_weight * cate
        return losses
