"""The zoo: every checkpoint the authors released, by name, fetched once and converted once.

    model = transeg.load("segformer-b0-ade20k")            # a zoo name
    model = transeg.load("nvidia/segformer-b5-finetuned-cityscapes-1024-1024")   # a Hub repo id
    path = transeg.zoo.fetch("segvit-vit-l-ade20k", file="~/Downloads/ade_vit_l.pth")   # given by hand

A `Release` row says where the file lives (a Hugging Face repo, a plain URL, or a host a program cannot
download from, such as Google Drive: `host="manual"`), which converter reads it, the model it becomes
and its test protocol, and how its bytes are checked: the Hub's own sha256 (LFS), the publisher's, or
the sha256 recorded on the first download and checked on every later one. `fetch` turns a name into a
transeg `.safetensors` in the cache (`hub.cache_dir()`); later loads read only that file, offline too.
ImageNet backbones (`backbone=True`) are kept as a `.safetensors` of their weights, the file that
`backbone_weights` (and `convert.load_backbone_weights`) take.
"""
import difflib
import re
from dataclasses import dataclass
from pathlib import Path

from . import hub
from .errors import TransegError
from .protocol import Protocol


@dataclass(frozen=True)
class Release:
    name: str                      # the zoo name: <variant>-<dataset>, e.g. segformer-b0-ade20k
    variant: str                   # the registry variant it converts to
    fmt: str                       # the `transeg convert --from` format that reads it
    dataset: str                   # ade20k | cityscapes | pascal_context | coco_stuff | imagenet
    crop: str                      # training crop, "512x512"
    host: str                      # "hub" | "url" | "manual"
    location: str                  # Hub repo id, the URL of the first file, or the page to download from
    files: tuple = ()              # hub: filenames tried in order; url: further files beside the first
    miou: float | None = None      # the authors' single-scale mIoU
    miou_ms: float | None = None   # multi-scale + flip, where they report it
    sha256: str | None = None      # the publisher's, for a plain URL, whole or the prefix in its file name
                                   # (torch.hub's convention: deit_..._384-d0272ac0.pth); Hub files carry the Hub's own
    size_mb: float | None = None   # download size in MB (1e6 bytes)
    licence: str = ""
    protocol: Protocol | None = None  # the authors' test protocol (None: the converter's)
    backbone: bool = False         # ImageNet weights for a backbone (what a fine-tune starts from)
    source: str = ""               # where these facts come from

    @property
    def checksum(self) -> str:
        """How the bytes are checked (the zoo table's column)."""
        if self.host == "hub":
            return "Hub (LFS sha256)"
        return "publisher" if self.sha256 else "recorded on first download"


# The authors' test protocols where the converter cannot tell them (Hub SegFormer files carry none)
ADE_512 = Protocol(scale=(2048, 512))  # keep-ratio resize into (2048, 512), whole image, aligned to 32
ADE_640 = Protocol(scale=(2048, 640))
CITYSCAPES_SLIDE = Protocol(mode="slide", crop=(1024, 1024), stride=(768, 768), scale=(2048, 1024))

RELEASES: dict[str, Release] = {}


def _add(*releases: Release):
    for release in releases:
        if release.name in RELEASES:
            raise ValueError(f"zoo name {release.name} listed twice")
        RELEASES[release.name] = release


_HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # on most nvidia/ repos only the .bin is on main

# --- SegFormer: NVIDIA's own copies on the Hub (the authors' OneDrive/Drive folders hold the same weights)
_NVIDIA = "NVIDIA Source Code License (non-commercial)"
for _b, _ade_crop, _ade, _city, _ade_mb, _city_mb in (
        ("b0", 512, 37.4, 76.2, 15, 15), ("b1", 512, 42.2, 78.5, None, 54.8), ("b2", 512, 46.5, 81.0, 110, 110),
        ("b3", 512, 49.4, 81.7, 190, 189), ("b4", 512, 50.3, 82.3, 257, 256), ("b5", 640, 51.0, 82.4, 339, 339)):
    _add(Release(f"segformer-{_b}-ade20k", f"segformer-{_b}", "segformer-hf", "ade20k", f"{_ade_crop}x{_ade_crop}", "hub",
                 f"nvidia/segformer-{_b}-finetuned-ade-{_ade_crop}-{_ade_crop}", _HUB_WEIGHTS, miou=_ade,
                 size_mb=_ade_mb, licence=_NVIDIA, protocol=ADE_640 if _ade_crop == 640 else ADE_512,
                 source="SegFormer paper Table 1; huggingface.co/nvidia"),
         Release(f"segformer-{_b}-cityscapes", f"segformer-{_b}", "segformer-hf", "cityscapes", "1024x1024", "hub",
                 f"nvidia/segformer-{_b}-finetuned-cityscapes-1024-1024", _HUB_WEIGHTS, miou=_city, size_mb=_city_mb,
                 licence=_NVIDIA, protocol=CITYSCAPES_SLIDE, source="SegFormer paper Table 1; huggingface.co/nvidia"),
         Release(f"mit-{_b}-imagenet", f"segformer-{_b}", "backbone", "imagenet", "224x224", "hub", f"nvidia/mit-{_b}",
                 _HUB_WEIGHTS, size_mb=14.4 if _b == "b0" else None, licence=_NVIDIA, backbone=True,
                 source="huggingface.co/nvidia (ImageNet-1k MiT encoders)"))
# B0 at the smaller Cityscapes crops (the authors' B0 configs: whole image at (1024, 512) / (1280, 640); 768 windows)
for _crop, _repo, _miou, _protocol in (
        ("512x1024", "512-1024", 71.9, Protocol(scale=(1024, 512))),
        ("640x1280", "640-1280", 73.7, Protocol(scale=(1280, 640))),
        ("768x768", "768-768", 75.3, Protocol(mode="slide", crop=(768, 768), stride=(768, 768), scale=(1536, 768)))):
    _add(Release(f"segformer-b0-cityscapes-{_crop}", "segformer-b0", "segformer-hf", "cityscapes", _crop, "hub",
                 f"nvidia/segformer-b0-finetuned-cityscapes-{_repo}", _HUB_WEIGHTS, miou=_miou, size_mb=15,
                 licence=_NVIDIA, protocol=_protocol, source="SegFormer paper Table 5; huggingface.co/nvidia"))

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
    _add(Release(f"{_variant}-{_dataset.replace('_', '-')}", _variant, "segmenter", _dataset, f"{_crop}x{_crop}", "url",
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
    _add(Release(f"{_name}-augreg-imagenet", _variant, "backbone", "imagenet", "384x384", "url",
                 f"{_AUGREG}/{_file}--imagenet2012-steps_20k-lr_{_lr}-res_384.npz", licence="Apache-2.0", backbone=True,
                 source="timm 0.4.12 default_cfgs (what Segmenter's factory loads)"))
_add(Release("deit-b16-distilled-imagenet", "segmenter-deit-b16-mask", "backbone", "imagenet", "384x384", "url",
             "https://dl.fbaipublicfiles.com/deit/deit_base_distilled_patch16_384-d0272ac0.pth", sha256="d0272ac0",
             licence="Apache-2.0",
             backbone=True, source="facebookresearch/deit"))

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
    _add(Release(f"{_name}-{_dataset.replace('_', '-')}", _variant, "segvit", _dataset, f"{_crop}x{_crop}", "hub",
                 "Akide/SegViTv1", (_file,), miou=_miou, miou_ms=_ms, size_mb=_gb * 1000, licence=_ADELAIDET,
                 source="zbwxp/SegVit README"))
_OPENMMLAB = "https://download.openmmlab.com/mmsegmentation/v0.5/pretrain/segmenter"
_add(Release("vit-l16-augreg-mmseg-imagenet", "segvit-vit-l16", "backbone", "imagenet", "384x384", "url",
             f"{_OPENMMLAB}/vit_large_p16_384_20220308-d4efb41d.pth", sha256="d4efb41d", licence="Apache-2.0", backbone=True,
             source="zbwxp/SegVit configs (mmseg's converted AugReg ViT-L)"),
     Release("vit-b16-augreg-mmseg-imagenet", "segvit-vit-b16", "backbone", "imagenet", "384x384", "url",
             f"{_OPENMMLAB}/vit_base_p16_384_20220308-96dfe169.pth", sha256="96dfe169", licence="Apache-2.0", backbone=True,
             source="mmsegmentation segmenter configs"))

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
    _add(Release(f"{_variant}-{_dataset.replace('_', '-')}", _variant, "semask", _dataset,
                 _crop if isinstance(_crop, str) else f"{_crop}x{_crop}", "manual", _DRIVE.format(_id), miou=_miou,
                 miou_ms=_ms, licence="Apache-2.0" + (" (Mask2Former parts CC BY-NC 4.0)" if "mask2former" in _variant
                                                      else ""), source="Picsart-AI-Research/SeMask-Segmentation README"))
_SWIN = "https://github.com/SwinTransformer/storage/releases/download/v1.0.0"
for _size, _variant, _file in (("t", "semask-swin-t-fpn", "swin_tiny_patch4_window7_224.pth"),
                               ("s", "semask-swin-s-fpn", "swin_small_patch4_window7_224.pth"),
                               ("b", "semask-swin-b-fpn", "swin_base_patch4_window12_384_22k.pth"),
                               ("l", "semask-swin-l-fpn", "swin_large_patch4_window12_384_22k.pth")):
    _add(Release(f"swin-{_size}-{'imagenet22k' if '22k' in _file else 'imagenet'}", _variant, "backbone", "imagenet",
                 "384x384" if "384" in _file else "224x224", "url", f"{_SWIN}/{_file}", licence="MIT", backbone=True,
                 source="microsoft/Swin-Transformer releases (SeMask's READMEs)"))

# --- EoMT: the authors' releases on the Hub (transformers' layout beside their own pytorch_model.bin)
_add(Release("eomt-dinov2-l16-ade20k", "eomt-dinov2-l16", "eomt", "ade20k", "512x512", "hub",
             "tue-mps/ade20k_semantic_eomt_large_512", _HUB_WEIGHTS, miou=58.4, licence="MIT",
             source="tue-mps/eomt model_zoo/dinov2.md"),
     Release("eomt-dinov2-l16-cityscapes", "eomt-dinov2-l16-cityscapes", "eomt", "cityscapes", "1024x1024", "hub",
             "tue-mps/cityscapes_semantic_eomt_large_1024", _HUB_WEIGHTS, miou=84.2, licence="MIT",
             source="tue-mps/eomt model_zoo/dinov2.md"),
     # DINOv3: transformers' eomt_dinov3 layout, complete weights (the pytorch_model.bin beside it, the authors' layout,
     # holds deltas to Meta's gated DINOv3 weights: `transeg convert --from eomt --base` reads it; the zoo needs neither)
     Release("eomt-dinov3-l16-ade20k", "eomt-dinov3-l16", "eomt", "ade20k", "512x512", "hub",
             "tue-mps/ade_semantic_eomt_large_512_dinov3", ("model.safetensors",), miou=59.5,
             licence="MIT (code); DINOv3 License (weights)", source="tue-mps/eomt model_zoo/dinov3.md"))

# --- EDAFormer: one Google Drive folder (file names not listed anywhere a program can read: given by hand)
_EDA = "https://drive.google.com/drive/u/0/folders/1hiAFQcfH9qd37WOc1_HMB0vKzbY-IWrO"
for _size in ("t", "b"):
    for _dataset, _crop in (("ade20k", 512), ("cityscapes", 1024), ("coco_stuff164k", 512)):
        _add(Release(f"edaformer-{_size}-{_dataset.replace('_', '-')}", f"edaformer-{_size}", "edaformer", _dataset,
                     f"{_crop}x{_crop}", "manual", _EDA, licence="Apache-2.0",
                     source="hyunwoo137/EDAFormer README (weights folder) and local_configs"))


def _decimal(v):
    """50.0 -> '50.0', 42.06 -> '42.06': as the authors print them."""
    text = f"{v:.2f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


COLUMNS = ("name", "model", "dataset", "crop", "mIoU", "from", "checksum", "size", "licence")


def table(family=None):
    """The zoo as rows of COLUMNS (strings), for `transeg models --pretrained` and the README. mIoU: the
    authors' single-scale figure (/ multi-scale + flip); size: the download in MB where a source states it."""
    rows = []
    for r in RELEASES.values():
        if family and not r.variant.startswith(family + "-"):
            continue
        miou = "-" if r.miou is None else _decimal(r.miou) + ("" if r.miou_ms is None else f" / {_decimal(r.miou_ms)}")
        where = f"hf.co/{r.location}" if r.host == "hub" else r.location.split("/")[2]  # (its host)
        where = f"by hand from {where}" if r.host == "manual" else where
        size = "-" if r.size_mb is None else f"{r.size_mb:,.0f} MB" if r.size_mb < 1000 else f"{r.size_mb / 1000:.2f} GB"
        rows.append((r.name, r.variant, r.dataset, r.crop, miou, where, r.checksum, size, r.licence))
    return rows


def get(name) -> Release:
    if name not in RELEASES:
        near = difflib.get_close_matches(name, list(RELEASES), n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        raise TransegError(f"{name!r}: no such checkpoint file, zoo name or Hugging Face repo id{hint}; "
                           "`transeg models --pretrained` lists the zoo")
    return RELEASES[name]


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".onnx")


def resolve(spec, progress=True) -> Path:
    """A checkpoint given as a path, a zoo name or a Hub repo id -> the transeg `.safetensors` to load.
    An existing file is returned as it is; a name that looks like a file (a checkpoint suffix) and does
    not exist is an error, never a download."""
    text = str(spec)
    path = Path(text).expanduser()
    if _looks_local(text):
        if not path.is_file():
            raise TransegError(f"{path}: no such checkpoint file")
        return path
    if text in RELEASES:
        return fetch(text, progress=progress)
    if _REPO_ID.match(text):
        return fetch_repo(text, progress=progress)
    get(text)  # raises with the nearest zoo names


def _looks_local(text) -> bool:
    """A path rather than a name: it exists, ends like a checkpoint file, starts like a path, or its first
    part is a folder here (`runs/b2` with a runs/ folder is a mistyped path, not the Hub repo runs/b2)."""
    path = Path(text).expanduser()
    return (path.exists() or text.endswith(_FILE_SUFFIXES) or text.startswith((".", "/", "~"))
            or ("/" in text and Path(text.split("/")[0]).is_dir()))


def is_name(spec) -> bool:
    """`spec` names a release or a Hub repo rather than a file (no file or folder of that name here)."""
    text = str(spec)
    return not _looks_local(text) and (text in RELEASES or bool(_REPO_ID.match(text)))


def backbone_weights(spec, progress=True) -> Path:
    """`backbone_weights`: a file or folder as it is, or an ImageNet release of the zoo (e.g. mit-b2-imagenet)."""
    if str(spec) in RELEASES:
        if not RELEASES[str(spec)].backbone:
            raise TransegError(f"backbone_weights={spec}: a whole segmentation model, not ImageNet backbone weights; "
                               f"start from it with pretrained={spec} (or --pretrained {spec})")
        return fetch(str(spec), progress=progress)
    return Path(spec)


def target(name) -> Path:
    """Where the converted release `name` is kept in the cache."""
    return hub.cache_dir() / "models" / f"{name}.safetensors"


def fetch(name, file=None, progress=True, log=print) -> Path:
    """The release `name` as a transeg `.safetensors` in the cache: downloaded and converted the first
    time (or converted from `file`, a copy the user downloaded), read from the cache ever after."""
    release = get(name)
    out = target(name)
    if out.is_file() and file is None:
        return out
    with hub.file_lock(out):
        if out.is_file() and file is None:  # another process converted it while this one waited
            return out
        sources = [_checked_user_file(release, file)] if file is not None else _download(release, progress)
        log(f"{name}: converting {sources[0].name} to a transeg checkpoint")
        _convert(release, sources[0], out)
        if release.host == "url" and file is None:
            for f in sources:  # the converted file is what loads read; the raw download is not kept twice
                f.unlink(missing_ok=True)
    return out


def _download(release, progress):
    if release.host == "manual":
        raise TransegError(f"{release.name}: the authors host it where a program cannot download from ({release.location}); "
                           f"download it there and give the file: `transeg pull {release.name} --file PATH`")
    if release.host == "hub":
        for filename in release.files:
            give = (f"or download {hub.endpoint()}/{release.location}/resolve/main/{filename} by hand and run "
                    f"`transeg pull {release.name} --file PATH`")
            path = hub.hub_file(release.location, filename, progress=progress, give_by_hand=give)
            if path is not None:
                if release.fmt in _READS_FOLDER:  # the converter reads the directory: its config.json too
                    hub.hub_file(release.location, "config.json", progress=progress)
                    return [path.parent]
                return [path]
        raise TransegError(f"{release.location}: holds none of {', '.join(release.files)}")
    folder = hub.cache_dir() / "downloads" / release.name
    checksums = hub.Checksums()
    paths = []
    for url in (release.location, *release.files):
        key = f"{release.name}/{url.rsplit('/', 1)[-1]}"
        expected = release.sha256 if url == release.location and release.sha256 else checksums.get(key)
        give = f"or download {url} by hand and run `transeg pull {release.name} --file PATH`"
        path = hub.download_url(url, folder / url.rsplit("/", 1)[-1], sha256=expected, progress=progress,
                                give_by_hand=give if url == release.location else "")
        if expected is None:
            checksums.record(key, hub.sha256_of(path))
        paths.append(path)
    return paths


def _checked_user_file(release, file):
    """A file the user downloaded: checked against the publisher's sha256 or the one recorded for it."""
    path = Path(file).expanduser()
    if not path.exists():
        raise TransegError(f"{path}: no such file")
    if path.is_file():
        key = f"{release.name}/{release.location.rsplit('/', 1)[-1]}" if release.host == "url" else f"{release.name}/file"
        checksums = hub.Checksums()
        expected = release.sha256 or checksums.get(key)
        found = hub.sha256_of(path)
        if expected and not found.startswith(expected):
            raise TransegError(f"{path}: sha256 {found[:16]}... is not the {release.name} release's ({expected[:16]}...); "
                               "a different or damaged file")
        if expected is None:
            checksums.record(key, found)
    return path


def _convert(release, src, out):
    from .checkpoint import save
    from .files import atomic_write

    if release.backbone:
        from safetensors.torch import save_file

        from .convert import read_backbone_state

        state = {k: v.contiguous() for k, v in read_backbone_state(src).items()}
        atomic_write(out, lambda tmp: save_file(state, str(tmp), metadata={"zoo": release.name,
                                                                            "variant": release.variant}))
        return
    from .convert import convert

    model = convert(src, release.fmt)
    if model.meta["variant"] != release.variant:
        raise TransegError(f"{src}: holds a {model.meta['variant']}, not the {release.variant} of {release.name}")
    if release.protocol is not None:
        model.protocol = release.protocol
    model.meta.update(zoo=release.name, dataset=release.dataset)
    save(model, out)


def fetch_repo(repo_id, progress=True, log=print) -> Path:
    """A Hugging Face repo id -> a transeg `.safetensors` in the cache. A repo the zoo lists gets its row
    (test protocol included); any other is read by its config.json's `model_type`."""
    for release in RELEASES.values():
        if release.host == "hub" and release.location == repo_id:
            return fetch(release.name, progress=progress, log=log)
    out = hub.cache_dir() / "models" / "hub" / (repo_id.replace("/", "--") + ".safetensors")
    if out.is_file():
        return out
    with hub.file_lock(out):
        if out.is_file():
            return out
        config = hub.hub_file(repo_id, "config.json", progress=progress)
        if config is None:
            raise TransegError(f"{repo_id}: has no config.json; not a transformers model repository")
        fmt = _hub_format(config, repo_id)
        weights = next((p for f in ("model.safetensors", "pytorch_model.bin")
                        if (p := hub.hub_file(repo_id, f, progress=progress)) is not None), None)
        if weights is None:
            raise TransegError(f"{repo_id}: holds neither model.safetensors nor pytorch_model.bin")
        from .checkpoint import save
        from .convert import convert

        log(f"{repo_id}: converting to a transeg checkpoint")
        model = convert(weights.parent, fmt)
        model.meta["zoo"] = repo_id
        save(model, out)
    return out


# transformers' model_type -> the transeg converter that reads such a repo
_HUB_FORMATS = {"segformer": "segformer-hf", "eomt": "eomt", "eomt_dinov3": "eomt"}
_READS_FOLDER = {"segformer-hf", "eomt"}  # converters that take a save_pretrained folder (config.json beside)


def _hub_format(config, repo_id):
    import json

    try:
        model_type = json.loads(Path(config).read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise TransegError(f"{repo_id}: unreadable config.json ({e})") from None
    if model_type not in _HUB_FORMATS:
        raise TransegError(f"{repo_id}: a {model_type!r} model; transeg reads Hub repos of "
                           f"{', '.join(sorted(_HUB_FORMATS))} (`transeg convert --help` lists every format)")
    return _HUB_FORMATS[model_type]
