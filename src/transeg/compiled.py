"""The compiled inference path: a Segmentor's network (backbone then head) through `torch.compile`, with input
sizes bucketed where that is sound, so that a folder of mixed sizes compiles a few graphs, not one per image.

On a GPU at batch 1 eager inference is bound by kernel launches, not arithmetic: SegFormer-B0 at 512x512 runs
4.9 ms eager and 1.25 ms compiled with CUDA graphs on an H200 (BENCHMARKS.md "On a GPU"). A compiled graph holds
for one input shape, and compiling one costs 17-55 s there (about 20 s on two CPU cores), so:

- **Size buckets** (backbones that take any size as it is: the MiT of SegFormer and EDAFormer, SeMask-FPN's
  Swin). An input's height and width are each rounded up to the next rung of a ladder with four rungs per octave
  (`bucket_side`: ..., 512, 640, 768, 896, 1024, 1280, ...; multiples of 32, the deepest stride), and the input is
  padded there at the bottom and right with zeros, which in the model's normalisation is its mean colour (as tiled
  inference pads its edge windows). The head's output is cropped back to the size the eager network gives for the
  unpadded input, so everything after it (upsampling, cropping) is unchanged. The batch is padded to a power of
  two the same way.
  An input already on a rung runs exactly as eager. A padded one is a slightly different input: attention sees the
  padded tokens, so labels may change anywhere in the image, not only near the padding (on the quick start's
  SegFormer-B0, 0.6-1.3% of them; `benchmarks/bucket_agreement.py`).
- **Exact sizes** for the others: a backbone that pads its input itself (`pad_multiple` > 1: the plain ViT resizes
  its position embeddings to the padded grid, so a bucket's padding would reach every token), or a head whose
  output does not follow the input's size (SegViT makes its masks at its training crop; found by two small eager
  runs when the path is made). Their protocols run sliding windows of one size, which is one graph anyway.
- **A bounded cache.** One graph per (size, batch bucket), at most `MAX_GRAPHS`, for the precision and ISR setting
  the model had when compiled; an input beyond them, or a call under another ISR setting, runs eager, said once.
- **Compile time said once per graph**, through the `log` given (the CLI prints it; the library is quiet). A
  compiler that fails (no C compiler on a CPU, an operator it cannot build) is said once and the model runs eager:
  a service started with the default compiled path stays up. Other errors (out of memory, a bad input) are raised.

What compiles, and how, is the device's choice (`device.Paths.compile_options`): inductor with weight freezing on
both, with CUDA graphs on a GPU, whose outputs the next replay overwrites: they are copied out before they are
returned. Weights must not change after: `Segmentor.train()` drops the compiled path.
"""
import math
import time

import torch
import torch.nn.functional as F

from .device import paths_for
from .layers.shape import round_up

# The most graphs one model keeps: a service at a fixed protocol needs one per batch bucket it serves, a folder of
# phone photos under keep-ratio resizing about four.
MAX_GRAPHS = 8
RUNGS_PER_OCTAVE = 4
UNIT = 32  # the deepest stride of the pyramid backbones: a bucket side is a multiple of it
# What a compiler failing to build a model raises (a real error in the model, or out of memory, is not one of them)
COMPILER_ERRORS = (torch._dynamo.exc.BackendCompilerFailed, torch._dynamo.exc.InternalTorchDynamoError,
                   torch._inductor.exc.InductorError, torch._inductor.exc.CppCompileError,
                   torch._inductor.exc.CUDACompileError)


def bucket_side(side):
    """The ladder rung at or above `side`: a multiple of 32 and of the largest power of two at most a quarter of
    the side, so padding adds less than a quarter of a side of 128 or more, and less than 32 below."""
    step = 2 ** max(0, math.floor(math.log2(max(side, 1))) - int(math.log2(RUNGS_PER_OCTAVE)))
    return round_up(side, max(UNIT, step))


def bucket_of(size):
    """The bucket (height, width) an input of `size` runs at."""
    return bucket_side(size[0]), bucket_side(size[1])


def batch_bucket(n):
    return 1 << max(0, n - 1).bit_length()


def _crop(out, n, size=None, copy=False):
    """The head's output for the first `n` inputs, its maps cut to `size` (h, w; None: as they are), copied out of
    the graph's memory where `copy`: a tensor [N,C,h,w], or a named tuple / list of them (a mask prediction: its
    mask logits are maps, its class logits [N,Q,K+1] only lose the batch padding)."""
    if isinstance(out, torch.Tensor):
        out = out[:n]
        out = out[..., :size[0], :size[1]] if out.dim() == 4 and size is not None else out
        return out.clone() if copy else out
    items = [_crop(o, n, size, copy) for o in out]
    return type(out)._make(items) if hasattr(out, "_fields") else type(out)(items)


def _map_size(out):
    """The (h, w) of the first map [N,C,h,w] in a head's output."""
    if isinstance(out, torch.Tensor):
        return tuple(out.shape[-2:]) if out.dim() == 4 else None
    return next((size for size in map(_map_size, out) if size is not None), None)


class CompiledNetwork:
    """`network(x)` of a model, compiled per bucket: call it with a normalised batch [N,3,H,W] and get what the
    eager network returns for it. network: the eager callable (backbone then head); pad_multiple: the backbone's;
    stride: the head's output stride; device: the weights'; state: a callable giving what else the graphs are
    specific to (the weights' dtype, the ISR setting): calls in another state than at construction run eager (a
    service's per-request ISR setting must not stall it on a compile); log: called with one line per graph."""

    def __init__(self, network, pad_multiple, stride, device, state=lambda: None, log=None, max_graphs=MAX_GRAPHS):
        self.network, self.pad_multiple, self.stride, self.state, self.log = network, pad_multiple, stride, state, log
        self.max_graphs, self.home = max_graphs, state()
        options = dict(paths_for(device).compile_options)
        self.copy = bool(options.get("triton.cudagraphs"))
        self.compiled = torch.compile(network, dynamic=False, options=options)
        self.graphs = {}  # key -> seconds its compile took
        self.exact = pad_multiple > 1 or not self._follows_input(device)  # graphs per exact size, no padding
        self.refused = self.elsewhere = False  # past max_graphs / a call in another state: said once
        self.failed = None  # the compiler's error, once it has failed: the model then runs eager
        # Dynamo keeps its graphs per function, shared by every model of the process (8 by default, then eager):
        # room for this cache's graphs in several models (this cache is the bound per model)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8 * max_graphs)

    def output_size(self, size):
        """The head's output size for an input of `size` in eager: its padded size over the stride (rounded up,
        as strided convolutions round)."""
        return tuple(-(-round_up(s, self.pad_multiple) // self.stride) for s in size)

    def _follows_input(self, device):
        """Whether the head's maps follow the input's size as `output_size` says, from two small eager runs."""
        with torch.no_grad():
            return all(_map_size(self.network(torch.zeros(1, 3, h, w, device=device))) == self.output_size((h, w))
                       for h, w in ((2 * UNIT, 2 * UNIT), (4 * UNIT, 2 * UNIT)))

    def key(self, x):
        size = tuple(x.shape[-2:]) if self.exact else bucket_of(x.shape[-2:])
        return size, batch_bucket(x.shape[0])

    def __call__(self, x):
        if self.failed is not None or self._elsewhere():
            return self.network(x)
        key = self.key(x)
        if key not in self.graphs and len(self.graphs) >= self.max_graphs:
            if not self.refused and self.log:
                self.log(f"compiled inference keeps at most {self.max_graphs} graphs; inputs of new sizes run eager")
            self.refused = True
            return self.network(x)
        (bh, bw), batch = key
        n, _, h, w = x.shape
        padded = F.pad(x, (0, bw - w, 0, bh - h, 0, 0, 0, batch - n)) if (bh, bw, batch) != (h, w, n) else x
        crop = None if self.exact else self.output_size((h, w))
        if key in self.graphs:
            return _crop(self.compiled(padded), n, crop, self.copy)
        start = time.perf_counter()
        try:
            out = _crop(self.compiled(padded), n, crop, self.copy)
        except COMPILER_ERRORS as e:
            self.failed = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
            if self.log:
                self.log(f"compiling failed ({self.failed}); running eager")
            return self.network(x)
        self.graphs[key] = time.perf_counter() - start
        if self.log:
            self.log(f"compiled for {bh}x{bw}, batch {batch} in {self.graphs[key]:.1f} s (once per "
                     f"{'input size' if self.exact else 'size bucket'}; at most {self.max_graphs} kept)")
        return out

    def _elsewhere(self):
        """A call in another precision or ISR setting than the compiled one (said once)."""
        if self.state() == self.home:
            return False
        if not self.elsewhere and self.log:
            self.log("another precision or ISR setting than the compiled one runs eager")
        self.elsewhere = True
        return True
