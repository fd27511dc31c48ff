"""Mask2Former's set-prediction criterion, for every head trained with it (SeMask-Mask2Former's here;
EoMT's uses the same): the one-to-one query/target matching (`hungarian_match`, solved by
`linear_sum_assignment`), PointRend's point sampling (`point_sample`, `uncertain_points`), per-class
targets from a label map (`semantic_targets`) and the loss over the final and auxiliary outputs
(`mask2former_loss`)."""
import bisect

import numpy as np
import torch
import torch.nn.functional as F

from ..losses.mask import dice_loss

try:  # scipy is an optional extra; without it the matching uses linear_sum_assignment_numpy
    from scipy.optimize import linear_sum_assignment as _scipy_linear_sum_assignment
except ImportError:
    _scipy_linear_sum_assignment = None


def linear_sum_assignment(cost):
    """Minimum-cost assignment of a rectangular matrix [n, m]: (rows, cols) as sorted-by-row int64
    arrays of min(n, m) pairs, every row of the smaller side assigned.

    Solved by scipy's `linear_sum_assignment` when scipy is installed, else by
    `linear_sum_assignment_numpy`. Non-finite costs (from a diverged prediction) are replaced by
    finite ones beyond any sum of the finite costs, NaN and +inf above, -inf below, so that the
    matcher always returns an assignment (scipy refuses NaN) and the non-finite loss, not the
    matching, is what reports the divergence."""
    c = np.asarray(cost, dtype=np.float64)
    if c.size and not np.isfinite(c).all():
        finite = np.abs(c[np.isfinite(c)])
        big = ((finite.max() if finite.size else 0.0) + 1.0) * (min(c.shape) + 1)
        c = np.nan_to_num(c, nan=big, posinf=big, neginf=-big)
    if _scipy_linear_sum_assignment is None:
        return linear_sum_assignment_numpy(c)
    rows, cols = _scipy_linear_sum_assignment(c)
    return rows.astype(np.int64), cols.astype(np.int64)


def linear_sum_assignment_numpy(cost):
    """`linear_sum_assignment` without scipy: the Hungarian method with potentials, O(n²m), in NumPy.
    Same contract as scipy's function for finite costs: (rows, cols) sorted by row, int64, min(n, m)
    pairs of minimum total cost."""
    c = np.asarray(cost, dtype=np.float64)
    transposed = c.shape[0] > c.shape[1]
    if transposed:
        c = c.T
    n, m = c.shape
    u, v = np.zeros(n + 1), np.zeros(m + 1)
    owner = np.zeros(m + 1, dtype=np.int64)  # owner[j]: the row (1-based) assigned to column j; column 0 is a sentinel
    way = np.zeros(m + 1, dtype=np.int64)
    for i in range(1, n + 1):
        owner[0], j0 = i, 0
        minv = np.full(m + 1, np.inf)
        used = np.zeros(m + 1, dtype=bool)
        while True:  # grow an alternating tree from row i until it reaches a free column
            used[j0] = True
            i0 = owner[j0]
            free = ~used[1:]
            reduced = c[i0 - 1] - u[i0] - v[1:]
            better = free & (reduced < minv[1:])
            minv[1:][better] = reduced[better]
            way[1:][better] = j0
            candidates = np.where(free, minv[1:], np.inf)
            j1 = int(candidates.argmin()) + 1
            delta = candidates[j1 - 1]
            u[owner[used]] += delta
            v[used] -= delta
            minv[~used] -= delta
            j0 = j1
            if owner[j0] == 0:
                break
        while j0:  # flip the augmenting path
            j1 = way[j0]
            owner[j0] = owner[j1]
            j0 = j1
    cols = np.nonzero(owner[1:])[0]
    rows = owner[1:][cols] - 1
    if transposed:
        rows, cols = cols, rows
    order = np.argsort(rows)
    return rows[order], cols[order]


def _pairwise_mask_costs(pred, target):
    """pred [Q, P] logits, target [T, P] binary -> sigmoid BCE [Q, T] (mean over points) and dice [Q, T]."""
    pos = F.binary_cross_entropy_with_logits(pred, torch.ones_like(pred), reduction="none")
    neg = F.binary_cross_entropy_with_logits(pred, torch.zeros_like(pred), reduction="none")
    bce = (pos @ target.T + neg @ (1 - target).T) / pred.shape[1]
    p = pred.sigmoid()
    dice = 1 - (2 * p @ target.T + 1) / (p.sum(1)[:, None] + target.sum(1)[None, :] + 1)
    return bce, dice


def point_sample(maps, coords):
    """maps [M, H, W], coords [M, P, 2] as (x, y) in [0, 1] -> [M, P]: bilinear values at those points
    (PointRend's `point_sample`: grid_sample, align_corners=False, zeros outside)."""
    return F.grid_sample(maps[:, None], 2 * coords[:, :, None] - 1, align_corners=False)[:, 0, :, 0]


def uncertain_points(logits, num_points, oversample_ratio=3.0, importance_sample_ratio=0.75):
    """PointRend's training points for mask logits [M, h, w] -> coords [M, P, 2]: draw
    oversample_ratio·P uniform points, keep the importance_sample_ratio·P whose logits are nearest 0
    (the most uncertain), top up with fresh uniform points. Draws `torch.rand` exactly as the
    reference does (same shapes, same order), so a seeded run reproduces its numbers."""
    m = logits.shape[0]
    sampled = torch.rand(m, int(num_points * oversample_ratio), 2, device=logits.device)
    uncertainty = -point_sample(logits, sampled).abs()
    keep = int(importance_sample_ratio * num_points)
    idx = uncertainty.topk(keep, dim=1).indices
    coords = torch.gather(sampled, 1, idx[..., None].expand(-1, -1, 2))
    if num_points > keep:
        coords = torch.cat([coords, torch.rand(m, num_points - keep, 2, device=logits.device)], dim=1)
    return coords


@torch.no_grad()
def hungarian_match(pred_logits, pred_masks, targets, cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=None):
    """Mask2Former's matcher: per image, the one-to-one query/target assignment minimising
    cost_class · (-p[class]) + cost_mask · sigmoid-BCE + cost_dice · dice.
    Masks are compared at `num_points` uniform random points shared by predictions and targets (the
    authors' 12,544, one `torch.rand(1, P, 2)` per image even when it has no target), or, with
    num_points=None, at every pixel of the target resolution (predictions upsampled bilinearly).
    targets: [{"labels": [T], "masks": [T, H, W]}]. Returns [(query_idx, target_idx)] per image (on the host)."""
    return [(torch.from_numpy(rows), torch.from_numpy(cols))
            for rows, cols in _match(pred_logits, pred_masks, targets, cost_class, cost_mask, cost_dice, num_points)]


@torch.no_grad()
def _match(pred_logits, pred_masks, targets, cost_class, cost_mask, cost_dice, num_points):
    """`hungarian_match` as NumPy (rows, cols) per image. The assignment is solved on the host, so the costs are
    read from the device, every image's at once: a GPU's host waits for the device at each read, once per batch
    here where a read per image waited once per image."""
    costs = []
    for b, t in enumerate(targets):
        if num_points:
            coords = torch.rand(1, num_points, 2, device=pred_masks.device)
        if t["labels"].numel() == 0:
            costs.append(None)
            continue
        if num_points:
            tgt = point_sample(t["masks"].float(), coords.expand(t["masks"].shape[0], -1, -1))
            masks = point_sample(pred_masks[b].float(), coords.expand(pred_masks.shape[1], -1, -1))
        else:
            masks = F.interpolate(pred_masks[b][:, None].float(), size=t["masks"].shape[-2:], mode="bilinear",
                                  align_corners=False)[:, 0].flatten(1)
            tgt = t["masks"].float().flatten(1)
        bce, dice = _pairwise_mask_costs(masks, tgt)
        cls = -pred_logits[b].float().softmax(-1)[:, t["labels"]]
        costs.append(cost_mask * bce + cost_class * cls + cost_dice * dice)
    present = [c for c in costs if c is not None]
    host = torch.cat([c.flatten() for c in present]).cpu().numpy() if present else None  # the one read
    out, at = [], 0
    for c in costs:
        if c is None:
            out.append((np.zeros(0, np.int64), np.zeros(0, np.int64)))
            continue
        out.append(linear_sum_assignment(host[at:at + c.numel()].reshape(c.shape)))
        at += c.numel()
    return out


KEY_STRIDE = 1 << 32  # semantic_targets: image b's label value v is the key b * KEY_STRIDE + v


def semantic_targets(label, ignore_index=255, size=None):
    """A label map [N, H, W] -> Mask2Former targets: per image the classes present (ascending, the
    ignore value left out) and their binary masks, zero-padded at the bottom/right to `size`.
    Every image's classes come from one `unique` over the batch (image b's values offset by b · 2³²) and one read
    of its result: on a GPU, a `unique` and a boolean index per image waited for the device twice per image."""
    n = label.shape[0]
    keys = label.long() + torch.arange(n, device=label.device).mul_(KEY_STRIDE).view(n, 1, 1)
    found = torch.unique(keys)  # sorted: image by image, values ascending
    host = found.tolist()  # the one read
    out, start = [], 0
    for b, lab in enumerate(label):
        end = bisect.bisect_left(host, b * KEY_STRIDE + KEY_STRIDE // 2, lo=start)  # values lie in [-2³¹, 2³¹)
        classes = found[start:end] - b * KEY_STRIDE
        values = [k - b * KEY_STRIDE for k in host[start:end]]
        if ignore_index in values:
            i = values.index(ignore_index)
            classes = torch.cat([classes[:i], classes[i + 1:]])
        start = end
        masks = (lab[None] == classes[:, None, None]).float()
        if size is not None and tuple(size) != tuple(lab.shape):
            masks = F.pad(masks, (0, size[1] - lab.shape[1], 0, size[0] - lab.shape[0]))
        out.append({"labels": classes, "masks": masks})
    return out


def mask2former_loss(outputs, targets, num_classes, no_object_weight=0.1, class_weight=2.0, mask_weight=5.0,
                     dice_weight=5.0, num_points=None, oversample_ratio=3.0, importance_sample_ratio=0.75):
    """Mask2Former's set loss summed over the final and auxiliary outputs, each with its own matching:
    CE over all queries (matched -> their target's class, the rest -> "no object" with weight 0.1),
    and for matched pairs sigmoid BCE (mean over points) and dice, each summed and divided by the
    number of targets in the batch.

    num_points=None compares masks at every target pixel; an integer (the authors' 12,544) samples
    points as they do: uniform ones for the matching, uncertainty-biased ones (`uncertain_points`)
    for the mask losses, in the reference's order of random draws. Returns the unweighted terms
    (`loss_ce`, `loss_mask`, `loss_dice`, suffixed `_k` for auxiliary output k) and the weighted sum `loss`."""
    device = outputs["pred_logits"].device
    num_masks = max(sum(int(t["labels"].numel()) for t in targets), 1)
    weight = torch.ones(num_classes + 1, device=device)
    weight[-1:].fill_(no_object_weight)  # (not weight[-1] = w: a tensor made from host data)
    losses, total = {}, 0.0
    for k, out in enumerate([outputs] + list(outputs.get("aux_outputs", []))):
        suffix = "" if k == 0 else f"_{k - 1}"
        matches = _match(out["pred_logits"], out["pred_masks"], targets, class_weight, mask_weight, dice_weight,
                         num_points)
        n, q = out["pred_logits"].shape[:2]
        target_classes = torch.full((n, q), num_classes, dtype=torch.long, device=device)
        # every image's pairs to the device in one copy (on a GPU a copy from host memory waits for the device)
        pairs = torch.from_numpy(np.concatenate([np.concatenate(m) for m in matches]))
        if device.type == "cuda":
            pairs = pairs.pin_memory()
        pairs, at = pairs.to(device, non_blocking=True), 0
        preds, gts = [], []
        for b, (rows, _) in enumerate(matches):
            qi, ti = pairs[at:at + len(rows)], pairs[at + len(rows):at + 2 * len(rows)]
            at += 2 * len(rows)
            target_classes[b, qi] = targets[b]["labels"][ti]
            if len(rows):
                preds.append(out["pred_masks"][b, qi])
                gts.append(targets[b]["masks"][ti].float())
        ce = F.cross_entropy(out["pred_logits"].float().transpose(1, 2), target_classes, weight)
        if preds:
            pred, gt = torch.cat(preds).float(), torch.cat(gts)
            if num_points:
                with torch.no_grad():
                    coords = uncertain_points(pred.detach(), num_points, oversample_ratio, importance_sample_ratio)
                    gt = point_sample(gt, coords)
                pred = point_sample(pred, coords)
            else:
                pred = F.interpolate(pred[:, None], size=gt.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
                pred, gt = pred.flatten(1), gt.flatten(1)
            bce = F.binary_cross_entropy_with_logits(pred, gt, reduction="none").mean(1).sum() / num_masks
            dice = dice_loss(pred, gt).sum() / num_masks
        else:
            bce = dice = out["pred_masks"].sum() * 0.0
        losses.update({f"loss_ce{suffix}": ce, f"loss_mask{suffix}": bce, f"loss_dice{suffix}": dice})
        total = total + class_weight * ce + mask_weight * bce + dice_weight * dice
    losses["loss"] = total
    return losses
