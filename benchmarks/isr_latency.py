"""Latency of EDAFormer (or SegFormer) at several inference-spatial-reduction settings, one run.

Every setting runs the same weights on the same input; the settings are timed in turn within each
round (transeg.bench.time_interleaved) so they share the machine's state, and the trained setting
is the peer each ISR setting is compared with. Prints a markdown table for BENCHMARKS.md.

    python benchmarks/isr_latency.py --model edaformer-t --sizes 512x512,1024x2048
    python benchmarks/isr_latency.py --device cuda --dtype bf16 --runs 50
"""
import argparse
import statistics

import torch

from transeg import create_model
from transeg.bench import environment, time_interleaved
from transeg.flops import count_gmacs, meta_model

# trained; the paper's optimum; the two larger settings of its Table 6(b); and the strongest of the
# settings whose GFLOPs the authors' tools/get_flops.py counts (4,4,2,1 / 2,2,2: Cityscapes -65% for T).
SETTINGS = {
    "trained": dict(),
    "2,2,1,1 / 2,2,2": dict(encoder=(2, 2, 1, 1), decoder=(2, 2, 2)),
    "2,2,2,1 / 2,2,2": dict(encoder=(2, 2, 2, 1), decoder=(2, 2, 2)),
    "4,4,2,1 / 2,2,2": dict(encoder=(4, 4, 2, 1), decoder=(2, 2, 2)),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="edaformer-t")
    ap.add_argument("--num-classes", type=int, default=None, help="default: 150 at 512x512-ish, 19 for 1024x2048")
    ap.add_argument("--sizes", default="512x512,1024x2048")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    env = environment(device)
    print(f"# {args.model} ISR latency — {env['device']}, {env['threads']} threads, torch {env['torch']}, "
          f"{args.dtype}{' autocast' if args.dtype != 'fp32' else ''}, batch {args.batch}, "
          f"median of {args.runs} interleaved runs after {args.warmup} warm-up\n")
    print("| input | classes | ISR encoder / decoder | GFLOPs | Δ GFLOPs | latency ms | images/s | speed-up vs trained |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        h, w = (int(v) for v in size.split("x"))
        k = args.num_classes or (19 if max(h, w) >= 1024 else 150)
        torch.manual_seed(0)
        model = create_model(args.model, num_classes=k).to(device).eval()
        shape = meta_model(args.model, k)
        x = torch.randn(args.batch, 3, h, w, device=device)
        if shape.isr["decoder"]:
            settings = SETTINGS
        else:  # SegFormer: ISR in the encoder only (its head has no attention)
            settings = {name.split(" / ")[0]: {"encoder": s["encoder"]} if s else s for name, s in SETTINGS.items()}

        def runner(setting):
            def run():
                model.set_isr(**setting)
                with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    model(x)
            return run

        times = time_interleaved({n: runner(s) for n, s in settings.items()}, device, args.warmup, args.runs)
        base_ms = statistics.median(times["trained"]) * 1e3
        base_g = None
        for name, setting in settings.items():
            g = count_gmacs(shape.set_isr(**setting), (h, w))["total"]
            base_g = base_g or g
            ms = statistics.median(times[name]) * 1e3
            print(f"| {h}x{w} | {k} | {name} | {g:.2f} | {100 * (g / base_g - 1):+.1f}% | {ms:.1f} | "
                  f"{1000 * args.batch / ms:.1f} | {base_ms / ms:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
