"""transeg SegFormer against Hugging Face transformers: same weights, same process, same threads.

For each model: inference latency at batch 1 and 8 (fp32 for both; bf16 as each library runs it best:
HF under autocast, transeg with native bf16 weights via `optimize_for_inference(torch.bfloat16)`),
then optionally one training step (forward + CE loss + backward + fused AdamW step) at batch 8, fp32
and bf16 autocast for both; transeg's step is the one `transeg train` takes on that device: the model in
the form `transeg.device.paths_for(device).training_form` names (published decoder + upsample-then-CE on
CUDA, the fused decoder + row-blocked loss on a CPU), with the cuDNN autotuning / TF32 matmul switches the
trainer sets, which hold for HF's step too while the training steps are timed. Within every round each contender runs once in turn
(transeg.bench.time_interleaved), so a drift of the machine hits them alike; medians are reported
with the speed-up over HF fp32 (inference) or HF in the same precision (training). Before timing,
the fp32 logits of the two are compared (max |Δ|), and the bf16 predictions against fp32 (argmax
agreement), so a fast wrong model cannot pass. Peak memory is that of the tensors one forward
allocates (transeg.bench.peak_tensor_memory: activations and outputs, not the weights).

    python benchmarks/segformer_hf.py                                   # B0, 512x512, batch 1 and 8
    python benchmarks/segformer_hf.py --models segformer-b0,segformer-b1,segformer-b2 --train
    python benchmarks/segformer_hf.py --models segformer-b0 --batches '' --train      # training step only
    python benchmarks/segformer_hf.py --device cuda --batches 1,8,32
"""
import argparse
import statistics

import torch

from transeg.bench import environment, hf_peer, peak_tensor_memory, time_interleaved
from transeg.device import paths_for, restore_backends, training_backends
from transeg.layers.fusion import set_fused

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def inference_fns(ours, hf, x, dtypes):
    """{contender: callable} for one input; bf16 transeg runs a native-bf16 copy of the weights."""
    fns = {}
    autocast = torch.autocast(x.device.type, dtype=torch.bfloat16)
    if "fp32" in dtypes:
        fns["HF fp32"] = lambda: hf(pixel_values=x).logits
        fns["transeg fp32"] = lambda: ours(x)
    if "bf16" in dtypes:
        import copy

        ours_bf16 = copy.deepcopy(ours).optimize_for_inference(torch.bfloat16)

        def hf_bf16():
            with autocast:
                return hf(pixel_values=x).logits
        fns["HF bf16 (autocast)"] = hf_bf16
        fns["transeg bf16 (native)"] = lambda: ours_bf16(x)
    return fns


def train_fns(ours, hf, x, label, dtypes):
    """{contender: one optimisation step}; both use fused AdamW and CE with ignore 255 on logits
    upsampled to the label size (HF's loss; transeg's Segmentor.loss). transeg is put in the form its
    trainer uses on x's device (`set_fused` by `paths_for(device).training_form`), as `transeg train` does."""
    fns = {}
    set_fused(ours, paths_for(x.device).training_form == "fused")
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-6, fused=True)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-6, fused=True)
    hf.train()
    ours.train()
    for name in dtypes:
        autocast = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=name == "bf16")

        def hf_step(autocast=autocast):
            with autocast:
                loss = hf(pixel_values=x, labels=label).loss
            loss.backward()
            opt_hf.step()
            opt_hf.zero_grad(set_to_none=True)

        def ours_step(autocast=autocast):
            with autocast:
                loss = ours.loss(ours(x), label)["loss"]
            loss.backward()
            opt_ours.step()
            opt_ours.zero_grad(set_to_none=True)
        fns[f"HF {name}"] = hf_step
        fns[f"transeg {name}"] = ours_step
    return fns


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="segformer-b0", help="comma-separated SegFormer variants (b0..b5)")
    ap.add_argument("--size", default="512x512", help="input HxW")
    ap.add_argument("--num-classes", type=int, default=150)
    ap.add_argument("--batches", default="1,8", help="inference batch sizes ('' for none: training only)")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--train", action="store_true", help="also time a training step at --train-batch")
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--train-runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.size = tuple(int(v) for v in args.size.split("x"))
    dtypes = args.dtypes.split(",")
    device = torch.device(args.device)
    env = environment(device)
    print(f"# transeg vs Hugging Face transformers {__import__('transformers').__version__} — {env['device']}, "
          f"{env['threads']} threads, torch {env['torch']}, input {args.size[0]}x{args.size[1]}, "
          f"{args.num_classes} classes" + (f", median of {args.runs} interleaved runs after {args.warmup} warm-up"
                                             if args.batches else "") + "\n")
    for model in args.models.split(","):
        ours, hf = hf_peer(model)(model, args.num_classes)
        ours, hf = ours.to(device), hf.to(device)
        print(f"## {model}\n")
        batches = [int(b) for b in args.batches.split(",") if b]
        if batches:
            print("| batch | contender | latency ms | images/s | speed-up vs HF fp32 | peak MiB | check |")
            print("|---|---|---|---|---|---|---|")
        for batch in batches:
            x = torch.randn(batch, 3, *args.size, device=device)
            fns = inference_fns(ours, hf, x, dtypes)
            with torch.inference_mode():
                ref = hf(pixel_values=x).logits.float()
                checks, memory = {}, {}
                for name, fn in fns.items():
                    memory[name] = peak_tensor_memory(fn, x) / 2**20
                    out = fn().float()
                    if "fp32" in name:
                        checks[name] = f"max abs diff vs HF {(out - ref).abs().max().item():.1e}"
                    else:
                        checks[name] = f"argmax = fp32 on {100 * (out.argmax(1) == ref.argmax(1)).float().mean().item():.1f}%"
                times = time_interleaved(fns, device, args.warmup, args.runs)
            base = statistics.median(times.get("HF fp32", next(iter(times.values()))))
            for name, t in times.items():
                ms = statistics.median(t) * 1e3
                print(f"| {batch} | {name} | {ms:.1f} | {1000 * batch / ms:.1f} | {base * 1e3 / ms:.2f}x | {memory[name]:.0f} | "
                      f"{checks[name]} |", flush=True)
        if args.train:
            x = torch.randn(args.train_batch, 3, *args.size, device=device)
            label = torch.randint(0, args.num_classes, (args.train_batch, *args.size), device=device)
            label[:, :8] = 255  # some ignored pixels, as real crops have
            paths = paths_for(device)
            backends = training_backends(paths)  # as `transeg train` sets them; inference above ran without
            try:
                times = time_interleaved(train_fns(ours, hf, x, label, dtypes), device, 1, args.train_runs)
            finally:
                restore_backends(backends)
            switches = ", ".join(s for s, on in (("cuDNN autotuning", paths.cudnn_benchmark),
                                                  ("TF32 matmuls", paths.tf32_training)) if on)
            print(f"\nTraining step, batch {args.train_batch}, {args.size[0]}x{args.size[1]} crops "
                  f"(median of {args.train_runs} after 1 warm-up; transeg in the {paths.training_form} form "
                  f"`transeg train` uses on {device.type}" + (f"; {switches} for both" if switches else "") + "):\n")
            print("| precision | HF s/step | transeg s/step | speed-up |")
            print("|---|---|---|---|")
            for name in dtypes:
                h, o = (statistics.median(times[f"{who} {name}"]) for who in ("HF", "transeg"))
                print(f"| {name}{' autocast' if name != 'fp32' else ''} | {h:.2f} | {o:.2f} | {h / o:.2f}x |", flush=True)
        print()


if __name__ == "__main__":
    main()
