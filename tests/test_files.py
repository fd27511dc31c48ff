"""transeg.files: outputs only ever create a file or replace a regular one; a special file given as the output
is one line, exit status 2, and left as it was."""
import os
import socket
import stat

import pytest
import torch

import transeg
from conftest import TINY
from transeg import cli
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
