"""Which device runs the work, what it computes natively, and how the host process allocates."""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .errors import TransegError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name):
    """"auto" -> cuda when available, else cpu; anything else as torch.device. A bad name, or a CUDA
    device this machine does not have, is one line (not torch's assertion from deep inside .to())."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise TransegError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this PyTorch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise TransegError(f"device {name!r}: CUDA is not available on this machine ({why}); use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise TransegError(f"device {name!r}: this machine has {count} CUDA device(s), cuda:0 .. cuda:{count - 1}")
    return device


def parse_dtype(dtype):
    """"fp32" / "bf16" / "fp16" or a torch dtype -> the torch dtype (None stays None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise TransegError(f"unknown precision {dtype!r}; use {', '.join(DTYPES)}")
    return DTYPES[dtype]


def native_bf16(device):
    """Whether `device` computes bf16 natively (so autocast speeds things up rather than emulating):
    CUDA with bf16 support, or an x86 CPU with AMX or AVX512-BF16 (read from /proc/cpuinfo)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def keep_freed_memory():
    """Have glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

    By default glibc serves every allocation above 32 MB (and smaller ones once its heap has been
    trimmed) with fresh pages from the kernel, and each fresh 4 kB page faults on first touch. Large
    activations are allocated and freed on every forward/backward, so on the CPU they pay this every
    time (BENCHMARKS.md has the measured cost). PyTorch's CPU tuning guide answers this by preloading
    jemalloc or tcmalloc; this gets the same effect from the allocator already loaded (no mmap for
    large blocks, no trimming below 2 GB free). The process then keeps its peak memory until it exits,
    which is why it is a program's choice (the CLI makes it for the verbs that compute), not a
    library side effect. Set TRANSEG_MALLOC=system to keep glibc's defaults. Returns True when
    applied (Linux, glibc)."""
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


def return_freed_memory():
    """Have glibc's malloc hand large freed blocks back to the kernel as soon as they are freed: blocks over
    1 MiB are mapped and unmapped (a fixed threshold, where glibc's default rises with use), and the heap is
    trimmed once 1 MiB at its top is free. This undoes `keep_freed_memory` for a long streaming job whose memory
    must not creep with its length: tiled inference allocates and frees the same few sizes thousands of times,
    and with either of glibc's other settings the heap's fragmentation let a 9,000-pixel-square image peak about
    150-250 MB above a 3,000-pixel one with constant live memory; with this one they are 24 MB apart (GDAL's read
    cache filling; BENCHMARKS.md, "Images of any size"). The price is page faults on large allocations, the
cost keep_freed_memory avoids (BENCHMARKS.md, "Memory allocator"), not yet measured on a tiled job. A
    program's choice, like keep_freed_memory: `transeg predict` makes it for images it segments in tiles.
    Returns True when applied (Linux, glibc)."""
    import ctypes
    import os
    import sys

    if os.environ.get("TRANSEG_MALLOC", "").lower() == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # malloc.h
    return (libc.mallopt(M_MMAP_MAX, 65536) == 1 and libc.mallopt(M_MMAP_THRESHOLD, 1 << 20) == 1
            and libc.mallopt(M_TRIM_THRESHOLD, 1 << 20) == 1)


@dataclass(frozen=True)
class Paths:
    """How transeg computes on one kind of device: every per-device choice of computation in one place, each
    resting on a measurement (`paths_for` gives them; BENCHMARKS.md "On a GPU" has the figures). Every choice
    below computes the same function as its alternative (tests/test_device_paths.py: value and gradient in float64);
    what differs is the time the device takes.

    training_form: "fused" = the decoders' algebraic fusion (layers/fusion.py) and the row-blocked upsampled loss
        (losses.upsampled_cross_entropy), or "published" = the papers' concat + 1x1 conv decoder and
        `F.interpolate` then `F.cross_entropy` (`layers.fusion.set_fused`).
    inference_form: the same choice for inference and evaluation.
    serving_dtype: the precision `serve` runs at unless told (`--dtype auto`; `optimize_for_inference(dtype="auto")`):
        weights cast natively, never autocast. None = float32.
    compile_options: inductor's options for the compiled inference path (`transeg.compiled`).
    compile_serving: `serve` takes the compiled path unless told `--no-compile` (a long-lived process repays the
        compile; a one-off `predict` does not, so it compiles only when asked).
    cudnn_benchmark, tf32_training: cuDNN's autotuner, and TF32 for float32 matmuls in training (not in inference
        or evaluation, whose float32 matmuls stay float32: outputs equal Hugging Face's to 1e-4).
    """

    training_form: str
    inference_form: str
    serving_dtype: Optional[torch.dtype]
    compile_options: dict = field(default_factory=dict)
    compile_serving: bool = False
    cudnn_benchmark: bool = False
    tf32_training: bool = False


# The 2-core CPU (BENCHMARKS.md "Training step", "Decoder fusion"): the row-blocked loss makes a SegFormer-B0
# training step 2-3x faster than upsample-then-CE (the full-size logits are never written), and the fused
# decoder turns B0's 4.3 GMAC fuse conv into 0.25. Compiling with weight freezing (constant folding, prepacked
# weights) is what `--compile` gives; serving stays eager by default as a compile costs ~20 s per input size on
# two cores. float32 serving: native bf16 is faster only where the CPU has AMX / AVX512-BF16 (`native_bf16`), and
# changes 1-2% of labels, so it stays the user's choice (`--dtype bf16`).
CPU_PATHS = Paths(training_form="fused", inference_form="fused", serving_dtype=None,
                  compile_options={"freezing": True})

# A CUDA GPU (../shared/perf/gpu-h200.md, one H200):
# - training "published": the row-blocked loss costs 215-231 ms of a B0 batch-16 512x512 step on the GPU, where
#   F.interpolate + F.cross_entropy cost 28 ms (it launches a few kernels per block of rows: 10,259 kernels a step,
#   1,376 each of nll_loss_forward / scatter_add_ / addmm_); the whole step is 72.9 ms published vs 265.6 ms fused.
#   benchmarks/dispatch_count.py: 1,453 ATen operations a step published vs 6,703 fused (B0, batch 2).
# - inference "fused": the same number of launches as published within 5% (B0: 439 vs 419 eager, batch 1), and
#   under the compiled path the folded weights are constants while the fuse conv's 4.3 GMACs are gone.
# - serving bf16, native: eager at batch 1, where launches bound the time, native bf16 is 0.84-1.23x transeg fp32
#   (precision.py, 9 models) and autocast 0.62-0.74x HF fp32 (its casts are launches too); at batch 16 and at
#   1024x2048 native bf16 is 1.3-2.6x transeg fp32 (segformer_hf.py). Compiled, where launches no longer bound it,
#   bf16 is not measured yet (the GPU suite's 02-latency.md).
# - compiled serving, CUDA graphs: batch-1 512x512 4.89 -> 1.25 ms (B0), 12.8 -> 2.4 (EDAFormer-T), 30.6 -> 10.0
#   (B5), compile 17-55 s once per size bucket; a service pays it at start-up for its protocol's bucket and each
#   batch bucket up to its --max-batch.
# - cuDNN autotuning and TF32 in training: the crops are of one size, so autotuning runs once; TF32 rounds matmul
#   inputs to 10 bits of mantissa, less than the bf16 autocast the default amp already trains with (7 bits).
CUDA_PATHS = Paths(training_form="published", inference_form="fused", serving_dtype=torch.bfloat16,
                   compile_options={"freezing": True, "triton.cudagraphs": True}, compile_serving=True,
                   cudnn_benchmark=True, tf32_training=True)


def paths_for(device):
    """The `Paths` of `device` (a torch.device or a name such as "cuda:1"). A device no figure was measured on
    (MPS, XPU, ...) keeps the CPU's choices, which are the ones transeg had before any device was measured."""
    return CUDA_PATHS if torch.device(device).type == "cuda" else CPU_PATHS


def training_backends(paths):
    """Set the process-wide switches `paths` chooses for training (cuDNN's autotuner, TF32 float32 matmuls); returns
    what they were, for `restore_backends`. Convolutions keep PyTorch's own TF32 default (on, for cuDNN)."""
    saved = (torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision())
    torch.backends.cudnn.benchmark = paths.cudnn_benchmark or saved[0]
    if paths.tf32_training:
        torch.set_float32_matmul_precision("high")
    return saved


def restore_backends(saved):
    """Put back the switches `training_backends` (or this) returned; returns the ones it replaced."""
    replaced = (torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision())
    torch.backends.cudnn.benchmark = saved[0]
    torch.set_float32_matmul_precision(saved[1])
    return replaced
