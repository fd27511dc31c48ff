"""The ONNX Runtime back-end for transeg's own inference, evaluation and service.

`OnnxModel` wraps an exported `.onnx` file (fp32 or int8) in the contract `transeg.inference` drives every
model through (`logits(x)` at the input size, `protocol`, `meta` with mean/std, classes, palette,
`num_classes`, `outputs_probabilities`, `predict`), so `transeg predict`, `eval` and `serve` run it unchanged:
each forward pass is one `session.run` on the CPU, and resizing, windows, averaging and the blocked argmax stay
PyTorch's, exactly as for the `.safetensors` model. `load_model` picks the back-end from `backend` or the suffix.

The graph fixes what PyTorch leaves to the caller: its precision (fp32, or int8 from `transeg export --int8`)
and its ISR setting (chosen at export); asking for another is one line naming what to do instead. Threads:
onnxruntime runs with torch's thread count (`--threads`, OMP_NUM_THREADS), so both back-ends use the same cores.

For a deployment without torch, see `transeg.deploy.runtime` (numpy + Pillow + onnxruntime only).
"""
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import inference, isr as isr_module, tiled
from ..errors import TransegError
from ..protocol import Protocol
from .runtime import open_session

BACKENDS = ("auto", "pytorch", "onnxruntime")


class _Baked(nn.Module):
    """Stands for the backbone / decode head inside the graph: no attention pools that ISR could change."""

    def isr_pools(self):
        return []


class OnnxModel(nn.Module):
    """An `.onnx` file from `transeg export`, driven by transeg's PyTorch inference code through onnxruntime."""

    def __init__(self, path, threads=None):
        super().__init__()
        self.path = str(path)
        self.session, self.meta = open_session(path, threads or torch.get_num_threads())
        self.meta.setdefault("variant", Path(self.path).stem)
        self.meta["model_args"] = self.meta.get("model_args") or {}  # files from before they were stored
        self.meta["test"] = self.meta.get("protocol")
        self.num_classes = int(self.meta["num_classes"])
        self.input = self.session.get_inputs()[0].name
        self.precision = self.meta.get("precision", "fp32")  # "int8 static" / "int8 dynamic" from --int8
        self.backbone, self.decode_head = _Baked(), _Baked()
        # the device and dtype inference reads from a model's parameters: inputs are float32 on the CPU
        self.anchor = nn.Parameter(torch.zeros(0), requires_grad=False)
        # the graph's identity in the state dict, which stands for the weights where a digest of them is taken
        # (a tiled job resumes only with the model that began it: tiled.weights_digest)
        self.register_buffer("graph_digest", torch.frombuffer(bytearray(_file_digest(self.path)), dtype=torch.uint8))

    def forward(self, x):
        """The graph's output [N,K,h/s,w/s] for a normalised batch (float32 on the CPU)."""
        out = self.session.run(None, {self.input: x.detach().float().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(out)

    def logits(self, x):
        """Scores at the input size, as Segmentor.logits: upsampled to the padded size and cropped. Mask
        classification graphs output probabilities, which are upsampled as they are (PyTorch upsamples the mask
        logits before their sigmoid, so labels near class borders may differ)."""
        h, w = x.shape[-2:]
        m = int(self.meta.get("pad_multiple") or 1)
        padded = (-(-h // m) * m, -(-w // m) * m)
        out = self(x)
        if tuple(out.shape[-2:]) != padded:
            out = F.interpolate(out, size=padded, mode="bilinear", align_corners=False)
        return out[..., :h, :w]

    @property
    def outputs_probabilities(self):
        return bool(self.meta.get("mask_classification"))

    @property
    def dtype(self):
        """What runs, for display (the service's /v1/model): e.g. "onnxruntime int8 static". Not a torch dtype:
        inputs and scores are float32 whatever the graph computes in."""
        return f"onnxruntime {self.precision}"

    @property
    def classes(self):
        return list(self.meta.get("classes") or [str(i) for i in range(self.num_classes)])

    @property
    def palette(self):
        from .runtime import _voc_palette

        return [tuple(c) for c in self.meta.get("palette") or _voc_palette(self.num_classes)]

    @property
    def protocol(self):
        return Protocol.from_meta(self.meta.get("test"))

    @protocol.setter
    def protocol(self, protocol):
        self.meta["test"] = protocol.to_meta()

    @property
    def isr(self):
        """The ISR setting the graph was exported with (fixed in it)."""
        return {k: tuple(v) for k, v in (self.meta.get("isr") or {}).items()}

    def set_isr(self, encoder=None, decoder=None):
        """ISR is fixed in the graph at export: anything but 'as exported' is refused in one line."""
        if isr_module.is_default({"encoder": tuple(encoder or ()), "decoder": tuple(decoder or ())}):
            return self
        raise TransegError(f"{self.path}: the ISR setting is fixed in an .onnx graph when it is exported "
                           f"({isr_module.describe(self.isr)}): export the checkpoint again with --isr-encoder / "
                           "--isr-decoder")

    def optimize_for_inference(self, dtype=None, compile=False, device=None, log=None):
        """The graph runs as exported, on the CPU: fp32 (or None, or "auto") and device cpu / auto are accepted;
        anything else is one line saying how to get it. compile "auto" is no compile here."""
        if dtype not in (None, "auto", "fp32", torch.float32):
            raise TransegError(f"{self.path}: an .onnx model runs in the precision it was exported in; for a faster "
                               "CPU model export it with --int8 (`transeg export MODEL out.onnx --int8`)")
        if device not in (None, "auto", "cpu"):
            raise TransegError(f"{self.path}: the onnxruntime back-end runs on the CPU; use --device cpu, or the "
                               ".safetensors checkpoint for {device}")
        if compile and compile != "auto":
            raise TransegError(f"{self.path}: --compile is for PyTorch models; onnxruntime optimises the graph itself")
        return self.eval()

    @torch.no_grad()
    def predict(self, inputs, protocol=None, probabilities=False, isr=None, batch_size=1, out_size=None,
                confidence=False, tile=None, overlap=None, **fields):
        """As Segmentor.predict (images -> Segmentation(s); a normalised batch -> labels [N,H,W]). tile: each image
        in windows of `tile` pixels overlapping by `overlap` (`transeg.tiled.labels_of`, labels only), as there."""
        if isr:
            self.set_isr(**isr)
        if isinstance(inputs, torch.Tensor):
            return inference.normalised_labels(self, inputs, protocol, out_size=out_size, **fields)[0]
        return tiled.predict_images(self, inputs, protocol, probabilities, batch_size, confidence, tile, overlap)

    def predict_file(self, source, out, preview=None, **options):
        """A large image file segmented in tiles, disk to disk (`transeg.tiled.predict_file`), on onnxruntime."""
        return tiled.predict_file(self, source, out, preview, **options)


def _file_digest(path):
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.digest()


def is_onnx(source, backend="auto"):
    """True when `source` runs on onnxruntime: backend "onnxruntime", or "auto" and a `.onnx` file name."""
    if backend not in BACKENDS:
        raise TransegError(f"--backend {backend}: choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return str(source).lower().endswith(".onnx")
    if backend == "pytorch" and str(source).lower().endswith(".onnx"):
        raise TransegError(f"{source}: an .onnx file runs on onnxruntime (--backend onnxruntime or auto), not PyTorch")
    return backend == "onnxruntime"


def load_model(source, backend="auto"):
    """An `OnnxModel` for an `.onnx` file (or backend "onnxruntime"), else the PyTorch model `transeg.load`
    gives for `source` (a file, zoo name or Hub repo id)."""
    if is_onnx(source, backend):
        return OnnxModel(source)
    from ..zoo import load

    return load(source)
