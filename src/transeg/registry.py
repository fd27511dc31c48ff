"""The one variant table: name -> builder + constructor arguments + what the paper reports.

`create_model("segformer-b0", num_classes=19)` builds a ready Segmentor. Paper facts sit beside each
variant so tests and `transeg models` can show them next to measured numbers.
"""
import difflib
import inspect
from dataclasses import dataclass, field
from typing import Callable

from .backbones import EmbeddingFreeTransformer, MixVisionTransformer, SeMaskSwinTransformer, VisionTransformer
from .data.transforms import IMAGENET_MEAN, IMAGENET_STD
from .errors import TransegError
from .backbones.semask import global_stages_mask2former
from .heads import (ATMHead, EDAFormerHead, LinearDecoder, MaskTransformer, SegFormerHead, SeMaskFPNHead,
                    SeMaskMask2FormerHead, TPNATMHead)
from .segmentor import Segmentor


@dataclass(frozen=True)
class Variant:
    name: str
    family: str
    build: Callable
    kwargs: dict
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    # What the paper reports: params in millions ("params_m"), GFLOPs per input size and class count
    # ("gflops": {"512x512@150": 8.4}), mIoU per dataset ("miou": {"ade20k": 37.4}); plus
    # "official_params": the authors' model's exact count (150 classes) where the code was run.
    paper: dict = field(default_factory=dict)


VARIANTS: dict[str, Variant] = {}


def register(variant: Variant):
    if variant.name in VARIANTS:
        raise ValueError(f"variant {variant.name} registered twice")
    VARIANTS[variant.name] = variant
    return variant


def list_models(family=None):
    return [n for n, v in VARIANTS.items() if family is None or v.family == family]


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


_MIT_WIDE = (64, 128, 320, 512)
# Paper: SegFormer Table 1/2 (params, GFLOPs at ADE 512x512 except B5 at 640x640, mIoU single-scale).
# official_params: the authors' model with 150 classes including its unused 128->K conv_seg (digest §1).
# GFLOPs keys: "HxW@K" (input size and class count they were counted with; the paper's Cityscapes
# column used a 150-class head, digest §6).
_SEGFORMER = {
    "b0": dict(dims=(32, 64, 160, 256), depths=(2, 2, 2, 2), dec=256, params_m=3.8, official_params=3_772_044,
               gflops={"512x512@150": 8.4, "1024x2048@150": 125.5}, miou={"ade20k": 37.4, "cityscapes": 76.2}),
    "b1": dict(dims=_MIT_WIDE, depths=(2, 2, 2, 2), dec=256, params_m=13.7, official_params=13_735_148,
               gflops={"512x512@150": 15.9, "1024x2048@150": 243.7}, miou={"ade20k": 42.2, "cityscapes": 78.5}),
    "b2": dict(dims=_MIT_WIDE, depths=(3, 4, 6, 3), dec=768, params_m=27.5, official_params=27_481_324,
               gflops={"512x512@150": 62.4, "1024x2048@150": 717.1}, miou={"ade20k": 46.5, "cityscapes": 81.0}),
    "b3": dict(dims=_MIT_WIDE, depths=(3, 4, 18, 3), dec=768, params_m=47.3, official_params=47_357_164,
               gflops={"512x512@150": 79.0, "1024x2048@150": 962.9}, miou={"ade20k": 49.4, "cityscapes": 81.7}),
    "b4": dict(dims=_MIT_WIDE, depths=(3, 8, 27, 3), dec=768, params_m=64.1, official_params=64_127_724,
               gflops={"512x512@150": 95.7, "1024x2048@150": 1240.6}, miou={"ade20k": 50.3, "cityscapes": 82.3}),
    "b5": dict(dims=_MIT_WIDE, depths=(3, 6, 40, 3), dec=768, params_m=84.7, official_params=84_728_044,
               gflops={"640x640@150": 183.3, "1024x2048@150": 1460.4}, miou={"ade20k": 51.0, "cityscapes": 82.4}),
}
for _b, _f in _SEGFORMER.items():
    register(Variant(
        name=f"segformer-{_b}", family="segformer", build=build_segformer,
        kwargs=dict(embed_dims=_f["dims"], depths=_f["depths"], decoder_dim=_f["dec"], drop_path_rate=0.1),
        paper=dict(params_m=_f["params_m"], official_params=_f["official_params"], gflops=_f["gflops"], miou=_f["miou"],
                   reference="Xie et al., SegFormer, NeurIPS 2021, Tables 1-2"),
    ))


# --------------------------------------------------------------------------------------------- EDAFormer
def build_edaformer(num_classes, embed_dims, depths, mlp_ratio, decoder_dim, decoder_mlp_ratio, num_heads=(1, 2, 4, 8),
                    pooling_ratios=(8, 4, 2, 1), drop_path_rate=0.2, decoder_drop_path=0.1, dropout=0.1):
    backbone = EmbeddingFreeTransformer(embed_dims=embed_dims, num_heads=num_heads, mlp_ratios=(mlp_ratio,) * 4,
                                        depths=depths, pooling_ratios=pooling_ratios, drop_path_rate=drop_path_rate)
    head = EDAFormerHead(backbone.out_channels, decoder_dim, num_classes, mlp_ratio=decoder_mlp_ratio,
                         dropout=dropout, drop_path=decoder_drop_path)
    return Segmentor(backbone, head, num_classes)


# Paper: Yu et al., EDAFormer, ECCV 2024 (params 4.9M / 29.4M). official_params: the authors' model
# with 150 classes including its unused 128->K conv_seg, counted by running their code (digest §1).
# GFLOPs: the authors' tools/get_flops.py run on their model (digest §5-6; 1024x2048 with the
# Cityscapes config's 19 classes). The paper's per-dataset mIoU table was not available to verify,
# so no mIoU is listed.
_EDAFORMER = {
    "t": dict(dims=(32, 64, 128, 256), depths=(2, 2, 10, 2), mlp=3.8, dec=128, dec_mlp=2, params_m=4.9,
              official_params=4_949_264, gflops={"512x512@150": 5.62, "1024x2048@19": 151.54}),
    "b": dict(dims=(64, 128, 256, 512), depths=(3, 3, 22, 3), mlp=4, dec=768, dec_mlp=1, params_m=29.4,
              official_params=29_457_516, gflops={"512x512@150": 31.93, "1024x2048@19": 605.39}),
}
for _b, _f in _EDAFORMER.items():
    register(Variant(
        name=f"edaformer-{_b}", family="edaformer", build=build_edaformer,
        kwargs=dict(embed_dims=_f["dims"], depths=_f["depths"], mlp_ratio=_f["mlp"], decoder_dim=_f["dec"],
                    decoder_mlp_ratio=_f["dec_mlp"]),
        paper=dict(params_m=_f["params_m"], official_params=_f["official_params"], gflops=_f["gflops"], miou={},
                   reference="Yu et al., EDAFormer, ECCV 2024"),
    ))


# --------------------------------------------------------------------------------------------- Segmenter
# Normalisation (digest §5): ViT weights were trained on [-1, 1] inputs (mean = std = 127.5); DeiT uses
# the ImageNet statistics as the authors' mmseg pipeline rounds them (2 decimals in 0-255 units).
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


_VIT = {"t": (192, 12, 3), "s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16)}
# name -> (backbone, patch, decoder, crop, the authors' model's params with 150 classes incl. the ImageNet
# head(s) = the README convention (digest §9, counted by running their code), README params (M), ADE20K
# single-scale mIoU (README / paper)).
_SEGMENTER = {
    "vit-t16-mask": ("t", 16, "mask", 512, 6_906_388, 7, 38.1),
    "vit-t16-linear": ("t", 16, "linear", 512, 5_905_342, None, None),
    "vit-s16-mask": ("s", 16, "mask", 512, 26_418_964, 27, 45.3),
    "vit-s16-linear": ("s", 16, "linear", 512, 22_426_366, None, 45.37),
    "vit-s32-linear": ("s", 32, "linear", 512, 23_016_190, None, None),
    "vit-b16-mask": ("b", 16, "mask", 512, 103_266_580, 106, 48.5),
    "vit-b16-linear": ("b", 16, "linear", 512, 87_318_910, None, 48.06),
    "vit-b32-linear": ("b", 32, "linear", 512, 88_498_558, None, 43.07),
    "vit-b8-linear": ("b", 8, "linear", 512, 89_235_838, 89, 49.5),
    "vit-l16-linear": ("l", 16, "linear", 512, 305_328_254, None, 50.71),
    "vit-l16-mask": ("l", 16, "mask", 640, 334_259_476, 334, 51.8),
    "deit-t16-linear": ("t", 16, "linear", 512, 6_098_726, None, None),
    "deit-t16-mask": ("t", 16, "mask", 512, 7_099_772, None, None),
    "deit-s16-linear": ("s", 16, "linear", 512, 22_812_134, None, None),
    "deit-b16-linear": ("b", 16, "linear", 512, 88_089_446, 87, 47.1),
    "deit-b16-mask": ("b", 16, "mask", 512, 104_037_116, 106, 48.7),
}
for _n, (_b, _p, _dec, _crop, _official, _readme, _miou) in _SEGMENTER.items():
    _d, _depth, _heads = _VIT[_b]
    _deit = _n.startswith("deit")
    register(Variant(
        name=f"segmenter-{_n}", family="segmenter", build=build_segmenter,
        kwargs=dict(patch_size=_p, embed_dim=_d, depth=_depth, num_heads=_heads, decoder=_dec, crop=_crop,
                    distilled=_deit),
        mean=DEIT_MEAN if _deit else VIT_MEAN, std=DEIT_STD if _deit else VIT_STD,
        paper=dict(params_m=_readme, official_params=_official, gflops={f"{_crop}x{_crop}@150": None},
                   miou={"ade20k": _miou} if _miou else {},
                   reference="Strudel et al., Segmenter, ICCV 2021 (README of rstrudel/segmenter)"),
    ))


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
# name -> (kwargs, classes of the dataset, the authors' modules' params (digest §1, verified by running
# their code), README GFLOPs (fvcore MACs at the crop), README single-scale mIoU, dataset)
_SEGVIT = {
    "vit-b16": (dict(_SEGVIT_B, crop=512), 150, 108_736_279, 120.9, 51.3, "ade20k"),
    "vit-l16": (dict(_SEGVIT_L, crop=640), 150, 344_305_303, 637.9, 54.6, "ade20k"),
    "vit-l16-coco10k": (dict(_SEGVIT_L, crop=512), 171, 343_737_004, 383.9, 49.9, "cocostuff10k"),
    "vit-l16-pc": (dict(_SEGVIT_L, crop=480), 60, 343_496_253, 321.6, 64.1, "pascal_context"),
    "vit-l16-shrunk": (dict(_SEGVIT_L, crop=640, out_indices=(7, 23), shrunk=True), 150, 344_598_679, 373.5, 53.9,
                       "ade20k"),
    "vit-l16-shrunk-coco10k": (dict(_SEGVIT_L, crop=512, out_indices=(7, 23), shrunk=True), 171, 343_735_468, 224.8,
                               49.1, "cocostuff10k"),
    "vit-l16-shrunk-pc": (dict(_SEGVIT_L, crop=480, out_indices=(7, 23), shrunk=True), 60, 343_431_229, 186.9, 62.3,
                          "pascal_context"),
}
for _n, (_kw, _k, _official, _gflops, _miou, _data) in _SEGVIT.items():
    register(Variant(
        name=f"segvit-{_n}", family="segvit", build=build_segvit, kwargs=_kw, mean=VIT_MEAN, std=VIT_STD,
        paper=dict(official_params=_official, official_classes=_k, gflops={f"{_kw['crop']}x{_kw['crop']}@{_k}": _gflops},
                   gflops_convention="fvcore", miou={_data: _miou},
                   reference="Zhang et al., SegViT, NeurIPS 2022 (README of zbwxp/SegVit)"),
    ))


# --------------------------------------------------------------------------------------------- SeMask
def build_semask_fpn(num_classes, embed_dim, depths, num_heads, window_size, drop_path_rate=0.3, channels=256,
                     dropout=0.1, global_stage_ids=None):
    """global_stage_ids: stages whose semantic attention is global (None: the authors' rule from the
    width and class count, see backbones.semask.global_stages)."""
    backbone = SeMaskSwinTransformer(num_classes, embed_dim, depths, num_heads, window_size, drop_path_rate,
                                     global_stage_ids=global_stage_ids)
    return Segmentor(backbone, SeMaskFPNHead(backbone.out_channels, num_classes, channels, dropout), num_classes)


# name -> (embed, depths, heads, window, the authors' model's params for 150 / 19 / 171 classes (digest §8,
# counted by running their code), README params (M), ADE20K / Cityscapes / COCO-Stuff-10k single-scale mIoU)
_SEMASK = {
    "t": (96, (2, 2, 6, 2), (3, 6, 12, 24), 7, (34_655_748, 34_243_753, 34_721_793), 35, (42.06, 74.92, 37.53)),
    "s": (96, (2, 2, 18, 2), (3, 6, 12, 24), 7, (55_973_652, 55_561_657, 56_039_697), 56, (45.92, 77.13, 40.72)),
    "b": (128, (2, 2, 18, 2), (4, 8, 16, 32), 12, (96_485_826, 95_948_071, 96_572_031), 96, (49.35, 77.70, 44.63)),
    "l": (192, (2, 2, 18, 2), (6, 12, 24, 48), 12, (210_791_934, 210_002_659, 210_918_459), 211, (51.89, 78.53, 47.47)),
}
for _n, (_c, _d, _h, _w, _official, _readme, _miou) in _SEMASK.items():
    register(Variant(
        name=f"semask-swin-{_n}-fpn", family="semask", build=build_semask_fpn,
        kwargs=dict(embed_dim=_c, depths=_d, num_heads=_h, window_size=_w),
        paper=dict(params_m=_readme, official_params=_official[0], official_params_by_classes=dict(zip((150, 19, 171), _official)),
                   gflops={f"{640 if _n == 'l' else 512}x{640 if _n == 'l' else 512}@150": None},
                   miou=dict(zip(("ade20k", "cityscapes", "cocostuff10k"), _miou)),
                   reference="Jain et al., SeMask (README of Picsart-AI-Research/SeMask-Segmentation)"),
    ))


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
    paper=dict(params_m=222, gflops={"640x640@150": None}, miou=dict(ade20k=56.41, cityscapes=83.97),
               miou_ms=dict(ade20k=57.52, cityscapes=84.98),
               reference="Jain et al., SeMask (README of Picsart-AI-Research/SeMask-Segmentation, SeMask-Mask2Former)"),
))
