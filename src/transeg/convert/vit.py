"""ViT encoder weights from other layouts -> transeg's `VisionTransformer` (timm / Segmenter names).

- Hugging Face `ViTModel` (`embeddings.patch_embeddings.projection`, `encoder.layer.i.attention.attention.
  {query,key,value}`, ...): q/k/v are fused into `qkv` (rows q | k | v), the rest renamed.
- timm / DeiT `.pth` (`{'model': ...}` for DeiT): already transeg's names.
- Hugging Face `DINOv3ViTModel` (Meta's `facebook/dinov3-vit*-pretrain-*`: `embeddings.{cls_token,register_tokens,
  patch_embeddings}`, `layer.i.` or transformers v5's `model.layer.i.` with `attention.{q,k,v,o}_proj`,
  `layer_scale{1,2}.lambda1`, `mlp.{up,down}_proj`): q/k/v weights fused; no key bias, so the q and v biases
  become timm BEiT's `attn.q_bias` / `attn.v_bias`; the mask token (masked-image pre-training) is dropped and
  RoPE stores nothing.
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


_DINOV3 = [(r"embeddings\.cls_token$", "cls_token"), (r"embeddings\.register_tokens$", "reg_token"),
           (r"embeddings\.patch_embeddings\.(weight|bias)$", r"patch_embed.proj.\1"),
           (r"norm\.(weight|bias)$", r"norm.\1"),
           (r"layer\.(\d+)\.(norm[12])\.(weight|bias)$", r"blocks.\1.\2.\3"),
           (r"layer\.(\d+)\.attention\.o_proj\.(weight|bias)$", r"blocks.\1.attn.proj.\2"),
           (r"layer\.(\d+)\.layer_scale([12])\.lambda1$", r"blocks.\1.ls\2.gamma"),
           (r"layer\.(\d+)\.mlp\.up_proj\.(weight|bias)$", r"blocks.\1.mlp.fc1.\2"),
           (r"layer\.(\d+)\.mlp\.down_proj\.(weight|bias)$", r"blocks.\1.mlp.fc2.\2")]
_DINOV3_QKV = re.compile(r"layer\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)$")


def is_hf_dinov3(state):
    return "embeddings.patch_embeddings.weight" in state and any(k.startswith(("layer.", "model.layer.")) for k in state)


def from_hf_dinov3(state, source):
    """A Hugging Face DINOv3ViTModel state dict -> transeg names (see the module's docstring)."""
    out, qkv, unmapped = {}, {}, []
    for key, value in state.items():
        key = key.removeprefix("model.")
        if key == "embeddings.mask_token":
            continue
        if m := _DINOV3_QKV.match(key):
            i, part, leaf = m.groups()
            qkv.setdefault((i, leaf), {})[part] = value
            continue
        for pattern, target in _DINOV3:
            if re.match(pattern, key):
                out[re.sub(pattern, target, key)] = value
                break
        else:
            unmapped.append(key)
    if unmapped:
        gated = any(re.search(r"mlp\.gate_proj", k) for k in unmapped)
        what = "a SwiGLU feed-forward (DINOv3 ViT-7B), which transeg's ViT does not build" if gated else "unexpected keys"
        raise TransegError(f"{source}: {what}: {', '.join(sorted(unmapped)[:6])}" + (" ..." if len(unmapped) > 6 else ""))
    for (i, leaf), parts in sorted(qkv.items()):
        if leaf == "bias" and set(parts) == {"q", "v"}:
            out[f"blocks.{i}.attn.q_bias"], out[f"blocks.{i}.attn.v_bias"] = parts["q"], parts["v"]
        elif set(parts) == {"q", "k", "v"}:
            out[f"blocks.{i}.attn.qkv.{leaf}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
        else:
            raise TransegError(f"{source}: layer {i}'s attention has {leaf}s for {sorted(parts)} only")
    return out


# mmseg 0.24's ViT -> timm's names (the q | k | v row order of in_proj is timm's qkv's)
_MMSEG = [(r"^patch_embed\.projection\.", "patch_embed.proj."), (r"^layers\.(\d+)\.", r"blocks.\1."),
             (r"\.ln1\.", ".norm1."), (r"\.ln2\.", ".norm2."), (r"\.attn\.attn\.in_proj_weight$", ".attn.qkv.weight"),
             (r"\.attn\.attn\.in_proj_bias$", ".attn.qkv.bias"), (r"\.attn\.attn\.out_proj\.", ".attn.proj."),
             (r"\.ffn\.layers\.0\.0\.", ".mlp.fc1."), (r"\.ffn\.layers\.1\.", ".mlp.fc2.")]


def rename_mmseg(key):
    """A key of mmseg 0.24's ViT (SegViT's checkpoints and ImageNet files) in timm's layout."""
    for pattern, new in _MMSEG:
        key = re.sub(pattern, new, key)
    return key


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


def resample_patch_embed(weight, size):
    """Patch-embedding kernels [D, C, p, p] -> [D, C, size, size] by FlexiViT's PI-resize (Beyer et al. 2023),
    as timm does when a checkpoint meets another patch size (DINOv2's 14 -> EoMT's 16): the kernel w' for
    which <resize(x), w'> = <x, w> for every patch x, i.e. w' = pinv(R^T) w with R the resize of each pixel
    basis vector (bicubic, antialiased, as timm's default)."""
    old = weight.shape[-1]
    basis = torch.eye(old * old, dtype=torch.float64).reshape(-1, 1, old, old)
    resize = torch.nn.functional.interpolate(basis, size=(size, size), mode="bicubic", antialias=True,
                                             align_corners=False).reshape(old * old, size * size)  # rows: R^T
    pinv = torch.linalg.pinv(resize)  # [size², old²]
    flat = weight.double().reshape(-1, old * old)
    return (flat @ pinv.T).reshape(*weight.shape[:2], size, size).to(weight.dtype)


def fit_to(backbone, state, source):
    """Resize `pos_embed` to the backbone's grid (square source grid), resample the patch embedding to
    the backbone's patch size, and keep/drop the ImageNet heads as the backbone has them."""
    from ..backbones.vit import resize_pos_embed

    kernel = state.get("patch_embed.proj.weight")
    if kernel is not None and kernel.shape[-1] != backbone.patch_size and kernel.shape[-1] == kernel.shape[-2]:
        state["patch_embed.proj.weight"] = resample_patch_embed(kernel, backbone.patch_size)

    pe = state.get("pos_embed")
    if pe is not None and pe.shape != backbone.pos_embed.shape:
        extra = backbone.num_extra if backbone.class_pos_embed else 0  # DINOv2: patches only
        tokens = pe.shape[1] - extra
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise TransegError(f"{source}: position embeddings for {tokens} patches are not a square grid")
        state["pos_embed"] = resize_pos_embed(pe, (side, side), backbone.grid, extra, backbone.pos_interp)
    if getattr(backbone, "num_queries", 0):  # EoMT: queries and masked-attention state are not in encoder weights
        own = backbone.state_dict()
        for key in ("queries.weight", "attn_mask_probs", "mask_annealing_iter"):
            state.setdefault(key, own[key].detach().clone())
    for head in ("head", "head_dist"):
        mine, theirs = getattr(backbone, head), state.get(f"{head}.weight")
        if mine is None or theirs is None or theirs.shape != mine.weight.shape:
            state = {k: v for k, v in state.items() if not k.startswith(head + ".")}
            if mine is not None:  # no classifier in the file, or one for another label set: keep the model's own
                state.update({f"{head}.{n}": p.detach().clone() for n, p in mine.named_parameters()})
    return state
