"""Foreign checkpoints -> transeg models. One module per format.

    model = transeg.convert.convert("segformer.b0.512x512.ade.160k.pth", "segformer")
    transeg.save(model, "segformer-b0-ade.safetensors")
"""
from pathlib import Path

from ..checkpoint import load_foreign, load_state_dict_checked
from ..errors import TransegError
from . import edaformer, segformer, segformer_hf

FORMATS = {
    "edaformer": "the authors' hyunwoo137/EDAFormer .pth (mmcv layout: {'state_dict', 'meta'})",
    "segformer": "the authors' NVlabs/SegFormer .pth (mmcv layout: {'state_dict', 'meta'})",
    "segformer-hf": "a Hugging Face SegformerForSemanticSegmentation save_pretrained directory (or its weights file)",
}


def convert(src, fmt, model=None, num_classes=None):
    """Read `src` in format `fmt` and return a ready transeg Segmentor (eval mode)."""
    from ..registry import create_model

    src = Path(src)
    if fmt not in FORMATS:
        raise TransegError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    if not src.exists():
        raise TransegError(f"{src}: no such file or directory")
    if fmt in ("segformer", "edaformer"):
        found = {"segformer": segformer, "edaformer": edaformer}[fmt].convert(load_foreign(src), src, model)
    else:
        found = segformer_hf.convert(src, src, model)
    if num_classes is not None and num_classes != found["num_classes"]:
        raise TransegError(f"{src}: holds a {found['num_classes']}-class head, not {num_classes}")
    net = create_model(found["variant"], num_classes=found["num_classes"], classes=found["classes"],
                       palette=found["palette"])
    load_state_dict_checked(net, found["state"], source=src)
    net.meta["converted_from"] = f"{fmt}:{src.name}"
    return net.eval()


# Containers ImageNet checkpoints use: timm/DeiT/PVT save {"model": ...}, mmcv {"state_dict": ...}.
_CONTAINERS = ("state_dict", "model", "state_dict_ema", "model_ema")


def load_backbone_weights(model, src):
    """Initialise `model.backbone` from ImageNet encoder weights in the authors' layout (e.g. NVlabs'
    `mit_b0.pth`, EDAFormer's `EFT_T.pth`): keys as the backbone's own names, optionally prefixed by
    `module.` or `backbone.`; the classifier (`head.*`) is dropped. Everything else must fit exactly."""
    src = Path(src)
    obj = load_foreign(src)
    state = next((obj[k] for k in _CONTAINERS if isinstance(obj, dict) and isinstance(obj.get(k), dict)), obj)
    if not isinstance(state, dict):
        raise TransegError(f"{src}: expected a dict of tensors, got {type(state).__name__}")
    state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
    if any(k.startswith("decode_head.") for k in state):
        raise TransegError(f"{src}: a whole segmentation model, not backbone weights; convert it with `transeg convert`")
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    load_state_dict_checked(model.backbone, state, source=src, target=f"the {model.meta.get('variant', 'model')} backbone")
    return model
