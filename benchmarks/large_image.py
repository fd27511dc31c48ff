"""A 20,000 x 20,000 GeoTIFF through SegFormer-B0 in tiles, against mmseg-style whole-image slide inference.

1. Writes a synthetic GeoTIFF (`--side` pixels a side, 50 cm pixels in UTM 33N), strip by strip from the built-in
   synthetic scene generator (one 256 x 256 test scene per tile), so the script itself never holds it.
2. Runs `transeg predict CKPT scene.tif --out DIR --tile W --overlap O` in a fresh process: wall time, tiles/s
   and that process's peak RSS (ru_maxrss).
3. The same measure for mmseg's slide mode (`inference.logits_slide`, which holds the normalised image and all
   K class scores at full size) on the largest square it fits in `--slide-budget-gb` (and the memory it would
   need for the full image).
4. Seams: on a `--agree-side` square, the tiled labels against whole-image labels (one forward pass over the
   whole square), as the share of pixels that agree. Meaningful with a trained checkpoint (`--checkpoint`).

    python benchmarks/large_image.py --checkpoint runs/quickstart/best.safetensors
    python benchmarks/large_image.py --side 6000 --window 512 --overlap 64      # a quick look
    python benchmarks/large_image.py --side 6144 --scene-only --work large      # the README's example input

Prints device, dtype, batch, threads and a markdown table for BENCHMARKS.md.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import transeg
from transeg.bench import environment

# The side of one synthetic scene: 256, twice the 128-pixel scenes the quick start trains on, so that its model
# sees objects near the scale it learned (with --tile-scale 0.5, at exactly that scale).
SCENE = 256


def write_scene(path, side):
    """The synthetic GeoTIFF, scene by scene (a strip of scenes at a time: side x SCENE x 3 bytes in memory)."""
    import rasterio
    from rasterio.transform import Affine

    from transeg.data.synthetic import SyntheticDataset

    data = SyntheticDataset("test", num_samples=10**6, size=SCENE, seed=31)
    cols = -(-side // SCENE)
    with rasterio.open(path, "w", driver="GTiff", height=side, width=side, count=3, dtype="uint8", tiled=True,
                       blockxsize=SCENE, blockysize=SCENE, compress="deflate", crs="EPSG:32633",
                       transform=Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 4200000.0), BIGTIFF="IF_SAFER") as ds:
        for r in range(-(-side // SCENE)):
            h = min(SCENE, side - r * SCENE)
            strip = np.concatenate([data[r * cols + c]["image"].numpy() for c in range(cols)], axis=2)[:, :h, :side]
            ds.write(strip, window=rasterio.windows.Window(0, r * SCENE, side, h))


def run_measured(code, *argv):
    """Run Python `code` in a fresh process; (wall seconds, its peak RSS in MiB, its last stdout line)."""
    wrapped = code + "\nimport resource\nprint('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)"
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", wrapped, *argv], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if run.returncode:
        raise SystemExit(run.stderr[-3000:])
    lines = run.stdout.strip().splitlines()
    return wall, int(lines[-1].split()[1]), (lines[-2] if len(lines) > 1 else "")


TILED = """
import sys
from transeg.cli import main
assert main(["predict", *sys.argv[1:]]) == 0
"""

SLIDE = """
import json, sys, numpy as np, torch, rasterio
import transeg
from transeg.data.transforms import normalize
from transeg.inference import logits_slide
ckpt, src, side, window, stride = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
model = transeg.load(ckpt) if ckpt != "fresh" else transeg.create_model("segformer-b0", num_classes=150)
model.eval()
with rasterio.open(src) as ds:
    image = torch.from_numpy(ds.read(window=rasterio.windows.Window(0, 0, side, side)))
x = normalize(image, model.meta["mean"], model.meta["std"])[None]
with torch.no_grad():
    labels = logits_slide(model, x, (window, window), (stride, stride), batch_size=1).argmax(1)
print(json.dumps({"pixels": side * side}))
"""


def slide_bytes(side, classes):
    """What mmseg's slide mode holds for a side x side image: the image as float32 (3 planes), the K-class canvas
    and the count map (float32), and the argmax (int64)."""
    return side * side * (3 * 4 + classes * 4 + 4 + 8)


def agreement(model, src, side, window, overlap):
    """Share of pixels where tiled labels equal whole-image labels on the top-left side x side square."""
    import rasterio

    from transeg.tiled import labels_of

    with rasterio.open(src) as ds:
        image = ds.read(window=rasterio.windows.Window(0, 0, side, side)).transpose(1, 2, 0).copy()
    from transeg.protocol import Protocol

    whole = model.predict(image, protocol=Protocol(mode="whole", size_divisor=None)).labels  # no resize: as tiles run
    tiled = labels_of(model, image, window, overlap)
    return float((whole == tiled).mean())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="a trained checkpoint (default: a fresh SegFormer-B0, 150 "
                    "classes: right for speed and memory, meaningless for the seam agreement)")
    ap.add_argument("--side", type=int, default=20000)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--overlap", type=int, default=128)
    ap.add_argument("--agree-side", type=int, default=2048)
    ap.add_argument("--slide-budget-gb", type=float, default=6.0)
    ap.add_argument("--work", default=None, help="folder for the GeoTIFF and outputs (default: a temporary one; "
                    "the scene is reused when it is there)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--scene-only", action="store_true", help="write WORK/sceneSIDE.tif and stop (the README's "
                    "example input)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="transeg-large-"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / f"scene{args.side}.tif"
    if not src.exists():
        start = time.perf_counter()
        write_scene(src, args.side)
        print(f"wrote {src} ({args.side}x{args.side}) in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    if args.scene_only:
        return
    ckpt = args.checkpoint
    if ckpt is None:
        torch.manual_seed(0)
        ckpt = str(work / "b0-fresh.safetensors")
        transeg.save(transeg.create_model("segformer-b0", num_classes=150), ckpt)
    model = transeg.load(ckpt).eval()
    env = environment(torch.device("cpu"))
    from transeg.tiled import Grid, batch_for

    grid = Grid.cover((args.side, args.side), args.window, args.overlap)
    batch = batch_for(model.num_classes, args.window, "cpu")
    print(f"# {Path(ckpt).name} ({model.meta.get('variant')}, {model.num_classes} classes) — {env['device']}, "
          f"{env['threads']} threads, torch {env['torch']}, fp32, window {args.window}, overlap {args.overlap}, "
          f"batch {batch}, load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")
    out = work / "out"
    wall, peak, _ = run_measured(TILED, ckpt, str(src), "--out", str(out), "--tile", str(args.window), "--overlap",
                                 str(args.overlap), "--device", "cpu")
    rows = [("transeg tiled (predict, disk to disk)", f"{args.side}x{args.side}", grid.count,
             f"{grid.count / wall:.2f}", f"{wall:.0f}", f"{peak / 1024:.2f}")]
    need = slide_bytes(args.side, model.num_classes)
    budget = args.slide_budget_gb * 2**30
    fit = int((budget / slide_bytes(1, model.num_classes)) ** 0.5) // 64 * 64
    fit = min(fit, args.side)
    slide_grid = Grid.cover((fit, fit), args.window, args.overlap)
    wall_s, peak_s, _ = run_measured(SLIDE, ckpt, str(src), str(fit), str(args.window),
                                     str(args.window - args.overlap))
    rows.append((f"mmseg-style slide (whole image in memory), {fit}x{fit}", f"{fit}x{fit}", slide_grid.count,
                 f"{slide_grid.count / wall_s:.2f}", f"{wall_s:.0f}", f"{peak_s / 1024:.2f}"))
    rows.append((f"mmseg-style slide, {args.side}x{args.side}", f"{args.side}x{args.side}", grid.count, "-", "-",
                 f"needs {need / 2**30:.0f}+ (not run)"))
    print("| inference | image | windows | windows/s | wall s | peak RSS GiB |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(map(str, row)) + " |")
    share = agreement(model, src, args.agree_side, args.window, args.overlap)
    print(f"\nseams: tiled ({args.window}/{args.overlap}) vs whole-image labels on {args.agree_side}x{args.agree_side}:"
          f" {100 * share:.2f}% of pixels agree")
    print(json.dumps({"tiled_wall_s": round(wall, 1), "tiled_peak_gib": round(peak / 1024, 2),
                      "agreement": round(share, 5)}))


if __name__ == "__main__":
    main()
