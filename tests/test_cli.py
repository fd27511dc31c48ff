"""transeg.cli: the verbs end to end on tiny models, --help and its examples, --threads, --device, bad input."""
import json
import shlex

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, TINY_DATA
from helpers import _ckpt, _error, _image, _png, _segmenter_train_args, run
from transeg import cli
from transeg.cli import build_parser, main


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    args = ["train", "--data", TINY_DATA, "--out", str(out), "--iters", "6", "--batch-size", "2", "--workers", "0",
            "--device", "cpu", "--set", f"model_args={json.dumps(TINY)}", "eval_interval=6", "ckpt_interval=6",
            "log_interval=3", "warmup_iters=0", "lr=1e-3"]
    assert main(args) == 0
    return out


def test_train_writes_the_run(trained):
    records = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if "loss" in r] == [3, 6]
    assert [r["iter"] for r in records if "mIoU" in r] == [6]
    assert "crop_size:\n- 32\n- 32" in (trained / "config.yaml").read_text()  # resolved from the 32x32 synthetic set


def test_eval_prints_protocol_and_table(trained, capsys, tmp_path):
    assert main(["eval", str(trained / "model.safetensors"), "--device", "cpu", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "protocol: whole, resize keep-ratio to (128, 32), align 32, scales [1.0]" in out
    assert "mIoU" in out and "ring" in out  # per-class table with the synthetic class names
    assert (tmp_path / "iou.png").is_file()


def test_eval_slide_and_flip(trained, capsys):
    assert main(["eval", str(trained / "model.safetensors"), "--mode", "slide", "--crop", "32x32", "--stride",
                 "16x16", "--flip", "--limit", "3"]) == 0
    assert "protocol: slide (32, 32) stride (16, 16), resize keep-ratio to (128, 32), align 32, scales [1.0] + flip" \
        in capsys.readouterr().out


def test_eval_ms_uses_the_recipes_multi_scale_protocol(trained, capsys):
    """--ms: the multi-scale ratios + flip stored with the run (TrainConfig ms_scales / ms_flip; the
    default is mmseg's 0.5..1.75 + flip, as SegFormer, SegViT and SeMask-FPN test)."""
    assert main(["eval", str(trained / "model.safetensors"), "--ms", "--limit", "2"]) == 0
    assert "scales [0.5, 0.75, 1.0, 1.25, 1.5, 1.75] + flip" in capsys.readouterr().out


def test_predict_writes_masks_and_overlays_inside_out(trained, tmp_path):
    Image.fromarray(np.full((40, 50, 3), 120, np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.full((33, 47, 3), 30, np.uint8)).convert("L").save(tmp_path / "b.jpg")  # grayscale
    out = tmp_path / "preds"
    assert main(["predict", str(trained / "model.safetensors"), str(tmp_path / "a.png"), str(tmp_path / "b.jpg"),
                 "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a_mask.png", "a_overlay.jpg", "b_mask.png", "b_overlay.jpg"]
    mask = Image.open(out / "b_mask.png")
    assert mask.mode == "P" and mask.size == (47, 33)  # index PNG at the input's own size
    assert np.array(mask).max() < 6


def test_bench_prints_environment(capsys):
    assert main(["bench", "segformer-b0", "--size", "64x64", "--runs", "2", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    # 3.73M params with 150 classes (the authors' 3.77M minus their unused conv_seg)
    assert "segformer-b0: 3.75M params" in out and "threads" in out and "latency median" in out


def test_bench_compare_hf_checks_logits_and_reports_ratios(capsys):
    """--compare hf: HF SegFormer with the same weights timed in the same run; the fp32 logits agree
    (HF's LayerNorm eps aligned to the authors'), and each contender gets a ratio to HF fp32."""
    pytest.importorskip("transformers")
    assert main(["bench", "segformer-b0", "--size", "64x64", "--runs", "1", "--warmup", "0", "--compare", "hf",
                 "--dtype", "bf16"]) == 0
    lines = capsys.readouterr().out.splitlines()
    diff = next(float(line.split("= ")[1].split()[0]) for line in lines if line.startswith("fp32 logits"))
    assert diff <= 1e-4
    names = [line[:24].strip() for line in lines if line.endswith("x HF fp32")]
    assert names == ["HF fp32", "HF bf16 (autocast)", "transeg bf16"]
    assert main(["bench", "edaformer-t", "--compare", "hf"]) == 2  # one line: HF has no EDAFormer


def test_predict_in_bf16_matches_fp32_masks(trained, tmp_path):
    """--dtype bf16 runs native bf16 weights; on a trained model's clear-cut synthetic image the masks
    agree with fp32 on nearly every pixel (bf16 keeps ~3 digits, ties may flip)."""
    from transeg.data.synthetic import SyntheticDataset

    image = SyntheticDataset("val", num_samples=1, size=(64, 64), seed=3)[0]["image"]
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / "s.png")
    masks = []
    for dtype in ("fp32", "bf16"):
        assert main(["predict", str(trained / "model.safetensors"), str(tmp_path / "s.png"), "--out",
                     str(tmp_path / dtype), "--dtype", dtype]) == 0
        masks.append(np.array(Image.open(tmp_path / dtype / "s_mask.png")))
    assert (masks[0] == masks[1]).mean() >= 0.95


def test_models_lists_paper_and_measured(capsys):
    assert main(["models", "--family", "segformer"]) == 0
    out = capsys.readouterr().out
    b0 = next(line for line in out.splitlines() if line.startswith("segformer-b0 "))
    # measured 3.8M params and 8.4 GFLOPs at 512x512, beside the paper's 3.8 / 8.4 (Table 1)
    assert b0.split()[1:6] == ["3.8", "3.8", "512x512@150", "8.4", "8.4"]


@pytest.mark.parametrize("argv,message", [
    (["eval", "nope.safetensors"], "nope.safetensors: no such checkpoint file"),
    (["train", "--model", "segformer-b9", "--iters", "1"], "unknown model 'segformer-b9' (did you mean"),
    (["train", "--data", "/no/such/dir"], "--data /no/such/dir: no such directory"),
    (["train", "--set", "iter=3"], "unknown key 'iter'; did you mean 'iters'?"),
    (["convert", "x.pth", "y.safetensors", "--from", "segformer"], "x.pth: no such file or directory"),
])
def test_bad_input_gets_one_clear_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("transeg: error: ") and message in err and "\n" not in err


def test_corrupt_checkpoint_is_named(tmp_path, capsys):
    (tmp_path / "bad.safetensors").write_bytes(b"\x00garbage")
    assert main(["eval", str(tmp_path / "bad.safetensors")]) == 2
    assert "bad.safetensors: not a safetensors file" in capsys.readouterr().err


def test_threads_option_sets_torchs_threads_and_help_names_omp(work, capsys):
    """--threads 1 after any computing verb: bench then reports "1 threads" and torch runs 1 thread."""
    assert run(["bench", "runs/train/model.safetensors", "--size", "64x64", "--runs", "3", "--warmup", "0",
                "--threads", "1"], work) == 0
    assert torch.get_num_threads() == 1
    assert ", 1 threads," in capsys.readouterr().out
    for verb in ("train", "eval", "predict", "bench", "export", "serve"):
        sub = build_parser()._subparsers._group_actions[0].choices[verb]
        assert "OMP_NUM_THREADS" in " ".join(sub.format_help().split()), verb


def test_threads_is_taken_where_users_put_it(capsys):
    """`transeg models --threads 1` (refused before: models had no --threads) and `transeg --threads 1 VERB`
    (before the verb) both set torch's threads; after the verb it wins over before it."""
    for argv, threads in ((["models", "--threads", "1"], 1), (["--threads", "2", "models"], 2),
                          (["--threads", "2", "models", "--threads", "1"], 1)):
        torch.set_num_threads(3)
        assert main(argv + ["--family", "segformer", "--no-flops"]) == 0, argv
        assert torch.get_num_threads() == threads, argv
    capsys.readouterr()
    for verb in cli.THREADED_VERBS:
        assert "--threads" in build_parser()._subparsers._group_actions[0].choices[verb].format_help(), verb
    assert {"models", "pull"} <= set(cli.THREADED_VERBS)


def _examples():
    for verb, text in cli.VERB_EXAMPLES.items():
        for line in text.splitlines():
            yield verb, shlex.split(line.split("  #")[0])[1:]


def test_every_verb_help_ends_with_examples_that_parse():
    """Each verb's --help has an "examples:" section (serve's is in its description), and every example
    parses with the real parser (no usage error)."""
    choices = build_parser()._subparsers._group_actions[0].choices
    assert len(choices) >= 9  # models train eval predict convert bench serve data export
    for verb, sub in choices.items():
        assert "\nexamples:\n" in sub.format_help(), verb
    parser = build_parser()
    for verb, argv in _examples():
        assert argv[0] == verb
        parser.parse_args(argv)


CHEAP = ["models --family segformer --no-flops", "models --pretrained --family segmenter", "predict runs/train/model.safetensors photo.jpg --out preds/",
         "predict runs/train/model.safetensors photo.jpg --out preds/ --grid",
         "predict runs/train/model.safetensors data/images/val/ --out preds/ --grid --truth data/masks/val/",
         "bench runs/train/model.safetensors --size 128x128"]


def test_the_cheap_examples_run(work, capsys):
    """The examples that take a second on the tiny model run as written, from the folder they assume."""
    examples = {" ".join(argv) for _, argv in _examples()}
    for line in CHEAP:
        assert line in examples, line
        assert run(shlex.split(line), work) == 0, line
    assert (work / "preds" / "grid.png").is_file() and (work / "preds" / "photo_overlay.jpg").is_file()


def test_unknown_family_is_one_line_with_did_you_mean(capsys):
    """`models --family segfromer` printed an empty table and exited 0; now exit 2, one line."""
    assert main(["models", "--family", "segfromer"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("transeg: error: unknown family 'segfromer'; did you mean 'segformer'?")
    assert err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("verb", ["predict", "bench"])
def test_device_cuda_without_cuda_is_one_line(ckpt, tmp_path, capsys, verb):
    args = [str(_png(tmp_path / "x.png")), "--out", str(tmp_path / "o")] if verb == "predict" else ["--runs", "1"]
    line = _error(capsys, main([verb, str(ckpt), *args, "--device", "cuda"]))
    assert "device 'cuda': CUDA is not available on this machine" in line and "use --device cpu" in line


# Bad input: one line naming the file and the problem, exit status 2, nothing half-written. The
# README's robustness table lists these same cases.
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


def _truncated(path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path.with_suffix(".full.jpg"))
    data = path.with_suffix(".full.jpg").read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _bomb(path):
    # 15000 x 12000 = 180M pixels of one bit: a 3 kB PNG that would decode to half a gigabyte of RGB
    Image.new("1", (15000, 12000)).save(path, optimize=True)


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
    ("loss becomes NaN", lambda t: _segmenter_train_args(t / "nan", 4, batch_size=2, lr=1e30, ckpt_interval=1, eval_interval=4),
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



# -- issue 30: text from files reaches the terminal escaped ------------------------------------------------------

HOSTILE = ["\x1b[31mred\x1b[0m", "nul\x00byte", "two\nlines", "bell\x07\r", "\u202eevil", "del\x7f\x9b"]


@pytest.mark.parametrize("text,shown", [
    ("road", "road"), ("café 日本 ok", "café 日本 ok"),          # printable text, accents and CJK included, as it is
    ("\x1b[2J", "\\x1b[2J"), ("a\x00b", "a\\x00b"), ("x\ny", "x\\ny"), ("x\r\ty", "x\\r\\ty"),
    ("\u202eabc", "\\u202eabc"), ("z\u200bw", "z\\u200bw"), ("\x9b31m", "\\x9b31m"), ("\x7f", "\\x7f"),
])
def test_printable_escapes_control_and_format_characters(text, shown):
    from transeg.text import printable

    assert printable(text) == shown


def _raw_control(text):
    """The control characters in terminal output (newlines between lines allowed)."""
    return [c for c in text if (ord(c) < 32 and c != "\n") or 0x7f <= ord(c) < 0xa0 or c in "\u202e\u200b"]


def test_class_names_from_files_are_printed_escaped(tmp_path, capsys):
    """Class names with ANSI escapes, NUL, newlines, bidi overrides (from classes.txt or a checkpoint's classes) are
    printed escaped by `data check`, `predict` and `eval`: no raw control character reaches the terminal."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("".join(n.replace("\n", "\\n") + "\n" for n in HOSTILE[:2] + HOSTILE[3:]) +
                                      "plain\n")
    names = HOSTILE[:2] + HOSTILE[3:] + ["plain"]
    mask = np.arange(16 * 20, dtype=np.uint8).reshape(16, 20) % len(names)
    Image.fromarray(np.zeros((16, 20, 3), np.uint8)).save(root / "images" / "x.png")
    Image.fromarray(mask).save(root / "masks" / "x.png")
    assert main(["data", "check", str(root)]) == 0
    out = capsys.readouterr().out
    assert not _raw_control(out) and "\\x1b[31mred" in out and "nul\\x00byte" in out, out

    import transeg

    ckpt = tmp_path / "hostile.safetensors"
    transeg.save(transeg.create_model("segformer-b0", num_classes=len(HOSTILE), classes=HOSTILE, **TINY), ckpt)
    assert main(["predict", str(ckpt), str(root / "images" / "x.png"), "--out", str(tmp_path / "preds"),
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert not _raw_control(out) and "%" in out, out
    assert main(["eval", str(ckpt), "--data", str(root), "--device", "cpu"]) == 0  # the per-class table
    out = capsys.readouterr().out
    assert not _raw_control(out) and "\\x1b[31mred" in out, out


def test_error_lines_escape_text_from_files(tmp_path, capsys):
    """The one error line stays one line whatever the file held: a name with a newline and an escape is escaped."""
    (tmp_path / "classes.txt").write_text("a\n")
    bad = tmp_path / "x\x1b[2J\ny"
    bad.mkdir()
    (bad / "classes.txt").write_text("a\na\n")
    line = _error(capsys, main(["data", "check", str(bad)]))
    assert "\\x1b[2J\\ny" in line and not _raw_control(line), line
