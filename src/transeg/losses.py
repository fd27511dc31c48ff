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
    so at least min_kept pixels per image are kept even when the model is confident. Written
    without boolean indexing so it never waits on the device.
    """
    with torch.no_grad():
        valid = label != ignore_index
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
