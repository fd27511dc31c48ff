"""Segment images with an exported `.onnx` file and ONNX Runtime, with numpy, Pillow and onnxruntime only.

    from transeg.deploy.runtime import OnnxSegmenter
    seg = OnnxSegmenter("model.onnx")            # fp32 or int8 (transeg export ... --int8)
    labels = seg.labels("photo.jpg")             # [H, W] class indices at the image's own size
    seg.mask(labels).save("photo_mask.png")      # index PNG with the model's palette

A deployment needs no torch: this file imports nothing of the package that imports torch, only what
`transeg.errors` and `transeg.images` give when the package is there. `import transeg` itself imports torch
(the package's public API is PyTorch models), so a torch-free machine copies this one file and imports it as
a module of its own (`import runtime`), or runs it: `python runtime.py model.onnx photo.jpg mask.png`.
tests/test_deploy.py runs that path in a subprocess in which `import torch` fails.

What the graph needs around it is read from the file's metadata (`transeg export` writes it): the test
protocol (keep-ratio resize into `scale`, sides rounded up to `size_divisor`, whole image or sliding windows,
scales and flip), mean/std, class names, palette, the backbone's padding multiple. Each step is the one
`transeg.inference` runs in PyTorch: 8-bit bilinear resizes with half-pixel centres and no antialiasing
(cv2.INTER_LINEAR, mmcv), (pixel - mean) / std, logits upsampled (bilinear, align_corners=False) to the padded
input and cropped, windows averaged where they overlap, and several scales or flips averaged as softmax
probabilities. Labels are made a few classes at a time (`BLOCK_BYTES`), so a large image never holds
K x H x W floats at once.
"""
import json
import math
import os
import sys

import numpy as np
from PIL import Image, ImageOps

try:  # inside the transeg package: its one-line error and its bounded image reader
    from ..errors import TransegError
    from ..images import read_image as _package_read_image
except ImportError:  # this file on its own, in a deployment without torch
    _package_read_image = None

    class TransegError(Exception):
        """A user error: one line naming the file and the fix."""

# The largest image read from a file (as transeg.inference.MAX_PIXELS): larger ones are refused from the header.
MAX_PIXELS = 100_000_000
# The most bytes of upsampled scores held at once while labels are made (as transeg.inference.SCORE_BLOCK_BYTES).
BLOCK_BYTES = 256 * 2**20
# Several scales or flips average K x H x W probabilities at the image's size; above this many bytes of them an
# image is refused in one line (as transeg.inference.MAX_SCORE_BYTES).
MAX_SCORE_BYTES = 2 * 2**30
# Windows of a sliding-window protocol run this many at a time (as transeg.inference.logits_slide).
WINDOW_BATCH = 8


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise TransegError("running an .onnx model needs onnxruntime: pip install onnxruntime "
                           "(or pip install 'transeg[onnx]')") from None
    return onnxruntime


def read_metadata(path, session):
    """The "transeg" metadata `transeg export` stores in the file, as a dict; one line when it is not there."""
    raw = session.get_modelmeta().custom_metadata_map.get("transeg")
    if raw is None:
        raise TransegError(f"{path}: has no transeg metadata (class names, mean/std, test protocol): export the "
                           "model with `transeg export MODEL out.onnx`")
    return parse_metadata(raw, path)


def parse_metadata(raw, path):
    """The "transeg" metadata text of the file at `path` as a dict (what both the runtime and int8 quantisation
    read); text that is not a JSON object with num_classes, mean and std is one line naming the file."""
    try:
        meta = json.loads(raw)
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or not {"num_classes", "mean", "std"} <= set(meta):
        raise TransegError(f"{path}: its transeg metadata is damaged: export the model again with `transeg export`")
    return meta


def open_session(path, threads=None):
    """(onnxruntime.InferenceSession on the CPU, transeg metadata) of `path`; a missing, unreadable or foreign
    file is one TransegError naming it. threads: intra-op threads (None: onnxruntime's default, one per core)."""
    ort = _onnxruntime()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise TransegError(f"{path}: no such file (an .onnx model from `transeg export MODEL out.onnx`)")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: the exporter's unused-initializer warnings are not the user's
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail / InvalidProtobuf / RuntimeError types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise TransegError(f"{path}: not an ONNX model onnxruntime can load ({first}); export it again with "
                           "`transeg export MODEL out.onnx`") from None
    return session, read_metadata(path, session)


# ------------------------------------------------------------------------------------------ sizes and resizes
def rescale_size(size_hw, scale):
    """mmcv's keep-ratio rescale of (h, w) into `scale` (long, short): the factor is min(long / long side,
    short / short side), new sides int(x * factor + 0.5) (transeg.data.transforms.rescale_size)."""
    h, w = size_hw
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def input_size(size_hw, protocol):
    """The (h, w) an image of `size_hw` runs at under `protocol` before its scales: resize, then alignment."""
    h, w = rescale_size(size_hw, protocol["scale"]) if protocol.get("scale") else size_hw
    d = protocol.get("size_divisor")
    return (-(-h // d) * d, -(-w // d) * d) if d else (h, w)


def scaled_size(size, scale, protocol):
    """transeg.inference.scaled_size: `scale` times `size`, rounded up to size_divisor, short side enlarged to
    min_short_side."""
    h, w = size
    size = (int(h * scale + 0.5), int(w * scale + 0.5))
    d = protocol.get("size_divisor")
    if d:
        size = tuple(math.ceil(s / d) * d for s in size)
    short = protocol.get("min_short_side")
    if short and min(size) < short:
        ratio = max(size) / min(size)
        size = (short, int(ratio * short)) if size[0] <= size[1] else (int(ratio * short), short)
    return size


def slide_windows(height, width, crop, stride):
    """mmseg's window grid (y1, y2, x1, x2), the last window in each direction ending at the border."""
    (ch, cw), (sh, sw) = crop, stride
    rows = max(height - ch + sh - 1, 0) // sh + 1
    cols = max(width - cw + sw - 1, 0) // sw + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * sh + ch, height), min(c * sw + cw, width)
            boxes.append((max(y2 - ch, 0), y2, max(x2 - cw, 0), x2))
    return boxes


def _taps(n_in, n_out):
    """Source indices and weights of a bilinear resize along one axis, half-pixel centres
    (align_corners=False, as torch.nn.functional.interpolate and cv2.INTER_LINEAR)."""
    src = (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * np.float32(n_in / n_out) - np.float32(0.5)
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(src.astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


def resize(x, size):
    """Bilinear resize of the last two axes of a float32 array to `size` (h, w), no antialiasing."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    r0, r1, ry = _taps(x.shape[-2], size[0])
    c0, c1, cx = _taps(x.shape[-1], size[1])
    rows = x[..., r0, :] * (1 - ry)[:, None] + x[..., r1, :] * ry[:, None]
    return rows[..., c0] * (1 - cx) + rows[..., c1] * cx


def resize_uint8(rgb, size):
    """An HxWx3 uint8 image resized as mmcv / transeg do it: bilinear, then rounded back to 8 bits."""
    if tuple(rgb.shape[:2]) == tuple(size):
        return rgb
    out = resize(rgb.transpose(2, 0, 1).astype(np.float32), size)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8).transpose(1, 2, 0)


def prepare(rgb, protocol, mean, std):
    """HxWx3 uint8 -> the normalised [1,3,h,w] float32 a graph runs on under `protocol` (the metadata's dict
    form): keep-ratio resize into its scale, then the stretch to its size divisor, each rounded to 8 bits (as
    transeg.data.transforms.TestTransform), then (pixel - mean) * (1 / std) with mean/std in 0-255 units."""
    if protocol.get("scale"):
        rgb = resize_uint8(rgb, rescale_size(rgb.shape[:2], protocol["scale"]))
    rgb = resize_uint8(rgb, input_size(rgb.shape[:2], {"size_divisor": protocol.get("size_divisor")}))
    mean = np.asarray(mean, np.float32).reshape(3, 1, 1)
    inv_std = (1.0 / np.asarray(std, np.float64)).astype(np.float32).reshape(3, 1, 1)  # as torch: 1/std in double
    return ((rgb.transpose(2, 0, 1).astype(np.float32) - mean) * inv_std)[None]


def read_rgb(item, max_pixels=MAX_PIXELS):
    """HxWx3 uint8 RGB from a path, a PIL image or an array (EXIF orientation applied). Inside the package the
    file goes through transeg.images.read_image (16-bit, alpha, bounded by its header) like every other verb."""
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or item.ndim != 3 or item.shape[2] != 3:
            raise TransegError(f"an image array must be HxWx3 uint8 RGB, got {item.dtype} {tuple(item.shape)}")
        return item
    if isinstance(item, Image.Image):
        return np.asarray(ImageOps.exif_transpose(item).convert("RGB"))
    if _package_read_image is not None:
        return _package_read_image(item, max_pixels=max_pixels)[0]
    try:
        with Image.open(item) as img:
            if img.width * img.height > max_pixels:
                raise TransegError(f"{item}: {img.width}x{img.height} pixels is more than the {max_pixels:,} allowed")
            return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise TransegError(f"{item}: cannot read the image ({str(e).splitlines()[0][:120]})") from None


# ------------------------------------------------------------------------------------------------ the model
class OnnxSegmenter:
    """An exported transeg model under ONNX Runtime: images in, label maps at each image's size out, under the
    test protocol stored in the file (`protocol`: override it with a dict of the same form)."""

    def __init__(self, path, threads=None, protocol=None):
        self.path = os.fspath(path)
        self.session, self.meta = open_session(path, threads)
        self.input = self.session.get_inputs()[0].name
        self.num_classes = int(self.meta["num_classes"])
        self.classes = list(self.meta.get("classes") or [str(i) for i in range(self.num_classes)])
        self.palette = [tuple(c) for c in self.meta.get("palette") or _voc_palette(self.num_classes)]
        self.protocol = dict(protocol or self.meta.get("protocol") or {"mode": "whole", "size_divisor": 32})

    def prepare(self, rgb):
        """HxWx3 uint8 -> the normalised [1,3,h,w] float32 the graph runs on: resize, alignment, mean/std."""
        return prepare(rgb, self.protocol, self.meta["mean"], self.meta["std"])

    def run(self, x):
        """The graph's raw output for a normalised batch [N,3,h,w]: logits (or, for mask classification,
        probabilities) [N,K,h/s,w/s]."""
        return self.session.run(None, {self.input: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def logits(self, x):
        """Scores [N,K,h,w] at the input size: upsampled to the backbone's padded size and cropped."""
        h, w = x.shape[-2:]
        m = int(self.meta.get("pad_multiple") or 1)
        out = resize(self.run(x), (-(-h // m) * m, -(-w // m) * m))
        return out[..., :h, :w]

    def _pass(self, x):
        if self.protocol.get("mode", "whole") == "whole":
            return self.logits(x)
        n, _, h, w = x.shape
        boxes = slide_windows(h, w, self.protocol["crop"], self.protocol["stride"])
        canvas = np.zeros((n, self.num_classes, h, w), np.float32)
        count = np.zeros((1, 1, h, w), np.float32)
        per = max(1, WINDOW_BATCH // n)
        for start in range(0, len(boxes), per):
            chunk = boxes[start:start + per]
            out = self.logits(np.concatenate([x[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in chunk]))
            for i, (y1, y2, x1, x2) in enumerate(chunk):
                canvas[:, :, y1:y2, x1:x2] += out[i * n:(i + 1) * n]
                count[:, :, y1:y2, x1:x2] += 1
        return canvas / count

    def scores(self, x, out_size=None):
        """Scores of a normalised batch: logits at the input size for one pass (`out_size` None), else the mean
        softmax probability over the protocol's scales and flips at `out_size`."""
        scales = tuple(self.protocol.get("scales") or (1.0,))
        flip = bool(self.protocol.get("flip"))
        if scales == (1.0,) and not flip:
            return self._pass(x)
        total = 0
        for scale in scales:
            xs = resize(x, scaled_size(x.shape[-2:], scale, self.protocol))
            for flipped in (False, True) if flip else (False,):
                s = self._pass(xs[..., ::-1] if flipped else xs)
                s = resize(s[..., ::-1] if flipped else s, out_size)
                total = total + (s if self.meta.get("mask_classification") else _softmax(s))
        return total / (len(scales) * (2 if flip else 1))

    def labels(self, image, max_pixels=MAX_PIXELS):
        """Class indices [H, W] (uint8 up to 256 classes) of one image (path, PIL image or HxWx3 uint8 array)
        at its own size, under the protocol. A single pass holds at most BLOCK_BYTES of upsampled scores; several
        scales or flips hold K x H x W, within MAX_SCORE_BYTES."""
        rgb = read_rgb(image, max_pixels)
        size = rgb.shape[:2]
        x = self.prepare(rgb)
        single = tuple(self.protocol.get("scales") or (1.0,)) == (1.0,) and not self.protocol.get("flip")
        if not single and 4 * self.num_classes * size[0] * size[1] > MAX_SCORE_BYTES:
            raise TransegError(f"{image if isinstance(image, (str, os.PathLike)) else 'image'}: averaging scales or "
                               f"flips holds {self.num_classes} x {size[1]}x{size[0]} scores, above "
                               f"{MAX_SCORE_BYTES / 2**30:.0f} GiB: use a single-scale protocol or a smaller image")
        found = _blocked_argmax(self.scores(x), size) if single else self.scores(x, size).argmax(1)[0]
        return found.astype(np.uint8 if self.num_classes <= 256 else np.int32)

    def mask(self, labels):
        """The label map as an index PNG image whose palette is the classes' colours."""
        if self.num_classes > 256:
            return Image.fromarray(labels.astype(np.uint16))
        mask = Image.fromarray(labels.astype(np.uint8), mode="P")
        mask.putpalette([v for c in self.palette for v in c] + [0] * (768 - 3 * len(self.palette)))
        return mask


def _softmax(s):
    e = np.exp(s - s.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _blocked_argmax(scores, size):
    """argmax over classes of scores [1,K,h,w] upsampled to `size`, a few classes at a time (first class wins
    ties, as argmax does)."""
    k = scores.shape[1]
    per = max(1, BLOCK_BYTES // (4 * size[0] * size[1]))
    best = found = None
    for start in range(0, k, per):
        up = resize(scores[0, start:start + per], size)
        block_best, block_found = up.max(0), up.argmax(0) + start
        if best is None:
            best, found = block_best, block_found
        else:
            better = block_best > best
            found = np.where(better, block_found, found)
            best = np.maximum(best, block_best)
    return found


def _voc_palette(n):
    """The PASCAL VOC colour scheme (transeg.data.palettes.default_palette), for files without a palette."""
    out = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append((r, g, b))
    return out


def main(argv=None):
    """`python runtime.py model.onnx image mask.png`: segment one image, write its index PNG, print the shares."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3:
        print("usage: python runtime.py MODEL.onnx IMAGE MASK.png", file=sys.stderr)
        return 2
    try:
        model = OnnxSegmenter(argv[0])
        labels = model.labels(argv[1])
        if os.path.exists(argv[2]):
            raise TransegError(f"{argv[2]}: already exists; give a new file name (nothing is overwritten)")
        model.mask(labels).save(argv[2])
    except TransegError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = np.bincount(labels.ravel(), minlength=model.num_classes)
    print(", ".join(f"{model.classes[c]} {100 * counts[c] / labels.size:.0f}%" for c in counts.argsort()[::-1]
                    if counts[c]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
