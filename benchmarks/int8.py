"""int8 on a CPU: PyTorch fp32, PyTorch native bf16, ONNX Runtime fp32, ORT int8 static and ORT int8 dynamic, one run.

For each model: latency of one forward pass (the graph: normalised [N,3,H,W] in, head-stride logits out; the same
work for every contender) at --size, batch 1 and 8, the contenders timed in turn within each round
(transeg.bench.time_interleaved); images/s; size on disk (.safetensors for PyTorch, .onnx for ORT); and, for the
model given with --checkpoint (the quick start's SegFormer-B0), mIoU on its validation set through each back-end
(`transeg eval` for each file); the others have freshly initialised weights. Static int8 is calibrated on --calibration-images images of the checkpoint's
training split through its test protocol (`transeg export --int8 --calibrate`), as a user would.

    transeg train --out runs/train                   # the quick start (or use any trained segformer-b0)
    transeg train --model edaformer-t --out runs/eda  # the quick start's settings for EDAFormer-T
    python benchmarks/int8.py --checkpoint runs/train/model.safetensors --checkpoint runs/eda/model.safetensors
    python benchmarks/int8.py --models segformer-b0 --batches 1 --runs 5   # latency only, quicker
"""
import argparse
import copy
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

import transeg
from transeg.bench import environment, summarize, time_interleaved

MODELS = "segformer-b0,segformer-b2,edaformer-t"
CONTENDERS = ("PyTorch fp32", "PyTorch bf16", "ORT fp32", "ORT int8 static", "ORT int8 dynamic")


def build(name, checkpoint, folder, calibration_images, num_classes):
    """{contender: (model in the contract inference drives, file on disk)} for one variant: the trained checkpoint
    given for it, else freshly initialised weights (latency and size only)."""
    from transeg.deploy.backend import OnnxModel
    from transeg.deploy.quantize import dataset_images, quantize_int8
    from transeg.export import export_onnx
    from safetensors.torch import save_file

    if checkpoint:
        fp32 = transeg.load(checkpoint).optimize_for_inference()
    else:
        torch.manual_seed(0)
        fp32 = transeg.create_model(name, num_classes=num_classes).optimize_for_inference()
    files = {"PyTorch fp32": folder / "fp32.safetensors", "PyTorch bf16": folder / "bf16.safetensors",
             "ORT fp32": folder / "fp32.onnx", "ORT int8 static": folder / "int8-static.onnx",
             "ORT int8 dynamic": folder / "int8-dynamic.onnx"}
    transeg.save(fp32, files["PyTorch fp32"])
    bf16 = copy.deepcopy(fp32).optimize_for_inference("bf16")
    save_file({k: v.contiguous() for k, v in bf16.state_dict().items()}, files["PyTorch bf16"])
    export_onnx(fp32, files["ORT fp32"])
    spec = fp32.meta.get("dataset")
    quantize_int8(files["ORT fp32"], files["ORT int8 static"], dataset_images(spec, "train", calibration_images),
                  calibration_images)
    quantize_int8(files["ORT fp32"], files["ORT int8 dynamic"])
    models = {"PyTorch fp32": fp32, "PyTorch bf16": bf16}
    models.update({k: OnnxModel(files[k]) for k in CONTENDERS[2:]})
    return {k: (models[k], files[k]) for k in CONTENDERS}, fp32


def cpu_name():
    """The CPU's model name and the int8 / bf16 instructions it has (Linux: /proc/cpuinfo), else the platform's."""
    import platform

    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "cpu")
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    have = [f for f in ("avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16") if f in flags]
    return f"{name} ({', '.join(have) or 'no VNNI / AMX'})"


def latency(models, size, batch, warmup, runs):
    """{contender: (summarize() dict of wall time, median CPU time of the process in ms)} of one forward pass of a
    random batch, the contenders interleaved. CPU time is the figure to compare on a machine other programs share:
    with one thread it is the wall time the pass would take alone (the wall time then includes waiting for a core)."""
    x = torch.randn(batch, 3, *size)
    cpu = {k: [] for k in models}

    def call(name, model):
        def fn():
            start = time.process_time()
            with torch.no_grad():
                model(x)
            cpu[name].append(time.process_time() - start)
        return fn

    times = time_interleaved({k: call(k, m) for k, (m, _) in models.items()}, warmup=warmup, runs=runs)
    return {k: (summarize(v), 1e3 * statistics.median(cpu[k][warmup:])) for k, v in times.items()}


def accuracy(models, trained):
    """{contender: mIoU (%)} on the trained model's validation set under its own test protocol."""
    from transeg.engine import evaluate
    from transeg.engine.evaluate import evaluation_dataset

    dataset = evaluation_dataset(trained, None, "val")
    return {k: 100 * evaluate(m, dataset, progress=False)["mIoU"] for k, (m, _) in models.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=MODELS)
    ap.add_argument("--checkpoint", action="append", default=[], help="a trained checkpoint (the quick start's "
                    "segformer-b0), used for its variant and measured for mIoU; may be repeated")
    ap.add_argument("--size", default="512x512")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--num-classes", type=int, default=150, help="classes of the untrained models (ADE20K's 150)")
    ap.add_argument("--calibration-images", type=int, default=64)
    ap.add_argument("--runs", type=int, default=7, help="timed rounds at batch 1 (batch 8: half, at least 3)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import onnxruntime

    size = tuple(int(v) for v in args.size.split("x"))
    trained_for = {transeg.load(c).meta["variant"]: c for c in args.checkpoint}
    env = environment("cpu")
    print(f"# int8 on a CPU — {cpu_name()} ({os.cpu_count()} cores), {env['threads']} threads for PyTorch and "
          f"onnxruntime, torch {env['torch']}, onnxruntime {onnxruntime.__version__}, input {size[0]}x{size[1]}, "
          f"fp32 inputs; median of {args.runs} interleaved rounds (batch 8: {max(3, args.runs // 2)}) after "
          f"{args.warmup} warm-up\n")
    print("| model | back-end, precision | batch | latency ms (IQR) | images/s | vs PyTorch fp32 | CPU ms | CPU vs PyTorch "
          "fp32 | size MB | mIoU |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory(prefix="transeg-int8-bench-") as tmp:
            checkpoint = trained_for.get(name)
            models, model = build(name, checkpoint, Path(tmp), args.calibration_images, args.num_classes)
            trained = checkpoint is not None
            miou = accuracy(models, model) if trained else {}
            name += f" ({'trained, ' if trained else ''}{model.num_classes} classes)"
            for batch in (int(b) for b in args.batches.split(",")):
                runs = args.runs if batch == 1 else max(3, args.runs // 2)
                rows = latency(models, size, batch, args.warmup, runs)
                base, base_cpu = rows["PyTorch fp32"][0]["median_ms"], rows["PyTorch fp32"][1]
                for k in CONTENDERS:
                    (r, cpu), mb = rows[k], os.path.getsize(models[k][1]) / 1e6
                    acc = f"{miou[k]:.2f}" if k in miou else "–"
                    print(f"| {name} | {k} | {batch} | {r['median_ms']:.1f} ({r['p25_ms']:.1f}-{r['p75_ms']:.1f}) | "
                          f"{1e3 * batch / r['median_ms']:.1f} | {base / r['median_ms']:.2f}x | {cpu:.1f} | "
                          f"{base_cpu / cpu:.2f}x | {mb:.1f} | {acc} |", flush=True)


if __name__ == "__main__":
    main()
