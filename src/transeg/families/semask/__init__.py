"""SeMask (Jain et al., "SeMask: Semantically Masked Transformers for Semantic Segmentation", ICCV-W 2023): Swin
with semantic layers (`encoder.py`) and an FPN head with the semantic decoder (`fpn_head.py`), or Mask2Former's head
(`mask2former_head.py`). Reads the authors' files (`convert.py`)."""
from ... import zoo
from ...registry import Family, Format, Paper, Variant, register, register_family, register_format
from ...segmentor import Segmentor
from ...zoo import Release
from . import convert
from .encoder import SeMaskSwinTransformer, global_stages_mask2former
from .fpn_head import SeMaskFPNHead
from .mask2former_head import SeMaskMask2FormerHead

register_family(Family("semask", "SeMask", "Jain et al., ICCV-W 2023",
                       counting="params of the authors' modules; GFLOPs by mmcv's counter (not reported by the authors)",
                       tiny=lambda a: dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2), window_size=4,
                                           **(dict(channels=16) if "channels" in a else
                                              dict(hidden_dim=32, enc_layers=1, enc_ffn_dim=32, dec_layers=3,
                                                   dec_ffn_dim=32, num_queries=4, num_points=64)))))
register_format(Format("semask", convert.DESCRIPTION, convert.convert))


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


# --- SeMask: one Google Drive file per checkpoint (a program cannot download from Drive: given by hand)
_DRIVE = "https://drive.google.com/file/d/{}/view"
for _variant, _dataset, _id, _crop, _miou, _ms in (
        ("semask-swin-t-fpn", "ade20k", "1L0daUHWQGNGCXHF-cKWEauPSyBV0GLOR", 512, 42.06, 43.36),
        ("semask-swin-s-fpn", "ade20k", "1QhDG4SyGFtWL5kP9BbBoyPqTuFu7fH_y", 512, 45.92, 47.63),
        ("semask-swin-b-fpn", "ade20k", "1PXCEhrrUy5TJC4dUp7YDQvaapnMzGT6C", 512, 49.35, 50.98),
        ("semask-swin-l-fpn", "ade20k", "1u5flfAQCiQJbMZbZPIlGUGTYBz9Ca7rE", 640, 51.89, 53.52),
        ("semask-swin-l-mask2former", "ade20k", "1hN1I4Wv7_1FCPOsfA-5PELn6Xn3b_R8a", 640, 56.41, 57.52),
        ("semask-swin-t-fpn", "cityscapes", "1_JBOJQSUVes-CWs075XyPnuNfG5psELr", 768, 74.92, 76.56),
        ("semask-swin-s-fpn", "cityscapes", "1WyT207dZmdwETBUR6aeiqOVfQdUIV_fN", 768, 77.13, 79.14),
        ("semask-swin-b-fpn", "cityscapes", "1-LzVB6XzD7IR0zzE5qmE0EM4ZTv429b4", 768, 77.70, 79.73),
        ("semask-swin-l-fpn", "cityscapes", "1R9DDCmucQ_a_6ZkMGufEZCzJ-_qVMqCB", 768, 78.53, 80.39),
        ("semask-swin-l-mask2former", "cityscapes", "14fZQWQuBUu2qlpy3wyQ42xs6gQNg2DZX", "512x1024", 83.97, 84.98),
        ("semask-swin-t-fpn", "coco_stuff10k", "1qhXsJ8H64JPI_DW7CNzhxpHSEG2sKaIl", 512, 37.53, 38.88),
        ("semask-swin-s-fpn", "coco_stuff10k", "1ddXSMQu5ClkbLNMyQdyT0ATaOr86vIkL", 512, 40.72, 42.27),
        ("semask-swin-b-fpn", "coco_stuff10k", "1pGWI7U9bZJoe4ZaDx7ktWELx-uVN7rL0", 512, 44.63, 46.30),
        ("semask-swin-l-fpn", "coco_stuff10k", "1F6B9x9pX-SYEth7hdtxeNUeQ3XncOH7G", 640, 47.47, 48.54)):
    zoo.add(Release(f"{_variant}-{_dataset.replace('_', '-')}", _variant, "semask", _dataset,
                 _crop if isinstance(_crop, str) else f"{_crop}x{_crop}", "manual", _DRIVE.format(_id), miou=_miou,
                 miou_ms=_ms, licence="Apache-2.0" + (" (Mask2Former parts CC BY-NC 4.0)" if "mask2former" in _variant
                                                      else ""), source="Picsart-AI-Research/SeMask-Segmentation README"))
_SWIN = "https://github.com/SwinTransformer/storage/releases/download/v1.0.0"
for _size, _variant, _file in (("t", "semask-swin-t-fpn", "swin_tiny_patch4_window7_224.pth"),
                               ("s", "semask-swin-s-fpn", "swin_small_patch4_window7_224.pth"),
                               ("b", "semask-swin-b-fpn", "swin_base_patch4_window12_384_22k.pth"),
                               ("l", "semask-swin-l-fpn", "swin_large_patch4_window12_384_22k.pth")):
    zoo.add(Release(f"swin-{_size}-{'imagenet22k' if '22k' in _file else 'imagenet'}", _variant, "backbone", "imagenet",
                 "384x384" if "384" in _file else "224x224", "url", f"{_SWIN}/{_file}", licence="MIT", backbone=True,
                 source="microsoft/Swin-Transformer releases (SeMask's READMEs)"))
