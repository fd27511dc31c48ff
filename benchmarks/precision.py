"""Inference latency of each family in fp32, bf16 (native weights), bf16 autocast and compiled, one run.

For every model the contenders share the weights and the input and are timed in turn within each
round (transeg.bench.time_interleaved). This is the check that the bf16 path is never slower than
fp32, and the record of what `torch.compile` (with weight freezing) adds; compile time is reported
separately. Each low-precision contender's predictions are compared with fp32 (argmax agreement).

    python benchmarks/precision.py                       # the default model list at 512x512
    python benchmarks/precision.py --models segformer-b2,semask-swin-t-fpn --compile
    python benchmarks/precision.py --device cuda --dtype-low fp16
"""
import argparse
import copy
import statistics
import time

import torch

from transeg import create_model
from transeg.bench import environment, time_interleaved

MODELS = ("segformer-b0,segformer-b1,segformer-b2,edaformer-t,edaformer-b,segmenter-vit-t16-linear,"
          "segmenter-vit-s16-mask,segvit-vit-b16,semask-swin-t-fpn")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=MODELS)
    ap.add_argument("--size", default="512x512")
    ap.add_argument("--num-classes", type=int, default=150)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype-low", choices=["bf16", "fp16"], default="bf16")
    ap.add_argument("--compile", action="store_true", help="add a compiled fp32 and a compiled native-low contender")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype_low]
    size = tuple(int(v) for v in args.size.split("x"))
    env = environment(device)
    print(f"# Precision and compilation — {env['device']}, {env['threads']} threads, torch {env['torch']}, "
          f"input {size[0]}x{size[1]}, batch {args.batch}, {args.num_classes} classes, "
          f"median of {args.runs} interleaved runs after {args.warmup} warm-up\n")
    lo = args.dtype_low
    cols = ["fp32", f"{lo} native", f"{lo} autocast"] + (["fp32 compiled", f"{lo} native compiled"] if args.compile else [])
    print("| model | " + " | ".join(f"{c} ms" for c in cols) + f" | best {lo} vs fp32 | {lo} argmax = fp32 | compile s |")
    print("|---" * (len(cols) + 4) + "|")
    for name in args.models.split(","):
        torch.manual_seed(0)
        fp32 = create_model(name, num_classes=args.num_classes).to(device).optimize_for_inference()
        native = copy.deepcopy(fp32).optimize_for_inference(low)
        x = torch.randn(args.batch, 3, *size, device=device)
        autocast = torch.autocast(device.type, dtype=low)

        def with_autocast():
            with autocast:
                return fp32(x)
        fns = {"fp32": lambda: fp32(x), f"{lo} native": lambda: native(x), f"{lo} autocast": with_autocast}
        compile_s = ""
        with torch.inference_mode():
            ref = fp32(x).float().argmax(1)
            agree = min((fn().float().argmax(1) == ref).float().mean().item() for k, fn in fns.items() if k != "fp32")
            if args.compile:
                fp32_c = copy.deepcopy(fp32).optimize_for_inference(compile=True)
                native_c = copy.deepcopy(fp32).optimize_for_inference(low, compile=True)
                t = time.perf_counter()
                fp32_c(x)
                native_c(x)
                compile_s = f"{time.perf_counter() - t:.0f}"
                fns["fp32 compiled"] = lambda: fp32_c(x)
                fns[f"{lo} native compiled"] = lambda: native_c(x)
            times = {k: statistics.median(v) * 1e3 for k, v in time_interleaved(fns, device, args.warmup, args.runs).items()}
        best = min(v for k, v in times.items() if lo in k and "compiled" not in k)
        print(f"| {name} | " + " | ".join(f"{times[c]:.1f}" for c in cols) +
              f" | {times['fp32'] / best:.2f}x | {100 * agree:.1f}% | {compile_s} |", flush=True)


if __name__ == "__main__":
    main()
