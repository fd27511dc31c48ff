"""What the converters share: reading mmcv-era checkpoints (state dict + meta), class names from their
meta, recognising the registered variant from the shapes found in the weights, and the test protocol
of the released mmseg configs that SegFormer and EDAFormer have in common.

SegFormer and EDAFormer also share the MiT / EFT key layout (`backbone.patch_embed{s}`,
`backbone.block{s}.{j}`, `decode_head.linear_pred`): `stage_shapes` and `head_shape` read it.
"""
import numbers
import re

from ..errors import TransegError, UnknownVariant
from ..protocol import Protocol
from ..registry import VARIANTS


def read_mmseg_state(obj, source, what):
    """The state dict of an mmcv-era checkpoint ({'state_dict', 'meta'} or a bare dict), without DDP's
    `module.` prefix and mmseg's unused `decode_head.conv_seg`, and its class names / palette."""
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise TransegError(f"{source}: expected a dict with 'state_dict', got {type(obj).__name__}")
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith("decode_head.conv_seg.")}
    if not any(k.startswith("decode_head.") for k in state):
        raise TransegError(f"{source}: holds no decode head (an ImageNet {what} backbone?); "
                           "use it as `backbone_weights` for training instead of converting it")
    meta = obj.get("meta") or {} if isinstance(obj, dict) else {}
    return state, meta.get("CLASSES"), meta.get("PALETTE")


def _colour(c):
    """An [r, g, b] of plain ints from meta's (numpy ints, tuples); anything else as it is, for
    `convert`'s check to name."""
    if not isinstance(c, (list, tuple)) and not hasattr(c, "tolist"):
        return c
    c = c.tolist() if hasattr(c, "tolist") else list(c)
    return [int(x) if isinstance(x, numbers.Real) and not isinstance(x, bool) and float(x).is_integer() else x
            for x in c] if isinstance(c, list) else c


def class_info(classes, palette, num_classes):
    """Class names and palette from checkpoint meta, when they fit the head. Names that are not strings are
    kept as they are (not turned into "5" or "None"), so `convert` refuses them in one line."""
    fits = classes is not None and not isinstance(classes, str) and hasattr(classes, "__len__") \
        and len(classes) == num_classes
    return dict(classes=[str(c) if isinstance(c, str) else c for c in classes] if fits else None,
                palette=[_colour(c) for c in palette]
                if palette is not None and hasattr(palette, "__len__") and len(palette) == num_classes else None)


def match_variant(family, source, what=None, hint="", suffix="", **wanted):
    """The first registered `family` variant (whose name ends with `suffix`) built with the constructor
    arguments `wanted` (tuples compared as tuples; an argument the variant leaves out is its builder's
    default). None matches: `UnknownVariant` naming `source` and `what` was found (default: `wanted`), then how to
    name a variant (the caller's way: `model=`, `--model`, ...) and `hint`, the names that fit."""
    def same(have, want):
        return tuple(have) == want if isinstance(want, tuple) else have == want

    for name, v in VARIANTS.items():
        if v.family == family and name.endswith(suffix):
            arguments = v.arguments()
            if all(k in arguments and same(arguments[k], w) for k, w in wanted.items()):
                return name
    what = what or f"{family} with " + ", ".join(f"{k} {w}" for k, w in wanted.items())
    raise UnknownVariant(source, what, hint)


def stage_shapes(state, source, family):
    """(embed dims, depths) of a four-stage encoder in the MiT/EFT layout (`backbone.patch_embed{s}`, `backbone.block{s}.{j}`)."""
    try:
        dims = tuple(state[f"backbone.patch_embed{s}.proj.weight"].shape[0] for s in range(1, 5))
    except KeyError as e:
        raise TransegError(f"{source}: not a {family} segmentation checkpoint (no {e.args[0]})") from None
    depths = tuple(1 + max((int(m.group(1)) for k in state if (m := re.match(rf"backbone\.block{s}\.(\d+)\.", k))),
                           default=-1) for s in range(1, 5))
    return dims, depths


def head_shape(state, source, family):
    """(decoder width, num_classes) from `decode_head.linear_pred`."""
    try:
        w = state["decode_head.linear_pred.weight"]
    except KeyError:
        raise TransegError(f"{source}: not a {family} segmentation checkpoint (no decode_head.linear_pred.weight)") from None
    return w.shape[1], w.shape[0]


def test_protocol(num_classes, short_side=512, size_divisor=32):
    """The test of the authors' released mmseg configs, the same for SegFormer (NVlabs/SegFormer
    local_configs) and EDAFormer, chosen by the head's class count: Cityscapes (19) 1024x1024 windows with stride 768 on the
    2048x1024 image, multi-scale 0.5..2.0; otherwise the whole image resized to short side `short_side`
    (long <= 2048) and aligned to 32, multi-scale 0.75..1.25 for ADE20K and 0.5..1.75 for the others."""
    if num_classes == 19:
        return Protocol(mode="slide", crop=(1024, 1024), stride=(768, 768), scale=(2048, 1024), size_divisor=None,
                        ms_scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0))
    ms = [0.75, 0.875, 1.0, 1.125, 1.25] if num_classes == 150 else [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
    return Protocol(mode="whole", scale=(2048, short_side), size_divisor=size_divisor, ms_scales=ms)
