"""Binary per-mask losses on mask logits and targets [M, P] (one row per mask, one column per pixel
or point), as the mask-classification heads (SegViT, Mask2Former) use them: sigmoid focal and dice."""
import torch.nn.functional as F


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
