"""Foreign checkpoints -> transeg models. One module per format.

    model = transeg.convert.convert("segformer.b0.512x512.ade.160k.pth", "segformer")
    transeg.save(model, "segformer-b0-ade.safetensors")

A format is a row of `_FORMATS`: its converter module, which carries a one-line `DESCRIPTION` and
`convert(obj, source, model)`, and how the source path becomes `obj` (a torch file read safely, or
the path itself for formats that read a directory).
"""
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable

from ..checkpoint import load_foreign, load_state_dict_checked
from ..data.classes import by_count
from ..errors import TransegError
from . import edaformer, eomt, segformer, segformer_hf, segmenter, semask, segvit


@dataclass(frozen=True)
class _Format:
    converter: ModuleType
    read: Callable = load_foreign  # source path -> what `converter.convert` takes


_FORMATS = {
    "edaformer": _Format(edaformer),
    "eomt": _Format(eomt, read=Path),  # the authors' file, or Hugging Face's directory / file: the converter reads it
    "segformer": _Format(segformer),
    "segformer-hf": _Format(segformer_hf, read=Path),  # a save_pretrained directory: the converter reads it
    "semask": _Format(semask),
    "segvit": _Format(segvit),
    "segmenter": _Format(segmenter),
}
FORMATS = {name: f.converter.DESCRIPTION for name, f in _FORMATS.items()}  # name -> description (CLI help)


def convert(src, fmt, model=None, num_classes=None, base=None):
    """Read `src` in format `fmt` and return a ready transeg Segmentor (eval mode). `base`: the weights a
    delta file is relative to (the authors' DINOv3 EoMT files: Meta's DINOv3)."""
    from ..registry import create_model

    src = Path(src)
    if fmt not in _FORMATS:
        raise TransegError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    if not src.exists():
        raise TransegError(f"{src}: no such file or directory")
    if base is not None and fmt != "eomt":
        raise TransegError(f"--base: only --from eomt reads delta files (the authors' DINOv3 EoMT), not --from {fmt}")
    found = _FORMATS[fmt].converter.convert(_FORMATS[fmt].read(src), src, model, **({"base": base} if base else {}))
    if num_classes is not None and num_classes != found["num_classes"]:
        raise TransegError(f"{src}: holds a {found['num_classes']}-class head, not {num_classes}")
    classes, palette = found["classes"], found["palette"]
    known = by_count(found["num_classes"]) if classes is None else None
    if known:  # no names in the file: the benchmark with this class count (ADE20K 150, Cityscapes 19, ...)
        classes, palette = list(known[1]), palette or (known[2] and [list(c) for c in known[2]])
    net = create_model(found["variant"], num_classes=found["num_classes"], classes=classes,
                       palette=palette, **found.get("overrides", {}))
    load_state_dict_checked(net, found["state"], source=src)
    net.meta["converted_from"] = f"{fmt}:{src.name}"
    if found.get("test"):
        net.protocol = found["test"]
    return net.eval()


# Containers ImageNet checkpoints use: timm/DeiT/PVT save {"model": ...}, mmcv {"state_dict": ...}.
_CONTAINERS = ("state_dict", "model", "state_dict_ema", "model_ema")


def read_backbone_state(src):
    """{name: tensor} from an ImageNet checkpoint file, a Google .npz, or a Hugging Face directory (ViT, MiT,
    DINOv3)."""
    import numpy as np

    from . import vit

    if src.is_dir():
        files = [src / n for n in ("model.safetensors", "pytorch_model.bin") if (src / n).is_file()]
        if not files:
            raise TransegError(f"{src}: a directory without model.safetensors or pytorch_model.bin")
        src = files[0]
    if src.suffix == ".npz":
        try:
            with np.load(src, allow_pickle=False) as npz:
                return vit.from_augreg(npz)
        except (OSError, ValueError, KeyError) as e:
            raise TransegError(f"{src}: not a ViT .npz in the Google/AugReg layout ({e})") from None
    obj = load_foreign(src)
    state = next((obj[k] for k in _CONTAINERS if isinstance(obj, dict) and isinstance(obj.get(k), dict)), obj)
    if not isinstance(state, dict):
        raise TransegError(f"{src}: expected a dict of tensors, got {type(state).__name__}")
    if vit.is_hf_dinov3(state):  # before HF's ViT: the same `embeddings.` prefix
        state = vit.from_hf_dinov3(state, src)
    elif any(k.removeprefix("vit.").startswith("embeddings.") for k in state):
        state = vit.from_hf(state)
    elif any(k.startswith(("segformer.encoder.", "segformer.stages.")) for k in state):  # HF's MiT (nvidia/mit-b*)
        from .segformer_hf import hf_to_official

        state = {k.removeprefix("backbone."): v for k, v in
                 hf_to_official({k: v for k, v in state.items() if k.startswith("segformer.")}, src).items()}
    return state


def load_backbone_weights(model, src):
    """Initialise `model.backbone` from ImageNet encoder weights: the authors' layout (NVlabs' `mit_b0.pth`,
    EDAFormer's `EFT_T.pth`), timm / DeiT `.pth`, Google AugReg `.npz`, a Hugging Face ViT or DINOv3. Keys may be
    prefixed by `module.`, `backbone.` or `encoder.`. A plain ViT's position embeddings are resized to the
    model's grid and its ImageNet head kept when it fits (Segmenter keeps it); other classifiers are dropped.
    Everything else must fit exactly."""
    from ..backbones import SwinTransformer, VisionTransformer
    from . import swin, vit

    src = Path(src)
    if not src.exists():
        raise TransegError(f"{src}: no such file (ImageNet weights for the backbone: download the file the recipe "
                           "names and give its path with --set backbone_weights=PATH, or train from scratch with "
                           "--set backbone_weights=null)")
    state = {k.removeprefix("module.").removeprefix("backbone.").removeprefix("encoder."): v
             for k, v in read_backbone_state(src).items()}
    if any(k.startswith(("decode_head.", "decoder.")) for k in state):
        raise TransegError(f"{src}: a whole segmentation model, not backbone weights; convert it with `transeg convert`")
    if any(re.match(r"layers\.\d+\.ln1\.", k) for k in state):
        # mmseg's ViT layout (SegViT's ImageNet files, e.g. vit_large_p16_384_20220308-d4efb41d.pth): timm's
        # names; its top-level `ln1` is the final norm, which SegViT's encoder does not have
        from .segvit import rename_backbone

        final_norm = getattr(model.backbone, "norm", None) is not None
        state = {("norm." + k[4:] if k.startswith("ln1.") else rename_backbone(k)): v for k, v in state.items()
                 if final_norm or not k.startswith("ln1.")}
    if isinstance(model.backbone, VisionTransformer):
        state = vit.fit_to(model.backbone, state, src)
    elif isinstance(model.backbone, SwinTransformer):
        state = swin.fit_to(model.backbone, state, src)
    else:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    load_state_dict_checked(model.backbone, state, source=src, target=f"the {model.meta.get('variant', 'model')} backbone")
    return model
