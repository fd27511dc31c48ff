"""ViT encoder weights from other layouts -> transeg's `VisionTransformer` (timm / Segmenter names).

- Hugging Face `ViTModel` (`embeddings.patch_embeddings.projection`, `encoder.layer.i.attention.attention.
  {query,key,value}`, ...): q/k/v are fused into `qkv` (rows q | k | v), the rest renamed.
- timm / DeiT `.pth` (`{'model': ...}` for DeiT): already transeg's names.
- Google AugReg `.npz` (`Transformer/encoderblock_i/MultiHeadDotProductAttention_1/query/kernel`, ...):
  kernels transposed (HWIO -> OIHW for the patch conv; [in, heads, dim] -> [out, in] for attention).

The position embeddings are resized to the model's grid (bilinear, align_corners=False, extra tokens
kept) as the authors do when they initialise Segmenter from ImageNet weights.
"""
import math
import re

import numpy as np
import torch

from ..errors import TransegError


# HF module names per block, both the Hub layout (`encoder.layer.i...`, what older `save_pretrained`
# files hold) and transformers v5's (`layers.i...`).
HF_BLOCK = {"layernorm_before": "norm1", "layernorm_after": "norm2", "attention.output.dense": "attn.proj",
             "attention.o_proj": "attn.proj", "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2",
             "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_HF_QKV = {"attention.attention.query": "q", "attention.attention.key": "k", "attention.attention.value": "v",
           "attention.q_proj": "q", "attention.k_proj": "k", "attention.v_proj": "v"}


def from_hf(state):
    """A Hugging Face ViTModel / ViTForImageClassification state dict -> transeg names (q, k, v fused)."""
    out, qkv = {}, {}
    for k, v in state.items():
        k = k.removeprefix("vit.")
        leaf = k.rsplit(".", 1)[-1]
        if k == "embeddings.cls_token":
            out["cls_token"] = v
        elif k == "embeddings.position_embeddings":
            out["pos_embed"] = v
        elif k.startswith("embeddings.patch_embeddings.projection."):
            out["patch_embed.proj." + leaf] = v
        elif k.startswith("layernorm."):
            out["norm." + leaf] = v
        elif k.startswith("classifier."):
            out["head." + leaf] = v
        elif m := re.match(r"(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(?:weight|bias)$", k):
            i, module = m.groups()
            if module in HF_BLOCK:
                out[f"blocks.{i}.{HF_BLOCK[module]}.{leaf}"] = v
            elif module in _HF_QKV:
                qkv.setdefault(f"blocks.{i}.attn.qkv.{leaf}", {})[_HF_QKV[module]] = v
    for k, parts in qkv.items():
        out[k] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def from_augreg(npz):
    """A Google AugReg / ViT `.npz` (numpy arrays by path) -> transeg names."""
    t = {k: torch.from_numpy(np.asarray(v)) for k, v in npz.items()}
    out = {"cls_token": t["cls"], "pos_embed": t["Transformer/posembed_input/pos_embedding"],
           "patch_embed.proj.weight": t["embedding/kernel"].permute(3, 2, 0, 1), "patch_embed.proj.bias": t["embedding/bias"],
           "norm.weight": t["Transformer/encoder_norm/scale"], "norm.bias": t["Transformer/encoder_norm/bias"]}
    if "head/kernel" in t:
        out["head.weight"], out["head.bias"] = t["head/kernel"].T, t["head/bias"]
    i = 0
    while f"Transformer/encoderblock_{i}/LayerNorm_0/scale" in t:
        b, o = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        att = b + "MultiHeadDotProductAttention_1/"
        out[o + "norm1.weight"], out[o + "norm1.bias"] = t[b + "LayerNorm_0/scale"], t[b + "LayerNorm_0/bias"]
        out[o + "norm2.weight"], out[o + "norm2.bias"] = t[b + "LayerNorm_2/scale"], t[b + "LayerNorm_2/bias"]
        out[o + "attn.qkv.weight"] = torch.cat([t[att + f"{n}/kernel"].flatten(1).T for n in ("query", "key", "value")])
        out[o + "attn.qkv.bias"] = torch.cat([t[att + f"{n}/bias"].flatten() for n in ("query", "key", "value")])
        out[o + "attn.proj.weight"] = t[att + "out/kernel"].flatten(0, 1).T
        out[o + "attn.proj.bias"] = t[att + "out/bias"]
        for j, name in ((0, "fc1"), (1, "fc2")):
            out[o + f"mlp.{name}.weight"] = t[b + f"MlpBlock_3/Dense_{j}/kernel"].T
            out[o + f"mlp.{name}.bias"] = t[b + f"MlpBlock_3/Dense_{j}/bias"]
        i += 1
    return {k: v.float().contiguous() for k, v in out.items()}


def fit_to(backbone, state, source):
    """Resize `pos_embed` to the backbone's grid (square source grid) and keep/drop the ImageNet heads
    as the backbone has them."""
    from ..backbones.vit import resize_pos_embed

    pe = state.get("pos_embed")
    if pe is not None and pe.shape != backbone.pos_embed.shape:
        tokens = pe.shape[1] - backbone.num_extra
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise TransegError(f"{source}: position embeddings for {tokens} patches are not a square grid")
        state["pos_embed"] = resize_pos_embed(pe, (side, side), backbone.grid, backbone.num_extra, backbone.pos_interp)
    for head in ("head", "head_dist"):
        mine, theirs = getattr(backbone, head), state.get(f"{head}.weight")
        if mine is None or theirs is None or theirs.shape != mine.weight.shape:
            state = {k: v for k, v in state.items() if not k.startswith(head + ".")}
            if mine is not None:  # no classifier in the file, or one for another label set: keep the model's own
                state.update({f"{head}.{n}": p.detach().clone() for n, p in mine.named_parameters()})
    return state
