"""transeg: transformer semantic segmentation in pure PyTorch.

    import transeg
    model = transeg.load("model.safetensors")
    seg = model.predict("photo.jpg")          # seg.labels [H, W], seg.overlay(), seg.shares()
    model = transeg.create_model("segformer-b0", num_classes=19)
    transeg.save(model, "model.safetensors")
"""
__version__ = "0.1.0"

from .checkpoint import load, save
from .errors import TransegError
from .inference import Segmentation
from .protocol import Protocol
from .registry import VARIANTS, create_model, get_variant, list_models
from .segmentor import Segmentor

__all__ = ["Protocol", "Segmentation", "Segmentor", "TransegError", "VARIANTS", "create_model", "get_variant",
           "list_models", "load", "save", "__version__"]
