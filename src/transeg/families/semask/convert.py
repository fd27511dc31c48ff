"""The authors' SeMask checkpoints -> transeg: SeMask-FPN (mmcv 1.x `.pth`: {'meta', 'state_dict'}) and
SeMask-Mask2Former (detectron2 `.pth`: {'model', ...}).

transeg keeps the authors' module names (`backbone.layers.i.semantic_layer.class_injection.0.*`,
`decode_head.scale_heads.i.j.conv`/`bn`, `conv_seg`), so the mapping is the identity. The variant is
recognised from the width, depths and window (the relative-position table's size). Which stages run
global semantic attention is not in the weights: the authors' rule (T, S, L above 19 classes: stages 3-4
global) is applied from the class count, as their code does.

SeMask-Mask2Former: `sem_seg_head.` becomes `decode_head.` (pixel_decoder / predictor names are kept);
detectron2's `pixel_mean` / `pixel_std` buffers (the ImageNet values the variant carries) and the
criterion's `empty_weight` are dropped. Its own rules (stage 4 global with 150 classes; semantic
window 7 beside Swin's 12 in the Cityscapes config) come with the variant. Test protocol: the whole
image, short side 640 (long ≤ 2560) for ADE20K, 1024 (≤ 2048) for Cityscapes, padded to 32.
"""
import math
import re

import torch

from ...errors import TransegError
from ...protocol import Protocol
from ...backbones.swin import relative_position_index
from ...convert.mmseg import class_info, match_variant

DESCRIPTION = ("the authors' SeMask-FPN .pth (mmcv layout: {'meta', 'state_dict'}) or SeMask-Mask2Former .pth "
               "(detectron2 layout: {'model', ...})")


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
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict) and any(
            k.startswith("sem_seg_head.predictor.") for k in obj["model"]):
        return convert_mask2former(obj["model"], source, model)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise TransegError(f"{source}: expected a dict with 'state_dict', got {type(obj).__name__}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("sem_seg_head.predictor.") for k in state):
        return convert_mask2former(state, source, model)
    if "decode_head.conv_seg.weight" not in state or "backbone.layers.0.semantic_layer.norm1.weight" not in state:
        raise TransegError(f"{source}: not a SeMask-FPN checkpoint (no decode_head.conv_seg / semantic layers); "
                           "Microsoft's ImageNet Swin weights go to training as `backbone_weights`")
    num_classes = state["decode_head.conv_seg.weight"].shape[0]
    name, state = _match(state, source, model, "-fpn")
    meta = obj.get("meta") or {} if isinstance(obj, dict) else {}
    return dict(variant=name, num_classes=num_classes, state=state, test=test_protocol_fpn(name, num_classes),
                **class_info(meta.get("CLASSES"), meta.get("PALETTE"), num_classes))


def test_protocol_fpn(name, num_classes):
    """SeMask-FPN's released test (the authors' configs/semask_swin/ configs): the whole image, no
    alignment, resized into (2048, 1024) for Cityscapes, (2048, 512) otherwise ((2560, 640) for L);
    multi-scale 0.5..1.75 + flip."""
    scale = [2048, 1024] if num_classes == 19 else ([2560, 640] if name == "semask-swin-l-fpn" else [2048, 512])
    return Protocol(mode="whole", scale=scale, size_divisor=None, ms_scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75))


def _match(state, source, model, suffix):
    """(variant name, state with the computed relative_position_index buffers)."""
    dim, depths, window = swin_shapes(state, "backbone.", source)
    found = f"SeMask{suffix.replace('-', ' ').upper()} with width {dim}, depths {depths}, window {window}"
    name = model or match_variant("semask", source, what=found, suffix=suffix, embed_dim=dim, depths=depths,
                                  window_size=window)
    # a function of the window size, not a weight: always the computed one (whatever the file holds)
    index = relative_position_index(window)
    return name, {k: (index.clone() if k.endswith("relative_position_index") else v) for k, v in state.items()}


_DETECTRON2_EXTRAS = ("pixel_mean", "pixel_std", "criterion.empty_weight")


def convert_mask2former(state, source, model=None):
    state = {k.removeprefix("module."): v for k, v in state.items() if k not in _DETECTRON2_EXTRAS}
    state = {("decode_head." + k.removeprefix("sem_seg_head.") if k.startswith("sem_seg_head.") else k):
             (torch.as_tensor(v) if not isinstance(v, torch.Tensor) else v) for k, v in state.items()}
    num_classes = state["decode_head.predictor.class_embed.weight"].shape[0] - 1
    name, state = _match(state, source, model, "-mask2former")
    return dict(variant=name, num_classes=num_classes, state=state, test=test_protocol_mask2former(num_classes),
                **class_info(None, None, num_classes))


def test_protocol_mask2former(num_classes):
    """The released configs' test: whole image resized to short side 640 (long <= 2560) for ADE20K,
    1024 (<= 2048) for Cityscapes; the model pads to 32 itself."""
    scale = [2048, 1024] if num_classes == 19 else [2560, 640]
    return Protocol(mode="whole", scale=scale, size_divisor=None)
