"""Each device gets its path (device.Paths, the one place that decides), and every path computes the same
function: the CUDA training form (the published decoder, upsample-then-CE) equals the CPU one (the fused decoder,
the row-blocked loss) in value and in every gradient, in float64 where only rounding could tell them apart."""
import pytest
import torch

import transeg
from transeg.device import CPU_PATHS, CUDA_PATHS, paths_for, restore_backends, training_backends
from transeg.layers.fusion import set_fused
from transeg.registry import FAMILIES, VARIANTS


def test_each_device_gets_its_path():
    """Asked for "cuda" (any index) and "cpu", the deciding place answers with the choices the H200 and 2-core
    figures rest on: CUDA trains the published form (72.9 vs 265.6 ms a B0 step), serves native bf16 compiled with
    CUDA graphs, autotunes cuDNN and takes TF32 matmuls in training; the CPU keeps the fused form, float32 serving,
    eager unless asked, and no CUDA switch; a device nothing was measured on (MPS) keeps the CPU's."""
    cuda, cpu = paths_for("cuda"), paths_for(torch.device("cpu"))
    assert paths_for("cuda:3") is cuda is CUDA_PATHS and cpu is CPU_PATHS
    assert (cuda.training_form, cuda.inference_form, cuda.serving_dtype) == ("published", "fused", torch.bfloat16)
    assert cuda.compile_options == {"freezing": True, "triton.cudagraphs": True} and cuda.compile_serving
    assert cuda.cudnn_benchmark and cuda.tf32_training
    assert (cpu.training_form, cpu.inference_form, cpu.serving_dtype) == ("fused", "fused", None)
    assert cpu.compile_options == {"freezing": True} and not cpu.compile_serving
    assert not cpu.cudnn_benchmark and not cpu.tf32_training
    assert paths_for("mps") is CPU_PATHS  # no figure measured there: the paths transeg had before


def test_training_backends_are_put_back():
    """The CUDA switches are process-wide: a run sets them and puts back what it found (highest = PyTorch's
    default float32 matmul precision)."""
    before = (torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision())
    saved = training_backends(CUDA_PATHS)
    assert torch.backends.cudnn.benchmark and torch.get_float32_matmul_precision() == "high"
    restore_backends(saved)
    assert (torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision()) == before
    restore_backends(training_backends(CPU_PATHS))
    assert (torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision()) == before


def _no_randomness(model):
    """Dropout and drop-path off, so the two forms draw nothing and differ only by their arithmetic."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if hasattr(m, "drop_prob"):
            m.drop_prob = 0.0
    return model


# The families whose training computation has a fused form: their decoders (SegFormer, EDAFormer), the blocked
# loss of the Segmentor (all per-pixel heads: Segmenter's too) and SeMask's FPN head's own blocked losses.
FORMS = ["segformer-b0", "edaformer-t", "segmenter-vit-t16-linear", "semask-swin-t-fpn"]


@pytest.mark.parametrize("name", FORMS)
def test_cuda_training_form_equals_the_cpu_one_in_float64(name):
    """Loss and every parameter gradient of a training step (BatchNorm on batch statistics, ignored pixels, a
    label size the logits reach by non-integer factors: 70x86 from 18x22 at stride 4, from 5x6 at 16) agree to
    1e-10 of their size in float64: the fused decoder is an exact rewrite and the blocked loss the same resampling
    taps, so only the order of float64 sums differs (measured ~1e-15; gradients to 1e-10 of the largest one). A
    fused form that dropped a term or shifted a tap is off by 1e-3 or more."""
    variant = VARIANTS[name]
    results = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = transeg.create_model(name, num_classes=5, **FAMILIES[variant.family].tiny(variant.arguments()))
        model = _no_randomness(model).double().train()
        assert len(set_fused(model, fused)) >= 1  # the model has a fusable part: the choice changes something
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, 3, 70, 86, generator=g, dtype=torch.float64)
        label = torch.randint(0, 5, (2, 70, 86), generator=g)
        label[:, :5] = 255
        loss = model.loss(model(x), label)["loss"]
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (fused_loss, fused_grads), (published_loss, published_grads) = results
    assert abs(fused_loss - published_loss) <= 1e-10 * abs(published_loss)
    assert fused_grads.keys() == published_grads.keys() and len(published_grads) > 10
    # of the largest gradient: a bias that BatchNorm follows has an exact gradient of 0, seen as rounding (1e-18)
    scale = max(grad.abs().max().item() for grad in published_grads.values())
    worst = max((fused_grads[n] - grad).abs().max().item() for n, grad in published_grads.items())
    assert worst <= 1e-10 * scale


def test_evaluations_within_a_run_take_the_inference_form_without_tf32(tmp_path, monkeypatch):
    """A run with CUDA's choices (here on the CPU: the published training form, TF32 matmuls): each of its 4 steps
    runs published with TF32 ("high"), each of its 2 evaluations in the fused inference form at full float32
    precision ("highest", what it was before the run: an evaluation's float32 stays float32), and after the run
    the switches are as they were."""
    from conftest import TINY, TINY_DATA
    from transeg.engine import TrainConfig, train, trainer
    from transeg.engine.validation import Validation

    monkeypatch.setattr(trainer, "paths_for", lambda device: CUDA_PATHS)
    before = (torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision())
    seen = {"step": [], "evaluation": []}

    def spy(kind, original):
        def call(self, *args, **kwargs):
            model = self.model if kind == "step" else args[0]
            seen[kind].append((model.decode_head.fused, torch.get_float32_matmul_precision()))
            return original(self, *args, **kwargs)
        return call
    monkeypatch.setattr(trainer._Training, "_step", spy("step", trainer._Training._step))
    monkeypatch.setattr(Validation, "__call__", spy("evaluation", Validation.__call__))
    cfg = TrainConfig(model="segformer-b0", model_args=TINY, data=TINY_DATA, iters=4, batch_size=2, eval_interval=2,
                      log_interval=2, ckpt_interval=100, workers=0, device="cpu", out=str(tmp_path / "run"))
    train(cfg, progress=False, log=lambda *a: None)
    assert seen == {"step": [(False, "high")] * 4, "evaluation": [(True, before[1])] * 2}
    assert (torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision()) == before
