import pytest
import torch

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
