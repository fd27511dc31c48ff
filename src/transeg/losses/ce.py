"""Pixel-wise cross-entropy: on logits at the label's size (`cross_entropy`), on head-stride logits
upsampled to the label's size without ever holding them at full size (`upsampled_cross_entropy`,
computed by `_UpsampledCrossEntropy`), and with mmseg's online hard example mining (`ohem_weights`,
`ohem_cross_entropy`)."""
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
    passes); this works in blocks of ~2 MB. Computed in fp32 for fp32 and lower-precision logits, like
    `cross_entropy(logits.float(), ...)`, and in fp64 for fp64 ones. reduction as in `cross_entropy`; "valid" with no labelled
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
        logits = logits[..., :size[0], :size[1]]
        return cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), label, ignore_index, reduction)
    return _UpsampledCrossEntropy.apply(logits, label.long(), padded, ignore_index, reduction)


class _UpsampledCrossEntropy(torch.autograd.Function):
    """See `upsampled_cross_entropy`. Works on channels-last slices (H, W, C), so the softmax over
    classes runs along contiguous memory and a block of rows is one (rows, W·C) matrix;
    the Python loop is over images and row blocks only (a few hundred iterations per batch)."""

    BLOCK_BYTES = 1 << 21  # about 2 MB of fp32 logits per block of rows: a core's L2

    @staticmethod
    def _plan(padded_h, h, height, width, c, dtype, device):
        """The H-resampling matrix (height, h) and the row blocks [(r0, r1, lo, hi)]: output rows
        r0..r1-1 read only input rows lo..hi-1 (two taps per row, the taps never go backwards)."""
        from ..layers.fusion import bilinear_matrix

        a = bilinear_matrix(padded_h, h, dtype, device)[:height]
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
    def _exact(logits):
        """The logits in the precision the loss is computed in: float32, or float64 for float64 logits."""
        return logits.detach().to(torch.promote_types(logits.dtype, torch.float32))

    @staticmethod
    def forward(ctx, logits, label, padded, ignore_index, reduction):
        with torch.autocast(logits.device.type, enabled=False), torch.no_grad():
            x = _UpsampledCrossEntropy._exact(logits)
            n, c, h, w = x.shape
            height, width = label.shape[-2:]
            a, blocks = _UpsampledCrossEntropy._plan(padded[0], h, height, width, c, x.dtype, x.device)
            total = x.new_zeros(())
            buf = _UpsampledCrossEntropy._buffer(x, padded[1])
            for b in range(n):
                t = _UpsampledCrossEntropy._widen(x[b:b + 1], padded[1], width, buf)
                for r0, r1, lo, hi in blocks:
                    up = torch.mm(a[r0:r1, lo:hi], t[lo:hi]).view(-1, c)
                    total += F.cross_entropy(up, label[b, r0:r1].reshape(-1), ignore_index=ignore_index,
                                             reduction="sum")
            valid = label != ignore_index
            # new_full, not new_tensor: a tensor made from host data is a copy to the device, which waits for it
            denom = valid.sum().clamp(min=1).to(x.dtype) if reduction == "valid" else x.new_full((), float(valid.numel()))
        ctx.save_for_backward(logits, label, valid, denom)
        ctx.padded, ctx.plan = padded, (a, blocks)
        return total / denom

    @staticmethod
    def backward(ctx, grad):
        logits, label, valid, denom = ctx.saved_tensors
        with torch.autocast(logits.device.type, enabled=False), torch.no_grad():
            x = _UpsampledCrossEntropy._exact(logits)
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
