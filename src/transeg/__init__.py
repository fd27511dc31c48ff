"""transeg: transformer semantic segmentation in pure PyTorch.

    import transeg
    model = transeg.load("model.safetensors")   # or a zoo name, or a Hugging Face repo id
    seg = model.predict("photo.jpg")          # seg.labels [H, W], seg.overlay(), seg.shares()
    model = transeg.create_model("segformer-b0", num_classes=19)
    transeg.save(model, "model.safetensors")
    transeg.push_to_hub("runs/train", "me/my-model")   # checkpoint + recipe + model card on the Hub
"""
from . import families  # noqa: F401 (registers the families' variants, formats and releases)
from .checkpoint import save
from .errors import TransegError
from .inference import Segmentation
from .protocol import Protocol
from .registry import VARIANTS, create_model, get_variant, list_models
from .segmentor import Segmentor
from .share import push_to_hub, save_pretrained  # (functions, not Segmentor methods: the Segmentor sits below share)
from .version import __version__
from .zoo import load

__all__ = ["Protocol", "Segmentation", "Segmentor", "TransegError", "VARIANTS", "create_model", "get_variant",
           "list_models", "load", "push_to_hub", "save", "save_pretrained", "__version__"]
