"""Whole-image, sliding-window and multi-scale + flip prediction (mmseg's test modes).

All functions take an already normalised image batch [N,3,H,W] and return per-class scores at
`out_size` (default: the input size): logits for a single forward pass, the mean of softmax
probabilities when several scales/flips are combined (as mmseg's aug_test does). argmax of either is
the prediction.
"""
import math

import torch
import torch.nn.functional as F


def _resize(x, size):
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def logits_whole(model, x):
    """One forward pass; scores at the input size (mmseg encode_decode; see Segmentor.logits: models
    that pad their input crop the padding back off, Mask2Former upsamples its masks first)."""
    full = getattr(model, "logits", None)
    return full(x) if full else _resize(model(x), x.shape[-2:])


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


def predict(model, x, out_size=None, mode="whole", crop=None, stride=None, scales=(1.0,), flip=False,
            size_divisor=None, batch_size=8, canvas_device="auto", min_short_side=None):
    """Scores [N, K, *out_size].

    mode: "whole" or "slide" (needs `crop` and `stride`, (h, w) tuples).
    scales: ratios applied to the input; with `size_divisor`, each scaled size is rounded up to a
    multiple of it (SegFormer's AlignedResize). Several scales or flip -> mean of softmax
    probabilities, each resized to `out_size` first (flipped predictions are flipped back).
    min_short_side: a scaled image whose short side is below it is first enlarged (keep ratio, long
    side truncated) so that it is not (Segmenter's rule: windows are never larger than the image).
    """
    if mode not in ("whole", "slide"):
        raise ValueError(f"inference mode must be 'whole' or 'slide', got {mode!r}")
    if mode == "slide" and (crop is None or stride is None):
        raise ValueError("slide inference needs crop=(h, w) and stride=(h, w)")
    out_size = tuple(out_size or x.shape[-2:])
    scales = list(scales) or [1.0]
    single = len(scales) == 1 and scales[0] == 1.0 and not flip
    total = None
    for scale in scales:
        h, w = x.shape[-2:]
        size = (int(h * scale + 0.5), int(w * scale + 0.5))
        if size_divisor:
            size = tuple(math.ceil(s / size_divisor) * size_divisor for s in size)
        if min_short_side and min(size) < min_short_side:
            ratio = max(size) / min(size)
            size = (min_short_side, int(ratio * min_short_side)) if size[0] <= size[1] else \
                (int(ratio * min_short_side), min_short_side)
        xs = _resize(x, size)
        for flipped in ([False, True] if flip else [False]):
            xi = xs.flip(-1) if flipped else xs
            if mode == "whole":
                logits = logits_whole(model, xi)
            else:
                logits = logits_slide(model, xi, crop, stride, batch_size, canvas_device)
            if flipped:
                logits = logits.flip(-1)
            logits = _resize(logits, out_size)
            if single:
                return logits
            probs = logits.float() if getattr(model, "outputs_probabilities", False) else logits.float().softmax(1)
            total = probs if total is None else total.add_(probs)
    return total / (len(scales) * (2 if flip else 1))
