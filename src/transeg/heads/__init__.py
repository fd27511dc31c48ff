"""Decode heads. Each takes the backbone's feature list and returns logits at its own stride."""
from .edaformer_head import EDAFormerHead
from .segformer_head import SegFormerHead

__all__ = ["EDAFormerHead", "SegFormerHead"]
