"""The one variant table: name -> builder + constructor arguments + what the paper reports (`Paper`).

`create_model("segformer-b0", num_classes=19)` builds a ready Segmentor. Paper facts sit beside each
variant so tests and `transeg models` can show them next to measured numbers. Each family's rows are
written with keywords through a small helper (`_segformer("b0", embed_dims=..., params_m=...)`); the
set of families is what is registered here (`families()`).
"""
import difflib
import inspect
from dataclasses import dataclass, field
from typing import Callable

from .backbones import EmbeddingFreeTransformer, MixVisionTransformer, SeMaskSwinTransformer, VisionTransformer
from .data.transforms import IMAGENET_MEAN, IMAGENET_STD
from .errors import TransegError
from .backbones.semask import global_stages_mask2former
from .heads import (ATMHead, EDAFormerHead, EoMTHead, LinearDecoder, MaskTransformer, SegFormerHead, SeMaskFPNHead,
                    SeMaskMask2FormerHead, TPNATMHead)
from .segmentor import Segmentor


@dataclass(frozen=True)
class Paper:
    """What the authors report for a variant, and what running their code counted."""
    params_m: float | None = None                # the paper's / README's params, in millions
    official_params: int | None = None           # the authors' model's exact count (150 classes unless official_classes)
    official_params_by_classes: dict[int, int] = field(default_factory=dict)  # {class count: exact count}
    official_classes: int | None = None          # the class count official_params was counted with, when not 150
    gflops: dict[str, float | None] = field(default_factory=dict)  # {"HxW@K": GFLOPs}: input size, class count
    gflops_convention: str = "mmcv"              # the counter the paper used (flops.count_gmacs: mmcv | fvcore)
    miou: dict[str, float] = field(default_factory=dict)     # {dataset: single-scale mIoU}
    miou_ms: dict[str, float] = field(default_factory=dict)  # {dataset: multi-scale + flip mIoU}
    reference: str = ""


@dataclass(frozen=True)
class Variant:
    name: str
    family: str
    build: Callable
    kwargs: dict
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    paper: Paper = field(default_factory=Paper)

    def arguments(self) -> dict:
        """The constructor arguments this variant builds with: its builder's defaults, then `kwargs`."""
        defaults = {k: p.default for k, p in inspect.signature(self.build).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        return {**defaults, **self.kwargs}


VARIANTS: dict[str, Variant] = {}


def register(variant: Variant):
    if variant.name in VARIANTS:
        raise ValueError(f"variant {variant.name} registered twice")
    VARIANTS[variant.name] = variant
    return variant


def list_models(family=None):
    return [n for n, v in VARIANTS.items() if family is None or v.family == family]


def families():
    """The registered model families, in registration order."""
    return list(dict.fromkeys(v.family for v in VARIANTS.values()))


def get_variant(name) -> Variant:
    if name not in VARIANTS:
        near = difflib.get_close_matches(name, list(VARIANTS), n=3)
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        raise TransegError(f"unknown model {name!r}{hint}; `transeg models` lists them")
    return VARIANTS[name]


def create_model(name, num_classes=150, classes=None, palette=None, **overrides) -> Segmentor:
    """Build a variant with fresh weights. `overrides` replace constructor arguments (e.g. drop_path_rate)."""
    variant = get_variant(name)
    if classes is not None and len(classes) != num_classes:
        raise TransegError(f"{len(classes)} class names given for a {num_classes}-class model")
    known = set(inspect.signature(variant.build).parameters) - {"num_classes"}
    unknown = set(overrides) - known
    if unknown:
        raise TransegError(f"{name}: unknown argument(s) {sorted(unknown)}; known: {sorted(known)}")
    kwargs = {**variant.kwargs, **overrides}
    model = variant.build(num_classes=num_classes, **kwargs)
    model.meta.update(variant=name, model_args={"num_classes": num_classes, **overrides},
                      classes=list(classes) if classes is not None else None,
                      palette=[list(c) for c in palette] if palette is not None else None,
                      mean=list(variant.mean), std=list(variant.std))
    return model


# --------------------------------------------------------------------------------------------- SegFormer
def build_segformer(num_classes, embed_dims, depths, decoder_dim, num_heads=(1, 2, 5, 8), sr_ratios=(8, 4, 2, 1),
                    mlp_ratios=(4, 4, 4, 4), drop_path_rate=0.1, dropout=0.1):
    backbone = MixVisionTransformer(embed_dims=embed_dims, num_heads=num_heads, mlp_ratios=mlp_ratios, depths=depths,
                                    sr_ratios=sr_ratios, drop_path_rate=drop_path_rate)
    head = SegFormerHead(backbone.out_channels, decoder_dim, num_classes, dropout=dropout)
    return Segmentor(backbone, head, num_classes)


def _segformer(size, *, embed_dims, depths, decoder_dim, **paper):
    """One SegFormer row: the MiT-`size` constructor arguments, then the paper's facts (`Paper` fields)."""
    register(Variant(
        name=f"segformer-{size}", family="segformer", build=build_segformer,
        kwargs=dict(embed_dims=embed_dims, depths=depths, decoder_dim=decoder_dim, drop_path_rate=0.1),
        paper=Paper(**paper, reference="Xie et al., SegFormer, NeurIPS 2021, Tables 1-2"),
    ))


# params_m, GFLOPs (ADE20K 512x512, B5 640x640) and single-scale mIoU: the paper's Tables 1-2.
# official_params: the authors' model with 150 classes including its unused 128->K conv_seg, counted by
# running their code (NVlabs/SegFormer). GFLOPs keys are "HxW@K", the input size and class count they were
# counted with: the paper's Cityscapes column is what the authors' tools/get_flops.py gives with a
# 150-class head (B0 at 1024x2048: 125.48 with 150 classes, 121.07 with Cityscapes' 19).
_MIT_WIDE = (64, 128, 320, 512)
_segformer("b0", embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2), decoder_dim=256,
           params_m=3.8, official_params=3_772_044, gflops={"512x512@150": 8.4, "1024x2048@150": 125.5},
           miou={"ade20k": 37.4, "cityscapes": 76.2})
_segformer("b1", embed_dims=_MIT_WIDE, depths=(2, 2, 2, 2), decoder_dim=256,
           params_m=13.7, official_params=13_735_148, gflops={"512x512@150": 15.9, "1024x2048@150": 243.7},
           miou={"ade20k": 42.2, "cityscapes": 78.5})
_segformer("b2", embed_dims=_MIT_WIDE, depths=(3, 4, 6, 3), decoder_dim=768,
           params_m=27.5, official_params=27_481_324, gflops={"512x512@150": 62.4, "1024x2048@150": 717.1},
           miou={"ade20k": 46.5, "cityscapes": 81.0})
_segformer("b3", embed_dims=_MIT_WIDE, depths=(3, 4, 18, 3), decoder_dim=768,
           params_m=47.3, official_params=47_357_164, gflops={"512x512@150": 79.0, "1024x2048@150": 962.9},
           miou={"ade20k": 49.4, "cityscapes": 81.7})
_segformer("b4", embed_dims=_MIT_WIDE, depths=(3, 8, 27, 3), decoder_dim=768,
           params_m=64.1, official_params=64_127_724, gflops={"512x512@150": 95.7, "1024x2048@150": 1240.6},
           miou={"ade20k": 50.3, "cityscapes": 82.3})
_segformer("b5", embed_dims=_MIT_WIDE, depths=(3, 6, 40, 3), decoder_dim=768,
           params_m=84.7, official_params=84_728_044, gflops={"640x640@150": 183.3, "1024x2048@150": 1460.4},
           miou={"ade20k": 51.0, "cityscapes": 82.4})


# --------------------------------------------------------------------------------------------- EDAFormer
def build_edaformer(num_classes, embed_dims, depths, mlp_ratio, decoder_dim, decoder_mlp_ratio, num_heads=(1, 2, 4, 8),
                    pooling_ratios=(8, 4, 2, 1), drop_path_rate=0.2, decoder_drop_path=0.1, dropout=0.1):
    backbone = EmbeddingFreeTransformer(embed_dims=embed_dims, num_heads=num_heads, mlp_ratios=(mlp_ratio,) * 4,
                                        depths=depths, pooling_ratios=pooling_ratios, drop_path_rate=drop_path_rate)
    head = EDAFormerHead(backbone.out_channels, decoder_dim, num_classes, mlp_ratio=decoder_mlp_ratio,
                         dropout=dropout, drop_path=decoder_drop_path)
    return Segmentor(backbone, head, num_classes)


def _edaformer(size, *, embed_dims, depths, mlp_ratio, decoder_dim, decoder_mlp_ratio, **paper):
    """One EDAFormer row: the EFT-`size` encoder and decoder arguments, then the paper's facts."""
    register(Variant(
        name=f"edaformer-{size}", family="edaformer", build=build_edaformer,
        kwargs=dict(embed_dims=embed_dims, depths=depths, mlp_ratio=mlp_ratio, decoder_dim=decoder_dim,
                    decoder_mlp_ratio=decoder_mlp_ratio),
        paper=Paper(**paper, reference="Yu et al., EDAFormer, ECCV 2024"),
    ))


# params_m: the paper (4.9M / 29.4M). official_params: the authors' model with 150 classes including its
# unused 128->K conv_seg, counted by running their code (hyunwoo137/EDAFormer). GFLOPs: the authors'
# tools/get_flops.py run on their model (1024x2048 with the Cityscapes config's 19 classes). The paper's
# per-dataset mIoU table was not available to verify, so no mIoU is listed.
_edaformer("t", embed_dims=(32, 64, 128, 256), depths=(2, 2, 10, 2), mlp_ratio=3.8, decoder_dim=128, decoder_mlp_ratio=2,
           params_m=4.9, official_params=4_949_264, gflops={"512x512@150": 5.62, "1024x2048@19": 151.54})
_edaformer("b", embed_dims=(64, 128, 256, 512), depths=(3, 3, 22, 3), mlp_ratio=4, decoder_dim=768, decoder_mlp_ratio=1,
           params_m=29.4, official_params=29_457_516, gflops={"512x512@150": 31.93, "1024x2048@19": 605.39})


# --------------------------------------------------------------------------------------------- Segmenter
# Normalisation, from the authors' segm/data/utils.py (STATS) as their mmseg pipeline applies it: ViT weights
# were trained on [-1, 1] inputs (mean = std = 127.5); DeiT uses the ImageNet statistics, which that pipeline
# scales to 0-255 and rounds to 2 decimals.
VIT_MEAN, VIT_STD = (127.5, 127.5, 127.5), (127.5, 127.5, 127.5)
DEIT_MEAN, DEIT_STD = (123.68, 116.28, 103.53), (58.4, 57.12, 57.38)


def build_segmenter(num_classes, patch_size, embed_dim, depth, num_heads, decoder, crop=512, distilled=False,
                    decoder_depth=2, drop_path_rate=0.1, decoder_drop=0.1, imagenet_classes=1000):
    """crop: the training crop, which fixes the stored position-embedding grid (crop / patch)."""
    backbone = VisionTransformer(img_size=(crop, crop), patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                                 num_heads=num_heads, distilled=distilled, drop_path_rate=drop_path_rate,
                                 num_classes=imagenet_classes)
    if decoder == "linear":
        head = LinearDecoder(embed_dim, num_classes, patch_size)
    elif decoder == "mask":
        head = MaskTransformer(embed_dim, num_classes, patch_size, depth=decoder_depth, drop=decoder_drop)
    else:
        raise TransegError(f"unknown Segmenter decoder {decoder!r}; use 'linear' or 'mask'")
    return Segmentor(backbone, head, num_classes)


_VIT = {"t": dict(embed_dim=192, depth=12, num_heads=3), "s": dict(embed_dim=384, depth=12, num_heads=6),
        "b": dict(embed_dim=768, depth=12, num_heads=12), "l": dict(embed_dim=1024, depth=24, num_heads=16)}


def _segmenter(name, *, size, patch_size, decoder, crop=512, **paper):
    """One Segmenter row: `name` starts with the backbone (vit: ViT on [-1, 1] inputs; deit: distilled DeiT on
    ImageNet statistics), then its `size` and patch, the decoder and the training crop; then the paper's facts.
    Neither the paper nor the README reports GFLOPs: `transeg models` counts them at the crop."""
    deit = name.startswith("deit")
    register(Variant(
        name=f"segmenter-{name}", family="segmenter", build=build_segmenter,
        kwargs=dict(patch_size=patch_size, **_VIT[size], decoder=decoder, crop=crop, distilled=deit),
        mean=DEIT_MEAN if deit else VIT_MEAN, std=DEIT_STD if deit else VIT_STD,
        paper=Paper(**paper, gflops={f"{crop}x{crop}@150": None},
                    reference="Strudel et al., Segmenter, ICCV 2021 (README of rstrudel/segmenter)"),
    ))


# official_params: the authors' model with 150 classes, counted by running their code (rstrudel/segmenter):
# all parameters including the unused ImageNet head(s), as their segm.model.utils.num_params counts them for
# the README. params_m: the README's (its 106M for B-Mask and DeiT-B-Mask is not what the released code
# builds). miou: ADE20K single-scale, the README's; the linear decoders' two-decimal figures are the
# paper's size / patch ablation.
_segmenter("vit-t16-mask", size="t", patch_size=16, decoder="mask",
           official_params=6_906_388, params_m=7, miou={"ade20k": 38.1})
_segmenter("vit-t16-linear", size="t", patch_size=16, decoder="linear", official_params=5_905_342)
_segmenter("vit-s16-mask", size="s", patch_size=16, decoder="mask",
           official_params=26_418_964, params_m=27, miou={"ade20k": 45.3})
_segmenter("vit-s16-linear", size="s", patch_size=16, decoder="linear",
           official_params=22_426_366, miou={"ade20k": 45.37})
_segmenter("vit-s32-linear", size="s", patch_size=32, decoder="linear", official_params=23_016_190)
_segmenter("vit-b16-mask", size="b", patch_size=16, decoder="mask",
           official_params=103_266_580, params_m=106, miou={"ade20k": 48.5})
_segmenter("vit-b16-linear", size="b", patch_size=16, decoder="linear",
           official_params=87_318_910, miou={"ade20k": 48.06})
_segmenter("vit-b32-linear", size="b", patch_size=32, decoder="linear",
           official_params=88_498_558, miou={"ade20k": 43.07})
_segmenter("vit-b8-linear", size="b", patch_size=8, decoder="linear",
           official_params=89_235_838, params_m=89, miou={"ade20k": 49.5})
_segmenter("vit-l16-linear", size="l", patch_size=16, decoder="linear",
           official_params=305_328_254, miou={"ade20k": 50.71})
_segmenter("vit-l16-mask", size="l", patch_size=16, decoder="mask", crop=640,
           official_params=334_259_476, params_m=334, miou={"ade20k": 51.8})
_segmenter("deit-t16-linear", size="t", patch_size=16, decoder="linear", official_params=6_098_726)
_segmenter("deit-t16-mask", size="t", patch_size=16, decoder="mask", official_params=7_099_772)
_segmenter("deit-s16-linear", size="s", patch_size=16, decoder="linear", official_params=22_812_134)
_segmenter("deit-b16-linear", size="b", patch_size=16, decoder="linear",
           official_params=88_089_446, params_m=87, miou={"ade20k": 47.1})
_segmenter("deit-b16-mask", size="b", patch_size=16, decoder="mask",
           official_params=104_037_116, params_m=106, miou={"ade20k": 48.7})


# --------------------------------------------------------------------------------------------- SegViT
def build_segvit(num_classes, embed_dim, depth, num_heads, out_indices, head_dim, head_heads, crop, shrunk=False,
                 shrink_index=8, drop_path_rate=0.1, head_layers=3, patch_size=16):
    """mmseg 0.24's ViT (class token dropped before the blocks, no final norm, LN eps 1e-6, bicubic
    position-embedding resize) + the ATM head; `shrunk`: QD at block `shrink_index` + the QU/TPN head.
    crop: the training crop (position-embedding grid and the head's fixed output size)."""
    backbone = VisionTransformer(img_size=(crop, crop), patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                                 num_heads=num_heads, drop_path_rate=drop_path_rate, norm_eps=1e-6, num_classes=0,
                                 pos_interp="bicubic", out_indices=out_indices, final_norm=False,
                                 cls_token_in_blocks=False, drop_path_attn=False,
                                 shrink_index=shrink_index if shrunk else None, logits_follow_padding=False)
    if shrunk:
        head = TPNATMHead(embed_dim, num_classes, crop, head_dim, head_heads, head_layers, patch_size)
    else:
        head = ATMHead(embed_dim, num_classes, crop, head_dim, head_heads, head_layers, use_stages=len(out_indices),
                       stride=patch_size)
    return Segmentor(backbone, head, num_classes)


_SEGVIT_B = dict(embed_dim=768, depth=12, num_heads=12, out_indices=(5, 7, 11), head_dim=384, head_heads=12,
                 drop_path_rate=0.1)
_SEGVIT_L = dict(embed_dim=1024, depth=24, num_heads=16, out_indices=(7, 15, 23), head_dim=512, head_heads=16,
                 drop_path_rate=0.3)


def _segvit(name, *, kwargs, official_classes, official_params, gflops_at_crop, miou):
    """One SegViT row: constructor arguments, the class count of the dataset the authors released it for, the
    params of their modules at that count, the README's GFLOPs at the training crop, and its mIoU."""
    crop = kwargs["crop"]
    register(Variant(
        name=f"segvit-{name}", family="segvit", build=build_segvit, kwargs=kwargs, mean=VIT_MEAN, std=VIT_STD,
        paper=Paper(official_params=official_params, official_classes=official_classes,
                    gflops={f"{crop}x{crop}@{official_classes}": gflops_at_crop}, gflops_convention="fvcore",
                    miou=miou, reference="Zhang et al., SegViT, NeurIPS 2022 (README of zbwxp/SegVit)"),
    ))


# official_params: the authors' modules, counted by running their code (zbwxp/SegVit; buffers excluded);
# neither the paper nor the README reports params. gflops_at_crop: the README's, fvcore MACs of mmseg's
# forward_dummy at each dataset's crop (running the authors' code reproduces every one to 0.1).
# miou: the README's single-scale mIoU.
_segvit("vit-b16", kwargs=dict(_SEGVIT_B, crop=512),
        official_classes=150, official_params=108_736_279, gflops_at_crop=120.9, miou={"ade20k": 51.3})
_segvit("vit-l16", kwargs=dict(_SEGVIT_L, crop=640),
        official_classes=150, official_params=344_305_303, gflops_at_crop=637.9, miou={"ade20k": 54.6})
_segvit("vit-l16-coco10k", kwargs=dict(_SEGVIT_L, crop=512),
        official_classes=171, official_params=343_737_004, gflops_at_crop=383.9, miou={"cocostuff10k": 49.9})
_segvit("vit-l16-pc", kwargs=dict(_SEGVIT_L, crop=480),
        official_classes=60, official_params=343_496_253, gflops_at_crop=321.6, miou={"pascal_context": 64.1})
_segvit("vit-l16-shrunk", kwargs=dict(_SEGVIT_L, crop=640, out_indices=(7, 23), shrunk=True),
        official_classes=150, official_params=344_598_679, gflops_at_crop=373.5, miou={"ade20k": 53.9})
_segvit("vit-l16-shrunk-coco10k", kwargs=dict(_SEGVIT_L, crop=512, out_indices=(7, 23), shrunk=True),
        official_classes=171, official_params=343_735_468, gflops_at_crop=224.8, miou={"cocostuff10k": 49.1})
_segvit("vit-l16-shrunk-pc", kwargs=dict(_SEGVIT_L, crop=480, out_indices=(7, 23), shrunk=True),
        official_classes=60, official_params=343_431_229, gflops_at_crop=186.9, miou={"pascal_context": 62.3})


# --------------------------------------------------------------------------------------------- SeMask
def build_semask_fpn(num_classes, embed_dim, depths, num_heads, window_size, drop_path_rate=0.3, channels=256,
                     dropout=0.1, global_stage_ids=None):
    """global_stage_ids: stages whose semantic attention is global (None: the authors' rule from the
    width and class count, see backbones.semask.global_stages)."""
    backbone = SeMaskSwinTransformer(num_classes, embed_dim, depths, num_heads, window_size, drop_path_rate,
                                     global_stage_ids=global_stage_ids)
    return Segmentor(backbone, SeMaskFPNHead(backbone.out_channels, num_classes, channels, dropout), num_classes)


def _semask_fpn(size, *, embed_dim, depths, num_heads, window_size, crop=512, official_params_by_classes, **paper):
    """One SeMask-FPN row: the Swin-`size` arguments and the training crop (where GFLOPs are counted), the
    authors' model's params per class count, then the paper's facts."""
    register(Variant(
        name=f"semask-swin-{size}-fpn", family="semask", build=build_semask_fpn,
        kwargs=dict(embed_dim=embed_dim, depths=depths, num_heads=num_heads, window_size=window_size),
        paper=Paper(**paper, official_params=official_params_by_classes[150],
                    official_params_by_classes=official_params_by_classes, gflops={f"{crop}x{crop}@150": None},
                    reference="Jain et al., SeMask (README of Picsart-AI-Research/SeMask-Segmentation)"),
    ))


# official_params_by_classes: the authors' model for ADE20K (150), Cityscapes (19) and COCO-Stuff-10k (171)
# classes, counted by running their code (Picsart-AI-Research/SeMask-Segmentation). params_m and the
# single-scale mIoU: the README's. The README reports no GFLOPs.
_semask_fpn("t", embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7,
            official_params_by_classes={150: 34_655_748, 19: 34_243_753, 171: 34_721_793}, params_m=35,
            miou={"ade20k": 42.06, "cityscapes": 74.92, "cocostuff10k": 37.53})
_semask_fpn("s", embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7,
            official_params_by_classes={150: 55_973_652, 19: 55_561_657, 171: 56_039_697}, params_m=56,
            miou={"ade20k": 45.92, "cityscapes": 77.13, "cocostuff10k": 40.72})
_semask_fpn("b", embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=12,
            official_params_by_classes={150: 96_485_826, 19: 95_948_071, 171: 96_572_031}, params_m=96,
            miou={"ade20k": 49.35, "cityscapes": 77.70, "cocostuff10k": 44.63})
_semask_fpn("l", embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12, crop=640,
            official_params_by_classes={150: 210_791_934, 19: 210_002_659, 171: 210_918_459}, params_m=211,
            miou={"ade20k": 51.89, "cityscapes": 78.53, "cocostuff10k": 47.47})


def build_semask_mask2former(num_classes, embed_dim, depths, num_heads, window_size, drop_path_rate=0.3,
                             sem_window_size=None, global_stage_ids=None, num_queries=100, hidden_dim=256,
                             enc_layers=6, enc_ffn_dim=1024, dec_layers=9, dec_ffn_dim=2048, num_points=12544):
    """SeMask Swin + Mask2Former (the authors' SeMask-Mask2Former). Their code picks two things the
    weights do not show: global semantic attention in stage 4 only with 150 classes
    (`global_stages_mask2former`), and the semantic window = the Swin window in the ADE20K config but
    detectron2's default 7 in the Cityscapes one (so: the Swin window for 150 classes, else 7).
    The image is zero-padded to a multiple of 32 after normalisation, as detectron2 does."""
    if global_stage_ids is None:
        global_stage_ids = global_stages_mask2former(num_classes)
    if sem_window_size is None:
        sem_window_size = window_size if num_classes == 150 else 7
    backbone = SeMaskSwinTransformer(num_classes, embed_dim, depths, num_heads, window_size, drop_path_rate,
                                     global_stage_ids=global_stage_ids, sem_window_size=sem_window_size,
                                     pad_multiple=32)
    head = SeMaskMask2FormerHead(backbone.out_channels, num_classes, conv_dim=hidden_dim, mask_dim=hidden_dim,
                                 enc_layers=enc_layers, enc_ffn_dim=enc_ffn_dim, num_queries=num_queries,
                                 dec_layers=dec_layers, dec_ffn_dim=dec_ffn_dim, num_points=num_points)
    return Segmentor(backbone, head, num_classes)


register(Variant(
    name="semask-swin-l-mask2former", family="semask", build=build_semask_mask2former,
    kwargs=dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12),
    paper=Paper(params_m=222, gflops={"640x640@150": None}, miou={"ade20k": 56.41, "cityscapes": 83.97},
                miou_ms={"ade20k": 57.52, "cityscapes": 84.98},
                reference="Jain et al., SeMask (README of Picsart-AI-Research/SeMask-Segmentation, SeMask-Mask2Former)"),
))


# --------------------------------------------------------------------------------------------- EoMT
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
    backbone = VisionTransformer(img_size=(crop, crop), patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                                 num_heads=num_heads, drop_path_rate=drop_path_rate, norm_eps=norm_eps, num_classes=0,
                                 pos_interp="bicubic", num_register_tokens=num_register_tokens, class_pos_embed=False,
                                 layer_scale_init=layer_scale_init, num_queries=num_queries, query_blocks=query_blocks,
                                 mask_annealing=mask_annealing, rope_theta=rope_theta,
                                 rope_box_jittering=rope_box_jittering, key_bias=key_bias)
    head = EoMTHead(embed_dim, num_classes, patch_size, num_points=num_points)
    backbone.mask_predictor = head.predict  # the masked attention asks the head for masks (a reference, not a submodule)
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
