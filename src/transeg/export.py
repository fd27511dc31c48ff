"""ONNX export with dynamic batch, height and width, checked against PyTorch by onnxruntime.

    transeg export model.safetensors model.onnx [--isr-encoder 2,2,1,1 --isr-decoder 2,2,2]

The graph maps a normalised image batch `image` [N, 3, H, W] (any N, H, W) to `logits`
[N, K, H/s, W/s] at the head's stride s, like `model(x)`. What a runtime needs around it —
class names, palette, mean/std (0-255 units), stride, the ISR setting the graph was traced with
and the test protocol (the input-size rule: keep-ratio resize, size divisor, whole / sliding
window; `protocol`, `Protocol.to_meta`'s form, and `protocol_text`) — is stored in the file's
metadata_props under "transeg" (JSON); "test_protocol" holds the protocol as one readable line.

The trace size (`sample_size`, the CLI's --size) is at most `MAX_TRACE_SIDE` (4096) pixels per side: the
graph is traced and checked on a few random images of about that size, and a dynamic graph runs at any
size afterwards, so nothing is gained by tracing larger; a larger size is refused before the model is traced.
"""
import contextlib
import io
import json
import logging
import os
import warnings

import torch

from .files import atomic_write
from .errors import TransegError
from .isr import describe

MAX_TRACE_SIDE = 4096


def _require(*modules):
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            raise TransegError(f"ONNX export needs {name}: pip install 'transeg[onnx]'") from None


def slow_to_trace(model):
    """True when a dynamic-size trace is slow: Swin backbones, whose every stage pads to whole windows
    from the symbolic sizes, so the tracer reasons symbolically about every padding, mask and merge."""
    from .backbones.swin import SwinTransformer

    return isinstance(model.backbone, SwinTransformer)


def check_trace_size(sample_size):
    """TransegError (one line) unless `sample_size` is (H, W) of whole numbers 1..MAX_TRACE_SIDE."""
    h, w = sample_size
    if not all(isinstance(v, int) and 1 <= v <= MAX_TRACE_SIDE for v in (h, w)):
        raise TransegError(f"--size {h}x{w}: the trace size is at most {MAX_TRACE_SIDE}x{MAX_TRACE_SIDE} (the graph "
                           f"runs at any size afterwards; 256x256 is the default)")


def export_onnx(model, path, sample_size=(256, 256), opset=None, check=True, atol=1e-4, static=False):
    """Export `model` (a Segmentor, in eval mode, with its current ISR) to `path`; with `check`, run
    onnxruntime and PyTorch on inputs of two other shapes and compare. Returns a report dict.
    static=True fixes the graph to one image of `sample_size` (and checks it there); it traces quickly,
    with no symbolic shape reasoning, which a dynamic Swin (SeMask) trace spends most of its time on."""
    from .files import output_file, plain_permissions

    check_trace_size(sample_size)
    _require("onnx", "onnxscript")
    path = output_file(path, example="model.onnx")  # a folder, or a folder that cannot be written: said now
    model = model.eval().float()
    stride = model.decode_head.stride
    protocol = model.protocol
    meta = {"variant": model.meta.get("variant"), "num_classes": model.num_classes, "classes": model.classes,
            "palette": [list(c) for c in model.palette], "mean": model.meta.get("mean"), "std": model.meta.get("std"),
            # what a runtime needs to turn the output into scores at the input size as Segmentor.logits does,
            # and what the service needs to count GFLOPs and find the evaluation data (transeg.deploy)
            "pad_multiple": model.backbone.pad_multiple, "mask_classification": model.outputs_probabilities,
            "model_args": model.meta.get("model_args"), "dataset": model.meta.get("dataset"),
            "stride": stride, "isr": {k: list(v) for k, v in model.isr.items()}, "input": "image [N,3,H,W] normalised",
            "output": "logits [N,K,H/stride,W/stride]", "static_size": list(sample_size) if static else None,
            # how the model's reported numbers were measured, i.e. what to do to an image before the graph:
            # keep-ratio resize into `scale`, sizes rounded up to `size_divisor`, whole image or windows
            "protocol": protocol.to_meta(), "protocol_text": protocol.describe(),
            "preprocess": "RGB, resized as `protocol` says, (pixel - mean) / std with mean/std in 0-255 units, "
                          "NCHW float32; argmax over K of the logits upsampled (bilinear) to the image's size"}
    # batch 2 in the example so that torch.export keeps the batch dimension symbolic (1 would specialise it)
    x = torch.randn(1 if static else 2, 3, *sample_size)
    auto = torch.export.Dim.AUTO
    dynamic = None if static else {"x": {0: auto, 2: auto, 3: auto}}
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the exporter warns about torchvision ops it cannot register
    try:
        # the exporter prints its progress and deprecation notices; the report says what matters
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (x,), dynamic_shapes=dynamic,
                                        input_names=["image"], output_names=["logits"], opset_version=opset,
                                        dynamo=True, verbose=False, optimize=True)
        proto = program.model_proto
    except TransegError:
        raise
    except Exception as e:  # the exporter's errors are pages long; keep the first line and say what usually helps
        first = str(e).strip().splitlines()[0].replace("\x1b[96m", "").replace("\x1b[0m", "")[:200]
        hint = ("; a larger --size often helps (feature or key/value maps of size 1 cannot stay dynamic)"
                if "step 1/3" in first else
                "; this model does not export to ONNX yet" if static else
                "; this model does not export to ONNX with dynamic sizes yet (--static may)")
        raise TransegError(f"{path}: ONNX export failed at trace size {sample_size[0]}x{sample_size[1]} ({first}){hint}") from None
    finally:
        quiet.setLevel(level)
    for key, value in (("transeg", json.dumps(meta)), ("test_protocol", protocol.describe())):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    report = {"path": str(path), "opset": proto.opset_import[0].version, "isr": describe(model.isr)}

    def write_and_check(tmp):
        import onnx

        onnx.save(proto, tmp)
        plain_permissions(tmp)
        report["bytes"] = os.path.getsize(tmp)
        if check:
            report["max_abs_diff"] = _check(model, tmp, sample_size, atol, path, static)

    # tracing succeeded: what fails from here is the disk (one line naming the file, nothing left behind)
    # or the check; only a complete, checked file replaces the destination
    atomic_write(path, write_and_check)
    return report


def _check(model, onnx_path, sample_size, atol, dest, static=False):
    """Max |onnxruntime - PyTorch| over two input shapes other than the traced one (batch 1 and 3,
    odd sizes), so dynamic shapes are exercised, or two fresh inputs of the traced shape for a static
    graph; raises when it exceeds `atol`."""
    _require("onnxruntime")
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    h, w = sample_size
    worst = 0.0
    shapes = ((1, 3, h, w),) * 2 if static else ((1, 3, h + 32, w - 32 + 5), (3, 3, h - 32 + 7, w + 64))
    for seed, shape in enumerate(shapes):
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            expected = model(x).numpy()
        try:
            got = session.run(None, {"image": x.numpy()})[0]
        except Exception as e:
            first = str(e).strip().splitlines()[0][:160]
            raise TransegError(f"{dest}: the exported graph runs at the traced size but not at {tuple(shape)} ({first}): "
                               "part of this model is fixed to the trace size, so it does not export with dynamic "
                               "sizes yet") from None
        if got.shape != expected.shape:
            raise TransegError(f"{dest}: onnxruntime gives shape {got.shape} for input {shape}, PyTorch {expected.shape}")
        worst = max(worst, float(abs(got - expected).max()))
    if worst > atol:
        raise TransegError(f"{dest}: ONNX check failed: onnxruntime differs from PyTorch by {worst:.2e} (> {atol:g})")
    return worst
