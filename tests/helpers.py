"""Helpers shared by several test files: tiny images and checkpoints, the one error line, real tmpfs mounts, the CLI."""
import contextlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import transeg
from conftest import TINY, TINY_DATA
from transeg.cli import main


def run(argv, cwd):
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return main(argv)
    finally:
        os.chdir(old)


def _png(path, h=40, w=50, value=100, mode=None):
    image = Image.fromarray(np.full((h, w, 3), value, np.uint8))
    (image.convert(mode) if mode else image).save(path)
    return path


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


def _official_segformer(path):
    """A SegFormer-B0 .pth in the authors' key layout (the parity fixture's keys, seeded weights)."""
    from seeded import seeded_state_dict

    case = json.loads((Path(__file__).parent / "fixtures" / "segformer_official.json").read_text())["cases"][0]
    torch.save({"state_dict": seeded_state_dict(case["keys"], case["weight_seed"])}, path)
    return path


def _one_line(capsys, *fragments):
    """The one `transeg: error:` line on stderr (and no traceback), holding every fragment."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("transeg: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@contextlib.contextmanager
def _mounted(path, options):
    """A real tmpfs at `path` (we run as root in CI); the test is skipped where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command here")
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}); needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


# LayerNorm only (no BatchNorm, whose batch statistics differ between 2 x 2 and 4 images) and no
# dropout: the one place where two processes and one process may differ is then the gradient average
SEGMENTER = dict(embed_dim=32, depth=2, num_heads=2, crop=32, decoder_depth=1, drop_path_rate=0.0, decoder_drop=0.0)


def _segmenter_train_args(out, iters, **sets):
    args = ["train", "--model", "segmenter-vit-t16-mask", "--data", TINY_DATA, "--out", str(out), "--iters",
            str(iters), "--workers", "0", "--device", "cpu", "--set", f"model_args={json.dumps(SEGMENTER)}",
            "warmup_iters=0", "lr=1e-3", "optimizer=sgd", "weight_decay=0.0", "log_interval=1"]
    return args + [f"{k}={v}" for k, v in sets.items()]


def _ckpt(tmp):
    path = tmp / "tiny.safetensors"
    if not path.exists():
        transeg.save(transeg.create_model("segformer-b0", num_classes=3, classes=["a", "b", "c"], **TINY), path)
    return path


def _image(tmp, name, make):
    path = tmp / name
    make(path)
    return path

