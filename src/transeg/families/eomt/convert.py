"""EoMT checkpoints -> transeg: the authors' files (tue-mps/eomt, Lightning state dicts whose keys start
with `network.`: timm's ViT under `network.encoder.backbone`, `network.q`, `network.class_head`,
`network.mask_head.{0,2,4}`, `network.upscale.i`, `network.attn_mask_probs`) and Hugging Face's
`EomtForUniversalSegmentation` (a save_pretrained directory or its weights file: `embeddings.*`,
`layers.i.attention.{q,k,v,out}_proj`, `layers.i.layer_scale{1,2}.lambda1`, `query`, `upscale_block.block.i`,
`mask_head.fc{1,2,3}`, `class_predictor`).

Hugging Face's names are first mapped to the authors' (q/k/v fused into timm's `qkv`, rows q | k | v),
then the authors' to transeg's: the encoder is transeg's `VisionTransformer` with timm's names, so the
ViT keys only lose their prefix; the queries and the masked-attention probabilities are the backbone's
(`backbone.queries`, `backbone.attn_mask_probs`), the mask module the head's.

Hugging Face's `EomtDinov3ForUniversalSegmentation` (model_type `eomt_dinov3`) is read too: its encoder is
transformers' DINOv3ViTModel under other names (`layers.i`, `layernorm`), so it is renamed to those and read by
`convert/vit.from_hf_dinov3` (no position embeddings: RoPE, computed; q/v biases without a key bias, which
become timm BEiT's `attn.q_bias` / `attn.v_bias`), as Meta's DINOv3 weights and the authors' DINOv3 files are.
Its config gives what the weights do not show: rope_theta, the LayerNorm eps and the crop (`image_size`).

The authors' own DINOv3 EoMT files (`pytorch_model.bin` beside HF's weights, the model zoo's links) keep
DINOv3's licence by holding, for the encoder, only the change from Meta's (gated) DINOv3 weights: their
`delta_weights` mode adds the two when it loads. Their encoder is transformers' DINOv3ViTModel renamed
(`network.encoder.backbone.patch_embed.*` for `embeddings.*`, `blocks.i.*` for `layer.i.*`), everything
outside it is whole. `base=` (the CLI's `--base`) names the DINOv3 weights (a `facebook/dinov3-vitl16-
pretrain-lvd1689m` folder or its model.safetensors); both encoders are renamed to transeg's and added.
Without it the converter says what to fetch in one line.

The variant is found from shapes: width, depth, patch size, and the training crop (the position
embeddings' grid times the patch; DINOv3: the config's image size), and RoPE or not.
"""
import math
import re
from pathlib import Path

import torch

from ...checkpoint import load_foreign
from ...convert import read_backbone_state, vit
from ...convert.hf_config import class_names, read_config
from ...convert.mmseg import match_variant
from ...errors import TransegError
from ...protocol import Protocol
from ...registry import get_variant

DESCRIPTION = ("EoMT: the authors' checkpoint (tue-mps/eomt, DINOv2) or a Hugging Face EomtForUniversalSegmentation "
               "/ EomtDinov3ForUniversalSegmentation save_pretrained directory / weights file")

_HF_RULES = [  # (HF key pattern, the authors' key), applied in order; \1 etc. from the pattern
    (r"embeddings\.cls_token$", "network.encoder.backbone.cls_token"),
    (r"embeddings\.register_tokens$", "network.encoder.backbone.reg_token"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)$", r"network.encoder.backbone.patch_embed.proj.\1"),
    (r"layers\.(\d+)\.(norm1|norm2)\.(weight|bias)$", r"network.encoder.backbone.blocks.\1.\2.\3"),
    (r"layers\.(\d+)\.attention\.out_proj\.(weight|bias)$", r"network.encoder.backbone.blocks.\1.attn.proj.\2"),
    (r"layers\.(\d+)\.layer_scale([12])\.lambda1$", r"network.encoder.backbone.blocks.\1.ls\2.gamma"),
    (r"layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$", r"network.encoder.backbone.blocks.\1.mlp.\2.\3"),
    (r"layernorm\.(weight|bias)$", r"network.encoder.backbone.norm.\1"),
    (r"query\.weight$", "network.q.weight"),
    (r"upscale_block\.block\.(\d+)\.(conv1|conv2)\.(weight|bias)$", r"network.upscale.\1.\2.\3"),
    (r"upscale_block\.block\.(\d+)\.layernorm2d\.(weight|bias)$", r"network.upscale.\1.norm.\2"),
    (r"mask_head\.fc([123])\.(weight|bias)$", None),  # fc1/2/3 -> Sequential indices 0/2/4, below
    (r"class_predictor\.(weight|bias)$", r"network.class_head.\1"),
    (r"attn_mask_probs$", "network.attn_mask_probs"),
]
_HF_QKV = re.compile(r"layers\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)$")
_DROPPED = re.compile(r"(criterion\.empty_weight|embeddings\.position_ids|network\.encoder\.pixel_(mean|std))$")


def hf_to_authors(state, source):
    """Hugging Face EomtForUniversalSegmentation names -> the authors' (`network.` prefix)."""
    out, qkv, unmapped = {}, {}, []
    for key, value in state.items():
        if _DROPPED.search(key):
            continue
        if m := _HF_QKV.match(key):
            i, part, leaf = m.groups()
            qkv.setdefault(f"network.encoder.backbone.blocks.{i}.attn.qkv.{leaf}", {})[part] = value
            continue
        if key == "embeddings.position_embeddings.weight":
            out["network.encoder.backbone.pos_embed"] = value[None]
            continue
        if m := re.match(r"mask_head\.fc([123])\.(weight|bias)$", key):
            out[f"network.mask_head.{2 * (int(m.group(1)) - 1)}.{m.group(2)}"] = value
            continue
        for pattern, target in _HF_RULES:
            if target is not None and re.match(pattern, key):
                out[re.sub(pattern, target, key)] = value
                break
        else:
            unmapped.append(key)
    if unmapped:
        gated = [k for k in unmapped if re.search(r"mlp\.(weights_in|weights_out)", k)]
        what = "a SwiGLU feed-forward (ViT-g), which transeg's EoMT does not build" if gated else "unexpected keys"
        raise TransegError(f"{source}: {what}: {', '.join(sorted(unmapped)[:6])}" + (" ..." if len(unmapped) > 6 else ""))
    for key, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise TransegError(f"{source}: {key.rsplit('.', 2)[0]} lacks {sorted({'q', 'k', 'v'} - set(parts))} projections")
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def authors_to_transeg(state, source):
    """The authors' names -> transeg's Segmentor names (the ViT keys keep timm's names)."""
    out, unmapped = {}, []
    for key, value in state.items():
        if _DROPPED.search(key):
            continue
        if key.startswith("network.encoder.backbone."):
            out["backbone." + key.removeprefix("network.encoder.backbone.")] = value
        elif key == "network.q.weight":
            out["backbone.queries.weight"] = value
        elif key == "network.attn_mask_probs":
            out["backbone.attn_mask_probs"] = value
        elif key.startswith(("network.class_head.", "network.mask_head.", "network.upscale.")):
            out["decode_head." + key.removeprefix("network.")] = value
        else:
            unmapped.append(key)
    if unmapped:
        raise TransegError(f"{source}: unexpected keys for EoMT: {', '.join(sorted(unmapped)[:6])}"
                           + (" ..." if len(unmapped) > 6 else ""))
    out["backbone.mask_annealing_iter"] = torch.zeros((), dtype=torch.long)  # fine-tuning restarts the schedule
    return out


def shapes(state, source):
    """Constructor arguments read off a transeg-named EoMT state: embed_dim, depth, patch_size, crop (None
    without position embeddings: DINOv3), num_queries, query_blocks, num_register_tokens, key_bias, and the
    class count."""
    try:
        proj = state["backbone.patch_embed.proj.weight"]
        classes = state["decode_head.class_head.weight"].shape[0] - 1
        queries = state["backbone.queries.weight"].shape[0]
        blocks = state["backbone.attn_mask_probs"].shape[0]
    except KeyError as e:
        raise TransegError(f"{source}: not an EoMT checkpoint (no {e.args[0]})") from None
    patch, crop = proj.shape[-1], None
    if (pos := state.get("backbone.pos_embed")) is not None:
        side = math.isqrt(pos.shape[1])
        if side * side != pos.shape[1]:
            raise TransegError(f"{source}: position embeddings for {pos.shape[1]} patches are not a square grid")
        crop = side * patch
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"backbone\.blocks\.(\d+)\.", k)))
    reg = state["backbone.reg_token"].shape[1] if "backbone.reg_token" in state else 0
    return dict(embed_dim=proj.shape[0], depth=depth, patch_size=patch, crop=crop, num_queries=queries,
                query_blocks=blocks, num_register_tokens=reg,
                key_bias="backbone.blocks.0.attn.q_bias" not in state), classes


def semantic_protocol(crop):
    """The authors' semantic test: the image resized (keep ratio) so its short side is the crop, then
    crop-sized windows along the long side, scores averaged where they overlap, resized back. Their
    windows are spread evenly; mmseg's grid (stride = crop, the last window shifted to the border) places
    them identically for up to two windows (every Cityscapes image, ADE20K images up to 2:1)."""
    return Protocol(mode="slide", crop=(crop, crop), stride=(crop, crop), scale=(64 * crop, crop), size_divisor=None)


def _read(src):
    """(state, config) from a file or a save_pretrained directory (config.json beside the weights)."""
    src = Path(src)
    config = {}
    if src.is_dir():
        files = [src / n for n in ("model.safetensors", "pytorch_model.bin") if (src / n).is_file()]
        if not files:
            raise TransegError(f"{src}: a directory without model.safetensors or pytorch_model.bin")
        if (src / "config.json").is_file():
            config = read_config(src / "config.json")
        src = files[0]
    obj = load_foreign(src)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise TransegError(f"{src}: expected a dict of tensors (an EoMT state dict)")
    return obj, config


_ENCODER = "network.encoder.backbone."
# DINOv3 encoders -> transformers' DINOv3ViTModel names, which convert/vit.from_hf_dinov3 reads: HF's eomt_dinov3
# (`layers.i`, `layernorm`) and the authors' (their models/vit.py renames `embeddings` patch_embed, `layer` blocks)
_HF_DINOV3 = [(r"embeddings\.", "embeddings."), (r"layers\.", "layer."), (r"layernorm\.", "norm.")]
_AUTHORS_DINOV3 = [(_ENCODER + r"patch_embed\.", "embeddings."), (_ENCODER + r"blocks\.", "layer."),
                   (_ENCODER + r"norm\.", "norm."), (_ENCODER + r"rope_embeddings\.", None)]


def split_dinov3(state, rules, source):
    """(the DINOv3 encoder in transeg's ViT names, everything else as it was)."""
    encoder, rest = {}, {}
    for key, value in state.items():
        rule = next(((p, t) for p, t in rules if re.match(p, key)), None)
        if rule is None:
            rest[key] = value
        elif rule[1] is not None:  # None: computed, not stored (RoPE periods)
            encoder[re.sub(rule[0], rule[1], key, count=1)] = value
    return vit.from_hf_dinov3(encoder, source), rest


def add_dinov3_base(delta, source, base):
    """The authors' DINOv3 encoder deltas (transeg names) + Meta's DINOv3 weights (`base`)."""
    if base is None:
        raise TransegError(f"{source}: the authors' DINOv3 EoMT file holds deltas to Meta's DINOv3 weights: download "
                           "facebook/dinov3-vitl16-pretrain-lvd1689m (gated: accept its licence on the Hub) and add them: "
                           f"`transeg convert {source} OUT.safetensors --from eomt --base FOLDER`, or convert the "
                           "Hugging Face repo (model_type eomt_dinov3) instead")
    base = Path(base)
    if not base.exists():
        raise TransegError(f"--base {base}: no such file or directory (Meta's DINOv3 weights)")
    weights = read_backbone_state(base)
    if "blocks.0.attn.q_bias" not in weights:  # read_backbone_state gave transeg names; DINOv3 alone has q_bias
        raise TransegError(f"--base {base}: not DINOv3 weights (a Hugging Face DINOv3ViTModel)")
    missing = sorted(set(delta) - set(weights))
    if missing:
        raise TransegError(f"--base {base}: lacks {', '.join(missing[:4])}" + (" ..." if len(missing) > 4 else "")
                           + f" that {source} changes (another DINOv3 model?)")
    for key, value in delta.items():
        if weights[key].shape != value.shape:
            raise TransegError(f"--base {base}: {key} is {tuple(weights[key].shape)}, {source}'s delta "
                               f"{tuple(value.shape)}: DINOv3 of another size")
    return {k: weights[k].to(v.dtype) + v for k, v in delta.items()}


def _base_config(base):
    """config.json beside Meta's DINOv3 weights (heads, RoPE theta, LayerNorm eps), if there is one."""
    base = Path(base)
    path = base / "config.json" if base.is_dir() else base.with_name("config.json")
    config = read_config(path, name=f"--base {base}: its {path.name}") if path.is_file() else {}
    return {"model_type": "eomt_dinov3", **{k: config[k] for k in ("num_attention_heads", "layer_norm_eps", "rope_theta")
                                             if k in config}}


def convert(obj, source, model=None, base=None):
    state, config = _read(obj) if isinstance(obj, (str, Path)) else (obj, {})
    names_from = Path(obj) / "config.json" if config else None  # the HF folder's class names, not --base's
    state = {k.removeprefix("eomt."): v for k, v in state.items()}
    authors_dinov3 = _ENCODER + "patch_embed.patch_embeddings.weight" in state
    if base is not None and not authors_dinov3:
        raise TransegError(f"--base {base}: only the authors' DINOv3 EoMT files take base weights; {source} is whole")
    if authors_dinov3:  # their file: encoder deltas to Meta's weights, the rest whole
        encoder, state = split_dinov3(state, _AUTHORS_DINOV3, source)
        encoder, config = add_dinov3_base(encoder, source, base), _base_config(base)
    elif "embeddings.patch_embeddings.weight" in state:  # HF's eomt_dinov3
        encoder, state = split_dinov3(state, _HF_DINOV3, source)
        state = hf_to_authors(state, source)
    elif not any(k.startswith("network.") for k in state):  # HF's eomt (DINOv2)
        state, encoder = hf_to_authors(state, source), {}
    else:
        encoder = {}
    state = authors_to_transeg({**state, **{_ENCODER + k: v for k, v in encoder.items()}}, source)
    found, num_classes = shapes(state, source)
    model_type = config.get("model_type", "eomt_dinov3" if found["crop"] is None else "eomt")
    if model_type not in ("eomt", "eomt_dinov3"):
        raise TransegError(f"{source}: a {model_type} model, not EoMT")
    if found["crop"] is None:  # no position embeddings: DINOv3's RoPE
        if model_type != "eomt_dinov3":
            raise TransegError(f"{source}: an {model_type} model without position embeddings")
        found["rope_theta"] = float((config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta", 100.0)))
        size = config.get("image_size")
        found["crop"] = (size if isinstance(size, int) else size[0]) if size else None
    elif model_type != "eomt":
        raise TransegError(f"{source}: an {model_type} model with position embeddings")
    if found["crop"] is None:
        del found["crop"]
    if config.get("num_attention_heads"):
        found["num_heads"] = config["num_attention_heads"]
    if config.get("layer_norm_eps"):
        found["norm_eps"] = config["layer_norm_eps"]
    if model is None:
        wanted = {k: found[k] for k in ("embed_dim", "depth", "patch_size", "crop") if k in found}
        model = match_variant("eomt", source, hint=" (an eomt-* name)", rope_theta=found.get("rope_theta"), **wanted)
    arguments = get_variant(model).arguments()
    found.setdefault("crop", arguments["crop"])
    overrides = {k: v for k, v in found.items() if k in arguments and arguments[k] != v}
    if "query_blocks" in overrides:  # the variant's annealing schedule is per block of its own count
        overrides["mask_annealing"] = None
    classes = class_names(config, num_classes, names_from) if names_from else None
    return dict(variant=model, num_classes=num_classes, state=state, classes=classes, palette=None,
                overrides=overrides, test=semantic_protocol(found["crop"]))
