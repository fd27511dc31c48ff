"""Training (transeg.engine): the trainer, the run folder and its lock, resume, Ctrl-C, kill -9, torchrun and gloo."""
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import transeg
from conftest import TINY, TINY_DATA
from helpers import _mounted, _one_line, _segmenter_train_args
from transeg.cli import main
from transeg.engine import TrainConfig, train
from transeg.engine.optim import poly_warmup_factor
from transeg.engine.trainer import build_model


def _args(out, iters, *extra, data=TINY_DATA, **sets):
    sets = {"warmup_iters": 0, "log_interval": 1, "batch_size": 2, "lr": 1e-3, "eval_interval": 100,
            "ckpt_interval": 100, **sets}
    return ["train", "--data", str(data), "--out", str(out), "--iters", str(iters), "--workers", "0", "--device", "cpu",
            *extra, "--set", f"model_args={json.dumps(TINY)}", *[f"{k}={v}" for k, v in sets.items()]]


def _error_line(capsys):
    """The one `transeg: error:` line on stderr; no traceback, nothing of the DataLoader's."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("transeg: error:")]
    assert len(lines) == 1 and "Traceback" not in err and "DataLoader worker" not in err, err[-3000:]
    return lines[0]


def _snapshot(folder):
    """Every file under `folder` (but the lock file, which records the last pid) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*"))
            if p.is_file() and p.name != ".lock"}


def _records(run):
    return [json.loads(line) for line in (Path(run) / "log.jsonl").read_text().splitlines()]


def _folder_data(root, bad):
    """3 + 3 images of 32x32, 3 classes; train mask 1.png is the one bad file: a value 7 ("value") or
    16x16 pixels ("size"). Every train mask has labelled pixels, so the check before training (which
    stops at the first labelled mask) does not read it: the training loader meets it, in its first batch
    of 3."""
    (root / "classes.txt").parent.mkdir(parents=True)
    (root / "classes.txt").write_text("a\nb\nc\n")
    for part in ("train", "val"):
        for i in range(3):
            mask = np.ones((32, 32), np.uint8)
            if part == "train" and i == 1:
                if bad == "value":
                    mask[0, 0] = 7
                else:
                    mask = np.ones((16, 16), np.uint8)
            for kind, array in (("images", np.zeros((32, 32, 3), np.uint8)), ("masks", mask)):
                (root / kind / part).mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(root / kind / part / f"{i}.png")
    return root


FOLDER_SETS = dict(batch_size=3, crop_size="[32,32]", scale="[64,32]", test_scale="[64,32]")


@pytest.mark.parametrize("bad,workers", [("value", 0), ("value", 2), ("size", 2)])
def test_a_bad_mask_during_training_is_the_line_data_check_gives(tmp_path, capsys, bad, workers):
    """With 2 workers, `train` printed "Caught TransegError in DataLoader worker process 0." and the worker's
    traceback (~15 lines) before the useful line. Now, with 0 or 2 workers, the one line is exactly
    `transeg data check`'s for the same file (exit 2), and as the run never started, no run folder is
    left (before: config.yaml and an empty log.jsonl)."""
    data = _folder_data(tmp_path / "data", bad)
    assert main(["data", "check", str(data), "--split", "train"]) == 2
    expected = _error_line(capsys)
    assert expected.startswith(f"transeg: error: {data / 'masks' / 'train' / '1.png'}: ")
    args = _args(tmp_path / "run", 2, data=data, **FOLDER_SETS)
    args[args.index("--workers") + 1] = str(workers)
    assert main(args) == 2
    assert _error_line(capsys) == expected
    assert not (tmp_path / "run").exists()


def test_a_failed_start_leaves_an_existing_run_folder_as_it_was(tmp_path, capsys):
    """A folder holding a run stopped before its first checkpoint (config.yaml, log.jsonl, no state), then a
    start that fails on its first batch: before, the old log was moved to log.previous.jsonl and a new
    config.yaml and an empty log.jsonl written; now every file is byte-for-byte as it was (the files are
    written once the first step has finished)."""
    data = _folder_data(tmp_path / "data", "value")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("iters: 50\n")
    (run / "log.jsonl").write_text('{"iter": 1, "loss": 1.5}\n')
    before = _snapshot(run)
    assert main(_args(run, 2, data=data, **FOLDER_SETS)) == 2
    assert "label value 7 is outside the 3 classes" in _error_line(capsys)
    assert _snapshot(run) == before


def _cfg(tmp_path, name, **kw):
    base = dict(model="segformer-b0", model_args=TINY, data=TINY_DATA, iters=6, batch_size=2, lr=1e-3, warmup_iters=2,
                eval_interval=100, ckpt_interval=100, log_interval=3, workers=0, device="cpu", out=str(tmp_path / name))
    return TrainConfig(**{**base, **kw})


def test_a_resumed_run_logs_the_losses_of_an_uninterrupted_one(tmp_path):
    """6 iterations logged every 3, in one go vs stopped after 4 (not a multiple of 3) and resumed. Before,
    the stopped run logged a record at 4 (the mean of iteration 4) and the resumed one at 6 the mean of 5..6
    only: losses [3, 4, 6] vs [3, 6], and curves.png differed. Now the log window in progress is saved with
    the state, and the loss records (iter, loss, lr) are equal, bit for bit: each iteration's loss is
    bit-identical (deterministic CPU, samples by (seed, index), RNG restored; see test_engine's exact-resume
    test) and the restored float32 sum gets the same additions in the same order."""
    quiet = dict(progress=False, log=lambda *_: None)
    train(_cfg(tmp_path, "full"), **quiet)
    train(_cfg(tmp_path, "split"), stop_at=4, **quiet)
    assert [r["iter"] for r in _records(tmp_path / "split")] == [3]  # no record where the run was cut
    train(_cfg(tmp_path, "split"), resume=True, **quiet)
    full, split = ([(r["iter"], r["loss"], r["lr"]) for r in _records(tmp_path / n) if "loss" in r]
                   for n in ("full", "split"))
    assert [r[0] for r in full] == [3, 6]
    assert split == full


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 4-iteration run (lr 1e-3, no warm-up, poly power 1), checkpointed at 2 and 4."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(_args(run, 4, ckpt_interval=2)) == 0
    return run


def test_resume_extends_a_finished_run_and_says_what_the_lr_does(tmp_path, capsys, finished_run):
    """--iters 6 on a finished 4-iteration run (before: refused, "changed settings ['iters']"). From iteration
    4 on, the poly schedule runs over 6 iterations: the lr goes from 0 (the end of the 4-iteration
    schedule) to 1e-3 x (1 - 4/6) = 3.33e-4 for step 5, and the log records lr 1e-3 x (1 - 5/6) after
    step 5 and 0 after step 6; the log holds each iteration once."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    capsys.readouterr()
    assert main(_args(run, 6, "--resume", ckpt_interval=2)) == 0
    out = capsys.readouterr().out
    assert ("iters 4 -> 6: from iteration 4 on, the learning rate follows the poly schedule over 6 iterations "
            "(lr 0 -> 0.000333 here); the first 4 iterations keep the 4-iteration schedule") in out, out
    lrs = {r["iter"]: r["lr"] for r in _records(run) if "loss" in r}
    assert list(lrs) == [1, 2, 3, 4, 5, 6]
    assert lrs[5] == pytest.approx(1e-3 * poly_warmup_factor(5, 6), rel=1e-6) == pytest.approx(1e-3 / 6)
    assert lrs[6] == 0.0 and lrs[3] == pytest.approx(1e-3 * (1 - 3 / 4))
    assert torch.load(run / "train_state.pt", weights_only=True)["iter"] == 6


@pytest.mark.parametrize("extra,sets,message", [
    ([], dict(lr=2e-3), "cannot resume with changed settings ['lr']: lr=0.002 (the run used 0.001)"),
    ([], dict(ratio_range="[0.5,1.0]"),  # changed the augmentation silently before
     "cannot resume with changed settings ['ratio_range']: ratio_range=[0.5, 1.0] (the run used [0.5, 2.0])"),
    (["--iters", "3"], {}, "iters=3: the run is at iteration 4 already; --resume with --iters 4 or more"),
], ids=["lr", "ratio_range", "iters below"])
def test_resume_refuses_what_would_change_the_run_in_one_line(tmp_path, capsys, finished_run, extra, sets, message):
    """Settings other than iters, intervals, workers, device, amp and the test protocol are the run's own:
    one line naming the key with the new and old values and the way to fine-tune instead, exit 2, nothing
    in the run folder changed."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = _snapshot(run)
    capsys.readouterr()
    assert main(_args(run, 4, "--resume", *extra, ckpt_interval=2, **sets)) == 2
    line = _error_line(capsys)
    assert line.startswith(f"transeg: error: {run / 'train_state.pt'}: ") and message in line, line
    assert f"--pretrained {run / 'model.safetensors'} and another --out" in line
    assert _snapshot(run) == before


def test_fine_tuning_on_data_with_other_classes_starts_a_new_classifier(tmp_path, capsys, finished_run):
    """--pretrained takes another run's weights (before: a 6-class model onto 3-class data was refused,
    "has 6 classes, the data has 3"). The encoder and decoder are copied, tensor for tensor; the two
    tensors whose shape depends on the class count (the 1x1 classifier of SegFormer's head) start afresh,
    and one line says so. Through the CLI flag, one iteration on the 3-class folder data."""
    source = transeg.load(finished_run / "model.safetensors")
    assert source.num_classes == 6  # the synthetic set
    ckpt = finished_run / "model.safetensors"
    lines = []
    classes = SimpleNamespace(classes=["a", "b", "c"], palette=[[0, 0, 0], [1, 1, 1], [2, 2, 2]])
    model = build_model(TrainConfig(pretrained=str(ckpt)), classes, log=lines.append)
    assert lines == [f"{ckpt}: 6 classes, the data has 3: a new classifier for the 3 classes starts afresh "
                     f"(decode_head.linear_pred.weight, decode_head.linear_pred.bias); every other weight comes from "
                     f"{ckpt}"]
    new, old = model.state_dict(), source.state_dict()
    assert new["decode_head.linear_pred.weight"].shape == (3, 16, 1, 1) and model.classes == ["a", "b", "c"]
    assert all(torch.equal(new[k], old[k]) for k in new if not k.startswith("decode_head.linear_pred."))

    data = tmp_path / "data"
    _folder_data(data, "value")
    (data / "masks" / "train" / "1.png").unlink()
    (data / "images" / "train" / "1.png").unlink()
    capsys.readouterr()
    assert main(_args(tmp_path / "tuned", 1, "--pretrained", str(ckpt), data=data, **FOLDER_SETS)) == 0
    assert lines[0] in capsys.readouterr().out
    assert transeg.load(tmp_path / "tuned" / "model.safetensors").num_classes == 3


def _train_args(out, iters=1, **sets):
    sets = {"warmup_iters": 0, "log_interval": 1, "batch_size": 2, **sets}
    return ["train", "--data", TINY_DATA, "--out", str(out), "--iters", str(iters), "--workers", "0", "--device", "cpu",
            "--set", f"model_args={json.dumps(TINY)}", *[f"{k}={v}" for k, v in sets.items()]]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished one-iteration run: model.safetensors, train_state.pt, log, config."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert main(_train_args(run, 1)) == 0
    return run


@pytest.mark.integration
def test_a_folder_in_training_is_locked_and_a_killed_run_leaves_no_lock(tmp_path, capsys):
    """A run trains in DIR; a second `transeg train --out DIR` 1.5 s later, and a --resume, are refused
    with one line naming DIR and the first run's pid (before, the second ran to the end and both logs
    interleaved), and write nothing. SIGKILL the first: the kernel drops its lock, DIR can be used."""
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "transeg.cli", *_train_args(run, 1000, ckpt_interval=1000,
                                                                                eval_interval=1000)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while time.time() < deadline and first.poll() is None:
            if (run / "log.jsonl").is_file() and (run / "log.jsonl").read_text().count('"loss"') >= 1:
                break
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended before the test could race it"
        holder = f"pid {first.pid} on {socket.gethostname()}"
        for extra in ([], ["--resume"]):
            capsys.readouterr()
            assert main(_train_args(run, 1000, ckpt_interval=1000, eval_interval=1000) + extra) == 2
            _one_line(capsys, f"{run}: a training run is already using this folder ({holder})")
    finally:
        first.kill()
        first.wait()
    iters = [json.loads(line)["iter"] for line in (run / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert iters == list(range(1, len(iters) + 1))  # one run's log: no iteration twice
    from transeg.engine.trainer import RunLock

    with RunLock(run):  # the killed run left nothing stuck
        pass


@pytest.mark.integration
def test_training_onto_a_full_disk_is_one_line(tmp_path, capsys):
    """`transeg train --out` a 256 kB filesystem: the checkpoints do not fit; one line naming the file
    that did not fit, exit 2, no temporary files left."""
    with _mounted(tmp_path / "disk", "size=256k") as disk:
        assert main(_train_args(disk / "run", 1)) == 2
        _one_line(capsys, "(No space left on device)", str(disk / "run"))
        assert not list((disk / "run").glob(".*.tmp"))


@pytest.mark.integration
@pytest.mark.parametrize("sub", ["", "run"], ids=["the folder", "a folder inside"])
def test_a_read_only_run_folder_is_refused_before_any_training_work(tmp_path, capsys, monkeypatch, sub):
    """--out on a read-only filesystem (chmod does not stop root; a read-only mount does): one line,
    before any data is read or model built."""
    import transeg.data

    def no_data(*a, **k):
        raise AssertionError("the dataset was built before the run folder was found read-only")

    monkeypatch.setattr(transeg.data, "build_dataset", no_data)
    with _mounted(tmp_path / "ro", "ro") as ro:
        out = ro / sub if sub else ro
        assert main(_train_args(out, 1)) == 2
        _one_line(capsys, f"{out}: cannot write here (read-only file system); choose another --out")


def _dataset(root, labelled_train=False, split=False):
    """Images with masks that are all 255 (ignore); `labelled_train`: the train split is labelled."""
    (root / "classes.txt").parent.mkdir(parents=True)
    (root / "classes.txt").write_text("a\nb\nc\n")
    for part in (["train", "val"] if split else [""]):
        for i in range(3):
            value = 1 if labelled_train and part == "train" else 255
            for kind, array in (("images", np.zeros((32, 32, 3), np.uint8)), ("masks", np.full((32, 32), value, np.uint8))):
                folder = root / kind / part
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(folder / f"{i}.png")
    return root


@pytest.mark.parametrize("split,labelled_train,message", [
    (False, False, "masks: no labelled pixel in the training set: every mask is 255 (ignore)"),
    (True, True, "masks/val: no labelled pixel in the validation set: every mask is 255 (ignore)"),
], ids=["training set", "validation set"])
def test_a_dataset_with_nothing_labelled_is_refused_before_training(tmp_path, capsys, split, labelled_train, message):
    """Masks that are all ignore trained with loss 0 and evaluated to mIoU nan, exit 0, naming a
    best.safetensors that was never written. Now: one line before training, and no run folder."""
    data = _dataset(tmp_path / "data", labelled_train, split)
    args = _train_args(tmp_path / "run", 1, crop_size="[32,32]", scale="[64,32]", test_scale="[64,32]")
    args[args.index("--data") + 1] = str(data)
    assert main(args) == 2
    _one_line(capsys, message)
    assert not (tmp_path / "run").exists()


def _truncate(p):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _drop_optimizer(p):
    state = torch.load(p, weights_only=True)
    del state["optimizer"]
    torch.save(state, p)


DAMAGED_STATE = [
    ("truncated", _truncate),
    ("garbage", lambda p: p.write_bytes(b"\x00junk" * 100)),
    ("empty", lambda p: p.write_bytes(b"")),
    ("a list", lambda p: torch.save([1, 2, 3], p)),
    ("no optimizer", _drop_optimizer),
    ("misshapen model", lambda p: torch.save({**torch.load(p, weights_only=True), "model": {"w": torch.zeros(2)}}, p)),
]


@pytest.mark.parametrize("case,damage", DAMAGED_STATE, ids=[c[0] for c in DAMAGED_STATE])
def test_a_damaged_training_state_is_one_line_with_the_way_out(tmp_path, capsys, trained_run, case, damage):
    """--resume on a damaged train_state.pt gave a traceback from torch.load; now one line naming it and
    saying the run can restart from model.safetensors or afresh; nothing in the run folder changes."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    damage(run / "train_state.pt")
    before = _snapshot(run)
    capsys.readouterr()
    assert main(_train_args(run, 1) + ["--resume"]) == 2
    _one_line(capsys, f"{run / 'train_state.pt'}: damaged training state (",
              f"restart from its last weights with --set pretrained={run / 'model.safetensors'} and another --out",
              "or start afresh with another --out")
    assert _snapshot(run) == before


@pytest.mark.integration
def test_ctrl_c_saves_where_the_run_is_and_names_the_command_that_continues_it(tmp_path):
    """SIGINT after a few iterations, before the first periodic checkpoint (which used to lose them all):
    the run saves at the last finished iteration (atomically, as the periodic checkpoint), prints the
    command that continues it and exits 130; that command finishes the run with exactly the weights of
    a run that was never interrupted (deterministic CPU; the tiny SegFormer has BatchNorm and dropout,
    so a state saved from the middle of a step would differ)."""
    iters, sets = 6, dict(ckpt_interval=100, eval_interval=100)
    assert main(_train_args(tmp_path / "ref", iters, **sets)) == 0
    run = tmp_path / "run"
    # SIGINT back to its default in the child: a shell runs background jobs with it ignored, which the child would
    # inherit, and Python then installs no Ctrl-C handler at all (the run would finish and exit 0)
    victim = subprocess.Popen([sys.executable, "-m", "transeg.cli", *_train_args(run, iters, **sets)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "2"},  # as conftest sets in-process: same sums
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and victim.poll() is None:
        if (run / "log.jsonl").is_file() and (run / "log.jsonl").read_text().count('"loss"') >= 2:
            break
        time.sleep(0.01)
    victim.send_signal(signal.SIGINT)
    out, err = victim.communicate(timeout=120)
    assert victim.returncode == 130, err[-3000:]
    saved = torch.load(run / "train_state.pt", weights_only=True)["iter"]
    assert 2 <= saved < iters, (saved, out)
    command = f"transeg train {run / 'config.yaml'} --resume"
    assert f"interrupted at iteration {saved}/{iters}: saved {run / 'train_state.pt'}; continue with: {command}" in out
    assert "Traceback" not in err
    assert main(shlex.split(command)[1:]) == 0
    ref, resumed = (transeg.load(r / "model.safetensors").state_dict() for r in (tmp_path / "ref", run))
    assert all(torch.equal(ref[k], resumed[k]) for k in ref), saved
    iterations = [json.loads(line)["iter"] for line in (run / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert iterations == list(range(1, iters + 1))


def test_ctrl_c_inside_a_step_is_deferred_to_its_end_and_a_second_one_later_is_not():
    """How the trainer takes SIGINT: between steps at once (the state is an iteration boundary), inside
    one at the step's end (a save from the middle of a step would hold half-updated weights), and a
    second Ctrl-C more than a second after the first stops at once."""
    from transeg.engine.interrupts import Interrupts as _Interrupts

    def ctrl_c():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs in the main thread at the next bytecode

    reached = []
    with _Interrupts(enabled=True) as interrupts:
        if interrupts.previous is None:
            pytest.skip("SIGINT is handled by someone else in this process")
        with pytest.raises(KeyboardInterrupt):
            ctrl_c()
        with pytest.raises(KeyboardInterrupt):
            with interrupts.step():
                ctrl_c()
                reached.append("end of the step")
        assert reached == ["end of the step"] and not interrupts.in_step
        interrupts.pending = None
        with pytest.raises(KeyboardInterrupt):
            with interrupts.step():
                ctrl_c()
                interrupts.pending -= 2  # as if two seconds had passed
                ctrl_c()
                reached.append("after the second Ctrl-C")
        assert interrupts.in_step and reached == ["end of the step"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


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
        run = _run(_segmenter_train_args(tmp_path / name, 3, global_batch=batch, **common))
        assert run.returncode == 0, run.stderr[-2000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "transeg.cli",
           *_segmenter_train_args(tmp_path / "two", 3, global_batch=4, **common)]
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
    reference = _run(_segmenter_train_args(tmp_path / "ref", iters, **sets))
    assert reference.returncode == 0, reference.stderr[-2000:]
    victim = subprocess.Popen([sys.executable, "-m", "transeg.cli", *_segmenter_train_args(tmp_path / "run", iters, **sets)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_iterations(tmp_path / "run", 3 + time.time_ns() % 20, victim)  # a different iteration each run
    time.sleep((time.time_ns() % 10) * 0.005)  # and a varying moment inside that iteration
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    state = tmp_path / "run" / "train_state.pt"
    killed_at = torch.load(state, weights_only=True)["iter"]
    assert killed_at < iters  # it really was interrupted
    resumed = _run(_segmenter_train_args(tmp_path / "run", iters, **sets) + ["--resume"])
    assert resumed.returncode == 0, (killed_at, resumed.stderr[-2000:])
    assert _max_diff(_weights(tmp_path / "ref"), _weights(tmp_path / "run")) == 0.0, killed_at


@pytest.mark.integration
def test_resume_tolerates_a_half_written_log_line_and_removes_stale_temporaries(tmp_path):
    """What SIGKILL can leave: a log line cut in the middle and the temp file of an atomic write. The
    resumed run drops both and its log reads cleanly."""
    sets = dict(batch_size=2, eval_interval=4, ckpt_interval=2)
    assert _run(_segmenter_train_args(tmp_path / "run", 4, **sets)).returncode == 0
    run = tmp_path / "run"
    state = torch.load(run / "train_state.pt", weights_only=True)
    state["iter"] = 2  # pretend the run was killed after its checkpoint at iteration 2
    torch.save(state, run / "train_state.pt")
    with (run / "log.jsonl").open("a") as f:
        f.write('{"iter": 5, "lo')
    (run / ".model.safetensors.abc123.tmp").write_bytes(b"partial")
    resumed = _run(_segmenter_train_args(run, 4, **sets) + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert not list(run.glob(".*.tmp"))


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
                "--max-restarts", str(restarts), "-m", "transeg.cli", *_segmenter_train_args(out, iters, **sets), "--auto-resume"]

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

