"""The contracts between a Segmentor's parts: what a backbone returns, what a decode head returns, and the
training hook a part may declare. The Segmentor and inference rely on these declarations only; they never
look for attributes on a part to find out what it is.

Backbone: `backbone(x)` with x [N,3,H,W] returns its feature maps, a list of [N,C_i,H/s_i,W/s_i]. A backbone
that returns more than feature maps returns a named tuple saying what each part is: `SemanticFeatures`
(SeMask: the maps and the class-prior maps) or `QueryFeatures` (EoMT: the patch map, the queries and the
intermediate mask predictions). Named tuples, so tracing, export and compile see plain containers.

Decode head: `head(backbone output)` returns, in eval, per-pixel logits [N,K,H/s,W/s] -- or, for a mask
classification head (`mask_classification = True`), a `MaskPrediction` that `mask_scores` turns into
per-pixel scores, which are then probabilities formed at full resolution (mask logits upsampled before
their sigmoid). In training a head that trains with its own loss returns `LossInputs` for its `loss`;
the others return logits for the Segmentor's per-pixel losses.
"""
from typing import Callable, ClassVar, NamedTuple, Protocol, Sequence, Union

import torch.nn.functional as F
from torch import Tensor

from .heads.mask2former_head import semantic_scores


class MaskPrediction(NamedTuple):
    """One mask classification: mask logits [N,Q,h,w] and class logits [N,Q,K+1] (the last: "no object")."""

    mask_logits: Tensor
    class_logits: Tensor


class SemanticFeatures(NamedTuple):
    """SeMask's backbone output: the four normalised maps and the four class-prior maps [N,K,h_i,w_i]."""

    features: list
    priors: list


class QueryFeatures(NamedTuple):
    """EoMT's backbone output: the normalised patch map [N,D,h,w], the queries [N,Q,D] after the final norm,
    and the mask predictions made before each query block where masked attention ran (deep supervision)."""

    patch_map: Tensor
    queries: Tensor
    predictions: list


BackboneOutput = Union[list, SemanticFeatures, QueryFeatures]


class LossInputs(dict):
    """A head's training output for its own `loss` (mask classification, auxiliary branches): the named
    tensors that loss reads ("pred_logits", "pred_masks", "aux_outputs", "sem", "seg", ...). Its type, not its
    contents, tells the Segmentor to hand it to the head's loss."""


def mask_scores(prediction: MaskPrediction, size=None) -> Tensor:
    """Per-pixel scores [N,K,h,w] of a mask classification: sum over queries of softmax(class)[:K] x
    sigmoid(mask). size: the mask logits are first upsampled there (bilinear, align_corners=False, in fp32),
    as the authors' semantic inference does at full resolution."""
    masks = prediction.mask_logits
    if size is not None:
        masks = F.interpolate(masks.float(), size=tuple(size), mode="bilinear", align_corners=False)
    return semantic_scores(prediction.class_logits, masks)


class Backbone(Protocol):
    """An encoder: x [N,3,H,W] -> `BackboneOutput`. pad_multiple: the multiple it zero-pads its input to
    (1: none), so the Segmentor upsamples logits to the padded size and crops."""

    pad_multiple: int
    out_channels: Sequence[int]

    def __call__(self, x: Tensor) -> BackboneOutput: ...


class DecodeHead(Protocol):
    """A decode head on a backbone's output. mask_classification: False -> eval output is logits
    [N,K,H/stride,W/stride]; True -> a `MaskPrediction` (scores via `mask_scores`, probabilities, formed at the
    padded input size). A head whose training output is `LossInputs` is an `OwnLossHead`."""

    num_classes: int
    stride: int
    mask_classification: ClassVar[bool]

    def __call__(self, features: BackboneOutput) -> Union[Tensor, MaskPrediction, LossInputs]: ...


class OwnLossHead(DecodeHead, Protocol):
    def loss(self, outputs: LossInputs, label: Tensor, ignore_index: int = 255, reduction: str = "all",
             ohem=None) -> dict: ...


class MaskPredictor(Protocol):
    """What EoMT's encoder asks for masks before each query block: (queries [N,Q,D], patch map [N,D,h,w]),
    both normalised -> `MaskPrediction`."""

    def predict_masks(self, queries: Tensor, patch_map: Tensor) -> MaskPrediction: ...


MaskPredictorFn = Callable[[Tensor, Tensor], MaskPrediction]


class IterationHook:
    """An optional training hook: a model part whose behaviour follows the training schedule derives from this
    and implements `set_iteration`. The engine calls `Segmentor.set_iteration(it)` before each optimizer step,
    `it` being the steps finished so far (restored from the training state on resume), and the Segmentor
    passes it to every part that declares this hook."""

    def set_iteration(self, iteration: int) -> None:
        raise NotImplementedError
