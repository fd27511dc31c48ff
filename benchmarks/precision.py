"""Inference latency of each family in fp32, bf16 (native weights), bf16 autocast and compiled, one run.

For every model the contenders share the weights and the input and are timed in turn within each
round (transeg.bench.time_interleaved). This is the check that the bf16 path is never slower than
fp32, and the record of what the compiled path (`optimize_for_inference(dtype, compile=True)`, with the
options device.paths_for gives the device) adds, with its speed-up over eager fp32; compile time is
reported separately. Each low-precision contender's predictions are compared with fp32 (argmax agreement).
`--batches 1,16` times every model at each batch size (all models at the first size, then the next), and
`--compile-budget S` stops compiling further models after S seconds, so a long list fits a time limit.

    python benchmarks/precision.py                       # the default model list at 512x512
    python benchmarks/precision.py --models segformer-b2,semask-swin-t-fpn --compile
    python benchmarks/precision.py --device cuda --dtype-low fp16
    python benchmarks/precision.py --device cuda --models segformer-b0,edaformer-t --batches 1,16 --compile
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


def _args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=MODELS)
    ap.add_argument("--size", default="512x512")
    ap.add_argument("--num-classes", type=int, default=150)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--batches", default=None,
                    help="comma-separated batch sizes, e.g. 1,16 (instead of --batch): a batch column, all models at the "
                         "first batch size before the next")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype-low", choices=["bf16", "fp16"], default="bf16")
    ap.add_argument("--compile", action="store_true",
                    help="add a compiled fp32 and a compiled native-low contender (optimize_for_inference(dtype, "
                         "compile=True): on CUDA the options of device.paths_for) and their speed-up over eager fp32")
    ap.add_argument("--compile-budget", type=float, default=None, metavar="S",
                    help="with --compile: compile no further model once S seconds have passed since the start (its "
                         "compiled cells read '-', compile s 'over budget'), so a list of models fits a time limit")
    ap.add_argument("--call", choices=["forward", "logits"], default=None,
                    help="what is timed: model(x) (head-stride scores) or model.logits(x) (scores at the input size, "
                         "float32: what predict and serve call). Default: logits with --compile, else forward")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    return ap.parse_args()


def main():
    args = _args()
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype_low]
    size = tuple(int(v) for v in args.size.split("x"))
    batches = [int(b) for b in args.batches.split(",")] if args.batches else [args.batch]
    call = args.call or ("logits" if args.compile else "forward")
    env = environment(device)
    print(f"# Precision and compilation — {env['device']}, {env['threads']} threads, torch {env['torch']}, "
          f"input {size[0]}x{size[1]}, batch {','.join(map(str, batches))}, {args.num_classes} classes, "
          f"median of {args.runs} interleaved runs after {args.warmup} warm-up"
          + (f", timing model.{call}(x)" if call != "forward" else "") + "\n")
    lo = args.dtype_low
    cols = ["fp32", f"{lo} native", f"{lo} autocast"] + (["fp32 compiled", f"{lo} native compiled"] if args.compile else [])
    extra = ["compiled vs eager fp32", f"compiled {lo} vs compiled fp32"] if args.compile else []
    lead = ["model"] + (["batch"] if args.batches else [])
    head = lead + [f"{c} ms" for c in cols] + [f"best {lo} vs fp32", f"{lo} argmax = fp32", "compile s"] + extra
    print("| " + " | ".join(head) + " |")
    print("|---" * len(head) + "|")
    for batch in batches:
        for name in args.models.split(","):
            torch.manual_seed(0)
            fp32 = create_model(name, num_classes=args.num_classes).to(device).optimize_for_inference()
            native = copy.deepcopy(fp32).optimize_for_inference(low)
            x = torch.randn(batch, 3, *size, device=device)
            autocast = torch.autocast(device.type, dtype=low)

            def run(model):
                return (model.logits if call == "logits" else model)(x)

            def with_autocast():
                with autocast:
                    return run(fp32)
            fns = {"fp32": lambda: run(fp32), f"{lo} native": lambda: run(native), f"{lo} autocast": with_autocast}
            compile_s = ""
            with torch.inference_mode():
                ref = run(fp32).float().argmax(1)
                agree = min((fn().float().argmax(1) == ref).float().mean().item() for k, fn in fns.items() if k != "fp32")
                if args.compile and (args.compile_budget is None or time.perf_counter() - started < args.compile_budget):
                    fp32_c = copy.deepcopy(fp32).optimize_for_inference(compile=True, device=str(device))
                    native_c = copy.deepcopy(fp32).optimize_for_inference(low, compile=True, device=str(device))
                    t = time.perf_counter()
                    run(fp32_c)
                    run(native_c)
                    compile_s = f"{time.perf_counter() - t:.0f}"
                    fns["fp32 compiled"] = lambda: run(fp32_c)
                    fns[f"{lo} native compiled"] = lambda: run(native_c)
                elif args.compile:
                    compile_s = "over budget"
                times = {k: statistics.median(v) * 1e3 for k, v in time_interleaved(fns, device, args.warmup, args.runs).items()}
            best = min(v for k, v in times.items() if lo in k and "compiled" not in k)
            cells = [name] + ([str(batch)] if args.batches else []) + [f"{times[c]:.1f}" if c in times else "-" for c in cols]
            cells += [f"{times['fp32'] / best:.2f}x", f"{100 * agree:.1f}%", compile_s]
            if args.compile:
                compiled = [v for k, v in times.items() if "compiled" in k]
                cells.append(f"{times['fp32'] / min(compiled):.2f}x" if compiled else "-")
                cells.append(f"{times['fp32 compiled'] / times[f'{lo} native compiled']:.2f}x" if compiled else "-")
            print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
