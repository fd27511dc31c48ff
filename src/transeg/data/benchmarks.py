"""The benchmark datasets in their official (mmsegmentation) layouts.

    ADE20K          ADEChallengeData2016/images/{training,validation}/*.jpg
                                         annotations/{training,validation}/*.png   0 = other (ignored), 1..150
    Cityscapes      cityscapes/leftImg8bit/{train,val,test}/<city>/*_leftImg8bit.png
                              gtFine/<split>/<city>/*_gtFine_labelTrainIds.png  (or the raw *_gtFine_labelIds.png,
                                                                                  mapped to the 19 train ids here)
    COCO-Stuff 164k coco_stuff164k/images/{train2017,val2017}/*.jpg
                                   annotations/<split>/*_labelTrainIds.png   (or the raw stuffthingmaps *.png, 0..181)
    COCO-Stuff 10k  coco_stuff10k/images/{train2014,test2014}/*.jpg
                                  annotations/<split>/*_labelTrainIds.png   (`transeg data prepare coco-stuff10k`)
    Pascal Context  VOCdevkit/VOC2010/JPEGImages/*.jpg, SegmentationClassContext/*.png (0 = background, 1..59),
                                     ImageSets/SegmentationContext/{train,val}.txt
    Pascal VOC 2012 VOCdevkit/VOC2012/JPEGImages/*.jpg, SegmentationClass/*.png (palette PNGs: 0 = background,
                                     1..20, 255 = object borders, ignored), ImageSets/Segmentation/{train,val}.txt
      + SBD (aug)   ... and SegmentationClassAug/*.png with the list ImageSets/Segmentation/aug.txt (mmseg's
                    voc_aug.py) or train_aug.txt (DeepLab's, also under ImageSets/SegmentationAug/)

Splits are called "train" and "val" everywhere (COCO-Stuff 10k's test2014 is its validation set).
Pascal Context comes with 60 classes (background counted, as SegViT and Segmenter's 60-class
tables) or 59 (`pascal-context-59`, background ignored: reduce_zero_label, as mmseg's
PascalContextDataset59).

Pascal VOC comes as `voc` (train = the 1,464 images of train.txt) and `voc-aug` (train = the 10,582 of the
SBD augmented set: train.txt and the aug list together, val.txt's images left out; each image's mask is
SegmentationClass/ID.png where VOC has one, else SegmentationClassAug/ID.png); val is VOC's 1,449 in both.
A folder holding SegmentationClassAug/ is recognised as `voc-aug`, one without as `voc`.

Each reader is a FolderDataset with the class names, palette and raw-value -> train-id map of its
dataset, so `check()`, the error messages and the value checks are the same as for a user's folder.
"""
from pathlib import Path

import numpy as np

from ..errors import TransegError
from . import classes as C
from .folder import FolderDataset, MissingSplit, _few
from .palettes import default_palette


def _lookup(mapping, extra_valid=()):
    lut = np.full(256, 255, dtype=np.int64)
    valid = np.zeros(256, dtype=bool)
    valid[255] = True
    for raw, train in mapping.items():
        lut[raw] = train
        valid[raw] = True
    valid[list(extra_valid)] = True
    return lut, valid


class BenchmarkDataset(FolderDataset):
    """Base class: subclasses set `name`, `class_names`, `splits` (our split -> folder name) and
    implement `_list(split_dir_name) -> [(image_path, mask_path)]`."""

    name = ""
    class_names = ()
    palette_colors = None
    splits = {"train": "train", "val": "val"}
    reduce_zero_label = False
    # datasets whose unprepared label maps hold raw ids: raw id -> train id, how many raw ids exist, and
    # how to name them in messages; `raw_ids` is set by `_list` when the prepared files are absent
    raw_ids = False
    raw_map, raw_count, raw_description = None, 0, ""

    @property
    def class_source(self):
        return self.name

    def __init__(self, root, split="train"):
        self.root = Path(root)
        if not self.root.is_dir():
            raise TransegError(f"{self.root}: no such folder (expected the {self.name} layout, see "
                               f"`transeg data --help`)")
        if split not in self.splits:
            raise TransegError(f"{self.root}: {self.name} has no split {split!r} (known: {', '.join(self.splits)})")
        self.split = split
        self.classes = list(self.class_names)
        self.palette = [list(c) for c in (self.palette_colors or default_palette(len(self.classes)))]
        self.samples = self._list(self.splits[split])
        if not self.samples:
            raise TransegError(f"{self.image_dir}: no {self.name} images for split {split!r}")
        self.lut, self.valid = self._label_map()

    def __repr__(self):
        return f"{type(self).__name__}({str(self.root)!r}, split={self.split!r}, {len(self)} images)"

    def _label_map(self):
        if self.raw_ids:
            return _lookup(self.raw_map, extra_valid=range(self.raw_count))
        return super()._label_map()

    def _allowed(self):
        if self.raw_ids:
            return f"allowed {self.raw_description} and 255"
        return super()._allowed()

    def _pairs(self, images, mask_for):
        """Pair each image with mask_for(image); a missing mask is an error naming the first few."""
        pairs, missing = [], []
        for image in images:
            mask = mask_for(image)
            (pairs if mask.is_file() else missing).append((image, mask))
        if missing:
            raise TransegError(f"{missing[0][1].parent}: no mask for {len(missing)} image(s) "
                               f"({_few([m.name for _, m in missing])})")
        return pairs

    def _use(self, image_dir, mask_dir):
        """Set the split's image and mask folders; both must exist (no image folder: MissingSplit)."""
        for d in (image_dir, mask_dir):
            if not d.is_dir():
                error = MissingSplit if d == image_dir else TransegError
                raise error(f"{d}: missing (expected the {self.name} layout under {self.root})")
        self.image_dir, self.mask_dir = image_dir, mask_dir

    def _listed(self, listing, what):
        """The image ids of a split list (first word of each line; a path's stem, as in DeepLab's lists
        "/JPEGImages/ID.jpg /SegmentationClassAug/ID.png"), each checked to have its image."""
        if not listing.is_file():
            raise MissingSplit(f"{listing}: missing (the list of {what} image ids)")
        ids = [Path(line.split()[0]).stem for line in listing.read_text().splitlines() if line.strip()]
        missing = [i for i in ids if not (self.image_dir / f"{i}.jpg").is_file()]
        if missing:
            raise TransegError(f"{listing}: {len(missing)} listed image(s) not in {self.image_dir} ({_few(missing)})")
        return ids


class ADE20K(BenchmarkDataset):
    name = "ADE20K"
    class_names = C.ADE20K
    splits = {"train": "training", "val": "validation"}
    reduce_zero_label = True  # 0 = "other objects", ignored by every paper here

    def _list(self, folder):
        self._use(self.root / "images" / folder, self.root / "annotations" / folder)
        return self._pairs(sorted(self.image_dir.glob("*.jpg")), lambda p: self.mask_dir / f"{p.stem}.png")


class Cityscapes(BenchmarkDataset):
    name = "Cityscapes"
    class_names = C.CITYSCAPES
    palette_colors = C.CITYSCAPES_PALETTE
    splits = {"train": "train", "val": "val", "test": "test"}
    raw_map, raw_count = C.CITYSCAPES_LABEL_TO_TRAIN, 34
    raw_description = "the Cityscapes label ids 0..33 (mapped to the 19 train ids)"

    def _list(self, folder):
        self._use(self.root / "leftImg8bit" / folder, self.root / "gtFine" / folder)
        images = sorted(self.image_dir.glob("*/*_leftImg8bit.png"))
        # trainIds files (prepared) when present, else the raw labelIds mapped through the 19-class table
        self.raw_ids = not any(self.mask_dir.glob("*/*_gtFine_labelTrainIds.png"))
        suffix = "_gtFine_labelIds.png" if self.raw_ids else "_gtFine_labelTrainIds.png"
        return self._pairs(images, lambda p: self.mask_dir / p.parent.name /
                           (p.name.removesuffix("_leftImg8bit.png") + suffix))


class COCOStuff164k(BenchmarkDataset):
    name = "COCO-Stuff 164k"
    class_names = C.COCO_STUFF
    splits = {"train": "train2017", "val": "val2017"}
    raw_map, raw_count = C.COCO_STUFF_ID_TO_TRAIN, 182
    raw_description = "the COCO-Stuff ids 0..181 (mapped to the 171 train ids)"

    def _list(self, folder):
        self._use(self.root / "images" / folder, self.root / "annotations" / folder)
        self.raw_ids = not any(self.mask_dir.glob("*_labelTrainIds.png"))
        suffix = ".png" if self.raw_ids else "_labelTrainIds.png"
        return self._pairs(sorted(self.image_dir.glob("*.jpg")), lambda p: self.mask_dir / f"{p.stem}{suffix}")


class COCOStuff10k(BenchmarkDataset):
    name = "COCO-Stuff 10k"
    class_names = C.COCO_STUFF
    splits = {"train": "train2014", "val": "test2014"}

    def _list(self, folder):
        self._use(self.root / "images" / folder, self.root / "annotations" / folder)
        return self._pairs(sorted(self.image_dir.glob("*.jpg")),
                           lambda p: self.mask_dir / f"{p.stem}_labelTrainIds.png")


class PascalContext(BenchmarkDataset):
    name = "Pascal Context"
    class_names = C.PASCAL_CONTEXT_60

    def _list(self, split):
        root = self.root / "VOC2010" if (self.root / "VOC2010").is_dir() else self.root
        self._use(root / "JPEGImages", root / "SegmentationClassContext")
        ids = self._listed(root / "ImageSets" / "SegmentationContext" / f"{split}.txt", split)
        return self._pairs([self.image_dir / f"{i}.jpg" for i in ids], lambda p: self.mask_dir / f"{p.stem}.png")


class PascalContext59(PascalContext):
    name = "Pascal Context (59 classes)"
    class_names = C.PASCAL_CONTEXT_59
    reduce_zero_label = True  # background ignored


class PascalVOC(BenchmarkDataset):
    name = "Pascal VOC 2012"
    class_names = C.PASCAL_VOC  # palette: default_palette, which is VOC's

    def _voc(self):
        return self.root / "VOC2012" if (self.root / "VOC2012").is_dir() else self.root

    def _list(self, split):
        voc = self._voc()
        self._use(voc / "JPEGImages", voc / "SegmentationClass")
        ids = self._listed(voc / "ImageSets" / "Segmentation" / f"{split}.txt", split)
        return self._pairs([self.image_dir / f"{i}.jpg" for i in ids], lambda p: self.mask_dir / f"{p.stem}.png")


class PascalVOCAug(PascalVOC):
    name = "Pascal VOC 2012 + SBD"
    AUG_LISTS = ("ImageSets/Segmentation/aug.txt", "ImageSets/Segmentation/train_aug.txt",
                 "ImageSets/SegmentationAug/train_aug.txt")

    def _list(self, split):
        if split != "train":
            return super()._list(split)
        voc = self._voc()
        fine = voc / "SegmentationClass"
        self._use(voc / "JPEGImages", voc / "SegmentationClassAug")
        listing = next((voc / a for a in self.AUG_LISTS if (voc / a).is_file()), None)
        if listing is None:
            raise TransegError(f"{voc}: no list of the augmented training set ({' or '.join(self.AUG_LISTS)}; "
                               f"mmseg's tools/dataset_converters/voc_aug.py writes the first)")
        ids = self._listed(listing, "SBD-augmented train")
        lists = voc / "ImageSets" / "Segmentation"
        if (lists / "train.txt").is_file():
            ids = self._listed(lists / "train.txt", "train") + ids
        val = set(self._listed(lists / "val.txt", "val")) if (lists / "val.txt").is_file() else set()
        ids = [i for i in dict.fromkeys(ids) if i not in val]  # in order, once, never a validation image
        return self._pairs([self.image_dir / f"{i}.jpg" for i in ids],
                           lambda p: fine / f"{p.stem}.png" if (fine / f"{p.stem}.png").is_file()
                           else self.mask_dir / f"{p.stem}.png")


DATASETS = {
    "ade20k": ADE20K,
    "cityscapes": Cityscapes,
    "coco-stuff164k": COCOStuff164k,
    "coco-stuff10k": COCOStuff10k,
    "pascal-context": PascalContext,
    "pascal-context-59": PascalContext59,
    "voc": PascalVOC,
    "voc-aug": PascalVOCAug,
}


def detect(root):
    """The benchmark layout a folder holds, or None (a plain folder dataset)."""
    root = Path(root)
    if (root / "classes.txt").is_file():
        return None
    if (root / "images" / "training").is_dir() and (root / "annotations").is_dir():
        return "ade20k"
    if (root / "leftImg8bit").is_dir() and (root / "gtFine").is_dir():
        return "cityscapes"
    if (root / "images" / "train2017").is_dir() or (root / "images" / "val2017").is_dir():
        return "coco-stuff164k"
    if (root / "images" / "train2014").is_dir() or (root / "images" / "test2014").is_dir():
        return "coco-stuff10k"
    for base in (root, root / "VOC2010"):
        if (base / "SegmentationClassContext").is_dir():
            return "pascal-context"
    for base in (root, root / "VOC2012"):
        if (base / "SegmentationClass").is_dir() and (base / "JPEGImages").is_dir():
            return "voc-aug" if (base / "SegmentationClassAug").is_dir() else "voc"
    return None
