"""SegFormer (Xie et al., "SegFormer: Simple and Efficient Design for Semantic Segmentation with
Transformers", NeurIPS 2021): the MiT encoder (`backbones.mit`) and the All-MLP decoder (`head.py`).
Reads the authors' NVlabs/SegFormer files (`convert.py`) and Hugging Face's (`convert_hf.py`)."""
from ... import zoo
from ...backbones import MixVisionTransformer
from ...convert import register_backbone_layout
from ...protocol import Protocol
from ...registry import Family, Format, Paper, Variant, register, register_family, register_format
from ...segmentor import Segmentor
from ...zoo import HUB_WEIGHTS, Release
from . import convert, convert_hf
from .head import SegFormerHead

register_family(Family("segformer", "SegFormer", "Xie et al., NeurIPS 2021",
                       counting="params without the authors' unused conv_seg layer; GFLOPs by mmcv's counter",
                       hf_peer=convert_hf.hf_peer,
                       tiny=lambda a: dict(embed_dims=(8, 16, 24, 32), num_heads=(1, 1, 1, 1), depths=(1, 1, 1, 1),
                                           decoder_dim=16)))
register_format(Format("segformer", convert.DESCRIPTION, convert.convert))
register_format(Format("segformer-hf", convert_hf.DESCRIPTION, convert_hf.convert, reads_path=True,
                       hub_model_types=("segformer",)))
register_backbone_layout(convert_hf.is_hf_mit, convert_hf.mit_from_hf)  # nvidia/mit-b* as backbone_weights


# The authors' test protocols where the converter cannot tell them (Hub SegFormer files carry none)
ADE_512 = Protocol(scale=(2048, 512))  # keep-ratio resize into (2048, 512), whole image, aligned to 32
ADE_640 = Protocol(scale=(2048, 640))
CITYSCAPES_SLIDE = Protocol(mode="slide", crop=(1024, 1024), stride=(768, 768), scale=(2048, 1024))


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


# --- SegFormer: NVIDIA's own copies on the Hub (the authors' OneDrive/Drive folders hold the same weights)
_NVIDIA = "NVIDIA Source Code License (non-commercial)"
for _b, _ade_crop, _ade, _city, _ade_mb, _city_mb in (
        ("b0", 512, 37.4, 76.2, 15, 15), ("b1", 512, 42.2, 78.5, None, 54.8), ("b2", 512, 46.5, 81.0, 110, 110),
        ("b3", 512, 49.4, 81.7, 190, 189), ("b4", 512, 50.3, 82.3, 257, 256), ("b5", 640, 51.0, 82.4, 339, 339)):
    zoo.add(Release(f"segformer-{_b}-ade20k", f"segformer-{_b}", "segformer-hf", "ade20k", f"{_ade_crop}x{_ade_crop}", "hub",
                 f"nvidia/segformer-{_b}-finetuned-ade-{_ade_crop}-{_ade_crop}", HUB_WEIGHTS, miou=_ade,
                 size_mb=_ade_mb, licence=_NVIDIA, protocol=ADE_640 if _ade_crop == 640 else ADE_512,
                 source="SegFormer paper Table 1; huggingface.co/nvidia"),
         Release(f"segformer-{_b}-cityscapes", f"segformer-{_b}", "segformer-hf", "cityscapes", "1024x1024", "hub",
                 f"nvidia/segformer-{_b}-finetuned-cityscapes-1024-1024", HUB_WEIGHTS, miou=_city, size_mb=_city_mb,
                 licence=_NVIDIA, protocol=CITYSCAPES_SLIDE, source="SegFormer paper Table 1; huggingface.co/nvidia"),
         Release(f"mit-{_b}-imagenet", f"segformer-{_b}", "backbone", "imagenet", "224x224", "hub", f"nvidia/mit-{_b}",
                 HUB_WEIGHTS, size_mb=14.4 if _b == "b0" else None, licence=_NVIDIA, backbone=True,
                 source="huggingface.co/nvidia (ImageNet-1k MiT encoders)"))
# B0 at the smaller Cityscapes crops (the authors' B0 configs: whole image at (1024, 512) / (1280, 640); 768 windows)
for _crop, _repo, _miou, _protocol in (
        ("512x1024", "512-1024", 71.9, Protocol(scale=(1024, 512))),
        ("640x1280", "640-1280", 73.7, Protocol(scale=(1280, 640))),
        ("768x768", "768-768", 75.3, Protocol(mode="slide", crop=(768, 768), stride=(768, 768), scale=(1536, 768)))):
    zoo.add(Release(f"segformer-b0-cityscapes-{_crop}", "segformer-b0", "segformer-hf", "cityscapes", _crop, "hub",
                 f"nvidia/segformer-b0-finetuned-cityscapes-{_repo}", HUB_WEIGHTS, miou=_miou, size_mb=15,
                 licence=_NVIDIA, protocol=_protocol, source="SegFormer paper Table 5; huggingface.co/nvidia"))
