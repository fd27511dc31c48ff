"""Decode heads. Each takes the backbone's feature list and returns logits at its own stride."""
from .edaformer_head import EDAFormerHead
from .segformer_head import SegFormerHead
from .segmenter_head import LinearDecoder, MaskTransformer

__all__ = ["EDAFormerHead", "LinearDecoder", "MaskTransformer", "SegFormerHead"]
