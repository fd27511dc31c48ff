"""ONNX export: dynamic batch/height/width, ISR baked in, equal to PyTorch under onnxruntime."""
import json

import numpy as np
import pytest
import torch

import transeg
from conftest import TINY, TINY_EDAFORMER
from transeg.cli import main

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")


def test_export_with_isr_matches_pytorch_at_other_shapes(tmp_path, capsys):
    model = transeg.create_model("edaformer-t", num_classes=4, classes=["a", "b", "c", "d"], **TINY_EDAFORMER).eval()
    transeg.save(model, tmp_path / "m.safetensors")
    out = tmp_path / "m.onnx"
    assert main(["export", str(tmp_path / "m.safetensors"), str(out), "--size", "128x128",
                 "--isr-encoder", "2,2,1,1", "--isr-decoder", "2,2,2"]) == 0
    printed = capsys.readouterr().out
    assert "ISR encoder 2,2,1,1 / decoder 2,2,2; onnxruntime vs PyTorch" in printed

    meta = json.loads({p.key: p.value for p in onnx.load(out).metadata_props}["transeg"])
    assert meta["isr"] == {"encoder": [2, 2, 1, 1], "decoder": [2, 2, 2]} and meta["classes"] == ["a", "b", "c", "d"]
    assert meta["stride"] == 8 and meta["mean"] == list(model.meta["mean"])
    # what transeg.deploy needs beyond the graph: the resolved palette (4 colours), no input padding to crop,
    # per-pixel logits (not mask probabilities), and the arguments the service's GFLOPs twin is built from
    assert len(meta["palette"]) == 4 and meta["pad_multiple"] == 1 and meta["mask_classification"] is False
    assert meta["model_args"] == model.meta["model_args"] and "dataset" in meta

    # an independent check at a batch and size the exporter never saw (odd, not a multiple of 32)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 161, 203)
    model.set_isr(encoder=(2, 2, 1, 1), decoder=(2, 2, 2))
    with torch.no_grad():
        expected = model(x).numpy()
        plain = model.set_isr()(x).numpy()
    got = session.run(None, {"image": x.numpy()})[0]
    assert got.shape == expected.shape == (2, 4, 21, 26)
    assert np.abs(got - expected).max() <= 1e-4
    assert np.abs(got - plain).max() > 1e-3  # the graph really has the ISR pooling in it


def test_export_refuses_other_suffixes(tmp_path, capsys):
    model = transeg.create_model("edaformer-t", num_classes=2, **TINY_EDAFORMER)
    transeg.save(model, tmp_path / "m.safetensors")
    assert main(["export", str(tmp_path / "m.safetensors"), str(tmp_path / "m.pt")]) == 2
    assert "m.pt: the output must be an .onnx file" in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists()


def test_segformer_exports_with_dynamic_sizes(tmp_path):
    """SegFormer (tiny MiT, sr ratios 8/4/2/1 as in B0-B5): overlapping patch embeddings and the
    spatial-reduction convs take any size, so the graph traced at 128x128 runs at the two other shapes
    export_onnx checks (odd ones included) within 1e-4 of PyTorch."""
    from transeg.export import export_onnx

    model = transeg.create_model("segformer-b0", num_classes=3, **TINY).eval()
    report = export_onnx(model, tmp_path / "m.onnx", sample_size=(128, 128))
    assert report["max_abs_diff"] <= 1e-4


@pytest.mark.parametrize("name,kwargs", [
    ("segmenter-vit-t16-mask", dict(embed_dim=32, depth=1, num_heads=1, crop=64, decoder_depth=1)),
    ("segvit-vit-b16", dict(embed_dim=32, depth=3, num_heads=1, out_indices=[0, 1, 2], head_dim=16, head_heads=1, crop=64)),
])
def test_plain_vit_families_export_with_dynamic_sizes(name, kwargs, tmp_path):
    """The ViT pads to the patch and resizes its position embeddings in the exported graph too (at the
    trace size both are no-ops that eager code skips), so other sizes -- odd ones included -- run."""
    from transeg.export import export_onnx

    model = transeg.create_model(name, num_classes=3, **kwargs).eval()
    report = export_onnx(model, tmp_path / "m.onnx", sample_size=(128, 128))
    assert report["max_abs_diff"] <= 1e-4


def _semask(name, tmp_path, **kw):
    model = transeg.create_model(name, num_classes=3, embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8),
                                 window_size=7, **kw)
    transeg.save(model, tmp_path / "m.safetensors")
    return tmp_path / "m.safetensors"


M2F_TINY = dict(hidden_dim=64, enc_layers=1, enc_ffn_dim=64, dec_layers=3, dec_ffn_dim=64, num_queries=4)


@pytest.mark.parametrize("name,kw", [
    ("semask-swin-t-fpn", dict(channels=32)),
    pytest.param("semask-swin-l-mask2former", M2F_TINY, marks=pytest.mark.slow),  # 95 s of tracing
], ids=["fpn", "mask2former"])
def test_semask_exports_with_dynamic_sizes(tmp_path, capsys, name, kw):
    """Swin's window padding, shifted-window masks and odd-side patch merging are all computed from the
    symbolic sizes: traced at 200x296 (padding to the window in every stage), the graph equals PyTorch
    (<= 1e-4) at batch 1 and 3, odd sizes, a size with no padding anywhere (224² = 7·32) and a small one
    whose last three stages are one window (33x45: stages 9x12, 5x6, 3x3, 2x2), where slicing the shifted
    regions would have fixed the sizes to the trace's."""
    ckpt = _semask(name, tmp_path, **kw)
    out = tmp_path / "m.onnx"
    assert main(["export", str(ckpt), str(out), "--size", "200x296"]) == 0
    assert "onnxruntime vs PyTorch on two other input shapes: max |diff|" in capsys.readouterr().out
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    model = transeg.load(ckpt).eval()
    for shape in [(1, 3, 224, 224), (3, 3, 97, 131), (1, 3, 33, 45)]:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[2]))
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run(None, {"image": x.numpy()})[0]
        assert got.shape == expected.shape and got.shape[:2] == (shape[0], 3)
        assert np.abs(got - expected).max() <= 1e-4, shape


@pytest.mark.parametrize("name,kw,size", [
    ("semask-swin-t-fpn", dict(channels=32), "200x296"),  # 200x296: padding to the window in every stage
    ("semask-swin-l-mask2former", M2F_TINY, "128x160"),
], ids=["fpn", "mask2former"])
def test_semask_static_export_matches_pytorch(tmp_path, capsys, name, kw, size):
    """--static: a graph for one image of the traced size, equal to PyTorch under onnxruntime (1e-4)."""
    ckpt = _semask(name, tmp_path, **kw)
    assert main(["export", str(ckpt), str(tmp_path / "m.onnx"), "--static", "--size", size]) == 0
    assert "onnxruntime vs PyTorch on two fresh inputs: max |diff|" in capsys.readouterr().out
    h, w = (int(v) for v in size.split("x"))
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(1, 3, h, w)
    model = transeg.load(ckpt).eval()
    with torch.no_grad():
        expected = model(x).numpy()
    assert np.abs(session.run(None, {"image": x.numpy()})[0] - expected).max() <= 1e-4
    meta = json.loads({p.key: p.value for p in onnx.load(tmp_path / "m.onnx").metadata_props}["transeg"])
    assert meta["static_size"] == [h, w]


@pytest.mark.parametrize("name", ["eomt-dinov2-l16", "eomt-dinov3-l16"])
def test_eomt_static_export_matches_pytorch(name, tmp_path):
    """EoMT (tiny: width 64, 4 blocks, 10 queries in the last 2, 4 registers) as released: no masked attention
    at inference (attn_mask_probs 0), so the graph is the plain ViT (DINOv3: with its rotary position embeddings,
    computed in the graph from the traced grid) plus the mask module. A static 64x64 graph (one window of the
    authors' windowed test) equals PyTorch under onnxruntime within 1e-4 (measured: 8e-7 / 6e-7 on scores in
    [0, 1]); the output is the semantic scores (probabilities), at stride 4."""
    from transeg.export import export_onnx

    model = transeg.create_model(name, num_classes=5, embed_dim=64, depth=4, num_heads=4, crop=64,
                                 num_queries=10, query_blocks=2, mask_annealing=None).eval()
    report = export_onnx(model, tmp_path / "m.onnx", sample_size=(64, 64), static=True)
    assert report["max_abs_diff"] <= 1e-4
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x).numpy()
    got = session.run(None, {"image": x.numpy()})[0]
    assert got.shape == expected.shape == (1, 5, 16, 16)
    assert np.abs(got - expected).max() <= 1e-4


@pytest.mark.parametrize("size,fragment", [
    ("99999999x99999999", "at most 65535 pixels per side"),   # the case: refused by the argument parser
    ("70000", "at most 65535 pixels per side"),
    ("4097x64", "at most 4096x4096"),                          # export's own bound: refused before the trace
    ("64x5000", "at most 4096x4096"),
])
def test_export_size_past_its_bound_is_one_line(tiny_ckpt, tmp_path, capsys, size, fragment):
    """`export --size` beyond its stated bound (4096 per side; 65535 for any HxW argument) is one line, exit 2, no
    file written, no trace."""
    with pytest.raises(SystemExit) if "65535" in fragment else _no_exit():
        code = main(["export", str(tiny_ckpt), str(tmp_path / "m.onnx"), "--size", size])
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err, err
    assert "65535" in fragment or code == 2
    assert not (tmp_path / "m.onnx").exists()


def _no_exit():
    import contextlib

    return contextlib.nullcontext()
