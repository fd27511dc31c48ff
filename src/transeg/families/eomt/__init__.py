"""EoMT (Kerssies et al., "Your ViT is Secretly an Image Segmentation Model", CVPR 2025): a DINOv2 / DINOv3 ViT
whose last blocks also carry the queries, with masked attention annealed away in training, and the mask
module (`head.py`). Reads the authors' and Hugging Face's files (`convert.py`)."""
from ... import zoo
from ...registry import Family, Format, Paper, Variant, register, register_family, register_format
from ...segmentor import Segmentor
from ...zoo import HUB_WEIGHTS, Release
from . import convert
from .encoder import EoMTEncoder
from .head import EoMTHead

register_family(Family("eomt", "EoMT", "Kerssies et al., CVPR 2025",
                       counting="params equal Hugging Face's EomtForUniversalSegmentation (the authors' modules); "
                                "GFLOPs by fvcore's counter per crop-sized forward (the paper's per-image figure "
                                "sums its test windows)",
                       tiny=lambda a: dict(embed_dim=32, depth=2, num_heads=2, crop=32, num_queries=4, query_blocks=1,
                                           mask_annealing=None, num_points=64)))
register_format(Format("eomt", convert.DESCRIPTION, convert.convert, reads_path=True,
                       hub_model_types=("eomt", "eomt_dinov3"),
                       base="Meta's DINOv3 weights (a facebook/dinov3-vitl16-pretrain-lvd1689m folder or its "
                            "model.safetensors), which the authors' DINOv3 EoMT files are deltas to"))


def build_eomt(num_classes, embed_dim, depth, num_heads, patch_size=16, crop=512, num_queries=100, query_blocks=4,
               num_register_tokens=4, layer_scale_init=1e-5, norm_eps=1e-6, drop_path_rate=0.0, mask_annealing=None,
               num_points=12544, rope_theta=None, rope_box_jittering=None, key_bias=True):
    """EoMT: DINOv2's ViT (register tokens, LayerScale, position embeddings for the patches only, LN eps 1e-6)
    whose last `query_blocks` blocks also carry `num_queries` learned queries, and the mask module on them.
    crop: the training crop (the position-embedding grid; the authors' model runs at exactly this size and
    their semantic test windows it). mask_annealing: ((start per block), (end per block)[, power]) in
    training iterations, the authors' schedule; None keeps `attn_mask_probs` as they are.
    DINOv3's ViT: rope_theta (rotary position embeddings instead of absolute ones; the crop then only sets the
    test windows), rope_box_jittering ((shift, jitter, rescale) of the RoPE coordinates in training), key_bias=False."""
    head = EoMTHead(embed_dim, num_classes, patch_size, num_points=num_points)
    # the encoder asks the head for the masks of its masked attention (a typed reference, not a submodule)
    backbone = EoMTEncoder(head, num_queries=num_queries, query_blocks=query_blocks, mask_annealing=mask_annealing,
                           img_size=(crop, crop), patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                           num_heads=num_heads, drop_path_rate=drop_path_rate, norm_eps=norm_eps, num_classes=0,
                           pos_interp="bicubic", num_register_tokens=num_register_tokens, class_pos_embed=False,
                           layer_scale_init=layer_scale_init, rope_theta=rope_theta,
                           rope_box_jittering=rope_box_jittering, key_bias=key_bias)
    return Segmentor(backbone, head, num_classes)


def _eomt(name, *, crop, official_classes, official_params, mask_annealing, miou, backbone=None,
          reference="model_zoo/dinov2.md", **paper):
    """One EoMT row: the training crop (position-embedding grid), the class count of the dataset the authors
    released it for, their model's params at that count, the per-block annealing schedule of their config
    ((starts), (ends) in iterations), and the paper's facts."""
    register(Variant(
        name=f"eomt-{name}", family="eomt", build=build_eomt,
        kwargs=dict(embed_dim=1024, depth=24, num_heads=16, patch_size=16, crop=crop, mask_annealing=mask_annealing,
                    **(backbone or {})),
        paper=Paper(official_params=official_params, official_classes=official_classes,
                    gflops={f"{crop}x{crop}@{official_classes}": None}, gflops_convention="fvcore", miou=miou,
                    reference=f"Kerssies et al., EoMT, CVPR 2025 (tue-mps/eomt {reference})", **paper),
    ))


# DINOv2 ViT-L/16 with 4 registers (timm's vit_large_patch14_reg4_dinov2 re-patched to 16), 100 queries in the last
# 4 blocks: the authors' semantic configs (configs/dinov2/{ade20k,cityscapes}/semantic). official_params: Hugging
# Face's EomtForUniversalSegmentation at the same config (the authors' timm model has the same parameters), counted
# on the meta device; params_m: the paper's 316M for EoMT-L. mIoU: the model zoo's (single-scale, windowed test).
# GFLOPs: counted per crop-sized forward (fvcore convention: 394.8 at 512x512). The paper's ADE20K table gives 721 per
# image, which is its windowed test over the validation images (about 1.8 windows of 394.8 each), not one forward,
# so it is not listed here. Annealing: per block, iterations from the config (ADE20K 31 epochs x 1263 iterations,
# Cityscapes 107 x 185).
_eomt("dinov2-l16", crop=512, official_classes=150, official_params=316_020_887, params_m=316,
      mask_annealing=((6520, 13040, 19560, 26080), (13040, 19560, 26080, 32600)), miou={"ade20k": 58.4})
_eomt("dinov2-l16-cityscapes", crop=1024, official_classes=19, official_params=319_032_340,
      mask_annealing=((3317, 6634, 9951, 13268), (6634, 9951, 13268, 16585)), miou={"cityscapes": 84.2})
# DINOv3 ViT-L/16 (4 registers, LayerScale, RoPE theta 100 instead of position embeddings, q/v biases without a key
# bias), 100 queries in the last 4 blocks: the authors' ADE20K semantic release (Hub tue-mps/ade_semantic_eomt_large_512
# _dinov3, model_type eomt_dinov3). official_params: HF's EomtDinov3ForUniversalSegmentation at 512, 100 queries,
# 150 classes, on meta: 314,947,735 = the DINOv2 model's 316,020,887 less its 1024 x 1024 position embeddings and
# 24 x 1024 key biases. mIoU 59.5: the model zoo's. Annealing: configs/dinov3/ade20k/semantic/eomt_large_512.yaml
# (16 epochs x 1263 iterations; the first block from iteration 0). LayerNorm eps 1e-5: the authors' encoder is
# transformers' DINOv3ViTModel built from Meta's config (DINOv3's 1e-5, not DINOv2's 1e-6); a converted HF file
# takes its config's. Box jittering: DINOv3's rescale 2 (HF's default), no shift or jitter.
_eomt("dinov3-l16", crop=512, official_classes=150, official_params=314_947_735,
      mask_annealing=((0, 6520, 9780, 13040), (3000, 9780, 13040, 16300)), miou={"ade20k": 59.5},
      backbone=dict(rope_theta=100.0, rope_box_jittering=(None, None, 2.0), key_bias=False, norm_eps=1e-5),
      reference="model_zoo/dinov3.md")


# --- EoMT: the authors' releases on the Hub (transformers' layout beside their own pytorch_model.bin)
zoo.add(Release("eomt-dinov2-l16-ade20k", "eomt-dinov2-l16", "eomt", "ade20k", "512x512", "hub",
             "tue-mps/ade20k_semantic_eomt_large_512", HUB_WEIGHTS, miou=58.4, licence="MIT",
             source="tue-mps/eomt model_zoo/dinov2.md"),
     Release("eomt-dinov2-l16-cityscapes", "eomt-dinov2-l16-cityscapes", "eomt", "cityscapes", "1024x1024", "hub",
             "tue-mps/cityscapes_semantic_eomt_large_1024", HUB_WEIGHTS, miou=84.2, licence="MIT",
             source="tue-mps/eomt model_zoo/dinov2.md"),
     # DINOv3: transformers' eomt_dinov3 layout, complete weights (the pytorch_model.bin beside it, the authors' layout,
     # holds deltas to Meta's gated DINOv3 weights: `transeg convert --from eomt --base` reads it; the zoo needs neither)
     Release("eomt-dinov3-l16-ade20k", "eomt-dinov3-l16", "eomt", "ade20k", "512x512", "hub",
             "tue-mps/ade_semantic_eomt_large_512_dinov3", ("model.safetensors",), miou=59.5,
             licence="MIT (code); DINOv3 License (weights)", source="tue-mps/eomt model_zoo/dinov3.md"))
