"""A user's own dataset in a plain folder layout.

    root/
      classes.txt                   one class per line: `name` or `name R G B`
      images/<name>.jpg|.png|...    RGB images (.jpg .jpeg .png .bmp .tif .tiff .webp)
      masks/<name>.png              single-channel index PNGs (mode L or P), one per image

or, with splits, `images/<split>/...` and `masks/<split>/...` (e.g. train/ and val/). A split
folder is used when `split` is given and `images/<split>` exists. A root without split folders
serves the same flat folders for every split (None, "train", "val", ...): fine for a quick
look, but then validation scores are measured on the training images.

Images are read with their EXIF orientation applied, so a mask must match the image as it is
displayed. Grey, alpha, palette and 16-bit images are converted to 8-bit RGB.

Mask pixel values are class indices 0..K-1 in the order of classes.txt, 255 = ignore. A line
named `ignore` in classes.txt is no class: the mask value of its position is ignored and the
classes after it move up one. `ignore` as the first line is the ADE20K convention (mmseg's
`reduce_zero_label`): the masks hold 0 = unlabelled and 1..K for the K classes listed after it;
`reduce_zero_label=True` (Python) says the same without editing classes.txt.

Colour masks (the RGB PNGs labelling tools export) are read when every class line of classes.txt
gives its colour (`road 128 64 128`): each pixel's colour becomes its line's value. `ignore R G B`
lines name colours to ignore (several may). No colour is special, black included: a colour that no
line lists is an error naming the file, the colour and the nearest listed colours. Single-channel
masks (mode L or P) are always read as values, colours in classes.txt or not.

classes.txt is read within stated bounds, refused before any image is looked at: at most
`MAX_CLASSES_BYTES` (1 MiB, checked from the file's size), at most `MAX_CLASS_LINES` (255) class lines,
`ignore` lines included (8-bit masks hold the values 0..254 beside 255 = ignore), each at most
`MAX_CLASS_LINE_CHARS` (1000) characters; reading stops at the first line past a limit, so a file of
100,000 names is refused from its first 256.

Anything wrong with the files raises `TransegError` with one line naming the file.
"""
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import TransegError
from ..images import _READ_ERRORS, IMAGE_EXTENSIONS, _oriented_size, _reason, load_image
from .palettes import default_palette


class MissingSplit(TransegError):
    """A split the dataset does not hold (its folder or list is absent): `transeg data check` passes over it."""


def _few(names, k=3):
    names = sorted(names)
    shown = ", ".join(names[:k])
    return shown + (f" and {len(names) - k} more" if len(names) > k else "")


IGNORE = "ignore"  # a classes.txt line with this name (any case) is an ignored mask value, not a class
MAX_CLASSES_BYTES = 2**20
MAX_CLASS_LINES = 255
MAX_CLASS_LINE_CHARS = 1000


def is_ignore(name):
    return name.strip().lower() == IGNORE


def read_class_lines(path):
    """Parse classes.txt into its lines: [(name, (R, G, B) or None)], one per mask value 0, 1, 2, ...,
    `ignore` lines included (see the module docstring). Lines are `name` or `name R G B` (spaces or
    commas between the numbers); blank lines and lines starting with # are skipped."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_CLASSES_BYTES:
            raise TransegError(f"{path}: {size:,} bytes; a classes.txt of at most {MAX_CLASS_LINES} class names "
                               f"is far smaller (at most {MAX_CLASSES_BYTES:,} bytes are read): is it the right file?")
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise TransegError(f"{path}: not a UTF-8 text file (expected one class name per line)") from None
    except OSError as e:
        raise TransegError(f"{path}: cannot read ({e.strerror or e})") from None
    out, seen = [], set()
    for lineno, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if len(out) == MAX_CLASS_LINES:  # refused at the first line past the limit, before parsing the rest
            rest = sum(1 for r in lines[lineno - 1:] if r.strip() and not r.strip().startswith("#"))
            raise TransegError(f"{path}: lists {len(out) + rest} classes; at most {MAX_CLASS_LINES} fit in 8-bit "
                               f"masks (value 255 means ignore)")
        if len(line) > MAX_CLASS_LINE_CHARS:
            raise TransegError(f"{path}:{lineno}: a line of {len(line):,} characters; a class line (`name` or "
                               f"`name R G B`) has at most {MAX_CLASS_LINE_CHARS}")
        # the numbers after the name: three are its colour, one belongs to the name ("lane 2"); two or
        # four and more are a colour written wrongly, which would otherwise become part of the name
        m = re.fullmatch(r"(.*?)((?:[\s,]+-?\d+)+)", line)
        numbers = re.findall(r"-?\d+", m.group(2)) if m and m.group(1).strip() else []
        if len(numbers) == 3:
            name = m.group(1).strip()
            rgb = tuple(int(v) for v in numbers)
            if not all(0 <= v <= 255 for v in rgb):
                raise TransegError(f"{path}:{lineno}: colour {' '.join(map(str, rgb))} of {name!r} "
                                   f"is not an RGB triple in 0..255")
        elif len(numbers) > 1:
            raise TransegError(f"{path}:{lineno}: {line!r} has {len(numbers)} numbers after the name; expected "
                               f"`name` or `name R G B` (a colour is three numbers 0..255)")
        else:
            name, rgb = line, None
        if not is_ignore(name) and name in seen:
            raise TransegError(f"{path}:{lineno}: class {name!r} is listed twice")
        seen.add(name)
        out.append((name, rgb))
    if not any(not is_ignore(n) for n, _ in out):
        raise TransegError(f"{path}: lists no classes (expected one class name per line)")
    return out


def read_classes(path):
    """Parse classes.txt: returns (names, palette) of its classes (`ignore` lines left out); classes
    without a colour get default_palette's colour for their index."""
    classes = [(n, c) for n, c in read_class_lines(path) if not is_ignore(n)]
    defaults = default_palette(len(classes))
    return [n for n, _ in classes], [c if c is not None else defaults[i] for i, (_, c) in enumerate(classes)]


# -- where outputs go ------------------------------------------------------------------------------


class FolderDataset(torch.utils.data.Dataset):
    """Images, index (or colour) masks and classes.txt in a folder (see the module docstring for the layout).

    Items are dicts: image uint8 [3,H,W] RGB, label int64 [H,W] (255 = ignore), name str (the
    file name without extension). `check()` scans every file up front.
    """

    ignore_index = 255
    class_source = "classes.txt"  # where the class list comes from, for messages
    # classes.txt's lines, one per mask value: [(name, colour or None)], `ignore` lines included (None:
    # the classes are the values 0..K-1, or 1..K under reduce_zero_label, as for the benchmarks)
    lines = None

    def __init__(self, root, split=None, reduce_zero_label=False):
        self.root = Path(root)
        self.split = split
        if not self.root.exists():
            raise TransegError(f"{self.root}: no such folder")
        if not self.root.is_dir():
            raise TransegError(f"{self.root}: is a file, not a folder with images/, masks/ and classes.txt")
        classes_txt = self.root / "classes.txt"
        if not classes_txt.is_file():
            raise TransegError(f"{classes_txt}: missing (list the class names there, one per line, "
                               f"in the order of the mask values 0, 1, 2, ...)")
        lines = read_class_lines(classes_txt)
        if reduce_zero_label and not is_ignore(lines[0][0]):
            lines = [(IGNORE, None)] + lines  # the same as an `ignore` first line in classes.txt
        if len(lines) > 255:
            raise TransegError(f"{classes_txt}: {len(lines) - 1} classes after the ignored 0 need values up to "
                               f"{len(lines) - 1}; at most 254 fit beside 255 = ignore")
        self.lines = lines
        self.reduce_zero_label = is_ignore(lines[0][0])
        self.classes, self.palette = read_classes(classes_txt)
        self.image_dir, self.mask_dir = self._folders()
        self.samples = self._pair_files()
        self.lut, self.valid = self._label_map()
        self._colours = None  # the colour -> value table of colour masks, made when the first one is read

    def _value_names(self):
        """The name of each raw mask value 0, 1, ...: classes.txt's lines, `ignore` ones included."""
        if self.lines is not None:
            return [n for n, _ in self.lines]
        return ([IGNORE] if self.reduce_zero_label else []) + list(self.classes)

    def _label_map(self):
        """(lut, valid): raw mask value -> label (255 = ignore), and which raw values may occur.
        Values 0..K-1 are the classes (an `ignore` line / reduce_zero_label: that value ignored, the
        classes after it one up), 255 is ignore."""
        lut = np.full(256, 255, dtype=np.int64)
        valid = np.zeros(256, dtype=bool)
        valid[255] = True
        label = 0
        for raw, name in enumerate(self._value_names()):
            valid[raw] = True
            if not is_ignore(name):
                lut[raw] = label
                label += 1
        return lut, valid

    # -- layout -------------------------------------------------------------------------------

    def _folders(self):
        images, masks = self.root / "images", self.root / "masks"
        for d in (images, masks):
            if not d.is_dir():
                raise TransegError(f"{d}: missing (expected {self.root}/images/ and {self.root}/masks/ "
                                   f"beside classes.txt)")
        subdirs = sorted(p.name for p in images.iterdir() if p.is_dir() and not p.name.startswith("."))
        if self.split is not None and self.split in subdirs:
            images, masks = images / self.split, masks / self.split
            if not masks.is_dir():
                raise TransegError(f"{masks}: missing (images/{self.split}/ needs a matching masks/{self.split}/)")
            return images, masks
        has_flat = any(p.suffix.lower() in IMAGE_EXTENSIONS for p in images.iterdir() if p.is_file())
        if subdirs and not has_flat:
            if self.split is None:
                raise TransegError(f"{images}: holds split folders ({', '.join(subdirs)}); choose one of them as the split")
            raise MissingSplit(f"{images / self.split}: no such split folder (found: {', '.join(subdirs)})")
        return images, masks

    @staticmethod
    def split_names(root):
        """The split folders of images/ (sorted), or [None] for a flat layout (one set for every split)."""
        images = Path(root) / "images"
        try:
            entries = list(images.iterdir())
        except OSError:
            return [None]
        if any(p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS for p in entries):
            return [None]
        return sorted(p.name for p in entries if p.is_dir() and not p.name.startswith(".")) or [None]

    def _pair_files(self):
        images = {}
        for p in sorted(self.image_dir.iterdir()):
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."):
                if p.stem in images:
                    raise TransegError(f"{p}: two images share the name {p.stem!r} "
                                       f"({images[p.stem].name} and {p.name}); rename one")
                images[p.stem] = p
        if not images:
            raise TransegError(f"{self.image_dir}: no images ({' '.join(IMAGE_EXTENSIONS)})")
        masks = {}
        for p in sorted(self.mask_dir.iterdir()):
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS:
                if p.suffix.lower() != ".png":
                    if p.stem not in images:
                        continue
                    raise TransegError(f"{p}: masks must be PNG files (lossless index images), "
                                       f"save it as {p.stem}.png")
                masks[p.stem] = p
        no_mask = [images[s].name for s in images if s not in masks]
        if no_mask:
            raise TransegError(f"{self.mask_dir}: no mask for {len(no_mask)} image(s) ({_few(no_mask)}); "
                               f"each images/NAME.ext needs masks/NAME.png")
        no_image = [masks[s].name for s in masks if s not in images]
        if no_image:
            raise TransegError(f"{self.image_dir}: no image for {len(no_image)} mask(s) ({_few(no_image)}); "
                               f"remove those masks or add the images")
        return [(images[s], masks[s]) for s in sorted(images)]

    # -- reading ------------------------------------------------------------------------------

    @property
    def num_classes(self):
        return len(self.classes)

    def __len__(self):
        return len(self.samples)

    def __repr__(self):
        return (f"FolderDataset({str(self.root)!r}, split={self.split!r}, {len(self)} images, "
                f"{self.num_classes} classes)")

    def read_mask(self, path):
        """The raw mask values as uint8 `[H,W]` (before reduce_zero_label)."""
        try:
            with Image.open(path) as m:
                m.load()
                mode = m.mode
                if mode in ("L", "P", "1"):
                    return np.asarray(m, dtype=np.uint8) if mode != "1" else np.asarray(m).astype(np.uint8)
                if mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
                    a = np.asarray(m)
                    big = a[(a > 255) | (a < 0)]
                    if big.size:
                        raise TransegError(f"{path}: label value {int(big.flat[0])} does not fit in 8 bits; "
                                           f"{self._allowed()}")
                    return a.astype(np.uint8)
                if mode in ("RGB", "RGBA"):
                    a = np.asarray(m)[..., :3]
                    if self._colour_lines() is not None:
                        return self._colours_to_values(path, a)
                    hint = ""
                    if (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all():
                        hint = " (its three channels are equal, so converting it to mode L keeps the values)"
                    raise TransegError(f"{path}: is an {mode} colour mask; convert it to a single-channel index PNG "
                                       f"(mode L or P) whose pixel values are class indices{hint}{self._colour_fix()}")
                raise TransegError(f"{path}: mask has image mode {mode}; expected a single-channel index PNG "
                                   f"(mode L or P)")
        except TransegError:
            raise
        except _READ_ERRORS as e:
            raise TransegError(f"{path}: cannot read the mask ({_reason(e)})") from None

    # -- colour masks ---------------------------------------------------------------------------

    def _colour_lines(self):
        """[(value, name, colour)] of the classes.txt lines that give a colour when every class line
        does (then colour masks can be read), else None."""
        if not self.lines or any(c is None for n, c in self.lines if not is_ignore(n)):
            return None
        return [(v, n, c) for v, (n, c) in enumerate(self.lines) if c is not None]

    def _colour_fix(self):
        """What to write in classes.txt to read colour masks ("" for the benchmarks)."""
        if self.lines is None:
            return ""
        missing = [n for n, c in self.lines if c is None and not is_ignore(n)]
        where = self.root / "classes.txt"
        if len(missing) < len([n for n, _ in self.lines if not is_ignore(n)]):
            return (f", or give every class its colour in {where} to read colour masks: "
                    f"{_few([repr(n) for n in missing])} {'has' if len(missing) == 1 else 'have'} none "
                    f"(`{missing[0]} R G B`)")
        return (f", or give each class its colour in {where} to read colour masks (`{missing[0]} R G B`, "
                f"the colour its pixels have)")

    def _colour_table(self):
        """(sorted colour codes R<<16|G<<8|B, their values), made once; two lines with one colour are an error."""
        if self._colours is None:
            by_code = {}
            for value, name, (r, g, b) in self._colour_lines():
                code = (r << 16) | (g << 8) | b
                if code in by_code and not (is_ignore(name) and is_ignore(self.lines[by_code[code]][0])):
                    raise TransegError(f"{self.root / 'classes.txt'}: {self.lines[by_code[code]][0]!r} and {name!r} "
                                       f"share the colour {r} {g} {b}; colour masks need one colour per class")
                by_code.setdefault(code, value)
            codes = np.array(sorted(by_code), dtype=np.int64)
            self._colours = (codes, np.array([by_code[c] for c in codes], dtype=np.uint8))
        return self._colours

    def _colours_to_values(self, path, rgb):
        """uint8 [H,W] mask values from an RGB colour mask `[H,W,3]` (vectorised: one binary search per
        pixel among the listed colours); a colour no line lists raises TransegError naming it."""
        codes, values = self._colour_table()
        code = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
        pos = np.minimum(np.searchsorted(codes, code), len(codes) - 1)
        known = codes[pos] == code
        if not known.all():
            unknown, counts = np.unique(code[~known], return_counts=True)
            c = int(unknown[np.argmax(counts)])
            colour = np.array([c >> 16, (c >> 8) & 255, c & 255])
            listed = [(n, np.array(col)) for _, n, col in self._colour_lines()]
            near = sorted(listed, key=lambda nc: float(((nc[1] - colour) ** 2).sum()))[:2]
            others = len(unknown) - 1
            more = (f" (and {others} other unlisted colour{'s' if others > 1 else ''}: a resized or lossy-saved mask "
                    f"has blended colours at edges; save masks at full size as PNG)" if others else "")
            raise TransegError(f"{path}: colour {' '.join(map(str, colour))} ({int(counts.max())} pixels) is not "
                               f"listed in {self.root / 'classes.txt'}{more}; nearest listed: "
                               + ", ".join(f"{n} {' '.join(map(str, col))}" for n, col in near)
                               + f"; add it as a class or as `ignore {' '.join(map(str, colour))}`")
        return values[pos]

    # -- values -----------------------------------------------------------------------------------

    def _allowed(self):
        k = self.num_classes
        names = self._value_names()
        ignored = [v for v, n in enumerate(names) if is_ignore(n)]
        if ignored == [0]:
            return f"allowed 0=ignore, 1..{k} for the {k} classes of {self.class_source} (reduce_zero_label) and 255=ignore"
        if ignored:
            return (f"allowed 0..{len(names) - 1}, the lines of {self.class_source}, where "
                    f"{', '.join(map(str, ignored))} = ignore, and 255=ignore")
        return f"allowed 0..{k - 1} and 255=ignore"

    def _encoding_hint(self, bad):
        """The label-encoding mistake that `bad` (the values outside the classes) points to, with its fix, or ""."""
        k = self.num_classes
        names = self._value_names()
        if list(bad) == [len(names)] and not any(is_ignore(n) for n in names) and self.lines is not None:
            return (f"; values 0..{k} for {k} classes look like 0 = 'unlabelled' (ADE20K style): then write `ignore` "
                    f"as the first line of {self.root / 'classes.txt'} (reduce_zero_label: 0 is ignored, 1..{k} are "
                    f"the classes); if 0 is a class, a class is missing from classes.txt")
        if k == 19 and int(bad.max()) <= 33 and not getattr(self, "raw_ids", False):
            return ("; values up to 33 for 19 classes look like Cityscapes labelIds (*_gtFine_labelIds.png) where "
                    "trainIds are expected: use the *_gtFine_labelTrainIds.png files (`transeg data prepare "
                    "cityscapes RAW OUT` writes them), or name the Cityscapes folder as the benchmark, "
                    "cityscapes:PATH, which maps labelIds")
        return ""

    def _bad_values(self, counts):
        """The raw values (from a 256-bin histogram) that are not allowed, ascending."""
        return np.nonzero(counts * ~self.valid)[0]

    def _value_error(self, path, bad):
        k = self.num_classes
        if len(bad) == 1:
            what = f"label value {int(bad[0])} is"
        else:
            what = "label values " + ", ".join(str(int(v)) for v in bad[:5]) + (" ..." if len(bad) > 5 else "") + " are"
        return TransegError(f"{path}: {what} outside the {k} classes of {self.class_source} ({self._allowed()})"
                            f"{self._encoding_hint(bad)}")

    def _to_label(self, raw):
        return self.lut[raw]

    def __getitem__(self, index):
        image_path, mask_path = self.samples[index]
        image = load_image(image_path)
        raw = self.read_mask(mask_path)
        if image.shape[:2] != raw.shape:
            raise TransegError(f"{mask_path}: mask is {raw.shape[1]}x{raw.shape[0]} (WxH) but its image "
                               f"{image_path.name} is {image.shape[1]}x{image.shape[0]}")
        bad = self._bad_values(np.bincount(raw.reshape(-1), minlength=256))
        if bad.size:
            raise self._value_error(mask_path, bad)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "label": torch.from_numpy(self._to_label(raw)),
            "name": image_path.stem,
        }

    # -- validation ---------------------------------------------------------------------------

    def check(self, progress=True, decode_images=True):
        """Scan every mask (and image) once; raise TransegError at the first bad file.

        Checks each mask's format and values and that its size equals its image's (EXIF
        orientation included); with `decode_images` every image is fully decoded too, which
        catches truncated files (slower: a full read of the dataset).

        Returns a summary dict: num_images, num_classes, classes, class_pixels (per class, after
        reduce_zero_label), ignore_pixels, total_pixels, class_images (images containing each
        class), absent_classes (names with no pixel), min_size / max_size (h, w) and
        label_values (the raw mask values seen).
        """
        from tqdm import tqdm

        k = self.num_classes
        hist = np.zeros(256, dtype=np.int64)
        class_images = np.zeros(k, dtype=np.int64)
        min_size, max_size = None, None
        for image_path, mask_path in tqdm(self.samples, desc=f"checking {self.image_dir}", unit="img",
                                          disable=not progress, leave=False):
            if decode_images:
                size = load_image(image_path).shape[:2]
            else:
                try:
                    with Image.open(image_path) as img:
                        size = _oriented_size(img)
                except _READ_ERRORS as e:
                    raise TransegError(f"{image_path}: cannot read the image ({_reason(e)})") from None
            raw = self.read_mask(mask_path)
            if tuple(size) != raw.shape:
                raise TransegError(f"{mask_path}: mask is {raw.shape[1]}x{raw.shape[0]} (WxH) but its image "
                                   f"{image_path.name} is {size[1]}x{size[0]}")
            counts = np.bincount(raw.reshape(-1), minlength=256)
            bad = self._bad_values(counts)
            if bad.size:
                raise self._value_error(mask_path, bad)
            hist += counts
            present = np.unique(self.lut[np.nonzero(counts)[0]])
            class_images[present[present != 255]] += 1
            min_size = tuple(size) if min_size is None else (min(min_size[0], size[0]), min(min_size[1], size[1]))
            max_size = tuple(size) if max_size is None else (max(max_size[0], size[0]), max(max_size[1], size[1]))
        mapped = np.bincount(self.lut, weights=hist, minlength=256).astype(np.int64)
        class_pixels, ignore = mapped[:k], int(mapped[255])
        return {
            "num_images": len(self.samples),
            "num_classes": k,
            "classes": list(self.classes),
            "class_pixels": [int(c) for c in class_pixels],
            "ignore_pixels": ignore,
            "total_pixels": int(hist.sum()),
            "class_images": [int(c) for c in class_images],
            "absent_classes": [self.classes[i] for i in range(k) if class_pixels[i] == 0],
            "min_size": min_size,
            "max_size": max_size,
            "label_values": [int(v) for v in np.nonzero(hist)[0]],
        }
