"""Pillow pictures: exact colours, blend math, and charts whose geometry follows the numbers."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from transeg import charts, viz
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


# ---------------------------------------------------------------------------- iou_chart
def chart_result(iou):
    finite = [v for v in iou if not math.isnan(v)]
    return {"IoU": iou, "Acc": iou, "mIoU": sum(finite) / len(finite), "mAcc": 0.6, "aAcc": 0.9, "pixels": [1] * len(iou)}


def test_iou_chart_bars_proportional_to_iou():
    # Four classes: IoU 0.8, 0.4, nan, 0.0 with distinct colours. Bars are drawn at exact colours
    # (no resampling), with a 1-px darker outline, so the interior run of class 0 is
    # 0.8 * W - 2 and of class 1 is 0.4 * W - 2 for the plot width W: run0 + 2 = 2 * (run1 + 2).
    # The nan class reads "n/a" (no bar), and IoU 0 draws no bar either.
    pal = [(200, 30, 30), (30, 160, 30), (30, 30, 200), (200, 200, 30)]
    img = charts.iou_chart(chart_result([0.8, 0.4, float("nan"), 0.0]), ["a", "b", "c", "d"], pal, title="demo")
    assert img.mode == "RGB" and 400 < img.width < 1200 and 150 < img.height < 600
    run0, run1 = longest_run(img, pal[0]), longest_run(img, pal[1])
    assert run1 > 100
    assert abs((run0 + 2) - 2 * (run1 + 2)) <= 1
    assert not has_color(img, pal[2]) and not has_color(img, pal[3])
    assert px(img, 0, 0) == (255, 255, 255)  # white background


def test_iou_chart_grows_with_classes_and_checks_names():
    # Each class is one 24-px row: 8 classes are 4 * 24 = 96 px taller than 4.
    r4 = charts.iou_chart(chart_result([0.5] * 4), list("abcd"), None)
    r8 = charts.iou_chart(chart_result([0.5] * 8), list("abcdefgh"), None)
    assert r8.height - r4.height == 96
    with pytest.raises(TransegError, match="3 class names for 4 classes"):
        charts.iou_chart(chart_result([0.5] * 4), list("abc"), None)
    with pytest.raises(TransegError, match="palette has 3 colours for 4 classes"):
        charts.iou_chart(chart_result([0.5] * 4), list("abcd"), PAL)


# ------------------------------------------------------------------------- curves_chart
BLUE, RED = charts.LINE_COLORS[0], charts.LINE_COLORS[1]


def test_curves_chart_one_panel_per_present_key():
    # loss at iters 0, 10, ..., 100 (11 points), mIoU at 50 and 100: two panels (blue loss, red
    # mIoU); "acc" is absent, so it gets no panel. Each panel is 250 px tall, so dropping mIoU
    # makes the image exactly 250 px shorter. Series of <= 30 points get dot markers whose
    # centres keep the exact line colour after the 2x downsampling.
    records = [{"iter": i, "loss": 2.0 - i / 100} for i in range(0, 101, 10)]
    records += [{"iter": 50, "mIoU": 0.4, "mode": "val"}, {"iter": 100, "mIoU": 0.55, "mode": "val"}]
    records += [{"loss": 9.0}, {"iter": 60, "loss": float("nan")}]  # no iter / nan: skipped
    two = charts.curves_chart(records, keys=("loss", "mIoU", "acc"), title="run")
    one = charts.curves_chart(records, keys=("loss",), title="run")
    assert two.width == 760 and two.height - one.height == 250
    assert has_color(two, BLUE) and has_color(two, RED) and not has_color(one, RED)


def test_curves_chart_single_record_and_no_data():
    single = charts.curves_chart([{"iter": 0, "loss": 1.5}])
    assert single.size[0] == 760 and has_color(single, BLUE)
    empty = charts.curves_chart([{"iter": 0, "lr": 0.1}], keys=("loss", "mIoU"))
    assert empty.size[0] == 760 and empty.size[1] < 100  # a one-line "no data for loss, mIoU"
    assert charts.curves_chart([], keys=()).size[0] == 760


def test_axis_ticks_and_labels():
    # 0..16000 with ~6 ticks: raw step 2667 -> next nice step 5000 -> 0, 5k, 10k, 15k.
    lo, hi, ticks, step = charts._axis(0, 16000, 6)
    assert (lo, hi, step) == (0, 16000, 5000) and ticks == [0, 5000, 10000, 15000]
    assert [charts._fmt_iter(t) for t in (0, 2500, 15000, 1_200_000)] == ["0", "2.5k", "15k", "1.2M"]
    # y tick labels take the step's decimals: step 0.25 -> 2 decimals; tiny lr steps -> 2e-5.
    assert charts._fmt_tick(0.5, 0.25) == "0.50" and charts._fmt_tick(2e-5, 2e-5) == "2e-5"
