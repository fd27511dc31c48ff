"""Training-step time of transeg models: the optimised path against the plain eager one, one run.

Contenders per model and precision (fp32, bf16 autocast), all from the same initial weights, each
with its own fused AdamW, timed in turn within every round (transeg.bench.time_interleaved):

- eager, published decoder: the model as the papers write it (`layers.fusion.unfused`), eager;
- eager, fused decoder:     transeg's default (exact algebraic fusion of the all-MLP decoders);
- compiled:                 the form `transeg train` uses on this device plus `torch.compile` (the
                            `compile: true` training key).

A step = forward + the model's loss + backward + optimizer step + zero_grad, as the trainer runs it.
`transeg train` trains the form `transeg.device.paths_for(device).training_form` names (the fused one on a
CPU, the published one on CUDA: ../shared/perf/gpu-h200.md) and sets cuDNN autotuning / TF32 matmuls as
that device's Paths say; this script sets the same switches for every contender, marks the trainer's
column "(transeg train)", and says the form in its header. Compile time (the first steps) is reported
apart. For HF SegFormer as the peer, see segformer_hf.py; for the trainer against this bare step,
train_overhead.py.

    python benchmarks/train_step.py --models edaformer-t
    python benchmarks/train_step.py --models segformer-b0,edaformer-t --batch 8 --no-compile
"""
import argparse
import contextlib
import copy
import statistics
import time

import torch

from transeg import create_model
from transeg.bench import environment, time_interleaved
from transeg.device import paths_for, training_backends
from transeg.engine import TrainConfig
from transeg.engine.distributed import wrap
from transeg.layers.fusion import set_fused, unfused


def step_fn(model, x, label, dtype, published=False, forward_loss=None):
    """One training step of `model` on (x, label): forward, loss, backward, fused AdamW, zero_grad. forward_loss:
    the trainer's (engine.distributed.wrap: under compile: true it compiles the CUDA form's loss too), else
    `model.loss(model(x), label)`."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
    autocast = torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32)
    forward_loss = forward_loss or (lambda image, target: model.loss(model(image), target)["loss"])

    def step():
        with (unfused(model) if published else contextlib.nullcontext()), autocast:
            loss = forward_loss(x, label)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def trainer_form(device):
    """"fused" or "published": the form `transeg train` trains in on `device` (its Paths' training_form)."""
    return paths_for(device).training_form


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="edaformer-t")
    ap.add_argument("--size", default="512x512", help="crop HxW")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--num-classes", type=int, default=150)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args()
    device = torch.device(args.device)
    size = tuple(int(v) for v in args.size.split("x"))
    env = environment(device)
    form = trainer_form(device)
    training_backends(paths_for(device))  # cuDNN autotuning / TF32 as `transeg train` sets them (no-ops on a CPU)
    print(f"# Training step — {env['device']}, {env['threads']} threads, torch {env['torch']}, batch {args.batch}, "
          f"{size[0]}x{size[1]} crops, {args.num_classes} classes, fused AdamW, median of {args.runs} interleaved "
          f"steps after {args.warmup} warm-up; `transeg train` on {device.type} trains the {form} form "
          f"(device.paths_for().training_form), the compiled contender too\n")
    mark = {f: " (transeg train)" if f == form else "" for f in ("published", "fused")}
    print(f"| model | precision | eager, published decoder{mark['published']} s | eager, fused decoder{mark['fused']} s | "
          "compiled s | fused vs published | best vs published | compile s |")
    print("|---|---|---|---|---|---|---|---|")
    x = torch.randn(args.batch, 3, *size, device=device)
    label = torch.randint(0, args.num_classes, (args.batch, *size), device=device)
    label[:, :16] = 255
    for name in args.models.split(","):
        torch.manual_seed(0)
        base = create_model(name, num_classes=args.num_classes).to(device).train()
        for dname in args.dtypes.split(","):
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dname]
            fns = {"published": step_fn(copy.deepcopy(base), x, label, dtype, published=True),
                   "fused": step_fn(copy.deepcopy(base), x, label, dtype)}
            compile_s = ""
            if not args.no_compile:
                compiled = copy.deepcopy(base)
                set_fused(compiled, form == "fused")
                # as the trainer compiles (the net in place; in CUDA's form the loss too)
                _, _, forward_loss = wrap(compiled, TrainConfig(compile=True), device, 1, form)
                fns["compiled"] = step_fn(compiled, x, label, dtype, forward_loss=forward_loss)
                t = time.perf_counter()
                fns["compiled"]()
                compile_s = f"{time.perf_counter() - t:.0f}"
            times = {k: statistics.median(v) for k, v in time_interleaved(fns, device, args.warmup, args.runs).items()}
            best = min(times.values())
            comp = f"{times['compiled']:.2f}" if "compiled" in times else "-"
            print(f"| {name} | {dname}{' autocast' if dname != 'fp32' else ''} | {times['published']:.2f} | "
                  f"{times['fused']:.2f} | {comp} | {times['published'] / times['fused']:.2f}x | "
                  f"{times['published'] / best:.2f}x | {compile_s} |", flush=True)


if __name__ == "__main__":
    main()
