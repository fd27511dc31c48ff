"""Dataset-level segmentation metrics with the semantics of mmseg v0.x ``mean_iou``.

One confusion matrix is accumulated over the whole evaluation set (never averaged per image),
then reduced to per-class IoU / accuracy exactly as mmseg v0.13 does::

    intersect  = diag(M)               area_label = row sums    area_pred = column sums
    union      = area_label + area_pred - intersect
    IoU        = intersect / union      Acc = intersect / area_label
    aAcc       = sum(intersect) / sum(area_label)
    mIoU       = nanmean(IoU)           mAcc = nanmean(Acc)

and, with mmseg 1.x's IoUMetric definitions (`total_area_to_metrics`), per class and as nan-means::

    Dice       = 2 intersect / (area_pred + area_label)
    Precision  = intersect / area_pred  Recall = intersect / area_label (= Acc)
    Fscore     = (1 + b^2) P R / (b^2 P + R)     (b = 1: the Dice, as mmseg's beta default)
    fwIoU      = sum(area_label * IoU) / sum(area_label)   (frequency-weighted, over classes with an IoU)

A class that is neither in the labels nor in the predictions has union 0, so its IoU is nan and it
does not enter the mean; a class that is predicted but never labelled has IoU 0 and does count.

Accumulation runs on the tensors' device with no host synchronisation, so it can be called for
every batch of an evaluation loop without stalling the GPU:

* Everything lives in one flat int64 buffer (one kernel per update, one collective per
  ``all_reduce``)::

      [ K x (K+1) confusion counts | invalid-label count | ignored count ]

  Column ``K`` of the confusion block is the *overflow* column described below.
* On CPU the buffer is filled with ``torch.bincount``. On CUDA (and other accelerators)
  ``torch.bincount`` synchronises with the host twice (it reads ``min()`` and ``max()`` back
  to size its output), so there a fixed-size 1-D ``scatter_add_`` is used instead: same counts,
  no sync, and deterministic under ``torch.use_deterministic_algorithms``.

Out-of-range values (decided here, applied without any data-dependent Python branch):

* **Predictions** outside ``[0, K)`` on a labelled pixel are counted into the overflow column of
  the label's row: the pixel stays in that class's ``area_label`` (so it lowers its Acc, its IoU
  and aAcc, exactly like a wrong prediction would) but adds to no class's ``area_pred``.
  Clamping would be wrong (it invents a prediction of class 0 or K-1). The number of such pixels
  is reported as ``result["invalid_pred"]``; ``matrix`` shows only the K x K part.
* **Labels** outside ``[0, K)`` that are not ``ignore_index`` are a data bug (wrong
  ``num_classes``, a forgotten ``reduce_zero_label``, unmapped Cityscapes ids...). They are
  counted, not binned, and :meth:`ConfusionMatrix.compute` raises :class:`TransegError` if any
  were seen rather than return silently wrong numbers. (mmseg drops them silently.)
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from transeg.errors import TransegError

__all__ = ["ConfusionMatrix", "format_table"]


class ConfusionMatrix:
    """Accumulates a ``[K, K]`` confusion matrix (rows = label, columns = prediction).

    >>> cm = ConfusionMatrix(19)
    >>> for logits, label in loader:            # doctest: +SKIP
    ...     cm.update(logits.argmax(1), label)
    >>> cm.all_reduce()                          # doctest: +SKIP
    >>> print(format_table(cm.compute(), class_names))  # doctest: +SKIP
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, device=None):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise TransegError(f"ConfusionMatrix: num_classes must be a positive int, got {num_classes!r}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TransegError(f"ConfusionMatrix: ignore_index must be an int, got {ignore_index!r}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        # With device=None the buffer follows the first update's device (no copies of the batch).
        self._device = torch.device(device) if device is not None else None
        self._buf: Tensor | None = None

    # ---------------------------------------------------------------- layout of the flat buffer
    @property
    def _size(self) -> int:
        k = self.num_classes
        return k * (k + 1) + 2  # confusion with overflow column, invalid-label bin, ignored bin

    def _buffer(self, device=None) -> Tensor:
        if self._buf is None:
            dev = self._device or (torch.device(device) if device is not None else torch.device("cpu"))
            self._buf = torch.zeros(self._size, dtype=torch.int64, device=dev)
        return self._buf

    def _peek(self) -> Tensor:
        """The buffer, or zeros that do not fix the device yet if nothing was added."""
        if self._buf is not None:
            return self._buf
        return torch.zeros(self._size, dtype=torch.int64, device=self._device or "cpu")

    @property
    def device(self) -> torch.device:
        return self._peek().device

    @property
    def _full(self) -> Tensor:
        """``[K, K+1]`` counts including the overflow (out-of-range prediction) column."""
        k = self.num_classes
        return self._peek()[: k * (k + 1)].view(k, k + 1)

    @property
    def matrix(self) -> Tensor:
        """``[K, K]`` int64 counts; ``matrix[i, j]`` = pixels labelled ``i`` predicted ``j``."""
        return self._full[:, : self.num_classes]

    # --------------------------------------------------------------------------------- update
    def update(self, pred: Tensor, label: Tensor) -> None:
        """Add a batch. ``pred`` and ``label`` are integer tensors of the same shape (any shape).

        Pixels whose label is ``ignore_index`` are skipped. Runs on the buffer's device with no
        host synchronisation (only shapes and dtypes are inspected in Python).
        """
        pred = torch.as_tensor(pred)
        label = torch.as_tensor(label)
        if pred.shape != label.shape:
            raise TransegError(
                f"ConfusionMatrix.update: pred shape {tuple(pred.shape)} != label shape {tuple(label.shape)}"
            )
        for name, t in (("pred", pred), ("label", label)):
            if t.is_floating_point() or t.is_complex():
                raise TransegError(
                    f"ConfusionMatrix.update: {name} must hold integer class ids, got dtype {t.dtype} "
                    "(take logits.argmax(1) first)"
                )
        buf = self._buffer(pred.device)
        k = self.num_classes
        # int64 before any arithmetic: uint8 labels would wrap around in k*(k+1)*label.
        # A non-blocking copy *to* the CPU could be read before it lands, so only host->device
        # (or same-device) copies are non-blocking.
        nb = buf.device.type != "cpu"
        pred = pred.to(buf.device, torch.int64, non_blocking=nb).reshape(-1)
        label = label.to(buf.device, torch.int64, non_blocking=nb).reshape(-1)

        pred_col = torch.where((pred >= 0) & (pred < k), pred, k)  # overflow column k
        idx = label * (k + 1) + pred_col
        idx = torch.where((label >= 0) & (label < k), idx, k * (k + 1))  # invalid-label bin
        idx = torch.where(label == self.ignore_index, k * (k + 1) + 1, idx)  # ignored bin

        _add_counts(buf, idx, use_bincount=buf.device.type == "cpu")

    def all_reduce(self) -> None:
        """Sum the counts over all processes (no-op unless ``torch.distributed`` is initialised).

        Every rank must call it (it is a collective). With the NCCL backend the buffer must be on
        the rank's GPU: it is when updates were made with CUDA tensors; pass ``device=`` to the
        constructor if a rank may have seen no data at all.
        """
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self._buffer(), op=dist.ReduceOp.SUM)

    def reset(self) -> None:
        if self._buf is not None:
            self._buf.zero_()

    # -------------------------------------------------------------------------------- compute
    def compute(self, beta: float = 1.0) -> dict:
        """Reduce the accumulated counts to metrics (one host copy; fractions, not percent).

        Returns ``{"aAcc", "mIoU", "mAcc", "mDice", "mFscore", "mPrecision", "mRecall", "fwIoU": float,
        "IoU", "Acc", "Dice", "Fscore", "Precision", "Recall": list[float] (nan where undefined),
        "pixels": list[int] (labelled pixels per class), "confusion": [K][K] counts (rows: label),
        "invalid_pred": int, "ignored": int}``.
        ``beta`` weighs recall in the F-score (mmseg's default 1).
        """
        k = self.num_classes
        buf = self._peek().cpu().numpy()
        invalid_label, ignored = int(buf[-2]), int(buf[-1])
        if invalid_label:
            raise TransegError(
                f"ConfusionMatrix: {invalid_label} labelled pixels have values outside [0, {k}) that are not "
                f"ignore_index {self.ignore_index}; check num_classes, reduce_zero_label and the label encoding"
            )
        full = buf[: k * (k + 1)].reshape(k, k + 1).astype(np.float64)
        intersect = np.diag(full[:, :k])
        area_label = full.sum(1)  # includes out-of-range predictions (they are wrong predictions)
        area_pred = full[:, :k].sum(0)
        union = area_label + area_pred - intersect
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = intersect / union
            acc = intersect / area_label
            total = area_label.sum()
            a_acc = float(intersect.sum() / total) if total > 0 else float("nan")
            dice = 2 * intersect / (area_pred + area_label)
            precision = intersect / area_pred
            fscore = (1 + beta**2) * precision * acc / (beta**2 * precision + acc)
            known = ~np.isnan(iou)
            fw_iou = float((area_label[known] * iou[known]).sum() / area_label[known].sum()) \
                if area_label[known].sum() > 0 else float("nan")
        per_class = lambda v: [float(x) for x in v]  # noqa: E731
        return {
            "aAcc": a_acc,
            "mIoU": _nanmean(iou),
            "mAcc": _nanmean(acc),
            "mDice": _nanmean(dice),
            "mFscore": _nanmean(fscore),
            "mPrecision": _nanmean(precision),
            "mRecall": _nanmean(acc),
            "fwIoU": fw_iou,
            "IoU": per_class(iou),
            "Acc": per_class(acc),
            "Dice": per_class(dice),
            "Fscore": per_class(fscore),
            "Precision": per_class(precision),
            "Recall": per_class(acc),
            "pixels": [int(v) for v in area_label],
            "confusion": full[:, :k].astype(np.int64).tolist(),  # [label][prediction] pixel counts
            "invalid_pred": int(full[:, k].sum()),
            "ignored": ignored,
        }

    def __repr__(self) -> str:
        return f"ConfusionMatrix(num_classes={self.num_classes}, ignore_index={self.ignore_index}, device={self.device})"


def _add_counts(buf: Tensor, idx: Tensor, use_bincount: bool) -> None:
    """``buf[i] += (idx == i).sum()`` for every i; all of ``idx`` lies in ``[0, len(buf))``."""
    if use_bincount:  # fastest on CPU
        buf += torch.bincount(idx, minlength=buf.numel())
    else:  # CUDA bincount reads min/max back to the host; a fixed-size 1-D scatter does not
        buf.scatter_add_(0, idx, torch.ones_like(idx))


def _nanmean(values) -> float:
    finite = [float(v) for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def _pct(v: float) -> str:
    return "n/a" if v is None or math.isnan(v) else f"{100 * v:.2f}"


def format_table(result: dict, class_names: list[str]) -> str:
    """Per-class table (class, IoU, Acc, Dice, Precision; percent, 2 decimals; pixels) and two summary
    lines (the second when the result has mmseg 1.x's further metrics). Acc is the recall.

    ::

        class       IoU    Acc   Dice   Prec   pixels
        road      97.91  98.93  98.94  98.95  1234567
        ...
        aAcc 93.12  mIoU 81.40  mAcc 88.02
        mDice 89.20  mFscore 89.20  mPrecision 90.01  mRecall 88.02  fwIoU 88.51
    """
    for key in ("IoU", "Acc", "aAcc", "mIoU", "mAcc"):
        if key not in result:
            raise TransegError(f"format_table: result has no {key!r} (pass the dict from ConfusionMatrix.compute())")
    iou, acc = result["IoU"], result["Acc"]
    pixels = result.get("pixels", [None] * len(iou))
    names = list(class_names)
    if len(names) != len(iou):
        raise TransegError(f"format_table: {len(names)} class names for {len(iou)} classes")

    more = "Dice" in result
    extra = lambda i: (_pct(result["Dice"][i]), _pct(result["Precision"][i])) if more else ()  # noqa: E731
    rows = [(str(n), _pct(i), _pct(a), *extra(c), "" if p is None else str(p))
            for c, (n, i, a, p) in enumerate(zip(names, iou, acc, pixels))]
    header = ("class", "IoU", "Acc", *(("Dice", "Prec") if more else ()), "pixels")
    widths = [max(len(r[c]) for r in rows + [header]) for c in range(len(header))]

    def line(r):
        return "  ".join([r[0].ljust(widths[0])] + [r[c].rjust(widths[c]) for c in range(1, len(r))]).rstrip()

    out = [line(header), "-" * len(line(header))]
    out += [line(r) for r in rows]
    out.append(f"aAcc {_pct(result['aAcc'])}  mIoU {_pct(result['mIoU'])}  mAcc {_pct(result['mAcc'])}")
    if more:
        out.append("  ".join(f"{key} {_pct(result[key])}" for key in ("mDice", "mFscore", "mPrecision", "mRecall",
                                                                        "fwIoU")))
    if result.get("invalid_pred"):
        out.append(f"({result['invalid_pred']} predictions outside [0, {len(iou)}) counted as wrong)")
    return "\n".join(out)
