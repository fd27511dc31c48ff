"""Tiled, streamed inference (transeg.tiled): the grid covers every pixel, the blend has no seams, memory does
not grow with the image, and a stopped job resumes to the same file."""
import warnings
import numpy as np
import pytest
import torch
from torch import nn

import transeg
from transeg.errors import TransegError
from transeg.protocol import Protocol
from transeg.tiled import Axis, Grid, labels_of, predict_array, weight_window


class PerPixel(nn.Module):
    """A segmentor whose receptive field is one pixel (a 1x1 convolution at full resolution), with the
    interface tiled inference drives: `logits`, `meta`, `num_classes`, `classes`, `palette`. `spread` scales its
    logits so that near-ties (which float rounding could flip between two summation orders) are rare."""

    def __init__(self, num_classes=5, spread=20.0, position=False):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, num_classes, 1)
        with torch.no_grad():
            self.conv.weight.mul_(spread)
        self.position = position
        self.num_classes = num_classes
        self.meta = {"mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375], "variant": "per-pixel"}
        self.classes = [f"c{i}" for i in range(num_classes)]
        self.palette = [[40 * i, 255 - 40 * i, (90 * i) % 256] for i in range(num_classes)]

    def logits(self, x):
        out = self.conv(x)
        if self.position:  # a window-relative term: windows then disagree where they overlap
            h, w = x.shape[-2:]
            ramp = torch.linspace(-3, 3, w)[None, None, None, :] * torch.arange(self.num_classes)[None, :, None, None]
            out = out + ramp * torch.linspace(1, 2, h)[None, None, :, None]
        return out


def _scene(h, w, seed=0):
    """A smooth synthetic RGB image: a few colour regions with noise, like an aerial scene."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 16 + 2, w // 16 + 2, 3), dtype=np.uint8)
    big = np.kron(small, np.ones((16, 16, 1), np.uint8))[:h, :w]
    return np.clip(big.astype(int) + rng.integers(-20, 21, big.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("extent,window,overlap", [(100, 100, 10), (99, 128, 32), (1000, 256, 32), (1001, 256, 128),
                                                   (257, 256, 0), (5000, 1024, 128)])
def test_blocks_partition_the_axis_and_each_lies_in_its_window(extent, window, overlap):
    """Blocks tile [0, extent) with no gap or overlap; window i covers block i whole; window i - 1 reaches at most
    `overlap` pixels into it and window i + 1 does not reach it: the two-windows-per-pixel property the blender
    rests on."""
    axis = Axis.cover(extent, window, overlap)
    blocks = [axis.block(i) for i in range(axis.count)]
    assert blocks[0][0] == 0 and blocks[-1][1] == extent
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(blocks, blocks[1:] + [(extent, extent + 1)]))
    for i, (a, b) in enumerate(blocks):
        start = i * axis.stride
        assert start == a and start + axis.window >= b  # window i covers block i
        if i:
            assert (i - 1) * axis.stride + axis.window == a + axis.overlap  # window i-1 ends `overlap` into it
    assert (axis.count - 1) * axis.stride + axis.window >= extent  # the last window reaches the edge


def test_overlap_above_half_the_window_is_refused():
    with pytest.raises(TransegError, match="between 0 and half the window"):
        Grid.cover((1000, 1000), 256, 129)


def test_hann_weights_cross_fade_to_one():
    """Across a seam the two windows' Hann weights sum to 1 (sin^2 + cos^2) to float32 rounding, 1e-6: the
    blend is a weighted average wherever windows overlap."""
    axis = Axis.cover(1000, 256, 64)
    w = weight_window((1, axis.window), (0, axis.overlap))[0]
    total = torch.zeros(axis.count * axis.stride + axis.window)
    for i in range(axis.count):
        total[i * axis.stride:i * axis.stride + axis.window] += w
    inner = total[axis.overlap:(axis.count - 1) * axis.stride + axis.overlap]  # away from the outer edges
    assert torch.allclose(inner, torch.ones_like(inner), atol=1e-6)


@pytest.mark.parametrize("blend", ["hann", "gaussian", "mean"])
@pytest.mark.parametrize("batch", [1, 3])
def test_per_pixel_model_tiles_equal_the_whole_image(blend, batch):
    """A model that sees one pixel at a time gives every window the same scores at a pixel, so tiled labels
    equal whole-image labels exactly: 0 of 300 x 250 pixels differ, whatever the blend and batching, on an
    image whose sides are not multiples of the window (the last windows are padded)."""
    model = PerPixel()
    image = _scene(300, 250)
    x = (torch.from_numpy(image).permute(2, 0, 1)[None].float() - torch.tensor(model.meta["mean"])[:, None, None]) \
        / torch.tensor(model.meta["std"])[:, None, None]
    whole = model.logits(x)[0].argmax(0).numpy()
    tiled = labels_of(model, image, window=64, overlap=16, batch_size=batch, blend=blend)
    assert tiled.shape == (300, 250) and tiled.dtype == np.uint8
    assert int((tiled != whole).sum()) == 0


def _reference(model, image, window, overlap, blend):
    """Blending done the obvious way, the whole image's weighted scores summed in memory (the padded canvas)."""
    grid = Grid.cover(image.shape[:2], window, overlap)
    h, w = image.shape[:2]
    wh, ww = grid.rows.window, grid.cols.window
    canvas = torch.zeros(model.num_classes, (grid.rows.count - 1) * grid.rows.stride + wh,
                         (grid.cols.count - 1) * grid.cols.stride + ww)
    padded = np.zeros(canvas.shape[1:] + (3,), np.uint8)
    padded[...] = [round(v) for v in model.meta["mean"]]
    padded[:h, :w] = image
    weights = weight_window((wh, ww), (grid.rows.overlap, grid.cols.overlap), blend)
    from transeg.tiled import window_scores
    for r in range(grid.rows.count):
        for c in range(grid.cols.count):
            y, x = r * grid.rows.stride, c * grid.cols.stride
            canvas[:, y:y + wh, x:x + ww] += window_scores(model, padded[None, y:y + wh, x:x + ww])[0] * weights
    return canvas[:, :h, :w].argmax(0).numpy()


@pytest.mark.parametrize("blend", ["hann", "gaussian"])
def test_streamed_blend_equals_the_in_memory_blend(blend):
    """Windows that disagree (a window-relative term in the logits): the streamed blend, with its strips on disk
    and its blocks finished one by one, gives the labels of summing every window's weighted scores into one
    canvas; only the order of the float32 sums differs, so at most 0.1% of the pixels (near-ties) may differ."""
    model = PerPixel(spread=1.0, position=True)
    image = _scene(200, 330, seed=1)
    reference = _reference(model, image, 64, 24, blend)
    tiled = labels_of(model, image, window=64, overlap=24, batch_size=2, blend=blend)
    assert (tiled != reference).mean() <= 1e-3
    assert len(np.unique(reference)) > 1  # the position term makes the labels vary


def test_predict_array_reads_windows_from_a_memmap(tmp_path):
    """A caller's memmap is read window by window and answered block by block: the blocks tile the image
    (their areas sum to its 180 x 170 pixels) and equal the in-memory result."""
    model = PerPixel()
    image = _scene(180, 170, seed=2)
    stored = np.lib.format.open_memmap(tmp_path / "scene.npy", mode="w+", dtype=np.uint8, shape=image.shape)
    stored[:] = image
    blocks = list(predict_array(model, stored, window=64, overlap=8))
    assert sum(b.size for _, _, b in blocks) == 180 * 170
    out = np.zeros((180, 170), np.uint8)
    for top, left, labels in blocks:
        out[top:top + labels.shape[0], left:left + labels.shape[1]] = labels
    assert np.array_equal(out, labels_of(model, image, window=64, overlap=8))


def test_segformer_tiles_agree_with_the_whole_image():
    """A SegFormer sees context across windows, so tiles and the whole image may differ near the seams. An
    untrained tiny one is the worst case (its class scores are near ties everywhere, so any change of context
    flips some): with an overlap of half a 128 window its labels agree on 98.4% of a 256 x 256 image here
    (95.4% with a quarter), asserted >= 98%. A trained SegFormer-B0 at 1024 / 128: BENCHMARKS.md."""
    from conftest import TINY

    torch.manual_seed(0)
    model = transeg.create_model("segformer-b0", num_classes=4, **TINY).eval()
    image = _scene(256, 256, seed=3)
    whole = model.predict(image, protocol=Protocol(mode="whole", size_divisor=None)).labels  # no resize, as tiles
    tiled = labels_of(model, image, window=128, overlap=64)
    assert (tiled == whole).mean() >= 0.98


# ------------------------------------------------------------------------------------ files of any size
rasterio = pytest.importorskip("rasterio")
from rasterio.transform import Affine  # noqa: E402

from transeg import rasters  # noqa: E402
from transeg.tiled import Stopped, predict_file, run_scale  # noqa: E402

UTM = "EPSG:32633"
GEO = Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 4200000.0)  # 50 cm pixels, north up


def _geotiff(path, image, crs=UTM, transform=GEO, tile=256):
    """Write `image` as a tiled RGB GeoTIFF (no CRS / transform: a plain TIFF), block by block as a large one is."""
    geo = {"crs": crs, "transform": transform} if crs else {}
    with warnings.catch_warnings():  # a plain TIFF is what is meant here
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        _write_tiff(path, image, geo, tile)
    return path


def _write_tiff(path, image, geo, tile):
    h, w = image.shape[:2]
    with rasterio.open(path, "w", driver="GTiff", height=h, width=w, count=3, dtype="uint8", tiled=True,
                       blockxsize=tile, blockysize=tile, compress="deflate", **geo) as ds:
        for top in range(0, h, tile):
            window = rasterio.windows.Window(0, top, w, min(tile, h - top))
            ds.write(image[top:top + tile].transpose(2, 0, 1), window=window)


def _whole(model, image):
    x = (torch.from_numpy(image).permute(2, 0, 1)[None].float() - torch.tensor(model.meta["mean"])[:, None, None]) \
        / torch.tensor(model.meta["std"])[:, None, None]
    return model.logits(x)[0].argmax(0).numpy()


def test_geotiff_keeps_its_georeferencing_and_labels(tmp_path):
    """A 700 x 900 GeoTIFF through a per-pixel model in 256 windows: the label GeoTIFF has the input's CRS,
    transform and size, the model's class names and colours, and labels equal to the whole image's (0 differ)."""
    model = PerPixel()
    image = _scene(700, 900, seed=4)
    src = _geotiff(tmp_path / "scene.tif", image)
    done = predict_file(model, src, tmp_path / "out" / "scene.tif", window=256, overlap=32, progress=False)
    labels, meta = rasters.read_labels(done.labels)
    with rasterio.open(src) as ds:
        assert meta["crs"] == ds.crs.to_wkt() and meta["transform"] == tuple(ds.transform)[:6]
    assert labels.shape == (700, 900) and int((labels != _whole(model, image)).sum()) == 0
    assert meta["class_names"] == model.classes
    assert meta["palette"].tolist() == model.palette
    assert done.tiles == 3 * 4 and done.tiles_run == 12  # ceil((700 - 256) / 224) + 1 rows, ceil((900 - 256) / 224) + 1 columns
    assert not (tmp_path / "out" / ".scene.tif.job").exists()  # the job's scratch is gone once the file is written


def test_plain_tiff_gives_a_plain_label_tiff(tmp_path):
    """No georeferencing in, none out: a plain tiled TIFF (crs and transform None)."""
    model = PerPixel()
    src = _geotiff(tmp_path / "photo.tif", _scene(300, 260, seed=5), crs=None)
    done = predict_file(model, src, tmp_path / "photo_labels.tif", window=128, overlap=16, progress=False)
    _, meta = rasters.read_labels(done.labels)
    assert meta["crs"] is None and meta["transform"] is None


class Interrupting(PerPixel):
    """Raises KeyboardInterrupt (a Ctrl-C) at its `stop_at`-th forward pass."""

    def __init__(self, stop_at, **kwargs):
        super().__init__(**kwargs)
        self.calls, self.stop_at = 0, stop_at

    def logits(self, x):
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        return super().logits(x)


def test_stopped_job_resumes_to_the_same_file(tmp_path):
    """Ctrl-C at the 5th of 9 batches (3 x 6 windows, 2 per batch) leaves a job; without --resume it is refused
    (the user's work is not thrown away), with it only the 5 batches not done run (10 of 18 windows, counted),
    and the labels equal an uninterrupted run's, pixel for pixel."""
    image = _scene(600, 1300, seed=6)
    src = _geotiff(tmp_path / "scene.tif", image)
    options = dict(window=256, overlap=32, batch_size=2, blend="hann", progress=False)
    whole = predict_file(PerPixel(spread=1.0), src, tmp_path / "a" / "labels.tif", **options)
    out = tmp_path / "b" / "labels.tif"
    with pytest.raises(Stopped, match=r"8 of 18 tiles done.*--resume"):
        predict_file(Interrupting(stop_at=5, spread=1.0), src, out, **options)
    assert not out.exists() and (out.parent / ".labels.tif.job").is_dir()
    with pytest.raises(TransegError, match="add --resume"):
        predict_file(PerPixel(spread=1.0), src, out, **options)
    resumed = PerPixel(spread=1.0)
    calls = []
    resumed.logits = lambda x, f=resumed.logits: calls.append(x.shape[0]) or f(x)
    done = predict_file(resumed, src, out, resume=True, **options)
    assert sum(calls) == 10 and done.tiles_run == 10
    assert np.array_equal(rasters.read_labels(out)[0], rasters.read_labels(whole.labels)[0])


def test_resume_refuses_another_model(tmp_path):
    src = _geotiff(tmp_path / "scene.tif", _scene(300, 600, seed=7))
    out = tmp_path / "o" / "labels.tif"
    with pytest.raises(Stopped):
        predict_file(Interrupting(stop_at=2), src, out, window=128, overlap=16, batch_size=1, progress=False)
    other = PerPixel(num_classes=4)
    with pytest.raises(TransegError, match="another .*model"):
        predict_file(other, src, out, window=128, overlap=16, batch_size=1, progress=False, resume=True)


def test_scale_gsd_and_level_choose_the_run_resolution(tmp_path):
    """A 50 cm GeoTIFF asked for at 1 m runs at half size (factor 0.5); a level that does not exist, or a GSD
    for an image without georeferencing, is one line."""
    geo = _geotiff(tmp_path / "geo.tif", _scene(200, 300, seed=8))
    plain = _geotiff(tmp_path / "plain.tif", _scene(200, 300, seed=8), crs=None)
    with rasters.open_raster(geo) as r:
        assert run_scale(r, gsd=1.0) == pytest.approx(0.5)
        with pytest.raises(TransegError, match="level 3 does not exist"):
            run_scale(r, level=3)
    with rasters.open_raster(plain) as r, pytest.raises(TransegError, match="no georeferencing"):
        run_scale(r, gsd=1.0)
    done = predict_file(PerPixel(), geo, tmp_path / "half.tif", gsd=1.0, window=64, overlap=8, progress=False)
    assert done.run_size == (100, 150) and rasters.read_labels(done.labels)[0].shape == (200, 300)


def _big_geotiff(path, side, strip=512):
    """A side x side RGB GeoTIFF written strip by strip (never held whole): blocky colour regions with noise."""
    rng = np.random.default_rng(side)
    with rasterio.open(path, "w", driver="GTiff", height=side, width=side, count=3, dtype="uint8", tiled=True,
                       blockxsize=256, blockysize=256, compress="deflate", crs=UTM, transform=GEO) as ds:
        for top in range(0, side, strip):
            h = min(strip, side - top)
            small = rng.integers(0, 256, (3, h // 32 + 1, side // 32 + 1), dtype=np.uint8)
            block = np.kron(small, np.ones((1, 32, 32), np.uint8))[:, :h, :side]
            block += rng.integers(0, 16, block.shape, dtype=np.uint8)
            ds.write(block, window=rasterio.windows.Window(0, top, side, h))
    return path


PEAK = """
import resource, sys
sys.path.insert(0, sys.argv[1])
from test_tiled import PerPixel
from transeg.device import return_freed_memory
from transeg.tiled import predict_file
return_freed_memory()  # as `transeg predict` does for tiled images
predict_file(PerPixel(), sys.argv[2], sys.argv[3], window=512, overlap=64, progress=False)
print("PEAK", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_peak_memory_does_not_grow_with_the_image(tmp_path):
    """The same model and window on a 3,000 x 3,000 and a 6,000 x 6,000 GeoTIFF, each in a fresh process, disk
    to disk (the preview, at most 2048 pixels a side either way, is left out for time). 4x the pixels would be 81 MB
    more of RGB and 27 MB more of labels if either were held whole, far more for the scores: peak RSS differs by
    less than 40 MB, the 16 MB GDAL read cache (which the larger file fills and the smaller one may not) and
    allocator noise (measured: 447 and 455 MB, 471 MB at 9,000). Before GDAL's caches were capped it was 80 MB.
    The process sets malloc up as `transeg predict` does for tiled images (`device.return_freed_memory`): with
    glibc's defaults, or the CLI's usual `keep_freed_memory`, the heap's fragmentation alone let the peak creep
    by 150-250 MB from 3,000 to 9,000 pixels a side, with constant live memory."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    peaks = {}
    for side in (3000, 6000):
        src = _big_geotiff(tmp_path / f"scene{side}.tif", side)
        run = subprocess.run([sys.executable, "-c", PEAK, str(Path(__file__).parent), str(src),
                              str(tmp_path / f"labels{side}.tif")],
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240)
        assert run.returncode == 0, run.stderr[-2000:]
        peaks[side] = int(run.stdout.split("PEAK")[-1])
    assert peaks[6000] - peaks[3000] < 40, peaks


def test_cli_predict_writes_labels_and_preview_for_a_geotiff(tmp_path, capsys):
    """`transeg predict CKPT scene.tif --out DIR`: a GeoTIFF goes through tiles (no --tile needed) and gives
    DIR/scene.tif (same size, CRS and transform) and DIR/scene_preview.png (at most 2048 a side, here the image's
    own 300 x 400 size); a truncated TIFF is one line naming it, exit status 2."""
    from conftest import TINY
    from PIL import Image

    from transeg.cli import main

    ckpt = tmp_path / "tiny.safetensors"
    transeg.save(transeg.create_model("segformer-b0", num_classes=3, classes=["a", "b", "c"], **TINY), ckpt)
    src = _geotiff(tmp_path / "scene.tif", _scene(300, 400, seed=9))
    assert main(["predict", str(ckpt), str(src), "--out", str(tmp_path / "out"), "--tile", "128", "--overlap", "16",
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "scene.tif (400x300, 12 tiles)" in printed  # 3 rows x 4 columns of 128 windows every 112 pixels
    labels, meta = rasters.read_labels(tmp_path / "out" / "scene.tif")
    assert labels.shape == (300, 400) and meta["transform"] == tuple(GEO)[:6]
    with Image.open(tmp_path / "out" / "scene_preview.png") as preview:
        assert preview.size == (400, 300)
    broken = tmp_path / "broken.tif"
    broken.write_bytes(src.read_bytes()[:5000])
    assert main(["predict", str(ckpt), str(broken), "--out", str(tmp_path / "out2"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "broken.tif" in err[0]


def test_slide_level_runs_at_that_resolution_and_answers_at_full(tmp_path):
    """A pyramidal OME-TIFF (768 x 1024 with a 384 x 512 level, as slides store them) asked for at level 1 runs the
    model at 384 x 512, reading its windows from level 1, and writes labels at the full 768 x 1024: on a per-pixel
    model, the argmax of level 1's whole-image scores upsampled (bilinear) to full size, except within half a
    level-1 pixel of block edges, where each block's upsampling clamps at its own edge: >= 99% of pixels agree."""
    tifffile = pytest.importorskip("tifffile")
    full = _scene(768, 1024, seed=10)
    half = full.reshape(384, 2, 512, 2, 3).mean((1, 3)).round().astype(np.uint8)
    src = tmp_path / "slide.ome.tif"
    with tifffile.TiffWriter(src, ome=True) as tif:
        tif.write(full, subifds=1, tile=(256, 256), photometric="rgb")
        tif.write(half, subfiletype=1, tile=(256, 256), photometric="rgb")
    model = PerPixel()
    done = predict_file(model, src, tmp_path / "labels.tif", level=1, window=256, overlap=32, progress=False)
    assert done.run_size == (384, 512)
    labels = rasters.read_labels(done.labels)[0]
    x = (torch.from_numpy(half).permute(2, 0, 1)[None].float() - torch.tensor(model.meta["mean"])[:, None, None]) \
        / torch.tensor(model.meta["std"])[:, None, None]
    up = torch.nn.functional.interpolate(model.logits(x), size=(768, 1024), mode="bilinear", align_corners=False)
    expected = up[0].argmax(0).numpy()
    assert labels.shape == (768, 1024) and (labels == expected).mean() >= 0.99


KILL_AT = """
import os, signal, sys
import transeg.tiled as tiled
from transeg.cli import main
calls, stop = [0], int(os.environ["KILL_AT_WINDOW"])
scores = tiled.window_scores
def counted(model, windows):
    calls[0] += 1
    if calls[0] == stop:
        os.kill(os.getpid(), signal.SIGKILL)  # no clean-up of any kind, as a kill -9 or a power cut
    return scores(model, windows)
tiled.window_scores = counted
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_killed_job_resumes_to_the_same_file(tmp_path):
    """`transeg predict` killed (SIGKILL) at its 9th of 16 forward passes, then run again with --resume: exit 0,
    and the label file equals an uninterrupted run's pixel for pixel."""
    import os
    import subprocess
    import sys

    from conftest import TINY

    ckpt = tmp_path / "tiny.safetensors"
    torch.manual_seed(1)
    transeg.save(transeg.create_model("segformer-b0", num_classes=3, classes=["a", "b", "c"], **TINY), ckpt)
    src = _geotiff(tmp_path / "scene.tif", _scene(420, 420, seed=11))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KILL_AT_WINDOW": "9"}

    def predict(out, *extra, kill=False):
        argv = ["predict", str(ckpt), str(src), "--out", str(tmp_path / out), "--tile", "128", "--overlap", "32",
                "--tile-batch", "1", "--device", "cpu", *extra]
        code = KILL_AT if kill else "import sys\nfrom transeg.cli import main\nsys.exit(main(sys.argv[1:]))"
        return subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True,
                              timeout=200)

    assert predict("whole").returncode == 0
    killed = predict("resumed", kill=True)
    assert killed.returncode == -9 and not (tmp_path / "resumed" / "scene.tif").exists()
    resumed = predict("resumed", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "8 done before" in resumed.stdout  # 4 x 4 windows; the 9th never finished
    a, b = (rasters.read_labels(tmp_path / d / "scene.tif")[0] for d in ("whole", "resumed"))
    assert np.array_equal(a, b)


def test_service_segments_large_images_in_tiles(tmp_path):
    """`transeg serve` runs an image larger than its tile window in tiles when the model's protocol does not
    resize it (memory bounded by the window): the JSON labels equal `predict(tile=...)`'s, GFLOPs count the 4
    windows of 64 a 100 x 100 image is cut into (4x one window's), and asking for confidence is a 422 line."""
    pytest.importorskip("fastapi")
    import asyncio
    import base64
    import io
    import json

    from PIL import Image
    from conftest import TINY

    from transeg.serve.app import create_app

    torch.manual_seed(2)
    model = transeg.create_model("segformer-b0", num_classes=3, classes=["a", "b", "c"], **TINY).eval()
    app = create_app(model, tile=64)
    image = _scene(100, 100, seed=12)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")

    def call(query):
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/segment", "raw_path": b"/v1/segment", "query_string": query.encode(),
                 "root_path": "", "headers": [(b"host", b"127.0.0.1:8000"), (b"content-type", b"image/png")],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
        messages, sent = [{"type": "http.request", "body": buf.getvalue(), "more_body": False}], []

        async def receive():
            return messages.pop() if messages else {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        asyncio.run(app(scope, receive, send))
        return sent[0]["status"], json.loads(b"".join(m.get("body", b"") for m in sent[1:]))

    status, body = call("format=json&labels=true")
    assert status == 200
    labels = np.frombuffer(base64.b64decode(body["labels"]), np.uint8).reshape(100, 100)
    assert np.array_equal(labels, model.predict(image, tile=64).labels)
    status, body2 = call("format=json&confidence=true")
    assert status == 422 and "confidence is not given for images segmented in tiles" in body2["error"]
    from transeg.flops import count_gmacs, meta_model
    one = count_gmacs(meta_model("segformer-b0", num_classes=3, **TINY), (64, 64))["total"]
    assert body["gflops"] == pytest.approx(4 * one)


def test_full_disk_under_the_scratch_is_one_line_and_the_job_resumes(tmp_path, monkeypatch):
    """The scratch's disk fills (ENOSPC) at the 7th file written: one TransegError line naming the job's folder and
    --resume, nothing under the output's name; once there is room again, resume finishes it with the labels of
    an uninterrupted run."""
    import errno

    image = _scene(300, 500, seed=13)
    src = _geotiff(tmp_path / "scene.tif", image)
    options = dict(window=128, overlap=16, batch_size=1, progress=False)
    out = tmp_path / "o" / "labels.tif"
    real, calls = np.save, []

    def full(file, array, *a, **k):
        calls.append(1)
        if len(calls) == 7:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(file, array, *a, **k)

    monkeypatch.setattr(np, "save", full)
    with pytest.raises(TransegError, match=r"\.labels\.tif\.job: cannot write the job's scratch \(No space left on "
                                           r"device\); free some space and run the same command with --resume"):
        predict_file(PerPixel(), src, out, **options)
    monkeypatch.setattr(np, "save", real)
    assert not out.exists()
    predict_file(PerPixel(), src, out, resume=True, **options)
    assert np.array_equal(rasters.read_labels(out)[0], _whole(PerPixel(), image))


def test_below_full_resolution_blocks_off_the_tile_grid_are_written(tmp_path):
    """At half resolution a 1027-pixel image's blocks map to full-resolution edges that fall off any tile grid
    (512 -> 1027 / 514 rounding): the label file is written through strips, 1027 x 1027, not refused."""
    src = _geotiff(tmp_path / "odd.tif", _scene(1027, 1027, seed=14))
    done = predict_file(PerPixel(), src, tmp_path / "odd_labels.tif", window=256, overlap=0, scale=0.5,
                        progress=False)
    assert done.run_size == (514, 514) and rasters.read_labels(done.labels)[0].shape == (1027, 1027)


def test_tiffs_run_whole_without_the_large_extra(tmp_path, monkeypatch):
    """Without rasterio / tifffile a TIFF is not sent to tiles (Pillow reads it, within the pixel limit, as before
    tiling existed): needs_tiles answers False for a GeoTIFF that would otherwise be tiled."""
    import importlib.util

    from transeg.tiled import needs_tiles

    src = _geotiff(tmp_path / "geo.tif", _scene(64, 64, seed=15))
    assert needs_tiles(src)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "rasterio" else real(name, *a))
    assert not needs_tiles(src)


def test_a_job_stopped_with_another_batch_names_the_flag(tmp_path):
    src = _geotiff(tmp_path / "scene.tif", _scene(300, 600, seed=16))
    out = tmp_path / "o" / "labels.tif"
    with pytest.raises(Stopped):
        predict_file(Interrupting(stop_at=2), src, out, window=128, overlap=16, batch_size=2, progress=False)
    with pytest.raises(TransegError, match=r"another batch \(--tile-batch 2\)"):
        predict_file(PerPixel(), src, out, window=128, overlap=16, batch_size=1, progress=False, resume=True)
