"""`transeg serve` under load: p50 / p99 latency and images/s from concurrent clients, bad uploads mixed in.

Starts the service as a real process on loopback, warms it up, then sends --requests requests from
--clients concurrent clients (one in --bad-every a non-image, which must be refused), and prints the
service's figures beside the same model's in-process `model.predict` one image at a time (no HTTP, no
batching), measured in the same run on the same machine.

    python benchmarks/serve_load.py                                  # segformer-b0, 150 classes, 512x512 photos
    python benchmarks/serve_load.py --model runs/train/model.safetensors --size 128x128
    python benchmarks/serve_load.py --device cuda --max-batch 16
"""
import argparse
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import transeg
from transeg.bench import environment
from transeg.serve.loadtest import Upload, run_load, summary


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="segformer-b0", help="a variant (random weights, 150 classes) or a checkpoint")
    ap.add_argument("--size", default="512x512", help="HxW of the uploaded images")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--bad-every", type=int, default=5, help="one request in N is a non-image (0: none)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--window-ms", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads in both processes")
    args = ap.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.model)
        if ckpt.suffix != ".safetensors":
            torch.manual_seed(0)
            ckpt = Path(tmp) / "model.safetensors"
            transeg.save(transeg.create_model(args.model, num_classes=150), ckpt)
        model = transeg.load(ckpt).optimize_for_inference(device=args.device)
        rng = np.random.default_rng(0)
        photos = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(4)]
        goods = []
        for photo in photos:
            buffer = io.BytesIO()
            Image.fromarray(photo).save(buffer, format="PNG")
            goods.append(Upload(buffer.getvalue()))
        uploads = goods  # request i sends uploads[i % len(uploads)]: with --bad-every N, N-1 photos then junk
        if args.bad_every:
            uploads = [goods[i % len(goods)] for i in range(args.bad_every - 1)] + [Upload(b"not an image", ok=False)]

        for photo in photos[:2]:  # the peer: in-process, one image at a time
            model.predict(photo)
        start = time.perf_counter()
        for i in range(20):
            model.predict(photos[i % len(photos)])
        in_process = 20 / (time.perf_counter() - start)

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
        proc = subprocess.Popen([sys.executable, "-m", "transeg.cli", "serve", str(ckpt), "--port", str(port),
                                 "--device", args.device, "--max-batch", str(args.max_batch),
                                 "--window-ms", str(args.window_ms)], env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(300):
                try:
                    urllib.request.urlopen(f"{url}/healthz", timeout=2).close()
                    break
                except OSError:
                    time.sleep(0.3)
            run_load(url, uploads, clients=args.clients, total=min(40, args.requests))  # warm-up
            start = time.perf_counter()
            results = run_load(url, uploads, clients=args.clients, total=args.requests)
            wall = time.perf_counter() - start
        finally:
            proc.terminate()
            proc.wait(10)
    s = summary(results, wall)
    env_info = environment(args.device)
    print(f"{model.meta['variant']} ({ckpt.name}), {h}x{w} PNG uploads, device {env_info['device']}, "
          f"{env_info['threads']} threads, torch {env_info['torch']}, fp32; {args.clients} clients, "
          f"max batch {args.max_batch}, window {args.window_ms} ms")
    print(f"requests {s['requests']}: good {s['good']} answered {s['answered']}, bad {s['requests'] - s['good']} "
          f"rejected {s['rejected']}")
    print(f"service: p50 {s['p50_ms']:.0f} ms, p99 {s['p99_ms']:.0f} ms, {s['images_per_s']:.1f} images/s")
    print(f"peer (in-process model.predict, one image at a time, same run): {in_process:.1f} images/s")


if __name__ == "__main__":
    main()
