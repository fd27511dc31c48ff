"""SegViT's loss (`atm_loss`, the authors' ATMLoss): query c is tied to class c, CE on the class
logits plus focal and dice losses on the masks, over the final and every auxiliary output."""
import torch
import torch.nn.functional as F

from ...losses.mask import dice_loss, sigmoid_focal_loss


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
