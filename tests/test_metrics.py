"""ConfusionMatrix follows mmseg v0.13 `mean_iou` on hand-checkable examples."""
import math
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from transeg.engine.metrics import ConfusionMatrix, _add_counts, format_table
from transeg.errors import TransegError

NAN = float("nan")


def approx_list(values, expected):
    assert len(values) == len(expected)
    for v, e in zip(values, expected):
        if math.isnan(e):
            assert math.isnan(v), (values, expected)
        else:
            assert v == pytest.approx(e), (values, expected)


# The 2x4 example used by several tests (K = 3, ignore 255):
#   label  0 0 1 1        pred  0 1 1 1
#          2 2 255 255          2 0 2 0
# The two ignored pixels are skipped, leaving (label, pred) pairs
#   (0,0) (0,1) (1,1) (1,1) (2,2) (2,0)
# so the matrix (rows = label, cols = pred) is
#   [[1, 1, 0],
#    [0, 2, 0],
#    [1, 0, 1]]
# intersect = diag = [1, 2, 1], area_label = row sums = [2, 2, 2], area_pred = col sums = [2, 3, 1]
# union = label + pred - intersect = [3, 3, 2]
# IoU = [1/3, 2/3, 1/2] -> mIoU = 1.5/3 = 0.5
# Acc = [1/2, 2/2, 1/2] -> mAcc = 2/3;  aAcc = 4 correct / 6 labelled = 2/3
LABEL = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
PRED = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])


def test_hand_checked_2x4_with_ignore():
    cm = ConfusionMatrix(3)
    cm.update(PRED, LABEL)
    assert cm.matrix.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert cm.matrix.dtype == torch.int64
    r = cm.compute()
    approx_list(r["IoU"], [1 / 3, 2 / 3, 1 / 2])
    approx_list(r["Acc"], [1 / 2, 1.0, 1 / 2])
    assert r["mIoU"] == pytest.approx(0.5)
    assert r["mAcc"] == pytest.approx(2 / 3)
    assert r["aAcc"] == pytest.approx(2 / 3)
    assert r["pixels"] == [2, 2, 2]  # 8 pixels - 2 ignored, two per class
    assert r["ignored"] == 2
    assert r["invalid_pred"] == 0


def test_uint8_labels_and_batched_shape():
    # Same pixels as a [N=1, H, W] uint8 label: 255 * 4 (= K+1) would wrap in uint8 arithmetic,
    # so this checks the int64 cast happens before indexing. Same matrix as above.
    cm = ConfusionMatrix(3)
    cm.update(PRED[None].to(torch.uint8), LABEL[None].to(torch.uint8))
    assert cm.matrix.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]


def test_absent_classes():
    # K = 4: classes 0, 1 labelled; class 2 only predicted; class 3 nowhere.
    #   label 0 0 1 1 / pred 0 2 1 1
    # intersect [1, 2, 0, 0], area_label [2, 2, 0, 0], area_pred [1, 2, 1, 0], union [2, 2, 1, 0]
    # IoU = [0.5, 1, 0, nan]: class 2 (predicted only) is 0 and counts, class 3 (union 0) is nan
    # and is excluded -> mIoU = (0.5 + 1 + 0) / 3 = 0.5
    # (were class 2 dropped it would be 0.75; were class 3 counted as 0 it would be 0.375)
    # Acc = [0.5, 1, nan, nan] -> mAcc = 0.75;  aAcc = 3 / 4
    cm = ConfusionMatrix(4)
    cm.update(torch.tensor([0, 2, 1, 1]), torch.tensor([0, 0, 1, 1]))
    r = cm.compute()
    approx_list(r["IoU"], [0.5, 1.0, 0.0, NAN])
    approx_list(r["Acc"], [0.5, 1.0, NAN, NAN])
    assert r["mIoU"] == pytest.approx(0.5)
    assert r["mAcc"] == pytest.approx(0.75)
    assert r["aAcc"] == pytest.approx(0.75)
    assert r["pixels"] == [2, 2, 0, 0]


def test_accumulation_equals_one_big_update():
    # Three batches of different shapes summed == one update on the concatenation; the total
    # count must be the number of non-ignored pixels (3*5*7 + 2*9 + 11 = 134 minus the 255s).
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 5, 7), (2, 9), (11,)]
    preds = [torch.randint(0, 5, s, generator=g) for s in shapes]
    labels = [torch.randint(0, 6, s, generator=g) for s in shapes]
    labels = [torch.where(l == 5, 255, l) for l in labels]  # ~1/6 ignored
    many = ConfusionMatrix(5)
    for p, l in zip(preds, labels):
        many.update(p, l)
    one = ConfusionMatrix(5)
    one.update(torch.cat([p.flatten() for p in preds]), torch.cat([l.flatten() for l in labels]))
    assert torch.equal(many.matrix, one.matrix)
    n_valid = sum(int((l != 255).sum()) for l in labels)
    assert int(many.matrix.sum()) == n_valid
    r_many, r_one = many.compute(), one.compute()
    approx_list(r_many["IoU"], r_one["IoU"])
    assert r_many["mIoU"] == r_one["mIoU"] and r_many["pixels"] == r_one["pixels"]
    # Brute-force reference for the matrix.
    ref = np.zeros((5, 5), dtype=np.int64)
    for p, l in zip(preds, labels):
        for pi, li in zip(p.flatten().tolist(), l.flatten().tolist()):
            if li != 255:
                ref[li, pi] += 1
    assert many.matrix.numpy().tolist() == ref.tolist()


def test_reduce_zero_label():
    # ADE20K-style: raw 0 = "other" -> 255, the rest shift down by one (mmseg: gt[gt==0]=255;
    # gt-=1; gt[gt==254]=255). Raw [[0,1,2,3],[0,1,1,3]] -> [[255,0,1,2],[255,0,0,2]], K = 3.
    # pred [[2,0,1,2],[1,0,1,2]]: the preds 2 and 1 on the 255 pixels are skipped, leaving
    # (0,0) (1,1) (2,2) (0,0) (0,1) (2,2) -> matrix [[2,1,0],[0,1,0],[0,0,2]]
    # intersect [2,1,2], area_label [3,1,2], area_pred [2,2,2], union [3,2,2]
    # IoU [2/3, 1/2, 1] -> mIoU = 13/18;  aAcc = 5/6;  Acc [2/3, 1, 1] -> mAcc = 8/9
    raw = torch.tensor([[0, 1, 2, 3], [0, 1, 1, 3]], dtype=torch.uint8)
    label = raw.clone()
    label[label == 0] = 255
    label = label - 1
    label[label == 254] = 255
    assert label.tolist() == [[255, 0, 1, 2], [255, 0, 0, 2]]
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([[2, 0, 1, 2], [1, 0, 1, 2]]), label)
    assert cm.matrix.tolist() == [[2, 1, 0], [0, 1, 0], [0, 0, 2]]
    r = cm.compute()
    assert r["mIoU"] == pytest.approx(13 / 18)
    assert r["aAcc"] == pytest.approx(5 / 6)
    assert r["mAcc"] == pytest.approx(8 / 9)
    assert r["ignored"] == 2


def test_out_of_range_predictions_count_as_wrong_not_clamped():
    # K = 2, label 0 0 1 1, pred 0 5 1 -1. The 5 and -1 go to the overflow column: they stay in
    # their label's area (2 per class) but in no class's predicted area.
    # intersect [1, 1], area_label [2, 2], area_pred [1, 1], union [2, 2] -> IoU [0.5, 0.5],
    # Acc [0.5, 0.5], aAcc 2/4. (Clamping 5->1, -1->0 would give IoU [1/3, 1/3].)
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([0, 5, 1, -1]), torch.tensor([0, 0, 1, 1]))
    assert cm.matrix.tolist() == [[1, 0], [0, 1]]
    r = cm.compute()
    approx_list(r["IoU"], [0.5, 0.5])
    approx_list(r["Acc"], [0.5, 0.5])
    assert r["aAcc"] == pytest.approx(0.5)
    assert r["pixels"] == [2, 2]
    assert r["invalid_pred"] == 2
    assert "2 predictions outside [0, 2)" in format_table(r, ["a", "b"])


def test_out_of_range_labels_raise_at_compute():
    # Label 7 with K = 3 (not the ignore index) is a data bug: update stays sync-free, compute
    # names the problem. 1 such pixel here.
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 1, 2]), torch.tensor([0, 7, 255]))
    with pytest.raises(TransegError, match=r"1 labelled pixels have values outside \[0, 3\)"):
        cm.compute()


def test_bad_inputs_raise_transeg_error():
    cm = ConfusionMatrix(3)
    with pytest.raises(TransegError, match="shape"):
        cm.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(TransegError, match="argmax"):
        cm.update(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TransegError, match="num_classes"):
        ConfusionMatrix(0)


def test_empty_compute_and_reset():
    # Nothing labelled: every ratio is 0/0 -> nan, pixel counts are 0.
    cm = ConfusionMatrix(2)
    r = cm.compute()
    assert math.isnan(r["aAcc"]) and math.isnan(r["mIoU"]) and math.isnan(r["mAcc"])
    assert r["pixels"] == [0, 0]
    cm.update(PRED[:1], LABEL[:1].clamp(max=1))
    assert int(cm.matrix.sum()) == 4
    cm.reset()
    assert int(cm.matrix.sum()) == 0


def test_scatter_path_equals_bincount_path():
    # Accelerators use scatter_add_ (CUDA bincount syncs with the host); both give the same
    # counts. idx values 0..9 drawn 1000 times; both must sum to 1000.
    idx = torch.randint(0, 10, (1000,), generator=torch.Generator().manual_seed(1))
    a = torch.zeros(10, dtype=torch.int64)
    b = torch.zeros(10, dtype=torch.int64)
    _add_counts(a, idx, use_bincount=True)
    _add_counts(b, idx, use_bincount=False)
    assert torch.equal(a, b) and int(a.sum()) == 1000


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_update_does_not_sync():
    cm = ConfusionMatrix(3, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        cm.update(PRED.cuda(), LABEL.cuda())
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert cm.matrix.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]


def test_format_table():
    r = ConfusionMatrix(3)
    r.update(PRED, LABEL)
    text = format_table(r.compute(), ["road", "sidewalk", "building"])
    lines = text.splitlines()
    # Percent with 2 decimals: aAcc 2/3 -> 66.67, mIoU 0.5 -> 50.00, mAcc 2/3 -> 66.67.
    assert lines[-2] == "aAcc 66.67  mIoU 50.00  mAcc 66.67"
    # Dice [2/4, 4/5, 2/3] -> 65.56 (= the F1 score), precision [1/2, 2/3, 1] -> 72.22, recall = mAcc,
    # fwIoU: every class has 2 labelled pixels, so the IoU mean 50.00
    assert lines[-1] == "mDice 65.56  mFscore 65.56  mPrecision 72.22  mRecall 66.67  fwIoU 50.00"
    assert lines[0].split() == ["class", "IoU", "Acc", "Dice", "Prec", "pixels"]
    # sidewalk: IoU 2/3 -> 66.67, Acc 1 -> 100.00, Dice 4/5 -> 80.00, precision 2/3, 2 pixels.
    assert lines[3].split() == ["sidewalk", "66.67", "100.00", "80.00", "66.67", "2"]
    assert len({len(l) for l in lines[2:5]}) == 1  # rows aligned to one width
    # nan is shown as n/a
    nan_result = {"aAcc": 0.75, "mIoU": 0.5, "mAcc": 0.75, "IoU": [0.5, NAN], "Acc": [0.5, NAN], "pixels": [2, 0]}
    assert format_table(nan_result, ["a", "b"]).splitlines()[3].split() == ["b", "n/a", "n/a", "0"]
    with pytest.raises(TransegError, match="2 class names for 3 classes"):
        format_table(r.compute(), ["a", "b"])


def test_all_reduce_is_noop_without_distributed():
    cm = ConfusionMatrix(3)
    cm.update(PRED, LABEL)
    cm.all_reduce()
    assert int(cm.matrix.sum()) == 6


def _worker(rank, world, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    cm = ConfusionMatrix(3)
    if rank == 0:
        cm.update(PRED[0], LABEL[0])
    else:
        cm.update(PRED[1], LABEL[1])
    cm.all_reduce()
    if rank == 0:
        torch.save(cm.matrix.clone(), out_file)
    dist.destroy_process_group()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="uses fork to start two gloo ranks quickly")
def test_all_reduce_sums_over_two_processes():
    # Rank 0 sees row 0 of the 2x4 example, rank 1 row 1; after all_reduce rank 0 holds the full
    # hand-checked matrix [[1,1,0],[0,2,0],[1,0,1]].
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "m.pt")
        mp.start_processes(_worker, args=(2, os.path.join(d, "init"), out), nprocs=2, start_method="fork")
        assert torch.load(out, weights_only=True).tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]


def test_mmseg_1x_metrics_on_an_imbalanced_pair_of_classes():
    """Class 0: 90 labelled pixels, 80 right, 10 called 1; class 1: 10 pixels, 5 right, 5 called 0.
    intersect [80, 5], labelled [90, 10], predicted [85, 15]: IoU [80/95, 5/20], Dice [160/175, 10/25],
    precision [80/85, 5/15], recall [80/90, 5/10]; fwIoU (90 * 80/95 + 10 * 0.25) / 100 = 0.78289 sits near
    the frequent class, mIoU 0.54605 between them; the F2 score of class 0 is 5PR / (4P + R) = 0.89888."""
    cm = ConfusionMatrix(2)
    label = torch.tensor([0] * 90 + [1] * 10)
    pred = torch.tensor([0] * 80 + [1] * 10 + [1] * 5 + [0] * 5)
    cm.update(pred, label)
    r = cm.compute()
    assert r["IoU"] == pytest.approx([80 / 95, 0.25]) and r["mIoU"] == pytest.approx(0.546053, abs=1e-6)
    assert r["fwIoU"] == pytest.approx(0.782895, abs=1e-6)
    assert r["Dice"] == pytest.approx([160 / 175, 0.4]) and r["Fscore"] == pytest.approx(r["Dice"])
    assert r["Precision"] == pytest.approx([80 / 85, 1 / 3]) and r["Recall"] == pytest.approx([8 / 9, 0.5])
    assert cm.compute(beta=2)["Fscore"][0] == pytest.approx(0.898876, abs=1e-6)


def test_confusion_chart_shows_each_row_normalised_cell_in_its_shade():
    """Label 0: 1 pixel right, 1 called 1 (row 50 / 50 / 0 %); label 1: 2 right (0 / 100 / 0); label 2: 1 called 0,
    1 right (50 / 0 / 50). Each cell is drawn in the Blues colour of its share (checked on the rendered image, near
    a corner: the centre prints the share with a % sign), the colour bar is labelled, and no text leaves the canvas
    or overlaps another, title included. At 150 classes (ADE20K) the cells are 10 px: too small for text, so the
    matrix is colour alone, 1500 px square, and every class name still clear of the others."""
    from matplotlib import colormaps
    from test_viz import assert_clean

    from transeg.charts import confusion_figure

    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 1, 1, 1, 2, 0]), torch.tensor([0, 0, 1, 1, 2, 2]))
    result = cm.compute()
    assert result["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    fig = confusion_figure(result, ["road", "sidewalk", "building"], title="val — confusion, row-normalised")
    img, texts = assert_clean(fig)
    ax, bar = fig.axes
    shares = [[50, 50, 0], [0, 100, 0], [50, 0, 50]]
    assert ax.images[0].get_array().tolist() == shares
    assert [t.get_text() for t in ax.texts] == ["50%", "50%", "0%", "0%", "100%", "0%", "50%", "0%", "50%"]
    assert bar.get_ylabel() == "share of the label's pixels (%)"
    assert "share of the label's pixels (%)" in [t for t, _ in texts]
    pixels = np.asarray(img).astype(int)
    for i in range(3):
        for j in range(3):
            x, y = ax.transData.transform((j - 0.35, i - 0.35))  # inside cell (i, j), away from its text
            want = np.round(np.array(colormaps["Blues"](shares[i][j] / 100)[:3]) * 255)
            assert np.abs(pixels[round(img.height - y), round(x)] - want).max() <= 1, (i, j)
    big = ConfusionMatrix(150)
    big.update(torch.arange(150), torch.arange(150))
    wide = confusion_figure(big.compute(), [f"class {i}" for i in range(150)], title="ade20k")
    img, _ = assert_clean(wide)
    cell = wide.axes[0].get_window_extent().width / 150
    assert len(wide.axes[0].texts) == 0 and cell == pytest.approx(10, abs=0.5) and max(img.size) < 1800
