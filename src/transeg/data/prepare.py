"""`transeg data prepare NAME RAW_DIR OUT_DIR`: the one-off conversions each benchmark needs before
training, done here instead of with another toolbox's scripts. Images are linked, not copied; label
maps are written as index PNGs (`*_labelTrainIds.png` / `SegmentationClassContext/*.png`), each file
atomically, so an interrupted run leaves no half-written mask and can simply be run again.

    cityscapes      RAW = cityscapes/ (leftImg8bit/, gtFine/ with *_gtFine_labelIds.png)
                    -> OUT/gtFine/<split>/<city>/*_gtFine_labelTrainIds.png (19 train ids, 255 ignore)
    coco-stuff164k  RAW = images/{train2017,val2017}/, annotations/<split>/*.png (stuffthingmaps, ids 0..181)
                    -> OUT/annotations/<split>/*_labelTrainIds.png (171 train ids)
    coco-stuff10k   RAW = cocostuff-10k-v1.1/ (images/*.jpg, annotations/*.mat, imageLists/{train,test}.txt)
                    -> OUT/images/{train2014,test2014}/, OUT/annotations/<split>/*_labelTrainIds.png
    pascal-context  RAW = VOCdevkit/VOC2010/ (JPEGImages/, ImageSets/Main/{train,val}.txt) with the
                    PASCAL-Context release beside it: trainval/*.mat (459-class LabelMap) and labels.txt
                    -> OUT/JPEGImages, OUT/SegmentationClassContext/*.png (0 = background, 1..59),
                       OUT/ImageSets/SegmentationContext/{train,val}.txt

The `.mat` readers need scipy (`pip install scipy`).
"""
import os
import re
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..errors import TransegError
from . import classes as C
from ..files import plain_permissions


def _lut(mapping, default=255):
    lut = np.full(256, default, dtype=np.uint8)
    for raw, train in mapping.items():
        lut[raw] = train
    return lut


# Temporaries of the atomic writes: `.NAME.XXXXXXXX.tmp`, hidden and not *.png, so that no reader takes
# one a killed run left behind for a label map; the next run removes them from every folder it writes
# to. `tmpXXXXXXXX.png` (tempfile's default name, which a folder prepared by an older transeg may hold)
# is removed the same way.
_TEMPORARY = re.compile(r"^(\..+\.[a-z0-9_]{8}\.tmp|tmp[a-z0-9_]{8}\.png)$")
_swept = set()  # folders whose stale temporaries this process has removed


def _sweep(folder):
    """Remove the temporaries a killed run left in `folder` (once per folder and process)."""
    if folder in _swept:
        return
    _swept.add(folder)
    with os.scandir(folder) as entries:
        stale = [e.path for e in entries if _TEMPORARY.match(e.name) and e.is_file(follow_symlinks=False)]
    for tmp in stale:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def _save_png(array, path):
    """Write an index PNG atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8), mode="L").save(tmp, format="PNG")
        plain_permissions(tmp)  # mkstemp made it 0600; a mask written by plain open() would be 0666 less the umask
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _link(src, dst):
    """dst -> src (a symlink; a copy where links are not allowed). Existing dst is left alone."""
    if dst.exists() or dst.is_symlink():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        dst.symlink_to(src.resolve(), target_is_directory=src.is_dir())
    except OSError:
        import shutil

        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)


def _read_index_png(path):
    try:
        with Image.open(path) as m:
            if m.mode not in ("L", "P"):
                raise TransegError(f"{path}: expected a single-channel label PNG, found mode {m.mode}")
            return np.asarray(m, dtype=np.uint8)
    except (OSError, ValueError) as e:
        raise TransegError(f"{path}: cannot read the label map ({e})") from None


def _loadmat(path, key):
    try:
        from scipy.io import loadmat
    except ImportError:
        raise TransegError(f"{path}: reading .mat files needs scipy (pip install scipy)") from None
    try:
        data = loadmat(str(path))
    except Exception as e:  # scipy raises several types for damaged files
        raise TransegError(f"{path}: not a readable MATLAB file ({str(e).splitlines()[0][:120]})") from None
    if key not in data:
        raise TransegError(f"{path}: has no {key!r} array (found: {', '.join(k for k in data if not k.startswith('__'))})")
    return np.asarray(data[key])


def _need(path, what):
    if not path.exists():
        raise TransegError(f"{path}: missing ({what})")
    return path


def _map_files(files, out_path, lut, progress, desc):
    for src in tqdm(files, desc=desc, unit="mask", disable=not progress):
        raw = _read_index_png(src)
        _save_png(lut[raw], out_path(src))
    return len(files)


def prepare_cityscapes(raw, out, progress=True):
    gt = _need(raw / "gtFine", "the gtFine/ folder of gtFine_trainvaltest.zip")
    _need(raw / "leftImg8bit", "the leftImg8bit/ folder of leftImg8bit_trainvaltest.zip")
    files = sorted(gt.glob("*/*/*_gtFine_labelIds.png"))
    if not files:
        raise TransegError(f"{gt}: no *_gtFine_labelIds.png files under <split>/<city>/")
    if out.resolve() != raw.resolve():
        _link(raw / "leftImg8bit", out / "leftImg8bit")
    lut = _lut(C.CITYSCAPES_LABEL_TO_TRAIN)
    n = _map_files(files, lambda p: out / "gtFine" / p.relative_to(gt).parent /
                   p.name.replace("_gtFine_labelIds.png", "_gtFine_labelTrainIds.png"), lut, progress, "cityscapes")
    return {"masks": n}


def prepare_coco_stuff164k(raw, out, progress=True):
    lut = _lut(C.COCO_STUFF_ID_TO_TRAIN)
    n = 0
    for split in ("train2017", "val2017"):
        images, ann = raw / "images" / split, raw / "annotations" / split
        if not ann.is_dir():
            continue
        _need(images, f"the {split} images")
        files = sorted(p for p in ann.glob("*.png") if not p.name.endswith("_labelTrainIds.png"))
        if out.resolve() != raw.resolve():
            _link(images, out / "images" / split)
        n += _map_files(files, lambda p, s=split: out / "annotations" / s / f"{p.stem}_labelTrainIds.png",
                        lut, progress, f"coco-stuff164k {split}")
    if not n:
        raise TransegError(f"{raw / 'annotations'}: no stuffthingmaps PNGs under train2017/ or val2017/")
    return {"masks": n}


def prepare_coco_stuff10k(raw, out, progress=True):
    # the .mat maps hold 1-based COCO-Stuff ids, 0 = unlabelled
    lut = _lut({raw_id + 1: t for raw_id, t in C.COCO_STUFF_ID_TO_TRAIN.items()})
    n = 0
    for split, folder in (("train", "train2014"), ("test", "test2014")):
        listing = _need(raw / "imageLists" / f"{split}.txt", f"the {split} image list of cocostuff-10k-v1.1")
        names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        for name in tqdm(names, desc=f"coco-stuff10k {split}", unit="mask", disable=not progress):
            image = _need(raw / "images" / f"{name}.jpg", f"listed in {listing.name}")
            labels = _loadmat(_need(raw / "annotations" / f"{name}.mat", f"listed in {listing.name}"), "S")
            if labels.min() < 0 or labels.max() > 182:
                raise TransegError(f"{raw / 'annotations' / (name + '.mat')}: label ids outside 0..182")
            _link(image, out / "images" / folder / f"{name}.jpg")
            _save_png(lut[labels.astype(np.uint8)], out / "annotations" / folder / f"{name}_labelTrainIds.png")
            n += 1
    return {"masks": n}


def _context_labels(path):
    """labels.txt of PASCAL-Context ("<id>: <name>" per line) -> {name: id}."""
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"\s*(\d+)\s*:\s*(.+?)\s*$", line)
        if m:
            out[m.group(2)] = int(m.group(1))
    return out


def prepare_pascal_context(raw, out, progress=True):
    voc = raw / "VOC2010" if (raw / "VOC2010").is_dir() else raw
    images = _need(voc / "JPEGImages", "VOC2010's JPEGImages/")
    mats = _need(next((d for d in (raw / "trainval", voc / "trainval") if d.is_dir()), raw / "trainval"),
                 "the PASCAL-Context trainval/ folder of .mat label maps")
    labels_txt = _need(next((f for f in (raw / "labels.txt", voc / "labels.txt") if f.is_file()), raw / "labels.txt"),
                       "PASCAL-Context's labels.txt (459 classes)")
    ids = _context_labels(labels_txt)
    missing = [c for c in C.PASCAL_CONTEXT_59 if c not in ids]
    if missing:
        raise TransegError(f"{labels_txt}: lacks {len(missing)} of the 59 classes ({', '.join(missing[:3])} ...)")
    lut = np.zeros(max(ids.values()) + 1, dtype=np.uint8)  # every other class -> background 0
    for t, name in enumerate(C.PASCAL_CONTEXT_59, start=1):
        lut[ids[name]] = t
    if out.resolve() != voc.resolve():
        _link(images, out / "JPEGImages")
    n = 0
    for split in ("train", "val"):
        listing = _need(voc / "ImageSets" / "Main" / f"{split}.txt", f"VOC2010's {split} list")
        names = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
        kept = []
        for name in tqdm(names, desc=f"pascal-context {split}", unit="mask", disable=not progress):
            mat = mats / f"{name}.mat"
            if not mat.is_file():
                continue
            label_map = _loadmat(mat, "LabelMap")
            if label_map.min() < 0 or label_map.max() >= len(lut):
                raise TransegError(f"{mat}: label ids outside labels.txt's 0..{len(lut) - 1}")
            _save_png(lut[label_map], out / "SegmentationClassContext" / f"{name}.png")
            kept.append(name)
        if not kept:
            raise TransegError(f"{mats}: none of the {len(names)} images of {listing} has a .mat label map")
        target = out / "ImageSets" / "SegmentationContext" / f"{split}.txt"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("".join(f"{k}\n" for k in kept))
        n += len(kept)
    return {"masks": n}


PREPARE = {
    "cityscapes": prepare_cityscapes,
    "coco-stuff164k": prepare_coco_stuff164k,
    "coco-stuff10k": prepare_coco_stuff10k,
    "pascal-context": prepare_pascal_context,
}


def prepare(name, raw, out, progress=True):
    if name not in PREPARE:
        raise TransegError(f"unknown dataset {name!r} for prepare (known: {', '.join(PREPARE)}; ADE20K needs none)")
    raw, out = Path(raw), Path(out)
    if not raw.is_dir():
        raise TransegError(f"{raw}: no such folder")
    out.mkdir(parents=True, exist_ok=True)
    _swept.clear()
    return PREPARE[name](raw, out, progress)
