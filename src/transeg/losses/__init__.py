"""Losses any family can use: pixel cross-entropy (`ce`: plain, from head-stride logits,
with OHEM) and the binary per-mask losses of mask-classification heads (`mask`: focal, dice). A
family's own criterion (matching, per-query targets) lives beside its head in `transeg.heads`."""
from .ce import cross_entropy, ohem_cross_entropy, ohem_weights, upsampled_cross_entropy
from .mask import dice_loss, sigmoid_focal_loss

__all__ = ["cross_entropy", "dice_loss", "ohem_cross_entropy", "ohem_weights", "sigmoid_focal_loss",
           "upsampled_cross_entropy"]
