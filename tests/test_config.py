"""transeg.engine.config: TrainConfig's rules and the YAML / --set loading; a mistake is one line naming the key."""
import json

import numpy as np
import pytest

import transeg
from conftest import TINY
from transeg.cli import build_parser, main
from transeg.engine import TrainConfig, load_config, train


DATA = "synthetic:size=32,n=16"


def _train_argv(out, *extra):
    return ["train", "--model", "segformer-b0", "--data", DATA, "--out", str(out), "--iters", "1", "--workers", "0",
            "--device", "cpu", "--set", f"model_args={json.dumps(TINY)}", *extra]


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("transeg: error: "), err
    return err[0]


# (--set values, the message, why it must be refused)
BAD_SETS = [
    (["lr=-1"], "--set lr=-1: must be a number > 0", "a negative lr: torch raised ValueError (traceback)"),
    (["lr=.nan"], "--set lr=.nan: must be a number > 0", "NaN lr: traceback from AdamW"),
    (["lr=.inf"], "--set lr=.inf: must be a number > 0", "infinite lr would diverge at the first step"),
    (["lr=abc"], "--set lr=abc: must be a number > 0", "not a number at all"),
    (["batch_size=0"], "--set batch_size=0: must be a whole number >= 1", "DataLoader ValueError after out/ was made"),
    (["iters=0"], "--set iters=0: must be a whole number >= 1", "ZeroDivisionError in the poly schedule"),
    (["iters=-5"], "--set iters=-5: must be a whole number >= 1", "ZeroDivisionError in the poly schedule"),
    (["iters=1.5"], "--set iters=1.5: must be a whole number >= 1", "half an iteration is no schedule"),
    (["eval_interval=0"], "--set eval_interval=0: must be a whole number >= 1", "modulo by zero mid-run"),
    (["ckpt_interval=0"], "--set ckpt_interval=0: must be a whole number >= 1", "modulo by zero mid-run"),
    (["log_interval=0"], "--set log_interval=0: must be a whole number >= 1", "modulo by zero mid-run"),
    (["workers=-1"], "--set workers=-1: must be auto or a whole number >= 0", "DataLoader ValueError (traceback)"),
    (["crop_size=[0,0]"], "--set crop_size=[0,0]: must be [h, w]: two whole numbers >= 1", "TrainTransform traceback"),
    (["crop_size=[64]"], "--set crop_size=[64]: must be [h, w]: two whole numbers >= 1", "one number is no [h, w]"),
    (["ratio_range=0"], "--set ratio_range=0: must be [low, high]: two numbers with 0 < low <= high",
     "a scalar where a range is meant"),
    (["ratio_range=[2,0.5]"], "--set ratio_range=[2,0.5]: must be [low, high]", "an upside-down range"),
    (["optimizer=adam"], "--set optimizer=adam: must be one of adamw, sgd", "ValueError from build_optimizer"),
    (["device=gpu"], "--set device=gpu: must be auto, cpu, cuda or cuda:N", "not a torch device"),
    (["test_mode=sliding"], "--set test_mode=sliding: must be one of whole, slide", "a typo of slide"),
    (["test_mode=slide"], "--set test_mode=slide needs test_crop and test_stride", "windows of no size"),
    (["power=-1"], "--set power=-1: must be a number >= 0", "0 ** -1 at the last iteration"),
    (["weight_decay=-1"], "--set weight_decay=-1: must be a number >= 0", "AdamW ValueError"),
    (["custom_keys={head: 3}"], "--set custom_keys={head: 3}: 'head' maps to 3; it must map to {lr_mult: N, "
     "decay_mult: N}", "ran with the multiplier silently ignored (exit 0)"),
    (["custom_keys={head: {lr_mul: 10}}"], "'head' has unknown option(s) ['lr_mul']; known: lr_mult, decay_mult",
     "a misspelt multiplier was silently ignored"),
    (["clip_grad_norm=-1"], "--set clip_grad_norm=-1: must be a number > 0 (or null for no clipping)",
     "trained uphill (loss 2.1 -> 19.5) with exit 0"),
    (["clip_grad_norm=0"], "--set clip_grad_norm=0: must be a number > 0 (or null for no clipping)",
     "0 silently meant no clipping at all"),
    (["accum_steps=0"], "--set accum_steps=0: must be a whole number >= 1",
     "blamed on a NaN loss with advice to lower lr"),
    (["global_batch=0"], "--set global_batch=0: must be a whole number >= 1 (or null to use batch_size)",
     "no batch at all"),
    (["amp=fp8"], "--set amp=fp8: must be one of no, auto, bf16, fp16", "not a precision"),
    (["seed=-1"], "--set seed=-1: must be a whole number in 0 .. 2**64-1", "numpy refuses negative seeds mid-run"),
    (["warmup_iters=-1"], "--set warmup_iters=-1: must be a whole number >= 0", "a negative warm-up"),
    (["min_lr_ratio=2"], "--set min_lr_ratio=2: must be a number in [0, 1]", "the lr would grow as it decays"),
    (["cat_max_ratio=0"], "--set cat_max_ratio=0: must be a number in (0, 1]", "no crop could ever pass"),
    (["ohem={thresh: 2}"], "--set ohem={thresh: 2}: must be {thresh: a probability in [0, 1] or null",
     "a probability above 1 keeps every pixel"),
    (["loss_reduction=mean"], "--set loss_reduction=mean: must be one of all, valid", "not a reduction"),
    (["size_divisor=0"], "--set size_divisor=0: must be a whole number >= 1 (or null for no padding)",
     "modulo by zero at evaluation"),
    (["ms_scales=[]"], "--set ms_scales=[]: must be a list of ratios > 0", "a multi-scale test of no scale"),
    (["nesterov=true"], "--set nesterov=true applies to optimizer=sgd only", "silently ignored by AdamW"),
    (["model=segformer-b9"], "--set model=segformer-b9: unknown model 'segformer-b9' (did you mean",
     "a typo of the variant name"),
    (["model_args=" + "[" * 10_000 + "]" * 10_000], "--set model_args: line 1: nested deeper than 32 levels",
     "RecursionError in the YAML composer"),
]


@pytest.mark.parametrize("sets,message,why", BAD_SETS, ids=[" ".join(c[0])[:40] for c in BAD_SETS])
def test_a_bad_set_value_gets_one_line_and_nothing_runs(tmp_path, capsys, sets, message, why):
    out = tmp_path / "run"
    assert main(_train_argv(out, *sets)) == 2, why
    assert message in _one_error_line(capsys), why
    assert not out.exists(), why  # refused before any work: no run folder


def test_weights_that_are_no_checkpoint_are_refused_before_the_model_is_built(tmp_path, capsys):
    """backbone_weights=/etc/passwd: an IndexError from inside torch.load; a missing file is named too."""
    text = tmp_path / "passwd"
    text.write_text("root:x:0:0:root:/root:/bin/bash\n")
    for value, message in ((text, f"backbone_weights={text}: not a checkpoint (expected a .pth"),
                           (tmp_path / "mit_b0.pth", f"backbone_weights={tmp_path / 'mit_b0.pth'}: no such file"),
                           (text, f"pretrained={text}: not a checkpoint (expected a transeg .safetensors file)")):
        key = "pretrained" if "pretrained" in message else "backbone_weights"
        assert main(_train_argv(tmp_path / "run", f"{key}={value}")) == 2
        assert message in _one_error_line(capsys)
        assert not (tmp_path / "run").exists()


# (YAML file content, the message after the file name, why)
_LAUGHS = "custom_keys:\n  a: &a {lr_mult: 1}\n" + "".join(
    f"  b{i}: &b{i} [{', '.join(['*a' if i == 0 else f'*b{i - 1}'] * 9)}]\n" for i in range(9))


BAD_YAML = [
    (b"iters: 1e400\n", "iters=1e400: must be a whole number >= 1", "OverflowError (traceback)"),
    (b"iters: 1.0e+400\n", "iters=inf: must be a whole number >= 1", "OverflowError (traceback)"),
    (b"model: segformer-b0  # caf\xe9\n", "not UTF-8 text (byte 0xe9 at offset 26); save it as UTF-8",
     "UnicodeDecodeError (traceback)"),
    (b"model_args: " + b"[" * 10_000 + b"]" * 10_000 + b"\n", "line 1: nested deeper than 32 levels",
     "RecursionError in the YAML composer"),
    ("model_args:\n" + "".join("  " * i + f"  k{i}:\n" for i in range(40)) + "  " * 41 + "1\n",
     "line 32: nested deeper than 32 levels", "the same in block style"),
    (_LAUGHS, "line 6: aliases expand this value to more than 10,000 values",
     "a billion laughs under custom_keys hung at 2.4 GB"),
    ("model_args: &a {x: *a}\n", "line 1: alias *a is inside the value it names (a cycle)",
     "a cyclic value: RecursionError when the config is saved"),
    ("lr: 0.1\niters: 5\nlr: 0.2\n", "line 3: key 'lr' is given twice (first on line 1); keep one",
     "the last value silently won"),
    ("iters: " + "9" * 5000 + "\n", "invalid YAML (Exceeds the limit (4300 digits) for integer string conversion)",
     "ValueError from int() (traceback)"),
    ("lr: null\n", "lr=null: must be a number > 0", "TypeError mid-run"),
    ("amp: fp8\n", "amp=fp8: must be one of no, auto, bf16, fp16", "one rule for YAML and --set"),
    ("- lr\n- iters\n", "expected a mapping of keys to values, got a list", "not a config"),
    ("lr: !!python/object/apply:os.system [true]\n", "invalid YAML at line 1, column 5: could not determine a constructor for the tag",
     "no code runs from a config"),
]


@pytest.mark.parametrize("text,message,why", BAD_YAML, ids=[c[2][:40] for c in BAD_YAML])
def test_a_bad_yaml_config_gets_one_line_naming_the_file(tmp_path, capsys, text, message, why):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(text if isinstance(text, bytes) else text.encode())
    out = tmp_path / "run"
    assert main(["train", str(recipe), "--out", str(out), "--device", "cpu"]) == 2, why
    assert f"{recipe}: {message}" in _one_error_line(capsys), why
    assert not out.exists(), why


def test_anchors_within_bounds_still_work(tmp_path):
    """Aliases are bounded, not banned: one window size written once and used twice is fine."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: segformer-b0\ntest_mode: slide\ntest_crop: &window [64, 64]\ntest_stride: *window\n"
                      "amp: no  # a bare no is YAML's false; the user meant the string\n")
    cfg = load_config(recipe)
    assert cfg.test_crop == cfg.test_stride == [64, 64] and cfg.amp == "no"


def test_repeated_set_options_all_apply_and_a_repeated_key_is_said(capsys):
    """`--set iters=300 --set eval_interval=300` kept only the last --set; now all apply. A key given
    twice takes the last value, as a repeated option does (a script's base command plus an override),
    but with a note naming both values; the same value twice is no conflict and no note."""
    args = build_parser().parse_args(["train", "--set", "iters=300", "--set", "eval_interval=300", "lr=1e-4",
                                      "--set", "iters=300", "--set", "lr=2e-4"])
    assert args.set == ["iters=300", "eval_interval=300", "lr=1e-4", "iters=300", "lr=2e-4"]
    capsys.readouterr()
    cfg = load_config(None, args.set)
    assert (cfg.iters, cfg.eval_interval, cfg.lr) == (300, 300, 2e-4)
    assert capsys.readouterr().err.splitlines() == [
        "transeg: note: --set lr is given twice; the last, lr=2e-4, applies (not lr=1e-4)"]


def test_the_python_api_is_checked_the_same_way(tmp_path):
    """TrainConfig(...) checks on construction, and train() checks again what was changed after it
    (before any folder is made); custom_keys passed straight to param_groups too."""
    from transeg.engine.optim import param_groups

    with pytest.raises(transeg.TransegError, match=r"^clip_grad_norm=-1: must be a number > 0 \(or null"):
        TrainConfig(clip_grad_norm=-1)
    cfg = TrainConfig(model_args=TINY, data=DATA, iters=np.int64(1), crop_size=(32, 32), workers=0, device="cpu",
                      out=tmp_path / "run")
    assert type(cfg.iters) is int and cfg.crop_size == [32, 32] and cfg.out == str(tmp_path / "run")
    cfg.accum_steps = 0
    with pytest.raises(transeg.TransegError, match=r"^accum_steps=0: must be a whole number >= 1$"):
        train(cfg, progress=False, log=lambda *_: None)
    assert not (tmp_path / "run").exists()
    model = transeg.create_model("segformer-b0", num_classes=3, **TINY)
    with pytest.raises(transeg.TransegError, match=r"custom_keys: 'head' maps to 3"):
        param_groups(model, 1e-3, 0.01, {"head": 3})


def test_recipes_keep_their_values():
    """The rules accept what the recipes hold (YAML 1.1 reads 6e-5 as a string: still a float)."""
    cfg = load_config(None, ["lr=6e-5", "iters=1e3", "amp=no"])
    assert (cfg.lr, cfg.iters, cfg.amp) == (6e-5, 1000, "no")

