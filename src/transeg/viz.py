"""Pictures people would rather look at than read: colour masks, overlays, legends, charts.

Pillow only (no matplotlib). Every function returns an RGB ``PIL.Image`` on a white background;
save it with ``img.save("x.png")``.

* :func:`colorize` / :func:`overlay` — a label map in class colours, alone or blended over the image.
* :func:`side_by_side` — titled panels, e.g. image | prediction | ground truth.
* :func:`legend` — colour swatches with class names.
* :func:`iou_chart` — per-class IoU as horizontal bars in the class colours, from
  :meth:`transeg.engine.metrics.ConfusionMatrix.compute`.
* :func:`curves_chart` — training curves (loss, mIoU, ...) vs. iteration from JSONL log records.
* :func:`tradeoff_chart` — labelled points of a cost (GFLOPs) against latency / accuracy, e.g. an
  ISR sweep.

A ``palette`` is anything shaped like ``[K, 3]`` (list of RGB tuples, flat list of 3K ints, numpy
array, tensor); ``None`` means the PASCAL VOC colour map, which has a distinct colour per id.
"""
from __future__ import annotations

import functools
import math
from numbers import Real

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from transeg.errors import TransegError

__all__ = ["colorize", "overlay", "side_by_side", "legend", "iou_chart", "curves_chart", "tradeoff_chart", "voc_palette"]

WHITE = (255, 255, 255)
TEXT = (34, 34, 34)
MUTED = (120, 120, 120)
GRID = (228, 228, 228)
AXIS = (150, 150, 150)
STRIPE = (247, 247, 249)
LINE_COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]


# ------------------------------------------------------------------------------------ helpers
@functools.lru_cache(maxsize=32)
def _font(size: int):
    """Pillow's bundled font at ``size`` px (Pillow >= 10.1 with FreeType), else the bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, AttributeError, OSError, ImportError):
        return ImageFont.load_default()


def _scalable_font() -> bool:
    return _font(24) is not _font(12) and _line_h(_font(24)) > _line_h(_font(12))


def _text_w(font, text: str) -> int:
    if not text:
        return 0
    l, _, r, _ = font.getbbox(text)
    return r - l


def _line_h(font) -> int:
    _, t, _, b = font.getbbox("Ag|")
    return b + max(t, 0)


def _fit(font, text: str, width: int) -> str:
    """``text`` shortened with an ellipsis so it fits in ``width`` pixels."""
    if _text_w(font, text) <= width:
        return text
    while text and _text_w(font, text + "...") > width:
        text = text[:-1]
    return text + "..." if text else ""


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map (bit-interleaved ids): ``[n, 3]`` uint8, distinct per id."""
    out = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out[i] = (r, g, b)
    return out


def _palette(palette, need: int | None = None, where: str = "palette") -> np.ndarray:
    if palette is None:
        return voc_palette(max(256, need or 0))
    if hasattr(palette, "detach"):
        palette = palette.detach().cpu().numpy()
    try:
        arr = np.asarray(palette, dtype=np.int64)
    except (TypeError, ValueError):
        raise TransegError(f"{where}: palette must be [K, 3] RGB ints, got {type(palette).__name__}") from None
    if arr.ndim == 1 and arr.size % 3 == 0:
        arr = arr.reshape(-1, 3)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise TransegError(f"{where}: palette must be [K, 3] RGB ints, got shape {tuple(arr.shape)}")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise TransegError(f"{where}: palette values must be in [0, 255]")
    if need is not None and len(arr) < need:
        raise TransegError(f"{where}: palette has {len(arr)} colours for {need} classes")
    return arr.astype(np.uint8)


def _label_array(label, where: str) -> np.ndarray:
    if hasattr(label, "detach"):
        label = label.detach().cpu().numpy()
    elif isinstance(label, Image.Image):
        label = np.asarray(label)
    arr = np.asarray(label)
    while arr.ndim > 2 and arr.shape[0] == 1:  # [1, H, W] -> [H, W]
        arr = arr[0]
    if arr.ndim != 2:
        raise TransegError(f"{where}: label must be H x W, got shape {tuple(arr.shape)}")
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        raise TransegError(f"{where}: label must hold integer class ids, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def _image_array(image, where: str) -> np.ndarray:
    """PIL image, HxWx3 / HxW array or [3,H,W] / HxWx3 tensor -> HxWx3 uint8 (floats in [0, 1])."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    is_tensor = hasattr(image, "detach")
    arr = image.detach().cpu().numpy() if is_tensor else np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and (is_tensor or arr.shape[-1] not in (1, 3)):
        arr = arr.transpose(1, 2, 0)  # CHW -> HWC
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3):
        raise TransegError(f"{where}: image must be H x W x 3 or 3 x H x W, got shape {tuple(arr.shape)}")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if np.issubdtype(arr.dtype, np.floating):
        arr = np.rint(np.clip(arr, 0.0, 1.0) * 255.0)
    elif arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255)
    return arr.astype(np.uint8)


def _as_pil(panel, where: str) -> Image.Image:
    if isinstance(panel, Image.Image):
        return panel.convert("RGB")
    return Image.fromarray(_image_array(panel, where))


def _darker(color, f: float = 0.65):
    return tuple(int(c * f) for c in color)


def _fmt_iter(v: float) -> str:
    """1000 -> 1k, 2500 -> 2.5k, 1200000 -> 1.2M."""
    a = abs(v)
    if a >= 1e6:
        return f"{v / 1e6:g}M"
    if a >= 1e3:
        return f"{v / 1e3:g}k"
    return f"{v:g}"


def _nice_step(span: float, n: int) -> float:
    raw = span / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * (1 - 1e-9))


def _axis(lo: float, hi: float, n: int = 5):
    """Axis range [lo, hi] (widened only if empty) and the 1/2/2.5/5 x 10^k ticks inside it."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        lo, hi = 0.0, 1.0
    if hi <= lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    step = _nice_step(hi - lo, n)
    first = math.ceil(lo / step - 1e-9)
    ticks = []
    k = first
    while k * step <= hi + step * 1e-9:
        ticks.append(0.0 if k == 0 else k * step)
        k += 1
    return lo, hi, ticks, step


def _fmt_tick(v: float, step: float) -> str:
    """Tick label: fixed decimals matching ``step``; scientific for very small / large steps."""
    if v == 0:
        return "0"
    if step < 1e-3 or abs(v) >= 1e6:
        m, e = f"{v:.2e}".split("e")
        m = m.rstrip("0").rstrip(".")
        return f"{m}e{int(e)}"
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    if round(step / 10 ** math.floor(math.log10(step) + 1e-9), 6) == 2.5:
        decimals += 1
    return f"{v:.{decimals}f}"


def _fmt_val(v: float) -> str:
    """A value in a caption: 4 significant digits, scientific only when tiny or huge."""
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
        m, e = f"{v:.3e}".split("e")
        return f"{m.rstrip('0').rstrip('.')}e{int(e)}"
    return f"{v:.4g}"


# -------------------------------------------------------------------------- label pictures
def colorize(label, palette=None, ignore_index: int = 255, ignore_color=(0, 0, 0)) -> Image.Image:
    """Label map ``H x W`` (numpy / tensor / PIL 'L'/'P') -> RGB image in the palette's colours.

    Pixels equal to ``ignore_index`` get ``ignore_color``; any other id without a palette colour
    raises :class:`TransegError`.
    """
    lab = _label_array(label, "colorize")
    pal = _palette(palette, where="colorize")
    valid = lab != ignore_index
    bad = valid & ((lab < 0) | (lab >= len(pal)))
    if bad.any():
        raise TransegError(
            f"colorize: label value {int(lab[bad][0])} has no colour (palette has {len(pal)}, ignore_index {ignore_index})"
        )
    rgb = np.empty(lab.shape + (3,), dtype=np.uint8)
    rgb[...] = np.asarray(ignore_color, dtype=np.uint8)
    rgb[valid] = pal[lab[valid]]
    return Image.fromarray(rgb, "RGB")


def overlay(image, label, palette=None, alpha: float = 0.5, ignore_index: int = 255) -> Image.Image:
    """Blend class colours over ``image``: ``out = (1 - alpha) * image + alpha * colour``.

    ``image``: PIL image, ``H x W x 3`` uint8 array, or ``[3, H, W]`` / ``H x W x 3`` tensor
    (uint8, or float in [0, 1] — de-normalise first). Ignored pixels keep the image.
    """
    if not (isinstance(alpha, Real) and 0.0 <= alpha <= 1.0):
        raise TransegError(f"overlay: alpha must be in [0, 1], got {alpha!r}")
    img = _image_array(image, "overlay")
    lab = _label_array(label, "overlay")
    if img.shape[:2] != lab.shape:
        raise TransegError(f"overlay: image is {img.shape[1]}x{img.shape[0]} but label is {lab.shape[1]}x{lab.shape[0]} (W x H)")
    color = np.asarray(colorize(lab, palette, ignore_index), dtype=np.float32)
    out = img.astype(np.float32)
    valid = lab != ignore_index
    out[valid] = (1.0 - alpha) * out[valid] + alpha * color[valid]
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB")


def side_by_side(panels, titles=None, gap: int = 8) -> Image.Image:
    """Panels in a row on white, each with its title centred above (e.g. image | pred | GT).

    Panels may differ in size (top-aligned). ``titles`` is one string per panel, or None.
    """
    ims = [_as_pil(p, "side_by_side") for p in panels]
    if not ims:
        raise TransegError("side_by_side: no panels given")
    titles = list(titles) if titles else []
    if titles and len(titles) != len(ims):
        raise TransegError(f"side_by_side: {len(titles)} titles for {len(ims)} panels")
    size = int(np.clip(min(im.width for im in ims) // 16, 12, 22))
    font = _font(size)
    title_h = _line_h(font) + gap if titles else 0
    width = sum(im.width for im in ims) + gap * (len(ims) + 1)
    height = title_h + max(im.height for im in ims) + 2 * gap
    canvas = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(canvas)
    x = gap
    for i, im in enumerate(ims):
        if titles:
            t = _fit(font, str(titles[i]), im.width)
            draw.text((x + (im.width - _text_w(font, t)) // 2, gap // 2 + 2), t, fill=TEXT, font=font)
        canvas.paste(im, (x, title_h + gap))
        x += im.width + gap
    return canvas


def legend(class_names, palette=None, present=None, max_rows: int = 20) -> Image.Image:
    """Colour swatch + name per class (only the ids in ``present`` if given; others ignored).

    More than ``max_rows`` entries wrap into columns.
    """
    names = [str(n) for n in class_names]
    pal = _palette(palette, len(names), "legend")
    ids = [i for i in range(len(names)) if present is None or i in {int(p) for p in present}]
    font = _font(14)
    sw, row_h, pad = 16, 24, 10
    if not ids:
        msg = "(no classes)"
        img = Image.new("RGB", (_text_w(font, msg) + 2 * pad, row_h + 2 * pad), WHITE)
        ImageDraw.Draw(img).text((pad, pad + 4), msg, fill=MUTED, font=font)
        return img
    rows = min(len(ids), max_rows)
    cols = math.ceil(len(ids) / rows)
    col_w = sw + 8 + max(_text_w(font, names[i]) for i in ids) + 24
    img = Image.new("RGB", (cols * col_w + 2 * pad - 24, rows * row_h + 2 * pad), WHITE)
    draw = ImageDraw.Draw(img)
    text_dy = (sw - _line_h(font)) // 2
    for k, i in enumerate(ids):
        x = pad + (k // rows) * col_w
        y = pad + (k % rows) * row_h + (row_h - sw) // 2
        color = tuple(int(c) for c in pal[i])
        draw.rectangle([x, y, x + sw - 1, y + sw - 1], fill=color, outline=_darker(color))
        draw.text((x + sw + 8, y + text_dy), names[i], fill=TEXT, font=font)
    return img


# ---------------------------------------------------------------------------------- charts
def iou_chart(result: dict, class_names, palette=None, title: str = "") -> Image.Image:
    """Horizontal bars of per-class IoU (%) in the class colours, from ``ConfusionMatrix.compute()``.

    Bars have value labels; classes with undefined IoU (absent from labels and predictions) read
    "n/a"; a dashed line marks the mIoU; a summary line gives mIoU / mAcc / aAcc.
    """
    if "IoU" not in result:
        raise TransegError("iou_chart: result has no 'IoU' (pass the dict from ConfusionMatrix.compute())")
    iou = [float(v) for v in result["IoU"]]
    names = [str(n) for n in class_names]
    if len(names) != len(iou):
        raise TransegError(f"iou_chart: {len(names)} class names for {len(iou)} classes")
    pal = _palette(palette, len(iou), "iou_chart")

    f_title, f_sum, f_name, f_val, f_tick = _font(20), _font(15), _font(14), _font(12), _font(12)
    margin, row_h, bar_h, plot_w = 20, 24, 16, 520
    name_w = max([_text_w(f_name, n) for n in names] + [40])
    name_w = min(name_w, 260)
    val_w = _text_w(f_val, "100.00") + 10
    x0 = margin + name_w + 12  # left edge of the bars (0 %)
    width = x0 + plot_w + val_w + margin

    def pct(key):
        v = result.get(key)
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * float(v):.2f}"

    y = margin
    header = []
    if title:
        header.append((title, f_title, TEXT))
    header.append((f"mIoU {pct('mIoU')}    mAcc {pct('mAcc')}    aAcc {pct('aAcc')}", f_sum, TEXT))
    header_h = sum(_line_h(f) + 8 for _, f, _ in header)
    top = y + header_h + 6  # first row
    plot_h = row_h * len(iou)
    axis_y = top + plot_h
    height = axis_y + 8 + _line_h(f_tick) + 8 + _line_h(f_tick) + margin

    img = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(img)
    for text, f, col in header:
        draw.text((margin, y), _fit(f, text, width - 2 * margin), fill=col, font=f)
        y += _line_h(f) + 8

    # Background: row stripes, vertical gridlines, the mIoU marker (all behind the bars).
    for i in range(len(iou)):
        if i % 2 == 1:
            draw.rectangle([margin, top + i * row_h, x0 + plot_w + val_w, top + (i + 1) * row_h - 1], fill=STRIPE)
    for t in range(0, 101, 10):
        x = x0 + round(plot_w * t / 100)
        draw.line([(x, top), (x, axis_y)], fill=GRID if t % 20 else (210, 210, 210), width=1)
    m = result.get("mIoU")
    if m is not None and math.isfinite(float(m)):
        mx = x0 + round(plot_w * float(m))
        for yy in range(top, axis_y, 8):
            draw.line([(mx, yy), (mx, min(yy + 4, axis_y))], fill=(90, 90, 90), width=1)
        lbl = "mIoU"
        draw.text((mx - _text_w(f_tick, lbl) // 2, top - _line_h(f_tick) - 2), lbl, fill=MUTED, font=f_tick)

    name_dy = (row_h - _line_h(f_name)) // 2
    val_dy = (row_h - _line_h(f_val)) // 2
    for i, (name, v) in enumerate(zip(names, iou)):
        ry = top + i * row_h
        draw.text((x0 - 10 - _text_w(f_name, _fit(f_name, name, name_w)), ry + name_dy),
                  _fit(f_name, name, name_w), fill=TEXT, font=f_name)
        if math.isnan(v):
            draw.text((x0 + 6, ry + val_dy), "n/a", fill=MUTED, font=f_val)
            continue
        color = tuple(int(c) for c in pal[i])
        bw = round(plot_w * min(max(v, 0.0), 1.0))
        by = ry + (row_h - bar_h) // 2
        if bw > 0:
            draw.rectangle([x0, by, x0 + bw - 1, by + bar_h - 1], fill=color, outline=_darker(color))
        draw.text((x0 + bw + 5, ry + val_dy), f"{100 * v:.2f}", fill=TEXT, font=f_val)

    # x axis with ticks every 20 %.
    draw.line([(x0, axis_y), (x0 + plot_w, axis_y)], fill=AXIS, width=1)
    draw.line([(x0, top), (x0, axis_y)], fill=AXIS, width=1)
    for t in range(0, 101, 20):
        x = x0 + round(plot_w * t / 100)
        draw.line([(x, axis_y), (x, axis_y + 4)], fill=AXIS, width=1)
        s = str(t)
        draw.text((x - _text_w(f_tick, s) // 2, axis_y + 7), s, fill=TEXT, font=f_tick)
    lbl = "IoU (%)"
    draw.text((x0 + (plot_w - _text_w(f_tick, lbl)) // 2, axis_y + 10 + _line_h(f_tick)), lbl, fill=MUTED, font=f_tick)
    return img


def _series(records, key):
    pts = []
    for r in records:
        if not isinstance(r, dict):
            continue
        it, v = r.get("iter"), r.get(key)
        if isinstance(it, bool) or isinstance(v, bool) or not isinstance(it, Real) or not isinstance(v, Real):
            continue
        if math.isfinite(float(it)) and math.isfinite(float(v)):
            pts.append((float(it), float(v)))
    pts.sort(key=lambda p: p[0])
    return pts


def _is_noisy(ys) -> bool:
    """Jagged rather than smooth: mean |second difference| above 2 % of the value range."""
    span = max(ys) - min(ys)
    if span <= 0 or len(ys) < 3:
        return False
    d2 = [abs(ys[i + 1] - 2 * ys[i] + ys[i - 1]) for i in range(1, len(ys) - 1)]
    return sum(d2) / len(d2) > 0.02 * span


def _ema(values, weight):
    """TensorBoard-style debiased exponential moving average."""
    out, acc = [], 0.0
    for i, v in enumerate(values, 1):
        acc = weight * acc + (1 - weight) * v
        out.append(acc / (1 - weight**i))
    return out


def curves_chart(records, keys=("loss", "mIoU"), title: str = "", width: int = 760) -> Image.Image:
    """Line plots vs. ``"iter"`` from training-log records (dicts, e.g. read from a JSONL log).

    One panel per key that has at least one finite value; records without ``"iter"`` or the key
    are skipped. Each panel has ticked, gridded axes and a caption with the last and the best value
    (lowest for keys containing "loss", highest otherwise). Long noisy series are drawn faintly
    with a smoothed line on top. With nothing to plot, a small "no data" image is returned.
    """
    if isinstance(keys, str):
        keys = (keys,)
    series = [(k, _series(records, k)) for k in keys]
    series = [(k, pts) for k, pts in series if pts]

    # Draw at 2x and downsample for anti-aliased lines and text -- unless the font cannot scale
    # (old Pillow / no FreeType), where the fixed bitmap font would shrink to half size.
    s = 2 if _scalable_font() else 1
    f_title, f_cap, f_tick = _font(20 * s), _font(14 * s), _font(12 * s)
    margin = 18 * s
    W = width * s
    if not series:
        msg = "no data for " + ", ".join(map(str, keys)) if keys else "no data"
        img = Image.new("RGB", (W, (2 * margin + _line_h(f_cap) + (_line_h(f_title) + 10 * s if title else 0))), WHITE)
        d = ImageDraw.Draw(img)
        y = margin
        if title:
            d.text((margin, y), title, fill=TEXT, font=f_title)
            y += _line_h(f_title) + 10 * s
        d.text((margin, y), msg, fill=MUTED, font=f_cap)
        return img.reduce(s)

    panel_h = 250 * s
    title_h = _line_h(f_title) + 12 * s if title else 0
    H = margin + title_h + len(series) * panel_h + margin
    img = Image.new("RGB", (W, H), WHITE)
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((margin, margin), _fit(f_title, title, W - 2 * margin), fill=TEXT, font=f_title)

    # Axes first, so every panel shares one plot width (left edges line up).
    # x: 0 (or the first iter if negative) to the last iter; y: data range padded 6 %, not below 0
    # for non-negative data.
    axes = []
    for key, pts in series:
        xs = [q[0] for q in pts]
        ys = [q[1] for q in pts]
        x_lo, x_hi, x_ticks, _ = _axis(min(0.0, xs[0]), xs[-1], 6)
        y_min, y_max = min(ys), max(ys)
        pad = (y_max - y_min) * 0.06
        y_lo, y_hi, y_ticks, y_step = _axis(max(y_min - pad, 0.0) if y_min >= 0 else y_min - pad, y_max + pad, 6)
        axes.append((xs, ys, (x_lo, x_hi, x_ticks, [_fmt_iter(t) for t in x_ticks]),
                     (y_lo, y_hi, y_ticks, [_fmt_tick(t, y_step) for t in y_ticks])))
    tick_h = _line_h(f_tick)
    cap_h = _line_h(f_cap) + 10 * s
    left = margin + max(_text_w(f_tick, t) for a in axes for t in a[3][3]) + 10 * s
    right = W - margin - max(_text_w(f_tick, a[2][3][-1]) for a in axes) // 2
    inset = 6 * s  # keep end points and markers off the frame

    for p, ((key, pts), (xs, ys, (x_lo, x_hi, x_ticks, x_labels), (y_lo, y_hi, y_ticks, y_labels))) in \
            enumerate(zip(series, axes)):
        color = LINE_COLORS[p % len(LINE_COLORS)]
        py = margin + title_h + p * panel_h
        top = py + cap_h
        bottom = py + panel_h - (tick_h + 8 * s) - (tick_h + 14 * s)

        def X(v):
            return left + inset + (v - x_lo) / (x_hi - x_lo) * (right - left - 2 * inset)

        def Y(v):
            return bottom - (v - y_lo) / (y_hi - y_lo) * (bottom - top)

        # Caption: key, last value, best value and where.
        lower_better = "loss" in key.lower()
        best_i = min(range(len(ys)), key=lambda i: (ys[i], xs[i])) if lower_better else \
            max(range(len(ys)), key=lambda i: (ys[i], -xs[i]))
        draw.text((left, py), key, fill=color, font=f_cap)
        info = f"last {_fmt_val(ys[-1])} @ {_fmt_iter(xs[-1])}    " \
               f"{'min' if lower_better else 'max'} {_fmt_val(ys[best_i])} @ {_fmt_iter(xs[best_i])}"
        draw.text((right - _text_w(f_cap, info), py), info, fill=MUTED, font=f_cap)

        # Grid, frame, ticks and tick labels.
        for t, lbl in zip(y_ticks, y_labels):
            yy = round(Y(t))
            draw.line([(left, yy), (right, yy)], fill=GRID, width=s)
            draw.line([(left - 4 * s, yy), (left, yy)], fill=AXIS, width=s)
            draw.text((left - 7 * s - _text_w(f_tick, lbl), yy - tick_h // 2 - s), lbl, fill=TEXT, font=f_tick)
        for t, lbl in zip(x_ticks, x_labels):
            xx = round(X(t))
            draw.line([(xx, top), (xx, bottom)], fill=GRID, width=s)
            draw.line([(xx, bottom), (xx, bottom + 4 * s)], fill=AXIS, width=s)
            draw.text((xx - _text_w(f_tick, lbl) // 2, bottom + 7 * s), lbl, fill=TEXT, font=f_tick)
        draw.rectangle([left, top, right, bottom], outline=AXIS, width=s)
        draw.text(((left + right - _text_w(f_tick, "iter")) // 2, bottom + tick_h + 14 * s), "iter",
                  fill=MUTED, font=f_tick)

        # The data: raw (faint when smoothed), smoothed, markers for short series.
        xy = [(X(a), Y(b)) for a, b in pts]
        smooth = len(pts) > 50 and _is_noisy(ys)
        if len(xy) > 1:
            raw_col = tuple(int(c + (255 - c) * 0.6) for c in color) if smooth else color
            draw.line(xy, fill=raw_col, width=(1 if smooth else 2) * s, joint="curve")
        if smooth:
            sm = _ema(ys, 0.9)
            draw.line([(X(a), Y(b)) for a, b in zip(xs, sm)], fill=color, width=2 * s, joint="curve")
        if len(pts) <= 30:
            r = 3 * s
            for cx, cy in xy:
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color, outline=WHITE)
    return img.reduce(s)


def tradeoff_chart(points, x_key="GFLOPs", y_keys=("latency ms", "mIoU"), title: str = "", width: int = 760) -> Image.Image:
    """One scatter panel per y key against ``x_key``, every point labelled with its ``"label"``.

    ``points`` are dicts (``{"label": "2,2,1,1 / 2,2,2", "GFLOPs": 4.7, "latency ms": 31.0}``); a panel
    is drawn only for keys some point has. The first point (the reference setting) is drawn in a
    second colour so the trade-off reads as "from here to there".
    """
    panels = [k for k in y_keys if any(isinstance(p.get(k), Real) for p in points)]
    s = 2 if _scalable_font() else 1
    f_title, f_cap, f_tick = _font(20 * s), _font(14 * s), _font(11 * s)
    margin, panel_h = 18 * s, 300 * s
    W = width * s
    title_h = _line_h(f_title) + 12 * s if title else 0
    img = Image.new("RGB", (W, margin + title_h + max(len(panels), 1) * panel_h + margin), WHITE)
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((margin, margin), _fit(f_title, title, W - 2 * margin), fill=TEXT, font=f_title)
    if not panels:
        draw.text((margin, margin + title_h), "no data", fill=MUTED, font=f_cap)
        return img.reduce(s)
    xs_all = [p[x_key] for p in points]
    x_pad = (max(xs_all) - min(xs_all)) * 0.08
    x_lo, x_hi, x_ticks, x_step = _axis(min(xs_all) - x_pad, max(xs_all) + x_pad, 6)
    tick_h = _line_h(f_tick)
    for n, key in enumerate(panels):
        pts = [(p[x_key], p[key], str(p.get("label", ""))) for p in points if isinstance(p.get(key), Real)]
        ys = [q[1] for q in pts]
        y_pad = (max(ys) - min(ys)) * 0.12
        y_lo, y_hi, y_ticks, y_step = _axis(min(ys) - y_pad, max(ys) + y_pad, 5)
        y_labels = [_fmt_tick(t, y_step) for t in y_ticks]
        left = margin + max(_text_w(f_tick, t) for t in y_labels) + 10 * s
        right = W - margin
        py = margin + title_h + n * panel_h
        top, bottom = py + _line_h(f_cap) + 10 * s, py + panel_h - 2 * tick_h - 24 * s

        def X(v):
            return left + (v - x_lo) / (x_hi - x_lo) * (right - left)

        def Y(v):
            return bottom - (v - y_lo) / (y_hi - y_lo) * (bottom - top)

        draw.text((left, py), f"{key} vs {x_key}", fill=TEXT, font=f_cap)
        for t, lbl in zip(y_ticks, y_labels):
            yy = round(Y(t))
            draw.line([(left, yy), (right, yy)], fill=GRID, width=s)
            draw.text((left - 7 * s - _text_w(f_tick, lbl), yy - tick_h // 2 - s), lbl, fill=TEXT, font=f_tick)
        for t in x_ticks:
            xx, lbl = round(X(t)), _fmt_tick(t, x_step)
            draw.line([(xx, top), (xx, bottom)], fill=GRID, width=s)
            draw.text((xx - _text_w(f_tick, lbl) // 2, bottom + 6 * s), lbl, fill=TEXT, font=f_tick)
        draw.rectangle([left, top, right, bottom], outline=AXIS, width=s)
        draw.text(((left + right - _text_w(f_tick, x_key)) // 2, bottom + tick_h + 12 * s), x_key, fill=MUTED, font=f_tick)
        r = 4 * s
        order = {i: rank for rank, i in enumerate(sorted(range(len(pts)), key=lambda i: pts[i][0]))}
        for i, (a, b, lbl) in enumerate(pts):
            color = LINE_COLORS[1] if i == 0 else LINE_COLORS[0]
            cx, cy = X(a), Y(b)
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color, outline=WHITE)
            # labels alternate above/below along x so neighbours with close costs stay readable
            ty = cy - r - tick_h - 2 * s if order[i] % 2 == 0 else cy + r + 2 * s
            tx = min(max(cx - _text_w(f_tick, lbl) / 2, left + 2 * s), right - _text_w(f_tick, lbl) - 2 * s)
            draw.text((tx, ty), lbl, fill=_darker(color), font=f_tick)
    return img.reduce(s)
