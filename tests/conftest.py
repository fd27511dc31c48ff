import pytest
import torch

# A SegFormer small enough to train in seconds on a CPU: same code paths as B0, tiny widths.
TINY = dict(embed_dims=[8, 16, 24, 32], num_heads=[1, 1, 1, 1], depths=[1, 1, 1, 1], decoder_dim=16)
TINY_DATA = "synthetic:size=32,n=16"


@pytest.fixture(autouse=True)
def _two_threads():
    torch.set_num_threads(2)  # the CI machine's core count; keeps timings and numerics comparable
