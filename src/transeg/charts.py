"""Charts of numbers a run produces: per-class IoU bars, training curves, cost trade-offs.

Pillow only (no matplotlib). Every function returns an RGB ``PIL.Image`` on a white background;
save it with ``img.save("x.png")``.

* :func:`iou_chart` — per-class IoU as horizontal bars in the class colours, from
  :meth:`transeg.engine.metrics.ConfusionMatrix.compute`.
* :func:`confusion_chart` — the row-normalised confusion matrix as a heat map, names on both axes.
* :func:`curves_chart` — training curves (loss, mIoU, ...) vs. iteration from JSONL log records.
* :func:`tradeoff_chart` — labelled points of a cost (GFLOPs) against latency / accuracy, e.g. an
  ISR sweep: reference and marked points (the paper's setting) in their own colours with a legend,
  optional quartile bars, labels that never overlap (:func:`place_labels`).

Text goes through :func:`transeg.viz.drawable`, so a character the font lacks (the bundled font has
no em dash) is drawn as a look-alike, never as a missing-glyph box; titles wrap instead of being cut.

Palettes are read as in :mod:`transeg.viz` (``None`` is the PASCAL VOC colour map), and the
font and text helpers come from there too.
"""
from __future__ import annotations

import math
from numbers import Real

from PIL import Image, ImageDraw

from transeg.errors import TransegError
from transeg.viz import MUTED, TEXT, WHITE, _darker, _draw_text, _fit, _font, _line_h, _palette, _text_w, _wrap

__all__ = ["iou_chart", "confusion_chart", "curves_chart", "tradeoff_chart", "place_labels"]

GRID = (228, 228, 228)
AXIS = (150, 150, 150)
STRIPE = (247, 247, 249)
LINE_COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]


# ------------------------------------------------------------------------------------ helpers
def _scalable_font() -> bool:
    return _font(24) is not _font(12) and _line_h(_font(24)) > _line_h(_font(12))


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
    if title:  # wrapped, not cut: a title holds the test protocol, which is long
        header += [(line, f_title, TEXT) for line in _wrap(f_title, title, width - 2 * margin)]
    header.append((f"mIoU {pct('mIoU')}    mAcc {pct('mAcc')}    aAcc {pct('aAcc')}", f_sum, TEXT))
    header_h = sum(_line_h(f) + 8 for _, f, _ in header)
    top = y + header_h + 6  # first row
    plot_h = row_h * len(iou)
    axis_y = top + plot_h
    height = axis_y + 8 + _line_h(f_tick) + 8 + _line_h(f_tick) + margin

    img = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(img)
    for text, f, col in header:
        _draw_text(draw, (margin, y), _fit(f, text, width - 2 * margin), fill=col, font=f)
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
        _draw_text(draw, (mx - _text_w(f_tick, lbl) // 2, top - _line_h(f_tick) - 2), lbl, fill=MUTED, font=f_tick)

    name_dy = (row_h - _line_h(f_name)) // 2
    val_dy = (row_h - _line_h(f_val)) // 2
    for i, (name, v) in enumerate(zip(names, iou)):
        ry = top + i * row_h
        _draw_text(draw, (x0 - 10 - _text_w(f_name, _fit(f_name, name, name_w)), ry + name_dy),
                  _fit(f_name, name, name_w), fill=TEXT, font=f_name)
        if math.isnan(v):
            _draw_text(draw, (x0 + 6, ry + val_dy), "n/a", fill=MUTED, font=f_val)
            continue
        color = tuple(int(c) for c in pal[i])
        bw = round(plot_w * min(max(v, 0.0), 1.0))
        by = ry + (row_h - bar_h) // 2
        if bw > 0:
            draw.rectangle([x0, by, x0 + bw - 1, by + bar_h - 1], fill=color, outline=_darker(color))
        _draw_text(draw, (x0 + bw + 5, ry + val_dy), f"{100 * v:.2f}", fill=TEXT, font=f_val)

    # x axis with ticks every 20 %.
    draw.line([(x0, axis_y), (x0 + plot_w, axis_y)], fill=AXIS, width=1)
    draw.line([(x0, top), (x0, axis_y)], fill=AXIS, width=1)
    for t in range(0, 101, 20):
        x = x0 + round(plot_w * t / 100)
        draw.line([(x, axis_y), (x, axis_y + 4)], fill=AXIS, width=1)
        s = str(t)
        _draw_text(draw, (x - _text_w(f_tick, s) // 2, axis_y + 7), s, fill=TEXT, font=f_tick)
    lbl = "IoU (%)"
    _draw_text(draw, (x0 + (plot_w - _text_w(f_tick, lbl)) // 2, axis_y + 10 + _line_h(f_tick)), lbl, fill=MUTED, font=f_tick)
    return img


def confusion_chart(result: dict, class_names, title: str = "") -> Image.Image:
    """The confusion matrix, row-normalised (each row: where the pixels of one labelled class went), as a
    heat map from white (0) to dark blue (1), class names on both axes (predictions rotated along the top).
    Cells shrink with the class count down to 9 px, so 150 classes (ADE20K) make a ~1.6k px square that
    stays readable; cells of 26 px and more also print their percentage. From ``ConfusionMatrix.compute()``
    (its "confusion" counts). ``img.info["cells"]``: (x, y, cell size) of the top-left cell."""
    if "confusion" not in result:
        raise TransegError("confusion_chart: result has no 'confusion' (pass the dict from ConfusionMatrix.compute())")
    counts = [[float(v) for v in row] for row in result["confusion"]]
    names = [str(n) for n in class_names]
    k = len(counts)
    if len(names) != k:
        raise TransegError(f"confusion_chart: {len(names)} class names for {k} classes")
    cell = max(9, min(40, 720 // max(k, 1)))
    f_title, f_name, f_val = _font(20), _font(max(9, min(14, cell - 2))), _font(max(9, min(12, cell // 3)))
    margin = 20
    name_w = min(max([_text_w(f_name, n) for n in names] + [30]), 220)
    line = _line_h(f_name)
    title_lines = _wrap(f_title, title, max(400, k * cell + name_w)) if title else []
    top_text = sum(_line_h(f_title) + 8 for _ in title_lines)
    axis = _line_h(f_name) + 6
    x0 = margin + axis + name_w + 6
    y0 = margin + top_text + axis + name_w + 6
    width = x0 + k * cell + margin
    height = y0 + k * cell + margin
    img = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(img)
    y = margin
    for text in title_lines:
        _draw_text(draw, (margin, y), text, fill=TEXT, font=f_title)
        y += _line_h(f_title) + 8
    # axis titles: "label" down the left, "prediction" along the top
    _draw_text(draw, (x0, margin + top_text), "prediction", fill=MUTED, font=f_name)
    side = Image.new("RGB", (_text_w(f_name, "label") + 2, axis), WHITE)
    _draw_text(ImageDraw.Draw(side), (0, 0), "label", fill=MUTED, font=f_name)
    img.paste(side.rotate(90, expand=True), (margin, y0))
    for i, name in enumerate(names):
        text = _fit(f_name, name, name_w)
        cy = y0 + i * cell + (cell - line) // 2
        _draw_text(draw, (x0 - 6 - _text_w(f_name, text), cy), text, fill=TEXT, font=f_name)
        # the same name rotated above column i, reading upwards, its end at the matrix
        strip = Image.new("RGB", (_text_w(f_name, text) + 2, line + 2), WHITE)
        _draw_text(ImageDraw.Draw(strip), (0, 0), text, fill=TEXT, font=f_name)
        strip = strip.rotate(90, expand=True)
        img.paste(strip, (x0 + i * cell + (cell - strip.width) // 2, y0 - 6 - strip.height))
    for i, row in enumerate(counts):
        total = sum(row)
        for j, v in enumerate(row):
            share = v / total if total else 0.0
            color = confusion_color(share)
            box = [x0 + j * cell, y0 + i * cell, x0 + (j + 1) * cell - 1, y0 + (i + 1) * cell - 1]
            draw.rectangle(box, fill=color, outline=GRID if cell >= 12 else None)
            if cell >= 26 and total:
                text = f"{100 * share:.0f}"
                _draw_text(draw, (box[0] + (cell - _text_w(f_val, text)) // 2, box[1] + (cell - _line_h(f_val)) // 2),
                           text, fill=WHITE if share > 0.5 else TEXT, font=f_val)
    draw.rectangle([x0 - 1, y0 - 1, x0 + k * cell, y0 + k * cell], outline=AXIS)
    img.info["cells"] = (x0, y0, cell)
    return img


def confusion_color(share: float) -> tuple:
    """White at 0 to dark blue (8, 48, 107) at 1, linear in each channel."""
    share = min(max(float(share), 0.0), 1.0)
    return tuple(round(255 + (c - 255) * share) for c in (8, 48, 107))


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
            _draw_text(d, (margin, y), title, fill=TEXT, font=f_title)
            y += _line_h(f_title) + 10 * s
        _draw_text(d, (margin, y), msg, fill=MUTED, font=f_cap)
        return img.reduce(s)

    panel_h = 250 * s
    title_h = _line_h(f_title) + 12 * s if title else 0
    H = margin + title_h + len(series) * panel_h + margin
    img = Image.new("RGB", (W, H), WHITE)
    draw = ImageDraw.Draw(img)
    if title:
        _draw_text(draw, (margin, margin), _fit(f_title, title, W - 2 * margin), fill=TEXT, font=f_title)

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
        _draw_text(draw, (left, py), key, fill=color, font=f_cap)
        info = f"last {_fmt_val(ys[-1])} @ {_fmt_iter(xs[-1])}    " \
               f"{'min' if lower_better else 'max'} {_fmt_val(ys[best_i])} @ {_fmt_iter(xs[best_i])}"
        _draw_text(draw, (right - _text_w(f_cap, info), py), info, fill=MUTED, font=f_cap)

        # Grid, frame, ticks and tick labels.
        for t, lbl in zip(y_ticks, y_labels):
            yy = round(Y(t))
            draw.line([(left, yy), (right, yy)], fill=GRID, width=s)
            draw.line([(left - 4 * s, yy), (left, yy)], fill=AXIS, width=s)
            _draw_text(draw, (left - 7 * s - _text_w(f_tick, lbl), yy - tick_h // 2 - s), lbl, fill=TEXT, font=f_tick)
        for t, lbl in zip(x_ticks, x_labels):
            xx = round(X(t))
            draw.line([(xx, top), (xx, bottom)], fill=GRID, width=s)
            draw.line([(xx, bottom), (xx, bottom + 4 * s)], fill=AXIS, width=s)
            _draw_text(draw, (xx - _text_w(f_tick, lbl) // 2, bottom + 7 * s), lbl, fill=TEXT, font=f_tick)
        draw.rectangle([left, top, right, bottom], outline=AXIS, width=s)
        _draw_text(draw, ((left + right - _text_w(f_tick, "iter")) // 2, bottom + tick_h + 14 * s), "iter",
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


def _overlaps(a, b) -> bool:
    """Boxes (x0, y0, x1, y1) share area."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _area(a, b) -> float:
    return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))


def place_labels(anchors, sizes, bounds, obstacles=(), gap=2.0):
    """Boxes for point labels that overlap neither each other nor ``obstacles``, inside ``bounds``.

    ``anchors``: (x, y, r) per point (a marker of radius r); ``sizes``: (w, h) of each label. Labels
    are placed in order (put the ones that matter first), each at the nearest free candidate: right,
    left, above, below, the diagonals, then further away above / below / sideways (the caller draws a
    leader line for those). Where nothing is free the least-overlapping candidate is taken.
    Returns [(x0, y0, x1, y1)], one per anchor."""
    bx0, by0, bx1, by1 = bounds
    taken = [tuple(o) for o in obstacles]
    placed = []
    for (cx, cy, r), (w, h) in zip(anchors, sizes):
        d = r + gap
        cands = [(cx + d, cy - h / 2), (cx - d - w, cy - h / 2), (cx - w / 2, cy - d - h), (cx - w / 2, cy + d),
                 (cx + d * 0.7, cy - d * 0.7 - h), (cx - d * 0.7 - w, cy - d * 0.7 - h), (cx + d * 0.7, cy + d * 0.7),
                 (cx - d * 0.7 - w, cy + d * 0.7)]
        far = []
        for k in range(1, 9):
            for dx in (-w / 2, 0.0, -w, d, -w - d):
                far += [(cx + dx, cy - d - h - k * (h + gap)), (cx + dx, cy + d + k * (h + gap))]
            far += [(cx + d + k * (w / 2 + gap), cy - h / 2), (cx - d - w - k * (w / 2 + gap), cy - h / 2)]
        far.sort(key=lambda c: math.hypot(c[0] + w / 2 - cx, c[1] + h / 2 - cy))
        best, best_cost = None, None
        for x, y in cands + far:
            x = min(max(x, bx0), bx1 - w)  # slid inside the frame
            y = min(max(y, by0), by1 - h)
            box = (x, y, x + w, y + h)
            cost = sum(_area(box, t) for t in taken)
            if cost == 0:
                best = box
                break
            if best_cost is None or cost < best_cost:
                best, best_cost = box, cost
        placed.append(best)
        taken.append(best)
    return placed


def _marker(draw, shape, cx, cy, r, color, s):
    if shape == "diamond":
        q = r * 1.35
        draw.polygon([(cx, cy - q), (cx + q, cy), (cx, cy + q), (cx - q, cy)], fill=color, outline=WHITE)
    else:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color, outline=WHITE)


def tradeoff_chart(points, x_key="GFLOPs", y_keys=("latency ms", "mIoU"), title: str = "", width: int = 760,
                   names=("reference", "other settings"), marked=(), marked_name="marked", whiskers=None) -> Image.Image:
    """One scatter panel per y key against ``x_key``, every point labelled with its ``"label"``.

    ``points`` are dicts (``{"label": "2,2,1,1 / 2,2,2", "GFLOPs": 4.7, "latency ms": 31.0}``); a panel
    is drawn only for keys some point has. The first point (the reference setting) is drawn in red,
    the points whose indices are in ``marked`` (e.g. the paper's setting) as green diamonds, the rest in
    blue; a legend above each panel names them (``names`` = reference, rest; ``marked_name``).
    ``whiskers`` ({y key: (low key, high key)}, e.g. the latency's quartiles over the timed runs) draws
    a vertical bar from low to high through each point that has both. Labels are placed so that none
    overlaps another label, a marker or the legend (:func:`place_labels`); a label that cannot sit
    beside its point gets a thin leader line to it.
    """
    whiskers = whiskers or {}
    marked = {int(i) for i in marked}
    panels = [k for k in y_keys if any(isinstance(p.get(k), Real) for p in points)]
    s = 2 if _scalable_font() else 1
    f_title, f_cap, f_tick = _font(20 * s), _font(14 * s), _font(11 * s)
    margin, panel_h = 18 * s, 320 * s
    W = width * s
    title_lines = _wrap(f_title, title, W - 2 * margin) if title else []
    title_h = len(title_lines) * (_line_h(f_title) + 6 * s) + 6 * s if title else 0
    img = Image.new("RGB", (W, margin + title_h + max(len(panels), 1) * panel_h + margin), WHITE)
    draw = ImageDraw.Draw(img)
    for k, line in enumerate(title_lines):
        _draw_text(draw, (margin, margin + k * (_line_h(f_title) + 6 * s)), line, fill=TEXT, font=f_title)
    if not panels:
        _draw_text(draw, (margin, margin + title_h), "no data", fill=MUTED, font=f_cap)
        return img.reduce(s)
    ref_col, rest_col, mark_col = LINE_COLORS[1], LINE_COLORS[0], LINE_COLORS[2]
    xs_all = [p[x_key] for p in points]
    x_pad = (max(xs_all) - min(xs_all)) * 0.1
    x_lo, x_hi, x_ticks, x_step = _axis(min(xs_all) - x_pad, max(xs_all) + x_pad, 6)
    tick_h = _line_h(f_tick)
    r = 4 * s
    for n, key in enumerate(panels):
        idx = [i for i, p in enumerate(points) if isinstance(p.get(key), Real)]
        pts = [(points[i][x_key], points[i][key], str(points[i].get("label", ""))) for i in idx]
        bars = {}
        lo_key, hi_key = whiskers.get(key, (None, None))
        for i in idx:
            lo, hi = points[i].get(lo_key), points[i].get(hi_key)
            if isinstance(lo, Real) and isinstance(hi, Real):
                bars[i] = (float(lo), float(hi))
        ys = [q[1] for q in pts] + [v for b in bars.values() for v in b]
        y_pad = (max(ys) - min(ys)) * 0.18
        y_lo, y_hi, y_ticks, y_step = _axis(min(ys) - y_pad, max(ys) + y_pad, 5)
        y_labels = [_fmt_tick(t, y_step) for t in y_ticks]
        left = margin + max(_text_w(f_tick, t) for t in y_labels) + 10 * s
        right = W - margin
        py = margin + title_h + n * panel_h

        # caption, then the legend: on the caption's line when there is room, else on a line of its own
        caption = f"{key} vs {x_key}"
        entries = [("circle", ref_col, names[0])]
        if marked & set(idx):
            entries.append(("diamond", mark_col, marked_name))
        if len(set(idx) - marked - {0}):
            entries.append(("circle", rest_col, names[1]))
        if bars:
            entries.append(("bar", MUTED, "bars: quartiles of the runs"))
        sw = 10 * s
        widths = [sw + 5 * s + _text_w(f_tick, t) for _, _, t in entries]
        legend_w = sum(widths) + 14 * s * (len(entries) - 1)
        cap_h = _line_h(f_cap) + 10 * s
        on_caption = _text_w(f_cap, caption) + 24 * s + legend_w <= right - left
        lx, ly = (right - legend_w, py + (_line_h(f_cap) - tick_h) // 2) if on_caption else (left, py + cap_h)
        top = py + cap_h + (0 if on_caption else tick_h + 8 * s)
        bottom = py + panel_h - 2 * tick_h - 24 * s
        _draw_text(draw, (left, py), caption, fill=TEXT, font=f_cap)
        for (shape, color, text), w in zip(entries, widths):
            cy = ly + tick_h / 2 + s
            if shape == "bar":
                draw.line([(lx + sw / 2, cy - sw * 0.6), (lx + sw / 2, cy + sw * 0.6)], fill=color, width=s)
            else:
                _marker(draw, shape, lx + sw / 2, cy, r, color, s)
            _draw_text(draw, (lx + sw + 5 * s, ly), text, fill=TEXT, font=f_tick)
            lx += w + 14 * s

        def X(v):
            return left + (v - x_lo) / (x_hi - x_lo) * (right - left)

        def Y(v):
            return bottom - (v - y_lo) / (y_hi - y_lo) * (bottom - top)

        for t, lbl in zip(y_ticks, y_labels):
            yy = round(Y(t))
            draw.line([(left, yy), (right, yy)], fill=GRID, width=s)
            _draw_text(draw, (left - 7 * s - _text_w(f_tick, lbl), yy - tick_h // 2 - s), lbl, fill=TEXT, font=f_tick)
        for t in x_ticks:
            xx, lbl = round(X(t)), _fmt_tick(t, x_step)
            draw.line([(xx, top), (xx, bottom)], fill=GRID, width=s)
            _draw_text(draw, (xx - _text_w(f_tick, lbl) // 2, bottom + 6 * s), lbl, fill=TEXT, font=f_tick)
        draw.rectangle([left, top, right, bottom], outline=AXIS, width=s)
        _draw_text(draw, ((left + right - _text_w(f_tick, x_key)) // 2, bottom + tick_h + 12 * s), x_key, fill=MUTED,
                   font=f_tick)

        def color_of(i):
            return mark_col if i in marked else ref_col if i == 0 else rest_col

        centres = [(X(a), Y(b)) for a, b, _ in pts]
        for i, (cx, cy) in zip(idx, centres):
            if i in bars:
                y0, y1 = Y(bars[i][0]), Y(bars[i][1])
                draw.line([(cx, y0), (cx, y1)], fill=_darker(color_of(i), 0.9), width=s)
                for yy in (y0, y1):
                    draw.line([(cx - 2 * s, yy), (cx + 2 * s, yy)], fill=_darker(color_of(i), 0.9), width=s)
        # labels: the marked and the reference point first, so they get the places nearest to them
        order = sorted(range(len(pts)), key=lambda k: (idx[k] not in marked, idx[k] != 0, pts[k][0]))
        boxes = [(cx - r - s, cy - r - s, cx + r + s, cy + r + s) for cx, cy in centres]
        boxes += [(X(pts[k][0]) - s, Y(bars[i][1]), X(pts[k][0]) + s, Y(bars[i][0]))
                  for k, i in enumerate(idx) if i in bars]
        sizes = []
        for k in order:
            text = _fit(f_tick, pts[k][2], right - left)
            bl, bt, br, bb = f_tick.getbbox(text)
            sizes.append((br - bl, bb - bt, bl, bt, text))
        placed = place_labels([(centres[k][0], centres[k][1], r) for k in order], [z[:2] for z in sizes],
                              (left + 2 * s, top + 2 * s, right - 2 * s, bottom - 2 * s), boxes, gap=2 * s)
        for k, box, (w, h, bl, bt, text) in zip(order, placed, sizes):
            cx, cy = centres[k]
            color = _darker(color_of(idx[k]))
            nx, ny = min(max(cx, box[0]), box[2]), min(max(cy, box[1]), box[3])  # nearest point of the box
            if math.hypot(nx - cx, ny - cy) > r + 6 * s:  # not beside its point: a leader line
                draw.line([(cx, cy), (nx, ny)], fill=tuple(int(c + (255 - c) * 0.5) for c in color), width=s)
            _draw_text(draw, (box[0] - bl, box[1] - bt), text, fill=color, font=f_tick)
        for k in sorted(range(len(pts)), key=lambda k: idx[k] in marked):  # marked on top
            i = idx[k]
            _marker(draw, "diamond" if i in marked else "circle", *centres[k], r, color_of(i), s)
    return img.reduce(s)
