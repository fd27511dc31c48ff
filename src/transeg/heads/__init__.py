"""Decode heads. Each takes the backbone's feature list and returns logits at its own stride."""
from .segformer_head import SegFormerHead

__all__ = ["SegFormerHead"]
