"""Pixel losses beside cross-entropy, for imbalanced data: class-weighted CE, Dice, Focal and
Lovász-softmax on logits at the label's size [N, K, H, W] and labels [N, H, W] (ignore_index
pixels take no part), and the `loss:` setting that combines them (`check_terms`, `pixel_loss`).

Each follows a published definition, named in its docstring (tests/test_losses.py writes each
reference out and compares):
- weighted CE: mmseg's CrossEntropyLoss(class_weight=...): per-pixel CE times the weight of the
  pixel's class, then the mean over all pixels (reduction "all", what the papers trained with) or
  over labelled pixels ("valid"); not PyTorch's weighted mean, which divides by the sum of weights;
- Dice: segmentation_models_pytorch's DiceLoss(mode="multiclass"): soft Dice per class over the
  batch's labelled pixels, 1 - score, classes absent from the labels counted as 0, then the mean;
- Focal: Lin et al. 2017 (eq. 5) in its multi-class softmax form, -(1 - p_t)^gamma log p_t, with
  per-class alpha = the class weights when given; gamma = 0 is cross-entropy;
- Lovász-softmax: Berman et al. 2018, the authors' `lovasz_softmax(classes="present",
  per_image=False)`: the Lovász extension of the Jaccard loss over the batch's labelled pixels,
  averaged over the classes present in the labels. On one-hot probabilities it is 1 - IoU.
`class_weight: auto` comes from the data: `transeg.data.class_weights`.
"""
import math

import torch
import torch.nn.functional as F

from ..errors import TransegError


def _real(x):
    """fp32 at least (half-precision logits are computed in fp32; fp64 stays fp64 for exact tests)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _reduce(per_pixel, valid, reduction):
    if reduction == "all":
        return per_pixel.sum() / per_pixel.numel()
    if reduction == "valid":
        return per_pixel.sum() / valid.sum().clamp_min(1)
    raise ValueError(f"loss reduction must be 'all' or 'valid', got {reduction!r}")


def weighted_cross_entropy(logits, label, class_weight, ignore_index=255, reduction="all"):
    """mmseg's class-weighted CE (see the module docstring): sum(w[y] * CE) / (all or labelled pixels)."""
    logits = _real(logits)
    ce = F.cross_entropy(logits, label, weight=class_weight.to(logits.device, logits.dtype),
                         ignore_index=ignore_index, reduction="none")
    return _reduce(ce, label != ignore_index, reduction)


def _probabilities_and_onehot(logits, label, ignore_index):
    """[K, P] softmax probabilities and one-hot labels of the labelled pixels only."""
    k = logits.shape[1]
    valid = label != ignore_index
    prob = _real(logits).softmax(1).movedim(1, -1)[valid].T  # [K, P]
    onehot = F.one_hot(label[valid].long(), k).T.to(prob.dtype)  # [K, P]
    return prob, onehot


def dice_loss(logits, label, ignore_index=255, smooth=0.0, eps=1e-7):
    """smp's multiclass soft Dice (see the module docstring; eps bounds the denominator, as smp's
    soft_dice_score does); a scalar."""
    prob, onehot = _probabilities_and_onehot(logits, label, ignore_index)
    intersection = (prob * onehot).sum(1)
    cardinality = (prob + onehot).sum(1)
    score = (2 * intersection + smooth) / (cardinality + smooth).clamp_min(eps)
    present = (onehot.sum(1) > 0).to(score.dtype)
    return ((1 - score) * present).mean()


def focal_loss(logits, label, gamma=2.0, class_weight=None, ignore_index=255, reduction="all"):
    """Softmax focal loss (Lin et al. 2017, multi-class): -alpha[y] (1 - p_y)^gamma log p_y per pixel."""
    logp = F.log_softmax(_real(logits), 1)
    valid = label != ignore_index
    target = torch.where(valid, label, torch.zeros_like(label)).long()
    logp_t = logp.gather(1, target[:, None])[:, 0]
    loss = -((1 - logp_t.exp()) ** gamma) * logp_t
    if class_weight is not None:
        loss = loss * class_weight.to(loss.device, loss.dtype)[target]
    return _reduce(loss * valid, valid, reduction)


def lovasz_softmax(logits, label, ignore_index=255):
    """Lovász-softmax (Berman et al. 2018), classes present, over the whole batch; a scalar."""
    prob, onehot = _probabilities_and_onehot(logits, label, ignore_index)
    present = onehot.sum(1) > 0
    if not present.any():
        return prob.sum() * 0.0  # no labelled pixel: 0, with a gradient path
    losses = []
    for c in present.nonzero()[:, 0].tolist():
        fg = onehot[c]
        errors = (fg - prob[c]).abs()
        order = errors.argsort(descending=True)
        losses.append(errors[order] @ _lovasz_gradient(fg[order]))
    return torch.stack(losses).mean()


def _lovasz_gradient(fg_sorted):
    """The Jaccard loss's Lovász extension gradient for foreground indicators sorted by error."""
    gts = fg_sorted.sum()
    intersection = gts - fg_sorted.cumsum(0)
    union = gts + (1 - fg_sorted).cumsum(0)
    jaccard = 1 - intersection / union
    return torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])


TERMS = {"ce": "cross-entropy (class_weight: a list of K weights or auto)",
         "dice": "soft Dice (smp's multiclass DiceLoss)",
         "focal": "softmax focal loss (gamma, default 2; class_weight as alpha)",
         "lovasz": "Lovász-softmax (Berman et al. 2018)"}
_OPTIONS = {"ce": {"class_weight"}, "dice": {"smooth"}, "focal": {"gamma", "class_weight"}, "lovasz": set()}


def check_terms(terms, num_classes=None, where="loss"):
    """Validate a `loss:` list, e.g. [{type: ce, weight: 1.0, class_weight: auto}, {type: dice, weight: 0.5}];
    one line naming the entry and what is allowed. Returns the list normalised (weight given)."""
    if not isinstance(terms, (list, tuple)) or not terms:
        raise TransegError(f"{where}: a list of entries such as [{{type: ce}}, {{type: dice, weight: 0.5}}], "
                           f"got {terms!r}")
    out = []
    for i, term in enumerate(terms):
        at = f"{where}[{i}]"
        if not isinstance(term, dict) or term.get("type") not in TERMS:
            raise TransegError(f"{at}: type must be one of {', '.join(TERMS)}, got {term!r}")
        kind = term["type"]
        unknown = set(term) - {"type", "weight"} - _OPTIONS[kind]
        if unknown:
            raise TransegError(f"{at}: {kind} takes {', '.join(sorted(_OPTIONS[kind] | {'weight'}))}; "
                               f"not {', '.join(sorted(unknown))}")
        weight = term.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
            raise TransegError(f"{at}: weight must be a number > 0, got {weight!r}")
        cw = term.get("class_weight")
        if cw is not None and cw != "auto":
            if not isinstance(cw, (list, tuple)) or not all(isinstance(w, (int, float)) and not isinstance(w, bool)
                                                            and math.isfinite(w) and w >= 0 for w in cw):
                raise TransegError(f"{at}: class_weight must be auto or a list of numbers >= 0, got {cw!r}")
            if num_classes is not None and len(cw) != num_classes:
                raise TransegError(f"{at}: class_weight has {len(cw)} weights for {num_classes} classes")
        gamma = term.get("gamma", 2.0)
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma) or gamma < 0:
            raise TransegError(f"{at}: gamma must be a number >= 0, got {gamma!r}")
        out.append({**term, "weight": float(weight)})
    return out


def is_plain_ce(terms):
    """The default loss (one unweighted CE): the row-blocked path computes it without full-size logits."""
    return terms is None or (len(terms) == 1 and terms[0]["type"] == "ce" and terms[0].get("class_weight") is None
                             and terms[0].get("weight", 1.0) == 1.0)


def pixel_loss(terms, logits, label, ignore_index=255, reduction="all"):
    """The weighted sum of `terms` (checked by `check_terms`, class_weight resolved to numbers) on logits
    at the label's size. Returns {"loss": total, "loss_<type>": each term before its weight}."""
    out, total = {}, 0.0
    for term in terms:
        kind, cw = term["type"], term.get("class_weight")
        cw = None if cw is None else torch.as_tensor(cw, dtype=torch.float32)
        if kind == "ce":
            value = weighted_cross_entropy(logits, label, torch.ones(logits.shape[1]) if cw is None else cw,
                                           ignore_index, reduction)
        elif kind == "dice":
            value = dice_loss(logits, label, ignore_index, smooth=term.get("smooth", 0.0))
        elif kind == "focal":
            value = focal_loss(logits, label, term.get("gamma", 2.0), cw, ignore_index, reduction)
        else:
            value = lovasz_softmax(logits, label, ignore_index)
        out[f"loss_{kind}"] = out.get(f"loss_{kind}", 0.0) + value
        total = total + term.get("weight", 1.0) * value
    out["loss"] = total
    return out
