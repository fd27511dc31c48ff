"""Inputs and outputs of predict / eval / export / convert / bench / data prepare: a user's mistake, or a
machine's (a full disk, a read-only folder), is one line naming the file and the fix, exit status 2;
nothing of the user's is overwritten or lost, nothing hangs, nothing half-written is left.

Full and read-only disks are real: small tmpfs mounts (root and a machine that allows `mount`; those
cases are skipped with the reason otherwise)."""
import contextlib
import errno
import hashlib
import io
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import transeg
from conftest import TINY
from transeg.cli import main
from transeg.protocol import Protocol


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny 6-class SegFormer (the synthetic set's class count) with the quickstart's test protocol:
    keep-ratio resize into (128, 32), aligned to 32."""
    model = transeg.create_model("segformer-b0", num_classes=6, **TINY)
    model.protocol = Protocol(scale=(128, 32))
    return transeg.save(model, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def _png(path, h=40, w=50, value=100, mode=None):
    image = Image.fromarray(np.full((h, w, 3), value, np.uint8))
    (image.convert(mode) if mode else image).save(path)
    return path


def _noise(path, h=200, w=200, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _hashes(folder):
    """{relative path: sha256} of every file under `folder` (what must not change)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def _error(capsys, code):
    """The one `transeg: error:` line of a run that returned `code` (2): exactly one, and no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("transeg: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err[-2000:])
    return lines[0]


@contextlib.contextmanager
def _tmpfs(path, options):
    """A real tmpfs at `path` (e.g. "ro", "size=64k"), unmounted afterwards; skipped where mounting is
    not permitted (not root, or a container without CAP_SYS_ADMIN)."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root and mount(8); a faked failure would prove less")
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mount -t tmpfs -o {options} is not permitted here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


def _fill(folder):
    """Fill the file system of `folder` to the last byte; returns the filler's path."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return filler


# ----------------------------------------------------------------------------- 1. the user's files
def _inout(root):
    """The tester's folder: images and files of the user's own that predict's outputs would be named like."""
    folder = root / "inout"
    folder.mkdir()
    _png(folder / "a.png")
    _png(folder / "a_mask.png", value=3, mode="L")
    _png(folder / "b.jpg", value=50)
    _png(folder / "b_overlay.jpg", value=70)
    return folder


@pytest.mark.parametrize("inputs,out", [
    (["inout"], "inout"),                    # the input folder itself
    (["inout/a.png"], "inout"),              # the folder of a named input file
    (["inout/b.jpg"], "inout/../inout/"),    # the same folder spelled differently
])
def test_predict_refuses_an_out_that_holds_its_inputs(ckpt, tmp_path, capsys, inputs, out):
    """Outputs beside the inputs would replace the user's a_mask.png and b_overlay.jpg and be read back
    as inputs (a rerun made *_mask_mask.png): such an --out is refused, nothing is touched."""
    folder = _inout(tmp_path)
    before = _hashes(folder)
    line = _error(capsys, main(["predict", str(ckpt), *[str(tmp_path / i) for i in inputs],
                                "--out", str(tmp_path / out)]))
    assert f"{tmp_path / out}: holds the input " in line and "folder of their own" in line
    assert _hashes(folder) == before


def test_predict_into_a_folder_of_its_own_twice_reads_no_output_back(ckpt, tmp_path, capsys):
    """The fix the message suggests: --out inout/predictions. Inputs are the folder's four images only
    (not its subfolder), a rerun writes the same eight files again (no *_mask_mask.png), and the user's
    files are untouched."""
    folder = _inout(tmp_path)
    before = _hashes(folder)
    for _ in range(2):
        assert main(["predict", str(ckpt), str(folder), "--out", str(folder / "predictions")]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in (folder / "predictions").iterdir()) == sorted(
        f"{stem}_{kind}" for stem in ("a", "a_mask", "b", "b_overlay") for kind in ("mask.png", "overlay.jpg"))
    assert {k: v for k, v in _hashes(folder).items() if not k.startswith("predictions")} == before


# ----------------------------------------------------------------------------- 2. regular files only
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


@pytest.mark.parametrize("make,what", [
    (lambda t: os.mkfifo(t / "b.png") or t / "b.png", "is a FIFO (named pipe), not an image file"),
    (lambda t: Path("/dev/zero"), "is a character device, not an image file"),  # was "no such file"
    (lambda t: (t / "gone.png").symlink_to(t / "nowhere.png") or t / "gone.png",
     "cannot read the image (a link to a missing file)"),
])
def test_a_named_input_that_is_not_a_regular_file_is_one_line(ckpt, tmp_path, capsys, make, what):
    path = make(tmp_path)
    line = _error(capsys, main(["predict", str(ckpt), str(path), "--out", str(tmp_path / "o")]))
    assert f"{path}: {what}" in line


def test_the_library_never_opens_a_fifo(tmp_path):
    """read_input (segment, Segmentor.predict) on a FIFO path: refused from its stat, never opened. An
    open would block until a writer comes: a watchdog plays that writer after 20 s, so that a regression
    fails here instead of hanging the suite."""
    import threading

    from transeg.inference import read_input

    fifo = tmp_path / "p.png"
    os.mkfifo(fifo)
    opened = []

    def writer():
        with contextlib.suppress(OSError):  # ENXIO: nobody has it open for reading (the good case)
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            opened.append(True)

    watchdog = threading.Timer(20, writer)
    watchdog.start()
    try:
        with pytest.raises(transeg.TransegError, match=r"p.png: is a FIFO \(named pipe\), not an image file"):
            read_input(str(fifo))
    finally:
        watchdog.cancel()
    assert not opened


# ----------------------------------------------------------------------------- 3. decoded size bounded
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


# ----------------------------------------------------------------------------- 4. one line, no traceback
@pytest.mark.parametrize("h,w,extra,message", [
    (10, 10000, [], "10000x10 (WxH) is too thin for this model: its test protocol (whole, resize keep-ratio to "
                    "(128, 32), align 32, scales [1.0]) makes it 128x0; crop or pad it"),
    (600, 1, [], "1x600 (WxH) is too thin for this model: its test protocol"),
    (32, 32, ["--scales", "0.01"], "32x32 (WxH) is too small for this model: scale 0.01 of its test protocol makes "
                                   "it 0x0; use larger scales"),
    # the protocol keeps 32x32, but ISR pools stage 1's keys/values 16x: its 8x8 map is smaller than the window
    (32, 32, ["--isr-encoder", "2,2,1,1"], "32x32 (WxH) is too small for this model with its ISR setting: it runs "
                                           "at 32x32"),
])
def test_an_image_too_small_or_thin_for_the_model_is_one_line(ckpt, tmp_path, capsys, h, w, extra, message):
    image = _png(tmp_path / "x.png", h=h, w=w)
    line = _error(capsys, main(["predict", str(ckpt), str(image), "--out", str(tmp_path / "o"), *extra]))
    assert f"x.png: {message}" in line


@pytest.mark.parametrize("scales", ["0", "-1", "nan", "inf", "1,nan"])
def test_scales_must_be_positive_and_finite(ckpt, tmp_path, capsys, scales):
    """nan passed `min(scales) <= 0` (a comparison with nan is False) and failed deep inside."""
    image = _png(tmp_path / "x.png")
    line = _error(capsys, main(["predict", str(ckpt), str(image), "--out", str(tmp_path / "o"), f"--scales={scales}"]))
    assert "test protocol: scales must be positive ratios (finite, > 0)" in line
    with pytest.raises(transeg.TransegError, match="positive ratios"):
        Protocol(scales=[float(s) for s in scales.split(",")])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("verb", ["predict", "bench"])
def test_device_cuda_without_cuda_is_one_line(ckpt, tmp_path, capsys, verb):
    args = [str(_png(tmp_path / "x.png")), "--out", str(tmp_path / "o")] if verb == "predict" else ["--runs", "1"]
    line = _error(capsys, main([verb, str(ckpt), *args, "--device", "cuda"]))
    assert "device 'cuda': CUDA is not available on this machine" in line and "use --device cpu" in line


@pytest.mark.parametrize("verb", ["predict", "eval"])
def test_out_naming_an_existing_file_is_one_line_and_the_file_is_kept(ckpt, tmp_path, capsys, verb):
    target = tmp_path / "notes.txt"
    target.write_text("my notes\n")
    args = ["predict", str(ckpt), str(_png(tmp_path / "x.png"))] if verb == "predict" else ["eval", str(ckpt)]
    line = _error(capsys, main([*args, "--out", str(target)]))
    assert f"{target}: is a file, not a folder" in line and target.read_text() == "my notes\n"


def test_predict_with_a_bad_checkpoint_leaves_no_output_folder(tmp_path, capsys):
    """The --out folder is checked before the model loads but created only after it did: a checkpoint
    that does not load is one line and leaves no empty `preds/` behind (it used to)."""
    bad = tmp_path / "model.safetensors"
    bad.write_text("not a checkpoint\n")
    line = _error(capsys, main(["predict", str(bad), str(_png(tmp_path / "x.png")), "--out", str(tmp_path / "preds")]))
    assert f"{bad}: not a safetensors file" in line and not (tmp_path / "preds").exists()


def _official_segformer(path):
    """A SegFormer-B0 .pth in the authors' key layout (the parity fixture's keys, seeded weights)."""
    from seeded import seeded_state_dict

    case = json.loads((Path(__file__).parent / "fixtures" / "segformer_official.json").read_text())["cases"][0]
    torch.save({"state_dict": seeded_state_dict(case["keys"], case["weight_seed"])}, path)
    return path


# a foreign file that is no checkpoint: torch's unpickler fails on garbage in any way (KeyError on a text
# file, UnpicklingError whose text advises weights_only=False on random bytes); each is one line that does
# not blame code execution and gives no such advice
@pytest.mark.parametrize("content,message", [
    (b"hello world, this is a text file\n", "not a PyTorch checkpoint (its bytes do not unpickle"),
    (bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8)), "not a PyTorch checkpoint (its bytes"),
    (b"PK\x03\x04garbage", "not a readable PyTorch checkpoint (PytorchStreamReader failed reading zip archive"),
])
def test_convert_of_a_file_that_is_no_checkpoint_is_one_line(tmp_path, capsys, content, message):
    src = tmp_path / "b0.pth"
    src.write_bytes(content)
    line = _error(capsys, main(["convert", str(src), str(tmp_path / "b0.safetensors"), "--from", "segformer"]))
    assert f"{src}: {message}" in line and "would run code" not in line and "weights_only` set to `False" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b0.pth"]


# verb -> (arguments writing under RO, the folder the message names); each is refused before its work
READ_ONLY = {
    "predict": lambda c, t, ro: (["predict", str(c), str(_png(t / "x.png")), "--out", str(ro / "preds")], ro / "preds"),
    "eval --out": lambda c, t, ro: (["eval", str(c), "--limit", "2", "--out", str(ro)], ro),
    "convert": lambda c, t, ro: (["convert", str(_official_segformer(t / "b0.pth")), str(ro / "b0.safetensors"),
                                  "--from", "segformer"], ro),
    "export": lambda c, t, ro: (["export", str(c), str(ro / "m.onnx"), "--static", "--size", "64x64"], ro),
    "bench --isr-sweep --plot": lambda c, t, ro: (["bench", str(c), "--isr-sweep", "--plot", str(ro / "sweep.png"),
                                                   "--size", "64x64", "--runs", "1", "--warmup", "0"], ro),
    "data prepare": lambda c, t, ro: (["data", "prepare", "cityscapes", str(t), str(ro / "cityscapes")],
                                      ro / "cityscapes"),
}


@pytest.mark.integration
@pytest.mark.parametrize("verb", READ_ONLY)
def test_a_read_only_output_folder_is_one_line_before_any_work(ckpt, tmp_path, capsys, verb):
    with _tmpfs(tmp_path / "ro", "ro") as ro:
        args, named = READ_ONLY[verb](ckpt, tmp_path, ro)
        line = _error(capsys, main(args))
        assert f"{named}: cannot write here (read-only file system)" in line
        assert not list(ro.iterdir())


# ----------------------------------------------------------------------------- 5. a full disk
@pytest.mark.integration
def test_a_full_disk_leaves_no_empty_mask_and_keeps_the_previous_outputs(ckpt, tmp_path, capsys):
    """predict used to leave a 0-byte mask (and a traceback). Masks and overlays are now written to a
    temporary beside them and renamed: the rerun on a full disk fails in one line naming the file, the
    first run's outputs are byte for byte intact, no temporary or empty file is left."""
    first, second = tmp_path / "1", tmp_path / "2"
    first.mkdir(), second.mkdir()
    _noise(first / "photo.png", seed=1), _noise(second / "photo.png", seed=2)
    with _tmpfs(tmp_path / "disk", "size=256k") as disk:
        assert main(["predict", str(ckpt), str(first / "photo.png"), "--out", str(disk)]) == 0
        capsys.readouterr()
        filler = _fill(disk)
        before = _hashes(disk)
        line = _error(capsys, main(["predict", str(ckpt), str(second / "photo.png"), "--out", str(disk)]))
        assert f"{disk / 'photo_mask.png'}: could not be saved (No space left on device); the previous version " \
               "is intact" in line
        assert _hashes(disk) == before
        assert sorted(p.name for p in disk.iterdir()) == [filler.name, "photo_mask.png", "photo_overlay.jpg"]
        # with room again, the same run completes and writes complete images
        filler.unlink()
        assert main(["predict", str(ckpt), str(second / "photo.png"), "--out", str(disk)]) == 0
        assert Image.open(disk / "photo_overlay.jpg").size == (200, 200) and _hashes(disk) != before


# ----------------------------------------------------------------------------- 6. export says what failed
@pytest.fixture
def onnx_modules():
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name)


def test_export_to_a_folder_says_so(ckpt, tmp_path, capsys, onnx_modules):
    """Was blamed on 'dynamic sizes' after a full trace."""
    (tmp_path / "model.onnx").mkdir()
    line = _error(capsys, main(["export", str(ckpt), str(tmp_path / "model.onnx")]))
    assert f"{tmp_path / 'model.onnx'}: is a folder; give the file to write, e.g. " in line
    assert "dynamic" not in line and not list((tmp_path / "model.onnx").iterdir())


@pytest.mark.integration
def test_export_on_a_full_disk_says_the_disk_is_full(ckpt, tmp_path, capsys, onnx_modules):
    """A real trace (static, 64x64: the fastest), then a 64 kB disk that cannot hold the graph."""
    with _tmpfs(tmp_path / "disk", "size=64k") as disk:
        line = _error(capsys, main(["export", str(ckpt), str(disk / "m.onnx"), "--static", "--size", "64x64",
                                    "--no-check"]))
        assert f"{disk / 'm.onnx'}: could not be saved (No space left on device); nothing was written" in line
        assert "dynamic" not in line and not list(disk.iterdir())


# ----------------------------------------------------------------------------- 7. classes.txt
@pytest.mark.parametrize("line,message", [
    ("road 128 64", "classes.txt:2: 'road 128 64' has 2 numbers after the name; expected `name` or `name R G B`"),
    ("road, 128, 64, 32, 255", "classes.txt:2: 'road, 128, 64, 32, 255' has 4 numbers after the name"),
])
def test_a_colour_written_wrongly_in_classes_txt_is_one_line(tmp_path, capsys, line, message):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True), (root / "masks").mkdir()
    (root / "classes.txt").write_text(f"sky\n{line}\ncar 0 0 142\n")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "images" / "x.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "masks" / "x.png")
    assert message in _error(capsys, main(["data", "check", str(root)]))


def test_classes_txt_still_reads_names_and_colours(tmp_path):
    """One trailing number belongs to the name ("lane 2"); three are a colour."""
    from transeg.data.folder import read_classes

    (tmp_path / "classes.txt").write_text("lane 2\nroad 128 64 128\nsky,70,130,180\n")
    names, palette = read_classes(tmp_path / "classes.txt")
    assert names == ["lane 2", "road", "sky"] and palette[1:] == [(128, 64, 128), (70, 130, 180)]
