"""Charts of numbers a run produces: per-class IoU bars, the confusion matrix, training curves, cost trade-offs.

Drawn with matplotlib's object-oriented API on an Agg canvas, never through pyplot and never touching
``rcParams``, so charts can be made from any thread without changing anyone else's plots. matplotlib's
constrained layout places titles, tick labels, legends and colour bars, so nothing is cut at the canvas
edge or drawn over another text.

Each ``*_chart`` returns an RGB ``PIL.Image`` on white (save it with ``img.save("x.png")``); the
``*_figure`` beside it returns the matplotlib ``Figure`` that the chart renders, for whoever wants the
artists themselves (the tests measure every text on it).

* :func:`iou_chart` — per-class IoU as horizontal bars in the class colours, from
  :meth:`transeg.engine.metrics.ConfusionMatrix.compute`, values in a column of their own.
* :func:`confusion_chart` — the row-normalised confusion matrix as a heat map with a colour bar.
* :func:`curves_chart` — training curves (loss, mIoU, ...) vs. iteration from JSONL log records.
* :func:`tradeoff_chart` — labelled points of a cost (GFLOPs) against latency / accuracy, e.g. an
  ISR sweep: the reference and the marked points (the paper's setting) in their own colours and a legend.

Scores (IoU, accuracies) are shown as the CLI prints them: percentages with 2 decimals ("80.27").
Palettes are read as in :mod:`transeg.viz` (``None`` is the PASCAL VOC colour map).
"""
from __future__ import annotations

import functools
import math
import unicodedata
from numbers import Real

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties, findfont, get_font
from matplotlib.lines import Line2D
from matplotlib.text import Text
from matplotlib.ticker import FuncFormatter, MultipleLocator, PercentFormatter
from PIL import Image

from transeg.errors import TransegError
from transeg.viz import palette_array

__all__ = ["confusion_chart", "confusion_figure", "curves_chart", "curves_figure", "iou_chart", "iou_figure", "render",
           "tradeoff_chart", "tradeoff_figure"]

DPI = 100  # pixels per inch: a figure's size in pixels is its size in inches x 100
TEXT, MUTED, GRID = "#222222", "#787878", "#e4e4e4"
LINE_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")  # one per curves panel
REFERENCE, OTHER, MARKED = "#d62728", "#1f77b4", "#2ca02c"  # trade-off points: reference, the rest, marked
ROW_PX, PANEL_PX, TRADEOFF_PX = 24, 250, 320  # an IoU bar's row, a curves panel, a trade-off panel
SCORES = ("IoU", "Acc", "Dice", "Fscore", "Precision", "Recall")  # keys holding a fraction, shown in %


# ------------------------------------------------------------------------------------ helpers
def _figure(width_px: float, height_px: float) -> Figure:
    """A white figure of ``width_px`` x ``height_px`` pixels on its own Agg canvas, laid out by
    matplotlib's constrained layout (which keeps decorations inside the canvas and apart)."""
    fig = Figure(figsize=(1, 1), dpi=DPI, layout="constrained", facecolor="white")
    FigureCanvasAgg(fig)
    _resize(fig, width_px, height_px)
    return fig


def _resize(fig: Figure, width_px: float, height_px: float):
    """Size ``fig`` in whole pixels. Agg floors inches x dpi, and 29 / 100 * 100 is 28.999...; a
    thousandth of a pixel more keeps the canvas at exactly the pixels asked for."""
    fig.set_size_inches((round(width_px) + 1e-3) / DPI, (round(height_px) + 1e-3) / DPI)


def render(fig: Figure) -> Image.Image:
    """``fig`` drawn by Agg, as an RGB PIL image of the figure's pixel size."""
    fig.canvas.draw()
    return Image.frombuffer("RGBA", fig.canvas.get_width_height(), fig.canvas.buffer_rgba()).convert("RGB")


@functools.lru_cache(maxsize=4096)
def _has_glyph(char: str) -> bool:
    """matplotlib's default font (DejaVu Sans) has a glyph for ``char`` (get_font caches it per thread)."""
    return char.isspace() or get_font(findfont(FontProperties())).get_char_index(ord(char)) != 0


def _plain(text, limit: int | None = None) -> str:
    """``text`` with every character matplotlib's font lacks replaced by its unaccented letter or "?"
    (never a missing-glyph box), shortened to ``limit`` characters with an ellipsis."""
    out = []
    for c in str(text):
        if not _has_glyph(c):
            base = "".join(b for b in unicodedata.normalize("NFKD", c) if not unicodedata.combining(b))
            c = base if base and all(_has_glyph(b) for b in base) else "?"
        out.append(c)
    text = "".join(out)
    return text[:limit - 1] + "\u2026" if limit and len(text) > limit else text


def _wrap(text: str, width_px: float, size: float, renderer) -> list:
    """``text`` broken at spaces into lines at most ``width_px`` wide at ``size`` pt; a word wider than
    a line alone is broken between characters, so nothing is ever cut."""
    prop = FontProperties(size=size)

    def fits(s):
        return renderer.get_text_width_height_descent(s, prop, ismath=False)[0] <= width_px

    lines = []
    for word in text.split():
        if lines and fits(f"{lines[-1]} {word}"):
            lines[-1] = f"{lines[-1]} {word}"
            continue
        while len(word) > 1 and not fits(word):
            k = next((k for k in range(len(word) - 1, 0, -1) if fits(word[:k])), 1)
            lines.append(word[:k])
            word = word[k:]
        lines.append(word)
    return lines


def _title(fig: Figure, text: str, size: float = 13.0, max_lines: int = 3):
    """Give ``fig`` the title ``text``, wrapped to the canvas width in at most ``max_lines`` lines (the
    font shrinks, down to 7 pt, until it fits; beyond that it takes more lines, never cuts), and grow the
    canvas by the title's height so the plots below keep their size."""
    if not text:
        return
    renderer = fig.canvas.get_renderer()
    text = _plain(text)
    room = fig.bbox.width - 24
    lines = _wrap(text, room, size, renderer)
    while len(lines) > max_lines and size > 7:
        size = max(7.0, size * 0.9)
        lines = _wrap(text, room, size, renderer)
    title = fig.suptitle("\n".join(lines), x=12 / fig.bbox.width, ha="left", fontsize=size, color=TEXT,
                         parse_math=False)
    _resize(fig, fig.bbox.width, fig.bbox.height + math.ceil(title.get_window_extent(renderer).height) + 8)


def _pct(value) -> str:
    """A fraction as the CLI prints it: 0.80271 -> "80.27"; None / NaN -> "n/a"."""
    return "n/a" if value is None or not math.isfinite(float(value)) else f"{100 * float(value):.2f}"


def _number(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(float(v))


def _fmt_iter(v: float) -> str:
    """1000 -> 1k, 2500 -> 2.5k, 1200000 -> 1.2M."""
    a = abs(v)
    if a >= 1e6:
        return f"{v / 1e6:g}M"
    if a >= 1e3:
        return f"{v / 1e3:g}k"
    return f"{v:g}"


def _fmt_val(v: float) -> str:
    """A value in a caption: 4 significant digits, scientific only when tiny or huge."""
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
        m, e = f"{v:.3e}".split("e")
        return f"{m.rstrip('0').rstrip('.')}e{int(e)}"
    return f"{v:.4g}"


def _darker(color, f: float = 0.65):
    return tuple(c * f for c in to_rgb(color))


def _no_data(message: str, title: str, width_px: float = 760) -> Figure:
    fig = _figure(width_px, 50)
    fig.text(12 / fig.bbox.width, 0.5, message, va="center", color=MUTED, fontsize=11)
    _title(fig, title)
    return fig


# -------------------------------------------------------------------------------- IoU bars
def iou_figure(result: dict, class_names, palette=None, title: str = "") -> Figure:
    """Horizontal bars of per-class IoU (%) in the class colours, from ``ConfusionMatrix.compute()``.

    The values stand in a column right of the plot, so neither the dashed mIoU line nor the 100 %
    gridline can run through them; a class with undefined IoU (absent from labels and predictions)
    reads "n/a" and has no bar. A line above the plot gives mIoU / mAcc / aAcc. Each class takes one
    24-pixel row, so the figure grows with the class count.
    """
    if "IoU" not in result:
        raise TransegError("iou_chart: result has no 'IoU' (pass the dict from ConfusionMatrix.compute())")
    iou = np.array([float(v) for v in result["IoU"]], dtype=float)
    names = [_plain(n, 30) for n in class_names]
    n = len(iou)
    if len(names) != n:
        raise TransegError(f"iou_chart: {len(names)} class names for {n} classes")
    colors = palette_array(palette, n, "iou_chart")[:n] / 255.0

    fig = _figure(760, 96 + n * ROW_PX)
    ax = fig.add_subplot()
    ok = np.flatnonzero(np.isfinite(iou) & (iou > 0))  # NaN and 0 get no bar
    ax.barh(ok, 100 * np.clip(iou[ok], 0, 1), height=0.7, color=colors[ok], edgecolor=[_darker(c) for c in colors[ok]],
            linewidth=0.8, zorder=2)
    for i, v in enumerate(iou):
        ax.text(1.015, i, _pct(v), transform=ax.get_yaxis_transform(), ha="left", va="center", fontsize=9,
                color=TEXT if math.isfinite(v) else MUTED)
    m = result.get("mIoU")
    if m is not None and math.isfinite(float(m)):
        ax.axvline(100 * float(m), color="#444444", linestyle=(0, (4, 3)), linewidth=1.2, zorder=3,
                   label=f"mIoU {_pct(m)}")
        ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize=9, borderaxespad=0.3)
    ax.set_title(f"mIoU {_pct(m)}    mAcc {_pct(result.get('mAcc'))}    aAcc {_pct(result.get('aAcc'))}",
                 loc="left", fontsize=10, color=TEXT)
    ax.set_xlim(0, 100)
    ax.set_ylim(max(n, 1) - 0.5, -0.5)  # first class at the top
    ax.set_yticks(range(n), names, fontsize=9, parse_math=False)
    ax.tick_params(axis="y", length=0)
    ax.xaxis.set_major_locator(MultipleLocator(20))
    ax.xaxis.set_minor_locator(MultipleLocator(10))
    ax.tick_params(axis="x", labelsize=9)
    ax.grid(axis="x", which="both", color=GRID, linewidth=0.8)
    ax.set_axisbelow(True)
    ax.set_xlabel("IoU (%)", color=MUTED, fontsize=9)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    _title(fig, title)
    return fig


def iou_chart(result: dict, class_names, palette=None, title: str = "") -> Image.Image:
    """:func:`iou_figure` rendered as an RGB image."""
    return render(iou_figure(result, class_names, palette, title))


# ------------------------------------------------------------------------------ confusion
def confusion_figure(result: dict, class_names, title: str = "") -> Figure:
    """The confusion matrix, row-normalised (each row: where the pixels of one labelled class went, in %),
    as a heat map from white (0 %) to dark blue (100 %) with a labelled colour bar, class names on both
    axes (predictions along the top). From ``ConfusionMatrix.compute()`` (its "confusion" counts).

    Cells are 720 / classes pixels, at least 10 (150 classes, ADE20K, make a 1500-pixel square whose
    names stay legible) and at most 80, the matrix at least 240 pixels wide; a cell prints its share
    ("50%") only when that text fits in it at 6 pt or more, so large matrices show colour alone. Rows
    without pixels stay white and unprinted.
    """
    if "confusion" not in result:
        raise TransegError("confusion_chart: result has no 'confusion' (pass the dict from ConfusionMatrix.compute())")
    rows = [[float(v) for v in row] for row in result["confusion"]]
    names = [_plain(n, 24) for n in class_names]
    k = len(rows)
    if k == 0 or any(len(row) != k for row in rows):
        raise TransegError(f"confusion_chart: the confusion matrix must be square with a row per class, got {k} rows")
    if len(names) != k:
        raise TransegError(f"confusion_chart: {len(names)} class names for {k} classes")
    counts = np.array(rows)
    totals = counts.sum(axis=1, keepdims=True)
    share = np.divide(100 * counts, totals, out=np.zeros_like(counts), where=totals > 0)
    cell = max(10, min(80, 720 // k), math.ceil(240 / k))
    size = float(np.clip(cell * 0.55, 5.5, 10))  # names: a line fits in a cell
    fig = _figure(k * cell, k * cell)
    renderer = fig.canvas.get_renderer()
    name_px = max(renderer.get_text_width_height_descent(t, FontProperties(size=size), False)[0] for t in names)
    _resize(fig, name_px + k * cell + 150, name_px + k * cell + 50)  # room for the names and the colour bar
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=100, interpolation="nearest", aspect="equal")
    ax.set_xticks(range(k), names, rotation=90, fontsize=size, parse_math=False)
    ax.set_yticks(range(k), names, fontsize=size, parse_math=False)
    ax.xaxis.tick_top()
    ax.xaxis.set_label_position("top")
    ax.tick_params(length=2)
    ax.set_xlabel("prediction", color=MUTED, fontsize=10)
    ax.set_ylabel("label", color=MUTED, fontsize=10)
    if cell >= 12:  # white lines between the cells
        ax.set_xticks(np.arange(k + 1) - 0.5, minor=True)
        ax.set_yticks(np.arange(k + 1) - 0.5, minor=True)
        ax.grid(which="minor", color="white", linewidth=1)
        ax.tick_params(which="minor", length=0)
    bar = fig.colorbar(image, ax=ax, shrink=min(1.0, max(0.5, 240 / (k * cell))), pad=0.02)
    bar.set_label("share of the label's pixels (%)", color=MUTED, fontsize=9)
    bar.ax.yaxis.set_major_formatter(PercentFormatter(xmax=100, decimals=0))
    bar.ax.tick_params(labelsize=8)
    _title(fig, title)
    _cell_texts(fig, ax, share, totals[:, 0] > 0)
    return fig


def _cell_texts(fig: Figure, ax, share, rows):
    """Each cell of a row with pixels prints its share ("50%", white on the dark half of the scale), in
    the largest size up to 9 pt whose "100%" fills at most 80 % of a cell as laid out, or not at all
    below 6 pt."""
    fig.get_layout_engine().execute(fig)
    renderer = fig.canvas.get_renderer()
    cell_px = ax.get_window_extent(renderer).width / len(share)
    wide = renderer.get_text_width_height_descent("100%", FontProperties(size=9), False)[0]
    size = min(9.0, 9 * 0.8 * cell_px / wide)
    if size < 6:
        return
    for i in np.flatnonzero(rows):
        for j, v in enumerate(share[i]):
            ax.text(j, i, f"{v:.0f}%", ha="center", va="center", fontsize=size,
                    color="white" if v > 50 else TEXT)


def confusion_chart(result: dict, class_names, title: str = "") -> Image.Image:
    """:func:`confusion_figure` rendered as an RGB image."""
    return render(confusion_figure(result, class_names, title))


# --------------------------------------------------------------------------------- curves
def _series(records, key):
    pts = []
    for r in records:
        if not isinstance(r, dict):
            continue
        it, v = r.get("iter"), r.get(key)
        if _number(it) and _number(v):
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


def _curve(ax, key: str, pts, color):
    """One curves panel: the series (in % for a score key), a legend for each line, and a caption with the
    last and the best value (lowest for a loss, highest otherwise). A long noisy series is drawn thin and
    faint with its smoothed line on top; a short one (30 points or fewer) gets a dot per point."""
    score = any(s in key for s in SCORES)
    xs = [x for x, _ in pts]
    ys = [100 * y if score else y for _, y in pts]
    name = f"{key} (%)" if score else key
    fmt = (lambda v: f"{v:.2f}") if score else _fmt_val
    if len(pts) > 50 and _is_noisy(ys):
        ax.plot(xs, ys, color=color, linewidth=0.8, alpha=0.35, label=f"{key} (raw)")
        ax.plot(xs, _ema(ys, 0.9), color=color, linewidth=2, label=f"{key} (smoothed, EMA 0.9)")
    else:
        ax.plot(xs, ys, color=color, linewidth=2, marker="o" if len(pts) <= 30 else None, markersize=5,
                markeredgecolor="white", label=key)
    ax.legend(loc="best", fontsize=8, framealpha=0.9)
    lower = "loss" in key.lower()
    best = int(np.argmin(ys) if lower else np.argmax(ys))  # the first, on ties
    ax.set_title(f"last {fmt(ys[-1])} @ {_fmt_iter(xs[-1])}    {'min' if lower else 'max'} {fmt(ys[best])} @ "
                 f"{_fmt_iter(xs[best])}", loc="right", fontsize=9, color=MUTED)
    ax.set_title(name, loc="left", fontsize=11, color=color)
    ax.set_ylabel(name, fontsize=9)
    ax.set_xlim(left=min(0.0, xs[0]))
    if min(ys) >= 0 and ax.get_ylim()[0] < 0:
        ax.set_ylim(bottom=0)
    ax.grid(color=GRID, linewidth=0.8)
    ax.set_axisbelow(True)
    ax.tick_params(labelsize=9)


def curves_figure(records, keys=("loss", "mIoU"), title: str = "", width: int = 760) -> Figure:
    """Line plots vs. ``"iter"`` from training-log records (dicts, e.g. read from a JSONL log), one
    250-pixel panel per key that has at least one finite value, sharing the iteration axis; records
    without ``"iter"`` or the key are skipped. Scores (mIoU, mAcc, ...) are plotted in %. With nothing
    to plot, a one-line "no data for ..." figure."""
    keys = (keys,) if isinstance(keys, str) else tuple(keys)
    series = [(k, pts) for k in keys if (pts := _series(records, k))]
    if not series:
        return _no_data("no data for " + ", ".join(map(str, keys)) if keys else "no data", title, width)
    fig = _figure(width, PANEL_PX * len(series))
    axes = fig.subplots(len(series), 1, sharex=True, squeeze=False)[:, 0]
    for p, (ax, (key, pts)) in enumerate(zip(axes, series)):
        _curve(ax, key, pts, LINE_COLORS[p % len(LINE_COLORS)])
    axes[-1].xaxis.set_major_formatter(FuncFormatter(lambda v, _: _fmt_iter(v)))
    axes[-1].set_xlabel("iter", color=MUTED, fontsize=9)
    _title(fig, title)
    return fig


def curves_chart(records, keys=("loss", "mIoU"), title: str = "", width: int = 760) -> Image.Image:
    """:func:`curves_figure` rendered as an RGB image."""
    return render(curves_figure(records, keys, title, width))


# ------------------------------------------------------------------------------- trade-off
def _legend_handles(points, marked, names, marked_name, bars: bool) -> list:
    """Legend entries for what the panels show: the reference, the marked and the other points, the bars."""
    handles = [Line2D([], [], linestyle="", marker="o", markersize=7, color=REFERENCE, label=names[0])]
    if marked & set(range(len(points))):
        handles.append(Line2D([], [], linestyle="", marker="D", markersize=7, color=MARKED, label=marked_name))
    if set(range(1, len(points))) - marked:
        handles.append(Line2D([], [], linestyle="", marker="o", markersize=7, color=OTHER, label=names[1]))
    if bars:
        handles.append(Line2D([], [], linestyle="", marker="|", markersize=12, color=MUTED,
                              label="bars: quartiles of the runs"))
    return handles


def _tradeoff_panel(ax, points, x_key, key, bar_keys, marked, x_lim) -> list:
    """One scatter panel of ``key`` against ``x_key``; returns its labels to place: (text, (x, y), colour,
    whisker (low, high) or None), the marked and the reference point first, so they sit nearest."""
    lo_key, hi_key = bar_keys or (None, None)
    jobs, ys = [], []
    for i, p in enumerate(points):
        if not (_number(p.get(key)) and _number(p.get(x_key))):
            continue
        color = MARKED if i in marked else REFERENCE if i == 0 else OTHER
        x, y = float(p[x_key]), float(p[key])
        bar = (float(p[lo_key]), float(p[hi_key])) if _number(p.get(lo_key)) and _number(p.get(hi_key)) else None
        if bar:
            ax.plot([x, x], bar, color=_darker(color, 0.9), linewidth=1, zorder=2)
            ax.plot([x, x], bar, linestyle="", marker="_", markersize=5, color=_darker(color, 0.9), zorder=2)
        ax.plot([x], [y], linestyle="", marker="D" if i in marked else "o", markersize=7, color=color,
                markeredgecolor="white", markeredgewidth=0.8, zorder=4 if i in marked else 3)
        ys += [y, *(bar or ())]
        jobs.append(((i not in marked, i != 0, x), _plain(p.get("label", "")), (x, y), _darker(color), bar))
    pad = (max(ys) - min(ys)) * 0.18 or abs(ys[0]) * 0.1 or 1.0
    ax.set_ylim(min(ys) - pad, max(ys) + pad)
    ax.set_xlim(*x_lim)
    ax.set_title(f"{key} vs {x_key}", loc="left", fontsize=11, color=TEXT)
    ax.set_ylabel(f"{key} (%)" if key in ("mIoU", "mAcc", "aAcc") else key, fontsize=9)
    ax.set_xlabel(x_key, color=MUTED, fontsize=9)
    ax.grid(color=GRID, linewidth=0.8)
    ax.set_axisbelow(True)
    ax.tick_params(labelsize=9)
    return [job[1:] for job in sorted(jobs, key=lambda j: j[0])]


def _overlap(a, b) -> float:
    """Area shared by two display-space boxes (x0, y0, x1, y1)."""
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _spots(w: float, h: float, d: float):
    """Offsets of a w x h label's lower-left corner from its point, nearest first: beside the point at
    distance ``d`` (right, left, above, below, the diagonals), then further out above, below and sideways."""
    e = d * 0.7
    near = [(d, -h / 2), (-d - w, -h / 2), (-w / 2, d), (-w / 2, -d - h),
            (e, e), (-e - w, e), (e, -e - h), (-e - w, -e - h)]
    far = []
    for k in range(1, 9):
        for dx in (-w / 2, 0.0, -w, d, -w - d):
            far += [(dx, d + k * (h + 2)), (dx, -d - h - k * (h + 2))]
        far += [(d + k * (w / 2 + 2), -h / 2), (-d - w - k * (w / 2 + 2), -h / 2)]
    far.sort(key=lambda o: math.hypot(o[0] + w / 2, o[1] + h / 2))
    return near + far


def _place_labels(ax, jobs, marker_px: float):
    """Label each point where the label overlaps no other label, marker or whisker bar and stays inside
    the plot: the nearest free spot of :func:`_spots` (the least-covered one where none is free), with a
    thin leader line when it is not right beside its point. matplotlib measures the text; it has no
    collision avoidance of its own, hence this. Needs the figure laid out (transforms final)."""
    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer).padded(-3)
    centres = [ax.transData.transform(xy) for _, xy, _, _ in jobs]
    taken = [(cx - marker_px, cy - marker_px, cx + marker_px, cy + marker_px) for cx, cy in centres]
    for (_, _, _, bar), (cx, _) in zip(jobs, centres):
        if bar:
            (_, y0), (_, y1) = ax.transData.transform([(0, bar[0]), (0, bar[1])])
            taken.append((cx - 3, y0, cx + 3, y1))
    for (text, xy, color, _), (cx, cy) in zip(jobs, centres):
        if not text:
            continue
        leader = {"arrowstyle": "-", "color": color, "alpha": 0.5, "linewidth": 0.8, "shrinkA": 0,
                  "shrinkB": marker_px / renderer.points_to_pixels(1)}
        label = ax.annotate(text, xy, xytext=(0, 0), textcoords="offset pixels", fontsize=8, color=color,
                            ha="left", va="bottom", zorder=5, parse_math=False, arrowprops=leader)
        label.set_in_layout(False)
        label.update_positions(renderer)
        box = Text.get_window_extent(label, renderer)  # the text alone, without the leader line
        w, h = box.width, box.height
        best, cost = None, math.inf
        for dx, dy in _spots(w, h, marker_px + 3):
            x = min(max(cx + dx, frame.x0), frame.x1 - w)
            y = min(max(cy + dy, frame.y0), frame.y1 - h)
            here = sum(_overlap((x - 2, y - 2, x + w + 2, y + h + 2), t) for t in taken)  # 2 px apart
            if here < cost:
                best, cost = (x, y), here
            if here == 0:
                break
        x, y = best
        label.xyann = (x - box.x0, y - box.y0)
        taken.append((x, y, x + w, y + h))
        near = math.hypot(min(max(cx, x), x + w) - cx, min(max(cy, y), y + h) - cy) <= marker_px + 6
        label.arrow_patch.set_visible(not near)


def tradeoff_figure(points, x_key="GFLOPs", y_keys=("latency ms", "mIoU"), title: str = "", width: int = 760,
                    names=("reference", "other settings"), marked=(), marked_name="marked", whiskers=None) -> Figure:
    """One scatter panel per y key against ``x_key``, every point labelled with its ``"label"``.

    ``points`` are dicts (``{"label": "2,2,1,1 / 2,2,2", "GFLOPs": 4.7, "latency ms": 31.0}``); a panel
    is drawn only for keys some point has. The first point (the reference setting) is red, the points
    whose indices are in ``marked`` (e.g. the paper's setting) green diamonds, the rest blue; a legend
    below the panels names them (``names`` = reference, rest; ``marked_name``). ``whiskers`` ({y key:
    (low key, high key)}, e.g. the latency's quartiles over the timed runs) draws a vertical bar from
    low to high through each point that has both. No label overlaps another label, a marker or a bar.
    """
    whiskers = whiskers or {}
    marked = {int(i) for i in marked}
    points = list(points)
    panels = [k for k in y_keys if any(_number(p.get(k)) and _number(p.get(x_key)) for p in points)]
    if not panels:
        return _no_data("no data", title, width)
    xs = [float(p[x_key]) for p in points if _number(p.get(x_key))]
    pad = (max(xs) - min(xs)) * 0.1 or abs(xs[0]) * 0.1 or 1.0
    fig = _figure(width, TRADEOFF_PX * len(panels) + 40)
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    jobs = [_tradeoff_panel(ax, points, x_key, key, whiskers.get(key), marked, (min(xs) - pad, max(xs) + pad))
            for ax, key in zip(axes, panels)]
    bars = any(_number(p.get(lo)) and _number(p.get(hi)) for k, (lo, hi) in whiskers.items() if k in panels
               for p in points)
    fig.legend(handles=_legend_handles(points, marked, names, marked_name, bars),
               loc="outside lower center", ncols=2, frameon=False, fontsize=9)
    _title(fig, title)
    fig.get_layout_engine().execute(fig)
    for ax, panel_jobs in zip(axes, jobs):
        _place_labels(ax, panel_jobs, marker_px=7 / 2 * DPI / 72 + 1)
    return fig


def tradeoff_chart(points, x_key="GFLOPs", y_keys=("latency ms", "mIoU"), title: str = "", width: int = 760,
                   names=("reference", "other settings"), marked=(), marked_name="marked", whiskers=None) -> Image.Image:
    """:func:`tradeoff_figure` rendered as an RGB image."""
    return render(tradeoff_figure(points, x_key, y_keys, title, width, names, marked, marked_name, whiskers))
