"""Issue 22, points 3 and 4: label encodings named with their fix, colour masks read through classes.txt,
`data check` over every split, Pascal VOC 2012 (+ SBD) in its official layout, and the mode of the masks
`data prepare` writes. Every dataset here is a few 6x8 files written in tmp_path."""
import os

import numpy as np
import pytest
from PIL import Image

from transeg.cli import main
from transeg.data import build_dataset
from transeg.data import classes as C
from transeg.data.folder import FolderDataset
from transeg.data.palettes import default_palette
from transeg.errors import TransegError

H, W = 6, 8


def _bands(values):
    """A HxW mask of vertical bands, one per value, so every value occurs (W / len(values) columns each)."""
    m = np.zeros((H, W), dtype=np.uint8)
    for cols, v in zip(np.array_split(np.arange(W), len(values)), values):
        m[:, cols] = v
    return m


def _folder(root, classes, masks, split=None):
    """A folder dataset: classes.txt with `classes` (a list of lines), one image per mask (masks: name ->
    uint8 [H,W] or [H,W,3] array), in images/<split>/ and masks/<split>/ when split is given."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("".join(f"{line}\n" for line in classes))
    sub = (split,) if split else ()
    (root.joinpath("images", *sub)).mkdir(parents=True, exist_ok=True)
    (root.joinpath("masks", *sub)).mkdir(parents=True, exist_ok=True)
    for i, (name, mask) in enumerate(masks.items()):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(root.joinpath("images", *sub, f"{name}.png"))
        Image.fromarray(mask).save(root.joinpath("masks", *sub, f"{name}.png"))
    return root


def _error(capsys, argv):
    """The error line of a CLI call that must exit 2 (the last line of stderr, after any progress bar)."""
    assert main(argv) == 2
    return capsys.readouterr().err.strip().splitlines()[-1].strip()


# -- B: label-encoding mistakes, named with the fix ------------------------------------------------

def test_masks_running_0_to_k_name_the_ignore_first_line(tmp_path, capsys):
    """3 classes but values 0..3 with 0 in every mask (ADE20K's 0 = unlabelled): the one line names value 3
    and says to make `ignore` the first line of classes.txt (reduce_zero_label); the same line comes from
    the dataset (training and eval read items through it) and from `data check` (exit 2). With that line
    written, 0 is ignored and 1..3 become 0..2."""
    root = _folder(tmp_path / "d", ["road", "car", "sky"], {"a": _bands([0, 1, 2, 3]), "b": _bands([0, 3])})
    expected = (f"{root / 'masks' / 'a.png'}: label value 3 is outside the 3 classes of classes.txt (allowed 0..2 and "
                f"255=ignore); values 0..3 for 3 classes look like 0 = 'unlabelled' (ADE20K style): then write `ignore` "
                f"as the first line of {root / 'classes.txt'} (reduce_zero_label: 0 is ignored, 1..3 are the classes); "
                f"if 0 is a class, a class is missing from classes.txt")
    with pytest.raises(TransegError) as e:
        FolderDataset(root)[0]
    assert str(e.value) == expected
    assert _error(capsys, ["data", "check", str(root)]) == f"transeg: error: {expected}"

    (root / "classes.txt").write_text("ignore\nroad\ncar\nsky\n")
    ds = build_dataset(str(root), "train")
    assert ds.classes == ["road", "car", "sky"] and ds.reduce_zero_label
    assert ds[0]["label"][0].tolist() == [255, 255, 0, 0, 1, 1, 2, 2]
    # the Python switch says the same, and is not applied twice on top of the `ignore` line
    assert FolderDataset(root, reduce_zero_label=True)[0]["label"][0].tolist() == [255, 255, 0, 0, 1, 1, 2, 2]


def test_an_ignore_line_anywhere_ignores_that_value(tmp_path):
    """`ignore` as the 2nd of 4 lines: value 1 is ignored, values 2 and 3 are classes 1 and 2; value 4 is
    outside the 4 lines, and the message lists which values are ignored."""
    root = _folder(tmp_path / "d", ["road", "ignore", "car", "sky"], {"a": _bands([0, 1, 2, 3])})
    ds = FolderDataset(root)
    assert ds.classes == ["road", "car", "sky"] and ds[0]["label"][0].tolist() == [0, 0, 255, 255, 1, 1, 2, 2]
    Image.fromarray(_bands([0, 4])).save(root / "masks" / "a.png")
    with pytest.raises(TransegError, match=r"a\.png: label value 4 is outside the 3 classes of classes.txt \(allowed "
                                           r"0\.\.3, the lines of classes.txt, where 1 = ignore, and 255=ignore\)$"):
        FolderDataset(root)[0]


def test_cityscapes_label_ids_where_train_ids_are_expected_are_named(tmp_path, capsys):
    """A 19-class list with masks holding Cityscapes labelIds (road 7, car 26, bicycle 33, unlabeled 0):
    values 26 and 33 are outside 0..18, and all are <= 33, the labelIds' range: the line says to use the
    *_labelTrainIds.png files or `transeg data prepare cityscapes`."""
    root = _folder(tmp_path / "d", list(C.CITYSCAPES), {"aachen": _bands([7, 26, 33, 0])})
    expected = (f"{root / 'masks' / 'aachen.png'}: label values 26, 33 are outside the 19 classes of classes.txt "
                f"(allowed 0..18 and 255=ignore); values up to 33 for 19 classes look like Cityscapes labelIds "
                f"(*_gtFine_labelIds.png) where trainIds are expected: use the *_gtFine_labelTrainIds.png files "
                f"(`transeg data prepare cityscapes RAW OUT` writes them), or name the Cityscapes folder as the "
                f"benchmark, cityscapes:PATH, which maps labelIds")
    assert _error(capsys, ["data", "check", str(root)]) == f"transeg: error: {expected}"
    # a value beyond 33 is no labelId: the plain message, no guess
    Image.fromarray(_bands([7, 40])).save(root / "masks" / "aachen.png")
    with pytest.raises(TransegError) as e:
        FolderDataset(root)[0]
    assert str(e.value).endswith("label value 40 is outside the 19 classes of classes.txt (allowed 0..18 and 255=ignore)")


def test_rgb_mask_without_colours_says_to_give_them(tmp_path):
    """An RGB mask and a classes.txt of bare names: the line says to convert it or give the colours; with
    only some colours given it names the classes that lack one."""
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[:, 4:] = (128, 64, 128)
    root = _folder(tmp_path / "d", ["road", "car"], {"a": rgb})
    with pytest.raises(TransegError) as e:
        FolderDataset(root)[0]
    assert str(e.value) == (f"{root / 'masks' / 'a.png'}: is an RGB colour mask; convert it to a single-channel index "
                            f"PNG (mode L or P) whose pixel values are class indices, or give each class its colour in "
                            f"{root / 'classes.txt'} to read colour masks (`road R G B`, the colour its pixels have)")
    (root / "classes.txt").write_text("road 128 64 128\ncar\n")
    with pytest.raises(TransegError, match=r"read colour masks: 'car' has none \(`car R G B`\)$"):
        FolderDataset(root)[0]


# -- C: colour masks with a palette in classes.txt -------------------------------------------------

def test_colour_masks_give_the_labels_of_the_same_index_masks(tmp_path):
    """The same two masks as index PNGs (values 0..3, 255) and as RGB / RGBA colour PNGs with the colours of
    classes.txt: identical labels. Black is a class here (background 0 0 0: no colour is special), and
    white is named `ignore 255 255 255` (the 4th line: as an index, value 3 is ignored too)."""
    colours = {"background": (0, 0, 0), "road": (128, 64, 128), "car": (0, 0, 142), "ignore": (255, 255, 255)}
    index_masks = {"a": _bands([0, 1, 2, 3]), "b": _bands([2, 255, 1, 0])}
    lut = np.zeros((256, 3), np.uint8)
    lut[:4] = list(colours.values())
    lut[255] = (255, 255, 255)
    rgb_masks = {"a": lut[index_masks["a"]],
                 "b": np.concatenate([lut[index_masks["b"]], np.full((H, W, 1), 255, np.uint8)], axis=2)}  # RGBA
    by_index = FolderDataset(_folder(tmp_path / "index", list(colours), index_masks))
    by_colour = FolderDataset(_folder(tmp_path / "colour", [f"{n} {r} {g} {b}" for n, (r, g, b) in colours.items()],
                                      rgb_masks))
    assert by_colour.classes == by_index.classes == ["background", "road", "car"]
    assert by_colour.palette == [(0, 0, 0), (128, 64, 128), (0, 0, 142)]
    for i in range(2):
        assert by_colour[i]["label"].tolist() == by_index[i]["label"].tolist()
    assert by_colour[0]["label"][0].tolist() == [0, 0, 1, 1, 2, 2, 255, 255]
    s = by_colour.check(progress=False)
    # each class one 2-column band (12 pixels) per mask; ignored: a's white band and b's 255 band
    assert s["class_pixels"] == [12 + 12, 12 + 12, 12 + 12] and s["ignore_pixels"] == 12 + 12


def test_an_unlisted_colour_is_named_with_the_nearest_listed_ones(tmp_path, capsys):
    """A colour no line lists (130 60 128, 12 pixels: two columns of six) is one line naming the file, the
    colour, its pixel count and the two nearest listed colours; black unlisted is no exception."""
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[:, :2] = (128, 64, 128)
    rgb[:, 2:4] = (130, 60, 128)
    rgb[:, 4:] = (0, 0, 142)
    root = _folder(tmp_path / "d", ["road 128 64 128", "car 0 0 142", "sky 70 130 180"], {"a": rgb})
    assert _error(capsys, ["data", "check", str(root)]) == (
        f"transeg: error: {root / 'masks' / 'a.png'}: colour 130 60 128 (12 pixels) is not listed in {root / 'classes.txt'}; "
        f"nearest listed: road 128 64 128, sky 70 130 180; add it as a class or as `ignore 130 60 128`")
    rgb[:, 2:4] = 0
    rgb[0, 0] = (1, 2, 3)
    Image.fromarray(rgb).save(root / "masks" / "a.png")
    with pytest.raises(TransegError, match=r"colour 0 0 0 \(12 pixels\) is not listed .*\(and 1 other unlisted colour: "
                                           r"a resized or lossy-saved mask"):
        FolderDataset(root)[0]


def test_two_classes_with_one_colour_are_refused_when_a_colour_mask_is_read(tmp_path):
    root = _folder(tmp_path / "d", ["road 1 2 3", "car 1 2 3"], {"a": np.full((H, W, 3), 1, np.uint8)})
    with pytest.raises(TransegError, match=r"classes.txt: 'road' and 'car' share the colour 1 2 3; colour masks need "
                                           r"one colour per class$"):
        FolderDataset(root)[0]


# -- A: data check over every split ------------------------------------------------------------------

def test_data_check_checks_every_split_unless_one_is_named(tmp_path, capsys):
    """images/train and images/val: both summaries (2 and 1 pairs), the class weights once (train's), and a
    bad mask in val is found although train is fine; --split train checks train alone."""
    root = _folder(tmp_path / "d", ["road", "car"], {"a": _bands([0, 1]), "b": _bands([0, 0, 0, 1])}, split="train")
    _folder(root, ["road", "car"], {"c": _bands([1, 255])}, split="val")
    assert main(["data", "check", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"FolderDataset({str(root)!r}, split='train', 2 images, 2 classes)" in out
    assert f"FolderDataset({str(root)!r}, split='val', 1 images, 2 classes)" in out
    assert "2 image/mask pairs" in out and "1 image/mask pairs" in out and "ignored: 50.0% of pixels" in out
    assert out.count("class weights of") == 1
    assert out.rstrip().endswith("all masks match their images and hold only allowed values (splits checked: train, val)")

    Image.fromarray(_bands([1, 7])).save(root / "masks" / "val" / "c.png")
    assert _error(capsys, ["data", "check", str(root)]).startswith(f"transeg: error: {root / 'masks' / 'val' / 'c.png'}: label value 7")
    assert main(["data", "check", str(root), "--split", "train"]) == 0
    assert "split='val'" not in capsys.readouterr().out


# -- D: Pascal VOC 2012 and the SBD augmented set ---------------------------------------------------

def _voc(root, aug=False):
    """VOCdevkit/VOC2012 in miniature: 3 train + 1 val images with palette masks (0 = background, 255 =
    border); with aug, SBD's masks for 2 more images and mmseg's aug.txt (which holds train's ids too)."""
    voc = root / "VOC2012"
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "SegmentationClass").mkdir()
    (voc / "JPEGImages").mkdir()
    palette = [v for c in default_palette(256) for v in c]
    ids = {"train": ["2007_000001", "2007_000002", "2007_000003"], "val": ["2007_000004"]}
    extra = ["2008_000010", "2008_000011"] if aug else []
    for n, i in enumerate(ids["train"] + ids["val"] + extra):
        Image.fromarray(np.random.default_rng(n).integers(0, 255, (H, W, 3), dtype=np.uint8)).save(voc / "JPEGImages" / f"{i}.jpg")
    for n, i in enumerate(ids["train"] + ids["val"]):
        m = Image.fromarray(_bands([0, 15, 255, n + 1]), mode="P")  # background, person, border, a class
        m.putpalette(palette)
        m.save(voc / "SegmentationClass" / f"{i}.png")
    for split, names in ids.items():
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i in names))
    if aug:
        (voc / "SegmentationClassAug").mkdir()
        for i in extra + ids["train"][:1]:
            Image.fromarray(_bands([0, 20])).save(voc / "SegmentationClassAug" / f"{i}.png")
        # the val image listed by mistake is left out of training
        (voc / "ImageSets" / "Segmentation" / "aug.txt").write_text("".join(f"{i}\n" for i in ids["train"] + extra + ids["val"]))
    return root


def test_pascal_voc_2012_official_layout(tmp_path, capsys):
    """21 classes with background, VOC's palette, palette PNGs read as indices, 255 borders ignored;
    the folder is recognised as `voc`, and `data check` covers train (3) and val (1)."""
    root = _voc(tmp_path / "VOCdevkit")
    ds = build_dataset(str(root), "train")
    assert type(ds).__name__ == "PascalVOC" and len(ds) == 3 and len(build_dataset(f"voc:{root}", "val")) == 1
    assert ds.classes == list(C.PASCAL_VOC) and ds.classes[15] == "person" and len(ds.classes) == 21
    assert [tuple(c) for c in ds.palette[:3]] == [(0, 0, 0), (128, 0, 0), (0, 128, 0)]
    assert ds[1]["label"][0].tolist() == [0, 0, 15, 15, 255, 255, 2, 2]
    assert main(["data", "check", str(root)]) == 0
    out = capsys.readouterr().out
    assert "PascalVOC(" in out and "split='train', 3 images" in out and "split='val', 1 images" in out


def test_pascal_voc_with_the_sbd_augmented_set(tmp_path):
    """SegmentationClassAug/ makes it `voc-aug`: train = train.txt + aug.txt, once each, without the val image
    aug.txt lists (3 + 2 = 5 images); an image VOC annotates keeps VOC's mask (with its borders), the others
    take SBD's; val is VOC's."""
    root = _voc(tmp_path / "VOCdevkit", aug=True)
    ds = build_dataset(str(root), "train")
    assert type(ds).__name__ == "PascalVOCAug" and len(ds) == 5
    assert [p.stem for p, _ in ds.samples] == ["2007_000001", "2007_000002", "2007_000003", "2008_000010", "2008_000011"]
    assert ds.samples[0][1].parent.name == "SegmentationClass" and ds.samples[3][1].parent.name == "SegmentationClassAug"
    assert ds[3]["label"][0].tolist() == [0, 0, 0, 0, 20, 20, 20, 20]
    assert len(build_dataset(f"voc-aug:{root}", "val")) == 1 and len(build_dataset(f"voc:{root}", "train")) == 3
    os.unlink(root / "VOC2012" / "ImageSets" / "Segmentation" / "aug.txt")
    with pytest.raises(TransegError, match=r"VOC2012: no list of the augmented training set \(ImageSets/Segmentation/aug.txt"):
        build_dataset(str(root), "train")


# -- E: masks written by data prepare are readable by others ---------------------------------------

def test_prepared_masks_have_plain_permissions(tmp_path):
    """Under umask 022 a plain open() makes 0644 files; `_save_png` wrote through mkstemp (0600), so every
    prepared mask was private to its writer. It is now 0644, like the images beside it."""
    gt = tmp_path / "raw" / "gtFine" / "train" / "aachen"
    gt.mkdir(parents=True)
    Image.fromarray(np.full((H, W), 7, np.uint8)).save(gt / "aachen_000000_000019_gtFine_labelIds.png")
    (tmp_path / "raw" / "leftImg8bit" / "train" / "aachen").mkdir(parents=True)
    old = os.umask(0o022)
    try:
        assert main(["data", "prepare", "cityscapes", str(tmp_path / "raw"), str(tmp_path / "out")]) == 0
    finally:
        os.umask(old)
    mask = tmp_path / "out" / "gtFine" / "train" / "aachen" / "aachen_000000_000019_gtFine_labelTrainIds.png"
    assert oct(mask.stat().st_mode & 0o777) == "0o644"
