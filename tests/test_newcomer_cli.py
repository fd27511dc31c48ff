"""Issue 20, points 5-8: what a newcomer hits in the first hour. File modes under umask 022, --threads
and latency spread, pictures (overlay legend, the image | prediction | truth grid, no missing-glyph
box, ISR sweep labels / legend / paper mark), --help examples that run, an unknown family, and the
test protocol in ONNX metadata. Everything on a tiny SegFormer (conftest.TINY)."""
import json
import os
import shlex

import numpy as np
import pytest
import torch
from PIL import Image

import transeg
from conftest import TINY
from test_viz import assert_clean, missing_glyphs, overlap
from transeg import bench, charts, viz
from transeg import cli
from transeg.cli import build_parser, main
from transeg.data.synthetic import SyntheticDataset

CLASSES, PALETTE = SyntheticDataset.classes, SyntheticDataset.palette  # sky, ground, disc, box, triangle, ring


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder laid out as the --help examples assume: runs/train/model.safetensors (an untrained tiny
    SegFormer for the 6 synthetic classes), photo.jpg (256x200), and data/images/val + data/masks/val."""
    root = tmp_path_factory.mktemp("newcomer")
    torch.manual_seed(0)
    model = transeg.create_model("segformer-b0", num_classes=6, classes=CLASSES, palette=PALETTE, **TINY)
    transeg.save(model, root / "runs" / "train" / "model.safetensors")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (200, 256, 3), dtype=np.uint8)).save(root / "photo.jpg")
    (root / "data" / "images" / "val").mkdir(parents=True)
    (root / "data" / "masks" / "val").mkdir(parents=True)
    truth = np.zeros((96, 128), np.uint8)
    truth[:, 64:] = 3  # left half sky (0), right half box (3)
    truth[:4] = 255  # a strip of ignore
    Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(root / "data" / "images" / "val" / "s1.png")
    Image.fromarray(truth, mode="L").save(root / "data" / "masks" / "val" / "s1.png")
    return root


def run(argv, cwd):
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return main(argv)
    finally:
        os.chdir(old)


# ------------------------------------------------------------------------------------------- 5: modes
def test_everything_written_is_readable_by_others_under_umask_022(work, tmp_path):
    """Under umask 022 a plain open() makes 0644 files; the atomic writers (mkstemp: 0600) must too, or
    colleagues on a shared server cannot read the outputs. Every file save, atomic_write, predict
    (--grid --truth), eval --out and a static ONNX export write is 0644."""
    pytest.importorskip("onnxscript")
    from transeg.files import atomic_write

    old = os.umask(0o022)
    try:
        model = transeg.load(work / "runs" / "train" / "model.safetensors")
        transeg.save(model, tmp_path / "m.safetensors")
        atomic_write(tmp_path / "train_state.pt", lambda tmp: torch.save({"iter": 1}, tmp))
        ckpt = str(work / "runs" / "train" / "model.safetensors")
        assert main(["predict", ckpt, str(work / "data" / "images" / "val"), "--out", str(tmp_path / "p"),
                     "--truth", str(work / "data" / "masks" / "val")]) == 0
        assert main(["eval", ckpt, "--limit", "2", "--out", str(tmp_path / "e")]) == 0
        assert main(["export", ckpt, str(tmp_path / "m.onnx"), "--static", "--size", "64x64"]) == 0
    finally:
        os.umask(old)
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    names = {p.name for p in files}
    assert {"m.safetensors", "train_state.pt", "s1_mask.png", "s1_overlay.jpg", "grid.png", "iou.png",
            "predictions.png", "m.onnx"} <= names
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: "0o644" for p in files}
    # ONNX metadata: the test protocol (the input-size rule), as stored with the model and as one line
    onnx = pytest.importorskip("onnx")
    props = {p.key: p.value for p in onnx.load(tmp_path / "m.onnx").metadata_props}
    meta = json.loads(props["transeg"])
    assert meta["protocol"] == model.protocol.to_meta() and meta["protocol_text"] == model.protocol.describe()
    assert props["test_protocol"] == "whole, original size, align 32, scales [1.0]"  # the default protocol


# ------------------------------------------------------------------------------------- 6: threads, noise
def test_threads_option_sets_torchs_threads_and_help_names_omp(work, capsys):
    """--threads 1 after any computing verb: bench then reports "1 threads" and torch runs 1 thread."""
    assert run(["bench", "runs/train/model.safetensors", "--size", "64x64", "--runs", "3", "--warmup", "0",
                "--threads", "1"], work) == 0
    assert torch.get_num_threads() == 1
    assert ", 1 threads," in capsys.readouterr().out
    for verb in ("train", "eval", "predict", "bench", "export", "serve"):
        sub = build_parser()._subparsers._group_actions[0].choices[verb]
        assert "OMP_NUM_THREADS" in " ".join(sub.format_help().split()), verb


def _fake_timings(monkeypatch, ms):
    monkeypatch.setattr(bench, "time_forward", lambda *a, **k: [m / 1e3 for m in ms])


def test_bench_prints_spread_and_warns_when_noisy(work, capsys, monkeypatch):
    """Timings 10, 10, 11, 20, 30 ms: median 11, quartiles 10 and 20 (inclusive), so the IQR is 91 % of
    the median, above the 10 % threshold: a warning. 10.0, 10.0, 10.1, 10.1, 10.2: IQR 1 %: none."""
    _fake_timings(monkeypatch, [10, 30, 11, 20, 10])
    assert run(["bench", "runs/train/model.safetensors", "--size", "64x64", "--runs", "5"], work) == 0
    out, err = capsys.readouterr()
    assert "latency median 11.0 ms (IQR 10.0-20.0 ms, min 10.0, max 30.0)" in out
    assert "transeg: warning: latencies are noisy: the middle half of the runs spans 91% of the median" in err
    _fake_timings(monkeypatch, [10.0, 10.1, 10.2, 10.1, 10.0])
    assert run(["bench", "runs/train/model.safetensors", "--size", "64x64", "--runs", "5"], work) == 0
    out, err = capsys.readouterr()
    assert "latency median 10.1 ms (IQR 10.0-10.1 ms" in out and "warning" not in err


def test_isr_sweep_rows_show_spread_and_mark_the_papers_setting(work, capsys, monkeypatch, tmp_path):
    """SegFormer's encoder-only sweep: 8 settings; every row has its IQR; the row for the paper's 2,2,1,1
    is flagged for the chart; 3 fake runs of 10, 14, 18 ms: quartiles 12 and 16, 29 % of the median: a warning."""
    _fake_timings(monkeypatch, [10, 14, 18])
    rows = []
    real = bench.measure
    monkeypatch.setattr(bench, "measure", lambda *a, **k: rows.extend(real(*a, **k)) or rows)
    assert run(["bench", "runs/train/model.safetensors", "--size", "256x256", "--runs", "3", "--isr-sweep",
                "--plot", str(tmp_path / "sweep.png")], work) == 0
    out, err = capsys.readouterr()
    lines = [line for line in out.splitlines() if "GFLOPs" in line]
    assert len(lines) == 8 and all("IQR 12.0-16.0" in line for line in lines)
    assert [r["label"] for r in rows if r["paper"]] == ["2,2,1,1"]
    assert "spans 29% of the median" in err and (tmp_path / "sweep.png").is_file()


# ------------------------------------------------------------------------------------------- 7: pictures
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


# -------------------------------------------------------------------------------------------- 8: words
def _examples():
    for verb, text in cli.VERB_EXAMPLES.items():
        for line in text.splitlines():
            yield verb, shlex.split(line.split("  #")[0])[1:]


def test_every_verb_help_ends_with_examples_that_parse():
    """Each verb's --help has an "examples:" section (serve's is in its description), and every example
    parses with the real parser (no usage error)."""
    choices = build_parser()._subparsers._group_actions[0].choices
    assert len(choices) >= 9  # models train eval predict convert bench serve data export
    for verb, sub in choices.items():
        assert "\nexamples:\n" in sub.format_help(), verb
    parser = build_parser()
    for verb, argv in _examples():
        assert argv[0] == verb
        parser.parse_args(argv)


CHEAP = ["models --family segformer --no-flops", "models --pretrained --family segmenter", "predict runs/train/model.safetensors photo.jpg --out preds/",
         "predict runs/train/model.safetensors photo.jpg --out preds/ --grid",
         "predict runs/train/model.safetensors data/images/val/ --out preds/ --grid --truth data/masks/val/",
         "bench runs/train/model.safetensors --size 128x128"]


def test_the_cheap_examples_run(work, capsys):
    """The examples that take a second on the tiny model run as written, from the folder they assume."""
    examples = {" ".join(argv) for _, argv in _examples()}
    for line in CHEAP:
        assert line in examples, line
        assert run(shlex.split(line), work) == 0, line
    assert (work / "preds" / "grid.png").is_file() and (work / "preds" / "photo_overlay.jpg").is_file()


def test_unknown_family_is_one_line_with_did_you_mean(capsys):
    """`models --family segfromer` printed an empty table and exited 0; now exit 2, one line."""
    assert main(["models", "--family", "segfromer"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("transeg: error: unknown family 'segfromer'; did you mean 'segformer'?")
    assert err.count("\n") == 1
