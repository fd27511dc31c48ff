"""Images of any size: tiled, streamed inference (orthophotos, satellite scenes, whole-slide images).

The image is never held: windows are read from disk as they are needed, run through the model a batch at a
time, blended over their overlap and handed on (to a label file, or to the caller) as soon as they are final.

Grid. Along each axis, windows of `window` pixels start every `stride = window - overlap` pixels from 0; the
last one may run past the image's edge and is padded there with the model's mean colour (zero once
normalised, as the models pad their own inputs). An axis no longer than the window gets one window of its
own length. The overlap is at most half the window, so a pixel lies in at most two windows per axis.

Blocks. The output is cut at the windows' starts: block (r, c) spans rows [start(r), start(r + 1)) and the
columns alike. Window (r, c) covers it whole, windows (r - 1, .) and (r, c - 1) its first `overlap` rows and
columns, and no other window reaches it: it is final as soon as window (r, c) has run, in raster order.

Blending. Each window's scores are multiplied by a weight window before they are summed, and a block's
labels are the argmax of the sum (dividing by the summed weights would not change it):
- "hann" (default): sin^2 ramps over the overlap, 1 elsewhere; across a seam the two weights sum to 1, so
  the scores cross-fade from one window to the next and no seam shows;
- "gaussian": a Gaussian over the whole window, sigma = window / 8 (MONAI's default), which also favours
  the centre of each window where its context is widest;
- "mean": every window alike, mmsegmentation's slide mode (its average has the same argmax).

Memory. What is carried from one row of windows to the next (the summed scores of the overlap strip below
it, K x overlap x stride per column, float32) is kept in a scratch folder on disk, not in memory: a row of
strips grows with the image's width. In memory at once: a batch of windows through the model, their scores
(4 K window^2 bytes each), the strip in and out of one column and the strip carried to the right, and one
block's labels: bounded by window, batch and K, whatever the image's size (README, "Limits").

Resolution. `scale` runs the model on the image resized by that factor (a window of `window` model pixels
covers window / scale image pixels); each block's scores are upsampled to the image's full resolution in
class blocks (`inference.upsampled_labels`) before the argmax, so the labels are always at full resolution.

Resume. A job (`predict_file`) keeps its state in a folder beside its output: the labels of every finished
block, the carried strips and the index of the next batch, each written whole before the index moves on. A
job stopped anywhere (Ctrl-C, a kill) and started again with resume=True runs only the batches not done and
writes the same file an uninterrupted run writes: batches are fixed groups of one row's windows, so a
resumed run makes exactly the same forward passes and sums in the same order.
"""
import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import inference
from .errors import TransegError
from .inference import model_device, upsampled_labels

BLENDS = ("hann", "gaussian", "mean")
# default window and overlap (pixels at the resolution the model runs at): 1024 windows are what the SegFormer and
# EDAFormer Cityscapes tests run on (1024 x 1024 crops), and an eighth of the window (128 of 1024) is the overlap
# BENCHMARKS.md measures seams at ("Images of any size")
WINDOW = 1024
OVERLAP_FRACTION = 8  # default overlap: window // 8
# windows per forward pass by default. On a CPU one: a batch costs the sum of its windows there, so batching buys
# little and holds its activations (SegFormer-B0, 6144 x 6144 in 49 windows of 1024: batch 8 took 40 s at 2.3 GB
# peak, batch 1 44 s at 0.70 GB; BENCHMARKS.md "Images of any size"). On a GPU, where batch-1 inference is bound
# by kernel launches, as many as keep their full-size scores within this budget, up to MAX_BATCH.
SCORE_BATCH_BYTES = 2**30
MAX_BATCH = 8
JOB_VERSION = 1


@dataclass(frozen=True)
class Axis:
    """Windows along one axis: `count` windows of `window` pixels every `stride` pixels over `extent`."""

    extent: int
    window: int
    stride: int
    count: int

    @classmethod
    def cover(cls, extent, window, overlap):
        if extent <= window:
            return cls(extent, extent, extent, 1)
        stride = window - overlap
        return cls(extent, window, stride, -(-(extent - window) // stride) + 1)

    @property
    def overlap(self):
        return self.window - self.stride if self.count > 1 else 0

    def block(self, i):
        """[start, stop) of block i: from window i's start to the next window's (the last: to the edge)."""
        return i * self.stride, (self.extent if i == self.count - 1 else (i + 1) * self.stride)


@dataclass(frozen=True)
class Grid:
    """The windows and blocks over an image of `size` (h, w) at the resolution the model runs at."""

    rows: Axis
    cols: Axis

    @classmethod
    def cover(cls, size, window, overlap=None):
        """overlap None: an eighth of the window."""
        window = _pair(window, "window")
        overlap = tuple(w // OVERLAP_FRACTION for w in window) if overlap is None else _pair(overlap, "overlap")
        for w, o in zip(window, overlap):
            if o < 0 or 2 * o > w:
                raise TransegError(f"tile overlap {o} must be between 0 and half the window ({w // 2}): a pixel "
                                   "then lies in at most two windows per axis")
        return cls(*(Axis.cover(e, w, o) for e, w, o in zip(size, window, overlap)))

    @property
    def count(self):
        return self.rows.count * self.cols.count

    def out_block(self, r, c, out_size):
        """Block (r, c) at `out_size` (h, w), the image's full resolution: (top, left, height, width)."""
        (y0, y1), (x0, x1) = (_map(*axis.block(i), out, axis.extent)
                              for axis, i, out in zip((self.rows, self.cols), (r, c), out_size))
        return y0, x0, y1 - y0, x1 - x0

    def batches(self, batch_size):
        """The windows (r, c) in raster order, cut into groups of `batch_size` that never span two rows."""
        return [[(r, c) for c in range(start, min(start + batch_size, self.cols.count))]
                for r in range(self.rows.count) for start in range(0, self.cols.count, batch_size)]


def _pair(value, what):
    pair = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
    if len(pair) != 2 or any(int(v) != v or v < 0 for v in pair) or (what == "window" and min(pair) < 1):
        raise TransegError(f"tile {what} must be a whole number of pixels (or two: h, w), got {value!r}")
    return tuple(int(v) for v in pair)


def weight_window(size, overlap, blend="hann"):
    """The weights [h, w] (float32) a window's scores are multiplied by: the outer product of one weight
    per axis (module docstring: "hann", "gaussian", "mean")."""
    if blend not in BLENDS:
        raise TransegError(f"tile blend must be one of {', '.join(BLENDS)}, got {blend!r}")
    axes = []
    for n, o in zip(size, overlap):
        i = torch.arange(n, dtype=torch.float64) + 0.5
        w = torch.ones(n, dtype=torch.float64)
        if blend == "gaussian":
            w = torch.exp(-0.5 * ((i - n / 2) / (n / 8)) ** 2)
        elif blend == "hann" and o:
            ramp = torch.sin(0.5 * math.pi * i[:o] / o) ** 2
            w[:o], w[n - o:] = ramp, ramp.flip(0)
        axes.append(w)
    return (axes[0][:, None] * axes[1][None, :]).float()


def batch_for(num_classes, window, device="cpu"):
    """Windows per forward pass on `device`: 1 on a CPU; on a GPU as many as keep their scores (4 K h w bytes
    each) within SCORE_BATCH_BYTES, 1 to MAX_BATCH."""
    if torch.device(device).type == "cpu":
        return 1
    h, w = _pair(window, "window")
    return max(1, min(MAX_BATCH, SCORE_BATCH_BYTES // (4 * num_classes * h * w)))


class Source:
    """Windows of an image at the resolution the model runs at. `read(top, left, height, width)` returns
    uint8 RGB [h, w, 3] of the image it reads from, `source_size` (h, w); the model runs on it resized to
    `size`. A window reaching past the edge is padded with `fill` (the model's mean colour)."""

    def __init__(self, read, source_size, size, fill):
        self.read, self.source_size, self.size = read, tuple(source_size), tuple(size)
        self.fill = np.asarray(fill, dtype=np.uint8)

    def window(self, top, left, height, width):
        h, w = min(height, self.size[0] - top), min(width, self.size[1] - left)
        if self.source_size == self.size:
            pixels = np.asarray(self.read(top, left, h, w))
        else:  # the same box of the image it reads from, resized as the test protocols resize (bilinear, 8 bits)
            from .data.transforms import resize_image

            (y0, y1), (x0, x1) = (_map(a, a + n, src, run) for a, n, src, run in
                                  zip((top, left), (h, w), self.source_size, self.size))
            pixels = np.asarray(self.read(y0, x0, y1 - y0, x1 - x0))
            pixels = resize_image(torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1), (h, w))
            pixels = pixels.permute(1, 2, 0).numpy()
        if pixels.shape != (h, w, 3) or pixels.dtype != np.uint8:
            raise TransegError(f"a window read {pixels.dtype} {tuple(pixels.shape)}, expected uint8 ({h}, {w}, 3)")
        if (h, w) == (height, width):
            return pixels
        out = np.empty((height, width, 3), np.uint8)
        out[...] = self.fill
        out[:h, :w] = pixels
        return out


def _map(start, stop, to_extent, from_extent):
    """[start, stop) on an axis of `from_extent` pixels -> the same span on one of `to_extent` (rounded, never empty)."""
    a = round(start * to_extent / from_extent)
    b = max(a + 1, round(stop * to_extent / from_extent))
    return a, min(b, to_extent)


class Scratch:
    """What a job carries between batches, in a folder: the strips below a row of windows (one file per
    column, two sets by row parity so that a batch run again reads what it read the first time), the strip
    carried to the right (two, by batch parity), and the labels of every finished block. Files are replaced
    whole (a temporary, then a rename), so a job killed at any point finds each file old or new, never half."""

    def __init__(self, folder):
        self.folder = Path(folder)
        (self.folder / "blocks").mkdir(parents=True, exist_ok=True)

    def _put(self, name, tensor):
        path = self.folder / name
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with open(tmp, "wb") as f:
                np.save(f, tensor.numpy() if isinstance(tensor, torch.Tensor) else tensor)
            os.replace(tmp, path)
        except OSError as e:  # a full disk: the job stays resumable from its last finished batch
            tmp.unlink(missing_ok=True)
            raise TransegError(f"{self.folder}: cannot write the job's scratch ({e.strerror or e}); free some space "
                               "and run the same command with --resume") from None

    def _get(self, name):
        return torch.from_numpy(np.load(self.folder / name))

    def put_strip(self, row, col, strip):
        self._put(f"strip-{row % 2}-{col}.npy", strip)  # row: the row of windows that adds it

    def strip(self, row, col):
        return self._get(f"strip-{row % 2}-{col}.npy")

    def put_carry(self, batch, carry, corner):
        self._put(f"carry-{batch % 2}.npy", carry)
        if corner is not None:
            self._put(f"corner-{batch % 2}.npy", corner)

    def carry(self, batch, corner=True):
        return self._get(f"carry-{(batch - 1) % 2}.npy"), (self._get(f"corner-{(batch - 1) % 2}.npy") if corner else None)

    def put_block(self, row, col, labels):
        self._put(f"blocks/{row}-{col}.npy", labels)

    def block(self, row, col):
        return np.load(self.folder / "blocks" / f"{row}-{col}.npy")


class Blender:
    """Sums weighted window scores into blocks, in raster order (module docstring): `merge(r, c, scores)`
    returns block (r, c)'s labels at full resolution once window (r, c)'s weighted scores are in."""

    def __init__(self, grid, scratch, out_size, labels_dtype):
        self.grid, self.scratch, self.out_size, self.dtype = grid, scratch, tuple(out_size), labels_dtype
        self.carry = self.corner = None

    def merge(self, r, c, s):
        rows, cols = self.grid.rows, self.grid.cols
        (y0, y1), (x0, x1) = rows.block(r), cols.block(c)
        bh, bw, oy, ox = y1 - y0, x1 - x0, rows.overlap, cols.overlap
        last_row, last_col = r == rows.count - 1, c == cols.count - 1
        block = s[:, :bh, :bw]
        if r:
            block[:, :oy] += self.scratch.strip(r, c)
        if c:
            block[:, :, :ox] += self.carry
        if not last_row:  # the strip below this block, with the corner the window to its left left there
            strip = s[:, bh:bh + oy, :bw].clone()
            if c:
                strip[:, :, :ox] += self.corner
            self.scratch.put_strip(r + 1, c, strip)
        self.carry = None if last_col else s[:, :bh, bw:bw + ox].clone()
        self.corner = None if last_col or last_row else s[:, bh:bh + oy, bw:bw + ox].clone()
        return self._labels(block, r, c)

    def _labels(self, block, r, c):
        """The block's argmax at full resolution (its scores upsampled in class blocks when the model runs at
        another scale; block edges are clamped, which only touches half a model pixel at the seams)."""
        size = self.grid.out_block(r, c, self.out_size)[2:]
        if size == tuple(block.shape[-2:]):
            return block.argmax(0).numpy().astype(self.dtype)
        return upsampled_labels(block[None], size)[0][0].numpy().astype(self.dtype)


def window_scores(model, windows):
    """Scores [b, K, h, w] (float32, on the CPU) of uint8 RGB windows [b, h, w, 3] under the model's own
    normalisation, at the window size (`Segmentor.logits`: no resize, no test-time augmentation)."""
    from .data.transforms import normalize

    x = torch.from_numpy(np.ascontiguousarray(windows)).permute(0, 3, 1, 2)
    x = normalize(x, model.meta["mean"], model.meta["std"]).to(model_device(model), non_blocking=True)
    with torch.no_grad():
        return model.logits(x).float().cpu()


def stream(model, source, grid, scratch, batch_size, blend="hann", out_size=None, start=0, done=None):
    """Yield (row, col, labels) for every block of `grid`, in raster order, from batch `start` on. With `done`,
    a resumable job: each block's labels are kept in `scratch` too, and `done(k)` is called once batch k's blocks
    and carried strips are all there (the resume point)."""
    weights = weight_window((grid.rows.window, grid.cols.window), (grid.rows.overlap, grid.cols.overlap), blend)
    labels_dtype = np.uint8 if model.num_classes <= 256 else np.uint16
    blender = Blender(grid, scratch, out_size or source.size, labels_dtype)
    batches = grid.batches(batch_size)
    for k in range(start, len(batches)):
        batch = batches[k]
        r, c0 = batch[0]
        if c0:  # the strip (and corner) carried from the batch before, in this row
            blender.carry, blender.corner = scratch.carry(k, corner=r < grid.rows.count - 1)
        windows = np.stack([source.window(r * grid.rows.stride, c * grid.cols.stride, grid.rows.window,
                                          grid.cols.window) for r, c in batch])
        scores = window_scores(model, windows).mul_(weights)
        for i, (r, c) in enumerate(batch):
            labels = blender.merge(r, c, scores[i])
            if done is not None:
                scratch.put_block(r, c, labels)
            yield r, c, labels
        if blender.carry is not None:
            scratch.put_carry(k, blender.carry, blender.corner)
        if done is not None:
            done(k)


def runs_in_tiles(model, size, window=WINDOW):
    """Whether an image of `size` (h, w) given to a service runs in tiles: the model's protocol does not resize it
    (scale None) and it is larger than the window, so the model's memory is bounded by the window."""
    return model.protocol.scale is None and max(size) > max(_pair(window, "window"))


def tile_forwards(size, window=WINDOW, overlap=None):
    """(window size (h, w), how many windows): the forward passes tiled inference makes over an image of `size`."""
    grid = Grid.cover(size, window, overlap)
    return (grid.rows.window, grid.cols.window), grid.count


def mean_colour(model):
    """The model's mean colour, 0-255: what windows past the image's edge are padded with (zero once normalised)."""
    return [round(v) for v in model.meta["mean"]]


def predict_array(model, image, window=WINDOW, overlap=None, batch_size=None, blend="hann", scale=1.0,
                  scratch=None):
    """Labels of an image that need not fit in memory, block by block: yield (top, left, labels [h, w]) in
    raster order, at the image's full resolution. `image`: anything sliced as image[y0:y1, x0:x1] into
    uint8 RGB [h, w, 3] (a NumPy array or memmap, a zarr array, a `rasters.Raster`'s `read`...). The model runs
    on windows of `window` pixels (an int or (h, w)) overlapping by `overlap` (default: an eighth of the window),
    `batch_size` at a time (default:
    `batch_for`), on `image` resized by `scale`; `scratch`: the folder for what is carried between rows (default:
    a temporary folder, removed at the end)."""
    read = image.read if hasattr(image, "read") and callable(image.read) else \
        (lambda y, x, h, w: image[y:y + h, x:x + w])
    size = tuple(int(v) for v in image.shape[:2]) if hasattr(image, "shape") else (image.height, image.width)
    run_size = scaled(size, scale)
    grid = Grid.cover(run_size, window, overlap)
    batch_size = batch_size or batch_for(model.num_classes, (grid.rows.window, grid.cols.window), model_device(model))
    source = Source(read, size, run_size, mean_colour(model))
    with tempfile.TemporaryDirectory(prefix="transeg-tiles-", dir=scratch) as folder:
        for r, c, labels in stream(model, source, grid, Scratch(folder), batch_size, blend, out_size=size):
            yield (*grid.out_block(r, c, size)[:2], labels)


def scaled(size, scale):
    """The size (h, w) the model runs at for an image of `size` at `scale` (refused when not positive, or
    when it leaves the image without pixels)."""
    if not scale or scale <= 0 or not math.isfinite(scale):
        raise TransegError(f"scale must be a positive number, got {scale!r}")
    run = tuple(max(1, round(v * scale)) for v in size)
    if scale != 1 and min(v * scale for v in size) < 1:
        raise TransegError(f"scale {scale:g} leaves a {size[1]}x{size[0]} image under one pixel a side")
    return run


def labels_of(model, image, window=WINDOW, overlap=None, batch_size=None, blend="hann", scale=1.0):
    """The whole label map [H, W] of an image in memory (an HxWx3 uint8 array), made in tiles: `predict_array`
    assembled (H x W bytes more than the tiles need)."""
    dtype = np.uint8 if model.num_classes <= 256 else np.uint16
    out = np.empty(image.shape[:2], dtype)
    for top, left, labels in predict_array(model, image, window, overlap, batch_size, blend, scale):
        out[top:top + labels.shape[0], left:left + labels.shape[1]] = labels
    return out


def predict_images(model, inputs, protocol=None, probabilities=False, batch_size=1, confidence=False, tile=None,
                   overlap=None):
    """What a model's `predict` does with images (`Segmentor.predict`, the ONNX Runtime model's): an image path, PIL
    image or HxWx3 uint8 array -> a `Segmentation`, a list of them -> a list. Under the protocol
    (`inference.segment`), or with `tile` in windows of that many pixels overlapping by `overlap` at the image's
    own resolution (`labels_of`, labels only: probabilities and confidence are refused in one line)."""
    one = not isinstance(inputs, (list, tuple))
    items = [inputs] if one else inputs
    if tile is None:
        found = list(inference.segment(model, items, protocol, probabilities, batch_size, confidence=confidence))
    elif probabilities or confidence:
        raise TransegError("tiled prediction gives labels only: drop probabilities / confidence, or tile")
    else:
        found = []
        for item in items:
            rgb, source, note = inference.read_input(item)
            found.append(inference.Segmentation(labels_of(model, rgb, tile, overlap), rgb, list(model.classes),
                                                list(model.palette), source=source, note=note))
    return found[0] if one else found


def weights_digest(model):
    """A short digest of the model's weights and classes, so that a job resumes only with the model that began it."""
    h = hashlib.blake2b(digest_size=12)
    h.update(json.dumps([model.meta.get("variant"), model.num_classes]).encode())
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def clear(folder):
    shutil.rmtree(folder, ignore_errors=True)


@dataclass
class TiledPrediction:
    """What `predict_file` wrote: the label TIFF, the preview PNG, the image's size (h, w), the size the model
    ran at, the share of each class present (largest first), and the windows run by this call / in all."""

    labels: Path
    preview: Path | None
    size: tuple
    run_size: tuple
    shares: dict
    tiles_run: int
    tiles: int


def run_scale(raster, scale=None, gsd=None, level=None):
    """The factor the model runs at relative to the image's full resolution: `scale` as given; `gsd` (a ground
    sample distance in the image's CRS units, georeferenced images only) over the image's own; or the size of
    pyramid `level` over level 0's. At most one of them; none: 1."""
    given = [name for name, v in (("scale", scale), ("gsd", gsd), ("level", level)) if v is not None]
    if len(given) > 1:
        raise TransegError(f"give one of a scale, a ground sample distance or a level, not {' and '.join(given)}")
    if gsd is not None:
        if raster.pixel_size is None:
            raise TransegError(f"{raster.path}: has no georeferencing, so a ground sample distance means nothing "
                               "for it: give a scale instead")
        if not gsd > 0:
            raise TransegError(f"a ground sample distance must be positive, got {gsd!r}")
        return float(np.mean([abs(v) for v in raster.pixel_size])) / gsd
    if level is not None:
        if not 0 <= level < len(raster.levels):
            sizes = ", ".join(f"{w}x{h}" for h, w in raster.levels)
            raise TransegError(f"level {level} does not exist in {raster.path.name}: it has levels 0-"
                               f"{len(raster.levels) - 1} ({sizes})")
        return raster.levels[level][1] / raster.levels[0][1]
    return 1.0 if scale is None else float(scale)


def read_level(levels, run_size):
    """The smallest pyramid level at least as large as the size the model runs at (level 0 when none is):
    windows read from it are never upsampled, and read as few pixels as the resolution allows."""
    fits = [i for i, (h, w) in enumerate(levels) if h >= run_size[0] and w >= run_size[1]]
    return max(fits, key=lambda i: -levels[i][0] * levels[i][1]) if fits else 0


class Stopped(KeyboardInterrupt):
    """Ctrl-C during `predict_file`: the message says how many tiles are done and how to finish the job."""


def needs_tiles(path, max_pixels=None):
    """Whether `transeg predict` segments this file in tiles: a TIFF-family file (by content) that is
    georeferenced, has pyramid levels, or holds more than `max_pixels` pixels. Other images run whole, under the
    model's test protocol; so does every TIFF where the `large` extra is not installed (Pillow reads it then,
    within the pixel limit, as before tiling existed)."""
    import importlib.util

    from . import rasters

    if not rasters.is_raster(path) or not all(importlib.util.find_spec(m) for m in ("rasterio", "tifffile")):
        return False
    with rasters.open_raster(path) as raster:
        return (raster.crs is not None or raster.transform is not None or len(raster.levels) > 1
                or (max_pixels is not None and raster.height * raster.width > max_pixels))


class Job:
    """The state of one `predict_file` job, in a folder beside its output (".NAME.job"): what it runs
    (`spec`: the image, the model's weights, the grid and blending), the scratch (`Scratch`) and the next batch
    to run. A folder left by a stopped job is resumed only when asked and only for the same spec."""

    def __init__(self, out, spec, resume):
        self.folder = out.parent / f".{out.name}.job"
        self.state = self.folder / "job.json"
        self.next = 0
        if self.state.is_file():
            saved = json.loads(self.state.read_text())
            if not resume:
                raise TransegError(f"{out}: a stopped job for it is in {self.folder}: add --resume to finish it, or "
                                   "remove that folder to start again")
            changed = sorted(k for k in set(spec) | set(saved["spec"]) if spec.get(k) != saved["spec"].get(k))
            if changed:
                batch = f" (--tile-batch {saved['spec'].get('batch')})" if "batch" in changed else ""
                raise TransegError(f"{self.folder}: the stopped job ran with another {', '.join(changed)}{batch}; "
                                   "resume with the same image, model and tile settings, or remove that folder")
            self.next = int(saved["next"])
        elif self.folder.exists():
            clear(self.folder)  # a job killed before it wrote its state: nothing in it to keep
        self.spec = spec
        self.scratch = Scratch(self.folder)
        if not self.state.is_file():
            self.done(-1)

    def done(self, batch):
        self.next = batch + 1
        tmp = self.folder / ".job.json.tmp"
        tmp.write_text(json.dumps({"version": JOB_VERSION, "spec": self.spec, "next": self.next}))
        os.replace(tmp, self.state)


def _spec(model, source, raster, run_size, grid, batch_size, blend):
    stat = Path(source).stat()
    return {"image": str(Path(source).resolve()), "image_bytes": stat.st_size, "image_mtime_ns": stat.st_mtime_ns,
            "size": [raster.height, raster.width], "run_size": list(run_size), "model": weights_digest(model),
            "window": [grid.rows.window, grid.cols.window], "overlap": [grid.rows.overlap, grid.cols.overlap],
            "batch": batch_size, "blend": blend}


def predict_file(model, source, out, preview=None, window=WINDOW, overlap=None, batch_size=None, blend="hann",
                 scale=None, gsd=None, level=None, resume=False, progress=True, max_pixels=None):
    """Segment an image file of any size, disk to disk: a GeoTIFF, a TIFF, a pyramidal OME / SVS slide (through
    `rasters`), or a PNG / JPEG within `max_pixels`. Writes `out`, a tiled compressed label TIFF at the image's
    full resolution carrying its CRS and transform (a GeoTIFF when it has them), its colour map and class names,
    and `preview` (if given), a downsampled overlay PNG. The model runs on windows (`predict_array`'s window,
    overlap, batch_size, blend) at `scale`, or at ground sample distance `gsd`, or at pyramid `level`'s resolution,
    reading each window from the smallest level that holds it. Stopped (Ctrl-C, a kill), it leaves a job that
    the same call with resume=True finishes, with the same result. Returns a `TiledPrediction`. Memory: bounded
    by the window, batch and classes (module docstring); in a process that also calls
    `device.return_freed_memory()`, as `transeg predict` does, it does not creep with the job's length either."""
    from tqdm import tqdm

    from . import rasters

    from .files import output_file

    out = output_file(out, example="labels.tif", inputs=[source])  # checked before the work, not after it
    if preview is not None:
        preview = output_file(preview, example="preview.png", inputs=[source])
    with rasters.open_raster(source, max_pixels=max_pixels) as full:
        factor = run_scale(full, scale, gsd, level)
        size, levels, crs, transform = (full.height, full.width), full.levels, full.crs, full.transform
        run_size = scaled(size, factor)
        grid = Grid.cover(run_size, window, overlap)
        batch_size = batch_size or batch_for(model.num_classes, (grid.rows.window, grid.cols.window),
                                             model_device(model))
        spec = _spec(model, source, full, run_size, grid, batch_size, blend)
    job = Job(out, spec, resume)
    batches = grid.batches(batch_size)
    done_before = sum(len(b) for b in batches[:job.next])
    with rasters.open_raster(source, level=read_level(levels, run_size), max_pixels=max_pixels) as raster:
        windows = Source(raster.read, (raster.height, raster.width), run_size, mean_colour(model))
        bar = tqdm(total=grid.count, initial=done_before, unit="tile", desc=out.name, disable=not progress,
                   dynamic_ncols=True)
        try:
            with bar:
                for _ in stream(model, windows, grid, job.scratch, batch_size, blend, out_size=size,
                                start=job.next, done=job.done):
                    bar.update(1)
        except KeyboardInterrupt:
            done = sum(len(b) for b in batches[:job.next])
            raise Stopped(f"{out.name}: {done} of {grid.count} tiles done, kept in {job.folder}; the same command "
                          "with --resume finishes it") from None
    counts = np.zeros(max(model.num_classes, 1), np.int64)

    def blocks():
        for r in range(grid.rows.count):
            for c in range(grid.cols.count):
                labels = job.scratch.block(r, c)
                counts[:] += np.bincount(labels.ravel(), minlength=len(counts))[:len(counts)]
                yield (*grid.out_block(r, c, size)[:2], labels)

    # the file's tiles are the blocks when they can be (at full resolution, on one square grid whose stride TIFF
    # takes): nothing is then held at the image's width while writing
    whole = run_size == size and grid.rows.stride == grid.cols.stride and grid.cols.stride % 16 == 0
    rasters.write_labels_tiff(out, size[0], size[1], blocks(), crs=crs, transform=transform, palette=model.palette,
                              class_names=list(model.classes), tile=grid.cols.stride if whole else 512,
                              inputs=[source], whole_tiles=whole)
    if preview is not None:  # the image's thumbnail comes from its smallest adequate level
        with rasters.open_raster(source, max_pixels=max_pixels) as raster:
            rasters.preview(raster, out, preview, palette=model.palette)
    clear(job.folder)
    shares = {model.classes[i]: float(counts[i] / counts.sum()) for i in np.argsort(-counts) if counts[i]}
    return TiledPrediction(out, Path(preview) if preview else None, size, run_size, shares,
                           grid.count - done_before, grid.count)
