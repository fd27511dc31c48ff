"""The authors' SegViT checkpoints (zbwxp/SegVit, mmcv 1.4 `.pth`: {'meta', 'state_dict', 'optimizer'}) -> transeg.

The head keeps the authors' names. The backbone is mmseg 0.24's ViT, renamed to timm's layout:
`patch_embed.projection` -> `patch_embed.proj`, `layers.i` -> `blocks.i`, `ln1/ln2` -> `norm1/norm2`,
`attn.attn.in_proj_*` -> `attn.qkv.*` (same q | k | v row order), `attn.attn.out_proj` -> `attn.proj`,
`ffn.layers.0.0` / `ffn.layers.1` -> `mlp.fc1` / `mlp.fc2`. The loss modules' `empty_weight` buffers
(a constant of the loss) and the optimizer state are dropped. The variant is recognised from the
width, the Shrunk head's QU queries and the crop (position-embedding grid).
"""
import math

from ...errors import TransegError
from ...protocol import Protocol
from ...registry import VARIANTS
from ...convert.mmseg import class_info, match_variant
from ...convert.vit import rename_mmseg

DESCRIPTION = "the authors' zbwxp/SegVit .pth (mmcv layout: {'meta', 'state_dict', 'optimizer'}; optimizer ignored)"

def convert(obj, source, model=None):
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or "backbone.pos_embed" not in state:
        raise TransegError(f"{source}: not a SegViT checkpoint (no state_dict['backbone.pos_embed'])")
    out = {}
    for k, v in state.items():
        k = k.removeprefix("module.")
        if k.endswith("criterion.empty_weight"):
            continue
        out["backbone." + rename_mmseg(k[9:]) if k.startswith("backbone.") else k] = v
    dim = out["backbone.cls_token"].shape[-1]
    grid = math.isqrt(out["backbone.pos_embed"].shape[1] - 1)
    crop = grid * out["backbone.patch_embed.proj.weight"].shape[-1]
    shrunk = "decode_head.atm.q.weight" in out
    num_classes = out["decode_head.atm.q.weight" if shrunk else "decode_head.q.weight"].shape[0]
    found = f"SegViT with width {dim}, crop {crop}{', Shrunk' if shrunk else ''}"
    name = model or match_variant("segvit", source, what=found, embed_dim=dim, shrunk=shrunk, crop=crop)
    overrides = {"crop": crop} if VARIANTS[name].kwargs["crop"] != crop else {}
    meta = obj.get("meta") or {} if isinstance(obj, dict) else {}
    return dict(variant=name, num_classes=num_classes, state=out, overrides=overrides, test=test_protocol(crop, num_classes),
                **class_info(meta.get("CLASSES"), meta.get("PALETTE"), num_classes))


# No cap on the long side: with keep_ratio, mmseg 0.24's Resize `min_size` (set by the released COCO-Stuff
# and Pascal Context configs) makes the SHORT side the target.
_UNCAPPED = 100_000


def test_protocol(crop, num_classes):
    """The sliding-window test of the authors' released configs (configs/segvit/ of zbwxp/SegVit),
    chosen by the head's class count: ADE20K (150) short side = crop (long <= 2048), windows of the
    crop, stride crop - 32 (ViT-B 512: stride 341); COCO-Stuff-10K (171) short side 512 uncapped,
    stride 341; Pascal Context (60) short side 520 uncapped, stride 320."""
    if num_classes == 171:
        scale, stride = [_UNCAPPED, 512], 341
    elif num_classes in (59, 60):
        scale, stride = [_UNCAPPED, 520], 320
    else:
        scale, stride = [2048, crop], (341 if crop == 512 else crop - 32)
    return Protocol(mode="slide", crop=(crop, crop), stride=(stride, stride), scale=scale, size_divisor=None)
