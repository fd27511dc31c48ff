"""transeg: transformer semantic segmentation in pure PyTorch.

    import transeg
    model = transeg.create_model("segformer-b0", num_classes=19)
    transeg.save(model, "model.safetensors")
    model = transeg.load("model.safetensors")
    labels = model.predict(images)            # [N, H, W]
"""
__version__ = "0.1.0"

from .checkpoint import load, save
from .errors import TransegError
from .registry import VARIANTS, create_model, get_variant, list_models
from .segmentor import Segmentor

__all__ = ["Segmentor", "TransegError", "VARIANTS", "create_model", "get_variant", "list_models", "load", "save",
           "__version__"]
