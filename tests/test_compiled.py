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
    1025 -> 1280 (steps of 256), small sides on multiples of 32: padding adds less than a quarter of a side of 128 or
    more, less than 32 below. Batches go to powers of two."""
    assert [bucket_side(s) for s in (1, 31, 100, 128, 200, 512, 513, 700, 1024, 1025, 2048)] == \
        [32, 32, 128, 128, 224, 512, 640, 768, 1024, 1280, 2048]
    assert all(bucket_side(s) - s < (s / 4 if s >= 128 else 32) and bucket_side(s) % 32 == 0 for s in range(1, 5000))
    assert bucket_of((512, 683)) == (512, 768)
    assert [batch_bucket(n) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]


def test_outputs_are_copied_out_of_cuda_graphs():
    """With CUDA graphs the next replay overwrites a graph's outputs, so the path returns copies (the CUDA options
    say so); the crop keeps the first n of a padded batch and cuts maps, not class logits [N,Q,K+1]."""
    from transeg.compiled import _crop
    from transeg.contracts import MaskPrediction

    out = MaskPrediction(torch.randn(4, 3, 10, 12), torch.randn(4, 3, 6))
    got = _crop(out, 3, (7, 9), copy=True)
    assert got.mask_logits.shape == (3, 3, 7, 9) and got.class_logits.shape == (3, 3, 6)
    assert got.mask_logits.untyped_storage().data_ptr() != out.mask_logits.untyped_storage().data_ptr()
    assert torch.equal(got.mask_logits, out.mask_logits[:3, :, :7, :9])
    assert _crop(out, 3, (7, 9)).mask_logits.untyped_storage().data_ptr() == out.mask_logits.untyped_storage().data_ptr()


class LocalBackbone(nn.Module):
    """A stride-4 encoder whose every output depends only on its own 4x4 input block (a 4x4 convolution of stride
    4 over the input zero-padded to a multiple of 4, as a strided convolution's own padding does): a model that
    zero padding past the image cannot change, so bucketed and per-size labels must be equal
    exactly -- what is left to test is the bookkeeping (padding, batch padding, the crop to the eager size)."""

    out_channels = (8,)

    def __init__(self, pad_multiple=1):
        super().__init__()
        self.pad_multiple = pad_multiple
        self.conv = nn.Conv2d(3, 8, 4, stride=4)

    def forward(self, x):
        h, w = x.shape[-2:]
        m = max(4, self.pad_multiple)
        return [self.conv(nn.functional.pad(x, (0, -w % m, 0, -h % m)))]


class LocalHead(nn.Module):
    num_classes, stride, mask_classification = 5, 4, False

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 5, 1)

    def forward(self, features):
        return self.conv(features[0]) * 10


def _local_model(pad_multiple=1):
    torch.manual_seed(0)
    return Segmentor(LocalBackbone(pad_multiple), LocalHead(), 5, meta={"mean": [0, 0, 0], "std": [1, 1, 1]}).eval()


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
        # Dynamo's graphs without inductor's code generation (13 s on 2 cores for these five): what is counted here
        # is how many graphs the buckets make; test_compiled_equals_eager runs inductor itself
        model.compiled.compiled = torch.compile(model.eager_network, backend="eager", dynamic=False)
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


@pytest.mark.parametrize("head,pad_multiple", [(FixedSizeHead, 1), (LocalHead, 16)])
def test_exact_sizes_where_padding_is_not_sound(head, pad_multiple):
    """A head whose 16x16 maps do not follow the input (found by two small eager runs when the path is made, before
    any compile: a 60x60 input, whose 64x64 bucket happens to make 16x16 maps too, would otherwise be cropped to
    15x15 and be wrong), and a backbone that pads its input itself (a ViT, which would resize its position
    embeddings to the padded grid), get graphs per exact size, unpadded, and eager's scores exactly."""
    torch.manual_seed(0)
    model = Segmentor(LocalBackbone(pad_multiple), head(), 5, meta={"mean": [0, 0, 0], "std": [1, 1, 1]}).eval()
    inputs = [torch.randn(1, 3, 30, 37), torch.randn(1, 3, 30, 37), torch.randn(1, 3, 60, 60)]
    with torch.no_grad():
        eager = [model.logits(x) for x in inputs]
        model.optimize_for_inference(compile=True)
        assert model.compiled.exact
        model.compiled.compiled = model.eager_network  # the bookkeeping only
        got = [model.logits(x) for x in inputs]
    assert sorted(k[0] for k in model.compiled.graphs) == [(30, 37), (60, 60)]
    assert all(torch.equal(a, b) for a, b in zip(eager, got))
    assert not _local_model().optimize_for_inference(compile=True).compiled.exact  # a pyramid: buckets


def test_a_failing_compiler_falls_back_to_eager_once():
    """A compiler error (here injected: inductor's when the machine has no C compiler) is said in one line and the
    model runs eager from then on, with eager's labels: a service on the default compiled path stays up. Any other
    error (a bad input, out of memory) is raised as it is, and leaves the path on."""
    from torch._inductor.exc import CppCompileError

    model = _local_model()
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        expected = model.logits(x)
    lines = []
    model.optimize_for_inference(compile=True, log=lines.append)

    def oom(x):
        raise torch.OutOfMemoryError("CUDA out of memory")

    def no_compiler(x):
        raise CppCompileError(["cc", "kernel.cpp"], "cc: not found")
    model.compiled.compiled = oom
    with torch.no_grad(), pytest.raises(torch.OutOfMemoryError):
        model.logits(x)
    assert model.compiled.failed is None
    model.compiled.compiled = no_compiler
    with torch.no_grad():
        first, second = model.logits(x), model.logits(x)
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert lines == ["compiling failed (CppCompileError: C++ compile error); running eager"]


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
    a size padded into it, where eager is the same model run on the padded input and cropped (the pyramids: MiT,
    Swin-FPN). The ViTs and Swin-Mask2Former (which pad their input themselves) and SegViT (whose head makes its masks at the training crop
    whatever the input's size) are compiled per exact size instead, each equal to eager at its size."""

    def tolerance(reference):
        return 1e-4 * max(1.0, reference.abs().max().item())

    model = _tiny(name)
    g = torch.Generator().manual_seed(2)
    on_rung, inside = torch.randn(1, 3, 64, 96, generator=g), torch.randn(1, 3, 56, 90, generator=g)
    with torch.no_grad():
        eager = model.logits(on_rung)
        padded = torch.nn.functional.pad(inside, (0, 96 - 90, 0, 64 - 56))
        compiled_model = copy.deepcopy(model).optimize_for_inference(compile=True)
        got = compiled_model.logits(on_rung)
        assert (got - eager).abs().max().item() <= tolerance(eager)
        if compiled_model.compiled.exact:  # ViTs, Swin, SegViT: graphs per exact size, each equal to eager
            assert (compiled_model.logits(inside) - model.logits(inside)).abs().max().item() <= tolerance(eager)
            assert len(compiled_model.compiled.graphs) == 2
            return
        # a pyramid: inside the same bucket, one graph, and the eager network on the padded input, cropped
        head = model.network(padded)
        head_compiled = compiled_model.network(inside)
    assert len(compiled_model.compiled.graphs) == 1
    h, w = compiled_model.compiled.output_size((56, 90))
    assert head_compiled.shape[-2:] == (h, w)
    assert (head_compiled - head[..., :h, :w]).abs().max().item() <= tolerance(head)


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
