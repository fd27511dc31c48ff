"""The compiled inference path: a Segmentor's network (backbone then head) through `torch.compile`, with input
sizes bucketed so that a folder of mixed sizes compiles a few graphs, not one per image.

On a GPU at batch 1 eager inference is bound by kernel launches, not arithmetic: SegFormer-B0 at 512x512 runs
4.9 ms eager and 1.25 ms compiled with CUDA graphs on an H200 (BENCHMARKS.md "On a GPU"). A compiled graph holds
for one input shape, and compiling one costs 17-55 s there (about 20 s on two CPU cores), so:

- **Size buckets.** An input's height and width are each rounded up to the next rung of a ladder with four rungs
  per octave (`bucket_side`: 512, 640, 768, 896, 1024, 1280, ...; every rung a multiple of the network's unit, 32
  and the backbone's padding multiple), and the input is padded there at the bottom and right with zeros, which
  in the model's normalisation is its mean colour (as tiled inference pads its edge windows). The head's output is
  cropped back to the size the eager network gives for the unpadded input, so everything after it (upsampling,
  cropping, mask scores) is unchanged. The batch is padded to a power of two the same way. An input already on a
  rung runs exactly as eager; a padded one sees mean colour past its edge where eager sees the network's own
  zero padding, which the labels near that edge may notice (tests/test_compiled.py measures it).
- **A bounded cache.** One graph per (size bucket, batch bucket), at most `MAX_GRAPHS`, for the precision and ISR
  setting the model had when compiled; an input beyond them, or a call under another ISR setting, runs eager,
  said once. Each graph holds its own frozen copy of the weights (constant folding), so
  the cache's memory is at most MAX_GRAPHS x the weights.
- **Compile time said once per graph**, through the `log` given (the CLI prints it; the library is quiet). A
  compiler that fails (no C compiler on a CPU, an operator it cannot build) is said once, and the model runs
  eager: a service started with the default compiled path stays up.

What compiles, and how, is the device's choice (`device.Paths.compile_options`): inductor with weight freezing on
both, with CUDA graphs on a GPU. Weights must not change after: `Segmentor.train()` drops the compiled path.
"""
import math
import time

import torch
import torch.nn.functional as F

from .device import paths_for

# The most graphs one model keeps (Dynamo's own recompile limit per function is 8 as well): a service at a
# fixed protocol needs one or two, a folder of phone photos under keep-ratio resizing about four.
MAX_GRAPHS = 8
RUNGS_PER_OCTAVE = 4
UNIT = 32  # the deepest stride of the pyramid backbones: a bucket side is a multiple of it


def bucket_side(side, unit=UNIT):
    """The ladder rung at or above `side`: a multiple of `unit` and of a step of an eighth to a quarter of the
    side (the largest power of two at most side / RUNGS_PER_OCTAVE), so padding adds at most a quarter."""
    step = 2 ** max(0, math.floor(math.log2(max(side, 1))) - int(math.log2(RUNGS_PER_OCTAVE)))
    step = unit * max(1, round(step / unit))
    return -(-side // step) * step


def bucket_of(size, pad_multiple=1):
    """The bucket (height, width) an input of `size` runs at."""
    unit = math.lcm(UNIT, pad_multiple)
    return bucket_side(size[0], unit), bucket_side(size[1], unit)


def batch_bucket(n):
    return 1 << max(0, n - 1).bit_length()


def _crop(out, n, size=None):
    """The head's output for the first `n` inputs, its maps cut to `size` (h, w; None: as they are): a tensor
    [N,C,h,w], or a named tuple / list of them (a mask prediction: its mask logits are maps, its class logits
    [N,Q,K+1] only lose the batch padding)."""
    if isinstance(out, torch.Tensor):
        out = out[:n]
        return out[..., :size[0], :size[1]] if out.dim() == 4 and size is not None else out
    items = [_crop(o, n, size) for o in out]
    return type(out)._make(items) if hasattr(out, "_fields") else type(out)(items)


def _map_size(out):
    """The (h, w) of the first map [N,C,h,w] in a head's output."""
    if isinstance(out, torch.Tensor):
        return tuple(out.shape[-2:]) if out.dim() == 4 else None
    return next((size for size in map(_map_size, out) if size is not None), None)


class CompiledNetwork:
    """`network(x)` of a model, compiled per bucket: call it with a normalised batch [N,3,H,W] and get what the
    eager network returns for it. network: the eager callable (backbone then head); pad_multiple: the backbone's;
    stride: the head's output stride; state: a callable giving what else the graphs are specific to (the weights'
    dtype, the ISR setting): calls in another state than at construction run eager (a service's per-request ISR
    setting must not stall it on a compile); log: called with one line per compiled graph.

    A head whose output does not follow the input's size (SegViT's masks are made at its training crop whatever
    the input) cannot be cropped back from a bucket: found at the first compile, the path then keys graphs by the
    exact input size (`exact`), still at most `max_graphs` of them."""

    def __init__(self, network, pad_multiple, stride, device, state=lambda: None, log=None, max_graphs=MAX_GRAPHS):
        self.network, self.pad_multiple, self.stride, self.state, self.log = network, pad_multiple, stride, state, log
        self.max_graphs, self.home = max_graphs, state()
        self.compiled = torch.compile(network, dynamic=False, options=dict(paths_for(device).compile_options))
        self.graphs = {}  # key -> seconds its compile took
        self.exact = False  # graphs per exact input size (a head whose output size is fixed)
        self.refused = False  # past max_graphs: said once
        self.elsewhere = False  # a call in another state: said once
        self.failed = None  # the compiler's error, once it has failed: the model then runs eager
        # Dynamo keeps its graphs per function, shared by every model of the process (8 by default, then eager):
        # room for this cache's graphs in several models (this cache is the bound per model)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8 * max_graphs)

    def output_size(self, size):
        """The head's output size for an input of `size` in eager: its padded size over the stride (rounded up,
        as strided convolutions round)."""
        return tuple(-(-(-(-s // self.pad_multiple) * self.pad_multiple) // self.stride) for s in size)

    def key(self, x):
        size = tuple(x.shape[-2:]) if self.exact else bucket_of(x.shape[-2:], self.pad_multiple)
        return size, batch_bucket(x.shape[0])

    def __call__(self, x):
        if self.failed is not None:
            return self.network(x)
        if self.state() != self.home:
            if not self.elsewhere and self.log:
                self.log("another precision or ISR setting than the compiled one runs eager")
            self.elsewhere = True
            return self.network(x)
        key = self.key(x)
        if key not in self.graphs and len(self.graphs) >= self.max_graphs:
            if not self.refused and self.log:
                self.log(f"compiled inference keeps at most {self.max_graphs} graphs; inputs of new sizes run eager")
            self.refused = True
            return self.network(x)
        (bh, bw), batch = key[0], key[1]
        n, _, h, w = x.shape
        padded = F.pad(x, (0, bw - w, 0, bh - h, 0, 0, 0, batch - n)) if (bh, bw, batch) != (h, w, n) else x
        crop = None if self.exact else self.output_size((h, w))
        if key in self.graphs:
            return _crop(self.compiled(padded), n, crop)
        start = time.perf_counter()
        try:
            out = self.compiled(padded)
        except Exception as e:  # a compiler that cannot build this model (a missing C compiler, an unsupported op)
            self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            if self.log:
                self.log(f"compiling failed ({self.failed}); running eager")
            return self.network(x)
        self.graphs[key] = time.perf_counter() - start
        if self.log:
            self.log(f"compiled for {bh}x{bw}, batch {batch} in "
                     f"{self.graphs[key]:.1f} s (once per size bucket; at most {self.max_graphs} kept)")
        if not self.exact and _map_size(out) != self.output_size((bh, bw)):
            self.exact = True  # this head's maps do not follow the input: compile per exact size from now on
            del self.graphs[key]
            if self.log:
                self.log("this head's output does not follow the input's size: graphs are compiled per exact size")
            return self(x)
        return _crop(out, n, crop)
