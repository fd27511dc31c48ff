"""How much the compiled path's size buckets change a model's labels (transeg.compiled): labels of inputs padded
into their bucket against eager per-size labels, with the same network (the bucketing alone, no compiler, so
any difference is the mean-colour padding a padded input sees past its edge).

Meaningful with a trained checkpoint (random weights have near-ties everywhere):

    python benchmarks/bucket_agreement.py --checkpoint runs/quickstart/best.safetensors --sizes 128x200,512x672

Prints device, dtype, batch, threads and one row per size: its bucket, the share of pixels whose label agrees,
within 32 pixels of the padded (bottom and right) edges and elsewhere. Inputs on a rung agree on 100% by
construction (tests/test_compiled.py).
"""
import argparse

import numpy as np
import torch

import transeg
from transeg.bench import environment
from transeg.compiled import CompiledNetwork, bucket_of
from transeg.data import build_dataset


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a trained .safetensors checkpoint")
    ap.add_argument("--sizes", default="128x200,160x272,512x544,512x672", help="input HxW, comma-separated")
    ap.add_argument("--data", default=None, help="a --data value whose val split gives the images (default: the "
                    "synthetic set at each size)")
    ap.add_argument("--images", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = transeg.load(args.checkpoint).eval()
    env = environment(torch.device("cpu"))
    print(f"# bucket padding vs per-size labels — {env['device']}, {env['threads']} threads, torch {env['torch']}, "
          f"fp32, batch 1, {args.images} images per size, {model.meta['variant']} from {args.checkpoint}\n")
    print("| input | bucket | labels agree | within 32 px of the padded edges | elsewhere |")
    print("|---|---|---|---|---|")
    mean = torch.tensor(model.meta["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.meta["std"]).view(1, 3, 1, 1)
    bucketed = CompiledNetwork(model.eager_network, model.backbone.pad_multiple, model.decode_head.stride, "cpu")
    bucketed.compiled = model.eager_network  # the bucketing without the compiler
    for size in args.sizes.split(","):
        h, w = (int(v) for v in size.split("x"))
        data = build_dataset(args.data or f"synthetic:size={h}x{w},n={args.images}", "val")
        same = edge_same = edge_total = total = 0
        for i in range(min(args.images, len(data))):
            image = torch.as_tensor(np.asarray(data[i]["image"])).float()[None]
            x = (torch.nn.functional.interpolate(image, size=(h, w), mode="bilinear") - mean) / std
            with torch.no_grad():
                model.compiled = None
                eager = model.logits(x).argmax(1)
                model.compiled = bucketed
                padded = model.logits(x).argmax(1)
            near = torch.zeros_like(eager, dtype=torch.bool)
            near[..., -32:, :] = True
            near[..., -32:] = True
            agree = eager == padded
            same += agree.sum().item()
            total += agree.numel()
            edge_same += (agree & near).sum().item()
            edge_total += near.sum().item()
        model.compiled = None
        bh, bw = bucket_of((h, w), model.backbone.pad_multiple)
        print(f"| {h}x{w} | {bh}x{bw} | {100 * same / total:.2f}% | {100 * edge_same / edge_total:.2f}% | "
              f"{100 * (same - edge_same) / (total - edge_total):.2f}% |", flush=True)


if __name__ == "__main__":
    main()
