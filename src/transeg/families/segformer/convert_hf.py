"""Hugging Face SegFormer (`save_pretrained` directory or a single weights file) -> transeg.

HF renames every module (transformers' `modeling_segformer.py`); both the Hub names (what
`save_pretrained` writes) and the transformers>=5 in-memory names are mapped back to the authors'
names, and HF's separate key/value projections are fused into the authors' single `kv` Linear
(rows [0,C) = K, [C,2C) = V).
Note: HF builds its block LayerNorms with eps 1e-5 where the authors used 1e-6; transeg keeps the
authors' value, so converted HF models differ from HF by ~1e-5 in the logits.
"""
import re
from pathlib import Path

import torch

from ...checkpoint import load_foreign
from ...convert.hf_config import class_names, read_config
from ...errors import TransegError
from ...registry import create_model, get_variant
from .convert import infer_segformer_variant

DESCRIPTION = "a Hugging Face SegformerForSemanticSegmentation save_pretrained directory (or its weights file)"

_BLOCK = r"segformer\.encoder\.block\.(\d+)\.(\d+)\."
# transformers>=5 in-memory names -> the Hub names, so one set of rules below serves both
_V5_NAMES = [
    (r"segformer\.stages\.(\d+)\.blocks\.(\d+)\.", r"segformer.encoder.block.\1.\2."),
    (r"segformer\.stages\.(\d+)\.patch_embeddings\.", r"segformer.encoder.patch_embeddings.\1."),
    (r"segformer\.stages\.(\d+)\.layer_norm\.", r"segformer.encoder.layer_norm.\1."),
]
# (pattern on the HF key after the block prefix, official suffix)
_BLOCK_RULES = [
    (r"(?:layer_norm_1|layernorm_before)\.", "norm1."),
    (r"(?:layer_norm_2|layernorm_after)\.", "norm2."),
    (r"attention\.(?:self\.query|q_proj)\.", "attn.q."),
    (r"attention\.(?:self\.key|k_proj)\.", "attn.k."),      # fused into attn.kv below
    (r"attention\.(?:self\.value|v_proj)\.", "attn.v."),
    (r"attention\.(?:self\.sr|sequence_reduction\.sequence_reduction)\.", "attn.sr."),
    (r"attention\.(?:self\.layer_norm|sequence_reduction\.layer_norm)\.", "attn.norm."),
    (r"attention\.(?:output\.dense|o_proj)\.", "attn.proj."),
    (r"mlp\.(?:dense1|fc1)\.", "mlp.fc1."),
    (r"mlp\.dwconv\.dwconv\.", "mlp.dwconv.dwconv."),
    (r"mlp\.(?:dense2|fc2)\.", "mlp.fc2."),
]
_OTHER_RULES = [
    (r"segformer\.encoder\.patch_embeddings\.(\d+)\.proj\.", "backbone.patch_embed{}.proj."),
    (r"segformer\.encoder\.patch_embeddings\.(\d+)\.layer_norm\.", "backbone.patch_embed{}.norm."),
    (r"segformer\.encoder\.layer_norm\.(\d+)\.", "backbone.norm{}."),
    (r"decode_head\.(?:linear_c|linear_projections)\.(\d+)\.proj\.", "decode_head.linear_c{}.proj."),
]
_HEAD_RULES = [
    ("decode_head.linear_fuse.", "decode_head.linear_fuse.conv."),
    ("decode_head.batch_norm.", "decode_head.linear_fuse.bn."),
    ("decode_head.classifier.", "decode_head.linear_pred."),
]


def hf_to_official(hf_state, source):
    out, unmapped = {}, []
    for key, value in hf_state.items():
        new = _map_key(key)
        if new is None:
            unmapped.append(key)
        else:
            out[new] = value
    if unmapped:
        more = f" (+{len(unmapped) - 5} more)" if len(unmapped) > 5 else ""
        raise TransegError(f"{source}: {len(unmapped)} keys with no SegFormer mapping: {', '.join(unmapped[:5])}{more}")
    for key in [k for k in out if ".attn.k." in k]:
        v_key = key.replace(".attn.k.", ".attn.v.")
        if v_key not in out:
            raise TransegError(f"{source}: has a key projection without its value projection ({key})")
        out[key.replace(".attn.k.", ".attn.kv.")] = torch.cat([out.pop(key), out.pop(v_key)], dim=0)
    return out


def _map_key(key):
    for pattern, hub in _V5_NAMES:
        key = re.sub("^" + pattern, hub, key)
    m = re.match(_BLOCK, key)
    if m:
        stage, block = int(m.group(1)) + 1, m.group(2)
        rest = key[m.end():]
        for pattern, official in _BLOCK_RULES:
            r = re.match(pattern, rest)
            if r:
                return f"backbone.block{stage}.{block}.{official}{rest[r.end():]}"
        return None
    for pattern, official in _OTHER_RULES:
        r = re.match(pattern, key)
        if r:
            return official.format(int(r.group(1)) + 1) + key[r.end():]
    for prefix, official in _HEAD_RULES:
        if key.startswith(prefix):
            return official + key[len(prefix):]
    return None


def read_hf(path):
    """(state dict, config dict or None) from a save_pretrained directory or a weights file. The config is
    read (and checked: `convert.hf_config`) before the weights."""
    path = Path(path)
    config = None
    if path.is_dir():
        if (path / "config.json").is_file():
            config = read_config(path / "config.json")
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                return load_foreign(path / name), config
        raise TransegError(f"{path}: no model.safetensors or pytorch_model.bin in this directory")
    return load_foreign(path), config


def convert(path, source, model=None):
    """path: the save_pretrained directory or weights file (read here, not by `torch.load`)."""
    hf_state, config = read_hf(path)
    state = hf_to_official(hf_state, source)
    variant, num_classes = infer_segformer_variant(state, source)
    classes = class_names(config, num_classes, Path(path) / "config.json") if config else None
    return dict(variant=model or variant, num_classes=num_classes, state=state, classes=classes, palette=None)


def is_hf_mit(state):
    """Hugging Face's MiT encoder (nvidia/mit-b*: SegformerModel / SegformerForImageClassification)."""
    return any(k.startswith(("segformer.encoder.", "segformer.stages.")) for k in state)


def mit_from_hf(state, source):
    """HF's MiT encoder -> the backbone's names (what `backbone_weights` loads)."""
    return {k.removeprefix("backbone."): v for k, v in
            hf_to_official({k: v for k, v in state.items() if k.startswith("segformer.")}, source).items()}


def hf_peer(name="segformer-b0", num_classes=150, seed=0):
    """(transeg model, Hugging Face SegformerForSemanticSegmentation) with the same random weights, both
    in eval mode, for timing against HF in one process. HF's block and stage LayerNorms get the authors'
    eps 1e-6 (HF builds all with 1e-5) so the two compute the same function and the logits compare.
    Needs `transformers` (pip install transformers); any MiT variant, B0..B5."""
    try:
        import transformers
    except ImportError:
        raise TransegError("comparing with Hugging Face needs the transformers package: pip install transformers") from None
    args = get_variant(name).kwargs
    config = transformers.SegformerConfig(
        num_labels=num_classes, hidden_sizes=list(args["embed_dims"]), depths=list(args["depths"]),
        decoder_hidden_size=args["decoder_dim"], num_attention_heads=list(args.get("num_heads", (1, 2, 5, 8))),
        sr_ratios=list(args.get("sr_ratios", (8, 4, 2, 1))), mlp_ratios=list(args.get("mlp_ratios", (4, 4, 4, 4))))
    torch.manual_seed(seed)
    hf = transformers.SegformerForSemanticSegmentation(config)
    ours = create_model(name, num_classes=num_classes)
    ours.load_state_dict(hf_to_official(hf.state_dict(), "transformers"))
    for key, module in hf.named_modules():  # the authors': 1e-5 in patch embeddings and K/V reduction, else 1e-6
        if isinstance(module, torch.nn.LayerNorm):
            reduction = any(k in key for k in ("patch_embeddings", "sequence_reduction", ".self.layer_norm"))
            module.eps = 1e-5 if reduction else 1e-6
    return ours.eval(), hf.eval()
