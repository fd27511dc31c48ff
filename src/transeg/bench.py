"""Latency and throughput of a model: median of repeated timed runs after warm-up."""
import platform
import statistics
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward(model, size, batch=1, device="cpu", dtype=torch.float32, warmup=3, runs=10, channels_last=False):
    """Seconds per forward pass (list of `runs` timings) at input (batch, 3, *size).

    dtype bfloat16/float16 runs under autocast (for native low-precision weights, cast the model
    with optimize_for_inference and leave dtype float32)."""
    device = torch.device(device)
    model = model.to(device).eval()
    x = torch.randn(batch, 3, *size, device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    times = []
    with torch.inference_mode(), autocast:
        for i in range(warmup + runs):
            _sync(device)
            t = time.perf_counter()
            model(x)
            _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t)
    return times


def time_interleaved(fns, device="cpu", warmup=3, runs=10):
    """Seconds per call of each of `fns` ({name: callable}), called in turn within every round, so a
    clock or thermal drift hits all of them alike; peers compared this way share one run.
    Returns {name: [runs timings]}."""
    device = torch.device(device)
    times = {name: [] for name in fns}
    for i in range(warmup + runs):
        for name, fn in fns.items():
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t)
    return times


class _PeakTensorMemory(TorchDispatchMode):
    """Tracks the bytes of tensor storages created while active and still alive; `peak` is the most
    at any moment. A storage lives while any tensor viewing it does (weak references per tensor)."""

    def __init__(self):
        super().__init__()
        self.live, self.current, self.peak = {}, 0, 0

    def _release(self, ptr):
        entry = self.live.get(ptr)
        if entry is not None:
            entry[2] -= 1
            if entry[2] == 0:
                self.current -= self.live.pop(ptr)[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self.live and ptr not in self.known:
                self.live[ptr] = [storage.nbytes(), [], 0]  # bytes, weak refs (kept so they fire), count
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
            if ptr in self.live:
                entry = self.live[ptr]
                entry[1].append(weakref.ref(t, lambda _, ptr=ptr: self._release(ptr)))
                entry[2] += 1
        return out


def peak_tensor_memory(fn, *inputs):
    """Peak bytes of the tensors `fn()` allocates (activations and outputs; the weights and `inputs`
    already exist and are not counted), device-independent. On CUDA, torch.cuda.max_memory_allocated
    is the allocator's view of the same thing; this one also works on CPU, where RSS is no guide
    because freed memory stays in the process's heap."""
    mode = _PeakTensorMemory()
    mode.known = {t.untyped_storage().data_ptr() for t in inputs}
    with mode:
        out = fn()
    del out
    return mode.peak


def environment(device="cpu"):
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
    return {"device": f"{device.type} ({name})", "threads": torch.get_num_threads(), "torch": torch.__version__}


def keep_freed_memory():
    """Have glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

    By default glibc serves every allocation above 32 MB (and smaller ones once its heap has been
    trimmed) with fresh pages from the kernel, and each fresh 4 kB page faults on first touch. Large
    activations are allocated and freed on every forward/backward, so they pay this every time: on
    the 2-core CI machine writing a fresh 40 MB tensor costs 12–19 ms against 1–3 ms for reused
    memory (384,000 page faults for 40 such tensors, against none). PyTorch's CPU tuning guide
    answers this by preloading jemalloc or tcmalloc; this gets the same effect from the allocator
    already loaded (no mmap for large blocks, no trimming below 2 GB free). The process then keeps
    its peak memory until it exits. The CLI calls this for train/eval/predict/bench; set
    TRANSEG_MALLOC=system to keep glibc's defaults. Returns True when applied (Linux, glibc)."""
    import ctypes
    import os
    import sys

    if os.environ.get("TRANSEG_MALLOC", "").lower() == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, ...)
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # malloc.h; mallopt returns 1 on success
    return libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1


def summarize(times):
    return {"median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3, "runs": len(times)}


def hf_segformer_peer(name="segformer-b0", num_classes=150, seed=0):
    """(transeg model, Hugging Face SegformerForSemanticSegmentation) with the same random weights, both
    in eval mode, for timing against HF in one process. HF's block and stage LayerNorms get the authors'
    eps 1e-6 (HF builds all with 1e-5) so the two compute the same function and the logits compare.
    Needs `transformers` (pip install transformers); any MiT variant, B0..B5."""
    from .errors import TransegError
    from .registry import create_model, get_variant

    try:
        import transformers
    except ImportError:
        raise TransegError("comparing with Hugging Face needs the transformers package: pip install transformers") from None
    variant = get_variant(name)
    if variant.family != "segformer":
        raise TransegError(f"{name}: --compare hf exists for SegFormer (B0..B5) only; HF has no {variant.family}")
    args = variant.kwargs
    config = transformers.SegformerConfig(
        num_labels=num_classes, hidden_sizes=list(args["embed_dims"]), depths=list(args["depths"]),
        decoder_hidden_size=args["decoder_dim"], num_attention_heads=list(args.get("num_heads", (1, 2, 5, 8))),
        sr_ratios=list(args.get("sr_ratios", (8, 4, 2, 1))), mlp_ratios=list(args.get("mlp_ratios", (4, 4, 4, 4))))
    torch.manual_seed(seed)
    hf = transformers.SegformerForSemanticSegmentation(config)
    from .convert.segformer_hf import hf_to_official

    ours = create_model(name, num_classes=num_classes)
    ours.load_state_dict(hf_to_official(hf.state_dict(), "transformers"))
    for key, module in hf.named_modules():  # the authors': 1e-5 in patch embeddings and K/V reduction, else 1e-6
        if isinstance(module, torch.nn.LayerNorm):
            reduction = any(k in key for k in ("patch_embeddings", "sequence_reduction", ".self.layer_norm"))
            module.eps = 1e-5 if reduction else 1e-6
    return ours.eval(), hf.eval()
