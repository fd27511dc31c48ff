"""Kernel-launch and host-sync proxies a CPU can measure (issue 32, item 6): the ATen operations one training step
and one batch-1 inference dispatch, by operator, and the scalar reads that force a host synchronisation.

On a GPU at small batch the cost is the number of kernels launched and the times the host waits for the device,
not the arithmetic (../shared/perf/gpu-h200.md: the H200 profile of a SegFormer-B0 training step launched 10,259
kernels, 2,852 of them `mm`, 1,376 each of `nll_loss_forward`, `scatter_add_` and `addmm_`). Both can be counted
on a CPU: every ATen call below autograd passes through a `TorchDispatchMode`, and a scalar read
(`.item()`, `.tolist()`, a Python `if` on a tensor) is `aten::_local_scalar_dense`.

Paths counted per model:
- training step, today's CPU path (the fused decoder, the row-blocked loss): forward + loss + backward + AdamW;
- training step, the published decoder with the plain loss (`layers.fusion.unfused`: upsample, then CE), the
  path the H200 figures point to for CUDA;
- batch-1 inference (`Segmentor.logits`).

    python benchmarks/dispatch_count.py --models segformer-b0,edaformer-t --batch 2

The model's own operators do not depend on the input size, but the row-blocked loss runs one block of rows at a
time, so its count grows with the height: 512x512, the H200 profile's crop, is the default.
Prints device, dtype, batch, threads and a markdown table, then the most frequent operators of each path.
"""
import argparse
import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from train_step import step_fn  # the training step as train_step.py times it (fused AdamW, as the trainer builds)

from transeg import create_model
from transeg.bench import environment

SYNC_OPS = ("aten::_local_scalar_dense",)  # a device -> host scalar read: on CUDA the host waits for the device


class Counter(TorchDispatchMode):
    """Counts every ATen operation dispatched inside it, by name (overload dropped)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func._schema.name] += 1
        return func(*args, **(kwargs or {}))


def count(fn):
    fn()  # warm-up: lazy initialisation (optimizer state, caches) is not a per-step cost
    with Counter() as counter:
        fn()
    return counter.ops


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="segformer-b0")
    ap.add_argument("--size", default="512x512",
                    help="input HxW (the blocked loss launches per block of rows: its count grows with the height)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--num-classes", type=int, default=150)
    ap.add_argument("--top", type=int, default=8, help="most frequent operators listed per path")
    args = ap.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    env = environment(torch.device("cpu"))
    print(f"# ATen dispatches per call — {env['device']}, {env['threads']} threads, torch {env['torch']}, fp32, "
          f"batch {args.batch} (training) / 1 (inference), {h}x{w}, {args.num_classes} classes\n")
    print("| model | path | ATen ops | scalar reads (host syncs) |")
    print("|---|---|---|---|")
    tops = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = create_model(name, num_classes=args.num_classes).train()
        x = torch.randn(args.batch, 3, h, w)
        label = torch.randint(0, args.num_classes, (args.batch, h, w))
        paths = {"train step, CPU path (fused decoder, blocked loss)": step_fn(model, x, label, torch.float32),
                 "train step, published decoder + plain loss": step_fn(model, x, label, torch.float32, True)}
        for path, fn in paths.items():
            ops = count(fn)
            print(f"| {name} | {path} | {sum(ops.values()):,} | {sum(ops[o] for o in SYNC_OPS)} |")
            tops.append((name, path, ops))
        model.eval()
        with torch.no_grad():
            ops = count(lambda: model.logits(x[:1]))
        print(f"| {name} | inference, batch 1 | {sum(ops.values()):,} | {sum(ops[o] for o in SYNC_OPS)} |")
        tops.append((name, "inference, batch 1", ops))
    for name, path, ops in tops:
        common = ", ".join(f"{op.removeprefix('aten::')} {n}" for op, n in ops.most_common(args.top))
        print(f"\n{name}, {path}: {common}")


if __name__ == "__main__":
    main()
