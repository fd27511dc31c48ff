"""Losses shared by the families."""
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
