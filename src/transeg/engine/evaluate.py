"""Evaluation loop: dataset-level confusion matrix over a test protocol."""
import torch
from tqdm import tqdm

from .. import inference, isr
from ..errors import TransegError
from .metrics import ConfusionMatrix


def evaluation_dataset(model, spec, split="val", source=None):
    """The dataset `spec` names (None: the data the model was trained on, else the synthetic set),
    checked to have the model's classes; `source` names the model in the error."""
    from ..data import build_dataset

    spec = spec if spec is not None else model.meta.get("dataset")
    dataset = build_dataset(spec, split)
    if len(dataset.classes) != model.num_classes:
        raise TransegError(f"{source or model.meta.get('variant', 'the model')}: a {model.num_classes}-class model "
                           f"cannot be evaluated on {spec or 'synthetic'} with {len(dataset.classes)} classes")
    return dataset


@torch.no_grad()
def evaluate(model, dataset, protocol=None, device=None, amp_dtype=None, progress=True, max_samples=None):
    """Run `model` over `dataset` (items: uint8 image [3,H,W], int64 label [H,W]) under `protocol`
    (default: the model's own) on the model's device, and return ConfusionMatrix.compute()'s dict
    plus the protocol's description. Labels stay at their original size: predictions are resized
    back to it, as mmseg does. `device`: moves the model there first."""
    protocol = protocol or model.protocol
    if device is not None:
        model.to(device)
    device = inference.model_device(model)
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(model.num_classes, ignore_index=getattr(dataset, "ignore_index", 255), device=device)
    n = len(dataset) if max_samples is None else min(len(dataset), max_samples)
    autocast = torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)
    for i in tqdm(range(n), desc="eval", disable=not progress, leave=False, dynamic_ncols=True):
        sample = dataset[i]
        label = sample["label"].to(device, non_blocking=True)
        with autocast:
            found, _ = inference.labels(model, sample["image"], protocol, out_size=label.shape[-2:])
        cm.update(found[0], label)
    cm.all_reduce()
    model.train(was_training)
    result = cm.compute()
    result["protocol"] = protocol.describe()
    if not isr.is_default(model.isr):
        result["protocol"] += f", {isr.describe(model.isr)}"
    return result
