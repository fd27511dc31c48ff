"""The authors' Segmenter checkpoints (rstrudel/segmenter `checkpoint.pth` + `variant.yml`) -> transeg.

The released file is {'model': state_dict, 'n_cls': K, 'epoch': E}; transeg keeps the authors' module
names under `backbone.` / `decode_head.` instead of `encoder.` / `decoder.`, and nothing else changes
(qkv stays fused, `proj_patch` / `proj_classes` stay right-multiplied matrices, the ImageNet heads are
kept). The variant is recognised from the shapes: width, depth, patch size, class + distillation
tokens, decoder type and depth, and the training crop from the stored position-embedding grid. A
`variant.yml` beside the checkpoint names the dataset of the test protocol (sliding windows of the crop
with stride crop - 32, as the authors' published evaluation; ADE20K's resize without one) and is
checked against the weights.
"""
import math
import re
from pathlib import Path

import yaml

from ...errors import TransegError
from ...protocol import Protocol
from ...registry import VARIANTS
from ...convert.mmseg import match_variant

DESCRIPTION = ("the authors' rstrudel/segmenter checkpoint.pth ({'model', 'n_cls', 'epoch'}; a variant.yml beside it "
               "names the dataset of its test protocol)")

# dataset -> (short side of the test resize, long-side cap ratio): `im_size` and `max_ratio` of the
# authors' segm/config.yml, which their evaluation (segm/eval/miou.py) resizes to
_TEST_RESIZE = {"ade20k": (512, 4), "pascal_context": (520, 8), "cityscapes": (1024, 2)}


class _VariantLoader(yaml.SafeLoader):
    """variant.yml stores tuples as `!!python/tuple`, which yaml.safe_load refuses; read them as lists
    without allowing any other Python tag."""


_VariantLoader.add_constructor("tag:yaml.org,2002:python/tuple", lambda loader, node: loader.construct_sequence(node))


def read_variant(path):
    try:
        return yaml.load(Path(path).read_text(), Loader=_VariantLoader) or {}
    except yaml.YAMLError as e:
        raise TransegError(f"{path}: unreadable variant.yml ({str(e).splitlines()[0]})") from None


def _count(state, prefix):
    return 1 + max((int(m.group(1)) for k in state if (m := re.match(rf"{re.escape(prefix)}(\d+)\.", k))), default=-1)


def convert(obj, source, model=None):
    """obj: what `torch.load` returned for checkpoint.pth. Returns dict(variant, num_classes, state, overrides, test)."""
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or "encoder.cls_token" not in state:
        raise TransegError(f"{source}: not a Segmenter checkpoint (no model['encoder.cls_token'])")
    state = {("backbone." + k[8:] if k.startswith("encoder.") else "decode_head." + k[8:] if k.startswith("decoder.") else k): v
             for k, v in state.items()}
    dim = state["backbone.cls_token"].shape[-1]
    patch = state["backbone.patch_embed.proj.weight"].shape[-1]
    depth = _count(state, "backbone.blocks.")
    distilled = "backbone.dist_token" in state
    mask = "decode_head.cls_emb" in state
    num_classes = (state["decode_head.cls_emb"] if mask else state["decode_head.head.weight"]).shape[-2 if mask else 0]
    tokens = state["backbone.pos_embed"].shape[1] - (2 if distilled else 1)
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise TransegError(f"{source}: position embeddings for {tokens} patches are not a square grid")
    crop = grid * patch
    found = dict(patch_size=patch, embed_dim=dim, depth=depth, decoder="mask" if mask else "linear", distilled=distilled)
    name = model or match_variant("segmenter", source, what=f"Segmenter with {found}",
                                  hint=" (the nearest variant; differing sizes are taken from the weights)", **found)
    # what the weights say beyond the variant's defaults (training crop, Cityscapes' 1-layer decoder,
    # or a custom size under --model) becomes constructor arguments stored with the model
    found.update(num_heads=max(1, dim // 64), crop=crop)
    if mask:
        found["decoder_depth"] = _count(state, "decode_head.blocks.")
    defaults = VARIANTS[name].arguments()
    overrides = {k: v for k, v in found.items() if defaults.get(k) != v}
    out = dict(variant=name, num_classes=num_classes, state=state, overrides=overrides, classes=None, palette=None)
    variant_yml = Path(source).with_name("variant.yml")
    variant = read_variant(variant_yml) if variant_yml.is_file() else {}
    out["test"] = _protocol(variant, crop, distilled, variant_yml)
    return out


def _protocol(variant, crop, distilled, path):
    data = variant.get("dataset_kwargs") or {}
    net = variant.get("net_kwargs") or {}
    norm = data.get("normalization") or net.get("normalization")
    if norm and norm != ("deit" if distilled else "vit"):
        raise TransegError(f"{path}: says normalization {norm!r}, but the weights are a "
                           f"{'DeiT' if distilled else 'ViT'} (transeg uses {'deit' if distilled else 'vit'})")
    if data.get("crop_size") not in (None, crop):
        raise TransegError(f"{path}: says crop_size {data['crop_size']}, the position embeddings are for {crop}")
    # without a variant.yml: ADE20K's rule around the crop (short side = crop, long side <= 4x)
    short, ratio = _TEST_RESIZE.get(data.get("dataset"), (data.get("image_size") or crop, 4))
    return Protocol(mode="slide", crop=(crop, crop), stride=(crop - 32, crop - 32), scale=(ratio * short, short),
                    size_divisor=None, min_short_side=crop)
