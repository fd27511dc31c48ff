"""The training loop's hot path on a GPU (issue 32), measured where a CPU can see it: the host waits for the device
only once per log window; a SegFormer-B0 step on the CUDA path dispatches a fraction of the CPU path's operators;
compiled training in the CUDA form equals eager. The counting is benchmarks/dispatch_count.py's (`TrainerCounts`:
a TorchDispatchMode over the step, plus Tensor.cpu / .tolist / .numpy wrapped in Python, which on a CPU tensor
dispatch nothing)."""
import copy
import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY, TINY_DATA
from transeg import create_model
from transeg.engine import TrainConfig, train
from transeg.engine.distributed import wrap
from transeg.layers.fusion import set_fused

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
EOMT = dict(embed_dim=64, depth=4, num_heads=4, crop=32, num_queries=10, query_blocks=2, num_points=256,
            mask_annealing=[[1, 2], [3, 5]])  # tests/test_eomt.py's tiny EoMT, annealed over the run


@pytest.fixture(scope="module")
def dispatch_count():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import dispatch_count
    finally:
        sys.path.remove(str(BENCHMARKS))
    return dispatch_count


def _counted(dispatch_count, tmp_path, form, model="segformer-b0", model_args=TINY, **sets):
    """TrainerCounts of a 6-step run logged every 3 steps (two log windows), trained in `form`."""
    cfg = TrainConfig(model=model, model_args=model_args, data=TINY_DATA, iters=6, batch_size=2, lr=1e-3,
                      warmup_iters=2, log_interval=3, eval_interval=100, ckpt_interval=100, workers=0, device="cpu",
                      out=str(tmp_path / "run"), **sets)
    return dispatch_count.count_trainer(cfg, form)


def _syncs(record, dispatch_count):
    return {k: record[k] for k in dispatch_count.SYNC_KINDS}


NONE = {"scalar reads": 0, "value-sized outputs": 0, "tensors from host data": 0, "python reads": 0}
ONE_READ = {**NONE, "scalar reads": 1}


@pytest.mark.parametrize("form,scaler", [("fused", False), ("published", True)], ids=["cpu-path", "cuda-path-fp16-bookkeeping"])
def test_the_host_waits_for_the_device_once_per_log_window(tmp_path, monkeypatch, dispatch_count, form, scaler):
    """A real 6-step run of a tiny SegFormer, log_interval 3. Expected: 0 host syncs of every kind in each of the 6
    steps (set_iteration + forward + loss + backward + optimizer + scheduler: the loss is summed on the device, the
    optimizer is fused AdamW, whose step takes the lr as a number and reads nothing back), and exactly 1 scalar read
    in each of the 2 log windows: log_window's `.item()` of the window's mean loss, the one read the log needs.
    In both training forms: the CPU's (the fused decoder, the row-blocked loss, whose denominator was a tensor made
    from host data until now) and CUDA's (the published decoder, upsample-then-CE) with clip_grad_norm and an
    enabled GradScaler, the bookkeeping of amp fp16 (which only CUDA runs): unscale_, clip_grad_norm_ (without
    error_if_nonfinite), and GradScaler.step, which hands fused AdamW the scale and the inf flag on the device
    where a non-fused optimizer would make it read the flag back each step."""
    from transeg.engine import trainer

    if scaler:
        build = trainer._Training._build

        def with_scaler(self):
            build(self)
            self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
        monkeypatch.setattr(trainer._Training, "_build", with_scaler)
    counts = _counted(dispatch_count, tmp_path, form, clip_grad_norm=1.0 if scaler else None)
    assert len(counts.steps) == 6 and len(counts.windows) == 2
    assert all(s["ops"] > 100 for s in counts.steps)  # (the counting saw the steps)
    assert [_syncs(s, dispatch_count) for s in counts.steps] == [NONE] * 6
    assert [_syncs(w, dispatch_count) for w in counts.windows] == [ONE_READ] * 2


def test_a_mask_classification_step_reads_once_per_output_for_its_matching(tmp_path, dispatch_count):
    """The stated exception: Mask2Former's criterion (EoMT's here) solves the query/target matching on the host
    (scipy's linear_sum_assignment), so its step must read from the device. The tiny EoMT has 2 query blocks: 3
    outputs matched (2 intermediate + the final), batch 2. Expected per step: 1 value-sized output (`unique` of the
    batch's labels, for the targets) and 1 `.tolist()` of it; per output 1 `.cpu()` of every image's costs at
    once and 1 `.numpy()` of that host copy (free), and 1 tensor of every image's matched pairs made on the host
    (one copy to the device) = 1 + 3 x 2 = 7 python reads and 3 tensors from host data; no scalar read. Before
    (issue 32) each image was read on its own: 2 x 2 value-sized outputs, 6 reads of costs, 13 tensors from host
    data and 6 copies of pairs, plus the annealing's copy of its probabilities before each step. The log windows:
    1 scalar read each, as any model."""
    counts = _counted(dispatch_count, tmp_path, "published", model="eomt-dinov2-l16", model_args=EOMT)
    expected = {"scalar reads": 0, "value-sized outputs": 1, "tensors from host data": 3, "python reads": 7}
    assert [_syncs(s, dispatch_count) for s in counts.steps] == [expected] * 6
    assert [_syncs(w, dispatch_count) for w in counts.windows] == [ONE_READ] * 2


def test_the_cuda_path_dispatches_under_a_third_of_the_cpu_paths_operators(dispatch_count):
    """SegFormer-B0 (150 classes), one training step at batch 2 (forward, loss, backward, fused AdamW), counted
    after a warm-up step (the optimizer's state). The CUDA path (published decoder, upsample-then-CE) dispatches a
    fixed number of operators whatever the crop (1,453 at 64x64 and 128x128: expected equal), so it is counted small;
    the CPU path's row-blocked loss runs one block of ~2 MB of logits at a time, 6 rows of 512 x 150 classes, so its
    count grows with the area and is counted at 512x512, the H200 profile's crop (6,703 here). Expected: CPU path
    >= 3x the CUDA path (measured 4.6x); on the H200 the CPU path launched 10,259 kernels a step at batch 16.
    ~6 s on 2 cores, most of it the two 512x512 CPU-path steps (a warm-up and the counted one)."""
    step_fn = dispatch_count.step_fn  # train_step.py's, which dispatch_count counts

    def ops(size, published):
        torch.manual_seed(0)
        model = create_model("segformer-b0", num_classes=150).train()
        x, label = torch.randn(2, 3, size, size), torch.randint(0, 150, (2, size, size))
        with dispatch_count.HostReads() as reads:  # .cpu / .tolist / .numpy, warm-up step included
            counter = dispatch_count.count(step_fn(model, x, label, torch.float32, published))
        assert dispatch_count.host_syncs(counter, reads.counts) == NONE
        return sum(counter.ops.values())

    cuda = ops(64, True)
    assert ops(128, True) == cuda
    cpu = ops(512, False)
    assert cpu >= 3 * cuda, (cpu, cuda)


@pytest.mark.slow  # inductor compiles: 56 s on 2 cores with a cold cache (6 s warm)
def test_compiled_training_in_the_cuda_form_equals_eager(tmp_path, monkeypatch):
    """`compile: true` with the published form (CUDA's): the net compiled in place and upsample-then-CE compiled
    apart (engine/distributed.wrap). A tiny SegFormer, batch 2 of 32x32 with an ignored strip, inductor drawing
    dropout from eager's generator (fallback_random) so both see the same masks. Expected: the loss within 1e-5
    relative (measured 7e-8) and every gradient within 1e-5 of the largest gradient (measured 3e-7: float32
    reassociation); traced as one graph instead, torch 2.13's inductor gave all gradients 0 (see wrap). Then a
    2-step `train` run compiled logs the losses an eager one logs."""
    import torch._inductor.config as inductor

    sys.path.insert(0, str(BENCHMARKS))
    try:
        from dispatch_count import training_form
    finally:
        sys.path.remove(str(BENCHMARKS))
    monkeypatch.setattr(inductor, "fallback_random", True)
    torch.manual_seed(0)
    model = create_model("segformer-b0", num_classes=6, **TINY).train()
    set_fused(model, False)
    eager = copy.deepcopy(model)
    x, label = torch.randn(2, 3, 32, 32), torch.randint(0, 6, (2, 32, 32))  # TINY_DATA's size, as the run below
    label[:, :4] = 255
    cpu = torch.device("cpu")
    losses = []
    for net, compile in ((model, True), (eager, False)):
        _, _, forward_loss = wrap(net, TrainConfig(model_args=TINY, compile=compile, device="cpu"), cpu, 1, "published")
        torch.manual_seed(1)
        losses.append(forward_loss(x, label))
        losses[-1].backward()
    assert losses[0].item() == pytest.approx(losses[1].item(), rel=1e-5)
    largest = max(p.grad.abs().max().item() for p in eager.parameters())
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        assert (p.grad - q.grad).abs().max().item() <= 1e-5 * largest, name

    logged = []
    for compile in (True, False):
        out = tmp_path / f"compile_{compile}"
        cfg = TrainConfig(model_args=TINY, data=TINY_DATA, iters=2, batch_size=2, lr=1e-3, warmup_iters=0,
                          log_interval=1, eval_interval=100, ckpt_interval=100, workers=0, device="cpu", out=str(out),
                          compile=compile)
        with training_form("published"):
            train(cfg, progress=False, log=lambda *a: None)
        logged.append([r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r])
    assert logged[0] == pytest.approx(logged[1], rel=1e-4)
