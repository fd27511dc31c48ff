"""SegViT (Zhang et al., "SegViT: Semantic Segmentation with Plain Vision Transformers", NeurIPS 2022): mmseg's
plain ViT (`backbones.vit`) with the Attention-to-Mask decoder and its loss (`head.py`, `loss.py`); Shrunk with
query downsampling and upsampling. Reads the authors' files (`convert.py`)."""
from ... import zoo
from ...backbones import VisionTransformer
from ...data.transforms import VIT_MEAN, VIT_STD
from ...registry import Family, Format, Paper, Variant, register, register_family, register_format
from ...segmentor import Segmentor
from ...zoo import Release
from . import convert
from .head import ATMHead, TPNATMHead

register_family(Family("segvit", "SegViT", "Zhang et al., NeurIPS 2022",
                       counting="params of the authors' modules; GFLOPs by fvcore's counter, as its README",
                       tiny=lambda a: dict(embed_dim=32, depth=3, num_heads=1, head_dim=16, head_heads=1, crop=64,
                                           out_indices=(0, 2) if a["shrunk"] else (0, 1, 2), shrink_index=1)))
register_format(Format("segvit", convert.DESCRIPTION, convert.convert))


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


# --- SegViT: the authors' files on the Hub (they keep the optimizer state: ~3x the weights)
_ADELAIDET = "AdelaiDet licence (non-commercial)"
for _variant, _dataset, _file, _crop, _miou, _ms, _gb in (
        ("segvit-vit-b16", "ade20k", "ade_51.3.pth", 512, 51.3, 53.0, 1.31),
        ("segvit-vit-l16", "ade20k", "ade_54.6.pth", 640, 54.6, 55.2, 4.13),
        ("segvit-vit-l16-shrunk", "ade20k", "ade_shrunk_53.9.pth", 640, 53.9, 55.1, 4.14),
        ("segvit-vit-l16-coco10k", "coco_stuff10k", "COCOstuff_49.9.pth", 512, 49.9, 50.3, 4.13),
        ("segvit-vit-l16-shrunk-coco10k", "coco_stuff10k", "COCOstuff10k_shrunk_49.1.pth", 512, 49.1, 49.4, 4.13),
        ("segvit-vit-l16-pc", "pascal_context", "PC59cls_64.1.pth", 480, 64.1, 65.3, 4.12),
        ("segvit-vit-l16-shrunk-pc", "pascal_context", "PC59cls_62.3.pth", 480, 62.3, 63.7, 4.12)):
    _name = _variant.removesuffix("-coco10k").removesuffix("-pc")
    zoo.add(Release(f"{_name}-{_dataset.replace('_', '-')}", _variant, "segvit", _dataset, f"{_crop}x{_crop}", "hub",
                 "Akide/SegViTv1", (_file,), miou=_miou, miou_ms=_ms, size_mb=_gb * 1000, licence=_ADELAIDET,
                 source="zbwxp/SegVit README"))
_OPENMMLAB = "https://download.openmmlab.com/mmsegmentation/v0.5/pretrain/segmenter"
zoo.add(Release("vit-l16-augreg-mmseg-imagenet", "segvit-vit-l16", "backbone", "imagenet", "384x384", "url",
             f"{_OPENMMLAB}/vit_large_p16_384_20220308-d4efb41d.pth", sha256="d4efb41d", licence="Apache-2.0", backbone=True,
             source="zbwxp/SegVit configs (mmseg's converted AugReg ViT-L)"),
     Release("vit-b16-augreg-mmseg-imagenet", "segvit-vit-b16", "backbone", "imagenet", "384x384", "url",
             f"{_OPENMMLAB}/vit_base_p16_384_20220308-96dfe169.pth", sha256="96dfe169", licence="Apache-2.0", backbone=True,
             source="mmsegmentation segmenter configs"))
