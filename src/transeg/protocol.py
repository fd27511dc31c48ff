"""The test protocol: how a model's released numbers were measured, as one small typed value.

    Protocol(mode="slide", crop=(1024, 1024), stride=(768, 768), scale=(2048, 1024), size_divisor=None)

A checkpoint stores its protocol in its metadata ("test"); `Segmentor.protocol` reads it with
`Protocol.from_meta` and writes it with `Protocol.to_meta`, the only two places that know the stored
form (a dict of JSON values, as checkpoints have always held it). Converters build the authors'
protocol, training builds the recipe's, and evaluation, prediction and the service run it.
"""
import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from .errors import TransegError

# `transeg eval --ms` for a checkpoint that stores no multi-scale test: mmseg's common ratios + flip
DEFAULT_MS_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def _pair(value, what):
    if value is None:
        return None
    pair = tuple(int(v) for v in value)
    if len(pair) != 2 or min(pair) <= 0:
        raise TransegError(f"test protocol: {what} must be two positive sizes (h, w), got {list(value)}")
    return pair


@dataclass(frozen=True)
class Protocol:
    """mode: "whole" (one pass over the image) or "slide" (windows of `crop` every `stride`, (h, w)).
    scale: keep-ratio resize of the image into (long, short) before inference (None: original size).
    size_divisor: each (scaled) size rounded up to a multiple of it (SegFormer's aligned resize).
    scales, flip: test-time augmentation, ratios of the resized size; several, or flip, average the
    softmax probabilities. min_short_side: a scaled image whose short side is below it is enlarged to
    it first (Segmenter's and SegViT's rule: windows never exceed the image).
    ms_scales, ms_flip: the paper's multi-scale + flip test, which `multi_scale()` switches to."""

    mode: str = "whole"
    crop: Optional[tuple] = None
    stride: Optional[tuple] = None
    scale: Optional[tuple] = None
    size_divisor: Optional[int] = 32
    scales: tuple = (1.0,)
    flip: bool = False
    min_short_side: Optional[int] = None
    ms_scales: Optional[tuple] = None
    ms_flip: bool = True

    def __post_init__(self):
        if self.mode not in ("whole", "slide"):
            raise TransegError(f"test protocol: mode must be 'whole' or 'slide', got {self.mode!r}")
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen: normalise once, here)
        for key in ("crop", "stride", "scale"):
            set_(key, _pair(getattr(self, key), key))
        if self.mode == "slide" and (self.crop is None or self.stride is None):
            raise TransegError("test protocol: sliding-window inference needs a crop and a stride (--crop, --stride)")
        for key in ("scales", "ms_scales"):
            value = getattr(self, key)
            if value is not None:
                value = tuple(float(s) for s in value)
                if not value or not all(math.isfinite(s) and s > 0 for s in value):  # nan > 0 is False too
                    raise TransegError(f"test protocol: {key} must be positive ratios (finite, > 0), e.g. 0.75,1,1.25; "
                                       f"got {','.join(f'{s:g}' for s in value)}")
                set_(key, value)
        for key in ("size_divisor", "min_short_side"):
            value = getattr(self, key)
            if value is not None and int(value) <= 0:
                raise TransegError(f"test protocol: {key} must be positive, got {value}")
        set_("flip", bool(self.flip))
        set_("ms_flip", bool(self.ms_flip))

    @classmethod
    def from_meta(cls, stored):
        """The protocol a checkpoint's metadata holds (`meta["test"]`, a dict), the default for None.
        Keys this version does not know (older files kept a `dataset` note here) are ignored."""
        if not stored:
            return cls()
        stored = dict(stored)
        ms = stored.pop("ms", None) or {}
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in stored.items() if k in known},
                   ms_scales=ms.get("scales"), ms_flip=ms.get("flip", True))

    def to_meta(self):
        """The stored form: JSON values, the layout `from_meta` reads."""
        out = dict(mode=self.mode, crop=self.crop, stride=self.stride, scale=self.scale, size_divisor=self.size_divisor,
                   scales=list(self.scales), flip=self.flip, min_short_side=self.min_short_side)
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}
        if self.ms_scales is not None:
            out["ms"] = dict(scales=list(self.ms_scales), flip=self.ms_flip)
        return out

    def replace(self, **changes):
        """A copy with `changes` (None values are left as they are: convenient for optional flags)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def multi_scale(self):
        """The paper's multi-scale + flip test (the stored ratios, else DEFAULT_MS_SCALES + flip)."""
        if self.ms_scales is None:
            return dataclasses.replace(self, scales=DEFAULT_MS_SCALES, flip=True)
        return dataclasses.replace(self, scales=self.ms_scales, flip=self.ms_flip)

    @property
    def single(self):
        """True for one pass per window: one scale of 1 and no flip (scores are the model's logits)."""
        return self.scales == (1.0,) and not self.flip

    def describe(self):
        """One line a reader can reproduce, e.g. 'whole, resize keep-ratio to (2048, 512), align 32, scales [1.0]'."""
        parts = [self.mode if self.mode == "whole" else f"slide {self.crop} stride {self.stride}"]
        parts.append(f"resize keep-ratio to {self.scale}" if self.scale else "original size")
        if self.size_divisor:
            parts.append(f"align {self.size_divisor}")
        if self.min_short_side:
            parts.append(f"short side >= {self.min_short_side}")
        parts.append(f"scales {list(self.scales)}" + (" + flip" if self.flip else ""))
        return ", ".join(parts)
