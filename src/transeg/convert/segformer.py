"""The authors' SegFormer checkpoints (NVlabs/SegFormer, mmcv 1.x `.pth`) -> transeg.

transeg keeps the authors' module names, so the mapping is the identity except that the unused
`decode_head.conv_seg` is dropped. The variant is recognised from the tensor shapes (embed dims,
depths, decoder width) unless `--model` names it.
"""
import re

from ..errors import TransegError
from ..registry import VARIANTS


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


def match_variant(family, source, **wanted):
    """The registered `family` variant whose kwargs equal `wanted` (tuples compared as tuples)."""
    def same(have, want):
        return tuple(have) == want if isinstance(want, tuple) else have == want

    for name, v in VARIANTS.items():
        if v.family == family and all(same(v.kwargs[k], w) for k, w in wanted.items()):
            return name
    found = ", ".join(f"{k} {w}" for k, w in wanted.items())
    raise TransegError(f"{source}: {family} with {found} matches no registered variant; pass --model")


def infer_segformer_variant(state, source):
    """(variant name, num_classes) from an official-layout state dict (keys with `backbone.`/`decode_head.`)."""
    dims, depths = stage_shapes(state, source, "SegFormer")
    decoder_dim, num_classes = head_shape(state, source, "SegFormer")
    return match_variant("segformer", source, embed_dims=dims, depths=depths, decoder_dim=decoder_dim), num_classes


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


def class_info(classes, palette, num_classes):
    """Class names and palette from checkpoint meta, when they fit the head."""
    return dict(classes=[str(c) for c in classes] if classes is not None and len(classes) == num_classes else None,
                palette=[[int(x) for x in c] for c in palette]
                if palette is not None and len(palette) == num_classes else None)


def convert(obj, source, model=None):
    """obj: what `torch.load` returned. Returns dict(variant, num_classes, state, classes, palette)."""
    state, classes, palette = read_mmseg_state(obj, source, "MiT")
    variant, num_classes = infer_segformer_variant(state, source)
    return dict(variant=model or variant, num_classes=num_classes, state=state, **class_info(classes, palette, num_classes))
