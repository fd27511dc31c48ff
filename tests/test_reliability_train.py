"""Training runs and checkpoints under mistakes and accidents: two runs into one folder, a full or
read-only disk, NaN weights, a dataset with nothing labelled, damaged checkpoint metadata, a damaged
training state, Ctrl-C. Each gets one line naming the file and the fix (exit status 2) or, for Ctrl-C,
a checkpoint and the command that continues the run; nothing of the user's is changed or lost."""
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import transeg
from conftest import TINY, TINY_DATA
from transeg.cli import main


def _train_args(out, iters=1, **sets):
    sets = {"warmup_iters": 0, "log_interval": 1, "batch_size": 2, **sets}
    return ["train", "--data", TINY_DATA, "--out", str(out), "--iters", str(iters), "--workers", "0", "--device", "cpu",
            "--set", f"model_args={json.dumps(TINY)}", *[f"{k}={v}" for k, v in sets.items()]]


def _one_line(capsys, *fragments):
    """The one `transeg: error:` line on stderr (and no traceback), holding every fragment."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("transeg: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def _snapshot(folder):
    """Every file under `folder` (but the lock file, which records the last pid) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*"))
            if p.is_file() and p.name != ".lock"}


@contextlib.contextmanager
def _mounted(path, options):
    """A real tmpfs at `path` (we run as root in CI); the test is skipped where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command here")
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}); needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    transeg.save(transeg.create_model("segformer-b0", num_classes=3, classes=["a", "b", "c"], **TINY), path)
    return path


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished one-iteration run: model.safetensors, train_state.pt, log, config."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert main(_train_args(run, 1)) == 0
    return run


# ------------------------------------------------------------------------------------------------ 1
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


# ------------------------------------------------------------------------------------------------ 2
def _save_bigger_model(target):
    transeg.save(transeg.create_model("segformer-b0", num_classes=3, embed_dims=[32, 64, 96, 128], num_heads=[1, 1, 1, 1],
                                      depths=[1, 1, 1, 1], decoder_dim=32), target)


def _torch_save_bigger_state(target):
    from transeg.files import atomic_write

    state = {"iter": 2, "model": {"w": torch.zeros(200_000)}}
    atomic_write(target, lambda tmp: torch.save(state, tmp))


@pytest.mark.integration
@pytest.mark.parametrize("write", [_save_bigger_model, _torch_save_bigger_state], ids=["safetensors", "torch.save"])
def test_a_real_full_disk_keeps_the_previous_checkpoint(tmp_path, write, tiny_ckpt):
    """A 256 kB tmpfs fills up while a checkpoint is written: safetensors raises SafetensorError, torch.save
    RuntimeError('unexpected pos ...'), neither an OSError. Both become the one line, the previous file
    is byte-for-byte intact and no temporary file is left."""
    with _mounted(tmp_path / "disk", "size=256k") as disk:
        target = disk / ("model.safetensors" if write is _save_bigger_model else "train_state.pt")
        shutil.copyfile(tiny_ckpt, target)
        before = target.read_bytes()
        with pytest.raises(transeg.TransegError, match=rf"{target.name}: could not be saved \(No space left on device\); "
                                                       r"the previous version is intact"):
            write(target)
        assert target.read_bytes() == before and [p.name for p in disk.iterdir()] == [target.name]


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


# ------------------------------------------------------------------------------------------------ 3
def _nan_ckpt(tmp_path, tiny_ckpt):
    path = tmp_path / "nan.safetensors"
    state = load_file(str(tiny_ckpt))
    state["decode_head.linear_pred.weight"][1, 2] = float("nan")
    with safe_open(str(tiny_ckpt), framework="pt") as f:
        save_file(state, str(path), metadata=f.metadata())
    return path


@pytest.mark.parametrize("verb", ["eval", "predict", "load"])
def test_nan_weights_are_refused(tmp_path, capsys, tiny_ckpt, verb):
    """A checkpoint with one NaN weight evaluated to "mIoU 7.93" and exported with "max |diff| 0.0"; now
    every reader refuses it with one line naming the file and the tensor."""
    path = _nan_ckpt(tmp_path, tiny_ckpt)
    message = "nan.safetensors: tensor decode_head.linear_pred.weight holds 1 NaN/inf value(s)"
    if verb == "load":
        with pytest.raises(transeg.TransegError, match=message.replace("(", r"\(").replace(")", r"\)")):
            transeg.load(path)
        return
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    argv = {"eval": ["eval", str(path), "--data", "synthetic:size=32,n=2", "--limit", "1"],
            "predict": ["predict", str(path), str(image), "--out", str(tmp_path / "o")]}[verb]
    assert main(argv) == 2
    _one_line(capsys, message)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())  # nothing written


def test_a_model_with_nan_weights_is_not_saved(tmp_path):
    model = transeg.create_model("segformer-b0", num_classes=3, **TINY)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(transeg.TransegError, match=r"bad.safetensors: not saved: tensor .* holds 1 NaN/inf"):
        transeg.save(model, tmp_path / "bad.safetensors")
    assert not list(tmp_path.iterdir())


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


# ------------------------------------------------------------------------------------------------ 4
def _with_metadata(tiny_ckpt, tmp_path, edit):
    """A copy of the tiny checkpoint whose transeg metadata is `edit(dict)` (a dict, or a raw string)."""
    with safe_open(str(tiny_ckpt), framework="pt") as f:
        meta = f.metadata()
    value = edit(json.loads(meta["transeg"]))
    path = tmp_path / "edited.safetensors"
    save_file(load_file(str(tiny_ckpt)), str(path),
              metadata={**meta, "transeg": value if isinstance(value, str) else json.dumps(value)})
    return path


def _set(key, value):
    return lambda m: {**m, key: value}


def _args(**changes):
    return lambda m: {**m, "model_args": {**m["model_args"], **changes}}


BAD_METADATA = [
    ("not JSON", lambda m: '{"variant": "segformer-b0", ', "bad transeg metadata: not JSON"),
    ("a JSON list", lambda m: [m], "bad transeg metadata: expected a JSON object, got list"),
    ("no variant", lambda m: {k: v for k, v in m.items() if k != "variant"}, "bad transeg metadata: no 'variant'"),
    ("unknown variant", _set("variant", "segformer-b9"), "unknown model 'segformer-b9'"),
    ("palette entry", _set("palette", [[0, 0, 0], [0, 0], [1, 1, 1]]),
     "'palette' entry 1 must be [r, g, b] (3 whole numbers), got [0, 0]"),
    ("palette of names", _set("palette", "red, green, blue"), "'palette' must be a list of 3 [r, g, b] colours"),
    ("palette too short", _set("palette", [[0, 0, 0]]), "'palette' must be a list of 3 [r, g, b] colours"),
    ("classes", _set("classes", "abc"), "'classes' must be a list of 3 class names"),
    ("mean", _set("mean", [1, 2]), "'mean' must be 3 numbers"),
    ("model_args a list", _set("model_args", [1, 2]), "'model_args' must be an object"),
    ("unknown argument", _args(colour="red"), "model_args do not fit segformer-b0: unknown argument(s) ['colour']"),
    ("argument of the wrong type", _args(embed_dims="wide"), "model_args do not fit segformer-b0 ("),
    ("huge embed_dims", _args(embed_dims=[10**8, 16, 24, 32]),
     "its metadata describes a segformer-b0 of at least 14,700,000,000 weights but the file holds 53,500"),
    ("embed_dims that do not fit", _args(embed_dims=[8, 16, 24, 40]),
     "its metadata describes a segformer-b0 that does not fit the file's tensors (23 misshapen: "
     "backbone.patch_embed4.proj.weight (32, 24, 3, 3) vs (40, 24, 3, 3)"),
    ("a billion layers", _args(depths=[10**9, 1, 1, 1]), "depths=[1000000000, 1, 1, 1] asks for more layers than"),
    ("test protocol", _set("test", {"mode": "zigzag"}), "test protocol: mode must be 'whole' or 'slide'"),
]


@pytest.mark.parametrize("case,edit,message", BAD_METADATA, ids=[c[0] for c in BAD_METADATA])
def test_damaged_checkpoint_metadata_is_one_line_naming_the_file(tmp_path, capsys, tiny_ckpt, case, edit, message):
    """Metadata a file cannot be rebuilt from gave tracebacks (JSONDecodeError, KeyError, TypeError from
    a constructor) or, for huge sizes, tried to allocate terabytes (59 GB for the first tensor here);
    now one line naming the file, from its header and a build stopped before it allocates more than
    the file holds; the file is unchanged."""
    path = _with_metadata(tiny_ckpt, tmp_path, edit)
    before = path.read_bytes()
    started = time.perf_counter()
    assert main(["eval", str(path)]) == 2
    line = _one_line(capsys, message)
    assert line.startswith(f"transeg: error: {path}: ")
    assert path.read_bytes() == before and time.perf_counter() - started < 20


# ------------------------------------------------------------------------------------------------ 5
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


# ------------------------------------------------------------------------------------------------ 6
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
    victim = subprocess.Popen([sys.executable, "-m", "transeg.cli", *_train_args(run, iters, **sets)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "2"})  # as conftest sets in-process: same sums
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
    from transeg.engine.trainer import _Interrupts

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
