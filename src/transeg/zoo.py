"""The zoo: every checkpoint the authors released, by name, fetched once and converted once.

    model = transeg.load("segformer-b0-ade20k")            # a zoo name
    model = transeg.load("nvidia/segformer-b5-finetuned-cityscapes-1024-1024")   # a Hub repo id
    path = transeg.zoo.fetch("segvit-vit-l-ade20k", file="~/Downloads/ade_vit_l.pth")   # given by hand

Each family declares its releases in its own package (`zoo.add(Release(...))`). A `Release` row says where the file lives (a Hugging Face repo, a plain URL, or a host a program cannot
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

from safetensors.torch import save_file

from . import checkpoint, hub
from .convert import convert, read_backbone_state
from .convert.hf_config import read_config
from .errors import TransegError, UnknownVariant
from .files import atomic_write
from .protocol import Protocol
from .registry import FORMATS, VARIANTS, get_format, hub_format
from .text import printable


@dataclass(frozen=True)
class Release:
    name: str                      # the zoo name: <variant>-<dataset>, e.g. segformer-b0-ade20k
    variant: str                   # the registry variant it converts to
    fmt: str                       # the `transeg convert --from` format that reads it
    dataset: str                   # a key of DATASET_TABLES (ade20k, cityscapes, ...) or imagenet (backbones)
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


RELEASES: dict[str, Release] = {}


HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # on most nvidia/ repos only the .bin is on main


def add(*releases: Release):
    """Add a family's releases to the zoo (each name once)."""
    for release in releases:
        if release.name in RELEASES:
            raise ValueError(f"zoo name {release.name} listed twice")
        RELEASES[release.name] = release


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
        if family and VARIANTS[r.variant].family != family:
            continue
        miou = "-" if r.miou is None else _decimal(r.miou) + ("" if r.miou_ms is None else f" / {_decimal(r.miou_ms)}")
        where = f"hf.co/{r.location}" if r.host == "hub" else r.location.split("/")[2]  # (its host)
        where = f"by hand from {where}" if r.host == "manual" else where
        size = "-" if r.size_mb is None else f"{r.size_mb:,.0f} MB" if r.size_mb < 1000 else f"{r.size_mb / 1000:.2f} GB"
        rows.append((r.name, r.variant, r.dataset, r.crop, miou, where, r.checksum, size, r.licence))
    return rows


# A release's `dataset` -> the dataset table (data.DATASETS) whose classes its head predicts: ADE20K 150,
# Cityscapes 19, COCO-Stuff 171, Pascal Context 60 (background counted, as SegViT's and Segmenter's tables) or
# 59 (pascal_context_59). ImageNet backbones have no segmentation head.
DATASET_TABLES = {"ade20k": "ade20k", "cityscapes": "cityscapes", "coco_stuff164k": "coco-stuff164k",
                  "coco_stuff10k": "coco-stuff10k", "pascal_context": "pascal-context",
                  "pascal_context_59": "pascal-context-59", "voc": "voc"}


def release_classes(release) -> int | None:
    """The class count of `release`'s dataset (from its table in transeg.data), which its converted head must
    have; None for ImageNet backbone weights."""
    from .data import DATASETS

    if release.backbone:
        return None
    if release.dataset not in DATASET_TABLES:
        raise TransegError(f"{release.name}: dataset {release.dataset!r} is none of {', '.join(DATASET_TABLES)}")
    return len(DATASETS[DATASET_TABLES[release.dataset]].class_names)


def get(name) -> Release:
    if name not in RELEASES:
        near = difflib.get_close_matches(name, list(RELEASES), n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        raise TransegError(f"{name!r}: no such checkpoint file, zoo name or Hugging Face repo id{hint}; "
                           "`transeg models --pretrained` lists the zoo")
    return RELEASES[name]


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".onnx")


def resolve(spec, progress=True) -> Path:
    """A checkpoint given as a path, a zoo name or a Hub repo id -> the transeg `.safetensors` to load.
    An existing file is returned as it is; a name that looks like a file (a checkpoint suffix) and does
    not exist is an error, never a download."""
    text = str(spec)
    if _URL.match(text):  # (before Path(), which would fold its // into one /)
        raise TransegError(f"{text}: a URL; transeg takes a checkpoint file here, a zoo name or a Hugging Face repo id "
                           "(download the file first, or give the release's zoo name)")
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
    hub.writable_cache()
    with hub.file_lock(out):
        if out.is_file() and file is None:  # another process converted it while this one waited
            return out
        if file is not None:
            sources = [_checked_user_file(release, file)]
            what = printable(sources[0])  # the user's file, as given
        else:
            sources, what = _download(release, progress)
        log(f"{name}: converting {what} to a transeg checkpoint")
        _convert(release, sources[0], out)
        if release.host == "url" and file is None:
            for f in sources:  # the converted file is what loads read; the raw download is not kept twice
                f.unlink(missing_ok=True)
    return out


def _download(release, progress):
    """The release's downloaded files (or, for a converter that reads a folder, the folder holding them), and
    what they are for the log: the Hub repo and file (`org/repo/pytorch_model.bin`), or the URL's file name."""
    if release.host == "manual":
        raise TransegError(f"{release.name}: the authors host it where a program cannot download from ({release.location}); "
                           f"download it there and give the file: `transeg pull {release.name} --file PATH`")
    bounds = hub.limits(release.size_mb, release.name)  # the stated size caps each of its files
    if release.host == "hub":
        for filename in release.files:
            give = (f"or download {hub.endpoint()}/{release.location}/resolve/main/{filename} by hand and run "
                    f"`transeg pull {release.name} --file PATH`")
            path = hub.hub_file(release.location, filename, progress=progress, give_by_hand=give, bounds=bounds)
            if path is not None:
                what = f"{release.location}/{filename}"  # (the snapshot folder is named by a commit hash)
                if not release.backbone and get_format(release.fmt).reads_path:  # it reads the folder: config.json too
                    config = hub.hub_file(release.location, "config.json", progress=progress, bounds=bounds)
                    if config is not None:
                        read_config(config, f"{release.location}: config.json")
                        what += " and its config.json"
                    return [path.parent], what
                return [path], what
        raise TransegError(f"{release.location}: holds none of {', '.join(release.files)}")
    folder = hub.cache_dir() / "downloads" / release.name
    checksums = hub.Checksums()
    paths = []
    for url in (release.location, *release.files):
        key = f"{release.name}/{url.rsplit('/', 1)[-1]}"
        expected = release.sha256 if url == release.location and release.sha256 else checksums.get(key)
        give = f"or download {url} by hand and run `transeg pull {release.name} --file PATH`"
        path = hub.download_url(url, folder / url.rsplit("/", 1)[-1], sha256=expected, progress=progress,
                                give_by_hand=give if url == release.location else "", bounds=bounds)
        if expected is None:
            checksums.record(key, hub.sha256_of(path))
        paths.append(path)
    return paths, paths[0].name


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
    if release.backbone:
        state = {k: v.contiguous() for k, v in read_backbone_state(src).items()}
        atomic_write(out, lambda tmp: save_file(state, str(tmp), metadata={"zoo": release.name,
                                                                            "variant": release.variant}))
        return
    try:
        model = convert(src, release.fmt)
    except UnknownVariant as e:  # the release names its variant: the file is not what the zoo lists
        raise TransegError(f"{e.source}: {e.what} matches no registered variant, not the {release.variant} of "
                           f"{release.name}: a different or damaged file") from None
    if model.meta["variant"] != release.variant:
        raise TransegError(f"{src}: holds a {model.meta['variant']}, not the {release.variant} of {release.name}")
    expected = release_classes(release)
    if expected is not None and model.num_classes != expected:
        raise TransegError(f"{src}: holds a {model.num_classes}-class head, not the {expected} classes of "
                           f"{release.dataset} ({release.name}): a different or damaged file")
    if release.protocol is not None:
        model.protocol = release.protocol
    model.meta.update(zoo=release.name, dataset=release.dataset)
    checkpoint.save(model, out)


def fetch_repo(repo_id, progress=True, log=print) -> Path:
    """A Hugging Face repo id -> a transeg `.safetensors` in the cache. A repo the zoo lists gets its row
    (test protocol included); any other is read by its config.json's `model_type`."""
    for release in RELEASES.values():
        if release.host == "hub" and release.location == repo_id:
            return fetch(release.name, progress=progress, log=log)
    out = hub.cache_dir() / "models" / "hub" / (repo_id.replace("/", "--") + ".safetensors")
    if out.is_file():
        return out
    if hub.offline() and (native := _cached_native(repo_id)) is not None:
        return native
    hub.writable_cache()
    with hub.file_lock(out):
        if out.is_file():
            return out
        config = hub.hub_file(repo_id, "config.json", progress=progress)
        if config is None:
            native = _native(repo_id, progress)  # a transeg repo (`transeg push`): its checkpoint as it is
            if native is not None:
                return native
            raise TransegError(f"{repo_id}: has no config.json and no transeg {NATIVE_WEIGHTS}; neither a transformers "
                               "nor a transeg model repository")
        fmt = _hub_format(config, repo_id)
        weights = next((p for f in HUB_WEIGHTS
                        if (p := hub.hub_file(repo_id, f, progress=progress)) is not None), None)
        if weights is None:
            raise TransegError(f"{repo_id}: holds neither model.safetensors nor pytorch_model.bin")
        log(f"{repo_id}: converting {repo_id}/{weights.name} and its config.json to a transeg checkpoint")
        try:
            model = convert(weights.parent, fmt)
        except UnknownVariant as e:  # `transeg pull` has no --model: the command that takes one, on these files
            raise TransegError(f"{repo_id}: {e.what} matches no registered variant; convert its files naming one: "
                               f"`transeg convert {weights.parent} OUT.safetensors --from {fmt} --model NAME`"
                               f"{e.names}") from None
        model.meta["zoo"] = repo_id
        checkpoint.save(model, out)
    return out


NATIVE_WEIGHTS = "model.safetensors"  # what `transeg push` commits: a transeg checkpoint, metadata inside


def _is_transeg(path) -> bool:
    """`path` is a transeg checkpoint (its safetensors metadata says so), read from its header only."""
    try:
        checkpoint.read_metadata(path)
    except TransegError:
        return False
    return True


def _native(repo_id, progress):
    """A transeg repo's checkpoint from the Hugging Face cache (fetched or refreshed there, so a newer push is
    seen), or None when the repo holds no transeg checkpoint. Nothing is converted or copied."""
    path = hub.hub_file(repo_id, NATIVE_WEIGHTS, progress=progress)
    return path if path is not None and _is_transeg(path) else None


def _cached_native(repo_id):
    """Offline: the transeg checkpoint of `repo_id` the Hugging Face cache holds, or None."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, NATIVE_WEIGHTS)
    return Path(found) if isinstance(found, str) and _is_transeg(found) else None


def _hub_format(config, repo_id):
    """The format that reads a Hub repo, from its config.json's `model_type`."""
    model_type = read_config(config, f"{repo_id}: config.json").get("model_type")
    model_type = model_type if isinstance(model_type, str) else None
    fmt = hub_format(model_type)
    if fmt is None:
        readable = sorted(t for f in FORMATS.values() for t in f.hub_model_types)
        raise TransegError(f"{repo_id}: a {model_type!r} model; transeg reads Hub repos of "
                           f"{', '.join(readable)} (`transeg convert --help` lists every format)")
    return fmt.name


def load(spec, map_location="cpu", progress=True):
    """`transeg.load`: a transeg .safetensors file, a zoo name (`segformer-b0-ade20k`) or a Hugging Face
    repo id (`nvidia/segformer-b0-finetuned-ade-512-512`; fetched and converted once, then read from the
    cache) -> the ready model in eval mode."""
    return checkpoint.load(resolve(spec, progress=progress), map_location=map_location)
