"""The compiled inference path (transeg.compiled): size buckets, their bookkeeping, the bounded cache of graphs,
and that compiled equals eager on every family (CPU inductor; one graph costs 5-30 s of compile on 2 cores, so
the families beyond SegFormer run with -m slow)."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import transeg
from transeg.compiled import MAX_GRAPHS, batch_bucket, bucket_of, bucket_side
from transeg.registry import FAMILIES, VARIANTS
from transeg.segmentor import Segmentor


def test_bucket_ladder():
    """Four rungs per octave, multiples of 32: 512 stays, 513 -> 640 and 700 -> 768 (steps of 128 from 512),
    1025 -> 1280 (steps of 256), small sides on multiples of 32; padding adds at most a quarter of a side. A ViT
    padding to 14 (EoMT DINOv2) gets rungs on multiples of 224 = lcm(32, 14). Batches go to powers of two."""
    assert [bucket_side(s) for s in (1, 31, 100, 128, 200, 512, 513, 700, 1024, 1025, 2048)] == \
        [32, 32, 128, 128, 224, 512, 640, 768, 1024, 1280, 2048]
    assert all(bucket_side(s) < 1.25 * s + 32 for s in range(1, 5000, 7))
    assert bucket_of((512, 683)) == (512, 768) and bucket_of((500, 700), pad_multiple=14) == (672, 896)
    assert [batch_bucket(n) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]


class LocalBackbone(nn.Module):
    """A stride-4 encoder whose every output depends only on its own 4x4 input block (a 4x4 convolution of stride
    4 over the input zero-padded to a multiple of 4, as a strided convolution's own padding does): a model that
    zero padding past the image cannot change, so bucketed and per-size labels must be equal
    exactly -- what is left to test is the bookkeeping (padding, batch padding, the crop to the eager size)."""

    pad_multiple, out_channels = 1, (8,)

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 4, stride=4)

    def forward(self, x):
        h, w = x.shape[-2:]
        return [self.conv(nn.functional.pad(x, (0, -w % 4, 0, -h % 4)))]


class LocalHead(nn.Module):
    num_classes, stride, mask_classification = 5, 4, False

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 5, 1)

    def forward(self, features):
        return self.conv(features[0]) * 10


def _local_model():
    torch.manual_seed(0)
    return Segmentor(LocalBackbone(), LocalHead(), 5, meta={"mean": [0, 0, 0], "std": [1, 1, 1]}).eval()


def test_mixed_size_folder_compiles_one_graph_per_bucket_with_per_size_labels():
    """Seven inputs of seven sizes (odd ones, not multiples of the stride) and three batch sizes fall in five
    buckets: Dynamo compiles 5 graphs, not 7, and every label map equals the eager per-size one."""
    torch._dynamo.reset()
    model = _local_model()
    sizes = [(100, 150, 1), (97, 130, 1), (128, 160, 1), (120, 101, 3), (128, 128, 1), (200, 210, 1), (190, 225, 2)]
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(n, 3, h, w, generator=g) for h, w, n in sizes]
    with torch.no_grad():
        eager = [model.logits(x).argmax(1) for x in inputs]
        lines = []
        model.optimize_for_inference(compile=True, log=lines.append)
        compiled = [model.logits(x).argmax(1) for x in inputs]
    buckets = {(bucket_of(x.shape[-2:]), batch_bucket(x.shape[0])) for x in inputs}
    # 128x160 (three inputs), 128x128 at batch 4 and at batch 1, 224x224, 192x256 at batch 2
    assert len(buckets) == 5
    assert len(model.compiled.graphs) == len(buckets) and len(lines) == len(buckets)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == len(buckets)
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))
    assert "compiled for 128x160, batch 1 in" in lines[0]


def test_cache_is_bounded_and_training_drops_it():
    """Past MAX_GRAPHS (8) buckets an input runs eager, said once, and so does a call under another ISR setting than
    the compiled one (a service's per-request ISR must not stall it on a compile); train() drops the compiled path (its graphs hold
    frozen weights), so a model trained after compiling is never served stale weights."""
    model = _local_model()
    lines = []
    model.optimize_for_inference(compile=True, log=lines.append)
    model.compiled.compiled = model.eager_network  # the bookkeeping only: no inductor compile
    with torch.no_grad():
        for side in range(32, 32 * (MAX_GRAPHS + 3), 32):
            model.logits(torch.randn(1, 3, side, 32))
    assert len(model.compiled.graphs) == MAX_GRAPHS
    assert sum("at most 8 graphs" in line for line in lines) == 1
    model.compiled.state = lambda: "another ISR setting"  # a per-request ISR setting: eager, said once, no graph
    with torch.no_grad():
        model.logits(torch.randn(1, 3, 32, 32))
        model.logits(torch.randn(1, 3, 32, 32))
    assert len(model.compiled.graphs) == MAX_GRAPHS and sum("runs eager" in line for line in lines) == 1
    model.train()
    assert model.compiled is None


class FixedSizeHead(LocalHead):
    """A head that makes its maps at one size whatever the input's (as SegViT's masks at its training crop)."""

    def forward(self, features):
        return nn.functional.interpolate(super().forward(features), size=(16, 16), mode="bilinear")


def test_a_head_of_fixed_output_size_is_compiled_per_exact_size():
    """Its 16x16 maps cannot be cropped back from a bucket: the first compile finds that (16x16 is not the 32x40
    bucket's 8x10), says it once, and from then on graphs are per exact size and give eager's scores exactly."""
    torch.manual_seed(0)
    model = Segmentor(LocalBackbone(), FixedSizeHead(), 5, meta={"mean": [0, 0, 0], "std": [1, 1, 1]}).eval()
    inputs = [torch.randn(1, 3, 30, 37), torch.randn(1, 3, 30, 37), torch.randn(1, 3, 26, 40)]
    with torch.no_grad():
        eager = [model.logits(x) for x in inputs]
        lines = []
        model.optimize_for_inference(compile=True, log=lines.append)
        model.compiled.compiled = model.eager_network  # the bookkeeping only
        got = [model.logits(x) for x in inputs]
    assert model.compiled.exact and sorted(k[0] for k in model.compiled.graphs) == [(26, 40), (30, 37)]
    assert sum("per exact size" in line for line in lines) == 1
    assert all(torch.equal(a, b) for a, b in zip(eager, got))


def test_a_failing_compiler_falls_back_to_eager_once():
    """A compiler error (here injected; on a machine without a C compiler, inductor's) is said in one line and the
    model runs eager from then on, with eager's labels: a service on the default compiled path stays up."""
    model = _local_model()
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        expected = model.logits(x)
    lines = []
    model.optimize_for_inference(compile=True, log=lines.append)

    def broken(x):
        raise RuntimeError("no C compiler found\nlong traceback text")
    model.compiled.compiled = broken
    with torch.no_grad():
        first, second = model.logits(x), model.logits(x)
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert lines == ["compiling failed (RuntimeError: no C compiler found); running eager"]


def _tiny(name):
    variant = VARIANTS[name]
    torch.manual_seed(0)
    return transeg.create_model(name, num_classes=5, **FAMILIES[variant.family].tiny(variant.arguments())).eval()


ONE_PER_FAMILY = ["segformer-b0", "edaformer-t", "segmenter-vit-t16-mask", "segvit-vit-b16", "semask-swin-t-fpn",
                  "semask-swin-l-mask2former", "eomt-dinov2-l16"]


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n == "segformer-b0" else pytest.mark.slow)
                                  for n in ONE_PER_FAMILY])
def test_compiled_equals_eager(name):
    """Inductor with weight freezing computes every family's scores as eager does to 1e-4 (it reorders float sums
    and folds BatchNorm and constants: measured 1e-6..1e-5 of scores ~1-10), at a size on a rung (no padding) and
    a size padded into it, where eager is the same model run on the padded input and cropped. SegViT, whose head
    makes its masks at the training crop whatever the input's size, is found out at the first compile and compiled
    per exact size instead (a crop of its masks would be a wrong answer: 2.5e-3 off here before this was caught)."""
    model = _tiny(name)
    g = torch.Generator().manual_seed(2)
    on_rung, inside = torch.randn(1, 3, 64, 96, generator=g), torch.randn(1, 3, 56, 90, generator=g)
    with torch.no_grad():
        eager = model.logits(on_rung)
        padded = torch.nn.functional.pad(inside, (0, 96 - 90, 0, 64 - 56))
        compiled_model = copy.deepcopy(model).optimize_for_inference(compile=True)
        got = compiled_model.logits(on_rung)
        assert (got - eager).abs().max().item() <= 1e-4 * max(1.0, eager.abs().max().item())
        # inside the same bucket: one graph, and the eager network's output on the padded input, cropped
        head = model.network(padded)
        head_compiled = compiled_model.network(inside)
    if name.startswith("segvit"):  # masks at the training crop whatever the input: a graph per exact size
        assert compiled_model.compiled.exact and len(compiled_model.compiled.graphs) == 2  # 64x96 and 56x90
        return
    assert len(compiled_model.compiled.graphs) == 1
    first = head if isinstance(head, torch.Tensor) else head[0]
    first_compiled = head_compiled if isinstance(head_compiled, torch.Tensor) else head_compiled[0]
    h, w = compiled_model.compiled.output_size((56, 90))
    assert first_compiled.shape[-2:] == (h, w)
    assert (first_compiled - first[..., :h, :w]).abs().max().item() <= 1e-4 * max(1.0, first.abs().max().item())


def test_bucketed_predict_on_a_rung_equals_eager_labels():
    """`model.predict` on an image whose protocol size is a rung (128x160 under the tiny protocol) gives eager's
    labels exactly through the bucketed path (no padding, so the same network on the same input), with the
    compile replaced by the eager network to keep this a test of the path, not of inductor."""
    model = _tiny("segformer-b0")
    image = np.random.default_rng(3).integers(0, 256, (120, 150, 3), dtype=np.uint8)
    eager = model.predict(image).labels
    model.optimize_for_inference(compile=True)
    model.compiled.compiled = model.eager_network
    assert np.array_equal(model.predict(image).labels, eager)
    assert len(model.compiled.graphs) == 1
