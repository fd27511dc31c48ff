"""Evaluation loop: dataset-level confusion matrix over a test protocol."""
import torch
from tqdm import tqdm

from .. import inference, isr
from .metrics import ConfusionMatrix


def default_protocol(model):
    """The test protocol a model was trained for (stored in its checkpoint), else whole-image at input size."""
    p = dict(mode="whole", scale=None, size_divisor=32, crop=None, stride=None, scales=[1.0], flip=False)
    p.update(model.meta.get("test") or {})
    return p


def describe(protocol):
    """One line a reader can reproduce, e.g. 'whole, resize keep-ratio to (2048, 512), align 32, scales [1.0]'."""
    parts = [protocol["mode"]]
    if protocol["mode"] == "slide":
        parts[0] += f" {tuple(protocol['crop'])} stride {tuple(protocol['stride'])}"
    parts.append(f"resize keep-ratio to {tuple(protocol['scale'])}" if protocol.get("scale") else "original size")
    if protocol.get("size_divisor"):
        parts.append(f"align {protocol['size_divisor']}")
    if protocol.get("min_short_side"):
        parts.append(f"short side >= {protocol['min_short_side']}")
    parts.append(f"scales {list(protocol['scales'])}" + (" + flip" if protocol["flip"] else ""))
    return ", ".join(parts)


def test_transform(model, protocol):
    """The protocol's resize/align + the model's normalisation, for uint8 [3,H,W] images."""
    from ..data import TestTransform

    return TestTransform(scale=protocol.get("scale"), size_divisor=protocol.get("size_divisor"),
                         mean=model.meta["mean"], std=model.meta["std"])


def protocol_scores(model, x, out_size, protocol):
    """`inference.predict` with the protocol's mode, windows, scales and flip."""
    return inference.predict(model, x, out_size=out_size, mode=protocol["mode"], crop=protocol.get("crop"),
                             stride=protocol.get("stride"), scales=protocol.get("scales", [1.0]),
                             flip=protocol.get("flip", False), size_divisor=protocol.get("size_divisor"),
                             min_short_side=protocol.get("min_short_side"))


@torch.no_grad()
def evaluate(model, dataset, protocol=None, device="cpu", amp_dtype=None, progress=True, max_samples=None):
    """Run `model` over `dataset` (items: uint8 image [3,H,W], int64 label [H,W]) and return
    ConfusionMatrix.compute()'s dict plus the protocol description. Labels stay at their original
    size: predictions are resized back to it, as mmseg does."""
    protocol = protocol or default_protocol(model)
    transform = test_transform(model, protocol)
    device = torch.device(device)
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(model.num_classes, ignore_index=getattr(dataset, "ignore_index", 255), device=device)
    n = len(dataset) if max_samples is None else min(len(dataset), max_samples)
    autocast = torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)
    for i in tqdm(range(n), desc="eval", disable=not progress, leave=False, dynamic_ncols=True):
        sample = dataset[i]
        x = transform(sample["image"]).unsqueeze(0).to(device, non_blocking=True)
        label = sample["label"].to(device, non_blocking=True)
        with autocast:
            scores = protocol_scores(model, x, label.shape[-2:], protocol)
        cm.update(scores.argmax(1)[0], label)
    cm.all_reduce()
    model.train(was_training)
    result = cm.compute()
    result["protocol"] = describe(protocol)
    if not isr.is_default(model.isr):
        result["protocol"] += f", {isr.describe(model.isr)}"
    return result
