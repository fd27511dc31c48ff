"""The command line end to end on tiny models: train -> eval -> predict, bench, models, and bad input."""
import json

import numpy as np
import pytest
from PIL import Image

from conftest import TINY, TINY_DATA
from transeg.cli import main


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
