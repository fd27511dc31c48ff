"""Microsoft's ImageNet Swin classification weights (`{'model': ...}`, names `layers.i.blocks.j...`) or a
Hugging Face `SwinModel` -> transeg's Swin backbone (SeMask's too).

Relative-position bias tables of another window size are resized bicubically (align_corners=False),
as the authors' loader does; the classifier (`head`), its final `norm` and the saved `attn_mask`
buffers are dropped; what ImageNet weights do not have (SeMask's semantic layers, the per-stage output
norms `norm0..3`) keeps the model's own initialisation.
"""
import math
import re

import torch
import torch.nn.functional as F

from ..errors import TransegError
from .vit import HF_BLOCK

# HF block module names are ViT's (convert/vit.py); only the q/k/v prefixes differ for Swin
_HF_QKV = {"attention.self.query": "q", "attention.self.key": "k", "attention.self.value": "v",
           "attention.q_proj": "q", "attention.k_proj": "k", "attention.v_proj": "v"}


def from_hf(state):
    """HF SwinModel / SwinBackbone names -> the authors'. HF keeps `downsample` at the end of stage i too."""
    out, qkv = {}, {}
    for k, v in state.items():
        k = k.removeprefix("swin.")
        leaf = k.rsplit(".", 1)[-1]
        if k.startswith("embeddings.patch_embeddings.projection."):
            out["patch_embed.proj." + leaf] = v
        elif k.startswith("embeddings.norm."):
            out["patch_embed.norm." + leaf] = v
        elif m := re.match(r"hidden_states_norms\.stage(\d)\.(weight|bias)$", k):
            out[f"norm{int(m.group(1)) - 1}.{leaf}"] = v
        elif m := re.match(r"encoder\.layers\.(\d+)\.downsample\.(reduction|norm)\.(weight|bias)$", k):
            out[f"layers.{m.group(1)}.downsample.{m.group(2)}.{leaf}"] = v
        elif m := re.match(r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.+)$", k):
            prefix, rest = f"layers.{m.group(1)}.blocks.{m.group(2)}.", m.group(3)
            module = rest.rsplit(".", 1)[0]
            if rest.endswith("relative_position_bias_table") or rest.endswith("relative_position_index"):
                out[prefix + "attn." + leaf] = v
            elif module in _HF_QKV:
                qkv.setdefault(prefix + "attn.qkv." + leaf, {})[_HF_QKV[module]] = v
            elif module in HF_BLOCK:
                out[prefix + HF_BLOCK[module] + "." + leaf] = v
    for k, parts in qkv.items():
        out[k] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def fit_to(backbone, state, source):
    if any(k.startswith("embeddings.") or k.startswith("swin.embeddings.") for k in state):
        state = from_hf(state)
    own = backbone.state_dict()
    out = {}
    for k, v in state.items():
        if k.startswith(("head.", "norm.")) or k.endswith("attn_mask") or k not in own:
            continue
        if k.endswith("relative_position_bias_table") and v.shape != own[k].shape:
            if v.shape[1] != own[k].shape[1]:
                raise TransegError(f"{source}: {k} has {v.shape[1]} heads, the model {own[k].shape[1]}")
            s1, s2 = math.isqrt(v.shape[0]), math.isqrt(own[k].shape[0])
            v = F.interpolate(v.T.reshape(1, -1, s1, s1), size=(s2, s2), mode="bicubic", align_corners=False)
            v = v.reshape(-1, s2 * s2).T
        if k.endswith("relative_position_index"):
            continue  # a function of the window size: the model's own
        out[k] = v
    missing_ok = ("semantic_layer.", "norm0.", "norm1.", "norm2.", "norm3.", "relative_position_index")
    for k, v in own.items():
        if k not in out and any(m in k for m in missing_ok):
            out[k] = v
    return out
