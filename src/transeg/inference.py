"""Inference: images in, label maps out, under a model's test protocol.

Two levels, shared by `Segmentor.predict`, the evaluation loop, the CLI and the service:

- `segment(model, inputs)`: image files, PIL images or HxWx3 uint8 arrays -> one `Segmentation` each
  (label map at the image's own size, optionally the class probabilities), and `scores(model, images)`
  for uint8 tensors [N,3,H,W]: the protocol's resize, the model's normalisation, then
- `normalised_scores(model, x)`: a normalised batch [N,3,H,W] -> per-class scores at `out_size` with mmseg's
  test modes (whole image or sliding windows; multi-scale + flip). Scores are logits for a single
  pass and the mean of softmax probabilities when several scales/flips are combined (mmseg's
  aug_test); argmax of either is the prediction.
"""
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .errors import TransegError
from .protocol import Protocol

# The largest image `segment` decodes from a file unless told otherwise (max_pixels): 100 megapixels,
# 0.3 GB as RGB and about 1.2 GB per float copy of it in the model; larger files are refused from
# their header (a 20 kB PNG can declare 13000x13000 pixels).
MAX_PIXELS = 100_000_000
# The most bytes of scores at the image's size a prediction holds at once: single-pass label maps (and
# confidences) are upsampled and reduced a few classes at a time within it, so their peak memory does not grow
# with the class count: this block plus about 45 bytes per output pixel (a 12 MP photo: about 0.8 GB, where
# all 150 classes of an ADE20K model at once would be 7.2 GB). 256 MiB holds all classes of an ADE20K or
# Cityscapes validation image (150 x 683 x 512, 19 x 2048 x 1024), which are then reduced in one call.
SCORE_BLOCK_BYTES = 256 * 2**20
# Scores at the image's size for all K classes at once ([N,K,H,W] float32), which class probabilities and
# multi-scale / flip averaging need, are made only up to this size; above it, one line says what to change.
MAX_SCORE_BYTES = 2 * 2**30


def _resize(x, size):
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def logits_whole(model, x):
    """One forward pass; scores at the input size (mmseg encode_decode; see Segmentor.logits: models
    that pad their input crop the padding back off, Mask2Former upsamples its masks first)."""
    return model.logits(x)


def slide_windows(height, width, crop, stride):
    """Window boxes (y1, y2, x1, x2) covering the image, mmseg's grid: the last window in each
    direction is shifted back to end at the border; images smaller than the crop get one window."""
    (ch, cw), (sh, sw) = crop, stride
    rows = max(height - ch + sh - 1, 0) // sh + 1
    cols = max(width - cw + sw - 1, 0) // sw + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * sh + ch, height), min(c * sw + cw, width)
            boxes.append((max(y2 - ch, 0), y2, max(x2 - cw, 0), x2))
    return boxes


def _canvas_device(x, channels, canvas_device):
    """Where to accumulate window logits. "auto": on the accelerator unless the fp32 canvas would take
    more than a quarter of its free memory, then on the CPU (users run 9000x9000 images)."""
    if canvas_device not in (None, "auto"):
        return torch.device(canvas_device)
    if x.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(x.device)
        if x.shape[0] * channels * x.shape[-2] * x.shape[-1] * 4 > free // 4:
            return torch.device("cpu")
    return x.device


def logits_slide(model, x, crop, stride, batch_size=8, canvas_device="auto", num_classes=None):
    """Sliding-window logits at the input size: windows run `batch_size` at a time, each window's
    logits are upsampled to the window size and summed into a canvas, then divided by the overlap count."""
    n, _, h, w = x.shape
    boxes = slide_windows(h, w, crop, stride)
    num_classes = num_classes or model.num_classes
    device = _canvas_device(x, num_classes, canvas_device)
    canvas = torch.zeros(n, num_classes, h, w, device=device)
    count = torch.zeros(1, 1, h, w, device=device)
    per_chunk = max(1, batch_size // n)
    for start in range(0, len(boxes), per_chunk):
        chunk = boxes[start:start + per_chunk]
        crops = torch.cat([x[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in chunk])
        out = logits_whole(model, crops).to(device=device, dtype=canvas.dtype)
        for i, (y1, y2, x1, x2) in enumerate(chunk):
            canvas[:, :, y1:y2, x1:x2] += out[i * n:(i + 1) * n]
            count[:, :, y1:y2, x1:x2] += 1
    return canvas / count


def scaled_size(size, scale, protocol):
    """The size (h, w) an input of `size` runs at for one of the protocol's scales: `scale` times it,
    rounded up to `size_divisor`, enlarged (keep ratio, long side truncated) to `min_short_side`."""
    h, w = size
    size = (int(h * scale + 0.5), int(w * scale + 0.5))
    if protocol.size_divisor:
        size = tuple(math.ceil(s / protocol.size_divisor) * protocol.size_divisor for s in size)
    short = protocol.min_short_side
    if short and min(size) < short:
        ratio = max(size) / min(size)
        size = (short, int(ratio * short)) if size[0] <= size[1] else (int(ratio * short), short)
    return size


def forward_sizes(image_size, protocol):
    """The input sizes of the forward passes `scores` makes for one image of `image_size` (h, w):
    per scale (and flip), the whole image or each sliding window. For counting their cost."""
    from .data.transforms import TestTransform

    size = TestTransform(scale=protocol.scale, size_divisor=protocol.size_divisor).output_size(image_size)
    sizes = []
    for scale in protocol.scales:
        h, w = scaled_size(size, scale, protocol)
        boxes = [(0, h, 0, w)] if protocol.mode == "whole" else slide_windows(h, w, protocol.crop, protocol.stride)
        sizes += [(y2 - y1, x2 - x1) for y1, y2, x1, x2 in boxes] * (2 if protocol.flip else 1)
    return sizes


def normalised_scores(model, x, protocol=None, out_size=None, batch_size=8, canvas_device="auto", probabilities=False,
            **fields):
    """Scores [N, K, *out_size] (default: the input size) of a normalised batch `x` [N,3,H,W].

    protocol: a `Protocol` (default: whole image, no alignment); `fields` (mode, crop, stride, scales,
    flip, size_divisor, min_short_side) change it for this call. Its `scale` is not applied here: `x`
    is already resized (see `scores`). With `size_divisor`, each scaled size is rounded up to a
    multiple of it (SegFormer's AlignedResize). Several scales or flip -> mean of softmax
    probabilities, each resized to `out_size` first (flipped predictions are flipped back).
    probabilities: return probabilities even for a single pass (softmax of the logits).
    """
    protocol = (protocol or Protocol(size_divisor=None)).replace(**fields)
    out_size = tuple(out_size or x.shape[-2:])
    as_probabilities = probabilities or not protocol.single
    total = None
    for scale in protocol.scales:
        xs = _resize(x, scaled_size(x.shape[-2:], scale, protocol))
        for flipped in ([False, True] if protocol.flip else [False]):
            xi = xs.flip(-1) if flipped else xs
            if protocol.mode == "whole":
                logits = logits_whole(model, xi)
            else:
                logits = logits_slide(model, xi, protocol.crop, protocol.stride, batch_size, canvas_device)
            if flipped:
                logits = logits.flip(-1)
            logits = _resize(logits, out_size)
            if not as_probabilities:
                return logits
            probs = logits.float() if model.outputs_probabilities else logits.float().softmax(1)
            total = probs if total is None else total.add_(probs)
    return total / (len(protocol.scales) * (2 if protocol.flip else 1))


def is_default_isr(model):
    """True unless an ISR setting is applied (models without pooled attention: always True)."""
    from .isr import is_default

    return is_default(model.isr)


def model_device(model):
    return next(model.parameters()).device


def prepare(model, images, protocol):
    """uint8 RGB images [N,3,H,W] (or one [3,H,W]) -> the normalised batch the model runs on: the protocol's
    keep-ratio resize and alignment and the model's normalisation, on the model's device."""
    from .data.transforms import TestTransform

    images = images[None] if images.dim() == 3 else images
    transform = TestTransform(scale=protocol.scale, size_divisor=protocol.size_divisor,
                              mean=model.meta["mean"], std=model.meta["std"])
    return torch.stack([transform(image) for image in images.cpu()]).to(model_device(model), non_blocking=True)


def scores(model, images, protocol=None, out_size=None, probabilities=False):
    """Scores [N, K, *out_size] (default: the images' size) of uint8 RGB images [N,3,H,W] (or one
    [3,H,W]) under `protocol` (default: the model's own): `prepare`, then `normalised_scores`. They are
    K x H x W at the size asked for: refused above MAX_SCORE_BYTES (`labels` needs no such size)."""
    protocol = protocol or model.protocol
    out_size = tuple(out_size or images.shape[-2:])
    check_score_bytes(model.num_classes, out_size, 1 if images.dim() == 3 else images.shape[0])
    return normalised_scores(model, prepare(model, images, protocol), protocol, out_size=out_size,
                             probabilities=probabilities)


def check_score_bytes(num_classes, size, batch=1, limit=None,
                      fix="ask for labels and confidence instead of probabilities, use a single-scale protocol "
                          "without flip, or a smaller image"):
    """Refuse, in one line, scores of `num_classes` x `size` (h, w) x `batch` in float32 above `limit` bytes
    (default MAX_SCORE_BYTES), before any is allocated; `fix` says what to change."""
    limit = MAX_SCORE_BYTES if limit is None else limit
    need = 4 * num_classes * size[0] * size[1] * batch
    if need > limit:
        raise TransegError(f"class scores at the image's size need {need / 2**30:.1f} GiB ({num_classes} classes x "
                           f"{size[1]}x{size[0]} pixels x {batch} image(s)), above the {limit / 2**30:.1f} GiB limit: "
                           f"{fix}")


def labels(model, images, protocol=None, out_size=None, confidence=False, block_bytes=None):
    """(labels [N,*out_size] int64, confidence [N,*out_size] float32 or None) of uint8 RGB images [N,3,H,W]
    (or one [3,H,W]) under `protocol` (default: the model's own) at `out_size` (default: the images' size):
    `prepare`, then `normalised_labels`."""
    protocol = protocol or model.protocol
    out_size = tuple(out_size or images.shape[-2:])
    return normalised_labels(model, prepare(model, images, protocol), protocol, out_size, confidence, block_bytes)


def normalised_labels(model, x, protocol=None, out_size=None, confidence=False, block_bytes=None, **fields):
    """(labels, confidence or None) [N,*out_size] of a normalised batch `x`: the argmax of `normalised_scores`
    and the winning class's probability. A single-pass protocol never holds K x H x W at `out_size`
    (`upsampled_labels`); multi-scale / flip average probabilities at `out_size` (the authors' test), so they
    hold them, within MAX_SCORE_BYTES. protocol / fields: as `normalised_scores`."""
    protocol = (protocol or Protocol(size_divisor=None)).replace(**fields)
    check_normalised(x)
    out_size = tuple(out_size or x.shape[-2:])
    if protocol.single:  # scores at the size the model runs at: bounded by the protocol's resize, checked here
        check_score_bytes(model.num_classes, x.shape[-2:], x.shape[0],
                          fix="give the model a test protocol that resizes large images (scale=...), or segment "
                              "the image in tiles")
        s = normalised_scores(model, x, protocol)
        return upsampled_labels(s, out_size, model.outputs_probabilities, confidence, block_bytes)
    check_score_bytes(model.num_classes, out_size, x.shape[0], fix="use a single-scale protocol without flip, or a "
                      "smaller image")
    best, found = normalised_scores(model, x, protocol, out_size=out_size).max(1)
    return found, (best.float() if confidence else None)


def check_normalised(x):
    """Refuse, in one line, a tensor that is not a normalised float batch [N,3,H,W] (a uint8 image tensor would
    run as if its 0..255 values were normalised, and give labels without meaning)."""
    if x.dim() != 4 or x.shape[1] != 3 or min(x.shape) < 1:
        raise TransegError(f"a normalised batch is [N,3,H,W] with N, H, W >= 1, got {list(x.shape)}; give one image "
                           "as a path, a PIL image or an HxWx3 uint8 array instead")
    if not x.is_floating_point():
        raise TransegError(f"a normalised batch is floating point, got {x.dtype}: give uint8 images as HxWx3 arrays "
                           "(predict) or [N,3,H,W] to inference.labels / scores, which normalise them")


def upsampled_labels(scores, size, probabilities=False, confidence=False, block_bytes=None):
    """(argmax over classes, the winning class's probability or None) of `scores` [N,K,h,w] upsampled to
    `size` (bilinear, align_corners=False), equal to upsampling all K planes and reducing them, while holding
    at most `block_bytes` of upsampled scores (and two [N,H,W] maps) at a time: each class's plane is upsampled
    on its own exactly as a call on all of them does it, and a running maximum keeps the first class on ties,
    as argmax does. confidence: with logits (`probabilities` False) the softmax of the winner, from a running
    log-sum-exp; with probabilities, the winner's score. Peak: `block_bytes` plus about 45 bytes per output
    pixel (the running maximum and class, one block's maximum and class), whatever K.

    Scores in channels-last layout (SegFormer's, EDAFormer's heads) are made NCHW-contiguous before they are
    split: a class's plane cut from a channels-last tensor would go through another upsampling kernel than the
    whole tensor does, whose rounding differs in the last bit, and near-ties would then flip. All K planes in
    one block run on the tensor as it is."""
    n, k = scores.shape[:2]
    per_block = max(1, (block_bytes or SCORE_BLOCK_BYTES) // (4 * n * size[0] * size[1]))
    if per_block < k:
        scores = scores.contiguous()
    best = found = total = None
    for start in range(0, k, per_block):
        up = _resize(scores[:, start:start + per_block], size).float()
        if up.shape[1] == 1:  # one class (large images): its plane is the block's maximum, its index `start`
            block_best, block_found = up[:, 0], None
        else:
            block_best, block_found = up.max(1)
        if best is None:
            best = block_best.clone()
            found = torch.zeros_like(best, dtype=torch.long) if block_found is None else block_found
        else:  # in place: the running maps are the only [N,H,W] tensors kept
            better = block_best > best
            if block_found is None:
                found.masked_fill_(better, start)
            else:
                torch.where(better, block_found.add_(start), found, out=found)
            if confidence and not probabilities:  # rescale the running sum of exp to the new maximum
                total.mul_(torch.exp(best - torch.maximum(best, block_best)))
            torch.maximum(best, block_best, out=best)
        if confidence and not probabilities:
            part = up.sub_(best[:, None]).exp_().sum(1)  # in place: no second block
            total = part if total is None else total.add_(part)
        del up
    if not confidence:
        return found, None
    return found, (best if probabilities else 1.0 / total)


@dataclass
class Segmentation:
    """One image's prediction. `labels`: class indices [H,W] at the image's own size (uint8 up to
    256 classes); `image`: the RGB pixels [H,W,3] uint8 the model saw, before resizing;
    `probabilities`: [K,H,W] float32 when asked for; `source`: the file it came from;
    `note`: what reading it did beyond decoding ("greyscale converted to RGB", ...);
    `confidence_map`: [H,W] float32, the winning class's probability, when asked for."""

    labels: np.ndarray
    image: np.ndarray
    classes: list
    palette: list
    probabilities: Optional[np.ndarray] = None
    source: Optional[str] = None
    note: str = ""
    confidence_map: Optional[np.ndarray] = None

    def __array__(self, dtype=None, copy=None):
        return self.labels if dtype is None else self.labels.astype(dtype)

    @property
    def confidence(self):
        """[H,W]: the probability of the predicted class (predict(..., confidence=True), or from the
        probabilities when they were asked for)."""
        if self.confidence_map is not None:
            return self.confidence_map
        if self.probabilities is None:
            raise TransegError("confidence needs predict(..., confidence=True) (or probabilities=True)")
        return self.probabilities.max(0)

    def pixel_counts(self):
        return np.bincount(self.labels.ravel(), minlength=len(self.classes))

    def shares(self):
        """{class name: share of the image's pixels} for the classes present, largest first."""
        counts = self.pixel_counts()
        return {self.classes[c]: float(counts[c] / self.labels.size) for c in counts.argsort()[::-1] if counts[c]}

    def mask(self):
        """The label map as an index PNG image (mode "P", the class colours as its palette; values
        are class indices, so the file is both the data and a picture)."""
        from PIL import Image

        if len(self.classes) > 256:
            return Image.fromarray(self.labels.astype(np.uint16))
        mask = Image.fromarray(self.labels.astype(np.uint8), mode="P")
        mask.putpalette([v for c in self.palette for v in c] + [0] * (768 - 3 * len(self.palette)))
        return mask

    def overlay(self, alpha=0.5, legend=False):
        """The image with the class colours blended over it; with `legend`, the classes present, their
        colours and shares drawn in a corner (`viz.add_legend`: the size stays the image's)."""
        from .viz import add_legend, overlay

        picture = overlay(self.image, self.labels, self.palette, alpha=alpha)
        return add_legend(picture, self.labels, self.classes, self.palette) if legend else picture


def read_input(item, max_pixels=MAX_PIXELS):
    """(RGB uint8 [H,W,3], source name or None, note) from a path, a PIL image or an HxWx3 uint8 array.
    A file larger than `max_pixels` (None: no bound) is refused from its header, before decoding."""
    from PIL import Image

    from .images import image_to_rgb, read_image

    if isinstance(item, (str, Path)):
        rgb, note = read_image(item, max_pixels=max_pixels)
        return rgb, str(item), note
    if isinstance(item, Image.Image):
        rgb, note = image_to_rgb(item)
        return rgb, None, note
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or item.ndim != 3 or item.shape[2] != 3:
            raise TransegError(f"an image array must be HxWx3 uint8 RGB, got {item.dtype} {tuple(item.shape)}")
        return np.ascontiguousarray(item), None, ""
    raise TransegError(f"cannot segment a {type(item).__name__}: give an image path, a PIL image or an HxWx3 "
                       "uint8 array (normalised tensors go to Segmentor.predict / inference.normalised_scores)")


def check_size(size, protocol, name="image"):
    """Refuse an image of `size` (h, w) that the protocol's resize would shrink to nothing: a keep-ratio
    resize to (2048, 512) leaves a 10x10000 image 0 pixels high, and so does a scale of 0.01. One line
    naming the image (`name`), its size and what the protocol makes of it."""
    from .data.transforms import TestTransform

    h, w = size
    if min(h, w) < 1:
        raise TransegError(f"{name}: {w}x{h} (WxH) has no pixels to segment")
    resized = TestTransform(scale=protocol.scale, size_divisor=None).output_size(size)
    steps = [(resized, f"its test protocol ({protocol.describe()})", "crop or pad it to a less elongated shape")]
    steps += [((int(resized[0] * s + 0.5), int(resized[1] * s + 0.5)), f"scale {s:g} of its test protocol",
               "use larger scales") for s in protocol.scales]
    for (rh, rw), what, fix in steps:
        if min(rh, rw) < 1:
            shape = "too small" if min(h, w) * 4 > max(h, w) else "too thin"
            raise TransegError(f"{name}: {w}x{h} (WxH) is {shape} for this model: {what} makes it {rw}x{rh}; {fix}")


# what torch says when an input is smaller than a layer's window (a key/value reduction conv, a pool)
_TOO_SMALL = ("Kernel size can't be greater than actual input size", "Output size is too small",
              "Input and output sizes should be greater than 0", "Expected more than 1 value per channel")


def segment(model, inputs, protocol=None, probabilities=False, batch_size=1, max_pixels=MAX_PIXELS,
            confidence=False, block_bytes=None):
    """Yield one `Segmentation` per input (paths, PIL images or HxWx3 uint8 arrays), in order, under
    `protocol` (default: the model's own). Consecutive images of the same size run `batch_size` at
    a time on the model's device; inputs are read as they are needed. Files larger than `max_pixels`
    (None: no bound) are refused before decoding; an image too small or thin for the model after the
    protocol's resize is refused with its size. Label maps and confidence (`confidence`) are made without
    K x H x W at the image's size (`labels`, in blocks of `block_bytes`, default SCORE_BLOCK_BYTES);
    probabilities (`probabilities`) are that size, within MAX_SCORE_BYTES."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise TransegError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    protocol = protocol or model.protocol
    classes, palette = list(model.classes), list(model.palette)
    labels_dtype = np.uint8 if model.num_classes <= 256 else np.int32
    pending = []

    def run(batch):
        if not probabilities:
            return labels(model, batch, protocol, confidence=confidence, block_bytes=block_bytes) + (None,)
        s = scores(model, batch, protocol, probabilities=True)
        best, found = s.max(1)
        return found, best, s

    def flush():
        batch = torch.from_numpy(np.stack([rgb.transpose(2, 0, 1) for rgb, _, _ in pending]))
        try:
            with torch.no_grad():
                found, best, s = run(batch)
        except (RuntimeError, ValueError) as e:
            if not any(text in str(e) for text in _TOO_SMALL):
                raise
            h, w = batch.shape[-2:]
            runs = " and ".join(sorted({f"{sw}x{sh}" for sh, sw in forward_sizes((h, w), protocol)}))
            isr = not is_default_isr(model)
            raise TransegError(f"{pending[0][1] or 'image'}: {w}x{h} (WxH) is too small for this model"
                               f"{' with its ISR setting' if isr else ''}: it runs at {runs} under its test protocol "
                               f"({protocol.describe()}), smaller than a layer's window; use a larger image or scale"
                               f"{', or less ISR' if isr else ''}") from None
        found = found.cpu().numpy().astype(labels_dtype)
        probs = s.float().cpu().numpy() if probabilities else [None] * len(pending)
        best = best.float().cpu().numpy() if confidence or probabilities else [None] * len(pending)
        out = [Segmentation(found[i], rgb, classes, palette, probs[i], source, note, best[i])
               for i, (rgb, source, note) in enumerate(pending)]
        pending.clear()
        return out

    for item in inputs:
        rgb, source, note = read_input(item, max_pixels)
        check_size(rgb.shape[:2], protocol, source or "image")
        if pending and pending[0][0].shape != rgb.shape:
            yield from flush()
        pending.append((rgb, source, note))
        if len(pending) >= batch_size:
            yield from flush()
    if pending:
        yield from flush()


def read_truth(path, num_classes, ignore_index=255):
    """A ground-truth mask for `transeg predict --truth`: a single-channel index PNG (mode L, P or
    16-bit) whose values are class ids or `ignore_index`, as int64 [H,W]. Anything else is one line
    naming the file."""
    from PIL import Image

    try:
        with Image.open(path) as m:
            m.load()
            mode, raw = m.mode, np.asarray(m)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise TransegError(f"{path}: cannot read the mask ({str(e).splitlines()[0][:120]})") from None
    if raw.ndim != 2:
        raise TransegError(f"{path}: is a {mode} colour image; a truth mask is a single-channel index PNG whose "
                           "values are class ids (as the masks/ of a dataset folder)")
    label = raw.astype(np.int64)
    bad = np.unique(label[(label != ignore_index) & ((label < 0) | (label >= num_classes))])
    if bad.size:
        raise TransegError(f"{path}: label value {int(bad[0])} is outside the model's {num_classes} classes "
                           f"(allowed 0..{num_classes - 1} and {ignore_index}=ignore)")
    return label


def dataset_samples(model, dataset, protocol=None, count=4):
    """The first `count` items of an evaluation dataset (items: uint8 image [3,H,W], label [H,W]) with the
    model's prediction under `protocol`, as `viz.prediction_grid` samples ("val 0", "val 1", ...)."""
    samples = []
    for i in range(min(count, len(dataset))):
        item = dataset[i]
        image = np.ascontiguousarray(item["image"].permute(1, 2, 0).numpy())
        seg = next(segment(model, [image], protocol))
        samples.append({"image": image, "prediction": seg.labels, "truth": item["label"].numpy(),
                        "title": f"{getattr(dataset, 'split', None) or 'sample'} {i}"})
    return samples
