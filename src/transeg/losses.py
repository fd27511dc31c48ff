"""Losses shared by the families."""
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
