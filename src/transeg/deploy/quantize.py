"""int8 quantisation of an exported `.onnx` model with ONNX Runtime's tools, keeping the accuracy.

    quantize_int8("model.onnx", "model-int8.onnx", calibration=["a.jpg", "b.jpg", ...], count=100)  # static
    quantize_int8("model.onnx", "model-int8.onnx")                                                # dynamic

Static (with calibration images): QDQ format, weights int8 per output channel (symmetric), activations uint8
(asymmetric, the u8 x s8 products the CPU's VNNI instructions compute), ranges from min/max over the images.
The images go through the model's own test protocol (keep-ratio resize, alignment, mean/std; the windows of
a sliding-window protocol), so the ranges are those the graph sees when it is used. Only the operators in
`STATIC_OPS` are quantized (convolutions, the weight matrix products, the additions); everything else (LayerNorm,
softmax and the attention products around it, GELU, the decode head's resizes) stays fp32 between them, which is
where int8 loses accuracy or speed: the measurement that chose the set is beside it.

Dynamic (no images): weights int8 ahead of time, activations quantized per call from their own range; only
`DYNAMIC_OPS` (onnxruntime's integer Conv is slower than its fp32 one, so convolutions stay fp32).
"""
import json
import os
import tempfile
from pathlib import Path

from ..errors import TransegError
from ..files import atomic_write, output_file, plain_permissions
from .runtime import parse_metadata, prepare, read_rgb, slide_windows

# Static int8: the operator types quantized, attention's activation x activation MatMuls excepted (see
# `activation_matmuls`). Measured on the quickstart SegFormer-B0 (fp32 mIoU 80.75 under onnxruntime; synthetic val,
# 100 images; 64 calibration images from the train split, min/max), onnxruntime 1.32, one thread of a 2-core
# AMD EPYC with AVX-512 VNNI, CPU time of one 512x512 image (median of 7, the machine shared, so CPU time):
#
#   int8 operators                                   mIoU    ms   note
#   none (fp32)                                      80.75   82
#   Conv, MatMul (weights)                           80.68   65
#   Conv, MatMul (weights), Add                      80.61   57   <- STATIC_OPS
#   Conv, MatMul (weights), Add, Mul                 80.62   58   Mul gains nothing
#   Conv, MatMul (all, attention too)                80.69   94   softmax between int8 MatMuls runs as
#                                                                 QLinearSoftmax: 3x the fp32 softmax
#   Conv, MatMul (all), Add, Mul                     80.62   56
#   + LayerNorm, Softmax, Resize, GELU, ... (all)    80.58   90   the fp32<->int8 conversions around them
#                                                                 cost more than the int8 arithmetic saves
#
# On this synthetic set no choice loses more than 0.2 mIoU; the set keeps in fp32 what the literature finds
# fragile (LayerNorm's statistics, softmax, attention's activation products, the head's resize), which also
# is the fastest of the safe choices. `transeg eval model-int8.onnx` measures a model on its own data.
STATIC_OPS = ("Conv", "MatMul", "Gemm", "Add")
DYNAMIC_OPS = ("MatMul", "Gemm")
# Images calibration reads by default (`--calibration-images`): min/max ranges settle within a few dozen.
DEFAULT_COUNT = 64


def _require():
    try:
        import onnx  # noqa: F401
        from onnxruntime import quantization  # noqa: F401
    except ImportError as e:
        raise TransegError(f"int8 quantization needs {e.name}: pip install 'transeg[onnx]'") from None


def read_meta(path):
    """(onnx.ModelProto, transeg metadata dict) of an `.onnx` file from `transeg export`."""
    import onnx

    try:
        proto = onnx.load(os.fspath(path))
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise TransegError(f"{path}: not a readable ONNX file ({first}); export it again with `transeg export`") \
            from None
    props = {p.key: p.value for p in proto.metadata_props}
    if "transeg" not in props:
        raise TransegError(f"{path}: has no transeg metadata: quantize an .onnx file from `transeg export`")
    meta = parse_metadata(props["transeg"], path)
    if meta.get("precision", "fp32") != "fp32":
        raise TransegError(f"{path}: is already {meta['precision']}; quantize the fp32 export")
    return proto, meta


def calibration_inputs(images, meta, count):
    """The normalised batches [1,3,h,w] (windows of a sliding-window protocol, each its own batch) of the first
    `count` of `images` (paths, PIL images or HxWx3 uint8 arrays) under the file's test protocol."""
    return (x for _, x in _numbered_inputs(images, meta, count))


def _numbered_inputs(images, meta, count):
    """(index of the image, batch) of `calibration_inputs`: a sliding-window protocol gives several batches of one
    image, so the images are counted by their index, not by the batches."""
    protocol = meta.get("protocol") or {}
    for i, image in enumerate(images):
        if i >= count:
            return
        x = prepare(read_rgb(image), protocol, meta["mean"], meta["std"])
        if protocol.get("mode") == "slide":
            for y1, y2, x1, x2 in slide_windows(*x.shape[-2:], protocol["crop"], protocol["stride"]):
                yield i, x[:, :, y1:y2, x1:x2]
        else:
            yield i, x


def _reader(name, numbered, count):
    """The calibration data reader over (image index, batch) pairs; `.images`: the images it has fed (the
    progress bar counts those, up to `count`, not the windows of a sliding-window protocol)."""
    from onnxruntime.quantization import CalibrationDataReader
    from tqdm import tqdm

    class Reader(CalibrationDataReader):
        """Feeds the calibrator one preprocessed image (or window) at a time, with a progress bar of images."""

        def __init__(self):
            self.batches, self.bar, self.images = iter(numbered), tqdm(total=count, desc="calibrate", unit="img"), 0
            self.last = None

        def get_next(self):
            item = next(self.batches, None)
            if item is None:
                self.bar.close()
                return None
            index, x = item
            if index != self.last:  # the first batch of a new image
                self.last = index
                self.images += 1
                self.bar.update(1)
            return {name: x}

    return Reader()


def activation_matmuls(path):
    """Names of the MatMul nodes of the graph at `path` that multiply two activations (attention's Q K^T and
    A V), not an activation by weights: they stay fp32 in static int8 (the table beside STATIC_OPS)."""
    import onnx

    graph = onnx.load(os.fspath(path)).graph
    weights = {i.name for i in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "Constant"}
    return [n.name for n in graph.node if n.op_type == "MatMul" and not any(i in weights for i in n.input)]


def quantize_int8(onnx_in, onnx_out, calibration=None, count=DEFAULT_COUNT, op_types=None, attention_int8=False):
    """Write an int8 copy of the fp32 export `onnx_in` to `onnx_out` (refused when it is `onnx_in`; written whole
    or not at all).

    calibration: images (paths, PIL images, HxWx3 uint8 arrays; the first `count` are used) -> static int8;
    None -> dynamic int8. op_types: the operator types to quantize (default STATIC_OPS / DYNAMIC_OPS).
    attention_int8: quantize attention's activation x activation MatMuls too (slower: the table beside
    STATIC_OPS). The result carries the fp32 file's metadata plus "precision" and "quantized_ops", and is
    checked to load and run under onnxruntime before it is written. Returns a report dict (method, ops,
    fp32_matmuls, images, bytes, path)."""
    _require()
    import onnx
    from onnxruntime import quantization as q

    onnx_out = output_file(onnx_out, example="model-int8.onnx", inputs=[onnx_in])
    proto, meta = read_meta(onnx_in)
    name = proto.graph.input[0].name
    static = calibration is not None
    ops = list(op_types or (STATIC_OPS if static else DYNAMIC_OPS))
    report = {"method": "static" if static else "dynamic", "ops": ops}
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)  # its constant-folding notes about integer nodes are not the user's
    with tempfile.TemporaryDirectory(prefix="transeg-int8-") as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        _pre_process(onnx_in, prepared)
        excluded = [] if attention_int8 else activation_matmuls(prepared)
        report["fp32_matmuls"] = len(excluded)
        common = dict(op_types_to_quantize=ops, weight_type=q.QuantType.QInt8, nodes_to_exclude=excluded)
        if static:
            import itertools

            batches = _numbered_inputs(calibration, meta, count)
            first = next(batches, None)  # before onnxruntime's calibrator, whose own message is "No data is collected"
            if first is None:
                raise TransegError(f"{onnx_out}: no calibration images were given; give --calibrate DATA with images, "
                                   "or leave --calibrate out for dynamic int8")
            reader = _reader(name, itertools.chain([first], batches), count)
            q.quantize_static(str(prepared), str(quantized), reader, quant_format=q.QuantFormat.QDQ,
                              activation_type=q.QuantType.QUInt8, calibrate_method=q.CalibrationMethod.MinMax,
                              per_channel=True, extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
                              **common)
            report["images"] = reader.images
        else:
            # per tensor: onnxruntime's MatMulInteger takes one zero point per weight, not one per channel
            q.quantize_dynamic(str(prepared), str(quantized), per_channel=False, **common)
        out = onnx.load(str(quantized))
        meta.update(precision=f"int8 {report['method']}", quantized_ops=ops,
                    calibration_images=report.get("images"))
        del out.metadata_props[:]
        for key, value in {**{p.key: p.value for p in proto.metadata_props}, "transeg": json.dumps(meta)}.items():
            entry = out.metadata_props.add()
            entry.key, entry.value = key, value

        def write_and_check(path):
            onnx.save(out, path)
            plain_permissions(path)
            report["bytes"] = os.path.getsize(path)
            _smoke(path, name, onnx_out)

        atomic_write(onnx_out, write_and_check)
    report["path"] = str(onnx_out)
    return report


def _pre_process(src, dst):
    """onnxruntime's recommended preparation (shape inference, graph optimisation) before quantizing; where its
    symbolic shape inference cannot follow the graph, the graph is quantized as exported."""
    import shutil

    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:  # symbolic shape inference cannot follow the exporter's dynamic reshapes (and leaves files in the
        # working folder when it gives up): ONNX's own shape inference and onnxruntime's optimiser only
        quant_pre_process(os.fspath(src), os.fspath(dst), skip_symbolic_shape=True)
    except Exception:
        shutil.copyfile(src, dst)


def _smoke(path, name, dest):
    """Load the quantized graph and run it once on a small input: a graph onnxruntime cannot run is refused."""
    import numpy as np
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
        shape = [d if isinstance(d, int) else 64 for d in session.get_inputs()[0].shape]
        session.run(None, {name: np.zeros([1] + shape[1:], np.float32)})
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise TransegError(f"{dest}: the int8 graph does not run under onnxruntime ({first})") from None


def dataset_images(spec, split="train", count=DEFAULT_COUNT):
    """`count` images of the dataset a --data value names (`split`), spread evenly over it, as HxWx3 uint8
    arrays read one at a time: the calibration set of `transeg export --int8 --calibrate DATA`. Calibrating on
    the training split keeps the validation images for measuring the result."""
    import numpy as np

    from ..data import build_dataset

    try:  # now, not when calibration starts: a bad DATA is said before any work
        dataset = build_dataset(spec, split, option="--calibrate")
    except TransegError as e:
        # build_dataset's way out is "leave --calibrate out for the built-in synthetic set"; here leaving it out
        # means dynamic int8, so the synthetic set is named as a --calibrate value
        text = str(e).replace("leave --calibrate out for the built-in synthetic set",
                              "--calibrate synthetic for the built-in synthetic set; leave --calibrate out for "
                              "dynamic int8")
        if text == str(e):
            raise
        raise TransegError(text) from None
    if len(dataset) == 0:
        raise TransegError(f"--calibrate {spec}: its {split} split has no images; give a dataset with images, or "
                           "leave --calibrate out for dynamic int8")
    picked = np.unique(np.linspace(0, len(dataset) - 1, min(count, len(dataset))).round().astype(int))
    return (np.ascontiguousarray(dataset[int(i)]["image"].permute(1, 2, 0).numpy()) for i in picked)


def export_int8(model, onnx_out, calibration=None, count=DEFAULT_COUNT, sample_size=(256, 256), opset=None,
                check=True):
    """Export `model` (a Segmentor) to fp32 ONNX in a temporary folder (`transeg.export.export_onnx`, checked
    against PyTorch), then write its int8 copy to `onnx_out` (`quantize_int8`). Returns (export report,
    quantization report)."""
    from ..export import export_onnx

    onnx_out = output_file(onnx_out, example="model-int8.onnx")
    with tempfile.TemporaryDirectory(prefix="transeg-export-") as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        exported = export_onnx(model, fp32, sample_size=sample_size, opset=opset, check=check)
        return exported, quantize_int8(fp32, onnx_out, calibration, count)
