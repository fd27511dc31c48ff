"""transeg.rasters: large images read in windows (GeoTIFF through rasterio, pyramidal OME-TIFF through tifffile +
zarr, PNG wrapped whole), label TIFFs written from blocks, and the one-line errors. Every file is a small
synthetic one written here."""
import errno
import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from transeg import rasters
from transeg.errors import TransegError
from transeg.rasters import is_raster, open_raster, read_labels, write_labels_tiff

rasterio = pytest.importorskip("rasterio")  # the `large` extra (also in the `test` extra)
tifffile = pytest.importorskip("tifffile")
pytest.importorskip("zarr")
Resampling = rasterio.enums.Resampling

UTM = "EPSG:32631"
TRANSFORM = rasterio.Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 4000000.0)  # 0.5 m pixels, north up, origin 500000 E 4000000 N
CLASSES = ["background", "building", "road", "tree", "water"]
PALETTE = [(0, 0, 0), (200, 0, 0), (128, 128, 128), (0, 160, 0), (0, 0, 255)]


def _rgb(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _geotiff(path, array, overviews=(), crs=UTM, transform=TRANSFORM, **options):
    """array [H, W, C] -> a tiled, DEFLATE GeoTIFF (with internal overviews at `overviews` factors)."""
    height, width, count = array.shape
    geo = {"crs": crs, "transform": transform} if crs else {}
    with rasterio.open(path, "w", driver="GTiff", height=height, width=width, count=count, dtype=array.dtype.name,
                       tiled=True, blockxsize=256, blockysize=256, compress="deflate", **geo, **options) as ds:
        ds.write(np.moveaxis(array, -1, 0))
        if overviews:
            ds.build_overviews(list(overviews), Resampling.nearest)
    return path


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """A 1000x1500 RGB GeoTIFF in UTM 31N, 0.5 m pixels, overviews at 2x, 4x, 8x: (path, array)."""
    array = _rgb(1000, 1500)
    return _geotiff(tmp_path_factory.mktemp("scene") / "scene.tif", array, overviews=(2, 4, 8)), array


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    """A pyramidal OME-TIFF of 1024x1536 RGB with two more levels in SubIFDs (2x, 4x): (path, [levels])."""
    array = _rgb(1024, 1536, seed=1)
    levels = [array, array[::2, ::2].copy(), array[::4, ::4].copy()]
    path = tmp_path_factory.mktemp("slide") / "slide.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(levels[0], subifds=2, tile=(256, 256), photometric="rgb", compression="zlib")
        for level in levels[1:]:
            tw.write(level, subfiletype=1, tile=(256, 256), photometric="rgb", compression="zlib")
    return path, levels


# ------------------------------------------------------------------------------------------ reading
def test_a_geotiff_window_equals_the_array_written(scene):
    """Windows anywhere (a corner, an unaligned middle box across tiles, the last pixel) equal the array."""
    path, array = scene
    with open_raster(path) as r:
        assert (r.height, r.width, r.level) == (1000, 1500, 0)
        for top, left, h, w in [(0, 0, 256, 256), (100, 200, 300, 333), (999, 1499, 1, 1), (0, 0, 1000, 1500)]:
            window = r.read(top, left, h, w)
            assert window.dtype == np.uint8 and window.shape == (h, w, 3)
            np.testing.assert_array_equal(window, array[top:top + h, left:left + w])


def test_the_georeferencing_of_a_geotiff_is_reported(scene):
    """CRS as WKT (UTM 31N), transform (0.5, 0, 500000, 0, -0.5, 4000000) and 0.5 m pixels, as written."""
    with open_raster(scene[0]) as r:
        assert rasterio.crs.CRS.from_wkt(r.crs) == rasterio.crs.CRS.from_string(UTM)
        assert r.transform == (0.5, 0.0, 500000.0, 0.0, -0.5, 4000000.0)
        assert r.pixel_size == (0.5, 0.5)


def test_overview_levels_are_listed_and_read(scene):
    """Levels: 1500x1000, then the 2x / 4x / 8x overviews (GDAL rounds 187.5 up to 188); level 2 is 375x250
    with 2 m pixels and the same origin, and its windows equal the nearest-neighbour overview (every 4th pixel)."""
    path, array = scene
    with open_raster(path, level=2) as r:
        assert r.levels == [(1000, 1500), (500, 750), (250, 375), (125, 188)]
        assert (r.height, r.width, r.level) == (250, 375, 2)
        assert r.transform == (2.0, 0.0, 500000.0, 0.0, -2.0, 4000000.0) and r.pixel_size == (2.0, 2.0)
        np.testing.assert_array_equal(r.read(10, 20, 50, 60), array[::4, ::4][10:60, 20:80])


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")  # writing the test's input
def test_a_plain_tiff_has_no_georeferencing(tmp_path):
    """A TIFF without CRS or transform: crs, transform and pixel_size are None (not rasterio's identity)."""
    path = _geotiff(tmp_path / "plain.tif", _rgb(64, 80), crs=None)
    with open_raster(path) as r:
        assert (r.crs, r.transform, r.pixel_size) == (None, None, None)
        assert r.read(0, 0, 64, 80).shape == (64, 80, 3)


def test_each_level_of_a_pyramidal_ome_tiff_is_read_in_windows(slide):
    """The OME-TIFF goes to the tifffile reader; its three levels (1536x1024, 768x512, 384x256) each read
    windows equal to the arrays written."""
    path, levels = slide
    for k, expected in enumerate(levels):
        with open_raster(path, level=k) as r:
            assert isinstance(r, rasters._SlideRaster)
            assert r.levels == [(1024, 1536), (512, 768), (256, 384)] and (r.height, r.width) == expected.shape[:2]
            assert (r.crs, r.transform, r.pixel_size) == (None, None, None)
            np.testing.assert_array_equal(r.read(37, 101, 150, 130), expected[37:187, 101:231])


def test_a_slide_thumbnail_is_read_from_the_smallest_adequate_level(slide):
    """A 100-pixel thumbnail of the 1536x1024 slide is 67x100 (aspect kept), picked from level 2 (384x256, the
    smallest at least that large): its pixels are level 2's at the nearest-neighbour positions."""
    path, levels = slide
    with open_raster(path) as r:
        thumb = r.thumbnail(100)
    assert thumb.shape == (67, 100, 3)
    rows, cols = rasters._picks(256, 67), rasters._picks(384, 100)
    np.testing.assert_array_equal(thumb, levels[2][np.ix_(rows, cols)])


def test_greyscale_is_repeated_to_three_bands(tmp_path):
    """A one-band uint8 TIFF reads as [h, w, 3] with the three bands equal to the band written."""
    grey = _rgb(100, 120)[..., :1]
    with open_raster(_geotiff(tmp_path / "grey.tif", grey)) as r:
        window = r.read(10, 10, 30, 40)
    np.testing.assert_array_equal(window, np.repeat(grey[10:40, 10:50], 3, axis=2))


def test_rgba_keeps_the_first_three_bands(tmp_path):
    """Four bands (RGBA, or a multispectral NIR) read as the first three."""
    array = np.random.default_rng(3).integers(0, 256, (40, 50, 4), dtype=np.uint8)
    with open_raster(_geotiff(tmp_path / "rgba.tif", array)) as r:
        np.testing.assert_array_equal(r.read(0, 0, 40, 50), array[..., :3])


def test_uint16_is_stretched_from_its_2nd_to_98th_percentile_the_same_in_every_window(tmp_path):
    """A uint16 ramp of values 1000..60999 over 300x200 pixels: its 2nd and 98th percentiles (1000 + 0.02 x
    59999 and 1000 + 0.98 x 59999, computed once from the thumbnail, here the whole image) map to 0 and 255,
    values outside clip, and two overlapping windows give the same pixels where they overlap."""
    ramp = (1000 + np.arange(300 * 200, dtype=np.float64).reshape(300, 200)).astype(np.uint16)
    with open_raster(_geotiff(tmp_path / "u16.tif", ramp[..., None])) as r:
        lo, hi = np.percentile(ramp.astype(np.float64), [2, 98])
        expected = np.clip(np.rint((ramp.astype(np.float32) - np.float32(lo)) * np.float32(255 / (hi - lo))), 0, 255)
        whole = r.read(0, 0, 300, 200)
        np.testing.assert_array_equal(whole[..., 0], expected.astype(np.uint8))
        assert whole[0, 0, 0] == 0 and whole[-1, -1, 0] == 255
        np.testing.assert_array_equal(r.read(100, 50, 100, 100), whole[100:200, 50:150])


def test_a_png_is_wrapped_as_a_one_level_raster(tmp_path):
    """PNG is not a TIFF (is_raster False): decoded whole through transeg.images and sliced; one level."""
    from PIL import Image

    array = _rgb(60, 90)
    Image.fromarray(array).save(tmp_path / "photo.png")
    assert not is_raster(tmp_path / "photo.png")
    with open_raster(tmp_path / "photo.png") as r:
        assert r.levels == [(60, 90)] and r.crs is None
        np.testing.assert_array_equal(r.read(5, 6, 20, 30), array[5:25, 6:36])
        assert r.thumbnail(30).shape == (20, 30, 3)


def test_is_raster_goes_by_the_magic_bytes_not_the_suffix(tmp_path, scene):
    """A GeoTIFF renamed .dat is a raster; a text file named .tif and a missing file are not."""
    renamed = tmp_path / "scene.dat"
    renamed.write_bytes(Path(scene[0]).read_bytes())
    (tmp_path / "fake.tif").write_text("not a tiff")
    assert [is_raster(renamed), is_raster(tmp_path / "fake.tif"), is_raster(tmp_path / "missing.tif")] == \
        [True, False, False]


def test_a_window_outside_the_image_is_the_callers_bug(scene):
    with open_raster(scene[0]) as r, pytest.raises(ValueError, match="does not lie inside the 1500x1000 image"):
        r.read(900, 0, 101, 10)


# ------------------------------------------------------------------------------------------ writing
def _labels(height, width, classes=5):
    """A deterministic label image with structure on several scales."""
    rows, cols = np.arange(height)[:, None], np.arange(width)[None, :]
    return ((rows // 7 + cols // 11 + (rows * cols) // 997) % classes).astype(np.uint16)


def _blocks(labels, bh, bw):
    """(top, left, block) in raster order of a bh x bw grid (not aligned to the TIFF's tiles)."""
    for top in range(0, labels.shape[0], bh):
        for left in range(0, labels.shape[1], bw):
            yield top, left, labels[top:top + bh, left:left + bw]


def test_a_label_geotiff_round_trips_from_unaligned_blocks(tmp_path):
    """700x900 labels from 300x350 blocks into 256-pixel tiles: read back equal, uint8, with the CRS, transform,
    size, the colour map and the class names, tiled 256 and DEFLATE-compressed."""
    labels = _labels(700, 900)
    out = write_labels_tiff(tmp_path / "labels.tif", 700, 900, _blocks(labels, 300, 350), crs=UTM,
                            transform=tuple(TRANSFORM)[:6], palette=PALETTE, class_names=CLASSES, tile=256)
    back, meta = read_labels(out)
    assert back.dtype == np.uint8 and back.shape == (700, 900)
    np.testing.assert_array_equal(back, labels)
    assert rasterio.crs.CRS.from_wkt(meta["crs"]) == rasterio.crs.CRS.from_string(UTM)
    assert meta["transform"] == (0.5, 0.0, 500000.0, 0.0, -0.5, 4000000.0)
    assert meta["class_names"] == CLASSES and meta["palette"].tolist() == [list(c) for c in PALETTE]
    with rasterio.open(out) as ds:
        assert (ds.block_shapes[0], ds.compression.name, json.loads(ds.tags(1)["class_names"])) == \
            ((256, 256), "deflate", CLASSES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.tif"]  # no temporary, no .aux.xml


def test_without_georeferencing_the_labels_are_a_plain_tiled_tiff(tmp_path):
    """No crs / transform: a plain TIFF (no GeoTIFF tags), still tiled, with the colour map and names."""
    labels = _labels(100, 130)
    out = write_labels_tiff(tmp_path / "plain.tif", 100, 130, _blocks(labels, 64, 50), palette=PALETTE,
                            class_names=CLASSES, tile=32)
    with tifffile.TiffFile(out) as tif:
        assert not tif.is_geotiff and tif.pages.first.is_tiled
    back, meta = read_labels(out)
    np.testing.assert_array_equal(back, labels)
    assert (meta["crs"], meta["transform"], meta["class_names"]) == (None, None, CLASSES)


def test_more_than_256_classes_are_written_as_uint16(tmp_path):
    """300 classes do not fit uint8: the file is uint16 and label 299 survives."""
    names, palette = [f"c{i}" for i in range(300)], [(i % 256, i // 256, 7) for i in range(300)]
    labels = _labels(50, 70, classes=300)
    labels[-1, -1] = 299
    out = write_labels_tiff(tmp_path / "many.tif", 50, 70, _blocks(labels, 20, 30), palette=palette,
                            class_names=names, tile=16)
    back, meta = read_labels(out)
    assert back.dtype == np.uint16 and back[-1, -1] == 299
    np.testing.assert_array_equal(back, labels)
    assert len(meta["class_names"]) == 300 and meta["palette"][299].tolist() == [43, 1, 7]


def test_blocks_that_leave_a_gap_are_refused_and_nothing_is_written(tmp_path):
    """A missing block is the caller's bug (ValueError); no file appears under the name, no temporary stays."""
    blocks = [b for b in _blocks(_labels(64, 64), 32, 32) if b[:2] != (0, 32)]
    with pytest.raises(ValueError, match="must tile the image"):
        write_labels_tiff(tmp_path / "gap.tif", 64, 64, blocks, palette=PALETTE, class_names=CLASSES, tile=16)
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_leaves_nothing_under_the_final_name(tmp_path, monkeypatch):
    """The third strip's write fails with ENOSPC: one TransegError line naming the file, no file under the
    final name, no temporary beside it; an older file of the same name is left as it was."""
    calls = []

    def full(ds, array, window):
        calls.append(window)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        ds.write(array, 1, window=window)

    monkeypatch.setattr(rasters, "_write_strip", full)
    labels = _labels(128, 64)
    with pytest.raises(TransegError, match=r"full\.tif: could not be saved \(No space left on device\); nothing "
                                           r"was written"):
        write_labels_tiff(tmp_path / "full.tif", 128, 64, _blocks(labels, 40, 64), palette=PALETTE,
                          class_names=CLASSES, tile=16)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "full.tif").write_bytes(b"older")
    calls.clear()
    with pytest.raises(TransegError, match="the previous version is intact"):
        write_labels_tiff(tmp_path / "full.tif", 128, 64, _blocks(labels, 40, 64), palette=PALETTE,
                          class_names=CLASSES, tile=16)
    assert [p.name for p in tmp_path.iterdir()] == ["full.tif"] and (tmp_path / "full.tif").read_bytes() == b"older"


def test_the_labels_are_never_written_onto_an_input(tmp_path, scene):
    """Given the input image as the output, the writer refuses before any work."""
    with pytest.raises(TransegError, match="is the input"):
        write_labels_tiff(scene[0], 10, 10, [], palette=PALETTE, class_names=CLASSES, inputs=[scene[0]])


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")  # the check at the end
def test_writing_and_reading_6000x6000_labels_does_not_hold_the_image(tmp_path):
    """In a fresh process, 6000x6000 uint8 labels (36 MB) written from 1000x1000 blocks into 512 tiles, then read
    back as a Raster in 1024 windows overlapping by 128 plus a thumbnail, with GDAL's read cache at 8 MB:
    the peak RSS of each part grows by less than 24 MB (2/3 of the image). Writing holds at most 3 strips of
    512 x 6000 labels (9 MB) and GDAL's encoder buffers (16 MB measured in all); reading holds the capped cache
    and a window (10 MB measured; uncapped, GDAL keeps every decoded tile: 40 MB). The peak is reset between the
    parts (/proc/self/clear_refs)."""
    script = textwrap.dedent(f"""
        import resource, numpy as np
        from transeg import rasters
        def peak_from_now():
            open("/proc/self/clear_refs", "w").write("5")  # the peak RSS starts again from the current RSS
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        def blocks(n, b=1000):
            for t in range(0, n, b):
                for l in range(0, n, b):
                    h, w = min(b, n - t), min(b, n - l)
                    yield t, l, (np.arange(h, dtype=np.uint8)[:, None] // 37 + np.arange(w, dtype=np.uint8) // 53) % 6
        kw = dict(palette=[(i, i, i) for i in range(6)], class_names=list("abcdef"))
        path = {str(tmp_path / 'big.tif')!r}
        rasters.write_labels_tiff(path + ".warm.tif", 64, 64, blocks(64), **kw)  # imports and GDAL's set-up
        before = peak_from_now()
        rasters.write_labels_tiff(path, 6000, 6000, blocks(6000), **kw)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
        rasters.READ_CACHE_MB = 8
        with rasters.open_raster(path) as r:
            r.read(0, 0, 16, 16)
            before = peak_from_now()
            for top in range(0, 6000 - 1024 + 1, 896):
                for left in range(0, 6000 - 1024 + 1, 896):
                    r.read(top, left, 1024, 1024)
            r.thumbnail(1024)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=110, check=False,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    if "clear_refs" in run.stderr:
        pytest.skip("this kernel does not let a process reset its peak RSS (/proc/self/clear_refs)")
    assert run.returncode == 0, run.stderr[-2000:]
    write_mb, read_mb = map(float, run.stdout.split()[-2:])
    assert write_mb < 24, f"peak RSS grew by {write_mb:.1f} MB writing 6000x6000 labels"
    assert read_mb < 24, f"peak RSS grew by {read_mb:.1f} MB reading 6000x6000 labels in windows"
    with rasterio.open(tmp_path / "big.tif") as ds:
        assert (ds.width, ds.height) == (6000, 6000)
        assert ds.read(1, window=rasterio.windows.Window(5990, 5990, 10, 10)).max() < 6


# ------------------------------------------------------------------------------------------ errors
def test_a_truncated_tiff_is_one_line_when_opened(tmp_path, scene):
    """The first third of the GeoTIFF: refused at open (its tiles lie past the end), naming the file."""
    cut = tmp_path / "cut.tif"
    cut.write_bytes(Path(scene[0]).read_bytes()[:len(Path(scene[0]).read_bytes()) // 3])
    with pytest.raises(TransegError, match=r"^.*cut\.tif: truncated TIFF: its image data runs to byte [\d,]+ but "
                                           r"the file has [\d,]+ bytes"):
        open_raster(cut)


def test_a_tiff_cut_inside_its_header_is_corrupt(tmp_path, scene):
    cut = tmp_path / "head.tif"
    cut.write_bytes(Path(scene[0]).read_bytes()[:300])
    with pytest.raises(TransegError, match=r"head\.tif: corrupt"):
        open_raster(cut)


def _patch_compression(path, out, code):
    """Copy `path` with the Compression tag of every image (level) set to `code` (the value sits inline in
    the 12-byte IFD entry, at +8)."""
    data = bytearray(Path(path).read_bytes())
    with tifffile.TiffFile(path) as tif:
        entries = [page.tags["Compression"].offset for level in tif.series[0].levels for page in level.pages]
    for offset in entries:
        struct.pack_into("<H", data, offset + 8, code)
    Path(out).write_bytes(bytes(data))
    return out


def test_a_compression_gdal_cannot_decode_is_named(tmp_path, scene):
    """Compression 50013 (PixTIFF, a codec GDAL lacks): one line with the compression's name and code."""
    path = _patch_compression(scene[0], tmp_path / "pix.tif", 50013)
    with pytest.raises(TransegError, match=r"pix\.tif: unsupported compression PIXTIFF \(TIFF compression 50013\)"):
        open_raster(path)


def test_a_compression_tifffile_cannot_decode_without_imagecodecs_is_named(tmp_path, slide):
    """A slide whose tiles say LERC (34887) needs imagecodecs: the line names LERC and the fix."""
    try:
        import imagecodecs  # noqa: F401
        pytest.skip("imagecodecs is installed: LERC is decodable")
    except ImportError:
        pass
    path = _patch_compression(slide[0], tmp_path / "lerc.ome.tif", 34887)
    with pytest.raises(TransegError, match=r"lerc\.ome\.tif: unsupported compression LERC \(TIFF compression "
                                           r"34887\): .*pip install imagecodecs"):
        open_raster(path)


def test_a_level_that_does_not_exist_lists_the_levels(scene, slide):
    with pytest.raises(TransegError, match=r"^level 4 does not exist in .*scene\.tif: it has levels 0-3 "
                                           r"\(1500x1000, 750x500, 375x250, 188x125\)$"):
        open_raster(scene[0], level=4)
    with pytest.raises(TransegError, match=r"^level 3 does not exist in .*slide\.ome\.tif: it has levels 0-2 "
                                           r"\(1536x1024, 768x512, 384x256\)$"):
        open_raster(slide[0], level=3)


def test_the_missing_extra_is_named_with_its_install_command(scene, monkeypatch):
    """Without rasterio / tifffile, opening a TIFF says `pip install 'transeg[large]'`."""
    real = rasters.importlib.import_module

    def without(name, *a):
        if name.split(".")[0] in ("tifffile", "rasterio"):
            raise ImportError(name)
        return real(name, *a)

    monkeypatch.setattr(rasters.importlib, "import_module", without)
    with pytest.raises(TransegError, match=r"scene\.tif: reading TIFF images needs the optional extra \(tifffile "
                                           r"is not installed\): pip install 'transeg\[large\]'"):
        open_raster(scene[0])


# ------------------------------------------------------------------------------------------ thumbnails, preview
def test_a_geotiff_thumbnail_is_decimated_to_max_side(scene):
    """A 200-pixel thumbnail of the 1500x1000 scene is 133x200 (aspect kept), uint8 RGB; a max_side larger
    than the image gives the image's own size (never enlarged)."""
    with open_raster(scene[0]) as r:
        assert r.thumbnail(200).shape == (133, 200, 3) and r.thumbnail(200).dtype == np.uint8
        np.testing.assert_array_equal(r.thumbnail(5000), scene[1])


def test_a_paletted_tiff_reads_in_its_colours(tmp_path):
    """A one-band uint8 TIFF with a colour map (a label map, say) reads as the colours of its values."""
    labels = _labels(40, 60).astype(np.uint8)
    out = write_labels_tiff(tmp_path / "lab.tif", 40, 60, _blocks(labels, 40, 60), palette=PALETTE,
                            class_names=CLASSES, tile=16)
    with open_raster(out) as r:
        np.testing.assert_array_equal(r.read(0, 0, 40, 60), np.asarray(PALETTE, np.uint8)[labels])


def test_floats_are_stretched_and_nan_reads_as_black(tmp_path):
    """float32 reflectance 0..1 with one NaN: the stretch maps the 2nd percentile to 0 and the 98th to 255;
    the NaN pixel is 0."""
    values = np.linspace(0.0, 1.0, 50 * 40, dtype=np.float32).reshape(50, 40)
    values[3, 4] = np.nan
    with open_raster(_geotiff(tmp_path / "f.tif", values[..., None])) as r:
        window = r.read(0, 0, 50, 40)[..., 0]
    assert window[3, 4] == 0 and window[0, 0] == 0 and window[-1, -1] == 255
    assert 120 <= window[25, 20] <= 135  # the middle of the ramp, near 255 / 2


def test_the_preview_overlays_the_labels_on_the_thumbnail(tmp_path, scene):
    """After write_labels_tiff: a 300-pixel preview of the 1500x1000 scene is 300x200, each pixel the
    thumbnail blended half-and-half with the colour of the label at the same nearest position (GDAL's
    decimation picks the pixel centres `_picks` does: every 5th pixel, from the 3rd)."""
    from PIL import Image

    path = scene[0]
    labels = _labels(1000, 1500)
    out = write_labels_tiff(tmp_path / "labels.tif", 1000, 1500, _blocks(labels, 400, 600), crs=UTM,
                            transform=tuple(TRANSFORM)[:6], palette=PALETTE, class_names=CLASSES, tile=256)
    with open_raster(path) as r:
        written = rasters.preview(r, out, tmp_path / "preview.png", max_side=300, alpha=0.5)
        thumb = r.thumbnail(300)
    picture = np.asarray(Image.open(written))
    assert picture.shape == (200, 300, 3)
    small = labels[np.ix_(rasters._picks(1000, 200), rasters._picks(1500, 300))]
    expected = np.rint(0.5 * thumb + 0.5 * np.asarray(PALETTE, np.float32)[small]).astype(np.uint8)
    np.testing.assert_array_equal(picture, expected)


def test_the_preview_never_writes_onto_its_inputs(tmp_path, scene):
    with pytest.raises(TransegError, match="is the input"):
        rasters.preview(scene[0], np.zeros((10, 10), np.uint8), scene[0], palette=PALETTE)


def test_a_write_that_really_fails_leaves_nothing_under_the_final_name(tmp_path):
    """A real failed write, not a simulated one: while this process may not write files past 100 kB
    (RLIMIT_FSIZE: the kernel refuses write() as a full disk does), a 2000x2000 label TIFF of noise (about
    1 MB compressed) fails: GDAL's error becomes one TransegError line naming the file, the folder is left
    empty. The limit and SIGXFSZ's handler are restored whatever happens."""
    import resource
    import signal

    rng = np.random.default_rng(0)
    blocks = ((t, left, rng.integers(0, 5, (500, 500), dtype=np.uint8)) for t in range(0, 2000, 500)
              for left in range(0, 2000, 500))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a refused write returns EFBIG, no kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))
    try:
        with pytest.raises(TransegError) as caught:
            write_labels_tiff(tmp_path / "labels.tif", 2000, 2000, blocks, palette=PALETTE, class_names=CLASSES)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    line = str(caught.value)
    assert line.startswith(f"{tmp_path / 'labels.tif'}: could not be saved (") and \
        line.endswith("); nothing was written") and "\n" not in line, line
    assert list(tmp_path.iterdir()) == []


def test_a_damaged_tile_in_the_middle_is_one_line_when_read(tmp_path, scene):
    """Tile 8 (rows 256-511, columns 512-767) overwritten with noise: the file opens (its first tile decodes),
    a window elsewhere reads, and a window over that tile is one TransegError line naming the file."""
    data = bytearray(Path(scene[0]).read_bytes())
    with tifffile.TiffFile(scene[0]) as tif:
        offset, count = tif.pages[0].dataoffsets[8], tif.pages[0].databytecounts[8]
    data[offset:offset + count] = np.random.default_rng(5).integers(0, 256, count, dtype=np.uint8).tobytes()
    (tmp_path / "bad.tif").write_bytes(bytes(data))
    with open_raster(tmp_path / "bad.tif") as r:
        np.testing.assert_array_equal(r.read(0, 0, 100, 100), scene[1][:100, :100])
        with pytest.raises(TransegError, match=r"bad\.tif: corrupt or truncated TIFF, cannot read it \("):
            r.read(300, 600, 10, 10)


def test_a_subifd_pyramid_without_ome_goes_to_tifffile(tmp_path):
    """A plain (not OME) TIFF whose reduced levels are SubIFDs, which GDAL does not list as overviews: read by
    the tifffile reader, with its 2 levels."""
    array = _rgb(512, 640, seed=7)
    with tifffile.TiffWriter(tmp_path / "pyr.tif") as tw:
        tw.write(array, subifds=1, tile=(128, 128), photometric="rgb", compression="zlib")
        tw.write(array[::2, ::2], subfiletype=1, tile=(128, 128), photometric="rgb", compression="zlib")
    with open_raster(tmp_path / "pyr.tif", level=1) as r:
        assert isinstance(r, rasters._SlideRaster) and r.levels == [(512, 640), (256, 320)]
        np.testing.assert_array_equal(r.read(10, 20, 100, 90), array[::2, ::2][10:110, 20:110])


def test_a_multichannel_uint16_ome_reads_its_first_three_channels_stretched(tmp_path):
    """A 5-channel uint16 OME-TIFF (axes CYX, fluorescence-like): the first three channels, each stretched
    from its own 2nd-98th percentiles, so each band spans 0..255."""
    rng = np.random.default_rng(8)
    channels = np.stack([rng.integers(100 * (c + 1), 1000 * (c + 1), (96, 128)) for c in range(5)]).astype(np.uint16)
    tifffile.imwrite(tmp_path / "fluo.ome.tif", channels, ome=True, metadata={"axes": "CYX"}, tile=(64, 64))
    with open_raster(tmp_path / "fluo.ome.tif") as r:
        window = r.read(0, 0, 96, 128)
    for c in range(3):
        lo, hi = np.percentile(channels[c].astype(np.float64), [2, 98])
        expected = np.clip(np.rint((channels[c].astype(np.float32) - np.float32(lo)) * np.float32(255 / (hi - lo))),
                           0, 255)
        np.testing.assert_array_equal(window[..., c], expected.astype(np.uint8))


def test_opening_a_uint16_file_computes_no_stretch_until_it_is_read(tmp_path, monkeypatch):
    """Opening (to learn the size, as `needs_tiles` does) reads one pixel, not the stretch's thumbnail."""
    path = _geotiff(tmp_path / "u16.tif", np.arange(64 * 64, dtype=np.uint16).reshape(64, 64, 1))
    thumbs = []
    real = rasters._GdalRaster._raw_thumb
    monkeypatch.setattr(rasters._GdalRaster, "_raw_thumb", lambda self, h, w: thumbs.append((h, w)) or real(self, h, w))
    with open_raster(path) as r:
        assert thumbs == []
        r.read(0, 0, 8, 8)
        r.read(8, 8, 8, 8)
    assert thumbs == [(64, 64)]  # once, at the image's size (smaller than STRETCH_SIDE)


@pytest.mark.parametrize(("block", "tile"), [((1, 130), 16), ((17, 33), 16), ((100, 130), 64), ((64, 16), 32),
                                             ((250, 7), 48)])
def test_any_block_grid_round_trips(tmp_path, block, tile):
    """100x130 labels from blocks of one row, of odd sizes, of the whole image, of a tile's size, of columns
    taller than the image is tiled: read back equal each time."""
    labels = _labels(100, 130)
    out = write_labels_tiff(tmp_path / "l.tif", 100, 130, _blocks(labels, *block), palette=PALETTE,
                            class_names=CLASSES, tile=tile)
    np.testing.assert_array_equal(read_labels(out)[0], labels)


def test_blocks_out_of_raster_order_are_refused(tmp_path):
    """The second row's first block before the first row's second: rows 0-15 are left incomplete when the blocks
    move below them, and a block above them comes after: ValueError either way, nothing written."""
    blocks = list(_blocks(_labels(64, 64), 32, 32))
    blocks[1], blocks[2] = blocks[2], blocks[1]
    with pytest.raises(ValueError, match=r"of rows 0-15 before moving below them .*in raster order of a block grid"):
        write_labels_tiff(tmp_path / "o.tif", 64, 64, blocks, palette=PALETTE, class_names=CLASSES, tile=16)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"tile": 100}, r"l\.tif: the tile size must be a multiple of 16 \(TIFF's rule\), got 100"),
    ({"palette": PALETTE[:3]}, r"l\.tif: palette has 3 colours for 5 classes"),
    ({"crs": "EPSG:99999999"}, r"l\.tif: not a coordinate reference system"),
])
def test_bad_writer_arguments_are_one_line_before_any_work(tmp_path, kwargs, message):
    args = {"palette": PALETTE, "class_names": CLASSES, **kwargs}
    with pytest.raises(TransegError, match=message):
        write_labels_tiff(tmp_path / "l.tif", 32, 32, _blocks(_labels(32, 32), 16, 16), **args)
    assert list(tmp_path.iterdir()) == []


def test_an_aperio_svs_layout_reads_its_levels_from_the_main_ifd_chain(tmp_path):
    """An SVS as Aperio lays it out (tiled baseline, a stripped thumbnail, a tiled 4x level, all in the main IFD
    chain, 'Aperio Image Library' descriptions; zlib here instead of JPEG, which needs imagecodecs): tifffile
    flags it is_svs, its levels are the baseline and the 4x level (not the thumbnail), each read in windows."""
    array = _rgb(1024, 1536, seed=2)
    head = "Aperio Image Library v10.0.50\n1536x1024 "
    options = {"photometric": "rgb", "compression": "zlib", "metadata": None}
    with tifffile.TiffWriter(tmp_path / "slide.svs") as tw:
        tw.write(array, tile=(256, 256), description=head + "[0,0 1536x1024] (256x256) RAW|MPP = 0.499", **options)
        tw.write(array[::8, ::8], description=head + "-> 192x128 - |MPP = 0.499", **options)
        tw.write(array[::4, ::4], tile=(256, 256), description=head + "-> 384x256 - |MPP = 0.499", **options)
    with open_raster(tmp_path / "slide.svs", level=1) as r:
        assert isinstance(r, rasters._SlideRaster) and r.levels == [(1024, 1536), (256, 384)]
        np.testing.assert_array_equal(r.read(10, 20, 100, 120), array[::4, ::4][10:110, 20:140])
    with open_raster(tmp_path / "slide.svs") as r:
        np.testing.assert_array_equal(r.read(700, 900, 50, 60), array[700:750, 900:960])


def test_blocks_of_whole_tiles_go_straight_through(tmp_path, monkeypatch):
    """Blocks on the tile grid (96-pixel blocks, 32-pixel tiles, the last ones running to the edge as tiled
    inference's do) are written one block at a time, never as a strip at the image's width: 3 x 3 writes of
    at most 96 pixels a side, and the labels read back equal."""
    import transeg.rasters as rasters_module

    labels = _labels(232, 232)
    writes = []
    real = rasters_module._write_strip
    monkeypatch.setattr(rasters_module, "_write_strip", lambda ds, a, w: writes.append(a.shape) or real(ds, a, w))
    blocks = [(t, l, labels[t:b, l:r]) for t, b in ((0, 96), (96, 192), (192, 232))
              for l, r in ((0, 96), (96, 192), (192, 232))]
    out = write_labels_tiff(tmp_path / "grid.tif", 232, 232, blocks, palette=PALETTE, class_names=CLASSES, tile=32,
                            whole_tiles=True)
    assert len(writes) == 9 and max(max(s) for s in writes) <= 96
    np.testing.assert_array_equal(read_labels(out)[0], labels)
