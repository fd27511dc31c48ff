"""Decode heads. Each takes the backbone's feature list and returns logits at its own stride."""
from .edaformer_head import EDAFormerHead
from .segformer_head import SegFormerHead
from .segmenter_head import LinearDecoder, MaskTransformer
from .segvit_head import ATMHead, TPNATMHead
from .semask_fpn_head import SeMaskFPNHead

__all__ = ["ATMHead", "EDAFormerHead", "LinearDecoder", "MaskTransformer", "SeMaskFPNHead", "SegFormerHead", "TPNATMHead"]
