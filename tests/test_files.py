"""transeg.files: inputs are regular files; outputs are checked first, never an input, and written atomically."""
import contextlib
import errno
import hashlib
import json
import os
import shutil
import socket
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import transeg
from conftest import TINY
from helpers import _error, _mounted, _official_segformer, _png, _tmpfs
from transeg import cli
from transeg.cli import main
from transeg.errors import TransegError
from transeg.files import atomic_write, output_file


def _fifo(folder):
    path = folder / "pipe.onnx"
    os.mkfifo(path)
    return path


def _char_device(folder):
    """A node with /dev/null's numbers (1, 3), made in the temporary folder, never the real /dev entry."""
    path = folder / "null.onnx"
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("making a device node needs CAP_MKNOD")
    return path


def _socket(folder):
    path = folder / "sock.onnx"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.close()  # the socket file stays
    return path


NODES = {"FIFO": (_fifo, "a FIFO (named pipe)"), "character device": (_char_device, "a character device"),
         "socket": (_socket, "a socket")}


def _identity(path):
    st = os.lstat(path)
    return stat.S_IFMT(st.st_mode), st.st_rdev, st.st_size, st.st_ino


@pytest.mark.parametrize("kind", list(NODES))
@pytest.mark.parametrize("writer", ["atomic_write", "save", "output_file", "symlink"])
def test_a_special_file_is_never_replaced(kind, writer, tmp_path):
    """Each node kind x each way of writing: one TransegError line naming the node and what it is, and the
    node afterwards has the same type, device numbers, size (0) and inode as before."""
    make, what = NODES[kind]
    node = make(tmp_path)
    before = _identity(node)
    target = node
    if writer == "symlink":  # a link to the node is followed, and refused the same way
        target = tmp_path / "link.onnx"
        target.symlink_to(node)
    with pytest.raises(TransegError) as e:
        if writer in ("atomic_write", "symlink"):
            atomic_write(target, lambda tmp: open(tmp, "wb").write(b"x" * 100))
        elif writer == "save":
            transeg.save(transeg.create_model("segformer-b0", num_classes=2, **TINY), target)
        else:
            output_file(target)
    assert f"is {what}, not a regular file" in str(e.value) and str(target) in str(e.value)
    assert "\n" not in str(e.value)
    assert _identity(node) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []  # no temporary left


def test_export_to_a_fifo_is_exit_2_before_any_work(tmp_path, capsys):
    """`transeg export` checks its output first: status 2, one line on stderr, the FIFO untouched."""
    ckpt = tmp_path / "m.safetensors"
    transeg.save(transeg.create_model("segformer-b0", num_classes=2, **TINY), ckpt)
    fifo = _fifo(tmp_path)
    before = _identity(fifo)
    assert cli.main(["export", str(ckpt), str(fifo)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a FIFO (named pipe), not a regular file" in err[0]
    assert _identity(fifo) == before


def test_a_link_to_a_regular_file_is_written_through(tmp_path):
    """A symbolic link given as the output stays a link; the file it points to gets the new bytes (3 of them)."""
    real = tmp_path / "real.bin"
    real.write_bytes(b"old")
    link = tmp_path / "link.bin"
    link.symlink_to(real)
    atomic_write(link, lambda tmp: open(tmp, "wb").write(b"new"))
    assert link.is_symlink() and real.read_bytes() == b"new"


def test_a_regular_file_is_replaced_and_a_new_one_created(tmp_path):
    """The ordinary cases still work: a new file is created, an existing regular file replaced."""
    path = tmp_path / "out" / "state.pt"
    atomic_write(path, lambda tmp: torch.save({"iter": 1}, tmp))
    atomic_write(path, lambda tmp: torch.save({"iter": 2}, tmp))
    assert torch.load(path, weights_only=True) == {"iter": 2}


def test_everything_written_is_readable_by_others_under_umask_022(work, tmp_path):
    """Under umask 022 a plain open() makes 0644 files; the atomic writers (mkstemp: 0600) must too, or
    colleagues on a shared server cannot read the outputs. Every file save, atomic_write, predict
    (--grid --truth), eval --out and a static ONNX export write is 0644."""
    pytest.importorskip("onnxscript")
    from transeg.files import atomic_write

    old = os.umask(0o022)
    try:
        model = transeg.load(work / "runs" / "train" / "model.safetensors")
        transeg.save(model, tmp_path / "m.safetensors")
        atomic_write(tmp_path / "train_state.pt", lambda tmp: torch.save({"iter": 1}, tmp))
        ckpt = str(work / "runs" / "train" / "model.safetensors")
        assert main(["predict", ckpt, str(work / "data" / "images" / "val"), "--out", str(tmp_path / "p"),
                     "--truth", str(work / "data" / "masks" / "val")]) == 0
        assert main(["eval", ckpt, "--limit", "2", "--out", str(tmp_path / "e")]) == 0
        assert main(["export", ckpt, str(tmp_path / "m.onnx"), "--static", "--size", "64x64"]) == 0
    finally:
        os.umask(old)
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    names = {p.name for p in files}
    assert {"m.safetensors", "train_state.pt", "s1_mask.png", "s1_overlay.jpg", "grid.png", "iou.png",
            "predictions.png", "m.onnx"} <= names
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: "0o644" for p in files}
    # ONNX metadata: the test protocol (the input-size rule), as stored with the model and as one line
    onnx = pytest.importorskip("onnx")
    props = {p.key: p.value for p in onnx.load(tmp_path / "m.onnx").metadata_props}
    meta = json.loads(props["transeg"])
    assert meta["protocol"] == model.protocol.to_meta() and meta["protocol_text"] == model.protocol.describe()
    assert props["test_protocol"] == "whole, original size, align 32, scales [1.0]"  # the default protocol


def _noise(path, h=200, w=200, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _hashes(folder):
    """{relative path: sha256} of every file under `folder` (what must not change)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


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


def _save_bigger_model(target):
    transeg.save(transeg.create_model("segformer-b0", num_classes=3, embed_dims=[32, 64, 96, 128], num_heads=[1, 1, 1, 1],
                                      depths=[1, 1, 1, 1], decoder_dim=32), target)


def _torch_save_bigger_state(target):
    from transeg.files import atomic_write

    state = {"iter": 2, "model": {"w": torch.zeros(200_000)}}
    atomic_write(target, lambda tmp: torch.save(state, tmp))


@pytest.mark.integration
@pytest.mark.parametrize("write", [_save_bigger_model, _torch_save_bigger_state], ids=["safetensors", "torch.save"])
def test_a_real_full_disk_keeps_the_previous_checkpoint(tmp_path, write, tiny_ckpt):
    """A 256 kB tmpfs fills up while a checkpoint is written: safetensors raises SafetensorError, torch.save
    RuntimeError('unexpected pos ...'), neither an OSError. Both become the one line, the previous file
    is byte-for-byte intact and no temporary file is left."""
    with _mounted(tmp_path / "disk", "size=256k") as disk:
        target = disk / ("model.safetensors" if write is _save_bigger_model else "train_state.pt")
        shutil.copyfile(tiny_ckpt, target)
        before = target.read_bytes()
        with pytest.raises(transeg.TransegError, match=rf"{target.name}: could not be saved \(No space left on device\); "
                                                       r"the previous version is intact"):
            write(target)
        assert target.read_bytes() == before and [p.name for p in disk.iterdir()] == [target.name]


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """The disk fills up half-way through writing a checkpoint: one clear error, the previous file is
    byte-for-byte intact and no temporary file is left."""
    import errno

    from transeg.files import atomic_write

    target = tmp_path / "train_state.pt"
    torch.save({"iter": 1}, target)
    before = target.read_bytes()

    def fill_disk(tmp):
        Path(tmp).write_bytes(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(transeg.TransegError, match=r"train_state.pt: could not be saved \(No space left on device\); "
                                                   r"the previous version is intact"):
        atomic_write(target, fill_disk)
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["train_state.pt"]



# -- issue 30: a name longer than the file system takes is one line, before any work --------------------------

@pytest.mark.parametrize("make", [
    lambda t: t / ("a" * 300 + ".safetensors"),                       # the case: one name too long
    lambda t: t / ("b" * 256),                                         # one byte past NAME_MAX
    lambda t: t / ("é" * 128 + ".safetensors"),                        # 128 characters, 268 bytes in UTF-8
    lambda t: t / ("d" * 300) / "model.safetensors",                   # a folder's name too long
    lambda t: t.joinpath(*["e" * 200] * 25, "model.safetensors"),      # every part fits, the path does not
], ids=["300-chars", "256-bytes", "multibyte", "folder", "path-max"])
def test_names_too_long_are_one_line(tmp_path, capsys, make):
    """`convert`'s output, `output_file`, `output_folder` and `transeg.save` refuse a name the file system
    cannot hold (ENAMETOOLONG) in one line, exit 2 through the CLI, nothing written."""
    from helpers import _official_segformer
    from transeg.files import output_folder

    dst = make(tmp_path)
    src = _official_segformer(tmp_path / "seg.pth")
    line = _error(capsys, main(["convert", str(src), str(dst), "--from", "segformer"]))
    assert "file name too long" in line and len(line) < 2000, line
    for call in (lambda: output_file(dst), lambda: output_folder(dst),
                 lambda: transeg.save(transeg.create_model("segformer-b0", num_classes=2, **TINY), dst)):
        with pytest.raises(TransegError, match="file name too long"):
            call()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.pth"]


def test_longest_name_the_file_system_takes_is_written(tmp_path):
    """A 255-byte name is written atomically: the temporary beside it uses a shortened stem."""
    path = tmp_path / ("m" * 243 + ".safetensors")
    assert len(path.name) == 255
    transeg.save(transeg.create_model("segformer-b0", num_classes=2, **TINY), path)
    assert transeg.load(path).num_classes == 2
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
