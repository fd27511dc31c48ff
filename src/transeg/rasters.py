"""Images of any size, read in windows and written in blocks: the input and output of tiled inference.

Reading (`open_raster` -> `Raster`): a reader over ONE resolution level of one image, whose `read(top, left,
height, width)` returns that window as uint8 RGB `[h, w, 3]` and whose `thumbnail(max_side)` returns the whole
image decimated. Which reader opens a file is decided by its content, never by its name:

- not a TIFF (no TIFF / BigTIFF magic bytes: PNG, JPEG, WebP...): decoded whole by `transeg.images.read_image`,
  whose pixel bound (`max_pixels`) applies, and wrapped as a one-level Raster without georeferencing;
- a TIFF that tifffile flags as a slide or microscopy format (OME-TIFF, Aperio SVS, Hamamatsu NDPI, Leica SCN,
  Philips, Ventana BIF, QPI), or whose resolution levels are stored as SubIFDs (which GDAL does not read as
  overviews): tifffile + `aszarr()` + zarr, each window decoding only the tiles it touches; levels are the
  first series' levels; no georeferencing (a GeoTIFF with SubIFDs goes to rasterio, keeping its CRS);
- any other TIFF (GeoTIFF, Cloud-Optimised GeoTIFF, plain TIFF): rasterio (GDAL) windowed reads; levels are
  the full image followed by the file's internal overviews.

Bands: RGB uint8 as it is; one band (grey) repeated to three; two bands (grey + alpha) the first repeated;
three or more (RGBA, multispectral) the first three; a one-band uint8 TIFF with a colour map (palette) through
its colours. Any other type (uint16, int16, int32, float...) is stretched per band: the 2nd and 98th
percentiles of the band's finite values (nodata excluded) in a thumbnail of at most `STRETCH_SIDE` pixels a
side, computed once per Raster on its first read, map linearly to 0 and 255 (clipped; NaN -> 0), so that every
window of a file is scaled identically and neighbouring windows agree.

Limits: a window is decoded tile by tile; GDAL's block cache is capped while a Raster reads at `READ_CACHE_MB`
or two rows of the file's tiles at full width, whichever is more (GDAL's own default, 5% of RAM, would let
memory grow with the image); the tifffile reader keeps no cache; a thumbnail is read decimated (nearest) from the
smallest level at least its size (GDAL picks an overview itself), so its memory is the thumbnail's plus what
the decoder holds; a TIFF stored as one compressed strip is decoded whole by its reader on the first read.
A Raster is used by one thread at a time.

Writing (`write_labels_tiff`): a tiled, DEFLATE-compressed label TIFF from blocks of labels arriving in raster
order, written atomically (`transeg.files.atomic_write`), with the class colours as its colour map and the class
names as JSON in band 1's metadata (the TIFF's GDAL_METADATA tag: `rasterio.open(p).tags(1)["class_names"]`),
and the CRS and transform when given (then a GeoTIFF). Blocks made of whole tiles of the file (tiled inference's
at full resolution, `whole_tiles=True`) are written as they come; others are gathered into strips of `tile` rows at full width; plus
GDAL's block cache, capped at `WRITE_CACHE_MB` while writing.
(GDAL's cache is one per process: the caps hold while these functions run.)

Every problem the user can fix (a truncated or corrupt TIFF, a compression that cannot be decoded, a level that
does not exist, the optional extra missing, a full disk) is one `TransegError` line naming the file.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
import os
import stat
import warnings
from pathlib import Path

import numpy as np

from . import viz
from .errors import TransegError
from .files import atomic_write, output_file, regular_file
from .images import read_image

TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # TIFF and BigTIFF, little- and big-endian
SLIDE_FLAGS = ("is_ome", "is_svs", "is_ndpi", "is_scn", "is_philips", "is_bif", "is_qpi")
STRETCH_SIDE = 1024  # side of the thumbnail the 2-98% stretch of non-uint8 images is computed from
STRETCH_PERCENTILES = (2.0, 98.0)
READ_CACHE_MB = 16  # GDAL's block cache while a Raster reads: at least this, or 2 rows of the file's tiles (a window
# of tiled inference touches a few rows of tiles; more cache would only fill up on larger images)
WRITE_CACHE_MB = 16  # GDAL's block cache while a label TIFF is written (whole tiles are written as they come)
LARGE_EXTRA = "pip install 'transeg[large]'"
MAX_CLASSES = 65536  # uint16 labels


def is_raster(path) -> bool:
    """True when `path` is a regular file that starts with the TIFF or BigTIFF magic bytes, whatever its
    suffix: such files are read in windows (`open_raster`), at any size. False for anything else, including
    a missing file or a FIFO (which is never read)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with open(path, "rb") as f:
            return f.read(4) in TIFF_MAGIC
    except (OSError, ValueError):
        return False


def _module(name, path, doing="reading TIFF images"):
    """Import an optional dependency of the `large` extra, or one line saying how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise TransegError(f"{path}: {doing} needs the optional extra ({name} is not installed): "
                           f"{LARGE_EXTRA}") from None


@contextlib.contextmanager
def _quiet_tifffile():
    """tifffile logs a warning for each damaged IFD it skips; the user gets our one line instead."""
    logger = logging.getLogger("tifffile")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _sizes(levels):
    return ", ".join(f"{w}x{h}" for h, w in levels)


def _check_level(name, level, levels):
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or not 0 <= level < len(levels):
        have = f"levels 0-{len(levels) - 1}" if len(levels) > 1 else "level 0 only"
        raise TransegError(f"level {level} does not exist in {name}: it has {have} ({_sizes(levels)})")
    return int(level)


def _thumb_size(height, width, max_side):
    if not isinstance(max_side, (int, np.integer)) or max_side < 1:
        raise TransegError(f"thumbnail: max_side must be a positive whole number of pixels, got {max_side!r}")
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _picks(size, n):
    """`n` indices spread over `size` (centres of equal cells): nearest-neighbour decimation."""
    return np.minimum(((np.arange(n) + 0.5) * (size / n)).astype(np.int64), size - 1)


def _reason(e):
    """The first line of an exception and of the exceptions chained to it (rasterio's "Read failed" hides GDAL's
    own message in its cause)."""
    seen, parts = set(), []
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e).strip().splitlines()
        if text and not any(text[0] in p for p in parts) and "See previous exception" not in text[0]:  # rasterio
            parts.append(text[0])
        e = e.__cause__ or e.__context__
    return ": ".join(parts[:2]) or "unknown error"


_CODEC_WORDS = ("codec", "compression", "imagecodecs", "not implemented", "not configured", "not supported")


def _compression(path):
    """(name, code) of the compression of the TIFF's first image, from its tags; ("unknown", None)."""
    try:
        tifffile = importlib.import_module("tifffile")
        with _quiet_tifffile(), tifffile.TiffFile(path) as tif:
            code = int(tif.pages[0].tags["Compression"].value)
    except Exception:  # the file is too damaged to say
        return "unknown", None
    try:
        return tifffile.COMPRESSION(code).name, code
    except ValueError:
        return "unknown", code


def _decode_error(name, path, e):
    """One TransegError line for a reader's failure: a compression the reader cannot decode, named from the
    file's tags, or a corrupt / truncated file."""
    reason = _reason(e)
    for prefix in (f"{path}: ", f"{name}: "):  # GDAL starts its messages with the file's name
        reason = reason.removeprefix(prefix)
    if any(w in reason.lower() for w in _CODEC_WORDS):
        what, code = _compression(path)
        if "imagecodecs" in reason:
            fix = "tifffile decodes it with the imagecodecs package: pip install imagecodecs"
        else:
            fix = (f"this GDAL cannot decode it ({reason}); convert it, e.g. gdal_translate -co COMPRESS=DEFLATE "
                   f"-co TILED=YES {name} converted.tif")
        return TransegError(f"{name}: unsupported compression {what} (TIFF compression {code}): {fix}")
    return TransegError(f"{name}: corrupt or truncated TIFF, cannot read it ({reason})")


def _check_complete(tif, name):
    """TransegError when the image data of the TIFF's first series lies beyond the end of the file: a
    truncated copy or download is refused when it is opened, not after hours of windows."""
    size = tif.filehandle.size
    end = 0
    for level in tif.series[0].levels:
        for page in list(level.pages)[:64]:
            if page is None:
                continue
            counts = np.asarray(page.databytecounts, dtype=np.int64)
            offsets = np.asarray(page.dataoffsets, dtype=np.int64)
            if counts.size and counts.shape == offsets.shape:
                end = max(end, int((offsets + counts).max()))
    if end > size:
        raise TransegError(f"{name}: truncated TIFF: its image data runs to byte {end:,} but the file has "
                           f"{size:,} bytes (an interrupted copy or download?); copy it again")


class Raster:
    """A reader over one resolution level of an image (a context manager: `with open_raster(p) as r:`).

    height, width: of the chosen level; level: 0 = full resolution; levels: (height, width) of every level,
    level 0 first; crs: WKT, None when not georeferenced; transform: the chosen level's affine (a, b, c, d, e, f)
    as rasterio's Affine, None when the file has none; pixel_size: (x, y) ground sample distance in CRS units
    of the chosen level, None without a transform. Open one with `open_raster`."""

    def __init__(self, path, name, level, levels, crs=None, transform=None):
        self.path, self.name, self.level, self.levels = Path(path), name, level, list(levels)
        self.height, self.width = self.levels[level]
        self.crs, self.transform = crs, transform
        self.pixel_size = None if transform is None else (math.hypot(transform[0], transform[3]),
                                                          math.hypot(transform[1], transform[4]))
        self._stretch = None  # (lo, hi) per band for non-uint8 data, computed on the first read
        self._lut = None  # [256, 3] colour map of a paletted band

    # the readers implement these two, returning raw values [h, w, bands] in the file's type
    def _raw(self, top, left, height, width):
        raise NotImplementedError

    def _raw_thumb(self, height, width):
        raise NotImplementedError

    def read(self, top, left, height, width) -> np.ndarray:
        """The window of `height` x `width` pixels at (`top`, `left`) of this level, uint8 RGB `[h, w, 3]`. The
        box must lie inside the image (ValueError otherwise: the caller's windows are wrong)."""
        box = [int(v) for v in (top, left, height, width)]
        if box[2] < 1 or box[3] < 1 or box[0] < 0 or box[1] < 0 or box[0] + box[2] > self.height \
                or box[1] + box[3] > self.width:
            raise ValueError(f"{self.name}: window top={top} left={left} height={height} width={width} does not "
                             f"lie inside the {self.width}x{self.height} image")
        return self._rgb(self._guard(self._raw, *box))

    def thumbnail(self, max_side) -> np.ndarray:
        """The whole image, uint8 RGB, at most `max_side` pixels a side (aspect kept; never enlarged), decimated
        (nearest) from the smallest level at least that large: memory of the order of the thumbnail's."""
        return self._rgb(self._guard(self._raw_thumb, *_thumb_size(self.height, self.width, max_side)))

    def _guard(self, fn, *args):
        try:
            return fn(*args)
        except TransegError:
            raise
        except Exception as e:  # GDAL's, tifffile's, zlib's, zarr's decode errors
            raise _decode_error(self.name, self.path, e) from None

    def _stretch_of(self):
        """For non-uint8 data: the per-band 2-98% stretch (lo, hi) from a thumbnail, computed on the first read
        (opening a file to look at its size costs no thumbnail) and fixed for every later window."""
        if self._stretch is None:
            raw = self._guard(self._raw_thumb, *_thumb_size(self.height, self.width, STRETCH_SIDE))
            lo, hi = [], []
            for band in np.moveaxis(raw.astype(np.float64), -1, 0):
                values = band[np.isfinite(band) & ~self._nodata_mask(band)]
                a, b = np.percentile(values, STRETCH_PERCENTILES) if values.size else (0.0, 1.0)
                lo.append(a)
                hi.append(b if b > a else a + 1.0)
            self._stretch = (np.asarray(lo), np.asarray(hi))
        return self._stretch

    def _nodata_mask(self, band):
        return np.zeros(band.shape, dtype=bool)

    def _rgb(self, raw):
        """Raw values [h, w, bands] -> uint8 RGB [h, w, 3] by the rules in the module's docstring."""
        if self._lut is not None:
            return self._lut[raw[..., 0]]
        if raw.dtype != np.uint8:
            lo, hi = self._stretch_of()
            x = (raw.astype(np.float32) - lo.astype(np.float32)) * (255.0 / (hi - lo)).astype(np.float32)
            raw = np.clip(np.rint(np.nan_to_num(x, nan=0.0)), 0, 255).astype(np.uint8)
        if raw.shape[-1] < 3:
            raw = np.repeat(raw[..., :1], 3, axis=-1)
        return np.ascontiguousarray(raw[..., :3])

    def close(self):
        """Release the file."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (f"{type(self).__name__}({str(self.path)!r}, level={self.level}, {self.width}x{self.height}, "
                f"levels={len(self.levels)}, georeferenced={self.crs is not None})")


def _read_env(rasterio, ds):
    """GDAL's block cache (process-wide, LRU) capped while we read: READ_CACHE_MB, or two rows of the file's tiles
    at full width when that is more (a decimated read of a file without overviews visits every tile of a row for
    each output row: with less cache each tile would be decoded again and again, 50x slower). Without a cap GDAL
    keeps up to 5% of RAM of decoded tiles, and memory would grow with the image. In bytes: rasterio hands
    GDAL_CACHEMAX to GDALSetCacheMax64."""
    tile_rows = 2 * ds.width * ds.block_shapes[0][0] * ds.count * np.dtype(ds.dtypes[0]).itemsize
    return rasterio.Env(GDAL_CACHEMAX=max(READ_CACHE_MB << 20, tile_rows))


def _bands(count):
    """Which bands are read: 1 -> [1]; 2 (grey + alpha) -> [1]; 3 or more -> [1, 2, 3]."""
    return [1, 2, 3] if count >= 3 else [1]


class _GdalRaster(Raster):
    """GeoTIFF / plain TIFF through rasterio: level 0 is the image, level k its (k-1)th internal overview."""

    def __init__(self, path, name, level):
        rasterio = _module("rasterio", name)
        self._rio = rasterio
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            try:
                with rasterio.open(path) as base:
                    levels = [(base.height, base.width)] + self._overview_sizes(path, len(base.overviews(1)))
                level = _check_level(name, level, levels)
                self._ds = rasterio.open(path, **({"overview_level": level - 1} if level else {}))
            except (rasterio.errors.RasterioError, OSError) as e:
                raise _decode_error(name, path, e) from None
        ds = self._ds
        georef = ds.crs is not None or not ds.transform.is_identity
        super().__init__(path, name, level, levels, ds.crs.to_wkt() if ds.crs else None,
                         tuple(ds.transform)[:6] if georef else None)
        self._indexes = _bands(ds.count)
        self._nodata = [ds.nodatavals[i - 1] for i in self._indexes]
        if ds.count == 1 and ds.dtypes[0] == "uint8" and ds.colorinterp[0] == rasterio.enums.ColorInterp.palette:
            self._lut = np.zeros((256, 3), dtype=np.uint8)
            for i, rgba in ds.colormap(1).items():
                self._lut[i] = rgba[:3]
        try:
            self._guard(self._raw, 0, 0, 1, 1)  # decodes one tile now: a codec GDAL lacks fails at open
        except TransegError:
            ds.close()
            raise

    def _overview_sizes(self, path, count):
        sizes = []
        for k in range(count):
            with self._rio.open(path, overview_level=k) as ov:
                sizes.append((ov.height, ov.width))
        return sizes

    def _raw(self, top, left, height, width):
        window = self._rio.windows.Window(left, top, width, height)
        with _read_env(self._rio, self._ds):
            return np.moveaxis(self._ds.read(self._indexes, window=window), 0, -1)

    def _raw_thumb(self, height, width):
        with _read_env(self._rio, self._ds):
            out = self._ds.read(self._indexes, out_shape=(len(self._indexes), height, width),
                                resampling=self._rio.enums.Resampling.nearest)
        return np.moveaxis(out, 0, -1)

    def _nodata_mask(self, band):
        mask = np.zeros(band.shape, dtype=bool)
        for value in {v for v in self._nodata if v is not None and not math.isnan(v)}:
            mask |= band == value
        return mask

    def close(self):
        self._ds.close()


class _SlideRaster(Raster):
    """Pyramidal OME-TIFF / SVS / NDPI / SubIFD pyramids through tifffile + zarr: the first series' levels."""

    def __init__(self, path, name, level, tif):
        self._zarr, self._tif, self._arrays = _module("zarr", name), tif, {}
        series = tif.series[0]
        self._axes = series.axes
        if "Y" not in self._axes or "X" not in self._axes:
            raise TransegError(f"{name}: its first image series has axes {self._axes!r}, not an image (Y and X)")
        shapes = [lv.shape for lv in series.levels]
        levels = [(s[self._axes.index("Y")], s[self._axes.index("X")]) for s in shapes]
        level = _check_level(name, level, levels)
        super().__init__(path, name, level, levels)
        self._series = series
        band_axis = next((a for a in "SC" if a in self._axes), None)
        self._nbands = 1 if band_axis is None else min(3, shapes[0][self._axes.index(band_axis)])
        if self._nbands == 2:  # grey + alpha
            self._nbands = 1
        self._band_axis = band_axis
        self._guard(self._raw, 0, 0, 1, 1)  # decodes one tile now: a missing codec fails at open

    def _array(self, level):
        if level not in self._arrays:
            self._arrays[level] = self._zarr.open(self._series.aszarr(level=level), mode="r")
        return self._arrays[level]

    def _take(self, level, rows, cols, oindex=False):
        """Values at rows x cols of `level` (slices, or index arrays with oindex) as [h, w, bands]."""
        index, kept = [], []
        for axis in self._axes:
            if axis in "YX":
                index.append(rows if axis == "Y" else cols)
                kept.append(axis)
            elif axis == self._band_axis:
                index.append(slice(0, self._nbands))
                kept.append("B")
            else:  # Z, T, other channels: the first plane
                index.append(0)
        array = self._array(level)
        out = array.oindex[tuple(index)] if oindex else array[tuple(index)]
        if "B" not in kept:
            out, kept = out[..., None], kept + ["B"]
        return np.transpose(out, [kept.index(a) for a in "YXB"])

    def _raw(self, top, left, height, width):
        return self._take(self.level, slice(top, top + height), slice(left, left + width))

    def _raw_thumb(self, height, width):
        source = max((k for k, (h, w) in enumerate(self.levels) if h >= height and w >= width), default=0)
        h, w = self.levels[source]
        return self._take(source, _picks(h, height), _picks(w, width), oindex=True)

    def close(self):
        self._arrays.clear()
        self._tif.close()


class _ArrayRaster(Raster):
    """PNG / JPEG / any format Pillow reads: decoded whole (bounded by max_pixels) and sliced."""

    def __init__(self, path, name, level, max_pixels):
        self._image, _ = read_image(path, name, max_pixels=max_pixels)
        levels = [self._image.shape[:2]]
        super().__init__(path, name, _check_level(name, level, levels), levels)

    def _raw(self, top, left, height, width):
        return self._image[top:top + height, left:left + width]

    def _raw_thumb(self, height, width):
        return self._image[np.ix_(_picks(self.height, height), _picks(self.width, width))]

    def close(self):
        self._image = None


def _is_slide(tif):
    """tifffile's reader is used for slide / microscopy formats and for pyramids in SubIFDs of a TIFF that is not
    a GeoTIFF (GDAL reads neither as levels); GDAL for the rest."""
    if any(getattr(tif, flag, False) for flag in SLIDE_FLAGS):
        return True
    if tif.is_geotiff:  # its georeferencing matters more than SubIFD levels GDAL would not list
        return False
    return bool(getattr(tif.pages[0], "subifds", None)) and len(tif.series[0].levels) > 1


def open_raster(path, level=0, max_pixels=None) -> Raster:
    """A `Raster` over level `level` (0 = full resolution) of the image at `path`; which reader, by the rules in
    the module's docstring. `max_pixels` bounds images decoded whole (not TIFFs, which are read in windows at
    any size). Raises TransegError (one line naming the file) for a missing, truncated, corrupt or undecodable
    file, a level that does not exist, or the `large` extra not installed (TIFFs only)."""
    name = str(path)
    path = Path(regular_file(path, name))
    if not is_raster(path):
        return _ArrayRaster(path, name, level, max_pixels)
    tifffile = _module("tifffile", name)
    with _quiet_tifffile():
        try:
            tif = tifffile.TiffFile(path)
        except Exception as e:
            raise TransegError(f"{name}: corrupt or truncated TIFF, cannot read it ({_reason(e)})") from None
        try:
            if not tif.series:
                raise TransegError(f"{name}: a TIFF that holds no image")
            try:
                _check_complete(tif, name)
            except (ValueError, TypeError, AttributeError, KeyError, IndexError) as e:  # tags too damaged to read
                raise TransegError(f"{name}: corrupt TIFF, cannot read it ({_reason(e)})") from None
            if _is_slide(tif):
                return _SlideRaster(path, name, level, tif)
        except BaseException:
            tif.close()
            raise
    tif.close()
    return _GdalRaster(path, name, level)


# ------------------------------------------------------------------------------------------------ writing
class _Strips:
    """Blocks of labels in, tile-aligned strips of `tile` rows at full width out to a GDAL dataset.

    Blocks arrive in raster order of a block grid (tops never decrease) and need not be aligned to the tiles;
    a strip is written as soon as all its pixels are, and must be once a block starts at or below its bottom,
    so every tile is written whole, once. Holds the strips that the current row of blocks has started."""

    def __init__(self, ds, window, height, width, tile, dtype):
        self.ds, self.window, self.height, self.width, self.tile, self.dtype = ds, window, height, width, tile, dtype
        self.open = {}  # strip index -> [array [rows, width], pixels written]
        self.done = 0  # rows written to the file
        self.last_top = 0

    def add(self, top, left, labels):
        labels = np.asarray(labels)
        if labels.ndim != 2 or not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
            raise ValueError(f"a block of labels must be a 2-D integer array, got {labels.dtype} {labels.shape}")
        h, w = labels.shape
        if top < 0 or left < 0 or top + h > self.height or left + w > self.width or h == 0 or w == 0:
            raise ValueError(f"block at top={top} left={left} of {w}x{h} does not lie inside the "
                             f"{self.width}x{self.height} image")
        if top < self.last_top or top < self.done:
            raise ValueError(f"block at top={top} left={left} arrived after rows up to {max(self.last_top, self.done)}"
                             f": blocks must come in raster order of a block grid")
        if labels.size and (labels.min() < 0 or labels.max() > np.iinfo(self.dtype).max):
            raise ValueError(f"block at top={top} left={left} holds labels outside 0-{np.iinfo(self.dtype).max}")
        self.last_top = top
        for k in range(top // self.tile, (top + h - 1) // self.tile + 1):
            k0, k1 = k * self.tile, min((k + 1) * self.tile, self.height)
            strip = self.open.setdefault(k, [np.zeros((k1 - k0, self.width), dtype=self.dtype), 0])
            r0, r1 = max(top, k0), min(top + h, k1)
            strip[0][r0 - k0:r1 - k0, left:left + w] = labels[r0 - top:r1 - top]
            strip[1] += (r1 - r0) * w
        # a strip is written as soon as it is complete, or once blocks have moved below it (then it must be)
        while self.open and min(self.open) == self.done // self.tile and (
                self.open[min(self.open)][1] == self.open[min(self.open)][0].size
                or min(min(self.open) * self.tile + self.tile, self.height) <= top):
            self._flush(min(self.open))
        for k in sorted(k for k in self.open if min((k + 1) * self.tile, self.height) <= top):
            self._flush(k)

    def _flush(self, k):
        array, written = self.open.pop(k)
        k0 = k * self.tile
        if k0 != self.done:
            raise ValueError(f"no block covered rows {self.done}-{k0 - 1}: the blocks must cover the image")
        if written != array.size:
            raise ValueError(f"the blocks covered {written:,} of the {array.size:,} pixels of rows {k0}-"
                             f"{k0 + len(array) - 1} before moving below them (a gap, an overlap, or a block out of "
                             f"order): they must tile the image exactly, in raster order of a block grid")
        _write_strip(self.ds, array, self.window(0, k0, self.width, len(array)))
        self.done = k0 + len(array)

    def finish(self):
        for k in sorted(self.open):
            self._flush(k)
        if self.done != self.height:
            raise ValueError(f"the blocks ended at row {self.done} of {self.height}: they must cover the image")


class _Tiles(_Strips):
    """Blocks made of whole tiles of the file (starting on the tile grid, ending on it or at the image's edge), in
    raster order: each is written straight through, so nothing is held at the image's width. Used when the caller
    says so (`write_labels_tiff(whole_tiles=True)`); a block off the tile grid is then the caller's bug."""

    def __init__(self, *args):
        super().__init__(*args)
        self.next_left = 0  # where the next tile of row `done` starts

    def on_grid(self, top, left, h, w):
        """Whether a block is whole tiles: it starts on the tile grid and ends on it or at the image's edge."""
        return (h > 0 and w > 0 and not top % self.tile and not left % self.tile
                and (not h % self.tile or top + h == self.height) and (not w % self.tile or left + w == self.width))

    def add(self, top, left, labels):
        labels = np.asarray(labels)
        h, w = labels.shape[:2] if labels.ndim == 2 else (0, 0)
        if not self.on_grid(top, left, h, w):
            raise ValueError(f"block at top={top} left={left} of {w}x{h} is not whole {self.tile}-pixel tiles of the "
                             "file, as the first block was: give blocks on one grid")
        if top < self.done or (top == self.done and left < self.next_left):
            raise ValueError(f"block at top={top} left={left} arrived out of raster order")
        if top != self.done or left != self.next_left:
            raise ValueError(f"block at top={top} left={left} came before the tile at top={self.done} "
                             f"left={self.next_left}: the blocks must cover the image, in raster order")
        if labels.size and (labels.min() < 0 or labels.max() > np.iinfo(self.dtype).max):
            raise ValueError(f"block at top={top} left={left} holds labels outside 0-{np.iinfo(self.dtype).max}")
        _write_strip(self.ds, labels.astype(self.dtype, copy=False), self.window(left, top, w, h))
        self.next_left = left + w
        if self.next_left == self.width:
            self.done, self.next_left = top + h, 0

    def finish(self):
        if self.done != self.height:
            raise ValueError(f"the blocks ended at row {self.done} of {self.height}: they must cover the image")


def _write_strip(ds, array, window):
    """One strip of whole tiles into the dataset (a seam for tests that simulate a full disk)."""
    ds.write(array, 1, window=window)


def _geo(rasterio, crs, transform, where):
    """(CRS, Affine) for rasterio from a WKT / "EPSG:n" / CRS and a 6-tuple / Affine; None where not given."""
    try:
        crs = None if crs is None else rasterio.crs.CRS.from_user_input(crs)
    except Exception as e:
        raise TransegError(f"{where}: not a coordinate reference system ({_reason(e)}); give a WKT or 'EPSG:n'") \
            from None
    if transform is not None:
        values = tuple(float(v) for v in tuple(transform)[:6])
        if len(values) != 6:
            raise TransegError(f"{where}: a transform is 6 numbers (a, b, c, d, e, f), got {len(values)}")
        transform = rasterio.Affine(*values)
    return crs, transform


def _write_reason(error, folder):
    """Why GDAL failed to write: "No space left on device" when the disk is full (GDAL's own message says only
    "Write error at scanline N"), else GDAL's deepest message."""
    try:
        if os.statvfs(folder).f_bavail == 0:
            return os.strerror(28)
    except OSError:
        pass
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return _reason(error)


def write_labels_tiff(path, height, width, blocks, *, crs=None, transform=None, palette, class_names, tile=512,
                      inputs=(), whole_tiles=False):
    """Write a label image of `height` x `width` from `blocks`, an iterable of (top, left, labels [h, w]) that
    tile the image in raster order of a block grid (any block size; not aligned to `tile`), as a TIFF at `path`.

    The file: tiled `tile` x `tile` (a multiple of 16), DEFLATE-compressed, uint8 labels (uint16 when there are
    more than 256 classes), a colour map of `palette` ([K, 3], at least one colour per class), the class names as
    JSON in band 1's metadata (`tags(1)["class_names"]` in rasterio), and, with `crs` (WKT, "EPSG:n" or a rasterio
    CRS) and / or `transform` (a, b, c, d, e, f), a GeoTIFF; without them a plain tiled TIFF.
    Written atomically: under a temporary name beside `path`, renamed into place only when complete; never onto
    one of `inputs` or onto a non-regular file; a full disk leaves nothing under `path` (TransegError, one line).
    Memory: with `whole_tiles` (the caller's promise that every block is whole tiles: it starts on the tile grid
    and ends on it or at the image's edge, as tiled inference's blocks at full resolution do) each block is
    written straight through, holding nothing at the image's width; other block grids go
    through strips of `tile` rows at full width (width x (tile + block height) labels at most). Plus GDAL's block
    cache, capped at WRITE_CACHE_MB (16 MB). Never the whole image.
    Blocks that leave a gap, overlap, lie outside the image or come out of order raise ValueError (the caller's
    bug). Returns the path."""
    rasterio = _module("rasterio", path, "writing label TIFFs")
    importlib.import_module("rasterio.windows")
    where = str(path)
    if not (isinstance(height, (int, np.integer)) and isinstance(width, (int, np.integer)) and height > 0
            and width > 0):
        raise ValueError(f"{where}: height and width must be positive integers, got {height!r} x {width!r}")
    if not (isinstance(tile, (int, np.integer)) and tile >= 16 and tile % 16 == 0):
        raise TransegError(f"{where}: the tile size must be a multiple of 16 (TIFF's rule), got {tile!r}")
    class_names = [str(c) for c in class_names]
    if not 0 < len(class_names) <= MAX_CLASSES:
        raise TransegError(f"{where}: {len(class_names)} class names; a label TIFF takes 1-{MAX_CLASSES}")
    colours = viz.palette_array(palette, len(class_names), where)[:len(class_names)]
    dtype = np.uint8 if len(class_names) <= 256 else np.uint16
    crs, transform = _geo(rasterio, crs, transform, where)
    path = output_file(path, example="labels.tif", inputs=inputs)
    profile = {"driver": "GTiff", "height": int(height), "width": int(width), "count": 1,
               "dtype": np.dtype(dtype).name, "tiled": True, "blockxsize": int(tile), "blockysize": int(tile),
               "compress": "deflate", "bigtiff": "IF_SAFER"}
    profile.update({k: v for k, v in (("crs", crs), ("transform", transform)) if v is not None})

    def write(tmp):
        # rasterio passes GDAL_CACHEMAX to GDALSetCacheMax64: bytes (a bare 64 would mean 64 bytes)
        with rasterio.Env(GDAL_CACHEMAX=WRITE_CACHE_MB << 20, GDAL_PAM_ENABLED="NO"), warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            try:
                with rasterio.open(tmp, "w", **profile) as ds:
                    ds.write_colormap(1, {i: (*map(int, c), 255) for i, c in enumerate(colours)})
                    ds.update_tags(1, class_names=json.dumps(class_names, ensure_ascii=False))
                    grid = (ds, rasterio.windows.Window, int(height), int(width), int(tile), dtype)
                    strips = (_Tiles if whole_tiles else _Strips)(*grid)
                    for top, left, labels in blocks:
                        strips.add(int(top), int(left), labels)
                    strips.finish()
            except rasterio.errors.RasterioError as e:  # "Write failed. See previous exception": say why
                raise OSError(_write_reason(e, Path(tmp).parent)) from None

    atomic_write(path, write)
    return path


def read_labels(path) -> tuple[np.ndarray, dict]:
    """(labels [H, W], {"crs": WKT | None, "transform": (a, b, c, d, e, f) | None, "class_names": list | None,
    "palette": uint8 [K, 3] | None}) from a label TIFF written by `write_labels_tiff` (or any one-band TIFF). The
    whole image is read: meant for users and tests on images that fit in memory."""
    return _read_label_tiff(path)


def _read_label_tiff(path, out_shape=None):
    """`read_labels`, whole or read decimated by GDAL (nearest) to `out_shape` (bounded memory: the result plus
    GDAL's capped block cache)."""
    name = str(path)
    regular_file(path, name)
    rasterio = _module("rasterio", name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            with rasterio.open(path) as ds, _read_env(rasterio, ds):
                labels = ds.read(1) if out_shape is None else \
                    ds.read(1, out_shape=out_shape, resampling=rasterio.enums.Resampling.nearest)
                names = ds.tags(1).get("class_names")
                names = json.loads(names) if names else None
                try:
                    cmap = ds.colormap(1)
                except ValueError:  # no colour map
                    cmap = None
                georef = ds.crs is not None or not ds.transform.is_identity
                meta = {"crs": ds.crs.to_wkt() if ds.crs else None,
                        "transform": tuple(ds.transform)[:6] if georef else None, "class_names": names}
    except (rasterio.errors.RasterioError, OSError, json.JSONDecodeError) as e:
        raise _decode_error(name, path, e) from None
    count = len(names) if names else (max(cmap) + 1 if cmap else 0)
    meta["palette"] = None if cmap is None else \
        np.asarray([cmap.get(i, (0, 0, 0, 255))[:3] for i in range(count)], dtype=np.uint8)
    return labels, meta


def _label_thumbnail(labels, height, width):
    """Labels at height x width, nearest: from a label TIFF read decimated by GDAL (`_read_label_tiff`), or from an
    in-memory [H, W] array. Also the TIFF's colour map."""
    if isinstance(labels, (str, os.PathLike)):
        small, meta = _read_label_tiff(labels, (height, width))
        return small, meta["palette"]
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"preview: labels must be a label TIFF's path or an [H, W] array, got shape {labels.shape}")
    return labels[np.ix_(_picks(labels.shape[0], height), _picks(labels.shape[1], width))], None


def preview(raster, labels, path, palette=None, max_side=2048, alpha=0.5):
    """A downsampled overlay PNG (or any format `viz.save_image` writes) at `path`: the image's thumbnail, at most
    `max_side` pixels a side, with the labels blended over it at `alpha` in `palette`'s colours (default: the
    label TIFF's colour map). `raster`: a Raster or an image path (a Raster at another level is opened again at level 0: the
    thumbnail is read from the smallest level at least its size either way);
    `labels`: the path of the label TIFF `write_labels_tiff` wrote, read decimated (nearest; classes of the
    thumbnail pixel's position, not the majority), or an [H, W] array of labels. Memory: about 20 bytes per
    preview pixel (80 MB at 2048 x 2048), whatever the image's size. Written atomically. Returns the path."""
    if not isinstance(raster, Raster) or raster.level != 0:  # a small level would make a small preview
        with open_raster(raster if not isinstance(raster, Raster) else raster.path) as opened:
            return preview(opened, labels, path, palette, max_side, alpha)
    sources = [raster.path] + ([labels] if isinstance(labels, (str, os.PathLike)) else [])
    path = output_file(path, example="preview.png", inputs=sources)  # never onto the image or the labels
    image = raster.thumbnail(max_side)
    small, cmap = _label_thumbnail(labels, *image.shape[:2])
    colours = palette if palette is not None else cmap
    if colours is None:
        raise TransegError(f"{path}: the labels carry no colour map: give preview a palette")
    picture = viz.overlay(image, small, colours, alpha=alpha, ignore_index=-1)  # every label is a class
    return viz.save_image(picture, path)
