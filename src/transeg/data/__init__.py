"""Datasets and transforms.

`build_dataset(spec, split)` turns a `--data` value into a dataset: nothing / "synthetic" is the
built-in synthetic set, a folder is a `FolderDataset`. Every dataset yields dicts with
`image` (uint8 [3,H,W] RGB), `label` (int64 [H,W], 255 = ignore) and `name`, and carries
`classes`, `palette` and `ignore_index`.
"""
import math
import os

from ..errors import TransegError
from .benchmarks import DATASETS, detect
from .folder import FolderDataset, MissingSplit
from .palettes import default_palette
from .summary import summarize
from .synthetic import SyntheticDataset
from .transforms import IMAGENET_MEAN, IMAGENET_STD, TestTransform, TrainTransform, normalize

__all__ = [
    "SyntheticDataset",
    "FolderDataset",
    "TrainTransform",
    "TestTransform",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "normalize",
    "default_palette",
    "build_dataset",
    "build_splits",
    "summarize",
    "class_weights",
    "DATASETS",
]

_SYNTHETIC_OPTIONS = {"size": "size", "n": "num_samples", "seed": "seed"}


def _named(spec, option):
    """How a message names the value: "--data X" where it came from that option, else "X" (`transeg data check
    DIR` takes it as an argument)."""
    return f"{option} {spec}" if option else str(spec)


def _parse_size(spec, value, option="--data"):
    parts = value.lower().split("x")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        nums = []
    if len(nums) not in (1, 2) or min(nums) <= 0:
        raise TransegError(f"{_named(spec, option)}: size={value} is not a size (use size=128 or size=96x128 for HxW)")
    return nums[0] if len(nums) == 1 else (nums[0], nums[1])


def _synthetic_options(spec, option="--data"):
    """Options of "synthetic:size=96,n=500,seed=3" as SyntheticDataset keyword arguments."""
    _, _, rest = spec.partition(":")
    out = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or key not in _SYNTHETIC_OPTIONS:
            raise TransegError(f"{_named(spec, option)}: unknown option {item!r} (known: size=N or HxW, n=N, seed=N)")
        if key == "size":
            out["size"] = _parse_size(spec, value, option)
        else:
            try:
                out[_SYNTHETIC_OPTIONS[key]] = int(value)
            except ValueError:
                raise TransegError(f"{_named(spec, option)}: {key}={value} is not a whole number") from None
    return out


def build_dataset(spec, split="train", *, option="--data", **kwargs):
    """The dataset a `--data` value names, for `split`.

    None, "" or "synthetic"   the built-in SyntheticDataset(split)
    "synthetic:size=96,n=500,seed=3"   the same with options (size=HxW also works; n = samples)
    "ade20k:PATH", "cityscapes:PATH", "coco-stuff164k:PATH", "coco-stuff10k:PATH",
    "pascal-context:PATH", "pascal-context-59:PATH", "voc:PATH", "voc-aug:PATH"
                              that benchmark in its official layout
    an existing folder        the benchmark whose layout it holds, else FolderDataset(spec, split)
                              (images/, masks/, classes.txt; an `ignore` first line in classes.txt
                              is reduce_zero_label: 0 = unlabelled, 1..K the classes)

    `kwargs` go to the dataset's constructor (e.g. num_samples, reduce_zero_label); options
    written in the spec win over them. `option`: the command-line option the spec came from, as errors name
    it ("" for `transeg data check DIR`).
    """
    text = "" if spec is None else str(spec).strip()
    if text == "" or text == "synthetic" or text.startswith("synthetic:"):
        options = dict(kwargs)
        if options.pop("reduce_zero_label", False):
            raise TransegError("--data synthetic: reduce_zero_label does not apply to the synthetic set")
        options.update(_synthetic_options(text, option) if ":" in text else {})
        return SyntheticDataset(split=split, **options)
    name, colon, path = text.partition(":")
    if colon and name.lower() in DATASETS:
        return DATASETS[name.lower()](path, split=split)
    if os.path.isdir(text):
        found = detect(text)
        if found:
            return DATASETS[found](text, split=split)
        return FolderDataset(text, split=split, **kwargs)
    synthetic = f"leave {option} out" if option else "give synthetic"
    if os.path.exists(text):
        raise TransegError(f"{_named(text, option)}: is a file, not a folder (give a folder with images/, masks/ and "
                           f"classes.txt, or {synthetic} for the built-in synthetic set)")
    raise TransegError(f"{_named(text, option)}: no such directory (give a folder with images/, masks/ and "
                       f"classes.txt, or {synthetic} for the built-in synthetic set)")


def build_splits(spec, *, option="--data", **kwargs):
    """[(split, dataset)] of every split `spec` holds, for `transeg data check`: a folder's images/<split>/
    folders (one (None, dataset) for a flat folder), a benchmark's splits whose images are there, the
    synthetic set's train and val. Raises the first split's error when none is there."""
    text = "" if spec is None else str(spec).strip()
    name, colon, path = text.partition(":")
    if text == "" or text == "synthetic" or text.startswith("synthetic:"):
        names = ["train", "val"]
    elif colon and name.lower() in DATASETS:
        names = list(DATASETS[name.lower()].splits)
    elif os.path.isdir(text) and detect(text):
        names = list(DATASETS[detect(text)].splits)
    elif os.path.isdir(text):
        names = FolderDataset.split_names(text)
    else:
        names = ["train"]
    found, first_error = [], None
    for split in names:
        try:
            found.append((split, build_dataset(spec, split, option=option, **kwargs)))
        except MissingSplit as e:
            first_error = first_error or e
    if not found:
        raise first_error
    return found


AUTO_OFFSET = 1.02  # ENet's c (Paszke et al. 2016): weights bounded by 1 / ln(1.02) ~ 50 for the rarest classes


def class_weights(pixel_counts):
    """`class_weight: auto`: ENet's 1 / ln(c + p_k) from each class's share p_k of the labelled training
    pixels (c = 1.02), scaled so the pixel-weighted mean weight is 1 and the loss stays on plain CE's
    scale (the recipe's learning rate keeps its meaning). Chosen over median-frequency balancing, whose
    weights grow without bound for a class with a handful of pixels. Returns a list of K floats."""
    counts = [float(c) for c in pixel_counts]
    total = sum(counts)
    if total <= 0:
        raise TransegError("class_weight auto: the training labels hold no labelled pixel")
    raw = [1.0 / math.log(AUTO_OFFSET + c / total) for c in counts]
    mean = sum(w * c for w, c in zip(raw, counts)) / total
    return [round(w / mean, 6) for w in raw]
