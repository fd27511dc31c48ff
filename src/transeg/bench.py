"""Latency and throughput of a model: median and spread of repeated timed runs after warm-up."""
import platform
import statistics
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import isr
from .errors import TransegError
from .flops import count_gmacs, meta_model
from .registry import FAMILIES, get_family, get_variant


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward(model, size, batch=1, device="cpu", dtype=torch.float32, warmup=3, runs=10, channels_last=False,
                 tick=None):
    """Seconds per forward pass (list of `runs` timings) at input (batch, 3, *size).

    dtype bfloat16/float16 runs under autocast (for native low-precision weights, cast the model
    with optimize_for_inference and leave dtype float32). `tick`: called after every run, warm-up
    included (a progress bar's update)."""
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
            if tick is not None:
                tick()
    return times


def time_interleaved(fns, device="cpu", warmup=3, runs=10, tick=None):
    """Seconds per call of each of `fns` ({name: callable}), called in turn within every round, so a
    clock or thermal drift hits all of them alike; peers compared this way share one run.
    Returns {name: [runs timings]}. `tick`: called after every call, warm-up included."""
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
            if tick is not None:
                tick()
    return times


def progress_bar(total, enabled):
    """The bar `transeg bench` shows on stderr over its warm-up and timed runs (none when not `enabled`:
    stderr is no terminal); its `update` is the `tick` of time_forward / time_interleaved."""
    from tqdm import tqdm

    return tqdm(total=total, desc="timing runs", unit="run", leave=False, disable=not enabled, dynamic_ncols=True)


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


# Spread (interquartile range / median) above which `transeg bench` warns that its latencies are noise.
# 10 %: the gains bench is used to show are of that order (BENCHMARKS.md: Inference spatial reduction), so
# once the middle half of the runs spans 10 % of the median such a difference cannot be told from noise.
# The IQR, not max - min, because one descheduled run should not raise the alarm. A machine shared with
# another program spreads far beyond it (BENCHMARKS.md: Run-to-run spread on a shared machine).
NOISY_SPREAD = 0.10


def summarize(times):
    """Median, quartiles, min and max (ms) of a list of timings in seconds, and `spread`: the
    interquartile range relative to the median (0.05 = the middle half of the runs within 5 %)."""
    ms = sorted(t * 1e3 for t in times)
    median = statistics.median(ms)
    p25, _, p75 = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else (ms[0],) * 3
    return {"median_ms": median, "min_ms": ms[0], "max_ms": ms[-1], "p25_ms": p25, "p75_ms": p75, "runs": len(ms),
            "spread": (p75 - p25) / median if median > 0 else 0.0}


def spread_text(row):
    """"IQR 30.1-31.4 ms, min 29.8, max 35.0" for a row of `measure` (or a `summarize` dict)."""
    get = (lambda k: row[f"{k} ms"]) if "p25 ms" in row else (lambda k: row[f"{k}_ms"])
    return f"IQR {get('p25'):.1f}-{get('p75'):.1f} ms, min {get('min'):.1f}, max {get('max'):.1f}"


def noise_warning(rows, threshold=NOISY_SPREAD):
    """One line saying the latencies are noisy, or None: when the spread (IQR / median) of any row of
    `measure` exceeds `threshold`, or a row has fewer than 3 timed runs (no spread to judge by)."""
    few = min(r.get("runs", 0) for r in rows)
    worst = max(rows, key=lambda r: r["spread"])
    if few < 3:
        return (f"{few} timed run(s): no spread to judge the latencies by; use --runs 10 or more before "
                "comparing settings")
    if worst["spread"] <= threshold:
        return None
    which = f" ({worst['setting']})" if len(rows) > 1 else ""
    return (f"latencies are noisy: the middle half of the runs spans {100 * worst['spread']:.0f}% of the median"
            f"{which}, above {100 * threshold:.0f}%, so differences of that size are noise. Another process may be "
            "using the cores: try a quiet machine, --threads N (fewer than the cores in use), or more --runs")


def hf_peer(name):
    """The function that builds variant `name` beside its Hugging Face twin (`Family.hf_peer`)."""
    family = get_family(get_variant(name).family)
    if family.hf_peer is None:
        having = ", ".join(f.title for f in FAMILIES.values() if f.hf_peer) or "no family"
        raise TransegError(f"{name}: --compare hf exists for {having} only; transeg has no Hugging Face twin "
                           f"of {family.title} to time")
    return family.hf_peer


def compare_hf(name, num_classes=150, size=(512, 512), batch=1, device="cpu", dtype=torch.float32, autocast=False,
               compile=False, warmup=3, runs=10, progress=False):
    """`transeg bench --compare hf`: transeg and Hugging Face's model on the same random weights (the family's
    `hf_peer`), timed in turn
    within each round after checking their fp32 logits agree. dtype bf16/fp16: HF runs under autocast
    (its only low-precision mode) and transeg with native weights, or under autocast too with `autocast`.
    Returns {"max_abs_diff": float, "ms": {label: median ms}}; the labels include "HF fp32". `progress`: a bar
    on stderr over the runs."""
    device = torch.device(device)
    ours, hf = hf_peer(name)(name, num_classes)
    ours, hf = ours.to(device), hf.to(device)
    x = torch.randn(batch, 3, *size, device=device)
    with torch.inference_mode():
        diff = (ours(x) - hf(pixel_values=x).logits).abs().max().item()
    ours.optimize_for_inference(None if autocast else dtype, compile=compile)
    ours_autocast = dtype if autocast else torch.float32
    label = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]

    def run(model, autocast_to, hf_call=False):
        def call():
            with torch.inference_mode(), torch.autocast(device.type, dtype=autocast_to, enabled=autocast_to != torch.float32):
                return model(pixel_values=x) if hf_call else model(x)
        return call

    fns = {"HF fp32": run(hf, torch.float32, True)}
    if dtype != torch.float32:
        fns[f"HF {label} (autocast)"] = run(hf, dtype, True)
    fns[f"transeg {label}"] = run(ours, ours_autocast)
    with progress_bar(len(fns) * (warmup + runs), progress) as bar:
        times = time_interleaved(fns, device, warmup, runs, tick=bar.update)
    return {"max_abs_diff": diff, "ms": {k: statistics.median(v) * 1e3 for k, v in times.items()}}


# The ISR setting the EDAFormer paper recommends (the authors' README and isr.SWEEP): encoder 2,2,1,1,
# decoder 2,2,2; the sweep's chart marks it.
PAPER_ISR = {"encoder": (2, 2, 1, 1), "decoder": (2, 2, 2)}


def is_paper_setting(setting):
    """True for the paper's ISR setting, cut to the parts a model has (SegFormer: encoder 2,2,1,1)."""
    return all(tuple(setting.get(part, ())) == PAPER_ISR[part][:len(setting.get(part, ()))] for part in PAPER_ISR) \
        and any(setting.get(part) for part in PAPER_ISR)


def measure(model, settings=(None,), size=(512, 512), batch=1, device="cpu", autocast_dtype=torch.float32, warmup=3,
            runs=10, flops_convention=None, dataset=None, max_samples=None, progress=False):
    """One row per ISR setting (None: the model as it is): the setting, its effective K/V pooling,
    GFLOPs (counted on a meta-device twin, in the paper's convention unless `flops_convention`), the
    latency over `runs` after `warmup` (median, quartiles, min, max in ms; `spread` = IQR / median),
    whether it is the EDAFormer paper's setting (`paper`), and with `dataset` the mIoU (%) under the
    model's protocol. The model is left at its last setting. `transeg bench` and its --isr-sweep print
    these. `progress`: a bar on stderr over the warm-up and timed runs of every setting."""
    name = model.meta["variant"]
    twin = meta_model(name, **model.meta["model_args"])
    convention = flops_convention or get_variant(name).paper.gflops_convention
    rows = []
    bar = progress_bar(len(settings) * (warmup + runs), progress)
    for setting in settings:
        if setting:
            model.set_isr(**setting)
            twin.set_isr(**setting)
        t = summarize(time_forward(model, size, batch, device, autocast_dtype, warmup, runs, tick=bar.update))
        row = {"setting": isr.describe(model.isr), "pooling": isr.effective_pooling(model),
               "label": " / ".join(",".join(map(str, r)) for r in model.isr.values() if r),
               "GFLOPs": count_gmacs(twin, size, convention=convention)["total"], "convention": convention,
               "latency ms": t["median_ms"], "min ms": t["min_ms"], "max ms": t["max_ms"], "p25 ms": t["p25_ms"],
               "p75 ms": t["p75_ms"], "spread": t["spread"], "runs": t["runs"], "paper": is_paper_setting(model.isr)}
        if dataset is not None:
            from .engine import evaluate
            row["mIoU"] = 100 * evaluate(model, dataset, progress=False, max_samples=max_samples)["mIoU"]
        rows.append(row)
    bar.close()
    return rows
