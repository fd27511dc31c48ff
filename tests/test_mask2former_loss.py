"""Mask2Former's matching loss (SeMask-L Mask2Former's criterion) on cases checkable by hand."""
import itertools
import math

import numpy as np
import pytest
import torch

from transeg.heads import mask2former_loss as m2f
from transeg.heads.mask2former_loss import (hungarian_match, linear_sum_assignment, linear_sum_assignment_numpy,
                                            mask2former_loss)


@pytest.mark.parametrize("solve", [linear_sum_assignment, linear_sum_assignment_numpy], ids=["default", "numpy"])
def test_linear_sum_assignment_is_optimal(solve):
    """Against brute force over all assignments, square and rectangular (both orientations)."""
    rng = np.random.default_rng(0)
    for shape in [(4, 4), (3, 5), (5, 3), (1, 4), (6, 6)]:
        c = rng.normal(size=shape)
        rows, cols = solve(c)
        n, m = shape
        if n <= m:
            best = min(sum(c[i, p[i]] for i in range(n)) for p in itertools.permutations(range(m), n))
        else:
            best = min(sum(c[p[j], j] for j in range(m)) for p in itertools.permutations(range(n), m))
        assert len(rows) == min(shape) and len(set(rows)) == len(rows) == len(set(cols))
        assert c[rows, cols].sum() == pytest.approx(best)


SHAPES = [(1, 1), (1, 7), (7, 1), (6, 6), (40, 40), (10, 25), (25, 10), (100, 20), (3, 150)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_numpy_fallback_agrees_with_scipy(shape):
    """The NumPy solver (used without scipy) against scipy's (used with it), square, more rows, more
    columns. An optimal assignment's total cost is unique even where the assignment is not, so the
    totals must be equal on every matrix; the assignments themselves must be equal only where the
    optimum is unique: on continuous random costs (a tie has probability 0) but not on small-integer
    costs, full of ties, where either solver may pick any of the optimal assignments (each checked to
    be one: min(n, m) pairs, no row or column used twice)."""
    scipy_optimize = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(sum(shape))
    for trial in range(5):
        continuous = rng.normal(size=shape) * 10 ** rng.uniform(-3, 3)
        ties = rng.integers(0, 3, size=shape).astype(np.float64)
        for c, unique in ((continuous, True), (ties, False)):
            rows, cols = linear_sum_assignment_numpy(c)
            ref_rows, ref_cols = scipy_optimize.linear_sum_assignment(c)
            assert rows.dtype == cols.dtype == np.int64
            assert len(rows) == min(shape) and len(set(rows)) == len(rows) == len(set(cols))
            assert (np.diff(rows) > 0).all()  # sorted by row, as scipy's
            assert c[rows, cols].sum() == pytest.approx(c[ref_rows, ref_cols].sum(), rel=1e-9, abs=1e-9)
            if unique:
                assert rows.tolist() == ref_rows.tolist() and cols.tolist() == ref_cols.tolist()


@pytest.mark.parametrize("scipy_solver", [True, False], ids=["scipy", "numpy"])
def test_non_finite_costs_still_match_around_them(monkeypatch, scipy_solver):
    """A diverged prediction gives NaN / inf costs: the matching still answers (scipy alone refuses
    NaN), avoiding those entries where an assignment without them exists, so the loss reports the
    divergence instead of the matcher raising."""
    if scipy_solver:
        pytest.importorskip("scipy.optimize")
    else:
        monkeypatch.setattr(m2f, "_scipy_linear_sum_assignment", None)
    rows, cols = linear_sum_assignment(np.array([[np.nan, 1.0, np.inf], [2.0, np.inf, np.nan]]))
    assert rows.tolist() == [0, 1] and cols.tolist() == [1, 0]
    rows, cols = linear_sum_assignment(np.full((3, 2), np.nan))
    assert len(rows) == 2 and len(set(rows)) == 2 and sorted(cols.tolist()) == [0, 1]
    rows, cols = linear_sum_assignment(np.array([[0.0, -np.inf], [0.0, 5.0]]))
    assert cols.tolist() == [1, 0]


def test_matching_prefers_the_global_optimum_over_greedy():
    """Costs [[1, 2], [2, 100]]: greedy takes (0,0) then must pay 100; the optimum is (0,1)+(1,0) = 4."""
    rows, cols = linear_sum_assignment(np.array([[1.0, 2.0], [2.0, 100.0]]))
    assert rows.tolist() == [0, 1] and cols.tolist() == [1, 0]


def test_hand_checkable_matching_and_loss():
    """Two targets on a 2x2 image (class 0 = left column, class 1 = right column), three queries:
    query 0 predicts class 1 on the right column, query 2 class 0 on the left column, query 1 is unsure
    with an empty mask. The matcher must pair query 2 <-> target 0 and query 0 <-> target 1, and the
    loss then follows from the formulas: CE with weights (matched 1, unmatched no-object 0.1),
    BCE and dice on the two matched masks divided by 2 targets, weighted 2 / 5 / 5."""
    big = 6.0
    logits = torch.tensor([[[-big, big, -big], [0.0, 0.0, 0.0], [big, -big, -big]]])  # [1, 3 queries, 2 classes + no-object]
    left = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    masks = torch.stack([(1 - left) * 2 * big - big, torch.full((2, 2), -big), left * 2 * big - big])[None]
    targets = [{"labels": torch.tensor([0, 1]), "masks": torch.stack([left, 1 - left])}]
    (q, t), = hungarian_match(logits, masks, targets)
    assert dict(zip(t.tolist(), q.tolist())) == {0: 2, 1: 0}

    losses = mask2former_loss({"pred_logits": logits, "pred_masks": masks}, targets, num_classes=2)
    # CE: queries 0, 2 -> their classes (p = e^6 / (e^6 + 2e^-6)); query 1 -> no object (p = 1/3), weight 0.1
    p_hit = math.exp(big) / (math.exp(big) + 2 * math.exp(-big))
    ce = (-2 * math.log(p_hit) - 0.1 * math.log(1 / 3)) / 2.1
    assert losses["loss_ce"].item() == pytest.approx(ce, rel=1e-4)
    # each matched mask is right on all 4 pixels with |logit| = 6: BCE = log(1 + e^-6) per pixel
    bce = math.log1p(math.exp(-big))
    assert losses["loss_mask"].item() == pytest.approx(2 * bce / 2, rel=1e-4)
    # dice per mask: p = sigmoid(6) on its 2 pixels, sigmoid(-6) on the other 2
    s, r = 1 / (1 + math.exp(-big)), 1 / (1 + math.exp(big))
    dice = 1 - (2 * 2 * s + 1) / (2 * s + 2 * r + 2 + 1)
    assert losses["loss_dice"].item() == pytest.approx(dice, rel=1e-4)
    assert losses["loss"].item() == pytest.approx(2 * ce + 5 * bce + 5 * dice, rel=1e-4)


def test_auxiliary_outputs_are_matched_on_their_own():
    torch.manual_seed(0)
    targets = [{"labels": torch.tensor([1]), "masks": torch.ones(1, 4, 4)}, {"labels": torch.tensor([], dtype=torch.long),
                                                                              "masks": torch.zeros(0, 4, 4)}]
    out = {"pred_logits": torch.randn(2, 5, 4), "pred_masks": torch.randn(2, 5, 2, 2),
           "aux_outputs": [{"pred_logits": torch.randn(2, 5, 4), "pred_masks": torch.randn(2, 5, 2, 2)}]}
    losses = mask2former_loss(out, targets, num_classes=3)
    assert {"loss_ce_0", "loss_mask_0", "loss_dice_0"} <= set(losses) and torch.isfinite(losses["loss"])
