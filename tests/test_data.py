"""transeg.data: transforms (SegFormer / mmseg pipeline math), synthetic set, folder datasets, build_dataset, prepare."""
import hashlib
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import _error
from transeg.cli import main
from transeg.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FolderDataset,
    SyntheticDataset,
    TestTransform,
    TrainTransform,
    build_dataset,
    default_palette,
)
from transeg.data.transforms import (
    hsv_to_rgb_u8,
    normalize,
    photometric_distortion,
    random_crop_box,
    rescale_size,
    resize_label,
    rgb_to_hsv_u8,
)
from transeg.errors import TransegError


def _image(h, w, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (3, h, w), dtype=np.uint8))


class CountingRng:
    """Wraps a Generator and counts integers() calls (one call per crop offset)."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.integer_calls = 0

    def integers(self, *a, **k):
        self.integer_calls += 1
        return self.rng.integers(*a, **k)

    def __getattr__(self, name):
        return getattr(self.rng, name)


class ScriptedRng:
    """Returns scripted values from integers() / uniform() in call order."""

    def __init__(self, ints, uniforms):
        self.ints, self.uniforms = list(ints), list(uniforms)

    def integers(self, *a, **k):
        return self.ints.pop(0)

    def uniform(self, *a, **k):
        return self.uniforms.pop(0)


# ---------------------------------------------------------------------------------------------
# resize math


def test_rescale_size_640x480_to_2048x512():
    # factor = min(2048/640, 512/480) = 1.0667 -> w = int(640*1.0667 + 0.5) = int(683.17) = 683, h = 512
    assert rescale_size((640, 480), (2048, 512)) == (683, 512)
    # the bound is orientation-free: portrait 480x640 -> 512x683
    assert rescale_size((480, 640), (512, 2048)) == (512, 683)


def test_test_transform_aligned_resize():
    img = _image(480, 640)
    # keep-ratio to 683x512, then stretched to ceil(683/32)*32 = 704 wide, 512 high
    out = TestTransform()(img)
    assert out.shape == (3, 512, 704) and out.dtype == torch.float32
    # without AlignedResize the size stays 683x512
    assert TestTransform(size_divisor=None)(img).shape == (3, 512, 683)
    # portrait 480 wide x 640 high -> 512 x 683 -> aligned 512 x 704
    assert TestTransform()(_image(640, 480)).shape == (3, 704, 512)
    assert TestTransform().output_size((480, 640)) == (512, 704)


def test_train_resize_ratio_one_and_half():
    img, lab = _image(480, 640), torch.zeros(480, 640, dtype=torch.int64)
    # ratio 1: target (2048, 512) -> 683x512 as in mmcv
    im, lb = TrainTransform(ratio_range=(1.0, 1.0)).resize(img, lab, np.random.default_rng(0))
    assert im.shape == (3, 512, 683) and lb.shape == (512, 683) and im.dtype == torch.uint8
    # ratio 0.5: target (1024, 256) -> factor min(1024/640, 256/480) = 0.5333 -> 341x256
    im, _ = TrainTransform(ratio_range=(0.5, 0.5)).resize(img, lab, np.random.default_rng(0))
    assert im.shape == (3, 256, 341)


def test_train_resize_samples_ratio_from_rng():
    img, lab = _image(480, 640), torch.zeros(480, 640, dtype=torch.int64)
    twin = np.random.default_rng(7)
    ratio = twin.random() * 1.5 + 0.5  # mmseg: random_sample() * (max - min) + min
    w, h = rescale_size((640, 480), (int(2048 * ratio), int(512 * ratio)))
    im, _ = TrainTransform().resize(img, lab, np.random.default_rng(7))
    assert im.shape == (3, h, w)


def test_label_resize_is_opencv_nearest():
    lab = torch.tensor([[0, 1], [2, 3]])
    # 2 -> 4: source index floor(x * 2/4) = 0,0,1,1
    assert resize_label(lab, (4, 4)).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    # 4 -> 3: source index floor(x * 4/3) = 0, 1, 2
    row = torch.arange(4).view(1, 4)
    assert resize_label(row, (1, 3)).tolist() == [[0, 1, 2]]


# ---------------------------------------------------------------------------------------------
# random crop with cat_max_ratio


def test_crop_single_class_uses_eleventh_box():
    lab = torch.zeros(100, 100, dtype=torch.int64)
    twin = np.random.default_rng(3)
    boxes = [(int(twin.integers(0, 51)), int(twin.integers(0, 51))) for _ in range(11)]
    y1, _, x1, _ = random_crop_box(lab, (50, 50), np.random.default_rng(3), cat_max_ratio=0.75)
    # one class never passes: 10 rejected tries, then mmseg draws an 11th box and keeps it unchecked
    assert (y1, x1) == boxes[10]
    # with cat_max_ratio = 1 there is no check: the first box
    y1, _, x1, _ = random_crop_box(lab, (50, 50), np.random.default_rng(3), cat_max_ratio=1.0)
    assert (y1, x1) == boxes[0]


@pytest.mark.parametrize(
    "values, boxes_drawn",
    [
        ([0] * 12 + [1] * 4, 11),  # 12/16 = 0.75 is not < 0.75: rejected every time -> 11 boxes drawn
        ([0] * 11 + [1] * 5, 1),  # 11/16 = 0.69 < 0.75: the first box is accepted
        ([0] * 2 + [1] + [255] * 13, 1),  # ignore left out: 2/3 = 0.67 -> accepted (13/16 if it counted)
        ([0] * 4 + [255] * 12, 11),  # one non-ignore class only: rejected
    ],
)
def test_crop_condition_mirrors_mmseg(values, boxes_drawn):
    lab = torch.tensor(values).view(4, 4)
    rng = CountingRng(0)
    random_crop_box(lab, (4, 4), rng, cat_max_ratio=0.75)  # crop = whole label, so every box is the same
    assert rng.integer_calls == 2 * boxes_drawn  # two offsets (y, x) per box


# ---------------------------------------------------------------------------------------------
# the whole training pipeline


def _plain(**kw):
    # no resize, no photometric: the geometry is easy to follow
    args = dict(scale=None, ratio_range=None, photometric=False, flip_prob=0.0)
    args.update(kw)
    return TrainTransform(**args)


def test_pad_values_after_normalize():
    img = _image(40, 50)
    lab = torch.randint(0, 3, (40, 50))
    out, lb = _plain(crop_size=(64, 64))(img, lab, np.random.default_rng(0))
    assert out.shape == (3, 64, 64) and lb.shape == (64, 64) and lb.dtype == torch.int64
    assert torch.allclose(out[:, :40, :50], normalize(img))
    assert (out[:, 40:, :] == 0).all() and (out[:, :, 50:] == 0).all()  # image padded with 0 after Normalize
    assert (lb[40:, :] == 255).all() and (lb[:, 50:] == 255).all()  # label padded with ignore
    assert torch.equal(lb[:40, :50], lab)


def test_flip_is_joint():
    img = _image(32, 48)
    lab = torch.arange(48).repeat(32, 1) % 7
    out, lb = _plain(crop_size=(32, 48), flip_prob=1.0)(img, lab, np.random.default_rng(0))
    assert torch.equal(lb, lab.flip(-1)) and torch.allclose(out, normalize(img.flip(-1)))
    out, lb = _plain(crop_size=(32, 48), flip_prob=0.0)(img, lab, np.random.default_rng(0))
    assert torch.equal(lb, lab) and torch.allclose(out, normalize(img))


def test_photometric_keeps_labels_and_changes_pixels():
    img, lab = _image(96, 128), torch.randint(0, 4, (96, 128))
    changed = 0
    for seed in range(5):
        a_img, a_lab = TrainTransform(crop_size=(64, 64), scale=None)(img, lab, np.random.default_rng(seed))
        b_img, b_lab = TrainTransform(crop_size=(64, 64), scale=None, photometric=False)(
            img, lab, np.random.default_rng(seed))
        assert torch.equal(a_lab, b_lab)  # photometric draws come after all geometric ones
        changed += int(not torch.equal(a_img, b_img))
    assert changed >= 3  # each of 4 steps fires with p=1/2: all 5 seeds unchanged would be odd


def test_train_transform_deterministic_given_rng():
    img, lab = _image(120, 160), torch.randint(0, 4, (120, 160))
    tt = TrainTransform(crop_size=(64, 64), scale=(256, 128))
    a = tt(img, lab, np.random.default_rng([1, 2, 3]))
    b = tt(img, lab, np.random.default_rng([1, 2, 3]))
    c = tt(img, lab, np.random.default_rng([1, 2, 4]))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].shape == (3, 64, 64) and a[0].dtype == torch.float32


def test_normalize_imagenet():
    img = torch.full((3, 1, 1), 255, dtype=torch.uint8)
    out = normalize(img, IMAGENET_MEAN, IMAGENET_STD).flatten()
    # (255 - 123.675) / 58.395 = 2.24890, (255 - 116.28) / 57.12 = 2.42857, (255 - 103.53) / 57.375 = 2.64000
    assert torch.allclose(out, torch.tensor([2.24890, 2.42857, 2.64000]), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# OpenCV 8-bit HSV and PhotoMetricDistortion


def test_hsv_known_values():
    rgb = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [30, 20, 10], [128, 128, 128]], dtype=torch.uint8)
    hsv = rgb_to_hsv_u8(rgb.T.reshape(3, 1, 5))[:, 0].T.tolist()
    # H is degrees / 2: red 0, green 60, blue 120; (30,20,10): H = 30*(20-10)/20 = 15, S = 255*20/30 = 170
    assert hsv == [[0, 255, 255], [60, 255, 255], [120, 255, 255], [15, 170, 30], [0, 0, 128]]
    assert hsv_to_rgb_u8(torch.tensor(hsv).T.reshape(3, 1, 5))[:, 0].T.tolist() == rgb.tolist()


def test_photometric_brightness_then_contrast_last_truncates():
    img = torch.tensor([250, 100], dtype=torch.uint8).view(1, 1, 2).repeat(3, 1, 1)
    # brightness on (+10.7), mode 0 (contrast last), saturation off, hue off, contrast on (x0.5):
    # 250 -> 260.7 -> clip 255 -> x0.5 = 127.5 -> 127;  100 -> 110.7 -> 110 -> x0.5 = 55
    rng = ScriptedRng(ints=[1, 0, 0, 0, 1], uniforms=[10.7, 0.5])
    assert photometric_distortion(img, rng)[0, 0].tolist() == [127, 55]


def test_photometric_contrast_second():
    img = torch.tensor([100], dtype=torch.uint8).view(1, 1, 1).repeat(3, 1, 1)
    # brightness off, mode 1 (contrast right away, x1.5 -> 150), saturation off, hue off
    rng = ScriptedRng(ints=[0, 1, 1, 0, 0], uniforms=[1.5])
    assert photometric_distortion(img, rng).flatten().tolist() == [150, 150, 150]


def test_photometric_hue_wraps_modulo_180():
    red = torch.tensor([255, 0, 0], dtype=torch.uint8).view(3, 1, 1)
    # only hue, by -18: H 0 -> 162 (wrapped, not clipped) = 324 degrees, a pink;
    # B = 255 * (1 - 0.4) = 153 exactly, but OpenCV's float32 SIMD path gives 152.99997 and truncates: 152
    rng = ScriptedRng(ints=[0, 0, 0, 1, -18, 0], uniforms=[])
    assert photometric_distortion(red, rng).flatten().tolist() == [255, 0, 152]


def test_photometric_saturation_zero_gives_grey():
    img = torch.tensor([200, 100, 50], dtype=torch.uint8).view(3, 1, 1)
    # only saturation, x0.0: S -> 0 so R = G = B = V = 200
    rng = ScriptedRng(ints=[0, 0, 1, 0, 0], uniforms=[0.0])
    assert photometric_distortion(img, rng).flatten().tolist() == [200, 200, 200]


# ---------------------------------------------------------------------------------------------
# synthetic dataset


def test_synthetic_item_format_and_determinism():
    a = SyntheticDataset("val")
    b = SyntheticDataset("val")
    s, t = a[3], b[3]
    assert s["image"].shape == (3, 128, 128) and s["image"].dtype == torch.uint8
    assert s["label"].shape == (128, 128) and s["label"].dtype == torch.int64
    assert torch.equal(s["image"], t["image"]) and torch.equal(s["label"], t["label"])
    assert not torch.equal(SyntheticDataset("train")[3]["image"], s["image"])  # disjoint split streams
    assert not torch.equal(SyntheticDataset("val", seed=1)[3]["image"], s["image"])
    assert len(SyntheticDataset("train")) == 2000 and len(a) == 100  # documented defaults
    assert a.classes == ["sky", "ground", "disc", "box", "triangle", "ring"] and a.ignore_index == 255


@pytest.mark.integration
def test_synthetic_identical_in_another_process():
    code = ("import hashlib; from transeg.data import SyntheticDataset; s = SyntheticDataset('val')[7]; "
            "print(hashlib.sha256(s['image'].numpy().tobytes() + s['label'].numpy().tobytes()).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    s = SyntheticDataset("val")[7]
    assert out == hashlib.sha256(s["image"].numpy().tobytes() + s["label"].numpy().tobytes()).hexdigest()


def test_synthetic_val_class_frequencies():
    ds = SyntheticDataset("val")
    counts = np.zeros(6)
    for i in range(len(ds)):
        counts += np.bincount(ds[i]["label"].flatten().numpy(), minlength=6)
    freq = counts / counts.sum()
    # measured: sky 0.369, ground 0.482, disc 0.043, box 0.036, triangle 0.041, ring 0.029
    assert (freq > 0.005).all()  # every class clearly present in the 100 val images
    assert freq.max() < 0.6  # no class dominates
    assert 0.08 < freq[2:].sum() < 0.2  # objects take 8-20 % of the pixels (measured 15 %)


# ---------------------------------------------------------------------------------------------
# folder datasets


def _write_sample(root, name, mask, split=None, image=None, ext=".png"):
    h, w = mask.shape
    img_dir, mask_dir = root / "images", root / "masks"
    if split:
        img_dir, mask_dir = img_dir / split, mask_dir / split
    img_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    if image is None:
        image = np.random.default_rng(len(name)).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(image).save(img_dir / f"{name}{ext}")
    Image.fromarray(mask.astype(np.uint8), mode="L").save(mask_dir / f"{name}.png")


def _folder(tmp_path, n=3, classes="a\nb 10 20 30\nc\nd\ne\n", shape=(8, 12)):
    (tmp_path / "classes.txt").write_text(classes)
    for i in range(n):
        mask = np.full(shape, i % 5, dtype=np.uint8)
        mask[0, 0] = 255
        _write_sample(tmp_path, f"img_{i:03d}", mask)
    return tmp_path


def test_folder_reads_images_masks_classes(tmp_path):
    ds = FolderDataset(_folder(tmp_path))  # 3 image/mask pairs, 5 classes; mask i is filled with i, (0,0) = 255
    assert len(ds) == 3 and ds.classes == ["a", "b", "c", "d", "e"]
    # class b has its own colour; the others take the VOC palette at their index
    assert ds.palette[1] == (10, 20, 30) and ds.palette[2] == default_palette(5)[2]
    s = ds[2]
    assert s["name"] == "img_002" and s["image"].shape == (3, 8, 12) and s["image"].dtype == torch.uint8
    assert s["label"].dtype == torch.int64 and s["label"][0, 0] == 255 and s["label"][1, 1] == 2


def test_folder_wrong_label_value_names_the_file(tmp_path):
    root = _folder(tmp_path)
    mask = np.zeros((8, 12), dtype=np.uint8)
    mask[3, 3] = 17
    _write_sample(root, "img_003", mask)
    ds = FolderDataset(root)
    expected = "img_003.png: label value 17 is outside the 5 classes of classes.txt (allowed 0..4 and 255=ignore)"
    with pytest.raises(TransegError, match=expected.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        ds[3]
    with pytest.raises(TransegError, match="img_003.png: label value 17"):
        ds.check(progress=False)


def test_folder_missing_mask_and_orphan_mask(tmp_path):
    # 1 image without a mask, then 1 mask without an image: both refused at construction
    root = _folder(tmp_path)
    Image.fromarray(np.zeros((8, 12, 3), np.uint8)).save(root / "images" / "lonely.jpg")
    with pytest.raises(TransegError, match=r"no mask for 1 image\(s\) \(lonely.jpg\)"):
        FolderDataset(root)
    (root / "images" / "lonely.jpg").unlink()
    Image.fromarray(np.zeros((8, 12), np.uint8)).save(root / "masks" / "orphan.png")
    with pytest.raises(TransegError, match=r"no image for 1 mask\(s\) \(orphan.png\)"):
        FolderDataset(root)


def test_folder_size_mismatch(tmp_path):
    # the mask is 12x6 (WxH), its image 12x8
    root = _folder(tmp_path)
    Image.fromarray(np.zeros((6, 12), np.uint8)).save(root / "masks" / "img_001.png")
    with pytest.raises(TransegError, match=r"img_001.png: mask is 12x6 \(WxH\) but its image img_001.png is 12x8"):
        FolderDataset(root)[1]
    with pytest.raises(TransegError, match="img_001.png: mask is 12x6"):
        FolderDataset(root).check(progress=False, decode_images=False)


def test_folder_rgb_mask_is_an_error(tmp_path):
    # a colour mask would be read as 3 channels: refused with a hint to convert it
    root = _folder(tmp_path)
    Image.fromarray(np.zeros((8, 12, 3), np.uint8)).save(root / "masks" / "img_000.png")
    with pytest.raises(TransegError, match="img_000.png: is an RGB colour mask; convert it to a single-channel index PNG"):
        FolderDataset(root)[0]


def test_folder_truncated_image(tmp_path):
    # half of a PNG: Pillow fails while decoding; both __getitem__ and check() name the file
    root = _folder(tmp_path)
    path = root / "images" / "img_001.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TransegError, match="img_001.png: cannot read the image"):
        FolderDataset(root)[1]
    with pytest.raises(TransegError, match="img_001.png: cannot read the image"):
        FolderDataset(root).check(progress=False)


def test_folder_layout_errors(tmp_path):
    # each missing piece is named in turn: the root, classes.txt, the images, then a duplicate class on line 3
    with pytest.raises(TransegError, match="nowhere: no such folder"):
        FolderDataset(tmp_path / "nowhere")
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(TransegError, match="classes.txt: missing"):
        FolderDataset(tmp_path)
    (tmp_path / "classes.txt").write_text("a\nb\n")
    with pytest.raises(TransegError, match="images: no images"):
        FolderDataset(tmp_path)
    (tmp_path / "classes.txt").write_text("a\nb\na\n")
    with pytest.raises(TransegError, match=r"classes.txt:3: class 'a' is listed twice"):
        FolderDataset(tmp_path)


def test_folder_palette_mask_reads_indices(tmp_path):
    root = _folder(tmp_path, n=1)
    m = Image.fromarray(np.array([[0, 1, 2, 3]] * 2, np.uint8), mode="P")
    m.putpalette([255, 255, 255, 10, 200, 30, 7, 7, 7, 90, 0, 90] + [0] * 756)  # colours that are not the indices
    _write_sample(root, "img_000", np.zeros((2, 4)))
    m.save(root / "masks" / "img_000.png")
    assert FolderDataset(root)[0]["label"][0].tolist() == [0, 1, 2, 3]


def test_folder_reduce_zero_label(tmp_path):
    (tmp_path / "classes.txt").write_text("a\nb\nc\n")
    _write_sample(tmp_path, "x", np.array([[0, 1, 2, 3, 255]]))
    # ADE20K convention: 0 -> ignore, v -> v - 1, 255 stays ignore
    assert FolderDataset(tmp_path, reduce_zero_label=True)[0]["label"].tolist() == [[255, 0, 1, 2, 255]]
    _write_sample(tmp_path, "x", np.array([[0, 1, 2, 3, 4]]))
    with pytest.raises(TransegError, match=r"label value 4 is outside the 3 classes .*reduce_zero_label"):
        FolderDataset(tmp_path, reduce_zero_label=True)[0]


def test_folder_exif_rotation(tmp_path):
    (tmp_path / "classes.txt").write_text("a\nb\n")
    raw = np.zeros((10, 20, 3), np.uint8)  # stored 20 wide x 10 high
    raw[0, 0] = (255, 0, 0)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(raw).save(tmp_path / "images" / "r.png", exif=exif)
    Image.fromarray(np.zeros((20, 10), np.uint8)).save(tmp_path / "masks" / "r.png")  # mask as displayed
    ds = FolderDataset(tmp_path)
    img = ds[0]["image"]
    # displayed 10 wide x 20 high; the stored top-left pixel ends up top-right
    assert img.shape == (3, 20, 10) and img[:, 0, 9].tolist() == [255, 0, 0]
    assert ds.check(progress=False, decode_images=False)["max_size"] == (20, 10)


def test_folder_splits(tmp_path):
    # train/ holds 2 pairs, val/ 1; "test" is not there, and no split at all is ambiguous
    (tmp_path / "classes.txt").write_text("a\nb\n")
    for split, names in (("train", ["t1", "t2"]), ("val", ["v1"])):
        for n in names:
            _write_sample(tmp_path, n, np.zeros((4, 4)), split=split)
    assert [s[0].stem for s in FolderDataset(tmp_path, "val").samples] == ["v1"]
    assert len(FolderDataset(tmp_path, "train")) == 2
    with pytest.raises(TransegError, match=r"no such split folder \(found: train, val\)"):
        FolderDataset(tmp_path, "test")
    with pytest.raises(TransegError, match="holds split folders"):
        FolderDataset(tmp_path)


def test_folder_without_split_folders_serves_every_split(tmp_path):
    root = _folder(tmp_path)  # flat layout with 3 pairs: "train" and "val" both see all 3
    assert len(FolderDataset(root, "train")) == len(FolderDataset(root, "val")) == 3


def test_folder_check_summary(tmp_path):
    (tmp_path / "classes.txt").write_text("a\nb\nc\n")
    _write_sample(tmp_path, "p", np.array([[0, 0, 1, 255]]))
    _write_sample(tmp_path, "q", np.array([[0, 1, 1, 1]]))
    info = FolderDataset(tmp_path).check(progress=False)
    # a: 2 + 1 = 3 pixels, b: 1 + 3 = 4, c: none; one ignore pixel; 8 pixels in all
    assert info["class_pixels"] == [3, 4, 0] and info["ignore_pixels"] == 1 and info["total_pixels"] == 8
    assert info["absent_classes"] == ["c"] and info["class_images"] == [2, 2, 0] and info["num_images"] == 2
    assert info["min_size"] == info["max_size"] == (1, 4) and info["label_values"] == [0, 1, 255]


def test_folder_16bit_grey_image_scaled(tmp_path):
    (tmp_path / "classes.txt").write_text("a\n")
    _write_sample(tmp_path, "g", np.zeros((1, 2)))
    Image.fromarray(np.array([[65535, 257 * 100]], dtype=np.uint16)).save(tmp_path / "images" / "g.png")
    # 16-bit values are divided by 257: 65535 -> 255, 25700 -> 100 (not clipped at 255)
    assert FolderDataset(tmp_path)[0]["image"][:, 0].T.tolist() == [[255, 255, 255], [100, 100, 100]]


# ---------------------------------------------------------------------------------------------
# build_dataset and palettes


def test_build_dataset_specs(tmp_path):
    # None / "" / "synthetic" -> 100 val samples (the documented default); options set n, size, seed
    for spec in (None, "", "synthetic"):
        ds = build_dataset(spec, "val")
        assert isinstance(ds, SyntheticDataset) and len(ds) == 100
    ds = build_dataset("synthetic:size=96,n=5,seed=3", "train")
    assert len(ds) == 5 and ds.size == (96, 96) and ds.seed == 3
    assert build_dataset("synthetic:size=64x32,n=2")[0]["image"].shape == (3, 64, 32)
    with pytest.raises(TransegError, match="unknown option 'colour=red'"):
        build_dataset("synthetic:colour=red")
    assert isinstance(build_dataset(str(_folder(tmp_path)), "train"), FolderDataset)
    with pytest.raises(TransegError, match=r"--data /no/such/place: no such directory \(give a folder"):
        build_dataset("/no/such/place")


def test_default_palette_is_voc():
    pal = default_palette(256)
    # VOC bit interleave: 1 -> (128,0,0), 2 -> (0,128,0), 3 -> (128,128,0), 4 -> (0,0,128), 8 -> (64,0,0)
    assert pal[:5] == [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128)] and pal[8] == (64, 0, 0)
    assert len(set(pal)) == 256


# ---------------------------------------------------------------------------------------------
# the augmentation's statistics over many draws (the recipes' specification: ratio U(0.5, 2),
# cat_max_ratio 0.75 with 10 retries, flip p = 0.5)


def test_augmentation_statistics_match_the_specification():
    rng = np.random.default_rng(2024)
    t = TrainTransform(scale=(64, 16), ratio_range=(0.5, 2.0))
    img, lab = _image(48, 64), torch.zeros(48, 64, dtype=torch.int64)
    # resize: the short side becomes int(16 r) with r ~ U(0.5, 2): 8..32, a third of the draws below 16
    shorts = np.array([t.resize(img, lab, rng)[0].shape[1] for _ in range(3000)])
    assert shorts.min() >= 8 and shorts.max() <= 32
    assert abs((shorts < 16).mean() - 1 / 3) < 0.03  # 3.5 sigma of 3000 draws
    assert abs(shorts.mean() - 19.5) < 0.3  # E[int(16 r)] = 20 - 0.5

    # flip: p = 0.5
    flips = np.mean([bool(t.flip(img, lab, rng)[0][0, 0, 0] != img[0, 0, 0]) for _ in range(4000)])
    assert abs(flips - 0.5) < 0.03

    # cat_max_ratio: left 80% class 0, right 20% class 1; a 50x50 crop of 100x100 passes (max share < 0.75)
    # only when x1 >= 43, p = 8/51 per box; 10 tries + an unchecked 11th box pass with 1 - (1 - p)^11 = 0.847
    # (a single unchecked box would pass 15.7% of the time)
    lab = torch.zeros(100, 100, dtype=torch.int64)
    lab[:, 80:] = 1
    passed = []
    for _ in range(2000):
        y1, y2, x1, x2 = random_crop_box(lab, (50, 50), rng, cat_max_ratio=0.75)
        share = torch.bincount(lab[y1:y2, x1:x2].flatten(), minlength=2).max().item() / 2500
        passed.append(share < 0.75)
    p = 8 / 51
    assert abs(np.mean(passed) - (1 - (1 - p) ** 11)) < 0.03


def test_summarize_reads_a_generated_dataset_like_a_folder_check():
    """transeg.data.summarize: FolderDataset.check's summary for data that has no files: 4 images of
    32x32 = 4096 pixels, the synthetic set's 6 classes, nothing ignored, sky and ground in every image."""
    from transeg.data import summarize

    s = summarize(SyntheticDataset("val", num_samples=4, size=32), progress=False)
    assert (s["num_images"], s["total_pixels"], s["ignore_pixels"]) == (4, 4096, 0)
    assert s["classes"] == ["sky", "ground", "disc", "box", "triangle", "ring"] and sum(s["class_pixels"]) == 4096
    assert s["class_images"][:2] == [4, 4] and s["min_size"] == s["max_size"] == (32, 32)


def test_data_check_on_the_synthetic_set_gives_its_summary(capsys):
    """`transeg data check synthetic:...` ended in AttributeError; it now summarises the generated split
    like a folder's (6 classes, every pixel labelled)."""
    assert main(["data", "check", "synthetic:size=32,n=4"]) == 0
    out = capsys.readouterr().out
    assert "4 image/mask pairs, sizes 32x32 .. 32x32" in out and "ignored: 0.0% of pixels" in out and "sky" in out


def _cityscapes(root):
    for i in range(3):
        mask = root / "gtFine" / "train" / "aachen" / f"aachen_{i:06d}_000019_gtFine_labelIds.png"
        mask.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 12), 7, np.uint8)).save(mask)
    (root / "leftImg8bit" / "train" / "aachen").mkdir(parents=True)
    return root


@pytest.mark.integration
def test_a_killed_prepare_leaves_nothing_a_reader_takes_and_the_next_run_cleans_up(tmp_path):
    """SIGKILL between writing a label map and renaming it into place (the worst moment) used to leave
    tmpXXXXXXXX.png beside the masks, forever. The temporary is now a hidden .tmp file no reader
    globs, and the next run removes it, and the old tmp*.png ones too."""
    raw, out = _cityscapes(tmp_path / "raw"), tmp_path / "out"
    folder = out / "gtFine" / "train" / "aachen"
    folder.mkdir(parents=True)
    (folder / "tmpab12cd_3.png").write_bytes(b"left by an older version")
    script = textwrap.dedent(f"""
        import os, signal
        from transeg.data import prepare
        calls = []
        def replace(src, dst):
            calls.append(dst)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            os.rename(src, dst)
        prepare.os.replace = replace
        prepare.prepare("cityscapes", {str(raw)!r}, {str(out)!r}, progress=False)
    """)
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    left = sorted(p.name for p in folder.iterdir())
    assert any(n.endswith(".tmp") and n.startswith(".") for n in left), left  # the kill did leave a temporary
    assert [n for n in left if n.endswith(".png") and not n.startswith("tmp")] == \
        ["aachen_000000_000019_gtFine_labelTrainIds.png"], left  # one finished label map, no half-written .png
    assert main(["data", "prepare", "cityscapes", str(raw), str(out)]) == 0
    assert sorted(p.name for p in folder.iterdir()) == [f"aachen_{i:06d}_000019_gtFine_labelTrainIds.png"
                                                        for i in range(3)]
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.startswith("tmp")]
    assert os.listdir(out / "gtFine" / "train") == ["aachen"]


@pytest.mark.parametrize("line,message", [
    ("road 128 64", "classes.txt:2: 'road 128 64' has 2 numbers after the name; expected `name` or `name R G B`"),
    ("road, 128, 64, 32, 255", "classes.txt:2: 'road, 128, 64, 32, 255' has 4 numbers after the name"),
])
def test_a_colour_written_wrongly_in_classes_txt_is_one_line(tmp_path, capsys, line, message):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True), (root / "masks").mkdir()
    (root / "classes.txt").write_text(f"sky\n{line}\ncar 0 0 142\n")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "images" / "x.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "masks" / "x.png")
    assert message in _error(capsys, main(["data", "check", str(root)]))


def test_classes_txt_still_reads_names_and_colours(tmp_path):
    """One trailing number belongs to the name ("lane 2"); three are a colour."""
    from transeg.data.folder import read_classes

    (tmp_path / "classes.txt").write_text("lane 2\nroad 128 64 128\nsky,70,130,180\n")
    names, palette = read_classes(tmp_path / "classes.txt")
    assert names == ["lane 2", "road", "sky"] and palette[1:] == [(128, 64, 128), (70, 130, 180)]



# -- issue 30: classes.txt is refused from its size or its first lines, before the work --------------------------

def _sparse(path, size):
    with open(path, "wb") as f:
        f.truncate(size)


@pytest.mark.parametrize("write,fragment", [
    (lambda p: p.write_text("".join(f"c{i}\n" for i in range(100_000))), "lists 100000 classes; at most 255"),  # the issue's
    (lambda p: p.write_text("".join(f"c{i}\n" for i in range(256))), "lists 256 classes; at most 255"),
    (lambda p: p.write_text("ignore\n" + "".join(f"c{i}\n" for i in range(255))), "lists 256 classes"),
    (lambda p: p.write_text("a" + " 1" * 300_000 + "\n"), "a line of 600,001 characters"),     # no regex blow-up
    (lambda p: _sparse(p, 2**20 + 1), "1,048,577 bytes"),                                     # sparse: small on disk
    (lambda p: p.write_text("".join(f"same{i % 2}\n" for i in range(50_000))), "listed twice"),
], ids=["100k-lines", "256-lines", "ignore-plus-255", "long-line", "over-1MiB", "duplicates"])
def test_data_check_refuses_large_classes_txt_quickly(tmp_path, capsys, write, fragment):
    """`transeg data check` refuses a classes.txt past its bounds (1 MiB, 255 lines, 1000 characters a line) from
    its size or first lines: one line, exit 2, within a second or two, before any image is read."""
    import time

    folder = _folder(tmp_path)
    write(folder / "classes.txt")
    start = time.perf_counter()
    line = _error(capsys, main(["data", "check", str(folder)]))
    assert time.perf_counter() - start < 5 and fragment in line and "classes.txt" in line, line


def test_classes_txt_at_its_bounds_is_read(tmp_path):
    """255 class lines (with `ignore` first: 254 classes) of up to 1000 characters are a dataset."""
    from transeg.data.folder import read_class_lines

    path = tmp_path / "classes.txt"
    path.write_text("ignore\n" + "".join(f"c{i} {'x' * 990}\n" for i in range(254)))
    assert len(read_class_lines(path)) == 255
