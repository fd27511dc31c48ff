"""EDAFormer (Yu et al., "Embedding-Free Transformer with Inference Spatial Reduction for Efficient
Semantic Segmentation", ECCV 2024): the embedding-free encoder EFT (`encoder.py`) and the all-attention
decoder (`head.py`); ISR (`transeg.isr`) applies to both. Reads the authors' files (`convert.py`)."""
from ... import zoo
from ...registry import Family, Format, Paper, Variant, register, register_family, register_format
from ...segmentor import Segmentor
from ...zoo import Release
from . import convert
from .encoder import EmbeddingFreeTransformer
from .head import EDAFormerHead

register_family(Family("edaformer", "EDAFormer", "Yu et al., ECCV 2024",
                       counting="params without the authors' unused conv_seg layer; reported GFLOPs: the authors' "
                                "get_flops.py run on their code (mmcv's counter)",
                       tiny=lambda a: dict(embed_dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), mlp_ratio=2, decoder_dim=16,
                                           decoder_mlp_ratio=1)))
register_format(Format("edaformer", convert.DESCRIPTION, convert.convert))


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


# --- EDAFormer: one Google Drive folder (file names not listed anywhere a program can read: given by hand)
_EDA = "https://drive.google.com/drive/u/0/folders/1hiAFQcfH9qd37WOc1_HMB0vKzbY-IWrO"
for _size in ("t", "b"):
    for _dataset, _crop in (("ade20k", 512), ("cityscapes", 1024), ("coco_stuff164k", 512)):
        zoo.add(Release(f"edaformer-{_size}-{_dataset.replace('_', '-')}", f"edaformer-{_size}", "edaformer", _dataset,
                     f"{_crop}x{_crop}", "manual", _EDA, licence="Apache-2.0",
                     source="hyunwoo137/EDAFormer README (weights folder) and local_configs"))
