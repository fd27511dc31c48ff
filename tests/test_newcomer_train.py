"""The first hour of training (issue 20, points 1-4): a bad mask is the one line `data check` gives,
whatever the worker count; a failed start leaves the run folder as it was; --resume may extend (or
shorten) a run and says what happens to the learning rate, and refuses, naming the key, the settings
that would change what was computed; a fine-tune from another run's weights is one flag and says when
its classifier starts afresh; a resumed run logs the same losses as an uninterrupted one.

(Ctrl-C before the first checkpoint saving where the run is and printing the command that continues
it is tested by tests/test_reliability_train.py::test_ctrl_c_saves_where_the_run_is_and_names_the_command_that_continues_it:
its run has ckpt_interval 100 and is interrupted at iteration 2..5.)"""
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import transeg
from conftest import TINY, TINY_DATA
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


# ------------------------------------------------------------------------------------------------ 1
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


# ------------------------------------------------------------------------------------------------ 4a
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


# ------------------------------------------------------------------------------------------------ 4b
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


# ------------------------------------------------------------------------------------------------ 3
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
