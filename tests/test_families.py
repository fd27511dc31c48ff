"""Every registered variant keeps the same contract, and a family is one module: a new family written in a
folder outside the package, installed as a plug-in, works through every verb without editing transeg."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import transeg
from transeg.flops import variant_table
from transeg.registry import FAMILIES, VARIANTS


def _tiny(name, num_classes=3):
    variant = VARIANTS[name]
    torch.manual_seed(0)
    return transeg.create_model(name, num_classes=num_classes, **FAMILIES[variant.family].tiny(variant.arguments()))


def test_every_family_declares_a_tiny_model():
    """Each variant shrinks to under a million parameters (seconds to train on a CPU): 39 variants of 6 families."""
    assert len(VARIANTS) >= 39 and len(FAMILIES) >= 6
    sizes = {name: sum(p.numel() for p in _tiny(name).parameters()) for name in VARIANTS}
    assert {n: s for n, s in sizes.items() if s >= 1_000_000} == {}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_contract(name, tmp_path):
    """Build (tiny), forward, loss, backward, predict, save/load, and a `transeg models` row, for every variant.
    Eval scores have K=3 channels at some stride of the 64x64 input; the training loss is finite and reaches
    the backbone and the head; predict answers labels at the image's own odd size (45x61); a
    saved and reloaded model gives the same scores as the model it was saved from (0 difference: the same
    weights, the same code)."""
    model = _tiny(name).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        scores = model.logits(x)
    assert scores.shape == (2, 3, 64, 64) and torch.isfinite(scores).all()

    model.train()
    label = torch.randint(0, 3, (2, 64, 64))
    label[:, :4] = 255  # ignored pixels
    losses = model.loss(model(x), label)
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    for part in (model.backbone, model.decode_head):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())

    model.eval()
    image = np.random.default_rng(0).integers(0, 256, (45, 61, 3), dtype=np.uint8)
    seg = model.predict(image)
    assert tuple(seg.labels.shape) == (45, 61) and int(seg.labels.max()) < 3

    transeg.save(model, tmp_path / "m.safetensors")
    again = transeg.load(tmp_path / "m.safetensors")
    with torch.no_grad():  # after the training step (its batch statistics changed the model)
        assert torch.equal(again.logits(x), model.logits(x))

    family = VARIANTS[name].family
    rows = [r for r in variant_table(family, count_flops=False) if r["model"] == name]
    assert len(rows) == 1 and rows[0]["params_m"] > 0


# A family written as a user would: one module, outside the package, registering itself on import.
TOY = '''
"""A toy family: a strided conv encoder and a 1x1 classifier."""
from torch import nn

from transeg.registry import Family, Paper, Variant, register, register_family
from transeg.segmentor import Segmentor


class ToyEncoder(nn.Module):
    pad_multiple = 1  # no padding of its own (transeg.contracts.Backbone)

    def __init__(self, width):
        super().__init__()
        self.out_channels = [width]
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU())

    def forward(self, x):
        return [self.stem(x)]


class ToyHead(nn.Module):
    mask_classification = False  # per-pixel logits (transeg.contracts.DecodeHead)

    def __init__(self, width, num_classes):
        super().__init__()
        self.num_classes, self.stride = num_classes, 4
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, features):
        return self.classifier(features[-1])


def build_toy(num_classes, width=8):
    return Segmentor(ToyEncoder(width), ToyHead(width, num_classes), num_classes)


register_family(Family("toyseg", "ToySeg", "nobody, 2026", counting="params of this module"))
register(Variant(name="toyseg-s", family="toyseg", build=build_toy, kwargs=dict(width=8),
                 paper=Paper(params_m=0.001, gflops={"64x64@150": None})))
'''


@pytest.fixture(scope="module")
def toy_env(tmp_path_factory):
    """A folder holding the toy module and the dist-info that installs it under `transeg.families`."""
    root = tmp_path_factory.mktemp("plugin")
    (root / "toy_family.py").write_text(textwrap.dedent(TOY))
    info = root / "toy_family-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-family\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[transeg.families]\ntoy = toy_family\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    return root, env


def _transeg(env, *args, timeout=240):
    run = subprocess.run([sys.executable, "-m", "transeg.cli", *map(str, args)], env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_a_new_family_is_one_module(toy_env, tmp_path):
    """The toy family, installed as a plug-in (no file of transeg edited): `transeg models` lists it with its
    params counted (3 x 8 x 9 + 8 + 8 x 8 x 9 + 8 + 8 x 150 + 150 = 2,246 with 150 classes) and GFLOPs;
    `train` runs 2 steps through the CLI and saves; the checkpoint loads and predicts in a fresh process;
    `predict` writes a mask; `export` writes an ONNX file that onnxruntime checks."""
    root, env = toy_env
    listed = _transeg(env, "models", "--family", "toyseg")
    row = next(line for line in listed.splitlines() if line.startswith("toyseg-s"))
    assert row.split()[1] == f"{2246 / 1e6:.1f}"  # params M column
    assert row.split()[3:5] == ["64x64@150", "0.0"]  # GFLOPs counted at the paper's size (0.0007: "-" if not)
    assert "ToySeg: params of this module" in listed

    run = tmp_path / "run"
    _transeg(env, "train", "--model", "toyseg-s", "--data", "synthetic:size=32,n=8", "--out", run, "--iters", 2,
             "--batch-size", 2, "--workers", 0, "--device", "cpu", "--set", "eval_interval=2", "ckpt_interval=2")
    checkpoint = run / "model.safetensors"
    assert checkpoint.is_file()

    check = ("import sys, numpy as np, transeg; m = transeg.load(sys.argv[1]); "
             "s = m.predict(np.zeros((40, 50, 3), np.uint8)); print(m.meta['variant'], tuple(s.labels.shape))")
    shown = subprocess.run([sys.executable, "-c", check, str(checkpoint)], env=env, capture_output=True, text=True,
                           timeout=120)
    assert shown.stdout.split() == ["toyseg-s", "(40,", "50)"], shown.stderr[-2000:]

    image = tmp_path / "images" / "a.png"
    image.parent.mkdir()
    from PIL import Image

    Image.fromarray(np.full((36, 44, 3), 128, np.uint8)).save(image)
    _transeg(env, "predict", checkpoint, image, "--out", tmp_path / "preds", "--device", "cpu")
    assert (tmp_path / "preds" / "a_mask.png").is_file()

    pytest.importorskip("onnxruntime")
    _transeg(env, "export", checkpoint, tmp_path / "toy.onnx")
    assert (tmp_path / "toy.onnx").stat().st_size > 1000

