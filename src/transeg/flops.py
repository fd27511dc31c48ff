"""Parameters and GFLOPs in the papers' convention, counted on the meta device (no memory, no time).

The papers' "GFLOPs" are GMACs: one multiply-add counts once. SegFormer and EDAFormer counted them
with mmcv's `get_model_complexity_info` plus the attention matmuls added by hand (`sra_flops`);
mmcv's module hooks count conv MACs *and* conv bias adds, Linear MACs (no bias), one op per ReLU
output, per pooling input and per nn.Upsample output, BatchNorm2d (2 per input element) but not
SyncBatchNorm, and nothing for LayerNorm, GELU, softmax or F.interpolate.

Here every matmul-like aten op (convolution, mm, addmm, bmm, and the attention products, which
scaled_dot_product_attention decomposes into on the meta device) is counted by torch's
FlopCounterMode (which reports 2 FLOPs per MAC, so it is halved), and the few element-wise extras
mmcv counts are added by module hooks. `count_bn=False` matches models whose authors used SyncBN
(the mmcv counter skipped it).
"""
import contextlib

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from .layers import KeyValuePool
from .layers.fusion import unfused

# KeyValuePool is the authors' nn.AvgPool2d in EDAFormer (counted even at kernel 1, as mmcv does).
_POOLS = (nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, KeyValuePool)
_ACTS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU)


def count_params(model, trainable_only=False):
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


class _FvcoreExtras(TorchDispatchMode):
    """The element-wise ops fvcore counts beside matmuls: LayerNorm 5 per input element, bilinear
    upsampling 4 per output element."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name == "native_layer_norm":
            self.total += args[0].numel() * 5
        elif name.startswith("upsample_bilinear2d"):
            self.total += out.numel() * 4
        return out


def count_gmacs(model, input_size, count_bn=False, batch=1, convention="mmcv"):
    """GMACs of one forward pass at `input_size` (H, W), in the papers' mmcv convention.

    convention="fvcore" is SegViT's (fvcore's counter on mmseg's `forward_dummy`): matmul and conv
    MACs without biases, LayerNorm 5 and bilinear upsampling 4 per element, plus the final resize of
    the scores to the input size that mmseg always runs.

    The model may live on the meta device (preferred: no weights needed); inputs are made on the
    model's device. Returns a dict: total, matmul (conv/linear/attention MACs), extra (elementwise
    ops mmcv counts), per_op (aten op -> GMACs).
    """
    param = next(model.parameters())
    x = torch.empty(batch, 3, *input_size, device=param.device, dtype=param.dtype)
    extra = [0]

    def hook(module, inputs, output):
        if isinstance(module, nn.Conv2d) and module.bias is not None:
            extra[0] += output.numel()
        elif isinstance(module, _ACTS) or isinstance(module, nn.Upsample):
            extra[0] += output.numel()
        elif isinstance(module, _POOLS):
            extra[0] += inputs[0].numel()
        elif count_bn and type(module) is nn.BatchNorm2d:
            extra[0] += inputs[0].numel() * (2 if module.affine else 1)

    if convention not in ("mmcv", "fvcore"):
        raise ValueError(f"unknown FLOP convention {convention!r} (mmcv, fvcore)")
    fvcore = convention == "fvcore"
    handles = [] if fvcore else [m.register_forward_hook(hook) for m in model.modules()
                                 if isinstance(m, (nn.Conv2d, nn.Upsample, nn.BatchNorm2d) + _ACTS + _POOLS)]
    was_training = model.training
    model.eval()
    # Counting needs no gradients; parameters that require them make FlopCounterMode's module tracker
    # hook views of them (e.g. a query embedding expanded over the batch) and fail.
    grad_flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    counter = FlopCounterMode(display=False)
    extras = _FvcoreExtras()
    try:
        # the published computation, not transeg's algebraically fused one (layers/fusion.py)
        with counter, torch.no_grad(), unfused(model), (extras if fvcore else contextlib.nullcontext()):
            out = model(x)
            if fvcore:
                extra[0] += 4 * out.shape[0] * out.shape[1] * input_size[0] * input_size[1]
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        for p, flag in zip(model.parameters(), grad_flags):
            p.requires_grad_(flag)
    extra[0] += extras.total
    per_op = {str(k).removeprefix("aten."): v / 2e9 / batch for k, v in counter.get_flop_counts()["Global"].items()}
    matmul = counter.get_total_flops() / 2e9 / batch
    return {"total": matmul + extra[0] / 1e9 / batch, "matmul": matmul, "extra": extra[0] / 1e9 / batch, "per_op": per_op}


def meta_model(name, num_classes=150, **overrides):
    """Build a registered variant on the meta device: its structure without allocating weights."""
    from .registry import create_model

    with torch.device("meta"):
        return create_model(name, num_classes=num_classes, **overrides)


def variant_classes(name):
    """The class count a variant is counted and benchmarked at: the paper's `official_classes`, else that of its
    first GFLOPs entry ("HxW@K"), else 150 (ADE20K's). A Cityscapes-only variant: 19."""
    from .registry import get_variant

    paper = get_variant(name).paper
    first = next(iter(paper.gflops), "512x512@150")
    return paper.official_classes or int(first.split("@")[1])


def variant_table(family=None, count_flops=True, progress=False):
    """`transeg models`: one row per registered variant (of `family`), the paper's numbers beside
    the measured ones: name, params (M) and `classes`, the class count they are counted at (the paper's
    `official_classes`, else that of the first GFLOPs entry, else 150: a Cityscapes-only variant at 19), the
    paper's params, the input size and class count GFLOPs are counted at, measured and reported GFLOPs (each
    paper's convention), the paper's single-scale mIoU per dataset. Counted on the meta device: no weights
    are allocated."""
    from tqdm import tqdm

    from .registry import VARIANTS, families

    if family is not None and family not in families():
        import difflib

        from .errors import TransegError

        near = difflib.get_close_matches(family, families(), n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise TransegError(f"unknown family {family!r}; {hint}families: {', '.join(families())}")
    names = [n for n, v in VARIANTS.items() if family in (None, v.family)]
    rows = []
    for name in tqdm(names, desc="measuring on the meta device", leave=False, disable=not progress):
        v = VARIANTS[name]
        size_key, paper_gflops = next(iter((v.paper.gflops or {"512x512@150": None}).items()))
        hw, k = size_key.split("@")
        classes = variant_classes(name)
        model = meta_model(name, classes)
        measured = None
        if count_flops:
            size = tuple(int(s) for s in hw.split("x"))
            counted = model if int(k) == classes else meta_model(name, int(k))
            measured = count_gmacs(counted, size, convention=v.paper.gflops_convention)["total"]
        rows.append(dict(model=name, params_m=count_params(model) / 1e6, classes=classes,
                         paper_params_m=v.paper.params_m,
                         gflops_at=size_key, gflops=measured, paper_gflops=paper_gflops, miou=v.paper.miou))
    return rows


def image_gmacs(model, image_size, protocol, convention="mmcv", cache=None):
    """Multiply-adds (G) to segment one image of `image_size` (h, w) under `protocol`: every forward
    pass its resize, windows, scales and flips make, counted on `model` (a meta-device twin, see
    `meta_model`, with the ISR setting of interest). `cache`: a dict reused across calls (keyed by
    the ISR setting and input size)."""
    from .inference import forward_sizes

    cache = {} if cache is None else cache
    total = 0.0
    for size in forward_sizes(image_size, protocol):
        key = (tuple(model.isr.items()), size, convention)
        if key not in cache:
            cache[key] = count_gmacs(model, size, convention=convention)["total"]
        total += cache[key]
    return total
