import numpy as np
import pytest
import torch
from PIL import Image

import transeg
from transeg.data.synthetic import SyntheticDataset
from transeg.protocol import Protocol

# A SegFormer small enough to train in seconds on a CPU: same code paths as B0, tiny widths.
TINY = dict(embed_dims=[8, 16, 24, 32], num_heads=[1, 1, 1, 1], depths=[1, 1, 1, 1], decoder_dim=16)
TINY_DATA = "synthetic:size=32,n=16"


@pytest.fixture(autouse=True)
def _two_threads():
    torch.set_num_threads(2)  # the CI machine's core count; keeps timings and numerics comparable

# An EDAFormer with the same code paths as T (EFT encoder, all-attention decoder) and tiny widths;
# widths divisible by the decoder's fixed 2/4/8 heads.
TINY_EDAFORMER = dict(embed_dims=[8, 16, 32, 64], depths=[1, 1, 1, 1], mlp_ratio=2, decoder_dim=16, decoder_mlp_ratio=1)

# An integration test (another process, a browser, torchrun, a tmpfs) gets 5 minutes unless it states its own,
# several times what any takes on the 2-core CI machine (`pytest --durations`), so a hang fails fast.
INTEGRATION_TIMEOUT = 300


def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("integration") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(INTEGRATION_TIMEOUT))


CLASSES, PALETTE = SyntheticDataset.classes, SyntheticDataset.palette  # sky, ground, disc, box, triangle, ring


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder laid out as the --help examples assume: runs/train/model.safetensors (an untrained tiny
    SegFormer for the 6 synthetic classes), photo.jpg (256x200), and data/images/val + data/masks/val."""
    root = tmp_path_factory.mktemp("newcomer")
    torch.manual_seed(0)
    model = transeg.create_model("segformer-b0", num_classes=6, classes=CLASSES, palette=PALETTE, **TINY)
    transeg.save(model, root / "runs" / "train" / "model.safetensors")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (200, 256, 3), dtype=np.uint8)).save(root / "photo.jpg")
    (root / "data" / "images" / "val").mkdir(parents=True)
    (root / "data" / "masks" / "val").mkdir(parents=True)
    truth = np.zeros((96, 128), np.uint8)
    truth[:, 64:] = 3  # left half sky (0), right half box (3)
    truth[:4] = 255  # a strip of ignore
    Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(root / "data" / "images" / "val" / "s1.png")
    Image.fromarray(truth, mode="L").save(root / "data" / "masks" / "val" / "s1.png")
    return root


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny 6-class SegFormer (the synthetic set's class count) with the quickstart's test protocol:
    keep-ratio resize into (128, 32), aligned to 32."""
    model = transeg.create_model("segformer-b0", num_classes=6, **TINY)
    model.protocol = Protocol(scale=(128, 32))
    return transeg.save(model, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    transeg.save(transeg.create_model("segformer-b0", num_classes=3, classes=["a", "b", "c"], **TINY), path)
    return path

