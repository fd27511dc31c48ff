"""transeg.viz and transeg.charts: exact colours, blends and legends of the label pictures; charts measured as drawn."""
import math
from unittest import mock

import numpy as np
import pytest
import torch
from matplotlib.font_manager import FontProperties, findfont, get_font
from matplotlib.text import Text
from PIL import Image

from conftest import CLASSES, PALETTE
from transeg import charts, viz
from transeg.cli import main
from transeg.errors import TransegError

PAL = [(10, 20, 30), (40, 50, 60), (70, 80, 90)]


def px(img, x, y):
    return img.getpixel((x, y))


def longest_run(img, color):
    """Longest horizontal run of exactly `color` in any row of `img`."""
    a = np.all(np.asarray(img) == np.asarray(color, dtype=np.uint8), axis=-1)
    best = 0
    for row in a:
        if not row.any():
            continue
        # run lengths of True in this row
        padded = np.concatenate([[0], row.astype(np.int8), [0]])
        d = np.diff(padded)
        best = max(best, int((np.flatnonzero(d == -1) - np.flatnonzero(d == 1)).max()))
    return best


def has_color(img, color):
    return bool(np.all(np.asarray(img) == np.asarray(color, dtype=np.uint8), axis=-1).any())


# ----------------------------------------------------------------------------- colorize
def test_colorize_exact_palette_and_ignore_colour():
    # label [[0, 1], [255, 2]] -> palette[0], palette[1], ignore colour, palette[2]
    label = np.array([[0, 1], [255, 2]])
    for lab in (label, torch.from_numpy(label).to(torch.uint8)):
        img = viz.colorize(lab, PAL, ignore_color=(1, 2, 3))
        assert img.mode == "RGB" and img.size == (2, 2)
        assert px(img, 0, 0) == (10, 20, 30)
        assert px(img, 1, 0) == (40, 50, 60)
        assert px(img, 0, 1) == (1, 2, 3)
        assert px(img, 1, 1) == (70, 80, 90)


def test_colorize_rejects_ids_without_colour():
    # 3 colours -> id 3 has none (and is not the ignore index)
    with pytest.raises(TransegError, match="label value 3 has no colour"):
        viz.colorize(np.array([[0, 3]]), PAL)
    with pytest.raises(TransegError, match="integer class ids"):
        viz.colorize(np.zeros((2, 2), dtype=np.float32), PAL)


# ------------------------------------------------------------------------------ overlay
def test_overlay_alpha_math():
    # image 100 everywhere, class 0 colour (200, 200, 200):
    # alpha 0.5 -> 0.5*100 + 0.5*200 = 150; alpha 0.25 -> 0.75*100 + 0.25*200 = 125;
    # the ignored pixel (255) keeps the image value 100.
    image = np.full((2, 3, 3), 100, dtype=np.uint8)
    label = np.array([[0, 0, 255], [0, 0, 0]])
    pal = [(200, 200, 200)]
    out = viz.overlay(image, label, pal, alpha=0.5)
    assert px(out, 0, 0) == (150, 150, 150)
    assert px(out, 2, 0) == (100, 100, 100)
    assert px(viz.overlay(image, label, pal, alpha=0.25), 0, 0) == (125, 125, 125)
    # Same through a [3, H, W] uint8 tensor and a PIL image.
    chw = torch.from_numpy(image).permute(2, 0, 1).contiguous()
    assert px(viz.overlay(chw, label, pal), 0, 0) == (150, 150, 150)
    assert px(viz.overlay(Image.fromarray(image), torch.from_numpy(label), pal), 1, 1) == (150, 150, 150)


def test_overlay_size_mismatch_and_bad_alpha():
    with pytest.raises(TransegError, match="image is 3x2 but label is 2x2"):
        viz.overlay(np.zeros((2, 3, 3), np.uint8), np.zeros((2, 2), np.int64), PAL)
    with pytest.raises(TransegError, match="alpha"):
        viz.overlay(np.zeros((2, 2, 3), np.uint8), np.zeros((2, 2), np.int64), PAL, alpha=1.5)


# ------------------------------------------------------------------- side_by_side, legend
def test_side_by_side_layout():
    # Panels 40x30 and 20x50 with gap 8: width = 8 + 40 + 8 + 20 + 8 = 84; both panels' pixels
    # appear unchanged; the canvas is taller than the tallest panel (50) by the title row + gaps.
    a = Image.new("RGB", (40, 30), (255, 0, 0))
    b = Image.new("RGB", (20, 50), (0, 0, 255))
    out = viz.side_by_side([a, b], ["image", "prediction"])
    assert out.width == 84 and out.height > 50 + 16
    assert longest_run(out, (255, 0, 0)) == 40 and longest_run(out, (0, 0, 255)) == 20
    untitled = viz.side_by_side([a, b])
    assert untitled.height == 50 + 16  # no title row: gap above and below only
    with pytest.raises(TransegError, match="1 titles for 2 panels"):
        viz.side_by_side([a, b], ["x"])


def test_legend_only_present_classes():
    # present {0, 2, 255}: swatches for classes 0 and 2 only; 255 (ignore) is not a class.
    img = viz.legend(["road", "car", "sky"], PAL, present={0, 2, 255})
    assert has_color(img, PAL[0]) and has_color(img, PAL[2]) and not has_color(img, PAL[1])
    full = viz.legend(["road", "car", "sky"], PAL)
    assert all(has_color(full, c) for c in PAL) and full.height > img.height
    assert viz.legend(["road"], PAL, present=set()).size[0] > 0  # "(no classes)" image


# ------------------------------------------------------------------- rendered chart checks
def drawn_texts(fig):
    """Render `fig` with Agg; returns the image and (text, window extent in pixels) of every non-empty
    text matplotlib drew: titles, tick and axis labels, legend entries, value and point labels."""
    seen = []
    real = Text.draw

    def draw(self, renderer):
        real(self, renderer)
        if self.get_visible() and self.get_text().strip():
            seen.append((self.get_text(), Text.get_window_extent(self, renderer)))  # the text, not an arrow

    with mock.patch.object(Text, "draw", draw):
        img = charts.render(fig)
    return img, seen


def overlap(a, b, closed=False):
    """Extents a and b share area (closed: or touch, for a line's zero-width extent)."""
    if closed:
        return a.x0 <= b.x1 and b.x0 <= a.x1 and a.y0 <= b.y1 and b.y0 <= a.y1
    return min(a.x1, b.x1) > max(a.x0, b.x0) and min(a.y1, b.y1) > max(a.y0, b.y0)


def assert_clean(fig):
    """Every text `fig` draws lies inside the canvas and no two texts overlap. Returns (image, texts)."""
    img, texts = drawn_texts(fig)
    w, h = img.size
    outside = [(t, e.bounds) for t, e in texts if e.x0 < 0 or e.y0 < 0 or e.x1 > w or e.y1 > h]
    assert outside == []
    clashes = [(a, b) for i, (a, ea) in enumerate(texts) for b, eb in texts[i + 1:] if overlap(ea, eb)]
    assert clashes == []
    return img, texts


def missing_glyphs(texts):
    """Characters of the drawn texts that matplotlib's font has no glyph for (drawn as a box)."""
    font = get_font(findfont(FontProperties()))
    return sorted({c for t, _ in texts for c in t if not c.isspace() and font.get_char_index(ord(c)) == 0})


# ---------------------------------------------------------------------------- iou_chart
def chart_result(iou):
    finite = [v for v in iou if not math.isnan(v)]
    return {"IoU": iou, "Acc": iou, "mIoU": sum(finite) / len(finite), "mAcc": 0.6, "aAcc": 0.9, "pixels": [1] * len(iou)}


def test_iou_chart_bars_proportional_to_iou_and_values_in_percent():
    # IoU 0.8, 0.4, nan, 0.0 (mIoU of the finite ones 0.4): bars of 80 and 40 % of the 0..100 axis, in
    # the exact class colours (Agg fills a rectangle's inside without blending), so the 0.8 bar's run
    # of its colour is twice the 0.4 bar's, give or take the 1-px darker outline at each end. The nan
    # class reads "n/a" and IoU 0 reads "0.00", neither with a bar. Values are percentages as the CLI
    # prints them ("80.00", never "0.8"), and the line above reads "mIoU 40.00 mAcc 60.00 aAcc 90.00".
    pal = [(200, 30, 30), (30, 160, 30), (30, 30, 200), (200, 200, 30)]
    fig = charts.iou_figure(chart_result([0.8, 0.4, float("nan"), 0.0]), ["a", "b", "c", "d"], pal, title="demo")
    img, texts = assert_clean(fig)
    # 96 px of axis and header plus 4 rows of 24, and the title's one line (about 27 px) above
    assert img.mode == "RGB" and img.width == 760 and 96 + 4 * 24 + 20 < img.height < 96 + 4 * 24 + 40
    assert [p.get_width() for p in fig.axes[0].patches] == pytest.approx([80, 40])
    run0, run1 = longest_run(img, pal[0]), longest_run(img, pal[1])
    assert run1 > 100 and abs((run0 + 2) - 2 * (run1 + 2)) <= 2
    assert not has_color(img, pal[2]) and not has_color(img, pal[3])
    drawn = [t for t, _ in texts]
    assert [t for t in drawn if t in ("80.00", "40.00", "n/a", "0.00")] == ["80.00", "40.00", "n/a", "0.00"]
    assert "mIoU 40.00    mAcc 60.00    aAcc 90.00" in drawn and "IoU (%)" in drawn
    assert not {"0.8", "0.80", "0.4", "0.40"} & set(drawn)
    assert px(img, 0, 0) == (255, 255, 255)  # white background


def test_iou_values_stay_clear_of_the_miou_line_gridlines_and_bars():
    # The old chart ran the dashed mIoU line and the 100 gridline through value labels (97.12 sat across
    # the 100 line). Six classes, one with IoU 0.9712 and one exactly at the mIoU (0.5): all 6 values stand
    # in a column right of the plot frame, so none touches a gridline (major or minor), the mIoU line
    # (which has its own legend entry, "mIoU 50.00") or a bar, and every text stays inside the canvas.
    iou = [0.9712, 0.5, 0.03, 1.0, 0.5, 0.0]
    result = dict(chart_result(iou), mIoU=0.5)
    fig = charts.iou_figure(result, [f"class {i}" for i in range(6)], None)
    _, texts = assert_clean(fig)
    ax = fig.axes[0]
    values = [(t, e) for t, e in texts if t in {"97.12", "50.00", "3.00", "100.00", "0.00"}]
    assert len(values) == 6
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    ticks = ax.xaxis.get_major_ticks() + ax.xaxis.get_minor_ticks()
    grid = [t.gridline for t in ticks if 0 <= t.get_loc() <= 100]  # the 11 drawn: 0, 10, ..., 100
    marks = [a.get_window_extent(renderer) for a in grid + ax.lines + list(ax.patches)]
    assert len(grid) == 11 and len(ax.lines) == 1 and len(ax.patches) == 5  # the mIoU line; bars but for IoU 0
    assert all(e.x0 > frame.x1 for _, e in values)
    assert [(t, m.bounds) for t, e in values for m in marks if overlap(e, m, closed=True)] == []
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["mIoU 50.00"]


def test_iou_chart_grows_with_classes_and_checks_names():
    # Each class is one 24-px row: 8 classes are 4 * 24 = 96 px taller than 4, and 150 classes (ADE20K)
    # still lay out without a clipped or overlapping text.
    r4 = charts.iou_chart(chart_result([0.5] * 4), list("abcd"), None)
    r8 = charts.iou_chart(chart_result([0.5] * 8), list("abcdefgh"), None)
    assert r8.height - r4.height == 96
    big, _ = assert_clean(charts.iou_figure(chart_result([0.5] * 150), [f"class {i}" for i in range(150)], None))
    assert big.height - r4.height == 146 * 24
    with pytest.raises(TransegError, match="3 class names for 4 classes"):
        charts.iou_chart(chart_result([0.5] * 4), list("abc"), None)
    with pytest.raises(TransegError, match="palette has 3 colours for 4 classes"):
        charts.iou_chart(chart_result([0.5] * 4), list("abcd"), PAL)


# ------------------------------------------------------------------------- curves_chart
BLUE, RED = (31, 119, 180), (214, 39, 40)  # charts.LINE_COLORS[0], [1] as RGB


def test_curves_chart_one_panel_per_present_key_and_miou_in_percent():
    # loss at iters 0, 10, ..., 100 (11 points), mIoU 0.4 and 0.55 at 50 and 100: two panels (blue loss,
    # red mIoU); "acc" is absent, so it gets no panel. Each panel is 250 px tall, so dropping mIoU makes
    # the image exactly 250 px shorter. mIoU is plotted and captioned in % (40 and 55, "max 55.00"), not
    # as a fraction. Each line has a legend entry; series of <= 30 points get dots whose insides keep the
    # exact line colour.
    records = [{"iter": i, "loss": 2.0 - i / 100} for i in range(0, 101, 10)]
    records += [{"iter": 50, "mIoU": 0.4, "mode": "val"}, {"iter": 100, "mIoU": 0.55, "mode": "val"}]
    records += [{"loss": 9.0}, {"iter": 60, "loss": float("nan")}]  # no iter / nan: skipped
    two = charts.curves_figure(records, keys=("loss", "mIoU", "acc"), title="run")
    img2, texts = assert_clean(two)
    img1, _ = assert_clean(charts.curves_figure(records, keys=("loss",), title="run"))
    assert img2.width == 760 and img2.height - img1.height == 250
    miou_ax = two.axes[1]
    assert list(miou_ax.lines[0].get_ydata()) == pytest.approx([40.0, 55.0])
    assert [[t.get_text() for t in ax.get_legend().get_texts()] for ax in two.axes] == [["loss"], ["mIoU"]]
    drawn = [t for t, _ in texts]
    assert "mIoU (%)" in drawn and "last 55.00 @ 100    max 55.00 @ 100" in drawn
    assert has_color(img2, BLUE) and has_color(img2, RED) and not has_color(img1, RED)


def test_curves_chart_noisy_loss_has_raw_and_smoothed_lines_in_the_legend():
    # 200 losses that zig-zag by 0.3 around a falling line are noisy (mean |2nd difference| 0.6, far over
    # 2 % of their range): drawn thin (0.8) and faint, with the EMA-smoothed line (2) on top, each named
    # in the legend.
    records = [{"iter": 10 * i, "loss": 2.0 - i / 200 + 0.3 * (i % 2)} for i in range(200)]
    fig = charts.curves_figure(records, keys=("loss",))
    assert_clean(fig)
    ax = fig.axes[0]
    assert [line.get_linewidth() for line in ax.lines] == [0.8, 2]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["loss (raw)", "loss (smoothed, EMA 0.9)"]


def test_curves_chart_single_record_and_no_data():
    single = charts.curves_chart([{"iter": 0, "loss": 1.5}])
    assert single.size[0] == 760 and has_color(single, BLUE)
    img, texts = assert_clean(charts.curves_figure([{"iter": 0, "lr": 0.1}], keys=("loss", "mIoU")))
    assert img.size == (760, 50) and [t for t, _ in texts] == ["no data for loss, mIoU"]
    assert charts.curves_chart([], keys=()).size[0] == 760


def test_iteration_ticks_read_in_thousands():
    # Iterations 0..16000: the x tick labels are written as the CLI counts (2k, 10k), never 10000.
    assert [charts._fmt_iter(t) for t in (0, 2500, 15000, 1_200_000)] == ["0", "2.5k", "15k", "1.2M"]
    _, texts = assert_clean(charts.curves_figure([{"iter": i, "loss": 1 / (1 + i)} for i in range(0, 16001, 1000)]))
    drawn = [t for t, _ in texts]
    assert "10k" in drawn and not any(t.endswith("000") for t in drawn)


def test_overlay_has_a_legend_in_the_class_colours(work, tmp_path):
    """With --alpha 0 the overlay is the grey photo itself, so pixels in a class colour can only be the
    legend's swatches: each class of the mask has a swatch (13 px at this size, 11x11 inside the
    outline; >= 49 pixels within the JPEG's error of its colour), absent classes none; the overlay keeps
    the photo's size (256x200). --no-legend leaves none."""
    Image.new("RGB", (256, 200), (128, 128, 128)).save(tmp_path / "grey.png")
    ckpt = str(work / "runs" / "train" / "model.safetensors")
    for flag, out in (([], "with"), (["--no-legend"], "without")):
        assert main(["predict", ckpt, str(tmp_path / "grey.png"), "--out", str(tmp_path / out), "--alpha", "0"]
                    + flag) == 0
    present = set(np.unique(np.asarray(Image.open(tmp_path / "with" / "grey_mask.png"))).tolist())
    for out, expect in (("with", present), ("without", set())):
        img = np.asarray(Image.open(tmp_path / out / "grey_overlay.jpg")).astype(int)
        assert img.shape == (200, 256, 3)
        near = {c for c in range(6) if (np.abs(img - np.array(PALETTE[c])).max(-1) <= 12).sum() >= 49}
        assert near == expect, out


def test_overlay_legend_swatches_are_the_exact_palette_colours():
    """In memory (before JPEG): a 240x320 label map of classes 0 (60 %) and 4 (40 %) over a black image at
    alpha 0: the swatches are exactly PALETTE[0] and PALETTE[4] (>= 11x11 = 121 pixels each), in the
    order of their shares, and no other class colour appears."""
    label = np.zeros((240, 320), np.int64)
    label[:, 192:] = 4
    out = np.asarray(viz.add_legend(viz.overlay(np.zeros((240, 320, 3), np.uint8), label, PALETTE, 0.0), label,
                                    CLASSES, PALETTE))
    rows = {c: np.argwhere(np.all(out == PALETTE[c], -1)) for c in range(6)}
    assert len(rows[0]) >= 121 and len(rows[4]) >= 121
    assert all(len(rows[c]) == 0 for c in (1, 2, 3, 5))
    assert rows[0][:, 0].mean() < rows[4][:, 0].mean()  # sky 60 % listed above triangle 40 %


def test_predict_truth_writes_the_readme_grid(work, tmp_path):
    """--truth DIR: grid.png holds image | prediction | ground truth. The truth panel is the 128x96 mask
    scaled 2x to 256 px: runs of 128 px of sky and of box colour (exact: PNG); the legend below has
    both swatches. A missing truth mask is one line before any work."""
    ckpt = str(work / "runs" / "train" / "model.safetensors")
    assert main(["predict", ckpt, str(work / "data" / "images" / "val"), "--out", str(tmp_path / "p"),
                 "--truth", str(work / "data" / "masks" / "val")]) == 0
    grid = np.asarray(Image.open(tmp_path / "p" / "grid.png"))
    for c in (0, 3):
        hit = np.all(grid == PALETTE[c], -1)
        runs = [np.diff(np.flatnonzero(np.diff(np.concatenate([[0], r.astype(int), [0]])))) for r in hit if r.any()]
        assert max(r.max() for r in runs) == 128
    Image.new("RGB", (40, 40)).save(tmp_path / "other.png")
    assert main(["predict", ckpt, str(tmp_path / "other.png"), "--out", str(tmp_path / "q"),
                 "--truth", str(work / "data" / "masks" / "val")]) == 2
    assert not (tmp_path / "q").exists()


def test_iou_chart_title_has_no_missing_glyph_box_and_is_not_cut():
    """The eval --out title "segformer-b0 — whole, resize ...", here with a multi-scale protocol (150 characters,
    twice the 760-px chart's width at 13 pt) and a character matplotlib's font lacks (道): the title is wrapped,
    not cut (its 2 drawn lines join to the whole title), it lies inside the canvas with no text overlapping
    it, and every drawn character has a glyph (the em dash is DejaVu's own; 道 becomes "?", never a box)."""
    title = ("segformer-b0 — whole, resize keep-ratio to (512, 128), align 32, scales [0.5, 0.75, 1.0, 1.25, 1.5, "
             "1.75], flip, on the val split of 道 roads")
    result = {"IoU": [0.9, 0.5, 0.3, 0.7, 0.2, 0.4], "mIoU": 0.5, "mAcc": 0.6, "aAcc": 0.9}
    _, texts = assert_clean(charts.iou_figure(result, CLASSES, PALETTE, title=title))
    assert missing_glyphs(texts) == []
    drawn = [t for t, _ in texts if t.startswith("segformer-b0")]
    assert len(drawn) == 1 and drawn[0].replace("\n", " ") == title.replace("道", "?")
    assert drawn[0].count("\n") == 1


SWEEP = [("1,1,1,1 / 1,1,1", .2347, 20.4, 77.7), ("2,1,1,1 / 1,1,1", .2331, 18.5, 77.7),
         ("2,2,1,1 / 1,1,1", .2322, 19.5, 77.6), ("1,1,1,1 / 2,2,2", .2307, 21.6, 77.7),
         ("2,2,1,1 / 2,2,2", .2283, 20.5, 77.0), ("4,2,1,1 / 2,2,2", .2279, 18.6, 77.6),
         ("2,2,2,1 / 2,2,2", .2243, 19.6, 77.6), ("4,4,2,1 / 2,2,2", .2237, 17.9, 72.2),
         ("4,4,2,2 / 2,2,2", .2219, 19.6, 72.2), ("8,4,2,1 / 2,2,2", .2237, 17.0, 72.2)]


def test_isr_sweep_chart_labels_do_not_overlap_and_legend_marks_the_papers_setting():
    """The README's EDAFormer-T sweep (docs/edaformer_isr_sweep.png), where 4,4,2,1 and 8,4,2,1 share a
    GFLOPs value and, in the mIoU panel, a point: all 20 point labels (10 per panel) are drawn, inside the
    canvas, none overlapping another text or covering any of the 20 markers; one legend below the panels
    names the red baseline, the paper's setting, the other settings and the quartile bars; the paper's point
    is a green diamond (its inside in the exact green: ~50 px in each panel and in the legend)."""
    rows = [dict(label=l, GFLOPs=g, **{"latency ms": t, "mIoU": m, "p25 ms": t - .3, "p75 ms": t + .4})
            for l, g, t, m in SWEEP]
    fig = charts.tradeoff_figure(rows, title="edaformer-t: ISR", names=("trained setting (no ISR)", "ISR setting"),
                                 marked=[4], marked_name="the paper's setting (2,2,1,1 / 2,2,2)",
                                 whiskers={"latency ms": ("p25 ms", "p75 ms")})
    img, texts = assert_clean(fig)
    labels = [e for t, e in texts if t in {r["label"] for r in rows}]
    assert len(labels) == 20
    renderer = fig.canvas.get_renderer()
    points = [line for ax in fig.axes for line in ax.lines if line.get_marker() in ("o", "D")]
    markers = [line.get_window_extent(renderer) for line in points]  # the marker, its white edge included
    assert len(markers) == 20
    assert [(m.bounds, e.bounds) for m in markers for e in labels if overlap(m, e)] == []
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    paper = "the paper's setting (2,2,1,1 / 2,2,2)"
    assert legend == ["trained setting (no ISR)", paper, "ISR setting", "bars: quartiles of the runs"]
    diamonds = [line for line in points if line.get_marker() == "D"]
    assert len(diamonds) == 2 and all(line.get_color() == charts.MARKED for line in diamonds)
    green = np.all(np.asarray(img) == (44, 160, 44), -1).sum()  # charts.MARKED, #2ca02c
    assert green >= 3 * 30

