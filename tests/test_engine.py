"""Training engine: the papers' optimizer groups and schedule, exact resume, inference modes, loss."""
import json
import math
import re

import pytest
import torch

import transeg
from conftest import TINY, TINY_DATA
from transeg import inference
from transeg.engine import TrainConfig, load_config, train
from transeg.engine.optim import param_groups, poly_warmup_factor
from transeg.losses import cross_entropy

SEGFORMER_KEYS = {"head": {"lr_mult": 10.0}, "norm": {"decay_mult": 0.0}, "pos_block": {"decay_mult": 0.0}}


def test_param_groups_follow_mmcv_custom_keys():
    """SegFormer recipe (the authors' released mmseg configs): decode head lr x10 WITH decay (BN included), backbone norms no decay."""
    model = transeg.create_model("segformer-b0", num_classes=6, **TINY)
    groups = {(round(g["lr"], 12), g["weight_decay"]): set(g["names"])
              for g in param_groups(model, 6e-5, 0.01, SEGFORMER_KEYS)}
    assert set(groups) == {(6e-4, 0.01), (6e-5, 0.0), (6e-5, 0.01)}
    assert "decode_head.linear_fuse.bn.weight" in groups[(6e-4, 0.01)]
    assert all(n.startswith("decode_head.") for n in groups[(6e-4, 0.01)])
    assert {"backbone.patch_embed1.norm.weight", "backbone.block1.0.norm1.bias", "backbone.block1.0.attn.norm.weight",
            "backbone.norm4.weight"} <= groups[(6e-5, 0.0)]
    assert "backbone.block1.0.attn.q.bias" in groups[(6e-5, 0.01)]  # biases keep decay in mmcv 1.x
    total = sum(len(v) for v in groups.values())
    assert total == len(list(model.parameters()))


def test_poly_schedule_with_linear_warmup():
    # mmcv: lr = base * (1 - it/max)^1, times 1 - (1 - it/warmup)(1 - 1e-6) during warm-up.
    assert poly_warmup_factor(0, 160_000, warmup_iters=1500) == pytest.approx(1e-6)
    assert poly_warmup_factor(750, 160_000, warmup_iters=1500) == pytest.approx((1 - 750 / 160_000) * (0.5 + 0.5e-6))
    assert poly_warmup_factor(1500, 160_000, warmup_iters=1500) == pytest.approx(1 - 1500 / 160_000)
    assert poly_warmup_factor(160_000, 160_000) == 0.0


def test_loss_reductions():
    # 2 pixels, one ignored: per-pixel CE of the valid one is log(2) (uniform logits over 2 classes).
    logits = torch.zeros(1, 2, 1, 2)
    label = torch.tensor([[[0, 255]]])
    assert cross_entropy(logits, label, reduction="valid").item() == pytest.approx(math.log(2))
    assert cross_entropy(logits, label, reduction="all").item() == pytest.approx(math.log(2) / 2)  # mmseg 0.x


def _cfg(tmp_path, name, **kw):
    base = dict(model="segformer-b0", model_args=TINY, data=TINY_DATA, iters=4, batch_size=2, lr=1e-3,
                warmup_iters=2, eval_interval=100, ckpt_interval=2, log_interval=1, workers=0, device="cpu",
                out=str(tmp_path / name))
    base.update(kw)
    return TrainConfig(**base)


def test_resume_gives_identical_weights(tmp_path):
    """4 iterations in one go == 2 iterations, stop, --resume for the other 2 (bit-identical), also
    with a different number of data workers: samples depend only on (seed, sample index). The resume
    sizes its workers from the machine (workers: auto, resume-free like any worker count) and says how."""
    train(_cfg(tmp_path, "full"), progress=False, log=lambda *_: None)
    train(_cfg(tmp_path, "split", workers=1), stop_at=2, progress=False, log=lambda *_: None)
    assert json.loads((tmp_path / "split" / "log.jsonl").read_text().splitlines()[-1])["iter"] == 2
    lines = []
    train(_cfg(tmp_path, "split", workers="auto"), resume=True, progress=False, log=lines.append)
    assert any(re.fullmatch(r"data: \d+ workers? \(\d+ cores?, \d+ compute threads?; workers: auto\)", line)
               for line in lines), lines
    full = transeg.load(tmp_path / "full" / "model.safetensors").state_dict()
    split = transeg.load(tmp_path / "split" / "model.safetensors").state_dict()
    assert full.keys() == split.keys()
    for k in full:
        assert torch.equal(full[k], split[k]), k
    # and training did change the weights
    fresh = torch.load(tmp_path / "full" / "train_state.pt", weights_only=True)
    assert fresh["iter"] == 4


def test_resume_refuses_changed_settings(tmp_path):
    train(_cfg(tmp_path, "run"), stop_at=2, progress=False, log=lambda *_: None)
    with pytest.raises(transeg.TransegError, match=r"run: already holds a training run; continue it with --resume"):
        train(_cfg(tmp_path, "run"), progress=False, log=lambda *_: None)
    with pytest.raises(transeg.TransegError, match=r"cannot resume with changed settings \['lr'\]"):
        train(_cfg(tmp_path, "run", lr=5e-4), resume=True, progress=False, log=lambda *_: None)


def test_training_lowers_the_loss(tmp_path):
    cfg = _cfg(tmp_path, "fit", iters=40, eval_interval=40, ckpt_interval=40, log_interval=10, warmup_iters=0)
    result = train(cfg, progress=False, log=lambda *_: None)
    records = [json.loads(r) for r in (tmp_path / "fit" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    # 6 classes: a uniform guess costs log(6) = 1.79; 40 steps of a tiny SegFormer get well below it
    assert losses[0] > losses[-1] and losses[-1] < 1.5
    assert 0.0 <= result["mIoU"] <= 1.0
    for name in ("model.safetensors", "best.safetensors", "curves.png", "val_iou.png", "config.yaml"):
        assert (tmp_path / "fit" / name).is_file(), name


def test_unknown_config_key_suggests_the_nearest(tmp_path):
    (tmp_path / "r.yaml").write_text("model: segformer-b0\nlearning_rate: 0.1\n")
    with pytest.raises(transeg.TransegError, match=r"r.yaml: unknown key 'learning_rate'"):
        load_config(tmp_path / "r.yaml")
    with pytest.raises(transeg.TransegError, match=r"unknown key 'iter'; did you mean 'iters'"):
        load_config(None, ["iter=5"])
    assert load_config(None, ["crop_size=[256,256]", "lr=1e-4"]).crop_size == [256, 256]


# ----------------------------------------------------------------------------------------- inference
def test_slide_windows_match_mmseg_grid():
    # Cityscapes 1024x2048, crop 1024, stride 768: one row, x in {0, 768, 1024} (mmseg's sliding-window grid)
    boxes = inference.slide_windows(1024, 2048, (1024, 1024), (768, 768))
    assert [(b[0], b[2]) for b in boxes] == [(0, 0), (0, 768), (0, 1024)]
    assert inference.slide_windows(300, 200, (512, 512), (341, 341)) == [(0, 300, 0, 200)]


class PixelModel(torch.nn.Module):
    """A per-pixel 1x1 conv 'segmentor': translation-equivariant, so slide == whole exactly."""
    num_classes = 3
    outputs_probabilities = False  # what inference reads of a model beside `logits`

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.conv(x)

    def logits(self, x):
        return self(x)


def test_slide_equals_whole_for_a_pixelwise_model():
    torch.manual_seed(0)
    model, x = PixelModel().eval(), torch.randn(2, 3, 50, 70)
    with torch.no_grad():
        whole = inference.normalised_scores(model, x)
        slide = inference.normalised_scores(model, x, mode="slide", crop=(32, 32), stride=(20, 24), batch_size=3)
        on_cpu = inference.logits_slide(model, x, (32, 32), (20, 24), canvas_device="cpu")
    assert (whole - slide).abs().max().item() < 1e-5
    assert (whole - on_cpu).abs().max().item() < 1e-5


def test_flip_averages_softmax_of_both_directions():
    torch.manual_seed(0)
    model, x = PixelModel().eval(), torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        got = inference.normalised_scores(model, x, flip=True)
        # a pixel-wise model gives the same logits flipped back, so the average is one softmax
        expected = model(x).softmax(1)
    assert (got - expected).abs().max().item() < 1e-6
    with torch.no_grad():
        multi = inference.normalised_scores(model, x, scales=[0.5, 1.0], out_size=(8, 8))
    assert multi.shape == (1, 3, 8, 8) and torch.allclose(multi.sum(1), torch.ones(1, 8, 8))


def test_checkpoint_round_trip_and_mismatch(tmp_path):
    model = transeg.create_model("segformer-b0", num_classes=5, classes=list("abcde"), **TINY).eval()
    transeg.save(model, tmp_path / "m.safetensors")
    back = transeg.load(tmp_path / "m.safetensors")
    assert back.classes == list("abcde") and back.meta["model_args"]["decoder_dim"] == 16
    x = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        assert torch.equal(model(x), back(x))
    other = transeg.create_model("segformer-b0", num_classes=7, **TINY)
    with pytest.raises(transeg.TransegError, match=r"does not fit segformer-b0 with 7 classes; 2 misshapen: "
                                                   r"decode_head.linear_pred.weight \(5, 16, 1, 1\)"):
        from transeg.checkpoint import load_state_dict_checked
        load_state_dict_checked(other, back.state_dict(), source="m.safetensors")
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(1)}, tmp_path / "plain.safetensors")
    with pytest.raises(transeg.TransegError, match="plain.safetensors: a safetensors file without transeg metadata"):
        transeg.load(tmp_path / "plain.safetensors")


def test_amp_auto_resolves_to_bf16_or_nothing():
    from transeg.device import native_bf16
    from transeg.engine.trainer import _amp

    cpu = torch.device("cpu")
    # auto never picks fp16 (emulated on CPUs, ~100x slower there): bf16 where native, else fp32
    assert _amp(TrainConfig(amp="auto"), cpu) == (torch.bfloat16 if native_bf16(cpu) else None)
    assert _amp(TrainConfig(amp="bf16"), cpu) == torch.bfloat16
    assert _amp(TrainConfig(amp="no"), cpu) is None
    with pytest.raises(transeg.TransegError, match="amp fp16 needs a CUDA device"):
        _amp(TrainConfig(amp="fp16"), cpu)


def test_ohem_keeps_hard_pixels_like_mmseg():
    from transeg.losses import ohem_cross_entropy, ohem_weights

    # 4 pixels, 2 classes; true-class probabilities sigmoid(4)=0.982, 0.5, sigmoid(-1)=0.269; last ignored
    logits = torch.tensor([[[[4.0, 0.0, -1.0, 0.0]], [[0.0, 0.0, 0.0, 5.0]]]])
    label = torch.tensor([[[0, 0, 0, 255]]])
    # min_kept=1: threshold = max(0.7, 2nd smallest prob 0.5) = 0.7 -> pixels with p < 0.7 are hard
    assert ohem_weights(logits, label, thresh=0.7, min_kept=1).tolist() == [[[0.0, 1.0, 1.0, 0.0]]]
    # thresh=0.1: threshold = max(0.1, 0.5) = 0.5 -> only p=0.269 is below it (strict <, as mmseg)
    assert ohem_weights(logits, label, thresh=0.1, min_kept=1).tolist() == [[[0.0, 0.0, 1.0, 0.0]]]
    # loss over all 4 pixels ("all") = (CE at p=0.5 + CE at p=0.269) / 4
    expected = (math.log(2) + math.log(1 + math.e)) / 4
    assert ohem_cross_entropy(logits, label, 0.7, 1).item() == pytest.approx(expected, rel=1e-5)


def test_sample_ids_partition_the_global_batch():
    from transeg.engine.samples import sample_ids as _sample_ids

    # one process, batch 2: micro-batch j takes samples 2j, 2j+1
    assert list(_sample_ids(0, 3, 2, rank=0, world=1)) == [0, 1, 2, 3, 4, 5]
    # two processes, batch 2 each: micro-batch j is samples 4j..4j+3, rank 0 the first half
    assert list(_sample_ids(0, 2, 2, rank=0, world=2)) == [0, 1, 4, 5]
    assert list(_sample_ids(0, 2, 2, rank=1, world=2)) == [2, 3, 6, 7]
    # resuming at micro-batch 1 continues where micro-batch 0 ended, so an interrupted run sees the same data
    assert list(_sample_ids(1, 3, 2, rank=0, world=1)) == [2, 3, 4, 5]


def test_auto_workers_feed_a_gpu_and_leave_a_cpu_its_cores():
    """workers: auto (engine/samples.auto_workers) from (cores, crops/s one process augments, device, crop, torch
    threads). A GPU gets enough workers to augment 64 Mpixels/s, at least 1, at most 8 and the cores but one: the
    quick start's 128x128 crops at 400/s need ceil(64e6 / (400 * 16384)) = 10, so 8 on 16 cores and 3 on 4; ADE20K's
    512x512 at 100/s need 3; crops augmented at 5,000/s need 1; one core leaves none. A CPU gets the cores its
    compute threads leave free, at most 2: none on 2 cores with 2 threads (the quick start's measured choice), 2 on
    16 cores with 8 threads, 1 on 4 with 3."""
    from transeg.engine.samples import auto_workers

    assert auto_workers(16, 400, "cuda", (128, 128), threads=16) == 8
    assert auto_workers(4, 400, "cuda", (128, 128), threads=4) == 3
    assert auto_workers(16, 100, "cuda", (512, 512), threads=16) == 3
    assert auto_workers(16, 5000, "cuda", (512, 512), threads=16) == 1
    assert auto_workers(2, 400, "cuda", (128, 128), threads=2) == 1
    assert auto_workers(1, 400, "cuda", (128, 128), threads=1) == 0
    assert auto_workers(2, 400, "cpu", (128, 128), threads=2) == 0
    assert auto_workers(16, 400, "cpu", (128, 128), threads=8) == 2
    assert auto_workers(4, 400, "cpu", (128, 128), threads=3) == 1
    assert auto_workers(1, 400, "cpu", (128, 128), threads=1) == 0


def test_workers_auto_measures_the_augmentation_for_a_gpu_only(tmp_path):
    """For a GPU the augmentation is timed on the run's first samples and said with the count it gives; a CPU's
    rule needs no rate, so no second of each run is spent measuring it (the line then names the threads)."""
    from transeg.data import build_dataset
    from transeg.engine.config import resolve
    from transeg.engine.samples import data_workers, train_samples

    train_set = build_dataset(TINY_DATA, "train")
    cfg = resolve(_cfg(tmp_path, "w", workers="auto"), train_set)  # the crop size from the data
    samples = train_samples(cfg, train_set, transeg.create_model("segformer-b0", **TINY))
    _, gpu = data_workers(cfg, samples, 0, 0, 1, torch.device("cuda"))
    _, cpu = data_workers(cfg, samples, 0, 0, 1, torch.device("cpu"))
    assert re.fullmatch(r"data: augmentation [\d,]+ images/s in one process; \d+ workers? \(\d+ cores?; workers: "
                        r"auto\)", gpu), gpu
    assert re.fullmatch(r"data: \d+ workers? \(\d+ cores?, \d+ compute threads?; workers: auto\)", cpu), cpu


def test_augmentation_rate_is_timed_on_a_few_samples_past_the_first():
    """The measurement behind workers: auto reads at most 8 samples or 1 s of them, and leaves the first (lazy
    set-up) out: with a clock that says the first sample took 5 s and each later one 0.1 s (a 10 s budget), it reads
    samples 0..7 and gives 10/s; when the first alone spends the budget, its own rate is all there is: 0.2/s."""
    from transeg.engine.samples import augmentation_rate

    def clock_of(durations):
        ticks = iter([t for d in durations for t in (0.0, d)])
        return lambda: next(ticks)

    read = []
    samples = type("S", (), {"__getitem__": lambda self, k: read.append(k)})()
    assert augmentation_rate(samples, range(100), clock=clock_of([5.0] + [0.1] * 99), seconds=10) == pytest.approx(10)
    assert read == list(range(8))
    assert augmentation_rate(samples, range(100), clock=clock_of([5.0] + [0.4] * 99)) == pytest.approx(0.2)


def test_workers_auto_is_a_config_value_and_a_bad_one_is_one_line(tmp_path):
    """workers is auto by default; a YAML file may say auto or a count (4.0 is 4); anything else is refused
    naming the file, the key and what it takes."""
    assert TrainConfig().workers == "auto" and load_config(None, ["workers=3"]).workers == 3
    (tmp_path / "ok.yaml").write_text("workers: auto\n")
    assert load_config(tmp_path / "ok.yaml").workers == "auto"
    (tmp_path / "four.yaml").write_text("workers: 4.0\n")
    assert load_config(tmp_path / "four.yaml").workers == 4
    (tmp_path / "bad.yaml").write_text("workers: many\n")
    with pytest.raises(transeg.TransegError) as e:
        load_config(tmp_path / "bad.yaml")
    assert str(e.value) == f"{tmp_path / 'bad.yaml'}: workers=many: must be auto or a whole number >= 0"


def test_gradient_clipping_bounds_the_first_sgd_step(tmp_path):
    """clip_grad_norm (Mask2Former's recipe clips the whole model's gradient to norm 0.01): the first
    SGD step moves the weights by exactly lr · min(‖g‖, clip), so with lr 1 and clip 1e-3 the total
    parameter change has norm 1e-3, while the unclipped step is far larger."""
    start = transeg.create_model("segformer-b0", num_classes=6, **TINY)
    transeg.save(start, tmp_path / "start.safetensors")
    w0 = {k: v.clone() for k, v in start.named_parameters()}

    def step_norm(name, clip):
        cfg = _cfg(tmp_path, name, iters=1, optimizer="sgd", lr=1.0, weight_decay=0.0, warmup_iters=0,
                   pretrained=str(tmp_path / "start.safetensors"), clip_grad_norm=clip, custom_keys={})
        train(cfg, progress=False, log=lambda *_: None)
        w1 = dict(transeg.load(tmp_path / name / "model.safetensors").named_parameters())
        return math.sqrt(sum(((w1[k] - w0[k]).double() ** 2).sum().item() for k in w0))

    assert step_norm("clipped", 1e-3) == pytest.approx(1e-3, rel=1e-3)
    assert step_norm("free", None) > 0.1


def test_global_batch_splits_over_processes():
    """A recipe's global_batch 16 is 16 per step on 1 process, 2 per process on 8, 1 with accumulation 2;
    a split that does not divide is refused with the numbers."""
    from transeg.engine.trainer import per_process_batch

    cfg = TrainConfig(global_batch=16)
    assert per_process_batch(cfg, 1).batch_size == 16 and per_process_batch(cfg, 8).batch_size == 2
    assert per_process_batch(TrainConfig(global_batch=16, accum_steps=2), 8).batch_size == 1
    with pytest.raises(transeg.TransegError, match="global_batch 16 does not split over 3 process"):
        per_process_batch(cfg, 3)


@pytest.mark.integration
def test_auto_resume_starts_or_continues(tmp_path):
    """resume="auto" (--auto-resume, what torchrun --max-restarts needs): a fresh --out starts the run,
    an interrupted one continues it to the same weights as an uninterrupted run."""
    train(_cfg(tmp_path, "full"), progress=False, log=lambda *_: None)
    train(_cfg(tmp_path, "auto"), resume="auto", stop_at=2, progress=False, log=lambda *_: None)
    assert json.loads((tmp_path / "auto" / "log.jsonl").read_text().splitlines()[-1])["iter"] == 2
    train(_cfg(tmp_path, "auto"), resume="auto", progress=False, log=lambda *_: None)
    full = transeg.load(tmp_path / "full" / "model.safetensors").state_dict()
    auto = transeg.load(tmp_path / "auto" / "model.safetensors").state_dict()
    assert all(torch.equal(full[k], auto[k]) for k in full)


# ------------------------------------------------------------------------------- the run's lock and pace
def test_the_lock_file_is_held_while_a_run_trains_and_removed_when_it_ends(tmp_path):
    """runs/train/.lock exists (and is locked) while the run trains, and is gone when it ends, finished or
    failed; the folder can be trained into again at once."""
    from filelock import FileLock, Timeout

    out = tmp_path / "run"
    seen = []

    def log(line):  # (the run's first line comes once the folder is locked)
        if not seen:
            seen.append((out / ".lock").is_file())
            with pytest.raises(Timeout):
                FileLock(out / ".lock", timeout=0).acquire()

    train(_cfg(tmp_path, "run", iters=2), progress=False, log=log)
    assert seen == [True] and not (out / ".lock").exists() and (out / "model.safetensors").is_file()
    with pytest.raises(transeg.TransegError):  # a run that fails (here: at its start) removes it too
        train(_cfg(tmp_path, "run", iters=2), progress=False, log=lambda *_: None)
    assert not (out / ".lock").exists()
    train(_cfg(tmp_path, "run", iters=4), resume=True, progress=False, log=lambda *_: None)
    assert not (out / ".lock").exists()


def _paced(steps, load=5.0, cores=2):
    """A Pace fed steps of the given durations (seconds) on a fake clock; the lines it logged."""
    from transeg.engine.pace import Pace

    now, lines = [0.0], []
    pace = Pace(lines.append, threads=2, clock=lambda: now[0], load=lambda: load, cores=cores)
    for seconds in steps:
        pace.begin()
        now[0] += seconds
        pace.end()
        now[0] += 7.0  # an evaluation between steps is not timed
    return lines


def test_a_run_that_slows_down_says_so_once_with_the_cause_and_the_threads_advice():
    """Steps of 1 s for a while (the calibration: the fastest 30-s window), then of 2.5 s: one line, once,
    naming the slow-down, the load average against the cores and --threads; steps 1.5x slower say nothing."""
    lines = _paced([1.0] * 60 + [2.5] * 60)
    assert len(lines) == 1
    assert lines[0].startswith("transeg: warning: training slowed to 2.5 s per iteration, 2.5x its fastest in this "
                               "run (1 s): other processes are using the cores (load average 5.0 on 2 cores, this "
                               "run's 2 threads included)")
    assert "give each fewer threads, e.g. --threads 1, or OMP_NUM_THREADS=1 for every program" in lines[0]
    assert _paced([1.0] * 60 + [1.5] * 60) == []
    quiet = _paced([1.0] * 60 + [3.0] * 30, load=1.2)
    assert len(quiet) == 1 and "the load average (1.2 on 2 cores) shows no other process on them" in quiet[0]
    # a slow start is warm-up, not a slow-down: the first window is never judged against anything
    assert _paced([5.0] * 10 + [1.0] * 60) == []
    # short runs are never judged (a window holds 30 s of steps)
    assert _paced([0.1] * 200 + [1.0] * 20) == []


def test_training_with_a_slow_step_warns_in_its_log(tmp_path, monkeypatch):
    """A real run whose fourth step is made slow (other work on the cores, simulated by a sleep): its log says
    so, once; windows of one step here, so that a tiny run has several."""
    import time

    from transeg.engine import pace, trainer

    monkeypatch.setattr(pace, "WINDOW_SECONDS", 0.0)
    monkeypatch.setattr(pace, "WINDOW_STEPS", 1)
    step = trainer._Training._step

    def slow(self, image, label):
        started = time.perf_counter()
        step(self, image, label)
        if self.completed == 3:
            time.sleep(max(1.0, 20 * (time.perf_counter() - started)))

    monkeypatch.setattr(trainer._Training, "_step", slow)
    lines = []
    train(_cfg(tmp_path, "slow", iters=6, ckpt_interval=100), progress=False, log=lines.append)
    warned = [line for line in lines if "training slowed to" in line]
    assert len(warned) == 1 and "--threads" in warned[0], lines
