"""Encoders. Each takes [N,3,H,W] and returns a list of NCHW feature maps (see DESIGN.md)."""
from .eft import EmbeddingFreeTransformer
from .mit import MixVisionTransformer
from .vit import VisionTransformer

__all__ = ["EmbeddingFreeTransformer", "MixVisionTransformer", "VisionTransformer"]
