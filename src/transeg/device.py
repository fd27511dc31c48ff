"""Which device runs the work, what it computes natively, and how the host process allocates."""
from pathlib import Path

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

