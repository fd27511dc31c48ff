"""Decode heads. Each takes the backbone's feature list and returns logits at its own stride (the
Mask2Former head: class probabilities)."""
from .edaformer_head import EDAFormerHead
from .eomt_head import EoMTHead
from .mask2former_head import SeMaskMask2FormerHead
from .segformer_head import SegFormerHead
from .segmenter_head import LinearDecoder, MaskTransformer
from .segvit_head import ATMHead, TPNATMHead
from .semask_fpn_head import SeMaskFPNHead

__all__ = ["ATMHead", "EDAFormerHead", "EoMTHead", "LinearDecoder", "MaskTransformer", "SeMaskFPNHead", "SeMaskMask2FormerHead", "SegFormerHead", "TPNATMHead"]
