"""Segmenter (Strudel et al., "Segmenter: Transformer for Semantic Segmentation", ICCV 2021): the plain ViT
(`backbones.vit`) with a linear or mask-transformer decoder (`head.py`). Reads the authors' files (`convert.py`)."""
from ... import zoo
from ...backbones import VisionTransformer
from ...data.transforms import VIT_MEAN, VIT_STD
from ...errors import TransegError
from ...registry import Family, Format, Paper, Variant, register, register_family, register_format
from ...segmentor import Segmentor
from ...zoo import Release
from . import convert
from .head import LinearDecoder, MaskTransformer

register_family(Family("segmenter", "Segmenter", "Strudel et al., ICCV 2021",
                       counting="params with the ImageNet head its checkpoints carry, as its README counts; "
                                "GFLOPs by mmcv's counter (not reported by the authors)",
                       tiny=lambda a: dict(embed_dim=32, depth=1, num_heads=1, crop=64, decoder_depth=1)))
register_format(Format("segmenter", convert.DESCRIPTION, convert.convert))


# Normalisation, from the authors' segm/data/utils.py (STATS) as their mmseg pipeline applies it: ViT weights
# were trained on [-1, 1] inputs (mean = std = 127.5); DeiT uses the ImageNet statistics, which that pipeline
# scales to 0-255 and rounds to 2 decimals.
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


# --- Segmenter: the authors' server, checkpoint.pth + variant.yml (which names the dataset of the test)
_INRIA = "https://www.rocq.inria.fr/cluster-willow/rstrudel/segmenter/checkpoints"
for _variant, _dataset, _folder, _crop, _miou, _ms in (
        ("segmenter-vit-t16-mask", "ade20k", "ade20k/seg_tiny_mask", 512, 38.1, 38.8),
        ("segmenter-vit-s16-mask", "ade20k", "ade20k/seg_small_mask", 512, 45.3, 46.9),
        ("segmenter-vit-b16-mask", "ade20k", "ade20k/seg_base_mask", 512, 48.5, 50.0),
        ("segmenter-vit-b8-linear", "ade20k", "ade20k/seg_base_patch8", 512, 49.5, 50.5),
        ("segmenter-vit-l16-mask", "ade20k", "ade20k/seg_large_mask_640", 640, 51.8, 53.6),
        ("segmenter-deit-b16-linear", "ade20k", "ade20k/seg_base_deit_linear", 512, 47.1, 48.1),
        ("segmenter-deit-b16-mask", "ade20k", "ade20k/seg_base_deit_mask", 512, 48.7, 50.1),
        ("segmenter-vit-l16-mask", "pascal_context", "pascal_context/seg_large_mask", 480, 58.1, 59.0),
        ("segmenter-vit-l16-mask", "cityscapes", "cityscapes/seg_large_mask", 768, 79.1, 81.3)):
    zoo.add(Release(f"{_variant}-{_dataset.replace('_', '-')}", _variant, "segmenter", _dataset, f"{_crop}x{_crop}", "url",
                 f"{_INRIA}/{_folder}/checkpoint.pth", (f"{_INRIA}/{_folder}/variant.yml",), miou=_miou, miou_ms=_ms,
                 licence="MIT", source="rstrudel/segmenter README"))
# ImageNet weights Segmenter starts from (timm 0.4.12's AugReg .npz and DeiT files)
_AUGREG = "https://storage.googleapis.com/vit_models/augreg"
for _name, _variant, _file in (
        ("vit-t16", "segmenter-vit-t16-mask", "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0"),
        ("vit-s16", "segmenter-vit-s16-mask", "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0"),
        ("vit-b16", "segmenter-vit-b16-mask", "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0"),
        ("vit-l16", "segmenter-vit-l16-mask", "L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1")):
    _lr = "0.03" if _name in ("vit-t16", "vit-s16") else "0.01"
    zoo.add(Release(f"{_name}-augreg-imagenet", _variant, "backbone", "imagenet", "384x384", "url",
                 f"{_AUGREG}/{_file}--imagenet2012-steps_20k-lr_{_lr}-res_384.npz", licence="Apache-2.0", backbone=True,
                 source="timm 0.4.12 default_cfgs (what Segmenter's factory loads)"))
zoo.add(Release("deit-b16-distilled-imagenet", "segmenter-deit-b16-mask", "backbone", "imagenet", "384x384", "url",
             "https://dl.fbaipublicfiles.com/deit/deit_base_distilled_patch16_384-d0272ac0.pth", sha256="d0272ac0",
             licence="Apache-2.0",
             backbone=True, source="facebookresearch/deit"))
