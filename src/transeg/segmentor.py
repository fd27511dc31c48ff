"""Segmentor = backbone + decode head, with the loss and the prediction entry points."""
import torch
import torch.nn.functional as F
from torch import nn

from . import inference, tiled
from .compiled import CompiledNetwork
from .contracts import Backbone, DecodeHead, IterationHook, LossInputs, mask_scores
from . import isr as isr_module
from .data.palettes import default_palette
from .device import parse_dtype, paths_for, resolve_device
from .layers.shape import round_up
from .errors import TransegError
from .losses import ohem_cross_entropy, upsampled_cross_entropy
from .losses.pixel import is_plain_ce, pixel_loss
from .protocol import Protocol


class Segmentor(nn.Module):
    """`forward(x)` returns logits at the head's stride; `predict(x)` returns full-resolution labels.

    `meta` holds what a checkpoint must carry to rebuild and use the model: variant name and
    constructor arguments, class names, palette, and the normalisation mean/std (0-255 units).
    """

    def __init__(self, backbone: Backbone, decode_head: DecodeHead, num_classes, meta=None):
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.num_classes = num_classes
        self.meta = dict(meta or {})
        self.fused = True  # the blocked loss (losses.upsampled_cross_entropy); layers.fusion.unfused turns it off
        self.compiled = None  # the compiled inference path (optimize_for_inference(compile=True))

    def forward(self, x):
        """Logits (scores, for mask classification) at the head's stride in eval; in training what the
        loss takes: logits, or the head's `LossInputs`."""
        out = self.network(x)
        return mask_scores(out) if self.decode_head.mask_classification and not self.training else out

    def network(self, x):
        """The backbone, then the head: through the compiled path in eval when `optimize_for_inference(compile=True)`
        made one (`transeg.compiled`), else eager."""
        if self.compiled is not None and not self.training:
            return self.compiled(x)
        return self.eager_network(x)

    def eager_network(self, x):
        return self.decode_head(self.backbone(self._to_weight_dtype(x)))

    def train(self, mode=True):
        """As nn.Module.train; training drops the compiled inference path, whose graphs hold frozen weights."""
        if mode:
            self.compiled = None
        return super().train(mode)

    def set_iteration(self, iteration):
        """The training hook (`contracts.IterationHook`): tell every part that declares it that `iteration`
        optimizer steps are done, before the next one runs."""
        for module in self.modules():
            if isinstance(module, IterationHook):
                module.set_iteration(iteration)

    def _to_weight_dtype(self, x):
        """Inputs follow native low-precision weights (optimize_for_inference(torch.bfloat16))."""
        if x.dtype != self.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.dtype)
        return x

    @property
    def dtype(self):
        """The weights' floating dtype (float32 unless cast for inference)."""
        return next(p.dtype for p in self.parameters() if p.is_floating_point())

    def optimize_for_inference(self, dtype=None, compile=False, device=None, log=None):
        """eval(), then optionally:

        device: move the model there ("cuda", "cpu", "auto" = cuda when available).
        dtype (torch.bfloat16 / float16, or "bf16" / "fp16"; None or "fp32" keep fp32): weights cast to
        it, so the whole network runs natively in that precision, which on AMX CPUs and tensor-core
        GPUs beats autocast (no per-call weight casts, half the memory traffic in the element-wise
        ops). Inputs are cast on entry; scores come back float32 from `logits`/`predict`.
        (Mask2Former's deformable attention keeps its sampling positions and bilinear sampling in
        fp32 either way.)
        compile: the compiled inference path (`transeg.compiled`): the backbone and head through torch.compile with
        the device's options (`device.Paths`: inductor with weight freezing; CUDA graphs on a GPU), one graph per
        size bucket and batch bucket, at most `compiled.MAX_GRAPHS`, for the precision and ISR setting the model has
        now (calls under another ISR setting run eager). The first call in a bucket compiles (a
        one-off wait, told to `log` with its seconds); later calls reuse the graph. Weights must not change after
        (`train()` drops the path).

        dtype and compile "auto": what the device serves with (`device.Paths.serving_dtype`, `compile_serving`).

        fp32 needs no call to be fast: the decoders' algebraic fusion (layers/fusion.py) always runs,
        as it computes the same function from the weights as they are. Returns self."""
        self.eval()
        if device is not None:
            self.to(resolve_device(device))
        weight = next(p for p in self.parameters() if p.is_floating_point())  # its dtype follows the casts below
        paths = paths_for(weight.device)
        dtype = paths.serving_dtype if dtype == "auto" else parse_dtype(dtype)
        compile = paths.compile_serving if compile == "auto" else compile
        if dtype is not None and dtype != torch.float32:
            self.to(dtype)
        self.compiled = None
        if compile:
            isr = isr_module.setting_reader(self)
            self.compiled = CompiledNetwork(self.eager_network, self.backbone.pad_multiple, self.decode_head.stride,
                                            weight.device, state=lambda: (weight.dtype, isr()), log=log)
        return self

    def padded_size(self, size):
        """`size` rounded up to the backbone's `pad_multiple` (the size it really runs at)."""
        m = self.backbone.pad_multiple
        return (round_up(size[0], m), round_up(size[1], m))

    def upsample_logits(self, logits, size):
        """Head-stride logits -> `size` (bilinear, align_corners=False). A backbone that zero-pads its
        input to a multiple (`pad_multiple`: the plain ViT) gets its logits upsampled to the padded
        size and cropped, as Segmenter does, so the padding never shifts the predictions."""
        padded = self.padded_size(size)
        if tuple(logits.shape[-2:]) != padded:
            logits = F.interpolate(logits, size=padded, mode="bilinear", align_corners=False)
        return logits[..., :size[0], :size[1]]

    @property
    def outputs_probabilities(self):
        """True when the head's scores are already probabilities (mask classification: Mask2Former, EoMT),
        so multi-scale inference averages them as they are instead of through a softmax."""
        return self.decode_head.mask_classification

    def logits(self, x):
        """Scores at the input size: `upsample_logits(self(x))`, or, for heads that decide at full
        resolution (mask classification: mask logits are upsampled before their sigmoid), `mask_scores` at
        the padded size, cropped."""
        size = x.shape[-2:]
        if not self.decode_head.mask_classification:
            return self.upsample_logits(self(x).float(), size)
        prediction = self.network(x)
        return mask_scores(prediction, self.padded_size(size)).float()[..., :size[0], :size[1]]

    def loss(self, logits, label, ignore_index=255, reduction="all", ohem=None, terms=None):
        """CE on logits upsampled (bilinear, align_corners=False) to the label size, or the head's own
        loss for heads that return several outputs in training (SegViT, SeMask). `ohem`: mmseg's
        OHEMPixelSampler settings, e.g. {"thresh": None, "min_kept": 100000}. `terms`: a weighted sum of
        pixel losses instead of CE (`losses.pixel.check_terms`: class-weighted CE, Dice, Focal, Lovász),
        with class weights given as numbers."""
        if isinstance(logits, LossInputs):
            if not is_plain_ce(terms):
                raise TransegError(f"{self.meta.get('variant', 'this model')}: its head trains with its own loss "
                                   "(mask classification); the loss setting applies to per-pixel heads only")
            return self.decode_head.loss(logits, label, ignore_index=ignore_index, reduction=reduction, ohem=ohem)
        if not is_plain_ce(terms):
            return pixel_loss(terms, self.upsample_logits(logits, label.shape[-2:]), label, ignore_index, reduction)
        if ohem:
            logits = self.upsample_logits(logits, label.shape[-2:])
            ce = ohem_cross_entropy(logits.float(), label, ignore_index=ignore_index, reduction=reduction, **ohem)
        else:  # = cross_entropy(upsample_logits(logits).float(), label), without the full-size logits
            ce = upsampled_cross_entropy(logits, label, ignore_index, reduction, self.padded_size(label.shape[-2:]),
                                         blocked=self.fused)
        return {"loss": ce, "loss_ce": ce}

    @torch.no_grad()
    def predict(self, inputs, protocol=None, probabilities=False, isr=None, batch_size=1, out_size=None,
                confidence=False, tile=None, overlap=None, **fields):
        """Segment images, under the checkpoint's test protocol unless `protocol` is given.

        inputs: an image path, a PIL image or an HxWx3 uint8 RGB array -> a `Segmentation` (label map
        at the image's own size, `.overlay()`, `.mask()`, `.shares()`); a list of them -> a list.
        confidence: also the winning class's probability per pixel (`.confidence`). probabilities: also
        the class probabilities [K,H,W] (K x H x W floats: within inference.MAX_SCORE_BYTES). isr: an ISR
        setting for this call only, e.g. {"encoder": (2, 2, 1, 1), "decoder": (2, 2, 2)}. batch_size: images
        of one size run together. Runs on the model's device and precision (`optimize_for_inference`).

        tile: segment each image in windows of `tile` pixels overlapping by `overlap` (default: an eighth of them),
        blended without seams, at the image's own resolution (no protocol resize): for images far larger than
        the model was trained on, with memory bounded by the window (`transeg.tiled`; files that do not fit in
        memory: `predict_file`). Labels only.

        A normalised tensor batch [N,3,H,W] -> the label map tensor [N,H,W] at `out_size` (default: its
        size); `fields` (mode, crop, stride, scales, flip, ...) change the protocol, see `inference.normalised_scores`.
        """
        with isr_module.isr_setting(self, isr):
            if isinstance(inputs, torch.Tensor):
                return inference.normalised_labels(self, inputs, protocol, out_size=out_size, **fields)[0]
            return tiled.predict_images(self, inputs, protocol, probabilities, batch_size, confidence, tile, overlap)

    def predict_file(self, source, out, preview=None, **options):
        """Segment an image file of any size (GeoTIFF, TIFF, OME / SVS slide...) disk to disk, in tiles: a label
        TIFF at its full resolution keeping its georeferencing, and a preview PNG; see `tiled.predict_file` for
        the options (window, overlap, scale, gsd, level, resume...). Returns a `tiled.TiledPrediction`."""
        return tiled.predict_file(self, source, out, preview, **options)

    def set_isr(self, encoder=None, decoder=None):
        """Inference spatial reduction: pool keys/values `encoder[i]` / `decoder[j]` times harder than
        trained, without touching weights; `set_isr()` resets. See `transeg.isr`."""
        return isr_module.set_isr(self, encoder, decoder)

    @property
    def isr(self):
        """The current ISR multipliers, {"encoder": (...), "decoder": (...)}."""
        return isr_module.get_isr(self)

    @property
    def classes(self):
        return self.meta.get("classes") or [str(i) for i in range(self.num_classes)]

    @property
    def palette(self):
        """One RGB colour per class: the checkpoint's, else the VOC scheme."""
        return [tuple(c) for c in (self.meta.get("palette") or default_palette(self.num_classes))]

    @property
    def protocol(self):
        """The test protocol the checkpoint stores (how its numbers were measured), else whole-image
        at the input size aligned to 32. See `transeg.protocol.Protocol`."""
        return Protocol.from_meta(self.meta.get("test"))

    @protocol.setter
    def protocol(self, protocol):
        self.meta["test"] = protocol.to_meta()
