"""The speed-ups compute the same function: algebraic fusion of the decoders (layers/fusion.py), the
channels-last token views, native bf16 inference, and the peak-memory meter of the benchmarks.
No timing here (benchmarks/ does that); these tests check equalities that a wrong fusion breaks."""
import pytest
import torch

import transeg
from transeg.bench import peak_tensor_memory
from transeg.layers import map_to_tokens, tokens_to_map
from transeg.layers.fusion import unfused

TINY = {
    "segformer-b0": dict(embed_dims=(8, 16, 24, 32), num_heads=(1, 1, 2, 2), depths=(1, 1, 1, 1), decoder_dim=32),
    "edaformer-t": dict(embed_dims=(8, 16, 24, 32), num_heads=(1, 2, 4, 8), depths=(1, 1, 1, 1), decoder_dim=32),
}


def _model(name, seed=0):
    torch.manual_seed(seed)
    model = transeg.create_model(name, num_classes=5, **TINY[name])
    bn = model.decode_head.linear_fuse.bn
    with torch.no_grad():  # statistics and affine terms away from their identity defaults
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("name", ["segformer-b0", "edaformer-t"])
def test_fused_decoder_equals_the_published_one_in_eval(name):
    """sum_i up(W_i P_i x_i) + folded BN == BN(conv(cat_i up(P_i x_i))): same logits to 1e-5 at an odd
    size (upsampling by non-integer factors), while the fusion is actually on (the head never calls
    its fuse conv) and the published path does call it."""
    model = _model(name).eval()
    x = torch.randn(2, 3, 75, 99, generator=torch.Generator().manual_seed(1))
    calls = []
    model.decode_head.linear_fuse.conv.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        fused = model(x)
        assert calls == []
        with unfused(model):
            published = model(x)
        assert calls == [1]
    stride_size = (19, 25) if name.startswith("segformer") else (10, 13)  # ceil(75/4), ceil(99/4); /8
    assert fused.shape == published.shape == (2, 5, *stride_size)
    assert (fused - published).abs().max().item() <= 1e-5
    assert published.abs().max().item() > 0.1  # not a comparison of zeros


@pytest.mark.parametrize("name", ["segformer-b0", "edaformer-t"])
def test_fused_decoder_trains_identically(name):
    """In training BatchNorm uses batch statistics of the fused sum; loss, every gradient and the
    running statistics must equal the published computation's (dropout off so both draw nothing)."""
    results = []
    for fused in (True, False):
        model = _model(name, seed=3).train()
        model.decode_head.dropout.p = 0.0
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
        label = torch.randint(0, 5, (2, 64, 64), generator=torch.Generator().manual_seed(5))
        with (torch.enable_grad() if fused else unfused(model)):
            loss = model.loss(model(x), label)["loss"]
            loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        results.append((loss.item(), grads, model.decode_head.linear_fuse.bn.running_var.clone()))
    (l1, g1, v1), (l2, g2, v2) = results
    assert abs(l1 - l2) <= 1e-6 * abs(l2)
    assert g1.keys() == g2.keys() and "decode_head.linear_fuse.conv.weight" in g1
    for k in g2:
        scale = g2[k].abs().max().item()
        assert (g1[k] - g2[k]).abs().max().item() <= 1e-5 * max(scale, 1e-3), k
    assert torch.allclose(v1, v2, rtol=1e-5, atol=1e-6)


def test_token_map_views_share_memory_and_round_trip():
    """tokens_to_map is a channels-last view (no copy) and map_to_tokens undoes it for free; values
    are those of the transposing reshape the encoders used before."""
    tokens = torch.randn(2, 12, 5)
    m = tokens_to_map(tokens, (3, 4))
    assert m.data_ptr() == tokens.data_ptr() and m.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(m, tokens.transpose(1, 2).reshape(2, 5, 3, 4))
    back = map_to_tokens(m)
    assert back.data_ptr() == tokens.data_ptr() and torch.equal(back, tokens)
    nchw = torch.randn(2, 5, 3, 4)
    assert torch.equal(map_to_tokens(nchw), nchw.flatten(2).transpose(1, 2))


def test_native_bf16_inference_is_close_to_fp32():
    """optimize_for_inference(bfloat16) casts the weights, casts the input on entry and returns
    float32 scores from `logits`; bf16 keeps ~3 significant digits, so probabilities stay within 0.05
    of fp32 (a wrong cast, e.g. of the BN folding, moves them by far more)."""
    model = _model("segformer-b0").eval()
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = model.logits(x).softmax(1)
        model.optimize_for_inference(torch.bfloat16)
        assert model.dtype == torch.bfloat16 and not model.training
        out = model.logits(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert (out.softmax(1) - ref).abs().max().item() < 0.05


def test_peak_tensor_memory_counts_live_storages():
    """(a + 1) * 2 on 10^6 floats holds two 4 MB results at once at its peak (the sum is still alive
    while the product is made): 8,000,000 bytes; the input itself is not counted. A view adds nothing."""
    a = torch.randn(1000, 1000)
    assert peak_tensor_memory(lambda: (a + 1) * 2, a) == 8_000_000
    assert peak_tensor_memory(lambda: (a + 1).view(-1)[::2] * 2, a) == 4_000_000 + 2_000_000


def test_gemm_upsample_sum_equals_interpolate():
    """The bf16 CPU path resamples by matrix products; in fp32 it must equal F.interpolate (bilinear,
    align_corners=False) + add to 1e-5, for integer and non-integer factors and edge clamping."""
    import torch.nn.functional as F

    from transeg.layers.fusion import upsample_sum_gemm

    g = torch.Generator().manual_seed(7)
    acc = torch.randn(2, 6, 19, 25, generator=g)
    maps = [torch.randn(2, 6, h, w, generator=g) for h, w in ((10, 13), (5, 7), (3, 4), (19, 25))]
    expected = acc + sum(F.interpolate(m, size=(19, 25), mode="bilinear", align_corners=False) for m in maps)
    got = upsample_sum_gemm(tokens_to_map(map_to_tokens(acc), (19, 25)), maps)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-5


def test_bf16_inference_then_bf16_training_in_one_process():
    """The bf16 CPU decoder caches its resampling matrices; made under inference_mode they would be
    inference tensors and break a later autograd step (found by benchmarks/segformer_hf.py)."""
    model = _model("segformer-b0")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(9))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.eval()(x)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.loss(model(x), torch.zeros(2, 64, 64, dtype=torch.long))["loss"]
    loss.backward()
    assert model.decode_head.linear_c1.proj.weight.grad.abs().sum().item() > 0


@pytest.mark.parametrize("logit_size,label_size,padded,reduction,block_bytes", [
    ((16, 12), (64, 48), None, "all", 1 << 21),        # the head's stride 4, one block per image
    ((16, 12), (64, 48), None, "valid", 200),          # one output row per block: every band edge
    ((5, 7), (77, 109), (80, 112), "all", 3000),       # ViT: upsampled to the padded size, then cropped
    ((10, 10), (37, 41), None, "valid", 1000),         # non-integer factors
    ((40, 30), (24, 18), None, "all", 500),            # down-sampling
])
def test_upsampled_cross_entropy_equals_upsample_then_ce(monkeypatch, logit_size, label_size, padded, reduction,
                                                         block_bytes):
    """The blocked loss must be cross_entropy(interpolate(logits)[..., :H, :W]) in value (1e-6) and in
    gradient (1e-5 of its largest entry: the taps are rounded from fp64 here), channels-last or not, with ignored pixels, for every way the
    row blocks can cut the resampling bands."""
    import torch.nn.functional as F

    from transeg.losses.ce import _UpsampledCrossEntropy, cross_entropy, upsampled_cross_entropy

    monkeypatch.setattr(_UpsampledCrossEntropy, "BLOCK_BYTES", block_bytes)
    g = torch.Generator().manual_seed(10)
    for channels_last in (False, True):
        x = torch.randn(2, 7, *logit_size, generator=g)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        x.requires_grad_(True)
        label = torch.randint(0, 7, (2, *label_size), generator=g)
        label[:, :3] = 255
        up = F.interpolate(x, size=padded or label_size, mode="bilinear", align_corners=False)
        expected = cross_entropy(up[..., :label_size[0], :label_size[1]], label, 255, reduction)
        (g_expected,) = torch.autograd.grad(expected, x)
        got = upsampled_cross_entropy(x, label, 255, reduction, padded)
        (g_got,) = torch.autograd.grad(got, x)
        assert abs(got.item() - expected.item()) <= 1e-6 * expected.item()
        assert (g_got - g_expected).abs().max().item() <= 1e-5 * g_expected.abs().max().item()


def test_upsampled_cross_entropy_bf16_and_no_labels():
    """bf16 logits are resampled in fp32 (the loss equals the fp32 one on the same values, and the
    gradient comes back in bf16); a batch with no labelled pixel gives loss 0 under "valid" (mean over
    nothing), where F.cross_entropy gives NaN, which would stop training."""
    from transeg.losses import cross_entropy, upsampled_cross_entropy

    import torch.nn.functional as F

    x = torch.randn(2, 5, 8, 8, generator=torch.Generator().manual_seed(11)).bfloat16().requires_grad_(True)
    label = torch.randint(0, 5, (2, 32, 32), generator=torch.Generator().manual_seed(12))
    loss = upsampled_cross_entropy(x, label)
    expected = cross_entropy(F.interpolate(x.detach().float(), size=(32, 32), mode="bilinear"), label)
    assert abs(loss.item() - expected.item()) <= 1e-6 * expected.item()
    loss.backward()
    assert x.grad.dtype == torch.bfloat16 and x.grad.abs().sum().item() > 0
    ignored = torch.full((2, 32, 32), 255)
    assert upsampled_cross_entropy(x, ignored, reduction="valid").item() == 0.0
    assert torch.isnan(F.cross_entropy(F.interpolate(x.detach().float(), size=(32, 32)), ignored, ignore_index=255))


@pytest.mark.integration
def test_keep_freed_memory_stops_page_faults_on_reused_large_tensors():
    """In a fresh process, 20 allocate-write-free rounds of a 64 MB tensor (after 10 to settle): with
    glibc's defaults each round maps fresh pages (16,384 faults a round, 4 kB pages); after
    keep_freed_memory() they reuse the same memory (0 faults in 20 runs of this; the bound allows
    one round to fault, as the first 5-8 rounds may while glibc's heap settles). Counted with
    getrusage, not timed.
    TRANSEG_MALLOC=system keeps the defaults."""
    import os
    import subprocess
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's mallopt: Linux only")
    code = ("import resource, sys, torch\n"
            "from transeg.device import keep_freed_memory\n"
            "applied = keep_freed_memory()\n"
            "for _ in range(10):\n"  # the heap settles in the first rounds (up to ~8 fault here)
            "    torch.empty(16 << 20).fill_(1)\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "for _ in range(20):\n"
            "    torch.empty(16 << 20).fill_(1)\n"
            "print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n")

    def run(**env):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, **env}).stdout.split()
        return out[0] == "True", int(out[1])

    applied, faults = run(TRANSEG_MALLOC="")
    default_applied, default_faults = run(TRANSEG_MALLOC="system")
    assert applied and not default_applied
    assert default_faults >= 20 * 16_384 * 0.9  # every round faulted its 64 MB in again
    assert faults <= 16_384
