"""transeg.deploy: int8 quantisation and the ONNX Runtime back-end (predict / eval / serve on an .onnx file), and the
torch-free runtime. Tiny models exported at 64x64: the whole file takes seconds."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import transeg
from conftest import TINY, TINY_EDAFORMER
from helpers import _error
from transeg.cli import main

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

from transeg.deploy.backend import OnnxModel  # noqa: E402
from transeg.deploy.quantize import quantize_int8  # noqa: E402
from transeg.deploy.runtime import OnnxSegmenter  # noqa: E402
from transeg.export import export_onnx  # noqa: E402

CLASSES = ["sky", "ground", "disc", "box", "triangle", "ring"]
RUNTIME = Path(__file__).resolve().parents[1] / "src" / "transeg" / "deploy" / "runtime.py"


def _images(count=6, seed=0):
    """Synthetic scenes (sky, ground and shapes: structure the model's labels follow), at the sizes of the set."""
    from transeg.data import build_dataset

    data = build_dataset("synthetic:size=48x64,n=16", "train")
    return [np.ascontiguousarray(data[i]["image"].permute(1, 2, 0).numpy()) for i in range(seed, seed + count)]


def _export(name, folder):
    """(PyTorch model, its fp32 .onnx) for a tiny `name` under a resizing protocol (keep-ratio into (96, 64),
    aligned to 32), so the back-ends' resize, alignment and upsampling are all exercised. A dynamic-size export
    takes 10-30 s of tracing on the 2-core machine, so the file shares one per family."""
    torch.manual_seed(0)
    tiny = TINY if name == "segformer-b0" else TINY_EDAFORMER
    model = transeg.create_model(name, num_classes=6, classes=CLASSES, **tiny).eval()
    model.protocol = transeg.Protocol(scale=(96, 64), size_divisor=32)
    export_onnx(model, folder / "m.onnx", sample_size=(64, 64))
    return model, folder / "m.onnx"


@pytest.fixture(scope="module")
def segformer(tmp_path_factory):
    return _export("segformer-b0", tmp_path_factory.mktemp("segformer"))


@pytest.fixture(scope="module", params=["segformer-b0", pytest.param("edaformer-t", marks=pytest.mark.slow)])
def exported(request, tmp_path_factory):
    if request.param == "segformer-b0":
        return request.getfixturevalue("segformer")
    return _export(request.param, tmp_path_factory.mktemp("edaformer"))


def _agreement(a, b):
    return float((np.asarray(a) == np.asarray(b)).mean())


def test_onnxruntime_labels_equal_pytorch(exported):
    """fp32 graph: the onnxruntime back-end (OnnxModel through transeg.inference) and the torch-free runtime give
    PyTorch's labels on >= 99.9% of the pixels (the graph equals PyTorch within 1e-5; only near-ties may flip)
    of four images of two sizes, whole-image and sliding-window protocols alike."""
    model, path = exported
    backend, runtime = OnnxModel(path), OnnxSegmenter(path)
    images = _images(3) + [np.random.default_rng(1).integers(0, 256, (37, 83, 3), dtype=np.uint8)]
    for protocol in (model.protocol, model.protocol.replace(mode="slide", crop=(32, 32), stride=(24, 24))):
        runtime.protocol = protocol.to_meta()
        for rgb in images:
            expected = model.predict(rgb, protocol=protocol).labels
            assert _agreement(backend.predict(rgb, protocol=protocol).labels, expected) >= 0.999
            assert _agreement(runtime.labels(rgb), expected) >= 0.999


def test_int8_static_and_dynamic_agree_with_fp32(segformer, tmp_path):
    """A static int8 copy (calibrated on 8 synthetic scenes) and a dynamic one of the tiny SegFormer run and give
    the fp32 graph's labels on >= 97% of the pixels of six other scenes (an untrained tiny model's logits lie close
    together, so this is harder than a trained model: measured 98-100% here; the quickstart B0's int8 mIoU is within
    0.2 of fp32, BENCHMARKS.md). The file says what it is, and two graphs of one model have different digests."""
    _, fp32 = segformer
    static, dynamic = tmp_path / "s.onnx", tmp_path / "d.onnx"
    report = quantize_int8(fp32, static, calibration=_images(8, seed=8), count=8)
    assert report["method"] == "static" and report["images"] == 8
    quantize_int8(fp32, dynamic)
    reference = OnnxSegmenter(fp32)
    for path, precision in ((static, "int8 static"), (dynamic, "int8 dynamic")):
        int8 = OnnxSegmenter(path)
        assert int8.meta["precision"] == precision and int8.meta["classes"] == CLASSES
        agree = np.mean([_agreement(int8.labels(rgb), reference.labels(rgb)) for rgb in _images()])
        assert agree >= 0.97, (precision, agree)
    from transeg.tiled import weights_digest  # a tiled job resumes only with the graph that began it

    assert weights_digest(OnnxModel(static)) != weights_digest(OnnxModel(dynamic)) == weights_digest(OnnxModel(dynamic))
    ops = {n.op_type for n in onnx.load(static).graph.node}
    assert "QuantizeLinear" in ops and "LayerNormalization" in ops  # int8 QDQ around fp32 LayerNorm


def test_cli_int8_export_eval_and_predict(segformer, tmp_path, capsys):
    """`export m.onnx --int8 --calibrate` (the fp32 export as input; from a checkpoint the same runs after the
    fp32 export), then `eval` and `predict` on the int8 .onnx: each exits 0 and says what it did; `export --int8`
    without --calibrate says it is dynamic."""
    out = tmp_path / "m-int8.onnx"
    assert main(["export", str(segformer[1]), str(out), "--int8", "--calibrate", "synthetic:size=32,n=16",
                 "--calibration-images", "4"]) == 0
    printed = capsys.readouterr().out
    assert "static int8, calibrated on 4 images" in printed and "int8 static, 4 calibration images" in printed
    assert main(["eval", str(out), "--data", "synthetic:size=32,n=16"]) == 0
    printed = capsys.readouterr().out
    assert f"{out} on synthetic:size=32,n=16 (val, 16 images)" in printed and "mIoU" in printed
    from PIL import Image

    Image.fromarray(_images(1)[0]).save(tmp_path / "p.png")
    assert main(["predict", str(out), str(tmp_path / "p.png"), "--out", str(tmp_path / "preds")]) == 0
    assert (tmp_path / "preds" / "p_mask.png").is_file()
    assert main(["export", str(segformer[1]), str(tmp_path / "d.onnx"), "--int8"]) == 0
    assert "dynamic int8 (no --calibrate DATA" in capsys.readouterr().out


def test_serve_answers_the_same_api_with_an_onnx_model(segformer):
    """The service on OnnxModel: /v1/model describes it as for the PyTorch model (variant, classes, protocol), and
    /v1/segment answers the index PNG of the labels PyTorch gives (>= 99.9% of pixels)."""
    pytest.importorskip("fastapi")
    import io

    from PIL import Image
    from test_serve import _call, _png
    from transeg.serve.app import create_app

    model, path = segformer
    app = create_app(OnnxModel(path))
    status, _, body = _call(app, "GET", "/v1/model", [("Host", "127.0.0.1:8000")], b"")
    info = json.loads(body)
    assert status == 200 and info["variant"] == model.meta["variant"] and info["classes"] == CLASSES
    assert info["protocol"]["scale"] == [96, 64] and info["isr"]["supported"] is False
    assert info["dtype"] == "onnxruntime fp32" and info["device"] == "cpu"
    rgb = _images(1)[0]
    status, _, body = _call(app, "POST", "/v1/segment", [("Host", "127.0.0.1:8000"),
                                                         ("Content-Type", "image/png")], _png(rgb))
    assert status == 200
    assert _agreement(np.asarray(Image.open(io.BytesIO(body))), model.predict(rgb).labels) >= 0.999


def test_bad_inputs_are_one_line(segformer, tmp_path, capsys, monkeypatch):
    """A corrupt .onnx, calibration data without images, an .onnx asked for bf16 or ISR, and a missing onnxruntime:
    each exits 2 with one `transeg: error:` line naming the file or flag and the fix (4 + 1 cases); an empty
    calibration list given to quantize_int8 is a TransegError, and nothing is written."""
    fp32_file = segformer[1]
    corrupt = tmp_path / "bad.onnx"
    corrupt.write_bytes(b"\x08\x07not a model" * 10)
    (tmp_path / "empty" / "images" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "masks" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "classes.txt").write_text("a\nb\nc\n")
    cases = [
        (["eval", str(corrupt)], "bad.onnx: not an ONNX model onnxruntime can load"),
        (["export", str(fp32_file), str(tmp_path / "q.onnx"), "--int8", "--calibrate", str(tmp_path / "empty")],
         "empty/images/train: no images"),
        (["predict", str(fp32_file), str(tmp_path / "x.png"), "--out", str(tmp_path / "o"), "--dtype", "bf16"],
         "runs in the precision it was exported in"),
        (["eval", str(fp32_file), "--isr-encoder", "2,2,1,1"], "the ISR setting is fixed in an .onnx graph"),
    ]
    from PIL import Image

    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "x.png")
    for argv, message in cases:
        line = _error(capsys, main(argv))
        assert message in line, (argv, line)
    with pytest.raises(transeg.TransegError, match="no calibration images were given"):  # the Python API's form
        quantize_int8(fp32_file, tmp_path / "q.onnx", calibration=[])
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    line = _error(capsys, main(["eval", str(fp32_file)]))
    assert "needs onnxruntime: pip install onnxruntime" in line
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_runtime_runs_without_torch(segformer, tmp_path):
    """runtime.py, copied on its own and run where `import torch` fails (sys.modules['torch'] = None): it segments an
    image and writes its index PNG, equal (100% of pixels: the same numpy code) to OnnxSegmenter in this process."""
    from PIL import Image

    _, path = segformer
    Image.fromarray(_images(1)[0]).save(tmp_path / "p.png")
    (tmp_path / "runtime.py").write_text(RUNTIME.read_text())
    code = ("import sys; sys.modules['torch'] = None; sys.path.insert(0, sys.argv[1]); import runtime; "
            "assert 'transeg' not in sys.modules; sys.exit(runtime.main(sys.argv[2:]))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path), str(path), str(tmp_path / "p.png"),
                           str(tmp_path / "mask.png")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=100)
    assert done.returncode == 0, done.stderr
    assert "%" in done.stdout  # the classes' shares
    expected = OnnxSegmenter(path).labels(str(tmp_path / "p.png"))
    assert (np.asarray(Image.open(tmp_path / "mask.png")) == expected).all()


def test_damaged_metadata_is_one_line_for_quantisation_as_for_the_runtime(segformer, tmp_path, capsys):
    """An .onnx whose transeg metadata is not JSON: `export --int8` (quantisation's reader) and `eval` (the runtime's)
    both exit 2 with the same one line naming the file (runtime.parse_metadata); before, quantisation ended in a
    JSONDecodeError traceback. 2 runs, nothing written."""
    proto = onnx.load(segformer[1])
    for entry in proto.metadata_props:
        if entry.key == "transeg":
            entry.value = '{"num_classes": 6, "mean": [0'
    bad = tmp_path / "badmeta.onnx"
    onnx.save(proto, bad)
    for argv in (["export", str(bad), str(tmp_path / "q.onnx"), "--int8"], ["eval", str(bad)]):
        line = _error(capsys, main(argv))
        assert "badmeta.onnx: its transeg metadata is damaged: export the model again" in line, (argv, line)
    assert not (tmp_path / "q.onnx").exists()


def test_calibration_counts_images_not_windows(segformer, tmp_path, capsys):
    """Static int8 of a file whose protocol is sliding-window (32x32 windows, stride 24: 3x3 windows of each 48x64
    image, aligned to 64x64): 3 images give 27 calibration batches, and the report and the progress bar say 3 images
    (before: the report said min(27 batches, count 8) = 8, and the bar ran past its total to 27)."""
    from transeg.deploy.quantize import calibration_inputs, read_meta

    proto = onnx.load(segformer[1])
    for entry in proto.metadata_props:
        if entry.key == "transeg":
            meta = json.loads(entry.value)
            meta["protocol"] = {"mode": "slide", "crop": [32, 32], "stride": [24, 24], "size_divisor": 32}
            entry.value = json.dumps(meta)
    slide = tmp_path / "slide.onnx"
    onnx.save(proto, slide)
    images = _images(3)
    assert len(list(calibration_inputs(images, read_meta(slide)[1], 3))) == 27  # 9 windows per image
    capsys.readouterr()
    report = quantize_int8(slide, tmp_path / "q.onnx", calibration=images, count=8)  # up to 8: the 3 there are
    assert report["images"] == 3, report
    bar = capsys.readouterr().err
    assert "| 3/8 [" in bar.split("\r")[-1], bar[-500:]  # its last frame (before: "calibrate: 27img [...")


def test_onnx_predict_tiles_as_pytorch_does(segformer, tmp_path, monkeypatch):
    """`serve` passes tile= to the model's predict: an .onnx model (protocol without resize, as the service tiles only
    then) given tile=64 on a 100x100 image runs it in windows (transeg.tiled.labels_of, called once) and gives the
    PyTorch model's predict(image, tile=64) labels on >= 99.9% of pixels (the graph equals PyTorch within 1e-5);
    before, tile fell into **fields and the whole image ran at once. Probabilities with tile: one TransegError."""
    import copy

    from transeg import tiled

    model = copy.deepcopy(segformer[0])
    model.protocol = transeg.Protocol(size_divisor=32)
    proto = onnx.load(segformer[1])
    for entry in proto.metadata_props:
        if entry.key == "transeg":
            entry.value = json.dumps({**json.loads(entry.value), "protocol": model.protocol.to_meta()})
    onnx.save(proto, tmp_path / "plain.onnx")
    backend = OnnxModel(tmp_path / "plain.onnx")
    assert backend.protocol.scale is None
    rgb = np.random.default_rng(2).integers(0, 256, (100, 100, 3), dtype=np.uint8)
    calls = []
    labels_of = tiled.labels_of
    monkeypatch.setattr(tiled, "labels_of", lambda *a, **k: calls.append(a[2]) or labels_of(*a, **k))
    found = backend.predict(rgb, tile=64)
    assert calls == [64] and found.labels.shape == (100, 100)
    assert _agreement(found.labels, model.predict(rgb, tile=64).labels) >= 0.999
    with pytest.raises(transeg.TransegError, match="tiled prediction gives labels only"):
        backend.predict(rgb, tile=64, probabilities=True)


@pytest.mark.parametrize("size,crop,stride", [((1024, 2048), (1024, 1024), (768, 768)), ((300, 200), (512, 512), (341, 341)),
                                              ((517, 931), (256, 384), (170, 255)), ((64, 85), (64, 64), (21, 21))])
def test_the_torch_free_runtime_cuts_the_windows_inference_cuts(size, crop, stride):
    """runtime.slide_windows is a copy of inference.slide_windows (the runtime may not import torch): the same
    boxes for mmseg's grids, images smaller than the crop and uneven strides, so the two back-ends cannot drift."""
    from transeg import inference
    from transeg.deploy import runtime

    assert runtime.slide_windows(*size, crop, stride) == inference.slide_windows(*size, crop, stride)
