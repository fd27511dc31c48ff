"""The authors' SegFormer checkpoints (NVlabs/SegFormer, mmcv 1.x `.pth`) -> transeg.

transeg keeps the authors' module names, so the mapping is the identity except that the unused
`decode_head.conv_seg` is dropped. The variant is recognised from the tensor shapes (embed dims,
depths, decoder width) unless `--model` names it.
"""
import re

from ..errors import TransegError
from ..registry import VARIANTS


def infer_segformer_variant(state, source):
    """(variant name, num_classes) from an official-layout state dict (keys with `backbone.`/`decode_head.`)."""
    try:
        dims = tuple(state[f"backbone.patch_embed{s}.proj.weight"].shape[0] for s in range(1, 5))
        depths = tuple(1 + max((int(m.group(1)) for k in state
                                if (m := re.match(rf"backbone\.block{s}\.(\d+)\.", k))), default=-1)
                       for s in range(1, 5))
        decoder_dim = state["decode_head.linear_pred.weight"].shape[1]
        num_classes = state["decode_head.linear_pred.weight"].shape[0]
    except KeyError as e:
        raise TransegError(f"{source}: not a SegFormer segmentation checkpoint (no {e.args[0]})") from None
    for name, v in VARIANTS.items():
        k = v.kwargs
        if v.family == "segformer" and (tuple(k["embed_dims"]), tuple(k["depths"]), k["decoder_dim"]) == (dims, depths, decoder_dim):
            return name, num_classes
    raise TransegError(f"{source}: SegFormer with embed dims {dims}, depths {depths}, decoder {decoder_dim} matches no "
                       "registered variant; pass --model")


def convert(obj, source, model=None):
    """obj: what `torch.load` returned. Returns dict(variant, num_classes, state, classes, palette)."""
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise TransegError(f"{source}: expected a dict with 'state_dict', got {type(obj).__name__}")
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith("decode_head.conv_seg.")}
    if not any(k.startswith("decode_head.") for k in state):
        raise TransegError(f"{source}: holds no decode head (an ImageNet MiT backbone?); "
                           "use it as `pretrained` for training instead of converting it")
    variant, num_classes = infer_segformer_variant(state, source)
    meta = obj.get("meta") or {} if isinstance(obj, dict) else {}
    classes = meta.get("CLASSES")
    palette = meta.get("PALETTE")
    return dict(variant=model or variant, num_classes=num_classes, state=state,
                classes=[str(c) for c in classes] if classes is not None and len(classes) == num_classes else None,
                palette=[[int(x) for x in c] for c in palette] if palette is not None and len(palette) == num_classes else None)
