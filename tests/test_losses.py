"""The pixel losses for imbalanced data, each against its reference definition written out here
by loops over classes and pixels (the reference named in each test), plus the properties that
pin them: Focal with gamma 0 is CE, Lovász-softmax on one-hot probabilities is 1 - IoU."""
import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F

from transeg.errors import TransegError
from transeg.data import class_weights
from transeg.losses.pixel import (check_terms, dice_loss, focal_loss, is_plain_ce, lovasz_softmax,
                                  pixel_loss, weighted_cross_entropy)

K = 4


def _case(seed=0, n=2, h=5, w=6, ignored=0.2):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, K, h, w, generator=g) * 2
    label = torch.randint(0, K - 1, (n, h, w), generator=g)  # class K-1 never appears: "absent" rules matter
    label[torch.rand(n, h, w, generator=g) < ignored] = 255
    return logits.double(), label


def test_weighted_ce_is_mmseg_s_mean_of_weighted_pixels_not_torch_s_weighted_mean():
    """mmseg CrossEntropyLoss(class_weight=w), reduction over all pixels: sum over labelled pixels of
    w[y] * -log softmax(x)[y], divided by the number of ALL pixels (ignored ones count 0)."""
    logits, label = _case()
    w = torch.tensor([0.5, 2.0, 1.0, 3.0])
    total, n_all, n_valid, wsum = 0.0, label.numel(), 0, 0.0
    for idx in itertools.product(*map(range, label.shape)):
        y = int(label[idx])
        if y == 255:
            continue
        x = logits[idx[0], :, idx[1], idx[2]]
        total += float(w[y]) * -float(x.log_softmax(0)[y])
        n_valid, wsum = n_valid + 1, wsum + float(w[y])
    assert weighted_cross_entropy(logits, label, w).item() == pytest.approx(total / n_all, rel=1e-6)
    assert weighted_cross_entropy(logits, label, w, reduction="valid").item() == pytest.approx(total / n_valid, rel=1e-6)
    # PyTorch's weight= mean divides by the sum of the weights instead: a different number
    assert F.cross_entropy(logits, label, weight=w.double(), ignore_index=255).item() == pytest.approx(total / wsum)
    assert abs(total / wsum - total / n_valid) > 1e-3


def test_dice_is_smp_s_multiclass_dice():
    """smp DiceLoss(mode="multiclass", from_logits=True, smooth=0, eps=1e-7, ignore_index=255): per class,
    score = 2 sum(p*t) / (sum(p) + sum(t)) over the batch's labelled pixels, loss = 1 - score, zeroed for
    classes absent from the labels, mean over ALL classes (so absent class K-1 pulls it down by 1/K)."""
    logits, label = _case(1)
    prob = logits.softmax(1)
    losses = []
    for c in range(K):
        inter = card = 0.0
        present = False
        for idx in itertools.product(*map(range, label.shape)):
            y = int(label[idx])
            if y == 255:
                continue
            p, t = float(prob[idx[0], c, idx[1], idx[2]]), float(y == c)
            inter, card, present = inter + p * t, card + p + t, present or bool(t)
        losses.append((1 - 2 * inter / max(card, 1e-7)) if present else 0.0)
    assert dice_loss(logits, label).item() == pytest.approx(sum(losses) / K, rel=1e-9)
    assert losses[K - 1] == 0.0


def test_focal_is_lin_et_al_and_ce_at_gamma_zero():
    """Per labelled pixel -alpha[y] (1 - p_y)^gamma log p_y (Lin et al. 2017, eq. 5), mean over all pixels."""
    logits, label = _case(2)
    alpha = torch.tensor([1.0, 0.25, 2.0, 1.0])
    total = 0.0
    for idx in itertools.product(*map(range, label.shape)):
        y = int(label[idx])
        if y != 255:
            p = float(logits[idx[0], :, idx[1], idx[2]].softmax(0)[y])
            total += -float(alpha[y]) * (1 - p) ** 2 * math.log(p)
    assert focal_loss(logits, label, 2.0, alpha).item() == pytest.approx(total / label.numel(), rel=1e-9)
    plain = F.cross_entropy(logits, label, ignore_index=255, reduction="none").mean()
    assert focal_loss(logits, label, gamma=0.0).item() == pytest.approx(plain.item(), rel=1e-12)


def _reference_lovasz(prob, label):
    """Berman et al.'s lovasz_softmax_flat(classes="present"), written as their paper's Algorithm 1."""
    valid = label.flatten() != 255
    p = prob.movedim(1, -1).reshape(-1, K)[valid]
    y = label.flatten()[valid]
    losses = []
    for c in range(K):
        fg = (y == c).double()
        if fg.sum() == 0:
            continue
        errors = (fg - p[:, c]).abs()
        order = sorted(range(len(errors)), key=lambda i: -float(errors[i]))
        gts, grads, prev = float(fg.sum()), [], 0.0
        inter, union = gts, gts
        for i in order:
            inter -= float(fg[i])
            union += 1 - float(fg[i])
            jac = 1 - inter / union
            grads.append(jac - prev)
            prev = jac
        losses.append(sum(float(errors[i]) * g for i, g in zip(order, grads)))
    return sum(losses) / len(losses)


def test_lovasz_softmax_is_berman_s_and_one_minus_iou_on_crisp_predictions():
    logits, label = _case(3)
    assert lovasz_softmax(logits, label).item() == pytest.approx(_reference_lovasz(logits.softmax(1), label), rel=1e-9)
    # one-hot probabilities (logits +-50): the Lovász extension equals the Jaccard loss, mean over present
    # classes of 1 - |pred & truth| / |pred | truth| over the labelled pixels
    crisp = (F.one_hot(logits.argmax(1), K).movedim(-1, 1).double() - 0.5) * 100
    pred, valid = logits.argmax(1), label != 255
    ious = [float(((pred == c) & (label == c) & valid).sum()) / float((((pred == c) | (label == c)) & valid).sum())
            for c in range(K) if (label == c).any()]
    assert lovasz_softmax(crisp, label).item() == pytest.approx(1 - sum(ious) / len(ious), abs=1e-9)


def test_every_term_has_a_gradient_and_no_labelled_pixel_gives_zero_not_nan():
    logits, label = _case(4)
    logits.requires_grad_(True)
    terms = check_terms([{"type": "ce", "class_weight": [1, 2, 1, 1]}, {"type": "dice", "weight": 0.5},
                         {"type": "focal"}, {"type": "lovasz", "weight": 0.25}], num_classes=K)
    out = pixel_loss(terms, logits, label)
    out["loss"].backward()
    expected = out["loss_ce"] + 0.5 * out["loss_dice"] + out["loss_focal"] + 0.25 * out["loss_lovasz"]
    assert out["loss"].item() == pytest.approx(expected.item()) and logits.grad.abs().sum() > 0
    empty = pixel_loss(terms, logits, torch.full_like(label, 255))
    assert all(math.isfinite(v.item()) for v in empty.values()) and empty["loss"].item() == 0.0


def test_auto_class_weights_are_enet_s_and_average_one_over_pixels():
    """ENet: w_k = 1 / ln(1.02 + p_k), then scaled so sum_k p_k w_k = 1. Counts 900/90/10 pixels:
    raw 1/ln(1.92) = 1.53298, 1/ln(1.11) = 9.58221, 1/ln(1.03) = 33.83087; pixel-weighted mean 2.58039."""
    w = class_weights([900, 90, 10])
    assert w == pytest.approx([0.59409, 3.71348, 13.11077], rel=1e-4)
    assert sum(p * x for p, x in zip([0.9, 0.09, 0.01], w)) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(TransegError, match="no labelled pixel"):
        class_weights([0, 0])


@pytest.mark.parametrize("terms,message", [
    ([{"type": "bce"}], r"loss\[0\]: type must be one of ce, dice, focal, lovasz"),
    ([{"type": "dice", "gamma": 2}], r"loss\[0\]: dice takes smooth, weight; not gamma"),
    ([{"type": "ce", "weight": -1}], r"loss\[0\]: weight must be a number > 0, got -1"),
    ([{"type": "ce"}, {"type": "ce", "class_weight": [1, 2]}], r"loss\[1\]: class_weight has 2 weights for 4 classes"),
    ([{"type": "focal", "gamma": float("nan")}], r"loss\[0\]: gamma must be a number >= 0"),
    ([], r"loss: a list of entries"),
])
def test_a_wrong_loss_entry_is_one_line_naming_it(terms, message):
    with pytest.raises(TransegError, match=message):
        check_terms(terms, num_classes=K)


def test_only_one_unweighted_ce_takes_the_row_blocked_path():
    assert is_plain_ce(None) and is_plain_ce(check_terms([{"type": "ce"}]))
    assert not is_plain_ce(check_terms([{"type": "ce", "class_weight": "auto"}]))
    assert not is_plain_ce(check_terms([{"type": "ce"}, {"type": "dice"}]))


def test_the_segmentor_sums_the_terms_on_upsampled_logits_and_keeps_its_blocked_ce_for_plain_ce():
    import transeg
    from conftest import TINY
    from transeg.contracts import LossInputs

    model = transeg.create_model("segformer-b0", num_classes=K, **TINY)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    label = torch.randint(0, K, (2, 64, 64), generator=torch.Generator().manual_seed(6))
    logits = model(x)
    terms = check_terms([{"type": "ce", "class_weight": [1.0, 2.0, 0.5, 1.0]}, {"type": "lovasz", "weight": 0.5}])
    got = model.loss(logits, label, terms=terms)
    full = model.upsample_logits(logits, (64, 64)).float()
    assert got["loss"].item() == pytest.approx(pixel_loss(terms, full, label)["loss"].item(), rel=1e-6)
    plain = model.loss(logits, label, terms=check_terms([{"type": "ce"}]))["loss"]
    # the row-blocked CE (no full-size logits) against the published computation: same value
    assert plain.item() == pytest.approx(F.cross_entropy(full, label).item(), rel=1e-5)
    with pytest.raises(TransegError, match="trains with its own loss"):  # a head's own training outputs
        model.loss(LossInputs(pred=logits), label, terms=terms)


def _run_cfg(tmp_path, **kw):
    from conftest import TINY, TINY_DATA
    from transeg.engine.config import TrainConfig

    base = dict(model="segformer-b0", model_args=TINY, data=TINY_DATA, iters=4, batch_size=2, lr=1e-3,
                warmup_iters=0, eval_interval=100, ckpt_interval=2, log_interval=1, workers=0, device="cpu",
                out=str(tmp_path / "run"))
    return TrainConfig(**{**base, **kw})


def test_a_run_with_auto_class_weights_writes_them_and_a_resume_keeps_them(tmp_path):
    """`loss: [{type: ce, class_weight: auto}, {type: dice, weight: 0.5}]`: the weights are those of the
    training set's pixel counts (the data check scan), logged once, written as numbers to config.yaml, and a
    resume reuses them without a scan (the comparison of settings sees the same numbers)."""
    import yaml

    from transeg.data import build_dataset, summarize
    from transeg.engine import train

    loss = [{"type": "ce", "class_weight": "auto"}, {"type": "dice", "weight": 0.5}]
    lines = []
    train(_run_cfg(tmp_path, loss=loss), stop_at=2, progress=False, log=lines.append)
    expected = class_weights(summarize(build_dataset("synthetic:size=32,n=16", "train"), progress=False)["class_pixels"])
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["loss"]
    assert saved == [{"type": "ce", "class_weight": expected, "weight": 1.0}, {"type": "dice", "weight": 0.5}]
    assert sum("class_weight auto" in line for line in lines) == 1
    lines.clear()
    train(_run_cfg(tmp_path, loss=loss), resume=True, progress=False, log=lines.append)
    assert not any("class_weight auto" in line for line in lines)
    records = [json.loads(r) for r in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)


@pytest.mark.parametrize("kw,message", [
    (dict(loss=[{"type": "ce", "class_weight": [1.0, 2.0]}]), r"loss\[0\]: class_weight has 2 weights for 6 classes"),
    (dict(loss=[{"type": "dice"}], ohem={"thresh": 0.7, "min_kept": 10}), r"ohem samples pixels for the default"),
    (dict(loss=[{"type": "bce"}]), r"loss=.*: loss\[0\]: type must be one of ce, dice, focal, lovasz"),
])
def test_a_wrong_loss_setting_is_refused_before_any_work(tmp_path, kw, message):
    from transeg.engine import train

    with pytest.raises(TransegError, match=message):
        train(_run_cfg(tmp_path, **kw), progress=False, log=lambda *a: None)
    assert not (tmp_path / "run").exists()


def test_best_by_another_metric_and_early_stop(tmp_path, monkeypatch):
    """best_metric=mDice keeps best.safetensors by mDice (logged beside mIoU); with early_stop=2 and
    validation mDice 0.50, 0.60, 0.55, 0.58 (evaluation made to return these) the best is at iteration 4 and
    the run stops at the second evaluation without a gain, iteration 8 of 20, with a checkpoint there."""
    import transeg.engine.validation as validation
    from transeg.engine import train
    from transeg.engine.metrics import ConfusionMatrix

    cm = ConfusionMatrix(6)
    cm.update(torch.arange(6), torch.arange(6))
    dice = iter([0.50, 0.60, 0.55, 0.58, 0.9, 0.9])
    saved = []
    monkeypatch.setattr(validation, "evaluate", lambda *a, **k: {**cm.compute(), "mDice": next(dice)})
    real_save = validation.save
    monkeypatch.setattr(validation, "save", lambda model, path: (saved.append(path.name), real_save(model, path)))
    lines = []
    train(_run_cfg(tmp_path, iters=20, eval_interval=2, ckpt_interval=100, best_metric="mDice", early_stop=2),
          progress=False, log=lines.append)
    records = [json.loads(r) for r in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [(r["iter"], r["mDice"]) for r in records if "mIoU" in r] == [(2, 0.5), (4, 0.6), (6, 0.55), (8, 0.58)]
    assert saved.count("best.safetensors") == 2  # at iterations 2 and 4
    assert any(line.startswith("early stop at iteration 8/20: mDice has not improved on 60.00 for 2 evaluations")
               for line in lines)
    state = torch.load(tmp_path / "run" / "train_state.pt", weights_only=True)
    assert state["iter"] == 8 and state["stale"] == 2 and state["best_miou"] == 0.6
    assert (tmp_path / "run" / "confusion.png").is_file()
