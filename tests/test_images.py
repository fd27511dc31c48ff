"""transeg.images: reading images (folders list regular files only, conversions to RGB, the pixel bound before decoding)."""
import io
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import transeg
from helpers import _ckpt, _error, _image, _png
from transeg.cli import main


@pytest.mark.integration
def test_a_fifo_in_an_input_folder_is_skipped_with_a_note_and_nothing_hangs(ckpt, tmp_path):
    """A FIFO named b.png used to block predict forever (reading it waits for a writer). In a
    subprocess with a timeout, so that a regression fails instead of hanging the suite."""
    folder = tmp_path / "in"
    folder.mkdir()
    _png(folder / "a.png")
    os.mkfifo(folder / "b.png")
    try:
        run = subprocess.run([sys.executable, "-m", "transeg.cli", "predict", str(ckpt), str(folder), "--out",
                              str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("predict hung on a FIFO in its input folder")
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"transeg: skipped {folder / 'b.png'}: a FIFO (named pipe), not an image file" in run.stderr
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["a_mask.png", "a_overlay.jpg"]


@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    """A 20 kB 1-bit PNG of 13000x13000: 169 megapixels, 0.5 GB as RGB, 18.7 GB at predict's peak."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    Image.new("1", (13000, 13000)).save(path, optimize=True)
    return path


def test_a_huge_image_is_refused_from_its_header_by_default(bomb):
    """The default bound (100 megapixels) applies to files read by inference: the header is read, the
    pixels never decoded. (Below Pillow's own refusal at 179 megapixels, which only warns.)"""
    from transeg.inference import read_input

    with pytest.raises(transeg.TransegError, match=r"bomb.png: 13000x13000 pixels \(169 megapixels\) is more than "
                                                   r"the 100 megapixels allowed, refused before decoding"):
        read_input(str(bomb))


def test_a_raised_max_pixels_reads_past_pillows_refusal_for_this_call_only(tmp_path):
    """max_pixels above Pillow's refusal (2 x MAX_IMAGE_PIXELS, 179 megapixels by default) reads a
    24 kB 1-bit PNG of 14000x14000 (196 megapixels) that Pillow alone refuses, and leaves Pillow's
    process-global MAX_IMAGE_PIXELS as it was, so that no other reader in the process loses its
    protection; the bound still refuses from the header, and without a raised bound Pillow's refusal
    stands."""
    from transeg.images import read_image

    path = tmp_path / "big.png"
    Image.new("1", (14000, 14000)).save(path, optimize=True)
    default = Image.MAX_IMAGE_PIXELS
    rgb, note = read_image(path, max_pixels=200_000_000)
    assert rgb.shape == (14000, 14000, 3) and rgb.dtype == np.uint8 and note == "1-bit image converted to RGB"
    del rgb
    assert Image.MAX_IMAGE_PIXELS == default
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)  # still refused to every other reader
    with pytest.raises(transeg.TransegError, match=r"big.png: 14000x14000 pixels \(196 megapixels\) is more than the "
                                                   r"190 megapixels allowed, refused before decoding"):
        read_image(path, max_pixels=190_000_000)
    with pytest.raises(transeg.TransegError, match=r"big.png: cannot read the image \(Image size \(196000000 pixels\)"):
        read_image(path, max_pixels=100_000_000)
    assert Image.MAX_IMAGE_PIXELS == default


class _Unseekable(io.RawIOBase):
    """A binary stream that can only be read forwards, as a pipe or a socket."""

    def __init__(self, data):
        self._data = io.BytesIO(data)

    def readable(self):
        return True

    def readinto(self, buffer):
        chunk = self._data.read(len(buffer))
        buffer[:len(chunk)] = chunk
        return len(chunk)


@pytest.mark.parametrize("source", ["path", "stream", "unseekable stream"])
def test_a_raised_max_pixels_reads_from_paths_and_streams(tmp_path, monkeypatch, source):
    """The same per-call bypass with Pillow's global lowered to 900 pixels (refusal above 1800), so
    that a 50x40 image (2000 pixels) plays the bomb: read from a path, a file object and a stream that cannot seek,
    with the global untouched; a bound below the image still refuses it from the header, and one at
    or below Pillow's refusal leaves that refusal in place."""
    from transeg.images import read_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 900)
    path = _png(tmp_path / "x.png", h=40, w=50, value=7)
    data = path.read_bytes()

    def source_of():
        return {"path": path, "stream": io.BytesIO(data), "unseekable stream": _Unseekable(data)}[source]

    rgb, note = read_image(source_of(), name="x.png", max_pixels=10_000)
    assert rgb.shape == (40, 50, 3) and (rgb == 7).all() and note == ""
    assert Image.MAX_IMAGE_PIXELS == 900
    with pytest.raises(transeg.TransegError, match=r"x.png: 50x40 pixels \(0.002 megapixels\) is more than the "
                                                   r"0.0019 megapixels allowed"):
        read_image(source_of(), name="x.png", max_pixels=1900)
    with pytest.raises(transeg.TransegError, match=r"x.png: cannot read the image \(Image size \(2000 pixels\)"):
        read_image(source_of(), name="x.png", max_pixels=1800)
    with pytest.raises(transeg.TransegError, match=r"x.png: cannot read the image \(Image size \(2000 pixels\)"):
        read_image(source_of(), name="x.png")
    assert Image.MAX_IMAGE_PIXELS == 900


def _address_space():
    """This process's virtual memory size in bytes (Linux /proc)."""
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmSize:"))
    return int(line.split()[1]) * 1024


def test_predict_on_a_huge_image_stays_small(ckpt, bomb, tmp_path, capsys):
    """The tester's case end to end: refused in one line naming the flag, where predict used to peak at
    18.7 GB. Run with the address space capped at 3 GB above what the process holds, so that a
    regression fails on an allocation instead of swapping the machine."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (_address_space() + (3 << 30), hard))
    try:
        code = main(["predict", str(ckpt), str(bomb), "--out", str(tmp_path / "o")])
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    line = _error(capsys, code)
    assert "bomb.png: 13000x13000 pixels (169 megapixels) is more than the 100 megapixels allowed" in line
    assert "--max-megapixels" in line


def test_max_megapixels_raises_or_lowers_the_bound(ckpt, tmp_path, capsys):
    image = _png(tmp_path / "x.png", h=40, w=50)  # 2000 pixels
    line = _error(capsys, main(["predict", str(ckpt), str(image), "--out", str(tmp_path / "o"),
                                "--max-megapixels", "0.001"]))
    assert "x.png: 50x40 pixels (0.002 megapixels) is more than the 0.001 megapixels allowed" in line
    assert main(["predict", str(ckpt), str(image), "--out", str(tmp_path / "o"), "--max-megapixels", "0.002"]) == 0
    with pytest.raises(SystemExit):  # argparse: one usage line
        main(["predict", str(ckpt), str(image), "--out", str(tmp_path / "o"), "--max-megapixels", "nan"])


def _exif_rotated(path):
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.zeros((8, 12, 3), np.uint8)).save(path, exif=exif)


def test_convertible_images_are_accepted_and_the_conversion_is_said(tmp_path, capsys):
    """RGBA, 16-bit grey, grey, palette and EXIF-rotated images are read (as the displayed RGB image)
    and predict says what it did to each."""
    makers = {
        "rgba.png": lambda p: Image.fromarray(np.zeros((8, 12, 4), np.uint8)).save(p),
        "grey16.png": lambda p: Image.fromarray(np.full((8, 12), 40000, np.uint16)).save(p),
        "grey.png": lambda p: Image.fromarray(np.zeros((8, 12), np.uint8)).save(p),
        "palette.png": lambda p: Image.fromarray(np.zeros((8, 12), np.uint8)).convert("P").save(p),
        "rotated.jpg": _exif_rotated,
    }
    paths = [str(_image(tmp_path, n, m)) for n, m in makers.items()]
    assert main(["predict", str(_ckpt(tmp_path)), *paths, "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    for name, note in (("rgba.png", "alpha channel dropped"), ("grey16.png", "16-bit greyscale scaled to 8-bit RGB"),
                       ("grey.png", "greyscale converted to RGB"), ("palette.png", "palette image converted to RGB"),
                       ("rotated.jpg", "EXIF orientation applied")):
        assert f"{name} ({note})" in out, name
    # the rotated 12x8 JPEG is predicted as displayed: 8 wide, 12 high
    assert Image.open(tmp_path / "o" / "rotated_mask.png").size == (8, 12)

