"""Optimizer parameter groups and the learning-rate schedule of the papers' toolbox (mmcv 1.x)."""
import math
import numbers

import torch

from ..errors import TransegError

CUSTOM_KEY_OPTIONS = ("lr_mult", "decay_mult")


def custom_keys_problem(custom_keys):
    """None when `custom_keys` has mmcv's shape {part of a parameter name: {lr_mult: x, decay_mult: y}}
    with finite multipliers >= 0; otherwise what is wrong with it, in one sentence."""
    shape = "{part of a parameter name: {lr_mult: N, decay_mult: N}}"
    if not isinstance(custom_keys, dict):
        return f"must be a mapping {shape}"
    for key, opts in custom_keys.items():
        if not isinstance(key, str) or not key:
            return f"key {key!r} must be a non-empty part of a parameter name, in {shape}"
        if not isinstance(opts, dict):
            shown = "null" if opts is None else repr(opts)
            return f"{key!r} maps to {shown}; it must map to {{lr_mult: N, decay_mult: N}}"
        unknown = sorted(str(o) for o in opts if o not in CUSTOM_KEY_OPTIONS)
        if unknown:
            return f"{key!r} has unknown option(s) {unknown}; known: {', '.join(CUSTOM_KEY_OPTIONS)}"
        for name, value in opts.items():
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
                return f"{key}.{name} must be a number >= 0, got {value!r}"
    return None


def is_encoder(model, name):
    """Whether parameter `name` is one the pre-trained encoder brings: under `backbone.`, except what the
    backbone adds for the task (`backbone.new_parameters`, EoMT's queries)."""
    new = getattr(getattr(model, "backbone", None), "new_parameters", ())
    return name.startswith("backbone.") and not any(name.startswith(f"backbone.{n}") for n in new)


def param_groups(model, lr, weight_decay, custom_keys=None, split_encoder=False):
    """Parameter groups with mmcv's `paramwise_cfg.custom_keys` semantics.

    A key matches when it is a substring of the full parameter name; keys are tried longest first
    (ties alphabetically) and the first match alone decides lr_mult / decay_mult. For SegFormer,
    {"head": lr x10, "norm": decay 0, "pos_block": decay 0} gives: every decode-head parameter
    (BN included) lr x10 with weight decay, backbone norms no decay, everything else the defaults.
    `split_encoder`: the encoder's parameters (`is_encoder`) get groups of their own, marked
    `"encoder": True`, for a schedule that treats them apart (two_stage_factor).
    """
    custom_keys = custom_keys or {}
    problem = custom_keys_problem(custom_keys)
    if problem:
        raise TransegError(f"custom_keys: {problem}")
    order = sorted(sorted(custom_keys), key=len, reverse=True)
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = next((k for k in order if k in name), None)
        opts = custom_keys.get(key, {})
        lr_mult, decay_mult = opts.get("lr_mult", 1.0), opts.get("decay_mult", 1.0)
        encoder = split_encoder and is_encoder(model, name)
        group = groups.setdefault((lr_mult, decay_mult, encoder), {"params": [], "names": [], "lr": lr * lr_mult,
                                                                   "weight_decay": weight_decay * decay_mult})
        if split_encoder:
            group["encoder"] = encoder
        group["params"].append(p)
        group["names"].append(name)
    return list(groups.values())


def build_optimizer(model, name="adamw", lr=6e-5, weight_decay=0.01, betas=(0.9, 0.999), momentum=0.9,
                    custom_keys=None, nesterov=False, split_encoder=False):
    groups = param_groups(model, lr, weight_decay, custom_keys, split_encoder)
    for g in groups:
        g.pop("names")
    # The fused kernels exist for CPU and CUDA tensors in torch >= 2.4 and take one launch for all params.
    fused = {"fused": True} if all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"]) else {}
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay, **fused)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, **fused)
    raise TransegError(f"optimizer={name}: must be one of adamw, sgd")


def poly_warmup_factor(it, max_iters, power=1.0, min_lr_ratio=0.0, warmup_iters=0, warmup_ratio=1e-6):
    """lr(it) / base_lr: mmcv's poly policy with 'linear' warm-up applied multiplicatively on the
    poly value: poly = (1 - it/max)^power (towards min_lr), then for it < warmup_iters it is scaled
    by 1 - (1 - it/warmup_iters)(1 - warmup_ratio)."""
    poly = (1 - min_lr_ratio) * (1 - it / max_iters) ** power + min_lr_ratio
    if it < warmup_iters:
        poly *= 1 - (1 - it / warmup_iters) * (1 - warmup_ratio)
    return poly


def two_stage_factor(it, max_iters, power, min_lr_ratio, stages, encoder):
    """lr(it) / base_lr in EoMT's two-stage warm-up (tue-mps/eomt training/two_stage_warmup_poly_schedule.py):
    with stages (W1, W2), the head and queries rise linearly from 0 over W1 iterations, then decay poly over
    the max_iters - W1 left; the pre-trained encoder holds 0 for W1, rises over W2, then decays poly over
    max_iters - W1 - W2. The poly part goes to min_lr_ratio as poly_warmup_factor's does (EoMT: 0)."""
    w1, w2 = stages
    start = w1 + w2 if encoder else w1
    if it < start:
        return 0.0 if it < w1 and encoder else (it - (w1 if encoder else 0)) / (w2 if encoder else w1)
    left = max(1, max_iters - start)
    return (1 - min_lr_ratio) * (1 - min(it - start, left) / left) ** power + min_lr_ratio


def build_scheduler(optimizer, max_iters, power=1.0, min_lr_ratio=0.0, warmup_iters=0, warmup_ratio=1e-6,
                    two_stage_warmup=None):
    if two_stage_warmup:  # one lambda per group, by its "encoder" mark (build_optimizer's split_encoder)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, [
            (lambda it, enc=g["encoder"]: two_stage_factor(min(it, max_iters), max_iters, power, min_lr_ratio,
                                                             two_stage_warmup, enc)) for g in optimizer.param_groups])
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: poly_warmup_factor(
        min(it, max_iters), max_iters, power, min_lr_ratio, warmup_iters, warmup_ratio))


def sync_lr(optimizer, scheduler):
    """Set every group's lr to what `scheduler` gives at the iteration it is at. After a training state
    saved under another schedule length (`--resume` with new `iters`) is loaded, the groups still hold
    the old schedule's lr for that iteration; this lays the new schedule over it from there on, so that
    the very next step already uses the new length. Returns the lr of the first group."""
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = list(lrs)  # what get_last_lr() reports (no public setter)
    return lrs[0]
