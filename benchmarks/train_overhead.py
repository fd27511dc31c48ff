"""The `transeg train` quickstart's seconds per iteration against the bare training step it runs (issue 32:
the trainer within 15% of the bare step), with the GPU's utilisation while it trains.

1. Runs `python -m transeg.cli train` (the quickstart: segformer-b0 from scratch on the built-in synthetic
   set, its batch, crop, amp and data workers) for --iters iterations in a temporary folder, evaluating
   only at the end, and reads the `sec_per_iter` of the last log window from its log.jsonl (the first
   window holds the warm-up: cuDNN autotuning, the allocator's first blocks).
   While it runs, the GPU's utilisation is sampled every 0.2 s (`nvidia-smi`, else
   `torch.cuda.utilization()`, else n/a); the mean is over the samples taken after the first window was
   logged and before the last one was (the steady part), or over all samples when there are too few.
2. Times the bare step on the model the run saved: forward + loss + backward + fused AdamW step
   (train_step.py's step_fn) on one random batch already on the device, at the run's batch, crop and amp,
   in the form `transeg train` uses on this device (device.paths_for: training_form, cuDNN / TF32
   switches). The difference is what the trainer adds: data loading and augmentation, host-to-device
   copies, the lr schedule, logging.

    python benchmarks/train_overhead.py                                   # the quickstart on cuda if there is one
    python benchmarks/train_overhead.py --device cpu --iters 4 --log-interval 2 --batch 2 --crop 64x64
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import yaml
from train_step import step_fn  # the bare step train_step.py times

import transeg
from transeg.bench import environment, time_interleaved
from transeg.device import native_bf16, paths_for, training_backends
from transeg.layers.fusion import set_fused


class Utilisation(threading.Thread):
    """Samples the GPU's utilisation (%) every `period` s, each tagged with how many timed log windows
    log.jsonl held then. `how`: "nvidia-smi", "torch.cuda.utilization" or None (nothing to ask)."""

    def __init__(self, device, log_path, period=0.2):
        super().__init__(daemon=True)
        self.log_path, self.period, self.samples = log_path, period, []
        self.stop = threading.Event()
        self.how, self.gpu = None, device.type == "cuda"
        if device.type == "cuda":
            if shutil.which("nvidia-smi"):
                self.how, self.index = "nvidia-smi", device.index or 0
            else:
                try:
                    torch.cuda.utilization(device)
                    self.how = "torch.cuda.utilization"
                except Exception:  # no pynvml / amdsmi, or no driver answer
                    pass

    def read(self):
        if self.how == "nvidia-smi":
            out = subprocess.run(["nvidia-smi", f"--id={self.index}", "--query-gpu=utilization.gpu",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5).stdout
            return float(out.split()[0])
        return float(torch.cuda.utilization())

    def run(self):
        while self.how and not self.stop.wait(self.period):
            try:
                value = self.read()
            except Exception:
                continue
            self.samples.append((windows(self.log_path), value))

    def mean(self, total_windows):
        """(mean %, which samples) over the steady part, or all samples; (None, why) when there are none."""
        if not self.how:
            return None, "no nvidia-smi or NVML" if self.gpu else "not a GPU"
        steady = [v for n, v in self.samples if 1 <= n < total_windows]
        if len(steady) >= 3:
            return statistics.mean(steady), f"{len(steady)} samples, windows 2-{total_windows}"
        if self.samples:
            return statistics.mean(v for _, v in self.samples), f"{len(self.samples)} samples, whole run"
        return None, "no samples"


def windows(log_path):
    """The timed log windows (records with sec_per_iter) log.jsonl holds now."""
    try:
        return sum('"sec_per_iter"' in line for line in log_path.read_text().splitlines())
    except OSError:
        return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto = cuda when available, else cpu")
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--log-interval", type=int, default=20, help="iterations per log window (the last is reported)")
    ap.add_argument("--batch", type=int, default=None, help="default: the quickstart's (8)")
    ap.add_argument("--crop", default=None, help="HxW; default: the quickstart's (the synthetic images' 128x128)")
    ap.add_argument("--workers", type=int, default=None, help="data workers; default: the quickstart's")
    ap.add_argument("--runs", type=int, default=20, help="bare steps timed")
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    paths = paths_for(device)
    env = environment(device)

    sets = [f"iters={args.iters}", f"eval_interval={args.iters}", f"ckpt_interval={args.iters}",
            f"log_interval={args.log_interval}"]
    if args.batch:
        sets.append(f"batch_size={args.batch}")
    if args.crop:
        sets.append(f"crop_size=[{args.crop.replace('x', ',')}]")
    with tempfile.TemporaryDirectory(prefix="train_overhead-") as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "transeg.cli", "train", "--device", str(device), "--out", str(run_dir)]
        cmd += (["--workers", str(args.workers)] if args.workers is not None else []) + ["--set", *sets]
        print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
        sampler = Utilisation(device, run_dir / "log.jsonl")
        sampler.start()
        t = time.perf_counter()
        # the trainer's own output goes to stderr: stdout is this script's table
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ)
        sys.stderr.write(done.stdout)
        code = done.returncode
        trainer_wall = time.perf_counter() - t
        sampler.stop.set()
        sampler.join()
        if code != 0:
            sys.exit(f"transeg train exited {code}")
        records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
        timed = [r for r in records if "sec_per_iter" in r]
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        model = transeg.load(run_dir / "model.safetensors")

    util, util_how = sampler.mean(len(timed))
    batch, (h, w), workers = cfg["batch_size"], cfg["crop_size"], cfg["workers"]
    chosen = re.search(r"^data: .*?(\d+) workers? \(", done.stdout, re.MULTILINE)  # what workers: auto chose
    workers = f"{chosen.group(1)} (auto)" if workers == "auto" and chosen else workers
    amp = cfg["amp"] if cfg["amp"] != "auto" else ("bf16" if native_bf16(device) else "no")
    dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]

    model = model.to(device).train()
    set_fused(model, paths.training_form == "fused")  # as the trainer builds it on this device
    training_backends(paths)
    x = torch.randn(batch, 3, h, w, device=device)
    label = torch.randint(0, model.num_classes, (batch, h, w), device=device)
    bare = statistics.median(time_interleaved({"bare": step_fn(model, x, label, dtype)}, device, args.warmup,
                                              args.runs)["bare"])
    trainer = timed[-1]["sec_per_iter"]

    print(f"# `transeg train` against its bare step — {env['device']}, {env['threads']} threads, torch {env['torch']}; "
          f"trainer: {args.iters} iterations in {trainer_wall:.0f} s wall (start-up and the final evaluation included), "
          f"s/iter of its last log window of {args.log_interval}; bare step: median of {args.runs} after {args.warmup} "
          f"warm-up\n")
    print("| model | batch | crop | amp | training form | data workers | trainer s/iter | bare step s/iter | "
          "trainer / bare | GPU utilisation % |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    util_cell = f"{util:.0f} ({util_how})" if util is not None else f"n/a ({util_how})"
    print(f"| {model.meta.get('variant', cfg['model'])} | {batch} | {h}x{w} | {amp} | {paths.training_form} | {workers} | "
          f"{trainer:.4f} | {bare:.4f} | {trainer / bare:.2f}x | {util_cell} |")
    print(f"\nGoal (issue 32): `transeg train` within 15% of the bare step: "
          f"{'met' if trainer <= 1.15 * bare else 'not met'} ({100 * (trainer / bare - 1):+.0f}%).")


if __name__ == "__main__":
    main()
