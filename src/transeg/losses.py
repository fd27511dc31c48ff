"""Losses shared by the families."""
import math

import torch
import torch.nn.functional as F


def cross_entropy(logits, label, ignore_index=255, reduction="all"):
    """Pixel-wise cross-entropy on logits already at the label's size.

    reduction="all": mean over ALL pixels, ignored ones counted as 0 in the numerator but present in
    the denominator. This is mmseg 0.x's behaviour and so what every paper here trained with.
    reduction="valid": mean over non-ignored pixels (PyTorch's and Hugging Face's convention).
    """
    if reduction == "valid":
        return F.cross_entropy(logits, label, ignore_index=ignore_index)
    if reduction != "all":
        raise ValueError(f"loss reduction must be 'all' or 'valid', got {reduction!r}")
    return F.cross_entropy(logits, label, ignore_index=ignore_index, reduction="none").mean()


def upsampled_cross_entropy(logits, label, ignore_index=255, reduction="all", padded_size=None, blocked=True):
    """`cross_entropy(interpolate(logits, padded_size)[..., :H, :W], label)` without ever holding the
    full-resolution logits: the same value and gradient, in a fraction of the time and memory.

    logits: (N, C, h, w) at the head's stride; label: (N, H, W); padded_size: the size the logits are
    upsampled to before cropping to the label (default: the label's size; see Segmentor.upsample_logits).
    Bilinear (align_corners=False) upsampling is separable, so each image is first resampled along W
    by PyTorch's kernel (at the head's height h), then a few output rows at a time along H by one
    small matrix product with the rows of the resampling matrix that block needs; each block's loss
    is taken while it is in cache. Backward recomputes the blocks from the logits (nothing at full
    size is saved) and pushes each block's softmax gradient back through the same matrices. For SegFormer's training batch (8 × 150 classes × 512²) the published way writes and
    re-reads a 1.26 GB tensor about ten times (upsample, log-softmax, NLL and their backward
    passes); this works in blocks of ~2 MB. Computed in fp32 whatever the logits' dtype, like
    `cross_entropy(logits.float(), ...)`. reduction as in `cross_entropy`; "valid" with no labelled
    pixel at all gives 0 (not NaN, which would stop training). blocked=False runs the published
    computation instead (what `layers.fusion.unfused` selects, for comparisons).
    """
    if reduction not in ("all", "valid"):
        raise ValueError(f"loss reduction must be 'all' or 'valid', got {reduction!r}")
    size = tuple(label.shape[-2:])
    padded = tuple(padded_size or size)
    if padded[0] < size[0] or padded[1] < size[1]:
        raise ValueError(f"padded size {padded} is smaller than the label's {size}")
    if not blocked:
        if tuple(logits.shape[-2:]) != padded:
            logits = F.interpolate(logits, size=padded, mode="bilinear", align_corners=False)
        return cross_entropy(logits[..., :size[0], :size[1]].float(), label, ignore_index, reduction)
    return _UpsampledCrossEntropy.apply(logits, label.long(), padded, ignore_index, reduction)


class _UpsampledCrossEntropy(torch.autograd.Function):
    """See `upsampled_cross_entropy`. Works on channels-last slices (H, W, C), so the softmax over
    classes runs along contiguous memory and a block of rows is one (rows, W·C) matrix;
    the Python loop is over images and row blocks only (a few hundred iterations per batch)."""

    BLOCK_BYTES = 1 << 21  # about 2 MB of fp32 logits per block of rows: a core's L2

    @staticmethod
    def _plan(padded_h, h, height, width, c, device):
        """The H-resampling matrix (height, h) and the row blocks [(r0, r1, lo, hi)]: output rows
        r0..r1-1 read only input rows lo..hi-1 (two taps per row, the taps never go backwards)."""
        from .layers.fusion import bilinear_matrix

        a = bilinear_matrix(padded_h, h, torch.float32, device)[:height]
        rows = max(1, _UpsampledCrossEntropy.BLOCK_BYTES // (4 * width * c))

        def first_tap(i):  # bilinear_matrix's rule, in the same float64 arithmetic
            return min(math.floor(max((i + 0.5) * (h / padded_h) - 0.5, 0.0)), h - 1)
        blocks = [(r0, min(r0 + rows, height), first_tap(r0), min(first_tap(min(r0 + rows, height) - 1) + 2, h))
                  for r0 in range(0, height, rows)]
        return a, blocks

    @staticmethod
    def _widen(x, padded_w, width, out):
        """(1, C, h, w) -> (h, width·C): resampled along W to padded_w into `out` (1, C, h, padded_w,
        channels-last), cropped to width. One buffer for every image: a fresh 40 MB tensor per
        image costs more in page faults (first touch of new memory) than the resampling itself."""
        torch.ops.aten.upsample_bilinear2d.out(x, [x.shape[-2], padded_w], False, out=out)
        return out.permute(0, 2, 3, 1)[0, :, :width].view(x.shape[-2], -1)  # rows strided by padded_w·C

    @staticmethod
    def _buffer(x, padded_w):
        c, h = x.shape[1:3]
        return torch.empty(1, c, h, padded_w, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)

    @staticmethod
    def forward(ctx, logits, label, padded, ignore_index, reduction):
        with torch.autocast(logits.device.type, enabled=False), torch.no_grad():
            x = logits.detach().float()
            n, c, h, w = x.shape
            height, width = label.shape[-2:]
            a, blocks = _UpsampledCrossEntropy._plan(padded[0], h, height, width, c, x.device)
            total = x.new_zeros(())
            buf = _UpsampledCrossEntropy._buffer(x, padded[1])
            for b in range(n):
                t = _UpsampledCrossEntropy._widen(x[b:b + 1], padded[1], width, buf)
                for r0, r1, lo, hi in blocks:
                    up = torch.mm(a[r0:r1, lo:hi], t[lo:hi]).view(-1, c)
                    total += F.cross_entropy(up, label[b, r0:r1].reshape(-1), ignore_index=ignore_index,
                                             reduction="sum")
            valid = label != ignore_index
            denom = valid.sum().clamp(min=1).float() if reduction == "valid" else x.new_tensor(float(valid.numel()))
        ctx.save_for_backward(logits, label, valid, denom)
        ctx.padded, ctx.plan = padded, (a, blocks)
        return total / denom

    @staticmethod
    def backward(ctx, grad):
        logits, label, valid, denom = ctx.saved_tensors
        with torch.autocast(logits.device.type, enabled=False), torch.no_grad():
            x = logits.detach().float()
            n, c, h, w = x.shape
            height, width = label.shape[-2:]
            padded, (a, blocks) = ctx.padded, ctx.plan
            scale = (valid * (grad / denom)).unsqueeze(-1)  # d loss / d logit = scale · (softmax - onehot)
            target = label.masked_fill(~valid, 0).unsqueeze(-1)
            grad_x = torch.empty_like(x, memory_format=torch.channels_last)
            buf = _UpsampledCrossEntropy._buffer(x, padded[1])
            grad_t = torch.zeros_like(buf)  # d loss / d t, (1, C, h, padded_w) channels-last
            for b in range(n):
                t = _UpsampledCrossEntropy._widen(x[b:b + 1], padded[1], width, buf)
                if b:
                    grad_t.zero_()
                g = grad_t.permute(0, 2, 3, 1)[0, :, :width].view(h, -1)  # rows strided by padded_w·C
                for r0, r1, lo, hi in blocks:
                    up = torch.mm(a[r0:r1, lo:hi], t[lo:hi]).view(r1 - r0, width, c)
                    p = torch.softmax(up, -1)
                    s = scale[b, r0:r1]
                    p.mul_(s).scatter_add_(-1, target[b, r0:r1], -s)
                    g[lo:hi].addmm_(a[r0:r1, lo:hi].T, p.view(r1 - r0, -1))
                torch.ops.aten.upsample_bilinear2d_backward.grad_input(
                    grad_t, [h, padded[1]], [1, c, h, w], False, grad_input=grad_x[b:b + 1])
        return grad_x.to(logits.dtype), None, None, None, None


def ohem_weights(logits, label, thresh=0.7, min_kept=100_000, ignore_index=255):
    """mmseg's OHEMPixelSampler (v0.x): 1 for hard pixels, 0 elsewhere (no gradient).

    A labelled pixel is hard when the softmax probability of its true class is below
    max(thresh, p_k), where p_k is the (min_kept * N)-th smallest such probability in the batch —
    so at least min_kept pixels per image are kept even when the model is confident. With
    thresh=None the min_kept * N labelled pixels of highest cross-entropy are kept. Written
    without boolean indexing so it never waits on the device.
    """
    with torch.no_grad():
        valid = label != ignore_index
        if thresh is None:  # the sampler's other mode (SeMask): the min_kept * N highest-loss labelled pixels
            ce = F.cross_entropy(logits.float(), label, ignore_index=ignore_index, reduction="none")
            ranked = ce.masked_fill(~valid, float("-inf")).flatten().sort(descending=True).values
            kept = valid.sum().clamp(max=min_kept * label.shape[0]).sub(1).clamp(min=0)
            return ((ce >= ranked.gather(0, kept.view(1))) & valid).float()
        prob = logits.float().softmax(1).gather(1, label.masked_fill(~valid, 0).unsqueeze(1)).squeeze(1)
        ranked = prob.masked_fill(~valid, 2.0).flatten().sort().values  # ignored pixels sort last
        kept = (valid.sum() - 1).clamp(min=0).clamp(max=min_kept * label.shape[0])
        threshold = ranked.gather(0, kept.view(1)).clamp(min=thresh)
        return ((prob < threshold) & valid).float()


def ohem_cross_entropy(logits, label, thresh=0.7, min_kept=100_000, ignore_index=255, reduction="all"):
    """Cross-entropy over the OHEM-selected pixels; reduction as in `cross_entropy` ("all" divides by
    every pixel, mmseg 0.x; "valid" by the number of selected pixels)."""
    weight = ohem_weights(logits, label, thresh, min_kept, ignore_index)
    loss = F.cross_entropy(logits, label, ignore_index=ignore_index, reduction="none") * weight
    if reduction == "valid":
        return loss.sum() / weight.sum().clamp(min=1)
    if reduction != "all":
        raise ValueError(f"loss reduction must be 'all' or 'valid', got {reduction!r}")
    return loss.mean()


def sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0):
    """Per-mask mean over pixels of the sigmoid focal loss (Lin et al. 2017). logits, targets: [M, P]."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return (alpha_t * ce * (1 - p_t) ** gamma).mean(1)


def dice_loss(logits, targets):
    """Per-mask 1 - (2|p·t| + 1) / (|p| + |t| + 1) with p = sigmoid(logits). logits, targets: [M, P]."""
    p = logits.sigmoid()
    return 1 - (2 * (p * targets).sum(1) + 1) / (p.sum(1) + targets.sum(1) + 1)


def atm_loss(outputs, label, num_classes, ignore_index=255, no_object_weight=0.1, mask_weight=20.0,
             dice_weight=1.0, class_weight=1.0):
    """SegViT's loss (its ATMLoss / SetCriterion) summed over the final and every auxiliary output.

    Query c is assigned to class c (no Hungarian matching): a class present in an image is the target
    of its own query, every other query targets "no object" (index C, CE weight `no_object_weight`).
    Present classes' masks (label == c; ignored pixels count as negatives) supervise the matching
    queries' mask logits, upsampled bilinearly to the label size, with focal (x20) and dice (x1)
    losses, each summed over masks and divided by the number of masks in the batch (all processes).
    """
    label = label.long()
    n = label.shape[0]
    present = [torch.unique(label[b][label[b] != ignore_index]) for b in range(n)]
    if any(p.numel() and (p.min() < 0 or p.max() >= num_classes) for p in present):
        raise ValueError(f"label values outside 0..{num_classes - 1} (ignore index {ignore_index})")
    target_classes = torch.full((n, num_classes), num_classes, dtype=torch.long, device=label.device)
    for b, p in enumerate(present):
        target_classes[b, p] = p
    weight = torch.ones(num_classes + 1, device=label.device)
    weight[-1] = no_object_weight
    num_masks = torch.tensor(float(sum(p.numel() for p in present)), device=label.device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(num_masks)
        num_masks = num_masks / torch.distributed.get_world_size()
    num_masks = num_masks.clamp(min=1)
    targets = torch.cat([(label[b][None] == p[:, None, None]).float() for b, p in enumerate(present)]).flatten(1)
    batch_idx = torch.cat([torch.full_like(p, b) for b, p in enumerate(present)])
    query_idx = torch.cat(present)

    losses = {}
    total = 0.0
    for k, out in enumerate([outputs] + list(outputs.get("aux_outputs", []))):
        suffix = "" if k == 0 else f"_{k - 1}"
        ce = F.cross_entropy(out["pred_logits"].float().transpose(1, 2), target_classes, weight)
        masks = out["pred_masks"][batch_idx, query_idx].float()
        if masks.numel():
            masks = F.interpolate(masks[:, None], size=label.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
            focal = sigmoid_focal_loss(masks.flatten(1), targets).sum() / num_masks
            dice = dice_loss(masks.flatten(1), targets).sum() / num_masks
        else:  # no labelled pixel in the batch: only the classification term
            focal = dice = out["pred_masks"].sum() * 0.0
        losses.update({f"loss_ce{suffix}": ce, f"loss_mask{suffix}": focal, f"loss_dice{suffix}": dice})
        total = total + class_weight * ce + mask_weight * focal + dice_weight * dice
    losses["loss"] = total
    return losses


# ------------------------------------------------------------------------- Mask2Former set prediction
def linear_sum_assignment(cost):
    """Minimum-cost assignment of a rectangular matrix (Hungarian method with potentials, O(n²m)).

    Returns (rows, cols) as sorted-by-row int64 arrays with min(n, m) pairs, like scipy's function
    (scipy is not a dependency). Every row of the smaller side is assigned."""
    import numpy as np

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
    targets: [{"labels": [T], "masks": [T, H, W]}]. Returns [(query_idx, target_idx)] per image."""
    out = []
    for b, t in enumerate(targets):
        if num_points:
            coords = torch.rand(1, num_points, 2, device=pred_masks.device)
        if t["labels"].numel() == 0:
            out.append((torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)))
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
        rows, cols = linear_sum_assignment((cost_mask * bce + cost_class * cls + cost_dice * dice).cpu())
        out.append((torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)))
    return out


def semantic_targets(label, ignore_index=255, size=None):
    """A label map [N, H, W] -> Mask2Former targets: per image the classes present (ascending, the
    ignore value left out) and their binary masks, zero-padded at the bottom/right to `size`."""
    out = []
    for lab in label:
        classes = lab.unique()
        classes = classes[classes != ignore_index]
        masks = (lab[None] == classes[:, None, None]).float()
        if size is not None and tuple(size) != tuple(lab.shape):
            masks = F.pad(masks, (0, size[1] - lab.shape[1], 0, size[0] - lab.shape[0]))
        out.append({"labels": classes.long(), "masks": masks})
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
    weight[-1] = no_object_weight
    losses, total = {}, 0.0
    for k, out in enumerate([outputs] + list(outputs.get("aux_outputs", []))):
        suffix = "" if k == 0 else f"_{k - 1}"
        matches = hungarian_match(out["pred_logits"], out["pred_masks"], targets, class_weight, mask_weight,
                                  dice_weight, num_points)
        n, q = out["pred_logits"].shape[:2]
        target_classes = torch.full((n, q), num_classes, dtype=torch.long, device=device)
        preds, gts = [], []
        for b, (qi, ti) in enumerate(matches):
            qi, ti = qi.to(device), ti.to(device)
            target_classes[b, qi] = targets[b]["labels"][ti]
            if qi.numel():
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
