"""Kernel-launch and host-sync proxies a CPU can measure (issue 32, item 6): the ATen operations one training step
and one batch-1 inference dispatch, by operator, and the host reads that force a synchronisation on a GPU.

On a GPU at small batch the cost is the number of kernels launched and the times the host waits for the device,
not the arithmetic (../shared/perf/gpu-h200.md: the H200 profile of a SegFormer-B0 training step launched 10,259
kernels, 2,852 of them `mm`, 1,376 each of `nll_loss_forward`, `scatter_add_` and `addmm_`). Both can be counted
on a CPU: every ATen call below autograd passes through a `TorchDispatchMode`, and what makes a CUDA host wait is
visible there too (`SYNC_KINDS`): a scalar read (`.item()`, `int(t)`, a Python `if` on a tensor) is
`aten::_local_scalar_dense`; an operator whose output size depends on the values (`nonzero`, `unique`, boolean
indexing) reads a count back; a tensor made from host data (`torch.tensor(list)`, `new_tensor`) is
`aten::lift_fresh` here and a blocking copy to the device there. `.cpu()`, `.tolist()` and `.numpy()` of a CPU
tensor dispatch nothing, so `HostReads` counts those calls in Python.

Sections:
- training step per family, side by side: the form `transeg train` takes on a CPU (`paths_for("cpu")`: the fused
  decoder and the row-blocked loss) and on CUDA (`paths_for("cuda")`: the published decoder, upsample-then-CE),
  forward + loss + backward + fused AdamW (train_step.py's step_fn), and batch-1 inference (`Segmentor.logits`);
- trainer: `transeg.engine.train` itself on a short synthetic run, counted per optimizer step (what runs between
  two steps: the batch, `set_iteration`, `_step`) and per log window (`log_window`), in both forms.

    python benchmarks/dispatch_count.py --models segformer-b0,edaformer-t --batch 2

The model's own operators do not depend on the input size, but the row-blocked loss runs one block of rows at a
time (blocks of ~2 MB of logits: 6 rows of 512 x 150 classes), so its count grows with the image's area: 512x512,
the H200 profile's crop, is the default. Prints device, threads and markdown tables, then the most frequent
operators of each path.
"""
import argparse
import collections
import contextlib
import io
import statistics
import tempfile
from dataclasses import replace

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from train_step import step_fn  # the training step as train_step.py times it (fused AdamW, as the trainer builds)

from transeg import create_model
from transeg.bench import environment
from transeg.device import paths_for

SYNC_OPS = ("aten::_local_scalar_dense",)  # a device -> host scalar read: on CUDA the host waits for the device
SHAPE_OPS = ("aten::nonzero", "aten::_unique", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive",
             "aten::masked_select")  # output sizes read back from the device
BOOL_INDEX_OPS = ("aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_")
SYNC_KINDS = ("scalar reads", "value-sized outputs", "tensors from host data", "python reads")


def sync_kind(func, args):
    """Which of SYNC_KINDS an ATen call is (None: it runs without the host waiting for a GPU)."""
    name = func._schema.name
    if name in SYNC_OPS:
        return "scalar reads"
    if name in SHAPE_OPS:
        return "value-sized outputs"
    if name in BOOL_INDEX_OPS and len(args) > 1 and isinstance(args[1], (list, tuple)) and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1]):
        return "value-sized outputs"  # x[mask]: a nonzero inside
    if name == "aten::lift_fresh":
        return "tensors from host data"
    return None


class Counter(TorchDispatchMode):
    """Counts every ATen operation dispatched inside it, by name (overload dropped), and the host syncs among them
    by kind (`syncs`)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.syncs = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func._schema.name] += 1
        kind = sync_kind(func, args)
        if kind:
            self.syncs[kind] += 1
        return func(*args, **(kwargs or {}))


class HostReads:
    """Counts calls of Tensor.cpu / .tolist / .numpy (a read to the host on a GPU; on a CPU tensor they dispatch
    nothing) while inside, into `counts` (or the counter `target()` returns, when given). `.item()` is not wrapped:
    it dispatches `aten::_local_scalar_dense`, which `Counter` sees."""

    METHODS = ("cpu", "tolist", "numpy")

    def __init__(self, target=None):
        self.counts = collections.Counter()
        self.target = target or (lambda: self.counts)
        self.saved = {}

    def __enter__(self):
        for name in self.METHODS:
            original = self.saved[name] = getattr(torch.Tensor, name)

            def wrapped(tensor, *args, _original=original, _name=name, **kwargs):
                counter = self.target()
                if counter is not None:
                    counter[_name] += 1
                return _original(tensor, *args, **kwargs)
            setattr(torch.Tensor, name, wrapped)
        return self

    def __exit__(self, *exc):
        for name, original in self.saved.items():
            setattr(torch.Tensor, name, original)


def host_syncs(counter, reads=None):
    """{kind: count} of a Counter (and HostReads counts): what would make the host wait on a GPU."""
    out = {k: counter.syncs.get(k, 0) for k in SYNC_KINDS[:3]}
    out["python reads"] = sum((reads or {}).values())
    return out


def count(fn, warmup=None):
    """The ATen operations of one call of `fn`, after one call of `warmup` (default `fn`): lazy initialisation
    (optimizer state, caches) is not a per-step cost. Returns the Counter."""
    (warmup or fn)()
    with Counter() as counter:
        fn()
    return counter


class TrainerCounts:
    """Counts, in a real `transeg.engine.train` run started inside it, per optimizer step what runs on the model
    between two steps (`Segmentor.set_iteration`, then `_Training._step`: forward, loss, backward, optimizer,
    scheduler) and per log window (`_Training.log_window`): ATen operations and host syncs (`Counter`,
    `HostReads`). The batch (`Batches.__next__`, inside a step too when accum_steps > 1) is counted apart, in
    `data`: the DataLoader makes it on the host (in worker processes when workers > 0) and its tensors reach the
    device only through `_micro_step`'s non-blocking copy, so what it reads is host work, not a wait for the device.
    `steps` / `windows` / `data`: one {"ops": n, kind: n, ..., "by_op": Counter} per step / window / batch."""

    def __init__(self):
        self.steps, self.windows, self.data = [], [], []
        self._pending, self._current = None, None

    @staticmethod
    def _record(region):
        counter = region["counter"]
        return {"ops": sum(counter.ops.values()), **host_syncs(counter, region["reads"]), "by_op": counter.ops}

    @staticmethod
    def _new():
        return {"counter": Counter(), "reads": collections.Counter()}

    def _region(self, function, kind):
        counts = self

        def counted(*args, **kwargs):
            outer = counts._current
            if kind == "data":
                region = counts._new()
            elif outer is not None:  # (a model hook called from inside a step: the step counts it)
                return function(*args, **kwargs)
            else:
                region = counts._pending = counts._pending or counts._new()
            counts._current = region
            try:
                with region["counter"]:
                    return function(*args, **kwargs)
            finally:
                counts._current = outer
                if kind == "data":
                    counts.data.append(counts._record(region))
                    if outer is not None:  # the step's counter saw these operations too: they are the batch's
                        outer["counter"].ops.subtract(region["counter"].ops)
                        outer["counter"].syncs.subtract(region["counter"].syncs)
                elif kind != "before":  # a step or a window closes the region
                    counts._pending = None
                    (counts.steps if kind == "step" else counts.windows).append(counts._record(region))
        return counted

    def __enter__(self):
        from transeg.engine import samples, trainer
        from transeg.segmentor import Segmentor

        patches = [(trainer._Training, "_step", "step"), (trainer._Training, "log_window", "window"),
                   (Segmentor, "set_iteration", "before"), (samples.Batches, "__next__", "data")]
        self._saved = [(owner, name, owner.__dict__[name]) for owner, name, _ in patches]
        for owner, name, kind in patches:
            setattr(owner, name, self._region(owner.__dict__[name], kind))
        self._reads = HostReads(lambda: self._current["reads"] if self._current is not None else None).__enter__()
        return self

    def __exit__(self, *exc):
        self._reads.__exit__(*exc)
        for owner, name, original in self._saved:
            setattr(owner, name, original)


@contextlib.contextmanager
def training_form(form):
    """`transeg.engine.train` trains in `form` ("fused" or "published") on this CPU, the rest of the CPU's Paths
    kept (no TF32, no cuDNN switches)."""
    from transeg.engine import trainer

    original = trainer.paths_for
    trainer.paths_for = lambda device: replace(original(device), training_form=form)
    try:
        yield
    finally:
        trainer.paths_for = original


def count_trainer(cfg, form):
    """TrainerCounts of `transeg.engine.train(cfg)` trained in `form` (cfg.out is written)."""
    from transeg.engine import train

    with training_form(form), TrainerCounts() as counts, contextlib.redirect_stdout(io.StringIO()):
        train(cfg, progress=False, log=lambda *a: None)  # (the evaluation at the end prints its line)
    return counts


def trainer_section(names, batch, steps):
    """The trainer table: `steps` optimizer steps of each model on the built-in synthetic set (128x128 crops, as
    the quick start), logged every steps // 2, in both forms."""
    from transeg.engine import TrainConfig

    print(f"\n## The trainer: transeg.engine.train, synthetic 128x128 crops (6 classes: one block of rows per image in "
          f"the fused form's loss), batch {batch}, {steps} steps, log every {steps // 2}\n")
    print("| model | form | ATen ops per step (median) | host syncs per step (most) | per log window |")
    print("|---|---|---|---|---|")
    for name in names:
        for form in ("fused", "published"):
            with tempfile.TemporaryDirectory() as out:
                cfg = TrainConfig(model=name, data="synthetic:n=16", iters=steps, batch_size=batch, warmup_iters=0,
                                  log_interval=max(1, steps // 2), eval_interval=10**6, ckpt_interval=10**6, workers=0,
                                  device="cpu", out=out)
                counts = count_trainer(cfg, form)
            per_step = {k: max(s[k] for s in counts.steps) for k in SYNC_KINDS}
            per_window = {k: max(w[k] for w in counts.windows) for k in SYNC_KINDS}
            print(f"| {name} | {form} | {statistics.median(s['ops'] for s in counts.steps[1:]):,.0f} | "
                  f"{_syncs(per_step)} | {_syncs(per_window)} |", flush=True)


def _syncs(counts):
    return ", ".join(f"{n} {k}" for k, n in counts.items() if n) or "0"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="segformer-b0,edaformer-t")
    ap.add_argument("--size", default="512x512",
                    help="input HxW (the blocked loss launches per block of rows: its count grows with the area)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--num-classes", type=int, default=150)
    ap.add_argument("--top", type=int, default=8, help="most frequent operators listed per path")
    ap.add_argument("--trainer-steps", type=int, default=6, help="steps of the trainer section (0: none)")
    args = ap.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    env = environment(torch.device("cpu"))
    cpu_form, cuda_form = paths_for("cpu").training_form, paths_for("cuda").training_form
    print(f"# ATen dispatches per call — {env['device']}, {env['threads']} threads, torch {env['torch']}, fp32, "
          f"batch {args.batch} (training) / 1 (inference), {h}x{w}, {args.num_classes} classes\n")
    print(f"Training step = forward + loss + backward + fused AdamW, in the form `transeg train` takes on each device "
          f"(device.paths_for: CPU {cpu_form}, CUDA {cuda_form}).\n")
    print(f"| model | CPU path ({cpu_form}) ops | CUDA path ({cuda_form}) ops | CPU / CUDA | host syncs (CPU / CUDA) | "
          f"inference, batch 1 ops | inference host syncs |")
    print("|---|---|---|---|---|---|---|")
    tops = []
    models = args.models.split(",")
    for name in models:
        torch.manual_seed(0)
        model = create_model(name, num_classes=args.num_classes).train()
        x = torch.randn(args.batch, 3, h, w)
        label = torch.randint(0, args.num_classes, (args.batch, h, w))
        counted = {}
        for device, form in (("CPU", cpu_form), ("CUDA", cuda_form)):
            counted[device] = count(step_fn(model, x, label, torch.float32, form == "published"))
            tops.append((name, f"train step, {device} path ({form})", counted[device].ops))
        model.eval()
        with torch.no_grad():
            inference = count(lambda: model.logits(x[:1]))
        tops.append((name, "inference, batch 1", inference.ops))
        cpu, cuda = (sum(counted[d].ops.values()) for d in ("CPU", "CUDA"))
        print(f"| {name} | {cpu:,} | {cuda:,} | {cpu / cuda:.2f}x | {_syncs(host_syncs(counted['CPU']))} / "
              f"{_syncs(host_syncs(counted['CUDA']))} | {sum(inference.ops.values()):,} | "
              f"{_syncs(host_syncs(inference))} |", flush=True)
    if args.trainer_steps:
        trainer_section(models, args.batch, args.trainer_steps)
    print()
    for name, path, ops in tops:
        common = ", ".join(f"{op.removeprefix('aten::')} {n}" for op, n in ops.most_common(args.top))
        print(f"{name}, {path}: {common}\n")


if __name__ == "__main__":
    main()
