"""Foreign checkpoints -> transeg models: the machinery every format shares.

    model = transeg.convert.convert("segformer.b0.512x512.ade.160k.pth", "segformer")
    transeg.save(model, "segformer-b0-ade.safetensors")

The formats are the families' (`registry.register_format`, declared in each family's package);
this module reads the source, calls the format's converter, builds the variant it names and loads
the weights. `read_backbone_state` / `load_backbone_weights` fit ImageNet encoder weights (timm,
DeiT, AugReg, mmseg, Hugging Face ViT / DINOv3 and the layouts families add with
`register_backbone_layout`) to a model's backbone.

What `convert` returns, `save` writes and `load` accepts: before a model is handed back, its metadata goes
through `checkpoint.check_metadata` (a class count >= 1, class names that are non-empty strings, one per
class, a palette of [r, g, b]) and its weights through the checks `load` runs (every tensor present and
of its shape, floating-point weights not given whole numbers, all finite), each failure one line naming
the source. A Hugging Face config.json is read by `hf_config.read_config` (bounded size and depth).
"""
import re
from pathlib import Path

import numpy as np

from ..backbones import SwinTransformer, VisionTransformer
from ..checkpoint import check_metadata, first_nonfinite, load_foreign, load_state_dict_checked, model_metadata
from ..data.classes import by_count
from ..errors import TransegError
from ..registry import FORMATS, create_model, get_format
from . import swin, vit


def formats():
    """{format name: one-line description} (the choices and help of `transeg convert --from`)."""
    return {name: f.description for name, f in FORMATS.items()}


def convert(src, fmt, model=None, num_classes=None, base=None):
    """Read `src` in format `fmt` and return a ready transeg Segmentor (eval mode). `base`: the weights a
    delta file is relative to (formats that take one, e.g. the authors' DINOv3 EoMT files: Meta's DINOv3)."""
    src = Path(src)
    found_format = get_format(fmt)
    if not src.exists():
        raise TransegError(f"{src}: no such file or directory")
    if base is not None and not found_format.base:
        takers = ", ".join(f"--from {f.name}" for f in FORMATS.values() if f.base)
        raise TransegError(f"--base: only {takers or 'no format'} reads delta files, not --from {fmt}")
    obj = src if found_format.reads_path else load_foreign(src)
    found = found_format.convert(obj, src, model, **({"base": base} if base else {}))
    k = found["num_classes"]
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise TransegError(f"{src}: its head has {k} classes; a segmentation model needs at least 1")
    if num_classes is not None and num_classes != k:
        raise TransegError(f"{src}: holds a {k}-class head, not {num_classes}")
    classes, palette = found["classes"], found["palette"]
    known = by_count(k) if classes is None else None
    if known:  # no names in the file: the benchmark with this class count (ADE20K 150, Cityscapes 19, ...)
        classes, palette = list(known[1]), palette or (known[2] and [list(c) for c in known[2]])
    net = create_model(found["variant"], num_classes=k, classes=classes,
                       palette=palette, **found.get("overrides", {}))
    load_state_dict_checked(net, found["state"], source=src)
    net.meta["converted_from"] = f"{fmt}:{src.name}"
    if found.get("test"):
        net.protocol = found["test"]
    _check_loadable(net, src)
    return net.eval()


def _check_loadable(net, src):
    """Refuse (one line naming `src`) a converted model that `save` would write and `load` refuse."""
    try:
        check_metadata(model_metadata(net), src)
    except TransegError as e:
        raise TransegError(str(e).replace("bad transeg metadata", "cannot be converted", 1)
                           .replace("; re-save the model or convert the original again", "")) from None
    bad = first_nonfinite(net.state_dict())
    if bad:
        raise TransegError(f"{src}: cannot be converted: tensor {bad[0]} holds {bad[1]} NaN/inf value(s); the source's "
                           "weights are damaged")


# Backbone layouts families add: (is_layout(state) -> bool, to_transeg(state, source) -> state), tried in order
_BACKBONE_LAYOUTS = []


def register_backbone_layout(is_layout, to_transeg):
    """Teach `read_backbone_state` a family's ImageNet weight layout (e.g. Hugging Face's MiT)."""
    _BACKBONE_LAYOUTS.append((is_layout, to_transeg))


# Containers ImageNet checkpoints use: timm/DeiT/PVT save {"model": ...}, mmcv {"state_dict": ...}.
_CONTAINERS = ("state_dict", "model", "state_dict_ema", "model_ema")


def read_backbone_state(src):
    """{name: tensor} from an ImageNet checkpoint file, a Google .npz, or a Hugging Face directory (ViT, MiT,
    DINOv3)."""
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
    else:
        layout = next((to_transeg for is_layout, to_transeg in _BACKBONE_LAYOUTS if is_layout(state)), None)
        state = state if layout is None else layout(state, src)
    return state


def load_backbone_weights(model, src):
    """Initialise `model.backbone` from ImageNet encoder weights: the authors' layout (NVlabs' `mit_b0.pth`,
    EDAFormer's `EFT_T.pth`), timm / DeiT `.pth`, Google AugReg `.npz`, a Hugging Face ViT or DINOv3. Keys may be
    prefixed by `module.`, `backbone.` or `encoder.`. A plain ViT's position embeddings are resized to the
    model's grid and its ImageNet head kept when it fits (Segmenter keeps it); other classifiers are dropped.
    Everything else must fit exactly."""
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
        final_norm = isinstance(model.backbone, VisionTransformer) and model.backbone.norm is not None
        state = {("norm." + k[4:] if k.startswith("ln1.") else vit.rename_mmseg(k)): v for k, v in state.items()
                 if final_norm or not k.startswith("ln1.")}
    if isinstance(model.backbone, VisionTransformer):
        state = vit.fit_to(model.backbone, state, src)
    elif isinstance(model.backbone, SwinTransformer):
        state = swin.fit_to(model.backbone, state, src)
    else:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    load_state_dict_checked(model.backbone, state, source=src, target=f"the {model.meta.get('variant', 'model')} backbone")
    return model
