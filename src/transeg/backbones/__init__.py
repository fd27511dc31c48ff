"""Encoders. Each takes [N,3,H,W] and returns a list of NCHW feature maps (see DESIGN.md); SeMask's
returns (features, class-prior maps)."""
from .eft import EmbeddingFreeTransformer
from .mit import MixVisionTransformer
from .semask import SeMaskSwinTransformer
from .swin import SwinTransformer
from .vit import VisionTransformer

__all__ = ["EmbeddingFreeTransformer", "MixVisionTransformer", "SeMaskSwinTransformer", "SwinTransformer",
           "VisionTransformer"]
