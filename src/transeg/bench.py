"""Latency and throughput of a model: median of repeated timed runs after warm-up."""
import platform
import statistics
import time

import torch


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward(model, size, batch=1, device="cpu", dtype=torch.float32, warmup=3, runs=10, channels_last=False):
    """Seconds per forward pass (list of `runs` timings) at input (batch, 3, *size).

    dtype float32 runs in fp32; bfloat16/float16 run under autocast (weights stay fp32)."""
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


def environment(device="cpu"):
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
    return {"device": f"{device.type} ({name})", "threads": torch.get_num_threads(), "torch": torch.__version__}


def summarize(times):
    return {"median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3, "runs": len(times)}
