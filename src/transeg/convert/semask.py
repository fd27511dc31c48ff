"""The authors' SeMask-FPN checkpoints (mmcv 1.x `.pth`: {'meta', 'state_dict'}) -> transeg.

transeg keeps the authors' module names (`backbone.layers.i.semantic_layer.class_injection.0.*`,
`decode_head.scale_heads.i.j.conv`/`bn`, `conv_seg`), so the mapping is the identity. The variant is
recognised from the width, depths and window (the relative-position table's size). Which stages run
global semantic attention is not in the weights: the authors' rule (T, S, L above 19 classes: stages 3-4
global) is applied from the class count, as their code does.
"""
import math
import re

from ..errors import TransegError
from ..backbones.swin import relative_position_index
from ..registry import VARIANTS
from .segformer import class_info


def swin_shapes(state, prefix, source):
    """(embed dim, depths, window) of a Swin backbone state dict under `prefix`."""
    try:
        dim = state[f"{prefix}patch_embed.proj.weight"].shape[0]
        table = state[f"{prefix}layers.0.blocks.0.attn.relative_position_bias_table"].shape[0]
    except KeyError as e:
        raise TransegError(f"{source}: not a Swin backbone (no {e.args[0]})") from None
    depths = tuple(1 + max((int(m.group(1)) for k in state if (m := re.match(rf"{re.escape(prefix)}layers\.{i}\.blocks\.(\d+)\.", k))),
                           default=-1) for i in range(4))
    return dim, depths, (math.isqrt(table) + 1) // 2


def convert(obj, source, model=None):
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise TransegError(f"{source}: expected a dict with 'state_dict', got {type(obj).__name__}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if "decode_head.conv_seg.weight" not in state or "backbone.layers.0.semantic_layer.norm1.weight" not in state:
        raise TransegError(f"{source}: not a SeMask-FPN checkpoint (no decode_head.conv_seg / semantic layers); "
                           "Microsoft's ImageNet Swin weights go to training as `backbone_weights`")
    dim, depths, window = swin_shapes(state, "backbone.", source)
    num_classes = state["decode_head.conv_seg.weight"].shape[0]
    name = model or next((n for n, v in VARIANTS.items() if v.family == "semask" and v.kwargs["embed_dim"] == dim
                          and tuple(v.kwargs["depths"]) == depths and v.kwargs["window_size"] == window), None)
    if name is None:
        raise TransegError(f"{source}: SeMask with width {dim}, depths {depths}, window {window} matches no "
                           "registered variant; pass --model")
    # a function of the window size, not a weight: always the computed one (whatever the file holds)
    index = relative_position_index(window)
    state = {k: (index.clone() if k.endswith("relative_position_index") else v) for k, v in state.items()}
    meta = obj.get("meta") or {} if isinstance(obj, dict) else {}
    return dict(variant=name, num_classes=num_classes, state=state,
                **class_info(meta.get("CLASSES"), meta.get("PALETTE"), num_classes))
