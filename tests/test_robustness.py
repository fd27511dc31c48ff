"""Holding up: distributed training equals one process, a killed run resumes to the same weights (by
--resume, or by torchrun restarting its workers), and untrusted pickles are refused."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import transeg
from conftest import TINY, TINY_DATA
from transeg.cli import main

# LayerNorm only (no BatchNorm, whose batch statistics differ between 2 x 2 and 4 images) and no
# dropout: the one place where two processes and one process may differ is then the gradient average
SEGMENTER = dict(embed_dim=32, depth=2, num_heads=2, crop=32, decoder_depth=1, drop_path_rate=0.0, decoder_drop=0.0)


def _train_args(out, iters, **sets):
    args = ["train", "--model", "segmenter-vit-t16-mask", "--data", TINY_DATA, "--out", str(out), "--iters",
            str(iters), "--workers", "0", "--device", "cpu", "--set", f"model_args={json.dumps(SEGMENTER)}",
            "warmup_iters=0", "lr=1e-3", "optimizer=sgd", "weight_decay=0.0", "log_interval=1"]
    return args + [f"{k}={v}" for k, v in sets.items()]


def _run(args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "transeg.cli", *args], env={**os.environ, **(env or {})},
                          capture_output=True, text=True, **kw)


def _weights(run):
    return transeg.load(run / "model.safetensors").state_dict()


def _max_diff(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _wait_for_iterations(run, target, process, timeout=120):
    """Until `run`'s log has `target` training iterations (or `process` ended, or `timeout` s passed)."""
    log, deadline = run / "log.jsonl", time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if log.exists() and sum(1 for line in log.read_text().splitlines() if '"loss"' in line) >= target:
            return
        time.sleep(0.01)


@pytest.mark.integration
def test_two_gloo_processes_equal_one_process(tmp_path):
    """torchrun with 2 CPU processes (gloo) and global_batch 4 (2 each) vs one process with 4 images:
    after 3 SGD steps the weights agree to float rounding (< 1e-5), while one process with a batch of
    2 instead lands far away (> 1e-3), so the comparison can fail; the distributed evaluation
    (confusion matrices all-reduced) gives the same mIoU."""
    common = dict(eval_interval=3, ckpt_interval=3)
    for name, batch in (("one", 4), ("half", 2)):
        run = _run(_train_args(tmp_path / name, 3, global_batch=batch, **common))
        assert run.returncode == 0, run.stderr[-2000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "transeg.cli",
           *_train_args(tmp_path / "two", 3, global_batch=4, **common)]
    double = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert double.returncode == 0, double.stderr[-3000:]
    one, two, half = (_weights(tmp_path / n) for n in ("one", "two", "half"))
    assert _max_diff(one, two) < 1e-5
    assert _max_diff(one, half) > 1e-3
    miou = [[json.loads(r)["mIoU"] for r in (tmp_path / n / "log.jsonl").read_text().splitlines() if "mIoU" in r]
            for n in ("one", "two")]
    assert miou[0] == pytest.approx(miou[1], abs=1e-4) and len(miou[0]) == 1


@pytest.mark.integration
def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path):
    """A run killed with SIGKILL at a varying moment (checkpoint every iteration, so possibly while one
    is being written) and continued with --resume ends with exactly the weights of a run that was never
    interrupted (deterministic CPU mode)."""
    iters = 30
    sets = dict(batch_size=2, eval_interval=iters, ckpt_interval=1)
    reference = _run(_train_args(tmp_path / "ref", iters, **sets))
    assert reference.returncode == 0, reference.stderr[-2000:]
    victim = subprocess.Popen([sys.executable, "-m", "transeg.cli", *_train_args(tmp_path / "run", iters, **sets)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_iterations(tmp_path / "run", 3 + time.time_ns() % 20, victim)  # a different iteration each run
    time.sleep((time.time_ns() % 10) * 0.005)  # and a varying moment inside that iteration
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    state = tmp_path / "run" / "train_state.pt"
    killed_at = torch.load(state, weights_only=True)["iter"]
    assert killed_at < iters  # it really was interrupted
    resumed = _run(_train_args(tmp_path / "run", iters, **sets) + ["--resume"])
    assert resumed.returncode == 0, (killed_at, resumed.stderr[-2000:])
    assert _max_diff(_weights(tmp_path / "ref"), _weights(tmp_path / "run")) == 0.0, killed_at


@pytest.mark.integration
def test_resume_tolerates_a_half_written_log_line_and_removes_stale_temporaries(tmp_path):
    """What SIGKILL can leave: a log line cut in the middle and the temp file of an atomic write. The
    resumed run drops both and its log reads cleanly."""
    sets = dict(batch_size=2, eval_interval=4, ckpt_interval=2)
    assert _run(_train_args(tmp_path / "run", 4, **sets)).returncode == 0
    run = tmp_path / "run"
    state = torch.load(run / "train_state.pt", weights_only=True)
    state["iter"] = 2  # pretend the run was killed after its checkpoint at iteration 2
    torch.save(state, run / "train_state.pt")
    with (run / "log.jsonl").open("a") as f:
        f.write('{"iter": 5, "lo')
    (run / ".model.safetensors.abc123.tmp").write_bytes(b"partial")
    resumed = _run(_train_args(run, 4, **sets) + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert not list(run.glob(".*.tmp"))


class _Payload:
    """Unpickling this runs a shell command: what a booby-trapped .pth does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_is_refused_and_never_runs(tmp_path, capsys):
    """A .pth whose pickle calls os.system: `transeg convert` and `backbone_weights` refuse it with one
    line naming the file and the global it wanted, the command never runs, nothing is written."""
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {"decode_head.conv_seg.weight": _Payload(marker)}}, evil)
    assert main(["convert", str(evil), str(tmp_path / "out.safetensors"), "--from", "segformer"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "evil.pth: refused: loading it would run code" in err[0] and "system" in err[0]
    from transeg.convert import load_backbone_weights

    with pytest.raises(transeg.TransegError, match="evil.pth: refused: loading it would run code"):
        load_backbone_weights(transeg.create_model("segformer-b0", num_classes=3, **TINY), evil)
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()
    # the same file unpickled naively would have run the command (so the test checks something real)
    with open(evil, "rb") as f:
        torch.load(f, weights_only=False)
    assert marker.exists()


# ------------------------------------------------------------------------------------------------
# Bad input: one line naming the file and the problem, exit status 2, nothing half-written. The
# README's robustness table lists these same cases.
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def _ckpt(tmp):
    path = tmp / "tiny.safetensors"
    if not path.exists():
        transeg.save(transeg.create_model("segformer-b0", num_classes=3, classes=["a", "b", "c"], **TINY), path)
    return path


def _folder(tmp, image_size=(12, 16), mask_size=(12, 16), value=1, masks=True, images=True):
    root = tmp / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("a\nb\nc\n")
    if images:
        Image.fromarray(np.zeros((*image_size, 3), np.uint8)).save(root / "images" / "x.png")
    if masks:
        Image.fromarray(np.full(mask_size, value, np.uint8)).save(root / "masks" / "x.png")
    return root


def _image(tmp, name, make):
    path = tmp / name
    make(path)
    return path


def _truncated(path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path.with_suffix(".full.jpg"))
    data = path.with_suffix(".full.jpg").read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _bomb(path):
    # 15000 x 12000 = 180M pixels of one bit: a 3 kB PNG that would decode to half a gigabyte of RGB
    Image.new("1", (15000, 12000)).save(path, optimize=True)


def _exif_rotated(path):
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.zeros((8, 12, 3), np.uint8)).save(path, exif=exif)


BAD = [
    ("truncated image", lambda t: ["predict", str(_ckpt(t)), str(_image(t, "cut.jpg", _truncated)), "--out", str(t / "o")],
     "cut.jpg: cannot read the image (image file is truncated"),
    ("not an image", lambda t: ["predict", str(_ckpt(t)), str(_image(t, "junk.png", lambda p: p.write_bytes(b"\x89PNG junk"))),
                                "--out", str(t / "o")], "junk.png: cannot read the image"),
    ("decompression bomb", lambda t: ["predict", str(_ckpt(t)), str(_image(t, "bomb.png", _bomb)), "--out", str(t / "o")],
     "bomb.png: cannot read the image (Image size (180000000 pixels) exceeds limit"),
    ("mask size differs from its image", lambda t: ["data", "check", str(_folder(t, mask_size=(10, 20)))],
     "x.png: mask is 20x10 (WxH) but its image x.png is 16x12"),
    ("label value outside the classes", lambda t: ["data", "check", str(_folder(t, value=9))],
     "x.png: label value 9 is outside the 3 classes of classes.txt (allowed 0..2 and 255=ignore)"),
    ("empty dataset folder", lambda t: ["data", "check", str(_folder(t, masks=False, images=False))],
     "images: no images"),
    ("image without a mask", lambda t: ["data", "check", str(_folder(t, masks=False))],
     "masks: no mask for 1 image(s) (x.png); each images/NAME.ext needs masks/NAME.png"),
    ("checkpoint with another class count", lambda t: ["eval", str(_ckpt(t)), "--data", "synthetic"],
     "tiny.safetensors: a 3-class model cannot be evaluated on synthetic with 6 classes"),
    ("YAML with an unknown key", lambda t: ["train", str(_image(t, "r.yaml", lambda p: p.write_text("learning_rate: 0.1\n")))],
     "r.yaml: unknown key 'learning_rate'; did you mean 'lr'?"),
    ("loss becomes NaN", lambda t: _train_args(t / "nan", 4, batch_size=2, lr=1e30, ckpt_interval=1, eval_interval=4),
     "loss became nan by iteration 2; the last checkpoint, iteration 1, is"),
]


@pytest.mark.parametrize("case,argv,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_one_line(tmp_path, capsys, case, argv, message):
    args = argv(tmp_path)
    capsys.readouterr()
    assert main(args) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("transeg: error:")]
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())  # nothing half-written


def test_convertible_images_are_accepted_and_the_conversion_is_said(tmp_path, capsys):
    """RGBA, 16-bit grey, grey, palette and EXIF-rotated images are read (as the displayed RGB image)
    and predict says what it did to each."""
    makers = {
        "rgba.png": lambda p: Image.fromarray(np.zeros((8, 12, 4), np.uint8)).save(p),
        "grey16.png": lambda p: Image.fromarray(np.full((8, 12), 40000, np.uint16)).save(p),
        "grey.png": lambda p: Image.fromarray(np.zeros((8, 12), np.uint8)).save(p),
        "palette.png": lambda p: Image.fromarray(np.zeros((8, 12), np.uint8)).convert("P").save(p),
        "rotated.jpg": _exif_rotated,
    }
    paths = [str(_image(tmp_path, n, m)) for n, m in makers.items()]
    assert main(["predict", str(_ckpt(tmp_path)), *paths, "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    for name, note in (("rgba.png", "alpha channel dropped"), ("grey16.png", "16-bit greyscale scaled to 8-bit RGB"),
                       ("grey.png", "greyscale converted to RGB"), ("palette.png", "palette image converted to RGB"),
                       ("rotated.jpg", "EXIF orientation applied")):
        assert f"{name} ({note})" in out, name
    # the rotated 12x8 JPEG is predicted as displayed: 8 wide, 12 high
    assert Image.open(tmp_path / "o" / "rotated_mask.png").size == (8, 12)


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """The disk fills up half-way through writing a checkpoint: one clear error, the previous file is
    byte-for-byte intact and no temporary file is left."""
    import errno

    from transeg.files import atomic_write

    target = tmp_path / "train_state.pt"
    torch.save({"iter": 1}, target)
    before = target.read_bytes()

    def fill_disk(tmp):
        Path(tmp).write_bytes(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(transeg.TransegError, match=r"train_state.pt: could not be saved \(No space left on device\); "
                                                   r"the previous version is intact"):
        atomic_write(target, fill_disk)
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["train_state.pt"]


def _children(pid):
    """Process ids of `pid`'s children (Linux /proc)."""
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def _rank_of(pid):
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next((int(v[5:]) for v in env if v.startswith(b"RANK=")), None)


@pytest.mark.integration
def test_torchrun_restarts_a_killed_worker_and_the_run_ends_as_if_never_killed(tmp_path):
    """Elastic restart for real: torchrun --max-restarts 1 with 2 gloo workers and --auto-resume; one
    worker is SIGKILLed after a varying iteration, torchrun stops the other and starts both again, they
    pick up the last checkpoint, and the final weights equal those of an uninterrupted 2-worker run
    exactly (deterministic CPU mode)."""
    iters = 12
    sets = dict(global_batch=4, eval_interval=iters, ckpt_interval=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def torchrun(out, restarts):
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "--max-restarts", str(restarts), "-m", "transeg.cli", *_train_args(out, iters, **sets), "--auto-resume"]

    reference = subprocess.run(torchrun(tmp_path / "ref", 0), capture_output=True, text=True, env=env)
    assert reference.returncode == 0, reference.stderr[-3000:]
    agent = subprocess.Popen(torchrun(tmp_path / "run", 1), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env, start_new_session=True)
    _wait_for_iterations(tmp_path / "run", 2 + time.time_ns() % 6, agent)  # a different iteration each run
    victim_rank = time.time_ns() % 2  # either worker: the one that writes checkpoints or the other
    victim = next(pid for pid in _children(agent.pid) if _rank_of(pid) == victim_rank)
    os.kill(victim, signal.SIGKILL)
    killed_at = torch.load(tmp_path / "run" / "train_state.pt", weights_only=True)["iter"]
    try:
        out, err = agent.communicate(timeout=120)  # ~15 s; a restarted group that cannot connect hangs
    except subprocess.TimeoutExpired:
        os.killpg(agent.pid, signal.SIGKILL)
        out, err = agent.communicate()
        pytest.fail(f"the restarted workers hung (killed rank {victim_rank} after iteration {killed_at})")
    assert agent.returncode == 0, (victim_rank, killed_at, err[-3000:])
    resumed_at = re.search(rf"resuming {re.escape(str(tmp_path / 'run'))} at iteration (\d+)/{iters}", out)
    # it really was interrupted, and the restarted group picked up the checkpoint instead of starting over
    assert killed_at < iters and resumed_at and int(resumed_at[1]) >= killed_at >= 1, (killed_at, out[-2000:])
    assert _max_diff(_weights(tmp_path / "ref"), _weights(tmp_path / "run")) == 0.0, (victim_rank, killed_at)
