"""Holding up: distributed training equals one process, a killed run resumes to the same weights, and
untrusted pickles are refused."""
import json
import os
import pickle
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
    log, target = tmp_path / "run" / "log.jsonl", 3 + time.time_ns() % 20  # a different iteration each run
    deadline = time.time() + 120
    while time.time() < deadline and victim.poll() is None:
        if log.exists() and sum(1 for line in log.read_text().splitlines() if '"loss"' in line) >= target:
            break
        time.sleep(0.01)
    time.sleep((time.time_ns() % 10) * 0.005)  # and a varying moment inside that iteration
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    state = tmp_path / "run" / "train_state.pt"
    killed_at = torch.load(state, weights_only=True)["iter"]
    assert killed_at < iters  # it really was interrupted
    resumed = _run(_train_args(tmp_path / "run", iters, **sets) + ["--resume"])
    assert resumed.returncode == 0, (killed_at, resumed.stderr[-2000:])
    assert _max_diff(_weights(tmp_path / "ref"), _weights(tmp_path / "run")) == 0.0, killed_at


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
