"""Encoders more than one family builds on: MiT (SegFormer, EDAFormer's EFT), the plain ViT (Segmenter,
SegViT, EoMT) and Swin (SeMask). Each takes [N,3,H,W] and returns its feature maps (see `contracts`)."""
from .mit import MixVisionTransformer
from .swin import SwinTransformer
from .vit import VisionTransformer

__all__ = ["MixVisionTransformer", "SwinTransformer", "VisionTransformer"]
